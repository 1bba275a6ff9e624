//! The subscription family: one Software Licence per subscription under
//! its account's customer (an identity record: the identity engine,
//! `halosync_shared::engine::identity`), and one line per subscription on
//! the customer's halosync recurring invoice (a [`LineFamily`] of the
//! invoice-lines engine, `halosync_shared::engine::lines`, which owns the
//! whole line protocol: cache, header found or created again, lines by
//! marker, arrays, duplicates, refusals). What is left here is the
//! family's data and policy:
//!
//! * **Key**: the subscription id; marker `halosync.subscription:<id>` on
//!   both the licence ([`links::LICENCE_MARKER_FIELD`]) and the line;
//!   applied state the event's [`Version`], carried by the line (written
//!   in the same request as the quantity) and cached with it in
//!   `Store::subscription_lines` (`LineCache::Subscription`).
//! * **Invoice**: the customer's halosync recurring invoice, by account;
//!   the engine creates it (in arrays, with its first lines inline) when
//!   Redis knows it absent, and tells the usage worker it holds no usage
//!   line yet ([`LineFamily::created`]).
//! * **Policy, before any line is read** ([`LineFamily::prepare`]): the
//!   money and quantity (`invalid`), the sku's item (`unmapped`, before any
//!   other request), the account's customer (`dependency` while it is not
//!   in HaloPSA, without a request), the licence's identity step (an event
//!   not newer than the version Redis or the link holds is `superseded`).
//! * **Once the lines are found, before any line is written**
//!   ([`LineFamily::before_write`]): a subscription that moved account
//!   leaves its old customer's invoice ([`crate::moves`]), then the
//!   licences are updated and created in arrays (what an array does not
//!   finish, one by one), so that a line never claims a licence HaloPSA
//!   does not hold.
//! * **Once the lines are written** ([`LineFamily::written`]): the version
//!   is remembered with the licence's mapping; a new licence's link (and
//!   one never written) carries it, in arrays.
//!
//! Steady state (Redis warm): two requests per batch of up to 100 known
//! subscriptions (the licence array, the `updatelines` array); new ones:
//! the licence array, one invoice array (or add array), one link array.

use std::collections::HashMap;

use async_trait::async_trait;
use halosync_shared::config::Policy;
use halosync_shared::contract::{Event, Family, Product, SubscriptionData, Version};
use halosync_shared::engine::identity::{superseded, Engine, Step};
use halosync_shared::engine::lines::{At, Ctx, Line, LineCache, LineFamily, Lines, Run};
use halosync_shared::halo::items;
use halosync_shared::halo::lines::{self, HeaderSpec, Invoice};
use halosync_shared::halo::links::{self, Kind, Known, CUSTOMER, RECURRING_INVOICE, SUBSCRIPTION};
use halosync_shared::halo::models::{InvoiceDetail, InvoiceHeader};
use halosync_shared::runtime::{Batch, Open, Outcome};
use halosync_shared::store::Mapping;
use halosync_shared::Failure;

use crate::mapping::{line_update, new_line, Licences, Terms};

/// The subscription worker's handler: the lines engine over
/// [`Subscriptions`].
pub type SubscriptionHandler = Lines<Subscriptions>;

/// The subscription family.
#[derive(Default)]
pub struct Subscriptions;

/// What the family resolves for an event before its line is written.
#[derive(Default)]
pub struct Target {
    /// Money, quantity, status, version (checked before any request).
    pub terms: Terms,
    /// The sku's HaloPSA item.
    pub item: i64,
    /// What the connection lets halosync overwrite.
    pub policy: Policy,
    /// The licence (`None`: to be created).
    pub licence: Option<Mapping>,
    /// The licence was created by this attempt.
    pub created: bool,
    /// The licence holds the event's state (written by this attempt).
    pub licensed: bool,
}

/// One subscription event on its way through the engine.
pub type Work = Line<Subscriptions>;

/// The identity engine of the licences on the context's connection.
fn licences<'a>(ctx: &Ctx<'a>) -> Engine<'a, Licences> {
    let window = ctx.config.worker.http_timeout;
    Engine::new(&Licences, ctx.store, ctx.halo, window)
}

