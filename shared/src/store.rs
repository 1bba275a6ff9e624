//! Redis state shared by every worker process (DESIGN §5): the
//! processed-event ledger, the billing id → HaloPSA id map with the applied
//! version, and per-aggregate locks; in [`caches`], the typed caches beside
//! them (invoice lines, products, currencies, item mappings). The OAuth
//! token cache and the rate limiter live beside the HaloPSA client
//! (`halo::token`, `halo::ratelimit`) but use the same key scheme: they
//! are handed a connection and their key ([`Keys::token`],
//! [`Keys::rate_limit`]).
//!
//! Nothing else touches Redis: `Store` keeps its connection to itself and
//! [`Keys`] builds a key only for this module, so a worker names a cache
//! and an id, never a key or a command.
//!
//! Every key is `{prefix}halosync:{connection}:{kind}:{...}`. Redis is a
//! cache and a coordinator, never the source of truth: everything here can
//! be lost and rebuilt from HaloPSA (the ExternalLinks), at the cost of
//! speed.

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use crate::contract::Version;
use crate::error::Failure;
use crate::outcome::Settled;

pub mod caches;
pub use caches::{Cache, Marks, One, OverageLine, SubscriptionLine, UsageLine};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("aggregate {0} is busy (locked by another worker) — retried later")]
    Busy(String),
    #[error("redis answered unexpectedly: {0}")]
    Unexpected(String),
}

impl From<StateError> for Failure {
    fn from(e: StateError) -> Failure {
        // Losing Redis costs speed, never correctness: retry later.
        let mut f = Failure::transient(e.to_string());
        // Waiting for another worker's lock is not a failed attempt: it ends
        // when that worker finishes or its lock expires.
        f.throttled = matches!(e, StateError::Busy(_));
        f
    }
}

/// Connects a `ConnectionManager` (reconnects by itself after Redis drops)
/// with the configuration's Redis access: `rediss://` with `redis_ca_file`,
/// the ACL user and password; the one way halosync connects to Redis. A
/// failure names Redis, the URL without its password and what to change.
pub async fn connect_with(
    url: &str,
    access: &crate::tls::RedisAccess,
) -> Result<ConnectionManager, crate::tls::ConnectError> {
    let client = crate::tls::clients::redis_client(url, access)?;
    let is_tls = crate::tls::clients::redis_is_tls(url);
    ConnectionManager::new_with_config(client, manager_config())
        .await
        .map_err(|e| {
            crate::tls::diagnose::diagnose(
                crate::tls::Service::Redis,
                url,
                is_tls,
                access.ca_file.as_deref(),
                &e,
            )
        })
}

fn manager_config() -> redis::aio::ConnectionManagerConfig {
    redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(5)))
        .set_number_of_retries(2)
}

/// Every kind of Redis key halosync writes, declared here and nowhere else:
/// a key is `{prefix}halosync:{connection}:{kind}[:{part}...]`, and no
/// module spells a kind as a string of its own. What lives under each, and
/// for how long, is said once, here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyKind {
    /// `event:{event_id}`: the processed-event ledger (`ledger_ttl`).
    Event,
    /// `lock:{aggregate}`: one aggregate's lock, held by one worker.
    Lock,
    /// `map:{kind}:{billing_id}`: billing id → HaloPSA id and applied version.
    Map,
    /// `unsure:{kind}:{billing_id}`: a create was sent whose outcome is
    /// unknown; ask HaloPSA before creating again (`ledger_ttl`).
    Unsure,
    /// `creating:{kind}:{billing_id}`: a create is on the wire (`http_timeout`).
    Creating,
    /// `imported:{kind}`: the kind's links were imported from HaloPSA in
    /// this Redis's lifetime.
    Imported,
    /// `missing:{kind}:{billing_id}`: when a missing dependency was last
    /// asked HaloPSA about (`retry.dependency_recheck`).
    Missing,
    /// `epoch` (connection `""`): when this Redis started empty.
    Epoch,
    /// `ratelimit` (and `:cooldown`, `:learnt`): the shared request budget.
    RateLimit,
    /// `token` (and `token:lock`): the shared OAuth token.
    Token,
    /// `item_mappings`: HaloPSA items by sku, cached for the workers.
    ItemMappings,
    /// `currencies`: HaloPSA's `/Currency` ids by ISO code (no expiry;
    /// refreshed when an event names a code it lacks).
    Currencies,
    /// `currency_missing:{code}`: HaloPSA lacked the code at the last
    /// refresh ([`crate::halo::currency::MISSING_FOR`]): events naming it
    /// fail without asking again until then (a replay asks at once).
    CurrencyMissing,
    /// `subline:{subscription_id}`: the subscription's recurring line.
    SubscriptionLine,
    /// `subproduct:{subscription_id}`: the subscription's sku and item,
    /// seeded by the subscription worker for the usage and overage workers.
    SubscriptionProduct,
    /// `usage_line:{subscription_id}:{metric}`: the usage line.
    UsageLine,
    /// `usage_scanned:{invoice_id}`: the invoice's usage lines are all cached.
    UsageScanned,
    /// `overage_line:{aggregate}`: the overage charge's line.
    OverageLine,
    /// `reconcile:last`: the last reconcile report of the connection.
    Reconcile,
}

