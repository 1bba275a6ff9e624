//! The one pipeline every message goes through. A single message is a
//! batch of one; otherwise the handler gets what the broker had ready (at
//! most `worker.batch_max`, or what arrived within `worker.batch_wait` of
//! the first message). Here each message is validated and its `data`
//! parsed, once, into the family's type; only the newest event per
//! aggregate goes to the handler (the others are acked as superseded: the
//! newest carries the full state); the ledger and the aggregate locks are
//! checked and taken; the handler writes through a client fenced by those
//! locks; and every message is settled with the same guarantees: acked
//! only after its effect is written, or after its retry or dead-letter
//! copy is confirmed.
//!
//! Each delivery is an [`Item`] that moves through the phases until a
//! phase decides it: the decided ones are collected with their
//! [`Decision`] and settled together at the end.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use lapin::message::Delivery;
use tracing::Instrument;

use super::acks::AckWindow;
use super::lanes::Received;
use super::results::Batch;
use super::settle::{Acked, Decision};
use super::{attempts_of, finish, message_span, record, Handler, Services};
use crate::amqp::headers as h;
use crate::amqp::Publisher;
use crate::contract::{Envelope, Event};
use crate::error::Failure;
use crate::halo::HaloClient;
use crate::outcome::Settled;
use crate::store::LockFence;

/// One delivery, from its arrival until it is settled.
struct Item {
    delivery: Delivery,
    attempts_before: u32,
    span: tracing::Span,
    /// The envelope, once the body is a valid event.
    envelope: Option<Envelope>,
    /// The event's aggregate, once its data is read.
    aggregate: Option<String>,
}

/// A delivery whose event goes on towards its handler.
struct Valid<D> {
    item: Item,
    event: Event<D>,
    aggregate: String,
    /// Its connection's client.
    halo: Arc<HaloClient>,
}

/// A delivery after the checks: valid, or dead-lettered with why not.
enum Checked<D> {
    Valid(Valid<D>),
    Invalid(Item, Failure),
}

impl<D> Valid<D> {
    /// The item and its typed event, apart: the event goes to the handler.
    fn split(self) -> (Item, Event<D>) {
        let mut item = self.item;
        item.aggregate = Some(self.aggregate);
        (item, self.event)
    }

    /// The item, settled with `decision` before reaching the handler.
    fn decided(self, decision: Decision) -> (Item, Decision) {
        (self.split().0, decision)
    }
}

