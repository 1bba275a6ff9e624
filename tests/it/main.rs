//! halosync's integration tests: one binary, one module per area, one
//! shared harness (`halosync_tests`, `tests/src/lib.rs`).
//!
//! They run against the real RabbitMQ (127.0.0.1:5672) and Redis
//! (127.0.0.1:6379), with halo-sim in process and the workspace's binaries
//! as child processes, and fail loudly, never skip, when a service is
//! missing. Each test isolates itself (its own queue, exchange and Redis
//! key prefix), so they run in parallel (`deploy/local/test-parallel.sh`);
//! none stops or restarts a shared service: `outages::*` brings its own
//! RabbitMQ node (`PrivateRabbit`).
//!
//! One area: `cargo test -p halosync-tests --test it -- account::`

mod account;
mod activity;
mod batching;
mod cli;
mod console;
mod faults;
mod mappings;
mod monitoring;
mod outages;
mod overage;
mod reconcile;
mod reload;
mod repair;
mod subscription;
mod tenants;
mod tls;
mod tracing;
mod usage;
