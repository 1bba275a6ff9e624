//! The caches beside the identity map, each a typed handle on one
//! [`KeyKind`]: what the workers remember of HaloPSA's invoice lines and
//! products, and what `halo::currency` and `halo::items` remember of the
//! connection's currencies and item mappings. A caller names the cache
//! (`store.usage_lines(conn)`) and the ids; this module alone turns them
//! into keys and Redis commands, so no worker builds a key or holds a
//! Redis connection.
//!
//! Every value is JSON, and one that cannot be read is absent: HaloPSA has
//! the truth, the cache is only a shortcut.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::time::Duration;

use redis::AsyncCommands;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{KeyKind, StateError, Store};
use crate::contract::Product;

/// A subscription's line on its customer's recurring invoice
/// ([`KeyKind::SubscriptionLine`], by subscription id) and the version
/// applied to it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SubscriptionLine {
    pub ihid: i64,
    pub line: i64,
    /// The applied version ([`crate::contract::Version::encode`]); empty
    /// in an entry written before versions were cached with the line.
    #[serde(default)]
    pub applied: String,
    /// Written just before the line is added: see [`UsageLine::pending`].
    #[serde(default)]
    pub pending: bool,
}

/// A usage line ([`KeyKind::UsageLine`], by aggregate
/// `<subscription_id>:<metric>`) and the state applied to it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UsageLine {
    pub ihid: i64,
    pub line: i64,
    /// The applied state, as the usage worker encodes it.
    pub applied: String,
    /// Written just before `POST /RecurringInvoice/Lines`: the line may
    /// exist without its id being known (a worker killed mid-request), so
    /// the header must be read before adding again.
    #[serde(default)]
    pub pending: bool,
}

/// An overage charge's line on its one-off invoice ([`KeyKind::OverageLine`],
/// by aggregate): `line` is `None` when the invoice holds none yet.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OverageLine {
    pub ihid: i64,
    pub line: Option<i64>,
    /// The applied version ([`crate::contract::Version::encode`]).
    pub version: String,
}

/// Ids (text) → `T` under one key kind of one connection.
pub struct Cache<'s, T> {
    store: &'s Store,
    conn: &'s str,
    kind: KeyKind,
    value: PhantomData<fn() -> T>,
}

/// Marks (present or not) by id under one key kind of one connection.
pub struct Marks<'s> {
    store: &'s Store,
    conn: &'s str,
    kind: KeyKind,
}

/// One value `T` per connection (its key has no id).
pub struct One<'s, T> {
    store: &'s Store,
    key: String,
    value: PhantomData<fn() -> T>,
}

/// The text a mark is written with.
const MARK: &str = "1";

fn encode<T: Serialize>(value: &T) -> String {
    // The cached types serialise infallibly (no maps with non-text keys).
    serde_json::to_string(value).unwrap_or_default()
}

fn decode<T: DeserializeOwned>(raw: Option<String>) -> Option<T> {
    raw.and_then(|s| serde_json::from_str(&s).ok())
}

impl Store {
    /// See [`SubscriptionLine`].
    pub fn subscription_lines<'s>(&'s self, conn: &'s str) -> Cache<'s, SubscriptionLine> {
        Cache::new(self, conn, KeyKind::SubscriptionLine)
    }

    /// A subscription's sku and name ([`KeyKind::SubscriptionProduct`], by
    /// subscription id): seeded by the subscription worker, read by the
    /// usage and overage workers.
    pub fn subscription_products<'s>(&'s self, conn: &'s str) -> Cache<'s, Product> {
        Cache::new(self, conn, KeyKind::SubscriptionProduct)
    }

    /// See [`UsageLine`].
    pub fn usage_lines<'s>(&'s self, conn: &'s str) -> Cache<'s, UsageLine> {
        Cache::new(self, conn, KeyKind::UsageLine)
    }

    /// Recurring invoices (by id) whose usage lines are all in
    /// [`usage_lines`](Self::usage_lines) ([`KeyKind::UsageScanned`]): an
    /// aggregate missing there has no line yet.
    pub fn usage_scanned<'s>(&'s self, conn: &'s str) -> Marks<'s> {
        Marks {
            store: self,
            conn,
            kind: KeyKind::UsageScanned,
        }
    }

    /// See [`OverageLine`].
    pub fn overage_lines<'s>(&'s self, conn: &'s str) -> Cache<'s, OverageLine> {
        Cache::new(self, conn, KeyKind::OverageLine)
    }

