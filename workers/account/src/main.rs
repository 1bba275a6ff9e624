//! `halosync-account`: `account.*` events → one HaloPSA Customer
//! (`/Client`) per billing account. Run as many copies as needed.

use std::process::ExitCode;
use std::sync::Arc;

#[tokio::main]
async fn main() -> ExitCode {
    halosync_shared::boot::worker_main(
        "halosync-account",
        Arc::new(halosync_account::AccountHandler),
    )
    .await
}
