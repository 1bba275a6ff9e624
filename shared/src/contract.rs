//! The event contract (DESIGN §1): the envelope, the four families, the
//! event version, and validation against the very JSON Schemas publishers
//! are given (`schemas/`, embedded at build time).

use std::cmp::Ordering;
use std::collections::HashMap;
use std::fmt;

use chrono::{DateTime, Datelike, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::Failure;

/// The schema files, embedded so that a worker validates exactly what the
/// repository ships to publishers.
pub const ENVELOPE_SCHEMA: &str = include_str!("../../schemas/envelope.schema.json");
pub const FAMILY_SCHEMAS: [(Family, &str); 4] = [
    (
        Family::Account,
        include_str!("../../schemas/account.schema.json"),
    ),
    (
        Family::Subscription,
        include_str!("../../schemas/subscription.schema.json"),
    ),
    (
        Family::Usage,
        include_str!("../../schemas/usage.schema.json"),
    ),
    (
        Family::Overage,
        include_str!("../../schemas/overage.schema.json"),
    ),
];

/// An event family: one worker kind, one work queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Account,
    Subscription,
    Usage,
    Overage,
}

impl Family {
    pub const ALL: [Family; 4] = [
        Family::Account,
        Family::Subscription,
        Family::Usage,
        Family::Overage,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Family::Account => "account",
            Family::Subscription => "subscription",
            Family::Usage => "usage",
            Family::Overage => "overage",
        }
    }

    /// The event types of this family (DESIGN §1 table).
    pub fn types(self) -> &'static [&'static str] {
        match self {
            Family::Account => &["account.created", "account.updated", "account.deactivated"],
            Family::Subscription => &[
                "subscription.created",
                "subscription.updated",
                "subscription.cancelled",
            ],
            Family::Usage => &["usage.reported"],
            Family::Overage => &["overage.detected"],
        }
    }

    pub fn parse(s: &str) -> Option<Family> {
        Family::ALL.into_iter().find(|f| f.as_str() == s)
    }

    /// The family an event type belongs to, by its prefix.
    pub fn of_type(event_type: &str) -> Option<Family> {
        Family::parse(event_type.split('.').next()?)
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The version of an event: `sequence` when present, else `occurred_at`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version {
    pub sequence: Option<u64>,
    pub occurred_at: DateTime<Utc>,
    /// The event is a repair (`x-halosync-repair: true`, DESIGN §8): it is
    /// applied even when its version equals the applied one, because
    /// HaloPSA drifted from that state; an older one still changes nothing.
    /// Never stored ([`Version::encode`] leaves it out).
    pub repair: bool,
}

impl Version {
    /// Compares two versions: by `sequence` when both have one, else by
    /// `occurred_at` (the contract's rule, applied pairwise so that a
    /// publisher that starts sending sequences mid-stream stays ordered).
    pub fn compare(&self, other: &Version) -> Ordering {
        match (self.sequence, other.sequence) {
            (Some(a), Some(b)) => a.cmp(&b),
            _ => self.occurred_at.cmp(&other.occurred_at),
        }
    }

    /// True when an event of version `self` changes nothing because
    /// `applied` is already in HaloPSA (older or the same version).
    pub fn is_superseded_by(&self, applied: &Version) -> bool {
        match self.compare(applied) {
            Ordering::Greater => false,
            // The same version again: a duplicate, unless it is a repair.
            Ordering::Equal => !self.repair,
            Ordering::Less => true,
        }
    }

    /// A compact text form for Redis and HaloPSA: `s=17;t=2026-...Z`.
    pub fn encode(&self) -> String {
        let t = self
            .occurred_at
            .to_rfc3339_opts(SecondsFormat::AutoSi, true);
        match self.sequence {
            Some(s) => format!("s={s};t={t}"),
            None => format!("t={t}"),
        }
    }

    /// The inverse of [`Version::encode`]; `None` for anything else,
    /// including a time outside the years 1–9999 in UTC (which `encode`
    /// could not write back).
    pub fn decode(text: &str) -> Option<Version> {
        let mut sequence = None;
        let mut occurred_at = None;
        for part in text.split(';') {
            if let Some(s) = part.strip_prefix("s=") {
                sequence = Some(s.parse().ok()?);
            } else if let Some(t) = part.strip_prefix("t=") {
                occurred_at = Some(DateTime::parse_from_rfc3339(t).ok()?.with_timezone(&Utc));
            }
        }
        let occurred_at = occurred_at.filter(encodable)?;
        Some(Version {
            sequence,
            occurred_at,
            repair: false,
        })
    }
}

/// Whether `encode` writes a time that `decode` reads back: RFC 3339 has
/// four-digit years, so `0000-01-01T00:00:00+23:59` (year -1 in UTC) or
/// `9999-12-31T23:59:59-01:00` (year 10000) would be stored as a version
/// nothing can read (found by shared/tests/fuzz).
fn encodable(t: &DateTime<Utc>) -> bool {
    (1..=9999).contains(&t.year())
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.encode())
    }
}

