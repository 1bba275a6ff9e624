//! One HaloPSA connection's REST client: shared token, shared rate budget,
//! the reference's conventions (POST bodies are arrays, list envelopes or
//! bare arrays, `pageinate`), and errors classified for the runtime.

use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use serde_json::Value;
use tracing::Instrument;

use super::error::{message_from_body, HaloError, BODY_EXCERPT};
use super::ratelimit::{Priority, RateLimiter};
use super::token::TokenProvider;
use crate::config::ConnectionConfig;
use crate::error::excerpt;
use crate::outage::{Health, Report};
use crate::store::LockFence;

/// Rows per page when listing (reference §2: libraries use 100–1000; the
/// server maximum is UNCONFIRMED, so stay modest).
pub const PAGE_SIZE: usize = 100;
/// Never loop more than this many pages (guards endpoints that ignore
/// `page_no` and return page 1 forever).
const MAX_PAGES: usize = 1000;

/// One connection's client. Cloning it is cheap (the token, the budget
/// and the HTTP client are shared), which is how a client for one batch is
/// made: [`HaloClient::fenced`].
///
/// **Every write carries a fence** (any method but GET): the client a
/// worker holds ([`HaloClient::new`], `halo::client_for`) has none, and
/// its writes are refused without a request ([`HaloError::Unfenced`]):
/// it fails closed. The runtime hands each batch's handler
/// [`HaloClient::fenced`] with that batch's aggregate locks, and whatever
/// legitimately writes without aggregate locks (the operator's tool)
/// says so at the call site with [`HaloClient::unfenced`].
#[derive(Clone, Debug)]
pub struct HaloClient {
    conn: Arc<ConnectionConfig>,
    http: reqwest::Client,
    tokens: Arc<TokenProvider>,
    limiter: Arc<RateLimiter>,
    /// How long every process pauses after a 429 without `Retry-After`.
    rate_limited_pause: Duration,
    /// Where an outage of this connection is reported (`/readyz`, one log
    /// line a minute); none in the operator's tool.
    health: Option<Arc<Health>>,
    /// The longest a fenced write (one under aggregate locks) may be on
    /// the wire: the shorter of the HTTP timeout and the lock TTL, so that
    /// after a lost Redis `worker.flush_grace` need not wait longer.
    fenced_write_timeout: Option<Duration>,
    /// What this client's writes must hold to go out.
    fence: Fence,
    /// The budget class of this client's writes (a GET is always a
    /// [`Priority::Lookups`]).
    writes: Priority,
}

/// What a write must hold to go out.
#[derive(Clone, Debug)]
enum Fence {
    /// Nothing: every write is refused (a client as built, before the
    /// runtime or an explicit [`HaloClient::unfenced`] says otherwise).
    Missing,
    /// Every lock of one batch: checked right before each write goes out,
    /// after waiting for the rate budget and the token, so that a worker
    /// whose lock was lost (Redis flushed, or the lock expired) stops
    /// instead of writing after the aggregate's new holder began: an older
    /// version's write can then only land after a newer one's if it was
    /// already on the wire. A check that cannot reach Redis refuses too.
    Locks(LockFence),
    /// Writes no aggregate lock covers, on purpose: why.
    Unfenced(&'static str),
}

impl HaloClient {
    /// A client whose writes are refused until it is [`fenced`](Self::fenced)
    /// or explicitly [`unfenced`](Self::unfenced); GETs go out as they are.
    pub fn new(
        conn: Arc<ConnectionConfig>,
        http: reqwest::Client,
        tokens: TokenProvider,
        limiter: RateLimiter,
        rate_limited_pause: Duration,
    ) -> HaloClient {
        HaloClient {
            conn,
            http,
            tokens: Arc::new(tokens),
            limiter: Arc::new(limiter),
            rate_limited_pause,
            health: None,
            fenced_write_timeout: None,
            fence: Fence::Missing,
            writes: Priority::Writes,
        }
    }

    /// This client for one batch: its writes go out only while every lock
    /// of `fence` is still held, with `writes` as their budget class (the
    /// account worker's [`Priority::Accounts`]); each is cut off after the
    /// fenced write timeout.
    pub fn fenced(&self, fence: LockFence, writes: Priority) -> HaloClient {
        HaloClient {
            fence: Fence::Locks(fence),
            writes,
            ..self.clone()
        }
    }

    /// This client for writes that no aggregate lock covers, `why` saying
    /// why (the operator setting an item mapping, a test of the HaloPSA
    /// engines): the one way to write without a fence, visible where it is
    /// called.
    pub fn unfenced(&self, why: &'static str) -> HaloClient {
        HaloClient {
            fence: Fence::Unfenced(why),
            ..self.clone()
        }
    }

