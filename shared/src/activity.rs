//! The activity log: one compact record per settled message, kept 30 days,
//! searchable by the operator's console (`halosync console`) and by
//! `halosync activity`.
//!
//! # Where it lives, and why
//!
//! A RabbitMQ **stream** queue, `{prefix}halosync.activity`
//! (`x-queue-type: stream`, `x-max-age: 30D`), declared idempotently by
//! [`crate::amqp::Topology::declare`] and listed in
//! `deploy/rabbitmq/definitions.json`. Streams exist from RabbitMQ 3.9 (3.10
//! here) through 4.x. Chosen over Redis because the log must survive a lost
//! Redis (DESIGN §5: Redis is a cache), over HaloPSA because it must cost
//! no HaloPSA budget, and over a database because the broker is already
//! there, durable and replicated, and a stream is an append-only log that
//! many readers can read from any point in time without taking anything
//! away from each other. The broker itself drops segments older than 30 days.
//!
//! # Writing: [`ActivityRecorder`]
//!
//! Recording must never slow down or fail settling, so
//! [`ActivityRecorder::record`] is a `try_send` into a bounded in-memory
//! buffer ([`BUFFER`] records) and returns at once. A background task, on a
//! connection of its own, takes what is buffered (up to [`BATCH_MAX`]
//! records, or what arrived within [`FLUSH_EVERY`]) and publishes it as
//! **one** stream message of JSON lines, with a publisher confirm. One
//! publish per batch, not per record, is what keeps the cost low (measured
//! with `halosync-bench`, see the README).
//!
//! The trade-off: the activity log is an operator's view, not the record of
//! truth (that is HaloPSA, the dead-letter queues and the JSON logs). So when
//! the buffer is full (the broker is slow or down), or the broker refuses a
//! batch, the records are **dropped**, counted in
//! `halosync_activity_dropped_total` and logged at most once a minute,
//! rather than making a message wait, or fail, for its activity record.
//! Losing a few rows of history in a broker outage is better than slowing
//! the sync that the outage already slows.
//!
//! # Reading: [`ActivityLog`]
//!
//! Consumes the stream from 30 days ago (`x-stream-offset` as a timestamp)
//! into an in-memory index, then keeps tailing it (live updates through
//! [`ActivityLog::subscribe`]); it reconnects after a broker loss and
//! resumes after the last offset it saw. Queries are served from memory.
//!
//! Memory: one record costs about 200 bytes of fixed size plus its strings
//! (event id, type, aggregate, connection, worker, message excerpt of at
//! most [`MESSAGE_EXCERPT`] bytes): typically 350–600 bytes. The index is
//! bounded by age (30 days, [`RETENTION`]) and by count
//! ([`ActivityLog::connect`]'s `max_records`, [`DEFAULT_MAX_RECORDS`] =
//! 1,000,000 ≈ 0.5 GB at worst); past the bound the oldest records are
//! evicted from memory (they stay in the stream).

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDate, Utc};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Confirmation};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::amqp;
use crate::error::ErrorClass;
use crate::outcome::Settled;

/// How long the log is kept (the stream's `x-max-age`, and the index).
pub const RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
/// The stream's `x-max-age` argument.
pub const MAX_AGE: &str = "30D";
/// Records buffered in a worker before new ones are dropped.
pub const BUFFER: usize = 16_384;
/// Most records in one stream message.
pub const BATCH_MAX: usize = 500;
/// A batch is published at the latest this long after its first record.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// Most bytes of a failure message kept in a record.
pub const MESSAGE_EXCERPT: usize = 300;
/// Default bound of [`ActivityLog`]'s in-memory index.
pub const DEFAULT_MAX_RECORDS: usize = 1_000_000;

#[derive(Debug, thiserror::Error)]
pub enum ActivityError {
    #[error("RabbitMQ at {url}: {source}")]
    Broker { url: String, source: lapin::Error },
    /// Connecting failed (TLS, credentials, reachability): says what to change.
    #[error("{0}")]
    Connect(#[from] crate::tls::ConnectError),
    #[error(
        "the activity stream {queue} could not be read: {source} (does it exist? `halosync topology` declares it; is the prefix right?)"
    )]
    Stream { queue: String, source: lapin::Error },
    #[error("writing CSV: {0}")]
    Csv(#[from] csv::Error),
}

