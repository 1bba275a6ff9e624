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

use std::collections::BTreeMap;
use std::collections::HashMap;

use halosync_shared::contract::Product;
use halosync_shared::engine::identity::{Pending, Step, ARRAY_MAX};
use halosync_shared::halo::lines::{self, Invoice};
use halosync_shared::halo::links::{self, Known, CUSTOMER, RECURRING_INVOICE};
use halosync_shared::halo::models::{body, InvoiceHeader};
use halosync_shared::halo::{record_id, HaloClient};
use halosync_shared::runtime::{Open, Outcome, Services};
use halosync_shared::store::{Mapping, SubscriptionLine};
use halosync_shared::{Failure, FailureClass};
use serde_json::Value;

use crate::handler::engine;
use crate::invoice;
use crate::mapping::{line_update, new_line, Work};

/// One event the batch may apply itself: all of it known (its licence's
/// mapping goes beside it through the identity engine).
struct Warm<'a> {
    open: Open<'a, Work>,
    item_id: i64,
    ihid: i64,
    line: i64,
}

/// A subscription HaloPSA does not have yet (known absent, its customer
/// known): created in arrays by [`create`].
struct New<'a> {
    open: Open<'a, Work>,
    item_id: i64,
    /// The customer's invoice, or `None` when it has none yet: then it is
    /// created in the same array as its first lines.
    ihid: Option<i64>,
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

/// The identity engine carries each of these as its event.
macro_rules! pending {
    ($t:ident, $($open:ident).+) => {
        impl Pending for $t<'_> {
            type State = Work;
            fn state(&self) -> &Work {
                &self.$($open).+
            }
            fn settle(self, result: Result<Outcome, Failure>) {
                self.$($open).+.settle(result)
            }
        }
    };
}
pending!(Warm, open);
pending!(New, open);
pending!(Lined, licensed.new.open);

/// What Redis knows of a batch: customers, licences (as the identity
/// engine's steps), invoices, cached lines, by position.
type Identities = (
    Vec<Known>,
    Vec<Step>,
    Vec<Known>,
    Vec<Option<SubscriptionLine>>,
);

/// Applies what it can of the batch (one connection, one event per
/// subscription, all locks held by the runtime); what it leaves open goes
/// the one-event path.
pub(crate) async fn apply(
    svc: &Services,
    halo: &HaloClient,
    batch: &mut halosync_shared::runtime::Batch<Work>,
) {
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
    invoice::seed_products(svc, &halo.connection().name, &products).await;
    let mapped = items(svc, halo, open).await;
    // 2. Identity for the whole batch: Redis in a few round trips, plus one
    //    bulk import per kind once per Redis lifetime (`links::known_many`).
    let known = match identities(svc, halo, &mapped).await {
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
    let (warm, new) = sort(svc, halo, mapped, known).await;
    tracing::debug!(
        size,
        known = warm.len(),
        new = new.len(),
        "the batch takes these itself; the rest goes one by one"
    );
    if !warm.is_empty() {
        apply_warm(svc, halo, warm).await;
    }
    if !new.is_empty() {
        create(svc, halo, new).await;
    }
}

/// Item mappings, once per sku (the config's, else HaloPSA's, cached),
/// before anything else: an unmapped sku is dead-lettered at once,
/// whatever else is missing, as on the one-event path.
async fn items<'a>(
    svc: &Services,
    halo: &HaloClient,
    open: Vec<Open<'a, Work>>,
) -> Vec<(Open<'a, Work>, i64)> {
    let mut items: HashMap<String, Result<i64, Failure>> = HashMap::new();
    let mut mapped = Vec::with_capacity(open.len());
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
    mapped
}

