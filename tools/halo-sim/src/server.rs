//! HTTP dispatch: the authorisation server (`/auth`), the resource server
//! (`/api`) and the simulator controls (`/_sim`).
//!
//! Routing is done by hand in one fallback handler so that entity segments
//! are matched case-insensitively (HaloPSA accepts `/api/client` as well as
//! `/api/Client`) and so that every request, including unknown paths, is
//! counted under a stable endpoint key.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::state::{Shared, TokenInfo};
use crate::store::{ApiError, Area, Kind, Obj, Query};
use crate::Faults;

/// Largest request body accepted.
const BODY_LIMIT: usize = 16 * 1024 * 1024;

fn json_response(status: u16, body: &Value) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        body.to_string(),
    )
        .into_response()
}

fn text_response(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

fn error_response(err: ApiError) -> Response {
    json_response(err.status, &err.body)
}

/// The single entry point for every request.
pub(crate) async fn handle(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let uri = req.uri().clone();
    let headers = req.headers().clone();
    let body = match axum::body::to_bytes(req.into_body(), BODY_LIMIT).await {
        Ok(b) => b,
        Err(_) => {
            return text_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Request body too large or unreadable".into(),
            )
        }
    };
    let path = uri.path().to_string();
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let first = segs
        .first()
        .map(|s| s.to_ascii_lowercase())
        .unwrap_or_default();

    let (key, response) = match first.as_str() {
        "auth" => auth(&shared, &method, &segs[1..], uri.query(), &body),
        "api" => {
            {
                let mut inner = shared.lock();
                inner.counters.total_api += 1;
                inner.counters.api_log.push(started);
            }
            api(&shared, &method, &segs[1..], uri.query(), &headers, body).await
        }
        "_sim" => return sim_control(&shared, &method, &segs[1..], &body),
        _ => (
            None,
            text_response(StatusCode::NOT_FOUND, "Not found".into()),
        ),
    };
    let status = response.status().as_u16();
    if let Some(key) = &key {
        shared.lock().counters.record(key, status);
    }
    tracing::info!(
        method = %method,
        path = %path,
        endpoint = key.as_deref().unwrap_or("-"),
        status,
        elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        "request"
    );
    response
}

// ----- /auth ----------------------------------------------------------------

fn auth(
    shared: &Shared,
    method: &Method,
    segs: &[&str],
    query: Option<&str>,
    body: &Bytes,
) -> (Option<String>, Response) {
    let is_token = segs.len() == 1 && segs[0].eq_ignore_ascii_case("token");
    if !is_token {
        let key = format!("{method} /auth/{}", segs.join("/"));
        return (
            Some(key),
            text_response(StatusCode::NOT_FOUND, "Not found".into()),
        );
    }
    let key = format!("{method} /auth/token");
    if method != Method::POST {
        return (
            Some(key),
            json_response(405, &json!({"error": "method_not_allowed"})),
        );
    }
    (Some(key), token(shared, query, body))
}

