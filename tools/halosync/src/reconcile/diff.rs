//! The comparison: snapshot (what the billing platform says) against
//! HaloPSA's state (what the workers wrote, as the MSP left it). Pure, so
//! every drift kind is unit-tested without a network.
//!
//! # What is expected, and which fields are compared
//!
//! The expected HaloPSA values are computed by **the workers' own mapping
//! functions** (the worker crates are libraries), called as the worker
//! calls them for an update of the record found, under the connection's
//! [`Policy`]: the account's `client_record`, the subscription's
//! `licence_record` and `line_update`, the usage `line_update`, the
//! overage `line`. A field the mapping leaves out of that update (a price
//! without `overwrite_prices`, a name without `overwrite_names`, an
//! optional account field the event does not carry) is not compared, so
//! the policies are the mapping's, not restated here. Inputs that only
//! feed fields not compared (a line's header, item and description, a
//! licence's customer) are taken from the record itself. An event the
//! mapping refuses (a value HaloPSA cannot hold) is reported as differing,
//! with the refusal: the workers would dead-letter it.
//!
//! The fields compared:
//!
//! * customer (`/Client`): `name`, `active` (not `inactive`), `website`,
//!   `tax_number`, `notes`; `currency` (`default_currency_code`: the id of
//!   HaloPSA's `/Currency` row of the event's ISO code) whenever the event
//!   carries one, a code HaloPSA lacks always differing.
//! * licence (`/SoftwareLicence`): `quantity` (`count`), `active`
//!   (`is_active`), `status`, `billing_cycle`, `sku` (`product_sku`),
//!   `start_date`, `end_date` (none = absent, null or HaloPSA's empty-date
//!   sentinel), `unit_price` (`price`), `unit_cost` (`purchase_price`),
//!   `name`.
//! * subscription line (recurring invoice): `quantity` (`qty_order`),
//!   `active` (not `isinactive`), `start_date`/`end_date`
//!   (`startdate`/`enddate`), `unit_price`, `unit_cost`, `name`
//!   (`item_shortdescription`).
//! * usage line: `quantity`, `period_start`, `period_end` of the newest
//!   period of the (subscription, metric) in the snapshot (the usage
//!   mapping's `Applied::is_superseded_by`): the worker keeps one line per
//!   (subscription, metric) showing the current period, so older periods
//!   are not compared. Its price comes from the item.
//! * overage line: `quantity`, `unit_price` (always: the charge is the
//!   billing platform's), `active`. A zero overage with no line is in
//!   step: it bills nothing.
//!
//! Money and quantities are shown as the event spells them. Versions are
//! context only (the snapshot's, and the applied one on the link or line):
//! an aggregate is in step when its state fields are.
//!
//! A line or licence is halosync's when it carries a marker of its kind
//! ([`links::billing_id_of`], on the lines of [`lines::marked`]): the
//! workers retire a duplicate or a moved line by appending text to its
//! marker, and those are not counted.

use std::collections::{BTreeMap, BTreeSet};

pub use halosync_shared::config::Policy;
use halosync_shared::contract::{AccountData, OverageData, SubscriptionData, UsageData};
use halosync_shared::halo::links::{
    self, Kind, LICENCE_MARKER_FIELD, OVERAGE, SUBSCRIPTION, USAGE,
};
use halosync_shared::halo::models::body;
use halosync_shared::halo::{lines, record_id};
use halosync_shared::{Failure, Family, Version};
use halosync_subscription::mapping::Terms;
use halosync_usage::mapping::Applied;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::read::{HaloState, LinkRow, Scope};
use super::snapshot::{Entry, Snapshot};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriftKind {
    /// In the snapshot, not in HaloPSA.
    Missing,
    /// In both, with fields that differ.
    Differs,
    /// More than one HaloPSA record for one aggregate.
    Duplicated,
    /// A halosync record whose aggregate is not in the snapshot (reported,
    /// never deleted, never repaired).
    Orphaned,
}

impl DriftKind {
    pub const ALL: [DriftKind; 4] = [
        DriftKind::Missing,
        DriftKind::Differs,
        DriftKind::Duplicated,
        DriftKind::Orphaned,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DriftKind::Missing => "missing",
            DriftKind::Differs => "differs",
            DriftKind::Duplicated => "duplicated",
            DriftKind::Orphaned => "orphaned",
        }
    }
}

/// One field that differs: the snapshot's value and HaloPSA's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FieldDiff {
    pub field: String,
    pub snapshot: Value,
    pub halo: Value,
}

/// One drift of one aggregate, on one HaloPSA record kind.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Drift {
    pub family: Family,
    /// The aggregate key (DESIGN §1).
    pub aggregate: String,
    pub kind: DriftKind,
    /// `customer`, `licence`, `recurring line`, `usage line`, `overage line`.
    pub record: String,
    /// HaloPSA ids of the records concerned (lowest first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub halo_ids: Vec<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<FieldDiff>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_version: Option<String>,
    /// The snapshot event a repair publishes (none for orphans).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    /// The snapshot line of that event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    pub detail: String,
}

// ----- value helpers ---------------------------------------------------------