/// A validated event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub schema_version: u32,
    pub connection: String,
    pub occurred_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<u64>,
    pub data: Value,
    /// Set by the runtime from the `x-halosync-repair` header (DESIGN §8);
    /// not part of the body.
    #[serde(skip)]
    pub repair: bool,
    /// Set by the runtime when the message carries `x-halosync-replay-count`:
    /// an operator replayed it, usually after fixing what it lacked, so
    /// negative caches (a currency HaloPSA lacked) are asked again.
    #[serde(skip)]
    pub replayed: bool,
}

impl Envelope {
    pub fn family(&self) -> Option<Family> {
        Family::of_type(&self.event_type)
    }

    pub fn version(&self) -> Result<Version, Failure> {
        let occurred_at = DateTime::parse_from_rfc3339(&self.occurred_at)
            .map_err(|e| {
                Failure::invalid(format!(
                    "occurred_at {:?} is not an RFC 3339 timestamp: {e}",
                    self.occurred_at
                ))
            })?
            .with_timezone(&Utc);
        if !encodable(&occurred_at) {
            return Err(Failure::invalid(format!(
                "occurred_at {:?} falls outside the years 0001-9999 in UTC; send the time of the change, e.g. \"2026-11-22T10:15:00Z\"",
                self.occurred_at
            )));
        }
        Ok(Version {
            sequence: self.sequence,
            occurred_at,
            repair: self.repair,
        })
    }

    /// Deserialises `data` into a family's typed payload.
    pub fn data_as<T: for<'de> Deserialize<'de>>(&self) -> Result<T, Failure> {
        T::deserialize(&self.data)
            .map_err(|e| Failure::invalid(format!("data does not fit {}: {e}", self.event_type)))
    }
}

/// An event as its handler gets it: the envelope's fields, its version,
/// and its `data` parsed into the family's type (`AccountData`, ...),
/// once, by the runtime ([`Event::of`]), after schema validation.
#[derive(Clone, Debug, PartialEq)]
pub struct Event<T> {
    pub id: String,
    pub event_type: String,
    pub connection: String,
    /// [`Envelope::version`] (its `repair` set like [`Event::repair`]).
    pub version: Version,
    /// A repair (`x-halosync-repair`, DESIGN §8): see [`Envelope::repair`].
    pub repair: bool,
    /// Replayed by an operator: see [`Envelope::replayed`].
    pub replayed: bool,
    pub data: T,
}

impl<T: for<'de> Deserialize<'de>> Event<T> {
    /// The typed event of a validated envelope. `data` that does not fit
    /// `T`, or a time that is no version, is `invalid` (with serde's
    /// message for the data).
    pub fn of(envelope: &Envelope) -> Result<Event<T>, Failure> {
        Ok(Event {
            version: envelope.version()?,
            data: envelope.data_as()?,
            id: envelope.id.clone(),
            event_type: envelope.event_type.clone(),
            connection: envelope.connection.clone(),
            repair: envelope.repair,
            replayed: envelope.replayed,
        })
    }
}

