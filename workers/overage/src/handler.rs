//! The overage worker: one charge per (subscription, metric, period), as a
//! line on the customer's one-off invoice of that period: a
//! [`LineFamily`] of the invoice-lines engine
//! (`halosync_shared::engine::lines`), which owns the whole write protocol
//! (cache, invoice created with its first lines inline, header read, lines
//! by marker, arrays, duplicates, refusals, settling). What is left here is
//! the family's data and policy:
//!
//! * **Key**: `"{subscription_id}:{metric}:{period_start}"` (DESIGN §1);
//!   marker `halosync.overage:<key>` in `item_internal_reference`, the
//!   applied [`Version`] in `item_external_reference`; cached in
//!   `Store::overage_lines` (`LineCache::Overage`). An event not newer
//!   than the cached version is `Superseded` before any request.
//! * **Invoice**: the one-off invoice of (account, period), found through
//!   its link (`links::resolve`, once per batch), else created by the
//!   engine with the period's lines inline (one `POST /Invoice`) under the
//!   lock `overage_invoice:<account_id>:<period_start>`. A zero overage
//!   creates it too: its version must be kept in HaloPSA (an inactive line
//!   of quantity 0), or an older non-zero event arriving after Redis was
//!   lost would put the withdrawn charge back.
//! * **Price**: the event's `unit_price` ([`mapping::unit_price`]).
//! * **Item** ([`item_for`]): `overage:<metric>` (no request needed), else
//!   the subscription's sku as `<sku>:<metric>`, then `<sku>`.
//! * **Customer**: `links::require_customer` (`dependency` while missing).
//!
//! Crash safety: every write sets absolute values and carries its own
//! version, so a worker killed anywhere leaves either no line (redelivery
//! adds it) or the line with the event's version (redelivery finds it by
//! its marker, sees the version and acks as superseded).
//!
//! Steady state (Redis warm, lines known): one `updatelines` request per
//! 100 lines per batch.

use std::collections::HashMap;

use async_trait::async_trait;
use halosync_shared::contract::{Event, Family, OverageData, Version};
use halosync_shared::engine::lines::{At, Line, LineCache, LineFamily, Lines, Run};
use halosync_shared::halo::items;
use halosync_shared::halo::lines::Invoice;
use halosync_shared::halo::links::{self, Kind, OVERAGE, OVERAGE_INVOICE, SUBSCRIPTION};
use halosync_shared::halo::models::{InvoiceDetail, InvoiceHeader, LicenceList};
use halosync_shared::halo::{first_record, HaloClient};
use halosync_shared::runtime::Batch;
use halosync_shared::store::Store;
use halosync_shared::Failure;

use crate::mapping;

/// The overage worker's handler: the lines engine over [`Overage`].
pub type OverageHandler = Lines<Overage>;

/// The overage family.
#[derive(Default)]
pub struct Overage;

/// What the family resolves for an event: the price and the item.
#[derive(Default)]
pub struct Target {
    price: f64,
    item: i64,
}

