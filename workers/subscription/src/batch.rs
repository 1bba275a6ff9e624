//! Subscription events coalesce: a batch of known subscriptions costs one
//! licence array and one `updatelines` array (whose lines carry the
//! version), not three requests per event.
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

use std::collections::{BTreeMap, BTreeSet, HashMap};

use halosync_shared::contract::{Envelope, Product, SubscriptionData, Version};
use halosync_shared::halo::lines::{self, Invoice};
use halosync_shared::halo::links::{self, Known, CUSTOMER, RECURRING_INVOICE, SUBSCRIPTION};
use halosync_shared::halo::models::{body, InvoiceHeader};
use halosync_shared::halo::{record_id, HaloClient};
use halosync_shared::runtime::{Outcome, Services};
use halosync_shared::store::{Mapping, SubscriptionLine};
use halosync_shared::{Failure, FailureClass};
use serde_json::Value;

use crate::invoice;
use crate::mapping::{licence_record, line_update, new_line, Terms};

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

/// A subscription HaloPSA does not have yet (known absent, its customer
/// known): created in arrays by [`create`].
struct New {
    data: SubscriptionData,
    version: Version,
    terms: Terms,
    item_id: i64,
    customer_id: i64,
    /// The customer's invoice, or `None` when it has none yet: then it is
    /// created in the same array as its first lines.
    ihid: Option<i64>,
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
    let mut parsed: Vec<(usize, SubscriptionData, Version, Terms)> = Vec::new();
    for (i, e) in events.iter().enumerate() {
        let p = e.data_as::<SubscriptionData>().and_then(|d| {
            let v = e.version()?;
            let t = Terms::of(&d, &v)?;
            Ok((d, v, t))
        });
        match p {
            Ok((d, v, t)) => parsed.push((i, d, v, t)),
            Err(f) => results[i] = Some(Err(f)),
        }
    }
    // 1a. The products, before any licence or link is written: a usage or
    //     overage event that finds a subscription's link finds its product
    //     too, and never lists the customer's licences for it.
    let products: Vec<(&str, &Product)> = parsed
        .iter()
        .map(|(_, d, _, _)| (d.subscription_id.as_str(), &d.product))
        .collect();
    invoice::seed_products(svc, &conn, &products).await;
    // 1b. Item mappings, once per sku (the config's, else HaloPSA's,
    //     cached), before anything else: an unmapped sku is dead-lettered
    //     at once, whatever else is missing, as on the one-event path.
    let skus: BTreeSet<String> = parsed.iter().map(|p| p.1.product.sku.clone()).collect();
    let mut item_ids: HashMap<String, i64> = HashMap::new();
    let mut unmapped: HashMap<String, Failure> = HashMap::new();
    for sku in skus {
        match crate::handler::item_for(svc, halo, &sku).await {
            Ok(item) => {
                item_ids.insert(sku, item);
            }
            Err(f) => {
                unmapped.insert(sku, f);
            }
        }
    }
    parsed.retain(|(i, d, _, _)| match unmapped.get(&d.product.sku) {
        Some(f) => {
            results[*i] = Some(Err(f.clone()));
            false
        }
        None => true,
    });
    let subs: Vec<String> = parsed.iter().map(|p| p.1.subscription_id.clone()).collect();
    let accounts: Vec<String> = parsed.iter().map(|p| p.1.account_id.clone()).collect();

    // 2. Identity for the whole batch: Redis in a few round trips, plus one
    //    bulk import per kind once per Redis lifetime (`links::known_many`).
    let store = &svc.store;
    let known = async {
        Ok::<_, Failure>((
            links::known_many(store, halo, &CUSTOMER, &accounts).await?,
            links::known_many(store, halo, &SUBSCRIPTION, &subs).await?,
            links::known_many(store, halo, &RECURRING_INVOICE, &accounts).await?,
            store.subscription_lines(&conn).get_many(&subs).await?,
        ))
    }
    .await;
    let (customers, licences, invoices, cached) = match known {
        Ok(k) => k,
        // Redis or HaloPSA cannot answer: the one-event path meets the
        // same error and settles each event with it.
        Err(f) => {
            tracing::info!(error = %f, size = events.len(), "the batch's identities could not be resolved; each event goes on its own");
            return results;
        }
    };