fn num(v: Option<&Value>) -> Option<f64> {
    match v? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn int(v: Option<&Value>) -> Option<i64> {
    match v? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn flag(v: Option<&Value>) -> Option<bool> {
    match v? {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => n.as_i64().map(|n| n != 0),
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" => Some(true),
            "false" | "0" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

fn text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.trim().to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A HaloPSA date as `YYYY-MM-DD`; `None` for absent, null, and the
/// empty-date sentinels (`1899-12-30…`, `0001-01-01…`, reference §2).
fn day(v: Option<&Value>) -> Option<String> {
    let s = text(v)?;
    let d: String = s.chars().take(10).collect();
    if d.len() < 10 || d.starts_with("1899-12-30") || d.starts_with("0001-01-01") {
        return None;
    }
    Some(d)
}

fn money_eq(a: f64, b: Option<f64>) -> bool {
    b.is_some_and(|b| (a - b).abs() < 0.005)
}

fn qty_eq(a: f64, b: Option<f64>) -> bool {
    b.is_some_and(|b| (a - b).abs() < 1e-9)
}

fn halo_value(v: Option<&Value>) -> Value {
    v.cloned().unwrap_or(Value::Null)
}

/// Collects the fields of one HaloPSA record (`record`) that differ from
/// what the workers' mapping would write over it (`want`, a request body).
/// Each comparison names the field as a person reads it (`field`) and the
/// HaloPSA property (`key`); a property absent from `want` is one the
/// mapping does not write on an update, and is not compared.
struct Fields<'a> {
    record: &'a Value,
    out: Vec<FieldDiff>,
}

impl<'a> Fields<'a> {
    fn new(record: &'a Value) -> Fields<'a> {
        Fields {
            record,
            out: Vec::new(),
        }
    }

    fn push(&mut self, field: &str, snapshot: Value, halo_key: &str) {
        self.out.push(FieldDiff {
            field: field.to_string(),
            snapshot,
            halo: halo_value(self.record.get(halo_key)),
        });
    }

    fn qty(&mut self, field: &str, want: &Value, key: &str) {
        let Some(want) = num(want.get(key)) else {
            return;
        };
        if !qty_eq(want, num(self.record.get(key))) {
            // Whole quantities shown as the event has them (`5`, not `5.0`).
            let shown = if want.fract() == 0.0 && want.abs() < 1e15 {
                json!(want as i64)
            } else {
                json!(want)
            };
            self.push(field, shown, key);
        }
    }

    /// A price; `shown` is the event's decimal text.
    fn money(&mut self, field: &str, shown: Option<&str>, want: &Value, key: &str) {
        let Some(want) = num(want.get(key)) else {
            return;
        };
        if !money_eq(want, num(self.record.get(key))) {
            self.push(field, shown.map_or(json!(want), |s| json!(s)), key);
        }
    }

    fn text(&mut self, field: &str, want: &Value, key: &str) {
        let Some(want) = want.get(key).and_then(Value::as_str) else {
            return;
        };
        if text(self.record.get(key)).as_deref() != Some(want.trim()) {
            self.push(field, json!(want), key);
        }
    }

    /// An ISO currency code against the `/Currency` id HaloPSA holds: the
    /// mapping's id (`want`), or none when HaloPSA has no such currency,
    /// which is always a difference.
    fn currency(&mut self, code: &str, want: &Value, key: &str) {
        let id = int(want.get(key));
        let held = int(self.record.get(key));
        if id.is_none() || held != id {
            let shown = match id {
                Some(id) => json!(format!("{code} (currency {id})")),
                None => json!(format!("{code} (not set up in HaloPSA)")),
            };
            self.push("currency", shown, key);
        }
    }

    /// `active` against a HaloPSA flag that means `negated ? inactive : active`.
    fn active(&mut self, want: &Value, key: &str, negated: bool) {
        let Some(want) = flag(want.get(key)).map(|f| f != negated) else {
            return;
        };
        let halo = flag(self.record.get(key)).map(|f| f != negated);
        if halo != Some(want) {
            self.out.push(FieldDiff {
                field: "active".into(),
                snapshot: json!(want),
                halo: halo.map_or(Value::Null, Value::Bool),
            });
        }
    }

    /// A date; `null` in `want` is "no date" (an update clearing one).
    fn date(&mut self, field: &str, want: &Value, key: &str) {
        let Some(want) = want.get(key) else {
            return;
        };
        let want = day(Some(want));
        let halo = day(self.record.get(key));
        if halo != want {
            self.out.push(FieldDiff {
                field: field.to_string(),
                snapshot: want.map_or(Value::Null, Value::String),
                halo: halo.map_or(Value::Null, Value::String),
            });
        }
    }

    /// The record's own `key` as an id (for inputs of the mapping that
    /// feed no compared field), 0 when it has none.
    fn own_id(&self, key: &str) -> i64 {
        int(self.record.get(key)).unwrap_or_default()
    }
}

// ----- indexes ----------------------------------------------------------------

/// Lines of the given headers carrying a marker of `kind`: billing id →
/// lines (lowest id first).
fn lines_by_marker<'a>(
    headers: impl Iterator<Item = &'a Value>,
    kind: &Kind,
) -> BTreeMap<String, Vec<&'a Value>> {
    let mut out: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for h in headers {
        for (marker, _, line) in lines::marked(h) {
            if let Some(id) = links::billing_id_of(kind, marker) {
                out.entry(id.to_string()).or_default().push(line);
            }
        }
    }
    for v in out.values_mut() {
        v.sort_by_key(|l| record_id(l).unwrap_or(i64::MAX));
    }
    out
}

fn links_by_billing(links: &[LinkRow]) -> BTreeMap<&str, Vec<&LinkRow>> {
    let mut out: BTreeMap<&str, Vec<&LinkRow>> = BTreeMap::new();
    for l in links {
        out.entry(l.billing_id.as_str()).or_default().push(l);
    }
    out
}

/// The recurring invoice of an account: the earliest link whose header was
/// read (the rule the workers' import uses for recurring invoices).
fn invoice_of<'a>(state: &'a HaloState, account: &str) -> Option<&'a Value> {
    state
        .recurring_links
        .iter()
        .filter(|l| l.billing_id == account)
        .min_by_key(|l| l.link_id)
        .and_then(|l| state.recurring.get(&l.halo_id))
}