/// The large HTML error page Halo answers a token request with when the
/// tenant is missing or wrong.
fn halo_error_page() -> String {
    let mut page = String::with_capacity(70_000);
    page.push_str(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <title>Error</title>\n<style>body{font-family:sans-serif;background:#f5f5f5}\
         .box{margin:10% auto;width:480px;background:#fff;padding:24px}</style>\n</head>\n\
         <body>\n<div class=\"box\">\n<h1>Sorry, something went wrong</h1>\n\
         <p>An unexpected error occurred while processing your request.</p>\n</div>\n",
    );
    // Halo's real page is ~280 KB of inlined assets; pad to keep it large-ish.
    for i in 0..800 {
        page.push_str(&format!(
            "<!-- halo-sim filler {i:04}: inlined stylesheet and script content ....... -->\n"
        ));
    }
    page.push_str("</body>\n</html>\n");
    page
}

fn token(shared: &Shared, query: Option<&str>, body: &Bytes) -> Response {
    let form: Vec<(String, String)> = serde_urlencoded::from_bytes(body).unwrap_or_default();
    let qs: Vec<(String, String)> = query
        .and_then(|q| serde_urlencoded::from_str(q).ok())
        .unwrap_or_default();
    let field = |pairs: &[(String, String)], key: &str| -> Option<String> {
        pairs
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.clone())
    };
    let mut inner = shared.lock();
    inner.counters.token_requests += 1;
    drop(inner);

    let tenant = field(&qs, "tenant")
        .filter(|t| !t.trim().is_empty())
        .or_else(|| field(&form, "tenant").filter(|t| !t.trim().is_empty()));
    if let Some(expected) = shared.tenant() {
        let ok = tenant
            .as_deref()
            .is_some_and(|t| t.trim().eq_ignore_ascii_case(expected));
        if !ok {
            tracing::warn!(
                tenant_given = tenant.is_some(),
                "token request with missing or wrong tenant"
            );
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                halo_error_page(),
            )
                .into_response();
        }
    }
    if field(&form, "grant_type").as_deref() != Some("client_credentials") {
        return json_response(400, &json!({"error": "unsupported_grant_type"}));
    }
    let id_ok = field(&form, "client_id").as_deref() == Some(shared.config.client_id.as_str());
    let secret_ok =
        field(&form, "client_secret").as_deref() == Some(shared.config.client_secret.as_str());
    if !id_ok || !secret_ok {
        return json_response(
            401,
            &json!({"error": "invalid_client", "error_description": "Invalid client credentials"}),
        );
    }
    let scope = field(&form, "scope").unwrap_or_default().trim().to_string();
    let access_token = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let lifetime = shared.config.token_lifetime_secs;
    let now = Instant::now();
    let mut inner = shared.lock();
    // Forget tokens that expired more than an hour ago.
    inner
        .tokens
        .retain(|_, t| t.expires_at + Duration::from_secs(3600) > now);
    inner.tokens.insert(
        access_token.clone(),
        TokenInfo {
            expires_at: now + Duration::from_secs(lifetime),
            scope: scope.clone(),
            revoked: false,
        },
    );
    drop(inner);
    json_response(
        200,
        &json!({
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": lifetime,
            "scope": scope,
        }),
    )
}

// ----- /api -----------------------------------------------------------------

/// What an `/api` path resolves to.
enum Target {
    AuthInfo,
    List(Kind),
    Get(Kind, i64),
    Post(Kind),
    Delete(Kind, i64),
    Lines(Kind, bool),
    NotFound,
    MethodNotAllowed,
    /// In the document, not in the simulator.
    NotSimulated,
}

/// Routes by HaloPSA's OpenAPI document first (a path it lacks is 404, a
/// method it lacks on a known path 405), then to what the simulator
/// implements. Returns the endpoint key (the document's spelling, e.g.
/// `POST /api/Invoice/updatelines`), the target and the schema of the
/// body's elements. `authinfo` is not in the document (it is the
/// discovery endpoint every instance serves) and is routed as before.
/// Is the path of a known endpoint spelt otherwise than the document?
fn bound_misspelt(method: &Method, segs: &[&str]) -> bool {
    let Ok(spec) = crate::openapi::Spec::embedded() else {
        return false;
    };
    match spec.route(method.as_str(), segs) {
        crate::openapi::Route::Known { template, .. }
        | crate::openapi::Route::MethodNotAllowed { template } => misspelt(&template, segs),
        crate::openapi::Route::Unknown => false,
    }
}

fn bound_route(method: &Method, segs: &[&str]) -> (String, Target, Option<String>) {
    let (sim_key, target) = route(method, segs);
    if matches!(target, Target::AuthInfo)
        || (segs.len() == 1 && segs[0].eq_ignore_ascii_case("authinfo"))
    {
        return (sim_key, target, None);
    }
    let spec = match crate::openapi::Spec::embedded() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "the embedded OpenAPI document does not parse");
            return (sim_key, Target::NotFound, None);
        }
    };
    match spec.route(method.as_str(), segs) {
        crate::openapi::Route::Unknown => (sim_key, Target::NotFound, None),
        crate::openapi::Route::MethodNotAllowed { template } => (
            format!("{method} /api{template}"),
            Target::MethodNotAllowed,
            None,
        ),
        crate::openapi::Route::Known { template, body } => {
            let key = format!("{method} /api{template}");
            let target = match target {
                Target::NotFound | Target::MethodNotAllowed => Target::NotSimulated,
                t => t,
            };
            (key, target, body)
        }
    }
}

