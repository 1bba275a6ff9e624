//! The overage worker's [`Handler`]: one charge per (subscription, metric,
//! period), as a line on the customer's one-off invoice of that period.
//!
//! The runtime hands over batches: it validates, parses each event's data
//! once, dedupes, keeps the newest event per aggregate
//! `"{subscription_id}:{metric}:{period_start}"`, holds those aggregates'
//! locks and settles every message from the result given here for it. A batch of one connection is applied as:
//!
//! 1. Per event, without HaloPSA requests in steady state: the item
//!    ([`item_for`]), the price, the customer (`links::require_customer`,
//!    missing → `dependency`), the invoice of (account, period)
//!    ([`invoice_for`], created once under the lock
//!    `overage_invoice:<account_id>:<period_start>`; a zero overage creates
//!    it too: its version must be kept in HaloPSA), and the line cached in Redis
//!    (`…:overage_line:<aggregate>` = `{ihid, line, version}`; an event not
//!    newer than the cached version is `Superseded` before any request).
//! 2. Per invoice: the events without a cache entry are looked up on one
//!    `GET /Invoice/{id}?includedetails=true` (marker in
//!    `item_internal_reference`, applied version in
//!    `item_external_reference`). An event not newer than the version on
//!    its line (or in the cache) is `Superseded`.
//!    A period without an invoice gets it created with the batch's lines
//!    of that period inline (one `POST /Invoice`: header, link, lines).
//! 3. Per invoice: the new lines in `POST /Invoice` arrays of
//!    `[{id, add_lines}]` (HaloPSA has no `/Invoice/Lines`), the
//!    updates in `POST /Invoice/updatelines` arrays, at most
//!    `LINES_PER_REQUEST` lines each (`halo::lines`). A 400/422 answer to an array of several lines is
//!    split in halves until the refused line is alone: it alone is
//!    dead-lettered (`rejected`, with HaloPSA's message); the others are
//!    applied. Any other failure of a request fails the events of that
//!    request only (transient ones are retried).
//! 4. Redis cache written after each successful write.
//!
//! Crash safety: every write sets absolute values and carries its own
//! version, so a worker killed anywhere leaves either no line (redelivery
//! adds it) or the line with the event's version (redelivery finds it by
//! its marker on the GET, sees the version and acks as superseded) —
//! nothing lost, nothing doubled.
//!
//! Steady state (Redis warm, lines known): one `updatelines` request per
//! invoice per batch, i.e. 1/N requests per event for a batch of N.
//!
//! Two lines carrying the same marker (added by hand, or by workers that
//! raced) are retired when the header is read: the lowest id is kept.

use std::collections::{BTreeMap, HashMap};

use async_trait::async_trait;
use halosync_shared::contract::{Event, Family, OverageData, Version};
use halosync_shared::halo::items;
use halosync_shared::halo::lines::{self, HeaderSpec, Invoice};
use halosync_shared::halo::links::{self, OVERAGE_INVOICE, SUBSCRIPTION};
use halosync_shared::halo::models::{body, InvoiceDetail, InvoiceHeader, LicenceList};
use halosync_shared::halo::{first_record, record_id, HaloClient};
use halosync_shared::runtime::{Batch, Handler, Open, Outcome, Results, Services};
use halosync_shared::store::OverageLine as Cached;
use halosync_shared::{Failure, FailureClass};
use serde_json::Value;

use crate::mapping;

pub struct OverageHandler;

#[async_trait]
impl Handler for OverageHandler {
    const FAMILY: Family = Family::Overage;
    type Data = OverageData;

    fn aggregate(data: &OverageData) -> String {
        mapping::aggregate(data)
    }

    /// A repair reads the one-off invoice again: the cached line goes.
    async fn forget_cached(
        &self,
        svc: &Services,
        halo: &HaloClient,
        event: &Event<OverageData>,
    ) -> Result<(), Failure> {
        forget(svc, halo, &event.data).await
    }

