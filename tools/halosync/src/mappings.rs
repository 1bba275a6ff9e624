//! Item mappings from the operator's side: `halosync mappings list | set |
//! unmapped` and `halosync items`, and the functions the console's Item
//! mappings page calls, so that the CLI and the console run the very same
//! code for each action:
//!
//! | action | function |
//! |---|---|
//! | skus dead-lettered as `unmapped` | [`unmapped_skus`] |
//! | HaloPSA's items to choose from (search by name) | [`list_items`] (`halo::items::list_items`) |
//! | the mappings in force (config and HaloPSA) | [`mapping_rows`] |
//! | choose an item for a sku | [`set_mapping`] (`halo::items::set_mapping`) |
//! | replay that sku's dead letters | `dlq::replay` with [`replay_filter`] |
//!
//! Where mappings live and why: `halosync_shared::halo::items`.
//!
//! API note: [`UnmappedSku`] has `families` (every family that dead-lettered
//! the sku) rather than a single `family`, because one sku is billed by
//! subscriptions, usage and overage alike and one mapping fixes all three.

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;

use chrono::{DateTime, Utc};
use halosync_shared::config::ConnectionConfig;
use halosync_shared::halo::items::{self, HaloItem, ItemMapping, MappingChange};
use halosync_shared::halo::{self, HaloClient};
use halosync_shared::store::{self, Keys, Store};
use halosync_shared::{Config, ErrorClass, Family};
use serde::Serialize;
use serde_json::Value;

use crate::dead::DeadLetter;
use crate::dead::FilterArgs;
use crate::table;

/// A connection's HaloPSA client and the Redis store it shares with the
/// workers (token cache, rate budget, item-mapping cache). The client
/// reads; a write goes through [`HaloClient::unfenced`] where it is made.
pub struct Halo {
    pub client: HaloClient,
    pub store: Store,
}

/// Connects to connection `name` of `config` the way a worker does, so the
/// operator's requests count against the same shared budget.
pub async fn connect(config: &Config, name: &str) -> anyhow::Result<Halo> {
    let conn = config.connection(name).ok_or_else(|| {
        let known: Vec<&str> = config.connections.keys().map(String::as_str).collect();
        anyhow::anyhow!(
            "no connection {name:?} is configured; configured: {}",
            if known.is_empty() {
                "(none)".to_string()
            } else {
                known.join(", ")
            }
        )
    })?;
    // The configuration's Redis access (TLS CA, ACL user, password file):
    // the error names Redis, the URL without its password, and the fix.
    let redis = store::connect_with(&config.redis_url, &config.redis_access)
        .await
        .map_err(|e| {
            anyhow::anyhow!("cannot reach Redis (it holds the shared token and rate budget): {e}")
        })?;
    let keys = Keys::new(&config.prefix);
    let http = halo::http_client(config.worker.http_timeout)?;
    let client = halo::client_for(
        conn,
        http,
        redis.clone(),
        &keys,
        &config.worker,
        config.retry.rate_limited_min_delay,
    );
    Ok(Halo {
        client,
        store: Store::new(redis, keys, config.worker.ledger_ttl),
    })
}

/// One sku (of one connection) waiting in the dead letters as `unmapped`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct UnmappedSku {
    pub connection: String,
    /// The product sku.
    pub sku: String,
    /// The item-map keys the workers tried, most specific first (e.g.
    /// `MS-365-BP:storage_gb`, then `MS-365-BP`): mapping any one of them
    /// fixes the events that tried it; the plain sku fixes all.
    pub keys: Vec<String>,
    /// Families that dead-lettered it, in the canonical order.
    pub families: Vec<String>,
    pub count: usize,
    pub first: Option<DateTime<Utc>>,
    pub last: Option<DateTime<Utc>>,
    /// Their event ids (what [`replay_filter`] replays).
    pub event_ids: Vec<String>,
}

