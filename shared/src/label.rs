//! Closed sets of labels that cross module and process boundaries
//! (activity records, metrics label values, AMQP headers, CLI arguments,
//! console filters): each is one enum whose labels are spelt once, in its
//! [`labelled!`] declaration, which derives `as_str`, `FromStr`, `Display`
//! and serde from that one spelling.
//!
//! | enum | what it labels |
//! |---|---|
//! | [`crate::error::FailureClass`] | how an attempt failed (DESIGN §3) |
//! | [`crate::error::ErrorClass`] | what a retry or dead-letter copy is filed under (`x-halosync-error-class`) |
//! | [`crate::outcome::Settled`] | how a message was settled (activity, `halosync_messages_total`) |
//! | [`crate::reload::Reloaded`] | how a config reload ended (`halosync_config_reloads_total`) |
//! | [`crate::matching::Why`] | why an existing customer is a candidate for an account (the cut-over plan) |
//!
//! Other crates declare theirs with `halosync_shared::labelled!` (the
//! operator's tool: what happened to a dead letter, `dlq::Handled`; how an
//! audited console action went, `console::audit::AuditOutcome`).

use std::fmt;

/// A text that is none of an enum's labels. Its message lists the valid
/// ones, so a console filter or a CLI argument says what to type.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {got:?}: use one of {}", valid.join(", "))]
pub struct UnknownLabel {
    /// What the label names (`outcome`, `class`, ...).
    pub what: &'static str,
    pub got: String,
    pub valid: &'static [&'static str],
}

/// Declares a `Copy` enum whose every variant has one label, and derives
/// from it `ALL`, `LABELS`, `as_str`, `FromStr` (an [`UnknownLabel`] for
/// anything else), `Display`, and serde as the label.
#[macro_export]
macro_rules! labelled {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident ($what:literal) {
            $( $(#[$vmeta:meta])* $variant:ident = $label:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            /// Every label, in declaration order.
            pub const LABELS: &'static [&'static str] = &[$($label),+];

            /// The label: the one spelling of this value everywhere.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $label,)+
                }
            }
        }

        impl std::str::FromStr for $name {
            type Err = $crate::label::UnknownLabel;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($label => Ok($name::$variant),)+
                    _ => Err($crate::label::UnknownLabel {
                        what: $what,
                        got: s.to_string(),
                        valid: Self::LABELS,
                    }),
                }
            }
        }

        $crate::label::written_as_label!($name);

        impl<'de> $crate::label::__serde::Deserialize<'de> for $name {
            fn deserialize<D: $crate::label::__serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_str($crate::label::LabelVisitor::<$name>::new())
            }
        }
    };
}

/// `Display` and `Serialize` of a type as its `as_str()`: what every
/// label is written as (a [`labelled!`] enum, or a type wrapping one).
#[macro_export]
macro_rules! written_as_label {
    ($name:ty) => {
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl $crate::label::__serde::Serialize for $name {
            fn serialize<S: $crate::label::__serde::Serializer>(
                &self,
                s: S,
            ) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
    };
}

pub use crate::labelled;
pub use crate::written_as_label;
/// serde, for [`labelled!`] in crates that do not name it themselves.
#[doc(hidden)]
pub use serde as __serde;

/// Reads a label for serde (borrowed or owned text alike).
#[doc(hidden)]
pub struct LabelVisitor<T>(std::marker::PhantomData<T>);

impl<T> LabelVisitor<T> {
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        LabelVisitor(std::marker::PhantomData)
    }
}

impl<T> serde::de::Visitor<'_> for LabelVisitor<T>
where
    T: std::str::FromStr<Err = UnknownLabel>,
{
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a label")
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
        v.parse().map_err(E::custom)
    }
}

#[cfg(test)]
mod tests {
    use crate::error::{ErrorClass, FailureClass};
    use crate::outcome::Settled;
    use crate::reload::Reloaded;

    /// Every label reads back as its value, in text and in JSON, and the
    /// labels of one enum are distinct.
    fn round_trips<T>(all: &[T], labels: &[&str])
    where
        T: Copy
            + PartialEq
            + std::fmt::Debug
            + std::fmt::Display
            + std::str::FromStr<Err = super::UnknownLabel>
            + serde::Serialize
            + serde::de::DeserializeOwned,
    {
        assert_eq!(all.len(), labels.len());
        let mut seen = std::collections::BTreeSet::new();
        for (v, l) in all.iter().zip(labels) {
            assert!(seen.insert(*l), "{l} twice");
            assert_eq!(v.to_string(), *l);
            assert_eq!(l.parse::<T>(), Ok(*v));
            let json = serde_json::to_string(v).expect("json");
            assert_eq!(json, format!("\"{l}\""));
            assert_eq!(serde_json::from_str::<T>(&json).expect("read"), *v);
        }
        let err = "nope".parse::<T>().expect_err("unknown");
        for l in labels {
            assert!(err.to_string().contains(l), "{err}");
        }
        assert!(serde_json::from_str::<T>("\"nope\"").is_err());
    }

    #[test]
    fn every_label_round_trips_and_unknown_ones_list_the_valid() {
        round_trips(FailureClass::ALL, FailureClass::LABELS);
        round_trips(ErrorClass::ALL, ErrorClass::LABELS);
        round_trips(Settled::ALL, Settled::LABELS);
        round_trips(Reloaded::ALL, Reloaded::LABELS);
    }

    /// The wire format (DESIGN §3, the activity stream, the metrics):
    /// these exact spellings are what operators, alerts and dashboards read.
    #[test]
    fn the_labels_are_the_wire_format() {
        assert_eq!(
            FailureClass::LABELS,
            ["transient", "dependency", "invalid", "unmapped", "rejected"]
        );
        assert_eq!(
            ErrorClass::LABELS,
            [
                "transient",
                "dependency",
                "invalid",
                "unmapped",
                "rejected",
                "exhausted",
                "poison"
            ]
        );
        assert_eq!(
            Settled::LABELS,
            [
                "applied",
                "superseded",
                "duplicate",
                "retried",
                "dead-lettered",
                "requeued"
            ]
        );
        assert_eq!(Reloaded::LABELS, ["applied", "refused"]);
        let err = "done".parse::<Settled>().expect_err("unknown");
        assert_eq!(
            err.to_string(),
            "unknown outcome \"done\": use one of applied, superseded, duplicate, retried, dead-lettered, requeued"
        );
    }
}
