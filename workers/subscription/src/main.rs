//! `halosync-subscription`: `subscription.*` events → one HaloPSA Software
//! Licence (`/SoftwareLicence`) per subscription, and one line per
//! subscription on the customer's halosync recurring invoice
//! (`/RecurringInvoice`). Run as many copies as needed.

use std::process::ExitCode;
use std::sync::Arc;

#[tokio::main]
async fn main() -> ExitCode {
    halosync_shared::boot::worker_main(
        "halosync-subscription",
        Arc::new(halosync_subscription::SubscriptionHandler::default()),
    )
    .await
}