    async fn apply_batch(
        &self,
        svc: &Services,
        halo: &HaloClient,
        mut batch: Batch<Event<OverageData>>,
    ) -> Results {
        let mut invoices: HashMap<String, i64> = HashMap::new();
        let mut by_invoice: BTreeMap<i64, Vec<Plan<'_>>> = BTreeMap::new();
        // Events whose period has no invoice yet, by invoice billing id:
        // the invoice is created with their lines inline.
        let mut new_invoices: BTreeMap<String, Vec<Plan<'_>>> = BTreeMap::new();
        for open in batch.open() {
            let to = match target(svc, halo, &open, &mut invoices).await {
                Ok(Some(to)) => to,
                Ok(None) => {
                    open.settle(Ok(Outcome::Superseded));
                    continue;
                }
                Err(f) => {
                    open.settle(Err(f));
                    continue;
                }
            };
            let plan = Plan { open, to };
            if plan.to.ihid == NO_INVOICE {
                new_invoices
                    .entry(plan.to.invoice.clone())
                    .or_default()
                    .push(plan);
            } else {
                by_invoice.entry(plan.to.ihid).or_default().push(plan);
            }
        }
        for (_, plans) in new_invoices {
            for plan in create_invoice(svc, halo, plans, &mut invoices).await {
                by_invoice.entry(plan.to.ihid).or_default().push(plan);
            }
        }
        for (ihid, plans) in by_invoice {
            apply_invoice(svc, halo, ihid, plans).await;
        }
        batch.finish()
    }
}

/// `Target::ihid` of an event whose period has no invoice yet (HaloPSA's
/// invoice ids are positive).
const NO_INVOICE: i64 = 0;

/// Where and at what an event's charge is written.
struct Target {
    price: f64,
    item_id: i64,
    /// The invoice, or [`NO_INVOICE`] while the period has none.
    ihid: i64,
    /// The customer (for an invoice still to create).
    customer: i64,
    /// The billing id of the period's invoice (its link).
    invoice: String,
    cached: Option<Cached>,
}

/// One event ready to be written.
struct Plan<'a> {
    open: Open<'a, Event<OverageData>>,
    to: Target,
}

/// Step 1 of an event, without HaloPSA requests in steady state; `None`
/// when the cache shows it superseded.
async fn target(
    svc: &Services,
    halo: &HaloClient,
    event: &Event<OverageData>,
    invoices: &mut HashMap<String, i64>,
) -> Result<Option<Target>, Failure> {
    let (data, version) = (&event.data, &event.version);
    // The cache holds only applied versions (whatever invoice they went
    // to): an event not newer changes nothing, without any request.
    let cached = cached(svc, halo, data).await?;
    if let Some(c) = &cached {
        if Version::decode(&c.version).is_some_and(|applied| version.is_superseded_by(&applied)) {
            return Ok(None);
        }
    }
    let price = mapping::unit_price(data)?;
    let item_id = item_for(svc, halo, data).await?;
    let recheck = svc.config().retry.dependency_recheck;
    let customer = links::require_customer(&svc.store, halo, &data.account_id, recheck).await?;
    // A zero overage is written too (an inactive line of quantity 0
    // carrying its version, on an invoice created if need be): its version
    // must live in HaloPSA, or an older non-zero event arriving after Redis
    // was lost would put the withdrawn charge back.
    let ihid = invoice_of(svc, halo, data, invoices)
        .await?
        .unwrap_or(NO_INVOICE);
    let cached = cached.filter(|c| c.ihid == ihid);
    Ok(Some(Target {
        invoice: mapping::invoice_billing_id(data),
        price,
        item_id,
        ihid,
        customer: customer.halo_id,
        cached,
    }))
}

/// The period's invoice when HaloPSA has one (Redis, else its link).
async fn invoice_of(
    svc: &Services,
    halo: &HaloClient,
    d: &OverageData,
    memo: &mut HashMap<String, i64>,
) -> Result<Option<i64>, Failure> {
    let billing_id = mapping::invoice_billing_id(d);
    if let Some(id) = memo.get(&billing_id) {
        return Ok(Some(*id));
    }
    let found = links::resolve(&svc.store, halo, &OVERAGE_INVOICE, &billing_id).await?;
    if let Some(m) = &found {
        memo.insert(billing_id, m.halo_id);
    }
    Ok(found.map(|m| m.halo_id))
}