fn ids(records: &[&Value]) -> Vec<i64> {
    records.iter().filter_map(|r| record_id(r)).collect()
}

/// The applied version text of the first of `lines` ([`lines::version_text`]).
fn line_applied(lines: &[&Value]) -> Option<String> {
    lines
        .first()
        .and_then(|l| lines::version_text(l))
        .map(|t| t.trim().to_string())
}

fn in_account(scope: &Scope, account_id: &str) -> bool {
    scope.account.as_deref().is_none_or(|a| a == account_id)
}

/// The recurring invoices of the scope (one account's, or all linked).
fn our_headers<'a>(scope: &Scope, state: &'a HaloState) -> Vec<&'a Value> {
    match &scope.account {
        Some(a) => invoice_of(state, a).into_iter().collect(),
        None => state.recurring.values().collect(),
    }
}

struct Ctx<'a> {
    scope: &'a Scope,
    state: &'a HaloState,
    policy: Policy,
    out: Vec<Drift>,
}

fn drift(
    family: Family,
    aggregate: &str,
    kind: DriftKind,
    record: &str,
    entry: Option<&Entry>,
) -> Drift {
    Drift {
        family,
        aggregate: aggregate.to_string(),
        kind,
        record: record.to_string(),
        halo_ids: Vec::new(),
        fields: Vec::new(),
        snapshot_version: entry.map(|e| e.version.to_string()),
        applied_version: None,
        event_id: entry.map(|e| e.event.id.clone()),
        line: entry.map(|e| e.line),
        detail: String::new(),
    }
}

