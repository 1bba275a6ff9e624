//! **The invoice-lines engine**: one line per aggregate on an invoice
//! header, written idempotently in arrays, for every family that bills
//! lines (subscription and usage lines on the recurring invoice, overage
//! charges on one-off invoices). A family is a [`LineFamily`]: its typed
//! data, its line key, which invoice, pure functions event →
//! [`InvoiceDetail`] / [`InvoiceHeader`], and its policy
//! ([`LineFamily::prepare`]: customer, item, price, whether the invoice
//! may be created; the subscription's licence in
//! [`LineFamily::before_write`] and [`LineFamily::written`]). [`Lines`]
//! is the runtime's [`Handler`] for any family.
//!
//! # One batch (the events of one connection, newest per aggregate, locked)
//!
//! 1. **Cache** (`store`: [`LineCache`]): an event not newer than the
//!    applied state cached for its aggregate is `Superseded`, before any
//!    request.
//! 2. **Family policy** ([`LineFamily::prepare`]): each event's customer,
//!    its [`LineFamily::Target`] (item, price, ...) and its invoice: an id,
//!    or none yet (`Line::ihid` = `None`).
//! 3. **Lines by marker**, for the events whose invoice is known: a cached
//!    line id of the same invoice is used as it is; else the header is
//!    read once per invoice per batch (`halo::lines::header`: found or
//!    created again when the MSP deleted it), the line found by its
//!    marker, an event not newer than the state on the line `Superseded`,
//!    lines beside the lowest one carrying the marker retired. A family
//!    whose cache [`LineCache::scans`] caches every line of a header read
//!    and marks it scanned: a miss on a scanned header means "no line
//!    yet", with no read. Header reads run under the engine's `cold`
//!    mutex, so a process's next batch finds the previous one's reads in
//!    Redis instead of reading again.
//! 4. **The family's records** ([`LineFamily::before_write`]): what the
//!    line stands for, written before it (a subscription's licence).
//! 5. **New invoices**: in arrays of at most [`ARRAY_MAX`] headers, each
//!    with its link and its first [`LINES_PER_REQUEST`] lines inline,
//!    under its create lock and known absent, marked `creating` before
//!    the POST; an invoice another worker is busy with, unsure, or in an
//!    array HaloPSA refused goes one by one
//!    (`halo::lines::find_or_create_answered`; a refused header with lines
//!    is created alone, and its lines go the usual way, which isolates a
//!    refused line). An invoice found rather than created has its lines
//!    looked for as in step 3. [`LineFamily::created`] hears of the new
//!    invoices.
//! 6. **Writes**: updates in `updatelines` arrays, adds in add arrays
//!    (`halo::lines::update` / `add`: ≤ 100 lines per request, a refused
//!    array split until the refused line is alone, a failed add read back
//!    before anything is sent again). A *pending* cache entry is written
//!    before an add, so a worker killed between the POST and the cache
//!    write leaves it, and the replay reads the header instead of adding a
//!    second line. A refused *cached* line id (deleted by the MSP, or
//!    another instance's id) drops the cache and is retried from the
//!    header; a refused add on an invoice the MSP deleted is retried onto
//!    the invoice found or created again; any other refusal is `rejected`.
//! 7. **Cache** of what is now on the lines, one round trip; the written
//!    events settled by [`LineFamily::written`] (`Applied`, once the
//!    family's own state is written).
//!
//! Steady state (Redis warm): no GET, one request per 100 changed lines.

use std::collections::{BTreeMap, HashSet};

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::{Mutex, MutexGuard};

use crate::config::Config;
use crate::contract::{Event, Family, Version};
use crate::error::{Failure, FailureClass};
use crate::halo::lines::{self as halo_lines, HeaderSpec, Invoice, LINES_PER_REQUEST};
use crate::halo::links::{self, Kind};
use crate::halo::models::{body, InvoiceDetail, InvoiceHeader};
use crate::halo::{record_id, HaloClient};
use crate::runtime::{Batch, Handler, Open, Outcome, Results, Services};
use crate::store::{OverageLine, StateError, Store, SubscriptionLine, UsageLine};

use super::identity::ARRAY_MAX;

/// The applied state a line carries in `halo::lines::VERSION_FIELD`
/// (written in the same request as the line), and the ordering rule of
/// the family's events.
pub trait LineState: Clone + Send + Sync + 'static {
    fn encode(&self) -> String;
    fn decode(text: &str) -> Option<Self>;
    /// An event with state `self` changes nothing once `applied` is on
    /// the line.
    fn is_superseded_by(&self, applied: &Self) -> bool;
}

/// The contract's rule (sequence, else occurred_at; a repair included).
impl LineState for Version {
    fn encode(&self) -> String {
        Version::encode(self)
    }
    fn decode(text: &str) -> Option<Version> {
        Version::decode(text)
    }
    fn is_superseded_by(&self, applied: &Version) -> bool {
        Version::is_superseded_by(self, applied)
    }
}

/// Where a family's line ids and applied states are cached (typed caches
/// of `store`, whose key names stay what they were).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineCache {
    /// `Store::usage_lines`, with `Store::usage_scanned` marks per invoice.
    Usage,
    /// `Store::overage_lines`.
    Overage,
    /// `Store::subscription_lines`.
    Subscription,
}

impl LineCache {
    /// Whether a header read caches all of its lines of the family and is
    /// marked scanned (a miss on it then means "no line yet").
    pub fn scans(self) -> bool {
        self == LineCache::Usage
    }
}

/// A cached line, whatever the cache: `line` is `None` while an add is
/// pending (the line may exist, its id unknown: the header is read).
#[derive(Clone, Debug, PartialEq)]
struct Cached {
    ihid: i64,
    line: Option<i64>,
    applied: String,
}

impl From<UsageLine> for Cached {
    fn from(u: UsageLine) -> Cached {
        Cached {
            ihid: u.ihid,
            line: (!u.pending).then_some(u.line),
            applied: u.applied,
        }
    }
}

