//! `halo-sim`: an in-memory HaloPSA REST API simulator with fault injection.
//!
//! It serves an OAuth2 authorisation server at `/auth` and a resource server
//! at `/api`, following `reference/halopsa-api.md`, so that halosync's workers
//! can talk to it exactly as they would to a real HaloPSA. Tests start it in
//! process with [`SimHandle::start`]; `make run` starts the `halo-sim` binary.
//!
//! # What it models
//!
//! * **Auth** (`POST /auth/token`, form-encoded client credentials): tenant
//!   from `?tenant=` or the form body; a missing/wrong tenant when the sim has
//!   one gives HTTP 500 with a large HTML page ("Sorry, something went wrong");
//!   bad credentials give `401 invalid_client`; a token minted without `scope`
//!   is issued but then gets 401 on every `/api` call. Scopes (`all`,
//!   `read:`/`edit:` × `customers`, `items`, `software`/`softwarelicensing`,
//!   `invoices`) narrow access; a call outside them gets 403 with a plain-text
//!   body. `GET /api/authinfo` gives discovery data.
//! * **Token expiry**: an expired or revoked token gets 401, or (fault
//!   `expired_token_status = 400`) a 400 whose body is exactly
//!   `Token not found`.
//! * **Conventions** (reference §2): case-insensitive entity segments; lists
//!   with `count` (default 50) or `pageinate=true&page_size&page_no` (paging
//!   params ignored without `pageinate`), envelope `{"record_count", <key>}`;
//!   unknown query params ignored; POST bodies must be JSON arrays, elements
//!   without `id` create and with `id` merge-update; a one-element POST answers
//!   the object, a multi-element POST an array; `new_external_link` on an
//!   entity POST creates an ExternalLink in the same (atomic) save.
//! * **Bound to HaloPSA's OpenAPI document** (`shared/openapi/halopsa-openapi.json`,
//!   embedded; [`openapi`]): a path the document lacks is 404, a known path
//!   with a method it lacks 405 (one it has that the sim does not simulate
//!   501). Request bodies are bound to the document's model as Newtonsoft
//!   binds them: a property the model lacks is dropped (not stored) and
//!   counted per endpoint ([`SimHandle::ignored_properties`],
//!   `GET /_sim/ignored`); a value of the wrong JSON type is a 400
//!   `JsonSerializationException` naming its JSON path, with nothing saved;
//!   numbers as text that parse are accepted and stored as numbers.
//! * **Entities**: `Client`, `ExternalLink`, `Item`, `SoftwareLicence`,
//!   `RecurringInvoice` (+ `/Lines`, `/updatelines`), `Invoice` (lines
//!   inline on create, `add_lines` on `POST /Invoice` to add to an
//!   existing header, `/updatelines`) and `Currency` (seeded USD, GBP, EUR
//!   as ids 1-3; [`SimHandle::add_currency`]). Items have no active flag in
//!   the document: the list's `includeinactive`/`includeactive` select by
//!   the sim's own flag, which is never shown.
//! * **Faults** ([`Faults`]): latency, random 500s, the next N requests 503,
//!   a rolling-window 429 with or without `Retry-After`, the 400
//!   `Token not found` flavour of expiry, missing agent permissions (403),
//!   validation rejections (400) by name, and lost responses (a write that
//!   is applied but answered 500: `lost_response_rate`, `lose_next`).
//! * **No transactions** (the reference leaves this UNCONFIRMED, so the sim
//!   takes the hard reading): a multi-element POST saves its elements in
//!   order, each one atomically with its lines and `new_external_link`, and
//!   stops at the first refused element with a 400 that names it; the
//!   elements before it stay saved. `transactional_arrays` turns this off.
//! * **Controls** under `/_sim/` (no auth): `state`, `requests`, `reset`,
//!   `faults`, `revoke-tokens`, `items`, `ignored`, `currencies`; in process, [`SimHandle`] also
//!   edits records as an MSP would (`update_record`, `delete_line`,
//!   `insert_line`) and seeds large tenants fast (`insert_record`).
//!
//! # Deliberate differences from a real HaloPSA
//!
//! * Records hold only the fields clients send plus a few defaults
//!   (`Client.inactive=false`, `SoftwareLicence.is_active=true`/`count=0`,
//!   line `isinactive=false`/`sequenceid`/`item_shortdescription` from the
//!   item); other fields are stored verbatim, nothing else is invented.
//!   Computed on read: `id`, `external_links`, `client_name` (licences and
//!   invoices), and `total` (invoices, sum of `qty_order * unit_price` of
//!   active lines).
//! * Recurring-invoice header ids are **negative** (-1, -2, ...), like the one
//!   real UAT capture in the reference; the reference leaves this
//!   UNCONFIRMED. Line ids are positive, from one counter for both kinds.
//! * `GET /api/ExternalLink` answers a **bare JSON array** (the real list
//!   shape is UNCONFIRMED), so clients must accept both shapes.
//! * A POST to `/RecurringInvoice` or `/Invoice` with `lines`: lines with an
//!   `id` are merged, lines without are added, lines not mentioned are kept
//!   (the real behaviour is UNCONFIRMED).
//! * Validation errors are 400 `{"ClassName": "ValidationException",
//!   "Message": ...}` naming the offending element index; the real text
//!   differs.
//! * The 429 message says "N Requests per rolling M minute window" (or
//!   "M second" for windows that are not whole minutes). Only admitted
//!   requests fill the window; rejected (429) ones do not.
//! * Latency is added to every `/api` request, before authentication.
//! * Unknown client ids get 401 `invalid_client` (a real Halo may answer 500
//!   HTML for them).
//! * `POST /_sim/reset` clears data (items go back to the seeded catalogue),
//!   counters and faults, but keeps issued tokens valid.
//! * Denying `<area>:read` also denies writes to that area.