    /// Cuts a fenced write off after `timeout` (see `fenced_write_timeout`).
    pub fn with_fenced_write_timeout(mut self, timeout: Duration) -> HaloClient {
        self.fenced_write_timeout = Some(timeout);
        self
    }

    /// Reports this connection's outages to `health`.
    pub fn with_health(mut self, health: Arc<Health>) -> HaloClient {
        self.health = Some(health);
        self
    }

    /// Books one request's fate in the outage tracker: a network error or
    /// a 5xx is a failure to reach HaloPSA; any other answer means it is up.
    fn note_reachability(&self, failure: Option<&str>) {
        if failure.is_some() {
            self.limiter.pulse().failed();
        }
        let Some(h) = &self.health else { return };
        let service = format!("halopsa:{}", self.conn.name);
        match failure {
            Some(error) => {
                if let Report::Log { down_for, attempts } = h.failed(&service, error) {
                    tracing::warn!(connection = %self.conn.name, error, down_for_s = down_for.as_secs(), attempts,
                        "HaloPSA unreachable or failing; events are retried through the delay queues");
                }
            }
            None => {
                if let Some(d) = h.recovered(&service) {
                    tracing::info!(connection = %self.conn.name, down_for_s = d.as_secs(), "HaloPSA reachable again");
                }
            }
        }
    }

    pub fn connection(&self) -> &ConnectionConfig {
        &self.conn
    }

    /// When this connection's HaloPSA last answered and until when its
    /// budget holds requests back: what the runtime's lanes read.
    pub fn pulse(&self) -> &Arc<super::pulse::Pulse> {
        self.limiter.pulse()
    }

    pub fn tokens(&self) -> &TokenProvider {
        &self.tokens
    }

    /// `GET {resource_server}{path}` with query parameters.
    pub async fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Value, HaloError> {
        self.send(Method::GET, path, query, None).await
    }

    /// `POST {resource_server}{path}` with a JSON array body (HaloPSA takes
    /// arrays on every POST, even for one record).
    pub async fn post(&self, path: &str, records: Vec<Value>) -> Result<Value, HaloError> {
        self.send(Method::POST, path, &[], Some(Value::Array(records)))
            .await
    }

    /// POSTs an array of records and returns the saved ones by position.
    /// The answer's shape is UNCONFIRMED (reference §2), so positions are
    /// trusted only when there is one saved record per record sent (one
    /// object for one). `Err(Some(e))`: the request failed; `Err(None)`:
    /// it succeeded but the answer does not line up (logged here), so the
    /// caller must find what was saved another way.
    pub async fn post_each(
        &self,
        path: &str,
        records: Vec<Value>,
    ) -> Result<Vec<Value>, Option<HaloError>> {
        let sent = records.len();
        match self.post(path, records).await {
            Ok(Value::Array(rows)) if rows.len() == sent => Ok(rows),
            Ok(one @ Value::Object(_)) if sent == 1 => Ok(vec![one]),
            Ok(_) => {
                tracing::warn!(
                    path,
                    size = sent,
                    "the array's answer does not line up with what was sent; what it saved is looked up instead"
                );
                Err(None)
            }
            Err(e) => Err(Some(e)),
        }
    }

    pub async fn delete(&self, path: &str) -> Result<Value, HaloError> {
        self.send(Method::DELETE, path, &[], None).await
    }

    /// Saves one record (create without `id`, update with it) and returns
    /// the saved record. The response shape is UNCONFIRMED (object, array,
    /// or envelope), so all three are accepted.
    pub async fn save(&self, path: &str, record: Value) -> Result<Value, HaloError> {
        let response = self.post(path, vec![record]).await?;
        first_record(response).ok_or_else(|| {
            HaloError::Unexpected("no saved record in the response".into(), path.to_string())
        })
    }

    /// Every row of a list endpoint, paging with `pageinate=true` until
    /// `record_count` rows are collected. Accepts the `{record_count, key}`
    /// envelope or a bare array.
    pub async fn list(
        &self,
        path: &str,
        key: &str,
        query: &[(&str, String)],
    ) -> Result<Vec<Value>, HaloError> {
        Ok(self
            .list_within(path, key, query, MAX_PAGES)
            .await?
            .unwrap_or_default())
    }

