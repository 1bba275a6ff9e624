//! `halosync reconcile` (DESIGN §8): compare HaloPSA with the billing
//! platform's current state and report the drift; with `--repair`,
//! republish the snapshot event of every drifted aggregate with
//! `x-halosync-repair: true` for the workers to apply.
//!
//! | module | concern |
//! |---|---|
//! | [`snapshot`] | reading and validating the snapshot (JSON lines, the event contract) |
//! | [`read`] | the bulk read of HaloPSA's halosync records, within the shared budget |
//! | [`diff`] | the comparison (pure): missing, differs, duplicated, orphaned |
//! | [`report`] | the report: table, JSON, the copy kept for the console |
//!
//! Exit status: 0 in step, 1 drift found, 2 the command could not run (a
//! bad snapshot, an unreachable service). Nothing is written to HaloPSA or
//! the broker without `--repair`; the report itself is kept in Redis (the
//! console's "Reconcile" page), halosync's own state, not HaloPSA's.

pub mod diff;
pub mod read;
pub mod report;
pub mod snapshot;

use std::collections::BTreeSet;
use std::io::{IsTerminal, Read as _};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use chrono::Utc;
use halosync_shared::amqp::headers;
use halosync_shared::store::Store;
use halosync_shared::{Config, Contract, Family};
use lapin::types::{AMQPValue, FieldTable};

use self::diff::{DriftKind, Policy};
use self::read::{Progress, Scope};
use self::report::{RepairInfo, Report, SnapshotInfo};
use crate::publish::{self, Location, Outgoing};

pub struct Options {
    pub connection: String,
    /// A file, or `-` for standard input.
    pub snapshot: PathBuf,
    /// Empty: all four.
    pub families: Vec<Family>,
    pub account: Option<String>,
    pub repair: bool,
    pub json: bool,
}

/// Exit status when drift was found (DESIGN §8).
pub const DRIFT: u8 = 1;
/// Exit status when the command could not run (DESIGN §8).
pub const CANNOT_RUN: u8 = 2;

/// The last report of `connection`, if one was kept (in Redis, under the
/// store's key for it, `Keys::reconcile_report`).
pub async fn last_report(store: &Store, connection: &str) -> anyhow::Result<Option<Report>> {
    let text = store
        .last_reconcile_report(connection)
        .await
        .context("reading the last reconcile report from Redis")?;
    match text {
        None => Ok(None),
        Some(t) => Ok(Some(
            serde_json::from_str(&t).context("the stored reconcile report is not readable")?,
        )),
    }
}

fn read_snapshot(path: &PathBuf) -> anyhow::Result<(String, String)> {
    if path.as_os_str() == "-" {
        let mut stdin = std::io::stdin();
        if stdin.is_terminal() {
            eprintln!("Reading the snapshot from standard input (end with Ctrl-D); give --snapshot FILE to read a file.");
        }
        let mut text = String::new();
        stdin
            .read_to_string(&mut text)
            .context("reading the snapshot from standard input (it must be UTF-8 JSON lines)")?;
        return Ok(("<stdin>".into(), text));
    }
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read the snapshot {} (give a JSON-lines file, or `-` for standard input)",
            path.display()
        )
    })?;
    Ok((path.display().to_string(), text))
}

