//! The HaloPSA client: tokens ([`token`]), the shared rate budget
//! ([`ratelimit`]), requests and their errors ([`client`], [`error`]), and
//! the billing id → HaloPSA id links ([`links`]), the item mappings
//! ([`items`]), and invoice lines written without duplicates ([`lines`]).

pub mod client;
pub mod currency;
pub mod error;
pub mod items;
pub mod lines;
pub mod links;
pub mod models;
pub mod pulse;
pub mod ratelimit;
#[cfg(test)]
pub(crate) mod testkit;
pub mod token;

use std::sync::Arc;
use std::time::Duration;

pub use client::{first_record, record_id, HaloClient};
pub use error::HaloError;

use crate::config::{ConnectionConfig, WorkerSettings};
use crate::store::Keys;

/// Builds the client of one connection, sharing `http` and `redis`. Its
/// writes are refused until it is fenced (`HaloClient::fenced`) or
/// explicitly unfenced.
pub fn client_for(
    conn: &ConnectionConfig,
    http: reqwest::Client,
    redis: redis::aio::ConnectionManager,
    keys: &Keys,
    worker: &WorkerSettings,
    rate_limited_pause: Duration,
) -> HaloClient {
    let conn = Arc::new(conn.clone());
    let tokens = token::TokenProvider::new(conn.clone(), http.clone(), redis.clone(), keys);
    let limiter = ratelimit::RateLimiter::new(
        redis,
        keys.rate_limit(&conn.name),
        &conn.name,
        conn.requests_per_window,
        conn.window,
        worker.rate_margin,
        worker.rate_wait_max,
    );
    HaloClient::new(conn, http, tokens, limiter, rate_limited_pause)
        .with_fenced_write_timeout(worker.http_timeout.min(worker.lock_ttl))
}

/// The HTTP client every connection shares (rustls, timeouts).
pub fn http_client(timeout: Duration) -> Result<reqwest::Client, HaloError> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(10).min(timeout))
        .user_agent(concat!("halosync/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| HaloError::Network(format!("building the HTTP client: {e}")))
}

#[cfg(test)]
mod tests {
    /// Architecture Invariant: the HaloPSA client knows nothing of the
    /// runtime (the runtime calls it, never the reverse; the write fence and
    /// the write priority are values the runtime gives a batch's client,
    /// `HaloClient::fenced`). Checked over every source file of `halo/`,
    /// new ones included.
    #[test]
    fn halo_knows_nothing_of_the_runtime() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/halo");
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir:?}: {e}"));
        let mut read = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
            // Spelt in two halves, so that this test does not find itself.
            let needles = [concat!("runtime", "::"), concat!("Serv", "ices")];
            for (n, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                assert!(
                    !needles.iter().any(|w| code.contains(w)),
                    "{}:{}: halo/ uses the runtime: {line}",
                    path.display(),
                    n + 1
                );
            }
            read += 1;
        }
        assert!(read >= 10, "read {read} files of {dir:?}");
    }
}
