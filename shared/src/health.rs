//! A worker's HTTP side: `/metrics` (Prometheus text), `/healthz` (the
//! process is alive) and `/readyz` (connected to the broker and Redis, and
//! consuming), on `worker.health_port` (0 disables it).
//!
//! Metrics go through the `metrics` facade (recorded where they happen:
//! the runtime, the HaloPSA client, the token provider, the rate limiter);
//! this module installs the Prometheus recorder and serves it. Labels are
//! bounded: family, outcome, class, connection (configured), endpoint (a
//! path template with ids replaced by `{id}`) and HTTP status; never an
//! event, account or subscription id.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::outage::Health;
use crate::runtime::Services;
use crate::store::StateError;

/// Installs the global Prometheus recorder (once per process).
pub fn install_recorder() -> Option<PrometheusHandle> {
    let buckets = [
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ];
    let batch = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0];
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_size".into()), &batch))
        .and_then(|b| b.install_recorder())
        .map_err(|e| tracing::warn!(error = %e, "metrics recorder not installed"))
        .ok()
}

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    /// Set once Redis has been reached (the worker serves `/readyz` from the
    /// start, saying what it waits for).
    services: Arc<OnceLock<Arc<Services>>>,
    metrics: Option<PrometheusHandle>,
}

/// Serves the endpoints until the process ends. `services` is filled in
/// once the worker has connected; until then `/readyz` says what it waits
/// for.
pub async fn serve(
    port: u16,
    health: Arc<Health>,
    services: Arc<OnceLock<Arc<Services>>>,
    metrics: Option<PrometheusHandle>,
) {
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(AppState {
            health,
            services,
            metrics,
        });
    let addr = SocketAddr::from(([0, 0, 0, 0], port));
    match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => {
            tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "health server stopped");
            }
        }
        Err(e) => {
            tracing::error!(%addr, error = %e, "cannot bind the health port (worker.health_port)")
        }
    }
}

async fn render_metrics(State(s): State<AppState>) -> (StatusCode, String) {
    // `halosync_ready` is what `/readyz` answers, measured at scrape time
    // so that it is never stale (alert "a worker not ready").
    let ready = readiness(&s).await.is_ok();
    metrics::gauge!("halosync_ready").set(if ready { 1.0 } else { 0.0 });
    match &s.metrics {
        Some(h) => (StatusCode::OK, h.render()),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics recorder not installed\n".into(),
        ),
    }
}

async fn ready(State(s): State<AppState>) -> (StatusCode, String) {
    match readiness(&s).await {
        Ok(()) => (StatusCode::OK, "ready\n".into()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

/// Consuming, no dependency down, and Redis answering; or why not.
async fn readiness(s: &AppState) -> Result<(), String> {
    if let Some(why) = s.health.not_ready() {
        return Err(why);
    }
    let Some(services) = s.services.get() else {
        return Err("starting".into());
    };
    services.store.ping().await.map_err(|e| match e {
        // Redis's own error, as `/readyz` always said it.
        StateError::Redis(e) => format!("redis unavailable: {e}"),
        e => format!("redis unavailable: {e}"),
    })
}

/// Registers at zero the counters that alerts compare over time, so that
/// the first dead letter or the first applied event is an increase
/// Prometheus sees (a counter born at 1 shows no `increase()`), and so
/// that "nothing applied" is a zero rather than a missing series.
pub fn register_zeroes(family: &str, connections: impl IntoIterator<Item = String>) {
    let family = family.to_string();
    for outcome in crate::outcome::Settled::ALL {
        metrics::counter!("halosync_messages_total", "family" => family.clone(), "outcome" => outcome.as_str())
            .absolute(0);
    }
    for class in crate::error::DEAD_LETTER_CLASSES {
        metrics::counter!("halosync_dead_letters_total", "family" => family.clone(), "class" => class.as_str())
            .absolute(0);
    }
    let mut labels: Vec<String> = connections
        .into_iter()
        .map(|c| connection_label(&c))
        .collect();
    labels.sort();
    labels.dedup();
    for connection in labels {
        metrics::counter!("halosync_halo_rate_limited_total", "connection" => connection)
            .absolute(0);
    }
}

/// The connections that have their own `connection` label, and how many
/// may (`worker.metrics_connections`; unset: 100).
struct ConnectionLabels {
    limit: usize,
    named: std::collections::HashSet<String>,
}

static CONNECTION_LABELS: std::sync::Mutex<Option<ConnectionLabels>> = std::sync::Mutex::new(None);

/// Bounds the `connection` label (`worker.metrics_connections`): the first
/// `limit` connections seen keep their name, the others are `"other"`;
/// `0` labels every series `"all"`. A platform with 1,000 MSPs keeps its
/// `/metrics` a bounded size.
pub fn limit_connection_labels(limit: usize) {
    if let Ok(mut g) = CONNECTION_LABELS.lock() {
        let named = g.take().map(|l| l.named).unwrap_or_default();
        *g = Some(ConnectionLabels { limit, named });
    }
}

/// The `connection` label value of a connection's series.
pub fn connection_label(connection: &str) -> String {
    let Ok(mut g) = CONNECTION_LABELS.lock() else {
        return "other".into();
    };
    let labels = g.get_or_insert_with(|| ConnectionLabels {
        limit: 100,
        named: Default::default(),
    });
    if labels.limit == 0 {
        return "all".into();
    }
    if labels.named.contains(connection) {
        return connection.to_string();
    }
    if labels.named.len() < labels.limit {
        labels.named.insert(connection.to_string());
        return connection.to_string();
    }
    "other".into()
}

/// `/Client/12` → `/Client/{id}` (bounded label values).
pub fn endpoint_label(path: &str) -> String {
    path.split('/')
        .map(|seg| {
            if !seg.is_empty()
                && seg
                    .trim_start_matches('-')
                    .chars()
                    .all(|c| c.is_ascii_digit())
            {
                "{id}"
            } else {
                seg
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    #[test]
    fn endpoint_labels_hide_ids() {
        assert_eq!(super::endpoint_label("/Client/12"), "/Client/{id}");
        assert_eq!(
            super::endpoint_label("/RecurringInvoice/-94"),
            "/RecurringInvoice/{id}"
        );
        assert_eq!(
            super::endpoint_label("/RecurringInvoice/updatelines"),
            "/RecurringInvoice/updatelines"
        );
    }
}