impl From<ActivityError> for crate::error::Failure {
    fn from(e: ActivityError) -> Self {
        crate::error::Failure::transient(e.to_string())
    }
}

/// One settled message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ActivityRecord {
    /// When the message was settled.
    pub time: DateTime<Utc>,
    pub connection: String,
    pub family: String,
    pub event_id: String,
    pub event_type: String,
    /// The aggregate key (DESIGN §1), e.g. `sub_1` or `sub_1:storage_gb:2026-11-01`.
    pub aggregate: String,
    pub outcome: Settled,
    /// The failure class (`transient`, ..., or the dead-letter class such
    /// as `exhausted`), for retried and dead-lettered messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<ErrorClass>,
    /// The failure message, with HaloPSA's own text where there was one
    /// (at most [`MESSAGE_EXCERPT`] bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub halo_status: Option<u16>,
    /// This delivery's attempt number (1 for the first).
    pub attempts: u32,
    /// `halosync-<family>@<host>:<pid>`.
    pub worker: String,
}

impl ActivityRecord {
    /// Approximate heap + inline size, for the memory figure.
    pub fn approx_bytes(&self) -> usize {
        std::mem::size_of::<ActivityRecord>()
            + self.connection.capacity()
            + self.family.capacity()
            + self.event_id.capacity()
            + self.event_type.capacity()
            + self.aggregate.capacity()
            + self.message.as_ref().map_or(0, String::capacity)
            + self.worker.capacity()
    }
}

// ----- writing ---------------------------------------------------------------

/// Records settled messages to the activity stream without ever blocking
/// (see the module doc). Cheap to clone; a disabled recorder does nothing.
#[derive(Clone, Default)]
pub struct ActivityRecorder {
    inner: Option<Arc<RecorderInner>>,
}

struct RecorderInner {
    tx: mpsc::Sender<ActivityRecord>,
    closing: CancellationToken,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    dropped: Arc<DropCounter>,
}

impl std::fmt::Debug for ActivityRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActivityRecorder")
            .field("enabled", &self.inner.is_some())
            .finish()
    }
}

/// Counts dropped records (metric) and logs about it at most once a minute.
#[derive(Default)]
struct DropCounter {
    total: AtomicU64,
    last_log_secs: AtomicU64,
}

impl DropCounter {
    fn dropped(&self, n: usize, why: &str) {
        if n == 0 {
            return;
        }
        metrics::counter!("halosync_activity_dropped_total").increment(n as u64);
        let total = self.total.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        let now = Utc::now().timestamp().max(0) as u64;
        let last = self.last_log_secs.load(Ordering::Relaxed);
        if now >= last + 60
            && self
                .last_log_secs
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                dropped_total = total,
                reason = why,
                "activity records dropped (the sync itself is not affected)"
            );
        }
    }
}

impl ActivityRecorder {
    /// A recorder that records nothing (`worker.activity = false`).
    pub fn disabled() -> ActivityRecorder {
        ActivityRecorder { inner: None }
    }

    /// Starts the background publisher to `queue` (the stream) on its own
    /// connection to `amqp_url`, with the configuration's TLS and
    /// credentials (`access`). Never fails: while the broker is
    /// unreachable it retries, and records beyond the buffer are dropped.
    pub fn start(
        amqp_url: &str,
        access: &crate::tls::AmqpAccess,
        queue: String,
        name: &str,
    ) -> ActivityRecorder {
        let (tx, rx) = mpsc::channel(BUFFER);
        let closing = CancellationToken::new();
        let dropped = Arc::new(DropCounter::default());
        let task = tokio::spawn(publish_loop(
            (amqp_url.to_string(), access.clone()),
            queue,
            format!("halosync-activity:{name}"),
            rx,
            closing.clone(),
            dropped.clone(),
        ));
        ActivityRecorder {
            inner: Some(Arc::new(RecorderInner {
                tx,
                closing,
                task: Mutex::new(Some(task)),
                dropped,
            })),
        }
    }