impl KeyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::Event => "event",
            KeyKind::Lock => "lock",
            KeyKind::Map => "map",
            KeyKind::Unsure => "unsure",
            KeyKind::Creating => "creating",
            KeyKind::Imported => "imported",
            KeyKind::Missing => "missing",
            KeyKind::Epoch => "epoch",
            KeyKind::RateLimit => "ratelimit",
            KeyKind::Token => "token",
            KeyKind::ItemMappings => "item_mappings",
            KeyKind::Currencies => "currencies",
            KeyKind::CurrencyMissing => "currency_missing",
            KeyKind::SubscriptionLine => "subline",
            KeyKind::SubscriptionProduct => "subproduct",
            KeyKind::UsageLine => "usage_line",
            KeyKind::UsageScanned => "usage_scanned",
            KeyKind::OverageLine => "overage_line",
            KeyKind::Reconcile => "reconcile",
        }
    }
}

/// Builds the namespaced keys for one deployment prefix.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_string(),
        }
    }
    /// Private: a key is built here, from its kind, and nowhere else;
    /// other modules call a named method (below, or a [`Store`] method).
    fn key(&self, connection: &str, kind: KeyKind, parts: &[&str]) -> String {
        let mut k = format!("{}halosync:{}:{}", self.prefix, connection, kind.as_str());
        for p in parts {
            k.push(':');
            k.push_str(p);
        }
        k
    }
    /// The pattern matching every key of this prefix (for cleanup in tests).
    pub fn pattern(&self) -> String {
        format!("{}halosync:*", self.prefix)
    }
    /// The connection's shared request budget (`halo::ratelimit`), and its
    /// `:cooldown` and `:learnt` keys beside it.
    pub fn rate_limit(&self, connection: &str) -> String {
        self.key(connection, KeyKind::RateLimit, &[])
    }
    /// The connection's shared OAuth token (`halo::token`).
    pub fn token(&self, connection: &str) -> String {
        self.key(connection, KeyKind::Token, &[])
    }
    /// The lock of the connection's token refresh (`halo::token`).
    pub fn token_lock(&self, connection: &str) -> String {
        self.key(connection, KeyKind::Token, &["lock"])
    }
    /// Where the connection's last reconcile report is kept.
    pub fn reconcile_report(&self, connection: &str) -> String {
        self.key(connection, KeyKind::Reconcile, &["last"])
    }
}

/// What a billing id maps to in HaloPSA.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Mapping {
    /// The HaloPSA record id (may be negative for recurring invoices).
    pub halo_id: i64,
    /// The ExternalLink that records the mapping in HaloPSA.
    pub link_id: Option<i64>,
    /// The version of the newest event applied to this aggregate.
    pub version: Option<String>,
}

impl Mapping {
    pub fn version(&self) -> Option<Version> {
        self.version.as_deref().and_then(Version::decode)
    }
}

/// What Redis knows of some ids of one kind ([`Store::known`]).
pub struct Knowledge {
    pub mappings: Vec<Option<Mapping>>,
    /// Maybe in HaloPSA without Redis knowing.
    pub unsure: Vec<bool>,
    /// Being created right now (a create is on the wire).
    pub creating: Vec<bool>,
    /// The kind was imported from HaloPSA in this Redis's lifetime.
    pub imported: bool,
}

