//! `usage.reported` → the usage line of (subscription, metric) on the
//! customer's halosync recurring invoice, in batches (DESIGN §3, reference
//! §3.4, §4.5).
//!
//! The runtime hands over what the broker had ready for one connection,
//! with only the newest event per aggregate (`<subscription_id>:<metric>`)
//! and those aggregates' locks held. Per batch:
//!
//! 1. **Customer and invoice**, once per account: `links::require_customer`
//!    (`dependency` while the account is not in HaloPSA), then the
//!    recurring invoice through `links::resolve_or_create` under the same
//!    lock (`recurring_invoice:<account_id>`) and with the same header body
//!    as the subscription worker, which puts its lines on the same invoice.
//! 2. **Sku and product name** of the subscription (usage events carry
//!    neither): Redis `…:subproduct:<subscription_id>` (shared with the overage worker), else the
//!    subscription's licence (`halosync.subscription` mapping → licence id)
//!    looked up in one `GET /SoftwareLicence?client_id=…` list per customer;
//!    every licence of that list carrying a subscription marker is cached
//!    then, so the customer's other subscriptions need no list later. A
//!    subscription not in HaloPSA yet is a `dependency`. The sku of a
//!    subscription is assumed never to change (a changed product is a new
//!    subscription); the cache never expires.
//! 3. **Item**: `"<sku>:<metric>"` in `[items]`, else the sku, else
//!    `unmapped` naming both keys.
//! 4. **Line and applied state**: Redis `…:usage_line:<subscription_id>:<metric>`
//!    = `{ihid, line, applied, pending}`. On a miss, the header is read once
//!    per invoice per batch (`GET /RecurringInvoice/{id}?includedetails=true`),
//!    the line found by its marker, with the applied state kept on the line
//!    itself (see `mapping`); every usage line of that header is then cached
//!    (`SET NX`: never over an entry another worker just wrote) and the
//!    header marked `…:usage_scanned:<ihid>`. A miss on a scanned header
//!    means "no line yet" and needs no GET: every line is added with a
//!    `pending` entry written *before* `POST /RecurringInvoice/Lines`, so a
//!    worker killed between the POST and the cache write leaves a pending
//!    entry, and the replay reads the header instead of adding a second
//!    line. An event whose (period, version) is not newer than the applied
//!    one is `Superseded`.
//! 5. **Writes**: updates in arrays of ≤ 100 lines per
//!    `POST /RecurringInvoice/updatelines` (lines of several invoices share
//!    a request), new lines in arrays of ≤ 100 per
//!    `POST /RecurringInvoice/Lines`; quantity and applied version travel
//!    in the same request. A 400 for an array splits it in halves, again
//!    and again, until the one line HaloPSA refuses is isolated: that event
//!    is `rejected` with HaloPSA's message, the others are applied. Any
//!    other error fails the events of that array with its class (retried).
//!
//! Steady state (Redis warm): no GET at all, one request per 100 changed
//! lines. Cold: one header GET and at most one licence list per customer.
//!
//! New lines are matched to HaloPSA's answer by position (HaloPSA answers
//! an array with the saved lines in order; UNCONFIRMED for real HaloPSA).
//!
//! Not handled (documented limits): duplicate usage lines added by two
//! workers that lost their Redis locks at the same time (the lowest line id
//! is used from then on; the other stays); no fencing of the aggregate lock
//! during the write (a Redis loss mid-batch could let an older write land
//! after a newer one until the next event of that aggregate).

use std::collections::{BTreeMap, HashMap, HashSet};

use async_trait::async_trait;
use halosync_shared::contract::{Envelope, Family, Product, UsageData};
use halosync_shared::halo::items;
use halosync_shared::halo::lines::{self, Header, HeaderSpec, Invoice};
use halosync_shared::halo::links::{self, Known, RECURRING_INVOICE, SUBSCRIPTION, USAGE};
use halosync_shared::halo::{record_id, HaloClient};
use halosync_shared::runtime::{Handler, Outcome, Services};
use halosync_shared::store::{Cache, UsageLine as CachedLine};
use halosync_shared::{Failure, FailureClass};
use serde_json::Value;

