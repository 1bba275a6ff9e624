//! `usage.reported` → the usage line of (subscription, metric) on the
//! customer's halosync recurring invoice, in batches (DESIGN §3, reference
//! §3.4, §4.5).
//!
//! The runtime hands over what the broker had ready for one connection,
//! with only the newest event per aggregate (`<subscription_id>:<metric>`),
//! each parsed once into [`UsageData`], and those aggregates' locks held;
//! each step works on the events still open ([`Batch::open`]) and settles
//! what it decides. Per batch:
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
//! Duplicate usage lines (added by hand, or by two workers that raced) are
//! retired when the header is read: the lowest line id is kept.

use std::collections::{BTreeMap, HashSet};

use async_trait::async_trait;
use halosync_shared::contract::{Event, Family, Product, UsageData};
use halosync_shared::halo::items;
use halosync_shared::halo::lines::{self, Header, HeaderSpec, Invoice};
use halosync_shared::halo::links::{self, Known, RECURRING_INVOICE, SUBSCRIPTION, USAGE};
use halosync_shared::halo::models::LicenceList;
use halosync_shared::halo::{record_id, HaloClient};
use halosync_shared::runtime::{Batch, Handler, Open, Outcome, Results, Services};
use halosync_shared::store::{Cache, UsageLine as CachedLine};
use halosync_shared::{Failure, FailureClass};
use serde_json::Value;

use crate::mapping::{item_keys, line_key, line_update, marker, new_line, usage_lines, Applied};

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
    const FAMILY: Family = Family::Usage;
    type Data = UsageData;

    /// `<subscription_id>:<metric>`: one line per subscription and metric,
    /// whatever the period (a newer period replaces the older one).
    fn aggregate(data: &UsageData) -> String {
        line_key(data)
    }

    /// A repair reads the customer's recurring invoice again: its cached
    /// line and the invoice's "every usage line cached" mark go.
    async fn forget_cached(
        &self,
        svc: &Services,
        halo: &HaloClient,
        event: &Event<UsageData>,
    ) -> Result<(), Failure> {
        let conn = &halo.connection().name;
        let invoice = svc
            .store
            .mapping(conn, RECURRING_INVOICE.name, &event.data.account_id)
            .await?;
        svc.store
            .usage_lines(conn)
            .forget_with_scan(&line_key(&event.data), invoice.map(|m| m.halo_id))
            .await?;
        Ok(())
    }

    async fn apply_batch(
        &self,
        svc: &Services,
        halo: &HaloClient,
        events: Batch<Event<UsageData>>,
    ) -> Results {
        let mut batch = events.map(Work::of);
        Run { svc, halo }.apply(&mut batch, &self.cold).await;
        batch.finish()
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
    /// The HaloPSA item; 0 until the product is known.
    item: i64,
    line: Option<i64>,
    /// `line` came from the Redis cache, not from reading the header.
    from_cache: bool,
}

impl Work {
    fn of(event: Event<UsageData>) -> Result<Work, Failure> {
        let data = event.data;
        if !data.quantity.is_finite() || data.quantity < 0.0 {
            return Err(Failure::invalid(format!(
                "quantity {} is not a number >= 0",
                data.quantity
            )));
        }
        Ok(Work {
            aggregate: line_key(&data),
            marker: marker(&data),
            state: Applied {
                period_start: data.period_start.clone(),
                version: event.version,
            },
            data,
            ihid: 0,
            customer: 0,
            product: String::new(),
            item: 0,
            line: None,
            from_cache: false,
        })
    }
}

/// The line HaloPSA (or the cache) holds for the event: a newer or equal
/// applied state settles it as superseded; else it is updated.
fn settle_line(mut w: Open<'_, Work>, line: i64, applied: Option<Applied>) {
    w.line = Some(line);
    if applied.is_some_and(|a| w.state.is_superseded_by(&a)) {
        w.settle(Ok(Outcome::Superseded));
    }
}

/// A subscription whose product Redis does not have: found on its licence
/// in its customer's listing.
struct Unlisted<'a> {
    sub: String,
    licence: i64,
    /// Its events.
    members: Vec<Open<'a, Work>>,
}

/// One batch's run: what every step needs.
struct Run<'a> {
    svc: &'a Services,
    halo: &'a HaloClient,
}

