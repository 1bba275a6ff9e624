//! Billing subscription → HaloPSA bodies: the Software Licence (reference
//! §4.3), the recurring-invoice header (§4.4) and its line (§4.5). Pure, so
//! that the field mapping and the MSP-data policy are tested on their own.
//!
//! # Where the subscription id lives in HaloPSA
//!
//! Besides the ExternalLink (`halosync.subscription`, which also holds the
//! applied version), each record carries [`links::marker`]
//! (`halosync.subscription:<subscription_id>`) in a field of its own, written
//! in the same request that creates the record. That is what makes the
//! record findable when both Redis and the link are missing (a crash between
//! creating the licence and writing its link), and what lets two workers
//! that both created one agree on a single survivor.
//!
//! * Licence: [`LICENCE_MARKER_FIELD`] = `thirdparty_client_id`. Of the
//!   Licence_List fields the reference lists (§4.3), the third-party
//!   identifiers are `thirdparty_client_id`, `product_sku`,
//!   `vendor_product_sku`, `snowid`, `parent_id` and `tenant_id`.
//!   `product_sku` carries the sku; `vendor_product_sku` is the vendor's
//!   product code; `parent_id` is an integer; `snowid` belongs to HaloPSA's
//!   ServiceNow integration; `tenant_id` is the only one with a GET filter
//!   but it is the Microsoft tenant of the customer that HaloPSA's own CSP
//!   integration matches licences on, so writing a subscription id there
//!   could confuse that integration. `thirdparty_client_id` is a free
//!   string that "the third party" (here halosync, which created the
//!   record) owns, and the reference's §5 names it for exactly this use. It
//!   has no GET filter, so the licences of the customer are listed
//!   (`client_id`, `includeinactive=true`, paged) and matched here.
//!   UNCONFIRMED: that HaloPSA keeps the field and returns it in lists.
//! * Line: [`lines::MARKER_FIELD`] = `item_internal_reference`, the
//!   field every family's lines carry their marker in, found by
//!   [`lines::carrying`].
//!
//! # Where the applied version lives
//!
//! On the line, in [`lines::VERSION_FIELD`] (`item_external_reference`, as
//! the usage and overage lines carry theirs), written in the same request
//! as the quantity: a known subscription's update is then two requests
//! (licence, line), not three. The line is written after the licence, so
//! its version never claims more than HaloPSA holds. The link's version is
//! written when the link is (a create, or the cold path after Redis was
//! lost), so it may lag behind the line's: the applied version is the
//! newer of the two, and the line's is read before anything is written
//! whenever Redis does not know the line (the lines engine's superseded
//! check, `halosync_shared::engine::lines`).
//!
//! [`links::marker`]: halosync_shared::halo::links::marker
//! [`LICENCE_MARKER_FIELD`]: halosync_shared::halo::links::LICENCE_MARKER_FIELD
//! [`lines::MARKER_FIELD`]: halosync_shared::halo::lines::MARKER_FIELD
//! [`lines::VERSION_FIELD`]: halosync_shared::halo::lines::VERSION_FIELD
//! [`lines::carrying`]: halosync_shared::halo::lines::carrying

use halosync_shared::config::{ConnectionConfig, Policy};
use halosync_shared::contract::{Event, SubscriptionData, Version};
use halosync_shared::engine::identity::{Identity, Listing};
use halosync_shared::halo::links::{self, Kind, LICENCE_MARKER_FIELD, SUBSCRIPTION};
use halosync_shared::halo::models::{body, DateTime, Int32, InvoiceDetail, LicenceList};
use halosync_shared::halo::record_id;
use halosync_shared::Failure;
use serde_json::Value;

use crate::handler::Work;

/// The subscription family's licences for the identity engine
/// ([`halosync_shared::engine::identity`]): one `/SoftwareLicence` per
/// subscription, under its account's customer, carrying its marker. The
/// reference lists no `new_external_link` for licences, so the link (with
/// the version) is written after the licence and its line.
pub struct Licences;

impl Identity for Licences {
    type State = Work;
    type Data = SubscriptionData;
    const KIND: Kind = SUBSCRIPTION;
    const PATH: &'static str = "/SoftwareLicence";
    const WHAT: &'static str = "licence";
    const LINK_ON_CREATE: bool = false;

