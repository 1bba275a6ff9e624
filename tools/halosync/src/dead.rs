//! What a dead letter says, read from its headers and body (DESIGN §3), the
//! filters of `halosync dlq`, and ServicePulse-style failure groups.
//!
//! Everything here is pure (no broker), so it is unit-tested directly.
//!
//! Reading a dead letter:
//! * event id: `x-halosync-event-id`, else `message_id`, else the envelope `id`;
//! * class: `poison` when the newest `x-death` entry (or
//!   `x-first-death-reason`) is the quorum queue's `delivery_limit`, else
//!   `x-halosync-error-class`, else `unknown`;
//! * original routing key (used by replay): `x-halosync-original-routing-key`,
//!   else the `type` property, else the envelope `type` (the contract's
//!   routing key is the type); never the queue name the broker's
//!   dead-lettering put there;
//! * last failure: `x-halosync-last-failure-at`, else the broker's `x-death` time.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use clap::builder::{PossibleValuesParser, TypedValueParser};
use halosync_shared::amqp::headers as h;
use halosync_shared::halo::error::message_from_body;
use halosync_shared::ErrorClass;
use halosync_shared::Family;
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use serde::Serialize;
use serde_json::Value;

use crate::table::shell_word;

/// The filters every `dlq` command takes.
#[derive(Debug, clap::Args, Clone, Default)]
pub struct FilterArgs {
    /// Only these families' dead queues (repeat or comma-separate) [default: all four].
    #[arg(long, value_enum, value_delimiter = ',', value_name = "FAMILY")]
    pub family: Vec<FamilyArg>,
    /// Only this failure class (x-halosync-error-class; `poison` = the broker's delivery limit).
    #[arg(long, value_delimiter = ',', value_name = "CLASS",
          value_parser = PossibleValuesParser::new(ErrorClass::LABELS).try_map(|s| s.parse::<ErrorClass>()))]
    pub class: Vec<ErrorClass>,
    /// Only events of this connection (header or envelope).
    #[arg(long, value_delimiter = ',', value_name = "NAME")]
    pub connection: Vec<String>,
    /// Only this event id (header, message_id or envelope id).
    #[arg(long, value_delimiter = ',', value_name = "ID")]
    pub event_id: Vec<String>,
    /// Only this failure group: the error message with numbers folded to `#`,
    /// as `dlq list --group-by error` prints it.
    #[arg(long, value_name = "TEXT")]
    pub error: Option<String>,
    /// Only dead letters whose last failure is this recent: a duration (30m,
    /// 1h, 2d, 1h30m) or an RFC 3339 time (2026-11-22T10:00:00Z).
    #[arg(long, value_name = "WHEN", value_parser = parse_since)]
    pub since: Option<Since>,
    /// At most this many dead letters (oldest first).
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GroupBy {
    /// By failure class.
    Class,
    /// By class and error message (numbers folded), like ServicePulse's failure groups.
    Error,
}

/// `--family` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FamilyArg {
    Account,
    Subscription,
    Usage,
    Overage,
}

impl From<FamilyArg> for Family {
    fn from(f: FamilyArg) -> Family {
        match f {
            FamilyArg::Account => Family::Account,
            FamilyArg::Subscription => Family::Subscription,
            FamilyArg::Usage => Family::Usage,
            FamilyArg::Overage => Family::Overage,
        }
    }
}

/// The families to scan: the ones named, in their canonical order, or all.
pub fn families(args: &[FamilyArg]) -> Vec<Family> {
    if args.is_empty() {
        return Family::ALL.to_vec();
    }
    let wanted: BTreeSet<Family> = args.iter().map(|f| Family::from(*f)).collect();
    Family::ALL
        .into_iter()
        .filter(|f| wanted.contains(f))
        .collect()
}

/// `--since`: a duration back from now, or a point in time.
#[derive(Clone, Debug, PartialEq)]
pub enum Since {
    Ago(chrono::Duration, String),
    At(DateTime<Utc>),
}

impl Since {
    pub fn cutoff(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        match self {
            Since::Ago(d, _) => now - *d,
            Since::At(t) => *t,
        }
    }
    /// As typed, for advice we print.
    pub fn as_arg(&self) -> String {
        match self {
            Since::Ago(_, text) => text.clone(),
            Since::At(t) => t.to_rfc3339(),
        }
    }
}