/// Do the literal segments of `segs` differ in case from `template`'s?
/// (HaloPSA routes case-insensitively, so such a request works; halosync
/// should still spell paths the document's way.)
fn misspelt(template: &str, segs: &[&str]) -> bool {
    template
        .split('/')
        .filter(|s| !s.is_empty())
        .zip(segs)
        .any(|(t, s)| !t.contains('{') && t != *s)
}

fn route(method: &Method, segs: &[&str]) -> (String, Target) {
    let generic_key = || {
        let parts: Vec<String> = segs
            .iter()
            .map(|s| {
                if s.parse::<i64>().is_ok() {
                    "{id}".to_string()
                } else {
                    (*s).to_string()
                }
            })
            .collect();
        format!("{method} /api/{}", parts.join("/"))
    };
    let Some(first) = segs.first() else {
        return (generic_key(), Target::NotFound);
    };
    if first.eq_ignore_ascii_case("authinfo") && segs.len() == 1 {
        let target = if method == Method::GET {
            Target::AuthInfo
        } else {
            Target::MethodNotAllowed
        };
        return (format!("{method} /api/authinfo"), target);
    }
    let Some(kind) = Kind::from_segment(first) else {
        return (generic_key(), Target::NotFound);
    };
    let name = kind.name();
    match segs.get(1..).unwrap_or(&[]) {
        [] => {
            let key = format!("{method} /api/{name}");
            let target = match *method {
                Method::GET => Target::List(kind),
                Method::POST => Target::Post(kind),
                _ => Target::MethodNotAllowed,
            };
            (key, target)
        }
        [sub] => {
            if let Ok(id) = sub.parse::<i64>() {
                let key = format!("{method} /api/{name}/{{id}}");
                let target = match *method {
                    Method::GET => Target::Get(kind, id),
                    Method::DELETE => Target::Delete(kind, id),
                    _ => Target::MethodNotAllowed,
                };
                return (key, target);
            }
            let lower = sub.to_ascii_lowercase();
            if kind.has_lines() && (lower == "lines" || lower == "updatelines") {
                let update = lower == "updatelines";
                let key = format!(
                    "{method} /api/{name}/{}",
                    if update { "updatelines" } else { "Lines" }
                );
                let target = if method == Method::POST {
                    Target::Lines(kind, update)
                } else {
                    Target::MethodNotAllowed
                };
                return (key, target);
            }
            (generic_key(), Target::NotFound)
        }
        _ => (generic_key(), Target::NotFound),
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

fn invalid_token(description: Option<&str>) -> Response {
    let body = match description {
        Some(d) => json!({"error": "invalid_token", "error_description": d}),
        None => json!({"error": "invalid_token"}),
    };
    let mut resp = json_response(401, &body);
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer error=\"invalid_token\""),
    );
    resp
}

/// Does a space-separated scope string grant `area` (`write` = edit)?
fn scope_grants(scope: &str, area: Area, write: bool) -> bool {
    scope.split_whitespace().any(|s| {
        let s = s.to_ascii_lowercase();
        if s == "all" {
            return true;
        }
        match s.split_once(':') {
            Some((action, what)) => {
                Area::parse(what) == Some(area)
                    && match action {
                        "edit" => true,
                        "read" => !write,
                        _ => false,
                    }
            }
            None => false,
        }
    })
}

/// Is `area` (read or write) on the login agent's deny list? Entries look like
/// `customers:write`, `items:read` (also `edit:`/`read:` prefix forms, or a bare
/// area for both). Lacking read also means lacking write.
fn denied(deny: &[String], area: Area, write: bool) -> bool {
    deny.iter().any(|entry| {
        let entry = entry.trim().to_ascii_lowercase();
        let (a, b) = entry.split_once(':').unwrap_or((entry.as_str(), ""));
        let (what, action) = if Area::parse(a).is_some() {
            (a, b)
        } else {
            (b, a)
        };
        if Area::parse(what) != Some(area) {
            return false;
        }
        match action {
            "" | "read" => true,
            "write" | "edit" => write,
            _ => false,
        }
    })
}

fn forbidden(area: Area, write: bool) -> Response {
    text_response(
        StatusCode::FORBIDDEN,
        format!(
            "You do not have permission to access this resource ({} {} access required)",
            area.name(),
            if write { "edit" } else { "read" }
        ),
    )
}

