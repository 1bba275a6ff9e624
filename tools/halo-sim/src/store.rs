//! The in-memory HaloPSA data: entities, list filters, POST (create/update)
//! semantics, lines, and ExternalLinks.
//!
//! Every element of a POST works on a clone of [`Data`] and only replaces the
//! original when it was valid, so each element (with its lines and
//! `new_external_link`) is saved atomically. A multi-element POST is not a
//! transaction (the hard reading of an UNCONFIRMED point): the elements before
//! a refused one stay saved, unless the fault `transactional_arrays` is set.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::Faults;

/// A stored record: a JSON object without its computed fields.
pub(crate) type Obj = Map<String, Value>;

/// Default page size / row count when neither `count` nor paging is given.
pub(crate) const DEFAULT_COUNT: usize = 50;

/// The entities the simulator serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Kind {
    Client,
    ExternalLink,
    Item,
    SoftwareLicence,
    RecurringInvoice,
    Invoice,
    Currency,
}

/// The currencies a new simulator (and a reset) starts with: code, name,
/// symbol; ids 1, 2, 3 in this order.
pub(crate) const SEED_CURRENCIES: [(&str, &str, &str); 3] = [
    ("USD", "US Dollar", "$"),
    ("GBP", "Pound Sterling", "£"),
    ("EUR", "Euro", "€"),
];

/// Permission areas (the login agent's role and the token's scopes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Area {
    Customers,
    Items,
    Software,
    Invoices,
}

impl Area {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Area::Customers => "customers",
            Area::Items => "items",
            Area::Software => "software",
            Area::Invoices => "invoices",
        }
    }

    /// Parses an area name as used in scopes and in the `deny` fault list.
    pub(crate) fn parse(s: &str) -> Option<Area> {
        match s.trim().to_ascii_lowercase().as_str() {
            "customers" | "customer" | "clients" | "client" => Some(Area::Customers),
            "items" | "item" => Some(Area::Items),
            "software" | "softwarelicensing" | "softwarelicence" | "licences" => {
                Some(Area::Software)
            }
            "invoices" | "invoice" => Some(Area::Invoices),
            _ => None,
        }
    }
}

impl Kind {
    pub(crate) fn from_segment(seg: &str) -> Option<Kind> {
        match seg.to_ascii_lowercase().as_str() {
            "client" => Some(Kind::Client),
            "externallink" => Some(Kind::ExternalLink),
            "item" => Some(Kind::Item),
            "softwarelicence" => Some(Kind::SoftwareLicence),
            "recurringinvoice" => Some(Kind::RecurringInvoice),
            "invoice" => Some(Kind::Invoice),
            "currency" => Some(Kind::Currency),
            _ => None,
        }
    }

    pub(crate) fn from_name(name: &str) -> Option<Kind> {
        Kind::from_segment(name)
    }

    /// Canonical (swagger) casing of the path segment.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Client => "Client",
            Kind::ExternalLink => "ExternalLink",
            Kind::Item => "Item",
            Kind::SoftwareLicence => "SoftwareLicence",
            Kind::RecurringInvoice => "RecurringInvoice",
            Kind::Invoice => "Invoice",
            Kind::Currency => "Currency",
        }
    }

    /// The list envelope key; `None` means the list is a bare JSON array.
    pub(crate) fn list_key(self) -> Option<&'static str> {
        match self {
            Kind::Client => Some("clients"),
            // The reference does not confirm the ExternalLink list shape; the
            // simulator deliberately answers a bare JSON array so that clients
            // are forced to handle both shapes.
            Kind::ExternalLink => None,
            Kind::Item => Some("items"),
            Kind::SoftwareLicence => Some("licences"),
            Kind::RecurringInvoice | Kind::Invoice => Some("invoices"),
            // The document gives no response bodies and no source shows
            // this list: a bare array, like ExternalLink, so that clients
            // handle both shapes.
            Kind::Currency => None,
        }
    }

    pub(crate) fn area(self) -> Area {
        match self {
            Kind::Client | Kind::ExternalLink => Area::Customers,
            Kind::Item => Area::Items,
            Kind::SoftwareLicence => Area::Software,
            Kind::RecurringInvoice | Kind::Invoice => Area::Invoices,
            // Which scope HaloPSA asks for /Currency is not documented; the
            // customers area, since writing a customer needs it.
            Kind::Currency => Area::Customers,
        }
    }

    /// `table_id` given to a `new_external_link` that does not name one.
    pub(crate) fn default_table_id(self) -> i64 {
        match self {
            Kind::Client => 2,
            Kind::Item => 8,
            Kind::RecurringInvoice | Kind::Invoice => 995,
            Kind::SoftwareLicence | Kind::ExternalLink | Kind::Currency => 0,
        }
    }

    pub(crate) fn has_lines(self) -> bool {
        matches!(self, Kind::RecurringInvoice | Kind::Invoice)
    }
}

/// An error answered to the client.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub status: u16,
    pub body: Value,
    /// The request saved some elements before this error (no transaction).
    pub partial: bool,
    /// The refused element's own work up to the refusal stays saved (lines
    /// of `add_lines` before a refused one).
    pub keep_element: bool,
}

