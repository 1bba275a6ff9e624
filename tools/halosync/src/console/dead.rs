//! Dead letters: failure groups, the matching dead letters, one dead
//! letter in full, and the confirm step of replay and purge (which then
//! run as [`jobs`](super::jobs)). Filters live in the URL.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use chrono::Utc;
use clap::ValueEnum;
use maud::{html, Markup};

use super::access::{Operator, Viewer};
use super::audit::AuditOutcome;
use super::auth::SignedIn;
use super::{layout, problem, Form, Shared};
use crate::dead::{self, parse_since, DeadLetter, FamilyArg, Filter};
use crate::dead::{FilterArgs, GroupBy};
use crate::dlq::{self, Action, Handled, Progress};
use halosync_shared::ErrorClass;

/// How long a page waits for another listing to finish with the dead
/// queues before saying that a job holds them.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// The most dead letters one confirmed action may touch.
const MAX_EXPECTED: usize = 10_000_000;

/// Most dead letters listed on one page (the groups count them all).
const SHOWN: usize = 200;

/// The dead-letter filters as they appear in the URL and in forms. Event
/// ids travel one per field (`event_id`, and the selection as repeated
/// `id` fields), never joined with a separator: an id may hold any
/// character (an invalid dead letter's id may hold a comma).
#[derive(Clone, Debug, Default)]
pub struct DeadQuery {
    pub family: Option<String>,
    pub class: Option<String>,
    pub connection: Option<String>,
    pub event_id: Option<String>,
    pub error: Option<String>,
    pub since: Option<String>,
    /// Selected dead letters (repeated `id` fields); when given, only these.
    pub ids: Vec<String>,
}

