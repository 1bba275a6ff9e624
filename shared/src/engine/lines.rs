//! **The invoice-lines engine**: one line per aggregate on an invoice
//! header, written idempotently in arrays, for every family that bills
//! lines (usage lines on the recurring invoice, overage charges on one-off
//! invoices). A family is a [`LineFamily`]: its typed data, its line key,
//! which invoice, pure functions event → [`InvoiceDetail`] /
//! [`InvoiceHeader`], and its policy ([`LineFamily::prepare`]: customer,
//! item, price, whether the invoice may be created). [`Lines`] is the
//! runtime's [`Handler`] for any family.
//!
//! # One batch (the events of one connection, newest per aggregate, locked)
//!
//! 1. **Cache** (`store`: [`LineCache`]): an event not newer than the
//!    applied state cached for its aggregate is `Superseded`, before any
//!    request.
//! 2. **Family policy** ([`LineFamily::prepare`]): each event's customer,
//!    its [`LineFamily::Target`] (item, price, ...) and its invoice: an id,
//!    or none yet (`Line::ihid` = `None`).
//! 3. **New invoices**: one per invoice billing id, created once
//!    (`halo::lines::find_or_create_answered`) with its first
//!    [`LINES_PER_REQUEST`] lines inline (one `POST`); refused, the header
//!    alone, and the lines the usual way (which isolates a refused line).
//! 4. **Lines by marker**: a cached line id of the same invoice is used
//!    as it is; else the header is read once per invoice per batch
//!    (`halo::lines::header`: found or created again when the MSP deleted
//!    it), the line found by its marker, an event not newer than the state
//!    on the line `Superseded`, lines beside the lowest one carrying the
//!    marker retired. A family whose cache [`LineCache::scans`] caches
//!    every line of a header read and marks it scanned: a miss on a
//!    scanned header means "no line yet", with no read. Header reads run
//!    under the engine's `cold` mutex, so a process's next batch finds the
//!    previous one's reads in Redis instead of reading again.
//! 5. **Writes**: updates in `updatelines` arrays, adds in add arrays
//!    (`halo::lines::update` / `add`: ≤ 100 lines per request, a refused
//!    array split until the refused line is alone, a failed add read back
//!    before anything is sent again). A *pending* cache entry is written
//!    before an add, so a worker killed between the POST and the cache
//!    write leaves it, and the replay reads the header instead of adding a
//!    second line. A refused *cached* line id (deleted by the MSP, or
//!    another instance's id) drops the cache and is retried from the
//!    header; a refused add on an invoice the MSP deleted is retried onto
//!    the invoice found or created again; any other refusal is `rejected`.
//! 6. **Cache** of what is now on the lines, one round trip; each written
//!    event `Applied`.
//!
//! Steady state (Redis warm): no GET, one request per 100 changed lines.
//!
//! # A third family
//!
//! The subscription worker's recurring line could be one: `Data` =
//! `SubscriptionData`, [`LineFamily::LINE`] = `links::SUBSCRIPTION` (the
//! marker `halosync.subscription:<id>`), [`LineFamily::INVOICE`] =
//! `Invoice::Recurring` of `links::RECURRING_INVOICE` by account (the
//! header the usage family waits for: its `prepare` would create it, i.e.
//! leave `ihid` `None`), `State` = `Version`, a [`LineCache`] variant over
//! `Store::subscription_lines`, and `line` its `mapping` body; its licence
//! (an identity record) stays with the identity engine.

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
use crate::store::{OverageLine, StateError, Store, UsageLine};

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
            LineCache::Overage => Ok(vec![false; ihids.len()]),
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
        })
    }

    /// The line's key (the aggregate).
    pub fn key(&self) -> &str {
        &self.key
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
            applied: if line.is_some() {
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
        create_invoices(ctx, &mut batch).await;
        if find_lines(ctx, &mut batch, false).await {
            run.cold().await;
            find_lines(ctx, &mut batch, true).await;
        }
        drop(run);
        write(ctx, &mut batch).await;
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

/// Step 3: the invoices `prepare` found none of, each created once with
/// its first lines inline; those events are settled, the others go on
/// with the invoice's id.
async fn create_invoices<F: LineFamily>(ctx: &Ctx<'_>, batch: &mut Batch<Line<F>>) {
    let mut by_invoice: BTreeMap<String, Vec<Open<'_, Line<F>>>> = BTreeMap::new();
    for w in batch.open().filter(|w| w.ihid.is_none()) {
        by_invoice
            .entry(F::invoice_id(&w.event.data))
            .or_default()
            .push(w);
    }
    for (billing_id, members) in by_invoice {
        create_invoice(ctx, &billing_id, members).await;
    }
}

async fn create_invoice<F: LineFamily>(
    ctx: &Ctx<'_>,
    billing_id: &str,
    mut members: Vec<Open<'_, Line<F>>>,
) {
    let Some(first) = members.first() else {
        return;
    };
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
            return;
        }
    };
    for w in &mut members {
        w.ihid = Some(ihid);
        w.cached = None;
    }
    // Found, or another worker's create won: the lines go the usual way.
    let Some(header) = answer else {
        return;
    };
    let rest = members.split_off(members.len().min(inlined));
    drop(rest);
    let cache = ctx.cache(F::CACHE);
    for w in members {
        // Saved with the header (one element is saved whole). Without the
        // line's id in the answer, no entry: the next event reads the
        // header.
        let line = halo_lines::ids_carrying(&header, &w.marker)
            .first()
            .copied();
        let r = match line {
            Some(l) => {
                cache
                    .set_many(&[(w.key.as_str(), w.cache_entry(ihid, Some(l)))])
                    .await
            }
            None => cache.forget(&w.key, Some(ihid)).await,
        };
        w.settle(r.map(|_| Outcome::Applied).map_err(Failure::from));
    }
}