/// The sku and keys an `unmapped` dead letter is waiting for: the keys its
/// message lists (`halo::items::unmapped`), else the subscription's
/// `data.product.sku`. `None` for other unmapped causes (an ambiguous
/// customer name).
pub fn sku_of(d: &DeadLetter) -> Option<(String, Vec<String>)> {
    let keys = d
        .error_message
        .as_deref()
        .map(items::keys_in_message)
        .unwrap_or_default();
    let product_sku = d
        .envelope
        .as_ref()
        .and_then(|e| e.pointer("/data/product/sku"))
        .and_then(Value::as_str)
        .map(str::to_string);
    match (keys.last(), product_sku) {
        // The last key of a chain is the plain sku, unless the chain stopped
        // at `overage:<metric>` (then the sku is not known).
        (Some(last), _) if !last.starts_with("overage:") => Some((last.clone(), keys)),
        (_, Some(sku)) if !sku.is_empty() => Some((sku.clone(), vec![sku])),
        (Some(last), None) => Some((last.clone(), keys)),
        _ => None,
    }
}

/// Groups unmapped dead letters by (connection, sku), most recent first.
pub fn group_unmapped(letters: &[DeadLetter]) -> Vec<UnmappedSku> {
    let mut groups: BTreeMap<(String, String), UnmappedSku> = BTreeMap::new();
    let mut families: BTreeMap<(String, String), BTreeSet<Family>> = BTreeMap::new();
    for d in letters
        .iter()
        .filter(|d| d.class.class() == Some(ErrorClass::Unmapped))
    {
        let Some((sku, keys)) = sku_of(d) else {
            continue;
        };
        let connection = d
            .connection
            .clone()
            .or_else(|| {
                d.envelope
                    .as_ref()
                    .and_then(|e| e.get("connection"))
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
            .unwrap_or_default();
        let id = (connection.clone(), sku.clone());
        let g = groups.entry(id.clone()).or_insert_with(|| UnmappedSku {
            connection,
            sku,
            keys: Vec::new(),
            families: Vec::new(),
            count: 0,
            first: None,
            last: None,
            event_ids: Vec::new(),
        });
        for k in keys {
            if !g.keys.contains(&k) {
                g.keys.push(k);
            }
        }
        families.entry(id).or_default().insert(d.family);
        g.count += 1;
        let t = d.last_failure_at.or(d.first_failure_at);
        if let Some(t) = d.first_failure_at.or(t) {
            g.first = Some(g.first.map_or(t, |f| f.min(t)));
        }
        if let Some(t) = t {
            g.last = Some(g.last.map_or(t, |l| l.max(t)));
        }
        if let Some(e) = &d.event_id {
            if !g.event_ids.contains(e) {
                g.event_ids.push(e.clone());
            }
        }
    }
    let mut out: Vec<UnmappedSku> = groups
        .into_iter()
        .map(|(id, mut g)| {
            g.families = families
                .get(&id)
                .map(|f| f.iter().map(|f| f.as_str().to_string()).collect())
                .unwrap_or_default();
            // In chain order (most specific first), the plain sku last.
            let sku = g.sku.clone();
            g.keys.sort_by_key(|k| k == &sku);
            g
        })
        .collect();
    out.sort_by(|a, b| b.last.cmp(&a.last).then_with(|| a.sku.cmp(&b.sku)));
    out
}

/// The skus dead-lettered as `unmapped` (of `connection` only, when given),
/// read from the dead queues without disturbing them.
pub async fn unmapped_skus(
    config: &Config,
    connection: Option<&str>,
) -> anyhow::Result<Vec<UnmappedSku>> {
    let args = FilterArgs {
        class: vec![ErrorClass::Unmapped],
        connection: connection.map(|c| vec![c.to_string()]).unwrap_or_default(),
        ..Default::default()
    };
    let letters = crate::dlq::read(config, &args).await?;
    Ok(group_unmapped(&letters))
}

/// The `dlq replay` filters that replay exactly these unmapped dead letters
/// (an [`UnmappedSku`]'s `connection` and `event_ids`).
pub fn replay_filter(connection: &str, event_ids: &[String]) -> FilterArgs {
    FilterArgs {
        class: vec![ErrorClass::Unmapped],
        connection: vec![connection.to_string()],
        event_id: event_ids.to_vec(),
        ..Default::default()
    }
}

/// One mapping in force.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MappingRow {
    pub key: String,
    pub item_id: i64,
    /// The item's name in HaloPSA (`None`: no such item there).
    pub item_name: Option<String>,
    /// `config` (`[connections.X.items]`) or `halopsa` (an ExternalLink).
    pub source: &'static str,
    /// A HaloPSA mapping that the config overrides for the same key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overridden_by_config: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link_id: Option<i64>,
}

/// Every mapping in force for the connection: the config's and HaloPSA's,
/// with item names, sorted by key (config first for the same key).
pub async fn mapping_rows(halo: &Halo) -> anyhow::Result<Vec<MappingRow>> {
    let conn = halo.client.connection();
    let stored: Vec<ItemMapping> = items::list_mappings(&halo.client).await?;
    let names: BTreeMap<i64, String> = items::list_items(&halo.client, None)
        .await?
        .into_iter()
        .map(|i| (i.id, i.name))
        .collect();
    let mut rows: Vec<MappingRow> = conn
        .items
        .iter()
        .map(|(k, id)| MappingRow {
            key: k.clone(),
            item_id: *id,
            item_name: names.get(id).cloned(),
            source: "config",
            overridden_by_config: None,
            link_id: None,
        })
        .collect();
    rows.extend(stored.into_iter().map(|m| MappingRow {
        item_name: names.get(&m.item_id).cloned(),
        overridden_by_config: conn.items.get(&m.key).copied(),
        key: m.key,
        item_id: m.item_id,
        source: "halopsa",
        link_id: Some(m.link_id),
    }));
    rows.sort_by(|a, b| a.key.cmp(&b.key).then_with(|| a.source.cmp(b.source)));
    Ok(rows)
}

/// What choosing an item did, for the CLI's and the console's message.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SetResult {
    pub connection: String,
    pub key: String,
    pub item_id: i64,
    pub item_name: String,
    #[serde(flatten)]
    pub change: MappingChange,
    /// The config maps this key to another item, which keeps precedence.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_item: Option<i64>,
}