impl Ctx<'_> {
    /// Missing / duplicated / differs for one record kind of one aggregate.
    /// `compare` computes what the workers' mapping would write over the
    /// record (its `Fields::record`) and compares it, or returns the
    /// mapping's refusal of the event.
    #[allow(clippy::too_many_arguments)]
    fn record(
        &mut self,
        family: Family,
        aggregate: &str,
        entry: &Entry,
        record: &str,
        found: &[&Value],
        applied: Option<String>,
        missing_detail: &str,
        compare: impl Fn(&mut Fields) -> Result<(), Failure>,
    ) {
        let Some(first) = found.first() else {
            let mut d = drift(family, aggregate, DriftKind::Missing, record, Some(entry));
            d.applied_version = applied;
            d.detail = missing_detail.to_string();
            self.out.push(d);
            return;
        };
        if found.len() > 1 {
            let mut d = drift(
                family,
                aggregate,
                DriftKind::Duplicated,
                record,
                Some(entry),
            );
            d.halo_ids = ids(found);
            d.applied_version = applied.clone();
            d.detail = format!(
                "{} {record}s carry this aggregate; a repair keeps the lowest id",
                found.len()
            );
            self.out.push(d);
        }
        let mut f = Fields::new(first);
        let refused = compare(&mut f).err();
        if f.out.is_empty() && refused.is_none() {
            return;
        }
        let mut d = drift(family, aggregate, DriftKind::Differs, record, Some(entry));
        d.halo_ids = record_id(first).into_iter().collect();
        d.applied_version = applied;
        d.detail = match refused {
            Some(refusal) => format!("the workers refuse this event ({refusal})"),
            None => f
                .out
                .iter()
                .map(|x| x.field.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        };
        d.fields = f.out;
        self.out.push(d);
    }

    fn orphan(
        &mut self,
        family: Family,
        aggregate: &str,
        record: &str,
        halo_ids: Vec<i64>,
        applied: Option<String>,
        detail: String,
    ) {
        let mut d = drift(family, aggregate, DriftKind::Orphaned, record, None);
        d.halo_ids = halo_ids;
        d.applied_version = applied;
        d.detail = detail;
        self.out.push(d);
    }

    fn accounts(&mut self, entries: &[&Entry]) {
        use halosync_account::mapping::client_record;
        let state = self.state;
        let links = links_by_billing(&state.account_links);
        let mut seen = BTreeSet::new();
        for e in entries {
            let Ok(d) = e.event.data_as::<AccountData>() else {
                continue;
            };
            seen.insert(d.account_id.clone());
            let own = links
                .get(d.account_id.as_str())
                .cloned()
                .unwrap_or_default();
            let mut halo_ids: Vec<i64> = own.iter().map(|l| l.halo_id).collect();
            halo_ids.sort_unstable();
            halo_ids.dedup();
            let found: Vec<&Value> = halo_ids
                .iter()
                .filter_map(|id| state.clients.get(id))
                .collect();
            let applied = own
                .iter()
                .min_by_key(|l| (l.halo_id, l.link_id))
                .and_then(|l| l.version.clone());
            let detail = if halo_ids.is_empty() {
                "no customer is linked to this account".to_string()
            } else {
                format!("the linked customer {halo_ids:?} is not in HaloPSA")
            };
            let policy = self.policy;
            // The event's ISO code, and the id of HaloPSA's `/Currency` row
            // of it (what the worker looks up through `halo::currency`).
            let currency = d.currency.as_deref().map(|code| {
                let code = halosync_shared::halo::currency::normalise(code);
                let id = state.currencies.get(&code).copied();
                (code, id)
            });
            self.record(
                Family::Account,
                &d.account_id,
                e,
                "customer",
                &found,
                applied,
                &detail,
                |f| {
                    let id = record_id(f.record);
                    let want = body(&client_record(
                        &d,
                        currency.as_ref().and_then(|c| c.1),
                        id,
                        policy,
                    ))?;
                    f.text("name", &want, "name");
                    f.active(&want, "inactive", true);
                    f.text("website", &want, "website");
                    f.text("tax_number", &want, "tax_number");
                    f.text("notes", &want, "notes");
                    if let Some((code, _)) = &currency {
                        f.currency(code, &want, "default_currency_code");
                    }
                    Ok(())
                },
            );
        }
        for (billing_id, own) in &links {
            if seen.contains(*billing_id) || !in_account(self.scope, billing_id) {
                continue;
            }
            let mut found: Vec<i64> = own
                .iter()
                .map(|l| l.halo_id)
                .filter(|id| state.clients.contains_key(id))
                .collect();
            found.sort_unstable();
            found.dedup();
            if found.is_empty() {
                continue;
            }
            let applied = own.first().and_then(|l| l.version.clone());
            self.orphan(
                Family::Account,
                billing_id,
                "customer",
                found,
                applied,
                "a halosync customer whose account is not in the snapshot (never deleted)".into(),
            );
        }
    }

    fn subscriptions(&mut self, entries: &[&Entry]) {
        use halosync_subscription::mapping::{licence_record, line_update};
        let state = self.state;
        let links = links_by_billing(&state.subscription_links);
        // Licences by subscription: linked ones and marked ones.
        let mut licences: BTreeMap<String, BTreeSet<i64>> = BTreeMap::new();
        for l in &state.subscription_links {
            if state.licences.contains_key(&l.halo_id) {
                licences
                    .entry(l.billing_id.clone())
                    .or_default()
                    .insert(l.halo_id);
            }
        }
        for (id, l) in &state.licences {
            let marker = links::marker_in(l, LICENCE_MARKER_FIELD);
            if let Some(sub) = marker.and_then(|m| links::billing_id_of(&SUBSCRIPTION, m)) {
                licences.entry(sub.to_string()).or_default().insert(*id);
            }
        }
        let mut seen = BTreeSet::new();
        for e in entries {
            let Ok(d) = e.event.data_as::<SubscriptionData>() else {
                continue;
            };
            seen.insert(d.subscription_id.clone());
            let marker = links::marker(&SUBSCRIPTION, &d.subscription_id);
            // The line on the account's recurring invoice.
            let header = invoice_of(state, &d.account_id);
            let line_found: Vec<&Value> = header
                .map(|h| lines::carrying(h, &marker))
                .unwrap_or_default();
            // The applied version: the link's, or the line's when newer (a
            // known subscription's update carries it on the line only).
            let on_link = links
                .get(d.subscription_id.as_str())
                .and_then(|v| v.iter().min_by_key(|l| (l.halo_id, l.link_id)))
                .and_then(|l| l.version.clone());
            let applied = on_link
                .iter()
                .cloned()
                .chain(
                    line_found
                        .iter()
                        .filter_map(|l| lines::version_text(l).map(str::to_string)),
                )
                .filter_map(|t| Version::decode(&t).map(|v| (v, t)))
                .max_by(|a, b| a.0.compare(&b.0))
                .map(|(_, t)| t)
                .or(on_link);
            let found: Vec<&Value> = licences
                .get(&d.subscription_id)
                .map(|ids| ids.iter().filter_map(|id| state.licences.get(id)).collect())
                .unwrap_or_default();
            let policy = self.policy;
            let terms = Terms::of(&d, &e.version);
            self.record(
                Family::Subscription,
                &d.subscription_id,
                e,
                "licence",
                &found,
                applied.clone(),
                "no licence carries this subscription",
                |f| {
                    let terms = terms.clone()?;
                    let (customer, id) = (f.own_id("client_id"), record_id(f.record));
                    let want = licence_record(&d, &terms, customer, id, &marker, policy)?;
                    f.qty("quantity", &want, "count");
                    f.active(&want, "is_active", false);
                    f.text("status", &want, "status");
                    f.text("billing_cycle", &want, "billing_cycle");
                    f.text("sku", &want, "product_sku");
                    f.date("start_date", &want, "start_date");
                    f.date("end_date", &want, "end_date");
                    f.money("unit_price", Some(&d.unit_price), &want, "price");
                    f.money("unit_cost", d.unit_cost.as_deref(), &want, "purchase_price");
                    f.text("name", &want, "name");
                    Ok(())
                },
            );
            let detail = if header.is_some() {
                "no line of the account's recurring invoice carries this subscription"
            } else {
                "the account has no halosync recurring invoice, so no line"
            };
            let ihid = header.and_then(record_id).unwrap_or_default();
            self.record(
                Family::Subscription,
                &d.subscription_id,
                e,
                "recurring line",
                &line_found,
                applied,
                detail,
                |f| {
                    let terms = terms.clone()?;
                    let (line, item) = (f.own_id("id"), f.own_id("_itemid"));
                    let want = body(&line_update(&d, &terms, ihid, line, item, &marker, policy))?;
                    f.qty("quantity", &want, "qty_order");
                    f.active(&want, "isinactive", true);
                    f.date("start_date", &want, "startdate");
                    f.date("end_date", &want, "enddate");
                    f.money("unit_price", Some(&d.unit_price), &want, "unit_price");
                    f.money("unit_cost", d.unit_cost.as_deref(), &want, "unit_cost");
                    f.text("name", &want, "item_shortdescription");
                    Ok(())
                },
            );
        }
        // Orphans: licences, then lines.
        for (sub, ids) in &licences {
            if seen.contains(sub) {
                continue;
            }
            let applied = links
                .get(sub.as_str())
                .and_then(|v| v.first())
                .and_then(|l| l.version.clone());
            self.orphan(
                Family::Subscription,
                sub,
                "licence",
                ids.iter().copied().collect(),
                applied,
                "a halosync licence whose subscription is not in the snapshot (never deleted)"
                    .into(),
            );
        }
        let headers = our_headers(self.scope, state);
        for (sub, lines) in lines_by_marker(headers.into_iter(), &SUBSCRIPTION) {
            if seen.contains(&sub) {
                continue;
            }
            self.orphan(Family::Subscription, &sub, "recurring line", ids(&lines), None,
                "a halosync recurring line whose subscription is not in the snapshot (never deleted)".into());
        }
    }

    fn usage(&mut self, entries: &[&Entry]) {
        use halosync_usage::mapping::{detail, line_key, marker};
        let state = self.state;
        // The newest period per (subscription, metric): the state the
        // worker's line shows.
        let mut newest: BTreeMap<String, (&Entry, UsageData, Applied)> = BTreeMap::new();
        for e in entries {
            let Ok(d) = e.event.data_as::<UsageData>() else {
                continue;
            };
            let state = Applied {
                period_start: d.period_start.clone(),
                version: e.version.clone(),
            };
            let key = line_key(&d);
            let newer = match newest.get(&key) {
                None => true,
                Some((_, _, kept)) => !state.is_superseded_by(kept),
            };
            if newer {
                newest.insert(key, (e, d, state));
            }
        }
        let mut seen = BTreeSet::new();
        for (key, (e, d, applied_state)) in &newest {
            seen.insert(key.clone());
            let marker = marker(d);
            let header = invoice_of(state, &d.account_id);
            let found: Vec<&Value> = header
                .map(|h| lines::carrying(h, &marker))
                .unwrap_or_default();
            let applied = line_applied(&found);
            let aggregate = format!("{key}:{}", d.period_start);
            let ihid = header.and_then(record_id).unwrap_or_default();
            self.record(
                Family::Usage,
                &aggregate,
                e,
                "usage line",
                &found,
                applied,
                "no line of the account's recurring invoice carries this usage",
                |f| {
                    let (line, item) = (f.own_id("id"), f.own_id("_itemid"));
                    // The line as the lines engine writes it; the product
                    // only names the line (not compared).
                    let want = body(&detail(d, "", applied_state, ihid, Some(line), item))?;
                    f.qty("quantity", &want, "qty_order");
                    f.date("period_start", &want, "startdate");
                    f.date("period_end", &want, "enddate");
                    Ok(())
                },
            );
        }
        let headers = our_headers(self.scope, state);
        for (key, lines) in lines_by_marker(headers.into_iter(), &USAGE) {
            if seen.contains(&key) {
                continue;
            }
            let applied = line_applied(&lines);
            self.orphan(Family::Usage, &key, "usage line", ids(&lines), applied,
                "a halosync usage line whose subscription and metric are not in the snapshot (never deleted)".into());
        }
    }

    fn overage(&mut self, entries: &[&Entry]) {
        use halosync_overage::mapping::{
            aggregate, invoice_billing_id, is_zero, line, marker, unit_price,
        };
        let state = self.state;
        let invoice_links = links_by_billing(&state.overage_invoice_links);
        let mut seen = BTreeSet::new();
        for e in entries {
            let Ok(d) = e.event.data_as::<OverageData>() else {
                continue;
            };
            let aggregate = aggregate(&d);
            seen.insert(aggregate.clone());
            let header = invoice_links
                .get(invoice_billing_id(&d).as_str())
                .and_then(|v| {
                    v.iter()
                        .filter_map(|l| state.invoices.get(&l.halo_id))
                        .min_by_key(|h| record_id(h))
                });
            let found: Vec<&Value> = header
                .map(|h| lines::carrying(h, &marker(&d)))
                .unwrap_or_default();
            if found.is_empty() && is_zero(&d) {
                continue; // bills nothing: in step without a line
            }
            let applied = line_applied(&found);
            let ihid = header.and_then(record_id);
            self.record(
                Family::Overage,
                &aggregate,
                e,
                "overage line",
                &found,
                applied,
                "no line of the period's halosync invoice carries this overage",
                |f| {
                    let (id, item) = (record_id(f.record), f.own_id("_itemid"));
                    let want = body(&line(&d, unit_price(&d)?, ihid, id, item, &e.version))?;
                    f.qty("quantity", &want, "qty_order");
                    f.money("unit_price", Some(&d.unit_price), &want, "unit_price");
                    f.active(&want, "isinactive", true);
                    Ok(())
                },
            );
        }
        for (aggregate, lines) in lines_by_marker(state.invoices.values(), &OVERAGE) {
            if seen.contains(&aggregate) {
                continue;
            }
            let applied = line_applied(&lines);
            self.orphan(
                Family::Overage,
                &aggregate,
                "overage line",
                ids(&lines),
                applied,
                "a halosync overage charge that is not in the snapshot (never deleted)".into(),
            );
        }
    }
}