/// Writes the epoch (Redis's time in ms) if absent; returns its age in ms
/// and 1 if this call wrote it (else 0).
const EPOCH: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local fresh = redis.call('SET', KEYS[1], now, 'NX') and 1 or 0
local since = tonumber(redis.call('GET', KEYS[1])) or now
return {now - since, fresh}
";

/// Back-dates the epoch by ARGV[1] ms if it is still the one this process
/// wrote (ARGV[2] ms ago or less): a first start needs no grace.
const BACKDATE_EPOCH: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local since = tonumber(redis.call('GET', KEYS[1]))
if since and now - since <= tonumber(ARGV[2]) then
  redis.call('SET', KEYS[1], since - tonumber(ARGV[1]))
  return 1
end
return 0
";

/// What [`Store::memory_age`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryAge {
    /// How long ago this Redis started remembering.
    pub age: Duration,
    /// This call wrote the epoch: Redis was empty of it (first start, or lost).
    pub fresh: bool,
    /// This process had seen an epoch of this Redis before the call (so a
    /// fresh one means Redis was lost under it).
    pub seen_before: bool,
}

const RENEW_LOCK: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

const RELEASE_LOCK: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// The Redis side of idempotency and ordering.
#[derive(Clone)]
pub struct Store {
    redis: ConnectionManager,
    keys: Keys,
    ledger_ttl: Duration,
    /// This process has read the epoch before ([`MemoryAge::seen_before`]).
    seen_epoch: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("keys", &self.keys).finish()
    }
}

