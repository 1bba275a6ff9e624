//! The account worker's [`Handler`]: create, update, deactivate or adopt
//! one HaloPSA customer per billing account.
//!
//! Events coalesce (`batching`), a batch of one included: a batch of N
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
use halosync_shared::contract::{AccountData, Envelope, Family, Version};
use halosync_shared::halo::currency;
use halosync_shared::halo::lines;
use halosync_shared::halo::links::{self, Known, CUSTOMER};
use halosync_shared::halo::models::{body, Area};
use halosync_shared::halo::{record_id, HaloClient, HaloError};
use halosync_shared::runtime::{Handler, Outcome, Services};
use halosync_shared::store::Mapping;
use halosync_shared::Failure;
use serde_json::Value;

use crate::mapping::{client_record, exact_name_matches};

pub struct AccountHandler;

impl AccountHandler {
    /// One event on its own: what a batch's arrays left open, and every
    /// event when accounts are adopted by name (a look-up per account).
    async fn apply_one(
        &self,
        svc: &Services,
        halo: &HaloClient,
        event: &Envelope,
    ) -> Result<Outcome, Failure> {
        let data: AccountData = event.data_as()?;
        let version = event.version()?;
        let store = &svc.store;
        let currency = match &data.currency {
            Some(code) => {
                Some(currency::id(halo, store, code, event.repair || event.replayed).await?)
            }
            None => None,
        };
        let mapping = match links::resolve(store, halo, &CUSTOMER, &data.account_id).await? {
            Some(m) => m,
            None => match adopt_or_create(svc, halo, &data, currency, &version).await? {
                Created::Ours => return Ok(Outcome::Applied),
                Created::Theirs(m) | Created::Adopted(m) => m,
            },
        };
        update(svc, halo, &data, currency, &version, mapping).await
    }
}

#[async_trait]
impl Handler for AccountHandler {
    fn family(&self) -> Family {
        Family::Account
    }

    fn aggregate(&self, event: &Envelope) -> Result<String, Failure> {
        Ok(event.data_as::<AccountData>()?.account_id)
    }

    async fn apply_batch(
        &self,
        svc: &Services,
        halo: &HaloClient,
        events: &[Envelope],
    ) -> Vec<Result<Outcome, Failure>> {
        // Adopting by name is a look-up per account: one at a time.
        if halo.connection().match_existing_by_name {
            let mut out = Vec::with_capacity(events.len());
            for e in events {
                out.push(self.apply_one(svc, halo, e).await);
            }
            return out;
        }
        Batch::new(events).run(self, svc, halo, events).await
    }
}

/// The most records one array POST carries.
const ARRAY_MAX: usize = 100;

/// One event of a batch.
struct Work {
    data: AccountData,
    version: Version,
    /// The `/Currency` id of `data.currency`.
    currency: Option<i64>,
    /// A replayed or repair event: a currency HaloPSA lacked is asked again.
    ask_again: bool,
}

/// A batch of account events of one connection, one per account.
struct Batch {
    /// `None` where the event could not be read (its result says why).
    work: Vec<Option<Work>>,
    results: Vec<Option<Result<Outcome, Failure>>>,
}

impl Batch {
    fn new(events: &[Envelope]) -> Batch {
        let mut work = Vec::with_capacity(events.len());
        let mut results = Vec::with_capacity(events.len());
        for e in events {
            let parsed = e.data_as::<AccountData>().and_then(|data| {
                Ok(Work {
                    version: e.version()?,
                    data,
                    currency: None,
                    ask_again: e.repair || e.replayed,
                })
            });
            match parsed {
                Ok(w) => {
                    work.push(Some(w));
                    results.push(None);
                }
                Err(f) => {
                    work.push(None);
                    results.push(Some(Err(f)));
                }
            }
        }
        Batch { work, results }
    }

