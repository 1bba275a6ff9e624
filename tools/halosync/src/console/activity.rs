//! The Activity page: every settled message of the last 30 days (the
//! activity stream, `halosync_shared::activity`, the reader `halosync
//! activity` uses), searchable by event id, aggregate, connection, family,
//! outcome and time, paged server-side, filters in the URL, CSV export of
//! everything matching. It also feeds the overview's counts and tiles.

use std::collections::BTreeMap;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{Duration as Days, Utc};
use halosync_shared::activity::{self, ActivityFilter};
use halosync_shared::Settled;
use maud::{html, Markup};
use serde::{Deserialize, Serialize};

use super::access::Viewer;
use super::overview::Overview;
use super::{layout, problem, Shared};
use crate::dead::parse_since;

const PER_PAGE: usize = 50;

/// One day of the 30-day tiles.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Day {
    pub date: String,
    pub applied: u64,
    pub superseded: u64,
    pub failed: u64,
}

/// The page's filters as they appear in the URL.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ActivityQuery {
    pub event_id: Option<String>,
    pub aggregate: Option<String>,
    pub connection: Option<String>,
    pub family: Option<String>,
    pub outcome: Option<String>,
    /// A duration back from now (24h) or a time.
    pub since: Option<String>,
    pub until: Option<String>,
    /// Bounded by [`super::page_number`].
    pub page: Option<String>,
}

fn clean(v: &Option<String>) -> Option<String> {
    v.as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

impl ActivityQuery {
    /// The reader's filter, or what to type instead.
    pub fn filter(&self) -> Result<ActivityFilter, String> {
        let now = Utc::now();
        let time = |v: &Option<String>| -> Result<Option<chrono::DateTime<Utc>>, String> {
            match clean(v) {
                Some(s) => Ok(Some(parse_since(&s)?.cutoff(now))),
                None => Ok(None),
            }
        };
        let outcome = match clean(&self.outcome) {
            Some(o) => Some(o.parse::<Settled>().map_err(|e| e.to_string())?),
            None => None,
        };
        Ok(ActivityFilter {
            event_id: clean(&self.event_id),
            aggregate: clean(&self.aggregate),
            connection: clean(&self.connection),
            family: clean(&self.family),
            outcome,
            since: time(&self.since)?,
            until: time(&self.until)?,
        })
    }

    fn pairs(&self, page: Option<usize>) -> Vec<(&'static str, String)> {
        let mut v: Vec<(&'static str, String)> = [
            ("event_id", &self.event_id),
            ("aggregate", &self.aggregate),
            ("connection", &self.connection),
            ("family", &self.family),
            ("outcome", &self.outcome),
            ("since", &self.since),
            ("until", &self.until),
        ]
        .into_iter()
        .filter_map(|(k, v)| clean(v).map(|v| (k, v)))
        .collect();
        if let Some(p) = page {
            v.push(("page", p.to_string()));
        }
        v
    }

    fn url(&self, path: &str, page: Option<usize>) -> String {
        format!(
            "{path}?{}",
            serde_urlencoded::to_string(self.pairs(page)).unwrap_or_default()
        )
    }
}

fn filter_form(q: &ActivityQuery) -> Markup {
    let v = |o: &Option<String>| o.clone().unwrap_or_default();
    html! {
        form.card.filters method="get" action="/activity" {
            label { "Event id" input type="search" name="event_id" value=(v(&q.event_id)) placeholder="evt_…"; }
            label { "Aggregate" input type="search" name="aggregate" value=(v(&q.aggregate)) placeholder="sub_42"; }
            label { "Connection" input type="text" name="connection" value=(v(&q.connection)) placeholder="acme"; }
            label { "Family" select name="family" {
                option value="" { "all" }
                @for f in ["account", "subscription", "usage", "overage"] { option value=(f) selected[q.family.as_deref() == Some(f)] { (f) } }
            } }
            label { "Outcome" select name="outcome" {
                option value="" { "all" }
                @for o in Settled::LABELS { option value=(o) selected[q.outcome.as_deref() == Some(*o)] { (o) } }
            } }
            label { "Since" input type="text" name="since" value=(v(&q.since)) placeholder="24h, 7d, 2026-11-20"; }
            label { "Until" input type="text" name="until" value=(v(&q.until)) placeholder="1h, 2026-11-21"; }
            button.btn type="submit" { "Search" }
            a.btn.ghost href="/activity" { "Clear" }
        }
    }
}

fn outcome_class(o: Settled) -> &'static str {
    match o {
        Settled::Applied => "ok",
        Settled::DeadLettered => "bad",
        Settled::Retried | Settled::Requeued => "warn",
        Settled::Superseded | Settled::Duplicate => "",
    }
}

