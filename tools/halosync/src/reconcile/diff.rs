//! The comparison: snapshot (what the billing platform says) against
//! HaloPSA's state (what the workers wrote, as the MSP left it). Pure, so
//! every drift kind is unit-tested without a network.
//!
//! # Which fields, and why these
//!
//! The expected values are computed from the event directly, following the
//! workers' mapping modules (`workers/*/src/mapping.rs`), which live in the
//! worker binaries and cannot be called from here; the rules are restated
//! next to each comparison, and the integration tests check them against
//! what the real workers write:
//!
//! * customer (`/Client`): `active` = not `inactive`; `name` only with
//!   `overwrite_names` (the MSP may rename); `website`, `tax_number`,
//!   `currency` (`default_currency_code`: the id of HaloPSA's `/Currency`
//!   row of the event's ISO code), `notes` only when the event carries them
//!   (the workers never clear them).
//! * licence (`/SoftwareLicence`): `quantity` (`count`), `active`
//!   (`is_active`), `status`, `billing_cycle`, `sku` (`product_sku`),
//!   `start_date`, `end_date` (none = absent, null or HaloPSA's empty-date
//!   sentinel); `unit_price` (`price`) and `unit_cost` (`purchase_price`)
//!   only with `overwrite_prices`; `name` only with `overwrite_names`.
//! * subscription line (recurring invoice): `quantity` (`qty_order`),
//!   `active` (not `isinactive`), `start_date`/`end_date`
//!   (`startdate`/`enddate`); `unit_price`/`unit_cost` only with
//!   `overwrite_prices`; `name` (`item_shortdescription`) only with
//!   `overwrite_names`.
//! * usage line: `quantity`, `period_start`, `period_end` of the newest
//!   period of the (subscription, metric) in the snapshot: the worker keeps
//!   one line per (subscription, metric) showing the current period, so
//!   older periods are not compared. Its price comes from the item.
//! * overage line: `quantity` (0 when the overage is not positive),
//!   `unit_price` (always: the charge is the billing platform's), `active`.
//!   A non-positive overage with no line is in step (the worker creates
//!   none).
//!
//! Versions are context only (the snapshot's, and the applied one on the
//! link or line): an aggregate is in step when its state fields are.
//!
//! A line or licence is halosync's when it carries a marker
//! (`halosync.<kind>:<id>`) exactly: the workers retire a duplicate or a
//! moved line by appending text to its marker, and those are not counted.

use std::collections::{BTreeMap, BTreeSet};

use halosync_shared::contract::{AccountData, OverageData, SubscriptionData, UsageData, Version};
use halosync_shared::halo::lines::MARKER_FIELD;
use halosync_shared::halo::links::LICENCE_MARKER_FIELD;
use halosync_shared::halo::record_id;
use halosync_shared::Family;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::read::{HaloState, LinkRow, Scope};
use super::snapshot::{Entry, Snapshot};

/// The line field where the usage and overage workers keep the applied
/// version.
const LINE_VERSION_FIELD: &str = "item_external_reference";

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

/// The connection's policies that decide what counts as drift.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Policy {
    pub overwrite_prices: bool,
    pub overwrite_names: bool,
}

// ----- value helpers ---------------------------------------------------------

fn num(v: Option<&Value>) -> Option<f64> {
    match v? {
        Value::Number(n) => n.as_f64(),
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

/// Collects the fields of one record that differ.
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

    fn qty(&mut self, field: &str, want: f64, key: &str) {
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

    fn money(&mut self, field: &str, shown: &str, key: &str) {
        let want = shown.trim().parse::<f64>().unwrap_or(f64::NAN);
        if !money_eq(want, num(self.record.get(key))) {
            self.push(field, json!(shown), key);
        }
    }

    fn text(&mut self, field: &str, want: &str, key: &str) {
        if text(self.record.get(key)).as_deref() != Some(want.trim()) {
            self.push(field, json!(want), key);
        }
    }

    /// An ISO currency code against the `/Currency` id HaloPSA holds
    /// (`id`: that code's row; `None`: HaloPSA has no such currency, which
    /// is always a difference).
    fn currency(&mut self, code: &str, id: Option<i64>, key: &str) {
        let held = self.record.get(key).and_then(|v| match v {
            Value::Number(n) => n.as_i64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        });
        if id.is_none() || held != id {
            let shown = match id {
                Some(id) => json!(format!("{code} (currency {id})")),
                None => json!(format!("{code} (not set up in HaloPSA)")),
            };
            self.push("currency", shown, key);
        }
    }

    /// `active` against a HaloPSA flag that means `negated ? inactive : active`.
    fn active(&mut self, want: bool, key: &str, negated: bool) {
        let halo = flag(self.record.get(key)).map(|f| f != negated);
        if halo != Some(want) {
            self.out.push(FieldDiff {
                field: "active".into(),
                snapshot: json!(want),
                halo: halo.map_or(Value::Null, Value::Bool),
            });
        }
    }

    fn date(&mut self, field: &str, want: Option<&str>, key: &str) {
        let halo = day(self.record.get(key));
        if halo.as_deref() != want {
            self.out.push(FieldDiff {
                field: field.to_string(),
                snapshot: want.map_or(Value::Null, |d| json!(d)),
                halo: halo.map_or(Value::Null, Value::String),
            });
        }
    }
}

// ----- indexes ----------------------------------------------------------------

/// The billing id of an exact halosync marker (`<type>:<id>`), rejecting
/// retired markers (the workers append ` (… retired)`).
fn marked<'a>(value: Option<&'a Value>, third_party_type: &str) -> Option<&'a str> {
    let m = value?.as_str()?.trim();
    let id = m.strip_prefix(third_party_type)?.strip_prefix(':')?;
    (!id.is_empty() && !id.contains(char::is_whitespace)).then_some(id)
}

