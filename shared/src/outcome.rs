//! How a message was settled: the one set of outcomes that the runtime
//! records, `halosync_messages_total` counts, the activity log stores and
//! the console and `halosync activity` filter by.

use crate::label::labelled;

labelled! {
    /// How one delivery ended, once settled.
    pub enum Settled ("outcome") {
        /// HaloPSA now holds this event's state.
        Applied = "applied",
        /// A newer (or the same) version was already applied.
        Superseded = "superseded",
        /// This event id was already processed (the ledger).
        Duplicate = "duplicate",
        /// A copy went to a delay queue (confirmed), the original was acked.
        Retried = "retried",
        /// A copy went to the dead queue (confirmed), the original was acked.
        DeadLettered = "dead-lettered",
        /// Back to the work queue as it is (nack with requeue).
        Requeued = "requeued",
    }
}
