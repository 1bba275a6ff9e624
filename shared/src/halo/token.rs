//! OAuth2 client-credentials tokens (reference §1), cached in Redis per
//! connection and shared by every process, with a single-flight refresh:
//! however many workers start together, one token request per connection.
//!
//! Lookup order: this process's memory, then Redis, then (holding the
//! Redis refresh lock) the token endpoint. Tokens are refreshed
//! `REFRESH_EARLY` before `expires_in` runs out. If Redis is down, each
//! process mints its own token: slower, never wrong.

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use serde::Deserialize;
use tokio::sync::Mutex;

use super::error::{message_from_body, HaloError, BODY_EXCERPT};
use crate::config::ConnectionConfig;
use crate::error::excerpt;
use crate::store::Keys;

/// Refresh this long before HaloPSA's `expires_in` runs out (halocli uses
/// 60 s, WYRE 120 s; reference §1.3).
pub const REFRESH_EARLY: Duration = Duration::from_secs(60);
/// How long one process may hold the refresh lock.
const LOCK_TTL: Duration = Duration::from_secs(15);

const DELETE_IF_SAME: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

#[derive(Clone)]
struct Cached {
    token: Arc<str>,
    /// When this process should stop using it.
    refresh_at: Instant,
}

/// The token source of one connection.
pub struct TokenProvider {
    conn: Arc<ConnectionConfig>,
    http: reqwest::Client,
    redis: ConnectionManager,
    key: String,
    lock_key: String,
    local: Mutex<Option<Cached>>,
    refreshes: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for TokenProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenProvider")
            .field("connection", &self.conn.name)
            .finish_non_exhaustive()
    }
}

impl TokenProvider {
    pub fn new(
        conn: Arc<ConnectionConfig>,
        http: reqwest::Client,
        redis: ConnectionManager,
        keys: &Keys,
    ) -> TokenProvider {
        TokenProvider {
            key: keys.token(&conn.name),
            lock_key: keys.token_lock(&conn.name),
            conn,
            http,
            redis,
            local: Mutex::new(None),
            refreshes: Default::default(),
        }
    }

