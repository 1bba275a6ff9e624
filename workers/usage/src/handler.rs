//! `usage.reported` → the usage line of (subscription, metric) on the
//! customer's halosync recurring invoice, in batches (DESIGN §3, reference
//! §3.4, §4.5): a [`LineFamily`] of the invoice-lines engine
//! (`halosync_shared::engine::lines`), which owns the whole write protocol
//! (cache, header read, lines by marker, arrays, duplicates, refusals).
//! What is left here is the family's data and policy:
//!
//! * **Key**: `<subscription_id>:<metric>` (one line per subscription and
//!   metric, whatever the period: a newer period replaces the older one);
//!   marker `halosync.usage:<key>`; applied state [`Applied`] (period,
//!   then version), cached in `Store::usage_lines` with the scanned marks
//!   (`LineCache::Usage`).
//! * **Invoice**: the customer's halosync recurring invoice, the
//!   subscription worker's, shared with its subscription lines
//!   (`links::require_customer`: `dependency` while the account is not in
//!   HaloPSA). Known absent: a `dependency` until the subscription worker
//!   created it, without a request; being created: a throttled
//!   `dependency`; unsure (Redis lost it): found, or created, the one way
//!   (same header body and lock as the subscription worker).
//! * **Sku and product name** of the subscription (usage events carry
//!   neither): `Store::subscription_products` (shared with the overage
//!   worker), else the subscription's licence (`halosync.subscription`
//!   mapping → licence id) looked up in one `GET /SoftwareLicence?client_id=…`
//!   list per customer; every licence of that list carrying a subscription
//!   marker is cached then. A subscription not in HaloPSA yet is a
//!   `dependency`. The sku of a subscription is assumed never to change.
//!   Redis first; HaloPSA only under the engine's `cold` mutex.
//! * **Item**: `"<sku>:<metric>"` in `[items]`, else the sku, else
//!   `unmapped` naming both keys.
//!
//! Steady state (Redis warm): no GET at all, one request per 100 changed
//! lines. Cold: one header GET and at most one licence list per customer.

use std::collections::BTreeMap;

use async_trait::async_trait;
use halosync_shared::contract::{Event, Family, Product, UsageData};
use halosync_shared::engine::lines::{At, Line, LineCache, LineFamily, Lines, Run};
use halosync_shared::halo::items;
use halosync_shared::halo::lines::{self, Invoice};
use halosync_shared::halo::links::{self, Kind, Known, RECURRING_INVOICE, SUBSCRIPTION, USAGE};
use halosync_shared::halo::models::{InvoiceDetail, InvoiceHeader, LicenceList};
use halosync_shared::halo::record_id;
use halosync_shared::runtime::{Batch, Open};
use halosync_shared::Failure;
use serde_json::Value;

use crate::mapping::{self, item_keys, line_key, Applied};

// The licence field the subscription worker writes its marker into.
use halosync_shared::halo::links::LICENCE_MARKER_FIELD as LICENCE_ID_FIELD;

/// The usage worker's handler: the lines engine over [`Usage`].
pub type UsageHandler = Lines<Usage>;

/// The usage family.
#[derive(Default)]
pub struct Usage;

/// What the family resolves for an event: its subscription's product
/// name and the line's item (0 until known).
#[derive(Default)]
pub struct Target {
    product: String,
    item: i64,
}

type Work = Line<Usage>;

