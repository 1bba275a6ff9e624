//! Configuration: one TOML file (`HALOSYNC_CONFIG`, default `halosync.toml`)
//! with the environment overrides `AMQP_URL`, `REDIS_URL` and
//! `HALOSYNC_PREFIX` (DESIGN §7).
//!
//! Everything is checked when the binary starts: an unknown key, a missing
//! key or a bad value stops it with a message that names the key and says
//! what to write instead. Client secrets come from an environment variable
//! or a file, never from the config file's own text.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub const DEFAULT_CONFIG_PATH: &str = "halosync.toml";
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/0";
/// The default retry tiers (deploy/rabbitmq/definitions.json declares the
/// same delay queues; `make check-deploy` compares them).
pub const DEFAULT_RETRY_DELAYS_MS: [u64; 5] = [1_000, 5_000, 30_000, 120_000, 600_000];

/// A configuration problem, naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source} (set HALOSYNC_CONFIG to the path of your halosync.toml)")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config key `{key}`: {message}")]
    Key { key: String, message: String },
}

impl ConfigError {
    fn key(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Key {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// A secret value (client secret, password): kept in a
/// [`secrecy::SecretString`], which zeroes it on drop and has no `Display`
/// of its own; this wrapper prints `***` for `Debug` and `Display`, so that
/// it can never reach a log line, an error or a panic message by accident,
/// and keeps the one door out, [`Secret::expose`], easy to grep for.
#[derive(Clone)]
pub struct Secret(secrecy::SecretString);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(secrecy::SecretString::from(value.into()))
    }
    /// The secret itself; call only where it is sent to its service.
    pub fn expose(&self) -> &str {
        use secrecy::ExposeSecret;
        self.0.expose_secret()
    }
}

/// Compares the secrets (a reload must notice a rotated one) without
/// exposing them anywhere else.
impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.expose() == other.expose()
    }
}
impl Eq for Secret {}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The whole, validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub amqp_url: String,
    pub redis_url: String,
    /// Prepended to every exchange, queue and Redis key.
    pub prefix: String,
    pub worker: WorkerSettings,
    pub retry: RetrySettings,
    pub connections: BTreeMap<String, ConnectionConfig>,
    /// What the file said that still works but should change (deprecated
    /// keys); binaries log each once at start and on every reload.
    pub warnings: Vec<String>,
    /// Redis TLS trust and ACL credentials (`redis_ca_file`, `redis_username`,
    /// `redis_password_env` / `_file`); see [`crate::tls`].
    pub redis_access: crate::tls::RedisAccess,
    /// RabbitMQ TLS trust, client certificate and credentials
    /// (`amqp_ca_file`, `amqp_client_*`, `amqp_username`, `amqp_password_*`).
    pub amqp_access: crate::tls::AmqpAccess,
    /// The `[console]` table as written, for `halosync console` to parse
    /// (users, audit file); the workers ignore it.
    pub console: Option<toml::Table>,
}

/// How a worker consumes. All keys live under `[worker]` and are optional.
/// Durations are written as `"10s"`, `"250ms"`, `"5m"` (humantime); the
/// older `*_ms` / `*_secs` integer keys still read, with a deprecation
/// warning (see [`Config::warnings`]).
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerSettings {
    /// Unacked messages the broker hands one worker at once; they are
    /// processed concurrently.
    pub prefetch: u16,
    /// Bodies larger than this are dead-lettered as `invalid`.
    pub max_message_bytes: usize,
    /// TTL of a per-aggregate lock; renewed while its holder works, so it
    /// only bounds how long a crashed holder blocks the aggregate.
    pub lock_ttl: Duration,
    /// How long a message waits for its aggregate's lock before it is
    /// retried through the delay queues instead.
    pub lock_wait: Duration,
    /// How long the processed-event ledger remembers an event id.
    pub ledger_ttl: Duration,
    /// On SIGTERM, how long in-flight messages may take to finish.
    pub shutdown_grace: Duration,
    /// The longest a request waits in-process for the shared rate budget;
    /// beyond that the message goes back to the broker's delay queues.
    pub rate_wait_max: Duration,
    /// Added to the rate window so that requests granted at a window's edge
    /// still arrive inside HaloPSA's own window (network latency).
    pub rate_margin: Duration,
    /// HTTP timeout for one HaloPSA request.
    pub http_timeout: Duration,
    /// Port for /metrics, /healthz and /readyz; 0 disables the endpoint.
    pub health_port: u16,
    /// Batching workers (usage, overage): most messages in one batch.
    pub batch_max: u16,
    /// Batching workers: how long a batch waits for more messages after
    /// its first one.
    pub batch_wait: Duration,
    /// Record one activity record per settled message to the activity
    /// stream (`crate::activity`); `false` turns it off (to measure its cost).
    pub activity: bool,
    /// After Redis was lost (flushed, or restarted empty), how long every
    /// worker waits before its first HaloPSA work: a worker that held a lock
    /// when Redis was lost may still have a write on the wire, and another
    /// worker that takes the lock again must not read HaloPSA before that
    /// write has landed (else it can decide on a state that the late write
    /// then overwrites). Defaults to `http_timeout`, the longest a write can
    /// be in flight; a fresh deployment also waits it once. Losing Redis
    /// costs this much speed, never correctness.
    pub flush_grace: Duration,
    /// A connection whose work in flight has not moved for this long (no
    /// batch finished, no two answers of its HaloPSA less than this apart)
    /// is stalled (slow answers, a spent budget, an outage): it keeps only its
    /// fair share of the prefetch window, and its other deliveries are
    /// parked in the delay queues without using an attempt
    /// (`runtime::lanes`).
    pub lane_stall: Duration,
    /// How many connections' batches one process writes at once, stalled
    /// ones not counted (up to four times as many writing in all;
    /// `runtime::lanes`): bounds the memory of a burst across many
    /// connections; the others' batches wait their turn.
    pub lanes_at_once: usize,
    /// How many connections get their own `connection` label on
    /// `/metrics`; the others are counted under `connection="other"`.
    /// `0`: no per-connection series at all (every one is `"all"`).
    pub metrics_connections: usize,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        WorkerSettings {
            prefetch: 32,
            max_message_bytes: 256 * 1024,
            lock_ttl: Duration::from_secs(10),
            lock_wait: Duration::from_secs(5),
            ledger_ttl: Duration::from_secs(7 * 24 * 3600),
            shutdown_grace: Duration::from_secs(30),
            rate_wait_max: Duration::from_secs(10),
            rate_margin: Duration::from_secs(1),
            http_timeout: Duration::from_secs(30),
            health_port: 0,
            batch_max: 200,
            batch_wait: Duration::from_millis(200),
            activity: true,
            flush_grace: Duration::from_secs(10),
            lane_stall: Duration::from_millis(500),
            lanes_at_once: 16,
            metrics_connections: 100,
        }
    }
}