/// What Redis knows of the batch's customers, licences, invoices and
/// lines (see [`Identities`]).
async fn identities(
    svc: &Services,
    halo: &HaloClient,
    mapped: &[(Open<'_, Work>, i64)],
) -> Result<Identities, Failure> {
    let store = &svc.store;
    let data = || mapped.iter().map(|(w, _)| &w.event.data);
    let subs: Vec<String> = data().map(|d| d.subscription_id.clone()).collect();
    let accounts: Vec<String> = data().map(|d| d.account_id.clone()).collect();
    Ok((
        links::known_many(store, halo, &CUSTOMER, &accounts).await?,
        engine(svc, halo)
            .steps(mapped.iter().map(|(w, _)| &**w))
            .await?,
        links::known_many(store, halo, &RECURRING_INVOICE, &accounts).await?,
        store
            .subscription_lines(&halo.connection().name)
            .get_many(&subs)
            .await?,
    ))
}

/// Warm and new events, by what is known of them; a superseded one is
/// settled, an event whose customer is missing waits for it, the rest is
/// left open.
async fn sort<'a>(
    svc: &Services,
    halo: &HaloClient,
    mapped: Vec<(Open<'a, Work>, i64)>,
    (customers, licences, invoices, cached): Identities,
) -> (Vec<(Warm<'a>, Mapping)>, Vec<New<'a>>) {
    let (mut warm, mut new) = (Vec::new(), Vec::new());
    let known = customers
        .into_iter()
        .zip(licences)
        .zip(invoices)
        .zip(cached);
    for ((w, item_id), (((customer, step), inv), line)) in mapped.into_iter().zip(known) {
        let Some(w) = with_customer(svc, halo, w, customer).await else {
            continue;
        };
        match (step, inv, line) {
            (Step::Superseded, _, _) => w.settle(Ok(Outcome::Superseded)),
            // Warm: a licence with its link and version, its line cached
            // on the customer's very invoice. Anything less (a link or
            // version never written, a line not cached, or cached on
            // another invoice: the subscription moved account): the
            // one-event path knows.
            (Step::Update(licence), Known::Mapped(inv), Some(line))
                if licence.link_id.is_some()
                    && licence.version.is_some()
                    && line.ihid == inv.halo_id =>
            {
                let warm_one = Warm {
                    open: w,
                    item_id,
                    ihid: inv.halo_id,
                    line: line.line,
                };
                warm.push((warm_one, licence));
            }
            // New; its invoice known, or known absent (created with it).
            (Step::Create, inv @ (Known::Mapped(_) | Known::Absent), _) => new.push(New {
                open: w,
                item_id,
                ihid: match inv {
                    Known::Mapped(m) => Some(m.halo_id),
                    _ => None,
                },
            }),
            _ => {}
        }
    }
    (warm, new)
}

/// The event with its customer set, when Redis knows the customer; else
/// settled (waiting for the account worker) or left open (`None`).
async fn with_customer<'a>(
    svc: &Services,
    halo: &HaloClient,
    mut w: Open<'a, Work>,
    customer: Known,
) -> Option<Open<'a, Work>> {
    let account = &w.event.data.account_id;
    match customer {
        Known::Mapped(c) => {
            w.customer_id = Some(c.halo_id);
            Some(w)
        }
        // Not there yet: wait for the account worker, without a request
        // (and in the shortest tier, so that the events come back together
        // and are created in one batch).
        Known::Absent => {
            let recheck = svc.config().retry.dependency_recheck;
            let missing = format!(
                "account {account} is not in HaloPSA yet (no customer linked to it); retried until the account event has been applied"
            );
            let f =
                links::still_absent(&svc.store, halo, &CUSTOMER, account, recheck, missing).await;
            w.settle(Err(f));
            None
        }
        // The account worker is creating it right now: wait for it (no
        // request, no attempt).
        Known::Creating => {
            let mut f = Failure::dependency(format!(
                "account {account} is being created in HaloPSA right now; retried once it is"
            ));
            f.throttled = true;
            w.settle(Err(f));
            None
        }
        // Redis is unsure: the one-event path asks HaloPSA.
        Known::Unsure => None,
    }
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
    new: Vec<New<'_>>,
    new_headers: Vec<String>,
) {
    let conn = halo.connection().name.clone();
    let window = svc.config().worker.http_timeout;
    let marked = svc
        .store
        .creating(&conn, RECURRING_INVOICE.name, &new_headers, window)
        .await;
    if let Err(e) = marked {
        let f: Failure = e.into();
        for w in new {
            w.open.settle(Err(f.clone()));
        }
        return;
    }
    // Licences, through the identity engine: remembered at once without a
    // version (it claims nothing applied), so that a retry after a later
    // step finds them without asking HaloPSA.
    let licensed: Vec<Licensed<'_>> = engine(svc, halo)
        .create(new)
        .await
        .into_iter()
        .map(|(new, m)| Licensed {
            new,
            licence: m.halo_id,
        })
        .collect();
    let (mut lined, by_account) = add_lines(halo, licensed).await;
    lined.extend(create_invoices(svc, halo, by_account).await);
    // Versions last, in link arrays.
    write_versions(svc, halo, lined).await;
}

/// New subscriptions without a customer invoice yet, by account: the
/// account's customer and its subscriptions.
type ByAccount<'a> = BTreeMap<String, (i64, Vec<Licensed<'a>>)>;