async fn api(
    shared: &Shared,
    method: &Method,
    segs: &[&str],
    query: Option<&str>,
    headers: &HeaderMap,
    body: Bytes,
) -> (Option<String>, Response) {
    let (key, target, schema) = bound_route(method, segs);
    if bound_misspelt(method, segs) {
        let sent = format!("{method} /api/{}", segs.join("/"));
        *shared.lock().counters.misspelt.entry(sent).or_insert(0) += 1;
    }
    let key = Some(key);

    let latency = shared.lock().faults.latency_ms;
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    if *method != Method::GET {
        hold_write(shared).await;
    }

    if let Target::AuthInfo = target {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(|h| format!("http://{h}"))
            .unwrap_or_else(|| shared.base_url.clone());
        let body = json!({
            "auth_url": format!("{host}/auth"),
            "tenant_id": shared.tenant().unwrap_or(""),
        });
        return (key, json_response(200, &body));
    }

    let mut inner = shared.lock();

    // Authentication.
    let Some(token) = bearer(headers) else {
        return (key, invalid_token(None));
    };
    let Some(info) = inner.tokens.get(token).cloned() else {
        return (key, invalid_token(None));
    };
    if info.revoked || Instant::now() >= info.expires_at {
        let resp = if inner.faults.expired_token_status == 400 {
            text_response(StatusCode::BAD_REQUEST, "Token not found".into())
        } else {
            invalid_token(Some("The access token has expired"))
        };
        return (key, resp);
    }
    if info.scope.trim().is_empty() {
        return (key, invalid_token(Some("The access token has no scope")));
    }

    // Faults.
    if inner.faults.fail_next > 0 {
        inner.faults.fail_next -= 1;
        return (
            key,
            json_response(
                503,
                &json!({"ClassName": "Exception", "Message": "Simulated service unavailable"}),
            ),
        );
    }
    if inner.faults.error_rate > 0.0 && rand::random::<f64>() < inner.faults.error_rate {
        return (
            key,
            json_response(
                500,
                &json!({"ClassName": "Exception", "Message": "Simulated server error"}),
            ),
        );
    }
    if let Some(limit) = inner.faults.rate_limit.clone() {
        let now = Instant::now();
        let window = Duration::from_secs(limit.window_secs);
        while inner
            .rate_window
            .front()
            .is_some_and(|t| now.duration_since(*t) >= window)
        {
            inner.rate_window.pop_front();
        }
        if u64::try_from(inner.rate_window.len()).unwrap_or(u64::MAX) >= limit.requests {
            let unit = if limit.window_secs % 60 == 0 {
                format!("{} minute", limit.window_secs / 60)
            } else {
                format!("{} second", limit.window_secs)
            };
            let body = json!({
                "error": format!(
                    "Rate Limit Reached - {} Requests per rolling {unit} window",
                    limit.requests
                )
            });
            let mut resp = json_response(429, &body);
            if limit.retry_after {
                let wait = inner
                    .rate_window
                    .front()
                    .map(|oldest| (*oldest + window).saturating_duration_since(now))
                    .unwrap_or_default();
                let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
            }
            return (key, resp);
        }
        inner.rate_window.push_back(now);
    }

    // Routing and permissions.
    let (kind, write) = match &target {
        Target::AuthInfo => return (key, json_response(500, &json!({}))),
        Target::NotFound => {
            return (
                key,
                json_response(
                    404,
                    &json!({"ClassName": "NotFoundException", "Message": "No such endpoint"}),
                ),
            )
        }
        Target::MethodNotAllowed => {
            return (
                key,
                json_response(
                    405,
                    &json!({"ClassName": "MethodNotAllowed", "Message": "Method not allowed"}),
                ),
            )
        }
        Target::NotSimulated => {
            return (
                key,
                json_response(
                    501,
                    &json!({"ClassName": "NotImplemented", "Message": "HaloPSA has this endpoint; halo-sim does not simulate it"}),
                ),
            )
        }
        Target::List(k) | Target::Get(k, _) => (*k, false),
        Target::Post(k) | Target::Delete(k, _) | Target::Lines(k, _) => (*k, true),
    };
    let area = kind.area();
    if !scope_grants(&info.scope, area, write) || denied(&inner.faults.deny, area, write) {
        return (key, forbidden(area, write));
    }

    // The endpoint itself.
    let q = Query::parse(query);
    let faults = inner.faults.clone();
    let path_key = key.clone().unwrap_or_default();
    let mut parse_body = |body: &Bytes| -> Result<Value, ApiError> {
        let raw: Value = serde_json::from_slice(body).map_err(|e| {
            ApiError::bad_request("JsonReaderException", format!("Invalid JSON body: {e}"))
        })?;
        let Some(schema) = schema.as_deref() else {
            return Ok(raw);
        };
        // Bound as HaloPSA's Newtonsoft binder does (openapi.rs): a wrong
        // type refuses the whole request before anything is saved; a
        // property the model lacks is dropped, and counted.
        let spec =
            crate::openapi::Spec::embedded().map_err(|e| ApiError::bad_request("Exception", e))?;
        let bound = spec
            .bind_array(schema, raw, crate::openapi::Mode::Newtonsoft)
            .map_err(|m| ApiError::bad_request("JsonSerializationException", m))?;
        if !bound.ignored.is_empty() {
            inner.counters.record_ignored(&path_key, &bound.ignored);
        }
        Ok(bound.value)
    };
    let result = match target {
        Target::List(k) => Ok(inner.data.list(k, &q)),
        Target::Get(k, id) => inner.data.get(k, id, &q),
        Target::Delete(k, id) => inner.data.delete(k, id),
        Target::Post(k) => {
            let parsed = parse_body(&body);
            parsed.and_then(|v| {
                let refuse = inner.take_scheduled_refusal(&v);
                let v = scheduled_prefix(v, refuse);
                let saved = inner.data.post(k, v, &faults);
                scheduled_refusal(saved, refuse)
            })
        }
        Target::Lines(k, update) => {
            let parsed = parse_body(&body);
            parsed.and_then(|v| {
                let refuse = inner.take_scheduled_refusal(&v);
                let v = scheduled_prefix(v, refuse);
                let saved = inner.data.post_lines(k, update, v, &faults);
                scheduled_refusal(saved, refuse)
            })
        }
        Target::AuthInfo | Target::NotFound | Target::MethodNotAllowed | Target::NotSimulated => {
            Ok(Value::Null) // handled above
        }
    };
    if matches!(&result, Err(e) if e.partial) {
        inner.counters.partial_saves += 1;
    }
    if write && result.is_ok() && lose_answer(&mut inner) {
        inner.counters.lost_responses += 1;
        drop(inner);
        tracing::info!("write applied, answer lost (fault)");
        return (
            key,
            json_response(
                500,
                &json!({"ClassName": "Exception", "Message": "Simulated server error"}),
            ),
        );
    }
    drop(inner);
    let resp = match result {
        Ok(v) => json_response(200, &v),
        Err(e) => error_response(e),
    };
    (key, resp)
}