impl ApiError {
    pub(crate) fn validation(message: impl Into<String>) -> ApiError {
        ApiError {
            status: 400,
            body: json!({"ClassName": "ValidationException", "Message": message.into()}),
            partial: false,
            keep_element: false,
        }
    }

    pub(crate) fn bad_request(class: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: 400,
            body: json!({"ClassName": class, "Message": message.into()}),
            partial: false,
            keep_element: false,
        }
    }

    pub(crate) fn not_found(kind: Kind, id: i64) -> ApiError {
        ApiError {
            status: 404,
            body: json!({
                "ClassName": "NotFoundException",
                "Message": format!("{} {} not found", kind.name(), id),
            }),
            partial: false,
            keep_element: false,
        }
    }
}

/// Lower-cased query parameters (Halo's query binding is case-insensitive).
#[derive(Debug, Default)]
pub(crate) struct Query(Vec<(String, String)>);

impl Query {
    pub(crate) fn parse(raw: Option<&str>) -> Query {
        let pairs: Vec<(String, String)> = raw
            .and_then(|q| serde_urlencoded::from_str(q).ok())
            .unwrap_or_default();
        Query(
            pairs
                .into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect(),
        )
    }

    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn bool(&self, key: &str) -> Option<bool> {
        self.get(key)
            .and_then(|v| match v.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" => Some(true),
                "false" | "0" | "no" => Some(false),
                _ => None,
            })
    }

    pub(crate) fn i64(&self, key: &str) -> Option<i64> {
        self.get(key).and_then(|v| v.trim().parse().ok())
    }
}

/// Reads an integer from a JSON number (integral) or a numeric string.
pub(crate) fn as_i64_loose(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
                .map(|f| f as i64)
        }),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Truthiness of a stored flag (bool, 0/1, "true"/"false").
fn as_bool_loose(v: Option<&Value>) -> Option<bool> {
    match v? {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => n.as_f64().map(|f| f != 0.0),
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" => Some(true),
            "false" | "0" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

fn value_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn str_field<'a>(obj: &'a Obj, key: &str) -> Option<&'a str> {
    obj.get(key).and_then(Value::as_str)
}

fn name_contains(obj: &Obj, needle: &str) -> bool {
    let needle = needle.trim().to_lowercase();
    needle.is_empty()
        || str_field(obj, "name")
            .map(|n| n.to_lowercase().contains(&needle))
            .unwrap_or(false)
}

/// Shallow merge of `patch` into `target` (an update "merges" fields).
fn merge(target: &mut Obj, patch: Obj) {
    for (k, v) in patch {
        target.insert(k, v);
    }
}

/// Which header table a line belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LineMode {
    /// `POST /X/Lines`: add; `ihid` required.
    Add,
    /// `POST /X/updatelines`: merge; `id` and `ihid` required.
    Update,
}

/// One table of records. A persistent map, so that the copy every POST
/// takes to stay atomic (see [`Data::post`]) costs O(1), not a copy of the
/// whole table: with thousands of records a `BTreeMap` clone per request
/// made the simulator, not the worker under test, the bottleneck.
type Table = imbl::OrdMap<i64, Obj>;

/// All simulated HaloPSA records.
#[derive(Clone, Debug, Default)]
pub(crate) struct Data {
    clients: Table,
    links: Table,
    items: Table,
    licences: Table,
    recurring: Table,
    invoices: Table,
    recurring_lines: Table,
    invoice_lines: Table,
    currencies: Table,
    /// Links created through `new_external_link`: link id -> owning record.
    link_owner: imbl::OrdMap<i64, (Kind, i64)>,
    next_client: i64,
    next_link: i64,
    next_item: i64,
    next_licence: i64,
    next_recurring: i64,
    next_invoice: i64,
    next_line: i64,
    next_currency: i64,
}

/// Allocates the next free id, counting up (or down when `step` is -1).
fn alloc(counter: &mut i64, table: &Table, step: i64) -> i64 {
    if *counter == 0 {
        *counter = step;
    }
    while table.contains_key(counter) {
        *counter += step;
    }
    let id = *counter;
    *counter += step;
    id
}

impl Data {
    pub(crate) fn new(items: &BTreeMap<i64, Obj>) -> Data {
        let mut data = Data {
            items: items.iter().map(|(k, v)| (*k, v.clone())).collect(),
            ..Data::default()
        };
        for (code, name, symbol) in SEED_CURRENCIES {
            let id = data.add_currency(code, name);
            if let Some(c) = data.currencies.get_mut(&id) {
                c.insert("symbol".into(), json!(symbol));
            }
        }
        data
    }

    /// Adds a `/Currency` row; returns its id.
    pub(crate) fn add_currency(&mut self, code: &str, name: &str) -> i64 {
        let mut obj = Obj::new();
        obj.insert("code".into(), json!(code));
        obj.insert("name".into(), json!(name));
        obj.insert("conversion_rate".into(), json!(1.0));
        let id = self.new_id(Kind::Currency);
        self.currencies.insert(id, obj);
        id
    }