/// Creates the one-off invoice of a period that has none, with the first
/// [`lines::LINES_PER_REQUEST`] lines of `plans` inline: one
/// `POST /Invoice` for the header, its link and its lines. The events whose
/// line went inline are settled; the others (more lines, or the invoice
/// another worker created first) come back as plans on the invoice.
async fn create_invoice<'a>(
    svc: &Services,
    halo: &HaloClient,
    mut plans: Vec<Plan<'a>>,
    memo: &mut HashMap<String, i64>,
) -> Vec<Plan<'a>> {
    let Some(first) = plans.first() else {
        return plans;
    };
    let d = first.open.data.clone();
    let client_id = first.to.customer;
    let inline: Vec<InvoiceDetail> = plans
        .iter()
        .take(lines::LINES_PER_REQUEST)
        .map(|p| {
            let event: &Event<OverageData> = &p.open;
            mapping::line(
                &event.data,
                p.to.price,
                None,
                None,
                p.to.item_id,
                &event.version,
            )
        })
        .collect();
    let answer: std::sync::Mutex<Option<(i64, Value)>> = std::sync::Mutex::new(None);
    let mut inlined = inline.len();
    let created = match invoice_for(svc, halo, client_id, &d, memo, inline, &answer).await {
        // Refused: one line may be what HaloPSA refuses (an element is
        // saved whole or not at all). The header alone, then the lines
        // the usual way, which isolates a refused line.
        Err(f) if f.class == FailureClass::Rejected => {
            tracing::info!(error = %f, "the invoice with its first lines was refused; creating it without lines");
            inlined = 0;
            invoice_for(svc, halo, client_id, &d, memo, Vec::new(), &answer).await
        }
        created => created,
    };
    let ihid = match created {
        Ok(id) => id,
        Err(f) => {
            for p in plans {
                p.open.settle(Err(f.clone()));
            }
            return Vec::new();
        }
    };
    let saved = answer
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .filter(|(id, _)| *id == ihid);
    for p in &mut plans {
        p.to.ihid = ihid;
        p.to.cached = None;
    }
    let Some((_, header)) = saved else {
        // Found (or another worker's won): the lines go the usual way.
        return plans;
    };
    let rest = plans.split_off(plans.len().min(inlined));
    for p in plans {
        // Saved with the header (one element is saved whole). The line's
        // id from the answer is cached; without it the next event reads
        // the header.
        let line = mapping::lines_carrying(&header, &mapping::marker(&p.open.data))
            .first()
            .map(|f| f.0);
        let r = match line {
            Some(l) => remember(svc, halo, &p, Some(l)).await,
            None => forget(svc, halo, &p.open.data).await,
        };
        p.open.settle(r.map(|_| Outcome::Applied));
    }
    rest
}

/// The HaloPSA item of the charge, from the connection's `[items]` map
/// (then, in the same key order, the mappings stored in HaloPSA:
/// `halo::items`): `overage:<metric>` (no request needed), else the subscription's sku
/// (from its licence: `product_sku`, cached in `Store::subscription_products`, shared with the usage worker) as `<sku>:<metric>`,
/// then `<sku>`. A subscription not in HaloPSA yet is a `dependency`; no
/// key mapped is `unmapped`, naming the keys tried.
async fn item_for(svc: &Services, halo: &HaloClient, d: &OverageData) -> Result<i64, Failure> {
    let conn = halo.connection();
    let direct = mapping::direct_key(d);
    // In the config, `overage:<metric>` needs no request at all.
    if let Some(id) = conn.items.get(&direct) {
        return Ok(*id);
    }
    let sku = match subscription_sku(svc, halo, d).await {
        Ok(sku) => sku,
        Err(f) => {
            // Without the sku, only `overage:<metric>` can still be found
            // (among the mappings stored in HaloPSA).
            let direct_only = [direct.clone()];
            if let Some((_, id)) =
                items::resolve_chain(halo, &svc.store, conn, &direct_only).await?
            {
                return Ok(id);
            }
            return Err(f);
        }
    };
    let mut tried = vec![direct];
    tried.extend(mapping::sku_keys(&sku, d));
    match items::resolve_chain(halo, &svc.store, conn, &tried).await? {
        Some((_, id)) => Ok(id),
        None => Err(mapping::unmapped(conn, &tried)),
    }
}

async fn subscription_sku(
    svc: &Services,
    halo: &HaloClient,
    d: &OverageData,
) -> Result<String, Failure> {
    let products = svc.store.subscription_products(&halo.connection().name);
    if let Some(p) = products.get(&d.subscription_id).await? {
        return Ok(p.sku);
    }
    let not_yet = || {
        format!(
            "subscription {} is not in HaloPSA yet (no licence linked to it), so its sku (for the item mapping) is unknown; retried until the subscription event has been applied, or map \"overage:{}\"",
            d.subscription_id, d.metric
        )
    };
    let m = links::require(
        &svc.store,
        halo,
        &SUBSCRIPTION,
        &d.subscription_id,
        svc.config().retry.dependency_recheck,
        &not_yet,
    )
    .await?;
    let licence = halo
        .get(&format!("/SoftwareLicence/{}", m.halo_id), &[])
        .await?;
    let product = first_record(licence)
        .and_then(|l| LicenceList::product_of(&l))
        .ok_or_else(|| Failure::dependency(not_yet()))?;
    products.set(&d.subscription_id, &product).await?;
    Ok(product.sku)
}

