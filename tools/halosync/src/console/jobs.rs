//! Server-side replay and purge runs.
//!
//! A confirmed action becomes a job: a task in the console process that
//! calls [`crate::dlq::run`] (the CLI's own code path) with a shared
//! [`Progress`], so 10,000 dead letters never pass through the browser and
//! the page only polls counters (over server-sent events). Jobs, and the
//! console's listings, take the dead-queue lock in turn: a listing holds
//! the dead letters it reads unacknowledged, and a replay running at the
//! same time would not see those. While a job runs, the dead-letter page
//! shows its last listing instead of waiting.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use chrono::{DateTime, Utc};
use futures::stream::Stream;
use maud::html;
use serde::Serialize;

use super::access::{Operator, Viewer};
use super::audit::AuditOutcome;
use super::auth::SignedIn;
use super::{layout, problem, Shared};
use crate::dead::Filter;
use crate::dlq::{self, problem_text, Action, Handled, Progress};

/// How a job ended.
#[derive(Clone, Debug, Serialize)]
pub struct Ended {
    pub at: DateTime<Utc>,
    /// Done, failed or cancelled.
    pub outcome: AuditOutcome,
    pub message: String,
}

/// Where a job is: running, or ended as its audit entry says. Shown, and
/// sent to the page's live progress, as `running` or the outcome's label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobState {
    Running,
    Ended(AuditOutcome),
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Ended(o) => o.as_str(),
        }
    }

    /// The pill it is shown in.
    fn pill(self) -> &'static str {
        match self {
            JobState::Running => "warn",
            JobState::Ended(AuditOutcome::Done) => "ok",
            JobState::Ended(AuditOutcome::Failed) => "bad",
            JobState::Ended(_) => "",
        }
    }
}

halosync_shared::label::written_as_label!(JobState);

pub struct Job {
    pub id: String,
    pub action: Action,
    pub user: String,
    pub target: String,
    pub expected: usize,
    pub started: DateTime<Utc>,
    pub progress: Arc<Progress>,
    pub ended: Mutex<Option<Ended>>,
}

impl Job {
    pub fn verb(&self) -> &'static str {
        match self.action {
            Action::Replay { .. } => "replay",
            Action::Purge { .. } => "purge",
            Action::Read => "read",
        }
    }
    fn ended(&self) -> Option<Ended> {
        self.ended.lock().ok().and_then(|e| e.clone())
    }
    fn snapshot(&self) -> Snapshot {
        let p = &self.progress;
        let ended = self.ended();
        Snapshot {
            id: self.id.clone(),
            total: p.total.load(Ordering::Relaxed),
            fetched: p.fetched.load(Ordering::Relaxed),
            matched: p.matched.load(Ordering::Relaxed),
            removed: p.removed.load(Ordering::Relaxed),
            failed: p.failed.load(Ordering::Relaxed),
            expected: self.expected,
            finished: ended.is_some(),
            state: ended
                .as_ref()
                .map_or(JobState::Running, |e| JobState::Ended(e.outcome)),
            message: ended.map(|e| e.message).unwrap_or_default(),
        }
    }
}

/// What the progress bar shows.
#[derive(Clone, Debug, Serialize)]
pub struct Snapshot {
    pub id: String,
    pub total: u64,
    pub fetched: usize,
    pub matched: usize,
    pub removed: usize,
    pub failed: usize,
    pub expected: usize,
    pub finished: bool,
    pub state: JobState,
    pub message: String,
}

#[derive(Default)]
pub struct Jobs {
    jobs: Mutex<BTreeMap<String, Arc<Job>>>,
    /// Held by whatever is reading the dead queues (a job or a listing).
    pub dead_lock: tokio::sync::Mutex<()>,
}

impl Jobs {
    /// The dead-queue lock, waiting up to `wait` for whoever holds it (a
    /// listing takes seconds; a job can take minutes: then `None`).
    pub async fn lock_dead(&self, wait: Duration) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        tokio::time::timeout(wait, self.dead_lock.lock()).await.ok()
    }

    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        self.jobs.lock().ok()?.get(id).cloned()
    }
    pub fn all(&self) -> Vec<Arc<Job>> {
        let mut v: Vec<Arc<Job>> = self
            .jobs
            .lock()
            .map(|j| j.values().cloned().collect())
            .unwrap_or_default();
        v.sort_by_key(|j| std::cmp::Reverse(j.started));
        v
    }
    pub fn running(&self) -> Option<Arc<Job>> {
        self.all().into_iter().find(|j| j.ended().is_none())
    }
}