    fn table(&self, kind: Kind) -> &Table {
        match kind {
            Kind::Client => &self.clients,
            Kind::ExternalLink => &self.links,
            Kind::Item => &self.items,
            Kind::SoftwareLicence => &self.licences,
            Kind::RecurringInvoice => &self.recurring,
            Kind::Invoice => &self.invoices,
            Kind::Currency => &self.currencies,
        }
    }

    fn table_mut(&mut self, kind: Kind) -> &mut Table {
        match kind {
            Kind::Client => &mut self.clients,
            Kind::ExternalLink => &mut self.links,
            Kind::Item => &mut self.items,
            Kind::SoftwareLicence => &mut self.licences,
            Kind::RecurringInvoice => &mut self.recurring,
            Kind::Invoice => &mut self.invoices,
            Kind::Currency => &mut self.currencies,
        }
    }

    fn lines(&self, kind: Kind) -> &Table {
        if kind == Kind::Invoice {
            &self.invoice_lines
        } else {
            &self.recurring_lines
        }
    }

    fn lines_mut(&mut self, kind: Kind) -> &mut Table {
        if kind == Kind::Invoice {
            &mut self.invoice_lines
        } else {
            &mut self.recurring_lines
        }
    }

    fn new_id(&mut self, kind: Kind) -> i64 {
        match kind {
            Kind::Client => alloc(&mut self.next_client, &self.clients, 1),
            Kind::ExternalLink => alloc(&mut self.next_link, &self.links, 1),
            Kind::Item => alloc(&mut self.next_item, &self.items, 1),
            Kind::SoftwareLicence => alloc(&mut self.next_licence, &self.licences, 1),
            // Recurring-invoice headers get negative ids, as in the real UAT
            // capture (reference §3.4): clients must not assume positive ids.
            Kind::RecurringInvoice => alloc(&mut self.next_recurring, &self.recurring, -1),
            Kind::Invoice => alloc(&mut self.next_invoice, &self.invoices, 1),
            Kind::Currency => alloc(&mut self.next_currency, &self.currencies, 1),
        }
    }

    fn new_line_id(&mut self) -> i64 {
        if self.next_line == 0 {
            self.next_line = 1;
        }
        while self.recurring_lines.contains_key(&self.next_line)
            || self.invoice_lines.contains_key(&self.next_line)
        {
            self.next_line += 1;
        }
        let id = self.next_line;
        self.next_line += 1;
        id
    }

    /// Records in listing order (creation order).
    fn ordered(&self, kind: Kind) -> Vec<(i64, &Obj)> {
        let table = self.table(kind);
        if kind == Kind::RecurringInvoice {
            table.iter().rev().map(|(k, v)| (*k, v)).collect()
        } else {
            table.iter().map(|(k, v)| (*k, v)).collect()
        }
    }

    // ----- rendering -------------------------------------------------------

    fn links_of(&self, kind: Kind, id: i64) -> Vec<Value> {
        self.links
            .iter()
            .filter(|(link_id, link)| match self.link_owner.get(*link_id) {
                Some(owner) => *owner == (kind, id),
                None => {
                    link.get("halo_id").and_then(as_i64_loose) == Some(id)
                        && link.get("table_id").and_then(as_i64_loose)
                            == Some(kind.default_table_id())
                }
            })
            .map(|(link_id, link)| self.render_link(*link_id, link))
            .collect()
    }

    fn render_link(&self, id: i64, link: &Obj) -> Value {
        let mut out = link.clone();
        out.insert("id".into(), json!(id));
        Value::Object(out)
    }

    fn lines_of(&self, kind: Kind, header: i64) -> Vec<(i64, &Obj)> {
        let mut lines: Vec<(i64, &Obj)> = self
            .lines(kind)
            .iter()
            .filter(|(_, l)| l.get("ihid").and_then(as_i64_loose) == Some(header))
            .map(|(k, v)| (*k, v))
            .collect();
        lines.sort_by_key(|(id, l)| (l.get("sequenceid").and_then(as_i64_loose), *id));
        lines
    }

    fn render_line(&self, id: i64, line: &Obj) -> Value {
        let mut out = line.clone();
        out.insert("id".into(), json!(id));
        Value::Object(out)
    }