impl Store {
    pub fn new(redis: ConnectionManager, keys: Keys, ledger_ttl: Duration) -> Store {
        Store {
            redis,
            keys,
            ledger_ttl,
            seen_epoch: Default::default(),
        }
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Which of `event_ids` were processed before (one round trip).
    #[tracing::instrument(name = "redis.processed_many", skip_all, level = "info")]
    pub async fn processed_many(
        &self,
        conn: &str,
        event_ids: &[String],
    ) -> Result<Vec<bool>, StateError> {
        if event_ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = event_ids
            .iter()
            .map(|id| self.keys.key(conn, KeyKind::Event, &[id]))
            .collect();
        let mut r = self.redis.clone();
        let values: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query_async(&mut r).await?;
        Ok(values.into_iter().map(|v| v.is_some()).collect())
    }

    /// Records several processed events (one round trip).
    #[tracing::instrument(name = "redis.mark_processed_many", skip_all, level = "info")]
    pub async fn mark_processed_many(
        &self,
        conn: &str,
        done: &[(String, Settled)],
    ) -> Result<(), StateError> {
        if done.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (id, outcome) in done {
            pipe.set_ex(
                self.keys.key(conn, KeyKind::Event, &[id]),
                outcome.as_str(),
                self.ledger_ttl.as_secs().max(1),
            )
            .ignore();
        }
        let mut r = self.redis.clone();
        let _: () = pipe.query_async(&mut r).await?;
        Ok(())
    }

    #[tracing::instrument(name = "redis.mapping", skip_all, level = "info")]
    pub async fn mapping(
        &self,
        conn: &str,
        kind: &str,
        billing_id: &str,
    ) -> Result<Option<Mapping>, StateError> {
        let mut r = self.redis.clone();
        let raw: Option<String> = r
            .get(self.keys.key(conn, KeyKind::Map, &[kind, billing_id]))
            .await?;
        // A value we cannot read is treated as absent: HaloPSA has the truth.
        Ok(raw.and_then(|s| serde_json::from_str(&s).ok()))
    }

    /// The mappings of many billing ids of one kind, in one round trip.
    #[tracing::instrument(name = "redis.mappings", skip_all, level = "info")]
    pub async fn mappings(
        &self,
        conn: &str,
        kind: &str,
        billing_ids: &[String],
    ) -> Result<Vec<Option<Mapping>>, StateError> {
        if billing_ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = billing_ids
            .iter()
            .map(|id| self.keys.key(conn, KeyKind::Map, &[kind, id]))
            .collect();
        let mut r = self.redis.clone();
        let raw: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query_async(&mut r).await?;
        Ok(raw
            .into_iter()
            .map(|v| v.and_then(|s| serde_json::from_str(&s).ok()))
            .collect())
    }

    /// Remembers a mapping; the id is no longer "unsure" (see
    /// [`known`](Self::known)).
    #[tracing::instrument(name = "redis.set_mapping", skip_all, level = "info")]
    pub async fn set_mapping(
        &self,
        conn: &str,
        kind: &str,
        billing_id: &str,
        mapping: &Mapping,
    ) -> Result<(), StateError> {
        self.set_mappings(conn, kind, &[(billing_id, mapping)])
            .await
    }

    /// [`set_mapping`](Self::set_mapping) of many ids, in one round trip.
    #[tracing::instrument(name = "redis.set_mappings", skip_all, level = "info")]
    pub async fn set_mappings(
        &self,
        conn: &str,
        kind: &str,
        mappings: &[(&str, &Mapping)],
    ) -> Result<(), StateError> {
        if mappings.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (id, m) in mappings {
            pipe.set(
                self.keys.key(conn, KeyKind::Map, &[kind, id]),
                serde_json::to_string(m).unwrap_or_default(),
            )
            .ignore()
            .del(self.keys.key(conn, KeyKind::Unsure, &[kind, id]))
            .ignore()
            .del(self.keys.key(conn, KeyKind::Creating, &[kind, id]))
            .ignore();
        }
        let mut r = self.redis.clone();
        let _: () = pipe.query_async(&mut r).await?;
        Ok(())
    }

    /// Drops a mapping that HaloPSA refused. The id becomes "unsure": once
    /// the kind is imported a missing mapping otherwise means "not in
    /// HaloPSA", and this one may well be there.
    #[tracing::instrument(name = "redis.forget_mapping", skip_all, level = "info")]
    pub async fn forget_mapping(
        &self,
        conn: &str,
        kind: &str,
        billing_id: &str,
    ) -> Result<(), StateError> {
        self.del(self.keys.key(conn, KeyKind::Map, &[kind, billing_id]))
            .await?;
        self.mark_unsure(conn, kind, &[billing_id.to_string()])
            .await
    }

    /// Marks ids whose record may exist in HaloPSA without Redis knowing
    /// it (after a refusal of the cached one); see [`creating`](Self::creating).
    /// Kept for `ledger_ttl` (a redelivery comes long before).
    #[tracing::instrument(name = "redis.mark_unsure", skip_all, level = "info")]
    pub async fn mark_unsure(
        &self,
        conn: &str,
        kind: &str,
        billing_ids: &[String],
    ) -> Result<(), StateError> {
        self.mark(conn, kind, billing_ids, None).await
    }

    /// Written right *before* a create is sent: the ids are unsure (a
    /// worker killed between the create and
    /// [`set_mapping`](Self::set_mapping) leaves them so, and the next
    /// event asks HaloPSA instead of creating again), and for `window` (the
    /// longest the create can be on the wire) they are being created, so
    /// that other families wait for them instead of asking.
    #[tracing::instrument(name = "redis.creating", skip_all, level = "info")]
    pub async fn creating(
        &self,
        conn: &str,
        kind: &str,
        billing_ids: &[String],
        window: Duration,
    ) -> Result<(), StateError> {
        self.mark(conn, kind, billing_ids, Some(window)).await
    }

    async fn mark(
        &self,
        conn: &str,
        kind: &str,
        billing_ids: &[String],
        creating: Option<Duration>,
    ) -> Result<(), StateError> {
        if billing_ids.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for id in billing_ids {
            pipe.set_ex(
                self.keys.key(conn, KeyKind::Unsure, &[kind, id]),
                1,
                self.ledger_ttl.as_secs().max(1),
            )
            .ignore();
            if let Some(window) = creating {
                pipe.cmd("SET")
                    .arg(self.keys.key(conn, KeyKind::Creating, &[kind, id]))
                    .arg(1)
                    .arg("PX")
                    .arg(window.as_millis().max(1) as u64)
                    .ignore();
            }
        }
        let mut r = self.redis.clone();
        let _: () = pipe.query_async(&mut r).await?;
        Ok(())
    }

    /// Takes back [`creating`](Self::creating) for ids whose create
    /// certainly saved nothing (HaloPSA did not process it).
    #[tracing::instrument(name = "redis.not_created", skip_all, level = "info")]
    pub async fn not_created(
        &self,
        conn: &str,
        kind: &str,
        billing_ids: &[String],
    ) -> Result<(), StateError> {
        if billing_ids.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for id in billing_ids {
            pipe.del(self.keys.key(conn, KeyKind::Unsure, &[kind, id]))
                .ignore()
                .del(self.keys.key(conn, KeyKind::Creating, &[kind, id]))
                .ignore();
        }
        let mut r = self.redis.clone();
        let _: () = pipe.query_async(&mut r).await?;
        Ok(())
    }

    /// What Redis knows of many ids of one kind, in one round trip: each
    /// one's mapping, whether it is unsure ([`mark_unsure`](Self::mark_unsure)),
    /// and whether the kind was imported from HaloPSA in this Redis's
    /// lifetime ([`import_mappings`](Self::import_mappings)).
    #[tracing::instrument(name = "redis.known", skip_all, level = "info")]
    pub async fn known(
        &self,
        conn: &str,
        kind: &str,
        billing_ids: &[String],
    ) -> Result<Knowledge, StateError> {
        let mut keys: Vec<String> = Vec::with_capacity(billing_ids.len() * 3 + 1);
        for part in [KeyKind::Map, KeyKind::Unsure, KeyKind::Creating] {
            for id in billing_ids {
                keys.push(self.keys.key(conn, part, &[kind, id]));
            }
        }
        keys.push(self.keys.key(conn, KeyKind::Imported, &[kind]));
        let mut r = self.redis.clone();
        let raw: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query_async(&mut r).await?;
        let n = billing_ids.len();
        if raw.len() != 3 * n + 1 {
            return Err(StateError::Unexpected(format!(
                "MGET answered {} values for {} keys",
                raw.len(),
                keys.len()
            )));
        }
        Ok(Knowledge {
            mappings: raw[..n]
                .iter()
                .map(|v| v.as_deref().and_then(|s| serde_json::from_str(s).ok()))
                .collect(),
            unsure: raw[n..2 * n].iter().map(Option::is_some).collect(),
            creating: raw[2 * n..3 * n].iter().map(Option::is_some).collect(),
            imported: raw[3 * n].is_some(),
        })
    }

    /// Puts the mappings read from HaloPSA in bulk into Redis, never over
    /// one a worker wrote meanwhile (`SET NX`), and marks the kind imported:
    /// from then on, until Redis is lost, a missing mapping that is not
    /// unsure means "not in HaloPSA".
    #[tracing::instrument(name = "redis.import_mappings", skip_all, level = "info")]
    pub async fn import_mappings(
        &self,
        conn: &str,
        kind: &str,
        mappings: &[(String, Mapping)],
    ) -> Result<(), StateError> {
        let mut r = self.redis.clone();
        for chunk in mappings.chunks(500) {
            let mut pipe = redis::pipe();
            for (id, m) in chunk {
                pipe.cmd("SET")
                    .arg(self.keys.key(conn, KeyKind::Map, &[kind, id]))
                    .arg(serde_json::to_string(m).unwrap_or_default())
                    .arg("NX")
                    .ignore();
            }
            let _: () = pipe.query_async(&mut r).await?;
        }
        let _: () = r
            .set(self.keys.key(conn, KeyKind::Imported, &[kind]), 1)
            .await?;
        Ok(())
    }

    /// Whether the kind was imported in this Redis's lifetime.
    pub async fn imported(&self, conn: &str, kind: &str) -> Result<bool, StateError> {
        let mut r = self.redis.clone();
        let v: Option<String> = r
            .get(self.keys.key(conn, KeyKind::Imported, &[kind]))
            .await?;
        Ok(v.is_some())
    }

    async fn del(&self, key: String) -> Result<(), StateError> {
        let mut r = self.redis.clone();
        let _: () = r.del(key).await?;
        Ok(())
    }

    /// Claims the one look-up in HaloPSA of a record another family writes
    /// (see `halo::links::require`): true for the one caller per `ttl` that
    /// should ask; the others take the record as still missing. Only ever
    /// used by events that need the record, never by the family writing it.
    pub async fn claim_dependency_check(
        &self,
        conn: &str,
        kind: &str,
        billing_id: &str,
        ttl: Duration,
    ) -> Result<bool, StateError> {
        if ttl.is_zero() {
            return Ok(true);
        }
        let mut r = self.redis.clone();
        let claimed: Option<String> = redis::cmd("SET")
            .arg(self.keys.key(conn, KeyKind::Missing, &[kind, billing_id]))
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .query_async(&mut r)
            .await?;
        Ok(claimed.is_some())
    }

    /// Ends the wait [`claim_dependency_check`](Self::claim_dependency_check)
    /// started: the record was found.
    pub async fn clear_dependency_check(
        &self,
        conn: &str,
        kind: &str,
        billing_id: &str,
    ) -> Result<(), StateError> {
        self.del(self.keys.key(conn, KeyKind::Missing, &[kind, billing_id]))
            .await
    }

    /// How long this Redis has been remembering: the age of the epoch key,
    /// which the first caller after Redis was started, flushed or lost
    /// writes (`SET NX` with Redis's own clock, in one script). A young
    /// epoch means locks held before it were lost, and their holders' writes
    /// may still be on the wire (see `WorkerSettings::flush_grace`).
    #[tracing::instrument(name = "redis.memory_age", skip_all, level = "info")]
    pub async fn memory_age(&self) -> Result<MemoryAge, StateError> {
        let mut r = self.redis.clone();
        let (ms, fresh): (i64, i64) = redis::Script::new(EPOCH)
            .key(self.keys.key("", KeyKind::Epoch, &[]))
            .invoke_async(&mut r)
            .await?;
        let seen_before = self
            .seen_epoch
            .swap(true, std::sync::atomic::Ordering::SeqCst);
        Ok(MemoryAge {
            age: Duration::from_millis(ms.max(0) as u64),
            fresh: fresh == 1,
            seen_before,
        })
    }

    /// Marks the epoch this process just wrote as old (by `by`), so that no
    /// worker waits `flush_grace` for it: for the first start of a
    /// deployment, when no lock can have been lost. Does nothing if the
    /// epoch is not the one written within `written_within`.
    pub async fn backdate_epoch(
        &self,
        by: Duration,
        written_within: Duration,
    ) -> Result<bool, StateError> {
        let mut r = self.redis.clone();
        let done: i64 = redis::Script::new(BACKDATE_EPOCH)
            .key(self.keys.key("", KeyKind::Epoch, &[]))
            .arg(by.as_millis() as u64)
            .arg(written_within.as_millis() as u64)
            .invoke_async(&mut r)
            .await?;
        Ok(done == 1)
    }

    /// Takes the lock of one aggregate, waiting up to `wait` for it. The
    /// lock expires after `ttl` so that a crashed holder cannot block it.
    #[tracing::instrument(name = "redis.lock", skip_all, level = "info")]
    pub async fn lock(
        &self,
        conn: &str,
        aggregate: &str,
        ttl: Duration,
        wait: Duration,
    ) -> Result<AggregateLock, StateError> {
        let key = self.keys.key(conn, KeyKind::Lock, &[aggregate]);
        let token = uuid::Uuid::new_v4().to_string();
        let deadline = tokio::time::Instant::now() + wait;
        let mut pause = Duration::from_millis(5);
        let mut r = self.redis.clone();
        loop {
            let ok: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(&token)
                .arg("NX")
                .arg("PX")
                .arg(ttl.as_millis() as u64)
                .query_async(&mut r)
                .await?;
            if ok.is_some() {
                let renewer =
                    tokio::spawn(renew(self.redis.clone(), key.clone(), token.clone(), ttl));
                return Ok(AggregateLock {
                    redis: self.redis.clone(),
                    key,
                    token,
                    renewer,
                });
            }
            if tokio::time::Instant::now() + pause > deadline {
                return Err(StateError::Busy(aggregate.to_string()));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }
}

impl Store {
    /// Removes every key of this store's prefix (tests only: a shared
    /// Redis is never flushed).
    #[cfg(test)]
    pub(crate) async fn remove_everything(&self) {
        let mut r = self.redis.clone();
        let keys: Vec<String> = r.keys(self.keys.pattern()).await.unwrap_or_default();
        if !keys.is_empty() {
            let _: Result<(), _> = r.del(keys).await;
        }
    }

    /// Takes the locks of a batch's aggregates, given in the order every
    /// worker takes them (sorted), within `wait` for all of them together.
    /// One pipelined round trip tries them all (a batch of 200 no longer
    /// costs 200 round trips); if one is held by another worker, the locks
    /// taken after it in the order are given back and the rest are taken
    /// one by one, waiting, as [`lock`](Self::lock) does. So a worker only
    /// ever waits while holding a prefix of its order, and two workers whose
    /// batches share aggregates never wait on each other in a cycle.
    pub async fn lock_many(
        &self,
        conn: &str,
        aggregates: &[String],
        ttl: Duration,
        wait: Duration,
    ) -> Vec<Result<AggregateLock, StateError>> {
        let deadline = tokio::time::Instant::now() + wait;
        let keys: Vec<String> = aggregates
            .iter()
            .map(|a| self.keys.key(conn, KeyKind::Lock, &[a]))
            .collect();
        // One random id per batch, each lock's token that and its place:
        // unique all the same, without a getrandom call per lock.
        let batch = uuid::Uuid::new_v4().simple();
        let tokens: Vec<String> = (0..keys.len()).map(|i| format!("{batch}-{i}")).collect();
        let mut pipe = redis::pipe();
        for (key, token) in keys.iter().zip(&tokens) {
            pipe.cmd("SET")
                .arg(key)
                .arg(token)
                .arg("NX")
                .arg("PX")
                .arg(ttl.as_millis() as u64);
        }
        let mut r = self.redis.clone();
        let taken: Vec<Option<String>> = match pipe.query_async(&mut r).await {
            Ok(t) => t,
            Err(e) => {
                // One error, told to every aggregate (a RedisError does not
                // clone): each is retried as Redis being unreachable is.
                let text = format!("redis: {e}");
                return aggregates
                    .iter()
                    .map(|_| Err(StateError::Unexpected(text.clone())))
                    .collect();
            }
        };
        let mut out: Vec<Result<AggregateLock, StateError>> = Vec::with_capacity(keys.len());
        let first_busy = taken
            .iter()
            .position(Option::is_none)
            .unwrap_or(taken.len());
        let mut give_back: Vec<(String, String)> = Vec::new();
        for (k, ((key, token), got)) in keys.into_iter().zip(tokens).zip(&taken).enumerate() {
            if k < first_busy {
                let renewer =
                    tokio::spawn(renew(self.redis.clone(), key.clone(), token.clone(), ttl));
                out.push(Ok(AggregateLock {
                    redis: self.redis.clone(),
                    key,
                    token,
                    renewer,
                }));
            } else if got.is_some() {
                give_back.push((key, token));
            }
        }
        if !give_back.is_empty() {
            let mut pipe = redis::pipe();
            for (key, token) in &give_back {
                pipe.cmd("EVAL")
                    .arg(RELEASE_LOCK)
                    .arg(1)
                    .arg(key)
                    .arg(token)
                    .ignore();
            }
            if let Err(e) = pipe.query_async::<()>(&mut r).await {
                tracing::warn!(error = %e, "could not give back locks taken out of order; they expire on their own");
            }
        }
        for aggregate in &aggregates[first_busy..] {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            out.push(self.lock(conn, aggregate, ttl, left).await);
        }
        out
    }

    /// Releases many locks in one round trip (each only if still ours).
    pub async fn release_many(&self, locks: Vec<AggregateLock>) -> Result<(), StateError> {
        if locks.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for l in &locks {
            l.renewer.abort();
            pipe.cmd("EVAL")
                .arg(RELEASE_LOCK)
                .arg(1)
                .arg(&l.key)
                .arg(&l.token)
                .ignore();
        }
        let mut r = self.redis.clone();
        pipe.query_async::<()>(&mut r).await?;
        Ok(())
    }
}

/// Keeps a held lock alive: its TTL is short (so that a crashed holder
/// blocks its aggregate only briefly), and renewed every third of it while
/// the holder works.
async fn renew(redis: ConnectionManager, key: String, token: String, ttl: Duration) {
    let mut r = redis;
    loop {
        tokio::time::sleep(ttl / 3).await;
        let renewed: Result<i64, _> = redis::Script::new(RENEW_LOCK)
            .key(&key)
            .arg(&token)
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut r)
            .await;
        if let Ok(0) = renewed {
            tracing::warn!(lock = %key, "lost the aggregate lock (expired or Redis flushed)");
            return;
        }
    }
}

/// Whether an aggregate lock is still held by its taker: Redis still maps
/// its key to the taker's token. A lock is lost when Redis is flushed (or
/// restarted empty) or when it expired; another worker may then hold the
/// aggregate, and a write of ours could land after one of theirs.
///
/// One fence covers every lock of a batch: a batch's write (an array may
/// mix aggregates) goes out only while all of them are still held.
#[derive(Clone)]
pub struct LockFence {
    redis: Option<ConnectionManager>,
    /// (key, token) of each lock.
    held: Vec<(String, String)>,
}

impl std::fmt::Debug for LockFence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<&str> = self.held.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("LockFence").field("locks", &keys).finish()
    }
}

