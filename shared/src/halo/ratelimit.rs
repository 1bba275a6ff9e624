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

use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;

use super::error::HaloError;
use super::pulse::Pulse;

/// Grants a slot (returns minus the slots now used, so always < 0) or says
/// how many ms until one frees (> 0). The used count feeds
/// `halosync_budget_used_ratio` at no extra Redis round trip.
///
/// The limit is the configured one, or the lower one learnt from HaloPSA's
/// last 429 (`KEYS[3]`, see [`RateLimiter::cool_down`]).
const TAKE_SLOT: &str = r"
local cool = redis.call('PTTL', KEYS[2])
if cool > 0 then return cool end
local limit = tonumber(ARGV[1])
local learnt = tonumber(redis.call('GET', KEYS[3]) or '0')
if learnt > 0 and learnt < limit then limit = learnt end
limit = limit - math.floor(limit * tonumber(ARGV[4]) / 100)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local n = redis.call('ZCARD', KEYS[1])
if n < limit then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window)
  return -(n + 1)
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local wait = tonumber(oldest[2]) + window - now
if wait < 1 then wait = 1 end
return wait
";

/// After a 429: pauses the connection (`KEYS[2]`, only ever lengthened) and
/// learns a lower limit (`KEYS[3]`): 80 % of what this window had granted
/// when HaloPSA refused, never raised by a later 429 while it lasts.
/// Returns the limit now in force and 1 when this call lowered it.
const LEARN_FROM_429: &str = r"
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[2], '429', 'PX', ARGV[1])
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = redis.call('ZCOUNT', KEYS[1], now - tonumber(ARGV[2]), '+inf')
local learnt = math.max(1, math.floor(n * 4 / 5))
local before = tonumber(redis.call('GET', KEYS[3]) or '0')
if before > 0 and before <= learnt then return {before, 0} end
if learnt >= tonumber(ARGV[4]) then return {learnt, 0} end
redis.call('SET', KEYS[3], learnt, 'PX', ARGV[3])
return {learnt, 1}
";

/// Who a request serves, which decides how much of the window it may use
/// (issue: "the budget serves writes before look-ups, and accounts before
/// what depends on them"). A lower class stops short of the full window,
/// leaving the top of it to the classes above: when the budget is
/// contended, what writes state goes first and what only reads waits. The
/// reserves are shares, so a tiny budget (the tests' 3 per second) keeps
/// them at zero and every class may use it all.
///
/// Shares rather than a queue across processes: a share needs no
/// coordination beyond the one Lua call every request already makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    /// A write of the account worker (the runtime fences its batches'
    /// clients with it: `HaloClient::fenced`): every other family waits
    /// for customers, so it may use the whole window.
    Accounts,
    /// Any other write: leaves 5 % of the window to accounts.
    Writes,
    /// A read (GET): leaves 10 % of the window to writes.
    Lookups,
}

impl Priority {
    /// The share of the window, in percent, this class leaves to others.
    pub fn reserve_percent(self) -> u32 {
        match self {
            Priority::Accounts => 0,
            Priority::Writes => 5,
            Priority::Lookups => 10,
        }
    }
}

/// How many windows a limit learnt from a 429 holds before the configured
/// one applies again (and is tried again: a further 429 lowers it anew).
const LEARNT_WINDOWS: u32 = 4;