    /// Renders a record with its computed fields (`id`, `external_links`,
    /// `client_name`, and `lines`/`total` for invoices when `with_lines`).
    fn render(&self, kind: Kind, id: i64, obj: &Obj, with_lines: bool) -> Value {
        if matches!(kind, Kind::ExternalLink | Kind::Currency) {
            return self.render_link(id, obj);
        }
        let mut out = obj.clone();
        if kind == Kind::Item {
            // The Item model has no active flag (the list's
            // `includeinactive`/`includeactive` parameters select by it):
            // the simulator keeps it in `inactive`, set by seeding or an
            // MSP's edit, and never shows it.
            out.remove("inactive");
        }
        out.insert("id".into(), json!(id));
        out.insert(
            "external_links".into(),
            Value::Array(self.links_of(kind, id)),
        );
        if matches!(
            kind,
            Kind::SoftwareLicence | Kind::RecurringInvoice | Kind::Invoice
        ) {
            if let Some(client) = obj
                .get("client_id")
                .and_then(as_i64_loose)
                .and_then(|c| self.clients.get(&c))
            {
                if let Some(name) = client.get("name") {
                    out.insert("client_name".into(), name.clone());
                }
            }
        }
        if kind.has_lines() {
            let lines = self.lines_of(kind, id);
            let total: f64 = lines
                .iter()
                .filter(|(_, l)| as_bool_loose(l.get("isinactive")) != Some(true))
                .map(|(_, l)| {
                    let qty = l.get("qty_order").and_then(Value::as_f64).unwrap_or(0.0);
                    let price = l.get("unit_price").and_then(Value::as_f64).unwrap_or(0.0);
                    qty * price
                })
                .sum();
            out.insert("total".into(), json!(total));
            if with_lines {
                let rendered: Vec<Value> = lines
                    .iter()
                    .map(|(lid, l)| self.render_line(*lid, l))
                    .collect();
                out.insert("lines".into(), Value::Array(rendered));
            }
        }
        Value::Object(out)
    }

    /// Every record of a kind, rendered (with lines for invoices).
    pub(crate) fn all(&self, kind: Kind) -> Vec<Value> {
        self.ordered(kind)
            .into_iter()
            .map(|(id, obj)| self.render(kind, id, obj, true))
            .collect()
    }

    pub(crate) fn snapshot(&self) -> Value {
        json!({
            "clients": self.all(Kind::Client),
            "external_links": self.all(Kind::ExternalLink),
            "items": self.all(Kind::Item),
            "licences": self.all(Kind::SoftwareLicence),
            "recurring_invoices": self.all(Kind::RecurringInvoice),
            "invoices": self.all(Kind::Invoice),
        })
    }

    // ----- reads -----------------------------------------------------------

    fn matches(&self, kind: Kind, obj: &Obj, q: &Query) -> bool {
        let flag = |key: &str| as_bool_loose(obj.get(key));
        let int_eq = |param: &str, field: &str| match q.get(param) {
            None => true,
            Some(v) => match v.trim().parse::<i64>() {
                Ok(want) => obj.get(field).and_then(as_i64_loose) == Some(want),
                // An unparsable filter value matches nothing.
                Err(_) => false,
            },
        };
        match kind {
            Kind::Client => {
                let inactive = flag("inactive").unwrap_or(false);
                let include_inactive = q.bool("includeinactive").unwrap_or(false);
                let include_active = q.bool("includeactive").unwrap_or(true);
                let status_ok = if inactive {
                    include_inactive
                } else {
                    include_active
                };
                status_ok
                    && q.get("search").is_none_or(|s| name_contains(obj, s))
                    && int_eq("toplevel_id", "toplevel_id")
            }
            Kind::ExternalLink => {
                let text_eq = |key: &str| match q.get(key) {
                    None => true,
                    Some(want) => obj.get(key).and_then(value_text).as_deref() == Some(want),
                };
                text_eq("third_party_id")
                    && text_eq("third_party_type")
                    && text_eq("third_party_desc")
                    && text_eq("third_party_secondary_id")
                    && int_eq("halo_id", "halo_id")
                    && int_eq("table_id", "table_id")
            }
            Kind::Item => {
                let inactive = flag("inactive").unwrap_or(false);
                let status_ok = if inactive {
                    q.bool("includeinactive").unwrap_or(false)
                } else {
                    q.bool("includeactive").unwrap_or(true)
                };
                status_ok && q.get("search").is_none_or(|s| name_contains(obj, s))
            }
            Kind::SoftwareLicence => {
                let hidden = flag("is_active") == Some(false) || flag("deleted") == Some(true);
                (!hidden || q.bool("includeinactive").unwrap_or(false))
                    && int_eq("client_id", "client_id")
                    && q.get("tenant_id").is_none_or(|t| {
                        obj.get("tenant_id").and_then(value_text).as_deref() == Some(t)
                    })
                    && q.get("search").is_none_or(|s| name_contains(obj, s))
            }
            Kind::RecurringInvoice | Kind::Invoice => int_eq("client_id", "client_id"),
            Kind::Currency => true,
        }
    }

    /// `GET /X`: filters, `count` (default 50) or `pageinate` paging, envelope.
    pub(crate) fn list(&self, kind: Kind, q: &Query) -> Value {
        let with_lines = kind.has_lines() && q.bool("includelines").unwrap_or(false);
        let matching: Vec<(i64, &Obj)> = self
            .ordered(kind)
            .into_iter()
            .filter(|(_, obj)| self.matches(kind, obj, q))
            .collect();
        let total = matching.len();
        let (skip, take) = if q.bool("pageinate").unwrap_or(false) {
            let size = q
                .i64("page_size")
                .filter(|s| *s > 0)
                .map_or(DEFAULT_COUNT, |s| usize::try_from(s).unwrap_or(usize::MAX));
            let page = q
                .i64("page_no")
                .filter(|p| *p > 0)
                .map_or(1, |p| usize::try_from(p).unwrap_or(usize::MAX));
            (page.saturating_sub(1).saturating_mul(size), size)
        } else {
            let count = q
                .i64("count")
                .filter(|c| *c > 0)
                .map_or(DEFAULT_COUNT, |c| usize::try_from(c).unwrap_or(usize::MAX));
            (0, count)
        };
        let rows: Vec<Value> = matching
            .into_iter()
            .skip(skip)
            .take(take)
            .map(|(id, obj)| self.render(kind, id, obj, with_lines))
            .collect();
        match kind.list_key() {
            Some(key) => {
                let mut env = Map::new();
                env.insert("record_count".into(), json!(total));
                env.insert(key.into(), Value::Array(rows));
                Value::Object(env)
            }
            None => Value::Array(rows),
        }
    }

