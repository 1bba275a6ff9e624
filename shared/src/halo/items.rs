//! Item mappings: which HaloPSA item a product sku (or `sku:metric`, or
//! `overage:metric`) is billed as.
//!
//! Two sources, in this order of precedence:
//!
//! 1. the connection's `[items]` table in the config file (no request);
//! 2. a mapping stored **in HaloPSA itself**, as an ExternalLink on the Item
//!    (reference §3.9, §5: `POST /ExternalLink` with `halo_id`), with
//!    `third_party_type` = [`LINK_TYPE`] (`halosync.item`), `third_party_id`
//!    = the key, `table_id` = [`TABLE_ID`] (Item = 8, [PD-TABLE];
//!    UNCONFIRMED for links, as for every other kind). This is DESIGN §2's
//!    "HaloPSA is the source of truth" applied to mappings: it survives a
//!    lost Redis, needs no config change and no restart, and every worker of
//!    every host sees it.
//!
//! A fallback chain (usage: `sku:metric` → `sku`; overage: `overage:metric`
//! → `sku:metric` → `sku`) is resolved by [`resolve_chain`]: the config is
//! tried for **every** key of the chain first, then HaloPSA in chain order.
//! So a config entry always wins over a HaloPSA mapping (even one for a
//! more specific key), and a config hit costs no HaloPSA request at all.
//!
//! The HaloPSA mappings of a connection are read with one paged
//! `GET /ExternalLink?third_party_type=halosync.item` and cached in Redis
//! as a whole for [`CACHE_TTL`] (30 s), so misses are cached too: however
//! many events name unmapped skus, a connection spends at most one list
//! request per 30 s on mappings (≤ 10 of its default 300 requests per 5
//! minutes, and only while some key is not in the config). [`set_mapping`]
//! rewrites that cache at once, so a mapping made through halosync (CLI or
//! console) is seen by every worker at its next message; the TTL only
//! bounds how long a mapping edited in HaloPSA's own UI takes to be seen.
//!
//! One mapping per key. Replacing one creates the new link first and then
//! deletes the old ones, rather than changing `halo_id` of the existing
//! link in place: whether HaloPSA honours a change of `halo_id` on an
//! update is UNCONFIRMED, a create and a delete are not; and the key is
//! never unmapped in between. Should two links for one key ever coexist
//! (a delete that failed), the newest link (highest id) wins.
//!
//! `list_items` reads `/Item` paged, with HaloPSA's `search` (a LIKE match,
//! reference §3.6) and the same match again here, case-insensitively,
//! because unknown or ignored parameters return the whole table.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::client::record_id;
use super::models::{body, ExternalLinkList, Int32, Item};
use super::HaloClient;
use crate::config::ConnectionConfig;
use crate::error::Failure;
use crate::store::Store;

/// `third_party_type` of the item-mapping ExternalLinks.
pub const LINK_TYPE: &str = "halosync.item";
/// HaloPSA's table id of `Item` ([PD-TABLE]; UNCONFIRMED for links).
pub const TABLE_ID: i64 = 8;
/// How long the HaloPSA mappings of a connection are cached in Redis.
pub const CACHE_TTL: Duration = Duration::from_secs(30);
/// The marker that lists the keys tried in an `unmapped` failure's message,
/// read back by [`keys_in_message`] (the operator's "unmapped skus").
const KEYS_MARKER: &str = "item keys tried: ";

/// One mapping stored in HaloPSA.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemMapping {
    /// The sku, `sku:metric` or `overage:metric`.
    pub key: String,
    pub item_id: i64,
    /// The ExternalLink that holds it.
    pub link_id: i64,
}

/// One HaloPSA item, as offered to choose from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HaloItem {
    pub id: i64,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseprice: Option<f64>,
    /// HaloPSA's `Item` model has no active flag: the list's
    /// `includeinactive`/`includeactive` parameters select by it. So this
    /// says what the query that found the item asked for: [`list_items`]
    /// asks for active items only (false); [`item`] cannot tell from
    /// `GET /Item/{id}` and says false.
    #[serde(default)]
    pub inactive: bool,
}

