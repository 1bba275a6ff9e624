//! The account worker's [`Handler`]: create, update, deactivate or adopt
//! one HaloPSA customer per billing account.
//!
//! Events coalesce, a batch of one included: a batch of N
//! accounts costs, on the happy path, one `POST /Client` array for the new
//! customers (each with its `new_external_link`, version inside) and, for
//! the known ones, one `POST /Client` array and one `POST /ExternalLink`
//! array (the versions). Identity for the batch is
//! [`links::known_many`]: Redis in one round trip, completed once per
//! Redis lifetime by one bulk import of the customers' links; an account
//! it knows to be absent is created without a look-up and without a
//! read-back (why that is safe is in `known_many`). Whatever it is unsure
//! of, and whatever an array does not finish cleanly (a refused element, a
//! lost answer), goes the one-event path below, which asks HaloPSA and
//! handles each case on its own; the ids of a create array are marked
//! unsure before it is sent, so that path never creates one twice.

use std::collections::HashMap;

use async_trait::async_trait;
use halosync_shared::contract::{AccountData, Event, Family, Version};
use halosync_shared::halo::currency;
use halosync_shared::halo::lines;
use halosync_shared::halo::links::{self, Known, CUSTOMER};
use halosync_shared::halo::models::{body, Area};
use halosync_shared::halo::ratelimit::Priority;
use halosync_shared::halo::{record_id, HaloClient, HaloError};
use halosync_shared::runtime::{Batch, Handler, Open, Outcome, Results, Services};
use halosync_shared::store::Mapping;
use halosync_shared::Failure;
use serde_json::Value;

use crate::mapping::{client_record, exact_name_matches};

pub struct AccountHandler;

#[async_trait]
impl Handler for AccountHandler {
    const FAMILY: Family = Family::Account;
    const WRITES: Priority = Priority::Accounts;
    type Data = AccountData;

    fn aggregate(data: &AccountData) -> String {
        data.account_id.clone()
    }

    async fn apply_batch(
        &self,
        svc: &Services,
        halo: &HaloClient,
        events: Batch<Event<AccountData>>,
    ) -> Results {
        let mut batch = events.map(|event| {
            Ok(Work {
                event,
                currency: None,
            })
        });
        // Adopting by name is a look-up per account: one at a time.
        if !halo.connection().match_existing_by_name {
            in_arrays(svc, halo, &mut batch).await;
        }
        // What the arrays left open goes the one-event way.
        for open in batch.open() {
            let result = apply_one(svc, halo, &open.event).await;
            open.settle(result);
        }
        batch.finish()
    }
}

/// One event on its own: what a batch's arrays left open, and every event
/// when accounts are adopted by name (a look-up per account).
async fn apply_one(
    svc: &Services,
    halo: &HaloClient,
    event: &Event<AccountData>,
) -> Result<Outcome, Failure> {
    let data = &event.data;
    let version = &event.version;
    let store = &svc.store;
    let currency = match &data.currency {
        Some(code) => Some(currency::id(halo, store, code, event.repair || event.replayed).await?),
        None => None,
    };
    let mapping = match links::resolve(store, halo, &CUSTOMER, &data.account_id).await? {
        Some(m) => m,
        None => match adopt_or_create(svc, halo, data, currency, version).await? {
            Created::Ours => return Ok(Outcome::Applied),
            Created::Theirs(m) | Created::Adopted(m) => m,
        },
    };
    update(svc, halo, data, currency, version, mapping).await
}

/// The most records one array POST carries.
const ARRAY_MAX: usize = 100;

/// One event of a batch.
struct Work {
    event: Event<AccountData>,
    /// The `/Currency` id of `data.currency`.
    currency: Option<i64>,
}

