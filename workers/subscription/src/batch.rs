//! Subscription events coalesce: a batch of known subscriptions costs one
//! licence array, one `updatelines` array and one version array, not three
//! requests per event.
//!
//! What a batch can take on its own is the warm case, which is also the
//! common one once a customer is onboarded: Redis knows the customer, the
//! licence (with its link and applied version), the customer's recurring
//! invoice and the subscription's line on that very invoice. Resolving all
//! of that is three Redis round trips (`MGET`s) for the whole batch and no
//! HaloPSA request.
//!
//! Everything else goes the one-event way ([`crate::handler`]), which
//! handles each case on its own and was tested for it: a customer not there
//! yet (a throttled dependency wait), a licence or line Redis does not know
//! (found again from HaloPSA, or created), a subscription that moved to
//! another account (its cached line is on another invoice), and any array
//! that does not finish cleanly. Every write here sets absolute values (a
//! merge by id), so sending one again on that path is harmless; nothing is
//! *added* here, so a partly saved or unanswered array can never leave a
//! duplicate.

use std::collections::{BTreeSet, HashMap};

use halosync_shared::contract::{Envelope, Product, SubscriptionData, Version};
use halosync_shared::halo::lines::{self, Invoice};
use halosync_shared::halo::links::{self, CUSTOMER, RECURRING_INVOICE, SUBSCRIPTION};
use halosync_shared::halo::HaloClient;
use halosync_shared::runtime::{Outcome, Services};
use halosync_shared::store::Mapping;
use halosync_shared::{Failure, FailureClass};
use serde_json::{json, Value};

use crate::invoice;
use crate::mapping::{licence_record, line_update, Terms};

/// The most records one array POST carries (HaloPSA documents no limit,
/// UNCONFIRMED; 100 is the page size it serves and keeps a refused array
/// cheap).
const ARRAY_MAX: usize = 100;

/// One event the batch may apply itself.
struct Warm {
    data: SubscriptionData,
    version: Version,
    terms: Terms,
    item_id: i64,
    customer_id: i64,
    licence: Mapping,
    ihid: i64,
    line: i64,
    marker: String,
}

/// Applies what it can of `events` (one connection, one event per
/// subscription, all locks held by the runtime). `None` where the event is
/// left to the one-event path.
pub(crate) async fn apply(
    svc: &Services,
    halo: &HaloClient,
    events: &[Envelope],
) -> Vec<Option<Result<Outcome, Failure>>> {
    let mut results: Vec<Option<Result<Outcome, Failure>>> = vec![None; events.len()];
    let conn = halo.connection().name.clone();

    // 1. What each event says, checked before any request.
    let mut parsed: Vec<Option<(SubscriptionData, Version, Terms)>> = Vec::new();
    for (i, e) in events.iter().enumerate() {
        let p = e.data_as::<SubscriptionData>().and_then(|d| {
            let v = e.version()?;
            let t = Terms::of(&d)?;
            Ok((d, v, t))
        });
        match p {
            Ok(p) => parsed.push(Some(p)),
            Err(f) => {
                results[i] = Some(Err(f));
                parsed.push(None);
            }
        }
    }
    let subs: Vec<String> = parsed
        .iter()
        .map(|p| {
            p.as_ref()
                .map(|p| p.0.subscription_id.clone())
                .unwrap_or_default()
        })
        .collect();
    let accounts: Vec<String> = parsed
        .iter()
        .map(|p| {
            p.as_ref()
                .map(|p| p.0.account_id.clone())
                .unwrap_or_default()
        })
        .collect();

    // 2. Redis, in four round trips for the whole batch.
    let store = &svc.store;
    let known = async {
        Ok::<_, Failure>((
            store.mappings(&conn, CUSTOMER.name, &accounts).await?,
            store.mappings(&conn, SUBSCRIPTION.name, &subs).await?,
            store
                .mappings(&conn, RECURRING_INVOICE.name, &accounts)
                .await?,
            invoice::cached_lines(svc, &conn, &subs).await?,
        ))
    }
    .await;
    let (customers, licences, invoices, cached) = match known {
        Ok(k) => k,
        // Redis cannot answer: the one-event path meets the same error
        // and settles each event with it.
        Err(_) => return results,
    };

    // 3. The warm ones; superseded ones are done at once.
    let mut warm: Vec<(usize, Warm)> = Vec::new();
    for (i, p) in parsed.into_iter().enumerate() {
        let Some((data, version, terms)) = p else {
            continue;
        };
        let (Some(customer), Some(licence), Some(inv), Some(line)) = (
            customers[i].clone(),
            licences[i].clone(),
            invoices[i].clone(),
            cached[i].clone(),
        ) else {
            continue;
        };
        if licence
            .version()
            .is_some_and(|applied| version.is_superseded_by(&applied))
        {
            results[i] = Some(Ok(Outcome::Superseded));
            continue;
        }
        // A licence whose link or version was never written, and a line
        // cached on another invoice (the subscription moved account): the
        // one-event path knows how to handle those.
        if licence.link_id.is_none() || licence.version.is_none() || line.ihid != inv.halo_id {
            continue;
        }
        let marker = links::marker(&SUBSCRIPTION, &data.subscription_id);
        warm.push((
            i,
            Warm {
                data,
                version,
                terms,
                item_id: 0,
                customer_id: customer.halo_id,
                licence,
                ihid: inv.halo_id,
                line: line.line,
                marker,
            },
        ));
    }
    if warm.is_empty() {
        return results;
    }

    // 4. Item mappings, once per sku (the config's, else HaloPSA's, cached).
    let skus: BTreeSet<String> = warm
        .iter()
        .map(|(_, w)| w.data.product.sku.clone())
        .collect();
    let mut items: HashMap<String, Result<i64, Failure>> = HashMap::new();
    for sku in skus {
        let item = crate::handler::item_for(svc, halo, &sku).await;
        items.insert(sku, item);
    }
    warm.retain_mut(|(i, w)| match &items[&w.data.product.sku] {
        Ok(item) => {
            w.item_id = *item;
            true
        }
        Err(f) => {
            results[*i] = Some(Err(f.clone()));
            false
        }
    });

    for chunk in warm.chunks(ARRAY_MAX) {
        apply_chunk(svc, halo, chunk, &mut results).await;
    }
    results
}