    /// `GET /X/{id}`; invoice lines only with `includedetails=true`.
    pub(crate) fn get(&self, kind: Kind, id: i64, q: &Query) -> Result<Value, ApiError> {
        let obj = self
            .table(kind)
            .get(&id)
            .ok_or_else(|| ApiError::not_found(kind, id))?;
        let with_lines = q.bool("includedetails").unwrap_or(false);
        Ok(self.render(kind, id, obj, with_lines))
    }

    // ----- deletes ---------------------------------------------------------

    pub(crate) fn delete(&mut self, kind: Kind, id: i64) -> Result<Value, ApiError> {
        if self.table_mut(kind).remove(&id).is_none() {
            return Err(ApiError::not_found(kind, id));
        }
        if kind.has_lines() {
            let kept: Table = self
                .lines(kind)
                .iter()
                .filter(|(_, l)| l.get("ihid").and_then(as_i64_loose) != Some(id))
                .map(|(k, l)| (*k, l.clone()))
                .collect();
            *self.lines_mut(kind) = kept;
        }
        if kind == Kind::ExternalLink {
            self.link_owner.remove(&id);
        }
        Ok(json!({ "id": id }))
    }

    // ----- test / control helpers -------------------------------------------

    pub(crate) fn insert_item(&mut self, id: i64, obj: Obj) {
        self.items.insert(id, obj);
    }

    /// Merges `patch` into a record without validation (an MSP edit in the UI).
    pub(crate) fn patch(&mut self, entity: &str, id: i64, patch: Value) -> bool {
        let Value::Object(mut patch) = patch else {
            return false;
        };
        patch.remove("id");
        let target = match entity.to_ascii_lowercase().as_str() {
            "recurringinvoiceline" => self.recurring_lines.get_mut(&id),
            "invoiceline" => self.invoice_lines.get_mut(&id),
            other => match Kind::from_name(other) {
                Some(kind) => self.table_mut(kind).get_mut(&id),
                None => None,
            },
        };
        match target {
            Some(obj) => {
                merge(obj, patch);
                true
            }
            None => false,
        }
    }

    /// Inserts a record without validation (seeding a large tenant fast, or
    /// a record an MSP made in the UI). `entity` as for [`Data::patch`];
    /// returns the new id.
    pub(crate) fn insert(&mut self, entity: &str, obj: Value) -> Option<i64> {
        let Value::Object(mut obj) = obj else {
            return None;
        };
        obj.remove("id");
        let kind = Kind::from_name(entity)?;
        let id = self.new_id(kind);
        self.table_mut(kind).insert(id, obj);
        Some(id)
    }

    /// Inserts a line on header `ihid` without validation, as an MSP adding
    /// it in the UI would (`RecurringInvoiceLine` or `InvoiceLine`).
    pub(crate) fn insert_line(&mut self, entity: &str, ihid: i64, obj: Value) -> Option<i64> {
        let Value::Object(mut obj) = obj else {
            return None;
        };
        let kind = match entity.to_ascii_lowercase().as_str() {
            "recurringinvoiceline" => Kind::RecurringInvoice,
            "invoiceline" => Kind::Invoice,
            _ => return None,
        };
        if !self.table(kind).contains_key(&ihid) {
            return None;
        }
        obj.remove("id");
        obj.insert("ihid".into(), json!(ihid));
        let id = self.new_line_id();
        self.lines_mut(kind).insert(id, obj);
        Some(id)
    }

    /// Removes an invoice line, as an MSP deleting it in the UI would
    /// (`RecurringInvoiceLine` or `InvoiceLine`). The API has no line
    /// delete (reference), so this is a control only.
    pub(crate) fn remove_line(&mut self, entity: &str, id: i64) -> bool {
        match entity.to_ascii_lowercase().as_str() {
            "recurringinvoiceline" => self.recurring_lines.remove(&id).is_some(),
            "invoiceline" => self.invoice_lines.remove(&id).is_some(),
            _ => false,
        }
    }

    // ----- writes ----------------------------------------------------------