/// Parses a duration (`30m`, `1h`, `2d`, `1h30m`, `45s`, `1w`, by
/// `humantime`), an RFC 3339 time or a `YYYY-MM-DD` date (midnight UTC).
pub fn parse_since(text: &str) -> Result<Since, String> {
    let s = text.trim();
    let bad = || {
        format!(
            "expected a duration like 30m, 1h, 2d or 1h30m, or an RFC 3339 time like 2026-11-22T10:00:00Z, got {s:?}"
        )
    };
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(Since::At(t.with_timezone(&Utc)));
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        let t = d.and_hms_opt(0, 0, 0).ok_or_else(bad)?;
        return Ok(Since::At(Utc.from_utc_datetime(&t)));
    }
    // humantime reads `30m`, `1h30m`, `2d`, `1w`, `90s` (and spelled-out
    // units); a bare number has no unit and is refused.
    let d = humantime::parse_duration(s).map_err(|_| bad())?;
    let total = i64::try_from(d.as_secs()).map_err(|_| bad())?;
    if chrono::Duration::try_seconds(total).is_none() {
        return Err(bad());
    }
    Ok(Since::Ago(chrono::Duration::seconds(total), s.to_string()))
}

/// The broker's newest `x-death` entry.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Death {
    pub reason: Option<String>,
    pub queue: Option<String>,
    pub time: Option<DateTime<Utc>>,
    pub routing_keys: Vec<String>,
}

fn value_str(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

pub fn newest_death(headers: Option<&FieldTable>) -> Option<Death> {
    let AMQPValue::FieldArray(deaths) = headers?.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else {
        return None;
    };
    let t = first.inner();
    Some(Death {
        reason: t.get("reason").and_then(value_str),
        queue: t.get("queue").and_then(value_str),
        time: match t.get("time") {
            Some(AMQPValue::Timestamp(secs)) => Utc
                .timestamp_opt(i64::try_from(*secs).unwrap_or(0), 0)
                .single(),
            _ => None,
        },
        routing_keys: match t.get("routing-keys") {
            Some(AMQPValue::FieldArray(a)) => a.as_slice().iter().filter_map(value_str).collect(),
            _ => Vec::new(),
        },
    })
}

fn parse_time(text: Option<String>) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text?.trim())
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// What a dead letter is filed under: its `x-halosync-error-class`, or the
/// broker's `poison`. Read once, here; a header halosync did not write
/// (another version's, or a hand-published message's) is kept as it reads,
/// and a missing one is `unknown`. Serialised (`--json`) as that text.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LetterClass {
    /// One of halosync's classes.
    Filed(ErrorClass),
    /// No `x-halosync-error-class` header.
    Unknown,
    /// A header none of halosync's classes spells.
    Other(String),
}

impl LetterClass {
    /// What a dead letter without the header is listed as.
    pub const UNKNOWN: &'static str = "unknown";

    /// The class of a letter whose `x-halosync-error-class` header is `header`.
    pub fn read(header: Option<String>) -> LetterClass {
        match header {
            None => LetterClass::Unknown,
            Some(text) => match text.parse::<ErrorClass>() {
                Ok(class) => LetterClass::Filed(class),
                Err(_) if text == Self::UNKNOWN => LetterClass::Unknown,
                Err(_) => LetterClass::Other(text),
            },
        }
    }

    /// Halosync's class, if the letter carries one.
    pub fn class(&self) -> Option<ErrorClass> {
        match self {
            LetterClass::Filed(c) => Some(*c),
            LetterClass::Unknown | LetterClass::Other(_) => None,
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            LetterClass::Filed(c) => c.as_str(),
            LetterClass::Unknown => Self::UNKNOWN,
            LetterClass::Other(text) => text,
        }
    }
}

halosync_shared::label::written_as_label!(LetterClass);