/// HaloPSA's document and its binding rules (crate `halopsa-openapi`,
/// `shared/openapi/`), re-exported under the simulator's name.
pub use halopsa_openapi as openapi;
mod server;
mod state;
mod store;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use crate::state::Ignored;
use crate::state::Shared;
use crate::store::Kind;

/// Start configuration of a simulator.
#[derive(Clone)]
pub struct SimConfig {
    /// The only accepted client id.
    pub client_id: String,
    /// The only accepted client secret (never logged).
    pub client_secret: String,
    /// Tenant required on token requests; `None` (or "" / "Not set") for an
    /// on-premise instance that needs none.
    pub tenant: Option<String>,
    /// `expires_in` of issued tokens; 0 makes tokens expire at once.
    pub token_lifetime_secs: u64,
    /// Faults in force at start (and after a reset).
    pub faults: Faults,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            client_id: "halosync-sim".into(),
            client_secret: "sim-secret".into(),
            tenant: None,
            token_lifetime_secs: 3600,
            faults: Faults::default(),
        }
    }
}

impl std::fmt::Debug for SimConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimConfig")
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("tenant", &self.tenant)
            .field("token_lifetime_secs", &self.token_lifetime_secs)
            .field("faults", &self.faults)
            .finish()
    }
}

/// Injected faults. Also the JSON shape of `GET/POST /_sim/faults`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Faults {
    /// Milliseconds added to every `/api` request.
    pub latency_ms: u64,
    /// Share (0..1) of authenticated `/api` requests answered 500 at random.
    pub error_rate: f64,
    /// The next N authenticated `/api` requests answer 503 (decrements).
    pub fail_next: u64,
    /// A 429 rolling window over `/api` requests.
    pub rate_limit: Option<RateLimit>,
    /// What an expired or revoked token gets: 401 (also when 0) or 400 with
    /// body `Token not found`.
    pub expired_token_status: u16,
    /// Permissions the login agent lacks, e.g. `customers:write`,
    /// `items:read` (-> 403).
    pub deny: Vec<String>,
    /// A POSTed object whose `name` (or line `item_shortdescription`) equals
    /// one of these gets a 400 validation error.
    pub reject_names: Vec<String>,
    /// Share (0..1) of successful writes (POST, DELETE) whose answer is
    /// lost: the write is applied, then answered 500 as if the response had
    /// never arrived.
    pub lost_response_rate: f64,
    /// The next N successful writes lose their answer (decrements), like
    /// `lost_response_rate` but deterministic.
    pub lose_next: u64,
    /// A schedule of lost answers: the 1-based ordinals of the successful
    /// writes (POST, DELETE; counted from the start or the last reset, not
    /// from when these faults were set) whose answer is lost, e.g.
    /// `[3, 7, 12]`. A test asserts that exactly these fired
    /// ([`SimHandle::lost_responses`]), never on a random draw.
    pub lose_writes: Vec<u64>,
    /// A schedule of partial saves, taken in order: an entry `n` is taken
    /// by the next POST whose array has more than `n` elements, which saves
    /// its first `n` elements and refuses element `n` (0-based) with a 400
    /// validation error, the rest untouched: the non-transactional reading
    /// of an array one of whose elements fails validation. Refusing the
    /// same element again later is up to `reject_names`; a scheduled one
    /// is refused once. Counted in [`SimHandle::partial_saves`].
    pub save_then_refuse: Vec<usize>,
    /// Once this many writes were applied, every further write (POST,
    /// DELETE) waits, unanswered and not applied, until the fault is lifted
    /// (set to `None` or higher): a deterministic "the worker is mid-write"
    /// for tests that kill it there ([`SimHandle::held_writes`]).
    pub hold_writes_after: Option<u64>,
    /// Make multi-element POSTs transactional (all or nothing). Off by
    /// default: the reference does not say HaloPSA has transactions, so the
    /// sim takes the hard reading, where the elements before a refused one
    /// stay saved and the request still fails.
    pub transactional_arrays: bool,
}