/// The batch's events in arrays: identity for the batch from
/// [`links::known_many`], then one create array for the accounts known
/// absent and one update array for the known ones (each at most
/// [`ARRAY_MAX`]). What they do not settle stays open.
async fn in_arrays(svc: &Services, halo: &HaloClient, batch: &mut Batch<Work>) {
    currencies(svc, halo, batch).await;
    let open: Vec<Open<'_, Work>> = batch.open().collect();
    let ids: Vec<String> = open
        .iter()
        .map(|w| w.event.data.account_id.clone())
        .collect();
    let known = match links::known_many(&svc.store, halo, &CUSTOMER, &ids).await {
        Ok(known) => known,
        Err(f) => {
            for w in open {
                w.settle(Err(f.clone()));
            }
            return;
        }
    };
    let (mut creates, mut updates) = (Vec::new(), Vec::new());
    for (w, k) in open.into_iter().zip(known) {
        match k {
            Known::Absent => creates.push(w),
            Known::Mapped(m)
                if m.version()
                    .is_some_and(|applied| w.event.version.is_superseded_by(&applied)) =>
            {
                w.settle(Ok(Outcome::Superseded));
            }
            Known::Mapped(m) => updates.push((w, m)),
            // Asked one by one.
            Known::Unsure | Known::Creating => {}
        }
    }
    // Arrays of at most 100 (HaloPSA's largest array is not documented:
    // UNCONFIRMED; 100 is the page size it serves).
    while !creates.is_empty() {
        let chunk = creates.drain(..creates.len().min(ARRAY_MAX)).collect();
        create(svc, halo, chunk).await;
    }
    while !updates.is_empty() {
        let chunk = updates.drain(..updates.len().min(ARRAY_MAX)).collect();
        update_known(svc, halo, chunk).await;
    }
}

/// The `/Currency` id of every event's currency: one look-up for the batch
/// (Redis; HaloPSA once when a code is new to the cache). A code HaloPSA
/// lacks fails its event `unmapped`.
async fn currencies(svc: &Services, halo: &HaloClient, batch: &mut Batch<Work>) {
    // A replayed or repair event: a currency HaloPSA lacked is asked again.
    let ask_again = batch.open().any(|w| w.event.repair || w.event.replayed);
    let with_code: Vec<(Open<'_, Work>, String)> = batch
        .open()
        .filter_map(|w| {
            let code = currency::normalise(w.event.data.currency.as_deref()?);
            Some((w, code))
        })
        .collect();
    if with_code.is_empty() {
        return;
    }
    let wanted: Vec<&str> = with_code.iter().map(|(_, c)| c.as_str()).collect();
    let found = currency::ids(halo, &svc.store, &wanted, ask_again).await;
    for (mut w, code) in with_code {
        match &found {
            Ok(ids) => match ids.get(&code).copied().flatten() {
                Some(id) => w.currency = Some(id),
                None => w.settle(Err(currency::not_set_up(&code))),
            },
            Err(f) => w.settle(Err(f.clone())),
        }
    }
}

/// After an update or version array failed (resending a merge is
/// harmless): refused, each event goes on its own, which isolates the
/// refused one; anything else fails the events together, retried later
/// (not at once into an outage). Returns whether HaloPSA saved nothing.
fn array_failed<'a>(
    e: HaloError,
    events: impl IntoIterator<Item = Open<'a, Work>>,
    what: &str,
) -> bool {
    lines::settle_array_failure(e, what, events, |w, f| w.settle(Err(f)))
}