    /// Like [`list`](Self::list), but gives up (`None`) after the first
    /// page when the whole list would take more than `max_requests` pages:
    /// the caller then asks for what it needs one by one instead.
    pub async fn list_within(
        &self,
        path: &str,
        key: &str,
        query: &[(&str, String)],
        max_requests: usize,
    ) -> Result<Option<Vec<Value>>, HaloError> {
        let mut rows = Vec::new();
        for page in 1..=MAX_PAGES.min(max_requests.max(1)) {
            let mut q: Vec<(&str, String)> = query.to_vec();
            q.push(("pageinate", "true".into()));
            q.push(("page_size", PAGE_SIZE.to_string()));
            q.push(("page_no", page.to_string()));
            let body = self.get(path, &q).await?;
            let (batch, total) = list_rows(body, key);
            let got = batch.len();
            // A page that repeats the previous one means paging is ignored.
            if page > 1 && got > 0 && rows.len() >= got && rows[rows.len() - got..] == batch[..] {
                break;
            }
            rows.extend(batch);
            let done = match total {
                Some(total) => rows.len() >= total,
                None => got < PAGE_SIZE,
            };
            if done || got == 0 {
                return Ok(Some(rows));
            }
            if page == 1 && total.is_some_and(|t| t.div_ceil(PAGE_SIZE) > max_requests) {
                return Ok(None);
            }
        }
        // More pages than allowed (or than MAX_PAGES).
        Ok((max_requests >= MAX_PAGES).then_some(rows))
    }

    /// The locks a request must find still held right before it goes out:
    /// none for a GET or an explicitly unfenced write; a write of a client
    /// without a fence is refused here, before it takes a slot of the
    /// budget or a token.
    fn locks_to_check(&self, method: &Method, path: &str) -> Result<Option<&LockFence>, HaloError> {
        if *method == Method::GET {
            return Ok(None);
        }
        match &self.fence {
            Fence::Missing => Err(HaloError::Unfenced(format!("{method} {path}"))),
            Fence::Unfenced(why) => {
                tracing::debug!(why, "{method} {path} without a fence");
                Ok(None)
            }
            Fence::Locks(locks) => Ok(Some(locks)),
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Value>,
    ) -> Result<Value, HaloError> {
        let span = tracing::info_span!("halo.request", http.method = %method, path = %path, status = tracing::field::Empty);
        async {
            let locks = self.locks_to_check(&method, path)?;
            let priority = if method == Method::GET {
                Priority::Lookups
            } else {
                self.writes
            };
            let mut refreshed = false;
            loop {
                let waited = self.limiter.acquire(priority).await?;
                metrics::histogram!("halosync_rate_wait_seconds", "connection" => crate::health::connection_label(&self.conn.name))
                    .record(waited.as_secs_f64());
                if waited > Duration::from_millis(50) {
                    tracing::debug!(
                        waited_ms = waited.as_millis() as u64,
                        "waited for the rate budget"
                    );
                }
                let token = match self.tokens.get().await {
                    Ok(t) => t,
                    Err(e) => {
                        if matches!(e, HaloError::Network(_)) {
                            self.note_reachability(Some(&e.to_string()));
                        } else if matches!(e, HaloError::Token { status, .. } if status >= 500) {
                            self.limiter.pulse().failed();
                        }
                        return Err(e);
                    }
                };
                // Right before it goes out: a lost lock (or Redis not
                // answering) stops the write.
                let fenced = match locks {
                    Some(locks) => match locks.still_held().await {
                        Ok(true) => true,
                        Ok(false) => return Err(HaloError::Fenced(format!("{method} {path}"))),
                        Err(e) => return Err(HaloError::State(e.to_string())),
                    },
                    None => false,
                };
                let url = format!("{}{}", self.conn.resource_server, path);
                let mut req = self
                    .http
                    .request(method.clone(), &url)
                    .bearer_auth(&*token)
                    .query(query);
                if let (true, Some(t)) = (fenced, self.fenced_write_timeout) {
                    req = req.timeout(t);
                }
                if let Some(b) = &body {
                    req = req.json(b);
                }
                let endpoint = crate::health::endpoint_label(path);
                let sent = std::time::Instant::now();
                let response = match req.send().await {
                    Ok(r) => r,
                    Err(e) => {
                        metrics::counter!("halosync_halo_requests_total", "connection" => crate::health::connection_label(&self.conn.name),
                            "method" => method.to_string(), "endpoint" => endpoint, "status" => "error").increment(1);
                        let e = HaloError::Network(format!("{method} {path}: {}", e.without_url()));
                        self.note_reachability(Some(&e.to_string()));
                        return Err(e);
                    }
                };
                let status = response.status().as_u16();
                if status < 500 && status != 429 {
                    self.limiter.pulse().answered();
                }
                self.note_reachability((status >= 500).then(|| format!("{method} {path} answered {status}")).as_deref());
                metrics::counter!("halosync_halo_requests_total", "connection" => crate::health::connection_label(&self.conn.name),
                    "method" => method.to_string(), "endpoint" => endpoint.clone(), "status" => status.to_string()).increment(1);
                if status == 429 {
                    metrics::counter!("halosync_halo_rate_limited_total", "connection" => crate::health::connection_label(&self.conn.name)).increment(1);
                }
                tracing::Span::current().record("status", status);
                let retry_after = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()));
                let text = response.text().await.map_err(|e| {
                    HaloError::Network(format!("{method} {path} body: {}", e.without_url()))
                })?;
                // HaloPSA's latency: request sent to body read (not the
                // wait for the rate budget, which has its own histogram).
                metrics::histogram!("halosync_halo_request_seconds", "connection" => crate::health::connection_label(&self.conn.name),
                    "method" => method.to_string(), "endpoint" => endpoint)
                .record(sent.elapsed().as_secs_f64());
                // An expired token shows up as 401, or as 400 "Token not
                // found" (reference §1.3): refresh once and retry once.
                let token_rejected =
                    status == 401 || (status == 400 && text.contains("Token not found"));
                if token_rejected && !refreshed {
                    refreshed = true;
                    self.tokens.invalidate(&token).await;
                    continue;
                }
                return match status {
                    200..=299 => {
                        if text.trim().is_empty() {
                            Ok(Value::Null)
                        } else {
                            serde_json::from_str(&text).map_err(|_| {
                                HaloError::Unexpected(
                                    format!("not JSON: {}", excerpt(&text, 200)),
                                    path.to_string(),
                                )
                            })
                        }
                    }
                    429 => {
                        self.limiter
                            .cool_down(retry_after.unwrap_or(self.rate_limited_pause))
                            .await;
                        Err(HaloError::RateLimited {
                            retry_after,
                            body: excerpt(&text, BODY_EXCERPT),
                        })
                    }
                    _ => Err(HaloError::Status {
                        method: method.to_string(),
                        path: path.to_string(),
                        status,
                        message: explain_status(status, &text, token_rejected),
                        body: excerpt(&text, BODY_EXCERPT),
                    }),
                };
            }
        }
        .instrument(span)
        .await
    }
}

