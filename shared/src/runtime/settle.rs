//! Settling a message: where it goes is a pure function of how it ended
//! ([`Decision`]), how many attempts it had used and the retry settings.
//! [`plan`] decides, unit-tested case by case below; the runtime only
//! carries the plan out (ack, publish a copy to a delay or dead queue and
//! ack, or nack with requeue), for single messages and batches alike.

use crate::config::RetrySettings;
use crate::error::{ErrorClass, Failure, FailureClass};
use crate::outcome::Settled;

use super::Outcome;

/// A message that needs nothing more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acked {
    /// HaloPSA now holds this event's state.
    Applied,
    /// A newer (or the same) version was already applied.
    Superseded,
    /// This event id was already processed (the ledger).
    Duplicate,
}

impl Acked {
    pub fn as_str(self) -> &'static str {
        Settled::from(self).as_str()
    }
}

impl From<Acked> for Settled {
    fn from(a: Acked) -> Settled {
        match a {
            Acked::Applied => Settled::Applied,
            Acked::Superseded => Settled::Superseded,
            Acked::Duplicate => Settled::Duplicate,
        }
    }
}

impl From<Outcome> for Acked {
    fn from(o: Outcome) -> Acked {
        match o {
            Outcome::Applied => Acked::Applied,
            Outcome::Superseded => Acked::Superseded,
        }
    }
}

/// How one delivery ended, before settling.
#[derive(Debug)]
pub enum Decision {
    Ack(Acked),
    /// A failure of a retried class (transient, dependency).
    Retry(Failure),
    /// A failure dead-lettered at once (invalid, unmapped, rejected).
    Dead(Failure),
    /// Nothing decided (a panic, a bug): back to the queue as it is; the
    /// quorum queue's delivery limit dead-letters it if it keeps happening.
    Requeue(String),
}

impl Decision {
    /// The decision for a handler's result.
    pub fn of(result: Result<Outcome, Failure>) -> Decision {
        match result {
            Ok(outcome) => Decision::Ack(outcome.into()),
            Err(f) if f.class.is_retried() => Decision::Retry(f),
            Err(f) => Decision::Dead(f),
        }
    }
}

/// Where a delivery goes.
#[derive(Debug, PartialEq)]
pub enum Plan {
    Ack(Acked),
    /// A copy to the delay queue of `delay_ms`, carrying `attempts`.
    Retry {
        failure: Failure,
        attempts: u32,
        delay_ms: u64,
    },
    /// A copy to the dead queue, filed under `class`, carrying `attempts`.
    Dead {
        failure: Failure,
        class: ErrorClass,
        attempts: u32,
    },
    Requeue(String),
}

/// Decides where a delivery goes. `attempts_before`: attempts it had used
/// before this one (`x-halosync-attempts`).
///
/// * A retried failure counts this attempt, except a `throttled` one (our
///   own rate budget, or another worker's lock): that waits without using
///   an attempt, and is never dead-lettered for it.
/// * Once the attempts reach the class's limit (`dependency_max_attempts`
///   for `dependency`, else `max_attempts`), the failure is dead-lettered:
///   as `dependency`, or as `exhausted`.
/// * Otherwise the delay tier grows with the attempts; a 429 waits at least
///   its `Retry-After`, or `rate_limited_min_delay` without one. A
///   `dependency` (a record another family writes) waits in the first tier
///   whatever its attempts.
pub fn plan(decision: Decision, attempts_before: u32, retry: &RetrySettings) -> Plan {
    match decision {
        Decision::Ack(a) => Plan::Ack(a),
        Decision::Requeue(reason) => Plan::Requeue(reason),
        Decision::Dead(failure) => Plan::Dead {
            class: failure.class.into(),
            failure,
            attempts: attempts_before + 1,
        },
        Decision::Retry(failure) => {
            let attempts = if failure.throttled {
                attempts_before
            } else {
                attempts_before + 1
            };
            let limit = match failure.class {
                FailureClass::Dependency => retry.dependency_max_attempts,
                _ => retry.max_attempts,
            };
            if attempts >= limit && !failure.throttled {
                let class = match failure.class {
                    FailureClass::Dependency => ErrorClass::Dependency,
                    _ => ErrorClass::Exhausted,
                };
                Plan::Dead {
                    failure,
                    class,
                    attempts,
                }
            } else {
                // A missing dependency (`halo::links::require`) waits in
                // the shortest tier whatever its attempts: coming back costs
                // a Redis read, no HaloPSA request (HaloPSA is asked once
                // per `dependency_recheck`), so it goes on within that tier
                // of its record being written instead of in a later tier.
                let tier = if failure.class == FailureClass::Dependency {
                    1
                } else {
                    attempts.max(1)
                };
                Plan::Retry {
                    delay_ms: retry_delay(retry, tier, &failure),
                    failure,
                    attempts,
                }
            }
        }
    }
}