/// Processes and settles one batch of deliveries.
pub(super) async fn settle_batch<H: Handler>(
    services: Arc<Services>,
    handler: Arc<H>,
    publisher: Publisher,
    acks: Arc<AckWindow>,
    deliveries: Vec<Received>,
) {
    let started = Instant::now();
    let family = H::FAMILY;
    metrics::histogram!("halosync_batch_size", "family" => family.as_str())
        .record(deliveries.len() as f64);
    let mut decided: Vec<(Item, Decision)> = Vec::with_capacity(deliveries.len());

    // 1. Validate and check; keep the newest version of each aggregate
    //    of each connection.
    let mut newest: HashMap<(String, String), Valid<H::Data>> = HashMap::new();
    for received in deliveries {
        let valid = match validate::<H>(&services, received) {
            Checked::Valid(valid) => valid,
            Checked::Invalid(item, failure) => {
                decided.push((item, Decision::Dead(failure)));
                continue;
            }
        };
        let key = (valid.event.connection.clone(), valid.aggregate.clone());
        match newest.entry(key) {
            Entry::Vacant(slot) => {
                slot.insert(valid);
            }
            Entry::Occupied(mut kept) => {
                let older = if valid
                    .event
                    .version
                    .is_superseded_by(&kept.get().event.version)
                {
                    valid
                } else {
                    kept.insert(valid)
                };
                decided.push(older.decided(Decision::Ack(Acked::Superseded)));
            }
        }
    }

    // 2. Per connection: ledger, locks, one apply_batch.
    let mut by_conn: HashMap<String, Vec<Valid<H::Data>>> = HashMap::new();
    for ((conn, _), valid) in newest {
        by_conn.entry(conn).or_default().push(valid);
    }
    for (conn, mut members) in by_conn {
        // Every worker takes a batch's locks in one order (the aggregate
        // key), so two batches sharing aggregates never wait on each other
        // in a cycle: one gets all it needs and finishes, the other follows.
        members.sort_by(|a, b| a.aggregate.cmp(&b.aggregate));
        decided.extend(run_connection(&services, &handler, &conn, members).await);
    }

    // 3. Settle. First the messages settled on their own (a retry or
    //    dead-letter copy confirmed before the ack, a requeue), each in its
    //    own span, all at once: each one's settle is independent of the
    //    others', and once done their tags no longer stand in the way of a
    //    `multiple` ack. Then the plain acks, together (`acks.rs`).
    let total = decided.len();
    let (plain, alone): (Vec<_>, Vec<_>) = decided
        .into_iter()
        .partition(|(_, decision)| matches!(decision, Decision::Ack(_)));
    let settles = alone.into_iter().map(|(item, decision)| {
        let (services, publisher, acks) = (&services, &publisher, &*acks);
        async move {
            finish(
                services,
                family,
                publisher,
                acks,
                &item.delivery,
                item.attempts_before,
                item.envelope.as_ref(),
                item.aggregate.as_deref(),
                decision,
                started,
            )
            .await
        }
        .instrument(item.span)
    });
    let mut outcomes: Vec<Settled> = Vec::with_capacity(total);
    outcomes.extend(futures::future::join_all(settles).await);
    let deliveries: Vec<&Delivery> = plain.iter().map(|(item, _)| &item.delivery).collect();
    let acked = acks.ack_all(&deliveries).await;
    for ((item, decision), result) in plain.iter().zip(acked) {
        let Decision::Ack(how) = decision else {
            continue;
        };
        outcomes.push(item.span.in_scope(|| {
            record(
                &services,
                family,
                &item.delivery,
                item.attempts_before,
                item.envelope.as_ref(),
                item.aggregate.as_deref(),
                Settled::from(*how),
                None,
                result.map(|()| None),
                started,
            )
        }));
    }
    // One info line per batch, with the count of each outcome (a plain
    // ack's own line is at debug; a retry's, a dead letter's, a requeue's
    // and a repair's stay at their level).
    let count = |o: Settled| outcomes.iter().filter(|x| **x == o).count();
    tracing::info!(
        family = family.as_str(),
        size = total,
        applied = count(Settled::Applied),
        superseded = count(Settled::Superseded),
        duplicate = count(Settled::Duplicate),
        retried = count(Settled::Retried),
        dead_lettered = count(Settled::DeadLettered),
        requeued = count(Settled::Requeued),
        duration_ms = started.elapsed().as_millis() as u64,
        "batch settled"
    );
}

/// The checks every event passes before its handler: a valid body, the
/// handler's family, `data` of the family's type (parsed here, the one
/// time), a configured connection. What fails one is dead-lettered
/// `invalid`.
fn validate<H: Handler>(
    services: &Services,
    Received { delivery, body }: Received,
) -> Checked<H::Data> {
    let attempts_before = attempts_of(&delivery);
    let found = check::<H>(services, &delivery, body);
    // The message span is made once everything it names is known, with all
    // its fields at once: the JSON log layer parses and re-serialises a
    // span's fields at every `record`, four times per message before.
    let (envelope, aggregate) = match &found {
        Found::Valid {
            envelope,
            aggregate,
            ..
        } => (Some(envelope), Some(aggregate.as_str())),
        Found::Invalid {
            envelope,
            aggregate,
            ..
        } => (envelope.as_ref(), aggregate.as_deref()),
    };
    let span = message_span(H::FAMILY, &delivery, attempts_before, envelope, aggregate);
    let item = |envelope: Option<Envelope>, aggregate: Option<String>| Item {
        delivery,
        attempts_before,
        span,
        envelope,
        aggregate,
    };
    match found {
        Found::Valid {
            envelope,
            event,
            aggregate,
            halo,
        } => Checked::Valid(Valid {
            item: item(Some(envelope), None),
            event,
            aggregate,
            halo,
        }),
        Found::Invalid {
            envelope,
            aggregate,
            failure,
        } => Checked::Invalid(item(envelope, aggregate), failure),
    }
}

