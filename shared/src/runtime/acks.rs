//! The acks of one consumer channel. A batch's plain acks (each message's
//! effect written, or nothing to write) go out as one `multiple` ack where
//! that keeps every guarantee, instead of one `basic.ack` per delivery
//! (each of which costs lapin a task, a frame and two wake-ups, and the
//! broker a command: most of a usage event's CPU before).
//!
//! A `multiple` ack of tag `T` acks, at the broker, every unacked delivery
//! of the channel up to `T`. So it may cover only deliveries that are to
//! be acked now. The window tracks the channel's **outstanding** tags:
//! received by the consumer loop and not yet settled. A delivery settled
//! on its own (an ack after a confirmed retry or dead-letter copy, a nack
//! that requeues, a park) stays outstanding until its frame has gone out,
//! so no `multiple` ack can pass it while its own settle is on the way
//! (a nack overtaken by a `multiple` ack would be acked instead: lost).
//! [`AckWindow::ack_all`] acks, as one `multiple` ack, the longest run of
//! the oldest outstanding tags that are all among the deliveries it is
//! given, and the rest of them one by one, as before. `multiple` acks go
//! out one at a time, in tag order (the broker refuses a `multiple` ack of
//! a tag an earlier one already covered).
//!
//! One window per channel (per session): a delivery tag means nothing on
//! another channel.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Mutex;

use lapin::message::Delivery;
use lapin::options::BasicAckOptions;

#[derive(Default)]
pub(crate) struct AckWindow {
    /// Tags received and not yet settled (or not yet gone out).
    outstanding: Mutex<BTreeSet<u64>>,
    /// Held while a `multiple` ack is computed and sent.
    sending: tokio::sync::Mutex<()>,
}

impl AckWindow {
    /// A delivery the consumer loop received (in tag order).
    pub fn received(&self, tag: u64) {
        self.lock().insert(tag);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<u64>> {
        self.outstanding
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Settles one delivery on its own with `settle` (its ack, nack or
    /// reject); its tag stays outstanding until `settle` has finished.
    pub async fn settle_one<T, F: Future<Output = T>>(&self, tag: u64, settle: F) -> T {
        let result = settle.await;
        self.lock().remove(&tag);
        result
    }

    /// Acks every delivery of `deliveries` (all to be acked now; none
    /// settled before). One result per delivery, in order.
    pub async fn ack_all(&self, deliveries: &[&Delivery]) -> Vec<Result<(), lapin::Error>> {
        let mut results: Vec<Option<Result<(), lapin::Error>>> =
            (0..deliveries.len()).map(|_| None).collect();
        {
            let _sending = self.sending.lock().await;
            let mine: BTreeSet<u64> = deliveries.iter().map(|d| d.delivery_tag).collect();
            let run = take_run(&mut self.lock(), &mine);
            if let Some(last) = run.last() {
                let covered: BTreeSet<u64> = run.iter().copied().collect();
                let result = match deliveries.iter().find(|d| d.delivery_tag == *last) {
                    Some(d) => d
                        .acker
                        .ack(BasicAckOptions { multiple: true })
                        .await
                        .map(|_| ()),
                    None => Ok(()),
                };
                for (i, d) in deliveries.iter().enumerate() {
                    if covered.contains(&d.delivery_tag) {
                        results[i] = Some(result.clone());
                    }
                }
            }
        }
        // The others (another batch's delivery is older): one by one, at once.
        let singles = deliveries
            .iter()
            .enumerate()
            .filter(|(i, _)| results[*i].is_none())
            .map(|(i, d)| async move {
                let r = self
                    .settle_one(d.delivery_tag, d.acker.ack(BasicAckOptions::default()))
                    .await
                    .map(|_| ());
                (i, r)
            });
        for (i, r) in futures::future::join_all(singles).await {
            results[i] = Some(r);
        }
        results.into_iter().map(|r| r.unwrap_or(Ok(()))).collect()
    }
}

/// The run of the oldest `outstanding` tags that are all in `mine`,
/// taken out of `outstanding` when it is worth a `multiple` ack (two or
/// more); else nothing is taken.
fn take_run(outstanding: &mut BTreeSet<u64>, mine: &BTreeSet<u64>) -> Vec<u64> {
    let run: Vec<u64> = outstanding
        .iter()
        .take_while(|t| mine.contains(t))
        .copied()
        .collect();
    if run.len() < 2 {
        return Vec::new();
    }
    for t in &run {
        outstanding.remove(t);
    }
    run
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(tags: &[u64]) -> BTreeSet<u64> {
        tags.iter().copied().collect()
    }

    #[test]
    fn a_run_stops_at_the_first_outstanding_tag_that_is_not_ours() {
        // 3 is another batch's, or a nack on its way: 1 and 2 go as one
        // multiple ack, 4 and 5 cannot (it would ack 3).
        let mut outstanding = set(&[1, 2, 3, 4, 5, 6]);
        assert_eq!(take_run(&mut outstanding, &set(&[1, 2, 4, 5])), vec![1, 2]);
        assert_eq!(outstanding, set(&[3, 4, 5, 6]));
    }

    #[test]
    fn nothing_is_taken_when_the_oldest_outstanding_tag_is_not_ours() {
        let mut outstanding = set(&[1, 2, 3]);
        assert!(take_run(&mut outstanding, &set(&[2, 3])).is_empty());
        assert_eq!(outstanding, set(&[1, 2, 3]));
    }

    #[test]
    fn a_run_of_one_is_left_to_its_own_ack() {
        let mut outstanding = set(&[4, 5]);
        assert!(take_run(&mut outstanding, &set(&[4])).is_empty());
        assert_eq!(outstanding, set(&[4, 5]));
    }

    #[test]
    fn tags_settled_before_are_not_in_the_way() {
        // 1 and 2 were settled (their frames went out): 3..=5 are the oldest.
        let mut outstanding = set(&[3, 4, 5, 9]);
        assert_eq!(take_run(&mut outstanding, &set(&[3, 4, 5])), vec![3, 4, 5]);
        assert_eq!(outstanding, set(&[9]));
    }
}