impl SetResult {
    /// One sentence saying what happened.
    pub fn describe(&self) -> String {
        let what = match &self.change {
            MappingChange::Created { link_id } => format!(
                "Mapped {:?} to HaloPSA item {} ({}); stored in HaloPSA as ExternalLink {link_id}",
                self.key, self.item_id, self.item_name
            ),
            MappingChange::Moved { from_item, link_id } => format!(
                "Moved {:?} from HaloPSA item {from_item} to item {} ({}); stored in HaloPSA as ExternalLink {link_id}",
                self.key, self.item_id, self.item_name
            ),
            MappingChange::Unchanged { .. } => format!(
                "{:?} was already mapped to HaloPSA item {} ({}); nothing changed",
                self.key, self.item_id, self.item_name
            ),
        };
        match self.config_item {
            Some(c) if c != self.item_id => format!(
                "{what}. Note: [connections.{}.items] maps {:?} to item {c}, and the config takes precedence; remove that line for this mapping to apply",
                self.connection, self.key
            ),
            _ => format!("{what}. Every worker uses it from its next message on, without a restart."),
        }
    }
}

/// Maps `key` (a sku, `sku:metric` or `overage:metric`) to `item_id`.
pub async fn set_mapping(halo: &Halo, key: &str, item_id: i64) -> anyhow::Result<SetResult> {
    let found = items::item(&halo.client, item_id).await?;
    let conn: &ConnectionConfig = halo.client.connection();
    let Some(item) = found else {
        anyhow::bail!(
            "HaloPSA has no item {item_id}; list them with `halosync items --connection {} --search NAME`",
            conn.name
        );
    };
    // An item mapping is no aggregate's: no worker writes it under a lock.
    let writer = halo
        .client
        .unfenced("the operator sets an item mapping: no aggregate lock covers it");
    let change = items::set_mapping(&writer, &halo.store, key, item_id).await?;
    Ok(SetResult {
        connection: conn.name.clone(),
        key: key.trim().to_string(),
        item_id,
        item_name: item.name,
        change,
        config_item: conn.items.get(key.trim()).copied(),
    })
}

