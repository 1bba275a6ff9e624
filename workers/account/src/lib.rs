//! `halosync-account`: `account.*` events → one HaloPSA Customer
//! (`/Client`) per billing account. The binary (`main.rs`) boots
//! [`AccountHandler`]; [`mapping`] is public so that `halosync reconcile`
//! compares HaloPSA's customers through the very functions the worker
//! writes them with.

mod handler;
pub mod mapping;

pub use handler::AccountHandler;
