//! Reading a connection's halosync-managed records from HaloPSA in bulk:
//! one paged list per kind (`pageinate=true&page_size=100`, so at most one
//! request per 100 records), through the shared [`HaloClient`], whose Redis
//! rate limiter the workers share: a reconcile spends the same budget as
//! they do and never pushes the connection into a 429.
//!
//! | kind | request |
//! |---|---|
//! | identities | `GET /ExternalLink?third_party_type=halosync.<kind>` (account, subscription, recurring_invoice, overage_invoice) |
//! | customers | `GET /Client?includeinactive=true` (inactive customers are halosync's too) |
//! | licences | `GET /SoftwareLicence?includeinactive=true` |
//! | recurring invoices | `GET /RecurringInvoice?includelines=true` (subscription and usage lines) |
//! | one-off invoices | `GET /Invoice?includelines=true` (overage charges) |
//!
//! Lines in a list: the reference (§3.4) says `includelines` is "needed to
//! get lines in a list". Whether every HaloPSA build honours it is not
//! confirmed, and an unknown parameter is silently ignored, so the robust
//! reading is taken: a header of ours that comes back without any `lines`
//! key is read again on its own (`GET /{kind}/{id}?includedetails=true`,
//! reference §2), one request per such header. A header with `lines: []`
//! really has no lines.
//!
//! With `--account`, the customer is found first through its link (one
//! request) and the lists are filtered by `client_id`; rows are checked
//! again here, since HaloPSA ignores filters it does not know.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{IsTerminal, Write};
use std::time::Duration;

use halosync_shared::halo::client::{list_rows, PAGE_SIZE};
use halosync_shared::halo::links::{
    Kind, CUSTOMER, OVERAGE_INVOICE, RECURRING_INVOICE, SUBSCRIPTION,
};
use halosync_shared::halo::{first_record, record_id, HaloClient, HaloError};
use halosync_shared::Family;
use serde_json::Value;

/// Never loop more than this many pages of one list (an endpoint that
/// ignores `page_no` would otherwise be read forever).
const MAX_PAGES: usize = 1000;
/// Waits for the budget (ours or HaloPSA's 429) before giving up.
const BUDGET_RETRIES: u32 = 6;

/// What a reconcile looks at.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Scope {
    pub families: BTreeSet<Family>,
    /// One customer: its account and the subscriptions, usage and overage
    /// of that account.
    pub account: Option<String>,
}

impl Scope {
    pub fn has(&self, f: Family) -> bool {
        self.families.contains(&f)
    }
}

/// One ExternalLink of a halosync kind.
#[derive(Clone, Debug, PartialEq)]
pub struct LinkRow {
    pub billing_id: String,
    pub halo_id: i64,
    pub link_id: i64,
    /// `third_party_secondary_id`: the applied version, as stored.
    pub version: Option<String>,
}

/// HaloPSA's state, as far as the scope needs it.
#[derive(Clone, Debug, Default)]
pub struct HaloState {
    pub account_links: Vec<LinkRow>,
    pub subscription_links: Vec<LinkRow>,
    pub recurring_links: Vec<LinkRow>,
    pub overage_invoice_links: Vec<LinkRow>,
    pub clients: BTreeMap<i64, Value>,
    pub licences: BTreeMap<i64, Value>,
    /// Recurring-invoice headers with their `lines`.
    pub recurring: BTreeMap<i64, Value>,
    /// One-off invoice headers with their `lines`.
    pub invoices: BTreeMap<i64, Value>,
    /// HaloPSA's `/Currency` ids by ISO code (customers hold the id).
    pub currencies: BTreeMap<String, i64>,
    /// With `--account`: the account's customer (None: it has none).
    pub scoped_customer: Option<i64>,
    /// Requests made.
    pub requests: usize,
}

/// Progress on stderr, only when it is a terminal (a CronJob's log gets
/// the report, not a stream of carriage returns).
pub struct Progress {
    tty: bool,
    requests: usize,
}

impl Progress {
    pub fn new() -> Progress {
        Progress {
            tty: std::io::stderr().is_terminal(),
            requests: 0,
        }
    }

    fn page(&mut self, what: &str, rows: usize) {
        self.requests += 1;
        if self.tty {
            let mut err = std::io::stderr();
            let _ = write!(
                err,
                "\rreading HaloPSA: {what}, {rows} records ({} requests)   ",
                self.requests
            );
            let _ = err.flush();
        }
    }