/// HaloPSA's items whose name contains `search`.
pub async fn list_items(halo: &Halo, search: Option<&str>) -> anyhow::Result<Vec<HaloItem>> {
    Ok(items::list_items(&halo.client, search).await?)
}

// ----- the CLI ----------------------------------------------------------------

/// `halosync mappings list`
pub async fn cli_list(config: &Config, name: &str, json: bool) -> anyhow::Result<ExitCode> {
    let halo = connect(config, name).await?;
    let rows = mapping_rows(&halo).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    if rows.is_empty() {
        println!("No item mappings for connection {name}: map a sku with `halosync mappings set --connection {name} --sku SKU --item ID` (items: `halosync items --connection {name}`).");
        return Ok(ExitCode::SUCCESS);
    }
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.key.clone(),
                r.item_id.to_string(),
                r.item_name
                    .clone()
                    .unwrap_or_else(|| "(no such item)".into()),
                match (r.source, r.overridden_by_config) {
                    ("halopsa", Some(c)) => format!("halopsa (overridden by config: {c})"),
                    (s, _) => s.to_string(),
                },
            ]
        })
        .collect();
    print!(
        "{}",
        table::render(&["KEY", "ITEM", "NAME", "SOURCE"], &body, &[1])
    );
    Ok(ExitCode::SUCCESS)
}