    fn event(w: &Work) -> &Event<SubscriptionData> {
        &w.event
    }

    fn billing_id(data: &SubscriptionData) -> &str {
        &data.subscription_id
    }

    fn record(
        &self,
        w: &Work,
        halo_id: Option<i64>,
        conn: &ConnectionConfig,
    ) -> Result<Value, Failure> {
        if w.customer == 0 {
            return Err(Failure::transient(format!(
                "the customer of account {} was not resolved before its licence was written",
                w.event.data.account_id
            )));
        }
        let t = &w.target;
        licence_record(
            &w.event.data,
            &t.terms,
            w.customer,
            halo_id,
            w.marker(),
            conn,
        )
    }

    /// The customer's licences, inactive ones too: `thirdparty_client_id`
    /// has no GET filter, so the marker is matched here
    /// ([`licences_carrying`]).
    fn listing(&self, w: &Work) -> Option<Listing> {
        let customer = Some(w.customer).filter(|c| *c != 0)?;
        Some(Listing {
            path: "/SoftwareLicence",
            key: "licences",
            query: vec![
                ("client_id", customer.to_string()),
                ("includeinactive", "true".into()),
            ],
        })
    }

    fn carrying(&self, w: &Work, rows: &[Value]) -> Vec<i64> {
        licences_carrying(rows, w.marker())
    }
}

/// What the event's data becomes, checked before any HaloPSA request so
/// that a bad value never leaves a half-applied event.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Terms {
    /// `count` (an integer in HaloPSA) and `qty_order`.
    pub quantity: i64,
    pub unit_price: f64,
    pub unit_cost: Option<f64>,
    /// `status == active`; suspended and cancelled are inactive.
    pub active: bool,
    /// The event's version, encoded, carried on the line.
    pub version: String,
}

impl Terms {
    pub fn of(data: &SubscriptionData, version: &Version) -> Result<Terms, Failure> {
        // `count` is an int32 in HaloPSA's document.
        let quantity = i32::try_from(data.quantity)
            .map(i64::from)
            .map_err(|_| Failure::invalid(format!("quantity {} is too large", data.quantity)))?;
        Ok(Terms {
            quantity,
            unit_price: money("unit_price", &data.unit_price)?,
            unit_cost: data
                .unit_cost
                .as_deref()
                .map(|c| money("unit_cost", c))
                .transpose()?,
            active: data.status == "active",
            version: version.encode(),
        })
    }
}

/// A decimal string as the double HaloPSA stores (`price`, `unit_price`).
fn money(field: &str, text: &str) -> Result<f64, Failure> {
    text.trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite())
        .ok_or_else(|| Failure::invalid(format!("{field} {text:?} is not a decimal number")))
}

/// The `/SoftwareLicence` body for this subscription's state.
///
/// * `count` = quantity; `is_active` = status is `active` (suspended and
///   cancelled licences are made inactive, never deleted); `status`,
///   `billing_cycle`, `product_sku` and the dates follow the event.
/// * `name` is written on create, and on update only when the connection's
///   `overwrite_names` allows it.
/// * `price` and `purchase_price` are written on create, and on update only
///   when `overwrite_prices` allows it (an MSP may set its own prices).
/// * `end_date`: every event carries the subscription's full state, so a
///   missing or null `end_date` means "no end": on update it is sent as
///   `null`, clearing a date set by an earlier event. Whether HaloPSA clears
///   a date on `null` is UNCONFIRMED; `null` is the robust choice, since the
///   empty-date sentinel HaloPSA answers with (`1899-12-30`) could be taken
///   as a real, long past, end date. An absent `unit_cost` leaves HaloPSA's
///   value alone.
pub fn licence_record(
    data: &SubscriptionData,
    terms: &Terms,
    client_id: i64,
    id: Option<i64>,
    marker: &str,
    policy: impl Into<Policy>,
) -> Result<Value, Failure> {
    let policy = policy.into();
    let creating = id.is_none();
    let prices = creating || policy.overwrite_prices;
    body(&LicenceList {
        id: id.map(Int32),
        client_id: Some(Int32(client_id)),
        name: (creating || policy.overwrite_names).then(|| data.product.name.trim().to_string()),
        count: Some(Int32(terms.quantity)),
        start_date: Some(DateTime::midnight(&data.start_date)),
        end_date: match &data.end_date {
            Some(end) => Some(Some(DateTime::midnight(end))),
            None if !creating => Some(None),
            None => None,
        },
        billing_cycle: Some(data.billing_cycle.clone()),
        status: Some(data.status.clone()),
        is_active: Some(terms.active),
        product_sku: Some(data.product.sku.clone()),
        price: prices.then_some(terms.unit_price),
        purchase_price: terms.unit_cost.filter(|_| prices),
        thirdparty_client_id: Some(marker.to_string()),
    })
}