/// Starts a job (the "started" audit entry is already written).
pub fn start(
    app: &Shared,
    who: &SignedIn,
    action: Action,
    filter: Filter,
    target: String,
    expected: usize,
) -> Arc<Job> {
    let job = Arc::new(Job {
        id: super::auth::random_token()[..12].to_string(),
        action,
        user: who.user.clone(),
        target,
        expected,
        started: Utc::now(),
        progress: Arc::new(Progress::default()),
        ended: Mutex::new(None),
    });
    if let Ok(mut j) = app.jobs.jobs.lock() {
        j.insert(job.id.clone(), job.clone());
    }
    let app = app.clone();
    let who = who.clone();
    let run = job.clone();
    tokio::spawn(async move {
        let result = {
            let _guard = app.jobs.dead_lock.lock().await;
            dlq::run(&app.config, &filter, run.action, &run.progress).await
        };
        let (outcome, message, ids) = match result {
            Ok(scan) => {
                let done: Vec<String> = scan
                    .done
                    .iter()
                    .filter(|d| d.outcome.removed())
                    .filter_map(|d| d.letter.event_id.clone())
                    .collect();
                let failed = scan
                    .done
                    .iter()
                    .filter(|d| d.outcome == Handled::Failed)
                    .count();
                let past = if run.verb() == "replay" {
                    "replayed"
                } else {
                    "purged"
                };
                let mut message = format!(
                    "{} of {} matching dead letters {past}",
                    scan.removed,
                    scan.done.len()
                );
                if failed > 0 {
                    let first = scan
                        .done
                        .iter()
                        .find_map(|d| d.problem.as_deref())
                        .map(problem_text)
                        .unwrap_or("");
                    message.push_str(&format!(
                        "; {failed} failed and stay in the dead queues ({first})"
                    ));
                }
                let outcome = match &scan.stopped {
                    Some(why) if why.contains("cancelled") => AuditOutcome::Cancelled,
                    Some(why) => {
                        message.push_str(&format!("; stopped early: {}", problem_text(why)));
                        AuditOutcome::Failed
                    }
                    None if failed > 0 => AuditOutcome::Failed,
                    None => AuditOutcome::Done,
                };
                (outcome, message, done)
            }
            Err(e) => (AuditOutcome::Failed, format!("{e:#}"), Vec::new()),
        };
        let count = ids.len();
        if let Err(resp) = super::record(
            &app,
            &who,
            run.verb(),
            &run.target,
            outcome,
            count,
            ids,
            Some(message.clone()),
            Some(run.id.clone()),
        )
        .await
        {
            drop(resp);
        }
        tracing::info!(job = %run.id, action = run.verb(), outcome = %outcome, count, "console job ended");
        if let Ok(mut e) = run.ended.lock() {
            *e = Some(Ended {
                at: Utc::now(),
                outcome,
                message,
            });
        }
    });
    job
}

pub async fn list(State(app): State<Shared>, Viewer(who): Viewer) -> Response {
    let jobs = app.jobs.all();
    let body = html! {
        h1 { "Jobs" }
        p.sub { "Replays and purges run here, in the console process; their progress survives closing the page." }
        @if jobs.is_empty() {
            div.card.muted { "No job has run since the console started." }
        } @else {
            table {
                thead { tr { th { "Job" } th { "Action" } th { "By" } th { "What" } th.num { "Done" } th { "State" } th { "Started" } } }
                tbody {
                    @for j in &jobs {
                        @let s = j.snapshot();
                        tr {
                            td { a href={"/jobs/" (j.id)} { code { (j.id) } } }
                            td { (j.verb()) }
                            td { (j.user) }
                            td { (j.target) }
                            td.num { (s.removed) " / " (j.expected) }
                            td { span class={"pill " (s.state.pill())} { (s.state) } }
                            td { (layout::when(Some(&j.started))) }
                        }
                    }
                }
            }
        }
    };
    layout::page("Jobs", "/jobs", &who, body).into_response()
}