    // 3. Warm (known throughout) and new (known absent); superseded ones
    //    are done at once; the rest goes the one-event way.
    let mut warm: Vec<(usize, Warm)> = Vec::new();
    let mut new: Vec<(usize, New)> = Vec::new();
    for (n, (i, data, version, terms)) in parsed.into_iter().enumerate() {
        let customer = match &customers[n] {
            Known::Mapped(c) => c.clone(),
            // Not there yet: wait for the account worker, without a
            // request (and in the shortest tier, so that the events come
            // back together and are created in one batch).
            Known::Absent => {
                let recheck = svc.config().retry.dependency_recheck;
                let missing = format!(
                    "account {} is not in HaloPSA yet (no customer linked to it); retried until the account event has been applied",
                    data.account_id
                );
                let f =
                    links::still_absent(store, halo, &CUSTOMER, &data.account_id, recheck, missing)
                        .await;
                results[i] = Some(Err(f));
                continue;
            }
            // The account worker is creating it right now: wait for it
            // (no request, no attempt).
            Known::Creating => {
                let mut f = Failure::dependency(format!(
                    "account {} is being created in HaloPSA right now; retried once it is",
                    data.account_id
                ));
                f.throttled = true;
                results[i] = Some(Err(f));
                continue;
            }
            // Redis is unsure: the one-event path asks HaloPSA.
            Known::Unsure => continue,
        };
        let marker = links::marker(&SUBSCRIPTION, &data.subscription_id);
        match (&licences[n], &invoices[n]) {
            (Known::Mapped(licence), inv) => {
                if licence
                    .version()
                    .is_some_and(|applied| version.is_superseded_by(&applied))
                {
                    results[i] = Some(Ok(Outcome::Superseded));
                    continue;
                }
                // A licence whose link or version was never written, a line
                // not cached, or cached on another invoice (the
                // subscription moved account): the one-event path knows.
                let (Known::Mapped(inv), Some(line)) = (inv, &cached[n]) else {
                    continue;
                };
                if licence.link_id.is_none()
                    || licence.version.is_none()
                    || line.ihid != inv.halo_id
                {
                    continue;
                }
                warm.push((
                    i,
                    Warm {
                        data,
                        version,
                        terms,
                        item_id: 0,
                        customer_id: customer.halo_id,
                        licence: licence.clone(),
                        ihid: inv.halo_id,
                        line: line.line,
                        marker,
                    },
                ));
            }
            // New; its invoice known, or known absent (created with it).
            (Known::Absent, inv @ (Known::Mapped(_) | Known::Absent)) => new.push((
                i,
                New {
                    data,
                    version,
                    terms,
                    item_id: 0,
                    customer_id: customer.halo_id,
                    ihid: match inv {
                        Known::Mapped(m) => Some(m.halo_id),
                        _ => None,
                    },
                    marker,
                },
            )),
            _ => {}
        }
    }
    tracing::debug!(
        size = events.len(),
        known = warm.len(),
        new = new.len(),
        "the batch takes these itself; the rest goes one by one"
    );
    if warm.is_empty() && new.is_empty() {
        return results;
    }

    // Items were resolved first (step 1b).
    for (_, w) in warm.iter_mut() {
        w.item_id = item_ids.get(&w.data.product.sku).copied().unwrap_or(0);
    }
    for (_, w) in new.iter_mut() {
        w.item_id = item_ids.get(&w.data.product.sku).copied().unwrap_or(0);
    }

    for chunk in warm.chunks(ARRAY_MAX) {
        apply_chunk(svc, halo, chunk, &mut results).await;
    }
    if !new.is_empty() {
        create(svc, halo, new, &mut results).await;
    }
    results
}

