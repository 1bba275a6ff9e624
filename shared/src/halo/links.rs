//! Identity: which HaloPSA record a billing id maps to, and the version of
//! the newest event applied to it (DESIGN §2.3).
//!
//! The map lives in Redis for speed and in HaloPSA itself as an
//! `ExternalLink` (reference §3.9, §5), so that it can be rebuilt when Redis
//! is empty:
//!
//! | ExternalLink field          | holds                                   |
//! |-----------------------------|-----------------------------------------|
//! | `third_party_id`            | the billing id (e.g. `acc_1001`)        |
//! | `third_party_type`          | `halosync.<kind>` (e.g. `halosync.account`) |
//! | `halo_id`, `table_id`       | the HaloPSA record and its table        |
//! | `third_party_secondary_id`  | the applied event version (`s=17;t=…`)  |
//!
//! Keeping the version in HaloPSA costs one request per applied event, and
//! buys ordering that survives a lost Redis: an older event can never
//! overwrite a newer one, even with Redis flushed.
//!
//! UNCONFIRMED in the reference: the `table_id` values (taken from
//! [PD-TABLE]), whether HaloPSA keeps links of a `third_party_type` it does
//! not know, and whether the GET filters are honoured. Unknown query
//! parameters are silently ignored by HaloPSA, so every row returned is
//! checked here again, field by field.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};

use super::client::record_id;
use super::models::{ExternalLinkList, Int32};
use super::HaloClient;
use crate::contract::Version;
use crate::error::Failure;
use crate::store::{Mapping, Store};

/// A kind of HaloPSA record that halosync maps billing ids to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kind {
    /// Short name, used in Redis keys.
    pub name: &'static str,
    /// `third_party_type` of its ExternalLinks.
    pub third_party_type: &'static str,
    /// HaloPSA's internal table id ([PD-TABLE], UNCONFIRMED for links).
    pub table_id: i64,
}

impl Kind {
    /// The aggregate lock (`Store::lock`) under which one record of this
    /// kind is found or created: `<name>:<billing_id>`.
    pub fn create_lock(&self, billing_id: &str) -> String {
        format!("{}:{billing_id}", self.name)
    }
}

/// Customer (`/Client`, table `Area` = 2) per billing account.
pub const CUSTOMER: Kind = Kind {
    name: "account",
    third_party_type: "halosync.account",
    table_id: 2,
};

/// Software licence (`/SoftwareLicence`) per billing subscription. The
/// reference gives no table id for licences ([PD-TABLE] has none): 0, "no
/// table", is UNCONFIRMED. The link carries the applied version; the
/// licence itself also carries [`marker`] in a field of its own (see the
/// subscription worker), so that it is found again even without the link.
pub const SUBSCRIPTION: Kind = Kind {
    name: "subscription",
    third_party_type: "halosync.subscription",
    table_id: 0,
};

/// halosync's recurring invoice (`/RecurringInvoice`, table `InvoiceHeader`
/// = 995) per billing account: the one the subscription (and usage) lines
/// go on. Its ids may be negative: see [`resolve_or_create`].
pub const RECURRING_INVOICE: Kind = Kind {
    name: "recurring_invoice",
    third_party_type: "halosync.recurring_invoice",
    table_id: 995,
};

/// A usage line (subscription and metric) on the customer's recurring
/// invoice. Never linked with an ExternalLink: only its [`marker`]
/// (`halosync.usage:<subscription_id>:<metric>`) is written, on the line
/// itself (see the usage worker).
pub const USAGE: Kind = Kind {
    name: "usage",
    third_party_type: "halosync.usage",
    table_id: 0,
};

/// An overage charge (subscription, metric, period) on the one-off invoice
/// of its period. Never linked with an ExternalLink: only its [`marker`]
/// (`halosync.overage:<subscription_id>:<metric>:<period_start>`) is
/// written, on the line itself (see the overage worker).
pub const OVERAGE: Kind = Kind {
    name: "overage",
    third_party_type: "halosync.overage",
    table_id: 0,
};