/// Retry tiers (DESIGN §3). Each delay becomes one TTL delay queue per work
/// queue, named after its delay, so changing the tiers adds queues instead
/// of clashing with the old ones.
#[derive(Clone, Debug, PartialEq)]
pub struct RetrySettings {
    /// Delay before attempt 2, 3, ...; attempts past the list use the last.
    pub delays: Vec<Duration>,
    /// Attempts (including the first) before a transient failure is
    /// dead-lettered as `exhausted`.
    pub max_attempts: u32,
    /// Attempts before a `dependency` failure is dead-lettered.
    pub dependency_max_attempts: u32,
    /// A 429 without `Retry-After` waits at least this long.
    pub rate_limited_min_delay: Duration,
    /// How long a record another family writes (the customer a subscription
    /// needs, the licence a usage report needs) is taken as still missing
    /// after HaloPSA said so: events needing it wait in the delay queues
    /// without a HaloPSA request and without using up an attempt, and go
    /// on as soon as its family has written it. `0s`: ask every time.
    pub dependency_recheck: Duration,
}

impl RetrySettings {
    /// The tiers in milliseconds: the delay queues are named after them.
    pub fn delays_ms(&self) -> Vec<u64> {
        self.delays.iter().map(|d| d.as_millis() as u64).collect()
    }
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            delays: DEFAULT_RETRY_DELAYS_MS
                .into_iter()
                .map(Duration::from_millis)
                .collect(),
            max_attempts: 8,
            dependency_max_attempts: 24,
            rate_limited_min_delay: Duration::from_secs(30),
            dependency_recheck: Duration::from_secs(60),
        }
    }
}

/// `[worker]` as written: every key optional, durations in the new
/// (`"10s"`) or the deprecated integer form.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawWorker {
    prefetch: Option<u16>,
    max_message_bytes: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    lock_ttl: Option<Duration>,
    lock_ttl_ms: Option<u64>,
    #[serde(default, with = "humantime_serde")]
    lock_wait: Option<Duration>,
    lock_wait_ms: Option<u64>,
    #[serde(default, with = "humantime_serde")]
    ledger_ttl: Option<Duration>,
    ledger_ttl_secs: Option<u64>,
    #[serde(default, with = "humantime_serde")]
    shutdown_grace: Option<Duration>,
    shutdown_grace_secs: Option<u64>,
    #[serde(default, with = "humantime_serde")]
    rate_wait_max: Option<Duration>,
    rate_wait_max_ms: Option<u64>,
    #[serde(default, with = "humantime_serde")]
    rate_margin: Option<Duration>,
    rate_margin_ms: Option<u64>,
    #[serde(default, with = "humantime_serde")]
    http_timeout: Option<Duration>,
    http_timeout_ms: Option<u64>,
    health_port: Option<u16>,
    batch_max: Option<u16>,
    #[serde(default, with = "humantime_serde")]
    batch_wait: Option<Duration>,
    batch_wait_ms: Option<u64>,
    activity: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    flush_grace: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    lane_stall: Option<Duration>,
    lanes_at_once: Option<usize>,
    metrics_connections: Option<usize>,
}

/// `[retry]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    #[serde(default)]
    delays: Option<Vec<HumanDuration>>,
    delays_ms: Option<Vec<u64>>,
    max_attempts: Option<u32>,
    dependency_max_attempts: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    rate_limited_min_delay: Option<Duration>,
    rate_limited_min_delay_ms: Option<u64>,
    #[serde(default, with = "humantime_serde")]
    dependency_recheck: Option<Duration>,
}

