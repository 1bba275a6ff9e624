//! The one pipeline every message goes through. A single message is a
//! batch of one; a batching handler (usage, overage) gets what the broker
//! had ready (at most `worker.batch_max`, or what arrived within
//! `worker.batch_wait` of the first message). Here each message is
//! validated and deduplicated, only the newest event per aggregate goes to
//! the handler (the others are acked as superseded: the newest carries the
//! full state), the ledger and the aggregate locks are checked and taken,
//! every write the handler makes is fenced by those locks, and every
//! message is settled with the same guarantees: acked only after its
//! effect is written, or after its retry or dead-letter copy is confirmed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use lapin::message::Delivery;
use tracing::Instrument;

use super::lanes::Received;
use super::settle::{Acked, Decision};
use super::{attempts_of, check, finish, message_span, record_event, Handler, Services};
use crate::amqp::headers as h;
use crate::amqp::Publisher;
use crate::contract::{ContractError, Envelope, Family, Version};
use crate::error::Failure;
use crate::halo::ratelimit::Priority;
use crate::halo::HaloClient;
use crate::store::LockFence;

struct Item {
    delivery: Delivery,
    /// The body as parsed on arrival, until it is validated.
    body: Option<Result<serde_json::Value, ContractError>>,
    attempts_before: u32,
    span: tracing::Span,
    event: Option<Envelope>,
    decision: Option<Decision>,
}

/// Processes and settles one batch of deliveries.
pub(super) async fn settle_batch(
    services: Arc<Services>,
    handler: Arc<dyn Handler>,
    publisher: Publisher,
    deliveries: Vec<Received>,
) {
    let started = Instant::now();
    let family = handler.family();
    metrics::histogram!("halosync_batch_size", "family" => family.as_str())
        .record(deliveries.len() as f64);
    let mut items: Vec<Item> = deliveries
        .into_iter()
        .map(|Received { delivery, body }| {
            let attempts_before = attempts_of(&delivery);
            let span = message_span(family, &delivery, attempts_before);
            Item {
                delivery,
                body: Some(body),
                attempts_before,
                span,
                event: None,
                decision: None,
            }
        })
        .collect();

    // 1. Validate and check; group the rest by connection and aggregate,
    //    keeping the newest version of each aggregate.
    // (connection, aggregate) -> (index of the newest item, its version)
    let mut newest: HashMap<(String, String), (usize, Version)> = HashMap::new();
    for i in 0..items.len() {
        let item = &mut items[i];
        let _g = item.span.enter();
        let parsed = item
            .body
            .take()
            .unwrap_or_else(|| Err(ContractError::NotJson("not parsed (bug)".into())));
        let event = match parsed.and_then(|v| services.contract.validate_value(v)) {
            Ok(mut e) => {
                let headers = item.delivery.properties.headers().as_ref();
                e.repair = h::get_bool(headers, h::REPAIR);
                e.replayed = h::get_i64(headers, h::REPLAY_COUNT).is_some_and(|n| n > 0);
                if e.repair {
                    item.span.record("repair", true);
                }
                e
            }
            Err(e) => {
                item.decision = Some(Decision::Dead(e.into()));
                continue;
            }
        };
        record_event(&event);
        let checked = check(&services, handler.as_ref(), &event)
            .and_then(|(_, aggregate)| event.version().map(|v| (aggregate, v)));
        let (aggregate, version) = match checked {
            Ok(x) => x,
            Err(f) => {
                item.event = Some(event);
                item.decision = Some(Decision::Dead(f));
                continue;
            }
        };
        let key = (event.connection.clone(), aggregate);
        item.event = Some(event);
        drop(_g);
        match newest.get(&key) {
            Some((_, v)) if version.is_superseded_by(v) => {
                items[i].decision = Some(Decision::Ack(Acked::Superseded));
            }
            Some((j, _)) => {
                items[*j].decision = Some(Decision::Ack(Acked::Superseded));
                newest.insert(key, (i, version));
            }
            None => {
                newest.insert(key, (i, version));
            }
        }
    }

    // 2. Per connection: ledger, locks, one apply_batch.
    let mut by_conn: HashMap<String, Vec<(usize, String)>> = HashMap::new();
    for ((conn, aggregate), (i, _)) in newest {
        by_conn.entry(conn).or_default().push((i, aggregate));
    }
    for (conn, mut members) in by_conn {
        // Every worker takes a batch's locks in one order (the aggregate
        // key), so two batches sharing aggregates never wait on each other
        // in a cycle: one gets all it needs and finishes, the other follows.
        members.sort_by(|a, b| a.1.cmp(&b.1));
        let Some(halo) = services.halo(&conn) else {
            continue;
        };
        run_connection(&services, &handler, halo, &conn, &mut items, members).await;
    }

    // 3. Settle every message in its own span, all at once: each one's
    //    ack (or retry or dead-letter copy, then ack) is independent of the
    //    others', and waiting for 200 acks one after another was most of a
    //    batch's time.
    let settles = items.into_iter().map(|item| {
        let decision = item
            .decision
            .unwrap_or_else(|| Decision::Requeue("not decided (bug)".into()));
        let aggregate = item.event.as_ref().and_then(|e| handler.aggregate(e).ok());
        let (services, publisher) = (&services, &publisher);
        async move {
            finish(
                services,
                family,
                publisher,
                &item.delivery,
                item.attempts_before,
                item.event.as_ref(),
                aggregate.as_deref(),
                decision,
                started,
            )
            .await
        }
        .instrument(item.span)
    });
    futures::future::join_all(settles).await;
}