/// New customers in one array, each with its link and version. Their ids
/// are marked unsure first; a customer is remembered (which clears the
/// mark) once the answer names it and its link. Known to be absent and
/// written under a lock held throughout, it needs no read-back. Anything
/// else (refused in part, answer lost, an answer without the link) stays
/// unsure and open, for the one-event way, which asks HaloPSA.
async fn create(svc: &Services, halo: &HaloClient, creates: Vec<Open<'_, Work>>) {
    let conn = halo.connection();
    let ids: Vec<String> = creates
        .iter()
        .map(|w| w.event.data.account_id.clone())
        .collect();
    let window = svc.config().worker.http_timeout;
    if let Err(e) = svc
        .store
        .creating(&conn.name, CUSTOMER.name, &ids, window)
        .await
    {
        let f: Failure = e.into();
        for w in creates {
            w.settle(Err(f.clone()));
        }
        return;
    }
    let bodies: Result<Vec<Value>, Failure> = creates
        .iter()
        .map(|w| {
            body(&Area {
                new_external_link: Some(links::new_link(
                    &CUSTOMER,
                    &w.event.data.account_id,
                    &w.event.version,
                )),
                ..client_record(&w.event.data, w.currency, None, conn)
            })
        })
        .collect();
    // A value out of the model's range: each event on its own, which
    // fails the one it is.
    let Ok(bodies) = bodies else {
        let _ = svc.store.not_created(&conn.name, CUSTOMER.name, &ids).await;
        return;
    };
    // Saved records by position, when the answer came and lines up
    // (response shape UNCONFIRMED: one object for one element).
    let saved: Vec<Value> = match halo.post_each("/Client", bodies).await {
        Ok(rows) => rows,
        Err(None) => return,
        // Refused in part: each on its own, which finds what was saved
        // and isolates the refused one. One policy for a failed array
        // (`lines::after_array_failure`); if nothing was saved, the
        // "creating" marks are taken back.
        Err(Some(e)) => {
            if array_failed(e, creates, "customer") {
                let _ = svc.store.not_created(&conn.name, CUSTOMER.name, &ids).await;
            }
            return;
        }
    };
    let mut remembered: Vec<(Open<'_, Work>, Mapping)> = Vec::new();
    for (w, row) in creates.into_iter().zip(&saved) {
        let Some(halo_id) = record_id(row) else {
            continue;
        };
        let Some(link_id) = links::own_link(row, &CUSTOMER, &w.event.data.account_id) else {
            continue;
        };
        let mapping = Mapping {
            halo_id,
            link_id: Some(link_id),
            version: Some(w.event.version.encode()),
        };
        remembered.push((w, mapping));
    }
    let pairs: Vec<(&str, &Mapping)> = remembered
        .iter()
        .map(|(w, m)| (w.event.data.account_id.as_str(), m))
        .collect();
    let r = svc
        .store
        .set_mappings(&conn.name, CUSTOMER.name, &pairs)
        .await
        .map_err(Failure::from);
    for (w, m) in remembered {
        tracing::info!(halo_id = m.halo_id, "created the customer");
        w.settle(r.clone().map(|_| Outcome::Applied));
    }
}

/// Known customers in one array, then their versions in one array. A
/// failed array leaves its events to the one-event path (each write sets
/// absolute values, so sending one again is harmless).
async fn update_known(svc: &Services, halo: &HaloClient, updates: Vec<(Open<'_, Work>, Mapping)>) {
    let conn = halo.connection();
    let bodies: Result<Vec<Value>, Failure> = updates
        .iter()
        .map(|(w, m)| {
            body(&client_record(
                &w.event.data,
                w.currency,
                Some(m.halo_id),
                conn,
            ))
        })
        .collect();
    // A value out of the model's range: each event on its own.
    let Ok(bodies) = bodies else { return };
    if let Err(e) = halo.post("/Client", bodies).await {
        array_failed(e, updates.into_iter().map(|(w, _)| w), "customer update");
        return;
    }
    let versions: Result<Vec<Value>, Failure> = updates
        .iter()
        .map(|(w, m)| {
            body(&links::link_record(
                &CUSTOMER,
                &w.event.data.account_id,
                m.halo_id,
                m.link_id,
                Some(&w.event.version),
            ))
        })
        .collect();
    let Ok(versions) = versions else { return };
    let saved = match halo.post("/ExternalLink", versions).await {
        Ok(s) => s,
        Err(e) => {
            array_failed(e, updates.into_iter().map(|(w, _)| w), "version");
            return;
        }
    };
    // The links created by the array, by position (response shape
    // UNCONFIRMED: trusted only when it lines up).
    let new_links: HashMap<usize, i64> = match &saved {
        Value::Array(rows) if rows.len() == updates.len() => rows
            .iter()
            .enumerate()
            .filter_map(|(k, r)| record_id(r).map(|id| (k, id)))
            .collect(),
        one if updates.len() == 1 => record_id(one).map(|id| (0, id)).into_iter().collect(),
        _ => HashMap::new(),
    };
    for (k, (w, mut m)) in updates.into_iter().enumerate() {
        if m.link_id.is_none() {
            match new_links.get(&k) {
                Some(id) => m.link_id = Some(*id),
                // Which link is ours is unknown: the one-event path.
                None => continue,
            }
        }
        m.version = Some(w.event.version.encode());
        let r = svc
            .store
            .set_mapping(&conn.name, CUSTOMER.name, &w.event.data.account_id, &m)
            .await;
        w.settle(r.map(|_| Outcome::Applied).map_err(Failure::from));
    }
}

enum Created {
    /// We created the customer, with this event's state and version.
    Ours,
    /// Another worker's customer won; ours was removed. Apply on top of it.
    Theirs(Mapping),
    /// An existing customer with the same name was linked to the account.
    Adopted(Mapping),
}

/// Updates the mapped customer unless a newer version is already there.
async fn update(
    svc: &Services,
    halo: &HaloClient,
    data: &AccountData,
    currency: Option<i64>,
    version: &Version,
    mut mapping: Mapping,
) -> Result<Outcome, Failure> {
    if mapping
        .version()
        .is_some_and(|applied| version.is_superseded_by(&applied))
    {
        return Ok(Outcome::Superseded);
    }
    let record = body(&client_record(
        data,
        currency,
        Some(mapping.halo_id),
        halo.connection(),
    ))?;
    if let Err(e) = halo.save("/Client", record).await {
        if matches!(e.status(), Some(400 | 404))
            && links::drop_if_stale(
                &svc.store,
                halo,
                &CUSTOMER,
                &data.account_id,
                mapping.halo_id,
            )
            .await?
        {
            return Err(Failure::transient(format!(
                "customer {} mapped to account {} is gone from HaloPSA; the stale mapping was dropped and the event is retried afresh",
                mapping.halo_id, data.account_id
            )));
        }
        return Err(e.into());
    }
    links::record_version(
        &svc.store,
        halo,
        &CUSTOMER,
        &data.account_id,
        &mut mapping,
        version,
    )
    .await?;
    Ok(Outcome::Applied)
}

async fn adopt_or_create(
    svc: &Services,
    halo: &HaloClient,
    data: &AccountData,
    currency: Option<i64>,
    version: &Version,
) -> Result<Created, Failure> {
    let conn = halo.connection();
    if conn.match_existing_by_name {
        let rows = halo
            .list(
                "/Client",
                "clients",
                &[
                    ("search", data.name.trim().to_string()),
                    ("includeinactive", "true".into()),
                ],
            )
            .await?;
        match exact_name_matches(&rows, &data.name)[..] {
            [] => {}
            [id] => {
                let taken: Vec<String> = links::find_by_record(halo, &CUSTOMER, id)
                    .await?
                    .iter()
                    .filter_map(|l| {
                        l.get("third_party_id")
                            .and_then(|v| v.as_str())
                            .map(String::from)
                    })
                    .filter(|other| other != &data.account_id)
                    .collect();
                if !taken.is_empty() {
                    return Err(Failure::unmapped(format!(
                        "customer {id} named {:?} is already linked to billing account(s) {}; link account {} by hand or rename one of them",
                        data.name,
                        taken.join(", "),
                        data.account_id
                    )));
                }
                tracing::info!(
                    halo_id = id,
                    "adopting the existing customer with the same name"
                );
                return Ok(Created::Adopted(Mapping {
                    halo_id: id,
                    link_id: None,
                    version: None,
                }));
            }
            ref many => {
                return Err(Failure::unmapped(format!(
                    "{} HaloPSA customers are named exactly {:?} (ids {}); match_existing_by_name needs exactly one. Rename or merge them in HaloPSA, then replay",
                    many.len(),
                    data.name,
                    many.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")
                )));
            }
        }
    }
    let record = body(&Area {
        new_external_link: Some(links::new_link(&CUSTOMER, &data.account_id, version)),
        ..client_record(data, currency, None, conn)
    })?;
    svc.store
        .creating(
            &conn.name,
            CUSTOMER.name,
            std::slice::from_ref(&data.account_id),
            svc.config().worker.http_timeout,
        )
        .await?;
    let saved = halo.save("/Client", record).await?;
    let created = record_id(&saved)
        .ok_or_else(|| Failure::transient("HaloPSA saved the customer but returned no id"))?;
    let (mut mapping, won) = links::settle_after_create(
        &svc.store,
        halo,
        &CUSTOMER,
        &data.account_id,
        created,
        |dup| async move {
            // Deleting is allowed here only because this record is the
            // duplicate we created moments ago: it holds no MSP data.
            halo.delete(&format!("/Client/{dup}"))
                .await
                .map(|_| ())
                .map_err(Failure::from)
        },
    )
    .await?;
    if !won {
        return Ok(Created::Theirs(mapping));
    }
    if mapping.version.is_none() {
        // HaloPSA did not keep the version on the link: write it now.
        links::record_version(
            &svc.store,
            halo,
            &CUSTOMER,
            &data.account_id,
            &mut mapping,
            version,
        )
        .await?;
    }
    tracing::info!(halo_id = created, "created the customer");
    Ok(Created::Ours)
}