/// One `"5s"` in a list (humantime_serde handles single values and
/// options; a list needs the wrapper).
#[derive(Deserialize)]
#[serde(transparent)]
struct HumanDuration(#[serde(with = "humantime_serde")] Duration);

/// The unit of a deprecated integer duration key.
#[derive(Clone, Copy)]
enum Unit {
    Millis,
    Secs,
}

/// Picks a duration from its new key or its deprecated integer key.
fn duration_key(
    section: &str,
    new: (&str, Option<Duration>),
    old: (&str, Option<u64>, Unit),
    default: Duration,
    warnings: &mut Vec<String>,
) -> Result<Duration, ConfigError> {
    let (new_key, new_value) = new;
    let (old_key, old_value, unit) = old;
    match (new_value, old_value) {
        (Some(_), Some(_)) => Err(ConfigError::key(
            format!("{section}.{old_key}"),
            format!(
                "give either {section}.{new_key} or the deprecated {section}.{old_key}, not both"
            ),
        )),
        (Some(d), None) => Ok(d),
        (None, Some(n)) => {
            let d = match unit {
                Unit::Millis => Duration::from_millis(n),
                Unit::Secs => Duration::from_secs(n),
            };
            warnings.push(format!(
                "config key `{section}.{old_key}` is deprecated; write {section}.{new_key} = \"{}\" instead",
                humantime::format_duration(d)
            ));
            Ok(d)
        }
        (None, None) => Ok(default),
    }
}

fn worker_settings(
    raw: RawWorker,
    warnings: &mut Vec<String>,
) -> Result<WorkerSettings, ConfigError> {
    let d = WorkerSettings::default();
    let w = &mut *warnings;
    let mut pick = |new: &str, nv, old: &str, ov, unit, def| {
        duration_key("worker", (new, nv), (old, ov, unit), def, w)
    };
    let mut settings = WorkerSettings {
        prefetch: raw.prefetch.unwrap_or(d.prefetch),
        max_message_bytes: raw.max_message_bytes.unwrap_or(d.max_message_bytes),
        lock_ttl: pick(
            "lock_ttl",
            raw.lock_ttl,
            "lock_ttl_ms",
            raw.lock_ttl_ms,
            Unit::Millis,
            d.lock_ttl,
        )?,
        lock_wait: pick(
            "lock_wait",
            raw.lock_wait,
            "lock_wait_ms",
            raw.lock_wait_ms,
            Unit::Millis,
            d.lock_wait,
        )?,
        ledger_ttl: pick(
            "ledger_ttl",
            raw.ledger_ttl,
            "ledger_ttl_secs",
            raw.ledger_ttl_secs,
            Unit::Secs,
            d.ledger_ttl,
        )?,
        shutdown_grace: pick(
            "shutdown_grace",
            raw.shutdown_grace,
            "shutdown_grace_secs",
            raw.shutdown_grace_secs,
            Unit::Secs,
            d.shutdown_grace,
        )?,
        rate_wait_max: pick(
            "rate_wait_max",
            raw.rate_wait_max,
            "rate_wait_max_ms",
            raw.rate_wait_max_ms,
            Unit::Millis,
            d.rate_wait_max,
        )?,
        rate_margin: pick(
            "rate_margin",
            raw.rate_margin,
            "rate_margin_ms",
            raw.rate_margin_ms,
            Unit::Millis,
            d.rate_margin,
        )?,
        http_timeout: pick(
            "http_timeout",
            raw.http_timeout,
            "http_timeout_ms",
            raw.http_timeout_ms,
            Unit::Millis,
            d.http_timeout,
        )?,
        health_port: raw.health_port.unwrap_or(d.health_port),
        batch_max: raw.batch_max.unwrap_or(d.batch_max),
        batch_wait: pick(
            "batch_wait",
            raw.batch_wait,
            "batch_wait_ms",
            raw.batch_wait_ms,
            Unit::Millis,
            d.batch_wait,
        )?,
        activity: raw.activity.unwrap_or(d.activity),
        flush_grace: Duration::ZERO,
        lane_stall: raw.lane_stall.unwrap_or(d.lane_stall),
        lanes_at_once: raw.lanes_at_once.unwrap_or(d.lanes_at_once),
        metrics_connections: raw.metrics_connections.unwrap_or(d.metrics_connections),
    };
    // Unless given, as long as a lost lock's write can be in flight: a
    // write under a lock is cut off after the shorter of the HTTP timeout
    // and the lock TTL (`halo::client`).
    settings.flush_grace = raw
        .flush_grace
        .unwrap_or(settings.http_timeout.min(settings.lock_ttl));
    validate_worker(&settings)?;
    Ok(settings)
}

fn retry_settings(raw: RawRetry, warnings: &mut Vec<String>) -> Result<RetrySettings, ConfigError> {
    let d = RetrySettings::default();
    let delays = match (raw.delays, raw.delays_ms) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::key(
                "retry.delays_ms",
                "give either retry.delays or the deprecated retry.delays_ms, not both",
            ))
        }
        (Some(v), None) => v.into_iter().map(|h| h.0).collect(),
        (None, Some(v)) => {
            let delays: Vec<Duration> = v.into_iter().map(Duration::from_millis).collect();
            let shown: Vec<String> = delays
                .iter()
                .map(|d| format!("\"{}\"", humantime::format_duration(*d)))
                .collect();
            warnings.push(format!(
                "config key `retry.delays_ms` is deprecated; write retry.delays = [{}] instead",
                shown.join(", ")
            ));
            delays
        }
        (None, None) => d.delays,
    };
    let settings = RetrySettings {
        delays,
        max_attempts: raw.max_attempts.unwrap_or(d.max_attempts),
        dependency_max_attempts: raw
            .dependency_max_attempts
            .unwrap_or(d.dependency_max_attempts),
        rate_limited_min_delay: duration_key(
            "retry",
            ("rate_limited_min_delay", raw.rate_limited_min_delay),
            (
                "rate_limited_min_delay_ms",
                raw.rate_limited_min_delay_ms,
                Unit::Millis,
            ),
            d.rate_limited_min_delay,
            warnings,
        )?,
        dependency_recheck: raw.dependency_recheck.unwrap_or(d.dependency_recheck),
    };
    validate_retry(&settings)?;
    Ok(settings)
}

/// One HaloPSA instance (DESIGN §6).
#[derive(Clone, Debug, PartialEq)]
pub struct ConnectionConfig {
    pub name: String,
    /// `https://x.halopsa.com/api`, without a trailing slash.
    pub resource_server: String,
    /// `https://x.halopsa.com/auth`, without a trailing slash.
    pub auth_server: String,
    /// `None` for on-premise (absent, empty, `Not set` or `None`).
    pub tenant: Option<String>,
    pub client_id: String,
    pub client_secret: Secret,
    pub scope: String,
    pub requests_per_window: u32,
    pub window: Duration,
    pub match_existing_by_name: bool,
    pub overwrite_prices: bool,
    pub overwrite_names: bool,
    /// Product sku (or `sku:metric`) -> HaloPSA item id.
    pub items: BTreeMap<String, i64>,
}

/// What a connection lets halosync overwrite of what an MSP may have
/// changed in HaloPSA (its `overwrite_prices` and `overwrite_names`): the
/// policy the workers' mapping writes under, and so the one
/// `halosync reconcile` compares under.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub overwrite_prices: bool,
    pub overwrite_names: bool,
}

impl From<&ConnectionConfig> for Policy {
    fn from(conn: &ConnectionConfig) -> Policy {
        Policy {
            overwrite_prices: conn.overwrite_prices,
            overwrite_names: conn.overwrite_names,
        }
    }
}

impl ConnectionConfig {
    /// Whether a token minted for `self` is still good for `other`: the
    /// same application, secret, tenant, authorisation server and scope.
    pub fn same_credentials(&self, other: &ConnectionConfig) -> bool {
        self.auth_server == other.auth_server
            && self.tenant == other.tenant
            && self.client_id == other.client_id
            && self.client_secret == other.client_secret
            && self.scope == other.scope
    }