/// halosync's one-off invoice (`/Invoice`) per (billing account, period):
/// the one the overage charges of that period go on. `third_party_id` is
/// `<account_id>:<period_start>`. Table `InvoiceHeader` = 995 (as for
/// recurring invoices; UNCONFIRMED for links).
pub const OVERAGE_INVOICE: Kind = Kind {
    name: "overage_invoice",
    third_party_type: "halosync.overage_invoice",
    table_id: 995,
};

/// One existing ExternalLink.
#[derive(Clone, Debug, PartialEq)]
pub struct Link {
    pub id: i64,
    pub halo_id: i64,
    pub version: Option<Version>,
}

/// The `new_external_link` object to send with a create, so the record and
/// its link are saved together (atomically, in one request).
pub fn new_link(kind: &Kind, billing_id: &str, version: &Version) -> ExternalLinkList {
    ExternalLinkList {
        third_party_secondary_id: Some(version.encode()),
        ..new_plain_link(kind, billing_id)
    }
}

/// The links HaloPSA holds for `billing_id`, lowest HaloPSA id first.
pub async fn find(halo: &HaloClient, kind: &Kind, billing_id: &str) -> Result<Vec<Link>, Failure> {
    let rows = halo
        .list(
            "/ExternalLink",
            "links",
            &[
                ("third_party_id", billing_id.to_string()),
                ("third_party_type", kind.third_party_type.to_string()),
            ],
        )
        .await?;
    let mut links: Vec<Link> = rows
        .iter()
        .filter(|r| str_field(r, "third_party_id").as_deref() == Some(billing_id))
        .filter(|r| str_field(r, "third_party_type").as_deref() == Some(kind.third_party_type))
        .filter_map(|r| {
            Some(Link {
                id: record_id(r)?,
                halo_id: int_field(r, "halo_id")?,
                version: str_field(r, "third_party_secondary_id")
                    .as_deref()
                    .and_then(Version::decode),
            })
        })
        .collect();
    links.sort_by_key(|l| (l.halo_id, l.id));
    Ok(links)
}

/// What is known of a billing id once its kind was imported: see
/// [`known_many`].
#[derive(Clone, Debug, PartialEq)]
pub enum Known {
    /// Redis holds its mapping.
    Mapped(Mapping),
    /// Not in HaloPSA: the kind was imported from HaloPSA in this Redis's
    /// lifetime, and every create since wrote its mapping (or marked the id
    /// unsure first). Creating it needs no look-up.
    Absent,
    /// Maybe in HaloPSA without Redis knowing (a create whose worker died
    /// before remembering it, a mapping HaloPSA refused): ask HaloPSA.
    Unsure,
    /// Being created by another worker right now (its create is on the
    /// wire): another family waits for it, without asking.
    Creating,
}

/// What is known of many billing ids of `kind`, at the fewest requests:
/// Redis in one round trip, and, once per Redis lifetime and kind, one bulk
/// import of the kind from HaloPSA ([`import`]): a paged list, one request
/// per 100 records, instead of a `GET` per id forever after. A lost Redis
/// loses the import marker with the mappings, so the next batch imports
/// again: losing Redis costs speed, never correctness.
///
/// Why a missing mapping can then mean "absent": every create first marks
/// its id unsure (`Store::mark_unsure`) and, once saved, writes the mapping
/// (which clears the mark); a record created by a worker whose lock Redis
/// lost lands within `worker.flush_grace`, before anyone imports again.
pub async fn known_many(
    store: &Store,
    halo: &HaloClient,
    kind: &Kind,
    billing_ids: &[String],
) -> Result<Vec<Known>, Failure> {
    let conn = &halo.connection().name;
    let mut k = store.known(conn, kind.name, billing_ids).await?;
    if !k.imported && k.mappings.iter().any(Option::is_none) {
        import(store, halo, kind).await?;
        k = store.known(conn, kind.name, billing_ids).await?;
    }
    Ok(k.mappings
        .into_iter()
        .zip(k.unsure)
        .zip(k.creating)
        .map(|((m, unsure), creating)| match (m, creating, unsure) {
            (Some(m), _, _) => Known::Mapped(m),
            (None, true, _) => Known::Creating,
            (None, false, true) => Known::Unsure,
            (None, false, false) => Known::Absent,
        })
        .collect())
}