    /// HaloPSA's `/Currency` ids by ISO code ([`KeyKind::Currencies`]).
    pub fn currencies<'s>(&'s self, conn: &str) -> One<'s, BTreeMap<String, i64>> {
        One::new(self, conn, KeyKind::Currencies)
    }

    /// Codes HaloPSA lacked at the last refresh ([`KeyKind::CurrencyMissing`]).
    pub fn missing_currencies<'s>(&'s self, conn: &'s str) -> Marks<'s> {
        Marks {
            store: self,
            conn,
            kind: KeyKind::CurrencyMissing,
        }
    }

    /// Item ids by mapping key, as stored in HaloPSA ([`KeyKind::ItemMappings`]).
    pub fn item_mappings<'s>(&'s self, conn: &str) -> One<'s, BTreeMap<String, i64>> {
        One::new(self, conn, KeyKind::ItemMappings)
    }

    /// The last reconcile report of `conn`, as JSON text
    /// ([`KeyKind::Reconcile`] `:last`), if one was kept.
    pub async fn last_reconcile_report(&self, conn: &str) -> Result<Option<String>, StateError> {
        let mut r = self.redis.clone();
        Ok(r.get(self.keys.reconcile_report(conn)).await?)
    }

    /// Keeps `json` as the last reconcile report of `conn`.
    pub async fn keep_reconcile_report(&self, conn: &str, json: &str) -> Result<(), StateError> {
        let mut r = self.redis.clone();
        let _: () = r.set(self.keys.reconcile_report(conn), json).await?;
        Ok(())
    }

    /// Whether Redis answers (`PING`), for readiness.
    pub async fn ping(&self) -> Result<(), StateError> {
        let mut r = self.redis.clone();
        let _: String = redis::cmd("PING").query_async(&mut r).await?;
        Ok(())
    }
}

impl<'s, T> Cache<'s, T>
where
    T: Serialize + DeserializeOwned,
{
    fn new(store: &'s Store, conn: &'s str, kind: KeyKind) -> Self {
        Cache {
            store,
            conn,
            kind,
            value: PhantomData,
        }
    }

    fn key(&self, id: &str) -> String {
        self.store.keys.key(self.conn, self.kind, &[id])
    }

    /// The value cached for `id`.
    pub async fn get(&self, id: &str) -> Result<Option<T>, StateError> {
        let mut r = self.store.redis.clone();
        let raw: Option<String> = r.get(self.key(id)).await?;
        Ok(decode(raw))
    }

    /// The values cached for `ids`, in their order, in one round trip.
    pub async fn get_many<I: AsRef<str>>(&self, ids: &[I]) -> Result<Vec<Option<T>>, StateError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| self.key(id.as_ref())).collect();
        let mut r = self.store.redis.clone();
        let raw: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query_async(&mut r).await?;
        Ok(raw.into_iter().map(decode).collect())
    }

    /// Caches `value` for `id`.
    pub async fn set(&self, id: &str, value: &T) -> Result<(), StateError> {
        let mut r = self.store.redis.clone();
        let _: () = r.set(self.key(id), encode(value)).await?;
        Ok(())
    }

    /// Caches many values, in one round trip.
    pub async fn set_many<I, V>(&self, entries: &[(I, V)]) -> Result<(), StateError>
    where
        I: AsRef<str>,
        V: Borrow<T>,
    {
        if entries.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (id, value) in entries {
            pipe.set(self.key(id.as_ref()), encode(value.borrow()))
                .ignore();
        }
        let mut r = self.store.redis.clone();
        let _: () = pipe.query_async(&mut r).await?;
        Ok(())
    }

    /// Drops the value cached for `id`.
    pub async fn forget(&self, id: &str) -> Result<(), StateError> {
        let mut r = self.store.redis.clone();
        let _: () = r.del(self.key(id)).await?;
        Ok(())
    }
}