/// Step 4: each open event's line on its invoice, from the cache, else
/// from the header (`read`). Returns whether a header must be read (only
/// when `read` is false).
async fn find_lines<F: LineFamily>(ctx: &Ctx<'_>, batch: &mut Batch<Line<F>>, read: bool) -> bool {
    let cache = ctx.cache(F::CACHE);
    let open: Vec<Open<'_, Line<F>>> = batch.open().filter(|w| w.line.is_none()).collect();
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
                continue;
            }
            Some(_) => {
                pending.insert(ihid);
            }
            None => {}
        }
        by_header.entry(ihid).or_default().push(w);
    }
    drop_scanned::<F, _>(&cache, &mut by_header, &pending).await;
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
async fn drop_scanned<F: LineFamily, V>(
    cache: &CacheOf<'_>,
    by_header: &mut BTreeMap<i64, V>,
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
                if seen {
                    by_header.remove(h);
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
            let r = cache.set_many(&[(w.key.as_str(), entry)]).await;
            w.settle(r.map(|_| Outcome::Superseded).map_err(Failure::from));
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

/// A written event: its invoice and its line.
type Done<'a, F> = Vec<(Open<'a, Line<F>>, i64, i64)>;

/// Step 5 and 6: the writes, in arrays, then the cache, then the events
/// settled.
async fn write<F: LineFamily>(ctx: &Ctx<'_>, batch: &mut Batch<Line<F>>) {
    let mut updates: Bodies<'_, F, i64> = Vec::new();
    let mut adds: Bodies<'_, F, ()> = Vec::new();
    for w in batch.open() {
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
    // What is now on the lines, in one round trip.
    let lines: Vec<(&str, Cached)> = done
        .iter()
        .map(|(w, ihid, line)| (w.key.as_str(), w.cache_entry(*ihid, Some(*line))))
        .collect();
    let cached = ctx.cache(F::CACHE).set_many(&lines).await;
    drop(lines);
    if let Err(e) = cached {
        // HaloPSA has the truth; the next event reads the header.
        tracing::warn!(error = %e, "could not cache the lines written");
    }
    for (w, _, _) in done {
        w.settle(Ok(Outcome::Applied));
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
            Ok(_) => done.push((w, ihid, line)),
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
        match id {
            Some(line) => {
                tracing::info!(line, marker = %w.marker, "added a line");
                done.push((w, ihid, line));
            }
            // Saved, its id unknown: the pending entry stays, so the next
            // event reads the header.
            None => w.settle(Ok(Outcome::Applied)),
        }
    }
}

#[cfg(test)]
#[path = "lines_tests.rs"]
mod tests;