fn nonempty(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

fn list_of(v: &Option<String>) -> Vec<String> {
    nonempty(v)
        .map(|s| {
            s.split(',')
                .map(|p| p.trim().to_string())
                .filter(|p| !p.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

impl DeadQuery {
    pub fn from_form(form: &Form) -> DeadQuery {
        let get = |k: &str| form.get(k).map(str::to_string);
        DeadQuery {
            family: get("family"),
            class: get("class"),
            connection: get("connection"),
            event_id: get("event_id"),
            error: get("error"),
            since: get("since"),
            ids: form
                .all("id")
                .into_iter()
                .filter(|i| !i.is_empty())
                .collect(),
        }
    }

    /// From a URL's query string (repeated fields kept).
    pub fn from_query(raw: Option<&str>) -> DeadQuery {
        DeadQuery::from_form(&Form::parse(&Bytes::copy_from_slice(
            raw.unwrap_or("").as_bytes(),
        )))
    }

    /// The event ids this query is narrowed to: the selection, else the
    /// one `event_id` (as given, never split).
    pub fn event_ids(&self) -> Vec<String> {
        if !self.ids.is_empty() {
            return self.ids.clone();
        }
        nonempty(&self.event_id)
            .map(|s| vec![s.to_string()])
            .unwrap_or_default()
    }

    /// The CLI's filter arguments, or what to type instead.
    pub fn args(&self) -> Result<FilterArgs, String> {
        let mut family = Vec::new();
        for f in list_of(&self.family) {
            family.push(FamilyArg::from_str(&f, true).map_err(|_| {
                format!("unknown family {f:?}: use account, subscription, usage or overage")
            })?);
        }
        let mut class = Vec::new();
        for c in list_of(&self.class) {
            class.push(c.parse::<ErrorClass>().map_err(|e| e.to_string())?);
        }
        let since = match nonempty(&self.since) {
            Some(s) => Some(parse_since(s)?),
            None => None,
        };
        Ok(FilterArgs {
            family,
            class,
            connection: list_of(&self.connection),
            event_id: self.event_ids(),
            error: nonempty(&self.error).map(str::to_string),
            since,
            limit: None,
        })
    }

    fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut v: Vec<(&'static str, String)> = [
            ("family", &self.family),
            ("class", &self.class),
            ("connection", &self.connection),
            ("event_id", &self.event_id),
            ("error", &self.error),
            ("since", &self.since),
        ]
        .into_iter()
        .filter_map(|(k, v)| nonempty(v).map(|v| (k, v.to_string())))
        .collect();
        v.extend(self.ids.iter().map(|i| ("id", i.clone())));
        v
    }

    pub fn query_string(&self) -> String {
        serde_urlencoded::to_string(self.pairs()).unwrap_or_default()
    }

    fn hidden(&self) -> Markup {
        html! { @for (k, v) in self.pairs() { input type="hidden" name=(k) value=(v); } }
    }

    /// In words, for the audit trail and the confirm page.
    pub fn describe(&self, filter: &Filter) -> String {
        let args = filter.as_args();
        if args.is_empty() {
            "every dead letter".to_string()
        } else {
            format!("dead letters matching {args}")
        }
    }
}

/// The query of a dead letter's own page (the id encoded, whatever it holds).
fn show_query(family: Option<&str>, id: &str) -> String {
    let mut pairs = Vec::new();
    if let Some(f) = family {
        pairs.push(("family", f));
    }
    pairs.push(("event_id", id));
    serde_urlencoded::to_string(pairs).unwrap_or_default()
}

fn filter_form(q: &DeadQuery) -> Markup {
    let v = |o: &Option<String>| o.clone().unwrap_or_default();
    html! {
        form.card.filters method="get" action="/dead" {
            label { "Family" select name="family" {
                option value="" { "all" }
                @for f in ["account", "subscription", "usage", "overage"] {
                    option value=(f) selected[q.family.as_deref() == Some(f)] { (f) }
                }
            } }
            label { "Class" select name="class" {
                option value="" { "all" }
                @for c in ErrorClass::LABELS { option value=(c) selected[q.class.as_deref() == Some(*c)] { (c) } }
            } }
            label { "Connection" input type="text" name="connection" value=(v(&q.connection)) placeholder="acme"; }
            label { "Event id" input type="text" name="event_id" value=(v(&q.event_id)) placeholder="evt_…"; }
            label { "Failed within" input type="text" name="since" value=(v(&q.since)) placeholder="2h, 1d, 2026-11-22"; }
            @if let Some(e) = nonempty(&q.error) { input type="hidden" name="error" value=(e); }
            button.btn type="submit" { "Filter" }
            a.btn.ghost href="/dead" { "Clear" }
        }
    }
}

/// The buttons that act on everything the filter matches (or a group).
fn action_buttons(who: &SignedIn, q: &DeadQuery, count: usize, label: &str) -> Markup {
    html! {
        @if who.is_operator() {
            form.inline method="post" action="/dead/action" {
                (layout::csrf(who)) (q.hidden())
                button.btn.small name="action" value="replay" type="submit" { "Replay " (label) " (" (count) ")" }
                " "
                button.btn.small.danger name="action" value="purge" type="submit" { "Purge " (label) " (" (count) ")" }
            }
        }
    }
}

pub async fn list(
    State(app): State<Shared>,
    Viewer(who): Viewer,
    RawQuery(raw): RawQuery,
) -> Response {
    let q = DeadQuery::from_query(raw.as_deref());
    let args = match q.args() {
        Ok(a) => a,
        Err(e) => {
            let body = html! { h1 { "Dead letters" } (filter_form(&q)) div.msg.bad { "Bad filter: " (e) } };
            return (
                StatusCode::BAD_REQUEST,
                layout::page("Dead letters", "/dead", &who, body),
            )
                .into_response();
        }
    };
    let filter = Filter::new(&args, Utc::now());
    // A job holds the dead queues: do not wait for it, say so.
    let Some(guard) = app.jobs.lock_dead(LOCK_WAIT).await else {
        let running = app.jobs.running();
        let body = html! {
            h1 { "Dead letters" }
            (filter_form(&q))
            div.msg.info #busy {
                "A replay or purge is going through the dead queues right now, so they cannot be listed without disturbing it. "
                @if let Some(j) = running { a href={"/jobs/" (j.id)} { "Follow job " (j.id) } }
                " — this page lists them again once it ends."
            }
        };
        return layout::page("Dead letters", "/dead", &who, body).into_response();
    };
    let scan = dlq::run(&app.config, &filter, Action::Read, &Progress::default()).await;
    drop(guard);
    let scan = match scan {
        Ok(s) => s,
        Err(e) => {
            return problem(
                StatusCode::BAD_GATEWAY,
                Some(&who),
                "Cannot read the dead queues",
                &format!("{e:#}"),
            )
        }
    };
    let letters: Vec<DeadLetter> = scan.done.iter().map(|d| d.letter.clone()).collect();
    let groups = dead::group(&letters, GroupBy::Error);
    let total = scan.total();
    let body = html! {
        h1 { "Dead letters" }
        p.sub { (letters.len()) " match, of " (total) " in the dead queues. Reading them leaves them in place and in order." }
        (filter_form(&q))
        @if letters.is_empty() {
            div.card.muted #no-dead { "No dead letters match." }
        } @else {
            div.row.mb12 { (action_buttons(&who, &q, letters.len(), "all matching")) }
            h2 { "Failure groups" }
            table #groups {
                thead { tr { th.num { "Count" } th { "Class" } th { "Cause" } th { "Families" } th { "First failure" } th { "Last failure" } th { "Sample" } th {} } }
                tbody {
                    @for g in &groups {
                        @let gq = DeadQuery { class: Some(g.class.to_string()), error: g.error.clone(), ..q.clone() };
                        tr.group {
                            td.num { b { (g.count) } }
                            td { span.pill.bad { (g.class) } }
                            td { (g.error.clone().unwrap_or_default()) }
                            td { @for f in &g.families { span.pill { (f.as_str()) } " " } }
                            td { (layout::when(g.first_failure_at.as_ref())) }
                            td { (layout::when(g.last_failure_at.as_ref())) }
                            td { @if let Some(id) = &g.sample_event_id { a href={"/dead/show?" (show_query(None, id))} { code { (id) } } } }
                            td.right {
                                a.btn.ghost.small href={"/dead?" (gq.query_string())} { "Only these" } " "
                                (action_buttons(&who, &gq, g.count, "group"))
                            }
                        }
                    }
                }
            }
            h2 { "Dead letters" @if letters.len() > SHOWN { " (first " (SHOWN) " of " (letters.len()) "; narrow the filter to see others)" } }
            form method="post" action="/dead/action" #selection {
                (layout::csrf(&who)) (q.hidden())
                @if who.is_operator() {
                    div.row.mb8 {
                        button.btn.small name="action" value="replay" type="submit" { "Replay selected" }
                        button.btn.small.danger name="action" value="purge" type="submit" { "Purge selected" }
                    }
                }
                table #letters {
                    thead { tr {
                        @if who.is_operator() { th { input type="checkbox" data-select-all title="select all shown"; } }
                        th { "Event id" } th { "Type" } th { "Connection" } th { "Class" } th { "Error" } th.num { "Attempts" } th.num { "Replays" } th { "Last failure" }
                    } }
                    tbody {
                        @for d in letters.iter().take(SHOWN) {
                            @let id = d.event_id.clone().unwrap_or_default();
                            tr {
                                @if who.is_operator() { td { input type="checkbox" name="id" value=(id); } }
                                td { a href={"/dead/show?" (show_query(Some(d.family.as_str()), &id))} { code { (id) } } }
                                td { (d.event_type.clone().unwrap_or_default()) }
                                td { (d.connection.clone().unwrap_or_default()) }
                                td { span.pill.bad { (d.class) } }
                                td { (crate::table::one_line(&d.reason(), 140)) }
                                td.num { (d.attempts.map(|a| a.to_string()).unwrap_or_default()) }
                                td.num { @if d.replay_count > 0 { span.pill.warn title="replayed this many times and dead again" { (d.replay_count) "×" } } @else { "0" } }
                                td { (layout::when(d.last_failure_at.as_ref())) }
                            }
                        }
                    }
                }
            }
        }
    };
    layout::page("Dead letters", "/dead", &who, body).into_response()
}