/// Why a body is not a valid event.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ContractError {
    #[error("body is {size} bytes, over the {max}-byte limit")]
    Oversized { size: usize, max: usize },
    #[error("body is not UTF-8 JSON: {0}")]
    NotJson(String),
    #[error("envelope does not match envelope.schema.json: {0}")]
    Envelope(String),
    #[error("unknown event type {0:?}: known types are account.*, subscription.*, usage.reported, overage.detected (DESIGN §1)")]
    UnknownType(String),
    #[error("event does not match {family}.schema.json: {errors}")]
    Schema { family: Family, errors: String },
}

impl From<ContractError> for Failure {
    fn from(e: ContractError) -> Failure {
        Failure::invalid(e.to_string())
    }
}

/// Validators built once from the embedded schemas.
pub struct Contract {
    envelope: jsonschema::Validator,
    families: HashMap<Family, jsonschema::Validator>,
}

impl fmt::Debug for Contract {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Contract").finish_non_exhaustive()
    }
}

/// Fails only if the embedded schemas themselves are broken (a build-time
/// mistake caught by the unit tests below).
#[derive(Debug, thiserror::Error)]
#[error("embedded schema {name} is broken: {message}")]
pub struct SchemaBuildError {
    name: String,
    message: String,
}

impl Contract {
    pub fn new() -> Result<Contract, SchemaBuildError> {
        let broken = |name: &str, message: String| SchemaBuildError {
            name: name.to_string(),
            message,
        };
        let envelope_json: Value = serde_json::from_str(ENVELOPE_SCHEMA)
            .map_err(|e| broken("envelope.schema.json", e.to_string()))?;
        let envelope_id = envelope_json
            .get("$id")
            .and_then(Value::as_str)
            .unwrap_or("https://halosync.dev/schemas/v1/envelope.schema.json")
            .to_string();
        let registry = jsonschema::Registry::new()
            .add(envelope_id.as_str(), envelope_json.clone())
            .map_err(|e| broken("envelope.schema.json", e.to_string()))?
            .prepare()
            .map_err(|e| broken("envelope.schema.json", e.to_string()))?;
        let envelope = jsonschema::options()
            .should_validate_formats(true)
            .build(&envelope_json)
            .map_err(|e| broken("envelope.schema.json", e.to_string()))?;
        let mut families = HashMap::new();
        for (family, text) in FAMILY_SCHEMAS {
            let name = format!("{family}.schema.json");
            let json: Value =
                serde_json::from_str(text).map_err(|e| broken(&name, e.to_string()))?;
            let validator = jsonschema::options()
                .should_validate_formats(true)
                .with_registry(&registry)
                .build(&json)
                .map_err(|e| broken(&name, e.to_string()))?;
            families.insert(family, validator);
        }
        Ok(Contract { envelope, families })
    }

    /// Parses and validates one message body.
    pub fn validate(&self, body: &[u8], max_bytes: usize) -> Result<Envelope, ContractError> {
        self.validate_value(parse_body(body, max_bytes)?)
    }

    pub fn validate_value(&self, value: Value) -> Result<Envelope, ContractError> {
        if let Some(errors) = describe_errors(&self.envelope, &value) {
            return Err(ContractError::Envelope(errors));
        }
        let event_type = value
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let family = Family::of_type(&event_type)
            .filter(|f| f.types().contains(&event_type.as_str()))
            .ok_or_else(|| ContractError::UnknownType(event_type.clone()))?;
        let validator = self
            .families
            .get(&family)
            .ok_or_else(|| ContractError::UnknownType(event_type.clone()))?;
        if let Some(errors) = describe_errors(validator, &value) {
            return Err(ContractError::Schema { family, errors });
        }
        serde_json::from_value(value).map_err(|e| ContractError::Envelope(e.to_string()))
    }
}