/// A rolling-window rate limit: at most `requests` per `window_secs`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct RateLimit {
    pub requests: u64,
    pub window_secs: u64,
    /// Send `Retry-After` (seconds until a slot frees) on 429.
    pub retry_after: bool,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            requests: 300,
            window_secs: 300,
            retry_after: true,
        }
    }
}

/// A running simulator. Dropping it stops the server (like [`shutdown`],
/// without waiting).
///
/// [`shutdown`]: SimHandle::shutdown
pub struct SimHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimHandle")
            .field("addr", &self.addr)
            .finish()
    }
}

impl SimHandle {
    /// Starts a simulator on `127.0.0.1` with an ephemeral port.
    pub async fn start(config: SimConfig) -> anyhow::Result<SimHandle> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        SimHandle::start_on(listener, config).await
    }

    /// Starts a simulator on an already bound listener.
    pub async fn start_on(
        listener: tokio::net::TcpListener,
        config: SimConfig,
    ) -> anyhow::Result<SimHandle> {
        let addr = listener.local_addr()?;
        let shown = if addr.ip().is_unspecified() {
            SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
        } else {
            addr
        };
        let shared = Arc::new(Shared::new(config, format!("http://{shown}")));
        let app = axum::Router::new()
            .fallback(server::handle)
            .with_state(Arc::clone(&shared));
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop_rx.await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "halo-sim server failed");
            }
        });
        tracing::info!(addr = %shown, "halo-sim listening");
        Ok(SimHandle {
            addr: shown,
            shared,
            stop: Some(stop_tx),
            task: Some(task),
        })
    }

    /// The bound address (`0.0.0.0` is shown as `127.0.0.1`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn base_url(&self) -> String {
        self.shared.base_url.clone()
    }

    /// The resource server: base + `/api`.
    pub fn api_url(&self) -> String {
        format!("{}/api", self.shared.base_url)
    }

    /// The authorisation server: base + `/auth`.
    pub fn auth_url(&self) -> String {
        format!("{}/auth", self.shared.base_url)
    }

    /// Replaces the current faults.
    pub fn set_faults(&self, f: Faults) {
        self.shared.lock().faults = f;
    }

    /// The current faults (`fail_next` counts down as it fires).
    pub fn faults(&self) -> Faults {
        self.shared.lock().faults.clone()
    }

    /// Requests per endpoint key, e.g. `"POST /api/Client"`,
    /// `"GET /api/Client/{id}"`, `"POST /auth/token"`.
    pub fn counts(&self) -> BTreeMap<String, u64> {
        self.shared.lock().counters.by_endpoint.clone()
    }

    /// Requests to the token endpoint, successful or not.
    pub fn token_requests(&self) -> u64 {
        self.shared.lock().counters.token_requests
    }

    /// 429s answered.
    pub fn rate_limited(&self) -> u64 {
        self.shared.lock().counters.rate_limited
    }

    /// Writes that were applied but answered 500 (lost responses).
    pub fn lost_responses(&self) -> u64 {
        self.shared.lock().counters.lost_responses
    }

    /// Successful `/api` writes so far (the clock of `Faults::lose_writes`).
    pub fn writes_applied(&self) -> u64 {
        self.shared.lock().counters.writes_applied
    }

    /// Writes waiting now at the fault `hold_writes_after`.
    pub fn held_writes(&self) -> u64 {
        self.shared.lock().counters.held_writes
    }

    /// Multi-element POSTs that failed after saving some of their elements.
    pub fn partial_saves(&self) -> u64 {
        self.shared.lock().counters.partial_saves
    }

    /// The largest number of `/api` requests (any outcome) that arrived
    /// inside any rolling window of `window_secs`.
    pub fn max_requests_in_any_window(&self, window_secs: u64) -> u64 {
        self.shared
            .lock()
            .counters
            .max_in_window(Duration::from_secs(window_secs))
    }

    /// Revokes every issued token (they then get `expired_token_status`).
    pub fn revoke_tokens(&self) {
        for t in self.shared.lock().tokens.values_mut() {
            t.revoked = true;
        }
    }

    /// Every entity, as `GET /_sim/state`.
    pub fn state(&self) -> Value {
        self.shared.lock().data.snapshot()
    }

    /// All `/Client` records, inactive ones included.
    pub fn clients(&self) -> Vec<Value> {
        self.shared.lock().data.all(Kind::Client)
    }

    /// All `/ExternalLink` records.
    pub fn external_links(&self) -> Vec<Value> {
        self.shared.lock().data.all(Kind::ExternalLink)
    }

    /// All `/SoftwareLicence` records, inactive and deleted ones included.
    pub fn licences(&self) -> Vec<Value> {
        self.shared.lock().data.all(Kind::SoftwareLicence)
    }

    /// All recurring invoices, with `lines`.
    pub fn recurring_invoices(&self) -> Vec<Value> {
        self.shared.lock().data.all(Kind::RecurringInvoice)
    }

    /// All invoices, with `lines`.
    pub fn invoices(&self) -> Vec<Value> {
        self.shared.lock().data.all(Kind::Invoice)
    }

    /// All items.
    pub fn items(&self) -> Vec<Value> {
        self.shared.lock().data.all(Kind::Item)
    }

    /// Properties sent that the request's model lacks (dropped by binding,
    /// as HaloPSA's Newtonsoft binder drops them), per endpoint key: how
    /// many and which. Also `GET /_sim/ignored`. Empty when every request
    /// spoke the document's models.
    pub fn ignored_properties(&self) -> BTreeMap<String, Ignored> {
        self.shared.lock().counters.ignored.clone()
    }

    /// Requests whose path is not spelt as the document spells it (HaloPSA
    /// routes case-insensitively, so they work), by the path as sent; also
    /// `GET /_sim/misspelt`.
    pub fn misspelt_paths(&self) -> BTreeMap<String, u64> {
        self.shared.lock().counters.misspelt.clone()
    }

    /// All `/Currency` records (seeded: USD, GBP, EUR).
    pub fn currencies(&self) -> Vec<Value> {
        self.shared.lock().data.all(Kind::Currency)
    }

    /// Adds a currency (as an MSP would under Configuration > Financials >
    /// Currencies); returns its id. Kept until the next reset.
    pub fn add_currency(&self, code: &str, name: &str) -> i64 {
        self.shared.lock().data.add_currency(code, name)
    }

    /// Seeds the `/Item` catalogue (kept across resets).
    pub fn insert_item(&self, id: i64, name: &str) {
        let mut inner = self.shared.lock();
        server::seed_item(&mut inner, id, server::item_obj(name));
    }

    /// Merges `patch` into a record, as an MSP editing it in the UI would.
    /// `entity` is `Client`, `SoftwareLicence`, `RecurringInvoice`, `Invoice`,
    /// `ExternalLink`, `Item`, or `RecurringInvoiceLine`/`InvoiceLine` (by
    /// line id). An unknown record is logged and ignored.
    pub fn update_record(&self, entity: &str, id: i64, patch: Value) {
        if !self.shared.lock().data.patch(entity, id, patch) {
            tracing::warn!(entity, id, "update_record: no such record");
        }
    }

    /// Inserts a record directly, without validation or counting a request
    /// (seeding a large tenant in a test, or a record an MSP made in the
    /// UI). `entity` is `Client`, `SoftwareLicence`, `RecurringInvoice`,
    /// `Invoice`, `ExternalLink` or `Item`; returns the new id.
    pub fn insert_record(&self, entity: &str, record: Value) -> Option<i64> {
        self.shared.lock().data.insert(entity, record)
    }

    /// Adds a line to header `ihid` directly, as an MSP would in the UI:
    /// `entity` is `RecurringInvoiceLine` or `InvoiceLine`. Returns the new
    /// line id (`None`: no such header).
    pub fn insert_line(&self, entity: &str, ihid: i64, line: Value) -> Option<i64> {
        self.shared.lock().data.insert_line(entity, ihid, line)
    }

    /// Deletes an invoice line as an MSP would in the UI: `entity` is
    /// `RecurringInvoiceLine` or `InvoiceLine`. Returns whether it existed.
    pub fn delete_line(&self, entity: &str, id: i64) -> bool {
        self.shared.lock().data.remove_line(entity, id)
    }

    /// Deletes a record as `DELETE /<entity>/{id}` does (an MSP deleting
    /// it in HaloPSA; an invoice goes with its lines, the ExternalLinks
    /// pointing at it stay): `entity` is `Client`, `SoftwareLicence`,
    /// `RecurringInvoice`, `Invoice`, `ExternalLink` or `Item`. Returns
    /// whether it existed.
    pub fn delete_record(&self, entity: &str, id: i64) -> bool {
        let Some(kind) = store::Kind::from_name(entity) else {
            return false;
        };
        self.shared.lock().data.delete(kind, id).is_ok()
    }

    /// Stops the server and waits (at most 5 s) for it to finish.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(Duration::from_secs(5), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Parses `N/SECS` (e.g. `300/300`) into a rate limit.
pub fn parse_rate_limit(s: &str, retry_after: bool) -> anyhow::Result<RateLimit> {
    let (n, secs) = s
        .split_once('/')
        .ok_or_else(|| anyhow::anyhow!("expected N/SECS, e.g. 300/300, got {s:?}"))?;
    let requests: u64 = n.trim().parse()?;
    let window_secs: u64 = secs.trim().parse()?;
    if window_secs == 0 {
        anyhow::bail!("the rate-limit window must be at least 1 second");
    }
    Ok(RateLimit {
        requests,
        window_secs,
        retry_after,
    })
}
