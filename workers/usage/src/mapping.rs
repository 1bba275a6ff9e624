//! Usage event → recurring-invoice line bodies, and the applied version
//! kept on the line. Pure, so that it is tested on its own.
//!
//! # Fields on the line (reference §4.5)
//!
//! * [`lines::MARKER_FIELD`] = `item_internal_reference` carries the marker
//!   `halosync.usage:<subscription_id>:<metric>` (the same field the
//!   subscription worker uses for `halosync.subscription:<id>`; the kinds
//!   differ, so the markers never match each other).
//! * [`lines::VERSION_FIELD`] = `item_external_reference` carries the applied
//!   period and event version, `p=<period_start>;s=<sequence>;t=<occurred_at>`
//!   ([`Applied`]), written in the same `updatelines` request as the
//!   quantity. That makes the version durable without an ExternalLink write
//!   per event.
//!
//! [`lines::MARKER_FIELD`]: halosync_shared::halo::lines::MARKER_FIELD
//! [`lines::VERSION_FIELD`]: halosync_shared::halo::lines::VERSION_FIELD
//!
//! # Which event wins
//!
//! The applied state is compared as (period_start, event version): a newer
//! period always replaces an older one, whatever the versions; within one
//! period the contract's version rule (sequence, else occurred_at) decides.
//! The runtime's newest-per-aggregate within one batch compares event
//! versions only (the aggregate is `<subscription_id>:<metric>`), so inside
//! one batch a publisher's sequence (or occurred_at) is assumed to grow
//! with the period — as it does for a metering system that reports periods
//! in order.

use std::cmp::Ordering;

use halosync_shared::config::ConnectionConfig;
use halosync_shared::contract::{UsageData, Version};
use halosync_shared::engine::lines::LineState;
use halosync_shared::halo::links::{self, USAGE};
use halosync_shared::halo::models::{DateTime, Int32, InvoiceDetail};
use halosync_shared::Failure;

/// The applied state of a usage line: its period and event version.
#[derive(Clone, Debug, PartialEq)]
pub struct Applied {
    pub period_start: String,
    pub version: Version,
}

impl Applied {
    pub fn encode(&self) -> String {
        format!("p={};{}", self.period_start, self.version.encode())
    }

    pub fn decode(text: &str) -> Option<Applied> {
        let rest = text.trim().strip_prefix("p=")?;
        let (period, version) = rest.split_once(';')?;
        Some(Applied {
            period_start: period.to_string(),
            version: Version::decode(version)?,
        })
    }

    /// True when an event with state `self` changes nothing because
    /// `applied` is already on the line: an older period (`YYYY-MM-DD`
    /// sorts as text), or within the
    /// same period the contract's rule ([`Version::is_superseded_by`],
    /// a repair included).
    pub fn is_superseded_by(&self, applied: &Applied) -> bool {
        match self.period_start.cmp(&applied.period_start) {
            Ordering::Equal => self.version.is_superseded_by(&applied.version),
            other => other == Ordering::Less,
        }
    }
}

/// The engine's view of the applied state ([`Applied::encode`],
/// [`Applied::decode`], [`Applied::is_superseded_by`]).
impl LineState for Applied {
    fn encode(&self) -> String {
        Applied::encode(self)
    }
    fn decode(text: &str) -> Option<Applied> {
        Applied::decode(text)
    }
    fn is_superseded_by(&self, applied: &Applied) -> bool {
        Applied::is_superseded_by(self, applied)
    }
}

/// The billing id of a usage line: `<subscription_id>:<metric>` (one line
/// per subscription and metric, showing the current period).
pub fn line_key(data: &UsageData) -> String {
    format!("{}:{}", data.subscription_id, data.metric)
}

/// The line's marker, `halosync.usage:<subscription_id>:<metric>`
/// ([`links::marker`] of [`USAGE`]).
pub fn marker(data: &UsageData) -> String {
    links::marker(&USAGE, &line_key(data))
}

/// The item-map keys of a usage line, in order: `"<sku>:<metric>"`, then
/// the sku (resolved by `halo::items::resolve_chain`: the config's
/// `[items]` first, then the mappings stored in HaloPSA).
pub fn item_keys(sku: &str, metric: &str) -> [String; 2] {
    [format!("{sku}:{metric}"), sku.to_string()]
}

/// The `unmapped` failure of a usage line whose keys are mapped nowhere.
pub fn unmapped(conn: &ConnectionConfig, sku: &str, metric: &str) -> Failure {
    halosync_shared::halo::items::unmapped(
        conn,
        &format!("usage {metric} of sku {sku:?}"),
        &item_keys(sku, metric),
    )
}

/// The line's description: `<product> — <metric> (<start> to <end>)`.
pub fn description(product: &str, data: &UsageData) -> String {
    format!(
        "{} — {} ({} to {})",
        product.trim(),
        data.metric,
        data.period_start,
        data.period_end
    )
}

/// The fields written on every add and update. The unit price comes from
/// the item (set by HaloPSA on add) and is never sent.
fn common(
    data: &UsageData,
    product: &str,
    applied: &Applied,
    ihid: i64,
    item_id: i64,
    marker: &str,
) -> InvoiceDetail {
    InvoiceDetail {
        ihid: Some(Int32(ihid)),
        itemid: Some(Int32(item_id)),
        qty_order: Some(data.quantity),
        item_shortdescription: Some(description(product, data)),
        startdate: Some(DateTime::midnight(&data.period_start)),
        enddate: Some(Some(DateTime::midnight(&data.period_end))),
        item_internal_reference: Some(marker.to_string()),
        item_external_reference: Some(applied.encode()),
        ..InvoiceDetail::default()
    }
}

/// The line as the lines engine writes it (`halosync_shared::engine::lines`):
/// an update of `line_id`, else a new line.
pub fn detail(
    data: &UsageData,
    product: &str,
    applied: &Applied,
    ihid: i64,
    line_id: Option<i64>,
    item_id: i64,
) -> InvoiceDetail {
    let common = common(data, product, applied, ihid, item_id, &marker(data));
    match line_id {
        Some(id) => InvoiceDetail {
            id: Some(Int32(id)),
            ..common
        },
        None => InvoiceDetail {
            isinactive: Some(false),
            ..common
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(seq: u64) -> Version {
        Version::decode(&format!("s={seq};t=2026-11-22T10:00:00Z")).unwrap()
    }

    #[test]
    fn applied_round_trips() {
        let a = Applied {
            period_start: "2026-11-01".into(),
            version: v(7),
        };
        assert_eq!(Applied::decode(&a.encode()), Some(a.clone()));
        assert_eq!(Applied::decode("garbage"), None);
    }

    #[test]
    fn a_newer_period_wins_whatever_the_version() {
        let old = Applied {
            period_start: "2026-10-01".into(),
            version: v(99),
        };
        let new = Applied {
            period_start: "2026-11-01".into(),
            version: v(1),
        };
        assert!(old.is_superseded_by(&new));
        assert!(!new.is_superseded_by(&old));
        let same_newer = Applied {
            period_start: "2026-11-01".into(),
            version: v(2),
        };
        assert!(!same_newer.is_superseded_by(&new));
        assert!(new.is_superseded_by(&new));
    }
}