impl From<OverageLine> for Cached {
    fn from(o: OverageLine) -> Cached {
        Cached {
            ihid: o.ihid,
            line: o.line,
            applied: o.version,
        }
    }
}

impl From<SubscriptionLine> for Cached {
    fn from(s: SubscriptionLine) -> Cached {
        Cached {
            ihid: s.ihid,
            line: (!s.pending).then_some(s.line),
            applied: s.applied,
        }
    }
}

impl From<&Cached> for SubscriptionLine {
    fn from(c: &Cached) -> SubscriptionLine {
        SubscriptionLine {
            ihid: c.ihid,
            line: c.line.unwrap_or_default(),
            applied: c.applied.clone(),
            pending: c.line.is_none(),
        }
    }
}

impl From<&Cached> for UsageLine {
    fn from(c: &Cached) -> UsageLine {
        UsageLine {
            ihid: c.ihid,
            line: c.line.unwrap_or_default(),
            applied: c.applied.clone(),
            pending: c.line.is_none(),
        }
    }
}

impl From<&Cached> for OverageLine {
    fn from(c: &Cached) -> OverageLine {
        OverageLine {
            ihid: c.ihid,
            line: c.line,
            version: c.applied.clone(),
        }
    }
}

/// The typed caches of one connection, as the engine uses them.
struct CacheOf<'a> {
    store: &'a Store,
    conn: &'a str,
    kind: LineCache,
}

impl CacheOf<'_> {
    async fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Cached>>, StateError> {
        Ok(match self.kind {
            LineCache::Usage => self
                .store
                .usage_lines(self.conn)
                .get_many(keys)
                .await?
                .into_iter()
                .map(|c| c.map(Cached::from))
                .collect(),
            LineCache::Overage => self
                .store
                .overage_lines(self.conn)
                .get_many(keys)
                .await?
                .into_iter()
                .map(|c| c.map(Cached::from))
                .collect(),
            LineCache::Subscription => self
                .store
                .subscription_lines(self.conn)
                .get_many(keys)
                .await?
                .into_iter()
                .map(|c| c.map(Cached::from))
                .collect(),
        })
    }

    async fn set_many(&self, entries: &[(&str, Cached)]) -> Result<(), StateError> {
        match self.kind {
            LineCache::Usage => {
                let e: Vec<(&str, UsageLine)> =
                    entries.iter().map(|(k, c)| (*k, c.into())).collect();
                self.store.usage_lines(self.conn).set_many(&e).await
            }
            LineCache::Overage => {
                let e: Vec<(&str, OverageLine)> =
                    entries.iter().map(|(k, c)| (*k, c.into())).collect();
                self.store.overage_lines(self.conn).set_many(&e).await
            }
            LineCache::Subscription => {
                let e: Vec<(&str, SubscriptionLine)> =
                    entries.iter().map(|(k, c)| (*k, c.into())).collect();
                self.store.subscription_lines(self.conn).set_many(&e).await
            }
        }
    }

    /// Drops a key's entry and, for a scanning cache, the scanned mark of
    /// `ihid` (so that the invoice is read again).
    async fn forget(&self, key: &str, ihid: Option<i64>) -> Result<(), StateError> {
        match self.kind {
            LineCache::Usage => {
                let lines = self.store.usage_lines(self.conn);
                lines.forget_with_scan(key, ihid).await
            }
            LineCache::Overage => self.store.overage_lines(self.conn).forget(key).await,
            LineCache::Subscription => self.store.subscription_lines(self.conn).forget(key).await,
        }
    }

    /// After reading header `ihid`: its lines (key, line, applied), cached
    /// where a key has no entry, and the header marked scanned.
    async fn remember_scanned(
        &self,
        ihid: i64,
        found: &[(&str, Cached)],
    ) -> Result<(), StateError> {
        if self.kind != LineCache::Usage {
            return Ok(());
        }
        let e: Vec<(&str, UsageLine)> = found.iter().map(|(k, c)| (*k, c.into())).collect();
        self.store
            .usage_lines(self.conn)
            .remember_scanned(ihid, &e)
            .await
    }

    /// Which of `ihids` were scanned (all `false` for a cache that does
    /// not scan).
    async fn scanned(&self, ihids: &[i64]) -> Result<Vec<bool>, StateError> {
        match self.kind {
            LineCache::Usage => self.store.usage_scanned(self.conn).marked(ihids).await,
            LineCache::Overage | LineCache::Subscription => Ok(vec![false; ihids.len()]),
        }
    }
}

/// What a family's policy and the engine work with: the store, the
/// connection's client (fenced by the batch's locks) and the config.
pub struct Ctx<'a> {
    pub store: &'a Store,
    pub halo: &'a HaloClient,
    pub config: &'a Config,
}

impl Ctx<'_> {
    fn cache(&self, kind: LineCache) -> CacheOf<'_> {
        CacheOf {
            store: self.store,
            conn: &self.halo.connection().name,
            kind,
        }
    }
}

/// One batch's run: the context, and the process's `cold` mutex once a
/// step had to read HaloPSA (held until the writes).
pub struct Run<'a> {
    pub ctx: &'a Ctx<'a>,
    cold: &'a Mutex<()>,
    guard: Option<MutexGuard<'a, ()>>,
}

impl Run<'_> {
    /// Serialises this step's HaloPSA lookups with those of the process's
    /// other batches: call before reading what Redis did not have, then
    /// look in Redis again.
    pub async fn cold(&mut self) {
        if self.guard.is_none() {
            self.guard = Some(self.cold.lock().await);
        }
    }
}

