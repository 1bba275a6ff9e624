//! Shared simulator state: data, tokens, faults and counters behind one lock.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::store::{Data, Obj};
use crate::{Faults, SimConfig};

/// One issued access token.
#[derive(Clone, Debug)]
pub(crate) struct TokenInfo {
    pub expires_at: Instant,
    pub scope: String,
    pub revoked: bool,
}

/// Request counters (reset by `POST /_sim/reset`).
#[derive(Clone, Debug, Default)]
pub(crate) struct Counters {
    pub by_endpoint: BTreeMap<String, u64>,
    pub by_status: BTreeMap<String, u64>,
    pub token_requests: u64,
    pub rate_limited: u64,
    pub total_api: u64,
    /// Writes applied but answered 500 (fault `lost_response_rate`/`lose_next`).
    pub lost_responses: u64,
    /// Multi-element POSTs that failed after saving some elements.
    pub partial_saves: u64,
    /// Successful `/api` writes so far: the clock of `Faults::lose_writes`.
    pub writes_applied: u64,
    /// Writes waiting now at `Faults::hold_writes_after`.
    pub held_writes: u64,
    /// Arrival time of every `/api` request, for `max_requests_in_any_window`.
    pub api_log: Vec<Instant>,
    /// Properties the request's model lacks, which binding dropped: per
    /// endpoint key, how many and which (`GET /_sim/ignored`).
    pub ignored: BTreeMap<String, Ignored>,
    /// Requests whose path the document spells otherwise (case), by the
    /// path as sent (`GET /_sim/misspelt`).
    pub misspelt: BTreeMap<String, u64>,
}

/// The properties one endpoint was sent that its model lacks.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Ignored {
    /// Property occurrences dropped (one per name per request).
    pub count: u64,
    /// Their names, as JSON paths without indices (`notes`, `lines.note`).
    pub properties: std::collections::BTreeSet<String>,
}

impl Counters {
    pub(crate) fn record(&mut self, key: &str, status: u16) {
        *self.by_endpoint.entry(key.to_string()).or_insert(0) += 1;
        let class = format!("{}xx", status / 100);
        *self.by_status.entry(class).or_insert(0) += 1;
        if status == 429 {
            self.rate_limited += 1;
        }
    }

    pub(crate) fn record_ignored(&mut self, key: &str, names: &std::collections::BTreeSet<String>) {
        let entry = self.ignored.entry(key.to_string()).or_default();
        entry.count += u64::try_from(names.len()).unwrap_or(u64::MAX);
        entry.properties.extend(names.iter().cloned());
        tracing::warn!(endpoint = key, properties = ?names, "properties the model lacks were ignored");
    }

    pub(crate) fn to_json(&self) -> Value {
        json!({
            "by_endpoint": self.by_endpoint,
            "by_status": self.by_status,
            "token_requests": self.token_requests,
            "rate_limited": self.rate_limited,
            "total_api": self.total_api,
            "lost_responses": self.lost_responses,
            "partial_saves": self.partial_saves,
            "writes_applied": self.writes_applied,
            "ignored": self.ignored,
        })
    }

    /// Largest number of `/api` arrivals inside any window of `window` length.
    pub(crate) fn max_in_window(&self, window: Duration) -> u64 {
        let log = &self.api_log;
        let mut best = 0usize;
        let mut start = 0usize;
        for end in 0..log.len() {
            while start < end && log[end].duration_since(log[start]) >= window {
                start += 1;
            }
            best = best.max(end - start + 1);
        }
        u64::try_from(best).unwrap_or(u64::MAX)
    }
}

/// Everything mutable.
#[derive(Debug)]
pub(crate) struct Inner {
    pub faults: Faults,
    pub data: Data,
    /// Items seeded through `insert_item`, `POST /_sim/items` or `--items`;
    /// restored by a reset.
    pub seed_items: BTreeMap<i64, Obj>,
    pub tokens: HashMap<String, TokenInfo>,
    pub counters: Counters,
    /// Admitted (non-429) requests inside the current rate-limit window.
    pub rate_window: VecDeque<Instant>,
}

/// State shared by the server task and the [`crate::SimHandle`].
#[derive(Debug)]
pub(crate) struct Shared {
    pub config: SimConfig,
    pub base_url: String,
    inner: Mutex<Inner>,
}

impl Shared {
    pub(crate) fn new(config: SimConfig, base_url: String) -> Shared {
        let inner = Inner {
            faults: config.faults.clone(),
            data: Data::new(&BTreeMap::new()),
            seed_items: BTreeMap::new(),
            tokens: HashMap::new(),
            counters: Counters::default(),
            rate_window: VecDeque::new(),
        };
        Shared {
            config,
            base_url,
            inner: Mutex::new(inner),
        }
    }

    /// Locks the state; a poisoned lock is recovered (the data stays usable).
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The configured tenant, `None` for on-premise (also for "" / "Not set").
    pub(crate) fn tenant(&self) -> Option<&str> {
        self.config
            .tenant
            .as_deref()
            .map(str::trim)
            .filter(|t| !t.is_empty() && !t.eq_ignore_ascii_case("not set"))
    }
}

impl Inner {
    /// Takes the next scheduled partial save (`Faults::save_then_refuse`)
    /// if this POST body is an array long enough for it: how many of its
    /// elements to save before refusing the next.
    pub(crate) fn take_scheduled_refusal(&mut self, body: &Value) -> Option<usize> {
        let len = body.as_array()?.len();
        let next = *self.faults.save_then_refuse.first()?;
        if len > next {
            self.faults.save_then_refuse.remove(0);
            Some(next)
        } else {
            None
        }
    }

    /// Clears data (items back to the seed catalogue), counters, the rate
    /// window, and faults back to the start configuration. Issued tokens stay
    /// valid so that running clients are not disturbed.
    pub(crate) fn reset(&mut self, faults: Faults) {
        self.faults = faults;
        self.data = Data::new(&self.seed_items);
        self.counters = Counters::default();
        self.rate_window.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_in_window() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let c = Counters {
            api_log: vec![
                at(0),
                at(100),
                at(900),
                at(1000),
                at(1500),
                at(1600),
                at(1700),
            ],
            ..Counters::default()
        };
        assert_eq!(c.max_in_window(Duration::from_secs(1)), 5);
        assert_eq!(c.max_in_window(Duration::from_secs(2)), 7);
        assert_eq!(c.max_in_window(Duration::from_millis(150)), 2);
        assert_eq!(Counters::default().max_in_window(Duration::from_secs(1)), 0);
    }
}