/// New subscriptions: licences in arrays, then their lines (added in
/// arrays to the invoices HaloPSA has, or inside the invoice headers
/// created in arrays for customers that have none), then the links with
/// the applied version, last, so that a version never claims more than
/// HaloPSA holds. Every id is marked unsure before its create is sent; an
/// event whose step did not finish cleanly (refused in part, answer lost)
/// stops there and goes the one-event way, which asks HaloPSA what was
/// saved (a licence by its marker, a line by its marker on the header),
/// so nothing is created twice. Adds go through `halo::lines::add`, which
/// reads back what a failed array saved.
async fn create(
    svc: &Services,
    halo: &HaloClient,
    new: Vec<(usize, New)>,
    results: &mut [Option<Result<Outcome, Failure>>],
) {
    let conn = halo.connection().name.clone();
    let store = &svc.store;
    let mut new_headers: Vec<String> = new
        .iter()
        .filter(|(_, w)| w.ihid.is_none())
        .map(|(_, w)| w.data.account_id.clone())
        .collect();
    new_headers.sort();
    new_headers.dedup();
    // A customer's invoice is shared by all its subscriptions, each under
    // its own aggregate lock: it is created under the invoice's own lock
    // (the one `halo::lines::recurring_invoice` takes), and only if it is
    // still absent once that lock is held. An invoice another worker is
    // busy with leaves its events to the one-event path, which waits for it.
    let lock_ttl = svc.config().worker.lock_ttl;
    let mut header_locks = Vec::new();
    let mut blocked: Vec<String> = Vec::new();
    for account in &new_headers {
        let lock = store
            .lock(
                &conn,
                &RECURRING_INVOICE.create_lock(account),
                lock_ttl,
                std::time::Duration::from_millis(50),
            )
            .await;
        match lock {
            Ok(l) => header_locks.push(l),
            Err(_) => blocked.push(account.clone()),
        }
    }
    match store
        .known(&conn, RECURRING_INVOICE.name, &new_headers)
        .await
    {
        Ok(k) => {
            for (n, account) in new_headers.iter().enumerate() {
                if k.mappings[n].is_some() || k.unsure[n] || k.creating[n] {
                    blocked.push(account.clone());
                }
            }
        }
        Err(_) => blocked.extend(new_headers.iter().cloned()),
    }
    let new: Vec<(usize, New)> = new
        .into_iter()
        .filter(|(_, w)| w.ihid.is_some() || !blocked.contains(&w.data.account_id))
        .collect();
    new_headers.retain(|a| !blocked.contains(a));
    create_under_locks(svc, halo, new, new_headers, results).await;
    for l in header_locks {
        if let Err(e) = l.release().await {
            tracing::warn!(error = %e, "could not release an invoice lock; it expires on its own");
        }
    }
}

