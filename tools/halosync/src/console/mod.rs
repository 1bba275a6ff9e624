//! `halosync console`: the operator's web console (DESIGN §8).
//!
//! Server-rendered pages (axum + maud), plain forms plus one small embedded
//! script for live values over server-sent events; nothing is loaded from
//! elsewhere. Every page calls the same functions as the CLI
//! ([`crate::dlq::run`], [`crate::check::report`], [`crate::status::collect`]),
//! so the two cannot disagree.
//!
//! | module | concern |
//! |---|---|
//! | [`settings`] | the `[console]` table: users, roles, audit file |
//! | [`auth`] | sessions, CSRF, sign-in rate limit |
//! | [`audit`] | the durable audit trail |
//! | [`jobs`] | server-side replay / purge runs with progress |
//! | [`layout`] | page shell, CSS, script |
//! | [`overview`], [`dead`], [`connections`], [`audit_page`], [`activity`], [`mappings`], [`reconcile`] | the pages |

pub mod activity;
pub mod audit;
pub mod audit_page;
pub mod auth;
pub mod connections;
pub mod dead;
pub mod jobs;
pub mod layout;
pub mod mappings;
pub mod overview;
pub mod reconcile;
pub mod settings;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use chrono::Utc;
use halosync_shared::Config;
use maud::{html, Markup};
use serde::Deserialize;

use self::audit::{AuditLog, Entry};
use self::auth::{Auth, SignedIn};
use self::settings::ConsoleSettings;

/// Everything a request handler needs.
pub struct App {
    pub config: Config,
    /// The config file, re-read by the connection test ("Save and Test").
    pub config_path: Option<PathBuf>,
    pub config_text: String,
    pub settings: ConsoleSettings,
    pub auth: Auth,
    pub audit: AuditLog,
    pub jobs: jobs::Jobs,
    pub redis: redis::aio::ConnectionManager,
    /// Verified against when the user name is unknown, so that the answer
    /// takes as long as for a known one (no user-name probing by timing).
    pub dummy_hash: String,
    /// The activity stream, read into memory (None: it could not be read,
    /// and `activity_error` says why).
    pub activity: Option<halosync_shared::activity::ActivityLog>,
    pub activity_error: Option<String>,
    /// Unmapped skus per connection, and when they were read.
    pub unmapped_cache: std::sync::Mutex<
        Option<(
            std::time::Instant,
            std::collections::BTreeMap<String, usize>,
        )>,
    >,
}

pub type Shared = Arc<App>;

/// `halosync console`
pub async fn serve(config_path: Option<&Path>, listen: Option<&str>) -> anyhow::Result<ExitCode> {
    let loaded = crate::settings::load(config_path, crate::settings::Need::NoConnections)?;
    let settings = ConsoleSettings::parse(
        loaded.config.console.as_ref(),
        listen,
        &settings::ProcessEnv,
    )?;
    let audit = AuditLog::open(&settings.audit_file)?;
    let redis = halosync_shared::store::connect(&loaded.config.redis_url)
        .await
        .with_context(|| {
            format!(
                "cannot connect to Redis at {}: is it running? Set REDIS_URL (or redis_url in halosync.toml)",
                halosync_shared::amqp::redact_url(&loaded.config.redis_url)
            )
        })?;
    // Fail at start, not on the first page, when the broker is unreachable;
    // declare the activity stream (as `halosync topology` does) so that the
    // log can be read before any worker ran.
    let conn = crate::broker::connect(&loaded.config, "console").await?;
    let queue = halosync_shared::amqp::Topology::new(&loaded.config.prefix, &[]).activity_queue();
    let declared = match conn.create_channel().await {
        Ok(ch) => halosync_shared::activity::declare_stream(&ch, &queue).await,
        Err(e) => Err(e),
    };
    crate::broker::close(&conn).await;
    let (activity, activity_error) = match declared {
        Err(e) => (
            None,
            Some(format!("cannot declare the activity stream {queue}: {e}")),
        ),
        Ok(()) => match halosync_shared::activity::ActivityLog::connect(
            &loaded.config.amqp_url,
            &loaded.config.prefix,
            halosync_shared::activity::DEFAULT_MAX_RECORDS,
        )
        .await
        {
            Ok(log) => (Some(log), None),
            Err(e) => (None, Some(e.to_string())),
        },
    };
    if let Some(e) = &activity_error {
        tracing::warn!(error = %e, "activity log unavailable");
    }
    let app = Arc::new(App {
        config: loaded.config,
        config_path: config_path.map(Path::to_path_buf),
        config_text: loaded.text,
        auth: Auth::new(&settings),
        audit,
        jobs: jobs::Jobs::default(),
        redis,
        dummy_hash: settings::hash_password(&auth::random_token())?,
        activity,
        activity_error,
        unmapped_cache: std::sync::Mutex::new(None),
        settings,
    });
    let listener = tokio::net::TcpListener::bind(app.settings.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {}: is another console running there? Use --listen 127.0.0.1:PORT",
                app.settings.listen
            )
        })?;
    let addr = listener
        .local_addr()
        .context("reading the listening address")?;
    // The one line a person looks for: where to point the browser.
    println!(
        "halosync console listening on http://{addr}/ (sign in with a user from [console.users])"
    );
    tracing::info!(%addr, audit_file = %app.audit.path().display(), "console started");
    axum::serve(
        listener,
        router(app).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown_signal())
    .await
    .context("serving the console")?;
    Ok(ExitCode::SUCCESS)
}

