//! AMQP header reading (`amqp/headers.rs`): whatever a publisher, the
//! broker or an old halosync put in a header table.

use std::collections::BTreeMap;

use halosync_shared::amqp::headers;
use lapin::types::{
    AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString,
};
use proptest::prelude::*;

use crate::corpus;

/// Every key the workers and the CLI read.
const KEYS: &[&str] = &[
    headers::ERROR_CLASS,
    headers::ERROR_MESSAGE,
    headers::HALO_STATUS,
    headers::HALO_BODY,
    headers::ATTEMPTS,
    headers::FIRST_FAILURE,
    headers::LAST_FAILURE,
    headers::WORKER,
    headers::ORIGINAL_ROUTING_KEY,
    headers::CONNECTION,
    headers::EVENT_ID,
    headers::FAMILY,
    headers::REPLAY_COUNT,
    headers::TRACEPARENT,
    headers::TRACESTATE,
    "x-first-death-reason",
    "x-death",
    "x-delivery-count",
];

fn value() -> impl Strategy<Value = AMQPValue> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(AMQPValue::Boolean),
        any::<i8>().prop_map(AMQPValue::ShortShortInt),
        any::<u8>().prop_map(AMQPValue::ShortShortUInt),
        any::<i16>().prop_map(AMQPValue::ShortInt),
        any::<u16>().prop_map(AMQPValue::ShortUInt),
        any::<i32>().prop_map(AMQPValue::LongInt),
        any::<u32>().prop_map(AMQPValue::LongUInt),
        any::<i64>().prop_map(AMQPValue::LongLongInt),
        any::<f32>().prop_map(AMQPValue::Float),
        any::<f64>().prop_map(AMQPValue::Double),
        (any::<u8>(), any::<u32>())
            .prop_map(|(scale, value)| AMQPValue::DecimalValue(DecimalValue { scale, value })),
        "\\PC{0,40}".prop_map(|s| AMQPValue::ShortString(ShortString::from(s))),
        prop::collection::vec(any::<u8>(), 0..64)
            .prop_map(|b| AMQPValue::LongString(LongString::from(b))),
        "[ 0-9-]{0,24}".prop_map(|s| AMQPValue::LongString(LongString::from(s))),
        any::<u64>().prop_map(AMQPValue::Timestamp),
        prop::collection::vec(any::<u8>(), 0..32)
            .prop_map(|b| AMQPValue::ByteArray(ByteArray::from(b))),
        Just(AMQPValue::Void),
    ];
    leaf.prop_recursive(3, 32, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5)
                .prop_map(|v| AMQPValue::FieldArray(FieldArray::from(v))),
            prop::collection::btree_map("[a-z-]{1,12}", inner, 0..5)
                .prop_map(|m| { AMQPValue::FieldTable(table(m)) }),
        ]
    })
}

fn table(m: BTreeMap<String, AMQPValue>) -> FieldTable {
    FieldTable::from(
        m.into_iter()
            .map(|(k, v)| (ShortString::from(k), v))
            .collect::<BTreeMap<_, _>>(),
    )
}

/// Tables keyed by the real header names (and some others).
fn tables() -> impl Strategy<Value = FieldTable> {
    prop::collection::btree_map(
        prop_oneof![
            prop::sample::select(KEYS.to_vec()).prop_map(str::to_string),
            "[a-z-]{1,16}"
        ],
        value(),
        0..10,
    )
    .prop_map(table)
}

proptest! {
    #![proptest_config(corpus::config())]

    #[test]
    fn any_header_table_is_read_without_panicking(t in tables()) {
        for key in KEYS {
            let s = headers::get_str(Some(&t), key);
            let n = headers::get_i64(Some(&t), key);
            // A number header reads the same as text and as a number.
            if let (Some(n), Some(AMQPValue::LongLongInt(_) | AMQPValue::LongInt(_))) = (n, t.inner().get(*key)) {
                prop_assert_eq!(s, Some(n.to_string()));
            }
        }
        let _ = headers::death_reason(Some(&t));
        let json = headers::to_json(Some(&t));
        prop_assert_eq!(json.as_object().map(|m| m.len()), Some(t.inner().len()));
        let kept = headers::without(Some(&t), &headers::FAILURE_HEADERS);
        for k in headers::FAILURE_HEADERS {
            prop_assert!(kept.inner().get(k).is_none());
        }
        prop_assert!(kept.inner().len() <= t.inner().len());
        prop_assert_eq!(headers::get_str(None, headers::ATTEMPTS), None);
    }

    #[test]
    fn headers_written_are_read_back(t in tables(), text in "\\PC{0,200}", n in any::<i64>()) {
        let mut t = t;
        headers::set_str(&mut t, headers::ERROR_MESSAGE, &text);
        headers::set_i64(&mut t, headers::ATTEMPTS, n);
        prop_assert_eq!(headers::get_str(Some(&t), headers::ERROR_MESSAGE), Some(text));
        prop_assert_eq!(headers::get_i64(Some(&t), headers::ATTEMPTS), Some(n));
        prop_assert_eq!(headers::get_str(Some(&t), headers::ATTEMPTS), Some(n.to_string()));
    }
}