    /// Token requests this process has made (for metrics and tests).
    pub fn refreshes(&self) -> u64 {
        self.refreshes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A valid bearer token.
    pub async fn get(&self) -> Result<Arc<str>, HaloError> {
        let mut local = self.local.lock().await;
        if let Some(c) = local.as_ref() {
            if Instant::now() < c.refresh_at {
                return Ok(c.token.clone());
            }
        }
        let fresh = self.shared().await?;
        *local = Some(fresh.clone());
        Ok(fresh.token)
    }

    /// Drops the cached token here and in Redis whatever it is: the
    /// connection's credentials were changed (a reloaded config with a
    /// rotated secret), so a token minted with the old ones must not be
    /// used again. Every worker that reloads does this once; the next
    /// request mints one token under the single-flight lock.
    pub async fn forget(&self) {
        *self.local.lock().await = None;
        let mut r = self.redis.clone();
        let result: Result<i64, _> = redis::cmd("DEL").arg(&self.key).query_async(&mut r).await;
        if let Err(e) = result {
            tracing::warn!(connection = %self.conn.name, error = %e, "could not drop the token from redis");
        }
    }

    /// Drops `token` (after a 401 or "Token not found") here and in Redis,
    /// unless another process has already replaced it there.
    pub async fn invalidate(&self, token: &str) {
        {
            let mut local = self.local.lock().await;
            if local.as_ref().is_some_and(|c| &*c.token == token) {
                *local = None;
            }
        }
        let mut r = self.redis.clone();
        let result: Result<i64, _> = redis::Script::new(DELETE_IF_SAME)
            .key(&self.key)
            .arg(token)
            .invoke_async(&mut r)
            .await;
        if let Err(e) = result {
            tracing::warn!(connection = %self.conn.name, error = %e, "could not drop the token from redis");
        }
    }

    /// From Redis, or minted under the single-flight lock.
    async fn shared(&self) -> Result<Cached, HaloError> {
        let mut r = self.redis.clone();
        let deadline = Instant::now() + LOCK_TTL + Duration::from_secs(5);
        let lock_token = uuid::Uuid::new_v4().to_string();
        loop {
            match self.cached_in_redis(&mut r).await {
                Ok(Some(c)) => return Ok(c),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(connection = %self.conn.name, error = %e,
                        "redis unavailable for the token cache; minting a token for this process only");
                    return self.mint().await.map(|(c, _)| c);
                }
            }
            let got: Result<Option<String>, _> = redis::cmd("SET")
                .arg(&self.lock_key)
                .arg(&lock_token)
                .arg("NX")
                .arg("PX")
                .arg(LOCK_TTL.as_millis() as u64)
                .query_async(&mut r)
                .await;
            match got {
                Ok(Some(_)) => {
                    // We hold the refresh: check once more (another process
                    // may have stored a token between our GET and SET).
                    if let Ok(Some(c)) = self.cached_in_redis(&mut r).await {
                        self.unlock(&mut r, &lock_token).await;
                        return Ok(c);
                    }
                    let minted = self.mint().await;
                    if let Ok((c, ttl)) = &minted {
                        let _: Result<(), _> = r
                            .pset_ex(&self.key, &*c.token, ttl.as_millis().max(1) as u64)
                            .await;
                    }
                    self.unlock(&mut r, &lock_token).await;
                    return minted.map(|(c, _)| c);
                }
                Ok(None) => {
                    if Instant::now() > deadline {
                        return Err(HaloError::State(format!(
                            "waited too long for another process to refresh the token of {}",
                            self.conn.name
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => {
                    tracing::warn!(connection = %self.conn.name, error = %e,
                        "redis unavailable for the token lock; minting a token for this process only");
                    return self.mint().await.map(|(c, _)| c);
                }
            }
        }
    }

    async fn unlock(&self, r: &mut ConnectionManager, lock_token: &str) {
        let _: Result<i64, _> = redis::Script::new(DELETE_IF_SAME)
            .key(&self.lock_key)
            .arg(lock_token)
            .invoke_async(r)
            .await;
    }

    /// How long the shared (Redis) token stays valid, if there is one: for
    /// the console's overview; never the token itself.
    pub async fn valid_for(&self) -> Result<Option<Duration>, redis::RedisError> {
        let mut r = self.redis.clone();
        Ok(self
            .cached_in_redis(&mut r)
            .await?
            .map(|c| c.refresh_at.saturating_duration_since(Instant::now())))
    }

    async fn cached_in_redis(
        &self,
        r: &mut ConnectionManager,
    ) -> Result<Option<Cached>, redis::RedisError> {
        let (token, pttl): (Option<String>, i64) = redis::pipe()
            .get(&self.key)
            .pttl(&self.key)
            .query_async(r)
            .await?;
        Ok(match token {
            Some(t) if pttl > 0 => Some(Cached {
                token: t.into(),
                refresh_at: Instant::now() + Duration::from_millis(pttl as u64),
            }),
            _ => None,
        })
    }

    /// One token request (reference §1.2): form body, scope always sent,
    /// `?tenant=` only for hosted instances. Returns the token and how long
    /// it may be used.
    async fn mint(&self) -> Result<(Cached, Duration), HaloError> {
        self.refreshes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", self.conn.client_id.as_str()),
            ("client_secret", self.conn.client_secret.expose()),
            ("scope", self.conn.scope.as_str()),
        ];
        let response = self
            .http
            .post(self.conn.token_url())
            .form(&form)
            .send()
            .await
            // reqwest errors may name the URL; ours carries the tenant but
            // never the secret (it is in the body).
            .map_err(|e| {
                // No HTTP status: counted as "error" so that alerts on
                // failing token requests see network failures too.
                metrics::counter!("halosync_token_requests_total", "connection" => crate::health::connection_label(&self.conn.name),
                    "status" => "error")
                .increment(1);
                HaloError::Network(format!("token endpoint: {}", e.without_url()))
            })?;
        let status = response.status().as_u16();
        metrics::counter!("halosync_token_requests_total", "connection" => crate::health::connection_label(&self.conn.name),
            "status" => status.to_string())
        .increment(1);
        let body = response
            .text()
            .await
            .map_err(|e| HaloError::Network(format!("token endpoint body: {}", e.without_url())))?;
        let minted = read_token_response(status, &body, self.conn.tenant.is_some())?;
        tracing::info!(connection = %self.conn.name, expires_in = minted.lifetime.as_secs(), "minted a HaloPSA token");
        Ok((
            Cached {
                token: minted.access_token.into(),
                refresh_at: Instant::now() + minted.usable,
            },
            minted.usable,
        ))
    }
}

/// The longest a token is used, whatever `expires_in` says. HaloPSA's
/// tokens live about an hour; an absurd `expires_in` (up to u64::MAX
/// seconds) once overflowed `Instant::now() + usable` and panicked the
/// worker (found while writing shared/tests/fuzz.rs, which covers it).
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// A token from the token endpoint and how long to use it.
pub struct MintedToken {
    pub access_token: String,
    /// `expires_in` (default 3600 s), at most [`MAX_TOKEN_LIFETIME`].
    pub lifetime: Duration,
    /// `lifetime` less [`REFRESH_EARLY`] (half of it when shorter), at
    /// least 1 s.
    pub usable: Duration,
}

impl std::fmt::Debug for MintedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MintedToken")
            .field("access_token", &"***")
            .field("lifetime", &self.lifetime)
            .field("usable", &self.usable)
            .finish()
    }
}

/// What the token endpoint's answer means (reference §1.2, §1.3): the
/// token, or a `HaloError::Token` with advice. A body that may hold a
/// token is never kept in the error.
pub fn read_token_response(
    status: u16,
    body: &str,
    has_tenant: bool,
) -> Result<MintedToken, HaloError> {
    if !(200..300).contains(&status) {
        return Err(HaloError::Token {
            status,
            message: explain_token_failure(status, body, has_tenant),
            body: excerpt(body, BODY_EXCERPT),
        });
    }
    let parsed: TokenResponse = serde_json::from_str(body).map_err(|_| HaloError::Token {
        status,
        message: "token endpoint answered 2xx without a JSON access_token (is auth_server the Authorisation Server from HaloPSA's API Details?)".into(),
        // The body may hold a token: never keep it.
        body: String::new(),
    })?;
    // Trust expires_in, within reason.
    let lifetime = Duration::from_secs(parsed.expires_in.unwrap_or(3600)).min(MAX_TOKEN_LIFETIME);
    let usable = lifetime
        .checked_sub(REFRESH_EARLY)
        .unwrap_or(lifetime / 2)
        .max(Duration::from_secs(1));
    Ok(MintedToken {
        access_token: parsed.access_token,
        lifetime,
        usable,
    })
}

/// Turns a token-endpoint failure into advice (reference §1.3, §8).
pub fn explain_token_failure(status: u16, body: &str, has_tenant: bool) -> String {
    let halo = message_from_body(body);
    if body.contains("invalid_client") {
        return format!("{halo} — the client id or secret is wrong (the Client ID can change when the HaloPSA application is saved: copy the latest, and regenerate the secret if unsure)");
    }
    if status == 500
        && (body.to_ascii_lowercase().contains("<html") || body.trim_start().starts_with('<'))
    {
        if has_tenant {
            return format!("{halo} — HaloPSA answered an HTML error page: the tenant may be wrong, the client id unknown, or the application has no agent to log in as");
        }
        return format!("{halo} — HaloPSA answered an HTML error page: a hosted (*.halopsa.com) instance needs `tenant` (from Configuration > Integrations > HaloPSA API); on-premise leaves it empty");
    }
    if status == 404 {
        return format!("{halo} — no token endpoint there: auth_server must be the Authorisation Server from HaloPSA's API Details (it may be another host, e.g. https://auth.haloservicedesk.com)");
    }
    halo
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_absurd_expires_in_is_capped_instead_of_overflowing_the_clock() {
        let body = r#"{"access_token":"t0k3n","expires_in":18446744073709551615}"#;
        let minted = read_token_response(200, body, true).expect("a token");
        assert_eq!(minted.lifetime, MAX_TOKEN_LIFETIME);
        // This addition panicked before the cap.
        let _ = Instant::now() + minted.usable;
        assert!(!format!("{minted:?}").contains("t0k3n"));
    }

    #[test]
    fn expires_in_sets_the_refresh_time() {
        let minted = read_token_response(200, r#"{"access_token":"a","expires_in":3600}"#, false)
            .expect("a token");
        assert_eq!(minted.usable, Duration::from_secs(3540));
        let short = read_token_response(200, r#"{"access_token":"a","expires_in":0}"#, false)
            .expect("a token");
        assert_eq!(short.usable, Duration::from_secs(1));
    }

    #[test]
    fn a_2xx_body_that_is_not_a_token_is_not_kept() {
        match read_token_response(200, r#"{"token":"secret-ish"}"#, false) {
            Err(HaloError::Token { body, .. }) => assert!(body.is_empty()),
            other => panic!("expected a token error, got {other:?}"),
        }
    }
}