impl<'a> Run<'a> {
    /// The cached usage lines (`store::UsageLine`), by aggregate.
    fn cached_lines(&self) -> Cache<'a, CachedLine> {
        self.svc.store.usage_lines(&self.halo.connection().name)
    }

    async fn apply(&self, batch: &mut Batch<Work>, cold: &tokio::sync::Mutex<()>) {
        self.invoices(batch).await;
        // Each lookup runs first from Redis only; HaloPSA is read (under
        // `cold`) only for what Redis did not have.
        let mut guard = None;
        if self.products(batch, false).await {
            guard = Some(cold.lock().await);
            self.products(batch, true).await;
        }
        if self.lines(batch, false).await {
            if guard.is_none() {
                guard = Some(cold.lock().await);
            }
            self.lines(batch, true).await;
        }
        drop(guard);
        self.write(batch).await;
    }

    /// Step 1: customer and recurring invoice, once per account.
    async fn invoices(&self, batch: &mut Batch<Work>) {
        let mut by_account: BTreeMap<String, Vec<Open<'_, Work>>> = BTreeMap::new();
        for w in batch.open() {
            by_account
                .entry(w.data.account_id.clone())
                .or_default()
                .push(w);
        }
        for (account, members) in by_account {
            match self.invoice_of(&account).await {
                Ok((customer, ihid)) => {
                    for mut w in members {
                        w.customer = customer;
                        w.ihid = ihid;
                    }
                }
                Err(f) => {
                    for w in members {
                        w.settle(Err(f.clone()));
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
    async fn products(&self, batch: &mut Batch<Work>, read: bool) -> bool {
        // subscription -> (its customer, its events)
        let mut by_sub: BTreeMap<String, (i64, Vec<Open<'_, Work>>)> = BTreeMap::new();
        for w in batch.open().filter(|w| w.item == 0) {
            by_sub
                .entry(w.data.subscription_id.clone())
                .or_insert_with(|| (w.customer, Vec::new()))
                .1
                .push(w);
        }
        if by_sub.is_empty() {
            return false;
        }
        let subs: Vec<String> = by_sub.keys().cloned().collect();
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
                for w in by_sub.into_values().flat_map(|(_, members)| members) {
                    w.settle(Err(f.clone()));
                }
                return false;
            }
        };
        let mut need = false;
        // Misses, by customer.
        let mut missing: BTreeMap<i64, Vec<Unlisted<'_>>> = BTreeMap::new();
        for ((sub, (customer, members)), hit) in by_sub.into_iter().zip(cached) {
            if let Some(p) = hit {
                self.with_product(members, &p).await;
                continue;
            }
            // Left open for the read.
            if !read {
                need = true;
                continue;
            }
            let needed = links::require(
                &self.svc.store,
                self.halo,
                &SUBSCRIPTION,
                &sub,
                self.svc.config().retry.dependency_recheck,
                || {
                    format!(
                        "subscription {sub} is not in HaloPSA yet (no licence linked to it); retried until the subscription event has been applied"
                    )
                },
            );
            match needed.await {
                Ok(m) => missing.entry(customer).or_default().push(Unlisted {
                    sub,
                    licence: m.halo_id,
                    members,
                }),
                Err(f) => {
                    for w in members {
                        w.settle(Err(f.clone()));
                    }
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
            let rows = match rows {
                Ok(rows) => rows,
                Err(e) => {
                    let f = Failure::from(e);
                    for w in wanted.into_iter().flat_map(|u| u.members) {
                        w.settle(Err(f.clone()));
                    }
                    continue;
                }
            };
            self.cache_products(&rows).await;
            for Unlisted {
                sub,
                licence,
                members,
            } in wanted
            {
                let found = rows.iter().find(|r| record_id(r) == Some(licence));
                let product = found.and_then(LicenceList::product_of);
                match product {
                    Some(p) => self.with_product(members, &p).await,
                    None => {
                        let f = Failure::dependency(format!(
                            "licence {licence} of subscription {sub} is not listed for customer {customer} with a product_sku; retried"
                        ));
                        for w in members {
                            w.settle(Err(f.clone()));
                        }
                    }
                }
            }
        }
        need
    }

    /// The product of `members`, the events of one subscription: its name
    /// on their lines, and each one's item (`<sku>:<metric>`, else the sku).
    async fn with_product(&self, members: Vec<Open<'_, Work>>, p: &Product) {
        let conn = self.halo.connection();
        for mut w in members {
            w.product = p.name.clone();
            let keys = item_keys(&p.sku, &w.data.metric);
            match items::resolve_chain(self.halo, &self.svc.store, conn, &keys).await {
                Ok(Some((_, item))) => w.item = item,
                Ok(None) => {
                    let f = crate::mapping::unmapped(conn, &p.sku, &w.data.metric);
                    w.settle(Err(f));
                }
                Err(f) => w.settle(Err(f)),
            }
        }
    }

    /// Step 4: the line and its applied state; superseded events stop here.
    /// Returns whether HaloPSA must be read (only when `read` is false).
    async fn lines(&self, batch: &mut Batch<Work>, read: bool) -> bool {
        let open: Vec<Open<'_, Work>> = batch.open().filter(|w| w.line.is_none()).collect();
        if open.is_empty() {
            return false;
        }
        let aggregates: Vec<&str> = open.iter().map(|w| w.aggregate.as_str()).collect();
        let cached = self.cached_lines().get_many(&aggregates).await;
        drop(aggregates);
        let cached = match cached {
            Ok(c) => c,
            Err(e) => {
                let f: Failure = e.into();
                for w in open {
                    w.settle(Err(f.clone()));
                }
                return false;
            }
        };
        // header -> (its account, its customer, its events)
        let mut by_header: BTreeMap<i64, (String, i64, Vec<Open<'_, Work>>)> = BTreeMap::new();
        let mut pending_ihids: HashSet<i64> = HashSet::new();
        for (mut w, hit) in open.into_iter().zip(cached) {
            let ihid = w.ihid;
            match hit.filter(|c| c.ihid == ihid) {
                Some(c) if !c.pending => {
                    w.from_cache = true;
                    settle_line(w, c.line, Applied::decode(&c.applied));
                    continue;
                }
                Some(_) => {
                    pending_ihids.insert(ihid);
                }
                None => {}
            }
            by_header
                .entry(ihid)
                .or_insert_with(|| (w.data.account_id.clone(), w.customer, Vec::new()))
                .2
                .push(w);
        }
        // A header scanned before has every usage line of it in the cache
        // (or a pending entry): an aggregate missing there has no line yet,
        // and stays open to be added.
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
        for (ihid, (account, customer, members)) in by_header {
            let spec = self.spec(&account, customer);
            match lines::header(&self.svc.store, self.halo, &spec, ihid).await {
                Ok(Header {
                    ihid, body: header, ..
                }) => {
                    let found = usage_lines(&header);
                    self.remember_header(ihid, &found).await;
                    for mut w in members {
                        // The invoice read, or the one found or created
                        // again when the MSP deleted it.
                        w.ihid = ihid;
                        // Lines beside the lowest carrying the marker
                        // (added by hand, or by workers that raced) are
                        // retired: the customer is billed once.
                        let mut ids: Vec<i64> = found
                            .iter()
                            .filter(|(m, _, _)| *m == w.marker)
                            .map(|(_, l, _)| *l)
                            .collect();
                        ids.sort_unstable();
                        if let Some((&kept, others)) = ids.split_first() {
                            let retired = lines::retire_duplicates(
                                self.halo,
                                Invoice::Recurring,
                                ihid,
                                kept,
                                others,
                                &w.marker,
                            );
                            if let Err(f) = retired.await {
                                w.settle(Err(f));
                                continue;
                            }
                        }
                        // No line yet: it stays open, to be added.
                        if let Some((_, line, applied)) =
                            found.iter().find(|(m, _, _)| *m == w.marker)
                        {
                            settle_line(w, *line, applied.clone());
                        }
                    }
                }
                Err(f) => {
                    for w in members {
                        w.settle(Err(f.clone()));
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

    /// The recurring invoice of `account`'s `customer`, as the lines
    /// engine needs it.
    fn spec<'s>(&self, account: &'s str, customer: i64) -> HeaderSpec<'s> {
        let config = self.svc.config();
        HeaderSpec::recurring(
            account,
            customer,
            config.worker.lock_ttl,
            config.worker.lock_wait,
        )
    }

    /// Step 5: the writes, in arrays, split on a refusal.
    async fn write(&self, batch: &mut Batch<Work>) {
        // Updates carry their line's id.
        let mut updates: Vec<((Open<'_, Work>, i64), Value)> = Vec::new();
        let mut adds: Vec<(Open<'_, Work>, Value)> = Vec::new();
        for w in batch.open() {
            match w.line {
                Some(line) => {
                    match line_update(
                        &w.data, &w.product, &w.state, w.ihid, line, w.item, &w.marker,
                    ) {
                        Ok(b) => updates.push(((w, line), b)),
                        Err(f) => w.settle(Err(f)),
                    }
                }
                None => match new_line(&w.data, &w.product, &w.state, w.ihid, w.item, &w.marker) {
                    Ok(b) => adds.push((w, b)),
                    Err(f) => w.settle(Err(f)),
                },
            }
        }
        let mut done: Vec<(Open<'_, Work>, i64)> = Vec::new();
        for ((w, line), result) in lines::update(self.halo, Invoice::Recurring, updates).await {
            match result {
                Ok(_) => done.push((w, line)),
                Err(f) if f.class == FailureClass::Rejected && w.from_cache => {
                    // A refused cached line (deleted by the MSP, or a stale
                    // id) is found again, or put back, on the retry, which
                    // reads the header; a refusal after that is final.
                    self.forget(&w).await;
                    let f = lines::cached_line_refused(line, w.ihid, &f);
                    w.settle(Err(f));
                }
                Err(f) => w.settle(Err(f)),
            }
        }
        if !adds.is_empty() {
            // Intent first: a worker killed between the POST and the cache
            // write leaves a pending entry, so the replay reads the header
            // (and finds the line by its marker) instead of adding again.
            let pending: Vec<(&str, CachedLine)> = adds
                .iter()
                .map(|(w, _)| {
                    let value = CachedLine {
                        ihid: w.ihid,
                        line: 0,
                        applied: String::new(),
                        pending: true,
                    };
                    (w.aggregate.as_str(), value)
                })
                .collect();
            let noted = self.cached_lines().set_many(&pending).await;
            drop(pending);
            if let Err(e) = noted {
                let f: Failure = e.into();
                for (w, _) in adds.drain(..) {
                    w.settle(Err(f.clone()));
                }
            }
        }
        for (w, result) in lines::add(self.halo, Invoice::Recurring, adds).await {
            match result {
                Ok(saved) => match saved.as_ref().and_then(record_id) {
                    Some(line) => {
                        tracing::info!(line, marker = %w.marker, "added a usage line");
                        done.push((w, line));
                    }
                    None => w.settle(Err(Failure::transient(
                        "HaloPSA saved the line but returned no id",
                    ))),
                },
                Err(f) => {
                    // A refusal because the MSP deleted the invoice: found
                    // or created again, the event retried onto it.
                    let spec = self.spec(&w.data.account_id, w.customer);
                    let f = lines::refusal_unless_header_gone(
                        &self.svc.store,
                        self.halo,
                        &spec,
                        w.ihid,
                        f,
                    )
                    .await;
                    w.settle(Err(f));
                }
            }
        }
        // Cache what is now on the lines, in one round trip.
        let lines: Vec<(&str, CachedLine)> = done
            .iter()
            .map(|(w, line)| {
                let value = CachedLine {
                    ihid: w.ihid,
                    line: *line,
                    applied: w.state.encode(),
                    pending: false,
                };
                (w.aggregate.as_str(), value)
            })
            .collect();
        let cached = self.cached_lines().set_many(&lines).await;
        drop(lines);
        if let Err(e) = cached {
            // HaloPSA has the truth; the next event reads the header.
            tracing::warn!(error = %e, "could not cache the usage lines");
        }
        for (w, _) in done {
            w.settle(Ok(Outcome::Applied));
        }
    }

    async fn forget(&self, w: &Work) {
        let res = self
            .cached_lines()
            .forget_with_scan(&w.aggregate, Some(w.ihid))
            .await;
        if let Err(e) = res {
            tracing::warn!(error = %e, "could not drop a cached usage line");
        }
    }
}