    /// `POST /X`: the body must be an array. Elements are saved in order,
    /// each atomically; the first refused one ends the request (see the
    /// module doc for what stays saved).
    pub(crate) fn post(
        &mut self,
        kind: Kind,
        body: Value,
        faults: &Faults,
    ) -> Result<Value, ApiError> {
        let elements = body_array(body)?;
        let all_or_nothing = faults.transactional_arrays;
        let original = self.clone();
        let mut saved = Vec::with_capacity(elements.len());
        for (idx, el) in elements.into_iter().enumerate() {
            let step = match el {
                Value::Object(obj) => {
                    let mut work = self.clone();
                    match work.save(kind, idx, obj, faults) {
                        Ok(id) => Ok((work, id)),
                        Err(e) if e.keep_element => {
                            *self = work;
                            Err(e)
                        }
                        Err(e) => Err(e),
                    }
                }
                _ => Err(ApiError::validation(format!(
                    "Element [{idx}] must be a JSON object"
                ))),
            };
            match step {
                Ok((work, id)) => {
                    *self = work;
                    saved.push(id);
                }
                Err(e) => return Err(self.refuse(original, idx, all_or_nothing, e)),
            }
        }
        let mut out: Vec<Value> = saved
            .into_iter()
            .filter_map(|id| {
                self.table(kind)
                    .get(&id)
                    .map(|obj| self.render(kind, id, obj, true))
            })
            .collect();
        if out.len() == 1 {
            Ok(out.remove(0))
        } else {
            Ok(Value::Array(out))
        }
    }

    /// Ends a POST at refused element `idx`: rolls back to `original` when
    /// arrays are transactional, else keeps what was saved and marks the
    /// error partial when something was.
    fn refuse(
        &mut self,
        original: Data,
        idx: usize,
        all_or_nothing: bool,
        mut err: ApiError,
    ) -> ApiError {
        if all_or_nothing {
            *self = original;
        } else if idx > 0 {
            err.partial = true;
        }
        err
    }

    /// `POST /X/Lines` (add) and `POST /X/updatelines` (merge): lines are
    /// saved in order, like [`Data::post`].
    pub(crate) fn post_lines(
        &mut self,
        kind: Kind,
        update: bool,
        body: Value,
        faults: &Faults,
    ) -> Result<Value, ApiError> {
        let elements = body_array(body)?;
        let mode = if update {
            LineMode::Update
        } else {
            LineMode::Add
        };
        let all_or_nothing = faults.transactional_arrays;
        let original = self.clone();
        let mut saved = Vec::with_capacity(elements.len());
        for (idx, el) in elements.into_iter().enumerate() {
            let step = match el {
                Value::Object(obj) => self.line_step(kind, idx, obj, mode, faults),
                _ => Err(ApiError::validation(format!(
                    "Line [{idx}] must be a JSON object"
                ))),
            };
            match step {
                Ok(id) => saved.push(id),
                Err(e) => return Err(self.refuse(original, idx, all_or_nothing, e)),
            }
        }
        let out: Vec<Value> = saved
            .into_iter()
            .filter_map(|id| self.lines(kind).get(&id).map(|l| self.render_line(id, l)))
            .collect();
        Ok(Value::Array(out))
    }

    /// Saves one line of a `/Lines` or `/updatelines` POST (all or nothing).
    fn line_step(
        &mut self,
        kind: Kind,
        idx: usize,
        obj: Obj,
        mode: LineMode,
        faults: &Faults,
    ) -> Result<i64, ApiError> {
        let ihid = match obj.get("ihid").and_then(as_i64_loose) {
            Some(h) if h != 0 => h,
            _ => {
                return Err(line_error(
                    idx,
                    &obj,
                    "ihid (the invoice header id) is required",
                ))
            }
        };
        if !self.table(kind).contains_key(&ihid) {
            return Err(line_error(
                idx,
                &obj,
                &format!("{} {ihid} does not exist", kind.name()),
            ));
        }
        let mut work = self.clone();
        let id = work.save_line(kind, idx, ihid, obj, mode, faults)?;
        *self = work;
        Ok(id)
    }

    fn check_rejected(&self, idx: usize, obj: &Obj, faults: &Faults) -> Result<(), ApiError> {
        if let Some(name) = str_field(obj, "name") {
            if faults.reject_names.iter().any(|r| r == name) {
                return Err(ApiError::validation(format!(
                    "Element [{idx}] ({name}): the name '{name}' was rejected by validation"
                )));
            }
        }
        Ok(())
    }

    fn require_client(&self, idx: usize, obj: &Obj, required: bool) -> Result<(), ApiError> {
        match obj.get("client_id") {
            None if !required => Ok(()),
            None | Some(Value::Null) => Err(ApiError::validation(format!(
                "Element [{idx}]: client_id is required"
            ))),
            Some(v) => match as_i64_loose(v) {
                Some(c) if self.clients.contains_key(&c) => Ok(()),
                _ => Err(ApiError::validation(format!(
                    "Element [{idx}]: client_id {v} is not a valid customer"
                ))),
            },
        }
    }

