//! `halosync-overage`: `overage.detected` events → one charge per
//! (subscription, metric, period), as a line on a one-off HaloPSA invoice
//! (`/Invoice`) per (customer, period). The binary (`main.rs`) boots
//! [`OverageHandler`]; [`mapping`] is public so that `halosync reconcile`
//! compares HaloPSA's charges through the very functions the worker
//! writes them with.

mod handler;
pub mod mapping;

pub use handler::{Overage, OverageHandler};