/// A family's invoice lines: everything the engine needs to know of it.
#[async_trait]
pub trait LineFamily: Send + Sync + Sized + 'static {
    const FAMILY: Family;
    /// The family's event data.
    type Data: DeserializeOwned + Send + Sync + 'static;
    /// What the family's policy resolves for an event before its line can
    /// be written (item, price, product name).
    type Target: Default + Send + Sync + 'static;
    /// The applied state on the line.
    type State: LineState;
    /// The kind of the line's marker: `<third_party_type>:<key>`.
    const LINE: &'static Kind;
    /// The kind of invoice, and the link that finds it.
    const INVOICE: (Invoice, &'static Kind);
    const CACHE: LineCache;

    /// The line's key: the aggregate (one line per key).
    fn key(data: &Self::Data) -> String;
    /// Checks no request can make good (`invalid`).
    fn validate(_data: &Self::Data) -> Result<(), Failure> {
        Ok(())
    }
    /// The event's applied state, once written.
    fn state(event: &Event<Self::Data>) -> Self::State;
    /// The billing id of the invoice the line goes on.
    fn invoice_id(data: &Self::Data) -> String;
    /// The invoice header saved when there is none (`customer`'s).
    fn invoice_record(data: &Self::Data, customer: i64) -> InvoiceHeader;
    /// The line: `at.line` `None` for an add, `at.ihid` `None` for a
    /// line sent inline with its new header.
    fn line(event: &Event<Self::Data>, target: &Self::Target, at: At) -> InvoiceDetail;

    /// The family's policy, per open event of the batch: its `customer`,
    /// its `target` and its `ihid` (`None`: the invoice is created with
    /// the line inline), or its settlement (a dependency, unmapped, ...).
    async fn prepare(&self, run: &mut Run<'_>, batch: &mut Batch<Line<Self>>);

    /// Once the lines of the events whose invoice is known are found and
    /// before any line or invoice is written: the family's own records the
    /// line stands for (a subscription's licence). The events to be
    /// written are the open ones not [`Line::is_written`] (an event found
    /// superseded on its line is, already); what it leaves open is written.
    async fn before_write(&self, _run: &mut Run<'_>, _batch: &mut Batch<Line<Self>>) {}

    /// The invoices this batch created (a family whose invoice another
    /// family's lines share tells that family it holds none of them yet).
    async fn created(&self, _ctx: &Ctx<'_>, _ihids: &[i64]) {}

    /// Settles the events whose line is written (and cached): the open
    /// ones, [`Line::is_written`]; those [`Line::is_superseded`] wrote
    /// nothing. The default settles them `Applied` or `Superseded`; a
    /// family that keeps more state (a licence's link) writes it first.
    async fn written(&self, _ctx: &Ctx<'_>, batch: &mut Batch<Line<Self>>) {
        for w in batch.open().filter(|w| w.written) {
            let outcome = if w.superseded {
                Outcome::Superseded
            } else {
                Outcome::Applied
            };
            w.settle(Ok(outcome));
        }
    }

    /// Whether the line's cache entry may carry the event's state once
    /// written (the default): a family whose own state is written after
    /// the line ([`LineFamily::written`]) says no until it is, so that a
    /// retry after a crash in between is not superseded by the cache.
    fn caches_state(_line: &Line<Self>) -> bool {
        true
    }

    /// The line's marker.
    fn marker(data: &Self::Data) -> String {
        links::marker(Self::LINE, &Self::key(data))
    }
}

/// Where a line body goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct At {
    pub ihid: Option<i64>,
    pub line: Option<i64>,
}

/// One event on its way through the engine.
pub struct Line<F: LineFamily> {
    pub event: Event<F::Data>,
    /// Set by [`LineFamily::prepare`].
    pub target: F::Target,
    /// The customer (set by [`LineFamily::prepare`]).
    pub customer: i64,
    /// The invoice (set by [`LineFamily::prepare`]); `None` until created.
    pub ihid: Option<i64>,
    key: String,
    marker: String,
    state: F::State,
    cached: Option<Cached>,
    line: Option<i64>,
    /// `line` came from the cache, not from reading the header.
    from_cache: bool,
    /// Where the line is, or that there is none yet, is settled: the cache
    /// or the header told, or the header is new.
    looked: bool,
    /// The line is written (and cached): only the family's
    /// [`LineFamily::written`] is left.
    written: bool,
    /// The line was found carrying this event's state or a newer one:
    /// nothing to write; [`LineFamily::written`] settles it `Superseded`.
    superseded: bool,
}

impl<F: LineFamily> Line<F> {
    fn of(event: Event<F::Data>) -> Result<Line<F>, Failure> {
        F::validate(&event.data)?;
        Ok(Line {
            key: F::key(&event.data),
            marker: F::marker(&event.data),
            state: F::state(&event),
            event,
            target: F::Target::default(),
            customer: 0,
            ihid: None,
            cached: None,
            line: None,
            from_cache: false,
            looked: false,
            written: false,
            superseded: false,
        })
    }

    /// The line's key (the aggregate).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Whether the line is written (or found holding this event's state
    /// or a newer one): only [`LineFamily::written`] is left.
    pub fn is_written(&self) -> bool {
        self.written
    }

    /// Whether the line was found holding this event's state or a newer
    /// one (nothing was written): the event is `Superseded`.
    pub fn is_superseded(&self) -> bool {
        self.superseded
    }

    /// The line's marker ([`LineFamily::marker`]).
    pub fn marker(&self) -> &str {
        &self.marker
    }

    /// The event's state, as the line carries it once written.
    pub fn state(&self) -> &F::State {
        &self.state
    }

    /// The invoice holds no line of this event's key yet, whatever the
    /// cache says (its record was created by this very attempt, and lines
    /// are written after it): the line is added without reading the header.
    pub fn no_line_yet(&mut self) {
        self.line = None;
        self.cached = None;
        self.looked = true;
    }

    fn body(&self, at: At) -> Result<Value, Failure> {
        body(&F::line(&self.event, &self.target, at))
    }

    fn cache_entry(&self, ihid: i64, line: Option<i64>) -> Cached {
        Cached {
            ihid,
            line,
            // A pending entry (no line id) records an intent, not a state:
            // the add may never have been sent (a lost lock, a failure
            // before the POST), so it must never make its own retry look
            // superseded. Only a known line carries the applied state.
            applied: if line.is_some() && F::caches_state(self) {
                self.state.encode()
            } else {
                String::new()
            },
        }
    }
}

/// The header spec of an event's invoice.
fn spec_of<'a, F: LineFamily>(
    ctx: &Ctx<'_>,
    data: &F::Data,
    billing_id: &'a str,
    customer: i64,
) -> HeaderSpec<'a> {
    let (invoice, kind) = F::INVOICE;
    HeaderSpec {
        invoice,
        kind,
        billing_id,
        record: F::invoice_record(data, customer),
        lock_ttl: ctx.config.worker.lock_ttl,
        lock_wait: ctx.config.worker.lock_wait,
    }
}

