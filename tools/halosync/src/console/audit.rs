//! The audit trail: who did what, when, to how many, with the event ids.
//!
//! Kept in an append-only JSON-lines file (`console.audit_file`), each entry
//! written and `fsync`ed **before** the console reports the action, and an
//! action whose "started" entry cannot be written is not run. A file rather
//! than Redis (which here keeps nothing on disk) or a RabbitMQ stream: the
//! console is a single process per deployment (its sessions live in its
//! memory), a file on a persistent volume survives restarts of the console,
//! the broker and Redis alike, needs no retention policy that could silently
//! drop old entries, and can be read with `jq` when the console is down.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

halosync_shared::labelled! {
    /// How an audited action went: an audit entry's `outcome` (the audit
    /// file's JSON, as written since the console first kept one) and how a
    /// console job ended.
    #[allow(clippy::enum_variant_names)]
    pub enum AuditOutcome ("audit outcome") {
        /// A job (replay, purge) was started.
        Started = "started",
        Done = "done",
        Failed = "failed",
        Cancelled = "cancelled",
        /// A connection test passed, or a sign-in.
        Succeeded = "ok",
        /// A job's cancellation was asked for.
        Asked = "asked",
        /// A sign-in form without the form's token or from another origin.
        RefusedCrossOrigin = "refused: no sign-in token or another origin",
        /// A sign-in over the limit of attempts.
        RefusedTooManyAttempts = "refused: too many attempts",
        /// A sign-in over the limit of password checks at once.
        RefusedTooManyAtOnce = "refused: too many at once",
    }
}

impl AuditOutcome {
    /// The pill an outcome is shown in (`ok`, `bad`, `warn`).
    pub fn pill(self) -> &'static str {
        match self {
            AuditOutcome::Done | AuditOutcome::Succeeded => "ok",
            AuditOutcome::Failed
            | AuditOutcome::RefusedCrossOrigin
            | AuditOutcome::RefusedTooManyAttempts
            | AuditOutcome::RefusedTooManyAtOnce => "bad",
            AuditOutcome::Started | AuditOutcome::Cancelled | AuditOutcome::Asked => "warn",
        }
    }
}

/// One recorded action (or one stage of it: a job is recorded when it
/// starts and again when it ends).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    pub at: DateTime<Utc>,
    pub user: String,
    pub role: String,
    /// `replay`, `purge`, `mapping`, `test`, `sign-in`, `sign-out`.
    pub action: String,
    /// What it applied to, in words (the filter, the connection, the sku).
    pub target: String,
    pub outcome: AuditOutcome,
    /// How many dead letters (or checks, or mappings) it touched.
    pub count: usize,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub event_ids: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
}

pub struct AuditLog {
    path: PathBuf,
    /// Serialises appends (one line per entry, never interleaved).
    lock: Mutex<()>,
}

impl AuditLog {
    /// Opens (creating if needed) the file, so a bad path stops the console
    /// at start rather than at the first action.
    pub fn open(path: &Path) -> anyhow::Result<AuditLog> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| {
                format!("creating the audit file's directory {}", dir.display())
            })?;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .with_context(|| {
                format!(
                    "cannot open the audit file {} for appending; set console.audit_file to a writable path",
                    path.display()
                )
            })?;
        // A crash mid-line leaves a torn last line: end it, so the next
        // entry starts on a line of its own.
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len > 0 {
            use std::io::{Read, Seek, SeekFrom};
            let mut last = [0u8; 1];
            f.seek(SeekFrom::Start(len - 1))
                .and_then(|_| f.read_exact(&mut last))
                .with_context(|| format!("reading the audit file {}", path.display()))?;
            if last[0] != b'\n' {
                f.write_all(b"\n")
                    .with_context(|| format!("repairing the audit file {}", path.display()))?;
            }
        }
        Ok(AuditLog {
            path: path.to_path_buf(),
            lock: Mutex::new(()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one entry and waits until it is on disk.
    pub async fn record(&self, entry: &Entry) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(entry).context("encoding an audit entry")?;
        line.push(b'\n');
        let _guard = self.lock.lock().await;
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("opening the audit file {}", path.display()))?;
            f.write_all(&line)
                .with_context(|| format!("writing the audit file {}", path.display()))?;
            f.sync_data()
                .with_context(|| format!("syncing the audit file {}", path.display()))?;
            Ok(())
        })
        .await
        .context("the audit writer stopped")?
    }

    /// Every entry, newest first. A line that is not an entry (a torn last
    /// line after a crash) is skipped, not fatal.
    pub async fn read_all(&self) -> anyhow::Result<Vec<Entry>> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<Entry>> {
            let f = std::fs::File::open(&path)
                .with_context(|| format!("reading the audit file {}", path.display()))?;
            let mut out: Vec<Entry> = std::io::BufReader::new(f)
                .lines()
                .map_while(Result::ok)
                .filter_map(|l| serde_json::from_str(&l).ok())
                .collect();
            out.reverse();
            Ok(out)
        })
        .await
        .context("the audit reader stopped")?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The audit file's spellings: entries written before stay readable.
    #[test]
    fn every_outcome_round_trips_in_the_audit_files_spelling() {
        assert_eq!(
            AuditOutcome::LABELS,
            [
                "started",
                "done",
                "failed",
                "cancelled",
                "ok",
                "asked",
                "refused: no sign-in token or another origin",
                "refused: too many attempts",
                "refused: too many at once",
            ]
        );
        for (o, label) in AuditOutcome::ALL.iter().zip(AuditOutcome::LABELS) {
            let json = serde_json::to_string(o).unwrap();
            assert_eq!(json, format!("\"{label}\""));
            assert_eq!(serde_json::from_str::<AuditOutcome>(&json).unwrap(), *o);
            assert_eq!(label.parse::<AuditOutcome>(), Ok(*o));
        }
        let line = r#"{"at":"2026-01-02T03:04:05Z","user":"u","role":"operator","action":"sign-in","target":"1.2.3.4","outcome":"refused: too many attempts","count":0}"#;
        let e: Entry = serde_json::from_str(line).unwrap();
        assert_eq!(e.outcome, AuditOutcome::RefusedTooManyAttempts);
        assert_eq!(serde_json::to_string(&e).unwrap(), line);
    }

    #[tokio::test]
    async fn entries_come_back_newest_first_and_survive_reopening() {
        let dir = std::env::temp_dir().join(format!("audit-{}", uuid::Uuid::new_v4().simple()));
        let path = dir.join("a.jsonl");
        let log = AuditLog::open(&path).unwrap();
        let mut e = Entry {
            at: Utc::now(),
            user: "alice".into(),
            role: "operator".into(),
            action: "replay".into(),
            target: "class unmapped".into(),
            outcome: AuditOutcome::Done,
            count: 2,
            event_ids: vec!["evt_1".into(), "evt_2".into()],
            detail: None,
            job: Some("j1".into()),
        };
        log.record(&e).await.unwrap();
        e.action = "purge".into();
        log.record(&e).await.unwrap();
        // A torn line is skipped.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"at\":")
            .unwrap();
        let again = AuditLog::open(&path).unwrap();
        again.record(&e).await.unwrap();
        let all = again.read_all().await.unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all[0].action, "purge");
        assert_eq!(all[2].event_ids, ["evt_1", "evt_2"]);
        let _ = std::fs::remove_dir_all(dir);
    }
}