    pub fn done(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new()
    }
}

/// One GET, waiting for the shared budget when it is spent (the operator
/// asked for the read; the workers' share is respected by the limiter).
async fn get(halo: &HaloClient, path: &str, query: &[(&str, String)]) -> Result<Value, HaloError> {
    let mut tries = 0;
    loop {
        match halo.get(path, query).await {
            Err(HaloError::BudgetExhausted(_)) if tries < BUDGET_RETRIES => {
                tries += 1;
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(HaloError::RateLimited { retry_after, .. }) if tries < BUDGET_RETRIES => {
                tries += 1;
                // The client has already paused the connection for every
                // process; wait at least as long before asking again.
                tokio::time::sleep(retry_after.unwrap_or(Duration::from_secs(30))).await;
            }
            other => return other,
        }
    }
}

/// Every row of a list, paged. The same rules as `HaloClient::list` (stop
/// at `record_count`, at a short page without one, or at a repeated page),
/// written out here so that each page reports progress and is counted.
async fn list(
    halo: &HaloClient,
    progress: &mut Progress,
    what: &str,
    path: &str,
    key: &str,
    query: &[(&str, String)],
) -> Result<Vec<Value>, HaloError> {
    let mut rows: Vec<Value> = Vec::new();
    for page in 1..=MAX_PAGES {
        let mut q: Vec<(&str, String)> = query.to_vec();
        q.push(("pageinate", "true".into()));
        q.push(("page_size", PAGE_SIZE.to_string()));
        q.push(("page_no", page.to_string()));
        let body = get(halo, path, &q).await?;
        let (batch, total) = list_rows(body, key);
        let got = batch.len();
        progress.page(what, rows.len() + got);
        if page > 1 && got > 0 && rows.len() >= got && rows[rows.len() - got..] == batch[..] {
            break;
        }
        rows.extend(batch);
        let done = match total {
            Some(total) => rows.len() >= total,
            None => got < PAGE_SIZE,
        };
        if done || got == 0 {
            break;
        }
    }
    Ok(rows)
}

fn text(v: &Value, key: &str) -> Option<String> {
    match v.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn int(v: &Value, key: &str) -> Option<i64> {
    match v.get(key)? {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// The links of `kind` (optionally of one billing id), checked field by
/// field (HaloPSA ignores filters it does not know).
async fn links(
    halo: &HaloClient,
    progress: &mut Progress,
    kind: &Kind,
    billing_id: Option<&str>,
) -> Result<Vec<LinkRow>, HaloError> {
    let mut query = vec![("third_party_type", kind.third_party_type.to_string())];
    if let Some(id) = billing_id {
        query.push(("third_party_id", id.to_string()));
    }
    let rows = list(
        halo,
        progress,
        &format!("{} links", kind.name),
        "/ExternalLink",
        "links",
        &query,
    )
    .await?;
    let mut out: Vec<LinkRow> = rows
        .iter()
        .filter(|r| text(r, "third_party_type").as_deref() == Some(kind.third_party_type))
        .filter_map(|r| {
            Some(LinkRow {
                billing_id: text(r, "third_party_id")?,
                halo_id: int(r, "halo_id")?,
                link_id: record_id(r)?,
                version: text(r, "third_party_secondary_id").filter(|s| !s.is_empty()),
            })
        })
        .filter(|l| billing_id.is_none_or(|b| l.billing_id == b))
        .collect();
    out.sort_by(|a, b| (&a.billing_id, a.link_id).cmp(&(&b.billing_id, b.link_id)));
    Ok(out)
}

fn by_id(rows: Vec<Value>) -> BTreeMap<i64, Value> {
    rows.into_iter()
        .filter_map(|r| record_id(&r).map(|id| (id, r)))
        .collect()
}

/// Headers of ours (`wanted`) with their lines; see the module doc for the
/// fallback when a list leaves the lines out.
async fn headers_with_lines(
    halo: &HaloClient,
    progress: &mut Progress,
    what: &str,
    base: &str,
    client: Option<i64>,
    wanted: &BTreeSet<i64>,
) -> Result<BTreeMap<i64, Value>, HaloError> {
    if wanted.is_empty() {
        return Ok(BTreeMap::new());
    }
    let mut query = vec![("includelines", "true".to_string())];
    if let Some(c) = client {
        query.push(("client_id", c.to_string()));
    }
    let mut headers = by_id(list(halo, progress, what, base, "invoices", &query).await?);
    headers.retain(|id, _| wanted.contains(id));
    for (id, header) in headers.iter_mut() {
        if header.get("lines").is_some() {
            continue;
        }
        let path = format!("{base}/{id}");
        let body = get(halo, &path, &[("includedetails", "true".into())]).await?;
        progress.page(what, 1);
        if let Some(full) = first_record(body) {
            *header = full;
        }
    }
    Ok(headers)
}

/// Reads what `scope` needs.
pub async fn read(
    halo: &HaloClient,
    scope: &Scope,
    progress: &mut Progress,
) -> Result<HaloState, HaloError> {
    let mut s = HaloState::default();
    let account = scope.account.as_deref();
    let needs_invoice = scope.has(Family::Subscription) || scope.has(Family::Usage);
    let mut client_filter = None;
    if scope.has(Family::Account) || account.is_some() {
        s.account_links = links(halo, progress, &CUSTOMER, account).await?;
    }
    if scope.has(Family::Account) {
        // One request: a customer's currency is the id of a /Currency row,
        // compared by the event's ISO code.
        let body = get(halo, "/Currency", &[]).await?;
        progress.page("currencies", 1);
        s.currencies = halosync_shared::halo::currency::by_code(body);
    }
    if account.is_some() {
        s.scoped_customer = s.account_links.iter().map(|l| l.halo_id).min();
        let Some(customer) = s.scoped_customer else {
            // No customer: everything of the account is missing; nothing
            // else of HaloPSA can belong to it.
            s.requests = progress.requests;
            return Ok(s);
        };
        client_filter = Some(customer);
        if scope.has(Family::Account) {
            let path = format!("/Client/{customer}");
            match get(halo, &path, &[]).await {
                Ok(body) => {
                    progress.page("customers", 1);
                    if let Some(c) = first_record(body) {
                        s.clients.insert(customer, c);
                    }
                }
                Err(HaloError::Status { status: 404, .. }) => progress.page("customers", 0),
                Err(e) => return Err(e),
            }
        }
    } else if scope.has(Family::Account) {
        s.clients = by_id(
            list(
                halo,
                progress,
                "customers",
                "/Client",
                "clients",
                &[("includeinactive", "true".into())],
            )
            .await?,
        );
    }
    if scope.has(Family::Subscription) {
        s.subscription_links = links(halo, progress, &SUBSCRIPTION, None).await?;
        let mut query = vec![("includeinactive", "true".to_string())];
        if let Some(c) = client_filter {
            query.push(("client_id", c.to_string()));
        }
        let mut licences = by_id(
            list(
                halo,
                progress,
                "licences",
                "/SoftwareLicence",
                "licences",
                &query,
            )
            .await?,
        );
        if let Some(c) = client_filter {
            licences.retain(|_, l| int(l, "client_id") == Some(c));
        }
        s.licences = licences;
    }
    if needs_invoice {
        s.recurring_links = links(halo, progress, &RECURRING_INVOICE, account).await?;
        let wanted: BTreeSet<i64> = s.recurring_links.iter().map(|l| l.halo_id).collect();
        s.recurring = headers_with_lines(
            halo,
            progress,
            "recurring invoices",
            "/RecurringInvoice",
            client_filter,
            &wanted,
        )
        .await?;
    }
    if scope.has(Family::Overage) {
        let mut l = links(halo, progress, &OVERAGE_INVOICE, None).await?;
        if let Some(a) = account {
            // `third_party_id` is `<account_id>:<period_start>`.
            l.retain(|r| {
                r.billing_id
                    .rsplit_once(':')
                    .is_some_and(|(acc, _)| acc == a)
            });
        }
        s.overage_invoice_links = l;
        let wanted: BTreeSet<i64> = s.overage_invoice_links.iter().map(|l| l.halo_id).collect();
        s.invoices = headers_with_lines(
            halo,
            progress,
            "invoices",
            "/Invoice",
            client_filter,
            &wanted,
        )
        .await?;
    }
    s.requests = progress.requests;
    Ok(s)
}
