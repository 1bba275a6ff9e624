//! Many MSPs in one deployment (issue #21): each connection has its own
//! lane in a worker, so one MSP's slow, throttled or failing HaloPSA holds
//! up only that MSP; a dependency wait ends when the dependency is written;
//! the first start on an empty Redis does not wait out `flush_grace`.
//!
//! No timed assertions: "the quiet MSP is not held up" is checked as an
//! ordering property (all of its events applied while the noisy MSP still
//! has a backlog that, at its HaloPSA's pace, takes several of its answers
//! to work off). The latencies themselves are `make bench tenants`.

use std::time::Duration;

use halo_sim::{Faults, SimConfig, SimHandle};
use halosync_shared::amqp::headers;
use halosync_shared::contract::Family;
use halosync_tests::{
    account_event, connection_toml, linked_customers, recurring_lines, subscription_event,
    usage_event, EnvOptions, TestEnv, CONNECTION, GENEROUS_BUDGET,
};
use lapin::types::FieldTable;
use serde_json::Value;

const T: Duration = Duration::from_secs(60);
/// `EnvOptions`' default `max_attempts`.
const MAX_ATTEMPTS: i64 = 4;
const QUIET: &str = "quiet";
const ITEM: i64 = 1001;
/// `worker.batch_max` of the two-MSP tests.
const BATCH: usize = 10;
const STORAGE_ITEM: i64 = 2001;

/// A test world with two connections: `acme` (the noisy MSP, on the env's
/// halo-sim, with `noisy_extra` in its table) and `quiet` (its own
/// halo-sim, a generous budget).
async fn two_msps(
    name: &str,
    noisy: Faults,
    noisy_extra: &str,
    worker_extra: &str,
) -> (TestEnv, SimHandle) {
    let quiet = SimHandle::start(SimConfig::default())
        .await
        .expect("the quiet MSP's halo-sim must start");
    let opts = EnvOptions {
        sim: SimConfig {
            faults: noisy,
            ..Default::default()
        },
        connection_extra: noisy_extra.to_string(),
        // Small batches, so that the noisy backlog (60) is more than the
        // prefetch window (32): the quiet events queue behind it.
        extra: format!(
            "{}[worker]\nbatch_max = {BATCH}\n{worker_extra}",
            connection_toml(QUIET, &quiet)
        ),
        ..Default::default()
    };
    (TestEnv::with(name, opts).await, quiet)
}

/// Headers only halosync may write, forged by the publisher: ignored on
/// the way in, and never made halosync's own by a park (which once
/// forwarded them to its delay queue, whence they came back trusted).
fn forged_attempts() -> FieldTable {
    let mut t = FieldTable::default();
    headers::set_i64(&mut t, headers::ATTEMPTS, FORGED_ATTEMPTS);
    t
}

const FORGED_ATTEMPTS: i64 = 1_000;

fn on(connection: &str, mut event: Value) -> Value {
    event["connection"] = connection.into();
    event
}

fn linked(sim: &SimHandle, account_id: &str) -> usize {
    linked_customers(sim, account_id)
}

fn applied(sim: &SimHandle, prefix: &str, n: usize) -> usize {
    (0..n)
        .filter(|i| linked(sim, &format!("{prefix}{i}")) > 0)
        .count()
}