/// A new line for `POST /RecurringInvoice/Lines` (or, with `ihid` `None`,
/// inline in a new header's `lines`). Prices and description are always
/// set on create.
pub fn new_line(
    data: &SubscriptionData,
    terms: &Terms,
    ihid: Option<i64>,
    item_id: i64,
    marker: &str,
) -> InvoiceDetail {
    InvoiceDetail {
        item_shortdescription: Some(data.product.name.trim().to_string()),
        unit_price: Some(terms.unit_price),
        unit_cost: terms.unit_cost,
        ..line_common(data, terms, ihid, item_id, marker)
    }
}

/// An existing line's update for `POST /RecurringInvoice/updatelines`:
/// quantity, item, dates and `isinactive` always; prices only with
/// `overwrite_prices`, the description only with `overwrite_names`.
pub fn line_update(
    data: &SubscriptionData,
    terms: &Terms,
    ihid: i64,
    line_id: i64,
    item_id: i64,
    marker: &str,
    policy: impl Into<Policy>,
) -> InvoiceDetail {
    let policy = policy.into();
    let common = line_common(data, terms, Some(ihid), item_id, marker);
    InvoiceDetail {
        id: Some(Int32(line_id)),
        // No end (see `licence_record`): clear one an earlier event set.
        enddate: Some(common.enddate.clone().flatten()),
        item_shortdescription: policy
            .overwrite_names
            .then(|| data.product.name.trim().to_string()),
        unit_price: policy.overwrite_prices.then_some(terms.unit_price),
        unit_cost: terms.unit_cost.filter(|_| policy.overwrite_prices),
        ..common
    }
}

fn line_common(
    data: &SubscriptionData,
    terms: &Terms,
    ihid: Option<i64>,
    item_id: i64,
    marker: &str,
) -> InvoiceDetail {
    InvoiceDetail {
        ihid: ihid.map(Int32),
        itemid: Some(Int32(item_id)),
        qty_order: Some(terms.quantity as f64),
        isinactive: Some(!terms.active),
        startdate: Some(DateTime::midnight(&data.start_date)),
        enddate: data
            .end_date
            .as_ref()
            .map(|end| Some(DateTime::midnight(end))),
        item_internal_reference: Some(marker.to_string()),
        item_external_reference: Some(terms.version.clone()),
        ..InvoiceDetail::default()
    }
}

/// Retires the line a subscription had on its previous customer's invoice
/// when it moved to another account: inactive, quantity 0, and a marker
/// that no longer matches (the line stays for the MSP's history).
pub fn moved_line(
    ihid: i64,
    line_id: i64,
    marker: &str,
    new_account: &str,
) -> Result<Value, Failure> {
    body(&InvoiceDetail {
        id: Some(Int32(line_id)),
        ihid: Some(Int32(ihid)),
        qty_order: Some(0.0),
        isinactive: Some(true),
        item_internal_reference: Some(format!(
            "{marker} (moved to account {new_account}, retired)"
        )),
        ..InvoiceDetail::default()
    })
}