impl PartialEq<&str> for LetterClass {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// One dead letter as the operator sees it.
#[derive(Clone, Debug, Serialize)]
pub struct DeadLetter {
    pub family: Family,
    pub queue: String,
    /// 1-based position in its dead queue when it was read.
    pub position: usize,
    pub event_id: Option<String>,
    #[serde(rename = "type")]
    pub event_type: Option<String>,
    pub connection: Option<String>,
    pub class: LetterClass,
    pub error_message: Option<String>,
    pub halo_status: Option<i64>,
    /// HaloPSA's own message, read out of the body excerpt.
    pub halo_message: Option<String>,
    pub attempts: Option<i64>,
    pub first_failure_at: Option<DateTime<Utc>>,
    pub last_failure_at: Option<DateTime<Utc>>,
    pub worker: Option<String>,
    pub original_routing_key: Option<String>,
    pub replay_count: i64,
    /// The quorum queue's `x-delivery-count` (how often it was handed out,
    /// listings included); informative only, dead queues have no limit.
    pub delivery_count: Option<i64>,
    pub body_bytes: usize,
    /// Every header, as JSON.
    pub headers: Value,
    /// The body as JSON when it is JSON (an `invalid` dead letter may not be).
    pub envelope: Option<Value>,
    /// The body as text when it is not JSON.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_text: Option<String>,
}

impl DeadLetter {
    pub fn read(
        family: Family,
        queue: &str,
        position: usize,
        props: &BasicProperties,
        body: &[u8],
    ) -> DeadLetter {
        let headers = props.headers().as_ref();
        let envelope: Option<Value> = serde_json::from_slice(body).ok();
        let env_str = |key: &str| {
            envelope
                .as_ref()
                .and_then(|e| e.get(key))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        let death = newest_death(headers);
        let poison = death
            .as_ref()
            .and_then(|d| d.reason.as_deref())
            .map(|r| r == "delivery_limit")
            .unwrap_or_else(|| h::death_reason(headers).as_deref() == Some("delivery_limit"));
        let worker_message = h::get_str(headers, h::ERROR_MESSAGE);
        let (class, error_message) = if poison {
            let m = match worker_message {
                Some(last) => format!(
                    "the broker's delivery limit dead-lettered it (workers kept dying while holding it); last recorded failure: {last}"
                ),
                None => "the broker's delivery limit dead-lettered it (workers kept dying while holding it)".to_string(),
            };
            (LetterClass::Filed(ErrorClass::Poison), Some(m))
        } else {
            (
                LetterClass::read(h::get_str(headers, h::ERROR_CLASS)),
                worker_message,
            )
        };
        let death_time = death.as_ref().and_then(|d| d.time);
        let last_failure_at = if poison {
            death_time.or_else(|| parse_time(h::get_str(headers, h::LAST_FAILURE)))
        } else {
            parse_time(h::get_str(headers, h::LAST_FAILURE)).or(death_time)
        };
        let first_failure_at = parse_time(h::get_str(headers, h::FIRST_FAILURE))
            .or(death_time)
            .or(last_failure_at);
        // The envelope says what the event is; a property or header (which
        // a publisher may set to anything) only when there is no envelope.
        let event_type = env_str("type").filter(|k| !k.is_empty()).or_else(|| {
            props
                .kind()
                .as_ref()
                .map(|k| k.as_str().to_string())
                .filter(|k| !k.is_empty())
        });
        // Replay routes by the event's own type.
        let original_routing_key = event_type
            .clone()
            .or_else(|| h::get_str(headers, h::ORIGINAL_ROUTING_KEY).filter(|k| !k.is_empty()));
        let halo_body = h::get_str(headers, h::HALO_BODY);
        DeadLetter {
            family,
            queue: queue.to_string(),
            position,
            // The envelope's id; the message id or header only without one.
            event_id: env_str("id")
                .filter(|m| !m.is_empty())
                .or_else(|| props.message_id().as_ref().map(|m| m.as_str().to_string()))
                .filter(|m| !m.is_empty())
                .or_else(|| h::get_str(headers, h::EVENT_ID)),
            event_type,
            connection: h::get_str(headers, h::CONNECTION).or_else(|| env_str("connection")),
            class,
            error_message,
            halo_status: h::get_i64(headers, h::HALO_STATUS),
            halo_message: halo_body.as_deref().map(message_from_body),
            attempts: h::get_i64(headers, h::ATTEMPTS),
            first_failure_at,
            last_failure_at,
            worker: h::get_str(headers, h::WORKER),
            original_routing_key,
            replay_count: h::get_i64(headers, h::REPLAY_COUNT).unwrap_or(0),
            delivery_count: h::get_i64(headers, "x-delivery-count"),
            body_bytes: body.len(),
            headers: h::to_json(headers),
            body_text: if envelope.is_none() {
                Some(String::from_utf8_lossy(body).into_owned())
            } else {
                None
            },
            envelope,
        }
    }

    /// All the ids this dead letter answers to.
    fn ids(&self, props_id: Option<&str>) -> impl Iterator<Item = String> + '_ {
        let env_id = self
            .envelope
            .as_ref()
            .and_then(|e| e.get("id"))
            .and_then(Value::as_str)
            .map(str::to_string);
        let header_id = self
            .headers
            .get(h::EVENT_ID)
            .and_then(Value::as_str)
            .map(str::to_string);
        self.event_id
            .clone()
            .into_iter()
            .chain(env_id)
            .chain(header_id)
            .chain(props_id.map(str::to_string))
    }