#[async_trait]
impl LineFamily for Subscriptions {
    const FAMILY: Family = Family::Subscription;
    type Data = SubscriptionData;
    type Target = Target;
    type State = Version;
    const LINE: &'static Kind = &SUBSCRIPTION;
    const INVOICE: (Invoice, &'static Kind) = (Invoice::Recurring, &RECURRING_INVOICE);
    const CACHE: LineCache = LineCache::Subscription;

    fn key(data: &SubscriptionData) -> String {
        data.subscription_id.clone()
    }

    fn state(event: &Event<SubscriptionData>) -> Version {
        event.version.clone()
    }

    fn invoice_id(data: &SubscriptionData) -> String {
        data.account_id.clone()
    }

    fn invoice_record(data: &SubscriptionData, customer: i64) -> InvoiceHeader {
        lines::recurring_invoice_record(customer, &data.account_id)
    }

    fn line(event: &Event<SubscriptionData>, target: &Target, at: At) -> InvoiceDetail {
        let (data, terms, item) = (&event.data, &target.terms, target.item);
        let marker = Self::marker(data);
        match (at.ihid, at.line) {
            (Some(ihid), Some(line)) => {
                line_update(data, terms, ihid, line, item, &marker, target.policy)
            }
            (ihid, _) => new_line(data, terms, ihid, item, &marker),
        }
    }

    async fn prepare(&self, run: &mut Run<'_>, batch: &mut Batch<Work>) {
        let ctx = run.ctx;
        let policy = Policy::from(ctx.halo.connection());
        for mut w in batch.open() {
            match Terms::of(&w.event.data, &w.event.version) {
                Ok(terms) => {
                    w.target.terms = terms;
                    w.target.policy = policy;
                }
                Err(f) => w.settle(Err(f)),
            }
        }
        seed_products(ctx, batch).await;
        items_of(ctx, batch).await;
        customers(ctx, batch).await;
        invoices(ctx, batch).await;
        licence_steps(ctx, batch).await;
        invoices_of_known_licences(ctx, batch).await;
    }

    async fn before_write(&self, run: &mut Run<'_>, batch: &mut Batch<Work>) {
        crate::moves::leave_previous_invoices(run.ctx, batch).await;
        write_licences(run.ctx, batch).await;
    }

    /// A new invoice has no usage line: the usage worker need not read it
    /// (its `usage_scanned` mark). Only a shortcut: a failure is logged.
    async fn created(&self, ctx: &Ctx<'_>, ihids: &[i64]) {
        let conn = &ctx.halo.connection().name;
        if let Err(e) = ctx.store.usage_scanned(conn).mark(ihids, None).await {
            tracing::warn!(error = %e, "could not tell the usage worker that the new invoices hold no usage line");
        }
    }

    /// A licence created by this attempt has no link yet: its line's
    /// cache entry carries no state until the link is written.
    fn caches_state(w: &Work) -> bool {
        let linked = w
            .target
            .licence
            .as_ref()
            .is_some_and(|m| m.link_id.is_some());
        linked && !w.target.created
    }

    async fn written(&self, ctx: &Ctx<'_>, batch: &mut Batch<Work>) {
        let engine = licences(ctx);
        let (mut known, mut to_link) = (Vec::new(), Vec::new());
        for w in batch.open().filter(|w| w.is_written()) {
            if w.is_superseded() {
                continue;
            }
            match w.target.licence.clone() {
                None => {
                    let f = Failure::transient("a line was written without its licence (bug)");
                    w.settle(Err(f));
                }
                Some(m) if w.target.created || m.link_id.is_none() || m.version.is_none() => {
                    if w.target.created {
                        let subscription = &w.event.data.subscription_id;
                        tracing::info!(halo_id = m.halo_id, %subscription, "created the licence and its line");
                    }
                    to_link.push((w, m));
                }
                Some(m) => known.push((w, m)),
            }
        }
        // Versions on links in arrays; the version of a known licence
        // rides on its line (`mapping` module doc): Redis only.
        known.extend(engine.versions(to_link).await);
        engine.applied(known).await;
        // A new link the array's answer did not tell, and a licence found
        // without a link whose line holds this event's state already (a
        // retry after the line was written): one by one, which keeps one
        // link per licence, so that the licence is found again once Redis
        // is lost.
        for w in batch.open().filter(|w| w.is_written()) {
            let outcome = if w.is_superseded() {
                Outcome::Superseded
            } else {
                Outcome::Applied
            };
            let mut m = match w.target.licence.clone() {
                Some(m) if outcome == Outcome::Applied || m.link_id.is_none() => m,
                _ => {
                    w.settle(Ok(outcome));
                    continue;
                }
            };
            let (id, version) = (&w.event.data.subscription_id, &w.event.version);
            let r = engine.record_version(id, &mut m, version).await;
            w.settle(r.map(|()| outcome));
        }
    }
}

/// Seeds the cache the usage and overage workers read for a subscription's
/// product (`Store::subscription_products`), before any licence or link is
/// written: a usage event that finds a subscription's link finds its
/// product too. Only a shortcut: a failure is logged.
async fn seed_products(ctx: &Ctx<'_>, batch: &mut Batch<Work>) {
    let open: Vec<Open<'_, Work>> = batch.open().collect();
    let products: Vec<(&str, &Product)> = open
        .iter()
        .map(|w| (w.event.data.subscription_id.as_str(), &w.event.data.product))
        .collect();
    if products.is_empty() {
        return;
    }
    let conn = &ctx.halo.connection().name;
    let cache = ctx.store.subscription_products(conn);
    if let Err(e) = cache.set_many(&products).await {
        tracing::warn!(error = %e, "could not seed the subscriptions' products for the usage and overage workers");
    }
}

/// The HaloPSA item of each event's sku, once per sku: the connection's
/// `[items]`, else the mapping stored in HaloPSA (`halo::items`); an
/// unmapped sku is dead-lettered at once.
async fn items_of(ctx: &Ctx<'_>, batch: &mut Batch<Work>) {
    let conn = ctx.halo.connection();
    let mut known: HashMap<String, Result<i64, Failure>> = HashMap::new();
    for mut w in batch.open() {
        let sku = w.event.data.product.sku.clone();
        let item = match known.get(&sku) {
            Some(item) => item.clone(),
            None => {
                let item = match items::resolve(ctx.halo, ctx.store, conn, &sku).await {
                    Ok(Some(item)) => Ok(item),
                    Ok(None) => Err(items::unmapped(
                        conn,
                        &format!("sku {sku:?}"),
                        std::slice::from_ref(&sku),
                    )),
                    Err(f) => Err(f),
                };
                known.insert(sku, item.clone());
                item
            }
        };
        match item {
            Ok(item) => w.target.item = item,
            Err(f) => w.settle(Err(f)),
        }
    }
}

/// Settles every open event with `f`.
fn fail_all(batch: &mut Batch<Work>, f: &Failure) {
    for w in batch.open() {
        w.settle(Err(f.clone()));
    }
}

/// Each event's customer: Redis (one round trip, plus one bulk import per
/// Redis lifetime); not there yet, a `dependency` without a request
/// (retried until the account worker created it); unsure, asked of
/// HaloPSA.
async fn customers(ctx: &Ctx<'_>, batch: &mut Batch<Work>) {
    let accounts: Vec<String> = batch
        .open()
        .map(|w| w.event.data.account_id.clone())
        .collect();
    let known = match links::known_many(ctx.store, ctx.halo, &CUSTOMER, &accounts).await {
        Ok(k) => k,
        Err(f) => return fail_all(batch, &f),
    };
    let recheck = ctx.config.retry.dependency_recheck;
    for (mut w, known) in batch.open().zip(known) {
        let account = w.event.data.account_id.clone();
        let (store, halo) = (ctx.store, ctx.halo);
        let customer = links::customer_from(store, halo, &account, known, recheck).await;
        match customer {
            Ok(c) => w.customer = c.halo_id,
            Err(f) => w.settle(Err(f)),
        }
    }
}

/// Each event's recurring invoice, when Redis knows it; otherwise the
/// engine creates it (or finds it, when Redis is unsure).
async fn invoices(ctx: &Ctx<'_>, batch: &mut Batch<Work>) {
    let accounts: Vec<String> = batch
        .open()
        .map(|w| w.event.data.account_id.clone())
        .collect();
    let kind = &RECURRING_INVOICE;
    let known = match links::known_many(ctx.store, ctx.halo, kind, &accounts).await {
        Ok(k) => k,
        Err(f) => return fail_all(batch, &f),
    };
    for (mut w, known) in batch.open().zip(known) {
        if let Known::Mapped(m) = known {
            w.ihid = Some(m.halo_id);
        }
    }
}

/// A known licence whose invoice Redis does not know (lost, or being
/// created right now): the invoice is found (or created) here, once per
/// account, so that its line's version is read before the licence is
/// written. Otherwise an older event would write its licence first and
/// only then be found superseded on the line, leaving the licence behind
/// the line. New licences have no line to be superseded by: the engine
/// creates their invoices in arrays.
async fn invoices_of_known_licences(ctx: &Ctx<'_>, batch: &mut Batch<Work>) {
    let worker = &ctx.config.worker;
    let mut found: HashMap<String, Result<i64, Failure>> = HashMap::new();
    for mut w in batch.open() {
        if w.ihid.is_some() || w.target.licence.is_none() {
            continue;
        }
        let account = w.event.data.account_id.clone();
        let ihid = match found.get(&account) {
            Some(ihid) => ihid.clone(),
            None => {
                let (ttl, wait) = (worker.lock_ttl, worker.lock_wait);
                let spec = HeaderSpec::recurring(&account, w.customer, ttl, wait);
                let ihid = lines::find_or_create(ctx.store, ctx.halo, &spec).await;
                found.insert(account, ihid.clone());
                ihid
            }
        };
        match ihid {
            Ok(ihid) => w.ihid = Some(ihid),
            Err(f) => w.settle(Err(f)),
        }
    }
}

/// Each event's licence step (the identity engine): superseded ones are
/// settled, known ones carry their mapping, new ones (known absent) have
/// no line yet; what Redis is unsure of is asked of HaloPSA one by one.
async fn licence_steps(ctx: &Ctx<'_>, batch: &mut Batch<Work>) {
    let engine = licences(ctx);
    let open: Vec<Open<'_, Work>> = batch.open().collect();
    let steps = engine.steps(open.iter().map(|w| &**w)).await;
    let steps = match steps {
        Ok(s) => s,
        Err(f) => {
            for w in open {
                w.settle(Err(f.clone()));
            }
            return;
        }
    };
    for (mut w, step) in open.into_iter().zip(steps) {
        let found = match step {
            Step::Superseded => {
                w.settle(Ok(Outcome::Superseded));
                continue;
            }
            Step::Update(m) => Some(m),
            Step::Create => None,
            // Redis lost it, or another worker is creating it: its link,
            // else the customer's licences carrying the marker.
            Step::Ask | Step::Creating => match engine.find_one(&w).await {
                Ok(Some(m)) if superseded(&m, &w.event.version) => {
                    w.settle(Ok(Outcome::Superseded));
                    continue;
                }
                Ok(found) => found,
                Err(f) => {
                    w.settle(Err(f));
                    continue;
                }
            },
        };
        // A licence created by this attempt has no line yet (lines are
        // written after their licence): added without reading the header.
        if found.is_none() {
            w.no_line_yet();
        }
        w.target.licence = found;
    }
}

/// The licences of the events still open: known ones updated and new
/// ones created, in arrays; what an array did not finish (refused in
/// part, a value out of range, a create whose answer does not line up),
/// one by one.
async fn write_licences(ctx: &Ctx<'_>, batch: &mut Batch<Work>) {
    let engine = licences(ctx);
    let updates: Vec<(Open<'_, Work>, Mapping)> = batch
        .open()
        .filter(|w| !w.is_written())
        .filter_map(|w| w.target.licence.clone().map(|m| (w, m)))
        .collect();
    for (mut w, _) in engine.update(updates).await {
        w.target.licensed = true;
    }
    let creates: Vec<Open<'_, Work>> = batch
        .open()
        .filter(|w| !w.is_written() && w.target.licence.is_none())
        .collect();
    for (mut w, m) in engine.create(creates).await {
        w.target.licence = Some(m);
        w.target.created = true;
        w.target.licensed = true;
    }
    for mut w in batch
        .open()
        .filter(|w| !w.is_written() && !w.target.licensed)
    {
        let written = match w.target.licence.clone() {
            Some(m) => engine.update_one(&w, &m).await,
            None => create_one(ctx, &engine, &mut w).await,
        };
        match written {
            Ok(()) => w.target.licensed = true,
            Err(f) => w.settle(Err(f)),
        }
    }
}

/// Creates one licence, then makes sure it is the only one carrying the
/// marker ([`Engine::keep_lowest_carrying`]: two workers can both create
/// one when the aggregate lock was lost; the lowest id wins and the loser
/// deletes the licence it created moments before, the only DELETE of a
/// licence halosync ever makes; licences are otherwise made inactive).
async fn create_one(
    ctx: &Ctx<'_>,
    engine: &Engine<'_, Licences>,
    w: &mut Open<'_, Work>,
) -> Result<(), Failure> {
    let created = match engine.create_one(w).await? {
        Ok(created) => created,
        Err(e) if lines::gone(&e) => {
            // A customer that is gone from HaloPSA (while Redis still maps
            // the account to it) is a missing dependency, not a refusal of
            // the licence.
            let account = &w.event.data.account_id;
            let (store, halo) = (ctx.store, ctx.halo);
            if links::drop_if_stale(store, halo, &CUSTOMER, account, w.customer).await? {
                return Err(Failure::dependency(format!(
                    "customer {} of account {account} is gone from HaloPSA; retried until the account is applied again",
                    w.customer
                )));
            }
            return Err(e.into());
        }
        Err(e) => return Err(e.into()),
    };
    let m = engine.keep_lowest_carrying(w, created).await?;
    w.target.licence = Some(m);
    w.target.created = true;
    Ok(())
}