#[async_trait]
impl LineFamily for Overage {
    const FAMILY: Family = Family::Overage;
    type Data = OverageData;
    type Target = Target;
    type State = Version;
    const LINE: &'static Kind = &OVERAGE;
    const INVOICE: (Invoice, &'static Kind) = (Invoice::OneOff, &OVERAGE_INVOICE);
    const CACHE: LineCache = LineCache::Overage;

    fn key(data: &OverageData) -> String {
        mapping::aggregate(data)
    }

    fn state(event: &Event<OverageData>) -> Version {
        event.version.clone()
    }

    fn invoice_id(data: &OverageData) -> String {
        mapping::invoice_billing_id(data)
    }

    fn invoice_record(data: &OverageData, customer: i64) -> InvoiceHeader {
        mapping::invoice_record(customer, data)
    }

    fn line(event: &Event<OverageData>, target: &Target, at: At) -> InvoiceDetail {
        let (price, item) = (target.price, target.item);
        mapping::line(&event.data, price, at.ihid, at.line, item, &event.version)
    }

    async fn prepare(&self, run: &mut Run<'_>, batch: &mut Batch<Line<Overage>>) {
        // Invoice billing id → its id, once per batch.
        let mut invoices: HashMap<String, Option<i64>> = HashMap::new();
        for mut w in batch.open() {
            match target(run, &w.event.data, &mut invoices).await {
                Ok((target, customer, ihid)) => {
                    w.target = target;
                    w.customer = customer;
                    w.ihid = ihid;
                }
                Err(f) => w.settle(Err(f)),
            }
        }
    }
}

/// An event's price, item, customer and invoice (`None`: the period has
/// none yet, and the engine creates it with the line inline).
async fn target(
    run: &Run<'_>,
    data: &OverageData,
    invoices: &mut HashMap<String, Option<i64>>,
) -> Result<(Target, i64, Option<i64>), Failure> {
    let (store, halo) = (run.ctx.store, run.ctx.halo);
    let price = mapping::unit_price(data)?;
    let recheck = run.ctx.config.retry.dependency_recheck;
    let item = item_for(store, halo, recheck, data).await?;
    let customer = links::require_customer(store, halo, &data.account_id, recheck).await?;
    let billing_id = mapping::invoice_billing_id(data);
    let ihid = match invoices.get(&billing_id) {
        Some(known) => *known,
        None => {
            let found = links::resolve(store, halo, &OVERAGE_INVOICE, &billing_id).await?;
            let ihid = found.map(|m| m.halo_id);
            invoices.insert(billing_id, ihid);
            ihid
        }
    };
    Ok((Target { price, item }, customer.halo_id, ihid))
}

/// The HaloPSA item of the charge, from the connection's `[items]` map
/// (then, in the same key order, the mappings stored in HaloPSA:
/// `halo::items`): `overage:<metric>` (no request needed), else the
/// subscription's sku (from its licence: `product_sku`, cached in
/// `Store::subscription_products`, shared with the usage worker) as
/// `<sku>:<metric>`, then `<sku>`. A subscription not in HaloPSA yet is a
/// `dependency`; no key mapped is `unmapped`, naming the keys tried.
async fn item_for(
    store: &Store,
    halo: &HaloClient,
    recheck: std::time::Duration,
    d: &OverageData,
) -> Result<i64, Failure> {
    let conn = halo.connection();
    let direct = mapping::direct_key(d);
    // In the config, `overage:<metric>` needs no request at all.
    if let Some(id) = conn.items.get(&direct) {
        return Ok(*id);
    }
    let sku = match subscription_sku(store, halo, recheck, d).await {
        Ok(sku) => sku,
        Err(f) => {
            // Without the sku, only `overage:<metric>` can still be found
            // (among the mappings stored in HaloPSA).
            let direct_only = [direct.clone()];
            if let Some((_, id)) = items::resolve_chain(halo, store, conn, &direct_only).await? {
                return Ok(id);
            }
            return Err(f);
        }
    };
    let mut tried = vec![direct];
    tried.extend(mapping::sku_keys(&sku, d));
    match items::resolve_chain(halo, store, conn, &tried).await? {
        Some((_, id)) => Ok(id),
        None => Err(mapping::unmapped(conn, &tried)),
    }
}

async fn subscription_sku(
    store: &Store,
    halo: &HaloClient,
    recheck: std::time::Duration,
    d: &OverageData,
) -> Result<String, Failure> {
    let products = store.subscription_products(&halo.connection().name);
    if let Some(p) = products.get(&d.subscription_id).await? {
        return Ok(p.sku);
    }
    let not_yet = || {
        format!(
            "subscription {} is not in HaloPSA yet (no licence linked to it), so its sku (for the item mapping) is unknown; retried until the subscription event has been applied, or map \"overage:{}\"",
            d.subscription_id, d.metric
        )
    };
    let sub = &d.subscription_id;
    let m = links::require(store, halo, &SUBSCRIPTION, sub, recheck, &not_yet).await?;
    let licence = halo
        .get(&format!("/SoftwareLicence/{}", m.halo_id), &[])
        .await?;
    let product = first_record(licence)
        .and_then(|l| LicenceList::product_of(&l))
        .ok_or_else(|| Failure::dependency(not_yet()))?;
    products.set(&d.subscription_id, &product).await?;
    Ok(product.sku)
}
