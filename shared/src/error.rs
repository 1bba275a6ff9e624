//! Failure classes (DESIGN §3) and the one value every error is turned into
//! before the runtime decides what happens to a message.
//!
//! Each module has its own `thiserror` enum (`ConfigError`, `HaloError`,
//! `StateError`, `ContractError`, ...). They all convert into [`Failure`],
//! which carries the [`FailureClass`] and what a dead letter must tell the
//! operator. No variant ever holds a secret or a token.

use std::fmt;
use std::time::Duration;

use crate::label::labelled;

labelled! {
    /// What happens to a message that could not be applied (DESIGN §3).
    pub enum FailureClass ("failure class") {
        /// Network, timeout, 5xx, 429, Redis or broker hiccup: retried with
        /// growing delays, then dead-lettered as `exhausted`.
        Transient = "transient",
        /// Something this event needs is not in HaloPSA yet: retried like
        /// transient over a longer horizon, then dead-lettered as `dependency`.
        Dependency = "dependency",
        /// Not JSON, not valid against the schema, unknown type or connection,
        /// oversized: dead-lettered at once.
        Invalid = "invalid",
        /// No HaloPSA item mapping, ambiguous customer match: dead-lettered at
        /// once, replayed after the mapping is added.
        Unmapped = "unmapped",
        /// HaloPSA 400 validation error or 403 permission error: dead-lettered at
        /// once with HaloPSA's message.
        Rejected = "rejected",
    }
}

impl FailureClass {
    /// Whether a failure of this class goes through the retry tiers.
    pub fn is_retried(self) -> bool {
        matches!(self, FailureClass::Transient | FailureClass::Dependency)
    }
}

labelled! {
    /// The class a retry or dead-letter copy is filed under
    /// (`x-halosync-error-class`), which the activity log, the
    /// `halosync_dead_letters_total` metric, `halosync dlq --class` and the
    /// console's filters name. A retry copy carries its failure's class
    /// (`From<FailureClass>`); a dead letter too, except that a transient
    /// failure that ran out of attempts is filed as `exhausted`, and the
    /// broker's own delivery-limit dead letters are read back as `poison` by
    /// the operator's tool.
    pub enum ErrorClass ("class") {
        Transient = "transient",
        Dependency = "dependency",
        Invalid = "invalid",
        Unmapped = "unmapped",
        Rejected = "rejected",
        /// A transient failure past `retry.max_attempts`.
        Exhausted = "exhausted",
        /// The quorum queue's delivery limit (never a worker's).
        Poison = "poison",
    }
}

impl From<FailureClass> for ErrorClass {
    fn from(c: FailureClass) -> ErrorClass {
        match c {
            FailureClass::Transient => ErrorClass::Transient,
            FailureClass::Dependency => ErrorClass::Dependency,
            FailureClass::Invalid => ErrorClass::Invalid,
            FailureClass::Unmapped => ErrorClass::Unmapped,
            FailureClass::Rejected => ErrorClass::Rejected,
        }
    }
}

/// Every class a worker files a dead letter under (`poison` is the
/// broker's, never a worker's; `transient` is exhausted first): the `class`
/// label values of `halosync_dead_letters_total`.
pub const DEAD_LETTER_CLASSES: [ErrorClass; 5] = [
    ErrorClass::Invalid,
    ErrorClass::Unmapped,
    ErrorClass::Rejected,
    ErrorClass::Exhausted,
    ErrorClass::Dependency,
];

/// One failed attempt at a message, ready to be retried or dead-lettered.
#[derive(Clone, Debug, PartialEq)]
pub struct Failure {
    pub class: FailureClass,
    /// Human-readable reason; for HaloPSA errors it includes HaloPSA's text.
    pub message: String,
    /// HaloPSA's HTTP status, when the failure came from HaloPSA.
    pub halo_status: Option<u16>,
    /// An excerpt of HaloPSA's response body (never a token).
    pub halo_body: Option<String>,
    /// A lower bound on the next attempt's delay (429 `Retry-After`).
    pub retry_after: Option<Duration>,
    /// Our own shared rate budget had no room: the message waits in a delay
    /// queue without using up one of its attempts.
    pub throttled: bool,
}

impl Failure {
    pub fn new(class: FailureClass, message: impl Into<String>) -> Self {
        Failure {
            class,
            message: message.into(),
            halo_status: None,
            halo_body: None,
            retry_after: None,
            throttled: false,
        }
    }
    pub fn transient(message: impl Into<String>) -> Self {
        Self::new(FailureClass::Transient, message)
    }
    pub fn dependency(message: impl Into<String>) -> Self {
        Self::new(FailureClass::Dependency, message)
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(FailureClass::Invalid, message)
    }
    pub fn unmapped(message: impl Into<String>) -> Self {
        Self::new(FailureClass::Unmapped, message)
    }
    pub fn rejected(message: impl Into<String>) -> Self {
        Self::new(FailureClass::Rejected, message)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.class, self.message)?;
        if let Some(status) = self.halo_status {
            write!(f, " (HaloPSA HTTP {status})")?;
        }
        Ok(())
    }
}

impl std::error::Error for Failure {}

/// Cuts `text` to at most `max` bytes on a char boundary, marking the cut.
pub fn excerpt(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpt_cuts_on_char_boundary() {
        assert_eq!(excerpt("héllo", 2), "h…");
        assert_eq!(excerpt("hello", 10), "hello");
        assert_eq!(excerpt("hello", 3), "hel…");
    }

    #[test]
    fn only_transient_and_dependency_are_retried() {
        assert!(FailureClass::Transient.is_retried());
        assert!(FailureClass::Dependency.is_retried());
        assert!(!FailureClass::Invalid.is_retried());
        assert!(!FailureClass::Unmapped.is_retried());
        assert!(!FailureClass::Rejected.is_retried());
    }
}