/// Imports every link of `kind` from HaloPSA into Redis (paged, one request
/// per 100 links), once per Redis lifetime and connection: one worker does
/// it (a lock), the others wait for it. The same rule as one `find` picks
/// each id's record: the lowest HaloPSA id, or the earliest link for
/// recurring invoices ([`find_by_creation`]). Subscriptions also import
/// the licences carrying a marker whose link was never written (a worker
/// died between the two requests), so that they are never created again.
pub async fn import(store: &Store, halo: &HaloClient, kind: &Kind) -> Result<(), Failure> {
    let conn = &halo.connection().name;
    let lock = store
        .lock(
            conn,
            &format!("import:{}", kind.name),
            Duration::from_secs(30),
            IMPORT_WAIT,
        )
        .await?;
    let result = async {
        if store.imported(conn, kind.name).await? {
            return Ok(());
        }
        let rows = halo
            .list(
                "/ExternalLink",
                "links",
                &[("third_party_type", kind.third_party_type.to_string())],
            )
            .await?;
        let mut by_id: HashMap<String, Link> = HashMap::new();
        for r in &rows {
            if str_field(r, "third_party_type").as_deref() != Some(kind.third_party_type) {
                continue;
            }
            let (Some(billing_id), Some(id), Some(halo_id)) = (
                str_field(r, "third_party_id"),
                record_id(r),
                int_field(r, "halo_id"),
            ) else {
                continue;
            };
            let link = Link {
                id,
                halo_id,
                version: str_field(r, "third_party_secondary_id")
                    .as_deref()
                    .and_then(Version::decode),
            };
            let first = |a: &Link, b: &Link| {
                if *kind == RECURRING_INVOICE {
                    a.id < b.id
                } else {
                    (a.halo_id, a.id) < (b.halo_id, b.id)
                }
            };
            match by_id.get(&billing_id) {
                Some(kept) if !first(&link, kept) => {}
                _ => {
                    by_id.insert(billing_id, link);
                }
            }
        }
        let mut mappings: Vec<(String, Mapping)> = by_id
            .into_iter()
            .map(|(id, l)| {
                (
                    id,
                    Mapping {
                        halo_id: l.halo_id,
                        link_id: Some(l.id),
                        version: l.version.as_ref().map(Version::encode),
                    },
                )
            })
            .collect();
        if *kind == SUBSCRIPTION {
            let linked: std::collections::HashSet<String> =
                mappings.iter().map(|(id, _)| id.clone()).collect();
            let licences = halo
                .list(
                    "/SoftwareLicence",
                    "licences",
                    &[("includeinactive", "true".into())],
                )
                .await?;
            let prefix = format!("{}:", SUBSCRIPTION.third_party_type);
            let mut unlinked: HashMap<String, i64> = HashMap::new();
            for l in &licences {
                let (Some(m), Some(id)) = (str_field(l, LICENCE_MARKER_FIELD), record_id(l)) else {
                    continue;
                };
                let Some(sub) = m.trim().strip_prefix(&prefix) else {
                    continue;
                };
                if linked.contains(sub) {
                    continue;
                }
                let e = unlinked.entry(sub.to_string()).or_insert(id);
                *e = (*e).min(id);
            }
            mappings.extend(unlinked.into_iter().map(|(sub, id)| {
                (
                    sub,
                    Mapping {
                        halo_id: id,
                        link_id: None,
                        version: None,
                    },
                )
            }));
        }
        tracing::info!(
            kind = kind.name,
            records = mappings.len(),
            "imported the kind's identities from HaloPSA into Redis"
        );
        store.import_mappings(conn, kind.name, &mappings).await?;
        Ok(())
    }
    .await;
    if let Err(e) = lock.release().await {
        tracing::warn!(error = %e, "could not release the import lock; it expires on its own");
    }
    result
}

/// How long a worker waits for another one's import of a kind.
const IMPORT_WAIT: Duration = Duration::from_secs(120);

/// The licence field that carries the subscription's marker (the
/// subscription worker writes it; see its `mapping` module).
pub const LICENCE_MARKER_FIELD: &str = "thirdparty_client_id";

