//! The overview: per family the queues (ready, in retry, dead, consumers);
//! per connection the HaloPSA budget used in the current window, until when
//! the shared token is valid, the last successful write, the activity of
//! the last 24 hours and 30 days, and the unmapped skus waiting. The page
//! renders it once and then follows `/live/overview` (server-sent events).
//!
//! However many streams are open, one collector per console process reads
//! the numbers once per [`INTERVAL`] (only while someone watches) and hands
//! them to every stream through a `tokio::sync::watch`; the page and the
//! collector share one broker connection ([`Live`]). Streams are capped per
//! session ([`STREAMS_PER_SESSION`]) and overall ([`STREAMS_TOTAL`]), and a
//! stream ends within one interval of its session (sign-out, expiry).

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use futures::stream::Stream;
use halosync_shared::halo::ratelimit::RateLimiter;
use halosync_shared::halo::token::TokenProvider;
use halosync_shared::store::Keys;
use halosync_shared::Settled;
use maud::html;
use serde::Serialize;

use super::access::Viewer;
use super::{activity, layout, mappings, problem, App, Shared};

/// How often the live numbers are read.
pub const INTERVAL: Duration = Duration::from_secs(2);
/// Live streams one session may hold open (a few tabs).
pub const STREAMS_PER_SESSION: usize = 4;
/// Live streams of the whole console.
pub const STREAMS_TOTAL: usize = 64;

/// The overview's shared state: one broker connection, one collector
/// feeding a watch channel, and the open streams per session.
#[derive(Default)]
pub struct Live {
    conn: tokio::sync::Mutex<Option<Arc<lapin::Connection>>>,
    tx: OnceLock<tokio::sync::watch::Sender<Option<Arc<String>>>>,
    streams: Mutex<HashMap<String, usize>>,
}

impl Live {
    /// The console's broker connection for counting queues, opened (again)
    /// when there is none or it was lost. Named
    /// `halosync-console:{pid}:overview` in `rabbitmqctl list_connections`.
    pub async fn connection(
        &self,
        config: &halosync_shared::Config,
    ) -> anyhow::Result<Arc<lapin::Connection>> {
        let mut held = self.conn.lock().await;
        if let Some(c) = held.as_ref() {
            if c.status().connected() {
                return Ok(c.clone());
            }
        }
        let c = halosync_shared::amqp::connect_with(
            &config.amqp_url,
            &config.amqp_access,
            &format!("halosync-console:{}:overview", std::process::id()),
        )
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect: {e}"))?;
        let c = Arc::new(c);
        *held = Some(c.clone());
        Ok(c)
    }

    /// Takes a stream slot for `session`, or `None` over a cap.
    fn claim(app: &Shared, session: &str) -> Option<Slot> {
        let mut s = app.live.streams.lock().ok()?;
        let total: usize = s.values().sum();
        let mine = s.get(session).copied().unwrap_or(0);
        if total >= STREAMS_TOTAL || mine >= STREAMS_PER_SESSION {
            return None;
        }
        s.insert(session.to_string(), mine + 1);
        Some(Slot {
            app: Arc::downgrade(app),
            session: session.to_string(),
        })
    }

    /// A receiver of the collector's numbers (JSON), starting the collector
    /// on first use.
    fn subscribe(app: &Shared) -> tokio::sync::watch::Receiver<Option<Arc<String>>> {
        app.live
            .tx
            .get_or_init(|| {
                let (tx, _) = tokio::sync::watch::channel(None);
                tokio::spawn(collect_loop(Arc::downgrade(app), tx.clone()));
                tx
            })
            .subscribe()
    }
}

/// An open stream; gives its place back when the stream is dropped.
struct Slot {
    app: Weak<App>,
    session: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(app) = self.app.upgrade() {
            if let Ok(mut s) = app.live.streams.lock() {
                if let Some(n) = s.get_mut(&self.session) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        s.remove(&self.session);
                    }
                }
            }
        }
    }
}