/// What [`set_mapping`] did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum MappingChange {
    /// The key was not mapped in HaloPSA before.
    Created { link_id: i64 },
    /// The key was mapped to another item; it now maps to this one.
    Moved { from_item: i64, link_id: i64 },
    /// Already mapped to this item: nothing written.
    Unchanged { link_id: i64 },
}

/// The item of `key`: the config's `[items]`, else the mapping stored in
/// HaloPSA (through the Redis cache). `Ok(None)`: mapped nowhere.
pub async fn resolve(
    halo: &HaloClient,
    store: &Store,
    conn: &ConnectionConfig,
    key: &str,
) -> Result<Option<i64>, Failure> {
    Ok(resolve_chain(halo, store, conn, &[key.to_string()])
        .await?
        .map(|(_, id)| id))
}

/// The first key of `keys` that is mapped, and its item: every key in the
/// config first, then every key in HaloPSA, each in the order given.
pub async fn resolve_chain(
    halo: &HaloClient,
    store: &Store,
    conn: &ConnectionConfig,
    keys: &[String],
) -> Result<Option<(String, i64)>, Failure> {
    if let Some(hit) = keys
        .iter()
        .find_map(|k| conn.items.get(k).map(|id| (k.clone(), *id)))
    {
        return Ok(Some(hit));
    }
    let stored = cached_mappings(halo, store).await?;
    Ok(keys
        .iter()
        .find_map(|k| stored.get(k).map(|id| (k.clone(), *id))))
}

/// key → item id of every HaloPSA mapping, from Redis or (and then cached)
/// from HaloPSA.
async fn cached_mappings(
    halo: &HaloClient,
    store: &Store,
) -> Result<BTreeMap<String, i64>, Failure> {
    // Losing Redis costs speed, never correctness: without the cache, ask
    // HaloPSA.
    let hit = match store.item_mappings(&halo.connection().name).get().await {
        Ok(hit) => hit,
        Err(e) => {
            tracing::debug!(error = %e, "item-mapping cache unavailable; reading HaloPSA");
            None
        }
    };
    if let Some(map) = hit {
        return Ok(map);
    }
    let mappings = list_mappings(halo).await?;
    Ok(write_cache(halo, store, &mappings).await)
}

/// Caches `mappings` for [`CACHE_TTL`] and returns them as a map. A cache
/// that cannot be written is only logged: the mappings are in HaloPSA.
async fn write_cache(
    halo: &HaloClient,
    store: &Store,
    mappings: &[ItemMapping],
) -> BTreeMap<String, i64> {
    let map: BTreeMap<String, i64> = mappings
        .iter()
        .map(|m| (m.key.clone(), m.item_id))
        .collect();
    let written = store
        .item_mappings(&halo.connection().name)
        .set(&map, Some(CACHE_TTL))
        .await;
    if let Err(e) = written {
        tracing::warn!(error = %e, ttl_secs = CACHE_TTL.as_secs(),
            "could not cache the item mappings; workers see a change within the cache's TTL");
    }
    map
}

/// Every item mapping stored in HaloPSA, one per key (the newest link wins
/// should there be two), sorted by key.
pub async fn list_mappings(halo: &HaloClient) -> Result<Vec<ItemMapping>, Failure> {
    let mut all = all_links(halo).await?;
    // Newest link last, so that it overwrites older ones of the same key.
    all.sort_by_key(|m| m.link_id);
    let by_key: BTreeMap<String, ItemMapping> =
        all.into_iter().map(|m| (m.key.clone(), m)).collect();
    Ok(by_key.into_values().collect())
}

/// Every item-mapping link, duplicates included.
async fn all_links(halo: &HaloClient) -> Result<Vec<ItemMapping>, Failure> {
    let rows = halo
        .list(
            "/ExternalLink",
            "links",
            &[("third_party_type", LINK_TYPE.to_string())],
        )
        .await?;
    Ok(rows.iter().filter_map(mapping_of).collect())
}

/// A link row as a mapping, if it is one (checked field by field: HaloPSA
/// ignores filters it does not know).
fn mapping_of(row: &Value) -> Option<ItemMapping> {
    if text(row, "third_party_type").as_deref() != Some(LINK_TYPE) {
        return None;
    }
    let key = text(row, "third_party_id").filter(|k| !k.is_empty())?;
    Some(ItemMapping {
        key,
        item_id: int(row, "halo_id")?,
        link_id: record_id(row)?,
    })
}

