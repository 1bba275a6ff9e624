//! The snapshot: the billing platform's current state as JSON lines, one
//! event per aggregate, in the contract of DESIGN §1 and validated with the
//! very schemas the workers use ([`Contract`]). Any bad line makes the whole
//! snapshot unusable (exit 2 before anything is read or written): comparing
//! HaloPSA against a partial snapshot would report every aggregate of the
//! bad line as orphaned, and a repair from it could not be trusted.

use std::collections::BTreeMap;

use halosync_shared::contract::{OverageData, UsageData, Version};
use halosync_shared::{Contract, Envelope, Family};

/// Why a snapshot cannot be used.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SnapshotError {
    #[error("snapshot line {line}: {reason}")]
    Line { line: usize, reason: String },
    #[error("the snapshot holds no events: give JSON lines, one event per aggregate (the `halosync publish` format)")]
    Empty,
}

/// One event of the snapshot, with where it came from.
#[derive(Clone, Debug)]
pub struct Entry {
    pub line: usize,
    pub event: Envelope,
    pub version: Version,
    /// The line's text, published as is by `--repair`.
    pub raw: String,
}

/// A validated snapshot: the newest event per aggregate.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Keyed by (family, aggregate key).
    pub entries: BTreeMap<(Family, String), Entry>,
    /// Events read (lines that were not blank).
    pub events: usize,
}

/// The aggregate key of an event (DESIGN §1's table).
pub fn aggregate_key(event: &Envelope) -> Option<(Family, String)> {
    let family = event.family()?;
    let field = |k: &str| {
        event
            .data
            .get(k)
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    let key = match family {
        Family::Account => field("account_id")?,
        Family::Subscription => field("subscription_id")?,
        Family::Usage => {
            let d: UsageData = event.data_as().ok()?;
            format!("{}:{}:{}", d.subscription_id, d.metric, d.period_start)
        }
        Family::Overage => {
            let d: OverageData = event.data_as().ok()?;
            format!("{}:{}:{}", d.subscription_id, d.metric, d.period_start)
        }
    };
    Some((family, key))
}

/// Parses and validates JSON lines. Every event must be for `connection`
/// (a snapshot is one HaloPSA's state). Two events of one aggregate are
/// allowed (an export taken while events flow): the newer one is kept, as a
/// worker would.
pub fn parse(
    text: &str,
    contract: &Contract,
    connection: &str,
    max_bytes: usize,
) -> Result<Snapshot, SnapshotError> {
    let mut snap = Snapshot::default();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let raw = line.trim();
        if raw.is_empty() {
            continue;
        }
        let bad = |reason: String| SnapshotError::Line {
            line: line_no,
            reason,
        };
        let event = contract
            .validate(raw.as_bytes(), max_bytes)
            .map_err(|e| bad(e.to_string()))?;
        if event.connection != connection {
            return Err(bad(format!(
                "the event is for connection {:?}, but this reconcile is for {connection:?}; pass --connection {} or split the snapshot per connection",
                event.connection, event.connection
            )));
        }
        let version = event.version().map_err(|e| bad(e.to_string()))?;
        let key = aggregate_key(&event)
            .ok_or_else(|| bad("the event's data has no aggregate key".to_string()))?;
        snap.events += 1;
        let entry = Entry {
            line: line_no,
            event,
            version,
            raw: raw.to_string(),
        };
        match snap.entries.get(&key) {
            Some(kept) if !kept.version.is_superseded_by(&entry.version) => {}
            _ => {
                snap.entries.insert(key, entry);
            }
        }
    }
    if snap.events == 0 {
        return Err(SnapshotError::Empty);
    }
    Ok(snap)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(id: &str, seq: u64, conn: &str) -> String {
        format!(
            r#"{{"id":"e{seq}","type":"account.updated","schema_version":1,"connection":"{conn}","occurred_at":"2026-11-22T10:15:00Z","sequence":{seq},"data":{{"account_id":"{id}","name":"A","active":true}}}}"#
        )
    }

    #[test]
    fn keeps_the_newest_event_per_aggregate() {
        let c = Contract::new().unwrap();
        let text = format!(
            "{}\n\n{}\n{}\n",
            account("a1", 3, "acme"),
            account("a1", 2, "acme"),
            account("a2", 1, "acme")
        );
        let s = parse(&text, &c, "acme", 1 << 20).unwrap();
        assert_eq!(s.events, 3);
        assert_eq!(s.entries.len(), 2);
        assert_eq!(
            s.entries[&(Family::Account, "a1".to_string())]
                .event
                .sequence,
            Some(3)
        );
    }

    #[test]
    fn a_bad_line_is_named_with_its_reason() {
        let c = Contract::new().unwrap();
        let text = format!("{}\nnot json\n", account("a1", 1, "acme"));
        let e = parse(&text, &c, "acme", 1 << 20).unwrap_err();
        assert!(matches!(e, SnapshotError::Line { line: 2, .. }), "{e}");
        assert!(e.to_string().contains("line 2"), "{e}");
        let bad_schema = account("a1", 1, "acme").replace("\"active\":true", "\"active\":\"yes\"");
        let e = parse(&bad_schema, &c, "acme", 1 << 20).unwrap_err();
        assert!(
            e.to_string().contains("line 1") && e.to_string().contains("active"),
            "{e}"
        );
        let e = parse(&account("a1", 1, "other"), &c, "acme", 1 << 20).unwrap_err();
        assert!(e.to_string().contains("--connection other"), "{e}");
        assert_eq!(
            parse("\n\n", &c, "acme", 1 << 20).unwrap_err(),
            SnapshotError::Empty
        );
    }
}