    /// The token endpoint: the authorisation server (trailing slash or not)
    /// plus `/token`, with `?tenant=` only for hosted instances.
    pub fn token_url(&self) -> String {
        let base = self.auth_server.trim_end_matches('/');
        match &self.tenant {
            Some(t) => format!(
                "{base}/token?{}",
                serde_urlencoded::to_string([("tenant", t.as_str())]).unwrap_or_default()
            ),
            None => format!("{base}/token"),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    amqp_url: Option<String>,
    redis_url: Option<String>,
    prefix: Option<String>,
    #[serde(default)]
    worker: RawWorker,
    #[serde(default)]
    retry: RawRetry,
    #[serde(default)]
    connections: BTreeMap<String, RawConnection>,
    // TLS and credentials of Redis and RabbitMQ (resolved by `AccessKeys`).
    redis_ca_file: Option<PathBuf>,
    redis_username: Option<String>,
    redis_password_env: Option<String>,
    redis_password_file: Option<PathBuf>,
    amqp_ca_file: Option<PathBuf>,
    amqp_client_cert_file: Option<PathBuf>,
    amqp_client_key_file: Option<PathBuf>,
    amqp_client_pkcs12_file: Option<PathBuf>,
    amqp_client_pkcs12_password_env: Option<String>,
    amqp_client_pkcs12_password_file: Option<PathBuf>,
    amqp_username: Option<String>,
    amqp_password_env: Option<String>,
    amqp_password_file: Option<PathBuf>,
    console: Option<toml::Table>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConnection {
    resource_server: Option<String>,
    auth_server: Option<String>,
    tenant: Option<String>,
    client_id: Option<String>,
    client_secret_env: Option<String>,
    client_secret_file: Option<PathBuf>,
    /// Refused with an explanation: secrets never live in the file's text.
    client_secret: Option<toml::Value>,
    scope: Option<String>,
    requests_per_window: Option<u32>,
    window_seconds: Option<u64>,
    /// The same as `window_seconds`, human-readable (`"5m"`).
    #[serde(default, with = "humantime_serde")]
    window: Option<Duration>,
    match_existing_by_name: Option<bool>,
    overwrite_prices: Option<bool>,
    overwrite_names: Option<bool>,
    #[serde(default)]
    items: BTreeMap<String, i64>,
}

/// Where environment values come from (a seam for tests).
pub trait Env {
    fn var(&self, key: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
}

impl Config {
    /// Loads the file named by `HALOSYNC_CONFIG` (or `path` when given, or
    /// `halosync.toml`), then applies the environment overrides.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let path = match path {
            Some(p) => p.to_path_buf(),
            None => std::env::var_os("HALOSYNC_CONFIG")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH)),
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        Config::from_toml(&text, &path, &ProcessEnv)
    }

    /// Parses and validates TOML text; `origin` is only used in messages.
    pub fn from_toml(text: &str, origin: &Path, env: &dyn Env) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_path_buf(),
            message: e.to_string(),
        })?;
        let access_keys = AccessKeys::from_raw(&raw, env);
        let amqp_url = env
            .var("AMQP_URL")
            .or(raw.amqp_url)
            .unwrap_or_else(|| DEFAULT_AMQP_URL.to_string());
        if !(amqp_url.starts_with("amqp://") || amqp_url.starts_with("amqps://")) {
            return Err(ConfigError::key(
                "amqp_url",
                "must start with amqp:// or amqps://, e.g. \"amqp://guest:guest@127.0.0.1:5672/%2f\"",
            ));
        }
        let redis_url = env
            .var("REDIS_URL")
            .or(raw.redis_url)
            .unwrap_or_else(|| DEFAULT_REDIS_URL.to_string());
        if !(redis_url.starts_with("redis://")
            || redis_url.starts_with("rediss://")
            || redis_url.starts_with("unix://"))
        {
            return Err(ConfigError::key(
                "redis_url",
                "must start with redis://, rediss:// or unix://, e.g. \"redis://127.0.0.1:6379/0\"",
            ));
        }
        let prefix = env
            .var("HALOSYNC_PREFIX")
            .or(raw.prefix)
            .unwrap_or_default();
        if !prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(ConfigError::key(
                "prefix",
                "may only hold letters, digits, '-', '_' and '.', e.g. \"test-42.\"",
            ));
        }
        let mut warnings = Vec::new();
        let worker = worker_settings(raw.worker, &mut warnings)?;
        let retry = retry_settings(raw.retry, &mut warnings)?;
        let mut connections = BTreeMap::new();
        for (name, rc) in raw.connections {
            let conn = connection(&name, rc, env)?;
            connections.insert(name, conn);
        }
        let redis_access = access_keys.redis(&redis_url, env)?;
        let amqp_access = access_keys.amqp(&amqp_url, env)?;
        Ok(Config {
            amqp_url,
            redis_url,
            prefix,
            worker,
            retry,
            connections,
            warnings,
            redis_access,
            amqp_access,
            console: raw.console,
        })
    }

    /// The configured connection for an event, if any.
    pub fn connection(&self, name: &str) -> Option<&ConnectionConfig> {
        self.connections.get(name)
    }

    /// Workers need at least one connection; the operator's tool does not.
    pub fn require_connections(&self) -> Result<(), ConfigError> {
        if self.connections.is_empty() {
            return Err(ConfigError::key(
                "connections",
                "no HaloPSA connection is configured; add a [connections.NAME] table (see README, Configuration)",
            ));
        }
        Ok(())
    }
}

fn validate_worker(w: &WorkerSettings) -> Result<(), ConfigError> {
    if w.prefetch == 0 {
        return Err(ConfigError::key(
            "worker.prefetch",
            "must be at least 1 (default 32)",
        ));
    }
    if w.max_message_bytes < 1024 {
        return Err(ConfigError::key(
            "worker.max_message_bytes",
            "must be at least 1024 (default 262144)",
        ));
    }
    if w.lane_stall < Duration::from_millis(50) {
        return Err(ConfigError::key(
            "worker.lane_stall",
            "must be at least \"50ms\" (default \"1s\")",
        ));
    }
    if w.lanes_at_once == 0 {
        return Err(ConfigError::key(
            "worker.lanes_at_once",
            "must be at least 1 (default 16)",
        ));
    }
    if w.lock_ttl < Duration::from_secs(1) {
        return Err(ConfigError::key(
            "worker.lock_ttl",
            "must be at least \"1s\" (default \"10s\")",
        ));
    }
    if w.http_timeout < Duration::from_millis(100) {
        return Err(ConfigError::key(
            "worker.http_timeout",
            "must be at least \"100ms\" (default \"30s\")",
        ));
    }
    if w.ledger_ttl < Duration::from_secs(1) {
        return Err(ConfigError::key(
            "worker.ledger_ttl",
            "must be at least \"1s\" (default \"7days\")",
        ));
    }
    Ok(())
}

fn validate_retry(r: &RetrySettings) -> Result<(), ConfigError> {
    if r.delays.is_empty() {
        return Err(ConfigError::key(
            "retry.delays",
            "needs at least one delay, e.g. [\"1s\", \"5s\", \"30s\", \"2m\", \"10m\"]",
        ));
    }
    if r.delays.iter().any(|d| d.as_millis() == 0) {
        return Err(ConfigError::key(
            "retry.delays",
            "delays must be at least \"1ms\"",
        ));
    }
    if r.delays.windows(2).any(|w| w[0] > w[1]) {
        return Err(ConfigError::key(
            "retry.delays",
            "delays must grow (or stay equal) from one tier to the next",
        ));
    }
    if r.max_attempts == 0 {
        return Err(ConfigError::key(
            "retry.max_attempts",
            "must be at least 1 (default 8)",
        ));
    }
    if r.dependency_max_attempts == 0 {
        return Err(ConfigError::key(
            "retry.dependency_max_attempts",
            "must be at least 1 (default 24)",
        ));
    }
    Ok(())
}

/// Absent, empty, `Not set` (Gradient MSP's guide) and `None` (CIPP's
/// sentinel) all mean on-premise: no `tenant` parameter is sent. A pasted
/// host (`acme.halopsa.com` or `https://acme.halopsa.com/`) is cut down to
/// the tenant name, as WYRE's connector does (reference §8.3).
pub fn normalise_tenant(raw: Option<&str>) -> Option<String> {
    let t = raw?.trim();
    if t.is_empty() || t.eq_ignore_ascii_case("not set") || t.eq_ignore_ascii_case("none") {
        return None;
    }
    let t = t
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .trim_end_matches('/');
    let t = t.strip_suffix(".halopsa.com").unwrap_or(t);
    Some(t.to_string())
}