/// Lines on invoices HaloPSA has: one add array, invoices mixed. Returns
/// those saved, and the subscriptions whose customer has no invoice yet
/// (their lines go into the invoices [`create_invoices`] creates).
async fn add_lines<'a>(
    halo: &HaloClient,
    licensed: Vec<Licensed<'a>>,
) -> (Vec<Lined<'a>>, ByAccount<'a>) {
    let mut lined: Vec<Lined<'_>> = Vec::with_capacity(licensed.len());
    let mut adds: Vec<((Licensed<'_>, i64), Value)> = Vec::new();
    let mut by_account: ByAccount<'_> = BTreeMap::new();
    for l in licensed {
        let w = &l.new;
        let (data, terms) = (&w.open.event.data, &w.open.terms);
        match (w.ihid, w.open.customer_id) {
            (Some(ihid), _) => {
                if let Ok(line) = new_line(data, terms, Some(ihid), w.item_id, &w.open.marker) {
                    adds.push(((l, ihid), line));
                }
            }
            (None, Some(customer)) => by_account
                .entry(data.account_id.clone())
                .or_insert_with(|| (customer, Vec::new()))
                .1
                .push(l),
            // Never: a new subscription's customer is known.
            (None, None) => {}
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
    (lined, by_account)
}

/// Invoices for customers that have none, each with its first lines, in
/// arrays; remembered, and seeded for the usage worker ("no usage line
/// yet"). Returns the subscriptions whose line the answer shows.
async fn create_invoices<'a>(
    svc: &Services,
    halo: &HaloClient,
    by_account: ByAccount<'a>,
) -> Vec<Lined<'a>> {
    let conn = &halo.connection().name;
    let mut headers: Vec<(String, (i64, Vec<Licensed<'a>>))> = by_account.into_iter().collect();
    let (mut lined, mut invoices) = (Vec::new(), Vec::new());
    while !headers.is_empty() {
        let chunk: Vec<_> = headers.drain(..headers.len().min(ARRAY_MAX)).collect();
        for (account, mapping, saved) in post_invoices(svc, halo, chunk).await {
            invoices.push((account, mapping));
            lined.extend(saved);
        }
    }
    let pairs: Vec<(&str, &Mapping)> = invoices.iter().map(|(a, m)| (a.as_str(), m)).collect();
    if let Err(e) = svc
        .store
        .set_mappings(conn, RECURRING_INVOICE.name, &pairs)
        .await
    {
        tracing::warn!(error = %e, "could not remember the new invoices; they are looked up again");
    }
    // A new invoice has no usage line: the usage worker need not read it.
    let scanned: Vec<i64> = invoices.iter().map(|(_, m)| m.halo_id).collect();
    invoice::seed_usage_scanned(svc, conn, &scanned).await;
    lined
}

/// One array of new invoices with their first lines: each saved one's
/// account, mapping, and the subscriptions whose line the answer shows. A
/// failed array settles its events (or leaves them to the one-event way).
async fn post_invoices<'a>(
    svc: &Services,
    halo: &HaloClient,
    chunk: Vec<(String, (i64, Vec<Licensed<'a>>))>,
) -> Vec<(String, Mapping, Vec<Lined<'a>>)> {
    let bodies: Result<Vec<Value>, Failure> = chunk
        .iter()
        .map(|(account, (customer_id, group))| invoice_with_lines(account, *customer_id, group))
        .collect();
    let Ok(bodies) = bodies else {
        return Vec::new();
    };
    let saved = match halo.post_each("/RecurringInvoice", bodies).await {
        Ok(rows) => rows,
        Err(None) => return Vec::new(),
        Err(Some(e)) => {
            let ids: Vec<String> = chunk.iter().map(|(a, _)| a.clone()).collect();
            let events = chunk
                .into_iter()
                .flat_map(|(_, (_, group))| group.into_iter().map(|l| l.new.open));
            if lines::settle_array_failure(e, "invoice", events, |w, f| w.settle(Err(f))) {
                let conn = &halo.connection().name;
                let _ = svc
                    .store
                    .not_created(conn, RECURRING_INVOICE.name, &ids)
                    .await;
            }
            return Vec::new();
        }
    };
    let mut out = Vec::new();
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
        // Only a line the answer shows is taken as saved.
        let saved_lines = group
            .into_iter()
            .filter_map(|l| {
                let line = lines::carrying(row, &l.new.open.marker)
                    .first()
                    .and_then(|line| record_id(line))?;
                Some(Lined {
                    licensed: l,
                    ihid,
                    line: Some(line),
                })
            })
            .collect();
        out.push((account, mapping, saved_lines));
    }
    out
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
            let marker = &w.open.marker;
            new_line(&w.open.event.data, &w.open.terms, None, w.item_id, marker)
        })
        .collect::<Result<Vec<Value>, Failure>>()?;
    if let Some(h) = header.as_object_mut() {
        h.insert("lines".into(), Value::Array(first_lines));
    }
    Ok(header)
}

/// The links of new subscriptions whose licence and line are saved, with
/// the applied version, in arrays (the identity engine); then their lines
/// cached and their mappings in Redis.
async fn write_versions(svc: &Services, halo: &HaloClient, lined: Vec<Lined<'_>>) {
    let engine = engine(svc, halo);
    let items: Vec<(Lined<'_>, Mapping)> = lined
        .into_iter()
        .map(|l| {
            let m = Mapping {
                halo_id: l.licensed.licence,
                link_id: None,
                version: None,
            };
            (l, m)
        })
        .collect();
    let versioned = engine.versions(items).await;
    let cache: Vec<(String, SubscriptionLine)> = versioned
        .iter()
        .filter_map(|(l, _)| {
            let sub = l.state().event.data.subscription_id.clone();
            Some((
                sub,
                SubscriptionLine {
                    ihid: l.ihid,
                    line: l.line?,
                },
            ))
        })
        .collect();
    let conn = &halo.connection().name;
    if let Err(e) = svc.store.subscription_lines(conn).set_many(&cache).await {
        let f: Failure = e.into();
        for (l, _) in versioned {
            l.settle(Err(f.clone()));
        }
        return;
    }
    for (l, m) in &versioned {
        let subscription = &l.state().event.data.subscription_id;
        tracing::info!(halo_id = m.halo_id, %subscription, "created the licence and its line");
    }
    engine.applied(versioned).await;
}

/// Known subscriptions: their licences in arrays (the identity engine),
/// then their lines, carrying the version, in `updatelines` arrays; the
/// version, riding on the line (`mapping` module doc), is then remembered
/// in Redis, with no further request.
async fn apply_warm(svc: &Services, halo: &HaloClient, warm: Vec<(Warm<'_>, Mapping)>) {
    let policy = halo.connection();
    let engine = engine(svc, halo);
    // A failed licence array (refused in part, lost answer) leaves its
    // events to the one-event path: updates merge, resending is harmless,
    // and that path tells a stale mapping from a real refusal.
    let written = engine.update(warm).await;
    // Lines: merged by id, split to isolate a refused one.
    let bodies: Vec<((Warm<'_>, Mapping), Value)> = written
        .into_iter()
        .filter_map(|(w, m)| {
            let (data, terms, marker) = (&w.open.event.data, &w.open.terms, &w.open.marker);
            let line = line_update(data, terms, w.ihid, w.line, w.item_id, marker, policy);
            line.ok().map(|l| ((w, m), l))
        })
        .collect();
    let mut done = Vec::new();
    for ((w, m), r) in lines::update(halo, Invoice::Recurring, bodies).await {
        match r {
            Ok(_) => done.push((w, m)),
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
    engine.applied(done).await;
}