/// The first step of [`Contract::validate`]: the body as JSON, refused
/// unread when larger than `max_bytes`. The runtime parses each delivery
/// once, with this, as it arrives (its lane is the envelope's
/// `connection`), and validates the parsed value later
/// ([`Contract::validate_value`]).
pub fn parse_body(body: &[u8], max_bytes: usize) -> Result<Value, ContractError> {
    if body.len() > max_bytes {
        return Err(ContractError::Oversized {
            size: body.len(),
            max: max_bytes,
        });
    }
    serde_json::from_slice(body).map_err(|e| ContractError::NotJson(e.to_string()))
}

/// The first few validation errors as `path: message; ...`, or `None`.
fn describe_errors(validator: &jsonschema::Validator, value: &Value) -> Option<String> {
    // The common case first: `is_valid` stops at the first failure and
    // builds no error values, several times cheaper per message than
    // collecting errors that are not there.
    if validator.is_valid(value) {
        return None;
    }
    let errors: Vec<String> = validator
        .iter_errors(value)
        .take(5)
        .map(|e| {
            let path = e.instance_path().to_string();
            let path = if path.is_empty() {
                "/".to_string()
            } else {
                path
            };
            crate::error::excerpt(&format!("{path}: {e}"), 300)
        })
        .collect();
    if errors.is_empty() {
        None
    } else {
        Some(errors.join("; "))
    }
}

/// `data` of `account.*` events.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct AccountData {
    pub account_id: String,
    pub name: String,
    pub active: bool,
    #[serde(default)]
    pub website: Option<String>,
    #[serde(default)]
    pub tax_number: Option<String>,
    #[serde(default)]
    pub currency: Option<String>,
    #[serde(default)]
    pub notes: Option<String>,
}

/// `data` of `subscription.*` events (DESIGN §1). Money stays the decimal
/// string of the contract; workers convert it where HaloPSA wants numbers.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct SubscriptionData {
    pub subscription_id: String,
    pub account_id: String,
    pub product: Product,
    /// Seats: an integer >= 0.
    pub quantity: u64,
    /// Decimal string, e.g. `"22.00"`.
    pub unit_price: String,
    #[serde(default)]
    pub unit_cost: Option<String>,
    /// ISO 4217 code.
    pub currency: String,
    /// `monthly` or `annual`.
    pub billing_cycle: String,
    /// `YYYY-MM-DD`.
    pub start_date: String,
    #[serde(default)]
    pub end_date: Option<String>,
    /// `active`, `suspended` or `cancelled`.
    pub status: String,
}

/// `data` of `usage.reported` events: the cumulative quantity of one
/// metric of one subscription for one period (not a delta).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct UsageData {
    pub subscription_id: String,
    pub account_id: String,
    pub metric: String,
    /// `YYYY-MM-DD`.
    pub period_start: String,
    /// `YYYY-MM-DD`.
    pub period_end: String,
    pub quantity: f64,
    #[serde(default)]
    pub unit: Option<String>,
}

/// `data` of `overage.detected` events: the usage of one metric of one
/// subscription beyond its quota for one period. Money stays the decimal
/// string of the contract.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct OverageData {
    pub subscription_id: String,
    pub account_id: String,
    pub metric: String,
    /// `YYYY-MM-DD`.
    pub period_start: String,
    /// `YYYY-MM-DD`.
    pub period_end: String,
    pub included_quantity: f64,
    pub used_quantity: f64,
    pub overage_quantity: f64,
    /// Decimal string, e.g. `"0.10"`.
    pub unit_price: String,
    /// ISO 4217 code.
    pub currency: String,
}