    /// Creates or updates one record; returns its id.
    fn save(
        &mut self,
        kind: Kind,
        idx: usize,
        mut obj: Obj,
        faults: &Faults,
    ) -> Result<i64, ApiError> {
        let new_link = obj.remove("new_external_link");
        // Computed on read; never stored.
        obj.remove("external_links");
        obj.remove("client_name");
        obj.remove("total");
        let (lines, add_lines) = if kind.has_lines() {
            (obj.remove("lines"), obj.remove("add_lines"))
        } else {
            (None, None)
        };
        let given_id = obj.remove("id").map(|v| (as_i64_loose(&v), v));
        let update_id = match given_id {
            None | Some((_, Value::Null)) => None,
            Some((Some(id), _)) if kind == Kind::RecurringInvoice && id != 0 => Some(id),
            Some((Some(id), _)) if id > 0 => Some(id),
            Some((Some(_), _)) => None,
            Some((None, v)) => {
                return Err(ApiError::validation(format!(
                    "Element [{idx}]: id {v} is not a valid id"
                )))
            }
        };
        self.check_rejected(idx, &obj, faults)?;
        if let Some(name) = obj.get("name") {
            if !matches!(name, Value::String(s) if !s.trim().is_empty())
                && kind != Kind::ExternalLink
            {
                return Err(ApiError::validation(format!(
                    "Element [{idx}]: name must be a non-empty string"
                )));
            }
        }

        // Kind-specific validation.
        let creating = update_id.is_none();
        match kind {
            Kind::Client | Kind::Item => {
                if creating && !obj.contains_key("name") {
                    return Err(ApiError::validation(format!(
                        "Element [{idx}]: name is required"
                    )));
                }
            }
            Kind::ExternalLink => {
                if creating {
                    if obj.get("halo_id").and_then(as_i64_loose).is_none() {
                        return Err(ApiError::validation(format!(
                            "Element [{idx}]: halo_id is required"
                        )));
                    }
                    if obj.get("third_party_id").and_then(value_text).is_none() {
                        return Err(ApiError::validation(format!(
                            "Element [{idx}]: third_party_id is required"
                        )));
                    }
                }
            }
            Kind::SoftwareLicence => {
                self.require_client(idx, &obj, creating)?;
                if creating && !obj.contains_key("name") {
                    return Err(ApiError::validation(format!(
                        "Element [{idx}]: name is required"
                    )));
                }
                if let Some(count) = obj.get("count") {
                    if !count.is_number() || as_i64_loose(count).is_none() {
                        return Err(ApiError::validation(format!(
                            "Element [{idx}]: count must be an integer, got {count}"
                        )));
                    }
                }
            }
            Kind::RecurringInvoice | Kind::Invoice => {
                self.require_client(idx, &obj, creating)?;
            }
            Kind::Currency => {}
        }

        let id = match update_id {
            Some(id) => {
                let record = self.table_mut(kind).get_mut(&id).ok_or_else(|| {
                    ApiError::validation(format!(
                        "Element [{idx}]: {} with id {id} does not exist",
                        kind.name()
                    ))
                })?;
                merge(record, obj);
                id
            }
            None => {
                match kind {
                    Kind::Client => {
                        obj.entry("inactive").or_insert(json!(false));
                    }
                    Kind::SoftwareLicence => {
                        obj.entry("is_active").or_insert(json!(true));
                        obj.entry("count").or_insert(json!(0));
                    }
                    Kind::ExternalLink => {
                        obj.entry("table_id").or_insert(json!(0));
                    }
                    _ => {}
                }
                let id = self.new_id(kind);
                self.table_mut(kind).insert(id, obj);
                id
            }
        };

        if let Some(lines) = lines {
            let Value::Array(lines) = lines else {
                return Err(ApiError::validation(format!(
                    "Element [{idx}]: lines must be an array"
                )));
            };
            for (lidx, line) in lines.into_iter().enumerate() {
                let Value::Object(line) = line else {
                    return Err(ApiError::validation(format!(
                        "Element [{idx}] line [{lidx}] must be a JSON object"
                    )));
                };
                // Lines with an id (of this header) are merged, lines without
                // one are added; lines not mentioned are kept.
                let mode = if line.get("id").and_then(as_i64_loose).is_some_and(|l| l > 0) {
                    LineMode::Update
                } else {
                    LineMode::Add
                };
                self.save_line(kind, lidx, id, line, mode, faults)?;
            }
        }

        // `add_lines`: every line is added to the header (new or existing),
        // an `id` on one is ignored. The document names the property and
        // nothing more, so the hard reading is taken, as for arrays: lines
        // are saved one by one, and those before a refused line stay saved
        // (the request still fails) unless `transactional_arrays`.
        if let Some(add) = add_lines {
            let Value::Array(add) = add else {
                return Err(ApiError::validation(format!(
                    "Element [{idx}]: add_lines must be an array"
                )));
            };
            for (lidx, line) in add.into_iter().enumerate() {
                let Value::Object(line) = line else {
                    return Err(ApiError::validation(format!(
                        "Element [{idx}] add_lines [{lidx}] must be a JSON object"
                    )));
                };
                if let Err(mut e) = self.save_line(kind, lidx, id, line, LineMode::Add, faults) {
                    if lidx > 0 && !faults.transactional_arrays {
                        e.partial = true;
                        e.keep_element = true;
                    }
                    return Err(e);
                }
            }
        }

        if let Some(link) = new_link {
            match link {
                Value::Null => {}
                Value::Object(link) => self.create_owned_link(kind, idx, id, link)?,
                _ => {
                    return Err(ApiError::validation(format!(
                        "Element [{idx}]: new_external_link must be an object"
                    )))
                }
            }
        }
        Ok(id)
    }