/// The fault `hold_writes_after`: once that many writes were applied, a
/// write waits here, before anything of it is applied, until the fault is
/// lifted. A client that dies meanwhile drops the request with it (hyper
/// cancels the handler), as a request that never reached HaloPSA.
async fn hold_write(shared: &Shared) {
    /// Counts a waiting write in `held_writes` for as long as it waits,
    /// also when its handler is cancelled.
    struct Waiting<'a>(&'a Shared);
    impl Drop for Waiting<'_> {
        fn drop(&mut self) {
            let mut inner = self.0.lock();
            inner.counters.held_writes = inner.counters.held_writes.saturating_sub(1);
        }
    }
    let held = |shared: &Shared| {
        let inner = shared.lock();
        inner
            .faults
            .hold_writes_after
            .is_some_and(|n| inner.counters.writes_applied >= n)
    };
    if !held(shared) {
        return;
    }
    shared.lock().counters.held_writes += 1;
    let _waiting = Waiting(shared);
    while held(shared) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The elements of a POST that a scheduled partial save keeps: the first
/// `refuse` of the array (all of it when nothing is scheduled).
fn scheduled_prefix(body: Value, refuse: Option<usize>) -> Value {
    match (body, refuse) {
        (Value::Array(mut elements), Some(n)) => {
            elements.truncate(n);
            Value::Array(elements)
        }
        (body, _) => body,
    }
}