impl LockFence {
    /// The fence of several locks (a batch's).
    pub fn of(locks: &[AggregateLock]) -> LockFence {
        LockFence {
            redis: locks.first().map(|l| l.redis.clone()),
            held: locks
                .iter()
                .map(|l| (l.key.clone(), l.token.clone()))
                .collect(),
        }
    }

    /// Whether every lock is still held, in one round trip.
    pub async fn still_held(&self) -> Result<bool, StateError> {
        let Some(redis) = &self.redis else {
            return Ok(true);
        };
        let mut r = redis.clone();
        let keys: Vec<&str> = self.held.iter().map(|(k, _)| k.as_str()).collect();
        let now: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query_async(&mut r).await?;
        Ok(now.len() == self.held.len()
            && now
                .iter()
                .zip(&self.held)
                .all(|(now, (_, token))| now.as_deref() == Some(token.as_str())))
    }
}

/// A held aggregate lock; call [`AggregateLock::release`] when done. If the
/// process dies, the lock expires on its own after its TTL.
pub struct AggregateLock {
    redis: ConnectionManager,
    key: String,
    token: String,
    renewer: tokio::task::JoinHandle<()>,
}

impl Drop for AggregateLock {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

impl AggregateLock {
    /// A handle that tells, later, whether this lock is still held (see
    /// [`LockFence`]).
    pub fn fence(&self) -> LockFence {
        LockFence::of(std::slice::from_ref(self))
    }