impl Cache<'_, UsageLine> {
    /// After reading invoice `ihid`'s lines: caches each aggregate's line
    /// where the aggregate has no entry (another worker holding that
    /// aggregate's lock may have just cached a newer state), and marks the
    /// invoice scanned ([`Store::usage_scanned`]), in one round trip.
    pub async fn remember_scanned<I: AsRef<str>>(
        &self,
        ihid: i64,
        lines: &[(I, UsageLine)],
    ) -> Result<(), StateError> {
        let mut pipe = redis::pipe();
        for (aggregate, line) in lines {
            pipe.cmd("SET")
                .arg(self.key(aggregate.as_ref()))
                .arg(encode(line))
                .arg("NX")
                .ignore();
        }
        pipe.set(self.store.usage_scanned(self.conn).key(ihid), MARK)
            .ignore();
        let mut r = self.store.redis.clone();
        let _: () = pipe.query_async(&mut r).await?;
        Ok(())
    }

    /// Drops an aggregate's line and, if given, the scanned mark of its
    /// invoice (so that the invoice is read again), in one round trip.
    pub async fn forget_with_scan(
        &self,
        aggregate: &str,
        ihid: Option<i64>,
    ) -> Result<(), StateError> {
        let mut doomed = vec![self.key(aggregate)];
        if let Some(ihid) = ihid {
            doomed.push(self.store.usage_scanned(self.conn).key(ihid));
        }
        let mut r = self.store.redis.clone();
        let _: () = r.del(doomed).await?;
        Ok(())
    }
}

impl Marks<'_> {
    fn key(&self, id: impl ToString) -> String {
        self.store
            .keys
            .key(self.conn, self.kind, &[&id.to_string()])
    }

    /// Which of `ids` are marked, in their order, in one round trip.
    pub async fn marked<I: ToString>(&self, ids: &[I]) -> Result<Vec<bool>, StateError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| self.key(id.to_string())).collect();
        let mut r = self.store.redis.clone();
        let raw: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query_async(&mut r).await?;
        Ok(raw.iter().map(Option::is_some).collect())
    }

    /// Marks `ids`, for `ttl` (else until Redis is lost), in one round trip.
    pub async fn mark<I: ToString>(
        &self,
        ids: &[I],
        ttl: Option<Duration>,
    ) -> Result<(), StateError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for id in ids {
            match ttl {
                Some(ttl) => pipe.set_ex(self.key(id.to_string()), MARK, ttl.as_secs().max(1)),
                None => pipe.set(self.key(id.to_string()), MARK),
            }
            .ignore();
        }
        let mut r = self.store.redis.clone();
        let _: () = pipe.query_async(&mut r).await?;
        Ok(())
    }
}

impl<'s, T> One<'s, T>
where
    T: Serialize + DeserializeOwned,
{
    fn new(store: &'s Store, conn: &str, kind: KeyKind) -> Self {
        One {
            store,
            key: store.keys.key(conn, kind, &[]),
            value: PhantomData,
        }
    }

    /// The cached value.
    pub async fn get(&self) -> Result<Option<T>, StateError> {
        let mut r = self.store.redis.clone();
        let raw: Option<String> = r.get(&self.key).await?;
        Ok(decode(raw))
    }

    /// Caches `value`, for `ttl` (else until Redis is lost).
    pub async fn set(&self, value: &T, ttl: Option<Duration>) -> Result<(), StateError> {
        let mut r = self.store.redis.clone();
        let text = encode(value);
        let _: () = match ttl {
            Some(ttl) => r.set_ex(&self.key, text, ttl.as_secs().max(1)).await?,
            None => r.set(&self.key, text).await?,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The values' JSON is what Redis already holds from earlier versions
    /// (a cache written before an upgrade must still read).
    #[test]
    fn the_cached_values_keep_their_json() {
        let s = SubscriptionLine {
            ihid: -3,
            line: 7,
            applied: "v".into(),
            pending: false,
        };
        assert_eq!(
            encode(&s),
            r#"{"ihid":-3,"line":7,"applied":"v","pending":false}"#
        );
        // An entry of an earlier version (no applied version) still reads.
        assert_eq!(
            decode::<SubscriptionLine>(Some(r#"{"ihid":-3,"line":7}"#.into())),
            Some(SubscriptionLine {
                applied: String::new(),
                ..s
            })
        );
        let u = UsageLine {
            ihid: -3,
            line: 9,
            applied: "a".into(),
            pending: false,
        };
        assert_eq!(
            encode(&u),
            r#"{"ihid":-3,"line":9,"applied":"a","pending":false}"#
        );
        assert_eq!(
            decode::<UsageLine>(Some(r#"{"ihid":-3,"line":9,"applied":"a"}"#.into())),
            Some(u)
        );
        let o = OverageLine {
            ihid: 4,
            line: None,
            version: "v".into(),
        };
        assert_eq!(encode(&o), r#"{"ihid":4,"line":null,"version":"v"}"#);
        assert_eq!(decode::<OverageLine>(Some("not json".into())), None);
    }
}