fn url_key(
    name: &str,
    key: &str,
    value: Option<String>,
    example: &str,
) -> Result<String, ConfigError> {
    let full = format!("connections.{name}.{key}");
    let value = value.ok_or_else(|| {
        ConfigError::key(
            &full,
            format!("is missing; copy it from HaloPSA's Configuration > Integrations > HaloPSA API, e.g. {key} = \"{example}\""),
        )
    })?;
    let value = value.trim().trim_end_matches('/').to_string();
    match reqwest::Url::parse(&value) {
        Ok(u) if u.scheme() == "https" || u.scheme() == "http" => Ok(value),
        _ => Err(ConfigError::key(
            full,
            format!("\"{value}\" is not an http(s) URL; write e.g. {key} = \"{example}\""),
        )),
    }
}

fn connection(
    name: &str,
    rc: RawConnection,
    env: &dyn Env,
) -> Result<ConnectionConfig, ConfigError> {
    let key = |k: &str| format!("connections.{name}.{k}");
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        || name.is_empty()
        || name.len() > 64
    {
        return Err(ConfigError::key(
            format!("connections.{name}"),
            "connection names may only hold letters, digits, '-' and '_' (at most 64), as events' `connection` field does",
        ));
    }
    let resource_server = url_key(
        name,
        "resource_server",
        rc.resource_server,
        "https://acme.halopsa.com/api",
    )?;
    let auth_server = url_key(
        name,
        "auth_server",
        rc.auth_server,
        "https://acme.halopsa.com/auth",
    )?;
    let client_id = rc
        .client_id
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            ConfigError::key(
                key("client_id"),
                "is missing; copy the Client ID of the HaloPSA application (it can change when the application is saved: copy the latest)",
            )
        })?;
    if rc.client_secret.is_some() {
        return Err(ConfigError::key(
            key("client_secret"),
            "secrets are never read from the config file; use client_secret_env = \"ENV_VAR_NAME\" or client_secret_file = \"/run/secrets/NAME\"",
        ));
    }
    let client_secret = match (rc.client_secret_env, rc.client_secret_file) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::key(
                key("client_secret_env"),
                "give either client_secret_env or client_secret_file, not both",
            ))
        }
        (None, None) => {
            return Err(ConfigError::key(
                key("client_secret_env"),
                "is missing; set client_secret_env = \"ENV_VAR_NAME\" (or client_secret_file = \"/path\") to where the HaloPSA client secret is",
            ))
        }
        (Some(var), None) => {
            let value = env.var(&var).map(|v| v.trim().to_string()).unwrap_or_default();
            if value.is_empty() {
                return Err(ConfigError::key(
                    key("client_secret_env"),
                    format!("environment variable {var} is not set or empty; export it with the HaloPSA client secret"),
                ));
            }
            Secret::new(value)
        }
        (None, Some(path)) => {
            let value = std::fs::read_to_string(&path).map_err(|e| {
                ConfigError::key(
                    key("client_secret_file"),
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            let value = value.trim().to_string();
            if value.is_empty() {
                return Err(ConfigError::key(
                    key("client_secret_file"),
                    format!("{} is empty; it must hold the HaloPSA client secret", path.display()),
                ));
            }
            Secret::new(value)
        }
    };
    let scope = rc.scope.unwrap_or_else(|| "all".to_string());
    if scope.trim().is_empty() {
        return Err(ConfigError::key(
            key("scope"),
            "must not be empty: a token minted without scope gets 401 on every call; use \"all\" or the space-separated scopes",
        ));
    }
    let requests_per_window = rc.requests_per_window.unwrap_or(300);
    if requests_per_window == 0 {
        return Err(ConfigError::key(
            key("requests_per_window"),
            "must be at least 1 (hosted HaloPSA allows about 300 per 5 minutes)",
        ));
    }
    // `window_seconds` is the contract's key (DESIGN §6), so it is not
    // deprecated; `window = "5m"` says the same in the human form.
    let window = match (rc.window, rc.window_seconds) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::key(
                key("window"),
                "give either window or window_seconds, not both",
            ))
        }
        (Some(d), None) => d,
        (None, Some(s)) => Duration::from_secs(s),
        (None, None) => Duration::from_secs(300),
    };
    if window < Duration::from_secs(1) {
        return Err(ConfigError::key(
            key("window_seconds"),
            "must be at least 1 second (default 300, i.e. \"5m\")",
        ));
    }
    for (sku, id) in &rc.items {
        if *id <= 0 {
            return Err(ConfigError::key(
                format!("connections.{name}.items.\"{sku}\""),
                format!("{id} is not a HaloPSA item id; write the positive id of the item, e.g. \"{sku}\" = 1234"),
            ));
        }
    }
    Ok(ConnectionConfig {
        name: name.to_string(),
        resource_server,
        auth_server,
        tenant: normalise_tenant(rc.tenant.as_deref()),
        client_id,
        client_secret,
        scope: scope.trim().to_string(),
        requests_per_window,
        window,
        match_existing_by_name: rc.match_existing_by_name.unwrap_or(false),
        overwrite_prices: rc.overwrite_prices.unwrap_or(true),
        overwrite_names: rc.overwrite_names.unwrap_or(true),
        items: rc.items,
    })
}

/// The TLS and credential keys of Redis and RabbitMQ, as written (CA files
/// after their `REDIS_CA_FILE` / `AMQP_CA_FILE` overrides), resolved into
/// [`crate::tls::RedisAccess`] and [`crate::tls::AmqpAccess`] once the URLs
/// are known. The files are read here once, so that a wrong path or a file
/// without a certificate stops the binary with the key named.
struct AccessKeys {
    redis_ca_file: Option<PathBuf>,
    redis_username: Option<String>,
    redis_password_env: Option<String>,
    redis_password_file: Option<PathBuf>,
    amqp_ca_file: Option<PathBuf>,
    amqp_client_cert_file: Option<PathBuf>,
    amqp_client_key_file: Option<PathBuf>,
    amqp_client_pkcs12_file: Option<PathBuf>,
    amqp_client_pkcs12_password_env: Option<String>,
    amqp_client_pkcs12_password_file: Option<PathBuf>,
    amqp_username: Option<String>,
    amqp_password_env: Option<String>,
    amqp_password_file: Option<PathBuf>,
}

