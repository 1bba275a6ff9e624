//! What an overage event becomes in HaloPSA: the one-off invoice header and
//! the charge line (reference §3.5, §4.5). Pure functions, unit-tested.
//!
//! * **Marker**: [`lines::MARKER_FIELD`] (`item_internal_reference`) holds
//!   [`marker`], `halosync.overage:<subscription_id>:<metric>:<period_start>`,
//!   found on `GET /Invoice/{id}?includedetails=true` by
//!   [`lines::carrying`], the rule every family's lines are found by.
//! * **Applied version**: [`lines::VERSION_FIELD`] (`item_external_reference`)
//!   holds the encoded version of the event the line shows, written in the
//!   same request as the line's state, so ordering survives a lost Redis
//!   without a per-event ExternalLink write.
//! * **Price**: the event's `unit_price`, always (not subject to
//!   `overwrite_prices`): the overage charge is computed by the billing
//!   platform; an MSP who wants another price changes it there.
//! * **Zero overage** ([`is_zero`]): written too, as a line of `qty_order`
//!   0 with `isinactive: true` carrying its version (on an invoice created
//!   if need be), so that an older non-zero event arriving after Redis was
//!   lost does not put the withdrawn charge back. Lines are never deleted
//!   (HaloPSA documents no line delete; invoice data is the MSP's).

use halosync_shared::config::ConnectionConfig;
use halosync_shared::contract::{OverageData, Version};
use halosync_shared::halo::links::{self, OVERAGE};
use halosync_shared::halo::models::{DateTime, Int32, InvoiceDetail, InvoiceHeader};
use halosync_shared::Failure;

/// `"{subscription_id}:{metric}:{period_start}"` (DESIGN §1).
pub fn aggregate(d: &OverageData) -> String {
    format!("{}:{}:{}", d.subscription_id, d.metric, d.period_start)
}

/// The line's marker, `halosync.overage:<aggregate>` ([`links::marker`]
/// of [`OVERAGE`]).
pub fn marker(d: &OverageData) -> String {
    links::marker(&OVERAGE, &aggregate(d))
}

/// `third_party_id` of the one-off invoice of (account, period).
pub fn invoice_billing_id(d: &OverageData) -> String {
    format!("{}:{}", d.account_id, d.period_start)
}

/// What the customer reads on the line.
pub fn description(d: &OverageData) -> String {
    format!(
        "{} overage {} to {}: {} over {} included",
        d.metric,
        d.period_start,
        d.period_end,
        num(d.overage_quantity),
        num(d.included_quantity)
    )
}

fn num(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

/// The event's decimal `unit_price` as HaloPSA's double.
pub fn unit_price(d: &OverageData) -> Result<f64, Failure> {
    d.unit_price
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|p| p.is_finite())
        .ok_or_else(|| {
            Failure::invalid(format!(
                "unit_price {:?} is not a decimal number",
                d.unit_price
            ))
        })
}

/// Item-map keys tried without any HaloPSA request: `overage:<metric>`.
pub fn direct_key(d: &OverageData) -> String {
    format!("overage:{}", d.metric)
}

/// Item-map keys tried once the subscription's sku is known:
/// `<sku>:<metric>`, then `<sku>`.
pub fn sku_keys(sku: &str, d: &OverageData) -> [String; 2] {
    [format!("{sku}:{}", d.metric), sku.to_string()]
}

pub fn unmapped(conn: &ConnectionConfig, tried: &[String]) -> Failure {
    halosync_shared::halo::items::unmapped(conn, "this overage", tried)
}

/// The one-off invoice header of (customer, period), created on first need
/// (with the period's first lines inline: [`InvoiceHeader::lines`]). The
/// note is `notes_1` (the model has no `notes`).
pub fn invoice_record(client_id: i64, d: &OverageData) -> InvoiceHeader {
    InvoiceHeader {
        client_id: Some(Int32(client_id)),
        invoice_date: Some(DateTime(d.period_end.clone())),
        reference: Some(format!(
            "halosync overage {} to {}",
            d.period_start, d.period_end
        )),
        notes_1: Some(format!(
            "Managed by halosync: overage charges of account {} for {} to {}. Lines are updated by the billing platform's events.",
            d.account_id, d.period_start, d.period_end
        )),
        ..InvoiceHeader::default()
    }
}

/// Whether the overage charges nothing (not positive): its line is
/// inactive, quantity 0.
pub fn is_zero(d: &OverageData) -> bool {
    d.overage_quantity <= 0.0
}

/// The full state of the charge line (for add and update alike). `ihid`
/// is `None` for a line sent inline with its new header.
pub fn line(
    d: &OverageData,
    price: f64,
    ihid: Option<i64>,
    line_id: Option<i64>,
    item_id: i64,
    version: &Version,
) -> InvoiceDetail {
    let zero = is_zero(d);
    InvoiceDetail {
        id: line_id.map(Int32),
        ihid: ihid.map(Int32),
        itemid: Some(Int32(item_id)),
        item_shortdescription: Some(description(d)),
        qty_order: Some(if zero { 0.0 } else { d.overage_quantity }),
        unit_price: Some(price),
        unit_cost: None,
        startdate: Some(DateTime(d.period_start.clone())),
        enddate: Some(Some(DateTime(d.period_end.clone()))),
        isinactive: Some(zero),
        item_internal_reference: Some(marker(d)),
        item_external_reference: Some(version.encode()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use halosync_shared::halo::lines;
    use halosync_shared::halo::models::body;

    fn data(q: f64) -> OverageData {
        OverageData {
            subscription_id: "sub_1".into(),
            account_id: "acc_1".into(),
            metric: "storage_gb".into(),
            period_start: "2026-11-01".into(),
            period_end: "2026-11-30".into(),
            included_quantity: 100.0,
            used_quantity: 100.0 + q,
            overage_quantity: q,
            unit_price: "0.25".into(),
            currency: "EUR".into(),
        }
    }

    #[test]
    fn line_carries_period_marker_and_version() {
        let v = Version::decode("s=3;t=2026-11-23T10:00:00Z").unwrap();
        let l = body(&line(&data(12.5), 0.25, Some(7), Some(9), 1001, &v)).unwrap();
        assert_eq!(l["qty_order"], 12.5);
        assert_eq!(l["id"], 9);
        assert_eq!(l["startdate"], "2026-11-01");
        assert_eq!(l["enddate"], "2026-11-30");
        assert_eq!(l["isinactive"], false);
        assert_eq!(
            l[lines::MARKER_FIELD],
            "halosync.overage:sub_1:storage_gb:2026-11-01"
        );
        assert_eq!(l[lines::VERSION_FIELD], v.encode());
        assert_eq!(
            l["item_shortdescription"],
            "storage_gb overage 2026-11-01 to 2026-11-30: 12.5 over 100 included"
        );
        let z = body(&line(&data(0.0), 0.25, Some(7), Some(9), 1001, &v)).unwrap();
        assert_eq!(z["qty_order"], 0.0);
        assert_eq!(z["isinactive"], true);
    }

    #[test]
    fn price_must_be_decimal() {
        let mut d = data(1.0);
        assert_eq!(unit_price(&d).unwrap(), 0.25);
        d.unit_price = "abc".into();
        assert!(unit_price(&d).is_err());
    }
}