    /// Hands one record to the background publisher; never waits.
    pub fn record(&self, record: ActivityRecord) {
        let Some(inner) = &self.inner else { return };
        if inner.tx.try_send(record).is_err() {
            inner.dropped.dropped(1, "buffer full or publisher stopped");
        }
    }

    /// Records dropped so far by this process.
    pub fn dropped(&self) -> u64 {
        self.inner
            .as_ref()
            .map_or(0, |i| i.dropped.total.load(Ordering::Relaxed))
    }

    /// Publishes what is buffered and stops the publisher (at shutdown),
    /// waiting at most `grace`.
    pub async fn close(&self, grace: Duration) {
        let Some(inner) = &self.inner else { return };
        inner.closing.cancel();
        let task = inner.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            if tokio::time::timeout(grace, task).await.is_err() {
                tracing::warn!("activity records still buffered at shutdown were not published");
            }
        }
    }
}

async fn publish_loop(
    url: (String, crate::tls::AmqpAccess),
    queue: String,
    name: String,
    mut rx: mpsc::Receiver<ActivityRecord>,
    closing: CancellationToken,
    dropped: Arc<DropCounter>,
) {
    let mut backoff = Duration::from_millis(250);
    let mut pending: Vec<ActivityRecord> = Vec::new();
    loop {
        let channel = match open_publisher(&url, &queue, &name).await {
            Ok(c) => {
                backoff = Duration::from_millis(250);
                c
            }
            Err(e) => {
                if closing.is_cancelled() {
                    // Shutting down without a broker: what is left is lost.
                    rx.close();
                    let mut n = pending.len();
                    while rx.try_recv().is_ok() {
                        n += 1;
                    }
                    dropped.dropped(n, "broker unreachable at shutdown");
                    return;
                }
                tracing::debug!(error = %e, "activity publisher cannot connect; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = closing.cancelled() => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        loop {
            if pending.is_empty() {
                let first = tokio::select! {
                    r = rx.recv() => r,
                    _ = closing.cancelled() => {
                        rx.close();
                        rx.recv().await
                    }
                };
                let Some(first) = first else {
                    let _ = channel.0.close(200, "shutdown".into()).await;
                    return;
                };
                pending.push(first);
                // Gather more until the batch is full or FLUSH_EVERY passed.
                let deadline = tokio::time::Instant::now() + FLUSH_EVERY;
                while pending.len() < BATCH_MAX {
                    let next = if closing.is_cancelled() {
                        rx.try_recv().ok()
                    } else {
                        tokio::select! {
                            r = rx.recv() => r,
                            _ = tokio::time::sleep_until(deadline) => None,
                            _ = closing.cancelled() => None,
                        }
                    };
                    match next {
                        Some(r) => pending.push(r),
                        None => break,
                    }
                }
            }
            match publish_batch(&channel.1, &queue, &pending).await {
                Ok(true) => pending.clear(),
                Ok(false) => {
                    dropped.dropped(pending.len(), "the broker refused the batch");
                    pending.clear();
                }
                Err(e) => {
                    // Keep the batch for the next connection.
                    tracing::debug!(error = %e, "activity publisher lost its channel; reconnecting");
                    break;
                }
            }
        }
    }
}

/// (connection, confirm channel), with the stream declared.
async fn open_publisher(
    url: &(String, crate::tls::AmqpAccess),
    queue: &str,
    name: &str,
) -> Result<(lapin::Connection, lapin::Channel), amqp::AmqpError> {
    let conn = amqp::connect_with(&url.0, &url.1, name).await?;
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    declare_stream(&channel, queue).await?;
    Ok((conn, channel))
}

/// Declares the activity stream (idempotent; the same arguments as the
/// topology's, see [`stream_arguments`]).
pub async fn declare_stream(channel: &lapin::Channel, queue: &str) -> Result<(), lapin::Error> {
    channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            stream_arguments(),
        )
        .await?;
    Ok(())
}

/// `x-queue-type: stream`, `x-max-age: 30D`.
pub fn stream_arguments() -> FieldTable {
    let mut t = FieldTable::default();
    t.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("stream".as_bytes().to_vec().into()),
    );
    t.insert(
        "x-max-age".into(),
        AMQPValue::LongString(MAX_AGE.as_bytes().to_vec().into()),
    );
    t
}