    fn connections(&self) -> impl Iterator<Item = String> + '_ {
        let env = self
            .envelope
            .as_ref()
            .and_then(|e| e.get("connection"))
            .and_then(Value::as_str)
            .map(str::to_string);
        self.connection.clone().into_iter().chain(env)
    }

    /// The error message with numbers folded: the key of its failure group.
    pub fn folded_error(&self) -> String {
        fold_numbers(
            self.error_message
                .as_deref()
                .unwrap_or("(no error message)"),
        )
    }

    /// The message to show: the worker's message, with HaloPSA's own text
    /// when the worker's message does not already hold it.
    pub fn reason(&self) -> String {
        let base = self
            .error_message
            .clone()
            .unwrap_or_else(|| "(no error message)".to_string());
        match (&self.halo_message, self.halo_status) {
            (Some(m), status) if !base.contains(m.as_str()) => match status {
                Some(s) => format!("{base} — HaloPSA {s}: {m}"),
                None => format!("{base} — HaloPSA: {m}"),
            },
            _ => base,
        }
    }
}

/// The `dlq` filters, resolved.
#[derive(Clone, Debug)]
pub struct Filter {
    pub families: Vec<Family>,
    pub classes: Vec<ErrorClass>,
    pub connections: Vec<String>,
    pub event_ids: Vec<String>,
    /// The folded error message of one failure group.
    pub error: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub limit: Option<usize>,
    /// The arguments, to print back in advice.
    args: FilterArgs,
}

impl Filter {
    pub fn new(args: &FilterArgs, now: DateTime<Utc>) -> Filter {
        Filter {
            families: families(&args.family),
            classes: args.class.clone(),
            connections: args.connection.clone(),
            event_ids: args.event_id.clone(),
            error: args.error.as_deref().map(fold_numbers),
            since: args.since.as_ref().map(|s| s.cutoff(now)),
            limit: args.limit,
            args: args.clone(),
        }
    }

    pub fn matches(&self, d: &DeadLetter, message_id: Option<&str>) -> bool {
        if !self.classes.is_empty() && !self.classes.iter().any(|c| d.class.class() == Some(*c)) {
            return false;
        }
        if !self.connections.is_empty()
            && !d
                .connections()
                .any(|c| self.connections.iter().any(|w| w == &c))
        {
            return false;
        }
        if !self.event_ids.is_empty()
            && !d
                .ids(message_id)
                .any(|id| self.event_ids.iter().any(|w| w == &id))
        {
            return false;
        }
        if let Some(error) = &self.error {
            if &d.folded_error() != error {
                return false;
            }
        }
        if let Some(cutoff) = self.since {
            match d.last_failure_at {
                Some(t) if t >= cutoff => {}
                _ => return false,
            }
        }
        true
    }

    pub fn is_empty(&self) -> bool {
        self.args.family.is_empty()
            && self.classes.is_empty()
            && self.connections.is_empty()
            && self.event_ids.is_empty()
            && self.error.is_none()
            && self.since.is_none()
            && self.limit.is_none()
    }