/// The delay tier for the `attempts`-th failure: tiers grow with attempts;
/// a 429 waits at least `Retry-After`, or `rate_limited_min_delay`
/// without one (DESIGN §3). Always one of the configured tiers (the delay
/// queues are named after them).
pub fn retry_delay(retry: &RetrySettings, attempts: u32, failure: &Failure) -> u64 {
    let tiers = retry.delays_ms();
    let Some(&last) = tiers.last() else {
        return 0;
    };
    let by_attempt = tiers[(attempts.max(1) as usize - 1).min(tiers.len() - 1)];
    let floor = match (failure.halo_status, failure.retry_after) {
        (_, Some(d)) => d.as_millis() as u64,
        (Some(429), None) => retry.rate_limited_min_delay.as_millis() as u64,
        _ => 0,
    };
    let wanted = by_attempt.max(floor);
    tiers.iter().copied().find(|d| *d >= wanted).unwrap_or(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn settings() -> RetrySettings {
        RetrySettings {
            delays: [1000, 5000, 30_000, 120_000]
                .into_iter()
                .map(Duration::from_millis)
                .collect(),
            max_attempts: 4,
            dependency_max_attempts: 6,
            rate_limited_min_delay: Duration::from_secs(30),
            dependency_recheck: Duration::from_secs(60),
        }
    }

    fn throttled() -> Failure {
        let mut f = Failure::transient("budget spent");
        f.throttled = true;
        f
    }

    #[test]
    fn acks_and_requeues_whatever_the_attempts() {
        for before in [0, 3, 100] {
            for a in [Acked::Applied, Acked::Superseded, Acked::Duplicate] {
                assert_eq!(plan(Decision::Ack(a), before, &settings()), Plan::Ack(a));
            }
            assert_eq!(
                plan(Decision::Requeue("panic".into()), before, &settings()),
                Plan::Requeue("panic".into())
            );
        }
    }

    #[test]
    fn final_classes_are_dead_lettered_at_once_under_their_own_class() {
        for (f, class) in [
            (Failure::invalid("x"), ErrorClass::Invalid),
            (Failure::unmapped("x"), ErrorClass::Unmapped),
            (Failure::rejected("x"), ErrorClass::Rejected),
        ] {
            for before in [0, 2, 9] {
                assert_eq!(
                    plan(Decision::Dead(f.clone()), before, &settings()),
                    Plan::Dead {
                        failure: f.clone(),
                        class,
                        attempts: before + 1
                    }
                );
            }
        }
    }

    #[test]
    fn transient_failures_climb_the_tiers_then_are_exhausted() {
        let f = Failure::transient("503");
        // (attempts before, delay) for the attempts below the limit of 4.
        for (before, delay) in [(0, 1000), (1, 5000), (2, 30_000)] {
            assert_eq!(
                plan(Decision::Retry(f.clone()), before, &settings()),
                Plan::Retry {
                    failure: f.clone(),
                    attempts: before + 1,
                    delay_ms: delay
                },
                "attempt {}",
                before + 1
            );
        }
        for before in [3, 4, 50] {
            assert_eq!(
                plan(Decision::Retry(f.clone()), before, &settings()),
                Plan::Dead {
                    failure: f.clone(),
                    class: ErrorClass::Exhausted,
                    attempts: before + 1
                }
            );
        }
    }

    #[test]
    fn dependencies_have_their_own_longer_limit_and_class() {
        let f = Failure::dependency("no customer yet");
        for before in 0..5 {
            assert!(matches!(
                plan(Decision::Retry(f.clone()), before, &settings()),
                Plan::Retry { attempts, .. } if attempts == before + 1
            ));
        }
        // Whatever the attempts, the first tier: coming back costs no
        // HaloPSA request, and the record may be written any moment.
        for before in 0..5 {
            assert!(matches!(
                plan(Decision::Retry(f.clone()), before, &settings()),
                Plan::Retry { delay_ms: 1000, .. }
            ));
        }
        assert_eq!(
            plan(Decision::Retry(f.clone()), 5, &settings()),
            Plan::Dead {
                failure: f,
                class: ErrorClass::Dependency,
                attempts: 6
            }
        );
    }

    #[test]
    fn throttled_waits_never_use_an_attempt_nor_dead_letter() {
        for before in [0, 3, 4, 1000] {
            match plan(Decision::Retry(throttled()), before, &settings()) {
                Plan::Retry { attempts, .. } => assert_eq!(attempts, before),
                other => panic!("attempts {before}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_429_waits_at_least_retry_after_or_the_minimum() {
        let mut rl = Failure::transient("429");
        rl.halo_status = Some(429);
        assert!(matches!(
            plan(Decision::Retry(rl.clone()), 0, &settings()),
            Plan::Retry {
                delay_ms: 30_000,
                ..
            }
        ));
        rl.retry_after = Some(Duration::from_secs(3));
        assert!(matches!(
            plan(Decision::Retry(rl.clone()), 0, &settings()),
            Plan::Retry { delay_ms: 5000, .. }
        ));
        rl.retry_after = Some(Duration::from_secs(3600));
        assert!(matches!(
            plan(Decision::Retry(rl), 0, &settings()),
            Plan::Retry {
                delay_ms: 120_000,
                ..
            }
        ));
    }

    #[test]
    fn handler_results_become_decisions() {
        assert!(matches!(
            Decision::of(Ok(Outcome::Superseded)),
            Decision::Ack(Acked::Superseded)
        ));
        assert!(matches!(
            Decision::of(Err(Failure::dependency("x"))),
            Decision::Retry(_)
        ));
        assert!(matches!(
            Decision::of(Err(Failure::rejected("x"))),
            Decision::Dead(_)
        ));
    }

    #[test]
    fn a_dependency_known_missing_waits_in_the_first_tier_without_an_attempt() {
        let mut f = Failure::dependency("account acc_1 is not in HaloPSA yet");
        f.throttled = true;
        for before in [0, 3, 5, 50] {
            match plan(Decision::Retry(f.clone()), before, &settings()) {
                Plan::Retry {
                    attempts, delay_ms, ..
                } => {
                    assert_eq!(attempts, before, "no attempt used");
                    assert_eq!(delay_ms, 1000, "the first tier");
                }
                other => panic!("{before}: {other:?}"),
            }
        }
        // Asked and still missing: an attempt, still the first tier.
        let asked = Failure::dependency("account acc_1 is not in HaloPSA yet");
        match plan(Decision::Retry(asked), 3, &settings()) {
            Plan::Retry {
                attempts, delay_ms, ..
            } => assert_eq!((attempts, delay_ms), (4, 1000)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn no_tiers_means_no_delay() {
        let r = RetrySettings {
            delays: vec![],
            ..settings()
        };
        assert_eq!(retry_delay(&r, 1, &Failure::transient("x")), 0);
    }
}
