//! The distributed rate limiter: every process of every worker kind takes a
//! slot from one Redis sliding-window log per connection before each
//! HaloPSA request, so that together they stay under
//! `requests_per_window` per `window_seconds` (reference §7.1).
//!
//! A sliding log (a sorted set of grant times, read with Redis' own clock)
//! rather than a token bucket because HaloPSA's limit is itself a rolling
//! window: a bucket allows bursts that a rolling window counts against us.
//! The window is padded by `rate_margin_ms` so that requests granted at a
//! window's edge still land inside HaloPSA's window after network delay.

use std::time::Duration;

use redis::aio::ConnectionManager;

use super::error::HaloError;

/// Grants a slot (returns minus the slots now used, so always < 0) or says
/// how many ms until one frees (> 0). The used count feeds
/// `halosync_budget_used_ratio` at no extra Redis round trip.
const TAKE_SLOT: &str = r"
local cool = redis.call('PTTL', KEYS[2])
if cool > 0 then return cool end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local n = redis.call('ZCARD', KEYS[1])
if n < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window)
  return -(n + 1)
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local wait = tonumber(oldest[2]) + window - now
if wait < 1 then wait = 1 end
return wait
";

#[derive(Clone)]
pub struct RateLimiter {
    redis: ConnectionManager,
    key: String,
    /// Set after HaloPSA answered 429: no process sends anything to this
    /// connection until it expires.
    cooldown_key: String,
    limit: u32,
    window: Duration,
    max_wait: Duration,
    connection: String,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("key", &self.key)
            .field("limit", &self.limit)
            .field("window", &self.window)
            .finish()
    }
}

impl RateLimiter {
    pub fn new(
        redis: ConnectionManager,
        key: String,
        connection: &str,
        limit: u32,
        window: Duration,
        margin: Duration,
        max_wait: Duration,
    ) -> RateLimiter {
        RateLimiter {
            redis,
            cooldown_key: format!("{key}:cooldown"),
            key,
            limit,
            window: window + margin,
            max_wait,
            connection: connection.to_string(),
        }
    }

    /// Waits for a slot. Returns how long it waited, or
    /// `BudgetExhausted` when the next slot is further off than `max_wait`
    /// (the message then waits in the broker's delay queues, not here).
    pub async fn acquire(&self) -> Result<Duration, HaloError> {
        let started = tokio::time::Instant::now();
        let member = uuid::Uuid::new_v4().to_string();
        let script = redis::Script::new(TAKE_SLOT);
        let mut r = self.redis.clone();
        loop {
            let wait_ms: i64 = script
                .key(&self.key)
                .key(&self.cooldown_key)
                .arg(self.limit)
                .arg(self.window.as_millis() as u64)
                .arg(&member)
                .invoke_async(&mut r)
                .await
                .map_err(|e| HaloError::State(format!("rate limiter: {e}")))?;
            if wait_ms <= 0 {
                self.record_use(wait_ms.unsigned_abs());
                return Ok(started.elapsed());
            }
            // Full (or paused after a 429): the budget is all used.
            self.record_use(u64::from(self.limit));
            let wait = Duration::from_millis(wait_ms as u64);
            if started.elapsed() + wait > self.max_wait {
                return Err(HaloError::BudgetExhausted(self.connection.clone()));
            }
            // Spread the wake-ups of many waiters a little.
            let jitter = Duration::from_millis(rand::random_range(0..=20));
            tokio::time::sleep(wait + jitter).await;
        }
    }

    /// `halosync_budget_used_ratio{connection}`: the share of the window's
    /// budget taken, as this process last saw it (every process reports
    /// the shared figure; dashboards take the max per connection).
    fn record_use(&self, used: u64) {
        let ratio = used as f64 / f64::from(self.limit.max(1));
        metrics::gauge!("halosync_budget_used_ratio", "connection" => self.connection.clone())
            .set(ratio);
    }

    /// How much of the budget the current window has used, and how long
    /// a 429 pause still holds (for the console's overview), read with
    /// Redis' own clock as [`acquire`](Self::acquire) does.
    pub async fn usage(&self) -> Result<(u32, u32, Duration), HaloError> {
        let mut r = self.redis.clone();
        let (used, cool): (u32, i64) = redis::Script::new(
            "local t = redis.call('TIME') local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) return {redis.call('ZCOUNT', KEYS[1], now - tonumber(ARGV[1]), '+inf'), redis.call('PTTL', KEYS[2])}",
        )
        .key(&self.key)
        .key(&self.cooldown_key)
        .arg(self.window.as_millis() as u64)
        .invoke_async(&mut r)
        .await
        .map_err(|e| HaloError::State(format!("rate limiter: {e}")))?;
        Ok((used, self.limit, Duration::from_millis(cool.max(0) as u64)))
    }

    /// HaloPSA answered 429 although we kept to the budget (another
    /// integration shares it, or the budget is set too high): every process
    /// pauses this connection for `pause`, instead of each message finding
    /// out on its own.
    pub async fn cool_down(&self, pause: Duration) {
        let mut r = self.redis.clone();
        let ms = pause.as_millis().max(1) as u64;
        // Only ever lengthen a pause already set.
        let result: Result<i64, _> = redis::Script::new(
            "if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], '429', 'PX', ARGV[1]) end return 0",
        )
        .key(&self.cooldown_key)
        .arg(ms)
        .invoke_async(&mut r)
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "could not share the 429 pause through redis");
        }
    }
}
