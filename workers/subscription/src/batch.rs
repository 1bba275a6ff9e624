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
//! Everything else is left open and goes the one-event way
//! ([`crate::handler`]), which
//! handles each case on its own and was tested for it: a customer not there
//! yet (a throttled dependency wait), a licence or line Redis does not know
//! (found again from HaloPSA, or created), a subscription that moved to
//! another account (its cached line is on another invoice), and any array
//! that does not finish cleanly. Every write here sets absolute values (a
//! merge by id), so sending one again on that path is harmless; nothing is
//! *added* here, so a partly saved or unanswered array can never leave a
//! duplicate.

use std::collections::{BTreeMap, HashMap};

use halosync_shared::contract::Product;
use halosync_shared::halo::lines::{self, Invoice};
use halosync_shared::halo::links::{self, Known, CUSTOMER, RECURRING_INVOICE, SUBSCRIPTION};
use halosync_shared::halo::models::{body, InvoiceHeader};
use halosync_shared::halo::{record_id, HaloClient, HaloError};
use halosync_shared::runtime::{Batch, Open, Outcome, Services};
use halosync_shared::store::{Mapping, SubscriptionLine};
use halosync_shared::{Failure, FailureClass};
use serde_json::Value;

use crate::handler::Work;
use crate::invoice;
use crate::mapping::{licence_record, line_update, new_line};

/// The most records one array POST carries (HaloPSA documents no limit,
/// UNCONFIRMED; 100 is the page size it serves and keeps a refused array
/// cheap).
const ARRAY_MAX: usize = 100;

/// One event the batch may apply itself: all of it known.
struct Warm<'a> {
    open: Open<'a, Work>,
    item_id: i64,
    customer_id: i64,
    licence: Mapping,
    ihid: i64,
    line: i64,
    marker: String,
}

/// A subscription HaloPSA does not have yet (known absent, its customer
/// known): created in arrays by [`create`].
struct New<'a> {
    open: Open<'a, Work>,
    item_id: i64,
    customer_id: i64,
    /// The customer's invoice, or `None` when it has none yet: then it is
    /// created in the same array as its first lines.
    ihid: Option<i64>,
    marker: String,
}

/// A new subscription whose licence HaloPSA saved.
struct Licensed<'a> {
    new: New<'a>,
    licence: i64,
}

/// A new subscription whose line HaloPSA saved too, on invoice `ihid`
/// (the line's id when the answer gave it).
struct Lined<'a> {
    licensed: Licensed<'a>,
    ihid: i64,
    line: Option<i64>,
}