pub async fn page(
    State(app): State<Shared>,
    Viewer(who): Viewer,
    Path(id): Path<String>,
) -> Response {
    let Some(job) = app.jobs.get(&id) else {
        return problem(
            StatusCode::NOT_FOUND,
            Some(&who),
            "No such job",
            &format!(
                "There is no job {id:?} (jobs are kept while the console runs). See the Jobs page."
            ),
        );
    };
    let s = job.snapshot();
    let pct = (100 * s.removed)
        .checked_div(s.expected)
        .map(|p| p.min(100))
        .unwrap_or(if s.finished { 100 } else { 0 });
    let body = html! {
        h1 { "Job " code { (job.id) } }
        p.sub { (job.verb()) " of " (job.target) ", started by " (job.user) " " (layout::when(Some(&job.started))) }
        div.card #job data-sse={"/jobs/" (job.id) "/live"} {
            div.row { b { "State: " } span #job-state data-live="state" { (s.state) } }
            div.bar.my12 { div #job-bar data-bar="removed" data-bar-of="expected" data-pct=(pct) {} }
            div.tiles {
                div.tile { div.n #job-removed data-live="removed" { (s.removed) } div.l { (if job.verb() == "replay" { "replayed" } else { "purged" }) } }
                div.tile { div.n data-live="expected" { (s.expected) } div.l { "to do (confirmed)" } }
                div.tile { div.n data-live="fetched" { (s.fetched) } div.l { "dead letters read" } }
                div.tile.bad { div.n #job-failed data-live="failed" { (s.failed) } div.l { "failed" } }
            }
            p #job-message data-live="message" { (s.message) }
            @if !s.finished && who.is_operator() {
                form method="post" action={"/jobs/" (job.id) "/cancel"} {
                    (layout::csrf(&who))
                    button.btn.ghost type="submit" { "Cancel (the rest stays untouched)" }
                }
            }
            p data-when-finished hidden[!s.finished] { a.btn.ghost href="/dead" { "Back to the dead letters" } " " a.btn.ghost href="/audit" { "Audit trail" } }
        }
    };
    layout::page("Job", "/jobs", &who, body).into_response()
}

pub async fn live(
    State(app): State<Shared>,
    Viewer(who): Viewer,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, Response> {
    let job = app
        .jobs
        .get(&id)
        .ok_or_else(|| (StatusCode::NOT_FOUND, "no such job").into_response())?;
    let session = who.session;
    let stream = futures::stream::unfold((job, false), move |(job, sent_final)| {
        let app = app.clone();
        let session = session.clone();
        async move {
            // Ends with the job, or with the session (sign-out, expiry).
            if sent_final || !app.auth.alive(&session) {
                return None;
            }
            let s = job.snapshot();
            let finished = s.finished;
            let event = Event::default().data(serde_json::to_string(&s).unwrap_or_default());
            if !finished {
                tokio::time::sleep(Duration::from_millis(400)).await;
            }
            Some((Ok(event), (job, finished)))
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

pub async fn cancel(
    State(app): State<Shared>,
    Path(id): Path<String>,
    Operator { who, .. }: Operator,
) -> Response {
    match app.jobs.get(&id) {
        Some(job) => {
            // Audited under whoever cancels (the job's own entries stay
            // under its starter); not recorded, not cancelled.
            if let Err(r) = super::record(
                &app,
                &who,
                "cancel",
                &format!("job {id}"),
                AuditOutcome::Asked,
                0,
                vec![],
                None,
                Some(id.clone()),
            )
            .await
            {
                return r;
            }
            job.progress.cancel.store(true, Ordering::Relaxed);
            tracing::info!(job = %id, user = %who.user, "job cancel asked");
            Redirect::to(&format!("/jobs/{id}")).into_response()
        }
        None => problem(
            StatusCode::NOT_FOUND,
            Some(&who),
            "No such job",
            "See the Jobs page.",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The page's live progress reads these spellings.
    #[test]
    fn a_jobs_state_is_running_or_its_audit_outcome() {
        assert_eq!(
            serde_json::to_string(&JobState::Running).unwrap(),
            "\"running\""
        );
        for (o, label) in [
            (AuditOutcome::Done, "done"),
            (AuditOutcome::Failed, "failed"),
            (AuditOutcome::Cancelled, "cancelled"),
        ] {
            let s = JobState::Ended(o);
            assert_eq!(s.to_string(), label);
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{label}\""));
        }
    }
}