pub async fn show(
    State(app): State<Shared>,
    Viewer(who): Viewer,
    RawQuery(raw): RawQuery,
) -> Response {
    let q = DeadQuery::from_query(raw.as_deref());
    let args = match q.args() {
        Ok(a) if !a.event_id.is_empty() => a,
        Ok(_) => {
            return problem(
                StatusCode::BAD_REQUEST,
                Some(&who),
                "Which dead letter?",
                "Give event_id=… in the address (links on the Dead letters page do).",
            )
        }
        Err(e) => return problem(StatusCode::BAD_REQUEST, Some(&who), "Bad filter", &e),
    };
    let filter = Filter::new(&args, Utc::now());
    let Some(guard) = app.jobs.lock_dead(LOCK_WAIT).await else {
        return problem(StatusCode::SERVICE_UNAVAILABLE, Some(&who), "A job is running", "A replay or purge is going through the dead queues; open this page again when it ends (see Jobs).");
    };
    let scan = dlq::run(&app.config, &filter, Action::Read, &Progress::default()).await;
    drop(guard);
    let scan = match scan {
        Ok(s) => s,
        Err(e) => {
            return problem(
                StatusCode::BAD_GATEWAY,
                Some(&who),
                "Cannot read the dead queues",
                &format!("{e:#}"),
            )
        }
    };
    let Some(d) = scan.done.first().map(|d| d.letter.clone()) else {
        return problem(StatusCode::NOT_FOUND, Some(&who), "No such dead letter", &format!("No dead letter has event id {} (it may have been replayed or purged). See the Dead letters page.", args.event_id.iter().map(|i| format!("{i:?}")).collect::<Vec<_>>().join(" or ")));
    };
    let one = DeadQuery {
        family: Some(d.family.as_str().to_string()),
        event_id: d.event_id.clone(),
        ..Default::default()
    };
    let halo = match (&d.halo_status, &d.halo_message) {
        (Some(s), Some(m)) => format!("{s}: {m}"),
        (Some(s), None) => s.to_string(),
        (None, Some(m)) => m.clone(),
        (None, None) => "–".into(),
    };
    let mut headers_sorted: Vec<(String, String)> = d
        .headers
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        match v {
                            serde_json::Value::String(s) => s.clone(),
                            o => o.to_string(),
                        },
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    headers_sorted.sort_by_key(|(k, _)| (!k.starts_with("x-halosync-"), k.clone()));
    let body = html! {
        h1 { "Dead letter " code { (d.event_id.clone().unwrap_or_default()) } }
        p.sub { (d.event_type.clone().unwrap_or_default()) " · connection " (d.connection.clone().unwrap_or_default()) " · " (d.queue) " position " (d.position) }
        div.row.mb14 { (action_buttons(&who, &one, 1, "this one")) }
        div.tiles {
            div.tile.bad { div.n { (d.class) } div.l { "class" } }
            div.tile { div.n { (d.attempts.unwrap_or(0)) } div.l { "attempts" } }
            div.tile.warn { div.n #replays { (d.replay_count) } div.l { "times replayed" } }
            div.tile { div.n { (d.halo_status.map(|s| s.to_string()).unwrap_or_else(|| "–".into())) } div.l { "HaloPSA status" } }
        }
        table {
            tbody {
                tr { th { "Error" } td #error { (d.error_message.clone().unwrap_or_default()) } }
                tr { th { "HaloPSA says" } td #halo { (halo) } }
                tr { th { "First failure" } td { (layout::when(d.first_failure_at.as_ref())) } }
                tr { th { "Last failure" } td { (layout::when(d.last_failure_at.as_ref())) } }
                tr { th { "Worker" } td { (d.worker.clone().unwrap_or_default()) } }
                tr { th { "Routing key" } td { code { (d.original_routing_key.clone().unwrap_or_default()) } } }
            }
        }
        h2 { "Headers" }
        table #headers { tbody { @for (k, v) in &headers_sorted { tr { td { code { (k) } } td { code { (v) } } } } } }
        h2 { "Envelope" }
        pre #envelope { (match (&d.envelope, &d.body_text) {
            (Some(e), _) => serde_json::to_string_pretty(e).unwrap_or_default(),
            (None, Some(t)) => t.clone(),
            (None, None) => String::new(),
        }) }
    };
    layout::page("Dead letter", "/dead", &who, body).into_response()
}