async fn create_under_locks(
    svc: &Services,
    halo: &HaloClient,
    new: Vec<(usize, New)>,
    new_headers: Vec<String>,
    results: &mut [Option<Result<Outcome, Failure>>],
) {
    let conn = halo.connection().name.clone();
    let store = &svc.store;
    let subs: Vec<String> = new
        .iter()
        .map(|(_, w)| w.data.subscription_id.clone())
        .collect();
    let marked = async {
        let window = svc.config().worker.http_timeout;
        store
            .creating(&conn, SUBSCRIPTION.name, &subs, window)
            .await?;
        store
            .creating(&conn, RECURRING_INVOICE.name, &new_headers, window)
            .await
    }
    .await;
    if let Err(e) = marked {
        let f: Failure = e.into();
        for (i, _) in &new {
            results[*i] = Some(Err(f.clone()));
        }
        return;
    }
    let policy = halo.connection();

    // Licences.
    let mut licence: HashMap<usize, i64> = HashMap::new();
    for (c, chunk) in new.chunks(ARRAY_MAX).enumerate() {
        let bodies: Result<Vec<Value>, Failure> = chunk
            .iter()
            .map(|(_, w)| licence_record(&w.data, &w.terms, w.customer_id, None, &w.marker, policy))
            .collect();
        // A value the model cannot hold: the one-event path fails the one
        // event it is.
        let Ok(bodies) = bodies else { continue };
        let saved = match halo.post_each("/SoftwareLicence", bodies).await {
            Ok(rows) => rows,
            Err(None) => continue,
            Err(Some(e)) => {
                if lines::settle_array_failure(
                    e,
                    "licence",
                    chunk.iter().map(|(i, _)| *i),
                    |i, f| results[i] = Some(Err(f)),
                ) {
                    let ids: Vec<String> = chunk
                        .iter()
                        .map(|(_, w)| w.data.subscription_id.clone())
                        .collect();
                    let _ = store.not_created(&conn, SUBSCRIPTION.name, &ids).await;
                }
                continue;
            }
        };
        for (k, row) in saved.iter().enumerate() {
            if let Some(id) = record_id(row) {
                licence.insert(c * ARRAY_MAX + k, id);
            }
        }
    }
    // Remembered at once (no version: it claims nothing applied), so that
    // a retry after a later step finds them without asking HaloPSA.
    let remembered: Vec<(String, Mapping)> = new
        .iter()
        .enumerate()
        .filter_map(|(k, (_, w))| {
            licence.get(&k).map(|&id| {
                (
                    w.data.subscription_id.clone(),
                    Mapping {
                        halo_id: id,
                        link_id: None,
                        version: None,
                    },
                )
            })
        })
        .collect();
    let pairs: Vec<(&str, &Mapping)> = remembered.iter().map(|(s, m)| (s.as_str(), m)).collect();
    if let Err(e) = store.set_mappings(&conn, SUBSCRIPTION.name, &pairs).await {
        let f: Failure = e.into();
        for (i, _) in &new {
            results[*i] = Some(Err(f.clone()));
        }
        return;
    }

    // Lines on invoices HaloPSA has: one add array, invoices mixed.
    let mut line: HashMap<usize, (i64, Option<i64>)> = HashMap::new();
    let adds: Vec<(usize, Value)> = new
        .iter()
        .enumerate()
        .filter(|(k, _)| licence.contains_key(k))
        .filter_map(|(k, (_, w))| {
            w.ihid.and_then(|ihid| {
                new_line(&w.data, &w.terms, Some(ihid), w.item_id, &w.marker)
                    .ok()
                    .map(|l| (k, l))
            })
        })
        .collect();
    let ihid_of: HashMap<usize, i64> = adds
        .iter()
        .filter_map(|(k, b)| b.get("ihid").and_then(Value::as_i64).map(|h| (*k, h)))
        .collect();
    for (k, r) in lines::add(halo, Invoice::Recurring, adds).await {
        match r {
            Ok(saved) => {
                if let Some(&ihid) = ihid_of.get(&k) {
                    line.insert(k, (ihid, saved.as_ref().and_then(record_id)));
                }
            }
            // A line HaloPSA refuses: the one-event path meets it again and
            // dead-letters it with HaloPSA's message.
            Err(f) if f.class == FailureClass::Rejected => {}
            Err(f) => results[new[k].0] = Some(Err(f)),
        }
    }

    // Invoices for customers that have none, each with its first lines.
    let mut by_account: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (k, (_, w)) in new.iter().enumerate() {
        if w.ihid.is_none() && licence.contains_key(&k) {
            by_account
                .entry(w.data.account_id.as_str())
                .or_default()
                .push(k);
        }
    }
    let headers: Vec<(&str, Vec<usize>)> = by_account.into_iter().collect();
    let mut invoices: Vec<(String, Mapping)> = Vec::new();
    let mut scanned: Vec<i64> = Vec::new();
    for chunk in headers.chunks(ARRAY_MAX) {
        let bodies: Result<Vec<Value>, Failure> = chunk
            .iter()
            .map(|(account, ks)| {
                let w = &new[ks[0]].1;
                let mut header = body(&InvoiceHeader {
                    new_external_link: Some(links::new_plain_link(&RECURRING_INVOICE, account)),
                    ..lines::recurring_invoice_record(w.customer_id, account)
                })?;
                let first_lines = ks
                    .iter()
                    .map(|&k| {
                        let w = &new[k].1;
                        new_line(&w.data, &w.terms, None, w.item_id, &w.marker)
                    })
                    .collect::<Result<Vec<Value>, Failure>>()?;
                if let Some(h) = header.as_object_mut() {
                    h.insert("lines".into(), Value::Array(first_lines));
                }
                Ok(header)
            })
            .collect();
        let Ok(bodies) = bodies else { continue };
        let saved = match halo.post_each("/RecurringInvoice", bodies).await {
            Ok(rows) => rows,
            Err(None) => continue,
            Err(Some(e)) => {
                let events = chunk
                    .iter()
                    .flat_map(|(_, ks)| ks.iter().map(|&k| new[k].0));
                if lines::settle_array_failure(e, "invoice", events, |i, f| {
                    results[i] = Some(Err(f))
                }) {
                    let ids: Vec<String> = chunk.iter().map(|(a, _)| a.to_string()).collect();
                    let _ = store.not_created(&conn, RECURRING_INVOICE.name, &ids).await;
                }
                continue;
            }
        };
        for ((account, ks), row) in chunk.iter().zip(&saved) {
            let (Some(ihid), Some(link)) = (
                record_id(row),
                links::own_link(row, &RECURRING_INVOICE, account),
            ) else {
                continue;
            };
            tracing::info!(
                halo_id = ihid,
                account,
                "created the customer's halosync recurring invoice with its first lines"
            );
            invoices.push((
                account.to_string(),
                Mapping {
                    halo_id: ihid,
                    link_id: Some(link),
                    version: None,
                },
            ));
            scanned.push(ihid);
            for &k in ks {
                // Only a line the answer shows is taken as saved.
                if let Some(id) = lines::carrying(row, &new[k].1.marker)
                    .first()
                    .and_then(|l| record_id(l))
                {
                    line.insert(k, (ihid, Some(id)));
                }
            }
        }
    }
    let pairs: Vec<(&str, &Mapping)> = invoices.iter().map(|(a, m)| (a.as_str(), m)).collect();
    if let Err(e) = store
        .set_mappings(&conn, RECURRING_INVOICE.name, &pairs)
        .await
    {
        tracing::warn!(error = %e, "could not remember the new invoices; they are looked up again");
    }
    // A new invoice has no usage line: the usage worker need not read it.
    invoice::seed_usage_scanned(svc, &conn, &scanned).await;

    // Versions last, in link arrays.
    let done: Vec<usize> = {
        let mut d: Vec<usize> = line.keys().copied().collect();
        d.sort_unstable();
        d
    };
    for chunk in done.chunks(ARRAY_MAX) {
        let bodies = chunk
            .iter()
            .map(|&k| {
                let w = &new[k].1;
                body(&links::link_record(
                    &SUBSCRIPTION,
                    &w.data.subscription_id,
                    licence[&k],
                    None,
                    Some(&w.version),
                ))
            })
            .collect::<Result<Vec<Value>, Failure>>();
        let Ok(bodies) = bodies else { continue };
        let saved = match halo.post_each("/ExternalLink", bodies).await {
            Ok(rows) => rows,
            Err(None) => continue,
            Err(Some(e)) => {
                lines::settle_array_failure(
                    e,
                    "version",
                    chunk.iter().map(|&k| new[k].0),
                    |i, f| results[i] = Some(Err(f)),
                );
                continue;
            }
        };
        let mut maps: Vec<(String, Mapping)> = Vec::new();
        let mut cache: Vec<(String, SubscriptionLine)> = Vec::new();
        let mut applied: Vec<usize> = Vec::new();
        for (&k, row) in chunk.iter().zip(&saved) {
            let Some(link) = record_id(row) else { continue };
            let w = &new[k].1;
            maps.push((
                w.data.subscription_id.clone(),
                Mapping {
                    halo_id: licence[&k],
                    link_id: Some(link),
                    version: Some(w.version.encode()),
                },
            ));
            if let Some((ihid, Some(l))) = line.get(&k) {
                cache.push((
                    w.data.subscription_id.clone(),
                    SubscriptionLine {
                        ihid: *ihid,
                        line: *l,
                    },
                ));
            }
            applied.push(k);
        }
        let pairs: Vec<(&str, &Mapping)> = maps.iter().map(|(s, m)| (s.as_str(), m)).collect();
        let r = async {
            store.set_mappings(&conn, SUBSCRIPTION.name, &pairs).await?;
            store.subscription_lines(&conn).set_many(&cache).await
        }
        .await
        .map_err(Failure::from);
        for k in applied {
            tracing::info!(halo_id = licence[&k], subscription = %new[k].1.data.subscription_id, "created the licence and its line");
            results[new[k].0] = Some(r.clone().map(|_| Outcome::Applied));
        }
    }
}