    async fn run(
        mut self,
        handler: &AccountHandler,
        svc: &Services,
        halo: &HaloClient,
        events: &[Envelope],
    ) -> Vec<Result<Outcome, Failure>> {
        self.currencies(svc, halo).await;
        let live: Vec<usize> = self.live().map(|(i, _)| i).collect();
        let ids: Vec<String> = self
            .live()
            .map(|(_, w)| w.data.account_id.clone())
            .collect();
        match links::known_many(&svc.store, halo, &CUSTOMER, &ids).await {
            Ok(known) => {
                let (mut creates, mut updates) = (Vec::new(), Vec::new());
                for (i, k) in live.into_iter().zip(known) {
                    let Some(w) = self.work(i) else { continue };
                    match k {
                        Known::Absent => creates.push(i),
                        Known::Mapped(m)
                            if m.version()
                                .is_some_and(|applied| w.version.is_superseded_by(&applied)) =>
                        {
                            self.results[i] = Some(Ok(Outcome::Superseded));
                        }
                        Known::Mapped(m) => updates.push((i, m)),
                        // Asked one by one, below.
                        Known::Unsure | Known::Creating => {}
                    }
                }
                // Arrays of at most 100 (HaloPSA's largest array is not
                // documented: UNCONFIRMED; 100 is the page size it serves).
                for chunk in creates.chunks(ARRAY_MAX) {
                    self.create(svc, halo, chunk).await;
                }
                for chunk in updates.chunks(ARRAY_MAX) {
                    self.update(svc, halo, chunk.to_vec()).await;
                }
            }
            Err(f) => {
                for i in live {
                    self.results[i] = Some(Err(f.clone()));
                }
            }
        }
        // What the arrays left open goes the one-event way.
        let mut out = Vec::with_capacity(events.len());
        for (i, r) in self.results.into_iter().enumerate() {
            out.push(match r {
                Some(r) => r,
                None => handler.apply_one(svc, halo, &events[i]).await,
            });
        }
        out
    }

    /// The `/Currency` id of every event's currency: one look-up for the
    /// batch (Redis; HaloPSA once when a code is new to the cache). A code
    /// HaloPSA lacks fails its event `unmapped`.
    async fn currencies(&mut self, svc: &Services, halo: &HaloClient) {
        let codes: Vec<(usize, String)> = self
            .live()
            .filter_map(|(i, w)| w.data.currency.clone().map(|c| (i, c)))
            .collect();
        if codes.is_empty() {
            return;
        }
        let wanted: Vec<&str> = codes.iter().map(|(_, c)| c.as_str()).collect();
        let ask_again = self.live().any(|(_, w)| w.ask_again);
        let found = currency::ids(halo, &svc.store, &wanted, ask_again).await;
        for (i, code) in codes {
            let id = match &found {
                Ok(map) => map.get(&currency::normalise(&code)).copied().flatten(),
                Err(f) => {
                    self.results[i] = Some(Err(f.clone()));
                    continue;
                }
            };
            match (id, self.work.get_mut(i).and_then(Option::as_mut)) {
                (Some(id), Some(w)) => w.currency = Some(id),
                (None, _) => {
                    self.results[i] = Some(Err(currency::not_set_up(&currency::normalise(&code))))
                }
                (Some(_), None) => {}
            }
        }
    }

    /// After an update or version array failed (resending a merge is
    /// harmless): refused, each event goes on its own, which isolates the
    /// refused one; anything else fails the events together, retried
    /// later (not at once into an outage).
    fn array_failed(
        &mut self,
        e: HaloError,
        events: impl Iterator<Item = usize>,
        what: &str,
    ) -> bool {
        lines::settle_array_failure(e, what, events, |i, f| self.results[i] = Some(Err(f)))
    }

    /// Events not decided yet.
    fn live(&self) -> impl Iterator<Item = (usize, &Work)> {
        self.work
            .iter()
            .enumerate()
            .filter(|(i, _)| self.results[*i].is_none())
            .filter_map(|(i, w)| w.as_ref().map(|w| (i, w)))
    }

    fn work(&self, i: usize) -> Option<&Work> {
        self.work.get(i).and_then(Option::as_ref)
    }