/// Applies what it can of the batch (one connection, one event per
/// subscription, all locks held by the runtime); what it leaves open goes
/// the one-event path.
pub(crate) async fn apply(svc: &Services, halo: &HaloClient, batch: &mut Batch<Work>) {
    let conn = halo.connection().name.clone();
    let open: Vec<Open<'_, Work>> = batch.open().collect();
    let size = open.len();

    // 1. The products, before any licence or link is written: a usage or
    //    overage event that finds a subscription's link finds its product
    //    too, and never lists the customer's licences for it.
    let products: Vec<(&str, &Product)> = open
        .iter()
        .map(|w| {
            let d = &w.event.data;
            (d.subscription_id.as_str(), &d.product)
        })
        .collect();
    invoice::seed_products(svc, &conn, &products).await;
    // 1b. Item mappings, once per sku (the config's, else HaloPSA's,
    //     cached), before anything else: an unmapped sku is dead-lettered
    //     at once, whatever else is missing, as on the one-event path.
    let mut items: HashMap<String, Result<i64, Failure>> = HashMap::new();
    let mut mapped: Vec<(Open<'_, Work>, i64)> = Vec::with_capacity(open.len());
    for w in open {
        let sku = &w.event.data.product.sku;
        let item = match items.get(sku) {
            Some(item) => item.clone(),
            None => {
                let item = crate::handler::item_for(svc, halo, sku).await;
                items.insert(sku.clone(), item.clone());
                item
            }
        };
        match item {
            Ok(item_id) => mapped.push((w, item_id)),
            Err(f) => w.settle(Err(f)),
        }
    }
    let subs: Vec<String> = mapped
        .iter()
        .map(|(w, _)| w.event.data.subscription_id.clone())
        .collect();
    let accounts: Vec<String> = mapped
        .iter()
        .map(|(w, _)| w.event.data.account_id.clone())
        .collect();

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
            tracing::info!(error = %f, size, "the batch's identities could not be resolved; each event goes on its own");
            return;
        }
    };

    // 3. Warm (known throughout) and new (known absent); superseded ones
    //    are done at once; the rest goes the one-event way.
    let mut warm: Vec<Warm<'_>> = Vec::new();
    let mut new: Vec<New<'_>> = Vec::new();
    let known = customers
        .into_iter()
        .zip(licences)
        .zip(invoices)
        .zip(cached);
    for ((w, item_id), (((customer, licence), inv), line)) in mapped.into_iter().zip(known) {
        let data = &w.event.data;
        let customer = match customer {
            Known::Mapped(c) => c,
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
                w.settle(Err(f));
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
                w.settle(Err(f));
                continue;
            }
            // Redis is unsure: the one-event path asks HaloPSA.
            Known::Unsure => continue,
        };
        let marker = links::marker(&SUBSCRIPTION, &data.subscription_id);
        match (licence, inv) {
            (Known::Mapped(licence), inv) => {
                if licence
                    .version()
                    .is_some_and(|applied| w.event.version.is_superseded_by(&applied))
                {
                    w.settle(Ok(Outcome::Superseded));
                    continue;
                }
                // A licence whose link or version was never written, a line
                // not cached, or cached on another invoice (the
                // subscription moved account): the one-event path knows.
                let (Known::Mapped(inv), Some(line)) = (inv, line) else {
                    continue;
                };
                if licence.link_id.is_none()
                    || licence.version.is_none()
                    || line.ihid != inv.halo_id
                {
                    continue;
                }
                warm.push(Warm {
                    open: w,
                    item_id,
                    customer_id: customer.halo_id,
                    licence,
                    ihid: inv.halo_id,
                    line: line.line,
                    marker,
                });
            }
            // New; its invoice known, or known absent (created with it).
            (Known::Absent, inv @ (Known::Mapped(_) | Known::Absent)) => new.push(New {
                open: w,
                item_id,
                customer_id: customer.halo_id,
                ihid: match inv {
                    Known::Mapped(m) => Some(m.halo_id),
                    _ => None,
                },
                marker,
            }),
            _ => {}
        }
    }
    tracing::debug!(
        size,
        known = warm.len(),
        new = new.len(),
        "the batch takes these itself; the rest goes one by one"
    );
    while !warm.is_empty() {
        let chunk = warm.drain(..warm.len().min(ARRAY_MAX)).collect();
        apply_chunk(svc, halo, chunk).await;
    }
    if !new.is_empty() {
        create(svc, halo, new).await;
    }
}

/// Settles the events of a failed array ([`lines::settle_array_failure`]);
/// returns whether HaloPSA saved nothing.
fn array_failed<'a>(
    e: HaloError,
    what: &str,
    events: impl IntoIterator<Item = Open<'a, Work>>,
) -> bool {
    lines::settle_array_failure(e, what, events, |w, f| w.settle(Err(f)))
}

/// New subscriptions: licences in arrays, then their lines (added in
/// arrays to the invoices HaloPSA has, or inside the invoice headers
/// created in arrays for customers that have none), then the links with
/// the applied version, last, so that a version never claims more than
/// HaloPSA holds. Every id is marked unsure before its create is sent; an
/// event whose step did not finish cleanly (refused in part, answer lost)
/// stops there, open, and goes the one-event way, which asks HaloPSA what
/// was saved (a licence by its marker, a line by its marker on the
/// header), so nothing is created twice. Adds go through
/// `halo::lines::add`, which reads back what a failed array saved.
async fn create(svc: &Services, halo: &HaloClient, new: Vec<New<'_>>) {
    let conn = halo.connection().name.clone();
    let store = &svc.store;
    let mut new_headers: Vec<String> = new
        .iter()
        .filter(|w| w.ihid.is_none())
        .map(|w| w.open.event.data.account_id.clone())
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
    let new: Vec<New<'_>> = new
        .into_iter()
        .filter(|w| w.ihid.is_some() || !blocked.contains(&w.open.event.data.account_id))
        .collect();
    new_headers.retain(|a| !blocked.contains(a));
    create_under_locks(svc, halo, new, new_headers).await;
    for l in header_locks {
        if let Err(e) = l.release().await {
            tracing::warn!(error = %e, "could not release an invoice lock; it expires on its own");
        }
    }
}