use crate::mapping::{item_keys, line_update, new_line, usage_lines, Applied};

// The licence field the subscription worker writes its marker into.
use halosync_shared::halo::links::LICENCE_MARKER_FIELD as LICENCE_ID_FIELD;

/// `cold` serialises the lookups of concurrent batches of this process
/// (the runtime writes one batch while the next fills): the second batch
/// waits for the first one's header reads and licence lists, then finds
/// their results in Redis instead of reading the same headers again.
#[derive(Default)]
pub struct UsageHandler {
    cold: tokio::sync::Mutex<()>,
}

#[async_trait]
impl Handler for UsageHandler {
    fn family(&self) -> Family {
        Family::Usage
    }

    /// `<subscription_id>:<metric>`: one line per subscription and metric,
    /// whatever the period (a newer period replaces the older one).
    fn aggregate(&self, event: &Envelope) -> Result<String, Failure> {
        let d: UsageData = event.data_as()?;
        Ok(format!("{}:{}", d.subscription_id, d.metric))
    }

    /// A repair reads the customer's recurring invoice again: its cached
    /// line and the invoice's "every usage line cached" mark go.
    async fn forget_cached(
        &self,
        svc: &Services,
        halo: &HaloClient,
        event: &Envelope,
    ) -> Result<(), Failure> {
        let d: UsageData = event.data_as()?;
        let conn = &halo.connection().name;
        let invoice = svc
            .store
            .mapping(conn, RECURRING_INVOICE.name, &d.account_id)
            .await?;
        svc.store
            .usage_lines(conn)
            .forget_with_scan(&self.aggregate(event)?, invoice.map(|m| m.halo_id))
            .await?;
        Ok(())
    }

    async fn apply_batch(
        &self,
        svc: &Services,
        halo: &HaloClient,
        events: &[Envelope],
    ) -> Vec<Result<Outcome, Failure>> {
        Batch::new(svc, halo, events).run(&self.cold).await
    }
}

/// One event on its way through the batch.
struct Work {
    data: UsageData,
    /// `<subscription_id>:<metric>` ([`Handler::aggregate`]).
    aggregate: String,
    state: Applied,
    marker: String,
    ihid: i64,
    customer: i64,
    product: String,
    item: i64,
    line: Option<i64>,
    /// `line` came from the Redis cache, not from reading the header.
    from_cache: bool,
}

struct Batch<'a> {
    svc: &'a Services,
    halo: &'a HaloClient,
    results: Vec<Option<Result<Outcome, Failure>>>,
    work: Vec<Option<Work>>,
}