/// The id of the `kind` link of `billing_id` in a saved record's
/// `external_links` (as HaloPSA answers a save; UNCONFIRMED that it does,
/// so `None` sends the caller the safe way, a look-up).
pub fn own_link(saved: &Value, kind: &Kind, billing_id: &str) -> Option<i64> {
    saved
        .get("external_links")?
        .as_array()?
        .iter()
        .filter(|l| str_field(l, "third_party_type").as_deref() == Some(kind.third_party_type))
        .filter(|l| str_field(l, "third_party_id").as_deref() == Some(billing_id))
        .filter_map(record_id)
        .min()
}

/// The links HaloPSA holds that point at one record.
pub async fn find_by_record(
    halo: &HaloClient,
    kind: &Kind,
    halo_id: i64,
) -> Result<Vec<Value>, Failure> {
    let rows = halo
        .list(
            "/ExternalLink",
            "links",
            &[
                ("halo_id", halo_id.to_string()),
                ("table_id", kind.table_id.to_string()),
                ("third_party_type", kind.third_party_type.to_string()),
            ],
        )
        .await?;
    Ok(rows
        .into_iter()
        .filter(|r| int_field(r, "halo_id") == Some(halo_id))
        .filter(|r| str_field(r, "third_party_type").as_deref() == Some(kind.third_party_type))
        .collect())
}

/// The mapping of `billing_id`: from Redis, else rebuilt from HaloPSA's
/// links (and put back in Redis). `None` when HaloPSA has no record yet.
pub async fn resolve(
    store: &Store,
    halo: &HaloClient,
    kind: &Kind,
    billing_id: &str,
) -> Result<Option<Mapping>, Failure> {
    let conn = &halo.connection().name;
    if let Some(m) = store.mapping(conn, kind.name, billing_id).await? {
        return Ok(Some(m));
    }
    resolve_from_halo(store, halo, kind, billing_id).await
}

/// The HaloPSA half of [`resolve`]: the first link, put back in Redis.
async fn resolve_from_halo(
    store: &Store,
    halo: &HaloClient,
    kind: &Kind,
    billing_id: &str,
) -> Result<Option<Mapping>, Failure> {
    let conn = &halo.connection().name;
    let links = find(halo, kind, billing_id).await?;
    let Some(first) = links.first() else {
        return Ok(None);
    };
    let m = Mapping {
        halo_id: first.halo_id,
        link_id: Some(first.id),
        version: first.version.as_ref().map(Version::encode),
    };
    store.set_mapping(conn, kind.name, billing_id, &m).await?;
    Ok(Some(m))
}

/// Records in HaloPSA (the link) and then in Redis that `version` is now
/// applied to the record of `mapping`.
pub async fn record_version(
    store: &Store,
    halo: &HaloClient,
    kind: &Kind,
    billing_id: &str,
    mapping: &mut Mapping,
    version: &Version,
) -> Result<(), Failure> {
    let encoded = version.encode();
    let body = match mapping.link_id {
        Some(id) => json!({"id": id, "third_party_secondary_id": encoded}),
        None => json!({
            "halo_id": mapping.halo_id,
            "table_id": kind.table_id,
            "third_party_id": billing_id,
            "third_party_type": kind.third_party_type,
            "third_party_secondary_id": encoded,
        }),
    };
    let saved = match halo.save("/ExternalLink", body).await {
        Ok(saved) => saved,
        // The link we remembered is gone (another worker removed it as a
        // duplicate, or an MSP deleted it): the same policy as a refused
        // cached line, a retry from HaloPSA's state, never a dead letter.
        Err(e) if matches!(e.status(), Some(400 | 404)) && mapping.link_id.is_some() => {
            store
                .forget_mapping(&halo.connection().name, kind.name, billing_id)
                .await?;
            let mut f = Failure::transient(format!(
                "the ExternalLink {} of {} {billing_id} is gone from HaloPSA ({e}); the cached mapping was dropped and the event is retried afresh",
                mapping.link_id.unwrap_or_default(),
                kind.name
            ));
            // Workers converging on one record after a lost Redis remove
            // the loser's link: a matter of coordination, like waiting for a
            // lock, not a failed attempt (an outage's replay must not run
            // out of attempts on it).
            f.throttled = true;
            return Err(f);
        }
        Err(e) => return Err(e.into()),
    };
    if mapping.link_id.is_none() {
        mapping.link_id = record_id(&saved);
    }
    mapping.version = Some(encoded);
    store
        .set_mapping(&halo.connection().name, kind.name, billing_id, mapping)
        .await?;
    Ok(())
}

