//! `halosync-overage`: `overage.detected` events → one charge per
//! (subscription, metric, period), as a line on a one-off HaloPSA invoice
//! (`/Invoice`) per (customer, period). Run as many copies as needed.

mod handler;
mod mapping;

use std::process::ExitCode;
use std::sync::Arc;

#[tokio::main]
async fn main() -> ExitCode {
    halosync_shared::boot::worker_main("halosync-overage", Arc::new(handler::OverageHandler)).await
}