/// Ctrl-C or SIGTERM (`make run`, Kubernetes, compose all send SIGTERM).
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    tracing::info!("console stopping");
}

pub fn router(app: Shared) -> Router {
    Router::new()
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/static/console.js", get(script))
        .route("/healthz", get(|| async { "ok" }))
        .route("/", get(overview::page))
        .route("/live/overview", get(overview::live))
        .route("/dead", get(dead::list))
        .route("/dead/show", get(dead::show))
        .route("/dead/action", post(dead::confirm))
        .route("/dead/run", post(dead::run))
        .route("/jobs", get(jobs::list))
        .route("/jobs/{id}", get(jobs::page))
        .route("/jobs/{id}/live", get(jobs::live))
        .route("/jobs/{id}/cancel", post(jobs::cancel))
        .route("/connections", get(connections::list))
        .route("/connections/test", post(connections::test))
        .route("/audit", get(audit_page::page))
        .route("/activity", get(activity::page))
        .route("/activity.csv", get(activity::csv))
        .route("/mappings", get(mappings::page))
        .route("/mappings/set", post(mappings::set))
        .route("/reconcile", get(reconcile::page))
        .with_state(app)
}

async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        layout::JS,
    )
        .into_response()
}

/// A page answer with a status.
pub fn html_response(status: StatusCode, markup: Markup) -> Response {
    (status, markup).into_response()
}

/// An error page: what went wrong and what to do.
pub fn problem(status: StatusCode, who: Option<&SignedIn>, title: &str, message: &str) -> Response {
    let body = html! {
        h1 { (title) }
        div.msg.bad { (message) }
        p { a href="javascript:history.back()" { "Back" } " · " a href="/" { "Overview" } }
    };
    let markup = match who {
        Some(w) => layout::page(title, "", w, body),
        None => layout::bare(title, body),
    };
    html_response(status, markup)
}

/// The signed-in user of a page request, or a redirect to the sign-in form.
// The rejection is axum's own Response, returned as is by every handler;
// boxing it would only add noise at each call.
#[allow(clippy::result_large_err)]
pub fn viewer(app: &App, headers: &HeaderMap, here: &str) -> Result<SignedIn, Response> {
    app.auth.signed_in(headers).ok_or_else(|| {
        let next = serde_urlencoded::to_string([("next", here)]).unwrap_or_default();
        Redirect::to(&format!("/login?{next}")).into_response()
    })
}

/// A state-changing request: signed in (401), the session's CSRF token
/// (403) and the operator role (403), in that order.
#[allow(clippy::result_large_err)]
pub fn operator(app: &App, headers: &HeaderMap, form: &Form) -> Result<SignedIn, Response> {
    let Some(who) = app.auth.signed_in(headers) else {
        return Err(problem(
            StatusCode::UNAUTHORIZED,
            None,
            "Not signed in",
            "Sign in first: this action needs an operator's session.",
        ));
    };
    if !Auth::csrf_ok(&who, form.get("csrf")) {
        return Err(problem(
            StatusCode::FORBIDDEN,
            Some(&who),
            "Refused: missing or wrong CSRF token",
            "The form did not carry this session's security token (it may be from an old page or another site). Reload the page and try again.",
        ));
    }
    if !who.is_operator() {
        return Err(problem(
            StatusCode::FORBIDDEN,
            Some(&who),
            "Refused: operators only",
            &format!(
                "{} is signed in as a viewer, who can look but not change anything. Ask an operator, or sign in as one.",
                who.user
            ),
        ));
    }
    Ok(who)
}

/// A urlencoded form body as pairs, so that repeated fields (`id=a&id=b`)
/// survive (serde's structs would keep only one).
#[derive(Debug, Default)]
pub struct Form(pub Vec<(String, String)>);

impl Form {
    pub fn parse(body: &Bytes) -> Form {
        Form(serde_urlencoded::from_bytes(body).unwrap_or_default())
    }
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
    pub fn all(&self, key: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .collect()
    }
}

