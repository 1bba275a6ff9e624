//! Outages of the services a worker depends on (RabbitMQ, Redis, each
//! HaloPSA connection): how long one has lasted, what `/readyz` says about
//! it, and one clear log line per minute instead of one per retry.
//!
//! A worker never exits because a dependency is down: it waits with
//! backoff, reports not-ready, and carries on when the service is back
//! (DESIGN §2: nothing is lost). This module only keeps the bookkeeping of
//! that, so that every wait loop logs and reports the same way.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a continuing outage is logged again.
pub const LOG_EVERY: Duration = Duration::from_secs(60);

/// A HaloPSA connection counts as unreachable for `/readyz` once it has
/// failed without a single success for this long (one failed request is a
/// hiccup that the retry tiers handle, not an outage).
pub const HALO_UNREACHABLE_AFTER: Duration = Duration::from_secs(30);

/// One service's outage state.
#[derive(Debug, Default)]
struct Down {
    since: Option<Instant>,
    last_logged: Option<Instant>,
    attempts: u64,
    last_error: String,
}

/// What the caller should log after reporting a failure.
#[derive(Debug, PartialEq, Eq)]
pub enum Report {
    /// The first failure of a new outage, or a minute since the last line.
    Log { down_for: Duration, attempts: u64 },
    /// Logged recently: stay quiet.
    Quiet,
}

/// The outage bookkeeping of one worker process: per service, since when it
/// has been failing, and whether the worker is consuming.
#[derive(Debug, Default)]
pub struct Health {
    /// True while the broker session is up and the consumer is running.
    pub consuming: AtomicBool,
    down: Mutex<BTreeMap<String, Down>>,
}

impl Health {
    pub fn new() -> Health {
        Health::default()
    }

    /// Records a failure to reach `service` (e.g. `redis`, `rabbitmq`,
    /// `halopsa:acme`). Never holds the lock across an await.
    pub fn failed(&self, service: &str, error: &str) -> Report {
        let now = Instant::now();
        let mut down = match self.down.lock() {
            Ok(d) => d,
            Err(poisoned) => poisoned.into_inner(),
        };
        let d = down.entry(service.to_string()).or_default();
        let since = *d.since.get_or_insert(now);
        d.attempts += 1;
        d.last_error = error.to_string();
        let due = d
            .last_logged
            .is_none_or(|t| now.duration_since(t) >= LOG_EVERY);
        if due {
            d.last_logged = Some(now);
            Report::Log {
                down_for: now.duration_since(since),
                attempts: d.attempts,
            }
        } else {
            Report::Quiet
        }
    }

    /// Records that `service` answered. Returns how long it had been down,
    /// if it had been (for one "reachable again" log line).
    pub fn recovered(&self, service: &str) -> Option<Duration> {
        let mut down = match self.down.lock() {
            Ok(d) => d,
            Err(poisoned) => poisoned.into_inner(),
        };
        down.remove(service)
            .and_then(|d| d.since)
            .map(|s| s.elapsed())
    }

    /// Why the worker is not ready, if it is not: a dependency down (HaloPSA
    /// only after [`HALO_UNREACHABLE_AFTER`]) or the consumer not running.
    pub fn not_ready(&self) -> Option<String> {
        let down = match self.down.lock() {
            Ok(d) => d,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut reasons = Vec::new();
        for (service, d) in down.iter() {
            let Some(since) = d.since else { continue };
            let for_ = since.elapsed();
            if service.starts_with("halopsa:") && for_ < HALO_UNREACHABLE_AFTER {
                continue;
            }
            reasons.push(format!(
                "{service} unreachable for {}s ({} attempts): {}",
                for_.as_secs(),
                d.attempts,
                d.last_error
            ));
        }
        if !self.consuming.load(Ordering::SeqCst) && reasons.is_empty() {
            reasons.push("not consuming (starting, or the broker session is being rebuilt)".into());
        }
        if reasons.is_empty() {
            None
        } else {
            Some(reasons.join("; "))
        }
    }
}

/// Backoff between connection attempts: 250 ms doubling to 10 s.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: Duration::from_millis(250),
        }
    }
}

impl Backoff {
    pub const MAX: Duration = Duration::from_secs(10);

    /// The delay to wait now; the following one doubles.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        d
    }

    pub fn reset(&mut self) {
        *self = Backoff::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_the_first_failure_then_once_a_minute() {
        let h = Health::new();
        assert!(matches!(
            h.failed("redis", "refused"),
            Report::Log { attempts: 1, .. }
        ));
        assert_eq!(h.failed("redis", "refused"), Report::Quiet);
        assert!(h.not_ready().unwrap().contains("redis unreachable"));
        assert!(h.recovered("redis").is_some());
        assert!(h.recovered("redis").is_none());
        // A new outage logs at once again.
        assert!(matches!(h.failed("redis", "refused"), Report::Log { .. }));
    }

    #[test]
    fn a_short_halopsa_hiccup_keeps_the_worker_ready() {
        let h = Health::new();
        h.consuming.store(true, Ordering::SeqCst);
        let _ = h.failed("halopsa:acme", "503");
        assert_eq!(h.not_ready(), None);
        let _ = h.failed("rabbitmq", "connection refused");
        assert!(h.not_ready().unwrap().contains("rabbitmq"));
    }

    #[test]
    fn not_consuming_is_not_ready() {
        let h = Health::new();
        assert!(h.not_ready().unwrap().contains("not consuming"));
        h.consuming.store(true, Ordering::SeqCst);
        assert_eq!(h.not_ready(), None);
    }

    #[test]
    fn backoff_doubles_to_its_cap() {
        let mut b = Backoff::default();
        let got: Vec<u64> = (0..8).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(got, [250, 500, 1000, 2000, 4000, 8000, 10_000, 10_000]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(250));
    }
}
