//! `halosync-subscription`: `subscription.*` events → one HaloPSA Software
//! Licence (`/SoftwareLicence`) per subscription, and one line per
//! subscription on the customer's halosync recurring invoice
//! (`/RecurringInvoice`). The binary (`main.rs`) boots
//! [`SubscriptionHandler`]; [`mapping`] is public so that `halosync
//! reconcile` compares HaloPSA's licences and lines through the very
//! functions the worker writes them with.

mod handler;
pub mod mapping;
mod moves;

pub use handler::{SubscriptionHandler, Subscriptions};
