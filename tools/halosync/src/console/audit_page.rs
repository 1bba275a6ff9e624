//! The Audit page: every recorded action, newest first, filterable by user
//! and action (in the URL), paged.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::html;
use serde::Deserialize;

use super::access::Viewer;
use super::{layout, problem, Shared};

const PER_PAGE: usize = 50;

#[derive(Debug, Default, Deserialize)]
pub struct AuditQuery {
    user: Option<String>,
    action: Option<String>,
    page: Option<String>,
}

pub async fn page(
    State(app): State<Shared>,
    Viewer(who): Viewer,
    Query(q): Query<AuditQuery>,
) -> Response {
    let entries = match app.audit.read_all().await {
        Ok(e) => e,
        Err(e) => {
            return problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                Some(&who),
                "Cannot read the audit trail",
                &format!("{e:#}"),
            )
        }
    };
    let user = q.user.as_deref().map(str::trim).filter(|s| !s.is_empty());
    let action = q.action.as_deref().map(str::trim).filter(|s| !s.is_empty());
    let matching: Vec<_> = entries
        .iter()
        .filter(|e| user.is_none_or(|u| e.user == u))
        .filter(|e| action.is_none_or(|a| e.action == a))
        .collect();
    let page = super::page_number(q.page.as_deref());
    let pages = matching.len().div_ceil(PER_PAGE).max(1);
    let shown = matching
        .iter()
        .skip((page - 1).saturating_mul(PER_PAGE))
        .take(PER_PAGE);
    let link = |p: usize| {
        let mut pairs = vec![("page", p.to_string())];
        if let Some(u) = user {
            pairs.push(("user", u.to_string()));
        }
        if let Some(a) = action {
            pairs.push(("action", a.to_string()));
        }
        format!(
            "/audit?{}",
            serde_urlencoded::to_string(pairs).unwrap_or_default()
        )
    };
    let body = html! {
        h1 { "Audit trail" }
        p.sub { "Who did what, when, to how many. Kept in " code { (app.audit.path().display()) } " (append-only, synced to disk before the action is reported)." }
        form.card.filters method="get" action="/audit" {
            label { "User" input type="text" name="user" value=(user.unwrap_or("")); }
            label { "Action" select name="action" {
                option value="" { "all" }
                @for a in ["replay", "purge", "mapping", "test", "sign-in"] { option value=(a) selected[action == Some(a)] { (a) } }
            } }
            button.btn type="submit" { "Filter" }
            a.btn.ghost href="/audit" { "Clear" }
        }
        @if matching.is_empty() {
            div.card.muted { "Nothing recorded yet." }
        } @else {
            table #audit {
                thead { tr { th { "When" } th { "Who" } th { "Action" } th { "What" } th { "Outcome" } th.num { "How many" } th { "Event ids" } th { "Detail" } } }
                tbody {
                    @for e in shown {
                        tr {
                            td { (layout::when(Some(&e.at))) }
                            td { b { (e.user) } " " span.pill { (e.role) } }
                            td { (e.action) }
                            td { (e.target) @if let Some(j) = &e.job { " " a href={"/jobs/" (j)} { "job " (j) } } }
                            td { span class={"pill " (e.outcome.pill())} { (e.outcome) } }
                            td.num { (e.count) }
                            td { @for id in e.event_ids.iter().take(5) { code { (id) } " " } @if e.event_ids.len() > 5 { span.muted { "+" (e.event_ids.len() - 5) " more" } } }
                            td.muted { (e.detail.clone().unwrap_or_default()) }
                        }
                    }
                }
            }
            div.pager {
                @if page > 1 { a.btn.ghost.small href=(link(page - 1)) { "← Newer" } }
                span.muted { "page " (page) " of " (pages) " · " (matching.len()) " entries" }
                @if page < pages { a.btn.ghost.small href=(link(page + 1)) { "Older →" } }
            }
        }
    };
    layout::page("Audit", "/audit", &who, body).into_response()
}
