//! The worker runtime every worker binary runs: consume one family's work
//! queue, validate, deduplicate, lock the aggregate, hand the event to the
//! family's [`Handler`], and settle the message.
//!
//! Settling is where the guarantees live:
//!
//! * **ack** only after the handler returned, i.e. after its HaloPSA effect
//!   is durable (or the event is a duplicate or superseded);
//! * **retry**: a copy goes to the tier's delay queue with the attempt count
//!   in `x-halosync-attempts`, and the original is acked only once the
//!   broker confirmed the copy;
//! * **dead-letter**: likewise, a copy with the `x-halosync-*` headers goes
//!   to the family's dead queue, confirmed before the ack;
//! * anything else (a failed publish, a panicking handler) **nacks with
//!   requeue**, so the broker keeps the message; a message that keeps
//!   killing workers is dead-lettered by the quorum queue's delivery limit.
//!
//! Connection loss ends the session; the loop reconnects with backoff.
//! SIGTERM/SIGINT cancel the consumer, let in-flight messages finish (up to
//! `shutdown_grace`) and return.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{SecondsFormat, Utc};
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::activity::{ActivityRecord, ActivityRecorder};
use crate::amqp::headers::{self as h};
use crate::amqp::{self, Publisher, Topology};
use arc_swap::ArcSwap;
use redis::aio::ConnectionManager;
use serde::de::DeserializeOwned;

use crate::config::{Config, ConnectionConfig};
use crate::contract::{Contract, Envelope, Event, Family};
use crate::error::{excerpt, ErrorClass, Failure};
use crate::halo::ratelimit::Priority;
use crate::halo::{self, HaloClient};
use crate::outage::{Backoff, Health, Report};
use crate::outcome::Settled;
use crate::store::{self, Keys, Store};

mod acks;
mod batch;
mod lanes;
mod results;
pub mod settle;

pub use results::{Batch, Open, Results};
pub use settle::{retry_delay, Acked};
use settle::{Decision, Plan};

/// What an applied event did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// HaloPSA now holds this event's state.
    Applied,
    /// A newer (or the same) version was already applied: nothing changed.
    Superseded,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        Acked::from(self).as_str()
    }
}