/// Every drift of the scope, ordered by family, aggregate, kind.
pub fn diff(snap: &Snapshot, state: &HaloState, scope: &Scope, policy: Policy) -> Vec<Drift> {
    let mut by_family: BTreeMap<Family, Vec<&Entry>> = BTreeMap::new();
    for ((family, _), e) in &snap.entries {
        if !scope.has(*family) {
            continue;
        }
        let account = e
            .event
            .data
            .get("account_id")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !in_account(scope, account) {
            continue;
        }
        by_family.entry(*family).or_default().push(e);
    }
    let mut ctx = Ctx {
        scope,
        state,
        policy,
        out: Vec::new(),
    };
    let none = Vec::new();
    let of = |f: Family| by_family.get(&f).unwrap_or(&none).as_slice();
    if scope.has(Family::Account) {
        ctx.accounts(of(Family::Account));
    }
    if scope.has(Family::Subscription) {
        ctx.subscriptions(of(Family::Subscription));
    }
    if scope.has(Family::Usage) {
        ctx.usage(of(Family::Usage));
    }
    if scope.has(Family::Overage) {
        ctx.overage(of(Family::Overage));
    }
    let mut out = ctx.out;
    out.sort_by(|a, b| {
        (a.family, &a.aggregate, a.kind, &a.record).cmp(&(
            b.family,
            &b.aggregate,
            b.kind,
            &b.record,
        ))
    });
    out
}