/// After creating record `created` for `billing_id`, makes sure it is the
/// only one. Two workers can both create a record when Redis (and with it
/// the aggregate lock) was lost in between; all of them then agree that the
/// record with the lowest HaloPSA id wins, and each loser deletes the
/// duplicate it has just created (and its link) through `delete_record`.
///
/// Returns the winning mapping, and whether it is ours.
pub async fn settle_after_create<F, Fut>(
    store: &Store,
    halo: &HaloClient,
    kind: &Kind,
    billing_id: &str,
    created: i64,
    delete_record: F,
) -> Result<(Mapping, bool), Failure>
where
    F: FnOnce(i64) -> Fut,
    Fut: std::future::Future<Output = Result<(), Failure>>,
{
    let links = find(halo, kind, billing_id).await?;
    let ours = links.iter().find(|l| l.halo_id == created).cloned();
    let winner = links.first().cloned();
    let (winner, won) = match (winner, ours) {
        (Some(w), Some(o)) if w.halo_id != o.halo_id => {
            tracing::warn!(
                billing_id,
                duplicate = o.halo_id,
                kept = w.halo_id,
                "two workers created the same record; removing ours"
            );
            delete_record(o.halo_id).await?;
            halo.delete(&format!("/ExternalLink/{}", o.id)).await?;
            (w, false)
        }
        (Some(w), _) => (w, true),
        // HaloPSA did not keep the link (UNCONFIRMED behaviour): the record
        // is ours; record_version will write the link explicitly.
        (None, _) => (
            Link {
                id: 0,
                halo_id: created,
                version: None,
            },
            true,
        ),
    };
    let m = Mapping {
        halo_id: winner.halo_id,
        link_id: (winner.id != 0).then_some(winner.id),
        version: winner.version.as_ref().map(Version::encode),
    };
    store
        .set_mapping(&halo.connection().name, kind.name, billing_id, &m)
        .await?;
    Ok((m, won))
}

/// After HaloPSA refused an update of `halo_id` (400/404): tells whether
/// the cached mapping was stale (and then drops it), i.e. HaloPSA no longer links
/// `billing_id` to that record (deleted in HaloPSA, or Redis holds ids of
/// another HaloPSA instance). A stale mapping is retried afresh; otherwise
/// the refusal is genuine and goes to the dead letters.
pub async fn drop_if_stale(
    store: &Store,
    halo: &HaloClient,
    kind: &Kind,
    billing_id: &str,
    halo_id: i64,
) -> Result<bool, Failure> {
    let links = find(halo, kind, billing_id).await?;
    let stale = !links.iter().any(|l| l.halo_id == halo_id);
    // A genuine refusal leaves the (right) mapping where it was.
    if stale {
        store
            .forget_mapping(&halo.connection().name, kind.name, billing_id)
            .await?;
    }
    Ok(stale)
}

/// The text halosync writes into a HaloPSA record's own field to say which
/// billing aggregate it belongs to, e.g. `halosync.subscription:sub_1`.
/// Qualified by kind so that records of different kinds sharing one field
/// (subscription and usage lines on one invoice) never match each other.
/// Matched exactly, never as a prefix.
pub fn marker(kind: &Kind, billing_id: &str) -> String {
    format!("{}:{billing_id}", kind.third_party_type)
}

/// The marker `record` carries in `field` (a licence's
/// [`LICENCE_MARKER_FIELD`], a line's
/// [`lines::MARKER_FIELD`](super::lines::MARKER_FIELD)), trimmed: HaloPSA
/// may hand a free string back padded, halosync never writes one so. A
/// record carries a marker when this is the marker exactly.
pub fn marker_in<'a>(record: &'a Value, field: &str) -> Option<&'a str> {
    record.get(field).and_then(Value::as_str).map(str::trim)
}