    /// Releases the lock if it is still ours (it may have expired and been
    /// taken by another worker, which must keep it).
    #[tracing::instrument(name = "redis.unlock", skip_all, level = "info")]
    pub async fn release(self) -> Result<(), StateError> {
        self.renewer.abort();
        let mut r = self.redis.clone();
        let _: i64 = redis::Script::new(RELEASE_LOCK)
            .key(&self.key)
            .arg(&self.token)
            .invoke_async(&mut r)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> Store {
        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into());
        let redis = connect_with(&url, &Default::default())
            .await
            .unwrap_or_else(|e| panic!("Redis must be running at {url}: {e}"));
        let prefix = format!("t-store-{}.", uuid::Uuid::new_v4().simple());
        Store::new(redis, Keys::new(&prefix), Duration::from_secs(60))
    }

    async fn cleanup(s: &Store) {
        s.remove_everything().await;
    }

    /// Where a reconcile report is kept (the console's Reconcile page
    /// reads it): the store's scheme, so a test's or deployment's prefix
    /// and its cleanup pattern `{prefix}halosync:*` cover it.
    #[test]
    fn the_last_report_key_follows_the_store_scheme() {
        assert_eq!(
            Keys::new("t-x.").reconcile_report("acme"),
            "t-x.halosync:acme:reconcile:last"
        );
    }

