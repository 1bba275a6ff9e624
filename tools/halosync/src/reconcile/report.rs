//! The reconcile report: one value printed as a table (people), as JSON
//! (`--json`, machines), and kept in Redis as the connection's last report
//! (the console's Reconcile page).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::diff::{Drift, DriftKind};
use crate::table;

/// At most this many drifts are kept in Redis (the console shows the last
/// report; a report of a badly drifted tenant must not fill Redis). The
/// counts are always complete.
pub const STORED_DRIFTS: usize = 1000;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// The file, or `<stdin>`.
    pub source: String,
    /// Events read.
    pub events: usize,
    /// Aggregates in scope.
    pub aggregates: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RepairInfo {
    /// Aggregates whose snapshot event was published with the repair header.
    pub published: usize,
    /// Event ids the broker refused (nacked or returned).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub connection: String,
    pub at: DateTime<Utc>,
    pub snapshot: SnapshotInfo,
    pub families: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// HaloPSA requests the read took.
    pub requests: usize,
    pub in_step: bool,
    /// Drifts per kind (`missing`, `differs`, `duplicated`, `orphaned`),
    /// every kind present.
    pub counts: BTreeMap<String, usize>,
    /// Distinct aggregates with drift.
    pub drifted_aggregates: usize,
    pub drifts: Vec<Drift>,
    /// Drifts left out of `drifts` (only in the stored copy).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub drifts_omitted: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repair: Option<RepairInfo>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Per kind, every kind present (0 when none).
pub fn counts(drifts: &[Drift]) -> BTreeMap<String, usize> {
    let mut c: BTreeMap<String, usize> = DriftKind::ALL
        .iter()
        .map(|k| (k.as_str().to_string(), 0))
        .collect();
    for d in drifts {
        *c.entry(d.kind.as_str().to_string()).or_default() += 1;
    }
    c
}

impl Report {
    /// The copy kept in Redis: at most [`STORED_DRIFTS`] drifts.
    pub fn stored(&self) -> Report {
        let mut r = self.clone();
        if r.drifts.len() > STORED_DRIFTS {
            r.drifts_omitted = r.drifts.len() - STORED_DRIFTS;
            r.drifts.truncate(STORED_DRIFTS);
        }
        r
    }
}

fn short(v: &Value) -> String {
    match v {
        Value::Null => "(none)".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// What differs, for a table cell: `quantity 5 → 3; active true → false`
/// (snapshot → HaloPSA), else the detail.
pub fn what(d: &Drift) -> String {
    if d.fields.is_empty() {
        return d.detail.clone();
    }
    d.fields
        .iter()
        .map(|f| format!("{}: {} ≠ {}", f.field, short(&f.snapshot), short(&f.halo)))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The human form.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    let scope = match &r.account {
        Some(a) => format!("{} of account {a}", r.families.join(", ")),
        None => r.families.join(", "),
    };
    out.push_str(&format!(
        "Reconcile of connection {} at {}: snapshot {} ({} events, {} aggregates in scope: {scope}); {} HaloPSA requests.\n",
        r.connection,
        table::time(&r.at),
        r.snapshot.source,
        r.snapshot.events,
        r.snapshot.aggregates,
        r.requests
    ));
    if r.in_step {
        out.push_str("In step: no drift.\n");
    } else {
        let rows: Vec<Vec<String>> = r
            .drifts
            .iter()
            .map(|d| {
                vec![
                    d.family.as_str().to_string(),
                    d.aggregate.clone(),
                    d.kind.as_str().to_string(),
                    d.record.clone(),
                    d.halo_ids
                        .iter()
                        .map(i64::to_string)
                        .collect::<Vec<_>>()
                        .join(","),
                    d.snapshot_version.clone().unwrap_or_else(|| "-".into()),
                    d.applied_version.clone().unwrap_or_else(|| "-".into()),
                    table::one_line(&what(d), 100),
                ]
            })
            .collect();
        out.push_str(&table::render(
            &[
                "FAMILY",
                "AGGREGATE",
                "DRIFT",
                "RECORD",
                "HALO ID",
                "SNAPSHOT VERSION",
                "APPLIED VERSION",
                "WHAT (snapshot ≠ HaloPSA)",
            ],
            &rows,
            &[],
        ));
        let c = &r.counts;
        out.push_str(&format!(
            "Drift: {} missing, {} differ, {} duplicated, {} orphaned ({} aggregates).\n",
            c.get("missing").copied().unwrap_or(0),
            c.get("differs").copied().unwrap_or(0),
            c.get("duplicated").copied().unwrap_or(0),
            c.get("orphaned").copied().unwrap_or(0),
            r.drifted_aggregates
        ));
    }
    match &r.repair {
        Some(rep) => {
            out.push_str(&format!(
                "Repair: published {} snapshot events with x-halosync-repair: true (orphans are never repaired).\n",
                rep.published
            ));
            for id in &rep.failed {
                out.push_str(&format!("Repair: event {id} was refused by the broker.\n"));
            }
            if let Some(s) = &rep.stopped {
                out.push_str(&format!("Repair stopped: {s}\n"));
            }
        }
        None if !r.in_step => out.push_str(
            "Nothing was written. `--repair` republishes the snapshot event of each drifted aggregate (orphans excluded).\n",
        ),
        None => {}
    }
    out
}