    fn create_owned_link(
        &mut self,
        kind: Kind,
        idx: usize,
        halo_id: i64,
        link: Obj,
    ) -> Result<(), ApiError> {
        let Some(tp_id) = link.get("third_party_id").and_then(value_text) else {
            return Err(ApiError::validation(format!(
                "Element [{idx}]: new_external_link.third_party_id is required"
            )));
        };
        let mut stored = Obj::new();
        stored.insert("halo_id".into(), json!(halo_id));
        let table_id = link
            .get("table_id")
            .and_then(as_i64_loose)
            .unwrap_or_else(|| kind.default_table_id());
        stored.insert("table_id".into(), json!(table_id));
        stored.insert("third_party_id".into(), json!(tp_id));
        for key in [
            "third_party_type",
            "third_party_desc",
            "third_party_secondary_id",
            "module_id",
            "details_id",
        ] {
            if let Some(v) = link.get(key) {
                stored.insert(key.into(), v.clone());
            }
        }
        let link_id = self.new_id(Kind::ExternalLink);
        self.links.insert(link_id, stored);
        self.link_owner.insert(link_id, (kind, halo_id));
        Ok(())
    }

    /// Adds or merges one invoice line of header `ihid`; returns the line id.
    fn save_line(
        &mut self,
        kind: Kind,
        idx: usize,
        ihid: i64,
        mut line: Obj,
        mode: LineMode,
        faults: &Faults,
    ) -> Result<i64, ApiError> {
        if let Some(desc) = str_field(&line, "item_shortdescription") {
            if faults.reject_names.iter().any(|r| r == desc) {
                return Err(line_error(
                    idx,
                    &line,
                    &format!("the description '{desc}' was rejected by validation"),
                ));
            }
        }
        let item_id = match line.get("_itemid") {
            None | Some(Value::Null) => None,
            Some(v) => match as_i64_loose(v) {
                Some(i) => Some(i),
                None => {
                    return Err(line_error(
                        idx,
                        &line,
                        &format!("_itemid {v} is not an integer"),
                    ))
                }
            },
        };
        if let Some(item) = item_id.filter(|i| *i > 0) {
            if !self.items.contains_key(&item) {
                return Err(line_error(
                    idx,
                    &line,
                    &format!("_itemid {item} is not an existing Item"),
                ));
            }
        }
        for key in ["qty_order", "unit_price", "unit_cost"] {
            if let Some(v) = line.get(key) {
                if !v.is_number() {
                    return Err(line_error(
                        idx,
                        &line,
                        &format!("{key} must be a number, got {v}"),
                    ));
                }
            }
        }
        match mode {
            LineMode::Update => {
                let Some(line_id) = line.get("id").and_then(as_i64_loose).filter(|l| *l > 0) else {
                    return Err(line_error(idx, &line, "id (the line id) is required"));
                };
                let Some(existing) = self.lines(kind).get(&line_id) else {
                    return Err(line_error(
                        idx,
                        &line,
                        &format!("line {line_id} does not exist"),
                    ));
                };
                let owner = existing.get("ihid").and_then(as_i64_loose);
                if owner != Some(ihid) {
                    return Err(line_error(
                        idx,
                        &line,
                        &format!("line {line_id} does not belong to invoice {ihid}"),
                    ));
                }
                line.remove("id");
                line.insert("ihid".into(), json!(ihid));
                if let Some(existing) = self.lines_mut(kind).get_mut(&line_id) {
                    merge(existing, line);
                }
                Ok(line_id)
            }
            LineMode::Add => {
                line.remove("id");
                line.insert("ihid".into(), json!(ihid));
                line.entry("isinactive").or_insert(json!(false));
                if !line.contains_key("sequenceid") {
                    let next = self
                        .lines_of(kind, ihid)
                        .iter()
                        .filter_map(|(_, l)| l.get("sequenceid").and_then(as_i64_loose))
                        .max()
                        .unwrap_or(0)
                        + 1;
                    line.insert("sequenceid".into(), json!(next));
                }
                if !line.contains_key("item_shortdescription") {
                    if let Some(name) = item_id
                        .and_then(|i| self.items.get(&i))
                        .and_then(|item| item.get("name"))
                    {
                        line.insert("item_shortdescription".into(), name.clone());
                    }
                }
                let line_id = self.new_line_id();
                self.lines_mut(kind).insert(line_id, line);
                Ok(line_id)
            }
        }
    }
}

fn body_array(body: Value) -> Result<Vec<Value>, ApiError> {
    match body {
        Value::Array(a) => Ok(a),
        _ => Err(ApiError::bad_request(
            "JsonSerializationException",
            "The request body must be a JSON array of objects",
        )),
    }
}

fn line_error(idx: usize, line: &Obj, reason: &str) -> ApiError {
    match str_field(line, "item_shortdescription") {
        Some(desc) => ApiError::validation(format!("Line [{idx}] ('{desc}'): {reason}")),
        None => ApiError::validation(format!("Line [{idx}]: {reason}")),
    }
}