    /// The filters as command-line arguments (for advice we print).
    pub fn as_args(&self) -> String {
        let mut out = Vec::new();
        if !self.args.family.is_empty() {
            let f: Vec<&str> = self.families.iter().map(|f| f.as_str()).collect();
            out.push(format!("--family {}", f.join(",")));
        }
        let mut multi = |flag: &str, values: &[String]| {
            if !values.is_empty() {
                out.push(format!("{flag} {}", shell_word(&values.join(","))));
            }
        };
        let classes: Vec<String> = self.classes.iter().map(|c| c.to_string()).collect();
        multi("--class", &classes);
        multi("--connection", &self.connections);
        multi("--event-id", &self.event_ids);
        if let Some(e) = &self.error {
            out.push(format!("--error {}", shell_word(e)));
        }
        if let Some(s) = &self.args.since {
            out.push(format!("--since {}", shell_word(&s.as_arg())));
        }
        if let Some(n) = self.limit {
            out.push(format!("--limit {n}"));
        }
        out.join(" ")
    }
}

/// A failure group: dead letters with the same class (and error).
#[derive(Clone, Debug, Serialize)]
pub struct Group {
    pub class: LetterClass,
    /// The error message with numbers folded to `#` (`--group-by error`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub count: usize,
    pub first_failure_at: Option<DateTime<Utc>>,
    pub last_failure_at: Option<DateTime<Utc>>,
    pub families: BTreeSet<Family>,
    pub sample_event_id: Option<String>,
    pub sample_message: String,
}

