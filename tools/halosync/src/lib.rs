//! The operator's tool (DESIGN §7) as a library: every operation the
//! `halosync` command runs and the console calls, one code path for both.
//! `main.rs` only parses the command line and calls these; nothing here
//! imports from it, and the operations never import the [`console`].
//!
//! | command | what it does | module |
//! |---|---|---|
//! | `publish` | validate JSON events against `schemas/`, publish them with confirms | [`publish`] |
//! | `dlq list / show / replay / purge` | dead letters, grouped, replayed, purged | [`dlq`], [`dead`] |
//! | `check` | HaloPSA connection test: token, then each permission the workers need; the TLS handshake and login of RabbitMQ, Redis and HaloPSA | [`check`] |
//! | `topology` | declare every exchange and queue (idempotent) | [`status`] |
//! | `status` | queue depths, consumers, retry tiers, dead letters, unrouted | [`status`] |
//! | `console` | the operator's web console (sign-in, roles, audit) | [`console`] |
//! | `activity` | every settled message of the last 30 days, searched and paged | [`activity`] |
//! | `mappings list / set / unmapped`, `items` | item mappings stored in HaloPSA; HaloPSA's items | [`mappings`] |
//! | `reconcile` | compare HaloPSA with a snapshot of the billing platform; `--repair` republishes the drifted | [`reconcile`] |
//!
//! Exit codes: 0 success, 1 the command ran and something failed (an
//! invalid event, a nacked publish, a failed check, a refused purge), 2 a
//! bad command line (clap). `reconcile` follows DESIGN §8: 0 in step, 1
//! drift found, 2 it could not run (bad snapshot, unreachable service).
pub mod activity;
pub mod broker;
pub mod check;
pub mod console;
pub mod dead;
pub mod dlq;
pub mod mappings;
pub mod publish;
pub mod reconcile;
pub mod settings;
pub mod status;
pub mod table;
