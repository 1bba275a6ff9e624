//! ISO currency code → HaloPSA `/Currency` id. A customer's currency is
//! `Area.default_currency_code`, which HaloPSA's document types as the
//! int32 id of a `/Currency` row (whose `code` is the ISO code), not the
//! code itself: a code sent there fails binding and HaloPSA refuses the
//! whole array.
//!
//! The connection's currencies are read with one `GET /Currency` and
//! cached in Redis (`KeyKind::Currencies`, beside the other identity data,
//! no expiry: an MSP rarely changes them), so every worker process shares
//! one request per connection. A code the cache lacks refreshes it once
//! (the MSP may just have added it); a code HaloPSA still lacks is an
//! `unmapped` failure naming where to set it up, replayable once it is.
//! That miss is remembered per code for [`MISSING_FOR`]
//! (`KeyKind::CurrencyMissing`), so a stream of events in a currency the
//! MSP has not set up costs one `GET /Currency` per code and period, not
//! one per batch; an operator's replay or a repair asks again at once.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;

use super::client::list_rows;
use super::models::Currency;
use super::HaloClient;
use crate::error::Failure;
use crate::store::Store;

/// The failure of a code HaloPSA does not have.
pub fn not_set_up(code: &str) -> Failure {
    Failure::unmapped(format!(
        "currency {code} is not set up in HaloPSA (Configuration > Financials > Currencies)"
    ))
}

/// `code` as compared: trimmed, upper case.
pub fn normalise(code: &str) -> String {
    code.trim().to_ascii_uppercase()
}

/// How long a code HaloPSA lacked is not asked about again (unless an
/// event is replayed or a repair).
pub const MISSING_FOR: Duration = Duration::from_secs(30);

/// Whether every code of `codes` was missing at a refresh less than
/// [`MISSING_FOR`] ago. An unreadable Redis says no (ask HaloPSA).
async fn all_known_missing(halo: &HaloClient, store: &Store, codes: &[&String]) -> bool {
    store
        .missing_currencies(&halo.connection().name)
        .marked(codes)
        .await
        .is_ok_and(|v| v.iter().all(|m| *m))
}

/// Remembers the codes HaloPSA lacked at this refresh, for [`MISSING_FOR`].
async fn remember_missing(halo: &HaloClient, store: &Store, codes: &[&String]) {
    if codes.is_empty() {
        return;
    }
    let written = store
        .missing_currencies(&halo.connection().name)
        .mark(codes, Some(MISSING_FOR))
        .await;
    if let Err(e) = written {
        tracing::warn!(error = %e, "could not remember the missing currencies; the next event asks HaloPSA again");
    }
}

async fn read_cache(halo: &HaloClient, store: &Store) -> Option<BTreeMap<String, i64>> {
    match store.currencies(&halo.connection().name).get().await {
        Ok(map) => map,
        Err(e) => {
            tracing::warn!(error = %e, "could not read the cached currencies; asking HaloPSA");
            None
        }
    }
}

/// Every currency of the connection by code, from HaloPSA (one request),
/// written to the cache.
pub async fn refresh(halo: &HaloClient, store: &Store) -> Result<BTreeMap<String, i64>, Failure> {
    let body = halo.get("/Currency", &[]).await?;
    let map = by_code(body);
    let written = store
        .currencies(&halo.connection().name)
        .set(&map, None)
        .await;
    if let Err(e) = written {
        tracing::warn!(error = %e, "could not cache the currencies; the next event asks HaloPSA again");
    }
    Ok(map)
}

/// The `/Currency` id of every code in `codes`: `Ok(None)` for a code
/// HaloPSA does not have (see [`not_set_up`]). The cache first; HaloPSA at
/// most once, when the cache is empty or lacks one of the codes and that
/// code was not found missing in the last [`MISSING_FOR`]. `ask_again`
/// (a replayed or repair event) ignores that memory.
pub async fn ids(
    halo: &HaloClient,
    store: &Store,
    codes: &[&str],
    ask_again: bool,
) -> Result<BTreeMap<String, Option<i64>>, Failure> {
    let wanted: Vec<String> = codes.iter().map(|c| normalise(c)).collect();
    if wanted.is_empty() {
        return Ok(BTreeMap::new());
    }
    let cached = read_cache(halo, store).await;
    let map = match cached {
        Some(m) => {
            let lacking: Vec<&String> = wanted.iter().filter(|c| !m.contains_key(*c)).collect();
            if lacking.is_empty() || (!ask_again && all_known_missing(halo, store, &lacking).await)
            {
                m
            } else {
                refreshed(halo, store, &wanted).await?
            }
        }
        None => refreshed(halo, store, &wanted).await?,
    };
    Ok(wanted
        .into_iter()
        .map(|c| {
            let id = map.get(&c).copied();
            (c, id)
        })
        .collect())
}

/// [`refresh`], then remembers which of `wanted` HaloPSA still lacks.
async fn refreshed(
    halo: &HaloClient,
    store: &Store,
    wanted: &[String],
) -> Result<BTreeMap<String, i64>, Failure> {
    let map = refresh(halo, store).await?;
    let lacking: Vec<&String> = wanted.iter().filter(|c| !map.contains_key(*c)).collect();
    remember_missing(halo, store, &lacking).await;
    Ok(map)
}

/// The `/Currency` id of one code, or the `unmapped` failure.
pub async fn id(
    halo: &HaloClient,
    store: &Store,
    code: &str,
    ask_again: bool,
) -> Result<i64, Failure> {
    let found = ids(halo, store, &[code], ask_again).await?;
    found
        .get(&normalise(code))
        .copied()
        .flatten()
        .ok_or_else(|| not_set_up(&normalise(code)))
}

/// The ids of a list answer (`[{id, code}]` or an envelope), by code.
pub fn by_code(body: Value) -> BTreeMap<String, i64> {
    list_rows(body, "currencies")
        .0
        .into_iter()
        .filter_map(|r| serde_json::from_value::<Currency>(r).ok())
        .filter_map(|c| Some((normalise(c.code.as_deref()?), c.id.0)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_list_shapes_by_code() {
        let bare =
            serde_json::json!([{"id": 1, "code": "usd"}, {"id": 2, "code": "GBP "}, {"id": 3}]);
        let m = by_code(bare);
        assert_eq!(m.get("USD"), Some(&1));
        assert_eq!(m.get("GBP"), Some(&2));
        assert_eq!(m.len(), 2);
        let env = serde_json::json!({"record_count": 1, "currencies": [{"id": 7, "code": "NOK"}]});
        assert_eq!(by_code(env).get("NOK"), Some(&7));
        assert_eq!(
            not_set_up("NOK").message,
            "currency NOK is not set up in HaloPSA (Configuration > Financials > Currencies)"
        );
    }
}