/// JSON lines of `records`.
pub fn encode_batch(records: &[ActivityRecord]) -> Vec<u8> {
    let mut body = Vec::with_capacity(records.len() * 256);
    for r in records {
        if serde_json::to_writer(&mut body, r).is_ok() {
            body.push(b'\n');
        }
    }
    body
}

/// Parses a stream message: JSON lines, bad lines skipped.
pub fn decode_batch(body: &[u8]) -> Vec<ActivityRecord> {
    body.split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .filter_map(|l| serde_json::from_slice(l).ok())
        .collect()
}

/// `Ok(true)` confirmed, `Ok(false)` refused (nack), `Err` channel lost.
async fn publish_batch(
    channel: &lapin::Channel,
    queue: &str,
    records: &[ActivityRecord],
) -> Result<bool, lapin::Error> {
    let body = encode_batch(records);
    let props = BasicProperties::default()
        .with_content_type("application/x-ndjson".into())
        .with_delivery_mode(2)
        .with_timestamp(Utc::now().timestamp().max(0) as u64);
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            &body,
            props,
        )
        .await?
        .await?;
    Ok(matches!(
        confirm,
        Confirmation::Ack(_) | Confirmation::NotRequested
    ))
}

// ----- reading ---------------------------------------------------------------

/// What to search for; every field optional (`None` = any). Serialisable,
/// so the console keeps the filters in the URL's query string.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ActivityFilter {
    /// Part of the event id (substring, case-sensitive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    /// Part of the aggregate key (substring, case-sensitive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregate: Option<String>,
    /// This connection exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection: Option<String>,
    /// This family exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family: Option<String>,
    /// This outcome exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Settled>,
    /// Settled at or after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<DateTime<Utc>>,
    /// Settled before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<DateTime<Utc>>,
}

impl ActivityFilter {
    pub fn matches(&self, r: &ActivityRecord) -> bool {
        fn opt(want: &Option<String>) -> Option<&str> {
            want.as_deref().filter(|s| !s.is_empty())
        }
        opt(&self.event_id).is_none_or(|w| r.event_id.contains(w))
            && opt(&self.aggregate).is_none_or(|w| r.aggregate.contains(w))
            && opt(&self.connection).is_none_or(|w| r.connection == w)
            && opt(&self.family).is_none_or(|w| r.family == w)
            && self.outcome.is_none_or(|w| r.outcome == w)
            && self.since.is_none_or(|t| r.time >= t)
            && self.until.is_none_or(|t| r.time < t)
    }
}

/// One page of matching records, newest first.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ActivityPage {
    pub rows: Vec<ActivityRecord>,
    /// Matching records in all.
    pub total: usize,
    /// 1-based.
    pub page: usize,
    pub per_page: usize,
    /// Pages in all (at least 1).
    pub pages: usize,
}

/// Records per (connection, family, outcome).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ActivityCount {
    pub connection: String,
    pub family: String,
    pub outcome: Settled,
    pub count: u64,
}

/// Records of one UTC day, per outcome.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DayCount {
    pub day: NaiveDate,
    pub total: u64,
    pub by_outcome: BTreeMap<Settled, u64>,
}

/// Index state, shared with the tailing task.
struct Index {
    /// Ordered by `time` (ties in arrival order).
    records: VecDeque<ActivityRecord>,
    max_records: usize,
    /// The offset after the last delivery seen, to resume after a reconnect.
    next_offset: Option<i64>,
    last_delivery: Instant,
    deliveries: u64,
    connected: bool,
}

impl Index {
    fn insert(&mut self, r: ActivityRecord) {
        let cutoff = Utc::now() - chrono::Duration::from_std(RETENTION).unwrap_or_default();
        if r.time < cutoff {
            return;
        }
        let pos = if self.records.back().is_none_or(|last| last.time <= r.time) {
            self.records.len()
        } else {
            self.records.partition_point(|x| x.time <= r.time)
        };
        self.records.insert(pos, r);
        while self.records.len() > self.max_records
            || self.records.front().is_some_and(|f| f.time < cutoff)
        {
            self.records.pop_front();
        }
    }
}