/// The one collector: every [`INTERVAL`], while any stream is open, reads
/// the overview once and hands it to all streams.
async fn collect_loop(app: Weak<App>, tx: tokio::sync::watch::Sender<Option<Arc<String>>>) {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(app) = app.upgrade() else { return };
        if tx.receiver_count() == 0 {
            continue;
        }
        let o = gather(&app).await;
        let json = serde_json::to_string(&o).unwrap_or_default();
        tx.send_replace(Some(Arc::new(json)));
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct FamilyRow {
    pub ready: u32,
    pub retry: u32,
    pub dead: u32,
    pub consumers: u32,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ConnectionRow {
    pub budget_used: u32,
    pub budget_limit: u32,
    pub window_seconds: u64,
    /// A shared 429 pause still running, in seconds.
    pub paused_seconds: u64,
    pub token_valid_until: Option<DateTime<Utc>>,
    pub token: String,
    pub last_write: Option<DateTime<Utc>>,
    pub last_write_text: String,
    pub applied_24h: u64,
    pub superseded_24h: u64,
    pub failed_24h: u64,
    pub unmapped: usize,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Overview {
    pub at: String,
    pub families: BTreeMap<String, FamilyRow>,
    pub total: FamilyRow,
    pub unrouted: u32,
    pub connections: BTreeMap<String, ConnectionRow>,
    /// Per day (oldest first): date, applied, superseded, failed.
    pub daily: Vec<activity::Day>,
    /// Problems reading one of the sources (shown, never fatal).
    pub problems: Vec<String>,
}

/// Reads every number of the overview.
pub async fn gather(app: &Shared) -> Overview {
    let mut o = Overview {
        at: Utc::now().format("%H:%M:%S UTC").to_string(),
        ..Default::default()
    };
    let counts = match app.live.connection(&app.config).await {
        Ok(conn) => crate::status::collect_on(&conn, &app.config).await,
        Err(e) => Err(e),
    };
    match counts {
        Ok((families, unrouted)) => {
            for (f, s) in families {
                let row = FamilyRow {
                    ready: s.work.messages,
                    retry: s.retry.values().map(|q| q.messages).sum(),
                    dead: s.dead.messages,
                    consumers: s.work.consumers,
                };
                o.total.ready += row.ready;
                o.total.retry += row.retry;
                o.total.dead += row.dead;
                o.total.consumers += row.consumers;
                o.families.insert(f.as_str().to_string(), row);
            }
            o.unrouted = unrouted.messages;
        }
        Err(e) => o.problems.push(format!("queues: {e:#}")),
    }
    let keys = Keys::new(&app.config.prefix);
    let http = halosync_shared::halo::http_client(Duration::from_secs(5)).ok();
    let now = Utc::now();
    for (name, conn) in &app.config.connections {
        let mut row = ConnectionRow {
            budget_limit: conn.requests_per_window,
            window_seconds: conn.window.as_secs(),
            token: "none cached".into(),
            last_write_text: "–".into(),
            ..Default::default()
        };
        let limiter = RateLimiter::new(
            app.redis.clone(),
            keys.rate_limit(name),
            name,
            conn.requests_per_window,
            conn.window,
            app.config.worker.rate_margin,
            app.config.worker.rate_wait_max,
        );
        match limiter.usage().await {
            Ok((used, limit, paused)) => {
                row.budget_used = used;
                // The limit in force: lower than the configured one for a
                // while after HaloPSA answered 429 (halo::ratelimit).
                row.budget_limit = limit;
                row.paused_seconds = paused.as_secs();
            }
            Err(e) => o.problems.push(format!("{name} budget: {e}")),
        }
        if let Some(http) = &http {
            let tokens = TokenProvider::new(
                Arc::new(conn.clone()),
                http.clone(),
                app.redis.clone(),
                &keys,
            );
            match tokens.valid_for().await {
                Ok(Some(d)) => {
                    let until = now + chrono::Duration::from_std(d).unwrap_or_default();
                    row.token = format!(
                        "valid until {} ({} min)",
                        until.format("%H:%M:%S UTC"),
                        d.as_secs() / 60
                    );
                    row.token_valid_until = Some(until);
                }
                Ok(None) => {}
                Err(e) => o.problems.push(format!("{name} token: {e}")),
            }
        }
        o.connections.insert(name.clone(), row);
    }
    activity::fill_overview(app, &mut o).await;
    mappings::fill_overview(app, &mut o).await;
    o
}

pub async fn page(State(app): State<Shared>, Viewer(who): Viewer) -> Response {
    let o = gather(&app).await;
    let body = html! {
        div #overview data-sse="/live/overview" {
            h1 { "Overview" }
            p.sub { "Live: updated every few seconds · last update " span data-live="at" { (o.at) } }
            @for p in &o.problems { div.msg.bad { (p) } }
            div.tiles {
                div.tile { div.n #total-ready data-live="total.ready" { (o.total.ready) } div.l { "ready" } }
                div.tile.warn { div.n #total-retry data-live="total.retry" { (o.total.retry) } div.l { "in retry" } }
                div.tile.bad { div.n #total-dead data-live="total.dead" { (o.total.dead) } div.l { a href="/dead" { "dead letters" } } }
                div.tile { div.n #total-consumers data-live="total.consumers" { (o.total.consumers) } div.l { "consumers" } }
                div.tile { div.n #unrouted data-live="unrouted" { (o.unrouted) } div.l { "unrouted" } }
            }
            h2 { "Queues per family" }
            table #families {
                thead { tr { th { "Family" } th.num { "Ready" } th.num { "In retry" } th.num { "Dead" } th.num { "Consumers" } } }
                tbody {
                    @for (f, r) in halosync_shared::Family::ALL.iter().filter_map(|f| o.families.get(f.as_str()).map(|r| (f.as_str(), r))) {
                        tr id={"family-" (f)} {
                            td { b { (f) } }
                            td.num data-live={"families." (f) ".ready"} { (r.ready) }
                            td.num data-live={"families." (f) ".retry"} { (r.retry) }
                            td.num data-live={"families." (f) ".dead"} { a href={"/dead?family=" (f)} { (r.dead) } }
                            td.num data-live={"families." (f) ".consumers"} { (r.consumers) }
                        }
                    }
                }
            }
            h2 { "Connections" }
            table #connections {
                thead { tr {
                    th { "Connection" } th.num { "Applied 24 h" } th.num { "Superseded 24 h" } th.num { "Failed 24 h" }
                    th.num { "HaloPSA budget used" } th { "Token" } th { "Last write to HaloPSA" } th.num { "Unmapped skus" }
                } }
                tbody {
                    @for (name, c) in &o.connections {
                        tr id={"conn-" (name)} {
                            td { b { (name) } }
                            td.num data-live={"connections." (name) ".applied_24h"} { (c.applied_24h) }
                            td.num data-live={"connections." (name) ".superseded_24h"} { (c.superseded_24h) }
                            td.num { a href={"/activity?connection=" (name) "&outcome=dead-lettered"} data-live={"connections." (name) ".failed_24h"} { (c.failed_24h) } }
                            td.num { span data-live={"connections." (name) ".budget_used"} { (c.budget_used) } " / " (c.budget_limit) " per " (c.window_seconds) " s"
                                @if c.paused_seconds > 0 { " " span.pill.bad { "paused " (c.paused_seconds) " s (429)" } } }
                            td data-live={"connections." (name) ".token"} { (c.token) }
                            td data-live={"connections." (name) ".last_write_text"} { (c.last_write_text) }
                            td.num { a href="/mappings" data-live={"connections." (name) ".unmapped"} { (c.unmapped) } }
                        }
                    }
                }
            }
            h2 { "Last 30 days" }
            div.daily #daily {
                @for d in &o.daily {
                    div.d { b { (d.date) } span title=(Settled::Applied) { "✔ " (d.applied) } br; span.muted title=(Settled::Superseded) { "≈ " (d.superseded) } br; span.f title={"failed (" (Settled::DeadLettered) ")"} { "✘ " (d.failed) } }
                }
            }
        }
    };
    layout::page("Overview", "/", &who, body).into_response()
}

pub async fn live(
    State(app): State<Shared>,
    Viewer(who): Viewer,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, Response> {
    let Some(slot) = Live::claim(&app, &who.session) else {
        return Err(problem(
            StatusCode::TOO_MANY_REQUESTS,
            Some(&who),
            "Too many live pages",
            &format!(
                "At most {STREAMS_PER_SESSION} live pages per session ({STREAMS_TOTAL} in all) follow the numbers; close another tab and reload."
            ),
        ));
    };
    let rx = Live::subscribe(&app);
    let stream = futures::stream::unfold((app, rx, slot), |(app, mut rx, slot)| async move {
        loop {
            let changed = tokio::time::timeout(INTERVAL, rx.changed()).await;
            // The session ended (sign-out, expiry): so does the stream.
            if !app.auth.alive(&slot.session) {
                return None;
            }
            match changed {
                Ok(Ok(())) => {
                    let data = rx.borrow_and_update().clone();
                    if let Some(d) = data {
                        let event = Event::default().data(d.as_str());
                        return Some((Ok(event), (app, rx, slot)));
                    }
                }
                Ok(Err(_)) => return None,
                Err(_) => {}
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