/// What an action form asks for: the filter, narrowed to the selected ids.
fn requested(form: &Form) -> Result<(Action, DeadQuery), String> {
    let action = match form.get("action") {
        Some("replay") => Action::Replay { dry_run: false },
        Some("purge") => Action::Purge { dry_run: false },
        other => {
            return Err(format!(
                "unknown action {other:?}: the buttons send replay or purge"
            ))
        }
    };
    let q = DeadQuery::from_form(form);
    if (form.0.iter().any(|(k, _)| k == "id") || form.get("scope") == Some("selected"))
        && q.ids.is_empty()
    {
        return Err("nothing is selected: tick the dead letters first".into());
    }
    Ok((action, q))
}

fn dry(action: Action) -> Action {
    match action {
        Action::Replay { .. } => Action::Replay { dry_run: true },
        Action::Purge { .. } => Action::Purge { dry_run: true },
        Action::Read => Action::Read,
    }
}

/// Step 1 of replay / purge: count what would be affected and ask.
pub async fn confirm(State(app): State<Shared>, Operator { who, form }: Operator) -> Response {
    let (action, q) = match requested(&form) {
        Ok(x) => x,
        Err(e) => return problem(StatusCode::BAD_REQUEST, Some(&who), "Nothing to do", &e),
    };
    let args = match q.args() {
        Ok(a) => a,
        Err(e) => return problem(StatusCode::BAD_REQUEST, Some(&who), "Bad filter", &e),
    };
    let filter = Filter::new(&args, Utc::now());
    let Some(guard) = app.jobs.lock_dead(LOCK_WAIT).await else {
        return problem(StatusCode::CONFLICT, Some(&who), "A job is running", "Another replay or purge is going through the dead queues; wait until it ends (see Jobs), then try again.");
    };
    let scan = dlq::run(&app.config, &filter, dry(action), &Progress::default()).await;
    drop(guard);
    let scan = match scan {
        Ok(s) => s,
        Err(e) => {
            return problem(
                StatusCode::BAD_GATEWAY,
                Some(&who),
                "Cannot read the dead queues",
                &format!("{e:#}"),
            )
        }
    };
    let n = scan
        .done
        .iter()
        .filter(|d| d.outcome != Handled::Failed)
        .count();
    let unable = scan.done.len() - n;
    let mut per_family: BTreeMap<&str, usize> = BTreeMap::new();
    for d in scan.done.iter().filter(|d| d.outcome != Handled::Failed) {
        *per_family.entry(d.letter.family.as_str()).or_default() += 1;
    }
    let purge = matches!(action, Action::Purge { .. });
    let verb = if purge { "purge" } else { "replay" };
    let what = q.describe(&filter);
    let body = html! {
        h1 { (if purge { "Purge" } else { "Replay" }) " " (n) " dead letters?" }
        div.card #confirm {
            p { "This will " b { (verb) } " " b #affected { (n) } " of " (scan.total()) " dead letters: " (what) "." }
            @if !per_family.is_empty() {
                p { @for (f, c) in &per_family { span.pill { (f) " " (c) } " " } }
            }
            @if unable > 0 { div.msg.bad { (unable) " matching dead letters cannot be replayed (no routing key) and will stay." } }
            @if purge {
                div.msg.bad { "Purging deletes them for good; HaloPSA never receives these events." }
            } @else {
                p.muted { "Each goes back to halosync.events with its original routing key and event id; it leaves the dead queue only once the broker confirmed it. Replaying an already-applied event changes nothing." }
            }
            @if n > 0 {
                p.muted { "First of them: " @for d in scan.done.iter().take(10) { code { (d.letter.event_id.clone().unwrap_or_default()) } " " } @if n > 10 { "…" } }
                form method="post" action="/dead/run" {
                    (layout::csrf(&who)) (q.hidden())
                    input type="hidden" name="action" value=(verb);
                    input type="hidden" name="expected" value=(n);
                    @if purge {
                        label { "Type " b { "purge" } " to confirm: " input #confirm-word type="text" name="confirm_word" autocomplete="off"; }
                        " "
                        button.btn.danger #go type="submit" { "Purge " (n) " dead letters" }
                    } @else {
                        button.btn #go type="submit" { "Replay " (n) " dead letters" }
                    }
                    " " a.btn.ghost href={"/dead?" (q.query_string())} { "Cancel" }
                }
            } @else {
                p { a.btn.ghost href="/dead" { "Back" } }
            }
        }
    };
    layout::page("Confirm", "/dead", &who, body).into_response()
}

/// Step 2: confirmed; record it and start the job.
pub async fn run(State(app): State<Shared>, Operator { who, form }: Operator) -> Response {
    let (action, q) = match requested(&form) {
        Ok(x) => x,
        Err(e) => return problem(StatusCode::BAD_REQUEST, Some(&who), "Nothing to do", &e),
    };
    let purge = matches!(action, Action::Purge { .. });
    if purge && form.get("confirm_word").map(str::trim) != Some("purge") {
        return problem(StatusCode::BAD_REQUEST, Some(&who), "Not purged", "To purge, type the word purge in the box before pressing the button. Nothing was deleted.");
    }
    let Some(expected) = form
        .get("expected")
        .and_then(|e| e.trim().parse::<usize>().ok())
        .filter(|e| *e <= MAX_EXPECTED)
    else {
        return problem(
            StatusCode::BAD_REQUEST,
            Some(&who),
            "Not confirmed",
            "Start from the Dead letters page: the confirm step says how many will be affected.",
        );
    };
    let mut args = match q.args() {
        Ok(a) => a,
        Err(e) => return problem(StatusCode::BAD_REQUEST, Some(&who), "Bad filter", &e),
    };
    let target = q.describe(&Filter::new(&args, Utc::now()));
    // Never more than was confirmed, even if more dead letters arrived since.
    args.limit = Some(expected);
    let filter = Filter::new(&args, Utc::now());
    let verb = if purge { "purge" } else { "replay" };
    if let Err(r) = super::record(
        &app,
        &who,
        verb,
        &target,
        AuditOutcome::Started,
        expected,
        q.event_ids(),
        None,
        None,
    )
    .await
    {
        return r;
    }
    let job = super::jobs::start(&app, &who, action, filter, target, expected);
    Redirect::to(&format!("/jobs/{}", job.id)).into_response()
}