fn explain_status(status: u16, body: &str, token_rejected: bool) -> String {
    let halo = message_from_body(body);
    match status {
        _ if token_rejected => format!("{halo} (token rejected even after a refresh: check the application's scope and that it is active)"),
        403 => format!("{halo} (permission denied: the application's Permissions tab or the login agent's role lacks this area)"),
        _ => halo,
    }
}

/// Rows and `record_count` of a list response: an envelope
/// `{record_count, <key>: [...]}` or a bare array (reference §2).
pub fn list_rows(body: Value, key: &str) -> (Vec<Value>, Option<usize>) {
    match body {
        Value::Array(rows) => (rows, None),
        Value::Object(mut map) => {
            let total = map
                .get("record_count")
                .and_then(Value::as_u64)
                .map(|n| n as usize);
            // The list key differs per endpoint and is UNCONFIRMED for some
            // (ExternalLink): fall back to the one array in the envelope.
            let rows = match map.remove(key) {
                Some(Value::Array(rows)) => rows,
                _ => map
                    .into_iter()
                    .find_map(|(_, v)| match v {
                        Value::Array(rows) => Some(rows),
                        _ => None,
                    })
                    .unwrap_or_default(),
            };
            (rows, total)
        }
        _ => (Vec::new(), Some(0)),
    }
}

/// The first record of a POST response (object, array, or envelope).
pub fn first_record(body: Value) -> Option<Value> {
    match body {
        Value::Array(rows) => rows.into_iter().next(),
        Value::Object(map) => {
            if map.contains_key("id") {
                return Some(Value::Object(map));
            }
            map.into_iter().find_map(|(_, v)| match v {
                Value::Array(rows) => rows.into_iter().next(),
                _ => None,
            })
        }
        _ => None,
    }
}