/// Folds runs of digits to `#`, so that `account acc_1001 is missing` and
/// `account acc_1002 is missing` fall into one group.
pub fn fold_numbers(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_digits = false;
    for c in text.chars() {
        if c.is_ascii_digit() {
            if !in_digits {
                out.push('#');
            }
            in_digits = true;
        } else {
            in_digits = false;
            out.push(c);
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Groups dead letters; the biggest group first, then the most recent.
pub fn group(letters: &[DeadLetter], by: GroupBy) -> Vec<Group> {
    let mut groups: BTreeMap<(LetterClass, Option<String>), Group> = BTreeMap::new();
    for d in letters {
        let error = match by {
            GroupBy::Class => None,
            GroupBy::Error => Some(d.folded_error()),
        };
        let g = groups
            .entry((d.class.clone(), error.clone()))
            .or_insert_with(|| Group {
                class: d.class.clone(),
                error,
                count: 0,
                first_failure_at: None,
                last_failure_at: None,
                families: BTreeSet::new(),
                sample_event_id: d.event_id.clone(),
                sample_message: d.reason(),
            });
        g.count += 1;
        g.families.insert(d.family);
        if let Some(t) = d.first_failure_at {
            g.first_failure_at = Some(g.first_failure_at.map_or(t, |f| f.min(t)));
        }
        if let Some(t) = d.last_failure_at {
            g.last_failure_at = Some(g.last_failure_at.map_or(t, |l| l.max(t)));
        }
    }
    let mut out: Vec<Group> = groups.into_values().collect();
    out.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then(b.last_failure_at.cmp(&a.last_failure_at))
            .then(a.class.as_str().cmp(b.class.as_str()))
    });
    out
}

/// The headers a replayed message carries: the failure headers and the
/// broker's own death and delivery records removed, the replay count added.
pub fn replay_headers(old: Option<&FieldTable>) -> FieldTable {
    let mut strip: Vec<&str> = h::FAILURE_HEADERS.to_vec();
    // A replay routes by the envelope's type; a later failure writes the
    // routing key afresh.
    strip.push(h::ORIGINAL_ROUTING_KEY);
    // Where it was last parked says nothing about the replay.
    strip.push(h::PARKED_UNTIL);
    strip.extend([
        "x-death",
        "x-first-death-reason",
        "x-first-death-queue",
        "x-first-death-exchange",
        "x-last-death-reason",
        "x-last-death-queue",
        "x-last-death-exchange",
        "x-delivery-count",
    ]);
    let mut t = h::without(old, &strip);
    let previous = h::get_i64(old, h::REPLAY_COUNT).unwrap_or(0).max(0);
    h::set_i64(&mut t, h::REPLAY_COUNT, previous.saturating_add(1));
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{FieldArray, LongString};

    fn ls(s: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
    }

    fn worker_dead_letter(id: &str, class: &str, last: &str) -> (BasicProperties, Vec<u8>) {
        let mut t = FieldTable::default();
        h::set_str(&mut t, h::ERROR_CLASS, class);
        h::set_str(
            &mut t,
            h::ERROR_MESSAGE,
            "no HaloPSA item mapping for sku \"MS-365-BP\" (connection acme)",
        );
        h::set_i64(&mut t, h::HALO_STATUS, 403);
        h::set_str(&mut t, h::HALO_BODY, "You do not have permission");
        h::set_i64(&mut t, h::ATTEMPTS, 1);
        h::set_str(&mut t, h::FIRST_FAILURE, last);
        h::set_str(&mut t, h::LAST_FAILURE, last);
        h::set_str(&mut t, h::ORIGINAL_ROUTING_KEY, "subscription.created");
        h::set_str(&mut t, h::CONNECTION, "acme");
        h::set_str(&mut t, h::EVENT_ID, id);
        h::set_str(&mut t, h::FAMILY, "subscription");
        h::set_str(&mut t, h::WORKER, "halosync-subscription@host:1");
        let props = BasicProperties::default()
            .with_message_id(id.into())
            .with_type("subscription.created".into())
            .with_headers(t);
        let body = format!(
            r#"{{"id":"{id}","type":"subscription.created","connection":"acme","data":{{}}}}"#
        );
        (props, body.into_bytes())
    }

    /// A letter's class is read once into the enum and written back as the
    /// header spelt it (`--json`, the tables, the console).
    #[test]
    fn a_letters_class_reads_and_prints_as_its_header() {
        for c in ErrorClass::ALL {
            let l = LetterClass::read(Some(c.as_str().to_string()));
            assert_eq!(l, LetterClass::Filed(*c));
            assert_eq!(l.class(), Some(*c));
            assert_eq!(
                serde_json::to_string(&l).unwrap(),
                format!("\"{}\"", c.as_str())
            );
        }
        assert_eq!(LetterClass::read(None), LetterClass::Unknown);
        assert_eq!(LetterClass::read(None).to_string(), "unknown");
        let odd = LetterClass::read(Some("from-elsewhere".into()));
        assert_eq!(odd, LetterClass::Other("from-elsewhere".into()));
        assert_eq!(odd.class(), None);
        assert_eq!(serde_json::to_string(&odd).unwrap(), "\"from-elsewhere\"");
    }

    #[test]
    fn reads_a_worker_dead_letter() {
        let (p, b) = worker_dead_letter("evt_1", "unmapped", "2026-11-22T10:15:00.000Z");
        let d = DeadLetter::read(Family::Subscription, "q", 1, &p, &b);
        assert_eq!(d.event_id.as_deref(), Some("evt_1"));
        assert_eq!(d.class, "unmapped");
        assert_eq!(d.connection.as_deref(), Some("acme"));
        assert_eq!(d.halo_status, Some(403));
        assert_eq!(
            d.halo_message.as_deref(),
            Some("You do not have permission")
        );
        assert_eq!(
            d.original_routing_key.as_deref(),
            Some("subscription.created")
        );
        assert!(d
            .reason()
            .contains("HaloPSA 403: You do not have permission"));
        assert_eq!(
            d.last_failure_at.map(|t| t.to_rfc3339()),
            Some("2026-11-22T10:15:00+00:00".to_string())
        );
    }

    #[test]
    fn a_delivery_limit_death_is_poison() {
        let mut death = FieldTable::default();
        death.insert("reason".into(), ls("delivery_limit"));
        death.insert("queue".into(), ls("halosync.account"));
        death.insert("time".into(), AMQPValue::Timestamp(1_795_000_000));
        death.insert(
            "routing-keys".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![ls("halosync.account")])),
        );
        let mut t = FieldTable::default();
        t.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
        );
        t.insert("x-first-death-reason".into(), ls("delivery_limit"));
        let p = BasicProperties::default()
            .with_type("account.created".into())
            .with_message_id("evt_p".into())
            .with_headers(t);
        let d = DeadLetter::read(Family::Account, "q", 1, &p, b"{}");
        assert_eq!(d.class, "poison");
        assert!(d.last_failure_at.is_some());
        // Replay goes by the type, not the queue name the broker used.
        assert_eq!(d.original_routing_key.as_deref(), Some("account.created"));
        // Only the first-death header (RabbitMQ without x-death entries).
        let mut t = FieldTable::default();
        t.insert("x-first-death-reason".into(), ls("delivery_limit"));
        let p = BasicProperties::default().with_headers(t);
        assert_eq!(
            DeadLetter::read(Family::Account, "q", 1, &p, b"x").class,
            "poison"
        );
    }

    #[test]
    fn filters_by_class_connection_id_and_age() {
        let now = Utc::now();
        let recent = (now - chrono::Duration::minutes(5)).to_rfc3339();
        let old = (now - chrono::Duration::hours(5)).to_rfc3339();
        let (p1, b1) = worker_dead_letter("evt_1", "unmapped", &recent);
        let (p2, b2) = worker_dead_letter("evt_2", "rejected", &old);
        let d1 = DeadLetter::read(Family::Subscription, "q", 1, &p1, &b1);
        let d2 = DeadLetter::read(Family::Subscription, "q", 2, &p2, &b2);
        let args = FilterArgs {
            since: Some(parse_since("1h").unwrap()),
            ..Default::default()
        };
        let f = Filter::new(&args, now);
        assert!(f.matches(&d1, None) && !f.matches(&d2, None));
        let args = FilterArgs {
            class: vec![ErrorClass::Rejected],
            connection: vec!["acme".into()],
            event_id: vec!["evt_2".into()],
            ..Default::default()
        };
        let f = Filter::new(&args, now);
        assert!(!f.matches(&d1, None) && f.matches(&d2, None));
        assert_eq!(
            f.as_args(),
            "--class rejected --connection acme --event-id evt_2"
        );
        let args = FilterArgs {
            connection: vec!["other".into()],
            ..Default::default()
        };
        assert!(!Filter::new(&args, now).matches(&d1, None));
    }

    #[test]
    fn since_accepts_durations_and_times() {
        let now = Utc::now();
        let s = parse_since("1h30m").unwrap();
        assert_eq!(s.cutoff(now), now - chrono::Duration::minutes(90));
        assert!(
            matches!(parse_since("2d"), Ok(Since::Ago(d, _)) if d == chrono::Duration::days(2))
        );
        assert!(matches!(
            parse_since("2026-11-22T10:00:00Z"),
            Ok(Since::At(_))
        ));
        assert!(matches!(parse_since("2026-11-22"), Ok(Since::At(_))));
        for bad in ["", "1x", "h", "10", "yesterday"] {
            assert!(parse_since(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn groups_by_class_and_by_folded_error() {
        let now = Utc::now().to_rfc3339();
        let mut letters = Vec::new();
        for (i, class) in ["unmapped", "unmapped", "rejected"].iter().enumerate() {
            let (p, b) = worker_dead_letter(&format!("evt_{i}"), class, &now);
            letters.push(DeadLetter::read(Family::Subscription, "q", i + 1, &p, &b));
        }
        let g = group(&letters, GroupBy::Class);
        assert_eq!(g.len(), 2);
        assert_eq!((g[0].class.as_str(), g[0].count), ("unmapped", 2));
        assert_eq!(g[0].sample_event_id.as_deref(), Some("evt_0"));
        let g = group(&letters, GroupBy::Error);
        assert_eq!(g.len(), 2);
        assert_eq!(
            g[0].error.as_deref(),
            Some("no HaloPSA item mapping for sku \"MS-#-BP\" (connection acme)")
        );
    }

    #[test]
    fn replay_headers_strip_failures_and_count_replays() {
        let (p, _) = worker_dead_letter("evt_1", "unmapped", "2026-11-22T10:15:00Z");
        let mut old = p.headers().clone().unwrap_or_default();
        old.insert("x-delivery-count".into(), AMQPValue::LongLongInt(3));
        old.insert("traceparent".into(), ls("00-abc-def-01"));
        let t = replay_headers(Some(&old));
        for k in h::FAILURE_HEADERS {
            assert!(!t.contains_key(k), "{k} kept");
        }
        assert!(!t.contains_key("x-delivery-count"));
        assert_eq!(h::get_i64(Some(&t), h::REPLAY_COUNT), Some(1));
        assert_eq!(
            h::get_str(Some(&t), "traceparent").as_deref(),
            Some("00-abc-def-01")
        );
        assert_eq!(h::get_str(Some(&t), h::EVENT_ID).as_deref(), Some("evt_1"));
        let again = replay_headers(Some(&t));
        assert_eq!(h::get_i64(Some(&again), h::REPLAY_COUNT), Some(2));
    }
}