/// Records an audit entry; an entry that cannot be written is an error
/// the caller must not ignore (the action is then not done). The
/// arguments are the entry's fields, named at each call site.
#[allow(clippy::too_many_arguments)]
pub async fn record(
    app: &App,
    who: &SignedIn,
    action: &str,
    target: &str,
    outcome: &str,
    count: usize,
    event_ids: Vec<String>,
    detail: Option<String>,
    job: Option<String>,
) -> Result<(), Response> {
    let entry = Entry {
        at: Utc::now(),
        user: who.user.clone(),
        role: who.role.as_str().to_string(),
        action: action.to_string(),
        target: target.to_string(),
        outcome: outcome.to_string(),
        count,
        event_ids,
        detail,
        job,
    };
    app.audit.record(&entry).await.map_err(|e| {
        tracing::error!(error = %format!("{e:#}"), "audit write failed");
        problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            Some(who),
            "Not done: the audit trail cannot be written",
            &format!("{e:#}. Nothing was changed; fix the audit file (console.audit_file) and try again."),
        )
    })
}

#[derive(Deserialize, Default)]
struct LoginQuery {
    next: Option<String>,
}

/// Only same-site paths are followed after sign-in.
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n) if n.starts_with('/') && !n.starts_with("//") && !n.contains('\\') => n.to_string(),
        _ => "/".to_string(),
    }
}

fn login_form(next: &str, error: Option<&str>, user: &str) -> Markup {
    layout::bare(
        "Sign in",
        html! {
            div.login.card {
                h1 { "halosync console" }
                p.sub { "Sign in to see and manage the sync." }
                @if let Some(e) = error { div.msg.bad #login-error { (e) } }
                form method="post" action="/login" {
                    input type="hidden" name="next" value=(next);
                    label { "User" input #user type="text" name="user" value=(user) autocomplete="username" autofocus; }
                    label { "Password" input #password type="password" name="password" autocomplete="current-password"; }
                    button.btn #sign-in type="submit" { "Sign in" }
                }
            }
        },
    )
}

async fn login_page(
    State(app): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<LoginQuery>,
) -> Response {
    let next = safe_next(q.next.as_deref());
    if app.auth.signed_in(&headers).is_some() {
        return Redirect::to(&next).into_response();
    }
    login_form(&next, None, "").into_response()
}

async fn login(
    State(app): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form = Form::parse(&body);
    let user = form.get("user").unwrap_or("").trim().to_string();
    let password = form.get("password").unwrap_or("").to_string();
    let next = safe_next(form.get("next"));
    let ip = Some(peer.ip());
    if let Some(wait) = app.auth.locked_out(&user, ip) {
        tracing::warn!(user = %user, "sign-in refused: too many failed attempts");
        return html_response(
            StatusCode::TOO_MANY_REQUESTS,
            login_form(
                &next,
                Some(&format!(
                    "Too many failed sign-ins for this user or address: try again in {wait} s."
                )),
                &user,
            ),
        );
    }
    let found = app.settings.users.get(&user).cloned();
    // Verify against a fixed hash when the user is unknown, so that timing
    // does not tell which user names exist.
    let hash = found
        .as_ref()
        .map(|u| u.password_hash.clone())
        .unwrap_or_else(|| app.dummy_hash.clone());
    let ok = tokio::task::spawn_blocking(move || settings::verify_password(&password, &hash))
        .await
        .unwrap_or(false);
    match found {
        Some(u) if ok => {
            app.auth.succeeded(&u.name);
            let cookie = app.auth.start(&u.name, u.role, &headers);
            tracing::info!(user = %u.name, role = u.role.as_str(), "signed in");
            let entry = Entry {
                at: Utc::now(),
                user: u.name.clone(),
                role: u.role.as_str().into(),
                action: "sign-in".into(),
                target: peer.ip().to_string(),
                outcome: "ok".into(),
                count: 0,
                event_ids: vec![],
                detail: None,
                job: None,
            };
            if let Err(e) = app.audit.record(&entry).await {
                tracing::error!(error = %format!("{e:#}"), "audit write failed");
            }
            (
                StatusCode::SEE_OTHER,
                [(header::SET_COOKIE, cookie), (header::LOCATION, next)],
            )
                .into_response()
        }
        _ => {
            app.auth.failed(&user, ip);
            tracing::warn!(user = %user, "sign-in failed");
            html_response(
                StatusCode::UNAUTHORIZED,
                login_form(&next, Some("Wrong user name or password."), &user),
            )
        }
    }
}

async fn logout(State(app): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let form = Form::parse(&body);
    let Some(who) = app.auth.signed_in(&headers) else {
        return Redirect::to("/login").into_response();
    };
    if !Auth::csrf_ok(&who, form.get("csrf")) {
        return problem(
            StatusCode::FORBIDDEN,
            Some(&who),
            "Refused: missing or wrong CSRF token",
            "Reload the page and sign out again.",
        );
    }
    let cookie = app.auth.end(&who.session, &headers);
    (
        StatusCode::SEE_OTHER,
        [
            (header::SET_COOKIE, cookie),
            (header::LOCATION, "/login".to_string()),
        ],
    )
        .into_response()
}