async fn create_under_locks(
    svc: &Services,
    halo: &HaloClient,
    mut new: Vec<New<'_>>,
    new_headers: Vec<String>,
) {
    let conn = halo.connection().name.clone();
    let store = &svc.store;
    let subs: Vec<String> = new
        .iter()
        .map(|w| w.open.event.data.subscription_id.clone())
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
        for w in new {
            w.open.settle(Err(f.clone()));
        }
        return;
    }
    let policy = halo.connection();

    // Licences.
    let mut licensed: Vec<Licensed<'_>> = Vec::with_capacity(new.len());
    while !new.is_empty() {
        let chunk: Vec<New<'_>> = new.drain(..new.len().min(ARRAY_MAX)).collect();
        let bodies: Result<Vec<Value>, Failure> = chunk
            .iter()
            .map(|w| {
                let (data, terms) = (&w.open.event.data, &w.open.terms);
                licence_record(data, terms, w.customer_id, None, &w.marker, policy)
            })
            .collect();
        // A value the model cannot hold: the one-event path fails the one
        // event it is.
        let Ok(bodies) = bodies else { continue };
        let saved = match halo.post_each("/SoftwareLicence", bodies).await {
            Ok(rows) => rows,
            Err(None) => continue,
            Err(Some(e)) => {
                let ids: Vec<String> = chunk
                    .iter()
                    .map(|w| w.open.event.data.subscription_id.clone())
                    .collect();
                if array_failed(e, "licence", chunk.into_iter().map(|w| w.open)) {
                    let _ = store.not_created(&conn, SUBSCRIPTION.name, &ids).await;
                }
                continue;
            }
        };
        for (w, row) in chunk.into_iter().zip(&saved) {
            if let Some(licence) = record_id(row) {
                licensed.push(Licensed { new: w, licence });
            }
        }
    }
    // Remembered at once (no version: it claims nothing applied), so that
    // a retry after a later step finds them without asking HaloPSA.
    let remembered: Vec<(&str, Mapping)> = licensed
        .iter()
        .map(|l| {
            let mapping = Mapping {
                halo_id: l.licence,
                link_id: None,
                version: None,
            };
            (l.new.open.event.data.subscription_id.as_str(), mapping)
        })
        .collect();
    let pairs: Vec<(&str, &Mapping)> = remembered.iter().map(|(s, m)| (*s, m)).collect();
    if let Err(e) = store.set_mappings(&conn, SUBSCRIPTION.name, &pairs).await {
        let f: Failure = e.into();
        for l in licensed {
            l.new.open.settle(Err(f.clone()));
        }
        return;
    }

    // Lines on invoices HaloPSA has: one add array, invoices mixed; the
    // others go into the invoices created below.
    let mut lined: Vec<Lined<'_>> = Vec::with_capacity(licensed.len());
    let mut adds: Vec<((Licensed<'_>, i64), Value)> = Vec::new();
    // account -> (its customer, its new subscriptions)
    let mut by_account: BTreeMap<String, (i64, Vec<Licensed<'_>>)> = BTreeMap::new();
    for l in licensed {
        let w = &l.new;
        let (data, terms) = (&w.open.event.data, &w.open.terms);
        match w.ihid {
            Some(ihid) => {
                if let Ok(line) = new_line(data, terms, Some(ihid), w.item_id, &w.marker) {
                    adds.push(((l, ihid), line));
                }
            }
            None => by_account
                .entry(data.account_id.clone())
                .or_insert_with(|| (w.customer_id, Vec::new()))
                .1
                .push(l),
        }
    }
    for ((l, ihid), r) in lines::add(halo, Invoice::Recurring, adds).await {
        match r {
            Ok(saved) => lined.push(Lined {
                line: saved.as_ref().and_then(record_id),
                licensed: l,
                ihid,
            }),
            // A line HaloPSA refuses: the one-event path meets it again and
            // dead-letters it with HaloPSA's message.
            Err(f) if f.class == FailureClass::Rejected => {}
            Err(f) => l.new.open.settle(Err(f)),
        }
    }

    // Invoices for customers that have none, each with its first lines.
    let mut headers: Vec<(String, (i64, Vec<Licensed<'_>>))> = by_account.into_iter().collect();
    let mut invoices: Vec<(String, Mapping)> = Vec::new();
    let mut scanned: Vec<i64> = Vec::new();
    while !headers.is_empty() {
        let chunk: Vec<(String, (i64, Vec<Licensed<'_>>))> =
            headers.drain(..headers.len().min(ARRAY_MAX)).collect();
        let bodies: Result<Vec<Value>, Failure> = chunk
            .iter()
            .map(|(account, (customer_id, group))| invoice_with_lines(account, *customer_id, group))
            .collect();
        let Ok(bodies) = bodies else { continue };
        let saved = match halo.post_each("/RecurringInvoice", bodies).await {
            Ok(rows) => rows,
            Err(None) => continue,
            Err(Some(e)) => {
                let ids: Vec<String> = chunk.iter().map(|(a, _)| a.clone()).collect();
                let events = chunk
                    .into_iter()
                    .flat_map(|(_, (_, group))| group.into_iter().map(|l| l.new.open));
                if array_failed(e, "invoice", events) {
                    let _ = store.not_created(&conn, RECURRING_INVOICE.name, &ids).await;
                }
                continue;
            }
        };
        for ((account, (_, group)), row) in chunk.into_iter().zip(&saved) {
            let (Some(ihid), Some(link)) = (
                record_id(row),
                links::own_link(row, &RECURRING_INVOICE, &account),
            ) else {
                continue;
            };
            tracing::info!(
                halo_id = ihid,
                account,
                "created the customer's halosync recurring invoice with its first lines"
            );
            let mapping = Mapping {
                halo_id: ihid,
                link_id: Some(link),
                version: None,
            };
            invoices.push((account, mapping));
            scanned.push(ihid);
            for l in group {
                // Only a line the answer shows is taken as saved.
                if let Some(line) = lines::carrying(row, &l.new.marker)
                    .first()
                    .and_then(|line| record_id(line))
                {
                    lined.push(Lined {
                        licensed: l,
                        ihid,
                        line: Some(line),
                    });
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
    while !lined.is_empty() {
        let chunk: Vec<Lined<'_>> = lined.drain(..lined.len().min(ARRAY_MAX)).collect();
        write_versions(svc, halo, chunk).await;
    }
}

/// The recurring invoice of `account` (none yet) for its customer, with
/// the first lines of its new subscriptions inside and its link.
fn invoice_with_lines(
    account: &str,
    customer_id: i64,
    group: &[Licensed<'_>],
) -> Result<Value, Failure> {
    let mut header = body(&InvoiceHeader {
        new_external_link: Some(links::new_plain_link(&RECURRING_INVOICE, account)),
        ..lines::recurring_invoice_record(customer_id, account)
    })?;
    let first_lines = group
        .iter()
        .map(|l| {
            let w = &l.new;
            new_line(
                &w.open.event.data,
                &w.open.terms,
                None,
                w.item_id,
                &w.marker,
            )
        })
        .collect::<Result<Vec<Value>, Failure>>()?;
    if let Some(h) = header.as_object_mut() {
        h.insert("lines".into(), Value::Array(first_lines));
    }
    Ok(header)
}

/// The links of new subscriptions whose licence and line are saved, with
/// the applied version, in one array; then Redis.
async fn write_versions(svc: &Services, halo: &HaloClient, chunk: Vec<Lined<'_>>) {
    let conn = &halo.connection().name;
    let store = &svc.store;
    let bodies = chunk
        .iter()
        .map(|l| {
            let event = &l.licensed.new.open.event;
            body(&links::link_record(
                &SUBSCRIPTION,
                &event.data.subscription_id,
                l.licensed.licence,
                None,
                Some(&event.version),
            ))
        })
        .collect::<Result<Vec<Value>, Failure>>();
    let Ok(bodies) = bodies else { return };
    let saved = match halo.post_each("/ExternalLink", bodies).await {
        Ok(rows) => rows,
        Err(None) => return,
        Err(Some(e)) => {
            array_failed(e, "version", chunk.into_iter().map(|l| l.licensed.new.open));
            return;
        }
    };
    let mut maps: Vec<(String, Mapping)> = Vec::new();
    let mut cache: Vec<(String, SubscriptionLine)> = Vec::new();
    let mut applied: Vec<Lined<'_>> = Vec::new();
    for (l, row) in chunk.into_iter().zip(&saved) {
        let Some(link) = record_id(row) else { continue };
        let event = &l.licensed.new.open.event;
        let sub = &event.data.subscription_id;
        maps.push((
            sub.clone(),
            Mapping {
                halo_id: l.licensed.licence,
                link_id: Some(link),
                version: Some(event.version.encode()),
            },
        ));
        if let Some(line) = l.line {
            cache.push((sub.clone(), SubscriptionLine { ihid: l.ihid, line }));
        }
        applied.push(l);
    }
    let pairs: Vec<(&str, &Mapping)> = maps.iter().map(|(s, m)| (s.as_str(), m)).collect();
    let r = async {
        store.set_mappings(conn, SUBSCRIPTION.name, &pairs).await?;
        store.subscription_lines(conn).set_many(&cache).await
    }
    .await
    .map_err(Failure::from);
    for l in applied {
        let open = l.licensed.new.open;
        tracing::info!(halo_id = l.licensed.licence, subscription = %open.event.data.subscription_id, "created the licence and its line");
        open.settle(r.clone().map(|_| Outcome::Applied));
    }
}

/// One array of at most [`ARRAY_MAX`] of each: licences, then lines
/// carrying the version.
async fn apply_chunk(svc: &Services, halo: &HaloClient, chunk: Vec<Warm<'_>>) {
    let policy = halo.connection();
    // Licences. A failed array (refused in part, lost answer) leaves all
    // its events to the one-event path: updates merge, resending is
    // harmless, and that path tells a stale mapping from a real refusal.
    let bodies: Result<Vec<Value>, Failure> = chunk
        .iter()
        .map(|w| {
            licence_record(
                &w.open.event.data,
                &w.open.terms,
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
        array_failed(e, "licence", chunk.into_iter().map(|w| w.open));
        return;
    }

    // Lines: merged by id, split to isolate a refused one.
    let bodies: Vec<(Warm<'_>, Value)> = chunk
        .into_iter()
        .filter_map(|w| {
            let (data, terms) = (&w.open.event.data, &w.open.terms);
            let line = line_update(data, terms, w.ihid, w.line, w.item_id, &w.marker, policy);
            line.ok().map(|l| (w, l))
        })
        .collect();
    let mut written: Vec<Warm<'_>> = Vec::new();
    for (w, r) in lines::update(halo, Invoice::Recurring, bodies).await {
        match r {
            Ok(_) => written.push(w),
            // A cached line HaloPSA refuses (the MSP deleted it): the one
            // policy of every family, the cache dropped and the event
            // retried from the invoice's lines, on the one-event path.
            Err(f) if f.class == FailureClass::Rejected => {
                let forgot = svc
                    .store
                    .subscription_lines(&policy.name)
                    .forget(&w.open.event.data.subscription_id)
                    .await;
                if let Err(e) = forgot {
                    w.open.settle(Err(e.into()));
                }
            }
            Err(f) => w.open.settle(Err(f)),
        }
    }
    if written.is_empty() {
        return;
    }

    // The version rode on the line (`mapping` module doc): Redis records
    // it, no further request.
    let mappings: Vec<(&str, Mapping)> = written
        .iter()
        .map(|w| {
            let mut m = w.licence.clone();
            m.version = Some(w.open.event.version.encode());
            (w.open.event.data.subscription_id.as_str(), m)
        })
        .collect();
    let refs: Vec<(&str, &Mapping)> = mappings.iter().map(|(s, m)| (*s, m)).collect();
    let r = svc
        .store
        .set_mappings(&policy.name, SUBSCRIPTION.name, &refs)
        .await
        .map(|_| Outcome::Applied)
        .map_err(Failure::from);
    for w in written {
        w.open.settle(r.clone());
    }
}
