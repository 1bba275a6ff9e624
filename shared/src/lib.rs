//! The library every halosync binary uses.
//!
//! | module | what it holds |
//! |---|---|
//! | [`activity`] | the activity log: recorder (workers) and reader (console, CLI) |
//! | [`contract`] | the event envelope, families, versions, schema validation |
//! | [`config`] | the TOML configuration and its checks |
//! | [`error`] | failure classes (DESIGN §3) |
//! | [`engine`] | the write engines: records with an identity ([`engine::identity`]) and invoice lines ([`engine::lines`]) |
//! | [`label`] | the labelled enums: one spelling per failure class and outcome |
//! | [`outcome`] | how a message was settled |
//! | [`amqp`] | RabbitMQ topology, headers, the confirmed publisher |
//! | [`runtime`] | the consume loop: validate, dedupe, lock, apply, settle |
//! | [`halo`] | the HaloPSA client: tokens, rate budget, requests, links |
//! | [`store`] | Redis: ledger, id map, versions, locks |
//! | [`telemetry`] | JSON logs and OTLP traces |
//! | [`health`] | `/metrics`, `/healthz`, `/readyz` |
//! | [`outage`] | dependencies down: waiting, readiness, one log line a minute |
//! | [`reload`] | re-reading the config file on SIGHUP or when it changes |
//! | [`boot`] | a worker binary's `main` |
//! | [`tls`] | TLS and credentials for Redis and RabbitMQ, handshake probes |

pub mod activity;
pub mod amqp;
pub mod boot;
pub mod config;
pub mod contract;
pub mod engine;
pub mod error;
pub mod halo;
pub mod health;
pub mod label;
pub mod matching;
pub mod outage;
pub mod outcome;
pub mod reload;
pub mod runtime;
pub mod store;
pub mod telemetry;
pub mod tls;

pub use config::Config;
pub use contract::{Contract, Envelope, Event, Family, Version};
pub use error::{ErrorClass, Failure, FailureClass};
pub use outcome::Settled;
pub use runtime::{Handler, Outcome, Services};