/// Maps `key` to HaloPSA item `item_id`, idempotently (see the module doc),
/// after checking that the item exists; refreshes the Redis cache so every
/// worker uses it from its next message on.
pub async fn set_mapping(
    halo: &HaloClient,
    store: &Store,
    key: &str,
    item_id: i64,
) -> Result<MappingChange, Failure> {
    let key = key.trim();
    if key.is_empty() {
        return Err(Failure::invalid(
            "the sku is empty: give the product sku as in the events' data.product.sku (or sku:metric, or overage:metric)",
        ));
    }
    item(halo, item_id).await?.ok_or_else(|| {
        Failure::rejected(format!(
            "HaloPSA has no item {item_id}: pick one from `halosync items --connection {}`",
            halo.connection().name
        ))
    })?;
    let mut existing: Vec<ItemMapping> = all_links(halo)
        .await?
        .into_iter()
        .filter(|m| m.key == key)
        .collect();
    existing.sort_by_key(|m| m.link_id);
    let change = match existing.last() {
        Some(newest) if newest.item_id == item_id => {
            let keep = newest.link_id;
            for old in existing.iter().filter(|m| m.link_id != keep) {
                halo.delete(&format!("/ExternalLink/{}", old.link_id))
                    .await?;
            }
            MappingChange::Unchanged { link_id: keep }
        }
        newest => {
            let from = newest.map(|m| m.item_id);
            let saved = halo
                .save(
                    "/ExternalLink",
                    body(&ExternalLinkList {
                        halo_id: Some(Int32(item_id)),
                        table_id: Some(Int32(TABLE_ID)),
                        third_party_id: Some(key.to_string()),
                        third_party_type: Some(LINK_TYPE.to_string()),
                        third_party_desc: Some("halosync item mapping".into()),
                        ..ExternalLinkList::default()
                    })?,
                )
                .await?;
            let link_id = record_id(&saved).ok_or_else(|| {
                Failure::transient("HaloPSA saved the ExternalLink but returned no id")
            })?;
            for old in &existing {
                halo.delete(&format!("/ExternalLink/{}", old.link_id))
                    .await?;
            }
            match from {
                Some(from_item) => MappingChange::Moved { from_item, link_id },
                None => MappingChange::Created { link_id },
            }
        }
    };
    let mappings = list_mappings(halo).await?;
    write_cache(halo, store, &mappings).await;
    Ok(change)
}