/// The billing id a marker of `kind` names: the inverse of [`marker`], on
/// the text trimmed. `None` for another kind's marker, and for a retired
/// one: a duplicate or a moved line has text appended after a space (`…
/// (duplicate of line 4, retired)`), so an id holding whitespace is not
/// read as live (the reading `halosync reconcile` has always used; the
/// workers themselves find a line by its whole marker,
/// [`lines::carrying`](super::lines::carrying)).
pub fn billing_id_of<'a>(kind: &Kind, marker: &'a str) -> Option<&'a str> {
    let id = marker
        .trim()
        .strip_prefix(kind.third_party_type)?
        .strip_prefix(':')?;
    (!id.is_empty() && !id.contains(char::is_whitespace)).then_some(id)
}

/// A `new_external_link` without a version, for records that are
/// containers rather than aggregates (a customer's recurring invoice).
pub fn new_plain_link(kind: &Kind, billing_id: &str) -> ExternalLinkList {
    ExternalLinkList {
        third_party_id: Some(billing_id.to_string()),
        third_party_type: Some(kind.third_party_type.to_string()),
        table_id: Some(Int32(kind.table_id)),
        ..ExternalLinkList::default()
    }
}

/// The `POST /ExternalLink` body of a link on record `halo_id` (a new one
/// when `link_id` is `None`), with `version` when given.
pub fn link_record(
    kind: &Kind,
    billing_id: &str,
    halo_id: i64,
    link_id: Option<i64>,
    version: Option<&Version>,
) -> ExternalLinkList {
    let secondary = version.map(Version::encode);
    match link_id {
        Some(id) => ExternalLinkList {
            id: Some(Int32(id)),
            third_party_secondary_id: secondary,
            ..ExternalLinkList::default()
        },
        None => ExternalLinkList {
            halo_id: Some(Int32(halo_id)),
            third_party_secondary_id: secondary,
            ..new_plain_link(kind, billing_id)
        },
    }
}

/// A record another family writes (the customer a subscription needs, the
/// licence a usage report needs): its mapping, or a `dependency` failure
/// saying `missing`.
///
/// HaloPSA is asked at most once per `recheck` (`retry.dependency_recheck`)
/// while the record is missing, by whichever event claims the look-up in
/// Redis first (so that many events waiting for one account do not all ask
/// when the interval ends). Until then, an event needing the record fails
/// *throttled* (no request, no attempt used) and comes back from the
/// shortest delay tier, so it goes on as soon as the writing family has put
/// the mapping in Redis, instead of after a long tier. A lost Redis loses
/// the claim with the mappings: HaloPSA is asked again, never wrongly told.
pub async fn require(
    store: &Store,
    halo: &HaloClient,
    kind: &Kind,
    billing_id: &str,
    recheck: Duration,
    missing: impl Fn() -> String,
) -> Result<Mapping, Failure> {
    let conn = &halo.connection().name;
    match known_many(store, halo, kind, &[billing_id.to_string()])
        .await?
        .pop()
    {
        Some(Known::Mapped(m)) => return Ok(m),
        // Imported and not unsure: the owning family has not written it.
        // No request; one attempt used per `recheck`, so that a record that
        // never comes is dead-lettered in the end (`dependency_max_attempts`).
        Some(Known::Absent) => {
            return Err(still_absent(store, halo, kind, billing_id, recheck, missing()).await)
        }
        // Its family is creating it right now: wait (no request, no attempt).
        Some(Known::Creating) => {
            let mut f = Failure::dependency(format!("{} (being created right now)", missing()));
            f.throttled = true;
            return Err(f);
        }
        Some(Known::Unsure) | None => {}
    }
    if !store
        .claim_dependency_check(conn, kind.name, billing_id, recheck)
        .await?
    {
        let mut f = Failure::dependency(format!(
            "{} (asked less than {} ago; waiting without asking again)",
            missing(),
            humantime::format_duration(recheck)
        ));
        f.throttled = true;
        return Err(f);
    }
    // Redis was read above: only HaloPSA is left to ask.
    match resolve_from_halo(store, halo, kind, billing_id).await {
        Ok(Some(m)) => {
            store
                .clear_dependency_check(conn, kind.name, billing_id)
                .await?;
            Ok(m)
        }
        Ok(None) => Err(Failure::dependency(missing())),
        Err(f) => {
            // Nothing was learnt: the next event asks again.
            let _ = store
                .clear_dependency_check(conn, kind.name, billing_id)
                .await;
            Err(f)
        }
    }
}

