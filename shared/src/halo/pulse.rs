//! What a worker's lanes know of one connection's HaloPSA without asking
//! it anything: when it last answered, and until when the rate budget
//! holds this process's requests back. The lanes (`runtime/lanes.rs`) read
//! it to tell a connection that cannot make progress from one whose batch
//! is merely long: a healthy HaloPSA answers many times a second while a
//! batch of hundreds of events is written; a slow one does not answer at
//! all for seconds, and a spent budget says in advance how long it holds.
//!
//! Plain atomics, written by the client and read by the session loop, so
//! that reading a thousand lanes' pulses costs no lock and no await.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Instants are kept as milliseconds since this process-wide origin, plus
/// one (0 = never).
fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

fn stamp(at: Instant) -> u64 {
    at.saturating_duration_since(origin()).as_millis() as u64 + 1
}

fn instant(stamp: u64) -> Option<Instant> {
    stamp
        .checked_sub(1)
        .map(|ms| origin() + Duration::from_millis(ms))
}

#[derive(Debug, Default)]
pub struct Pulse {
    answered: AtomicU64,
    /// Milliseconds between the last two answers.
    gap: AtomicU64,
    held_until: AtomicU64,
    /// When the current run of failures (5xx, unreachable) began; older
    /// than `answered` when the last request was answered.
    failing_since: AtomicU64,
}

impl Pulse {
    /// HaloPSA answered a request (not with a 5xx or a 429: those say it
    /// cannot take more now).
    pub fn answered(&self) {
        let now = stamp(Instant::now());
        let before = self.answered.fetch_max(now, Ordering::Relaxed);
        let gap = if before == 0 {
            u64::MAX
        } else {
            now.saturating_sub(before)
        };
        self.gap.store(gap, Ordering::Relaxed);
    }

    /// A request failed as an outage does: HaloPSA unreachable, or a 5xx.
    pub fn failed(&self) {
        let answered = self.answered.load(Ordering::Relaxed);
        let since = self.failing_since.load(Ordering::Relaxed);
        if since <= answered {
            // A new run of failures (a race with another request of the
            // same run only moves its start by that request's time); after
            // the last answer even within the same millisecond.
            let now = stamp(Instant::now()).max(answered + 1);
            self.failing_since.store(now, Ordering::Relaxed);
        }
    }

    /// How long every request has failed (none answered since), if the
    /// last one failed.
    pub fn failing_for(&self, now: Instant) -> Option<Duration> {
        let since = self.failing_since.load(Ordering::Relaxed);
        (since > self.answered.load(Ordering::Relaxed))
            .then(|| instant(since).map(|t| now.saturating_duration_since(t)))
            .flatten()
    }

    /// HaloPSA answers at a healthy pace: it answered within `within` of
    /// `now`, and the two last answers were less than `within` apart (one
    /// answer after a long silence is a slow HaloPSA, not a healthy one).
    pub fn healthy(&self, now: Instant, within: Duration) -> bool {
        let within_ms = within.as_millis() as u64;
        self.last_answer()
            .is_some_and(|t| now.saturating_duration_since(t) < within)
            && self.gap.load(Ordering::Relaxed) < within_ms
            && self.failing_for(now).is_none()
    }

    /// The rate budget holds this process's requests until `until`.
    pub fn held_until(&self, until: Instant) {
        self.held_until.fetch_max(stamp(until), Ordering::Relaxed);
    }

    /// When HaloPSA last answered, if ever.
    pub fn last_answer(&self) -> Option<Instant> {
        instant(self.answered.load(Ordering::Relaxed))
    }

    /// How much longer the rate budget holds requests back from `now`.
    pub fn held_for(&self, now: Instant) -> Duration {
        instant(self.held_until.load(Ordering::Relaxed))
            .map(|t| t.saturating_duration_since(now))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_latest_answer_and_the_furthest_hold() {
        let pulse = Pulse::default();
        let now = Instant::now();
        assert_eq!(pulse.last_answer(), None);
        assert_eq!(pulse.held_for(now), Duration::ZERO);
        pulse.answered();
        let first = pulse.last_answer();
        assert!(first.is_some_and(|t| t + Duration::from_millis(1) >= now));
        pulse.held_until(now + Duration::from_secs(5));
        pulse.held_until(now + Duration::from_secs(2));
        let held = pulse.held_for(now);
        assert!(
            held > Duration::from_millis(4_990) && held <= Duration::from_secs(5),
            "{held:?}"
        );
        assert_eq!(pulse.held_for(now + Duration::from_secs(6)), Duration::ZERO);
    }

    #[test]
    fn one_answer_after_a_silence_is_not_health_and_failures_count_from_the_first() {
        let pulse = Pulse::default();
        let within = Duration::from_secs(1);
        pulse.answered();
        assert!(
            !pulse.healthy(Instant::now(), within),
            "a first answer says nothing of the pace"
        );
        pulse.answered();
        assert!(pulse.healthy(Instant::now(), within));
        assert!(!pulse.healthy(Instant::now() + Duration::from_secs(2), within));
        assert_eq!(pulse.failing_for(Instant::now()), None);
        std::thread::sleep(Duration::from_millis(5));
        pulse.failed();
        let first = Instant::now();
        std::thread::sleep(Duration::from_millis(5));
        pulse.failed();
        let failing = pulse.failing_for(first + Duration::from_secs(3));
        assert!(
            failing.is_some_and(|d| d >= Duration::from_secs(3)),
            "{failing:?}"
        );
        assert!(!pulse.healthy(Instant::now(), within));
        std::thread::sleep(Duration::from_millis(5));
        pulse.answered();
        assert_eq!(pulse.failing_for(Instant::now()), None);
    }
}
