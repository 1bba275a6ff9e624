//! `halosync console`: the operator's web console (DESIGN §8).
//!
//! Server-rendered pages (axum + maud), plain forms plus one small script
//! (served as `/static/console.js`) for live values over server-sent
//! events; nothing is loaded from elsewhere, and every response carries the
//! security headers of [`security_headers`] (a CSP without inline script or
//! style, no framing, `nosniff`, same-origin referrers, `no-store`). Every page calls the same functions as the CLI
//! ([`crate::dlq::run`], [`crate::check::report`], [`crate::status::collect`]),
//! so the two cannot disagree.
//!
//! | module | concern |
//! |---|---|
//! | [`settings`] | the `[console]` table: users, roles, audit file |
//! | [`auth`] | sessions, CSRF, sign-in rate limit |
//! | [`access`] | the extractors that sign-in and roles are checked by (`Viewer`, `Operator`) |
//! | [`passwords`] | the few threads that check passwords |
//! | [`audit`] | the durable audit trail |
//! | [`jobs`] | server-side replay / purge runs with progress |
//! | [`layout`] | page shell, CSS, script |
//! | [`overview`], [`dead`], [`connections`], [`audit_page`], [`activity`], [`mappings`], [`reconcile`] | the pages |

pub mod access;
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
pub mod passwords;
pub mod reconcile;
pub mod settings;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use chrono::Utc;
use halosync_shared::Config;
use maud::{html, Markup};
use serde::Deserialize;

use self::audit::{AuditLog, AuditOutcome, Entry};
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
    /// For the rate budgets and tokens (`halo::ratelimit`, `halo::token`).
    pub redis: redis::aio::ConnectionManager,
    /// Everything else halosync keeps in Redis (the reconcile reports).
    pub store: halosync_shared::store::Store,
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
    /// Password checks (argon2, ~19 MiB each), a few at once.
    pub passwords: passwords::PasswordChecker,
    /// The overview's one broker connection and its live collector.
    pub live: overview::Live,
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
    let redis =
        halosync_shared::store::connect_with(&loaded.config.redis_url, &loaded.config.redis_access)
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect: {e}"))?;
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
            &loaded.config.amqp_access,
            &format!("halosync-console:{}:activity", std::process::id()),
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
    let store = halosync_shared::store::Store::new(
        redis.clone(),
        halosync_shared::store::Keys::new(&loaded.config.prefix),
        loaded.config.worker.ledger_ttl,
    );
    let app = Arc::new(App {
        config: loaded.config,
        config_path: config_path.map(Path::to_path_buf),
        config_text: loaded.text,
        auth: Auth::new(&settings),
        audit,
        jobs: jobs::Jobs::default(),
        store,
        redis,
        dummy_hash: settings::hash_password(&auth::random_token())?,
        activity,
        activity_error,
        unmapped_cache: std::sync::Mutex::new(None),
        passwords: passwords::PasswordChecker::start(settings.login_concurrency)
            .context("starting the password-check threads")?,
        live: overview::Live::default(),
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

/// The Content Security Policy of every response: only this origin's
/// script, style, images and connections; no inline script or style, no
/// plugins, no framing by anyone, forms post only here. Browsers report a
/// violation to `/csp-report`, which logs it (a page that breaks the
/// policy shows up in the console's log).
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'; report-uri /csp-report";

/// The security headers on every response (tower-http's
/// `SetResponseHeaderLayer`): CSP, `X-Frame-Options: DENY` for browsers
/// without `frame-ancestors`, `nosniff`, `Referrer-Policy: same-origin`,
/// and `Cache-Control: no-store` (pages and exports show billing data)
/// unless a response sets its own.
pub fn security_headers(router: Router) -> Router {
    use tower_http::set_header::SetResponseHeaderLayer;
    router
        .layer(SetResponseHeaderLayer::overriding(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::X_FRAME_OPTIONS,
            HeaderValue::from_static("DENY"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::REFERRER_POLICY,
            HeaderValue::from_static("same-origin"),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        ))
}

pub fn router(app: Shared) -> Router {
    let routes = Router::new()
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/static/console.js", get(script))
        .route("/static/console.css", get(style))
        .route(
            "/csp-report",
            post(csp_report).layer(axum::extract::DefaultBodyLimit::max(16 * 1024)),
        )
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
        .with_state(app);
    security_headers(routes)
}

async fn script() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        layout::JS,
    )
        .into_response()
}

/// A browser's CSP violation report (`application/csp-report`): one log
/// line, its fields (the browser's, so shortened) as structured fields.
async fn csp_report(body: Bytes) -> StatusCode {
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let r = &v["csp-report"];
    let field = |k: &str| -> String { r[k].as_str().unwrap_or("").chars().take(200).collect() };
    tracing::warn!(
        directive = %field("violated-directive"),
        blocked = %field("blocked-uri"),
        page = %field("document-uri"),
        "CSP violation reported by a browser"
    );
    StatusCode::NO_CONTENT
}

async fn style() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        layout::CSS,
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
        p { a href="/" data-back { "Back" } " · " a href="/" { "Overview" } }
    };
    let markup = match who {
        Some(w) => layout::page(title, "", w, body),
        None => layout::bare(title, body),
    };
    html_response(status, markup)
}