/// One array of at most [`ARRAY_MAX`] of each: licences, then lines
/// carrying the version.
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
    let bodies: Result<Vec<Value>, Failure> = chunk
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
    // A value the model cannot hold: the one-event path fails the one
    // event it is.
    let Ok(bodies) = bodies else { return };
    if let Err(e) = halo.post("/SoftwareLicence", bodies).await {
        lines::settle_array_failure(e, "licence", chunk.iter().map(|(i, _)| *i), |i, f| {
            results[i] = Some(Err(f))
        });
        return;
    }

    // Lines: merged by id, split to isolate a refused one.
    let bodies: Vec<(usize, Value)> = chunk
        .iter()
        .enumerate()
        .filter_map(|(k, (_, w))| {
            line_update(
                &w.data, &w.terms, w.ihid, w.line, w.item_id, &w.marker, policy,
            )
            .ok()
            .map(|l| (k, l))
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
                let forgot = svc
                    .store
                    .subscription_lines(&policy.name)
                    .forget(&w.data.subscription_id)
                    .await;
                if let Err(e) = forgot {
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

    // The version rode on the line (`mapping` module doc): Redis records
    // it, no further request.
    let mut pipe_mappings: Vec<(String, Mapping)> = Vec::with_capacity(written.len());
    for &k in &written {
        let w = &chunk[k].1;
        let mut m = w.licence.clone();
        m.version = Some(w.version.encode());
        pipe_mappings.push((w.data.subscription_id.clone(), m));
    }
    let refs: Vec<(&str, &Mapping)> = pipe_mappings.iter().map(|(s, m)| (s.as_str(), m)).collect();
    let r = svc
        .store
        .set_mappings(&policy.name, SUBSCRIPTION.name, &refs)
        .await
        .map(|_| Outcome::Applied)
        .map_err(Failure::from);
    for k in written {
        results[chunk[k].0] = Some(r.clone());
    }
}