impl AccessKeys {
    fn from_raw(raw: &RawConfig, env: &dyn Env) -> AccessKeys {
        let env_path = |var: &str| {
            env.var(var)
                .filter(|v| !v.trim().is_empty())
                .map(PathBuf::from)
        };
        AccessKeys {
            redis_ca_file: env_path("REDIS_CA_FILE").or_else(|| raw.redis_ca_file.clone()),
            redis_username: raw.redis_username.clone(),
            redis_password_env: raw.redis_password_env.clone(),
            redis_password_file: raw.redis_password_file.clone(),
            amqp_ca_file: env_path("AMQP_CA_FILE").or_else(|| raw.amqp_ca_file.clone()),
            amqp_client_cert_file: raw.amqp_client_cert_file.clone(),
            amqp_client_key_file: raw.amqp_client_key_file.clone(),
            amqp_client_pkcs12_file: raw.amqp_client_pkcs12_file.clone(),
            amqp_client_pkcs12_password_env: raw.amqp_client_pkcs12_password_env.clone(),
            amqp_client_pkcs12_password_file: raw.amqp_client_pkcs12_password_file.clone(),
            amqp_username: raw.amqp_username.clone(),
            amqp_password_env: raw.amqp_password_env.clone(),
            amqp_password_file: raw.amqp_password_file.clone(),
        }
    }

    fn redis(&self, url: &str, env: &dyn Env) -> Result<crate::tls::RedisAccess, ConfigError> {
        use crate::tls::{files, Service};
        use redis::IntoConnectionInfo;
        let info = url.into_connection_info().map_err(|e| {
            ConfigError::key(
                "redis_url",
                format!(
                    "{} cannot be parsed ({e}); write e.g. \"rediss://cache.example.com:6380/0\"",
                    crate::tls::redact_url(url)
                ),
            )
        })?;
        if let Some(ca) = &self.redis_ca_file {
            if !url.starts_with("rediss://") {
                return Err(ConfigError::key(
                    "redis_ca_file",
                    format!("is set, but redis_url {} does not use TLS; write redis_url = \"rediss://HOST:PORT/0\" or remove redis_ca_file", crate::tls::redact_url(url)),
                ));
            }
            files::read_ca(Service::Redis, "redis_ca_file", ca)
                .map_err(|e| ConfigError::key("redis_ca_file", e.problem_with_path()))?;
        }
        let password = secret_from(
            "redis_password_env",
            "redis_password_file",
            self.redis_password_env.as_deref(),
            self.redis_password_file.as_deref(),
            env,
            "the Redis password",
        )?;
        if password.is_some() && info.redis_settings().password().is_some() {
            return Err(ConfigError::key(
                "redis_password_env",
                "redis_url already holds a password; keep it in one place: remove it from redis_url (rediss://USER@HOST:PORT/0) or drop redis_password_env / redis_password_file",
            ));
        }
        let username = self.redis_username.as_ref().map(|u| u.trim().to_string());
        if username.as_deref() == Some("") {
            return Err(ConfigError::key("redis_username", "is empty; write the ACL user's name or remove the key (then the user in redis_url, else `default`, is used)"));
        }
        Ok(crate::tls::RedisAccess {
            ca_file: self.redis_ca_file.clone(),
            username,
            password,
        })
    }

    fn amqp(&self, url: &str, env: &dyn Env) -> Result<crate::tls::AmqpAccess, ConfigError> {
        use crate::tls::{files, ClientIdentity, Service};
        let tls = url.starts_with("amqps://");
        let needs_tls = |key: &str| {
            ConfigError::key(
                key,
                format!("is set, but amqp_url {} does not use TLS; write amqp_url = \"amqps://USER@HOST:5671/%2f\" or remove {key}", crate::tls::redact_url(url)),
            )
        };
        if let Some(ca) = &self.amqp_ca_file {
            if !tls {
                return Err(needs_tls("amqp_ca_file"));
            }
            files::read_ca(Service::Broker, "amqp_ca_file", ca)
                .map_err(|e| ConfigError::key("amqp_ca_file", e.problem_with_path()))?;
        }
        let pkcs12_password = secret_from(
            "amqp_client_pkcs12_password_env",
            "amqp_client_pkcs12_password_file",
            self.amqp_client_pkcs12_password_env.as_deref(),
            self.amqp_client_pkcs12_password_file.as_deref(),
            env,
            "the PKCS#12 password",
        )?;
        let identity = match (
            &self.amqp_client_cert_file,
            &self.amqp_client_key_file,
            &self.amqp_client_pkcs12_file,
        ) {
            (None, None, None) => None,
            (Some(_), Some(_), Some(_)) | (Some(_), None, Some(_)) | (None, Some(_), Some(_)) => {
                return Err(ConfigError::key(
                    "amqp_client_pkcs12_file",
                    "give the client certificate either as amqp_client_cert_file + amqp_client_key_file (PEM) or as amqp_client_pkcs12_file, not both",
                ))
            }
            (Some(_), None, None) => {
                return Err(ConfigError::key("amqp_client_key_file", "is missing: amqp_client_cert_file needs the PEM private key beside it, e.g. amqp_client_key_file = \"/run/secrets/amqp-client.key\""))
            }
            (None, Some(_), None) => {
                return Err(ConfigError::key("amqp_client_cert_file", "is missing: amqp_client_key_file needs the PEM certificate beside it, e.g. amqp_client_cert_file = \"/etc/halosync/amqp-client.pem\""))
            }
            (Some(cert), Some(key), None) => Some(ClientIdentity::Pem {
                cert_file: cert.clone(),
                key_file: key.clone(),
            }),
            (None, None, Some(file)) => Some(ClientIdentity::Pkcs12 {
                file: file.clone(),
                password: pkcs12_password.clone().unwrap_or_else(|| Secret::new("")),
            }),
        };
        if pkcs12_password.is_some() && self.amqp_client_pkcs12_file.is_none() {
            return Err(ConfigError::key("amqp_client_pkcs12_file", "is missing: a PKCS#12 password is configured, but no amqp_client_pkcs12_file to open with it"));
        }
        if let Some(id) = &identity {
            if !tls {
                return Err(needs_tls(files::identity_keys(id).0));
            }
            files::read_identity(Service::Broker, id)
                .map_err(|e| ConfigError::key(e.key, e.problem_with_path()))?;
        }
        let password = secret_from(
            "amqp_password_env",
            "amqp_password_file",
            self.amqp_password_env.as_deref(),
            self.amqp_password_file.as_deref(),
            env,
            "the RabbitMQ password",
        )?;
        Ok(crate::tls::AmqpAccess {
            ca_file: self.amqp_ca_file.clone(),
            identity,
            username: self
                .amqp_username
                .as_ref()
                .map(|u| u.trim().to_string())
                .filter(|u| !u.is_empty()),
            password,
        })
    }
}