/// The highest page number a list accepts (`?page=` beyond it shows this
/// page): page arithmetic can never overflow.
pub const MAX_PAGE: usize = 1_000_000;

/// A `page` query parameter as a page number in `1..=MAX_PAGE`: missing,
/// not a number or 0 give 1; larger numbers give [`MAX_PAGE`].
pub fn page_number(raw: Option<&str>) -> usize {
    match raw.map(str::trim).filter(|s| !s.is_empty()) {
        None => 1,
        Some(s) if s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse::<usize>().unwrap_or(MAX_PAGE).clamp(1, MAX_PAGE)
        }
        Some(_) => 1,
    }
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
    outcome: AuditOutcome,
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
        outcome,
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

/// Where to go after signing in: only a path of this console. `next` is
/// parsed as a URL relative to a placeholder origin (the way a browser
/// resolves it, tabs and newlines stripped, `\\` read as `/`); anything that
/// leaves that origin (`//host`, `/\\host`, `https:`, `/%09/host` …) gives
/// the overview, and only the path and query are kept.
pub fn safe_next(next: Option<&str>) -> String {
    const BASE: &str = "http://console.invalid/";
    let Some(n) = next.map(str::trim).filter(|n| n.starts_with('/')) else {
        return "/".to_string();
    };
    let Ok(base) = url::Url::parse(BASE) else {
        return "/".to_string();
    };
    match base.join(n) {
        Ok(u) if u.origin() == base.origin() => {
            let path = u.path();
            // A path that a browser could read as another host once
            // decoded or re-resolved is not worth the risk.
            let decoded = path.to_ascii_lowercase();
            if path.starts_with("//")
                || decoded.starts_with("/%2f")
                || decoded.starts_with("/%5c")
                || decoded.starts_with("/%09")
                || path.contains('\\')
            {
                return "/".to_string();
            }
            match u.query() {
                Some(q) => format!("{path}?{q}"),
                None => path.to_string(),
            }
        }
        _ => "/".to_string(),
    }
}