/// A scheduled partial save: once the first `n` elements are saved, the
/// request fails as HaloPSA fails an array whose element `n` is refused.
fn scheduled_refusal(
    saved: Result<Value, ApiError>,
    refuse: Option<usize>,
) -> Result<Value, ApiError> {
    match (saved, refuse) {
        (Ok(_), Some(n)) => {
            let mut e = ApiError::validation(format!(
                "Element [{n}]: refused by validation (scheduled fault save_then_refuse)"
            ));
            e.partial = n > 0;
            Err(e)
        }
        (saved, _) => saved,
    }
}

/// Does this applied write lose its answer (faults `lose_writes`,
/// `lose_next`, `lost_response_rate`)? The answer is then the same 500 a
/// random error gets, so a client cannot tell the two apart: exactly the
/// case a client must survive without writing twice.
fn lose_answer(inner: &mut crate::state::Inner) -> bool {
    inner.counters.writes_applied += 1;
    if inner
        .faults
        .lose_writes
        .contains(&inner.counters.writes_applied)
    {
        return true;
    }
    if inner.faults.lose_next > 0 {
        inner.faults.lose_next -= 1;
        return true;
    }
    inner.faults.lost_response_rate > 0.0 && rand::random::<f64>() < inner.faults.lost_response_rate
}

// ----- /_sim ----------------------------------------------------------------

fn sim_control(shared: &Shared, method: &Method, segs: &[&str], body: &Bytes) -> Response {
    let what = segs.join("/").to_ascii_lowercase();
    match (method.clone(), what.as_str()) {
        (Method::GET, "state") => json_response(200, &shared.lock().data.snapshot()),
        (Method::GET, "requests") => json_response(200, &shared.lock().counters.to_json()),
        (Method::GET, "misspelt") => json_response(200, &json!(shared.lock().counters.misspelt)),
        (Method::GET, "ignored") => match serde_json::to_value(&shared.lock().counters.ignored) {
            Ok(v) => json_response(200, &v),
            Err(e) => json_response(500, &json!({"error": e.to_string()})),
        },
        (Method::GET, "currencies") => {
            json_response(200, &Value::Array(shared.lock().data.all(Kind::Currency)))
        }
        (Method::POST, "currencies") => {
            let c: Value = match serde_json::from_slice(body) {
                Ok(v) => v,
                Err(e) => {
                    return json_response(400, &json!({"error": format!("invalid JSON: {e}")}))
                }
            };
            let Some(code) = c.get("code").and_then(Value::as_str) else {
                return json_response(
                    400,
                    &json!({"error": "expected {\"code\": \"NOK\", \"name\": ...}"}),
                );
            };
            let name = c.get("name").and_then(Value::as_str).unwrap_or(code);
            let id = shared.lock().data.add_currency(code, name);
            json_response(200, &json!({"id": id, "code": code}))
        }
        (Method::POST, "reset") => {
            shared.lock().reset(shared.config.faults.clone());
            tracing::info!("simulator reset");
            json_response(200, &json!({"reset": true}))
        }
        (Method::GET, "faults") => faults_json(&shared.lock().faults),
        (Method::POST, "faults") => {
            let patch: Value = match serde_json::from_slice(body) {
                Ok(v) => v,
                Err(e) => {
                    return json_response(400, &json!({"error": format!("invalid JSON: {e}")}))
                }
            };
            let mut inner = shared.lock();
            match merge_faults(&inner.faults, patch) {
                Ok(f) => {
                    tracing::info!(faults = ?f, "faults changed");
                    inner.faults = f;
                    faults_json(&inner.faults)
                }
                Err(e) => json_response(400, &json!({"error": e})),
            }
        }
        (Method::POST, "revoke-tokens") => {
            let mut inner = shared.lock();
            let n = inner.tokens.len();
            for t in inner.tokens.values_mut() {
                t.revoked = true;
            }
            json_response(200, &json!({"revoked": n}))
        }
        (Method::POST, "items") => {
            let items: Value = match serde_json::from_slice(body) {
                Ok(v) => v,
                Err(e) => {
                    return json_response(400, &json!({"error": format!("invalid JSON: {e}")}))
                }
            };
            let Value::Array(items) = items else {
                return json_response(400, &json!({"error": "expected a JSON array of items"}));
            };
            let mut parsed = Vec::new();
            for item in items {
                let Value::Object(obj) = item else {
                    return json_response(400, &json!({"error": "each item must be an object"}));
                };
                let Some(id) = obj.get("id").and_then(crate::store::as_i64_loose) else {
                    return json_response(400, &json!({"error": "each item needs an integer id"}));
                };
                parsed.push((id, obj));
            }
            let n = parsed.len();
            let mut inner = shared.lock();
            for (id, obj) in parsed {
                seed_item(&mut inner, id, obj);
            }
            json_response(200, &json!({"inserted": n}))
        }
        _ => text_response(StatusCode::NOT_FOUND, "Unknown simulator control".into()),
    }
}

