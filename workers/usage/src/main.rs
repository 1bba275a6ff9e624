//! `halosync-usage`: `usage.reported` events → the quantity of one line per
//! subscription and metric on the customer's halosync recurring invoice
//! (`/RecurringInvoice`), written in batches. Run as many copies as needed.

use std::process::ExitCode;
use std::sync::Arc;

#[tokio::main]
async fn main() -> ExitCode {
    halosync_shared::boot::worker_main(
        "halosync-usage",
        Arc::new(halosync_usage::UsageHandler::default()),
    )
    .await
}
