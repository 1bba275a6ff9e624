//! A handler's batch and its results: one result per event, in the
//! batch's order, by construction.
//!
//! The runtime hands a handler its events as a [`Batch`]; the handler
//! turns each event into its own state ([`Batch::map`]), works through
//! the events still open in phases ([`Batch::open`] gives one [`Open`]
//! handle per open event, which the handler groups, sends in arrays, and
//! settles), and returns [`Batch::finish`]. Nothing in between is an index
//! or a slot: a handler cannot add or drop an event (every method keeps
//! one entry per event), nor settle one twice (settling consumes the
//! event's handle, and only an open event has one).

use std::ops::{Deref, DerefMut};

use super::settle::Decision;
use super::Outcome;
use crate::error::Failure;

/// The events of one batch on their way through a handler, in the batch's
/// order: each one open, with the handler's state for it, or settled, with
/// its result.
pub struct Batch<S> {
    entries: Vec<Entry<S>>,
}

enum Entry<S> {
    /// The handler's state, and its result once settled.
    Live(S, Option<Result<Outcome, Failure>>),
    /// Settled before the state changed type ([`Batch::map`]).
    Settled(Result<Outcome, Failure>),
}

impl<S> Batch<S> {
    /// A batch of open events (the runtime's: a handler gets its batch).
    pub(crate) fn new(states: Vec<S>) -> Batch<S> {
        Batch {
            entries: states.into_iter().map(|s| Entry::Live(s, None)).collect(),
        }
    }

    /// Every open event's state turned into the next one, in order; an
    /// `Err` settles the event with that failure.
    pub fn map<T>(self, mut f: impl FnMut(S) -> Result<T, Failure>) -> Batch<T> {
        let entries = self
            .entries
            .into_iter()
            .map(|entry| match entry {
                Entry::Live(state, None) => match f(state) {
                    Ok(next) => Entry::Live(next, None),
                    Err(failure) => Entry::Settled(Err(failure)),
                },
                Entry::Live(_, Some(result)) | Entry::Settled(result) => Entry::Settled(result),
            })
            .collect();
        Batch { entries }
    }

    /// A handle on each event not settled yet, in order.
    pub fn open(&mut self) -> impl Iterator<Item = Open<'_, S>> {
        self.entries.iter_mut().filter_map(|entry| match entry {
            Entry::Live(state, result @ None) => Some(Open { state, result }),
            _ => None,
        })
    }

    /// The batch's results, one per event, in order. An event the handler
    /// left open (a bug: a handle dropped unsettled) stays open, and the
    /// runtime requeues it as it does the events of a panicking handler.
    pub fn finish(self) -> Results {
        let ended = self
            .entries
            .into_iter()
            .map(|entry| match entry {
                Entry::Live(_, Some(result)) | Entry::Settled(result) => Ended::Settled(result),
                Entry::Live(_, None) => Ended::Open,
            })
            .collect();
        Results { ended }
    }
}

/// One open event of a [`Batch`]: its state (`*open`), until
/// [`settle`](Open::settle) consumes the handle. A handle dropped
/// unsettled leaves its event open, for a later phase (a one-event path)
/// to take up.
pub struct Open<'a, S> {
    state: &'a mut S,
    result: &'a mut Option<Result<Outcome, Failure>>,
}

impl<S> Open<'_, S> {
    /// Settles the event: this is its result.
    pub fn settle(self, result: Result<Outcome, Failure>) {
        *self.result = Some(result);
    }
}

impl<S> Deref for Open<'_, S> {
    type Target = S;
    fn deref(&self) -> &S {
        self.state
    }
}

impl<S> DerefMut for Open<'_, S> {
    fn deref_mut(&mut self) -> &mut S {
        self.state
    }
}

/// What [`Handler::apply_batch`](super::Handler::apply_batch) returns:
/// one result per event of its batch, in order ([`Batch::finish`]).
pub struct Results {
    ended: Vec<Ended>,
}

enum Ended {
    Settled(Result<Outcome, Failure>),
    Open,
}

impl Results {
    /// How each event ended, in the batch's order.
    pub(super) fn decisions(self) -> impl Iterator<Item = Decision> {
        self.ended.into_iter().map(|ended| match ended {
            Ended::Settled(result) => Decision::of(result),
            Ended::Open => Decision::Requeue("the handler left the event unsettled (bug)".into()),
        })
    }
}

#[cfg(test)]
impl Results {
    /// Each event's result, in order (`None`: left open): what the
    /// engines' tests assert on.
    pub(crate) fn settled(self) -> Vec<Option<Result<Outcome, Failure>>> {
        self.ended
            .into_iter()
            .map(|ended| match ended {
                Ended::Settled(result) => Some(result),
                Ended::Open => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(results: Results) -> Vec<String> {
        results
            .decisions()
            .map(|d| match d {
                Decision::Ack(a) => a.as_str().to_string(),
                Decision::Retry(f) | Decision::Dead(f) => f.message,
                Decision::Requeue(reason) => format!("requeue: {reason}"),
            })
            .collect()
    }

    #[test]
    fn every_event_ends_once_in_the_batch_order() {
        let batch = Batch::new(vec![1, 2, 3, 4, 5]);
        // A failing step settles its event; the others go on as the next
        // state.
        let mut batch = batch.map(|n| {
            if n == 2 {
                Err(Failure::invalid("two"))
            } else {
                Ok(n * 10)
            }
        });
        assert_eq!(
            batch.open().map(|o| *o).collect::<Vec<_>>(),
            [10, 30, 40, 50]
        );
        // Phases settle some, change others through their handles.
        for mut open in batch.open() {
            match *open {
                30 => open.settle(Ok(Outcome::Superseded)),
                40 => *open = 41,
                _ => {}
            }
        }
        // Settled events have no handle any more.
        assert_eq!(batch.open().map(|o| *o).collect::<Vec<_>>(), [10, 41, 50]);
        // A later map skips them too, and keeps what they were settled with.
        let mut batch = batch.map(|n| {
            if n == 50 {
                Err(Failure::rejected("fifty"))
            } else {
                Ok(n)
            }
        });
        for open in batch.open() {
            open.settle(Ok(Outcome::Applied));
        }
        assert_eq!(
            labels(batch.finish()),
            ["applied", "two", "superseded", "applied", "fifty"]
        );
    }

    #[test]
    fn an_event_left_open_is_requeued_as_a_bug() {
        let mut batch = Batch::new(vec!["a", "b"]);
        if let Some(first) = batch.open().next() {
            first.settle(Ok(Outcome::Applied));
        }
        // The second's handle is dropped unsettled.
        assert!(batch.open().next().is_some());
        assert_eq!(
            labels(batch.finish()),
            [
                "applied",
                "requeue: the handler left the event unsettled (bug)"
            ]
        );
    }
}