fn faults_json(f: &Faults) -> Response {
    match serde_json::to_value(f) {
        Ok(v) => json_response(200, &v),
        Err(e) => json_response(500, &json!({"error": e.to_string()})),
    }
}

/// Merges the keys of `patch` into the current faults.
pub(crate) fn merge_faults(current: &Faults, patch: Value) -> Result<Faults, String> {
    let Value::Object(patch) = patch else {
        return Err("expected a JSON object".into());
    };
    let mut value = serde_json::to_value(current).map_err(|e| e.to_string())?;
    if let Value::Object(map) = &mut value {
        for (k, v) in patch {
            map.insert(k, v);
        }
    }
    serde_json::from_value(value).map_err(|e| e.to_string())
}

/// Adds an item to the catalogue and to the seed restored by a reset.
pub(crate) fn seed_item(inner: &mut crate::state::Inner, id: i64, mut obj: Obj) {
    obj.remove("id");
    inner.seed_items.insert(id, obj.clone());
    inner.data.insert_item(id, obj);
}

/// Shortcut used by the library API to build an `Obj` for an item.
pub(crate) fn item_obj(name: &str) -> Obj {
    let mut obj = Obj::new();
    obj.insert("name".into(), json!(name));
    obj
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes() {
        assert!(scope_grants("all", Area::Invoices, true));
        assert!(scope_grants("read:customers", Area::Customers, false));
        assert!(!scope_grants("read:customers", Area::Customers, true));
        assert!(scope_grants("edit:customers", Area::Customers, false));
        assert!(scope_grants(
            "read:softwarelicensing",
            Area::Software,
            false
        ));
        assert!(scope_grants("x edit:software", Area::Software, true));
        assert!(!scope_grants("admin edit:tickets", Area::Items, false));
        assert!(!scope_grants("", Area::Items, false));
    }

    #[test]
    fn deny_list() {
        let deny = vec!["customers:write".to_string(), "read:items".to_string()];
        assert!(denied(&deny, Area::Customers, true));
        assert!(!denied(&deny, Area::Customers, false));
        assert!(denied(&deny, Area::Items, false));
        assert!(denied(&deny, Area::Items, true));
        assert!(!denied(&deny, Area::Invoices, true));
    }

    #[test]
    fn routes() {
        let (key, t) = route(&Method::GET, &["client"]);
        assert_eq!(key, "GET /api/Client");
        assert!(matches!(t, Target::List(Kind::Client)));
        let (key, t) = route(&Method::GET, &["RecurringInvoice", "-3"]);
        assert_eq!(key, "GET /api/RecurringInvoice/{id}");
        assert!(matches!(t, Target::Get(Kind::RecurringInvoice, -3)));
        let (key, t) = route(&Method::POST, &["recurringinvoice", "UpdateLines"]);
        assert_eq!(key, "POST /api/RecurringInvoice/updatelines");
        assert!(matches!(t, Target::Lines(Kind::RecurringInvoice, true)));
        let (key, t) = route(&Method::GET, &["Ticket", "5"]);
        assert_eq!(key, "GET /api/Ticket/{id}");
        assert!(matches!(t, Target::NotFound));
    }

    #[test]
    fn faults_merge() {
        let f = merge_faults(
            &Faults::default(),
            json!({"fail_next": 3, "rate_limit": {"requests": 2, "window_secs": 5}}),
        )
        .unwrap();
        assert_eq!(f.fail_next, 3);
        let rl = f.rate_limit.clone().unwrap();
        assert_eq!((rl.requests, rl.window_secs, rl.retry_after), (2, 5, true));
        let f = merge_faults(&f, json!({"rate_limit": null})).unwrap();
        assert!(f.rate_limit.is_none());
        assert_eq!(f.fail_next, 3);
        assert!(merge_faults(&f, json!({"fail_next": "x"})).is_err());
    }
}