/// The one-off invoice of (account, period), created once, with `inline`
/// as its first lines; the answer of a create goes to `created`.
async fn invoice_for(
    svc: &Services,
    halo: &HaloClient,
    client_id: i64,
    d: &OverageData,
    memo: &mut HashMap<String, i64>,
    inline: Vec<InvoiceDetail>,
    created: &std::sync::Mutex<Option<(i64, Value)>>,
) -> Result<i64, Failure> {
    let billing_id = mapping::invoice_billing_id(d);
    if let Some(id) = memo.get(&billing_id) {
        return Ok(*id);
    }
    let config = svc.config();
    let spec = HeaderSpec {
        invoice: Invoice::OneOff,
        kind: &OVERAGE_INVOICE,
        billing_id: &billing_id,
        record: InvoiceHeader {
            lines: Some(inline),
            ..mapping::invoice_record(client_id, d)
        },
        lock_ttl: config.worker.lock_ttl,
        lock_wait: config.worker.lock_wait,
    };
    let (id, answer) = lines::find_or_create_answered(&svc.store, halo, &spec).await?;
    if let Some(saved) = answer {
        *created.lock().unwrap_or_else(|e| e.into_inner()) = Some((id, saved));
    }
    memo.insert(billing_id, id);
    Ok(id)
}

/// An aggregate's charge as cached in Redis (`store::OverageLine`).
/// `line: None`: the line was added but its id is not known (the header
/// is read to find it).
async fn cached(
    svc: &Services,
    halo: &HaloClient,
    d: &OverageData,
) -> Result<Option<Cached>, Failure> {
    Ok(svc
        .store
        .overage_lines(&halo.connection().name)
        .get(&mapping::aggregate(d))
        .await?)
}

async fn remember(
    svc: &Services,
    halo: &HaloClient,
    p: &Plan<'_>,
    line: Option<i64>,
) -> Result<(), Failure> {
    let event: &Event<OverageData> = &p.open;
    write_cache(svc, halo, &event.data, p.to.ihid, line, &event.version).await
}

async fn write_cache(
    svc: &Services,
    halo: &HaloClient,
    d: &OverageData,
    ihid: i64,
    line: Option<i64>,
    version: &Version,
) -> Result<(), Failure> {
    let value = Cached {
        ihid,
        line,
        version: version.encode(),
    };
    svc.store
        .overage_lines(&halo.connection().name)
        .set(&mapping::aggregate(d), &value)
        .await?;
    Ok(())
}

async fn forget(svc: &Services, halo: &HaloClient, d: &OverageData) -> Result<(), Failure> {
    svc.store
        .overage_lines(&halo.connection().name)
        .forget(&mapping::aggregate(d))
        .await?;
    Ok(())
}

/// An update of a line: its id, and whether that id came from the cache.
struct Update<'a> {
    plan: Plan<'a>,
    line: i64,
    from_cache: bool,
}