/// Runs the command. `Err` means it could not run (exit 2).
pub async fn run(config: &Config, opts: &Options) -> anyhow::Result<ExitCode> {
    let conn = config
        .connection(&opts.connection)
        .ok_or_else(|| anyhow::anyhow!("no connection {:?} is configured", opts.connection))?;
    let families: BTreeSet<Family> = if opts.families.is_empty() {
        Family::ALL.into_iter().collect()
    } else {
        opts.families.iter().copied().collect()
    };
    let scope = Scope {
        families,
        account: opts.account.clone(),
    };

    // 1. The snapshot, all of it valid, before anything is read or written.
    let (source, text) = read_snapshot(&opts.snapshot)?;
    let contract = Contract::new().context("loading the embedded schemas")?;
    let snap = snapshot::parse(
        &text,
        &contract,
        &conn.name,
        config.worker.max_message_bytes,
    )?;

    // 2. HaloPSA, through the shared token cache and rate budget, connected
    //    as `halosync mappings` does.
    let halo = crate::mappings::connect(config, &conn.name).await?;
    let (client, store) = (halo.client, halo.store);
    let mut progress = Progress::new();
    let state = read::read(&client, &scope, &mut progress)
        .await
        .with_context(|| format!("reading HaloPSA of connection {}", conn.name));
    progress.done();
    let state = state?;

    // 3. The comparison.
    let drifts = diff::diff(&snap, &state, &scope, Policy::from(conn));
    let aggregates = snap
        .entries
        .iter()
        .filter(|((f, _), e)| {
            scope.has(*f)
                && scope.account.as_deref().is_none_or(|a| {
                    e.event.data.get("account_id").and_then(|v| v.as_str()) == Some(a)
                })
        })
        .count();
    let drifted: BTreeSet<(Family, &str)> = drifts
        .iter()
        .map(|d| (d.family, d.aggregate.as_str()))
        .collect();
    let mut report = Report {
        connection: conn.name.clone(),
        at: Utc::now(),
        snapshot: SnapshotInfo {
            source,
            events: snap.events,
            aggregates,
        },
        families: scope
            .families
            .iter()
            .map(|f| f.as_str().to_string())
            .collect(),
        account: scope.account.clone(),
        requests: state.requests,
        in_step: drifts.is_empty(),
        counts: report::counts(&drifts),
        drifted_aggregates: drifted.len(),
        drifts: Vec::new(),
        drifts_omitted: 0,
        repair: None,
    };

    // 4. The repair: the snapshot event of each drifted aggregate (orphans
    //    have none), once, with the repair header.
    let mut repair_failed = false;
    if opts.repair {
        let by_line: std::collections::HashMap<usize, &snapshot::Entry> =
            snap.entries.values().map(|e| (e.line, e)).collect();
        let mut ids = BTreeSet::new();
        let entries: Vec<&snapshot::Entry> = drifts
            .iter()
            .filter(|d| d.kind != DriftKind::Orphaned)
            .filter_map(|d| d.line)
            .filter(|line| ids.insert(*line))
            .filter_map(|line| by_line.get(&line).copied())
            .collect();
        let locations: Vec<Location> = entries
            .iter()
            .map(|e| Location {
                source: report.snapshot.source.clone(),
                line: Some(e.line),
                index: None,
            })
            .collect();
        let outgoing: Vec<Outgoing> = entries
            .iter()
            .zip(&locations)
            .map(|(e, at)| Outgoing {
                at,
                event: &e.event,
                raw: &e.raw,
            })
            .collect();
        let mut header = FieldTable::default();
        header.insert(headers::REPAIR.into(), AMQPValue::Boolean(true));
        let info = if outgoing.is_empty() {
            RepairInfo::default()
        } else {
            match publish::publish_events(config, "reconcile", &outgoing, &header).await {
                Ok((published, failed, stopped)) => RepairInfo {
                    published,
                    failed: failed.into_iter().map(|f| f.event_id).collect(),
                    stopped,
                },
                Err(e) => RepairInfo {
                    published: 0,
                    failed: Vec::new(),
                    stopped: Some(format!("{e:#}")),
                },
            }
        };
        repair_failed = !info.failed.is_empty() || info.stopped.is_some();
        report.repair = Some(info);
    }
    report.drifts = drifts;

    // 5. Kept for the console; a failure to keep it does not hide the
    //    report.
    match serde_json::to_string(&report.stored()) {
        Ok(json) => {
            if let Err(e) = store.keep_reconcile_report(&conn.name, &json).await {
                eprintln!("warning: the report could not be kept in Redis for the console: {e}");
            }
        }
        Err(e) => eprintln!("warning: the report could not be serialised for Redis: {e}"),
    }

    if opts.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report::render(&report));
    }
    Ok(if repair_failed {
        ExitCode::from(CANNOT_RUN)
    } else if report.in_step {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(DRIFT)
    })
}