pub async fn page(
    State(app): State<Shared>,
    Viewer(who): Viewer,
    Query(q): Query<ActivityQuery>,
) -> Response {
    let page_no = super::page_number(q.page.as_deref());
    let filter = match q.filter() {
        Ok(f) => f,
        Err(e) => {
            let body =
                html! { h1 { "Activity" } (filter_form(&q)) div.msg.bad { "Bad filter: " (e) } };
            return (
                StatusCode::BAD_REQUEST,
                layout::page("Activity", "/activity", &who, body),
            )
                .into_response();
        }
    };
    let Some(log) = &app.activity else {
        return problem(
            StatusCode::SERVICE_UNAVAILABLE,
            Some(&who),
            "The activity log is not available",
            app.activity_error.as_deref().unwrap_or("not connected"),
        );
    };
    let page = log.query(&filter, page_no, PER_PAGE);
    let body = html! {
        h1 { "Activity" }
        p.sub { "Every settled message of the last 30 days, newest first (" (log.len()) " records in the log)." }
        (filter_form(&q))
        div.row.mb10 {
            span #activity-total { b { (page.total) } " matching" }
            a.btn.ghost.small #csv href=(q.url("/activity.csv", None)) { "Export CSV (all " (page.total) ")" }
        }
        @if page.rows.is_empty() {
            div.card.muted #no-activity { "No activity matches." }
        } @else {
            table #activity {
                thead { tr { th { "Settled" } th { "Event id" } th { "Type" } th { "Connection" } th { "Aggregate" } th { "Outcome" } th.num { "Attempt" } th { "Message" } } }
                tbody {
                    @for r in &page.rows {
                        tr {
                            td { (layout::when(Some(&r.time))) }
                            td { code { (r.event_id) } }
                            td { (r.event_type) }
                            td { (r.connection) }
                            td { code { (r.aggregate) } }
                            td { span class={"pill " (outcome_class(r.outcome))} { (r.outcome) } @if let Some(c) = &r.class { " " span.muted { (c) } } }
                            td.num { (r.attempts) }
                            td.muted { (r.message.clone().unwrap_or_default()) }
                        }
                    }
                }
            }
            div.pager {
                @if page.page > 1 { a.btn.ghost.small #newer href=(q.url("/activity", Some(page.page - 1))) { "← Newer" } }
                span.muted #page-of { "page " (page.page) " of " (page.pages) }
                @if page.page < page.pages { a.btn.ghost.small #older href=(q.url("/activity", Some(page.page + 1))) { "Older →" } }
            }
        }
    };
    layout::page("Activity", "/activity", &who, body).into_response()
}

pub async fn csv(
    State(app): State<Shared>,
    Viewer(who): Viewer,
    Query(q): Query<ActivityQuery>,
) -> Response {
    let filter = match q.filter() {
        Ok(f) => f,
        Err(e) => return problem(StatusCode::BAD_REQUEST, Some(&who), "Bad filter", &e),
    };
    let Some(log) = &app.activity else {
        return problem(
            StatusCode::SERVICE_UNAVAILABLE,
            Some(&who),
            "The activity log is not available",
            app.activity_error.as_deref().unwrap_or("not connected"),
        );
    };
    let rows = log.all(&filter);
    let mut out = Vec::new();
    if let Err(e) = activity::write_csv(&rows, &mut out) {
        return problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            Some(&who),
            "Cannot write the CSV",
            &e.to_string(),
        );
    }
    (
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!(
                    "attachment; filename=\"halosync-activity-{}.csv\"",
                    Utc::now().format("%Y%m%d-%H%M%S")
                ),
            ),
        ],
        out,
    )
        .into_response()
}

/// The overview's activity figures: per connection applied, superseded and
/// dead-lettered in the last 24 hours, the last applied write, and 30 days.
pub async fn fill_overview(app: &Shared, o: &mut Overview) {
    let Some(log) = &app.activity else {
        o.problems.push(format!(
            "activity log: {}",
            app.activity_error.as_deref().unwrap_or("not connected")
        ));
        return;
    };
    let mut per: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
    for c in log.counts(Some(Utc::now() - Days::hours(24))) {
        let e = per.entry(c.connection.clone()).or_default();
        match c.outcome {
            Settled::Applied => e.0 += c.count,
            Settled::Superseded => e.1 += c.count,
            Settled::DeadLettered => e.2 += c.count,
            Settled::Duplicate | Settled::Retried | Settled::Requeued => {}
        }
    }
    for (name, row) in o.connections.iter_mut() {
        let (a, s, f) = per.get(name).copied().unwrap_or_default();
        row.applied_24h = a;
        row.superseded_24h = s;
        row.failed_24h = f;
        let last = log.query(
            &ActivityFilter {
                connection: Some(name.clone()),
                outcome: Some(Settled::Applied),
                ..Default::default()
            },
            1,
            1,
        );
        if let Some(r) = last.rows.first() {
            row.last_write = Some(r.time);
            row.last_write_text = format!(
                "{} ({})",
                r.time.format("%Y-%m-%d %H:%M:%S UTC"),
                r.event_type
            );
        }
    }
    o.daily = log
        .daily(30)
        .into_iter()
        .map(|d| Day {
            date: d.day.format("%b %d").to_string(),
            applied: d.by_outcome.get(&Settled::Applied).copied().unwrap_or(0),
            superseded: d.by_outcome.get(&Settled::Superseded).copied().unwrap_or(0),
            failed: d
                .by_outcome
                .get(&Settled::DeadLettered)
                .copied()
                .unwrap_or(0),
        })
        .collect();
}