/// The activity stream, read into memory and kept up to date (see the
/// module doc). Cheap to share (`Arc`); stops tailing when dropped.
pub struct ActivityLog {
    index: Arc<RwLock<Index>>,
    live: broadcast::Sender<ActivityRecord>,
    stop: CancellationToken,
    started: Instant,
}

impl Drop for ActivityLog {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl ActivityLog {
    /// Connects to `{prefix}halosync.activity` and starts reading it from 30
    /// days ago. Fails if the broker is unreachable or the stream missing;
    /// after that, broker losses are retried in the background.
    /// `max_records` bounds memory (see the module doc).
    /// `access` is the configuration's TLS and credentials; `name` names
    /// the reader's connection (`rabbitmqctl list_connections`).
    pub async fn connect(
        amqp_url: &str,
        access: &crate::tls::AmqpAccess,
        name: &str,
        prefix: &str,
        max_records: usize,
    ) -> Result<ActivityLog, ActivityError> {
        let queue = crate::amqp::Topology::new(prefix, &[]).activity_queue();
        let index = Arc::new(RwLock::new(Index {
            records: VecDeque::new(),
            max_records: max_records.max(1),
            next_offset: None,
            last_delivery: Instant::now(),
            deliveries: 0,
            connected: false,
        }));
        let (live, _) = broadcast::channel(1024);
        let stop = CancellationToken::new();
        let broker = Broker {
            url: amqp_url.to_string(),
            access: access.clone(),
            name: name.to_string(),
        };
        let consumer = open_consumer(&broker, &queue, None).await?;
        if let Ok(mut i) = index.write() {
            i.connected = true;
        }
        tokio::spawn(tail(
            broker,
            queue,
            consumer,
            index.clone(),
            live.clone(),
            stop.clone(),
        ));
        Ok(ActivityLog {
            index,
            live,
            stop,
            started: Instant::now(),
        })
    }