/// Ids of the licences carrying `marker` in [`LICENCE_MARKER_FIELD`]
/// ([`links::marker_in`]: trimmed, exactly otherwise), lowest first.
pub fn licences_carrying(rows: &[Value], marker: &str) -> Vec<i64> {
    let mut ids: Vec<i64> = rows
        .iter()
        .filter(|r| links::marker_in(r, LICENCE_MARKER_FIELD) == Some(marker))
        .filter_map(record_id)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

#[cfg(test)]
mod tests {
    use super::*;
    use halosync_shared::config::{ConnectionConfig, Secret};
    use halosync_shared::contract::Product;
    use halosync_shared::halo::lines;
    use serde_json::json;
    use std::collections::BTreeMap;
    use std::time::Duration;

    fn v1() -> Version {
        Version::decode("s=1;t=2026-11-22T10:15:00Z").unwrap()
    }

    fn policy(overwrite_prices: bool, overwrite_names: bool) -> ConnectionConfig {
        ConnectionConfig {
            name: "acme".into(),
            resource_server: "http://x/api".into(),
            auth_server: "http://x/auth".into(),
            tenant: None,
            client_id: "id".into(),
            client_secret: Secret::new("s"),
            scope: "all".into(),
            requests_per_window: 300,
            window: Duration::from_secs(300),
            match_existing_by_name: false,
            overwrite_prices,
            overwrite_names,
            items: BTreeMap::new(),
        }
    }

    fn sub(status: &str) -> SubscriptionData {
        SubscriptionData {
            subscription_id: "sub_1".into(),
            account_id: "acc_1".into(),
            product: Product {
                sku: "MS-365-BP".into(),
                name: " Microsoft 365 Business Premium ".into(),
            },
            quantity: 25,
            unit_price: "22.00".into(),
            unit_cost: Some("18.70".into()),
            currency: "GBP".into(),
            billing_cycle: "monthly".into(),
            start_date: "2026-11-01".into(),
            end_date: None,
            status: status.into(),
        }
    }

    const MARK: &str = "halosync.subscription:sub_1";

    #[test]
    fn terms_parse_money_and_status() {
        let t = Terms::of(&sub("active"), &v1()).unwrap();
        assert_eq!(t.quantity, 25);
        assert_eq!(t.unit_price, 22.0);
        assert_eq!(t.unit_cost, Some(18.7));
        assert!(t.active);
        assert!(!Terms::of(&sub("suspended"), &v1()).unwrap().active);
        assert!(!Terms::of(&sub("cancelled"), &v1()).unwrap().active);
        let mut bad = sub("active");
        bad.unit_price = "twelve".into();
        assert_eq!(
            Terms::of(&bad, &v1()).unwrap_err().class,
            halosync_shared::FailureClass::Invalid
        );
    }

    #[test]
    fn licence_create_carries_everything() {
        let d = sub("active");
        let v = licence_record(
            &d,
            &Terms::of(&d, &v1()).unwrap(),
            7,
            None,
            MARK,
            &policy(false, false),
        )
        .unwrap();
        assert!(v.get("id").is_none());
        assert_eq!(v["client_id"], 7);
        assert_eq!(v["name"], "Microsoft 365 Business Premium");
        assert_eq!(v["count"], 25);
        assert!(v["count"].is_i64(), "count is an integer in HaloPSA");
        assert_eq!(v["start_date"], "2026-11-01T00:00:00");
        assert!(v.get("end_date").is_none());
        assert_eq!(v["billing_cycle"], "monthly");
        assert_eq!(v["status"], "active");
        assert_eq!(v["is_active"], true);
        assert_eq!(v["product_sku"], "MS-365-BP");
        assert_eq!(v["price"], 22.0);
        assert_eq!(v["purchase_price"], 18.7);
        assert_eq!(v[LICENCE_MARKER_FIELD], MARK);
    }

    #[test]
    fn licence_update_respects_the_policies() {
        let mut d = sub("suspended");
        d.end_date = Some("2027-10-31".into());
        let t = Terms::of(&d, &v1()).unwrap();
        let kept = licence_record(&d, &t, 7, Some(3), MARK, &policy(false, false)).unwrap();
        assert_eq!(kept["id"], 3);
        assert_eq!(kept["is_active"], false);
        assert_eq!(kept["status"], "suspended");
        assert_eq!(kept["end_date"], "2027-10-31T00:00:00");
        assert!(kept.get("price").is_none());
        assert!(kept.get("purchase_price").is_none());
        assert!(kept.get("name").is_none());
        let over = licence_record(&d, &t, 7, Some(3), MARK, &policy(true, true)).unwrap();
        assert_eq!(over["price"], 22.0);
        assert_eq!(over["name"], "Microsoft 365 Business Premium");
        // The end date goes back to none: cleared, not left alone.
        d.end_date = None;
        let cleared = licence_record(&d, &t, 7, Some(3), MARK, &policy(false, false)).unwrap();
        assert_eq!(cleared.get("end_date"), Some(&Value::Null));
        let line = body(&line_update(
            &d,
            &t,
            -4,
            9,
            1001,
            MARK,
            &policy(false, false),
        ))
        .unwrap();
        assert_eq!(line.get("enddate"), Some(&Value::Null));
        assert!(body(&new_line(&d, &t, Some(-4), 1001, MARK))
            .unwrap()
            .get("enddate")
            .is_none());
    }

    #[test]
    fn lines_follow_the_policies() {
        let d = sub("cancelled");
        let t = Terms::of(&d, &v1()).unwrap();
        let new = body(&new_line(&d, &t, Some(-4), 1001, MARK)).unwrap();
        assert_eq!(new["ihid"], -4);
        assert_eq!(new["_itemid"], 1001);
        assert_eq!(new["qty_order"], 25.0);
        assert_eq!(new["unit_price"], 22.0);
        assert_eq!(new["unit_cost"], 18.7);
        assert_eq!(new["isinactive"], true);
        assert_eq!(
            new["item_shortdescription"],
            "Microsoft 365 Business Premium"
        );
        assert_eq!(new[lines::MARKER_FIELD], MARK);
        assert_eq!(new[lines::VERSION_FIELD], "s=1;t=2026-11-22T10:15:00Z");
        let upd = body(&line_update(
            &d,
            &t,
            -4,
            9,
            1001,
            MARK,
            &policy(false, false),
        ))
        .unwrap();
        assert_eq!(upd["id"], 9);
        assert_eq!(upd["ihid"], -4);
        assert!(upd.get("unit_price").is_none());
        assert!(upd.get("item_shortdescription").is_none());
        let upd = body(&line_update(
            &d,
            &t,
            -4,
            9,
            1001,
            MARK,
            &policy(true, false),
        ))
        .unwrap();
        assert_eq!(upd["unit_price"], 22.0);
    }

    #[test]
    fn markers_match_exactly() {
        let rows = vec![
            json!({"id": 5, LICENCE_MARKER_FIELD: MARK}),
            json!({"id": 2, LICENCE_MARKER_FIELD: MARK}),
            json!({"id": 3, LICENCE_MARKER_FIELD: "halosync.subscription:sub_10"}),
            json!({"id": 4}),
        ];
        assert_eq!(licences_carrying(&rows, MARK), vec![2, 5]);
        let header = json!({"id": -1, "lines": [
            {"id": 8, lines::MARKER_FIELD: MARK},
            {"id": 6, lines::MARKER_FIELD: format!("{MARK} (duplicate of line 5, retired)")},
            {"id": 7, lines::MARKER_FIELD: MARK},
        ]});
        assert_eq!(lines::ids_carrying(&header, MARK), vec![7, 8]);
        // The newest version a line of the subscription carries.
        let versioned = json!({"id": -1, "lines": [
            {"id": 8, lines::MARKER_FIELD: MARK, lines::VERSION_FIELD: "s=3;t=2026-11-22T10:15:00Z"},
            {"id": 7, lines::MARKER_FIELD: MARK, lines::VERSION_FIELD: "s=5;t=2026-11-22T10:15:00Z"},
            {"id": 6, lines::MARKER_FIELD: "other", lines::VERSION_FIELD: "s=9;t=2026-11-22T10:15:00Z"},
        ]});
        let line_version = |h| lines::newest_version(lines::carrying(h, MARK));
        assert_eq!(line_version(&versioned).and_then(|v| v.sequence), Some(5));
        assert_eq!(line_version(&header), None);
        let retired = body(&halosync_shared::halo::lines::retired_line(-1, 8, 7, MARK)).unwrap();
        assert_eq!(retired["isinactive"], true);
        assert_eq!(retired["qty_order"], 0.0);
        assert_ne!(retired[lines::MARKER_FIELD], MARK);
        assert!(lines::ids_carrying(&json!({}), MARK).is_empty());
    }
}