/// A secret named by `<x>_env` or `<x>_file` (at most one of them), as
/// client secrets are: never from the file's own text.
fn secret_from(
    env_key: &str,
    file_key: &str,
    var: Option<&str>,
    file: Option<&Path>,
    env: &dyn Env,
    what: &str,
) -> Result<Option<Secret>, ConfigError> {
    match (var, file) {
        (None, None) => Ok(None),
        (Some(_), Some(_)) => Err(ConfigError::key(
            env_key,
            format!("give either {env_key} or {file_key}, not both"),
        )),
        (Some(var), None) => {
            let value = env
                .var(var)
                .map(|v| v.trim().to_string())
                .unwrap_or_default();
            if value.is_empty() {
                return Err(ConfigError::key(
                    env_key,
                    format!(
                        "environment variable {var} is not set or empty; export it with {what}"
                    ),
                ));
            }
            Ok(Some(Secret::new(value)))
        }
        (None, Some(path)) => {
            let value = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::key(file_key, format!("cannot read {}: {e}", path.display()))
            })?;
            let value = value.trim().to_string();
            if value.is_empty() {
                return Err(ConfigError::key(
                    file_key,
                    format!("{} is empty; it must hold {what}", path.display()),
                ));
            }
            Ok(Some(Secret::new(value)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct MapEnv(HashMap<&'static str, &'static str>);
    impl Env for MapEnv {
        fn var(&self, key: &str) -> Option<String> {
            self.0.get(key).map(|s| s.to_string())
        }
    }

    fn env() -> MapEnv {
        MapEnv(HashMap::from([("ACME_SECRET", "s3cr3t")]))
    }

    const GOOD: &str = r#"
prefix = "t1."
[connections.acme]
resource_server = "https://acme.halopsa.com/api/"
auth_server = "https://acme.halopsa.com/auth/"
tenant = "acme"
client_id = "abc"
client_secret_env = "ACME_SECRET"
[connections.acme.items]
"MS-365-BP" = 1234
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("test.toml"), &env())
    }

    #[test]
    fn parses_the_design_example_with_defaults() {
        let c = parse(GOOD).unwrap();
        let a = &c.connections["acme"];
        assert_eq!(c.prefix, "t1.");
        assert_eq!(c.amqp_url, DEFAULT_AMQP_URL);
        assert_eq!(a.scope, "all");
        assert_eq!(a.requests_per_window, 300);
        assert_eq!(a.window, Duration::from_secs(300));
        assert!(a.overwrite_prices);
        assert!(!a.match_existing_by_name);
        assert_eq!(a.items["MS-365-BP"], 1234);
        assert_eq!(a.client_secret.expose(), "s3cr3t");
        assert_eq!(
            a.token_url(),
            "https://acme.halopsa.com/auth/token?tenant=acme"
        );
        assert_eq!(a.resource_server, "https://acme.halopsa.com/api");
    }

    #[test]
    fn env_overrides_win() {
        let e = MapEnv(HashMap::from([
            ("ACME_SECRET", "x"),
            ("AMQP_URL", "amqp://u:p@h:1/%2f"),
            ("REDIS_URL", "redis://h:2/1"),
            ("HALOSYNC_PREFIX", "p2."),
        ]));
        let c = Config::from_toml(GOOD, Path::new("t"), &e).unwrap();
        assert_eq!(c.amqp_url, "amqp://u:p@h:1/%2f");
        assert_eq!(c.redis_url, "redis://h:2/1");
        assert_eq!(c.prefix, "p2.");
    }

    #[test]
    fn tenant_sentinels_mean_on_premise() {
        for t in ["", "Not set", "not set", "None", "  "] {
            assert_eq!(normalise_tenant(Some(t)), None, "{t:?}");
        }
        assert_eq!(normalise_tenant(None), None);
        assert_eq!(normalise_tenant(Some("acme")), Some("acme".into()));
        assert_eq!(
            normalise_tenant(Some("https://acme.halopsa.com/")),
            Some("acme".into())
        );
        let text = GOOD.replace("tenant = \"acme\"", "tenant = \"Not set\"");
        let c = parse(&text).unwrap();
        assert_eq!(
            c.connections["acme"].token_url(),
            "https://acme.halopsa.com/auth/token"
        );
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse(&GOOD.replace("tenant =", "tennant =")).unwrap_err();
        assert!(err.to_string().contains("tennant"), "{err}");
    }

    #[test]
    fn missing_secret_env_names_key_and_variable() {
        let err = parse(&GOOD.replace("ACME_SECRET", "NOPE_SECRET")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("connections.acme.client_secret_env"), "{msg}");
        assert!(msg.contains("NOPE_SECRET"), "{msg}");
    }

    #[test]
    fn inline_secret_is_refused_without_echoing_it() {
        let text = GOOD.replace(
            "client_secret_env = \"ACME_SECRET\"",
            "client_secret = \"hunter2\"",
        );
        let msg = parse(&text).unwrap_err().to_string();
        assert!(msg.contains("client_secret_env"), "{msg}");
        assert!(!msg.contains("hunter2"), "{msg}");
    }

    #[test]
    fn missing_resource_server_says_what_to_write() {
        let text = GOOD.replace("resource_server = \"https://acme.halopsa.com/api/\"\n", "");
        let msg = parse(&text).unwrap_err().to_string();
        assert!(msg.contains("connections.acme.resource_server"), "{msg}");
        assert!(msg.contains("https://acme.halopsa.com/api"), "{msg}");
    }

    #[test]
    fn bad_numbers_are_refused() {
        let text = format!("{GOOD}\n[worker]\nprefetch = 0\n");
        assert!(parse(&text)
            .unwrap_err()
            .to_string()
            .contains("worker.prefetch"));
        let text = GOOD.replace(
            "[connections.acme.items]",
            "requests_per_window = 0\n[connections.acme.items]",
        );
        assert!(parse(&text)
            .unwrap_err()
            .to_string()
            .contains("requests_per_window"));
        let text = format!("{GOOD}\n[retry]\ndelays = [\"5s\", \"1s\"]\n");
        assert!(parse(&text)
            .unwrap_err()
            .to_string()
            .contains("retry.delays"));
    }

    #[test]
    fn durations_read_in_human_form() {
        let text = format!(
            "{GOOD}\n[worker]\nlock_ttl = \"15s\"\nbatch_wait = \"250ms\"\nledger_ttl = \"2days\"\n[retry]\ndelays = [\"1s\", \"1m\"]\nrate_limited_min_delay = \"45s\"\n"
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.worker.lock_ttl, Duration::from_secs(15));
        assert_eq!(c.worker.batch_wait, Duration::from_millis(250));
        assert_eq!(c.worker.ledger_ttl, Duration::from_secs(2 * 86400));
        assert_eq!(c.worker.http_timeout, Duration::from_secs(30));
        assert_eq!(c.retry.delays_ms(), vec![1000, 60_000]);
        assert_eq!(c.retry.rate_limited_min_delay, Duration::from_secs(45));
        assert_eq!(c.retry.dependency_recheck, Duration::from_secs(60));
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    }

    #[test]
    fn deprecated_integer_keys_still_read_with_a_warning() {
        let text = format!(
            "{GOOD}\n[worker]\nlock_ttl_ms = 15000\nshutdown_grace_secs = 5\n[retry]\ndelays_ms = [1000, 60000]\n"
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.worker.lock_ttl, Duration::from_secs(15));
        assert_eq!(c.worker.shutdown_grace, Duration::from_secs(5));
        assert_eq!(c.retry.delays_ms(), vec![1000, 60_000]);
        assert_eq!(c.warnings.len(), 3, "{:?}", c.warnings);
        assert!(
            c.warnings[0].contains("worker.lock_ttl = \"15s\""),
            "{:?}",
            c.warnings
        );
        assert!(
            c.warnings[2].contains("retry.delays = [\"1s\", \"1m\"]"),
            "{:?}",
            c.warnings
        );
    }

    #[test]
    fn a_bad_duration_names_the_key_and_both_forms_are_refused() {
        let msg = parse(&format!("{GOOD}\n[worker]\nlock_ttl = \"ten seconds\"\n"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("lock_ttl"), "{msg}");
        let msg = parse(&format!(
            "{GOOD}\n[worker]\nlock_ttl = \"10s\"\nlock_ttl_ms = 10000\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(msg.contains("not both"), "{msg}");
        let msg = parse(&format!("{GOOD}\n[worker]\nlock_ttl = \"10ms\"\n"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("worker.lock_ttl"), "{msg}");
    }

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?}"), "*** Secret(***)");
        let c = parse(GOOD).unwrap();
        assert!(!format!("{c:?}").contains("s3cr3t"));
    }

    // ---- TLS and credentials of Redis and RabbitMQ ----

    fn tls_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("halosync-cfg-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn ca_pem(dir: &Path) -> PathBuf {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        let path = dir.join("ca.pem");
        std::fs::write(&path, cert.pem()).unwrap();
        path
    }

    fn tls_env(pairs: &[(&'static str, &'static str)]) -> MapEnv {
        let mut m = HashMap::from([("ACME_SECRET", "s3cr3t")]);
        m.extend(pairs.iter().copied());
        MapEnv(m)
    }

    #[test]
    fn redis_tls_keys_resolve_and_never_print_the_password() {
        let dir = tls_dir("redis-ok");
        let ca = ca_pem(&dir);
        let text = format!(
            "redis_url = \"rediss://cache.example:6380/0\"\nredis_ca_file = \"{}\"\nredis_username = \"halosync\"\nredis_password_env = \"REDIS_PW\"\n{GOOD}",
            ca.display()
        );
        let c =
            Config::from_toml(&text, Path::new("t"), &tls_env(&[("REDIS_PW", "hunter2")])).unwrap();
        assert_eq!(c.redis_access.ca_file.as_deref(), Some(ca.as_path()));
        assert_eq!(c.redis_access.username.as_deref(), Some("halosync"));
        assert_eq!(
            c.redis_access.password.as_ref().map(Secret::expose),
            Some("hunter2")
        );
        assert!(!format!("{c:?}").contains("hunter2"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn ca_file_env_overrides_win() {
        let dir = tls_dir("env");
        let ca = ca_pem(&dir);
        let path: &'static str = Box::leak(ca.display().to_string().into_boxed_str());
        let text = format!(
            "redis_url = \"rediss://h:6380/0\"\namqp_url = \"amqps://u:p@h:5671/%2f\"\n{GOOD}"
        );
        let e = tls_env(&[("REDIS_CA_FILE", path), ("AMQP_CA_FILE", path)]);
        let c = Config::from_toml(&text, Path::new("t"), &e).unwrap();
        assert_eq!(c.redis_access.ca_file.as_deref(), Some(ca.as_path()));
        assert_eq!(c.amqp_access.ca_file.as_deref(), Some(ca.as_path()));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn tls_config_errors_name_the_key() {
        let dir = tls_dir("errors");
        let ca = ca_pem(&dir);
        let not_pem = dir.join("not.pem");
        std::fs::write(&not_pem, "hello\n").unwrap();
        let cases: Vec<(String, &str, &str)> = vec![
            (
                format!("redis_url = \"rediss://h:6380/0\"\nredis_ca_file = \"{}\"", dir.join("missing.pem").display()),
                "redis_ca_file",
                "missing.pem",
            ),
            (
                format!("redis_url = \"rediss://h:6380/0\"\nredis_ca_file = \"{}\"", not_pem.display()),
                "redis_ca_file",
                "BEGIN CERTIFICATE",
            ),
            (
                format!("redis_url = \"redis://h:6379/0\"\nredis_ca_file = \"{}\"", ca.display()),
                "redis_ca_file",
                "rediss://",
            ),
            (
                "redis_url = \"rediss://h:6380/0\"\nredis_password_env = \"NOPE_PW\"".to_string(),
                "redis_password_env",
                "NOPE_PW",
            ),
            (
                "redis_url = \"rediss://:inline@h:6380/0\"\nredis_password_env = \"REDIS_PW\"".to_string(),
                "redis_password_env",
                "already holds a password",
            ),
            (
                format!("redis_url = \"rediss://h:6380/0\"\nredis_password_env = \"REDIS_PW\"\nredis_password_file = \"{}\"", ca.display()),
                "redis_password_env",
                "not both",
            ),
            (
                format!("amqp_url = \"amqp://h:5672/%2f\"\namqp_ca_file = \"{}\"", ca.display()),
                "amqp_ca_file",
                "amqps://",
            ),
            (
                format!("amqp_url = \"amqps://h:5671/%2f\"\namqp_client_cert_file = \"{}\"", ca.display()),
                "amqp_client_key_file",
                "is missing",
            ),
            (
                format!("amqp_url = \"amqps://h:5671/%2f\"\namqp_client_cert_file = \"{0}\"\namqp_client_key_file = \"{0}\"", ca.display()),
                "amqp_client_key_file",
                "private key",
            ),
            (
                "amqp_url = \"amqps://h:5671/%2f\"\namqp_password_file = \"/nonexistent/pw\"".to_string(),
                "amqp_password_file",
                "/nonexistent/pw",
            ),
        ];
        for (top, key, hint) in cases {
            let text = format!("{top}\n{GOOD}");
            let e = tls_env(&[("REDIS_PW", "hunter2")]);
            let msg = Config::from_toml(&text, Path::new("t"), &e)
                .unwrap_err()
                .to_string();
            assert!(msg.contains(&format!("`{key}`")), "{top}: {msg}");
            assert!(msg.contains(hint), "{top}: {msg}");
            assert!(
                !msg.contains("hunter2") && !msg.contains("inline"),
                "{top}: {msg}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
