//! Live configuration: a worker re-reads its config file on SIGHUP and when
//! the file changes on disk (a Kubernetes ConfigMap or Secret update swaps
//! a symlink in the mounted directory, so the directory is watched, not
//! just the file).
//!
//! A new file goes through exactly the checks of a start
//! ([`Config::load`] + [`Config::require_connections`]): if it is invalid,
//! the running configuration stays, and the refusal is logged with the same
//! message a start would print and counted in
//! `halosync_config_reloads_total{result="refused"}`. A valid one is handed
//! to [`Services::reload`]: connections, rotated secrets, item mappings and
//! policies take effect for the next message; in-flight messages finish
//! with what they started with.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::runtime::Services;

/// File events come in bursts (a ConfigMap update is several renames):
/// wait this long after the last one before reading the file.
const SETTLE: Duration = Duration::from_millis(300);

/// Why a reload was attempted (for the log line).
#[derive(Clone, Copy, Debug)]
enum Trigger {
    Sighup,
    FileChanged,
}

/// Watches for SIGHUP and changes of `path` until `shutdown`, reloading
/// `services` each time.
pub async fn watch(path: PathBuf, services: Arc<Services>, shutdown: CancellationToken) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Trigger>();
    // The watcher lives as long as this function; dropping it stops it.
    let _watcher = file_watcher(&path, tx.clone());
    #[cfg(unix)]
    {
        let tx = tx.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                tracing::warn!(
                    "cannot listen for SIGHUP; the config is reloaded on file changes only"
                );
                return;
            };
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    got = hup.recv() => {
                        if got.is_none() || tx.send(Trigger::Sighup).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
    drop(tx);
    let mut last_text = std::fs::read_to_string(&path).ok();
    loop {
        let trigger = tokio::select! {
            _ = shutdown.cancelled() => return,
            t = rx.recv() => match t { Some(t) => t, None => return },
        };
        // Let a burst of file events settle, and fold them into one reload.
        tokio::time::sleep(SETTLE).await;
        let mut trigger = trigger;
        while let Ok(t) = rx.try_recv() {
            if matches!(t, Trigger::Sighup) {
                trigger = t;
            }
        }
        let text = std::fs::read_to_string(&path).ok();
        if matches!(trigger, Trigger::FileChanged) && text == last_text {
            continue; // touched, or another file of the directory changed
        }
        last_text = text;
        reload_once(&path, &services, trigger).await;
    }
}

crate::label::labelled! {
    /// How a reload ended: the `result` label of
    /// `halosync_config_reloads_total`.
    pub enum Reloaded ("reload result") {
        /// The new configuration is in force.
        Applied = "applied",
        /// The file failed its checks; the running configuration stays.
        Refused = "refused",
    }
}

/// One reload: read and check the file, then apply it or keep the old one.
async fn reload_once(path: &Path, services: &Services, trigger: Trigger) {
    let loaded = Config::load(Some(path)).and_then(|c| c.require_connections().map(|_| c));
    match loaded {
        Err(e) => {
            metrics::counter!("halosync_config_reloads_total", "result" => Reloaded::Refused.as_str())
                .increment(1);
            metrics::gauge!("halosync_config_reload_ok").set(0.0);
            tracing::error!(error = %e, trigger = ?trigger, path = %path.display(),
                "config reload refused; the running configuration stays in force");
        }
        Ok(config) => {
            for w in &config.warnings {
                tracing::warn!(warning = %w, "deprecated configuration");
            }
            let summary = services.reload(config).await;
            metrics::counter!("halosync_config_reloads_total", "result" => Reloaded::Applied.as_str())
                .increment(1);
            metrics::gauge!("halosync_config_reload_ok").set(1.0);
            if !summary.needs_restart.is_empty() {
                tracing::warn!(keys = ?summary.needs_restart,
                    "config reload: these keys changed but only take effect after a restart; kept as they were");
            }
            tracing::info!(trigger = ?trigger, added = ?summary.added, changed = ?summary.changed,
                removed = ?summary.removed, tokens_dropped = ?summary.tokens_dropped,
                "config reloaded");
        }
    }
}

/// A watcher on the file's directory that sends [`Trigger::FileChanged`]
/// for any event naming the file or a Kubernetes `..data` swap. `None` (and
/// a warning) when the platform gives no watcher: SIGHUP still works.
fn file_watcher(
    path: &Path,
    tx: mpsc::UnboundedSender<Trigger>,
) -> Option<notify::RecommendedWatcher> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().map(|n| n.to_os_string());
    let handler = move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if matches!(event.kind, notify::EventKind::Access(_)) {
            return;
        }
        let relevant = event.paths.iter().any(|p| {
            let file = p.file_name().map(|n| n.to_os_string());
            file == name || file.is_some_and(|f| f.to_string_lossy().starts_with(".."))
        });
        if relevant {
            let _ = tx.send(Trigger::FileChanged);
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the config file; reload it with SIGHUP");
            return None;
        }
    };
    if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
        tracing::warn!(error = %e, dir = %dir.display(), "cannot watch the config directory; reload it with SIGHUP");
        return None;
    }
    Some(watcher)
}