/// The `dependency` failure of a record known to be absent
/// ([`Known::Absent`]): no request; throttled (no attempt used) except once
/// per `recheck`, so that a record that never comes is dead-lettered in
/// the end (`retry.dependency_max_attempts`) while one that comes is used
/// as soon as its family has written it.
pub async fn still_absent(
    store: &Store,
    halo: &HaloClient,
    kind: &Kind,
    billing_id: &str,
    recheck: Duration,
    missing: String,
) -> Failure {
    let claimed = store
        .claim_dependency_check(&halo.connection().name, kind.name, billing_id, recheck)
        .await;
    match claimed {
        Ok(claimed) => {
            let mut f = Failure::dependency(missing);
            f.throttled = !claimed;
            f
        }
        Err(e) => e.into(),
    }
}

/// The customer of `account_id`, or a `dependency` failure while the
/// account is not in HaloPSA yet (see [`require`]).
pub async fn require_customer(
    store: &Store,
    halo: &HaloClient,
    account_id: &str,
    recheck: Duration,
) -> Result<Mapping, Failure> {
    require(store, halo, &CUSTOMER, account_id, recheck, || {
        customer_missing(account_id)
    })
    .await
}

/// The customer of `account_id` from what a batch's [`known_many`] said of
/// it: mapped, it is; known absent, a `dependency` without a request (the
/// one message of [`require_customer`]); being created by the account
/// worker, a throttled `dependency` (no request, no attempt); unsure,
/// asked of HaloPSA ([`require_customer`]).
pub async fn customer_from(
    store: &Store,
    halo: &HaloClient,
    account_id: &str,
    known: Known,
    recheck: Duration,
) -> Result<Mapping, Failure> {
    match known {
        Known::Mapped(c) => Ok(c),
        Known::Absent => {
            let missing = customer_missing(account_id);
            Err(still_absent(store, halo, &CUSTOMER, account_id, recheck, missing).await)
        }
        Known::Creating => {
            let mut f = Failure::dependency(format!(
                "account {account_id} is being created in HaloPSA right now; retried once it is"
            ));
            f.throttled = true;
            Err(f)
        }
        Known::Unsure => require_customer(store, halo, account_id, recheck).await,
    }
}

/// Why an event waits for its account's customer.
fn customer_missing(account_id: &str) -> String {
    format!(
        "account {account_id} is not in HaloPSA yet (no customer linked to it); retried until the account event has been applied"
    )
}

/// Like [`find`], but earliest-created link first (by the link's own id).
///
/// [`settle_after_create`]'s "lowest HaloPSA id wins" assumes that ids grow
/// with creation. Recurring-invoice ids may be negative (reference §3.4),
/// and count *down* in halo-sim, so there the later duplicate would have the
/// lower id and win after the earlier creator had already gone on as the
/// winner. A record created with `new_external_link` gets its link in the
/// same save, so the link ids give the creation order whatever the sign of
/// the record ids.
pub async fn find_by_creation(
    halo: &HaloClient,
    kind: &Kind,
    billing_id: &str,
) -> Result<Vec<Link>, Failure> {
    let mut links = find(halo, kind, billing_id).await?;
    links.sort_by_key(|l| l.id);
    Ok(links)
}

