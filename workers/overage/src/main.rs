//! `halosync-overage`: `overage.detected` events → one charge per
//! (subscription, metric, period), as a line on a one-off HaloPSA invoice
//! (`/Invoice`) per (customer, period). Run as many copies as needed.

use std::process::ExitCode;
use std::sync::Arc;

#[tokio::main]
async fn main() -> ExitCode {
    halosync_shared::boot::worker_main(
        "halosync-overage",
        Arc::new(halosync_overage::OverageHandler::default()),
    )
    .await
}
