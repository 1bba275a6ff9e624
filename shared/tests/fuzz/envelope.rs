//! The envelope parser and schema validation (`contract.rs`), and the
//! version encoding kept in Redis and HaloPSA.

use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use halosync_shared::contract::{
    AccountData, Contract, Envelope, Family, OverageData, SubscriptionData, UsageData, Version,
};
use proptest::prelude::*;
use serde_json::Value;

use crate::corpus::{self, apply, edit, json, mutated};

static CONTRACT: LazyLock<Contract> =
    LazyLock::new(|| Contract::new().unwrap_or_else(|e| panic!("schemas: {e}")));
/// The default `worker.max_message_bytes`.
const MAX: usize = 262_144;

/// What every outcome of `validate` must satisfy.
fn check(
    result: Result<Envelope, halosync_shared::contract::ContractError>,
) -> Result<(), TestCaseError> {
    match result {
        Err(e) => {
            // A clear error: it says something, and is not a wall of text.
            let msg = e.to_string();
            prop_assert!(!msg.trim().is_empty());
        }
        Ok(env) => {
            // A valid envelope is of a known family and its typed data
            // deserialises: the schema and the Rust types agree.
            let family = env.family();
            prop_assert!(family.is_some(), "valid envelope of no family: {env:?}");
            let typed = match family {
                Some(Family::Account) => env.data_as::<AccountData>().map(|_| ()),
                Some(Family::Subscription) => env.data_as::<SubscriptionData>().map(|_| ()),
                Some(Family::Usage) => env.data_as::<UsageData>().map(|_| ()),
                Some(Family::Overage) => env.data_as::<OverageData>().map(|_| ()),
                None => Ok(()),
            };
            prop_assert!(
                typed.is_ok(),
                "schema-valid data does not fit its type: {typed:?} {env:?}"
            );
            // Its version survives the text form kept in Redis and in
            // HaloPSA's links, or it is refused as invalid with a reason.
            match env.version() {
                Ok(v) => prop_assert_eq!(Version::decode(&v.encode()), Some(v.clone())),
                Err(f) => {
                    prop_assert_eq!(f.class, halosync_shared::FailureClass::Invalid);
                    prop_assert!(f.message.contains("occurred_at"), "{}", f.message);
                }
            }
            // Round trip: what a publisher re-sends of it is the same event.
            let again = serde_json::to_vec(&env).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(CONTRACT.validate(&again, MAX), Ok(env));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(corpus::config())]

    #[test]
    fn mutated_example_bytes_give_an_envelope_or_an_error(
        body in mutated(corpus::envelope_examples(), 8)
    ) {
        check(CONTRACT.validate(&body, MAX))?;
    }

    #[test]
    fn arbitrary_bytes_give_an_envelope_or_an_error(body in prop::collection::vec(any::<u8>(), 0..512)) {
        check(CONTRACT.validate(&body, MAX))?;
    }

    #[test]
    fn edited_valid_examples_give_an_envelope_or_an_error(
        (i, edits) in (0..corpus::valid_envelopes().len(), prop::collection::vec(edit(), 1..4))
    ) {
        let value = apply(corpus::valid_envelopes()[i].clone(), &edits);
        let body = serde_json::to_vec(&value).map_err(|e| TestCaseError::fail(e.to_string()))?;
        check(CONTRACT.validate(&body, MAX))?;
        check(CONTRACT.validate_value(value))?;
    }

    #[test]
    fn arbitrary_json_gives_an_envelope_or_an_error(value in json()) {
        check(CONTRACT.validate_value(value))?;
    }

    #[test]
    fn oversized_bodies_are_refused_before_parsing(extra in 1usize..4096) {
        let body = vec![b' '; MAX + extra];
        let refused = matches!(
            CONTRACT.validate(&body, MAX),
            Err(halosync_shared::contract::ContractError::Oversized { .. })
        );
        prop_assert!(refused);
    }

    #[test]
    fn any_version_text_decodes_or_is_refused(text in "\\PC{0,64}", seed in mutated(vec![
        b"s=17;t=2026-11-22T10:15:00.123Z".to_vec(),
        b"t=2026-11-22T10:15:00Z".to_vec(),
    ], 6)) {
        let _ = Version::decode(&text);
        if let Ok(s) = String::from_utf8(seed) {
            if let Some(v) = Version::decode(&s) {
                prop_assert_eq!(Version::decode(&v.encode()), Some(v));
            }
        }
    }

    #[test]
    fn versions_round_trip(sequence in proptest::option::of(any::<u64>()), secs in -62_135_596_800i64..253_402_300_799, nanos in 0u32..1_000_000_000) {
        let occurred_at: DateTime<Utc> = DateTime::from_timestamp(secs, nanos)
            .ok_or_else(|| TestCaseError::reject("not a time"))?;
        let v = Version { sequence, occurred_at, repair: false };
        prop_assert_eq!(Version::decode(&v.encode()), Some(v));
    }
}

#[test]
fn every_valid_example_passes_the_round_trip() {
    for v in corpus::valid_envelopes() {
        let body = serde_json::to_vec(&v).expect("json");
        let env = CONTRACT.validate(&body, MAX);
        assert!(env.is_ok(), "{v}: {env:?}");
        // The same property the fuzz targets check.
        let checked = check(env);
        assert!(checked.is_ok(), "{checked:?}");
        let _: &Value = &v;
    }
}
