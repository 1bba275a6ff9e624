//! The `x-halosync-*` headers (DESIGN §3) and typed access to AMQP header
//! tables.

use lapin::types::{AMQPValue, FieldTable, LongString};

pub const ERROR_CLASS: &str = "x-halosync-error-class";
pub const ERROR_MESSAGE: &str = "x-halosync-error-message";
pub const HALO_STATUS: &str = "x-halosync-halo-status";
pub const HALO_BODY: &str = "x-halosync-halo-body";
pub const ATTEMPTS: &str = "x-halosync-attempts";
pub const FIRST_FAILURE: &str = "x-halosync-first-failure-at";
pub const LAST_FAILURE: &str = "x-halosync-last-failure-at";
pub const WORKER: &str = "x-halosync-worker";
pub const ORIGINAL_ROUTING_KEY: &str = "x-halosync-original-routing-key";
pub const CONNECTION: &str = "x-halosync-connection";
pub const EVENT_ID: &str = "x-halosync-event-id";
pub const FAMILY: &str = "x-halosync-family";
pub const REPLAY_COUNT: &str = "x-halosync-replay-count";
/// `true` on an event `halosync reconcile --repair` published (DESIGN §8).
pub const REPAIR: &str = "x-halosync-repair";
/// On a parked copy (`runtime::lanes::park`): when it leaves its delay
/// queue, in milliseconds since the Unix epoch. How late it is read after
/// that is how far the consumer is behind its queue (`Lanes::batch_wait`).
pub const PARKED_UNTIL: &str = "x-halosync-parked-until";
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// Headers that describe a failure; removed when a dead letter is replayed.
pub const FAILURE_HEADERS: [&str; 9] = [
    ERROR_CLASS,
    ERROR_MESSAGE,
    HALO_STATUS,
    HALO_BODY,
    ATTEMPTS,
    FIRST_FAILURE,
    LAST_FAILURE,
    WORKER,
    FAMILY,
];

/// Every header that only halosync's own failure handling writes: the
/// failure headers plus where the event came from. On an event straight
/// from a publisher they are not halosync's, so the worker ignores them
/// (a publisher cannot fake attempts or redirect a later replay), and a
/// replay removes them.
pub const OWN_HEADERS: [&str; 13] = [
    ERROR_CLASS,
    ERROR_MESSAGE,
    HALO_STATUS,
    HALO_BODY,
    ATTEMPTS,
    FIRST_FAILURE,
    LAST_FAILURE,
    WORKER,
    FAMILY,
    ORIGINAL_ROUTING_KEY,
    CONNECTION,
    EVENT_ID,
    PARKED_UNTIL,
];

pub fn get_str(table: Option<&FieldTable>, key: &str) -> Option<String> {
    match table?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        other => as_i64(other).map(|n| n.to_string()),
    }
}

/// A boolean header: AMQP `true`, or the text `true` (any case) as other
/// clients (`rabbitmqadmin`, the management UI) send it.
pub fn get_bool(table: Option<&FieldTable>, key: &str) -> bool {
    match table.and_then(|t| t.inner().get(key)) {
        Some(AMQPValue::Boolean(b)) => *b,
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes())
            .trim()
            .eq_ignore_ascii_case("true"),
        Some(AMQPValue::ShortString(s)) => s.as_str().trim().eq_ignore_ascii_case("true"),
        _ => false,
    }
}

pub fn get_i64(table: Option<&FieldTable>, key: &str) -> Option<i64> {
    match table?.inner().get(key)? {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).trim().parse().ok(),
        other => as_i64(other),
    }
}

fn as_i64(v: &AMQPValue) -> Option<i64> {
    Some(match v {
        AMQPValue::ShortShortInt(n) => *n as i64,
        AMQPValue::ShortShortUInt(n) => *n as i64,
        AMQPValue::ShortInt(n) => *n as i64,
        AMQPValue::ShortUInt(n) => *n as i64,
        AMQPValue::LongInt(n) => *n as i64,
        AMQPValue::LongUInt(n) => *n as i64,
        AMQPValue::LongLongInt(n) => *n,
        AMQPValue::Timestamp(n) => *n as i64,
        _ => return None,
    })
}

pub fn set_str(table: &mut FieldTable, key: &str, value: &str) {
    table.insert(
        key.into(),
        AMQPValue::LongString(LongString::from(value.as_bytes().to_vec())),
    );
}

pub fn set_i64(table: &mut FieldTable, key: &str, value: i64) {
    table.insert(key.into(), AMQPValue::LongLongInt(value));
}

/// A copy of `table` without `keys`.
pub fn without(table: Option<&FieldTable>, keys: &[&str]) -> FieldTable {
    let mut out = FieldTable::default();
    if let Some(t) = table {
        for (k, v) in t.inner() {
            if !keys.contains(&k.as_str()) {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    out
}

/// The broker's `x-death` reason of the newest death, if any (e.g.
/// `delivery_limit` for a poison message dead-lettered by a quorum queue).
pub fn death_reason(table: Option<&FieldTable>) -> Option<String> {
    match table?.inner().get("x-first-death-reason")? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// Headers as JSON, for `halosync dlq show` and `--json` output.
pub fn to_json(table: Option<&FieldTable>) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    if let Some(t) = table {
        for (k, v) in t.inner() {
            map.insert(k.as_str().to_string(), value_to_json(v));
        }
    }
    serde_json::Value::Object(map)
}

fn value_to_json(v: &AMQPValue) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        AMQPValue::Boolean(b) => J::Bool(*b),
        AMQPValue::LongString(s) => J::String(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => J::String(s.as_str().to_string()),
        AMQPValue::Float(f) => serde_json::json!(f),
        AMQPValue::Double(f) => serde_json::json!(f),
        AMQPValue::FieldArray(a) => J::Array(a.as_slice().iter().map(value_to_json).collect()),
        AMQPValue::FieldTable(t) => to_json(Some(t)),
        AMQPValue::Void => J::Null,
        other => as_i64(other)
            .map(|n| serde_json::json!(n))
            .unwrap_or(J::Null),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_strips() {
        let mut t = FieldTable::default();
        set_str(&mut t, ERROR_CLASS, "invalid");
        set_i64(&mut t, ATTEMPTS, 3);
        set_str(&mut t, "traceparent", "00-abc");
        assert_eq!(get_str(Some(&t), ERROR_CLASS).as_deref(), Some("invalid"));
        assert_eq!(get_i64(Some(&t), ATTEMPTS), Some(3));
        assert_eq!(get_str(Some(&t), ATTEMPTS).as_deref(), Some("3"));
        let stripped = without(Some(&t), &FAILURE_HEADERS);
        assert_eq!(stripped.inner().len(), 1);
        assert_eq!(to_json(Some(&t))["x-halosync-attempts"], 3);
    }
}