fn login_form(next: &str, error: Option<&str>, user: &str, token: &str) -> Markup {
    layout::bare(
        "Sign in",
        html! {
            div.login.card {
                h1 { "halosync console" }
                p.sub { "Sign in to see and manage the sync." }
                @if let Some(e) = error { div.msg.bad #login-error { (e) } }
                form method="post" action="/login" {
                    input type="hidden" name="next" value=(next);
                    input type="hidden" name="login_token" value=(token);
                    label { "User" input #user type="text" name="user" value=(user) autocomplete="username" autofocus; }
                    label { "Password" input #password type="password" name="password" autocomplete="current-password"; }
                    button.btn #sign-in type="submit" { "Sign in" }
                }
            }
        },
    )
}

/// The sign-in form with a fresh token (and its cookie).
fn login_answer(
    app: &App,
    headers: &HeaderMap,
    status: StatusCode,
    next: &str,
    error: Option<&str>,
    user: &str,
) -> Response {
    let (cookie, token) = auth::login_token(headers, app.settings.secure_cookies);
    (
        status,
        [(header::SET_COOKIE, cookie)],
        login_form(next, error, user, &token),
    )
        .into_response()
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
    login_answer(&app, &headers, StatusCode::OK, &next, None, "")
}

/// How long a sign-in waits for a free password check before 429.
const CHECK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Audits a sign-in that did not succeed; the user name is the one given
/// (as data, in the entry's field).
async fn audit_failed_sign_in(app: &App, user: &str, ip: std::net::IpAddr, outcome: AuditOutcome) {
    let entry = Entry {
        at: Utc::now(),
        user: user.to_string(),
        role: String::new(),
        action: "sign-in".into(),
        target: ip.to_string(),
        outcome,
        count: 0,
        event_ids: vec![],
        detail: None,
        job: None,
    };
    if let Err(e) = app.audit.record(&entry).await {
        tracing::error!(error = %format!("{e:#}"), "audit write failed");
    }
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
    let ip = app.auth.client_ip(peer.ip(), &headers);
    if !auth::same_origin(&headers) || !auth::login_token_ok(&headers, form.get("login_token")) {
        tracing::warn!(user = %user, client = %ip, "sign-in refused: cross-origin or without the form's token");
        audit_failed_sign_in(&app, &user, ip, AuditOutcome::RefusedCrossOrigin).await;
        return login_answer(
            &app,
            &headers,
            StatusCode::FORBIDDEN,
            &next,
            Some("The sign-in form was out of date or came from another site: sign in again here."),
            "",
        );
    }
    if let Err(wait) = app.auth.begin_attempt(&user, ip) {
        tracing::warn!(user = %user, client = %ip, wait_seconds = wait, "sign-in refused: too many attempts");
        audit_failed_sign_in(&app, &user, ip, AuditOutcome::RefusedTooManyAttempts).await;
        return login_answer(
            &app,
            &headers,
            StatusCode::TOO_MANY_REQUESTS,
            &next,
            Some(&format!(
                "Too many sign-ins for this user or address: try again in {wait} s."
            )),
            &user,
        );
    }
    let found = app.settings.users.get(&user).cloned();
    // Verify against a fixed hash when the user is unknown, so that timing
    // does not tell which user names exist.
    let hash = found
        .as_ref()
        .map(|u| u.password_hash.clone())
        .unwrap_or_else(|| app.dummy_hash.clone());
    // At most `login_concurrency` password checks at once, on threads of
    // their own: the rest wait briefly, then are told to come back (memory
    // stays flat under a flood).
    let Some(ok) = app.passwords.verify(password, hash, CHECK_WAIT).await else {
        tracing::warn!(user = %user, client = %ip, "sign-in refused: too many at once");
        audit_failed_sign_in(&app, &user, ip, AuditOutcome::RefusedTooManyAtOnce).await;
        return login_answer(
            &app,
            &headers,
            StatusCode::TOO_MANY_REQUESTS,
            &next,
            Some("Too many sign-ins at once: try again in a few seconds."),
            &user,
        );
    };
    match found {
        Some(u) if ok => {
            app.auth.succeeded(&u.name, ip);
            let cookie = app.auth.start(&u.name, u.role, &headers);
            tracing::info!(user = %u.name, role = u.role.as_str(), "signed in");
            let entry = Entry {
                at: Utc::now(),
                user: u.name.clone(),
                role: u.role.as_str().into(),
                action: "sign-in".into(),
                target: ip.to_string(),
                outcome: AuditOutcome::Succeeded,
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
            tracing::warn!(user = %user, client = %ip, "sign-in failed");
            audit_failed_sign_in(&app, &user, ip, AuditOutcome::Failed).await;
            login_answer(
                &app,
                &headers,
                StatusCode::UNAUTHORIZED,
                &next,
                Some("Wrong user name or password."),
                &user,
            )
        }
    }
}

async fn logout(State(app): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let form = Form::parse(&body);
    let Some(who) = app.auth.signed_in(&headers) else {
        return Redirect::to("/login").into_response();
    };
    if let Err(refused) = access::csrf_checked(&who, &form, "Reload the page and sign out again.") {
        return refused;
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

#[cfg(test)]
mod tests {
    use super::{page_number, safe_next, MAX_PAGE};

    #[test]
    fn next_is_only_ever_a_path_of_this_console() {
        for hostile in [
            "/\t/evil.example/pwn",
            "/%09/evil.example/pwn",
            "//evil.example",
            "/\\evil.example",
            "\\\\evil.example",
            "/\\/evil.example",
            "https://evil.example/",
            "https:evil.example",
            "javascript:alert(1)",
            "/%2f%2fevil.example",
            "/%5c%5cevil.example",
            "/\n/evil.example",
            "\t//evil.example",
            "evil.example",
        ] {
            let n = safe_next(Some(hostile));
            assert!(
                n.starts_with('/') && !n.starts_with("//") && !n.contains('\\'),
                "{hostile:?} -> {n:?}"
            );
            assert!(
                !n.to_ascii_lowercase().contains("evil.example") || n == "/",
                "{hostile:?} -> {n:?}"
            );
        }
        assert_eq!(
            safe_next(Some("/dead?family=usage&class=rejected")),
            "/dead?family=usage&class=rejected"
        );
        assert_eq!(safe_next(Some("/activity")), "/activity");
        assert_eq!(safe_next(None), "/");
    }

    #[test]
    fn page_numbers_are_bounded() {
        assert_eq!(page_number(Some("18446744073709551615")), MAX_PAGE);
        assert_eq!(page_number(Some("99999999999999999999999")), MAX_PAGE);
        assert_eq!(page_number(Some("0")), 1);
        assert_eq!(page_number(Some("-3")), 1);
        assert_eq!(page_number(Some("x")), 1);
        assert_eq!(page_number(None), 1);
        assert_eq!(page_number(Some("7")), 7);
    }
}