    /// Waits until the backlog has been read: no delivery for `idle` (the
    /// broker sends a stream's backlog without pauses), at most `max`.
    /// For one-shot readers such as the CLI; the console need not wait.
    pub async fn wait_caught_up(&self, idle: Duration, max: Duration) {
        let deadline = self.started + max;
        loop {
            let (last, n) = match self.index.read() {
                Ok(i) => (i.last_delivery, i.deliveries),
                Err(_) => return,
            };
            let since = if n == 0 { self.started } else { last };
            if since.elapsed() >= idle || Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether the tailing consumer is connected right now.
    pub fn connected(&self) -> bool {
        self.index.read().map(|i| i.connected).unwrap_or(false)
    }

    /// Records held in memory.
    pub fn len(&self) -> usize {
        self.index.read().map(|i| i.records.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Approximate memory held by the index, in bytes.
    pub fn approx_bytes(&self) -> usize {
        self.index
            .read()
            .map(|i| i.records.iter().map(ActivityRecord::approx_bytes).sum())
            .unwrap_or(0)
    }

    /// One page (1-based; 0 counts as 1) of the records matching `f`,
    /// newest first. `per_page` is clamped to 1..=1000.
    pub fn query(&self, f: &ActivityFilter, page: usize, per_page: usize) -> ActivityPage {
        let per_page = per_page.clamp(1, 1000);
        let page = page.max(1);
        let Ok(i) = self.index.read() else {
            return ActivityPage {
                rows: Vec::new(),
                total: 0,
                page,
                per_page,
                pages: 1,
            };
        };
        let skip = (page - 1).saturating_mul(per_page);
        let mut total = 0usize;
        let mut rows = Vec::new();
        for r in i.records.iter().rev().filter(|r| f.matches(r)) {
            if total >= skip && rows.len() < per_page {
                rows.push(r.clone());
            }
            total += 1;
        }
        ActivityPage {
            rows,
            total,
            page,
            per_page,
            pages: total.div_ceil(per_page).max(1),
        }
    }

    /// Every record matching `f`, newest first (for CSV export).
    pub fn all(&self, f: &ActivityFilter) -> Vec<ActivityRecord> {
        self.index
            .read()
            .map(|i| {
                i.records
                    .iter()
                    .rev()
                    .filter(|r| f.matches(r))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Records since `since` (all held when `None`), per (connection,
    /// family, outcome), sorted by those.
    pub fn counts(&self, since: Option<DateTime<Utc>>) -> Vec<ActivityCount> {
        let mut map: BTreeMap<(String, String, Settled), u64> = BTreeMap::new();
        if let Ok(i) = self.index.read() {
            for r in i.records.iter().rev() {
                if since.is_some_and(|s| r.time < s) {
                    break;
                }
                *map.entry((r.connection.clone(), r.family.clone(), r.outcome))
                    .or_default() += 1;
            }
        }
        map.into_iter()
            .map(|((connection, family, outcome), count)| ActivityCount {
                connection,
                family,
                outcome,
                count,
            })
            .collect()
    }

    /// The last `days` UTC days (today included), oldest first, one entry
    /// per day even when empty: the console's 30-day tiles.
    pub fn daily(&self, days: u32) -> Vec<DayCount> {
        let days = days.max(1);
        let today = Utc::now().date_naive();
        let first = today - chrono::Days::new(u64::from(days - 1));
        let mut out: Vec<DayCount> = (0..days)
            .map(|n| DayCount {
                day: first + chrono::Days::new(u64::from(n)),
                total: 0,
                by_outcome: BTreeMap::new(),
            })
            .collect();
        if let Ok(i) = self.index.read() {
            for r in i.records.iter().rev() {
                let day = r.time.date_naive();
                if day < first {
                    break;
                }
                let n = (day - first).num_days();
                if let Some(d) = usize::try_from(n).ok().and_then(|n| out.get_mut(n)) {
                    d.total += 1;
                    *d.by_outcome.entry(r.outcome).or_default() += 1;
                }
            }
        }
        out
    }

    /// Every record read from now on (for live updates). A slow receiver
    /// misses records (`RecvError::Lagged`) rather than holding the log up.
    pub fn subscribe(&self) -> broadcast::Receiver<ActivityRecord> {
        self.live.subscribe()
    }
}

/// The CSV columns, in order.
pub const CSV_HEADER: [&str; 12] = [
    "time",
    "connection",
    "family",
    "event_id",
    "event_type",
    "aggregate",
    "outcome",
    "class",
    "halo_status",
    "attempts",
    "worker",
    "message",
];

/// One CSV cell made safe for a spreadsheet (OWASP "CSV Injection"): a
/// cell that starts with `=`, `+`, `-`, `@`, a tab or a carriage return
/// would be read as a formula, so it gets a leading `'` (shown as text, the
/// value otherwise unchanged). The `csv` crate then quotes it as needed.
/// Used by every CSV halosync writes (console and CLI).
pub fn csv_cell(value: &str) -> std::borrow::Cow<'_, str> {
    match value.chars().next() {
        Some('=' | '+' | '-' | '@' | '\t' | '\r') => std::borrow::Cow::Owned(format!("'{value}")),
        _ => std::borrow::Cow::Borrowed(value),
    }
}

/// Writes `rows` as CSV (RFC 4180, through the `csv` crate) with a header;
/// every cell goes through [`csv_cell`].
pub fn write_csv<W: Write>(rows: &[ActivityRecord], out: W) -> Result<(), ActivityError> {
    let mut w = csv::Writer::from_writer(out);
    w.write_record(CSV_HEADER)?;
    for r in rows {
        let time = r.time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let status = r.halo_status.map(|s| s.to_string()).unwrap_or_default();
        let attempts = r.attempts.to_string();
        let cells = [
            time.as_str(),
            &r.connection,
            &r.family,
            &r.event_id,
            &r.event_type,
            &r.aggregate,
            r.outcome.as_str(),
            r.class.map_or("", ErrorClass::as_str),
            &status,
            &attempts,
            &r.worker,
            r.message.as_deref().unwrap_or(""),
        ];
        w.write_record(cells.iter().map(|c| csv_cell(c).into_owned()))?;
    }
    w.flush().map_err(|e| ActivityError::Csv(e.into()))?;
    Ok(())
}

/// Where the reader connects: URL, TLS and credentials, connection name.
struct Broker {
    url: String,
    access: crate::tls::AmqpAccess,
    name: String,
}

async fn open_consumer(
    to: &Broker,
    queue: &str,
    offset: Option<i64>,
) -> Result<(lapin::Connection, lapin::Consumer), ActivityError> {
    let broker = |source| ActivityError::Broker {
        url: amqp::redact_url(&to.url),
        source,
    };
    let conn = match amqp::connect_with(&to.url, &to.access, &to.name).await {
        Ok(c) => c,
        Err(amqp::AmqpError::Connect(e)) => return Err(ActivityError::Connect(e)),
        Err(amqp::AmqpError::Lapin(e)) => return Err(broker(e)),
        Err(e @ amqp::AmqpError::Topology(_)) => {
            return Err(broker(lapin::Error::from(std::io::Error::other(
                e.to_string(),
            ))))
        }
    };
    let channel = conn.create_channel().await.map_err(broker)?;
    // Streams need a prefetch and manual acks.
    channel
        .basic_qos(200, BasicQosOptions::default())
        .await
        .map_err(broker)?;
    let mut args = FieldTable::default();
    let start = match offset {
        Some(o) => AMQPValue::LongLongInt(o),
        None => AMQPValue::Timestamp(
            (Utc::now() - chrono::Duration::from_std(RETENTION).unwrap_or_default())
                .timestamp()
                .max(0) as u64,
        ),
    };
    args.insert("x-stream-offset".into(), start);
    let tag = format!("halosync-activity-{}", uuid::Uuid::new_v4().simple());
    let consumer = channel
        .basic_consume(
            queue.into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            args,
        )
        .await
        .map_err(|source| ActivityError::Stream {
            queue: queue.to_string(),
            source,
        })?;
    Ok((conn, consumer))
}

async fn tail(
    url: Broker,
    queue: String,
    first: (lapin::Connection, lapin::Consumer),
    index: Arc<RwLock<Index>>,
    live: broadcast::Sender<ActivityRecord>,
    stop: CancellationToken,
) {
    let mut current = Some(first);
    let mut backoff = Duration::from_millis(250);
    while !stop.is_cancelled() {
        let (conn, mut consumer) = match current.take() {
            Some(c) => c,
            None => {
                let offset = index.read().ok().and_then(|i| i.next_offset);
                match open_consumer(&url, &queue, offset).await {
                    Ok(c) => {
                        backoff = Duration::from_millis(250);
                        c
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "activity reader cannot reconnect; retrying");
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                        continue;
                    }
                }
            }
        };
        if let Ok(mut i) = index.write() {
            i.connected = true;
        }
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => {
                    let _ = conn.close(200, "activity reader stopped".into()).await;
                    return;
                }
                n = consumer.next() => n,
            };
            let delivery = match next {
                Some(Ok(d)) => d,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "activity reader lost the broker; reconnecting");
                    break;
                }
                None => break,
            };
            let offset = crate::amqp::headers::get_i64(
                delivery.properties.headers().as_ref(),
                "x-stream-offset",
            );
            let records = decode_batch(&delivery.data);
            if let Ok(mut i) = index.write() {
                for r in &records {
                    i.insert(r.clone());
                }
                if let Some(o) = offset {
                    i.next_offset = Some(o + 1);
                }
                i.last_delivery = Instant::now();
                i.deliveries += 1;
            }
            for r in records {
                let _ = live.send(r);
            }
            if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
                tracing::warn!(error = %e, "activity reader could not ack; reconnecting");
                break;
            }
        }
        if let Ok(mut i) = index.write() {
            i.connected = false;
        }
        let _ = conn.close(200, "reconnecting".into()).await;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, outcome: &str, secs_ago: i64) -> ActivityRecord {
        ActivityRecord {
            time: Utc::now() - chrono::Duration::seconds(secs_ago),
            connection: "acme".into(),
            family: "subscription".into(),
            event_id: id.into(),
            event_type: "subscription.created".into(),
            aggregate: format!("sub_{id}"),
            outcome: outcome.parse().expect("an outcome"),
            class: None,
            message: Some("a, \"quoted\"\nmessage".into()),
            halo_status: Some(400),
            attempts: 1,
            worker: "halosync-subscription@h:1".into(),
        }
    }

    #[test]
    fn batches_round_trip_and_skip_bad_lines() {
        let rs = vec![rec("1", "applied", 1), rec("2", "retried", 0)];
        let mut body = encode_batch(&rs);
        body.extend_from_slice(b"not json\n");
        assert_eq!(decode_batch(&body), rs);
    }

    #[test]
    fn the_index_keeps_time_order_and_its_bounds() {
        let mut i = Index {
            records: VecDeque::new(),
            max_records: 3,
            next_offset: None,
            last_delivery: Instant::now(),
            deliveries: 0,
            connected: true,
        };
        i.insert(rec("b", "applied", 10));
        i.insert(rec("a", "applied", 20));
        i.insert(rec("c", "applied", 5));
        i.insert(rec("old", "applied", 31 * 24 * 3600));
        let ids: Vec<&str> = i.records.iter().map(|r| r.event_id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        i.insert(rec("d", "applied", 1));
        let ids: Vec<&str> = i.records.iter().map(|r| r.event_id.as_str()).collect();
        assert_eq!(ids, ["b", "c", "d"]);
    }

    #[test]
    fn csv_quotes_what_needs_quoting() {
        let mut out = Vec::new();
        write_csv(&[rec("1", "applied", 0)], &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let mut lines = text.lines();
        assert_eq!(
            lines.next(),
            Some("time,connection,family,event_id,event_type,aggregate,outcome,class,halo_status,attempts,worker,message")
        );
        assert!(text.contains(",400,1,halosync-subscription@h:1,\"a, \"\"quoted\"\"\nmessage\""));
        let mut r = csv::Reader::from_reader(text.as_bytes());
        let row = r.records().next().unwrap().unwrap();
        assert_eq!(&row[11], "a, \"quoted\"\nmessage");
    }

    #[test]
    fn csv_cells_that_a_spreadsheet_would_run_are_neutralised() {
        for bad in [
            "=HYPERLINK(\"http://evil\")",
            "+1+1",
            "-2+3",
            "@SUM(A1)",
            "\tx",
            "\rx",
        ] {
            assert_eq!(csv_cell(bad), format!("'{bad}"), "{bad:?}");
        }
        for fine in ["acme", "evt_1", "", "a=b", " =1"] {
            assert_eq!(csv_cell(fine), fine);
        }
        let mut r = rec("1", "applied", 0);
        r.aggregate = "=HYPERLINK(\"http://evil.example\",\"x\")".into();
        r.connection = "@acme".into();
        let mut out = Vec::new();
        write_csv(&[r], &mut out).unwrap();
        let mut rd = csv::Reader::from_reader(out.as_slice());
        let row = rd.records().next().unwrap().unwrap();
        assert_eq!(&row[5], "'=HYPERLINK(\"http://evil.example\",\"x\")");
        assert_eq!(&row[1], "'@acme");
    }

    #[test]
    fn filters_match_parts_and_exact_fields() {
        let r = rec("evt_123", "applied", 0);
        let f = |f: ActivityFilter| f.matches(&r);
        assert!(f(ActivityFilter::default()));
        assert!(f(ActivityFilter {
            event_id: Some("123".into()),
            ..Default::default()
        }));
        // The outcome matches exactly: a part of one is no outcome at all.
        assert!("appl".parse::<Settled>().is_err());
        assert!(!f(ActivityFilter {
            outcome: Some(Settled::Retried),
            ..Default::default()
        }));
        assert!(f(ActivityFilter {
            outcome: Some(Settled::Applied),
            ..Default::default()
        }));
        assert!(f(ActivityFilter {
            since: Some(Utc::now() - chrono::Duration::seconds(5)),
            until: Some(Utc::now() + chrono::Duration::seconds(5)),
            ..Default::default()
        }));
        assert!(!f(ActivityFilter {
            until: Some(Utc::now() - chrono::Duration::seconds(5)),
            ..Default::default()
        }));
    }
}