/// Publishes `noisy` accounts on acme, then `quiet` accounts on the quiet
/// connection; returns when every quiet one is applied, asserting that the
/// noisy backlog is still there then.
async fn quiet_goes_past_the_noisy_backlog(
    env: &TestEnv,
    quiet: &SimHandle,
    noisy: usize,
    n: usize,
) {
    for i in 0..noisy {
        let acc = format!("noisy_{i}");
        env.publish_with_headers(
            &account_event(&format!("n{i}"), &acc, &format!("Noisy {i}"), true, 1),
            forged_attempts(),
        )
        .await;
    }
    // The noisy batch is in flight (and, with the lane stalled, its
    // backlog parked) before the quiet events arrive behind it.
    env.wait_for("the noisy MSP's first request", T, || {
        env.sim.counts().values().sum::<u64>() > 0
    })
    .await;
    for i in 0..n {
        let acc = format!("quiet_{i}");
        env.publish(&on(
            QUIET,
            account_event(&format!("q{i}"), &acc, &format!("Quiet {i}"), true, 1),
        ))
        .await;
    }
    env.wait_for("every quiet account applied", T, || {
        applied(quiet, "quiet_", n) == n
    })
    .await;
    // The quiet events were queued behind the noisy backlog, beyond the
    // prefetch window: they were reached while the noisy MSP had not
    // finished more than one batch (before #21: only after several).
    let noisy_done = applied(&env.sim, "noisy_", noisy);
    assert!(
        noisy_done <= BATCH,
        "the quiet MSP's {n} accounts were applied only after {noisy_done} of the noisy MSP's {noisy}: it was held up\n{}",
        halosync_tests::tail(&env.logs(), 40)
    );
}

async fn everything_applied_once(env: &TestEnv, quiet: &SimHandle, noisy: usize, n: usize) {
    env.wait_for(
        "every noisy account applied",
        Duration::from_secs(240),
        || applied(&env.sim, "noisy_", noisy) == noisy,
    )
    .await;
    env.wait_drained(Family::Account, T).await;
    for i in 0..noisy {
        assert_eq!(
            linked(&env.sim, &format!("noisy_{i}")),
            1,
            "noisy_{i} exactly once"
        );
    }
    for i in 0..n {
        assert_eq!(
            linked(quiet, &format!("quiet_{i}")),
            1,
            "quiet_{i} exactly once"
        );
    }
    env.assert_no_dead(Family::Account).await;
}

/// The noisy MSP's HaloPSA answers every request in 5 s: the quiet MSP's
/// accounts, queued behind the noisy backlog, are all applied before the
/// noisy MSP finished a second batch (each needs several 5 s answers); in
/// the end every account of both is in its HaloPSA exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_msp_does_not_hold_up_another() {
    let slow = Faults {
        latency_ms: 5_000,
        ..Default::default()
    };
    let (mut env, quiet) = two_msps("tenants-slow", slow, GENEROUS_BUDGET, "").await;
    env.spawn_worker("halosync-account");
    quiet_goes_past_the_noisy_backlog(&env, &quiet, 60, 10).await;
    env.sim.set_faults(Faults::default());
    everything_applied_once(&env, &quiet, 60, 10).await;
}

/// `worker.lanes_at_once = 1`: the slow MSP's lane takes the one turn,
/// and gives it up once it counts as stalled, so the quiet MSP's accounts
/// are still all applied before the slow one finished a batch.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_msp_does_not_keep_the_only_turn() {
    let slow = Faults {
        latency_ms: 5_000,
        ..Default::default()
    };
    let (mut env, quiet) = two_msps(
        "tenants-one-turn",
        slow,
        GENEROUS_BUDGET,
        "lanes_at_once = 1\n",
    )
    .await;
    env.spawn_worker("halosync-account");
    quiet_goes_past_the_noisy_backlog(&env, &quiet, 60, 10).await;
    env.sim.set_faults(Faults::default());
    everything_applied_once(&env, &quiet, 60, 10).await;
}

/// The noisy MSP's budget is spent (2 requests per 10 s): its lane waits
/// for the budget and parks its backlog without using attempts; the quiet
/// MSP's accounts are all applied meanwhile; in the end every account of
/// both is applied exactly once and nothing was dead-lettered.
#[tokio::test(flavor = "multi_thread")]
async fn a_throttled_msp_does_not_hold_up_another() {
    let (mut env, quiet) = two_msps(
        "tenants-budget",
        Faults::default(),
        "requests_per_window = 2\nwindow_seconds = 10",
        "rate_margin = \"0s\"\n",
    )
    .await;
    env.spawn_worker("halosync-account");
    quiet_goes_past_the_noisy_backlog(&env, &quiet, 60, 10).await;
    everything_applied_once(&env, &quiet, 60, 10).await;
}