    /// New customers in one array, each with its link and version. Their
    /// ids are marked unsure first; a customer is remembered (which clears
    /// the mark) once the answer names it and its link. Known to be absent
    /// and written under a lock held throughout, it needs no read-back.
    /// Anything else (refused in part, answer lost, an answer without the
    /// link) stays unsure and goes the one-event way, which asks HaloPSA.
    async fn create(&mut self, svc: &Services, halo: &HaloClient, creates: &[usize]) {
        let conn = halo.connection();
        let creates: Vec<usize> = creates
            .iter()
            .copied()
            .filter(|&i| self.work(i).is_some())
            .collect();
        if creates.is_empty() {
            return;
        }
        let ids: Vec<String> = creates
            .iter()
            .filter_map(|&i| self.work(i))
            .map(|w| w.data.account_id.clone())
            .collect();
        let window = svc.config().worker.http_timeout;
        if let Err(e) = svc
            .store
            .creating(&conn.name, CUSTOMER.name, &ids, window)
            .await
        {
            let f: Failure = e.into();
            for &i in &creates {
                self.results[i] = Some(Err(f.clone()));
            }
            return;
        }
        let bodies: Result<Vec<Value>, Failure> = creates
            .iter()
            .filter_map(|&i| self.work(i))
            .map(|w| {
                body(&Area {
                    new_external_link: Some(links::new_link(
                        &CUSTOMER,
                        &w.data.account_id,
                        &w.version,
                    )),
                    ..client_record(&w.data, w.currency, None, conn)
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
            // and isolates the refused one.
            // One policy for a failed array (`lines::after_array_failure`);
            // if nothing was saved, the "creating" marks are taken back.
            Err(Some(e)) => {
                if self.array_failed(e, creates.iter().copied(), "customer") {
                    let _ = svc.store.not_created(&conn.name, CUSTOMER.name, &ids).await;
                }
                return;
            }
        };
        let mut remembered: Vec<(usize, String, Mapping)> = Vec::new();
        for (&i, row) in creates.iter().zip(&saved) {
            let Some(w) = self.work(i) else { continue };
            let Some(halo_id) = record_id(row) else {
                continue;
            };
            let Some(link_id) = links::own_link(row, &CUSTOMER, &w.data.account_id) else {
                continue;
            };
            remembered.push((
                i,
                w.data.account_id.clone(),
                Mapping {
                    halo_id,
                    link_id: Some(link_id),
                    version: Some(w.version.encode()),
                },
            ));
        }
        let pairs: Vec<(&str, &Mapping)> = remembered
            .iter()
            .map(|(_, id, m)| (id.as_str(), m))
            .collect();
        let r = svc
            .store
            .set_mappings(&conn.name, CUSTOMER.name, &pairs)
            .await
            .map_err(Failure::from);
        for (i, _, m) in &remembered {
            tracing::info!(halo_id = m.halo_id, "created the customer");
            self.results[*i] = Some(r.clone().map(|_| Outcome::Applied));
        }
    }

    /// Known customers in one array, then their versions in one array. A
    /// failed array leaves its events to the one-event path (each write
    /// sets absolute values, so sending one again is harmless).
    async fn update(&mut self, svc: &Services, halo: &HaloClient, updates: Vec<(usize, Mapping)>) {
        if updates.is_empty() {
            return;
        }
        let conn = halo.connection();
        let updates: Vec<(usize, Mapping)> = updates
            .into_iter()
            .filter(|(i, _)| self.work(*i).is_some())
            .collect();
        let bodies: Result<Vec<Value>, Failure> = updates
            .iter()
            .filter_map(|(i, m)| {
                self.work(*i)
                    .map(|w| body(&client_record(&w.data, w.currency, Some(m.halo_id), conn)))
            })
            .collect();
        // A value out of the model's range: each event on its own.
        let Ok(bodies) = bodies else { return };
        if let Err(e) = halo.post("/Client", bodies).await {
            self.array_failed(e, updates.iter().map(|(i, _)| *i), "customer update");
            return;
        }
        let versions: Result<Vec<Value>, Failure> = updates
            .iter()
            .filter_map(|(i, m)| self.work(*i).map(|w| (w, m)))
            .map(|(w, m)| {
                body(&links::link_record(
                    &CUSTOMER,
                    &w.data.account_id,
                    m.halo_id,
                    m.link_id,
                    Some(&w.version),
                ))
            })
            .collect();
        let Ok(versions) = versions else { return };
        let saved = match halo.post("/ExternalLink", versions).await {
            Ok(s) => s,
            Err(e) => {
                self.array_failed(e, updates.iter().map(|(i, _)| *i), "version");
                return;
            }
        };
        let new_links: HashMap<usize, i64> = match &saved {
            Value::Array(rows) if rows.len() == updates.len() => rows
                .iter()
                .enumerate()
                .filter_map(|(k, r)| record_id(r).map(|id| (k, id)))
                .collect(),
            one if updates.len() == 1 => record_id(one).map(|id| (0, id)).into_iter().collect(),
            _ => HashMap::new(),
        };
        for (k, (i, mut m)) in updates.into_iter().enumerate() {
            let Some(w) = self.work(i) else { continue };
            if m.link_id.is_none() {
                match new_links.get(&k) {
                    Some(id) => m.link_id = Some(*id),
                    // Which link is ours is unknown: the one-event path.
                    None => continue,
                }
            }
            m.version = Some(w.version.encode());
            let r = svc
                .store
                .set_mapping(&conn.name, CUSTOMER.name, &w.data.account_id, &m)
                .await;
            self.results[i] = Some(r.map(|_| Outcome::Applied).map_err(Failure::from));
        }
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