#[derive(Clone)]
pub struct RateLimiter {
    redis: ConnectionManager,
    key: String,
    /// Set after HaloPSA answered 429: no process sends anything to this
    /// connection until it expires.
    cooldown_key: String,
    /// The lower limit learnt from HaloPSA's last 429, shared like the log.
    learnt_key: String,
    limit: u32,
    window: Duration,
    max_wait: Duration,
    connection: String,
    /// Told how long a full budget holds requests back (see `pulse.rs`).
    pulse: Arc<Pulse>,
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
            learnt_key: format!("{key}:learnt"),
            key,
            limit,
            window: window + margin,
            max_wait,
            connection: connection.to_string(),
            pulse: Arc::default(),
        }
    }

    /// This connection's pulse: when HaloPSA last answered and until when
    /// the budget holds requests back.
    pub fn pulse(&self) -> &Arc<Pulse> {
        &self.pulse
    }

    /// Waits for a slot. Returns how long it waited, or
    /// `BudgetExhausted` when the next slot is further off than `max_wait`
    /// (the message then waits in the broker's delay queues, not here).
    pub async fn acquire(&self, priority: Priority) -> Result<Duration, HaloError> {
        let started = tokio::time::Instant::now();
        let member = uuid::Uuid::new_v4().to_string();
        let script = redis::Script::new(TAKE_SLOT);
        let mut r = self.redis.clone();
        loop {
            let wait_ms: i64 = script
                .key(&self.key)
                .key(&self.cooldown_key)
                .key(&self.learnt_key)
                .arg(self.limit)
                .arg(self.window.as_millis() as u64)
                .arg(&member)
                .arg(priority.reserve_percent())
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
            self.pulse.held_until(std::time::Instant::now() + wait);
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
        metrics::gauge!("halosync_budget_used_ratio", "connection" => crate::health::connection_label(&self.connection))
            .set(ratio);
    }

    /// How much of the budget the current window has used, of which limit
    /// (a learnt one while it holds), and how long a 429 pause still holds (for the console's overview), read with
    /// Redis' own clock as [`acquire`](Self::acquire) does.
    pub async fn usage(&self) -> Result<(u32, u32, Duration), HaloError> {
        let mut r = self.redis.clone();
        let (used, cool, learnt): (u32, i64, u32) = redis::Script::new(
            "local t = redis.call('TIME') local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) return {redis.call('ZCOUNT', KEYS[1], now - tonumber(ARGV[1]), '+inf'), redis.call('PTTL', KEYS[2]), tonumber(redis.call('GET', KEYS[3]) or '0')}",
        )
        .key(&self.key)
        .key(&self.cooldown_key)
        .key(&self.learnt_key)
        .arg(self.window.as_millis() as u64)
        .invoke_async(&mut r)
        .await
        .map_err(|e| HaloError::State(format!("rate limiter: {e}")))?;
        let limit = if learnt > 0 {
            learnt.min(self.limit)
        } else {
            self.limit
        };
        Ok((used, limit, Duration::from_millis(cool.max(0) as u64)))
    }

    /// HaloPSA answered 429 although we kept to the budget (another
    /// integration shares it, or the budget is set too high): every process
    /// pauses this connection for `pause`, instead of each message finding
    /// out on its own, and then sends at most 80 % of what this window had
    /// used, for [`LEARNT_WINDOWS`] windows. Without the lower limit every
    /// waiting message would go out together when the pause ends, meet the
    /// same full window and spend another attempt on another 429.
    pub async fn cool_down(&self, pause: Duration) {
        let mut r = self.redis.clone();
        let ms = pause.as_millis().max(1) as u64;
        let result: Result<(u32, u8), _> = redis::Script::new(LEARN_FROM_429)
            .key(&self.key)
            .key(&self.cooldown_key)
            .key(&self.learnt_key)
            .arg(ms)
            .arg(self.window.as_millis() as u64)
            .arg((self.window * LEARNT_WINDOWS).as_millis() as u64)
            .arg(self.limit)
            .invoke_async(&mut r)
            .await;
        match result {
            Ok((learnt, 1)) => tracing::warn!(
                connection = %self.connection,
                learnt,
                configured = self.limit,
                "HaloPSA answered 429: this connection's budget is lowered to {learnt} requests per window for the next {LEARNT_WINDOWS} windows (another integration shares it, or requests_per_window is set above HaloPSA's limit)"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not share the 429 pause through redis"),
        }
    }
}

#[cfg(test)]
mod tests {
    //! Against the real Redis (127.0.0.1:6379, or `REDIS_URL`): fails, never
    //! skips, when it is not running. Each test has its own key and deletes it.
    use super::*;

    async fn limiter(limit: u32, window: Duration) -> (RateLimiter, ConnectionManager) {
        let url = std::env::var("REDIS_URL")
            .unwrap_or_else(|_| crate::config::DEFAULT_REDIS_URL.to_string());
        let client = redis::Client::open(url.as_str()).expect("redis url");
        let conn = ConnectionManager::new(client)
            .await
            .unwrap_or_else(|e| panic!("Redis must be running at {url}: {e}"));
        let key = format!("t-ratelimit-{}:budget", uuid::Uuid::new_v4().simple());
        let l = RateLimiter::new(
            conn.clone(),
            key,
            "c",
            limit,
            window,
            Duration::ZERO,
            Duration::from_millis(1),
        );
        (l, conn)
    }

    async fn cleanup(l: &RateLimiter, mut conn: ConnectionManager) {
        let _: () = redis::cmd("DEL")
            .arg(&l.key)
            .arg(&l.cooldown_key)
            .arg(&l.learnt_key)
            .query_async(&mut conn)
            .await
            .expect("del");
    }

    /// Takes slots until the budget says no (max_wait is 1 ms).
    async fn grants(l: &RateLimiter) -> u32 {
        let mut n = 0;
        while l.acquire(Priority::Accounts).await.is_ok() {
            n += 1;
            assert!(n <= 1000, "the limiter never refused");
        }
        n
    }

    #[tokio::test]
    async fn a_429_pauses_then_lowers_the_limit_to_four_fifths_of_the_window() {
        let (l, conn) = limiter(10, Duration::from_secs(60)).await;
        assert_eq!(grants(&l).await, 10, "the configured limit");
        // HaloPSA refused with 10 of ours in its window: 8 is what we learn.
        l.cool_down(Duration::from_millis(50)).await;
        assert!(
            l.acquire(Priority::Accounts).await.is_err(),
            "paused after the 429"
        );
        let (used, limit, cool) = l.usage().await.expect("usage");
        assert_eq!((used, limit), (10, 8));
        assert!(cool > Duration::ZERO);
        // A later 429 never raises what was learnt.
        l.cool_down(Duration::from_millis(1)).await;
        let (_, limit, _) = l.usage().await.expect("usage");
        assert_eq!(limit, 8);
        cleanup(&l, conn).await;
    }

    #[tokio::test]
    async fn the_learnt_limit_is_what_a_window_grants_after_the_pause() {
        let (l, conn) = limiter(10, Duration::from_millis(300)).await;
        assert_eq!(grants(&l).await, 10);
        l.cool_down(Duration::from_millis(10)).await;
        // The old grants leave the window, the pause ends: 8 per window now.
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(grants(&l).await, 8);
        cleanup(&l, conn).await;
    }

    /// Takes slots of one class until the budget says no.
    async fn grants_of(l: &RateLimiter, p: Priority) -> u32 {
        let mut n = 0;
        while l.acquire(p).await.is_ok() {
            n += 1;
            assert!(n <= 1000, "the limiter never refused");
        }
        n
    }

    #[tokio::test]
    async fn look_ups_leave_the_top_of_the_window_to_writes_and_writes_to_accounts() {
        let (l, conn) = limiter(100, Duration::from_secs(60)).await;
        assert_eq!(
            grants_of(&l, Priority::Lookups).await,
            90,
            "look-ups stop at 90 %"
        );
        assert_eq!(
            grants_of(&l, Priority::Writes).await,
            5,
            "writes go on to 95 %"
        );
        assert_eq!(
            grants_of(&l, Priority::Accounts).await,
            5,
            "accounts use the rest"
        );
        cleanup(&l, conn).await;
        // A small budget keeps no reserve: every class may use it all.
        let (l, conn) = limiter(3, Duration::from_secs(60)).await;
        assert_eq!(grants_of(&l, Priority::Lookups).await, 3);
        cleanup(&l, conn).await;
    }
}
