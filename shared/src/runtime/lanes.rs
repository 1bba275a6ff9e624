//! Lanes: one per HaloPSA connection inside a worker process, so that one
//! MSP's slow, throttled or failing HaloPSA delays only that MSP's events.
//!
//! * Each lane batches its own connection's deliveries and has at most
//!   one batch in flight; lanes run side by side.
//! * A lane is **stalled** when it has work in flight and made no
//!   progress for `worker.lane_stall`: no task finished and its HaloPSA
//!   answered no request (slow answers, a HaloPSA that times out), or at
//!   once when its rate budget holds its requests back for longer than
//!   that (`halo/pulse.rs`). A stalled lane may hold only its fair share
//!   of the process's free prefetch window; what it holds beyond that is
//!   **parked**: a copy goes to a delay queue with its attempt count
//!   unchanged (like a throttled retry: no attempt used, never
//!   dead-lettered for it), confirmed by the broker before the original is
//!   acked. So the consumer keeps reading the queue past a stalled MSP's
//!   backlog to reach everyone else's events, and the backlog comes back
//!   after the delay tier that covers how long the lane has been stalled.
//!
//! * At most `worker.lanes_at_once` lanes write at once, stalled ones not
//!   counted (up to four times as many writing in all): a burst across hundreds of connections (each first event
//!   fetches a token and imports the connection's links) holds the memory
//!   of that many batches, not of one per connection, while a slow or
//!   throttled MSP never takes a turn from the others. Due lanes take the
//!   free turns longest-waiting first.
//!
//! Nothing here weakens a guarantee: a parked delivery is acked only after
//! its copy is confirmed (else nacked with requeue), and order per
//! aggregate does not depend on delivery order (versions decide; an older
//! event that comes back after a newer one is superseded).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio::time::Instant;

use serde_json::Value;

use crate::amqp::headers as h;
use crate::amqp::Publisher;
use crate::contract::{self, ContractError, Family};
use crate::halo::pulse::Pulse;

use super::Services;

/// A delivery with its body parsed, once, as it arrives: its lane reads
/// the envelope's `connection` from it and the pipeline validates it
/// (`Contract::validate_value`), neither parsing the bytes again.
pub(super) struct Received {
    pub delivery: Delivery,
    /// The body as JSON, or why it is not (dead-lettered as `invalid`).
    pub body: Result<Value, ContractError>,
}

impl Received {
    pub fn new(delivery: Delivery, max_bytes: usize) -> Received {
        let body = contract::parse_body(&delivery.data, max_bytes);
        Received { delivery, body }
    }

    /// The lane it belongs to: see [`lane_of`].
    pub fn lane(&self) -> String {
        lane_of(&self.body)
    }

    /// A parked copy back from its delay queue: how long after it left
    /// that queue (`x-halosync-parked-until`) it is read, i.e. how far the
    /// consumer is behind the work queue. None for anything else (a
    /// publisher's header is not trusted: [`super::from_publisher`]).
    /// Another worker process may have parked it: the deployment's clocks
    /// are trusted to agree roughly. One behind the parker's makes the lag
    /// look larger (a batch goes without its wait: a request, never a
    /// guarantee); one ahead reads as on time (clamped to zero).
    pub fn queue_lag(&self, now_ms: i64) -> Option<Duration> {
        if super::from_publisher(&self.delivery) {
            return None;
        }
        let until = h::get_i64(self.delivery.properties.headers().as_ref(), h::PARKED_UNTIL)?;
        Some(Duration::from_millis(
            u64::try_from(now_ms.saturating_sub(until)).unwrap_or(0),
        ))
    }
}