/// What [`check`] found of one delivery.
enum Found<D> {
    Valid {
        envelope: Envelope,
        event: Event<D>,
        aggregate: String,
        halo: Arc<HaloClient>,
    },
    /// Dead-lettered as `invalid`, with what could be read of it.
    Invalid {
        envelope: Option<Envelope>,
        aggregate: Option<String>,
        failure: Failure,
    },
}

/// The checks of [`validate`], before the message has its span.
fn check<H: Handler>(
    services: &Services,
    delivery: &Delivery,
    body: Result<serde_json::Value, crate::contract::ContractError>,
) -> Found<H::Data> {
    let invalid = |envelope, aggregate, failure| Found::Invalid {
        envelope,
        aggregate,
        failure,
    };
    let mut envelope = match body.and_then(|v| services.contract.validate_value(v)) {
        Ok(e) => e,
        Err(e) => return invalid(None, None, e.into()),
    };
    let headers = delivery.properties.headers().as_ref();
    envelope.repair = h::get_bool(headers, h::REPAIR);
    envelope.replayed = h::get_i64(headers, h::REPLAY_COUNT).is_some_and(|n| n > 0);
    if envelope.family() != Some(H::FAMILY) {
        let f = Failure::invalid(format!(
            "type {} is not handled by the {} worker (it was published to the wrong queue)",
            envelope.event_type,
            H::FAMILY
        ));
        return invalid(Some(envelope), None, f);
    }
    let event = match Event::<H::Data>::of(&envelope) {
        Ok(event) => event,
        Err(f) => return invalid(Some(envelope), None, f),
    };
    let aggregate = H::aggregate(&event.data);
    let Some(halo) = services.halo(&envelope.connection) else {
        let known = services.connection_names();
        let f = Failure::invalid(format!(
            "unknown connection {:?}; configured connections: {}",
            envelope.connection,
            if known.is_empty() {
                "(none)".to_string()
            } else {
                known.join(", ")
            }
        ));
        return invalid(Some(envelope), Some(aggregate), f);
    };
    Found::Valid {
        envelope,
        event,
        aggregate,
        halo,
    }
}