async fn run_connection(
    services: &Arc<Services>,
    handler: &Arc<dyn Handler>,
    halo: Arc<HaloClient>,
    conn: &str,
    items: &mut [Item],
    members: Vec<(usize, String)>,
) {
    let family = handler.family();
    let config = services.config();
    let w = &config.worker;
    // Ledger: ids already processed are duplicates.
    let ids: Vec<String> = members
        .iter()
        .map(|(i, _)| {
            items[*i]
                .event
                .as_ref()
                .map(|e| e.id.clone())
                .unwrap_or_default()
        })
        .collect();
    match services.store.processed_many(conn, &ids).await {
        Ok(seen) => {
            for ((i, _), seen) in members.iter().zip(seen) {
                // A repair carries the id of the snapshot's event, which
                // may well have been applied before: that is the point.
                let repair = items[*i].event.as_ref().is_some_and(|e| e.repair);
                if seen && !repair {
                    items[*i].decision = Some(Decision::Ack(Acked::Duplicate));
                }
            }
        }
        Err(e) => {
            let f: Failure = e.into();
            for (i, _) in &members {
                items[*i].decision = Some(Decision::Retry(f.clone()));
            }
            return;
        }
    }
    // Locks: an aggregate another worker holds is retried later (without
    // using up an attempt). `worker.lock_wait` bounds the whole batch's wait,
    // not each lock's, so that one busy aggregate delays the others by at
    // most that; a batch of one waits exactly as long as a single message.
    let mut locks = Vec::new();
    let mut work: Vec<usize> = Vec::new();
    let wanted: Vec<(usize, String)> = members
        .iter()
        .filter(|(i, _)| items[*i].decision.is_none())
        .map(|(i, aggregate)| (*i, format!("{family}:{aggregate}")))
        .collect();
    let names: Vec<String> = wanted.iter().map(|(_, a)| a.clone()).collect();
    let taken = services
        .store
        .lock_many(conn, &names, w.lock_ttl, w.lock_wait)
        .await;
    for ((i, _), lock) in wanted.into_iter().zip(taken) {
        match lock {
            Ok(l) => {
                locks.push(l);
                work.push(i);
            }
            Err(e) => items[i].decision = Some(Decision::Retry(e.into())),
        }
    }
    // Redis lost moments ago: locks held before were lost with it, and a
    // write their holders had on the wire may still land. Wait until it
    // must have (`worker.flush_grace`) before reading or writing HaloPSA.
    if !work.is_empty() {
        match services.store.memory_age().await {
            // The very first start of a deployment: Redis has no epoch,
            // this process never saw one (it was not running when Redis
            // was lost) and no other process consumes any of the
            // deployment's queues: nobody can hold a lock of a lost Redis,
            // so nothing can be on the wire. The epoch is back-dated so
            // that no worker waits for it.
            Ok(m)
                if m.fresh
                    && !m.seen_before
                    && m.age < w.flush_grace
                    && !services.others_consuming().await =>
            {
                tracing::info!("first start on this Redis and no other worker: no write of a lost lock can be on the wire, no wait");
                if let Err(e) = services
                    .store
                    .backdate_epoch(w.flush_grace, w.flush_grace)
                    .await
                {
                    tracing::warn!(error = %e, "could not mark the first start in Redis");
                }
            }
            Ok(m) if m.age < w.flush_grace => {
                let wait = w.flush_grace - m.age;
                tracing::info!(
                    wait_ms = wait.as_millis() as u64,
                    "Redis was lost or started moments ago: waiting for writes other workers may still have on the wire"
                );
                tokio::time::sleep(wait).await;
            }
            Ok(_) => {}
            Err(e) => {
                let f: Failure = e.into();
                for i in work.drain(..) {
                    items[i].decision = Some(Decision::Retry(f.clone()));
                }
            }
        }
    }
    // A repair reads HaloPSA's state instead of trusting what Redis
    // cached of it (line ids, "no line yet"): the caches are what drifted.
    for i in &work {
        if let Some(e) = items[*i].event.as_ref().filter(|e| e.repair) {
            if let Err(f) = handler.forget_cached(services, &halo, e).await {
                items[*i].decision = Some(Decision::Retry(f));
            }
        }
    }
    work.retain(|i| items[*i].decision.is_none());
    if !work.is_empty() {
        let events: Vec<Envelope> = work
            .iter()
            .filter_map(|i| items[*i].event.clone())
            .collect();
        // A batch of one runs in its message's span (its HaloPSA requests
        // continue the publisher's trace); a larger one in a batch span.
        let span = match work[..] {
            [only] => items[only].span.clone(),
            _ => tracing::info_span!("batch", connection = conn, size = events.len()),
        };
        // The handler writes through a client fenced with the batch's
        // locks: every write checks, just before it goes out, that all of
        // them are still ours. The account worker's writes come first in
        // the budget (`halo::ratelimit::Priority`): every other family
        // waits for its customers.
        let writes = if family == Family::Account {
            Priority::Accounts
        } else {
            Priority::Writes
        };
        let halo = halo.fenced(LockFence::of(&locks), writes);
        let task = {
            let services = services.clone();
            let handler = handler.clone();
            tokio::spawn(
                async move { handler.apply_batch(&services, &halo, &events).await }
                    .instrument(span),
            )
        };
        match task.await {
            Ok(results) if results.len() == work.len() => {
                let mut done = Vec::new();
                for (i, result) in work.iter().zip(results) {
                    let decision = Decision::of(result);
                    if let Decision::Ack(outcome) = &decision {
                        if let Some(e) = &items[*i].event {
                            done.push((e.id.clone(), outcome.as_str()));
                        }
                    }
                    items[*i].decision = Some(decision);
                }
                if let Err(e) = services.store.mark_processed_many(conn, &done).await {
                    tracing::warn!(error = %e, "could not record the batch in the ledger");
                }
            }
            Ok(results) => {
                let msg = format!(
                    "handler returned {} results for {} events (bug)",
                    results.len(),
                    work.len()
                );
                for i in &work {
                    items[*i].decision = Some(Decision::Requeue(msg.clone()));
                }
            }
            Err(e) => {
                for i in &work {
                    items[*i].decision = Some(Decision::Requeue(format!("handler panicked: {e}")));
                }
            }
        }
    }
    if let Err(e) = services.store.release_many(locks).await {
        tracing::warn!(error = %e, "could not release the batch's aggregate locks; they expire on their own");
    }
}