#[async_trait]
impl LineFamily for Usage {
    const FAMILY: Family = Family::Usage;
    type Data = UsageData;
    type Target = Target;
    type State = Applied;
    const LINE: &'static Kind = &USAGE;
    const INVOICE: (Invoice, &'static Kind) = (Invoice::Recurring, &RECURRING_INVOICE);
    const CACHE: LineCache = LineCache::Usage;

    fn key(data: &UsageData) -> String {
        line_key(data)
    }

    fn validate(data: &UsageData) -> Result<(), Failure> {
        if !data.quantity.is_finite() || data.quantity < 0.0 {
            return Err(Failure::invalid(format!(
                "quantity {} is not a number >= 0",
                data.quantity
            )));
        }
        Ok(())
    }

    fn state(event: &Event<UsageData>) -> Applied {
        Applied {
            period_start: event.data.period_start.clone(),
            version: event.version.clone(),
        }
    }

    fn invoice_id(data: &UsageData) -> String {
        data.account_id.clone()
    }

    fn invoice_record(data: &UsageData, customer: i64) -> InvoiceHeader {
        lines::recurring_invoice_record(customer, &data.account_id)
    }

    fn line(event: &Event<UsageData>, target: &Target, at: At) -> InvoiceDetail {
        let state = Usage::state(event);
        let ihid = at.ihid.unwrap_or_default();
        let (product, item) = (&target.product, target.item);
        mapping::detail(&event.data, product, &state, ihid, at.line, item)
    }

    async fn prepare(&self, run: &mut Run<'_>, batch: &mut Batch<Work>) {
        invoices(run, batch).await;
        // Redis first; HaloPSA (under `cold`) only for what it lacks.
        if products(run, batch, false).await {
            run.cold().await;
            products(run, batch, true).await;
        }
    }
}

/// Customer and recurring invoice, once per account: both read from
/// Redis for the whole batch (two round trips, not two per account); an
/// account Redis does not map both of goes the one-account way
/// ([`invoice_of`]).
async fn invoices(run: &Run<'_>, batch: &mut Batch<Work>) {
    let mut by_account: BTreeMap<String, Vec<Open<'_, Work>>> = BTreeMap::new();
    for w in batch.open() {
        let account = w.event.data.account_id.clone();
        by_account.entry(account).or_default().push(w);
    }
    let accounts: Vec<String> = by_account.keys().cloned().collect();
    let mapped = mapped_invoices(run, &accounts).await;
    for ((account, members), mapped) in by_account.into_iter().zip(mapped) {
        let found = match mapped {
            Some(ids) => Ok(ids),
            None => invoice_of(run, &account).await,
        };
        match found {
            Ok((customer, ihid)) => {
                for mut w in members {
                    w.customer = customer;
                    w.ihid = Some(ihid);
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

/// The customer and recurring invoice of each of `accounts` whose both
/// Redis maps, in order; `None` for the others (and for all when Redis
/// fails: the one-account way then settles them). The invoices are read
/// only for accounts whose customer is mapped, as [`invoice_of`] does.
async fn mapped_invoices(run: &Run<'_>, accounts: &[String]) -> Vec<Option<(i64, i64)>> {
    let (store, halo) = (run.ctx.store, run.ctx.halo);
    let mut out: Vec<Option<(i64, i64)>> = vec![None; accounts.len()];
    let Ok(customers) = links::known_many(store, halo, &links::CUSTOMER, accounts).await else {
        return out;
    };
    let (at, with_customer): (Vec<(usize, i64)>, Vec<String>) = customers
        .into_iter()
        .enumerate()
        .filter_map(|(i, known)| match known {
            Known::Mapped(m) => Some(((i, m.halo_id), accounts[i].clone())),
            _ => None,
        })
        .unzip();
    if with_customer.is_empty() {
        return out;
    }
    let Ok(invoices) = links::known_many(store, halo, &RECURRING_INVOICE, &with_customer).await
    else {
        return out;
    };
    for ((i, customer), known) in at.into_iter().zip(invoices) {
        if let Known::Mapped(m) = known {
            out[i] = Some((customer, m.halo_id));
        }
    }
    out
}

async fn invoice_of(run: &Run<'_>, account_id: &str) -> Result<(i64, i64), Failure> {
    let (store, halo, config) = (run.ctx.store, run.ctx.halo, run.ctx.config);
    let recheck = config.retry.dependency_recheck;
    let customer = links::require_customer(store, halo, account_id, recheck)
        .await?
        .halo_id;
    let w = &config.worker;
    // The subscription worker's invoice: it creates it with the account's
    // first subscription line, and usage has nothing to bill before that
    // subscription is there.
    let known = links::known_many(store, halo, &RECURRING_INVOICE, &[account_id.to_string()])
        .await?
        .pop();
    let ihid = match known {
        Some(Known::Mapped(m)) => m.halo_id,
        Some(Known::Absent) => {
            let why = format!(
                "account {account_id} has no halosync recurring invoice yet (the subscription worker creates it with its first subscription); retried until it has"
            );
            let kind = &RECURRING_INVOICE;
            return Err(links::still_absent(store, halo, kind, account_id, recheck, why).await);
        }
        Some(Known::Creating) => {
            let mut f = Failure::dependency(format!(
                "the halosync recurring invoice of account {account_id} is being created right now; retried once it is"
            ));
            f.throttled = true;
            return Err(f);
        }
        Some(Known::Unsure) | None => {
            let (ttl, wait) = (w.lock_ttl, w.lock_wait);
            lines::recurring_invoice(store, halo, account_id, customer, ttl, wait).await?
        }
    };
    Ok((customer, ihid))
}

/// A subscription whose product Redis does not have: found on its licence
/// in its customer's listing.
struct Unlisted<'a> {
    sub: String,
    licence: i64,
    /// Its events.
    members: Vec<Open<'a, Work>>,
}

/// The subscriptions of the events without an item: subscription →
/// (its customer, its events).
type BySubscription<'a> = BTreeMap<String, (i64, Vec<Open<'a, Work>>)>;

/// Sku and product name of each subscription, and the item of each event
/// (which needs the sku). Returns whether HaloPSA must be read (only when
/// `read` is false).
async fn products(run: &Run<'_>, batch: &mut Batch<Work>, read: bool) -> bool {
    let mut by_sub: BySubscription<'_> = BTreeMap::new();
    for w in batch.open().filter(|w| w.target.item == 0) {
        let sub = w.event.data.subscription_id.clone();
        let customer = w.customer;
        by_sub
            .entry(sub)
            .or_insert_with(|| (customer, Vec::new()))
            .1
            .push(w);
    }
    if by_sub.is_empty() {
        return false;
    }
    let subs: Vec<String> = by_sub.keys().cloned().collect();
    let conn = &run.ctx.halo.connection().name;
    let cached = run
        .ctx
        .store
        .subscription_products(conn)
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
            with_product(run, members, &p).await;
        } else if !read {
            // Left open for the read.
            need = true;
        } else if let Some(u) = licence_of(run, sub, members).await {
            missing.entry(customer).or_default().push(u);
        }
    }
    for (customer, wanted) in missing {
        listed(run, customer, wanted).await;
    }
    need
}

/// The licence of subscription `sub` (its link), else its events settled
/// (`dependency` while the subscription is not in HaloPSA).
async fn licence_of<'a>(
    run: &Run<'_>,
    sub: String,
    members: Vec<Open<'a, Work>>,
) -> Option<Unlisted<'a>> {
    let recheck = run.ctx.config.retry.dependency_recheck;
    let why = || {
        format!(
            "subscription {sub} is not in HaloPSA yet (no licence linked to it); retried until the subscription event has been applied"
        )
    };
    let needed = links::require(
        run.ctx.store,
        run.ctx.halo,
        &SUBSCRIPTION,
        &sub,
        recheck,
        why,
    );
    match needed.await {
        Ok(m) => Some(Unlisted {
            sub,
            licence: m.halo_id,
            members,
        }),
        Err(f) => {
            for w in members {
                w.settle(Err(f.clone()));
            }
            None
        }
    }
}