/// One array of at most [`ARRAY_MAX`] of each: licences, lines, versions.
async fn apply_chunk(
    svc: &Services,
    halo: &HaloClient,
    chunk: &[(usize, Warm)],
    results: &mut [Option<Result<Outcome, Failure>>],
) {
    let policy = halo.connection();
    // Licences. A failed array (refused in part, lost answer) leaves all
    // its events to the one-event path: updates merge, resending is
    // harmless, and that path tells a stale mapping from a real refusal.
    let bodies: Vec<Value> = chunk
        .iter()
        .map(|(_, w)| {
            licence_record(
                &w.data,
                &w.terms,
                w.customer_id,
                Some(w.licence.halo_id),
                &w.marker,
                policy,
            )
        })
        .collect();
    if let Err(e) = halo.post("/SoftwareLicence", bodies).await {
        tracing::info!(error = %e, size = chunk.len(),
            "the licence array failed; each event goes on its own");
        return;
    }
    seed_products(svc, halo, chunk).await;

    // Lines: merged by id, split to isolate a refused one.
    let bodies: Vec<(usize, Value)> = chunk
        .iter()
        .enumerate()
        .map(|(k, (_, w))| {
            (
                k,
                line_update(
                    &w.data, &w.terms, w.ihid, w.line, w.item_id, &w.marker, policy,
                ),
            )
        })
        .collect();
    let mut written: Vec<usize> = Vec::new();
    for (k, r) in lines::update(halo, Invoice::Recurring, bodies).await {
        match r {
            Ok(_) => written.push(k),
            // A cached line HaloPSA refuses (the MSP deleted it): the one
            // policy of every family, the cache dropped and the event
            // retried from the invoice's lines, on the one-event path.
            Err(f) if f.class == FailureClass::Rejected => {
                let w = &chunk[k].1;
                if let Err(e) =
                    invoice::forget_line_of(svc, &policy.name, &w.data.subscription_id).await
                {
                    results[chunk[k].0] = Some(Err(e.into()));
                }
            }
            Err(f) => results[chunk[k].0] = Some(Err(f)),
        }
    }
    written.sort_unstable();
    if written.is_empty() {
        return;
    }

    // Versions, on the links, last: they never claim more than HaloPSA holds.
    let versions: Vec<Value> = written
        .iter()
        .map(|&k| {
            let w = &chunk[k].1;
            json!({
                "id": w.licence.link_id,
                "third_party_secondary_id": w.version.encode(),
            })
        })
        .collect();
    if let Err(e) = halo.post("/ExternalLink", versions).await {
        tracing::info!(error = %e, size = written.len(),
            "the version array failed; each event goes on its own");
        return;
    }
    for k in written {
        let (i, w) = &chunk[k];
        let mut m = w.licence.clone();
        m.version = Some(w.version.encode());
        let r = svc
            .store
            .set_mapping(&policy.name, SUBSCRIPTION.name, &w.data.subscription_id, &m)
            .await;
        results[*i] = Some(r.map(|_| Outcome::Applied).map_err(Failure::from));
    }
}

/// Seeds the cache the usage and overage workers read for a subscription's
/// sku (`links::PRODUCT_CACHE`), so they need not read the licence.
async fn seed_products(svc: &Services, halo: &HaloClient, chunk: &[(usize, Warm)]) {
    let products: Vec<(&str, &Product)> = chunk
        .iter()
        .map(|(_, w)| (w.data.subscription_id.as_str(), &w.data.product))
        .collect();
    invoice::seed_products(svc, &halo.connection().name, &products).await;
}