/// The noisy MSP's HaloPSA answers 500 to everything for longer than the
/// retry horizon: the quiet MSP is unaffected; the noisy events end in the
/// dead queue (as `exhausted`, one replay away, as for one MSP), and after
/// HaloPSA is back and the dead letters are replayed, each is applied once.
#[tokio::test(flavor = "multi_thread")]
async fn an_msp_down_past_the_retry_horizon_loses_nothing_and_holds_up_nobody() {
    let down = Faults {
        error_rate: 1.0,
        ..Default::default()
    };
    let (mut env, quiet) = two_msps("tenants-down", down, GENEROUS_BUDGET, "").await;
    env.spawn_worker("halosync-account");
    let (noisy, n) = (20, 10);
    quiet_goes_past_the_noisy_backlog(&env, &quiet, noisy, n).await;
    let deadline = std::time::Instant::now() + T;
    while env.dead_count(Family::Account).await as usize != noisy {
        assert!(
            std::time::Instant::now() < deadline,
            "the noisy events were not dead-lettered\n{}",
            halosync_tests::tail(&env.logs(), 40)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(applied(&env.sim, "noisy_", noisy), 0);
    // Each went through every attempt, parked or not: the publisher's
    // forged attempt count counted for none of them.
    let (ok, out) = env.run_halosync(&["dlq", "list", "--family", "account", "--json"]);
    assert!(ok, "dlq list: {out}");
    let letters: Value = serde_json::from_str(&out).expect("dlq list --json is JSON");
    let attempts: Vec<i64> = letters
        .as_array()
        .expect("an array")
        .iter()
        .map(|d| d["attempts"].as_i64().unwrap_or(-1))
        .collect();
    assert_eq!(attempts, vec![MAX_ATTEMPTS; noisy], "{out}");
    assert!(
        env.logs().contains("connection stalled"),
        "the noisy lane never stalled, so nothing was parked"
    );
    env.sim.set_faults(Faults::default());
    let (ok, out) = env.run_halosync(&["dlq", "replay", "--family", "account"]);
    assert!(ok, "replay: {out}");
    everything_applied_once(&env, &quiet, noisy, n).await;
}

/// A usage event published before its subscription goes on when the
/// subscription is written, not after a long delay tier. The tiers here are
/// 200 ms and 10 minutes, and the usage event has used several attempts on
/// its missing dependencies before the subscription is published: it is
/// applied within the test's minute only if a dependency wait stays in the
/// first tier (before #21 it moved to the 10 minute tier).
#[tokio::test(flavor = "multi_thread")]
async fn a_usage_event_before_its_subscription_goes_on_once_the_subscription_is_written() {
    let opts = EnvOptions {
        connection_extra: format!(
            "{GENEROUS_BUDGET}\n[connections.{CONNECTION}.items]\n\"MS-365-BP\" = {ITEM}\n\"MS-365-BP:storage_gb\" = {STORAGE_ITEM}\n"
        ),
        retry_delays_ms: vec![200, 600_000],
        dependency_max_attempts: 100,
        dependency_recheck: Duration::from_millis(300),
        ..Default::default()
    };
    let mut env = TestEnv::with("tenants-wake", opts).await;
    env.sim.insert_item(ITEM, "Microsoft 365 Business Premium");
    env.sim.insert_item(STORAGE_ITEM, "Storage");
    env.spawn_worker("halosync-account");
    env.spawn_worker("halosync-usage");
    env.publish(&account_event("a1", "acc_1", "Customer 1", true, 1))
        .await;
    env.wait_for("the customer", T, || linked(&env.sim, "acc_1") == 1)
        .await;
    env.publish(&usage_event(
        "u1",
        "sub_1",
        "acc_1",
        "storage_gb",
        ("2026-11-01", "2026-11-30"),
        42.0,
        1,
    ))
    .await;
    // Let the usage event ask for its missing invoice and subscription more
    // than once (each ask uses an attempt, every 300 ms at most).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let asked_before = env.sim.counts().values().sum::<u64>();
    tokio::time::sleep(Duration::from_secs(1)).await;
    env.spawn_worker("halosync-subscription");
    env.publish(&subscription_event("s1", "sub_1", "acc_1", 5, "active", 1))
        .await;
    let usage_line = |env: &TestEnv| {
        recurring_lines(&env.sim)
            .into_iter()
            .any(|l| l["item_internal_reference"] == "halosync.usage:sub_1:storage_gb")
    };
    env.wait_for("the usage line", T, || usage_line(&env)).await;
    env.assert_no_dead(Family::Usage).await;
    assert!(asked_before > 0);
}

/// A worker started on a Redis this deployment never used, with
/// `flush_grace` at 10 minutes, applies its first event within the test's
/// minute: no other worker can hold a lock of a lost Redis, so it does not
/// wait out the grace (before #21 it waited the full 10 minutes).
#[tokio::test(flavor = "multi_thread")]
async fn the_first_start_on_an_empty_redis_does_not_wait_out_flush_grace() {
    let opts = EnvOptions {
        extra: "[worker]\nflush_grace = \"10m\"\n".into(),
        ..Default::default()
    };
    let mut env = TestEnv::with("tenants-first", opts).await;
    assert!(env.redis_keys().await.is_empty(), "a fresh prefix");
    env.spawn_worker("halosync-account");
    env.publish(&account_event("a1", "acc_1", "Customer 1", true, 1))
        .await;
    env.wait_for("the first account", T, || linked(&env.sim, "acc_1") == 1)
        .await;
    assert!(
        env.logs().contains("first start on this Redis"),
        "{}",
        halosync_tests::tail(&env.logs(), 20)
    );
}

/// 1,000 connections in one config, secrets from files (as a Kubernetes
/// Secret mounts them): the worker starts and, idle, sends no request and
/// fetches no token; an event on the last connection is applied (its token
/// fetched then, once), seven connections taking turns two at a time
/// (`worker.lanes_at_once = 2`); `/metrics` keeps `connection` labels bounded
/// (`worker.metrics_connections = 5`: at most 5 names plus `other`).
#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_connections_cost_nothing_until_used_and_keep_metrics_bounded() {
    let many = SimHandle::start(SimConfig::default())
        .await
        .expect("halo-sim must start");
    let port = halosync_tests::free_port();
    // Two lanes at once: the seven connections below take turns.
    let mut extra =
        format!("[worker]\nhealth_port = {port}\nmetrics_connections = 5\nlanes_at_once = 2\n");
    let (connections, secrets) =
        halosync_tests::connections_with_secret_files(&many, 1000, GENEROUS_BUDGET);
    extra.push_str(&connections);
    let opts = EnvOptions {
        extra,
        ..Default::default()
    };
    let mut env = TestEnv::with("tenants-many", opts).await;
    let w = env.spawn_worker("halosync-account");
    let log = env.worker(w).log.clone();
    env.wait_for("the worker consuming", T, || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("\"consuming\""))
    })
    .await;
    assert_eq!(many.token_requests(), 0, "no token fetched at start");
    assert_eq!(
        many.counts().values().sum::<u64>(),
        0,
        "no request at start"
    );
    for i in [999, 3, 500, 7, 1, 2, 4] {
        env.publish(&on(
            &format!("msp{i}"),
            account_event(&format!("m{i}"), &format!("acc_{i}"), "Many", true, 1),
        ))
        .await;
    }
    env.wait_for("the accounts", T, || {
        [999, 3, 500, 7, 1, 2, 4]
            .iter()
            .all(|i| linked(&many, &format!("acc_{i}")) == 1)
    })
    .await;
    assert_eq!(many.token_requests(), 7, "one token per connection used");
    let (status, metrics) = halosync_tests::http_get(port, "/metrics")
        .await
        .expect("/metrics answers");
    assert_eq!(status, 200);
    let mut labels: Vec<&str> = metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split("connection=\"").nth(1))
        .filter_map(|rest| rest.split('"').next())
        .collect();
    labels.sort();
    labels.dedup();
    assert!(
        labels.len() <= 6 && labels.contains(&"other"),
        "bounded connection labels: {labels:?}"
    );
    let _ = std::fs::remove_dir_all(&secrets);
}