/// The product of a subscription; `sku` is looked up in the connection's
/// item mapping.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct Product {
    pub sku: String,
    pub name: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn examples(kind: &str) -> Vec<(String, Vec<u8>)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../schemas/examples")
            .join(kind);
        let mut out: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .map(|p| {
                (
                    p.file_name().unwrap().to_string_lossy().to_string(),
                    std::fs::read(&p).unwrap(),
                )
            })
            .collect();
        out.sort();
        assert!(!out.is_empty(), "no examples in {}", dir.display());
        out
    }

    #[test]
    fn versions_that_cannot_be_stored_are_refused() {
        // Year -1 and year 10000 in UTC: encode would write what decode
        // cannot read.
        for at in ["0000-01-01T00:00:00+23:59", "9999-12-31T23:59:59-01:00"] {
            let env = Envelope {
                id: "e".into(),
                event_type: "account.created".into(),
                schema_version: 1,
                connection: "acme".into(),
                occurred_at: at.into(),
                sequence: Some(17),
                data: serde_json::json!({}),
                repair: false,
                replayed: false,
            };
            let err = env.version().expect_err(at);
            assert_eq!(err.class, crate::error::FailureClass::Invalid);
            assert_eq!(Version::decode(&format!("s=17;t={at}")), None);
        }
        let edge = Version::decode("t=0001-01-01T00:00:00Z").expect("year 1");
        assert_eq!(Version::decode(&edge.encode()), Some(edge));
    }

    #[test]
    fn every_valid_example_passes() {
        let c = Contract::new().unwrap();
        for (name, body) in examples("valid") {
            let env = c
                .validate(&body, 1 << 20)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(env.family().is_some(), "{name}");
            env.version().unwrap();
        }
    }

    #[test]
    fn every_invalid_example_fails() {
        let c = Contract::new().unwrap();
        for (name, body) in examples("invalid") {
            assert!(c.validate(&body, 1 << 20).is_err(), "{name} was accepted");
        }
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let c = Contract::new().unwrap();
        assert!(matches!(
            c.validate(b"not json", 1024),
            Err(ContractError::NotJson(_))
        ));
        assert!(matches!(
            c.validate(&[b' '; 2048], 1024),
            Err(ContractError::Oversized { .. })
        ));
        let unknown = br#"{"id":"e1","type":"account.deleted","schema_version":1,"connection":"c","occurred_at":"2026-11-22T10:15:00Z","data":{}}"#;
        assert!(matches!(
            c.validate(unknown, 4096),
            Err(ContractError::UnknownType(t)) if t == "account.deleted"
        ));
        let bad = br#"{"id":"e1","type":"account.created","schema_version":1,"connection":"c","occurred_at":"2026-11-22T10:15:00Z","data":{"account_id":"a","active":true}}"#;
        let err = c.validate(bad, 4096).unwrap_err().to_string();
        assert!(err.contains("name"), "{err}");
    }

    #[test]
    fn versions_compare_by_sequence_then_time() {
        let t1 = DateTime::parse_from_rfc3339("2026-11-22T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let t2 = DateTime::parse_from_rfc3339("2026-11-22T11:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let v = |s, t| Version {
            sequence: s,
            occurred_at: t,
            repair: false,
        };
        // sequence wins over time when both have one
        assert_eq!(v(Some(2), t1).compare(&v(Some(1), t2)), Ordering::Greater);
        assert_eq!(v(None, t1).compare(&v(None, t2)), Ordering::Less);
        assert_eq!(v(Some(5), t2).compare(&v(None, t1)), Ordering::Greater);
        assert!(v(Some(1), t1).is_superseded_by(&v(Some(1), t1)));
        assert!(!v(Some(2), t1).is_superseded_by(&v(Some(1), t1)));
        // A repair of the applied version is applied; an older one is not.
        let repair = |s, t| Version {
            repair: true,
            ..v(s, t)
        };
        assert!(!repair(Some(1), t1).is_superseded_by(&v(Some(1), t1)));
        assert!(repair(Some(1), t1).is_superseded_by(&v(Some(2), t1)));
        assert!(!repair(None, t2).is_superseded_by(&v(None, t2)));
        for version in [v(Some(17), t1), v(None, t2)] {
            assert_eq!(Version::decode(&version.encode()), Some(version));
        }
        assert_eq!(Version::decode("garbage"), None);
    }
}
