//! What every worker binary does before and after its handler runs:
//! arguments, configuration, telemetry, connections, signals, exit code.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};

use clap::Parser;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::outage::Health;
use crate::runtime::{self, Handler, Services};

/// The command line shared by the four workers.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
pub struct WorkerArgs {
    /// The TOML configuration file (DESIGN §7).
    #[arg(long, short, env = "HALOSYNC_CONFIG", default_value = crate::config::DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
}

/// Runs one worker until SIGTERM/SIGINT; exit code 0 after a clean stop, 2
/// for a configuration problem, 1 for anything else at start.
///
/// The worker does not need RabbitMQ, Redis or HaloPSA to be up when it
/// starts: it serves `/healthz` and a not-ready `/readyz` at once, waits for
/// each with backoff (one log line a minute) and starts consuming when they
/// are there. SIGHUP, or a change of the config file, reloads the config
/// ([`crate::reload`]).
pub async fn worker_main<H: Handler>(service: &'static str, handler: Arc<H>) -> ExitCode {
    let args = WorkerArgs::parse();
    let _telemetry = crate::telemetry::init(service);
    let config =
        match Config::load(Some(&args.config)).and_then(|c| c.require_connections().map(|_| c)) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "invalid configuration");
                eprintln!("{service}: {e}");
                return ExitCode::from(2);
            }
        };
    for w in &config.warnings {
        tracing::warn!(warning = %w, "deprecated configuration");
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    let health = Arc::new(Health::new());
    let slot = Arc::new(OnceLock::new());
    let recorder = crate::health::install_recorder();
    let port = config.worker.health_port;
    if port != 0 {
        tokio::spawn(crate::health::serve(
            port,
            health.clone(),
            slot.clone(),
            recorder,
        ));
    }
    let services = match Services::connect(config, health, &shutdown).await {
        Ok(Some(s)) => Arc::new(s),
        Ok(None) => return ExitCode::SUCCESS, // stopped while waiting
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            eprintln!("{service}: {e}");
            return ExitCode::from(1);
        }
    };
    let _ = slot.set(services.clone());
    tokio::spawn(crate::reload::watch(
        args.config.clone(),
        services.clone(),
        shutdown.clone(),
    ));
    crate::health::limit_connection_labels(services.config().worker.metrics_connections);
    crate::health::register_zeroes(H::FAMILY.as_str(), services.connection_names());
    let config = services.config();
    tracing::info!(family = %H::FAMILY, worker = %services.worker_id,
        connections = config.connections.len(), prefix = %config.prefix, "worker starting");
    runtime::run(services.clone(), handler, shutdown).await;
    // The last messages' activity records are still buffered.
    services
        .activity
        .close(std::time::Duration::from_secs(5))
        .await;
    ExitCode::SUCCESS
}

/// Cancels `token` on the first SIGTERM or SIGINT.
pub async fn stop_on_signal(token: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM: stopping"),
                    _ = int.recv() => tracing::info!("SIGINT: stopping"),
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    token.cancel();
}