/// One family's mapping logic, batch-only and typed: the runtime hands
/// over what the broker had ready for one connection (at most
/// `worker.batch_max`, or what arrived within `worker.batch_wait` of the
/// first; a single message is a batch of one), validated, each event's
/// `data` parsed once into [`Handler::Data`], with only the newest event
/// per aggregate, the ledger checked and those aggregates' locks held, and
/// a HaloPSA client fenced with those locks.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// The family whose events this handler applies.
    const FAMILY: Family;
    /// The budget class of the family's writes (`halo::ratelimit`): the
    /// account worker's come first, since every other family waits for its
    /// customers.
    const WRITES: Priority = Priority::Writes;
    /// The family's event data (`AccountData`, ...): what the runtime
    /// parses each event's `data` into, once, after schema validation (a
    /// `data` that does not fit is dead-lettered `invalid`).
    type Data: DeserializeOwned + Send + Sync + 'static;

    /// The aggregate key (DESIGN §1) the lock and ordering apply to.
    fn aggregate(data: &Self::Data) -> String;

    /// Drops what Redis caches of this event's records in HaloPSA (line
    /// ids, "scanned" marks), before a repair (DESIGN §8) is applied, so
    /// that the handler reads HaloPSA's state and writes what differs. The
    /// id mappings stay: they are checked against HaloPSA on every write.
    async fn forget_cached(
        &self,
        _ctx: &Services,
        _halo: &HaloClient,
        _event: &Event<Self::Data>,
    ) -> Result<(), Failure> {
        Ok(())
    }

    /// Brings HaloPSA to the state of several events of one connection,
    /// each of a different aggregate, idempotently, writing through `halo`
    /// (fenced by the batch's locks): one result per event, which
    /// [`Batch::finish`] guarantees.
    async fn apply_batch(
        &self,
        ctx: &Services,
        halo: &HaloClient,
        events: Batch<Event<Self::Data>>,
    ) -> Results;
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    /// Names Redis, the URL without its password, and what to change.
    #[error("{0}")]
    Redis(#[from] crate::tls::ConnectError),
    #[error("HaloPSA client: {0}")]
    Halo(#[from] crate::halo::HaloError),
    #[error("schemas: {0}")]
    Schema(#[from] crate::contract::SchemaBuildError),
}

/// Everything a worker shares across messages.
///
/// The configuration and the HaloPSA clients sit behind [`ArcSwap`]s so
/// that a reloaded config file ([`Services::reload`]) takes effect for the
/// next message while in-flight ones finish with what they started with.
pub struct Services {
    config: ArcSwap<Config>,
    pub contract: Contract,
    pub store: Store,
    pub topology: Topology,
    halo: ArcSwap<BTreeMap<String, Arc<HaloClient>>>,
    /// `host:pid`, written on dead letters.
    pub worker_id: String,
    /// Outages and readiness (for `/readyz` and the wait loops).
    pub health: Arc<Health>,
    /// One record per settled message to the activity stream (never blocks).
    pub activity: ActivityRecorder,
    http: reqwest::Client,
    redis: ConnectionManager,
    keys: Keys,
    /// A channel of the current broker session, to count the consumers of
    /// the deployment's work queues (see [`Services::others_consuming`]).
    probe: arc_swap::ArcSwapOption<lapin::Channel>,
}

/// What [`Services::reload`] changed, for its log line.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReloadSummary {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
    /// Connections whose credentials changed: their cached token was dropped.
    pub tokens_dropped: Vec<String>,
    /// Keys that changed but only take effect after a restart.
    pub needs_restart: Vec<&'static str>,
}

impl Services {
    /// Connects to Redis, waiting (with backoff, not ready, one log line a
    /// minute) while it is unreachable. `None` if `shutdown` came first.
    pub async fn connect(
        config: Config,
        health: Arc<Health>,
        shutdown: &CancellationToken,
    ) -> Result<Option<Services>, RuntimeError> {
        let mut backoff = Backoff::default();
        let redis = loop {
            match store::connect_with(&config.redis_url, &config.redis_access).await {
                Ok(r) => {
                    if let Some(d) = health.recovered("redis") {
                        tracing::info!(down_for_s = d.as_secs(), "redis reachable again");
                    }
                    break r;
                }
                // A refused or silent port is an outage: wait for it. A
                // wrong CA, certificate or password is a configuration
                // mistake that waiting cannot fix: stop with the explanation.
                Err(e) if !e.is_outage() => return Err(e.into()),
                Err(e) => {
                    let url = amqp::redact_url(&config.redis_url);
                    if let Report::Log { down_for, attempts } =
                        health.failed("redis", &e.to_string())
                    {
                        tracing::warn!(url = %url, error = %e, down_for_s = down_for.as_secs(), attempts,
                            "redis unreachable; waiting for it (not ready meanwhile)");
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(None),
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
            }
        };
        let keys = Keys::new(&config.prefix);
        let http = halo::http_client(config.worker.http_timeout)?;
        let host = hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "unknown".into());
        let worker_id = format!("{host}:{}", std::process::id());
        let topology = Topology::new(&config.prefix, &config.retry.delays_ms());
        let activity = if config.worker.activity {
            ActivityRecorder::start(
                &config.amqp_url,
                &config.amqp_access,
                topology.activity_queue(),
                &format!("{}{worker_id}", config.prefix),
            )
        } else {
            ActivityRecorder::disabled()
        };
        let services = Services {
            store: Store::new(redis.clone(), keys.clone(), config.worker.ledger_ttl),
            topology,
            contract: Contract::new()?,
            halo: ArcSwap::from_pointee(BTreeMap::new()),
            worker_id,
            health,
            activity,
            http,
            redis,
            keys,
            config: ArcSwap::from_pointee(config.clone()),
            probe: arc_swap::ArcSwapOption::empty(),
        };
        let clients = config
            .connections
            .values()
            .map(|c| (c.name.clone(), services.client_for(&config, c)))
            .collect();
        services.halo.store(Arc::new(clients));
        Ok(Some(services))
    }

    fn client_for(&self, config: &Config, c: &ConnectionConfig) -> Arc<HaloClient> {
        Arc::new(
            halo::client_for(
                c,
                self.http.clone(),
                self.redis.clone(),
                &self.keys,
                &config.worker,
                config.retry.rate_limited_min_delay,
            )
            .with_health(self.health.clone()),
        )
    }

    /// Whether any other process consumes one of this deployment's work
    /// queues right now (this one counts itself once). Unknown (no broker
    /// session, a failed look-up) reads as yes: the safe answer.
    pub async fn others_consuming(&self) -> bool {
        let Some(channel) = self.probe.load_full() else {
            return true;
        };
        let mut consumers = 0u32;
        for family in Family::ALL {
            let declared = channel
                .queue_declare(
                    self.topology.work_queue(family).as_str().into(),
                    lapin::options::QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await;
            match declared {
                Ok(q) => consumers += q.consumer_count(),
                Err(_) => return true,
            }
        }
        consumers > 1
    }

    /// The configuration in force now (a reload replaces it).
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// The HaloPSA client of a configured connection.
    pub fn halo(&self, connection: &str) -> Option<Arc<HaloClient>> {
        self.halo.load().get(connection).cloned()
    }

    /// The configured connections' names.
    pub fn connection_names(&self) -> Vec<String> {
        self.halo.load().keys().cloned().collect()
    }

    /// Applies a new, already validated configuration: connections added,
    /// changed (new credentials, item mappings, policies, budget) or
    /// removed take effect for the next message, without disturbing the
    /// ones in flight (they keep the client they started with). A
    /// connection whose credentials changed gets its cached token dropped.
    /// What only a restart can change (broker and Redis URLs, prefix, retry
    /// tiers, `[worker]`) is kept as it was and named in the summary.
    pub async fn reload(&self, new: Config) -> ReloadSummary {
        let old = self.config();
        let mut summary = ReloadSummary::default();
        let mut effective = new.clone();
        for (key, differs) in [
            ("amqp_url", old.amqp_url != new.amqp_url),
            ("redis_url", old.redis_url != new.redis_url),
            (
                "amqp TLS and credentials",
                old.amqp_access != new.amqp_access,
            ),
            (
                "redis TLS and credentials",
                old.redis_access != new.redis_access,
            ),
            ("prefix", old.prefix != new.prefix),
            ("retry", old.retry != new.retry),
            ("worker", old.worker != new.worker),
        ] {
            if differs {
                summary.needs_restart.push(key);
            }
        }
        effective.amqp_url = old.amqp_url.clone();
        effective.redis_url = old.redis_url.clone();
        effective.amqp_access = old.amqp_access.clone();
        effective.redis_access = old.redis_access.clone();
        effective.prefix = old.prefix.clone();
        effective.retry = old.retry.clone();
        effective.worker = old.worker.clone();

        let current = self.halo.load_full();
        let mut clients = BTreeMap::new();
        for (name, conn) in &effective.connections {
            match current.get(name) {
                Some(client) if client.connection() == conn => {
                    clients.insert(name.clone(), client.clone());
                }
                Some(client) => {
                    if !client.connection().same_credentials(conn) {
                        client.tokens().forget().await;
                        summary.tokens_dropped.push(name.clone());
                    }
                    summary.changed.push(name.clone());
                    clients.insert(name.clone(), self.client_for(&effective, conn));
                }
                None => {
                    summary.added.push(name.clone());
                    clients.insert(name.clone(), self.client_for(&effective, conn));
                }
            }
        }
        summary.removed = current
            .keys()
            .filter(|n| !effective.connections.contains_key(*n))
            .cloned()
            .collect();
        self.config.store(Arc::new(effective));
        self.halo.store(Arc::new(clients));
        summary
    }
}

/// Runs until `shutdown` is cancelled; reconnects after the broker drops
/// or while it is down (backoff to 10 s, one log line a minute, not ready).
pub async fn run<H: Handler>(
    services: Arc<Services>,
    handler: Arc<H>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::default();
    while !shutdown.is_cancelled() {
        let started = Instant::now();
        let result = session(&services, &handler, &shutdown).await;
        services.health.consuming.store(false, Ordering::SeqCst);
        if let Err(e) = result {
            let url = amqp::redact_url(&services.config().amqp_url);
            if let Report::Log { down_for, attempts } =
                services.health.failed("rabbitmq", &e.to_string())
            {
                tracing::warn!(error = %e, url = %url, down_for_s = down_for.as_secs(), attempts,
                    "broker unreachable or session lost; reconnecting (not ready meanwhile)");
            }
        }
        if started.elapsed() > Duration::from_secs(30) {
            backoff.reset();
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
    tracing::info!("worker stopped");
}

/// One connection's lifetime. `Ok` means a clean shutdown.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Broker(#[from] lapin::Error),
    #[error(transparent)]
    Topology(#[from] amqp::AmqpError),
    #[error(transparent)]
    Publish(#[from] amqp::PublishError),
    #[error("the broker cancelled the consumer (was the queue deleted?)")]
    Cancelled,
}

async fn session<H: Handler>(
    services: &Arc<Services>,
    handler: &Arc<H>,
    shutdown: &CancellationToken,
) -> Result<(), SessionError> {
    let family = H::FAMILY;
    let config = services.config();
    let name = format!("halosync-{family}:{}{}", config.prefix, services.worker_id);
    let conn = amqp::connect_with(&config.amqp_url, &config.amqp_access, &name).await?;
    let channel = conn.create_channel().await?;
    if let Err(e) = services.topology.declare(&channel).await {
        let _ = conn.close(320, "topology failed".into()).await;
        return Err(e.into());
    }
    let publisher =
        Publisher::on_channel(conn.create_channel().await?, services.topology.clone()).await?;
    // Room for a whole batch, and the next one filling while the first is
    // written.
    let w = &config.worker;
    let prefetch = w.prefetch.max(w.batch_max.saturating_mul(2));
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let tag = format!("{name}:{}", uuid::Uuid::new_v4().simple());
    let mut consumer = channel
        .basic_consume(
            services.topology.work_queue(family).into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    services
        .probe
        .store(Some(Arc::new(conn.create_channel().await?)));
    services.health.consuming.store(true, Ordering::SeqCst);
    if let Some(d) = services.health.recovered("rabbitmq") {
        tracing::info!(down_for_s = d.as_secs(), "broker reachable again");
    }
    tracing::info!(queue = %services.topology.work_queue(family), prefetch, "consuming");
    let tracker = TaskTracker::new();
    let batch_max = usize::from(w.batch_max.max(1));
    let batch_wait = w.batch_wait;
    let max_bytes = w.max_message_bytes;
    let stall = w.lane_stall;
    let lanes_at_once = w.lanes_at_once.max(1);
    let tiers = config.retry.delays_ms();
    // One lane per connection (`lanes.rs`): at most one batch in flight per
    // lane, lanes side by side. Within a lane the next batch fills while the
    // last is written and goes out only when it is done (or full), so the
    // slower a connection's HaloPSA answers, the more its batches gather;
    // a lane that makes no progress for `lane_stall` parks what it holds
    // beyond its fair share of the window, so the others keep flowing.
    let mut lanes = lanes::Lanes::new(usize::from(prefetch));
    // The channel's outstanding delivery tags (`acks.rs`).
    let acks = Arc::new(acks::AckWindow::default());
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<(String, usize)>();
    let spawn_task = |lane_name: String, taken: Vec<lanes::Received>| {
        let (services, handler, publisher) = (services.clone(), handler.clone(), publisher.clone());
        let (done_tx, acks) = (done_tx.clone(), acks.clone());
        tracker.spawn(async move {
            let n = taken.len();
            batch::settle_batch(services, handler, publisher, acks, taken).await;
            let _ = done_tx.send((lane_name, n));
        });
    };
    let spawn_park = |delivery: Delivery, delay_ms: u64| {
        let (services, publisher, acks) = (services.clone(), publisher.clone(), acks.clone());
        tracker.spawn(async move {
            lanes::park(&services, family, &publisher, &acks, delivery, delay_ms).await;
        });
    };
    let lost = loop {
        let now = tokio::time::Instant::now();
        // Lanes whose batch is due (full, or its wait is over) go now,
        // longest waiting first, as many as `lanes_at_once` allows.
        let mut turns = lanes.turns(now, stall, lanes_at_once);
        for name in lanes.due(now, batch_max) {
            if turns == 0 {
                break;
            }
            let Some(lane) = lanes.map.get_mut(&name) else {
                continue;
            };
            let n = lane.pending.len().min(batch_max);
            let taken: Vec<lanes::Received> = lane.pending.drain(..n).collect();
            lane.tasks += 1;
            lane.in_flight += n;
            lane.progress = now;
            turns -= 1;
            spawn_task(name, taken);
        }
        // A stalled lane keeps at most its fair share: the rest is parked,
        // newest first (the oldest go next when the lane moves again).
        lanes.report(now, stall);
        let share = lanes.fair_share();
        let mut parked = 0;
        for lane in lanes.map.values_mut() {
            let Some(stalled_for) = lane.stalled_for(now, stall).filter(|d| *d >= stall) else {
                continue;
            };
            let keep = share.min(batch_max);
            while lane.pending.len() > keep {
                if let Some(r) = lane.pending.pop() {
                    lane.parked();
                    // A backlog coming back from a delay queue is not
                    // counted (see `Lanes::batch_wait`).
                    parked += usize::from(from_publisher(&r.delivery));
                    spawn_park(r.delivery, lanes::park_delay(&tiers, stalled_for));
                }
            }
        }
        lanes.note_parked(now, parked);
        lanes.drop_idle(now);
        // The next moment something is due without a delivery or a task
        // finishing: an idle lane's batch deadline (while a turn is free),
        // a busy lane becoming stalled while it holds pending deliveries or
        // while due lanes wait for a turn (a stalled lane gives its turn).
        let waiting_for_turn = turns == 0 && !lanes.due(now, batch_max).is_empty();
        let wake = lanes
            .map
            .values()
            .filter(|l| !l.pending.is_empty() || (waiting_for_turn && l.tasks > 0))
            .filter_map(|l| {
                if l.tasks == 0 {
                    Some(l.deadline).filter(|_| turns > 0)
                } else {
                    Some(l.last_progress(now, stall) + stall).filter(|t| *t > now)
                }
            })
            .min();
        tokio::select! {
            _ = shutdown.cancelled() => break None,
            _ = tokio::time::sleep_until(wake.unwrap_or(now)), if wake.is_some() => {}
            Some((name, n)) = done_rx.recv() => {
                if let Some(lane) = lanes.map.get_mut(&name) {
                    lane.finished(n, tokio::time::Instant::now(), stall);
                }
            }
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    acks.received(delivery.delivery_tag);
                    let now = tokio::time::Instant::now();
                    let received = lanes::Received::new(delivery, max_bytes);
                    if let Some(lag) = received.queue_lag(lanes::epoch_ms()) {
                        lanes.note_lag(now, lag);
                    }
                    let name = received.lane();
                    let share = lanes.fair_share();
                    let wait = lanes.batch_wait(now, batch_wait);
                    let lane = lanes.map.entry(name.clone()).or_insert_with(|| {
                        lanes::Lane::new(now, services.halo(&name).map(|c| c.pulse().clone()))
                    });
                    lane.report(&name, now, stall);
                    let stalled = lane.stalled_for(now, stall).filter(|d| *d >= stall);
                    match stalled {
                        Some(d) if lane.pending.len() >= share.min(batch_max) => {
                            lane.parked();
                            let fresh = from_publisher(&received.delivery);
                            spawn_park(received.delivery, lanes::park_delay(&tiers, d));
                            lanes.note_parked(now, usize::from(fresh));
                        }
                        _ => {
                            if lane.pending.is_empty() {
                                lane.deadline = now + wait;
                            }
                            lane.pending.push(received);
                        }
                    }
                }
                Some(Err(e)) => break Some(SessionError::Broker(e)),
                None => break Some(SessionError::Cancelled),
            }
        }
    };
    services.health.consuming.store(false, Ordering::SeqCst);
    if lost.is_none() {
        // Shutting down: an idle lane's collected batch goes now; a busy
        // lane's returns to the queue when the channel closes.
        for (name, lane) in lanes.map.iter_mut() {
            if lane.tasks == 0 && !lane.pending.is_empty() {
                spawn_task(name.clone(), std::mem::take(&mut lane.pending));
            }
        }
    }
    tracker.close();
    if let Some(e) = lost {
        // The channel is gone: deliveries in flight can no longer be acked
        // and the broker will redeliver them. Let the tasks end on their own.
        return Err(e);
    }
    // Clean shutdown: stop taking, finish what is in flight, close.
    if let Err(e) = channel
        .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
        .await
    {
        tracing::warn!(error = %e, "cancelling the consumer failed");
    }
    let grace = config.worker.shutdown_grace;
    tracing::info!(
        in_flight = tracker.len(),
        "shutting down: finishing in-flight messages"
    );
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            in_flight = tracker.len(),
            "grace period over; unfinished messages return to the queue"
        );
    }
    // Closing the channel returns prefetched, unstarted messages to the queue.
    let _ = channel.close(200, "shutdown".into()).await;
    let _ = conn.close(200, "shutdown".into()).await;
    Ok(())
}

/// The `message` span of one delivery, continuing the publisher's trace,
/// with what is known of its event (nothing of a body that is not one).
fn message_span(
    family: Family,
    delivery: &Delivery,
    attempts_before: u32,
    event: Option<&Envelope>,
    aggregate: Option<&str>,
) -> tracing::Span {
    let headers = delivery.properties.headers().as_ref();
    let span = tracing::info_span!(
        "message",
        event_id = event.map(|e| e.id.as_str()),
        event_type = event.map(|e| e.event_type.as_str()),
        connection = event.map(|e| e.connection.as_str()),
        aggregate,
        attempt = attempts_before + 1,
        family = %family,
        repair = event.filter(|e| e.repair).map(|_| true),
    );
    crate::telemetry::continue_trace(
        &span,
        h::get_str(headers, h::TRACEPARENT),
        h::get_str(headers, h::TRACESTATE),
    );
    span
}

/// A delivery published through an exchange (the events exchange) comes
/// from a publisher or a replay, never back from a retry tier (which
/// dead-letters through the default exchange): its `x-halosync-*` failure
/// headers ([`h::OWN_HEADERS`]) are not halosync's and are ignored.
fn from_publisher(delivery: &Delivery) -> bool {
    !delivery.exchange.as_str().is_empty()
}

/// The delivery's headers that halosync may trust (see [`from_publisher`]).
fn trusted_headers(delivery: &Delivery) -> Option<FieldTable> {
    let received = delivery.properties.headers().as_ref();
    if from_publisher(delivery) {
        received.map(|t| h::without(Some(t), &h::OWN_HEADERS))
    } else {
        received.cloned()
    }
}

/// Failed attempts so far, from `x-halosync-attempts` (halosync's own).
fn attempts_of(delivery: &Delivery) -> u32 {
    h::get_i64(trusted_headers(delivery).as_ref(), h::ATTEMPTS)
        .unwrap_or(0)
        .clamp(0, u32::MAX as i64) as u32
}

/// Settles one delivery on its own (a batch's plain acks go together:
/// [`acks::AckWindow::ack_all`]) and records its outcome ([`record`]).
#[allow(clippy::too_many_arguments)]
async fn finish(
    services: &Services,
    family: Family,
    publisher: &Publisher,
    acks: &acks::AckWindow,
    delivery: &Delivery,
    attempts_before: u32,
    event: Option<&Envelope>,
    aggregate: Option<&str>,
    decision: Decision,
    started: Instant,
) -> Settled {
    let decided = match &decision {
        Decision::Ack(o) => Settled::from(*o),
        Decision::Retry(_) => Settled::Retried,
        Decision::Dead(_) => Settled::DeadLettered,
        Decision::Requeue(_) => Settled::Requeued,
    };
    let requeue_reason = match &decision {
        Decision::Requeue(r) => Some(r.clone()),
        _ => None,
    };
    let settled = apply_decision(
        services,
        family,
        publisher,
        acks,
        delivery,
        attempts_before,
        event,
        decision,
    )
    .await;
    record(
        services,
        family,
        delivery,
        attempts_before,
        event,
        aggregate,
        decided,
        requeue_reason,
        settled,
        started,
    )
}

/// Records how one delivery was settled (`decided`, then what `settled`
/// says really happened): the metrics, one activity record and one log
/// line in the message's span: a warning for a retry or dead letter, an
/// error for a message that could not be settled, info for a requeue or a
/// repair, debug for a plain ack (the batch's info line counts those:
/// [`batch`]). Returns the outcome.
#[allow(clippy::too_many_arguments)]
fn record(
    services: &Services,
    family: Family,
    delivery: &Delivery,
    attempts_before: u32,
    event: Option<&Envelope>,
    aggregate: Option<&str>,
    decided: Settled,
    requeue_reason: Option<String>,
    settled: Result<Option<(Failure, Moved)>, lapin::Error>,
    started: Instant,
) -> Settled {
    // What really happened: a retry past its last attempt is dead-lettered
    // (as `exhausted` or `dependency`), a copy that could not be published
    // leaves the message requeued.
    let (outcome, class): (Settled, Option<ErrorClass>) = match &settled {
        Ok(Some((_, Moved::Dead(class)))) => (Settled::DeadLettered, Some(*class)),
        Ok(Some((f, Moved::Retried))) => (Settled::Retried, Some(f.class.into())),
        Ok(Some((f, Moved::Requeued))) => (Settled::Requeued, Some(f.class.into())),
        Ok(None) => (decided, None),
        Err(_) => (Settled::Requeued, None),
    };
    let outcome_label = outcome.as_str();
    let elapsed = started.elapsed();
    let duration_ms = elapsed.as_millis() as u64;
    let family = family.as_str();
    metrics::counter!("halosync_messages_total", "family" => family, "outcome" => outcome_label)
        .increment(1);
    if event.is_some_and(|e| e.repair) {
        metrics::counter!("halosync_repairs_total", "family" => family, "outcome" => outcome_label)
            .increment(1);
    }
    metrics::histogram!("halosync_processing_seconds", "family" => family)
        .record(elapsed.as_secs_f64());
    if let (Ok(Some(_)), Settled::DeadLettered, Some(class)) = (&settled, outcome, class) {
        metrics::counter!("halosync_dead_letters_total", "family" => family, "class" => class.as_str())
            .increment(1);
    }
    let mut record = ActivityRecord {
        time: Utc::now(),
        connection: event.map(|e| e.connection.clone()).unwrap_or_default(),
        family: family.to_string(),
        event_id: event.map(|e| e.id.clone()).unwrap_or_else(|| {
            delivery
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_string())
                .unwrap_or_default()
        }),
        event_type: event.map(|e| e.event_type.clone()).unwrap_or_default(),
        aggregate: aggregate.unwrap_or_default().to_string(),
        outcome,
        class,
        message: None,
        halo_status: None,
        attempts: attempts_before + 1,
        worker: format!("halosync-{family}@{}", services.worker_id),
    };
    match &settled {
        Ok(Some((f, _))) => {
            record.message = Some(excerpt(&f.message, crate::activity::MESSAGE_EXCERPT));
            record.halo_status = f.halo_status;
        }
        Ok(None) => record.message = requeue_reason,
        Err(e) => record.message = Some(excerpt(&e.to_string(), crate::activity::MESSAGE_EXCERPT)),
    }
    services.activity.record(record);
    match settled {
        Ok(Some((f, _))) => {
            let class = class.unwrap_or(f.class.into()).as_str();
            tracing::warn!(outcome = outcome_label, duration_ms, class, error = %f.message, halo_status = f.halo_status, "message settled")
        }
        Ok(None) if event.is_some_and(|e| e.repair) || outcome == Settled::Requeued => {
            tracing::info!(outcome = outcome_label, duration_ms, "message settled")
        }
        Ok(None) => tracing::debug!(outcome = outcome_label, duration_ms, "message settled"),
        Err(e) => {
            tracing::error!(outcome = outcome_label, duration_ms, error = %e, "could not settle the message; the broker will redeliver it")
        }
    }
    outcome
}

/// Where a failed message went.
enum Moved {
    /// To a delay queue.
    Retried,
    /// To the dead queue, filed under this class.
    Dead(ErrorClass),
    /// Nowhere: its copy could not be published, so it was requeued.
    Requeued,
}

/// Settles the delivery. Returns the failure that was retried or
/// dead-lettered and where the message went, for the log line.
#[allow(clippy::too_many_arguments)]
async fn apply_decision(
    services: &Services,
    family: Family,
    publisher: &Publisher,
    acks: &acks::AckWindow,
    delivery: &Delivery,
    attempts_before: u32,
    event: Option<&Envelope>,
    decision: Decision,
) -> Result<Option<(Failure, Moved)>, lapin::Error> {
    let tag = delivery.delivery_tag;
    let requeue = || {
        let nack = delivery.acker.nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        });
        acks.settle_one(tag, nack)
    };
    let config = services.config();
    // Where it goes is decided by `settle::plan` alone; this carries it out.
    let (failure, target, dead_class, attempts) =
        match settle::plan(decision, attempts_before, &config.retry) {
            Plan::Ack(_) => {
                acks.settle_one(tag, delivery.acker.ack(BasicAckOptions::default()))
                    .await?;
                return Ok(None);
            }
            Plan::Requeue(reason) => {
                tracing::error!(reason, "requeueing the message");
                requeue().await?;
                return Ok(None);
            }
            Plan::Retry {
                failure,
                attempts,
                delay_ms,
            } => (
                failure,
                services.topology.retry_queue(family, delay_ms),
                None,
                attempts,
            ),
            Plan::Dead {
                failure,
                class,
                attempts,
            } => (
                failure,
                services.topology.dead_queue(family),
                Some(class),
                attempts,
            ),
        };
    let headers = failure_headers(
        services,
        family,
        delivery,
        event,
        &failure,
        dead_class.unwrap_or(failure.class.into()),
        attempts,
    );
    let properties = delivery
        .properties
        .clone()
        .with_headers(headers)
        .with_delivery_mode(2);
    match publisher
        .publish_to("", &target, &delivery.data, properties)
        .await
    {
        Ok(()) => {
            acks.settle_one(tag, delivery.acker.ack(BasicAckOptions::default()))
                .await?;
            let moved = match dead_class {
                None => Moved::Retried,
                Some(class) => Moved::Dead(class),
            };
            Ok(Some((failure, moved)))
        }
        Err(e) => {
            tracing::error!(error = %e, queue = %target, "could not move the message; requeueing it");
            requeue().await?;
            Ok(Some((failure, Moved::Requeued)))
        }
    }
}

