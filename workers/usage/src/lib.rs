//! `halosync-usage`: `usage.reported` events → the quantity of one line per
//! subscription and metric on the customer's halosync recurring invoice
//! (`/RecurringInvoice`), written in batches. The binary (`main.rs`) boots
//! [`UsageHandler`]; [`mapping`] is public so that `halosync reconcile`
//! compares HaloPSA's usage lines through the very functions the worker
//! writes them with.

mod handler;
pub mod mapping;

pub use handler::{Usage, UsageHandler};