#[cfg(test)]
mod tests {
    use super::super::read::LinkRow;
    use super::super::snapshot;
    use super::*;
    use halosync_shared::contract::Envelope;
    use halosync_shared::Contract;
    use serde::de::DeserializeOwned;

    const ACC: &str = r#"{"id":"e1","type":"account.updated","schema_version":1,"connection":"acme","occurred_at":"2026-11-22T10:15:00Z","sequence":3,"data":{"account_id":"acc_1","name":"Contoso","active":true,"currency":"GBP"}}"#;
    const SUB: &str = r#"{"id":"e2","type":"subscription.updated","schema_version":1,"connection":"acme","occurred_at":"2026-11-22T10:15:00Z","sequence":4,"data":{"subscription_id":"sub_1","account_id":"acc_1","product":{"sku":"MS-365-BP","name":"M365"},"quantity":5,"unit_price":"22.00","currency":"GBP","billing_cycle":"monthly","start_date":"2026-11-01","end_date":null,"status":"active"}}"#;
    const USAGE_OLD: &str = r#"{"id":"e3","type":"usage.reported","schema_version":1,"connection":"acme","occurred_at":"2026-11-22T10:15:00Z","sequence":9,"data":{"subscription_id":"sub_1","account_id":"acc_1","metric":"gb","period_start":"2026-10-01","period_end":"2026-10-31","quantity":3}}"#;
    const USAGE_NEW: &str = r#"{"id":"e4","type":"usage.reported","schema_version":1,"connection":"acme","occurred_at":"2026-11-22T10:15:00Z","sequence":1,"data":{"subscription_id":"sub_1","account_id":"acc_1","metric":"gb","period_start":"2026-11-01","period_end":"2026-11-30","quantity":7.5}}"#;
    const OVER_ZERO: &str = r#"{"id":"e5","type":"overage.detected","schema_version":1,"connection":"acme","occurred_at":"2026-11-22T10:15:00Z","data":{"subscription_id":"sub_1","account_id":"acc_1","metric":"gb","period_start":"2026-11-01","period_end":"2026-11-30","included_quantity":10,"used_quantity":5,"overage_quantity":0,"unit_price":"0.50","currency":"GBP"}}"#;

    fn snap(lines: &[&str]) -> Snapshot {
        let c = Contract::new().unwrap();
        snapshot::parse(&lines.join("\n"), &c, "acme", 1 << 20).unwrap()
    }

    fn link(billing: &str, halo: i64, id: i64) -> LinkRow {
        LinkRow {
            billing_id: billing.into(),
            halo_id: halo,
            link_id: id,
            version: Some("s=1".into()),
        }
    }