/// `halosync mappings set`
pub async fn cli_set(
    config: &Config,
    name: &str,
    key: &str,
    item_id: i64,
    replay: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let halo = connect(config, name).await?;
    let result = set_mapping(&halo, key, item_id).await?;
    let waiting: Vec<UnmappedSku> = unmapped_skus(config, Some(name))
        .await?
        .into_iter()
        .filter(|u| u.keys.iter().any(|k| k == result.key.as_str()))
        .collect();
    let ids: Vec<String> = waiting
        .iter()
        .flat_map(|u| u.event_ids.iter().cloned())
        .collect();
    if json && !replay {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "mapping": result,
                "waiting_dead_letters": ids,
            }))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    if !json {
        println!("{}", result.describe());
    }
    if ids.is_empty() {
        if !json {
            println!("No dead letters wait for {:?}.", result.key);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let args = replay_filter(name, &ids);
    if replay {
        return crate::dlq::replay(config, &args, false, json).await;
    }
    println!(
        "{} wait in the dead letters for it; replay them with:\n  halosync dlq replay --class unmapped --connection {} --event-id {}",
        table::plural(ids.len() as u64, "dead letter"),
        table::shell_word(name),
        table::shell_word(&ids.join(","))
    );
    Ok(ExitCode::SUCCESS)
}

/// `halosync mappings unmapped`
pub async fn cli_unmapped(
    config: &Config,
    connection: Option<&str>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let skus = unmapped_skus(config, connection).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&skus)?);
        return Ok(ExitCode::SUCCESS);
    }
    if skus.is_empty() {
        println!("No dead letters wait for an item mapping.");
        return Ok(ExitCode::SUCCESS);
    }
    let now = Utc::now();
    let body: Vec<Vec<String>> = skus
        .iter()
        .map(|u| {
            vec![
                u.connection.clone(),
                u.sku.clone(),
                u.count.to_string(),
                u.families.join(","),
                u.last
                    .as_ref()
                    .map(|t| table::age(t, &now))
                    .unwrap_or_else(|| "-".into()),
                u.keys.join(", "),
            ]
        })
        .collect();
    print!(
        "{}",
        table::render(
            &[
                "CONNECTION",
                "SKU",
                "COUNT",
                "FAMILIES",
                "LAST",
                "KEYS TRIED"
            ],
            &body,
            &[2]
        )
    );
    if let Some(u) = skus.first() {
        println!(
            "\nMap one with: halosync mappings set --connection {} --sku {} --item ID --replay   (items: halosync items --connection {} --search NAME)",
            table::shell_word(&u.connection),
            table::shell_word(&u.sku),
            table::shell_word(&u.connection)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `halosync items`
pub async fn cli_items(
    config: &Config,
    name: &str,
    search: Option<&str>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let halo = connect(config, name).await?;
    let found = list_items(&halo, search).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&found)?);
        return Ok(ExitCode::SUCCESS);
    }
    if found.is_empty() {
        match search {
            Some(s) => println!("No HaloPSA item's name contains {s:?}; try a shorter --search."),
            None => println!("HaloPSA has no items on connection {name}."),
        }
        return Ok(ExitCode::SUCCESS);
    }
    let body: Vec<Vec<String>> = found
        .iter()
        .map(|i| {
            vec![
                i.id.to_string(),
                i.baseprice.map(|p| format!("{p:.2}")).unwrap_or_default(),
                i.name.clone(),
            ]
        })
        .collect();
    print!(
        "{}",
        table::render(&["ID", "PRICE", "NAME"], &body, &[0, 1])
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{AMQPValue, FieldTable};
    use lapin::BasicProperties;

    fn letter(family: Family, body: Value, message: &str, id: &str) -> DeadLetter {
        let mut h = FieldTable::default();
        h.insert(
            "x-halosync-error-class".into(),
            AMQPValue::LongString("unmapped".as_bytes().to_vec().into()),
        );
        h.insert(
            "x-halosync-error-message".into(),
            AMQPValue::LongString(message.as_bytes().to_vec().into()),
        );
        h.insert(
            "x-halosync-connection".into(),
            AMQPValue::LongString("acme".as_bytes().to_vec().into()),
        );
        let props = BasicProperties::default()
            .with_headers(h)
            .with_message_id(id.into());
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        DeadLetter::read(family, "q", 1, &props, &bytes)
    }

    #[test]
    fn unmapped_letters_group_by_sku_across_families() {
        let conn_msg = |keys: &[&str]| {
            let k: Vec<String> = keys.iter().map(|k| format!("{k:?}")).collect();
            format!(
                "no HaloPSA item mapping for x on connection acme; item keys tried: {}. Map one",
                k.join(", ")
            )
        };
        let sub = letter(
            Family::Subscription,
            serde_json::json!({"id": "e1", "connection": "acme", "data": {"product": {"sku": "MS-365-BP"}}}),
            "no HaloPSA item mapping for sku \"MS-365-BP\" (old format)",
            "e1",
        );
        let usage = letter(
            Family::Usage,
            serde_json::json!({"id": "e2", "connection": "acme", "data": {}}),
            &conn_msg(&["MS-365-BP:storage_gb", "MS-365-BP"]),
            "e2",
        );
        let other = letter(
            Family::Overage,
            serde_json::json!({"id": "e3", "connection": "acme", "data": {}}),
            &conn_msg(&["overage:seats", "AZ-1:seats", "AZ-1"]),
            "e3",
        );
        let groups = group_unmapped(&[sub, usage, other]);
        assert_eq!(groups.len(), 2);
        let ms = groups
            .iter()
            .find(|g| g.sku == "MS-365-BP")
            .expect("grouped");
        assert_eq!(ms.count, 2);
        assert_eq!(ms.families, ["subscription", "usage"]);
        assert_eq!(ms.keys, ["MS-365-BP:storage_gb", "MS-365-BP"]);
        assert_eq!(ms.event_ids, ["e1", "e2"]);
        let az = groups.iter().find(|g| g.sku == "AZ-1").expect("grouped");
        assert_eq!(az.keys, ["overage:seats", "AZ-1:seats", "AZ-1"]);
        let f = replay_filter(&az.connection, &az.event_ids);
        assert_eq!(f.event_id, ["e3"]);
        assert_eq!(f.class, [ErrorClass::Unmapped]);
    }
}