/// The engine: the runtime's [`Handler`] for family `F`.
pub struct Lines<F> {
    family: F,
    /// Serialises the HaloPSA lookups of this process's concurrent
    /// batches (the runtime writes one batch while the next fills).
    cold: Mutex<()>,
}

impl<F: LineFamily> Lines<F> {
    pub fn new(family: F) -> Lines<F> {
        Lines {
            family,
            cold: Mutex::new(()),
        }
    }

    /// Applies one batch of one connection (see the module doc).
    pub async fn apply(&self, ctx: &Ctx<'_>, events: Batch<Event<F::Data>>) -> Results {
        let mut batch = events.map(Line::<F>::of);
        let mut run = Run {
            ctx,
            cold: &self.cold,
            guard: None,
        };
        superseded_in_cache(ctx, &mut batch).await;
        self.family.prepare(&mut run, &mut batch).await;
        locate(&mut run, &mut batch).await;
        self.family.before_write(&mut run, &mut batch).await;
        let created = create_invoices(ctx, &mut batch).await;
        if !created.is_empty() {
            self.family.created(ctx, &created).await;
        }
        // Invoices found rather than created (another worker's): their
        // lines are looked for like the others'.
        locate(&mut run, &mut batch).await;
        drop(run);
        write(ctx, &mut batch).await;
        self.family.written(ctx, &mut batch).await;
        batch.finish()
    }

    /// Before a repair: the event's cached line and, for a scanning cache,
    /// its invoice's scanned mark go, so that the header is read.
    pub async fn forget_cached(
        &self,
        ctx: &Ctx<'_>,
        event: &Event<F::Data>,
    ) -> Result<(), Failure> {
        let conn = &ctx.halo.connection().name;
        let ihid = if F::CACHE.scans() {
            let (_, kind) = F::INVOICE;
            let invoice = F::invoice_id(&event.data);
            ctx.store
                .mapping(conn, kind.name, &invoice)
                .await?
                .map(|m| m.halo_id)
        } else {
            None
        };
        ctx.cache(F::CACHE)
            .forget(&F::key(&event.data), ihid)
            .await?;
        Ok(())
    }
}

impl<F: LineFamily + Default> Default for Lines<F> {
    fn default() -> Lines<F> {
        Lines::new(F::default())
    }
}

#[async_trait]
impl<F: LineFamily> Handler for Lines<F> {
    const FAMILY: Family = F::FAMILY;
    type Data = F::Data;

    fn aggregate(data: &F::Data) -> String {
        F::key(data)
    }

    async fn forget_cached(
        &self,
        svc: &Services,
        halo: &HaloClient,
        event: &Event<F::Data>,
    ) -> Result<(), Failure> {
        let config = svc.config();
        let ctx = Ctx {
            store: &svc.store,
            halo,
            config: &config,
        };
        Lines::forget_cached(self, &ctx, event).await
    }

    async fn apply_batch(
        &self,
        svc: &Services,
        halo: &HaloClient,
        events: Batch<Event<F::Data>>,
    ) -> Results {
        let config = svc.config();
        let ctx = Ctx {
            store: &svc.store,
            halo,
            config: &config,
        };
        self.apply(&ctx, events).await
    }
}

/// Step 1: the cached entries; an event not newer than its aggregate's
/// cached state (whatever invoice it went to) is superseded.
async fn superseded_in_cache<F: LineFamily>(ctx: &Ctx<'_>, batch: &mut Batch<Line<F>>) {
    let open: Vec<Open<'_, Line<F>>> = batch.open().collect();
    if open.is_empty() {
        return;
    }
    let keys: Vec<&str> = open.iter().map(|w| w.key.as_str()).collect();
    let cached = ctx.cache(F::CACHE).get_many(&keys).await;
    drop(keys);
    let cached = match cached {
        Ok(c) => c,
        Err(e) => {
            let f: Failure = e.into();
            for w in open {
                w.settle(Err(f.clone()));
            }
            return;
        }
    };
    for (mut w, hit) in open.into_iter().zip(cached) {
        // A pending entry's state was never confirmed (see `cache_entry`).
        let applied = hit
            .as_ref()
            .filter(|c| c.line.is_some())
            .and_then(|c| F::State::decode(&c.applied));
        if applied.is_some_and(|a| w.state.is_superseded_by(&a)) {
            w.settle(Ok(Outcome::Superseded));
            continue;
        }
        w.cached = hit;
    }
}

/// The open events whose line is still to be written.
fn unwritten<'b, F: LineFamily>(
    batch: &'b mut Batch<Line<F>>,
) -> impl Iterator<Item = Open<'b, Line<F>>> {
    batch.open().filter(|w| !w.written)
}

/// Step 4 for the events whose invoice is known and whose line is not
/// located yet: the cache, then (under `cold`) the headers.
async fn locate<F: LineFamily>(run: &mut Run<'_>, batch: &mut Batch<Line<F>>) {
    if find_lines(run.ctx, batch, false).await {
        run.cold().await;
        find_lines(run.ctx, batch, true).await;
    }
}