/// Milliseconds since the Unix epoch, the unit of `x-halosync-parked-until`.
pub(super) fn epoch_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The lane of a parsed body: its envelope's `connection`, read without
/// validating the rest (the pipeline validates). A body that does not
/// say goes to the lane `""` and is dead-lettered there as `invalid`.
pub(super) fn lane_of(body: &Result<Value, ContractError>) -> String {
    body.as_ref()
        .ok()
        .and_then(|v| v.get("connection"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// One connection's deliveries in this process.
pub(super) struct Lane {
    /// The connection's HaloPSA pulse (when it last answered, how long its
    /// budget holds requests back); none for a connection not configured.
    pub pulse: Option<Arc<Pulse>>,
    /// Received, waiting for the lane's next batch.
    pub pending: Vec<Received>,
    /// When the pending batch goes even if not full.
    pub deadline: Instant,
    /// Deliveries in flight (being processed).
    pub in_flight: usize,
    /// Tasks in flight (batches, or single messages).
    pub tasks: usize,
    /// The last time a task of this lane finished, or the lane went busy.
    pub progress: Instant,
    /// Since when the lane has been slow: set when a batch finished while
    /// it was stalled, cleared when one finishes without (see
    /// [`Lane::finished`]).
    pub slow_since: Option<Instant>,
    /// The stall being reported: since when, and how many deliveries were
    /// parked during it (one log line when it starts, one when it ends).
    pub stall: Option<(Instant, usize)>,
}

impl Lane {
    pub fn new(now: Instant, pulse: Option<Arc<Pulse>>) -> Lane {
        Lane {
            pulse,
            pending: Vec::new(),
            deadline: now,
            in_flight: 0,
            tasks: 0,
            progress: now,
            slow_since: None,
            stall: None,
        }
    }

    /// Counts a delivery parked during the current stall.
    pub fn parked(&mut self) {
        if let Some((_, parked)) = &mut self.stall {
            *parked += 1;
        }
    }

    /// Logs the lane's stall starting or ending (for the operator: which
    /// MSP's HaloPSA held its own events back, for how long, and how many
    /// were parked meanwhile), once each.
    pub fn report(&mut self, name: &str, now: Instant, stall: Duration) {
        match (
            self.stalled_for(now, stall).filter(|d| *d >= stall),
            self.stall,
        ) {
            (Some(d), None) => {
                self.stall = Some((now, 0));
                tracing::warn!(
                    connection = name,
                    stalled_ms = d.as_millis() as u64,
                    held = self.held(),
                    "connection stalled (HaloPSA slow, failing or out of budget): its deliveries beyond a fair share are parked"
                );
            }
            (None, Some((since, parked))) => {
                self.stall = None;
                tracing::info!(
                    connection = name,
                    stalled_ms = now.saturating_duration_since(since).as_millis() as u64,
                    parked,
                    "connection moving again"
                );
            }
            _ => {}
        }
    }

    /// Deliveries the lane holds (unacked in this process).
    pub fn held(&self) -> usize {
        self.in_flight + self.pending.len()
    }

    /// Whether its HaloPSA answers at a healthy pace (`Pulse::healthy`).
    fn healthy(&self, now: Instant, stall: Duration) -> bool {
        self.pulse
            .as_ref()
            .is_some_and(|p| p.healthy(now.into_std(), stall))
    }

    /// The last sign of progress: a task finishing (or the lane going
    /// busy), or its HaloPSA answering at a healthy pace. A healthy HaloPSA
    /// answers many times a second while a long batch is written, so a
    /// batch that takes seconds does not make its lane look stalled; a
    /// slow one answers once in seconds, which is no progress.
    pub fn last_progress(&self, now: Instant, stall: Duration) -> Instant {
        let answered = self
            .pulse
            .as_ref()
            .filter(|_| self.healthy(now, stall))
            .and_then(|p| p.last_answer())
            .map(Instant::from_std);
        answered.map_or(self.progress, |a| a.max(self.progress))
    }

    /// How long the lane has not been able to make progress, the longest
    /// of: work in flight without progress ([`Lane::last_progress`]);
    /// since it became slow ([`Lane::slow_since`]) unless its HaloPSA
    /// answers at a healthy pace again; how long every request to its
    /// HaloPSA has failed, at least `stall` (down, idle or not: at once);
    /// how much longer its rate
    /// budget holds requests back (known in advance, so a lane waiting on a
    /// spent budget is stalled at once, for as long as the wait). `None`
    /// when idle and its HaloPSA not failing.
    pub fn stalled_for(&self, now: Instant, stall: Duration) -> Option<Duration> {
        let (held, failing) = self.pulse.as_ref().map_or((Duration::ZERO, None), |p| {
            (p.held_for(now.into_std()), p.failing_for(now.into_std()))
        });
        let busy = (self.tasks > 0).then(|| {
            let since_progress = now.saturating_duration_since(self.last_progress(now, stall));
            let slow = self
                .slow_since
                .filter(|_| !self.healthy(now, stall))
                .map(|t| now.saturating_duration_since(t))
                .unwrap_or_default();
            since_progress.max(slow).max(held)
        });
        match (busy, failing) {
            (None, None) => None,
            // Failing counts as stalled at once: its events would only fail
            // and use an attempt each, while parked they use none.
            (busy, failing) => Some(
                busy.unwrap_or_default()
                    .max(failing.map_or(Duration::ZERO, |d| d.max(stall))),
            ),
        }
    }

    /// Whether it counts as stalled now.
    pub fn stalled(&self, now: Instant, stall: Duration) -> bool {
        self.stalled_for(now, stall).is_some_and(|d| d >= stall)
    }

    /// A task of `n` deliveries finished. A lane that finished a batch
    /// while stalled stays slow: its next batch counts as stalled from the
    /// start (else each batch of a HaloPSA answering in 5 s would hold the
    /// window for `lane_stall` again), until a batch finishes without
    /// stalling (its HaloPSA answers at a healthy pace again).
    pub fn finished(&mut self, n: usize, now: Instant, stall: Duration) {
        match self.stalled_for(now, stall).filter(|d| *d >= stall) {
            Some(d) => {
                self.slow_since.get_or_insert(now - d);
            }
            None => self.slow_since = None,
        }
        self.tasks = self.tasks.saturating_sub(1);
        self.in_flight = self.in_flight.saturating_sub(n);
        self.progress = now;
    }
}

/// All lanes of one consumer session.
pub(super) struct Lanes {
    pub map: HashMap<String, Lane>,
    /// The process's prefetch window.
    pub prefetch: usize,
    /// When the last [`BACKLOG_RUN`] deliveries fresh from a publisher
    /// were parked (see [`Lanes::batch_wait`]).
    recent_parks: VecDeque<Instant>,
    /// The newest [`Received::queue_lag`], and when it was read.
    lag: Option<(Instant, Duration)>,
}

impl Lanes {
    pub fn new(prefetch: usize) -> Lanes {
        Lanes {
            map: HashMap::new(),
            prefetch,
            recent_parks: VecDeque::with_capacity(BACKLOG_RUN),
            lag: None,
        }
    }

    /// A parked copy came back and was read `lag` after it left its delay
    /// queue ([`Received::queue_lag`]).
    pub fn note_lag(&mut self, now: Instant, lag: Duration) {
        self.lag = Some((now, lag));
    }

    /// `n` deliveries fresh from a publisher (not back from a delay queue)
    /// were parked now.
    pub fn note_parked(&mut self, now: Instant, n: usize) {
        for _ in 0..n.min(BACKLOG_RUN) {
            if self.recent_parks.len() == BACKLOG_RUN {
                self.recent_parks.pop_front();
            }
            self.recent_parks.push_back(now);
        }
    }

    /// How long a lane whose first delivery arrives now waits for more
    /// before its batch goes: `worker.batch_wait`, to gather what its
    /// publisher sends close together (fewer HaloPSA requests per event),
    /// less however long the consumer is behind its queue, since whatever
    /// was published that long after the delivery is already in the queue
    /// right behind it, not still to come:
    ///
    /// * nothing while the consumer is reading past a stalled connection's
    ///   backlog as it first arrives (the last [`BACKLOG_RUN`] deliveries
    ///   fresh from a publisher were parked within [`CATCHING_UP`]);
    /// * `batch_wait` less the lag of a parked backlog coming back from
    ///   its delay queue (the [`Received::queue_lag`] read within
    ///   [`CATCHING_UP`]): measured on the backlog itself, so a short
    ///   return wave costs the others' batching nothing (tried without:
    ///   skipping the wait whenever a returning backlog was parked again
    ///   made every other connection lose its batching for as long as
    ///   one stayed stalled).
    ///
    /// A trickle of live events parked as they arrive changes nothing.
    pub fn batch_wait(&self, now: Instant, batch_wait: Duration) -> Duration {
        let recent = |t: &Instant| now.saturating_duration_since(*t) < CATCHING_UP;
        let catching_up =
            self.recent_parks.len() == BACKLOG_RUN && self.recent_parks.front().is_some_and(recent);
        if catching_up {
            return Duration::ZERO;
        }
        match self.lag {
            Some((seen, lag)) if recent(&seen) => batch_wait.saturating_sub(lag),
            _ => batch_wait,
        }
    }

    /// A stalled lane's fair share of the free window: what no lane has in
    /// flight, divided among the lanes holding deliveries plus one (room
    /// for a connection not seen yet). At least 1.
    pub fn fair_share(&self) -> usize {
        let in_flight: usize = self.map.values().map(|l| l.in_flight).sum();
        let active = self.map.values().filter(|l| l.held() > 0).count();
        (self.prefetch.saturating_sub(in_flight) / (active + 1)).max(1)
    }

    /// Logs every lane's stall starting or ending ([`Lane::report`]).
    pub fn report(&mut self, now: Instant, stall: Duration) {
        for (name, lane) in self.map.iter_mut() {
            lane.report(name, now, stall);
        }
    }

    /// Lanes writing and not stalled: what `worker.lanes_at_once` bounds.
    /// A stalled lane (waiting out a slow HaloPSA or a spent budget) does
    /// not count, so it never keeps another connection from its turn.
    pub fn moving(&self, now: Instant, stall: Duration) -> usize {
        self.map
            .values()
            .filter(|l| l.tasks > 0 && !l.stalled(now, stall))
            .count()
    }

    /// Lanes writing, stalled or not.
    pub fn writing(&self) -> usize {
        self.map.values().filter(|l| l.tasks > 0).count()
    }

    /// How many more lanes may start a batch now: `at_once` counts the
    /// lanes moving ([`Lanes::moving`]); stalled ones are not counted, up
    /// to [`WRITING_PER_TURN`] × `at_once` lanes writing in all, so that a
    /// process starved of CPU (where every lane looks stalled) does not
    /// start every connection at once.
    pub fn turns(&self, now: Instant, stall: Duration, at_once: usize) -> usize {
        let moving = at_once.saturating_sub(self.moving(now, stall));
        let writing = (at_once * WRITING_PER_TURN).saturating_sub(self.writing());
        moving.min(writing)
    }

    /// The idle lanes whose batch is due (full, or its wait is over),
    /// longest waiting first, so that under `worker.lanes_at_once` every
    /// connection gets its turn in order.
    pub fn due(&self, now: Instant, batch_max: usize) -> Vec<String> {
        due_order(
            self.map
                .iter()
                .map(|(name, l)| (name.as_str(), l.tasks, l.pending.len(), l.deadline)),
            now,
            batch_max,
        )
    }

    /// Forgets lanes that hold nothing (1,000 idle connections cost no
    /// entry), except a slow one's for [`SLOW_REMEMBERED`] (its backlog
    /// comes back from parking and must find it slow, not start afresh).
    pub fn drop_idle(&mut self, now: Instant) {
        self.map.retain(|_, l| {
            l.held() > 0
                || l.tasks > 0
                || (l.slow_since.is_some()
                    && now.saturating_duration_since(l.progress) < SLOW_REMEMBERED)
        });
    }
}

/// A consumer that parked [`BACKLOG_RUN`] deliveries fresh from a publisher
/// within this is reading past a stalled connection's backlog (parking runs
/// at thousands a second; 16 in 50 ms is 320 a second).
pub(super) const CATCHING_UP: Duration = Duration::from_millis(50);
/// See [`CATCHING_UP`].
pub(super) const BACKLOG_RUN: usize = 16;

/// How long an idle lane that was slow is remembered as slow.
pub(super) const SLOW_REMEMBERED: Duration = Duration::from_secs(600);

/// Lanes writing in all (stalled ones included) per `worker.lanes_at_once`.
pub(super) const WRITING_PER_TURN: usize = 4;

/// [`Lanes::due`] on plain values: (lane, tasks, pending, deadline).
fn due_order<'a>(
    lanes: impl Iterator<Item = (&'a str, usize, usize, Instant)>,
    now: Instant,
    batch_max: usize,
) -> Vec<String> {
    let mut due: Vec<(&str, Instant)> = lanes
        .filter(|(_, tasks, pending, deadline)| {
            *tasks == 0 && *pending > 0 && (*pending >= batch_max || now >= *deadline)
        })
        .map(|(name, _, _, deadline)| (name, deadline))
        .collect();
    due.sort_by_key(|(_, deadline)| *deadline);
    due.into_iter().map(|(name, _)| name.to_string()).collect()
}

/// The delay tier a stalled lane's deliveries are parked in: the shortest
/// that covers how long the lane has been stalled (a lane answering in 5 s
/// parks for 5 s, one down for minutes for longer), at least the first.
pub(super) fn park_delay(tiers: &[u64], stalled_for: Duration) -> u64 {
    let wanted = stalled_for.as_millis() as u64;
    tiers
        .iter()
        .copied()
        .find(|d| *d >= wanted)
        .or_else(|| tiers.last().copied())
        .unwrap_or(0)
}

/// Parks one delivery: a copy, attempts and headers unchanged (but for
/// `x-halosync-parked-until`, when it leaves), to the delay queue of
/// `delay_ms`; the original is acked once the broker
/// confirmed the copy, else nacked with requeue.
pub(super) async fn park(
    services: &Services,
    family: Family,
    publisher: &Publisher,
    acks: &super::acks::AckWindow,
    delivery: Delivery,
    delay_ms: u64,
) {
    let queue = services.topology.retry_queue(family, delay_ms);
    // Only halosync's own headers that it may trust travel on (a publisher
    // could otherwise have its own made trusted by a park).
    let mut headers = super::trusted_headers(&delivery).unwrap_or_default();
    let until = epoch_ms().saturating_add(i64::try_from(delay_ms).unwrap_or(i64::MAX));
    h::set_i64(&mut headers, h::PARKED_UNTIL, until);
    let properties = delivery
        .properties
        .clone()
        .with_headers(headers)
        .with_delivery_mode(2);
    metrics::counter!("halosync_parked_total", "family" => family.as_str()).increment(1);
    let published = publisher
        .publish_to("", &queue, &delivery.data, properties)
        .await;
    let tag = delivery.delivery_tag;
    let settled = match published {
        Ok(()) => {
            acks.settle_one(tag, delivery.acker.ack(BasicAckOptions::default()))
                .await
        }
        Err(e) => {
            tracing::warn!(error = %e, queue = %queue, "could not park the message; requeueing it");
            let nack = delivery.acker.nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            });
            acks.settle_one(tag, nack).await
        }
    };
    if let Err(e) = settled {
        tracing::warn!(error = %e, "could not settle a parked message; the broker will redeliver it");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lane_is_the_envelope_connection() {
        let lane_of = |body: &[u8]| lane_of(&contract::parse_body(body, 1 << 20));
        assert_eq!(
            lane_of(br#"{"id":"e1","connection":"acme","data":{}}"#),
            "acme"
        );
        assert_eq!(lane_of(br#"{"id":"e1"}"#), "");
        assert_eq!(lane_of(b"not json"), "");
        assert_eq!(lane_of(br#"{"connection":7}"#), "");
        assert_eq!(
            super::lane_of(&contract::parse_body(br#"{"connection":"acme"}"#, 4)),
            "",
            "an oversized body is not read"
        );
    }

    #[test]
    fn stalled_lanes_do_not_count_against_the_lanes_at_once_and_due_lanes_go_oldest_first() {
        let now = Instant::now();
        let stall = Duration::from_secs(1);
        let mut lanes = Lanes::new(400);
        let mut writing = Lane::new(now, None);
        writing.tasks = 1;
        writing.in_flight = 3;
        lanes.map.insert("writing".into(), writing);
        let mut stalled = Lane::new(now - Duration::from_secs(5), None);
        stalled.tasks = 1;
        stalled.in_flight = 3;
        lanes.map.insert("stalled".into(), stalled);
        assert_eq!(lanes.moving(now, stall), 1);
        assert_eq!(lanes.writing(), 2);
        // One turn of 2 taken by the writing lane; the stalled one is free.
        assert_eq!(lanes.turns(now, stall, 2), 1);
        // One turn, taken by the moving lane.
        assert_eq!(lanes.turns(now, stall, 1), 0);
        for i in 0..6 {
            let mut l = Lane::new(now - Duration::from_secs(5), None);
            l.tasks = 1;
            lanes.map.insert(format!("stalled{i}"), l);
        }
        // 8 writing, 7 stalled: the ceiling of 4 × 2 is reached.
        assert_eq!(lanes.turns(now, stall, 2), 0);
        assert_eq!(lanes.turns(now, stall, 3), 2);
        // Idle lanes with a batch are due when full or past their deadline,
        // longest waiting first; a busy lane or an empty one never is.
        let at = |ms: i64| {
            if ms >= 0 {
                now + Duration::from_millis(ms as u64)
            } else {
                now - Duration::from_millis(ms.unsigned_abs())
            }
        };
        let candidates = [
            ("b", 0, 1, at(-300)),
            ("a", 0, 1, at(-900)),
            ("full", 0, 200, at(100)),
            ("young", 0, 1, at(100)),
            ("busy", 1, 5, at(-2_000)),
            ("empty", 0, 0, at(-2_000)),
        ];
        assert_eq!(
            due_order(candidates.into_iter(), now, 200),
            ["a", "b", "full"]
        );
    }

    #[test]
    fn a_lane_is_stalled_by_silence_a_slow_pace_a_spent_budget_or_failures_and_moves_at_a_healthy_pace(
    ) {
        let stall = Duration::from_secs(1);
        let pulse = Arc::new(Pulse::default());
        let busy_since = Instant::now() - Duration::from_secs(3);
        let mut lane = Lane::new(busy_since, Some(pulse.clone()));
        lane.tasks = 1;
        // Three seconds without a task finishing and no answer: stalled.
        assert!(lane.stalled(Instant::now(), stall));
        // One answer after that silence is a slow HaloPSA, not progress.
        pulse.answered();
        assert!(lane.stalled(Instant::now(), stall));
        // Answers at a healthy pace (a long batch of a healthy HaloPSA):
        // moving although no task finished for three seconds.
        pulse.answered();
        assert!(!lane.stalled(Instant::now(), stall));
        // Its budget holds requests back for 4 s: stalled now, for that long.
        let now = Instant::now();
        pulse.held_until(now.into_std() + Duration::from_secs(4));
        let held = lane.stalled_for(now, stall).unwrap_or_default();
        assert!(held > Duration::from_millis(3_900), "{held:?}");
        assert_eq!(park_delay(&[1_000, 5_000, 30_000], held), 5_000);
        // A batch that finishes while stalled leaves the lane slow: its
        // next batch is stalled from the start, not after `stall` again.
        let later = now + Duration::from_secs(5);
        lane.finished(0, later, stall);
        assert!(lane.slow_since.is_some());
        lane.tasks = 1;
        lane.progress = later;
        assert!(lane.stalled(later, stall));
        // Idle and not failing, it is never stalled.
        lane.tasks = 0;
        assert_eq!(lane.stalled_for(later, stall), None);
        // Every request failing (HaloPSA down): stalled at once, even while
        // idle, for as long as the failures last.
        pulse.failed();
        assert!(lane.stalled(Instant::now(), stall), "at once");
        let failing = lane.stalled_for(Instant::now() + Duration::from_secs(2), stall);
        assert!(
            failing.is_some_and(|d| d >= Duration::from_millis(1_990)),
            "{failing:?}"
        );
        // A slow lane whose HaloPSA answers at a healthy pace again: the
        // batch that finishes then ends the slowness.
        let fresh = Arc::new(Pulse::default());
        let mut lane = Lane::new(Instant::now(), Some(fresh.clone()));
        lane.slow_since = Some(Instant::now() - Duration::from_secs(30));
        lane.tasks = 1;
        assert!(lane.stalled(Instant::now(), stall), "slow and silent");
        fresh.answered();
        fresh.answered();
        assert!(!lane.stalled(Instant::now(), stall));
        lane.finished(0, Instant::now(), stall);
        assert_eq!(lane.slow_since, None);
    }

    #[test]
    fn a_stall_is_reported_once_when_it_starts_and_counts_what_it_parked_until_it_ends() {
        let stall = Duration::from_secs(1);
        let now = Instant::now();
        let mut lane = Lane::new(now - Duration::from_secs(3), None);
        lane.parked();
        assert_eq!(lane.stall, None, "nothing counted outside a stall");
        lane.tasks = 1;
        lane.report("noisy", now, stall);
        let started = lane.stall.map(|(since, _)| since);
        assert_eq!(started, Some(now));
        lane.parked();
        lane.parked();
        lane.report("noisy", now + Duration::from_secs(1), stall);
        assert_eq!(lane.stall, Some((now, 2)), "one stall, reported once");
        lane.finished(0, now + Duration::from_secs(2), stall);
        lane.slow_since = None;
        lane.report("noisy", now + Duration::from_secs(2), stall);
        assert_eq!(lane.stall, None, "moving again");
    }

    #[test]
    fn a_batch_waits_for_more_unless_the_consumer_is_reading_past_a_backlog() {
        let now = Instant::now();
        let wait = Duration::from_millis(200);
        let mut lanes = Lanes::new(400);
        assert_eq!(lanes.batch_wait(now, wait), wait, "nothing parked");
        // A trickle of live events parked as they arrive: no backlog.
        for ms in [900, 600, 300, 10] {
            lanes.note_parked(now - Duration::from_millis(ms), 1);
        }
        assert_eq!(lanes.batch_wait(now, wait), wait, "a trickle");
        // A run of BACKLOG_RUN within CATCHING_UP: reading past a backlog.
        for i in 0..BACKLOG_RUN as u64 - 2 {
            lanes.note_parked(now - Duration::from_millis(40 - 2 * i), 1);
        }
        assert_eq!(lanes.batch_wait(now, wait), wait, "not quite a run");
        lanes.note_parked(now - Duration::from_millis(5), 2);
        assert_eq!(lanes.batch_wait(now, wait), Duration::ZERO);
        assert_eq!(
            lanes.batch_wait(now + CATCHING_UP, wait),
            wait,
            "the run is over"
        );
    }

    #[test]
    fn a_backlog_coming_back_late_shortens_the_wait_by_how_late_it_is_read() {
        let now = Instant::now();
        let wait = Duration::from_millis(200);
        let mut lanes = Lanes::new(400);
        lanes.note_lag(now, Duration::from_millis(120));
        assert_eq!(lanes.batch_wait(now, wait), Duration::from_millis(80));
        lanes.note_lag(now, Duration::from_millis(350));
        assert_eq!(lanes.batch_wait(now, wait), Duration::ZERO);
        assert_eq!(
            lanes.batch_wait(now + CATCHING_UP, wait),
            wait,
            "no parked copy read lately: the queue may have caught up"
        );
        lanes.note_lag(now, Duration::ZERO);
        assert_eq!(lanes.batch_wait(now, wait), wait, "read on time");
    }

    #[test]
    fn only_a_parked_copy_back_from_its_delay_queue_tells_the_queue_lag() {
        let parked_until = |exchange: &str, until: Option<i64>| {
            let mut delivery =
                Delivery::mock(1, exchange.into(), "q".into(), false, b"{}".to_vec());
            if let Some(until) = until {
                let mut t = lapin::types::FieldTable::default();
                h::set_i64(&mut t, h::PARKED_UNTIL, until);
                delivery.properties = delivery.properties.with_headers(t);
            }
            Received::new(delivery, 1 << 10)
        };
        let now = 1_000_000;
        assert_eq!(
            parked_until("", Some(now - 250)).queue_lag(now),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            parked_until("", Some(now + 50)).queue_lag(now),
            Some(Duration::ZERO),
            "a clock a little ahead is on time, not negative"
        );
        assert_eq!(parked_until("", None).queue_lag(now), None, "a retry");
        assert_eq!(
            parked_until("halosync.events", Some(now - 250)).queue_lag(now),
            None,
            "a publisher's header is not ours"
        );
    }

    #[test]
    fn parks_for_the_tier_that_covers_the_stall() {
        let tiers = [1_000, 5_000, 30_000];
        assert_eq!(park_delay(&tiers, Duration::from_millis(10)), 1_000);
        assert_eq!(park_delay(&tiers, Duration::from_millis(1_000)), 1_000);
        assert_eq!(park_delay(&tiers, Duration::from_millis(1_200)), 5_000);
        assert_eq!(park_delay(&tiers, Duration::from_secs(29)), 30_000);
        assert_eq!(park_delay(&tiers, Duration::from_secs(600)), 30_000);
        assert_eq!(park_delay(&[], Duration::from_secs(1)), 0);
    }

    #[test]
    fn a_stalled_lane_gets_a_share_of_the_free_window() {
        let now = Instant::now();
        let stall = Duration::from_secs(1);
        let mut lanes = Lanes::new(400);
        assert_eq!(lanes.fair_share(), 400);
        let mut noisy = Lane::new(now, None);
        noisy.in_flight = 200;
        noisy.tasks = 1;
        lanes.map.insert("noisy".into(), noisy);
        // 200 free, noisy and one unseen connection.
        assert_eq!(lanes.fair_share(), 100);
        let mut quiet = Lane::new(now, None);
        quiet.in_flight = 1;
        quiet.tasks = 1;
        lanes.map.insert("quiet".into(), quiet);
        assert_eq!(lanes.fair_share(), 199 / 3);
        if let Some(l) = lanes.map.get_mut("quiet") {
            l.in_flight = 0;
            l.tasks = 0;
        }
        assert_eq!(lanes.map["quiet"].stalled_for(now, stall), None);
        lanes.drop_idle(now);
        assert_eq!(lanes.map.len(), 1);
        assert_eq!(
            lanes.map["noisy"].stalled_for(now + Duration::from_secs(2), stall),
            Some(Duration::from_secs(2))
        );
    }
}