/// One `GET /SoftwareLicence` list of `customer`: its licences' products
/// cached, and those of `wanted` given to their events.
async fn listed(run: &Run<'_>, customer: i64, wanted: Vec<Unlisted<'_>>) {
    let query = [
        ("client_id", customer.to_string()),
        ("includeinactive", "true".into()),
    ];
    let rows = run
        .ctx
        .halo
        .list("/SoftwareLicence", "licences", &query)
        .await;
    let rows = match rows {
        Ok(rows) => rows,
        Err(e) => {
            let f = Failure::from(e);
            for w in wanted.into_iter().flat_map(|u| u.members) {
                w.settle(Err(f.clone()));
            }
            return;
        }
    };
    cache_products(run, &rows).await;
    for Unlisted {
        sub,
        licence,
        members,
    } in wanted
    {
        let found = rows.iter().find(|r| record_id(r) == Some(licence));
        match found.and_then(LicenceList::product_of) {
            Some(p) => with_product(run, members, &p).await,
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

/// The product of `members`, the events of one subscription: its name on
/// their lines, and each one's item (`<sku>:<metric>`, else the sku).
async fn with_product(run: &Run<'_>, members: Vec<Open<'_, Work>>, p: &Product) {
    let conn = run.ctx.halo.connection();
    for mut w in members {
        w.target.product = p.name.clone();
        let keys = item_keys(&p.sku, &w.event.data.metric);
        match items::resolve_chain(run.ctx.halo, run.ctx.store, conn, &keys).await {
            Ok(Some((_, item))) => w.target.item = item,
            Ok(None) => {
                let f = mapping::unmapped(conn, &p.sku, &w.event.data.metric);
                w.settle(Err(f));
            }
            Err(f) => w.settle(Err(f)),
        }
    }
}

/// Caches the sku and name of every licence of a customer listing that
/// carries a subscription marker, so that the customer's other
/// subscriptions need no listing in later batches.
async fn cache_products(run: &Run<'_>, rows: &[Value]) {
    let products: Vec<(&str, Product)> = rows
        .iter()
        .filter_map(|row| {
            let marker = links::marker_in(row, LICENCE_ID_FIELD)?;
            let sub = links::billing_id_of(&SUBSCRIPTION, marker)?;
            Some((sub, LicenceList::product_of(row)?))
        })
        .collect();
    let conn = &run.ctx.halo.connection().name;
    let cached = run
        .ctx
        .store
        .subscription_products(conn)
        .set_many(&products)
        .await;
    if let Err(e) = cached {
        tracing::warn!(error = %e, "could not cache the subscriptions' skus");
    }
}