fn header_lines(header: &Value) -> impl Iterator<Item = &Value> {
    ["lines", "invoice_lines", "details"]
        .iter()
        .find_map(|k| header.get(*k).and_then(Value::as_array))
        .into_iter()
        .flatten()
}

/// Lines of the given headers carrying a marker of `third_party_type`:
/// billing id → lines (lowest id first).
fn lines_by_marker<'a>(
    headers: impl Iterator<Item = &'a Value>,
    third_party_type: &str,
) -> BTreeMap<String, Vec<&'a Value>> {
    let mut out: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for h in headers {
        for l in header_lines(h) {
            if let (Some(id), Some(_)) =
                (marked(l.get(MARKER_FIELD), third_party_type), record_id(l))
            {
                out.entry(id.to_string()).or_default().push(l);
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
        compare: impl Fn(&mut Fields),
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
        compare(&mut f);
        if !f.out.is_empty() {
            let mut d = drift(family, aggregate, DriftKind::Differs, record, Some(entry));
            d.halo_ids = record_id(first).into_iter().collect();
            d.applied_version = applied;
            d.detail = f
                .out
                .iter()
                .map(|x| x.field.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            d.fields = f.out;
            self.out.push(d);
        }
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
            // The event's ISO code against the customer's `/Currency` id.
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
                    if policy.overwrite_names {
                        f.text("name", &d.name, "name");
                    }
                    f.active(d.active, "inactive", true);
                    for (field, value, key) in [
                        ("website", &d.website, "website"),
                        ("tax_number", &d.tax_number, "tax_number"),
                        ("notes", &d.notes, "notes"),
                    ] {
                        if let Some(v) = value {
                            f.text(field, v, key);
                        }
                    }
                    if let Some((code, id)) = &currency {
                        f.currency(code, *id, "default_currency_code");
                    }
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
        let state = self.state;
        let prefix = "halosync.subscription";
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
            if let Some(sub) = marked(l.get(LICENCE_MARKER_FIELD), prefix) {
                licences.entry(sub.to_string()).or_default().insert(*id);
            }
        }
        let mut seen = BTreeSet::new();
        for e in entries {
            let Ok(d) = e.event.data_as::<SubscriptionData>() else {
                continue;
            };
            seen.insert(d.subscription_id.clone());
            // The line on the account's recurring invoice.
            let header = invoice_of(state, &d.account_id);
            let lines = header
                .map(|h| lines_by_marker(std::iter::once(h), prefix))
                .unwrap_or_default();
            let line_found: Vec<&Value> =
                lines.get(&d.subscription_id).cloned().unwrap_or_default();
            // The applied version: the link's, or the line's when newer (a
            // known subscription's update carries it on the line only).
            let on_link = links
                .get(d.subscription_id.as_str())
                .and_then(|v| v.iter().min_by_key(|l| (l.halo_id, l.link_id)))
                .and_then(|l| l.version.clone());
            let applied = on_link
                .iter()
                .cloned()
                .chain(line_found.iter().filter_map(|l| {
                    l.get("item_external_reference")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                }))
                .filter_map(|t| Version::decode(&t).map(|v| (v, t)))
                .max_by(|a, b| a.0.compare(&b.0))
                .map(|(_, t)| t)
                .or(on_link);
            let found: Vec<&Value> = licences
                .get(&d.subscription_id)
                .map(|ids| ids.iter().filter_map(|id| state.licences.get(id)).collect())
                .unwrap_or_default();
            let policy = self.policy;
            let active = d.status == "active";
            let quantity = d.quantity as f64;
            self.record(
                Family::Subscription,
                &d.subscription_id,
                e,
                "licence",
                &found,
                applied.clone(),
                "no licence carries this subscription",
                |f| {
                    f.qty("quantity", quantity, "count");
                    f.active(active, "is_active", false);
                    f.text("status", &d.status, "status");
                    f.text("billing_cycle", &d.billing_cycle, "billing_cycle");
                    f.text("sku", &d.product.sku, "product_sku");
                    f.date("start_date", Some(&d.start_date), "start_date");
                    f.date("end_date", d.end_date.as_deref(), "end_date");
                    if policy.overwrite_prices {
                        f.money("unit_price", &d.unit_price, "price");
                        if let Some(c) = &d.unit_cost {
                            f.money("unit_cost", c, "purchase_price");
                        }
                    }
                    if policy.overwrite_names {
                        f.text("name", &d.product.name, "name");
                    }
                },
            );
            let found = line_found;
            let detail = if header.is_some() {
                "no line of the account's recurring invoice carries this subscription"
            } else {
                "the account has no halosync recurring invoice, so no line"
            };
            self.record(
                Family::Subscription,
                &d.subscription_id,
                e,
                "recurring line",
                &found,
                applied,
                detail,
                |f| {
                    f.qty("quantity", quantity, "qty_order");
                    f.active(active, "isinactive", true);
                    f.date("start_date", Some(&d.start_date), "startdate");
                    f.date("end_date", d.end_date.as_deref(), "enddate");
                    if policy.overwrite_prices {
                        f.money("unit_price", &d.unit_price, "unit_price");
                        if let Some(c) = &d.unit_cost {
                            f.money("unit_cost", c, "unit_cost");
                        }
                    }
                    if policy.overwrite_names {
                        f.text("name", &d.product.name, "item_shortdescription");
                    }
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
        for (sub, lines) in lines_by_marker(headers.into_iter(), prefix) {
            if seen.contains(&sub) {
                continue;
            }
            self.orphan(Family::Subscription, &sub, "recurring line", ids(&lines), None,
                "a halosync recurring line whose subscription is not in the snapshot (never deleted)".into());
        }
    }

    fn usage(&mut self, entries: &[&Entry]) {
        let state = self.state;
        let prefix = "halosync.usage";
        // The newest period per (subscription, metric).
        let mut newest: BTreeMap<String, (&Entry, UsageData)> = BTreeMap::new();
        for e in entries {
            let Ok(d) = e.event.data_as::<UsageData>() else {
                continue;
            };
            let key = format!("{}:{}", d.subscription_id, d.metric);
            let newer = match newest.get(&key) {
                None => true,
                Some((k, kd)) => {
                    d.period_start > kd.period_start
                        || (d.period_start == kd.period_start
                            && !e.version.is_superseded_by(&k.version))
                }
            };
            if newer {
                newest.insert(key, (e, d));
            }
        }
        let mut seen = BTreeSet::new();
        for (key, (e, d)) in &newest {
            seen.insert(key.clone());
            let header = invoice_of(state, &d.account_id);
            let lines = header
                .map(|h| lines_by_marker(std::iter::once(h), prefix))
                .unwrap_or_default();
            let found: Vec<&Value> = lines.get(key).cloned().unwrap_or_default();
            let applied = found.first().and_then(|l| text(l.get(LINE_VERSION_FIELD)));
            let aggregate = format!("{key}:{}", d.period_start);
            self.record(
                Family::Usage,
                &aggregate,
                e,
                "usage line",
                &found,
                applied,
                "no line of the account's recurring invoice carries this usage",
                |f| {
                    f.qty("quantity", d.quantity, "qty_order");
                    f.date("period_start", Some(&d.period_start), "startdate");
                    f.date("period_end", Some(&d.period_end), "enddate");
                },
            );
        }
        let headers = our_headers(self.scope, state);
        for (key, lines) in lines_by_marker(headers.into_iter(), prefix) {
            if seen.contains(&key) {
                continue;
            }
            let applied = lines.first().and_then(|l| text(l.get(LINE_VERSION_FIELD)));
            self.orphan(Family::Usage, &key, "usage line", ids(&lines), applied,
                "a halosync usage line whose subscription and metric are not in the snapshot (never deleted)".into());
        }
    }

    fn overage(&mut self, entries: &[&Entry]) {
        let state = self.state;
        let prefix = "halosync.overage";
        let invoice_links = links_by_billing(&state.overage_invoice_links);
        let mut seen = BTreeSet::new();
        for e in entries {
            let Ok(d) = e.event.data_as::<OverageData>() else {
                continue;
            };
            let aggregate = format!("{}:{}:{}", d.subscription_id, d.metric, d.period_start);
            seen.insert(aggregate.clone());
            let zero = d.overage_quantity <= 0.0;
            let header = invoice_links
                .get(format!("{}:{}", d.account_id, d.period_start).as_str())
                .and_then(|v| {
                    v.iter()
                        .filter_map(|l| state.invoices.get(&l.halo_id))
                        .min_by_key(|h| record_id(h))
                });
            let lines = header
                .map(|h| lines_by_marker(std::iter::once(h), prefix))
                .unwrap_or_default();
            let found: Vec<&Value> = lines.get(&aggregate).cloned().unwrap_or_default();
            if found.is_empty() && zero {
                continue; // the worker writes no line for a zero overage
            }
            let applied = found.first().and_then(|l| text(l.get(LINE_VERSION_FIELD)));
            let quantity = if zero { 0.0 } else { d.overage_quantity };
            self.record(
                Family::Overage,
                &aggregate,
                e,
                "overage line",
                &found,
                applied,
                "no line of the period's halosync invoice carries this overage",
                |f| {
                    f.qty("quantity", quantity, "qty_order");
                    f.money("unit_price", &d.unit_price, "unit_price");
                    f.active(!zero, "isinactive", true);
                },
            );
        }
        for (aggregate, lines) in lines_by_marker(state.invoices.values(), prefix) {
            if seen.contains(&aggregate) {
                continue;
            }
            let applied = lines.first().and_then(|l| text(l.get(LINE_VERSION_FIELD)));
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
    use halosync_shared::Contract;

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

    /// HaloPSA exactly as the workers leave `ACC`, `SUB` and `USAGE_NEW`.
    fn in_step() -> HaloState {
        let mut s = HaloState {
            account_links: vec![link("acc_1", 7, 1)],
            subscription_links: vec![link("sub_1", 3, 2)],
            recurring_links: vec![link("acc_1", -1, 3)],
            ..Default::default()
        };
        s.clients.insert(
            7,
            json!({"id": 7, "name": "Contoso", "inactive": false, "default_currency_code": 2}),
        );
        s.currencies.insert("GBP".into(), 2);
        s.currencies.insert("USD".into(), 1);
        s.licences.insert(
            3,
            json!({"id": 3, "name": "M365", "count": 5, "is_active": true, "status": "active",
                   "billing_cycle": "monthly", "product_sku": "MS-365-BP", "price": 22.0,
                   "start_date": "2026-11-01T00:00:00", "end_date": "1899-12-30T00:00:00",
                   "thirdparty_client_id": "halosync.subscription:sub_1"}),
        );
        s.recurring.insert(
            -1,
            json!({"id": -1, "lines": [
                {"id": 10, "qty_order": 5.0, "isinactive": false, "startdate": "2026-11-01T00:00:00",
                 "unit_price": 22.0, "item_shortdescription": "M365",
                 "item_internal_reference": "halosync.subscription:sub_1"},
                {"id": 11, "qty_order": 7.5, "startdate": "2026-11-01T00:00:00", "enddate": "2026-11-30T00:00:00",
                 "item_internal_reference": "halosync.usage:sub_1:gb", "item_external_reference": "p=2026-11-01;s=1"},
                {"id": 12, "qty_order": 0.0, "isinactive": true,
                 "item_internal_reference": "halosync.subscription:sub_1 (duplicate of line 10, retired)"}
            ]}),
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
        let dup = json!({"id": 20, "qty_order": 5.0, "isinactive": false, "startdate": "2026-11-01",
                         "unit_price": 22.0, "item_shortdescription": "M365",
                         "item_internal_reference": "halosync.subscription:sub_1"});
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
        assert_eq!(d[1].applied_version.as_deref(), Some("s=1"));
        assert_eq!(d[1].event_id.as_deref(), Some("e2"));
        assert!(
            d[3].event_id.is_none(),
            "an orphan has no event to repair with"
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
        let s = snap(&[&OVER_ZERO.replace("\"overage_quantity\":0", "\"overage_quantity\":4")]);
        let mut h = HaloState {
            overage_invoice_links: vec![link("acc_1:2026-11-01", 5, 9)],
            ..Default::default()
        };
        h.invoices.insert(
            5,
            json!({"id": 5, "lines": [{"id": 40, "qty_order": 4.0, "unit_price": 0.75, "isinactive": false,
                   "item_internal_reference": "halosync.overage:sub_1:gb:2026-11-01"}]}),
        );
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