/// The record of `billing_id`, created once if HaloPSA has none: for
/// records that several aggregates share (a customer's recurring invoice is
/// needed by every subscription of the customer, each under its own
/// aggregate lock).
///
/// * Redis hit: no request, no lock.
/// * Otherwise, under the lock `{kind.name}:{billing_id}`: the links are
///   read; with none, `create` saves the record (with
///   [`new_plain_link`] as `new_external_link`) and returns its id.
/// * If the lock was lost (Redis flushed) and two workers created one each,
///   the earliest link wins ([`find_by_creation`]) and the loser removes
///   its own duplicate through `delete_record`, and its link.
/// * If HaloPSA did not keep the link (UNCONFIRMED), it is written here.
#[allow(clippy::too_many_arguments)]
pub async fn resolve_or_create<C, CFut, D, DFut>(
    store: &Store,
    halo: &HaloClient,
    kind: &Kind,
    billing_id: &str,
    lock_ttl: Duration,
    lock_wait: Duration,
    create: C,
    delete_record: D,
) -> Result<Mapping, Failure>
where
    C: FnOnce() -> CFut,
    CFut: std::future::Future<Output = Result<i64, Failure>>,
    D: FnOnce(i64) -> DFut,
    DFut: std::future::Future<Output = Result<(), Failure>>,
{
    let conn = &halo.connection().name;
    if let Some(m) = store.mapping(conn, kind.name, billing_id).await? {
        return Ok(m);
    }
    let lock = store
        .lock(conn, &kind.create_lock(billing_id), lock_ttl, lock_wait)
        .await?;
    let result = async {
        // Another worker may have finished while we waited for the lock.
        if let Some(m) = store.mapping(conn, kind.name, billing_id).await? {
            return Ok(m);
        }
        let link = match find_by_creation(halo, kind, billing_id).await?.first() {
            Some(first) => first.clone(),
            None => {
                // Unsure until remembered: a worker dying after the create
                // must leave the next one asking HaloPSA, not creating.
                store
                    .creating(conn, kind.name, &[billing_id.to_string()], lock_ttl)
                    .await?;
                let created = create().await?;
                let links = find_by_creation(halo, kind, billing_id).await?;
                let ours = links.iter().find(|l| l.halo_id == created).cloned();
                match (links.first().cloned(), ours) {
                    (Some(first), Some(ours)) if first.id != ours.id => {
                        tracing::warn!(
                            billing_id,
                            duplicate = ours.halo_id,
                            kept = first.halo_id,
                            kind = kind.name,
                            "two workers created the same record; removing ours"
                        );
                        delete_record(ours.halo_id).await?;
                        halo.delete(&format!("/ExternalLink/{}", ours.id)).await?;
                        first
                    }
                    (Some(first), _) => first,
                    (None, _) => {
                        let saved = halo
                            .save(
                                "/ExternalLink",
                                json!({
                                    "halo_id": created,
                                    "table_id": kind.table_id,
                                    "third_party_id": billing_id,
                                    "third_party_type": kind.third_party_type,
                                }),
                            )
                            .await?;
                        Link {
                            id: record_id(&saved).unwrap_or(0),
                            halo_id: created,
                            version: None,
                        }
                    }
                }
            }
        };
        let m = Mapping {
            halo_id: link.halo_id,
            link_id: (link.id != 0).then_some(link.id),
            version: None,
        };
        store.set_mapping(conn, kind.name, billing_id, &m).await?;
        Ok(m)
    }
    .await;
    if let Err(e) = lock.release().await {
        tracing::warn!(error = %e, "could not release a lock; it expires on its own");
    }
    result
}

fn str_field(v: &Value, key: &str) -> Option<String> {
    match v.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn int_field(v: &Value, key: &str) -> Option<i64> {
    match v.get(key)? {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marker_names_its_billing_id_unless_retired() {
        let m = marker(&SUBSCRIPTION, "sub_1");
        assert_eq!(billing_id_of(&SUBSCRIPTION, &m), Some("sub_1"));
        assert_eq!(
            billing_id_of(&SUBSCRIPTION, &format!(" {m} ")),
            Some("sub_1")
        );
        assert_eq!(billing_id_of(&USAGE, &m), None, "another kind's");
        assert_eq!(
            billing_id_of(
                &SUBSCRIPTION,
                &format!("{m} (duplicate of line 4, retired)")
            ),
            None
        );
        assert_eq!(billing_id_of(&SUBSCRIPTION, "halosync.subscription:"), None);
        assert_eq!(
            billing_id_of(&SUBSCRIPTION, "halosync.subscriptions:x"),
            None
        );
        let o = marker(&OVERAGE, "sub_1:gb:2026-11-01");
        assert_eq!(o, "halosync.overage:sub_1:gb:2026-11-01");
        assert_eq!(billing_id_of(&OVERAGE, &o), Some("sub_1:gb:2026-11-01"));
    }
}