/// One item by id; `None` when HaloPSA has none (404).
pub async fn item(halo: &HaloClient, item_id: i64) -> Result<Option<HaloItem>, Failure> {
    match halo.get(&format!("/Item/{item_id}"), &[]).await {
        Ok(v) => {
            // Some builds wrap single records in a list envelope.
            let v = match v {
                Value::Object(ref m) if m.contains_key("id") => v,
                other => super::first_record(other).unwrap_or(Value::Null),
            };
            Ok(item_of(&v, false).filter(|i| i.id == item_id))
        }
        Err(e) if e.status() == Some(404) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// HaloPSA's items (active ones; paged), whose name contains `search`
/// (case-insensitive) when given, sorted by name.
pub async fn list_items(halo: &HaloClient, search: Option<&str>) -> Result<Vec<HaloItem>, Failure> {
    let search = search.map(str::trim).filter(|s| !s.is_empty());
    // Active items only (`includeinactive` defaults to false; said
    // explicitly since the rows do not carry the state).
    let mut query = vec![("includeinactive", "false".to_string())];
    if let Some(s) = search {
        query.push(("search", s.to_string()));
    }
    let rows = halo.list("/Item", "items", &query).await?;
    let needle = search.map(str::to_lowercase);
    let mut items: Vec<HaloItem> = rows
        .iter()
        .filter_map(|r| item_of(r, false))
        .filter(|i| {
            needle
                .as_deref()
                .is_none_or(|n| i.name.to_lowercase().contains(n))
        })
        .collect();
    items.sort_by_key(|a| (a.name.to_lowercase(), a.id));
    Ok(items)
}

/// An item row; `inactive` is what the query asked for (see [`HaloItem`]).
fn item_of(row: &Value, inactive: bool) -> Option<HaloItem> {
    let item: Item = serde_json::from_value(row.clone()).ok()?;
    Some(HaloItem {
        id: item.id.0,
        name: item.name.unwrap_or_default(),
        description: item.description.filter(|d| !d.is_empty()),
        baseprice: item.baseprice,
        inactive,
    })
}

/// The `unmapped` failure naming the keys tried, in order, in a form
/// [`keys_in_message`] reads back.
pub fn unmapped(conn: &ConnectionConfig, what: &str, tried: &[String]) -> Failure {
    let name = &conn.name;
    let quoted: Vec<String> = tried
        .iter()
        .map(|k| serde_json::to_string(k).unwrap_or_default())
        .collect();
    let first = tried.first().map(String::as_str).unwrap_or("SKU");
    Failure::unmapped(format!(
        "no HaloPSA item mapping for {what} on connection {name}; {KEYS_MARKER}{}. Map one with `halosync mappings set --connection {name} --sku {first} --item <id>` (or the console's Item mappings page, or add \"{first}\" = <item id> under [connections.{name}.items]), then replay",
        quoted.join(", ")
    ))
}

/// The keys an [`unmapped`] message says were tried, most specific first.
/// Empty for other messages.
pub fn keys_in_message(message: &str) -> Vec<String> {
    let Some(start) = message.find(KEYS_MARKER) else {
        return Vec::new();
    };
    let mut rest = &message[start + KEYS_MARKER.len()..];
    let mut keys = Vec::new();
    // A sequence of JSON strings separated by ", ".
    while rest.starts_with('"') {
        let mut de = serde_json::Deserializer::from_str(rest).into_iter::<String>();
        let Some(Ok(k)) = de.next() else { break };
        let used = de.byte_offset();
        keys.push(k);
        rest = &rest[used..];
        match rest.strip_prefix(", ") {
            Some(r) => rest = r,
            None => break,
        }
    }
    keys
}

fn text(row: &Value, key: &str) -> Option<String> {
    match row.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn int(row: &Value, key: &str) -> Option<i64> {
    match row.get(key)? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn conn() -> ConnectionConfig {
        crate::config::Config::from_toml(
            "[connections.acme]\nresource_server = \"http://h/api\"\nauth_server = \"http://h/auth\"\nclient_id = \"x\"\nclient_secret_env = \"HALOSYNC_TEST_ITEMS_SECRET\"\n",
            std::path::Path::new("t.toml"),
            &TestEnv,
        )
        .map(|c| c.connections["acme"].clone())
        .expect("test config")
    }

    struct TestEnv;
    impl crate::config::Env for TestEnv {
        fn var(&self, key: &str) -> Option<String> {
            (key == "HALOSYNC_TEST_ITEMS_SECRET").then(|| "s".to_string())
        }
    }

    #[test]
    fn unmapped_messages_name_the_keys_and_read_back() {
        let tried = vec![
            "MS-365-BP:storage_gb".to_string(),
            "MS \"odd\", sku".to_string(),
        ];
        let f = unmapped(&conn(), "usage of MS-365-BP", &tried);
        assert_eq!(f.class, crate::error::FailureClass::Unmapped);
        assert!(f
            .message
            .contains("halosync mappings set --connection acme"));
        assert_eq!(keys_in_message(&f.message), tried);
        assert!(keys_in_message("no HaloPSA item mapping for sku \"X\"").is_empty());
    }

    #[test]
    fn link_rows_are_checked_field_by_field() {
        let ok = json!({"id": 7, "halo_id": "1001", "third_party_id": "SKU-1", "third_party_type": LINK_TYPE});
        assert_eq!(
            mapping_of(&ok),
            Some(ItemMapping {
                key: "SKU-1".into(),
                item_id: 1001,
                link_id: 7
            })
        );
        let other = json!({"id": 8, "halo_id": 1, "third_party_id": "acc_1", "third_party_type": "halosync.account"});
        assert_eq!(mapping_of(&other), None);
    }
}