/// A record's `id` as an integer (HaloPSA ids may be negative).
pub fn record_id(record: &Value) -> Option<i64> {
    match record.get("id")? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn list_rows_reads_envelopes_and_bare_arrays() {
        let (rows, total) = list_rows(
            json!({"record_count": 3, "clients": [{"id": 1}]}),
            "clients",
        );
        assert_eq!(rows.len(), 1);
        assert_eq!(total, Some(3));
        let (rows, total) = list_rows(json!([{"id": 1}, {"id": 2}]), "links");
        assert_eq!(rows.len(), 2);
        assert_eq!(total, None);
    }

    #[test]
    fn first_record_accepts_every_shape() {
        assert_eq!(record_id(&first_record(json!({"id": 5})).unwrap()), Some(5));
        assert_eq!(
            record_id(&first_record(json!([{"id": -94}])).unwrap()),
            Some(-94)
        );
        assert_eq!(
            record_id(&first_record(json!({"clients": [{"id": 7}]})).unwrap()),
            Some(7)
        );
        assert_eq!(first_record(json!(null)), None);
    }
}

/// `Retry-After` in either of its RFC 9110 forms: delay-seconds (`120`) or
/// an HTTP-date (`Wed, 21 Oct 2026 07:28:00 GMT`, parsed by `httpdate`); a
/// date in the past means "now" (zero). Anything else is ignored, and the
/// caller falls back to its minimum 429 pause.
pub fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The write fence, against halo-sim and the shared Redis: a write goes
/// out only with a fence whose locks are all held, or explicitly
/// unfenced; a GET never needs one.
#[cfg(test)]
mod fence_tests {
    use std::time::Duration;

    use serde_json::json;

    use super::super::ratelimit::Priority;
    use super::super::testkit::{Kit, CONNECTION};
    use super::HaloError;

    const WRITE: &str = "POST /api/Client";
    const READ: &str = "GET /api/Client";

    async fn write(halo: &super::HaloClient) -> Result<serde_json::Value, HaloError> {
        halo.post("/Client", vec![json!({"name": "Fenced Ltd"})])
            .await
    }

    #[tokio::test]
    async fn a_client_without_a_fence_refuses_every_write_without_a_request() {
        let kit = Kit::start().await;
        let e = write(&kit.base).await.expect_err("refused");
        assert!(matches!(e, HaloError::Unfenced(_)), "{e}");
        assert!(
            e.to_string().starts_with("bug: POST /Client was refused"),
            "{e}"
        );
        assert_eq!(kit.count(WRITE), 0);
        // Not even a token was asked for it.
        assert_eq!(kit.sim.token_requests(), 0);
        // A GET needs no fence.
        kit.base.get("/Client", &[]).await.expect("read");
        assert_eq!(kit.count(READ), 1);
        kit.cleanup().await;
    }

    #[tokio::test]
    async fn a_write_goes_out_while_its_locks_are_held_and_not_after_one_is_lost() {
        let kit = Kit::start().await;
        let ttl = Duration::from_secs(10);
        let a = kit.store.lock(CONNECTION, "account:a", ttl, Duration::ZERO);
        let b = kit.store.lock(CONNECTION, "account:b", ttl, Duration::ZERO);
        let locks = [a.await.expect("a"), b.await.expect("b")];
        let fence = crate::store::LockFence::of(&locks);
        let halo = kit.base.fenced(fence, Priority::Accounts);
        write(&halo).await.expect("held: sent");
        assert_eq!(kit.count(WRITE), 1);

        // One of the batch's locks is lost (released, as after it expired
        // and another worker took and released it): nothing more is sent.
        let [a, b] = locks;
        b.release().await.expect("release");
        let e = write(&halo).await.expect_err("fenced");
        assert!(matches!(e, HaloError::Fenced(_)), "{e}");
        assert_eq!(kit.count(WRITE), 1);
        // A GET is never fenced.
        halo.get("/Client", &[]).await.expect("read");
        assert_eq!(kit.count(READ), 1);
        a.release().await.expect("release");
        kit.cleanup().await;
    }

    #[tokio::test]
    async fn an_explicitly_unfenced_client_writes() {
        let kit = Kit::start().await;
        write(&kit.base.unfenced("a test")).await.expect("sent");
        assert_eq!(kit.count(WRITE), 1);
        kit.cleanup().await;
    }
}

#[cfg(test)]
mod retry_after_tests {
    use super::*;
    use std::time::{SystemTime, UNIX_EPOCH};

    #[test]
    fn reads_seconds_and_http_dates() {
        let now = UNIX_EPOCH + Duration::from_secs(1_445_412_480); // Wed, 21 Oct 2015 07:28:00 GMT
        assert_eq!(
            parse_retry_after(" 120 ", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", SystemTime::now()), None);
        assert_eq!(parse_retry_after("-5", SystemTime::now()), None);
    }
}