    #[tokio::test]
    async fn lock_many_takes_what_is_free_in_one_go_and_waits_in_order_for_the_rest() {
        let s = store().await;
        let ttl = Duration::from_secs(10);
        // Another worker holds `b`.
        let theirs = s.lock("c", "b", ttl, Duration::ZERO).await.expect("b");
        let names: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let got = s
            .lock_many("c", &names, ttl, Duration::from_millis(50))
            .await;
        assert!(got[0].is_ok(), "a is free");
        assert!(matches!(got[1], Err(StateError::Busy(_))), "b is held");
        assert!(got[2].is_ok(), "c is free, taken after waiting for b");
        // Ours are really ours, b still theirs.
        let ours: Vec<AggregateLock> = got.into_iter().filter_map(Result::ok).collect();
        assert!(LockFence::of(&ours).still_held().await.expect("fence"));
        assert!(theirs.fence().still_held().await.expect("fence"));
        s.release_many(ours).await.expect("release");
        // Released: all three can be taken again, in one round trip.
        theirs.release().await.expect("release b");
        let again = s.lock_many("c", &names, ttl, Duration::ZERO).await;
        assert!(again.iter().all(Result::is_ok));
        s.release_many(again.into_iter().filter_map(Result::ok).collect())
            .await
            .expect("release");
        cleanup(&s).await;
    }
}