    /// The event of a snapshot line, and its typed data.
    fn event<T: DeserializeOwned>(line: &str) -> (Envelope, T) {
        let e: Envelope = serde_json::from_str(line).unwrap();
        let d = e.data_as::<T>().unwrap();
        (e, d)
    }

    /// A record body the workers' mapping built, with the id HaloPSA gave it.
    fn saved(mut record: Value, id: i64) -> Value {
        record["id"] = json!(id);
        record
    }

    /// HaloPSA exactly as the workers leave `ACC`, `SUB` and `USAGE_NEW`:
    /// every record built by the worker's own mapping function, as created.
    fn in_step() -> HaloState {
        use halosync_subscription::mapping as subscription;
        use halosync_usage::mapping as usage;
        let mut s = HaloState {
            account_links: vec![link("acc_1", 7, 1)],
            subscription_links: vec![link("sub_1", 3, 2)],
            recurring_links: vec![link("acc_1", -1, 3)],
            ..Default::default()
        };
        let (_, acc) = event::<AccountData>(ACC);
        let customer = halosync_account::mapping::client_record(&acc, Some(2), None, PRICES);
        s.clients.insert(7, saved(body(&customer).unwrap(), 7));
        s.currencies.insert("GBP".into(), 2);
        s.currencies.insert("USD".into(), 1);
        let (e, sub) = event::<SubscriptionData>(SUB);
        let terms = subscription::Terms::of(&sub, &e.version().unwrap()).unwrap();
        let mark = links::marker(&SUBSCRIPTION, "sub_1");
        let mut licence =
            subscription::licence_record(&sub, &terms, 7, None, &mark, PRICES).unwrap();
        // HaloPSA answers "no end date" with its empty-date sentinel.
        licence["end_date"] = json!("1899-12-30T00:00:00");
        s.licences.insert(3, saved(licence, 3));
        let line = body(&subscription::new_line(&sub, &terms, Some(-1), 1001, &mark)).unwrap();
        let (e, use_new) = event::<UsageData>(USAGE_NEW);
        let applied = Applied {
            period_start: use_new.period_start.clone(),
            version: e.version().unwrap(),
        };
        let usage_line = body(&usage::detail(&use_new, "M365", &applied, -1, None, 1002)).unwrap();
        // A duplicate a worker retired: not halosync's any more.
        let retired = body(&lines::retired_line(-1, 12, 10, &mark)).unwrap();
        s.recurring.insert(
            -1,
            json!({"id": -1, "lines": [saved(line, 10), saved(usage_line, 11), retired]}),
        );
        s
    }

    fn all() -> Scope {
        Scope {
            families: Family::ALL.into_iter().collect(),
            account: None,
        }
    }

    const PRICES: Policy = Policy {
        overwrite_prices: true,
        overwrite_names: true,
    };