/// Applies and settles the plans of one invoice.
async fn apply_invoice(svc: &Services, halo: &HaloClient, mut ihid: i64, mut plans: Vec<Plan<'_>>) {
    // Events the cache cannot place need the header's lines.
    let mut header = None;
    if let Some(first) = plans.iter().find(|p| p.to.cached.is_none()) {
        match header_of(svc, halo, ihid, first).await {
            Ok(h) => {
                if h.again {
                    // Deleted by the MSP, found or created again: the
                    // lines go onto it, whatever was cached of the old one.
                    ihid = h.ihid;
                    for p in &mut plans {
                        p.to.ihid = h.ihid;
                        p.to.cached = None;
                    }
                }
                header = Some(h.body);
            }
            Err(f) => {
                for p in plans {
                    p.open.settle(Err(f.clone()));
                }
                return;
            }
        }
    }
    let mut adds: Vec<(Plan<'_>, Value)> = Vec::new();
    let mut updates: Vec<(Update<'_>, Value)> = Vec::new();
    for p in plans {
        let update = match &p.to.cached {
            Some(Cached { line: Some(l), .. }) => Some((*l, true)),
            Some(Cached { line: None, .. }) => None,
            None => {
                let marker = mapping::marker(&p.open.data);
                // The lines on the header (read above for these events).
                let found = header
                    .as_ref()
                    .map(|h| mapping::lines_carrying(h, &marker))
                    .unwrap_or_default();
                // Lines beside the lowest (added by hand, or by workers
                // that raced) are retired: the customer is charged once.
                if let Some(((kept, _), others)) = found.split_first() {
                    let others: Vec<i64> = others.iter().map(|o| o.0).collect();
                    let retired = lines::retire_duplicates(
                        halo,
                        Invoice::OneOff,
                        ihid,
                        *kept,
                        &others,
                        &marker,
                    );
                    if let Err(f) = retired.await {
                        p.open.settle(Err(f));
                        continue;
                    }
                }
                match found.first() {
                    Some((line, Some(applied))) if p.open.version.is_superseded_by(applied) => {
                        let data = &p.open.data;
                        let r = write_cache(svc, halo, data, p.to.ihid, Some(*line), applied).await;
                        p.open.settle(r.map(|_| Outcome::Superseded));
                        continue;
                    }
                    Some((line, _)) => Some((*line, false)),
                    None => None,
                }
            }
        };
        let event: &Event<OverageData> = &p.open;
        let line = update.map(|(line, _)| line);
        match body(&mapping::line(
            &event.data,
            p.to.price,
            Some(ihid),
            line,
            p.to.item_id,
            &event.version,
        )) {
            Ok(b) => match update {
                Some((line, from_cache)) => updates.push((
                    Update {
                        plan: p,
                        line,
                        from_cache,
                    },
                    b,
                )),
                None => adds.push((p, b)),
            },
            Err(f) => p.open.settle(Err(f)),
        }
    }
    let added = lines::add(halo, Invoice::OneOff, adds).await;
    let updated = lines::update(halo, Invoice::OneOff, updates).await;
    // Adds whose id the answer did not give are found on the header.
    let missing_ids = added.iter().any(|(_, r)| matches!(r, Ok(None)));
    let reread = if missing_ids {
        lines::read_header(halo, Invoice::OneOff, ihid).await.ok()
    } else {
        None
    };
    for (p, r) in added {
        let r = match r {
            Ok(saved) => {
                let id = saved.as_ref().and_then(record_id).or_else(|| {
                    reread.as_ref().and_then(|h| {
                        mapping::lines_carrying(h, &mapping::marker(&p.open.data))
                            .first()
                            .map(|f| f.0)
                    })
                });
                // Without the id, no cache: the next event reads the header.
                match id {
                    Some(id) => remember(svc, halo, &p, Some(id)).await,
                    None => forget(svc, halo, &p.open.data).await,
                }
                .map(|_| Outcome::Applied)
            }
            Err(f) if f.class != FailureClass::Rejected => {
                // The line may still have been saved (an answer lost in a
                // way the read-back could not see): the retry reads the
                // header instead of trusting a cached "no line".
                match forget(svc, halo, &p.open.data).await {
                    Ok(()) => Err(f),
                    Err(e) => Err(e),
                }
            }
            // Refused: because the MSP deleted the invoice (found or
            // created again, the event retried onto it), else final.
            Err(f) => {
                Err(
                    lines::refusal_unless_header_gone(&svc.store, halo, &spec_of(svc, &p), ihid, f)
                        .await,
                )
            }
        };
        p.open.settle(r);
    }
    for (u, r) in updated {
        let r = match r {
            Ok(_) => remember(svc, halo, &u.plan, Some(u.line))
                .await
                .map(|_| Outcome::Applied),
            Err(f) if u.from_cache && f.class == FailureClass::Rejected => {
                // The cached line may be gone (deleted in HaloPSA, or
                // Redis holding another instance's ids): retry afresh
                // from the header; a genuine refusal is then final.
                match forget(svc, halo, &u.plan.open.data).await {
                    Ok(()) => Err(lines::cached_line_refused(u.line, ihid, &f)),
                    Err(e) => Err(e),
                }
            }
            Err(f) => Err(f),
        };
        u.plan.open.settle(r);
    }
}

/// The invoice `ihid` of `p`'s period with its lines, and its id: `ihid`,
/// or the invoice found or created again when the MSP deleted it
/// ([`lines::header`]).
async fn header_of(
    svc: &Services,
    halo: &HaloClient,
    ihid: i64,
    p: &Plan<'_>,
) -> Result<lines::Header, Failure> {
    lines::header(&svc.store, halo, &spec_of(svc, p), ihid).await
}

/// The one-off invoice of `p`'s period, as the lines engine needs it.
fn spec_of<'a>(svc: &Services, p: &'a Plan<'_>) -> HeaderSpec<'a> {
    let config = svc.config();
    HeaderSpec {
        invoice: Invoice::OneOff,
        kind: &OVERAGE_INVOICE,
        billing_id: &p.to.invoice,
        record: mapping::invoice_record(p.to.customer, &p.open.data),
        lock_ttl: config.worker.lock_ttl,
        lock_wait: config.worker.lock_wait,
    }
}