/// The `x-halosync-*` headers of a retry or dead-letter copy (DESIGN §3).
fn failure_headers(
    services: &Services,
    family: Family,
    delivery: &Delivery,
    event: Option<&Envelope>,
    failure: &Failure,
    class: ErrorClass,
    attempts: u32,
) -> FieldTable {
    let trusted = trusted_headers(delivery);
    let old = trusted.as_ref();
    let mut t = old.cloned().unwrap_or_default();
    let now = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
    h::set_str(&mut t, h::ERROR_CLASS, class.as_str());
    h::set_str(&mut t, h::ERROR_MESSAGE, &excerpt(&failure.message, 2000));
    match failure.halo_status {
        Some(s) => h::set_i64(&mut t, h::HALO_STATUS, s as i64),
        None => {
            t = h::without(Some(&t), &[h::HALO_STATUS]);
        }
    }
    match &failure.halo_body {
        Some(b) => h::set_str(&mut t, h::HALO_BODY, b),
        None => {
            t = h::without(Some(&t), &[h::HALO_BODY]);
        }
    }
    h::set_i64(&mut t, h::ATTEMPTS, attempts as i64);
    // A retry copy is not a parked one (its delay is not the lane's).
    t = h::without(Some(&t), &[h::PARKED_UNTIL]);
    if h::get_str(old, h::FIRST_FAILURE).is_none() {
        h::set_str(&mut t, h::FIRST_FAILURE, &now);
    }
    h::set_str(&mut t, h::LAST_FAILURE, &now);
    h::set_str(
        &mut t,
        h::WORKER,
        &format!("halosync-{family}@{}", services.worker_id),
    );
    h::set_str(&mut t, h::FAMILY, family.as_str());
    if h::get_str(old, h::ORIGINAL_ROUTING_KEY).is_none() {
        h::set_str(
            &mut t,
            h::ORIGINAL_ROUTING_KEY,
            delivery.routing_key.as_str(),
        );
    }
    if let Some(e) = event {
        h::set_str(&mut t, h::CONNECTION, &e.connection);
        h::set_str(&mut t, h::EVENT_ID, &e.id);
    }
    t
}