    fn kinds(d: &[Drift]) -> Vec<(Family, &str, DriftKind, &str, Vec<&str>)> {
        d.iter()
            .map(|x| {
                (
                    x.family,
                    x.aggregate.as_str(),
                    x.kind,
                    x.record.as_str(),
                    x.fields.iter().map(|f| f.field.as_str()).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn the_workers_state_is_in_step() {
        // Only the newest usage period is compared; a zero overage without
        // a line is what the worker writes; a retired line is not ours.
        let s = snap(&[ACC, SUB, USAGE_OLD, USAGE_NEW, OVER_ZERO]);
        assert_eq!(diff(&s, &in_step(), &all(), PRICES), vec![]);
    }

    #[test]
    fn each_kind_is_named_with_its_fields() {
        let s = snap(&[ACC, SUB, USAGE_NEW]);
        let mut h = in_step();
        h.clients.get_mut(&7).unwrap()["inactive"] = json!(true);
        h.licences.get_mut(&3).unwrap()["count"] = json!(9);
        h.licences.get_mut(&3).unwrap()["end_date"] = json!("2027-01-31T00:00:00");
        let lines = h.recurring.get_mut(&-1).unwrap()["lines"]
            .as_array_mut()
            .unwrap();
        lines.retain(|l| l["id"] != 11); // usage line deleted
                                         // The same line again, as a worker racing without the lock adds it.
        let dup = saved(lines[0].clone(), 20);
        lines.push(dup);
        lines.push(json!({"id": 30, "qty_order": 1.0, "item_internal_reference": "halosync.subscription:sub_9"}));
        let d = diff(&s, &h, &all(), PRICES);
        assert_eq!(
            kinds(&d),
            vec![
                (
                    Family::Account,
                    "acc_1",
                    DriftKind::Differs,
                    "customer",
                    vec!["active"]
                ),
                (
                    Family::Subscription,
                    "sub_1",
                    DriftKind::Differs,
                    "licence",
                    vec!["quantity", "end_date"]
                ),
                (
                    Family::Subscription,
                    "sub_1",
                    DriftKind::Duplicated,
                    "recurring line",
                    vec![]
                ),
                (
                    Family::Subscription,
                    "sub_9",
                    DriftKind::Orphaned,
                    "recurring line",
                    vec![]
                ),
                (
                    Family::Usage,
                    "sub_1:gb:2026-11-01",
                    DriftKind::Missing,
                    "usage line",
                    vec![]
                ),
            ]
        );
        assert_eq!(d[2].halo_ids, vec![10, 20]);
        assert_eq!(d[1].fields[0].snapshot, json!(5));
        assert_eq!(d[1].fields[0].halo, json!(9));
        // The newer of link and line: the line the worker wrote carries the
        // event's version, which the link's older one does not outrank.
        assert_eq!(
            d[1].applied_version.as_deref(),
            Some("s=4;t=2026-11-22T10:15:00Z")
        );
        assert_eq!(d[1].event_id.as_deref(), Some("e2"));
        assert!(
            d[3].event_id.is_none(),
            "an orphan has no event to repair with"
        );
    }

    #[test]
    fn the_applied_version_is_the_link_s_without_one_on_the_line() {
        let s = snap(&[SUB]);
        let mut h = in_step();
        h.licences.get_mut(&3).unwrap()["count"] = json!(9);
        let line = &mut h.recurring.get_mut(&-1).unwrap()["lines"][0];
        line.as_object_mut().unwrap().remove(lines::VERSION_FIELD);
        let scope = Scope {
            families: [Family::Subscription].into_iter().collect(),
            account: None,
        };
        let d = diff(&s, &h, &scope, PRICES);
        assert_eq!(d.len(), 1, "{d:#?}");
        assert_eq!(d[0].applied_version.as_deref(), Some("s=1"));
    }

    #[test]
    fn an_event_the_mapping_refuses_differs_with_the_refusal() {
        // `count` is an int32 in HaloPSA: the worker refuses this quantity.
        let s = snap(&[&SUB.replace("\"quantity\":5", "\"quantity\":3000000000")]);
        let scope = Scope {
            families: [Family::Subscription].into_iter().collect(),
            account: None,
        };
        let d = diff(&s, &in_step(), &scope, PRICES);
        assert_eq!(
            kinds(&d),
            vec![
                (
                    Family::Subscription,
                    "sub_1",
                    DriftKind::Differs,
                    "licence",
                    vec![]
                ),
                (
                    Family::Subscription,
                    "sub_1",
                    DriftKind::Differs,
                    "recurring line",
                    vec![]
                ),
            ]
        );
        assert!(
            d[0].detail.starts_with("the workers refuse this event")
                && d[0].detail.contains("quantity 3000000000 is too large"),
            "{}",
            d[0].detail
        );
    }

    #[test]
    fn prices_and_names_follow_the_policy() {
        let s = snap(&[SUB]);
        let mut h = in_step();
        h.licences.get_mut(&3).unwrap()["price"] = json!(30.0);
        h.licences.get_mut(&3).unwrap()["name"] = json!("MSP's own name");
        let scope = Scope {
            families: [Family::Subscription].into_iter().collect(),
            account: None,
        };
        let d = diff(&s, &h, &scope, PRICES);
        assert_eq!(
            kinds(&d),
            vec![(
                Family::Subscription,
                "sub_1",
                DriftKind::Differs,
                "licence",
                vec!["unit_price", "name"]
            )]
        );
        assert_eq!(diff(&s, &h, &scope, Policy::default()), vec![]);
    }

    #[test]
    fn missing_records_and_account_scope() {
        let s = snap(&[ACC, SUB]);
        let h = HaloState::default();
        let d = diff(&s, &h, &all(), PRICES);
        assert_eq!(
            kinds(&d),
            vec![
                (
                    Family::Account,
                    "acc_1",
                    DriftKind::Missing,
                    "customer",
                    vec![]
                ),
                (
                    Family::Subscription,
                    "sub_1",
                    DriftKind::Missing,
                    "licence",
                    vec![]
                ),
                (
                    Family::Subscription,
                    "sub_1",
                    DriftKind::Missing,
                    "recurring line",
                    vec![]
                ),
            ]
        );
        let other = Scope {
            families: Family::ALL.into_iter().collect(),
            account: Some("acc_2".into()),
        };
        assert_eq!(
            diff(&s, &h, &other, PRICES),
            vec![],
            "another account's drift is out of scope"
        );
    }

    #[test]
    fn a_positive_overage_needs_its_line() {
        let positive = OVER_ZERO.replace("\"overage_quantity\":0", "\"overage_quantity\":4");
        let s = snap(&[&positive]);
        let mut h = HaloState {
            overage_invoice_links: vec![link("acc_1:2026-11-01", 5, 9)],
            ..Default::default()
        };
        let (e, d) = event::<OverageData>(&positive);
        let price = halosync_overage::mapping::unit_price(&d).unwrap();
        let written = halosync_overage::mapping::line(
            &d,
            price,
            Some(5),
            Some(40),
            1003,
            &e.version().unwrap(),
        );
        let mut line = body(&written).unwrap();
        line["unit_price"] = json!(0.75); // the MSP's own price
        h.invoices.insert(5, json!({"id": 5, "lines": [line]}));
        let scope = Scope {
            families: [Family::Overage].into_iter().collect(),
            account: None,
        };
        let d = diff(&s, &h, &scope, Policy::default());
        assert_eq!(
            kinds(&d),
            vec![(
                Family::Overage,
                "sub_1:gb:2026-11-01",
                DriftKind::Differs,
                "overage line",
                vec!["unit_price"]
            )],
            "the overage price is the billing platform's, whatever the policy"
        );
    }
}