impl<'a> Batch<'a> {
    fn new(svc: &'a Services, halo: &'a HaloClient, events: &[Envelope]) -> Batch<'a> {
        let mut results = Vec::with_capacity(events.len());
        let mut work = Vec::with_capacity(events.len());
        for e in events {
            let parsed = e.data_as::<UsageData>().and_then(|data| {
                let version = e.version()?;
                if !data.quantity.is_finite() || data.quantity < 0.0 {
                    return Err(Failure::invalid(format!(
                        "quantity {} is not a number >= 0",
                        data.quantity
                    )));
                }
                Ok((data, version))
            });
            match parsed {
                Ok((data, version)) => {
                    results.push(None);
                    let aggregate = crate::mapping::line_key(&data);
                    let marker = crate::mapping::marker(&data);
                    work.push(Some(Work {
                        aggregate,
                        state: Applied {
                            period_start: data.period_start.clone(),
                            version,
                        },
                        data,
                        marker,
                        ihid: 0,
                        customer: 0,
                        product: String::new(),
                        item: 0,
                        line: None,
                        from_cache: false,
                    }));
                }
                Err(f) => {
                    results.push(Some(Err(f)));
                    work.push(None);
                }
            }
        }
        Batch {
            svc,
            halo,
            results,
            work,
        }
    }

    fn fail(&mut self, i: usize, f: Failure) {
        self.results[i] = Some(Err(f));
        self.work[i] = None;
    }

    fn live(&self) -> Vec<usize> {
        (0..self.work.len())
            .filter(|i| self.work[*i].is_some())
            .collect()
    }

    /// The cached usage lines (`store::UsageLine`), by aggregate.
    fn cached_lines(&self) -> Cache<'a, CachedLine> {
        self.svc.store.usage_lines(&self.halo.connection().name)
    }

    async fn run(mut self, cold: &tokio::sync::Mutex<()>) -> Vec<Result<Outcome, Failure>> {
        self.invoices().await;
        // Each lookup runs first from Redis only; HaloPSA is read (under
        // `cold`) only for what Redis did not have.
        let mut guard = None;
        if self.products(false).await {
            guard = Some(cold.lock().await);
            self.products(true).await;
        }
        if self.lines(false).await {
            if guard.is_none() {
                guard = Some(cold.lock().await);
            }
            self.lines(true).await;
        }
        drop(guard);
        self.write().await;
        self.results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Failure::transient("event not decided (bug)"))))
            .collect()
    }

    /// Step 1: customer and recurring invoice, once per account.
    async fn invoices(&mut self) {
        let mut by_account: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for i in self.live() {
            let w = self.work[i].as_ref().expect("live");
            by_account
                .entry(w.data.account_id.clone())
                .or_default()
                .push(i);
        }
        for (account, members) in by_account {
            match self.invoice_of(&account).await {
                Ok((customer, ihid)) => {
                    for i in members {
                        let w = self.work[i].as_mut().expect("live");
                        w.customer = customer;
                        w.ihid = ihid;
                    }
                }
                Err(f) => {
                    for i in members {
                        self.fail(i, f.clone());
                    }
                }
            }
        }
    }

    async fn invoice_of(&self, account_id: &str) -> Result<(i64, i64), Failure> {
        let store = &self.svc.store;
        let halo = self.halo;
        let config = self.svc.config();
        let customer =
            links::require_customer(store, halo, account_id, config.retry.dependency_recheck)
                .await?
                .halo_id;
        let w = &config.worker;
        // The subscription worker's invoice: it creates it with the
        // account's first subscription line, and usage has nothing to bill
        // before that subscription is there. Known absent: wait for it
        // without a request; unsure (Redis lost it): found, or created, the
        // one way (same header body, converging on the earliest).
        let known = links::known_many(store, halo, &RECURRING_INVOICE, &[account_id.to_string()])
            .await?
            .pop();
        let ihid = match known {
            Some(Known::Mapped(m)) => m.halo_id,
            Some(Known::Absent) => {
                return Err(links::still_absent(
                    store,
                    halo,
                    &RECURRING_INVOICE,
                    account_id,
                    config.retry.dependency_recheck,
                    format!(
                        "account {account_id} has no halosync recurring invoice yet (the subscription worker creates it with its first subscription); retried until it has"
                    ),
                )
                .await)
            }
            Some(Known::Creating) => {
                let mut f = Failure::dependency(format!(
                    "the halosync recurring invoice of account {account_id} is being created right now; retried once it is"
                ));
                f.throttled = true;
                return Err(f);
            }
            Some(Known::Unsure) | None => {
                lines::recurring_invoice(store, halo, account_id, customer, w.lock_ttl, w.lock_wait)
                    .await?
            }
        };
        Ok((customer, ihid))
    }

    /// Steps 2 and 3: sku and product name of each subscription, and the
    /// item of each event (which needs the sku).
    /// Returns whether HaloPSA must be read (only when `read` is false).
    async fn products(&mut self, read: bool) -> bool {
        let live: Vec<usize> = self
            .live()
            .into_iter()
            .filter(|i| self.work[*i].as_ref().is_some_and(|w| w.item == 0))
            .collect();
        let mut need = false;
        let subs: Vec<String> = {
            let mut s: Vec<String> = live
                .iter()
                .map(|i| {
                    self.work[*i]
                        .as_ref()
                        .expect("live")
                        .data
                        .subscription_id
                        .clone()
                })
                .collect();
            s.sort();
            s.dedup();
            s
        };
        if subs.is_empty() {
            return false;
        }
        let mut known: HashMap<String, Result<Product, Failure>> = HashMap::new();
        let cached = self
            .svc
            .store
            .subscription_products(&self.halo.connection().name)
            .get_many(&subs)
            .await;
        let cached = match cached {
            Ok(c) => c,
            Err(e) => {
                let f: Failure = e.into();
                for i in live {
                    self.fail(i, f.clone());
                }
                return false;
            }
        };
        // Misses, by customer: subscription -> licence id.
        let mut missing: BTreeMap<i64, Vec<(String, i64)>> = BTreeMap::new();
        let customer_of: HashMap<String, i64> = live
            .iter()
            .map(|i| {
                let w = self.work[*i].as_ref().expect("live");
                (w.data.subscription_id.clone(), w.customer)
            })
            .collect();
        for (sub, hit) in subs.iter().zip(cached) {
            if let Some(p) = hit {
                known.insert(sub.clone(), Ok(p));
                continue;
            }
            if !read {
                need = true;
                continue;
            }
            let needed = links::require(
                &self.svc.store,
                self.halo,
                &SUBSCRIPTION,
                sub,
                self.svc.config().retry.dependency_recheck,
                || {
                    format!(
                        "subscription {sub} is not in HaloPSA yet (no licence linked to it); retried until the subscription event has been applied"
                    )
                },
            );
            match needed.await {
                Ok(m) => missing
                    .entry(customer_of[sub])
                    .or_default()
                    .push((sub.clone(), m.halo_id)),
                Err(f) => {
                    known.insert(sub.clone(), Err(f));
                }
            }
        }
        for (customer, wanted) in missing {
            let rows = self
                .halo
                .list(
                    "/SoftwareLicence",
                    "licences",
                    &[
                        ("client_id", customer.to_string()),
                        ("includeinactive", "true".into()),
                    ],
                )
                .await;
            match rows {
                Ok(rows) => {
                    self.cache_products(&rows).await;
                    for (sub, licence) in wanted {
                        let found = rows.iter().find(|r| record_id(r) == Some(licence));
                        let product = found.and_then(|r| {
                            let sku = r.get("product_sku")?.as_str()?.trim().to_string();
                            let name = r
                                .get("name")
                                .and_then(Value::as_str)
                                .unwrap_or(&sku)
                                .to_string();
                            (!sku.is_empty()).then_some(Product { sku, name })
                        });
                        let v = match product {
                            Some(p) => Ok(p),
                            None => Err(Failure::dependency(format!(
                                "licence {licence} of subscription {sub} is not listed for customer {customer} with a product_sku; retried"
                            ))),
                        };
                        known.insert(sub, v);
                    }
                }
                Err(e) => {
                    let f = Failure::from(e);
                    for (sub, _) in wanted {
                        known.insert(sub, Err(f.clone()));
                    }
                }
            }
        }
        for i in live {
            let sub = self.work[i]
                .as_ref()
                .expect("live")
                .data
                .subscription_id
                .clone();
            match known.get(&sub) {
                Some(Ok(p)) => {
                    let w = self.work[i].as_mut().expect("live");
                    w.product = p.name.clone();
                    // The sku is only needed for the item.
                    let (sku, metric) = (p.sku.clone(), w.data.metric.clone());
                    let conn = self.halo.connection();
                    let keys = item_keys(&sku, &metric);
                    let found = items::resolve_chain(self.halo, &self.svc.store, conn, &keys).await;
                    match found {
                        Ok(Some((_, item))) => {
                            if let Some(w) = self.work[i].as_mut() {
                                w.item = item;
                            }
                        }
                        Ok(None) => self.fail(i, crate::mapping::unmapped(conn, &sku, &metric)),
                        Err(f) => self.fail(i, f),
                    }
                }
                Some(Err(f)) => {
                    let f = f.clone();
                    self.fail(i, f);
                }
                None if read => self.fail(i, Failure::transient("no product (bug)")),
                None => {}
            }
        }
        need
    }

    /// Step 4: the line and its applied state; superseded events stop here.
    /// Returns whether HaloPSA must be read (only when `read` is false).
    async fn lines(&mut self, read: bool) -> bool {
        let live: Vec<usize> = self
            .live()
            .into_iter()
            .filter(|i| self.work[*i].as_ref().is_some_and(|w| w.line.is_none()))
            .collect();
        if live.is_empty() {
            return false;
        }
        let aggregates: Vec<&str> = live
            .iter()
            .map(|i| self.work[*i].as_ref().expect("live").aggregate.as_str())
            .collect();
        let cached = match self.cached_lines().get_many(&aggregates).await {
            Ok(c) => c,
            Err(e) => {
                let f: Failure = e.into();
                for i in live {
                    self.fail(i, f.clone());
                }
                return false;
            }
        };
        let mut by_header: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
        let mut pending_ihids: HashSet<i64> = HashSet::new();
        for (&i, hit) in live.iter().zip(cached) {
            let ihid = self.work[i].as_ref().expect("live").ihid;
            match hit.filter(|c| c.ihid == ihid) {
                Some(c) if !c.pending => {
                    let applied = Applied::decode(&c.applied);
                    self.settle_line(i, c.line, applied);
                    if let Some(w) = self.work[i].as_mut() {
                        w.from_cache = true;
                    }
                }
                Some(_) => {
                    pending_ihids.insert(ihid);
                    by_header.entry(ihid).or_default().push(i);
                }
                None => by_header.entry(ihid).or_default().push(i),
            }
        }
        // A header scanned before has every usage line of it in the cache
        // (or a pending entry): an aggregate missing there has no line yet.
        let ihids: Vec<i64> = by_header
            .keys()
            .copied()
            .filter(|h| !pending_ihids.contains(h))
            .collect();
        if !ihids.is_empty() {
            let scanned = self
                .svc
                .store
                .usage_scanned(&self.halo.connection().name)
                .marked(&ihids)
                .await;
            match scanned {
                Ok(scanned) => {
                    for (h, seen) in ihids.iter().zip(scanned) {
                        if seen {
                            by_header.remove(h);
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not read the scanned headers; reading them")
                }
            }
        }
        if !read {
            return !by_header.is_empty();
        }
        for (ihid, members) in by_header {
            match self.read_header(ihid, &members).await {
                Ok(Header {
                    ihid, body: header, ..
                }) => {
                    let found = usage_lines(&header);
                    self.remember_header(ihid, &found).await;
                    // Lines beside the lowest carrying one of our markers
                    // (added by hand, or by workers that raced) are
                    // retired: the customer is billed once.
                    for &i in &members {
                        let marker = self.work[i].as_ref().expect("live").marker.clone();
                        let mut ids: Vec<i64> = found
                            .iter()
                            .filter(|(m, _, _)| *m == marker)
                            .map(|(_, l, _)| *l)
                            .collect();
                        ids.sort_unstable();
                        if let Some((&kept, others)) = ids.split_first() {
                            if let Err(f) = lines::retire_duplicates(
                                self.halo,
                                Invoice::Recurring,
                                ihid,
                                kept,
                                others,
                                &marker,
                            )
                            .await
                            {
                                self.fail(i, f);
                            }
                        }
                    }
                    for i in members {
                        if self.work[i].is_none() {
                            continue;
                        }
                        let marker = self.work[i].as_ref().expect("live").marker.clone();
                        // No line yet: a new one is added.
                        if let Some((_, line, applied)) =
                            found.iter().find(|(m, _, _)| *m == marker)
                        {
                            self.settle_line(i, *line, applied.clone());
                        }
                    }
                }
                Err(f) => {
                    for i in members {
                        self.fail(i, f.clone());
                    }
                }
            }
        }
        false
    }

    /// After reading header `ihid`: caches every usage line on it (only
    /// where the aggregate has no entry: another worker holding that
    /// aggregate's lock may have just cached a newer state), then marks
    /// the header as scanned. The lowest line id per marker is kept.
    async fn remember_header(&self, ihid: i64, found: &[(String, i64, Option<Applied>)]) {
        let prefix = format!("{}:", USAGE.third_party_type);
        let mut lines: Vec<(&str, CachedLine)> = Vec::new();
        let mut seen = HashSet::new();
        for (marker, line, applied) in found {
            let Some(aggregate) = marker.strip_prefix(&prefix) else {
                continue;
            };
            if !seen.insert(aggregate) {
                continue;
            }
            lines.push((
                aggregate,
                CachedLine {
                    ihid,
                    line: *line,
                    applied: applied.as_ref().map(Applied::encode).unwrap_or_default(),
                    pending: false,
                },
            ));
        }
        if let Err(e) = self.cached_lines().remember_scanned(ihid, &lines).await {
            tracing::warn!(error = %e, "could not cache the header's usage lines");
        }
    }

    fn settle_line(&mut self, i: usize, line: i64, applied: Option<Applied>) {
        let w = self.work[i].as_mut().expect("live");
        w.line = Some(line);
        if let Some(a) = applied {
            if w.state.is_superseded_by(&a) {
                self.results[i] = Some(Ok(Outcome::Superseded));
                self.work[i] = None;
            }
        }
    }

    /// Caches the sku and name of every licence of a customer listing that
    /// carries a subscription marker, so that the customer's other
    /// subscriptions need no listing in later batches.
    async fn cache_products(&self, rows: &[Value]) {
        let prefix = format!("{}:", SUBSCRIPTION.third_party_type);
        let mut products: Vec<(&str, Product)> = Vec::new();
        for row in rows {
            let Some(sub) = row
                .get(LICENCE_ID_FIELD)
                .and_then(Value::as_str)
                .and_then(|m| m.trim().strip_prefix(&prefix))
            else {
                continue;
            };
            let Some(sku) = row.get("product_sku").and_then(Value::as_str) else {
                continue;
            };
            if sku.trim().is_empty() {
                continue;
            }
            let p = Product {
                sku: sku.trim().to_string(),
                name: row
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or(sku)
                    .to_string(),
            };
            products.push((sub, p));
        }
        let cached = self
            .svc
            .store
            .subscription_products(&self.halo.connection().name)
            .set_many(&products)
            .await;
        if let Err(e) = cached {
            tracing::warn!(error = %e, "could not cache the subscriptions' skus");
        }
    }

    /// The invoice of `members` (`ihid`, read with its lines), and its id:
    /// `ihid`, or the invoice found or created again when the MSP deleted
    /// it ([`lines::header`]), which the members then go onto.
    async fn read_header(&mut self, ihid: i64, members: &[usize]) -> Result<Header, Failure> {
        let Some(spec) = self.spec_of(members.first().copied()) else {
            return Err(Failure::transient("no event for the invoice (bug)"));
        };
        let header = lines::header(&self.svc.store, self.halo, &spec, ihid).await?;
        for &i in members {
            if let Some(w) = self.work[i].as_mut() {
                w.ihid = header.ihid;
            }
        }
        Ok(header)
    }

    /// The recurring invoice of event `i`, as the lines engine needs it.
    fn spec_of(&self, i: Option<usize>) -> Option<HeaderSpec<'_>> {
        let w = self.work[i?].as_ref()?;
        let config = self.svc.config();
        Some(HeaderSpec::recurring(
            &w.data.account_id,
            w.customer,
            config.worker.lock_ttl,
            config.worker.lock_wait,
        ))
    }

    /// Step 5: the writes, in arrays, split on a refusal.
    async fn write(&mut self) {
        let mut updates = Vec::new();
        let mut adds: Vec<(usize, Value)> = Vec::new();
        let mut unbuildable: Vec<(usize, Failure)> = Vec::new();
        for i in self.live() {
            let w = self.work[i].as_ref().expect("live");
            let built = match w.line {
                Some(line) => line_update(
                    &w.data, &w.product, &w.state, w.ihid, line, w.item, &w.marker,
                )
                .map(|b| (true, b)),
                None => new_line(&w.data, &w.product, &w.state, w.ihid, w.item, &w.marker)
                    .map(|b| (false, b)),
            };
            match built {
                Ok((true, b)) => updates.push((i, b)),
                Ok((false, b)) => adds.push((i, b)),
                Err(f) => unbuildable.push((i, f)),
            }
        }
        for (i, f) in unbuildable {
            self.fail(i, f);
        }
        let mut done: Vec<(usize, i64)> = Vec::new();
        for (i, result) in lines::update(self.halo, Invoice::Recurring, updates).await {
            match result {
                Ok(_) => {
                    let line = self.work[i].as_ref().and_then(|w| w.line).unwrap_or(0);
                    done.push((i, line));
                }
                Err(f)
                    if f.class == FailureClass::Rejected
                        && self.work[i].as_ref().is_some_and(|w| w.from_cache) =>
                {
                    // A refused cached line (deleted by the MSP, or a stale
                    // id) is found again, or put back, on the retry, which
                    // reads the header; a refusal after that is final.
                    self.forget(i).await;
                    let (line, ihid) = self.work[i]
                        .as_ref()
                        .map(|w| (w.line.unwrap_or(0), w.ihid))
                        .unwrap_or_default();
                    self.fail(i, lines::cached_line_refused(line, ihid, &f));
                }
                Err(f) => self.fail(i, f),
            }
        }
        if !adds.is_empty() {
            // Intent first: a worker killed between the POST and the cache
            // write leaves a pending entry, so the replay reads the header
            // (and finds the line by its marker) instead of adding again.
            let pending: Vec<(&str, CachedLine)> = adds
                .iter()
                .filter_map(|(i, _)| self.work[*i].as_ref())
                .map(|w| {
                    let value = CachedLine {
                        ihid: w.ihid,
                        line: 0,
                        applied: String::new(),
                        pending: true,
                    };
                    (w.aggregate.as_str(), value)
                })
                .collect();
            if let Err(e) = self.cached_lines().set_many(&pending).await {
                let f: Failure = e.into();
                for (i, _) in std::mem::take(&mut adds) {
                    self.fail(i, f.clone());
                }
            }
        }
        for (i, result) in lines::add(self.halo, Invoice::Recurring, adds).await {
            match result {
                Ok(saved) => match saved.as_ref().and_then(record_id) {
                    Some(line) => {
                        tracing::info!(line, marker = %self.work[i].as_ref().map(|w| w.marker.as_str()).unwrap_or(""), "added a usage line");
                        done.push((i, line));
                    }
                    None => self.fail(
                        i,
                        Failure::transient("HaloPSA saved the line but returned no id"),
                    ),
                },
                Err(f) => {
                    // A refusal because the MSP deleted the invoice: found
                    // or created again, the event retried onto it.
                    let ihid = self.work[i].as_ref().map(|w| w.ihid).unwrap_or_default();
                    let f = match self.spec_of(Some(i)) {
                        Some(spec) => {
                            lines::refusal_unless_header_gone(
                                &self.svc.store,
                                self.halo,
                                &spec,
                                ihid,
                                f,
                            )
                            .await
                        }
                        None => f,
                    };
                    self.fail(i, f)
                }
            }
        }
        // Cache what is now on the lines, in one round trip.
        let lines: Vec<(&str, CachedLine)> = done
            .iter()
            .filter_map(|(i, line)| Some((self.work[*i].as_ref()?, *line)))
            .map(|(w, line)| {
                let value = CachedLine {
                    ihid: w.ihid,
                    line,
                    applied: w.state.encode(),
                    pending: false,
                };
                (w.aggregate.as_str(), value)
            })
            .collect();
        if let Err(e) = self.cached_lines().set_many(&lines).await {
            // HaloPSA has the truth; the next event reads the header.
            tracing::warn!(error = %e, "could not cache the usage lines");
        }
        for (i, _) in done {
            self.results[i] = Some(Ok(Outcome::Applied));
            self.work[i] = None;
        }
    }

    async fn forget(&self, i: usize) {
        if let Some(w) = self.work[i].as_ref() {
            let res = self
                .cached_lines()
                .forget_with_scan(&w.aggregate, Some(w.ihid))
                .await;
            if let Err(e) = res {
                tracing::warn!(error = %e, "could not drop a cached usage line");
            }
        }
    }
}