/// One connection's events of the batch, each of its own aggregate, in
/// the aggregates' order: ledger, locks, the wait after a lost Redis,
/// repairs, then one `apply_batch`. Returns every item with its decision.
async fn run_connection<H: Handler>(
    services: &Arc<Services>,
    handler: &Arc<H>,
    conn: &str,
    members: Vec<Valid<H::Data>>,
) -> Vec<(Item, Decision)> {
    let mut decided = Vec::with_capacity(members.len());
    let Some(halo) = members.first().map(|m| m.halo.clone()) else {
        return decided;
    };
    let config = services.config();
    let w = &config.worker;
    // Ledger: ids already processed are duplicates.
    let ids: Vec<String> = members.iter().map(|m| m.event.id.clone()).collect();
    let mut seen = match services.store.processed_many(conn, &ids).await {
        Ok(seen) => seen.into_iter(),
        Err(e) => {
            let f: Failure = e.into();
            decided.extend(
                members
                    .into_iter()
                    .map(|m| m.decided(Decision::Retry(f.clone()))),
            );
            return decided;
        }
    };
    let mut fresh = Vec::with_capacity(members.len());
    for m in members {
        // A repair carries the id of the snapshot's event, which may well
        // have been applied before: that is the point.
        if seen.next() == Some(true) && !m.event.repair {
            decided.push(m.decided(Decision::Ack(Acked::Duplicate)));
        } else {
            fresh.push(m);
        }
    }
    // Locks: an aggregate another worker holds is retried later (without
    // using up an attempt). `worker.lock_wait` bounds the whole batch's wait,
    // not each lock's, so that one busy aggregate delays the others by at
    // most that; a batch of one waits exactly as long as a single message.
    let names: Vec<String> = fresh
        .iter()
        .map(|m| format!("{}:{}", H::FAMILY, m.aggregate))
        .collect();
    let taken = services
        .store
        .lock_many(conn, &names, w.lock_ttl, w.lock_wait)
        .await;
    let mut locks = Vec::with_capacity(fresh.len());
    let mut live = Vec::with_capacity(fresh.len());
    for (m, lock) in fresh.into_iter().zip(taken) {
        match lock {
            Ok(l) => {
                locks.push(l);
                live.push(m);
            }
            Err(e) => decided.push(m.decided(Decision::Retry(e.into()))),
        }
    }
    // Redis lost moments ago: locks held before were lost with it, and a
    // write their holders had on the wire may still land. Wait until it
    // must have (`worker.flush_grace`) before reading or writing HaloPSA.
    if !live.is_empty() {
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
                decided.extend(
                    live.drain(..)
                        .map(|m| m.decided(Decision::Retry(f.clone()))),
                );
            }
        }
    }
    // The handler's client, fenced with the batch's locks: every write
    // checks, just before it goes out, that all of them are still ours.
    // Its writes take the family's budget class (`Handler::WRITES`).
    let halo = halo.fenced(LockFence::of(&locks), H::WRITES);
    // A repair reads HaloPSA's state instead of trusting what Redis
    // cached of it (line ids, "no line yet"): the caches are what drifted.
    let mut ready = Vec::with_capacity(live.len());
    for m in live {
        if m.event.repair {
            if let Err(f) = handler.forget_cached(services, &halo, &m.event).await {
                decided.push(m.decided(Decision::Retry(f)));
                continue;
            }
        }
        ready.push(m);
    }
    if !ready.is_empty() {
        decided.extend(apply(services, handler, halo, conn, ready).await);
    }
    if let Err(e) = services.store.release_many(locks).await {
        tracing::warn!(error = %e, "could not release the batch's aggregate locks; they expire on their own");
    }
    decided
}

/// One `apply_batch` of `ready` (locks held), its results recorded in the
/// ledger. A handler that panics leaves its events requeued.
async fn apply<H: Handler>(
    services: &Arc<Services>,
    handler: &Arc<H>,
    halo: HaloClient,
    conn: &str,
    ready: Vec<Valid<H::Data>>,
) -> Vec<(Item, Decision)> {
    // A batch of one runs in its message's span (its HaloPSA requests
    // continue the publisher's trace); a larger one in a batch span.
    let span = match &ready[..] {
        [only] => only.item.span.clone(),
        _ => tracing::info_span!("batch", connection = conn, size = ready.len()),
    };
    let (items, events): (Vec<Item>, Vec<Event<H::Data>>) =
        ready.into_iter().map(Valid::split).unzip();
    let task = {
        let (services, handler) = (services.clone(), handler.clone());
        tokio::spawn(
            async move {
                handler
                    .apply_batch(&services, &halo, Batch::new(events))
                    .await
            }
            .instrument(span),
        )
    };
    match task.await {
        // One result per event, in order (`Batch::finish`).
        Ok(results) => {
            let decided: Vec<(Item, Decision)> =
                items.into_iter().zip(results.decisions()).collect();
            let done: Vec<(String, Settled)> = decided
                .iter()
                .filter_map(|(item, decision)| match decision {
                    Decision::Ack(outcome) => {
                        Some((item.envelope.as_ref()?.id.clone(), Settled::from(*outcome)))
                    }
                    _ => None,
                })
                .collect();
            if let Err(e) = services.store.mark_processed_many(conn, &done).await {
                tracing::warn!(error = %e, "could not record the batch in the ledger");
            }
            decided
        }
        Err(e) => items
            .into_iter()
            .map(|item| (item, Decision::Requeue(format!("handler panicked: {e}"))))
            .collect(),
    }
}
