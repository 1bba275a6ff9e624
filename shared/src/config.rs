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

/// A secret value: printed as `***` by `Debug` and `Display`, so that it can
/// never reach a log line, an error or a panic message by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The secret itself; call only where it is sent to HaloPSA.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

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
    /// The `[console]` table as written, for `halosync console` to parse
    /// (users, audit file); the workers ignore it.
    pub console: Option<toml::Table>,
}

/// How a worker consumes. All keys live under `[worker]` and are optional.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerSettings {
    /// Unacked messages the broker hands one worker at once; they are
    /// processed concurrently.
    pub prefetch: u16,
    /// Bodies larger than this are dead-lettered as `invalid`.
    pub max_message_bytes: usize,
    /// TTL of a per-aggregate lock; renewed while its holder works, so it
    /// only bounds how long a crashed holder blocks the aggregate.
    pub lock_ttl_ms: u64,
    /// How long a message waits for its aggregate's lock before it is
    /// retried through the delay queues instead.
    pub lock_wait_ms: u64,
    /// How long the processed-event ledger remembers an event id.
    pub ledger_ttl_secs: u64,
    /// On SIGTERM, how long in-flight messages may take to finish.
    pub shutdown_grace_secs: u64,
    /// The longest a request waits in-process for the shared rate budget;
    /// beyond that the message goes back to the broker's delay queues.
    pub rate_wait_max_ms: u64,
    /// Added to the rate window so that requests granted at a window's edge
    /// still arrive inside HaloPSA's own window (network latency).
    pub rate_margin_ms: u64,
    /// HTTP timeout for one HaloPSA request.
    pub http_timeout_ms: u64,
    /// Port for /metrics, /healthz and /readyz; 0 disables the endpoint.
    pub health_port: u16,
    /// Batching workers (usage, overage): most messages in one batch.
    pub batch_max: u16,
    /// Batching workers: how long a batch waits for more messages after
    /// its first one.
    pub batch_wait_ms: u64,
    /// Record one activity record per settled message to the activity
    /// stream (`crate::activity`); `false` turns it off (to measure its cost).
    pub activity: bool,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        WorkerSettings {
            prefetch: 32,
            max_message_bytes: 256 * 1024,
            lock_ttl_ms: 10_000,
            lock_wait_ms: 5_000,
            ledger_ttl_secs: 7 * 24 * 3600,
            shutdown_grace_secs: 30,
            rate_wait_max_ms: 10_000,
            rate_margin_ms: 1_000,
            http_timeout_ms: 30_000,
            health_port: 0,
            batch_max: 200,
            batch_wait_ms: 200,
            activity: true,
        }
    }
}

/// Retry tiers (DESIGN §3). Each delay becomes one TTL delay queue per work
/// queue, named after its delay, so changing the tiers adds queues instead
/// of clashing with the old ones.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrySettings {
    /// Delay before attempt 2, 3, ...; attempts past the list use the last.
    pub delays_ms: Vec<u64>,
    /// Attempts (including the first) before a transient failure is
    /// dead-lettered as `exhausted`.
    pub max_attempts: u32,
    /// Attempts before a `dependency` failure is dead-lettered.
    pub dependency_max_attempts: u32,
    /// A 429 without `Retry-After` waits at least this long.
    pub rate_limited_min_delay_ms: u64,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            delays_ms: vec![1_000, 5_000, 30_000, 120_000, 600_000],
            max_attempts: 8,
            dependency_max_attempts: 24,
            rate_limited_min_delay_ms: 30_000,
        }
    }
}

/// One HaloPSA instance (DESIGN §6).
#[derive(Clone, Debug)]
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

impl ConnectionConfig {
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
    worker: WorkerSettings,
    #[serde(default)]
    retry: RetrySettings,
    #[serde(default)]
    connections: BTreeMap<String, RawConnection>,
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
        validate_worker(&raw.worker)?;
        validate_retry(&raw.retry)?;
        let mut connections = BTreeMap::new();
        for (name, rc) in raw.connections {
            let conn = connection(&name, rc, env)?;
            connections.insert(name, conn);
        }
        Ok(Config {
            amqp_url,
            redis_url,
            prefix,
            worker: raw.worker,
            retry: raw.retry,
            connections,
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
    if w.lock_ttl_ms < 1000 {
        return Err(ConfigError::key(
            "worker.lock_ttl_ms",
            "must be at least 1000 (default 10000)",
        ));
    }
    if w.http_timeout_ms < 100 {
        return Err(ConfigError::key(
            "worker.http_timeout_ms",
            "must be at least 100 (default 30000)",
        ));
    }
    Ok(())
}

fn validate_retry(r: &RetrySettings) -> Result<(), ConfigError> {
    if r.delays_ms.is_empty() {
        return Err(ConfigError::key(
            "retry.delays_ms",
            "needs at least one delay, e.g. [1000, 5000, 30000, 120000, 600000]",
        ));
    }
    if r.delays_ms.contains(&0) {
        return Err(ConfigError::key(
            "retry.delays_ms",
            "delays must be above 0 milliseconds",
        ));
    }
    if r.delays_ms.windows(2).any(|w| w[0] > w[1]) {
        return Err(ConfigError::key(
            "retry.delays_ms",
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
    let window_seconds = rc.window_seconds.unwrap_or(300);
    if window_seconds == 0 {
        return Err(ConfigError::key(
            key("window_seconds"),
            "must be at least 1 (default 300)",
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
        window: Duration::from_secs(window_seconds),
        match_existing_by_name: rc.match_existing_by_name.unwrap_or(false),
        overwrite_prices: rc.overwrite_prices.unwrap_or(true),
        overwrite_names: rc.overwrite_names.unwrap_or(true),
        items: rc.items,
    })
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
        let text = format!("{GOOD}\n[retry]\ndelays_ms = [5000, 1000]\n");
        assert!(parse(&text)
            .unwrap_err()
            .to_string()
            .contains("retry.delays_ms"));
    }

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?}"), "*** Secret(***)");
        let c = parse(GOOD).unwrap();
        assert!(!format!("{c:?}").contains("s3cr3t"));
    }
}