/// Step 3: the invoices `prepare` found none of, created with their first
/// lines inline: in arrays of at most [`ARRAY_MAX`] headers (each under its
/// create lock, known absent, marked `creating` before the POST), else
/// one by one ([`create_invoice`]: an invoice another worker is busy
/// with, or unsure, or whose array HaloPSA refused). The inline lines'
/// events are written; the others go on with the invoice's id. Returns the
/// ids of the invoices created.
async fn create_invoices<F: LineFamily>(ctx: &Ctx<'_>, batch: &mut Batch<Line<F>>) -> Vec<i64> {
    let mut by_invoice: BTreeMap<String, Vec<Open<'_, Line<F>>>> = BTreeMap::new();
    for w in unwritten(batch).filter(|w| w.ihid.is_none()) {
        by_invoice
            .entry(F::invoice_id(&w.event.data))
            .or_default()
            .push(w);
    }
    if by_invoice.is_empty() {
        return Vec::new();
    }
    let (_, kind) = F::INVOICE;
    let ids: Vec<String> = by_invoice.keys().cloned().collect();
    let locks = lock_absent(ctx, kind, &ids).await;
    let mut created = Vec::new();
    let mut arrays: Vec<(String, Vec<Open<'_, Line<F>>>)> = Vec::new();
    let mut single: Vec<(String, Vec<Open<'_, Line<F>>>)> = Vec::new();
    for (billing_id, members) in by_invoice {
        if locks.iter().any(|(id, _)| *id == billing_id) {
            arrays.push((billing_id, members));
        } else {
            single.push((billing_id, members));
        }
    }
    while !arrays.is_empty() {
        let chunk: Vec<_> = arrays.drain(..arrays.len().min(ARRAY_MAX)).collect();
        let (saved, left) = post_invoices(ctx, chunk).await;
        created.extend(saved);
        single.extend(left);
    }
    for (_, lock) in locks {
        if let Err(e) = lock.release().await {
            tracing::warn!(error = %e, "could not release an invoice lock; it expires on its own");
        }
    }
    for (billing_id, members) in single {
        if let Some(ihid) = create_invoice(ctx, &billing_id, members).await {
            created.push(ihid);
        }
    }
    created
}

/// The create locks of those of `ids` that are known absent (Redis holds
/// no mapping, no unsure or creating mark, and the kind was imported
/// since Redis started): taken without waiting long (another worker busy
/// with one leaves it to the one-by-one way, which waits), each with its
/// id.
async fn lock_absent(
    ctx: &Ctx<'_>,
    kind: &Kind,
    ids: &[String],
) -> Vec<(String, crate::store::AggregateLock)> {
    let conn = &ctx.halo.connection().name;
    let ttl = ctx.config.worker.lock_ttl;
    let mut locks = Vec::new();
    for id in ids {
        let wait = std::time::Duration::from_millis(50);
        if let Ok(l) = ctx.store.lock(conn, &kind.create_lock(id), ttl, wait).await {
            locks.push((id.clone(), l));
        }
    }
    let held: Vec<String> = locks.iter().map(|(id, _)| id.clone()).collect();
    let absent: Vec<bool> = match ctx.store.known(conn, kind.name, &held).await {
        Ok(k) if k.imported => (0..held.len())
            .map(|n| k.mappings[n].is_none() && !k.unsure[n] && !k.creating[n])
            .collect(),
        _ => vec![false; held.len()],
    };
    let mut kept = Vec::new();
    for ((id, lock), absent) in locks.into_iter().zip(absent) {
        if absent {
            kept.push((id, lock));
        } else if let Err(e) = lock.release().await {
            tracing::warn!(error = %e, "could not release an invoice lock; it expires on its own");
        }
    }
    kept
}

/// One array of new invoices, each with its first lines inline and its
/// link. Returns the ids of those saved (their events placed: the inline
/// ones written, the others to be added), and the invoices left to the
/// one-by-one way (HaloPSA refused the array, or its answer does not line
/// up). A failed array otherwise fails its events together.
async fn post_invoices<'b, F: LineFamily>(
    ctx: &Ctx<'_>,
    chunk: Vec<(String, Vec<Open<'b, Line<F>>>)>,
) -> (Vec<i64>, Vec<(String, Vec<Open<'b, Line<F>>>)>) {
    let (invoice, kind) = F::INVOICE;
    let conn = &ctx.halo.connection().name;
    let ids: Vec<String> = chunk.iter().map(|(id, _)| id.clone()).collect();
    let window = ctx.config.worker.http_timeout;
    if let Err(e) = ctx.store.creating(conn, kind.name, &ids, window).await {
        let f: Failure = e.into();
        for w in chunk.into_iter().flat_map(|(_, m)| m) {
            w.settle(Err(f.clone()));
        }
        return (Vec::new(), Vec::new());
    }
    let bodies: Result<Vec<Value>, Failure> = chunk
        .iter()
        .map(|(billing_id, members)| body(&new_header::<F>(billing_id, members)))
        .collect();
    let saved = match bodies {
        Ok(bodies) => ctx.halo.post_each(invoice.base(), bodies).await,
        Err(_) => Err(None),
    };
    let rows = match saved {
        Ok(rows) => rows,
        // Not lined up (or a body the model cannot hold): the one-by-one
        // way finds what was saved through the links.
        Err(None) => return (Vec::new(), chunk),
        Err(Some(e)) => {
            let mut left = Vec::new();
            let mut failed = Vec::new();
            match halo_lines::after_array_failure(e, "invoice") {
                halo_lines::AfterArray::OneByOne => left = chunk,
                halo_lines::AfterArray::RetryTogether {
                    failure,
                    saved_nothing,
                } => {
                    for w in chunk.into_iter().flat_map(|(_, m)| m) {
                        w.settle(Err(failure.clone()));
                    }
                    if saved_nothing {
                        failed = ids;
                    }
                }
            }
            if !failed.is_empty() {
                let _ = ctx.store.not_created(conn, kind.name, &failed).await;
            }
            return (Vec::new(), left);
        }
    };
    let mut created = Vec::new();
    let mut mappings: Vec<(String, crate::store::Mapping)> = Vec::new();
    let mut left = Vec::new();
    for ((billing_id, members), row) in chunk.into_iter().zip(&rows) {
        let (Some(ihid), Some(link)) = (record_id(row), links::own_link(row, kind, &billing_id))
        else {
            // Saved without telling its id or link: found through the
            // link one by one.
            left.push((billing_id, members));
            continue;
        };
        tracing::info!(
            halo_id = ihid,
            billing_id,
            kind = kind.name,
            "created an invoice header with its first lines"
        );
        created.push(ihid);
        mappings.push((
            billing_id,
            crate::store::Mapping {
                halo_id: ihid,
                link_id: Some(link),
                version: None,
            },
        ));
        place_on_new_header(members, ihid, row, LINES_PER_REQUEST);
    }
    let pairs: Vec<(&str, &crate::store::Mapping)> =
        mappings.iter().map(|(a, m)| (a.as_str(), m)).collect();
    if let Err(e) = ctx.store.set_mappings(conn, kind.name, &pairs).await {
        tracing::warn!(error = %e, "could not remember the new invoices; they are looked up again");
    }
    (created, left)
}

/// The header of a new invoice of `billing_id` with the lines of its first
/// [`LINES_PER_REQUEST`] `members` inline and its link.
fn new_header<F: LineFamily>(billing_id: &str, members: &[Open<'_, Line<F>>]) -> InvoiceHeader {
    let (_, kind) = F::INVOICE;
    let no_line = At {
        ihid: None,
        line: None,
    };
    let customer = members.first().map_or(0, |w| w.customer);
    let data = members.first().map(|w| &w.event.data);
    let record = match data {
        Some(d) => F::invoice_record(d, customer),
        None => InvoiceHeader::default(),
    };
    InvoiceHeader {
        new_external_link: Some(links::new_plain_link(kind, billing_id)),
        lines: Some(
            members
                .iter()
                .take(LINES_PER_REQUEST)
                .map(|w| F::line(&w.event, &w.target, no_line))
                .collect(),
        ),
        ..record
    }
}

/// The events of a header this worker just created (`header` the answer,
/// the first `inlined` events' lines sent inside it): a line the answer
/// shows is written; one sent but not shown may be saved (its header is
/// read); the others have no line yet, to be added.
fn place_on_new_header<F: LineFamily>(
    members: Vec<Open<'_, Line<F>>>,
    ihid: i64,
    header: &Value,
    inlined: usize,
) {
    for (k, mut w) in members.into_iter().enumerate() {
        w.ihid = Some(ihid);
        w.no_line_yet();
        if let Some(&line) = halo_lines::ids_carrying(header, &w.marker).first() {
            w.line = Some(line);
            w.written = true;
        } else if k < inlined {
            w.looked = false;
        }
    }
}

async fn create_invoice<F: LineFamily>(
    ctx: &Ctx<'_>,
    billing_id: &str,
    mut members: Vec<Open<'_, Line<F>>>,
) -> Option<i64> {
    let first = members.first()?;
    let mut spec = spec_of::<F>(ctx, &first.event.data, billing_id, first.customer);
    let no_line = At {
        ihid: None,
        line: None,
    };
    let inline: Vec<InvoiceDetail> = members
        .iter()
        .take(LINES_PER_REQUEST)
        .map(|w| F::line(&w.event, &w.target, no_line))
        .collect();
    let mut inlined = inline.len();
    spec.record.lines = Some(inline);
    let created = match halo_lines::find_or_create_answered(ctx.store, ctx.halo, &spec).await {
        // One line may be what HaloPSA refuses (an element is saved whole
        // or not at all): the header alone, then the lines the usual way,
        // which isolates a refused line.
        Err(f) if f.class == FailureClass::Rejected => {
            tracing::info!(error = %f, "the invoice with its first lines was refused; creating it without lines");
            inlined = 0;
            spec.record.lines = Some(Vec::new());
            halo_lines::find_or_create_answered(ctx.store, ctx.halo, &spec).await
        }
        created => created,
    };
    let (ihid, answer) = match created {
        Ok(c) => c,
        Err(f) => {
            for w in members {
                w.settle(Err(f.clone()));
            }
            return None;
        }
    };
    for w in &mut members {
        w.ihid = Some(ihid);
        w.cached = None;
    }
    // Found, or another worker's create won: the lines go the usual way.
    let header = answer?;
    place_on_new_header(members, ihid, &header, inlined);
    Some(ihid)
}

/// Step 4: each open event's line on its invoice, from the cache, else
/// from the header (`read`). Returns whether a header must be read (only
/// when `read` is false).
async fn find_lines<F: LineFamily>(ctx: &Ctx<'_>, batch: &mut Batch<Line<F>>, read: bool) -> bool {
    let cache = ctx.cache(F::CACHE);
    let open: Vec<Open<'_, Line<F>>> = unwritten(batch)
        .filter(|w| w.line.is_none() && !w.looked && w.ihid.is_some())
        .collect();
    if open.is_empty() {
        return false;
    }
    // The second pass looks in Redis again: a batch that held `cold`
    // before may just have cached these lines.
    let hits: Vec<Option<Cached>> = if read {
        let keys: Vec<&str> = open.iter().map(|w| w.key.as_str()).collect();
        match cache.get_many(&keys).await {
            Ok(c) => c,
            Err(e) => {
                let f: Failure = e.into();
                for w in open {
                    w.settle(Err(f.clone()));
                }
                return false;
            }
        }
    } else {
        open.iter().map(|w| w.cached.clone()).collect()
    };
    let mut by_header: BTreeMap<i64, Vec<Open<'_, Line<F>>>> = BTreeMap::new();
    let mut pending: HashSet<i64> = HashSet::new();
    for (mut w, hit) in open.into_iter().zip(hits) {
        let Some(ihid) = w.ihid else {
            continue;
        };
        match hit.filter(|c| c.ihid == ihid) {
            Some(Cached {
                line: Some(l),
                applied,
                ..
            }) => {
                let applied = F::State::decode(&applied);
                if applied.is_some_and(|a| w.state.is_superseded_by(&a)) {
                    w.settle(Ok(Outcome::Superseded));
                    continue;
                }
                w.line = Some(l);
                w.from_cache = true;
                w.looked = true;
                continue;
            }
            Some(_) => {
                pending.insert(ihid);
            }
            None => {}
        }
        by_header.entry(ihid).or_default().push(w);
    }
    drop_scanned(&cache, &mut by_header, &pending).await;
    if !read {
        return !by_header.is_empty();
    }
    for (ihid, members) in by_header {
        read_lines(ctx, ihid, members).await;
    }
    false
}

/// A scanned header has every line of the family in the cache (or a
/// pending entry): a key missing there has no line yet, so its events
/// (left open, to be added) need no read.
async fn drop_scanned<F: LineFamily>(
    cache: &CacheOf<'_>,
    by_header: &mut BTreeMap<i64, Vec<Open<'_, Line<F>>>>,
    pending: &HashSet<i64>,
) {
    if !F::CACHE.scans() {
        return;
    }
    let ihids: Vec<i64> = by_header
        .keys()
        .copied()
        .filter(|h| !pending.contains(h))
        .collect();
    if ihids.is_empty() {
        return;
    }
    match cache.scanned(&ihids).await {
        Ok(scanned) => {
            for (h, seen) in ihids.iter().zip(scanned) {
                if !seen {
                    continue;
                }
                for mut w in by_header.remove(h).unwrap_or_default() {
                    w.looked = true;
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not read the scanned headers; reading them"),
    }
}

/// Reads header `ihid` (or the one found or created again in its place)
/// and places `members` on its lines.
async fn read_lines<F: LineFamily>(ctx: &Ctx<'_>, ihid: i64, members: Vec<Open<'_, Line<F>>>) {
    let Some(first) = members.first() else {
        return;
    };
    let billing_id = F::invoice_id(&first.event.data);
    let spec = spec_of::<F>(ctx, &first.event.data, &billing_id, first.customer);
    let h = match halo_lines::header(ctx.store, ctx.halo, &spec, ihid).await {
        Ok(h) => h,
        Err(f) => {
            for w in members {
                w.settle(Err(f.clone()));
            }
            return;
        }
    };
    let cache = ctx.cache(F::CACHE);
    remember_header::<F>(&cache, h.ihid, &h.body).await;
    let (invoice, _) = F::INVOICE;
    for mut w in members {
        // The invoice read, or the one found or created again when the
        // MSP deleted it.
        w.ihid = Some(h.ihid);
        w.cached = None;
        w.looked = true;
        let found = halo_lines::carrying(&h.body, &w.marker);
        let ids: Vec<i64> = found.iter().filter_map(|l| record_id(l)).collect();
        // Lines beside the lowest (added by hand, or by workers that
        // raced) are retired: the customer is billed once.
        if let Some((&kept, others)) = ids.split_first() {
            let retired =
                halo_lines::retire_duplicates(ctx.halo, invoice, h.ihid, kept, others, &w.marker);
            if let Err(f) = retired.await {
                w.settle(Err(f));
                continue;
            }
        }
        // No line yet: it stays open, to be added.
        let Some((line, on_line)) = found.first().and_then(|l| Some((record_id(l)?, *l))) else {
            continue;
        };
        w.line = Some(line);
        let text = halo_lines::version_text(on_line).unwrap_or_default();
        let applied = F::State::decode(text);
        if applied.is_some_and(|a| w.state.is_superseded_by(&a)) {
            let entry = Cached {
                ihid: h.ihid,
                line: Some(line),
                applied: text.to_string(),
            };
            match cache.set_many(&[(w.key.as_str(), entry)]).await {
                Ok(()) => {
                    w.written = true;
                    w.superseded = true;
                }
                Err(e) => w.settle(Err(e.into())),
            }
        }
    }
}

/// A scanning cache: every line of the family on a header just read is
/// cached (where its key has no entry: another worker holding that key's
/// lock may have just cached a newer state), the lowest id per marker, and
/// the header marked scanned.
async fn remember_header<F: LineFamily>(cache: &CacheOf<'_>, ihid: i64, header: &Value) {
    if !F::CACHE.scans() {
        return;
    }
    let prefix = format!("{}:", F::LINE.third_party_type);
    let mut seen = HashSet::new();
    let mut found: Vec<(&str, Cached)> = Vec::new();
    for (marker, line, body) in halo_lines::marked(header) {
        let Some(key) = marker.strip_prefix(&prefix) else {
            continue;
        };
        if !seen.insert(key) {
            continue;
        }
        let applied = halo_lines::version_text(body)
            .filter(|t| F::State::decode(t).is_some())
            .unwrap_or_default();
        let entry = Cached {
            ihid,
            line: Some(line),
            applied: applied.to_string(),
        };
        found.push((key, entry));
    }
    if let Err(e) = cache.remember_scanned(ihid, &found).await {
        tracing::warn!(error = %e, "could not cache the header's lines");
    }
}

/// An open event and what it is written with.
type Bodies<'a, F, K> = Vec<((Open<'a, Line<F>>, K), Value)>;

/// A written event: its invoice and its line (`None`: saved, its id not
/// known).
type Done<'a, F> = Vec<(Open<'a, Line<F>>, i64, Option<i64>)>;

/// Step 5 and 6: the writes, in arrays, then the cache, then the events
/// settled.
async fn write<F: LineFamily>(ctx: &Ctx<'_>, batch: &mut Batch<Line<F>>) {
    let mut updates: Bodies<'_, F, i64> = Vec::new();
    let mut adds: Bodies<'_, F, ()> = Vec::new();
    for w in unwritten(batch) {
        let Some(ihid) = w.ihid else {
            let f = Failure::transient("the line's invoice is not known (bug); retried");
            w.settle(Err(f));
            continue;
        };
        let at = At {
            ihid: Some(ihid),
            line: w.line,
        };
        match (w.body(at), w.line) {
            (Ok(b), Some(line)) => updates.push(((w, line), b)),
            (Ok(b), None) => adds.push(((w, ()), b)),
            (Err(f), _) => w.settle(Err(f)),
        }
    }
    let mut done: Done<'_, F> = Vec::new();
    send_updates(ctx, updates, &mut done).await;
    let adds = note_pending(ctx, adds).await;
    send_adds(ctx, adds, &mut done).await;
    for (mut w, ihid, line) in done {
        w.ihid = Some(ihid);
        w.line = line;
        w.written = true;
    }
    // What is now on the lines (these, and those saved inside their new
    // invoice), in one round trip. A line saved without its id known keeps
    // its pending entry: the next event reads the header.
    let written: Vec<Open<'_, Line<F>>> = batch
        .open()
        .filter(|w| w.written && !w.superseded)
        .collect();
    let lines: Vec<(&str, Cached)> = written
        .iter()
        .filter_map(|w| {
            let entry = w.cache_entry(w.ihid?, Some(w.line?));
            Some((w.key.as_str(), entry))
        })
        .collect();
    let cached = ctx.cache(F::CACHE).set_many(&lines).await;
    if let Err(e) = cached {
        // HaloPSA has the truth; the next event reads the header.
        tracing::warn!(error = %e, "could not cache the lines written");
    }
}

/// `updatelines` arrays; a refused *cached* line id drops the cache and
/// is retried from the header.
async fn send_updates<'a, F: LineFamily>(
    ctx: &Ctx<'_>,
    updates: Bodies<'a, F, i64>,
    done: &mut Done<'a, F>,
) {
    let (invoice, _) = F::INVOICE;
    let cache = ctx.cache(F::CACHE);
    for ((w, line), result) in halo_lines::update(ctx.halo, invoice, updates).await {
        let ihid = w.ihid.unwrap_or_default();
        match result {
            Ok(_) => done.push((w, ihid, Some(line))),
            Err(f) if f.class == FailureClass::Rejected && w.from_cache => {
                // A refused cached line (deleted by the MSP, or a stale
                // id) is found again, or put back, on the retry, which
                // reads the header; a refusal after that is final.
                if let Err(e) = cache.forget(&w.key, Some(ihid)).await {
                    tracing::warn!(error = %e, "could not drop a cached line");
                }
                w.settle(Err(halo_lines::cached_line_refused(line, ihid, &f)));
            }
            Err(f) => w.settle(Err(f)),
        }
    }
}

/// Intent first: a worker killed between the POST and the cache write
/// leaves a pending entry, so the replay reads the header (and finds the
/// line by its marker) instead of adding again. Returns the adds to send.
async fn note_pending<'a, F: LineFamily>(
    ctx: &Ctx<'_>,
    adds: Bodies<'a, F, ()>,
) -> Vec<(Open<'a, Line<F>>, Value)> {
    let adds: Vec<(Open<'a, Line<F>>, Value)> =
        adds.into_iter().map(|((w, ()), b)| (w, b)).collect();
    if adds.is_empty() {
        return adds;
    }
    let pending: Vec<(&str, Cached)> = adds
        .iter()
        .map(|(w, _)| {
            (
                w.key.as_str(),
                w.cache_entry(w.ihid.unwrap_or_default(), None),
            )
        })
        .collect();
    let noted = ctx.cache(F::CACHE).set_many(&pending).await;
    drop(pending);
    match noted {
        Ok(()) => adds,
        Err(e) => {
            let f: Failure = e.into();
            for (w, _) in adds {
                w.settle(Err(f.clone()));
            }
            Vec::new()
        }
    }
}

/// Add arrays (read back on failure by `halo::lines::add`); an add whose
/// id the answer did not give is found on its header, read once.
async fn send_adds<'a, F: LineFamily>(
    ctx: &Ctx<'_>,
    adds: Vec<(Open<'a, Line<F>>, Value)>,
    done: &mut Done<'a, F>,
) {
    let (invoice, _) = F::INVOICE;
    let mut reread: BTreeMap<i64, Option<Value>> = BTreeMap::new();
    for (w, result) in halo_lines::add(ctx.halo, invoice, adds).await {
        let ihid = w.ihid.unwrap_or_default();
        let saved = match result {
            Ok(saved) => saved,
            // A refusal because the MSP deleted the invoice: found or
            // created again, the event retried onto it. Any other failure
            // leaves the pending entry: the retry reads the header first.
            Err(f) => {
                let billing_id = F::invoice_id(&w.event.data);
                let spec = spec_of::<F>(ctx, &w.event.data, &billing_id, w.customer);
                let halo = ctx.halo;
                let f = halo_lines::refusal_unless_header_gone(ctx.store, halo, &spec, ihid, f);
                w.settle(Err(f.await));
                continue;
            }
        };
        let mut id = saved.as_ref().and_then(record_id);
        if id.is_none() {
            if let std::collections::btree_map::Entry::Vacant(e) = reread.entry(ihid) {
                e.insert(halo_lines::read_header(ctx.halo, invoice, ihid).await.ok());
            }
            let header = reread.get(&ihid).and_then(Option::as_ref);
            id = header.and_then(|h| halo_lines::ids_carrying(h, &w.marker).first().copied());
        }
        if let Some(line) = id {
            tracing::info!(line, marker = %w.marker, "added a line");
        }
        // Saved, its id unknown: the pending entry stays, so the next
        // event reads the header.
        done.push((w, ihid, id));
    }
}

#[cfg(test)]
#[path = "lines_tests.rs"]
mod tests;
