//! `make bench`: throughput and memory of the workers on this machine,
//! against the real RabbitMQ and Redis and an in-process halo-sim with no
//! latency. Prints one table. Not part of `make test`: figures are
//! measured, never asserted.
//!
//! `halosync-bench [--events N] [SCENARIO...]`, scenarios: `raw`,
//! `account-create`, `account-update`, `scale`, `usage` (default: all),
//! and `onboard` (not in the default set: it runs at a HaloPSA budget, so
//! it takes minutes; `--customers N` (default 50) and `--budget R/S`
//! (default 20/2: R requests per rolling S seconds) size it).
//! `trickle` (not in the default set either): the steady state, one event
//! every `--gap S` seconds (default 3) per family and case, each settled
//! before the next, counting HaloPSA requests per event.
//! `subscription` (not in the default set): events per second through one
//! subscription worker, `--subscriptions N` (default 200) created, then
//! updated `--rounds R` times (default 5).
//! `tenants` (not in the default set): two MSPs on one account worker;
//! the quiet one publishes an account every 0.5 s and its publish-to-applied
//! p50/p95 is measured while the noisy one (3,000 accounts queued) is idle,
//! slow (5 s answers), throttled (10 requests per 10 s) or down (500s);
//! then one worker with 1,000 connections (secrets from files): start-up,
//! requests while idle, one event per connection, peak RSS.
//! `--no-activity` runs the workers with `worker.activity = false`, to
//! measure what recording the activity log costs (compare with and without).

use std::path::Path;
use std::time::{Duration, Instant};

use futures::future::join_all;
use futures::StreamExt;
use halo_sim::{Faults, SimConfig};
use halosync_shared::amqp::publisher::event_properties;
use halosync_shared::contract::Family;
use halosync_tests::{
    account_event, connection_toml, customers_of, items_toml, linked_customers, recurring_lines,
    subscription_event, EnvOptions, TestEnv, AMQP_URL, CONNECTION, GENEROUS_BUDGET,
};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use serde_json::Value;

/// `--no-activity`: workers do not record the activity log.
static ACTIVITY_OFF: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The config lines that turn the activity log off, when asked to.
/// One `[worker]` table: `activity = false` under `--no-activity`, the
/// `BENCH_LANE_STALL` and `BENCH_LANES_AT_ONCE` overrides, then `lines`.
fn worker_table(lines: &str) -> String {
    let mut t = String::new();
    if ACTIVITY_OFF.load(std::sync::atomic::Ordering::SeqCst) {
        t.push_str("activity = false\n");
    }
    if let Ok(d) = std::env::var("BENCH_LANE_STALL") {
        t.push_str(&format!("lane_stall = \"{d}\"\n"));
    }
    if let Ok(n) = std::env::var("BENCH_LANES_AT_ONCE") {
        t.push_str(&format!("lanes_at_once = {n}\n"));
    }
    t.push_str(lines);
    if t.is_empty() {
        t
    } else {
        format!("[worker]\n{t}")
    }
}

fn activity_extra() -> String {
    if ACTIVITY_OFF.load(std::sync::atomic::Ordering::SeqCst) {
        "[worker]\nactivity = false\n".into()
    } else {
        String::new()
    }
}

/// A bench world's options: the connection's budget `budget` and its
/// `items` mapping, the activity log as asked.
fn bench_options(budget: &str, items: &[(&str, i64)]) -> EnvOptions {
    EnvOptions {
        connection_extra: items_toml(budget, items),
        extra: activity_extra(),
        ..Default::default()
    }
}

struct Row {
    scenario: String,
    events: usize,
    seconds: f64,
    requests: Option<u64>,
    peak_rss_kib: Option<u64>,
    note: String,
}

impl Row {
    fn rate(&self) -> f64 {
        self.events as f64 / self.seconds
    }
}

#[tokio::main]
async fn main() {
    let mut events = 5000usize;
    let mut customers = 50usize;
    let mut budget = (20u32, 2u64);
    let mut gap = Duration::from_secs(3);
    let mut subscriptions = 200usize;
    let mut rounds = 5u64;
    let mut scenarios = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--events" => {
                events = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| usage("--events needs a number, e.g. --events 5000"))
            }
            "--customers" => {
                customers = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|n| *n > 0)
                    .unwrap_or_else(|| usage("--customers needs a number above 0, e.g. --customers 500"))
            }
            "--budget" => {
                budget = args
                    .next()
                    .and_then(|b| {
                        let (r, s) = b.split_once('/')?;
                        Some((r.parse().ok()?, s.trim_end_matches('s').parse().ok()?))
                    })
                    .filter(|(r, s)| *r > 0 && *s > 0)
                    .unwrap_or_else(|| {
                        usage("--budget needs REQUESTS/SECONDS, e.g. --budget 20/2 (20 requests per rolling 2 s)")
                    })
            }
            "--gap" => {
                gap = args
                    .next()
                    .and_then(|n| n.trim_end_matches('s').parse::<f64>().ok())
                    .filter(|n| *n >= 0.0)
                    .map(Duration::from_secs_f64)
                    .unwrap_or_else(|| usage("--gap needs seconds, e.g. --gap 3"))
            }
            "--subscriptions" => {
                subscriptions = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|n| *n > 0)
                    .unwrap_or_else(|| usage("--subscriptions needs a number above 0, e.g. --subscriptions 200"))
            }
            "--rounds" => {
                rounds = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|n| *n > 0)
                    .unwrap_or_else(|| usage("--rounds needs a number above 0, e.g. --rounds 5"))
            }
            "--no-activity" => ACTIVITY_OFF.store(true, std::sync::atomic::Ordering::SeqCst),
            "-h" | "--help" => usage(""),
            s if ["raw", "account-create", "account-update", "scale", "usage", "onboard", "trickle", "subscription", "tenants"]
                .contains(&s) =>
            {
                scenarios.push(s.to_string())
            }
            other => usage(&format!("unknown scenario {other:?}")),
        }
    }
    if scenarios.is_empty() {
        scenarios = vec![
            "raw".into(),
            "account-create".into(),
            "account-update".into(),
            "scale".into(),
            "usage".into(),
        ];
    }
    let mut rows = Vec::new();
    for s in &scenarios {
        eprintln!("running {s} with {events} events...");
        match s.as_str() {
            "raw" => rows.push(raw(events).await),
            "account-create" => rows.push(account(events, false).await),
            "account-update" => rows.push(account(events, true).await),
            "usage" => rows.extend(usage_bench(events).await),
            "onboard" => rows.push(onboard(customers, budget).await),
            "trickle" => rows.extend(trickle(gap).await),
            "subscription" => rows.extend(subscription_bench(subscriptions, rounds).await),
            "tenants" => rows.extend(tenants_bench().await),
            _ => {
                for workers in [1, 2, 4] {
                    rows.push(scale(events.min(2000), workers).await);
                }
            }
        }
    }
    let raw_rate = rows.iter().find(|r| r.scenario == "raw").map(Row::rate);
    println!();
    println!(
        "| scenario | events | seconds | events/s | vs raw broker | HaloPSA requests/event | worker peak RSS | note |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---|");
    for r in &rows {
        let vs = match (raw_rate, r.scenario.as_str()) {
            (Some(raw), s) if s != "raw" => format!("{:.2}", r.rate() / raw),
            _ => "-".into(),
        };
        let req = r
            .requests
            .map(|q| format!("{:.2}", q as f64 / r.events as f64))
            .unwrap_or_else(|| "-".into());
        let rss = r
            .peak_rss_kib
            .map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
            .unwrap_or_else(|| "-".into());
        println!(
            "| {} | {} | {:.2} | {:.0} | {} | {} | {} | {} |",
            r.scenario,
            r.events,
            r.seconds,
            r.rate(),
            vs,
            req,
            rss,
            r.note
        );
    }
}

fn usage(problem: &str) -> ! {
    if !problem.is_empty() {
        eprintln!("halosync-bench: {problem}");
    }
    eprintln!("usage: halosync-bench [--events N] [--customers N] [--budget R/S] [--gap S] [--subscriptions N] [--rounds R] [--no-activity] [raw] [account-create] [account-update] [scale] [usage] [onboard] [trickle] [subscription] [tenants]");
    std::process::exit(if problem.is_empty() { 0 } else { 2 })
}

/// (a) A minimal lapin consumer acking each message of a quorum queue,
/// with the workers' prefetch (32): the broker's ceiling on this machine.
async fn raw(n: usize) -> Row {
    let conn = halosync_shared::amqp::connect_with(AMQP_URL, &Default::default(), "bench-raw")
        .await
        .expect("RabbitMQ must be running");
    let ch = conn.create_channel().await.expect("channel");
    let queue = format!("bench-raw-{}", uuid::Uuid::new_v4().simple());
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from(b"quorum".to_vec())),
    );
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .expect("declare");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let body = serde_json::to_vec(&account_event("e", "acc", "Bench", true, 1)).expect("json");
    publish_pipelined(&ch, "", &queue, (0..n).map(|_| body.clone()).collect()).await;
    let consumer_ch = conn.create_channel().await.expect("channel");
    consumer_ch
        .basic_qos(32, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = consumer_ch
        .basic_consume(
            queue.as_str().into(),
            "bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let started = Instant::now();
    let mut got = 0;
    while got < n {
        match consumer.next().await {
            Some(Ok(d)) => {
                d.acker.ack(BasicAckOptions::default()).await.expect("ack");
                got += 1;
            }
            other => panic!("consumer ended: {other:?}"),
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = conn.close(200, "bye".into()).await;
    Row {
        scenario: "raw".into(),
        events: n,
        seconds,
        requests: None,
        peak_rss_kib: None,
        note: "lapin consumer, quorum queue, prefetch 32, ack each".into(),
    }
}

/// (b) account events through one `halosync-account` against halo-sim
/// with no latency: the queue is filled first, then the worker drains it.
async fn account(n: usize, updates: bool) -> Row {
    let mut env = TestEnv::with(
        "bench",
        EnvOptions {
            sim: SimConfig {
                faults: Faults::default(),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await;
    let accounts = if updates { (n / 10).max(1) } else { n };
    if updates {
        // Create the customers first (not measured).
        let w = env.spawn_worker("halosync-account");
        let bodies: Vec<Vec<u8>> = (0..accounts)
            .map(|a| {
                json_body(&account_event(
                    &format!("c{a}"),
                    &format!("acc_{a}"),
                    "Bench",
                    true,
                    1,
                ))
            })
            .collect();
        publish_events(&env, bodies).await;
        env.wait_for("warm-up creates", Duration::from_secs(600), || {
            env.sim.clients().len() == accounts
        })
        .await;
        env.wait_drained(Family::Account, Duration::from_secs(60))
            .await;
        env.stop_worker(w);
    }
    let before = env.sim.counts().values().sum::<u64>();
    let bodies: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            let (acc, seq) = if updates {
                (i % accounts, 2 + (i / accounts) as u64)
            } else {
                (i, 1)
            };
            json_body(&account_event(
                &format!("e{i}"),
                &format!("acc_{acc}"),
                &format!("Bench {i}"),
                true,
                seq,
            ))
        })
        .collect();
    publish_events(&env, bodies).await;
    let w = env.spawn_worker("halosync-account");
    let pid = env.worker(w).child.id();
    // Start the clock when the worker consumes.
    let queue = env.topology.work_queue(Family::Account);
    let deadline = Instant::now() + Duration::from_secs(30);
    while env.depth(&queue).await as usize == n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = Instant::now();
    // Events coalesce (one POST array per batch), so count the state, not
    // the POSTs: every customer there, holding its newest name.
    let newest: std::collections::HashMap<String, String> = (0..n)
        .map(|i| {
            let acc = if updates { i % accounts } else { i };
            (format!("acc_{acc}"), format!("Bench {i}"))
        })
        .collect();
    env.wait_for("all applied", Duration::from_secs(1800), || {
        env.sim.clients().len() == accounts && applied_names(&env, &newest)
    })
    .await;
    let seconds = started.elapsed().as_secs_f64();
    let rss = peak_rss_kib(pid);
    let requests = env.sim.counts().values().sum::<u64>() - before;
    env.stop_worker(w);
    Row {
        scenario: if updates {
            "account-update".into()
        } else {
            "account-create".into()
        },
        events: n,
        seconds,
        requests: Some(requests),
        peak_rss_kib: rss,
        note: if updates {
            format!("{accounts} customers, 10 newer versions each; prefetch 32")
        } else {
            "one new customer per event; prefetch 32".into()
        },
    }
}

/// Issue "running at scale": 1, 2 and 4 `halosync-account` processes
/// against halo-sim with 20 ms latency on every request and a generous
/// budget. Also checks that no event was applied twice.
async fn scale(n: usize, workers: usize) -> Row {
    let mut env = TestEnv::with("bench-scale", EnvOptions::latency(20)).await;
    let bodies: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            json_body(&account_event(
                &format!("e{i}"),
                &format!("acc_{i}"),
                "Scale",
                true,
                1,
            ))
        })
        .collect();
    publish_events(&env, bodies).await;
    let mut pids = Vec::new();
    for _ in 0..workers {
        let w = env.spawn_worker("halosync-account");
        pids.push(w);
    }
    let queue = env.topology.work_queue(Family::Account);
    while env.depth(&queue).await as usize == n {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = Instant::now();
    env.wait_for("all applied", Duration::from_secs(1800), || {
        env.sim.clients().len() >= n
    })
    .await;
    let seconds = started.elapsed().as_secs_f64();
    env.wait_drained(Family::Account, Duration::from_secs(60))
        .await;
    let creates = env.count("POST /api/Client");
    let clients = env.sim.clients().len();
    let requests = env.sim.counts().values().sum::<u64>();
    let rss = pids
        .iter()
        .filter_map(|w| peak_rss_kib(env.worker(*w).child.id()))
        .max();
    Row {
        scenario: format!("scale-{workers}"),
        events: n,
        seconds,
        requests: Some(requests),
        peak_rss_kib: rss,
        note: format!(
            "{workers} process(es), 20 ms HaloPSA latency; {clients} customers from {creates} creates{}",
            if clients == n && creates as usize == n { " (none twice)" } else { " (DUPLICATES!)" }
        ),
    }
}

/// The usage scenarios on one environment: 2,000 subscriptions of 100
/// customers (20 each), seeded through `halosync-account` and four
/// `halosync-subscription` (not measured). Then:
///
/// * (b, c, e) `n` usage events (rounds of one cumulative report per
///   subscription, shuffled within the round) through one `halosync-usage`
///   with a cold usage cache: events/s, HaloPSA requests/event, peak RSS;
/// * (d) `n / 4` more events through a fresh `halosync-usage` under a
///   budget of 5 requests per second, with halo-sim limiting to 5/1 s:
///   events/s and the number of 429s.
async fn usage_bench(n: usize) -> Vec<Row> {
    const ACCOUNTS: usize = 100;
    const SUBS: usize = 2000;
    const ITEM: i64 = 1001;
    let mut env = TestEnv::with(
        "bench-usage",
        bench_options(GENEROUS_BUDGET, &[("MS-365-BP", ITEM)]),
    )
    .await;
    env.sim.insert_item(ITEM, "Microsoft 365 Business Premium");
    let sub_of = |i: usize| (format!("acc_{}", i % ACCOUNTS), format!("sub_{i}"));
    // Seed (not measured).
    let seeders: Vec<usize> = std::iter::once(env.spawn_worker("halosync-account"))
        .chain((0..4).map(|_| env.spawn_worker("halosync-subscription")))
        .collect();
    let accounts: Vec<Vec<u8>> = (0..ACCOUNTS)
        .map(|a| {
            json_body(&account_event(
                &format!("a{a}"),
                &format!("acc_{a}"),
                "Usage",
                true,
                1,
            ))
        })
        .collect();
    publish_keyed(&env, "account.created", accounts).await;
    env.wait_for("customers", Duration::from_secs(300), || {
        env.sim.clients().len() == ACCOUNTS
    })
    .await;
    let subs: Vec<Vec<u8>> = (0..SUBS)
        .map(|i| {
            let (acc, sub) = sub_of(i);
            json_body(&subscription_event(
                &format!("s{i}"),
                &sub,
                &acc,
                5,
                "active",
                1,
            ))
        })
        .collect();
    publish_keyed(&env, "subscription.created", subs).await;
    env.wait_for("subscriptions", Duration::from_secs(900), || {
        env.sim.licences().len() == SUBS
    })
    .await;
    env.wait_drained(Family::Subscription, Duration::from_secs(300))
        .await;
    for w in seeders {
        env.stop_worker(w);
    }

    let usage = |i: usize, round: usize, tag: &str| {
        let (acc, sub) = sub_of(i);
        json_body(&serde_json::json!({
            "id": format!("u{tag}-{i}-{round}"),
            "type": "usage.reported",
            "schema_version": 1,
            "connection": CONNECTION,
            "occurred_at": "2026-11-22T10:15:00.123Z",
            "sequence": round,
            "data": {
                "subscription_id": sub,
                "account_id": acc,
                "metric": "storage_gb",
                "period_start": "2026-11-01",
                "period_end": "2026-11-30",
                "quantity": round as f64,
            }
        }))
    };
    // Rounds of one report per subscription, shuffled within the round.
    let rounds = |n: usize, first_round: usize, tag: &str| {
        let mut out = Vec::with_capacity(n);
        let mut seed = 7u64;
        let mut round = first_round;
        while out.len() < n {
            let mut order: Vec<usize> = (0..SUBS).collect();
            for k in (1..order.len()).rev() {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                order.swap(k, (seed >> 33) as usize % (k + 1));
            }
            for i in order.into_iter().take(n - out.len()) {
                out.push(usage(i, round, tag));
            }
            round += 1;
        }
        (out, round - 1)
    };
    let usage_lines_at = |env: &TestEnv, qty: f64| {
        recurring_lines(&env.sim)
            .into_iter()
            .filter(|l| {
                l["item_internal_reference"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("halosync.usage:"))
                    && l["qty_order"].as_f64() == Some(qty)
            })
            .count()
    };

    // (b, c, e)
    let (bodies, last) = rounds(n, 1, "b");
    let full_rounds = n / SUBS;
    let counts_before = env.sim.counts();
    let before = counts_before.values().sum::<u64>();
    publish_keyed(&env, "usage.reported", bodies).await;
    let w = env.spawn_worker("halosync-usage");
    let pid = env.worker(w).child.id();
    let queue = env.topology.work_queue(Family::Usage);
    while env.depth(&queue).await as usize == n {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = Instant::now();
    let expect = if n.is_multiple_of(SUBS) {
        SUBS
    } else {
        n % SUBS
    };
    // Polled every 250 ms, not 50: reading the whole simulated HaloPSA
    // holds halo-sim's lock, and polling it often slowed the very POSTs
    // being measured (the simulator runs in this process).
    let deadline = Instant::now() + Duration::from_secs(1800);
    while usage_lines_at(&env, last as f64) != expect {
        assert!(Instant::now() < deadline, "usage not applied after 30 min");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let rss = peak_rss_kib(pid);
    let cpu = cpu_seconds(pid).unwrap_or(f64::NAN);
    env.wait_drained(Family::Usage, Duration::from_secs(120))
        .await;
    let requests = env.sim.counts().values().sum::<u64>() - before;
    for (endpoint, c) in env.sim.counts() {
        let diff = c - counts_before.get(&endpoint).copied().unwrap_or(0);
        if diff > 0 {
            eprintln!("usage: {diff:6} {endpoint}");
        }
    }
    let dead = env.take_dead(Family::Usage).await.len();
    env.stop_worker(w);
    let mut rows = vec![Row {
        scenario: "usage".into(),
        events: n,
        seconds,
        requests: Some(requests),
        peak_rss_kib: rss,
        note: format!(
            "{SUBS} subscriptions x 1 metric, {ACCOUNTS} customers, {full_rounds} rounds shuffled; cold usage cache; defaults batch_max 200 / batch_wait_ms 200; {requests} requests; {dead} dead; worker CPU {cpu:.1} s ({:.0} µs/event); activity log {}",
            cpu * 1e6 / n as f64,
            if ACTIVITY_OFF.load(std::sync::atomic::Ordering::SeqCst) { "off" } else { "on" }
        ),
    }];

    // (d) budget of 5 requests per second, warm cache.
    let text = std::fs::read_to_string(&env.config_path).expect("config");
    std::fs::write(
        &env.config_path,
        text.replace(
            GENEROUS_BUDGET,
            "requests_per_window = 5\nwindow_seconds = 1",
        ),
    )
    .expect("config");
    env.sim.set_faults(Faults {
        rate_limit: Some(halo_sim::RateLimit {
            requests: 5,
            window_secs: 1,
            ..Default::default()
        }),
        ..Default::default()
    });
    let m = (n / 4).max(1);
    let (bodies, last) = rounds(m, last + 1, "d");
    let limited_before = env.sim.rate_limited();
    let before = env.sim.counts().values().sum::<u64>();
    publish_keyed(&env, "usage.reported", bodies).await;
    let w = env.spawn_worker("halosync-usage");
    let pid = env.worker(w).child.id();
    while env.depth(&queue).await as usize == m {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = Instant::now();
    let expect = if m.is_multiple_of(SUBS) {
        SUBS
    } else {
        m % SUBS
    };
    env.wait_for(
        "usage applied under budget",
        Duration::from_secs(1800),
        || usage_lines_at(&env, last as f64) == expect,
    )
    .await;
    let seconds = started.elapsed().as_secs_f64();
    let rss = peak_rss_kib(pid);
    env.wait_drained(Family::Usage, Duration::from_secs(120))
        .await;
    let requests = env.sim.counts().values().sum::<u64>() - before;
    let limited = env.sim.rate_limited() - limited_before;
    env.stop_worker(w);
    rows.push(Row {
        scenario: "usage-budget-5/s".into(),
        events: m,
        seconds,
        requests: Some(requests),
        peak_rss_kib: rss,
        note: format!("budget 5 req/1 s, halo-sim limit 5/1 s; warm cache; {limited} HTTP 429"),
    });
    rows
}

/// Subscriptions per customer in `onboard` (the MSP: 500 × 6).
const ONBOARD_SUBS_PER_CUSTOMER: usize = 6;

/// `onboard`: one MSP onboarded at once, as a billing platform would.
/// `customers` accounts, 6 subscriptions each and one usage report per
/// subscription, all published before the workers start (account events
/// first, then subscriptions, then usage: the order a platform's export
/// has, so subscriptions may still find their account missing), one
/// worker per family, halo-sim limiting to `budget` and every worker's
/// shared budget set to the same. Measures HaloPSA requests in total and
/// per event, 429s, seconds from the first worker start to every record
/// right, and what that many requests cost at hosted HaloPSA's fair use
/// (300 per 5 minutes, shared with the MSP's other integrations).
async fn onboard(customers: usize, (limit, window): (u32, u64)) -> Row {
    const ITEM: i64 = 1001;
    const STORAGE_ITEM: i64 = 2001;
    let subs = customers * ONBOARD_SUBS_PER_CUSTOMER;
    let mut env = TestEnv::with(
        "bench-onboard",
        EnvOptions {
            connection_extra: items_toml(
                &format!("requests_per_window = {limit}\nwindow_seconds = {window}"),
                &[("MS-365-BP", ITEM), ("MS-365-BP:storage_gb", STORAGE_ITEM)],
            ),
            extra: activity_extra(),
            // Subscriptions and usage wait for their customer: give them
            // room, as a deployment onboarding an MSP would.
            max_attempts: 30,
            dependency_max_attempts: 200,
            // As deployed (the default): a missing customer or licence is
            // asked for at most once a minute.
            dependency_recheck: Duration::from_secs(60),
            ..EnvOptions::faults(Faults {
                rate_limit: Some(halo_sim::RateLimit {
                    requests: u64::from(limit),
                    window_secs: window,
                    ..Default::default()
                }),
                ..Default::default()
            })
        },
    )
    .await;
    env.sim.insert_item(ITEM, "Microsoft 365 Business Premium");
    env.sim.insert_item(STORAGE_ITEM, "Storage");
    let account_of = |s: usize| format!("acc_{}", s / ONBOARD_SUBS_PER_CUSTOMER);
    let accounts: Vec<Vec<u8>> = (0..customers)
        .map(|a| {
            json_body(&account_event(
                &format!("a{a}"),
                &format!("acc_{a}"),
                &format!("Customer {a}"),
                true,
                1,
            ))
        })
        .collect();
    let subscriptions: Vec<Vec<u8>> = (0..subs)
        .map(|s| {
            json_body(&subscription_event(
                &format!("s{s}"),
                &format!("sub_{s}"),
                &account_of(s),
                1 + (s % 25) as u64,
                "active",
                1,
            ))
        })
        .collect();
    let usage: Vec<Vec<u8>> = (0..subs)
        .map(|s| {
            json_body(&halosync_tests::usage_event(
                &format!("u{s}"),
                &format!("sub_{s}"),
                &account_of(s),
                "storage_gb",
                ("2026-11-01", "2026-11-30"),
                (10 + s) as f64,
                1,
            ))
        })
        .collect();
    let events = customers + 2 * subs;
    publish_keyed(&env, "account.created", accounts).await;
    publish_keyed(&env, "subscription.created", subscriptions).await;
    publish_keyed(&env, "usage.reported", usage).await;
    let started = Instant::now();
    let workers: Vec<usize> = [
        "halosync-account",
        "halosync-subscription",
        "halosync-usage",
    ]
    .iter()
    .map(|w| env.spawn_worker(w))
    .collect();
    let pids: Vec<u32> = workers.iter().map(|w| env.worker(*w).child.id()).collect();
    let check = |env: &TestEnv| onboard_check(env, customers, subs);
    let deadline = Instant::now() + Duration::from_secs(6 * 3600);
    let mut last_report = Instant::now();
    let problem = loop {
        match check(&env) {
            Ok(()) => break None,
            Err(_) if Instant::now() > deadline => break Some("not converged after 6 h"),
            Err(why) => {
                if last_report.elapsed() > Duration::from_secs(30) {
                    last_report = Instant::now();
                    let requests: u64 = env.sim.counts().values().sum();
                    eprintln!(
                        "onboard: {:.0} s, {requests} requests, waiting: {why}",
                        started.elapsed().as_secs_f64()
                    );
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    let rss = pids.iter().filter_map(|p| peak_rss_kib(*p)).max();
    let counts = env.sim.counts();
    let requests: u64 = counts.values().sum();
    let mut by_endpoint: Vec<(String, u64)> = counts.into_iter().collect();
    by_endpoint.sort_by_key(|b| std::cmp::Reverse(b.1));
    for (endpoint, c) in &by_endpoint {
        eprintln!("onboard: {c:6} {endpoint}");
    }
    // Why events were retried (each retry is requests spent again).
    let mut why: std::collections::BTreeMap<String, usize> = Default::default();
    for line in env.logs().lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if v["fields"]["outcome"] == "retried" || v["outcome"] == "retried" {
            let family = v["span"]["family"].as_str().unwrap_or("?").to_string();
            let error = v["error"]
                .as_str()
                .or(v["fields"]["error"].as_str())
                .unwrap_or("?");
            // Folded: digits (ids) as N, so that one cause is one row.
            let mut error: String = error.chars().take(90).collect();
            error = error
                .split(|c: char| c.is_ascii_digit())
                .filter(|p| !p.is_empty())
                .collect::<Vec<_>>()
                .join("N");
            *why.entry(format!("{family}: {error}")).or_default() += 1;
        }
    }
    for (reason, n) in &why {
        eprintln!("onboard: retried {n:5} × {reason}");
    }
    let limited = env.sim.rate_limited();
    let mut dead = 0;
    for f in [Family::Account, Family::Subscription, Family::Usage] {
        dead += env.take_dead(f).await.len();
    }
    for w in workers {
        env.stop_worker(w);
    }
    // Hosted HaloPSA's fair use: about 300 requests per 5 minutes.
    let fair_use_hours = requests as f64 / 1.0 / 3600.0;
    Row {
        scenario: format!("onboard-{limit}/{window}s"),
        events,
        seconds,
        requests: Some(requests),
        peak_rss_kib: rss,
        note: format!(
            "{customers} customers x {ONBOARD_SUBS_PER_CUSTOMER} subscriptions + 1 usage each, published at once, 1 worker per family; {requests} requests, {limited} HTTP 429, {dead} dead; {:.2} h at hosted fair use (1 request/s); {}",
            fair_use_hours,
            problem.unwrap_or("every record right")
        ),
    }
}

/// Every customer, licence, recurring line and usage line of `onboard`,
/// exactly once with its value; `Err` says the first that is not (yet).
fn onboard_check(env: &TestEnv, customers: usize, subs: usize) -> Result<(), String> {
    let clients = env.sim.clients();
    if clients.len() != customers {
        return Err(format!("{} of {customers} customers", clients.len()));
    }
    let licences = env.sim.licences();
    if licences.len() != subs {
        return Err(format!("{} of {subs} licences", licences.len()));
    }
    let mut lines: std::collections::HashMap<String, Vec<Value>> = Default::default();
    for h in env.sim.recurring_invoices() {
        for l in h["lines"].as_array().cloned().unwrap_or_default() {
            if let Some(m) = l["item_internal_reference"].as_str() {
                lines.entry(m.trim().to_string()).or_default().push(l);
            }
        }
    }
    for s in 0..subs {
        let line = lines
            .get(&format!("halosync.subscription:sub_{s}"))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let qty = (1 + s % 25) as f64;
        if line.len() != 1 || line[0]["qty_order"].as_f64() != Some(qty) {
            return Err(format!("sub_{s}: {} recurring lines", line.len()));
        }
        let usage = lines
            .get(&format!("halosync.usage:sub_{s}:storage_gb"))
            .map(Vec::as_slice)
            .unwrap_or_default();
        if usage.len() != 1 || usage[0]["qty_order"].as_f64() != Some((10 + s) as f64) {
            return Err(format!("sub_{s}: {} usage lines", usage.len()));
        }
    }
    Ok(())
}

async fn publish_keyed(env: &TestEnv, key: &str, bodies: Vec<Vec<u8>>) {
    publish_pipelined(
        env.publisher.channel(),
        &env.topology.events_exchange(),
        key,
        bodies,
    )
    .await;
}

fn json_body(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("json")
}

async fn publish_events(env: &TestEnv, bodies: Vec<Vec<u8>>) {
    publish_events_as(env, "account.updated", bodies).await;
}

/// [`publish_events`] of another event type (the routing key that takes
/// them to their family's queue).
async fn publish_events_as(env: &TestEnv, event_type: &str, bodies: Vec<Vec<u8>>) {
    publish_pipelined(
        env.publisher.channel(),
        &env.topology.events_exchange(),
        event_type,
        bodies,
    )
    .await;
}

/// Publishes with confirms, 500 in flight at a time.
async fn publish_pipelined(ch: &lapin::Channel, exchange: &str, key: &str, bodies: Vec<Vec<u8>>) {
    for chunk in bodies.chunks(500) {
        let mut confirms = Vec::with_capacity(chunk.len());
        for (i, body) in chunk.iter().enumerate() {
            let props = event_properties(&format!("b{i}"), key, FieldTable::default());
            let c = ch
                .basic_publish(
                    exchange.into(),
                    key.into(),
                    BasicPublishOptions::default(),
                    body,
                    props,
                )
                .await
                .expect("publish");
            confirms.push(c);
        }
        for c in join_all(confirms).await {
            assert!(c.expect("confirm").is_ack(), "the broker refused a message");
        }
    }
}

/// Whether every account's customer holds the newest name (found through
/// its ExternalLink).
fn applied_names(env: &TestEnv, newest: &std::collections::HashMap<String, String>) -> bool {
    let names: std::collections::HashMap<i64, String> = env
        .sim
        .clients()
        .iter()
        .filter_map(|c| Some((c["id"].as_i64()?, c["name"].as_str()?.to_string())))
        .collect();
    let mut seen = 0;
    for l in env.sim.external_links() {
        let (Some(acc), Some(id)) = (l["third_party_id"].as_str(), l["halo_id"].as_i64()) else {
            continue;
        };
        if l["third_party_type"] != "halosync.account" {
            continue;
        }
        match newest.get(acc) {
            Some(want) if names.get(&id) == Some(want) => seen += 1,
            Some(_) => return false,
            None => {}
        }
    }
    seen == newest.len()
}

/// Events per trickle case.
const TRICKLE_EVENTS: usize = 4;

/// One trickle case: its name, and per event the event and what HaloPSA
/// holds once it is applied.
type Check = Box<dyn Fn(&TestEnv) -> bool>;

/// The steady state: one event at a time, `gap` apart, each settled before
/// the next, so every batch holds one event (the worst case for
/// coalescing). Per case: HaloPSA requests per event, counted by halo-sim.
/// The budget is hosted HaloPSA's (300 per 5 minutes); the connection's
/// identity is warm (as in a running deployment) except where a case is
/// about a first record.
async fn trickle(gap: Duration) -> Vec<Row> {
    const ITEM: i64 = 1001;
    const STORAGE_ITEM: i64 = 2001;
    let mut env = TestEnv::with(
        "bench-trickle",
        bench_options(
            "requests_per_window = 300\nwindow_seconds = 300",
            &[("MS-365-BP", ITEM), ("MS-365-BP:storage_gb", STORAGE_ITEM)],
        ),
    )
    .await;
    env.sim.insert_item(ITEM, "Microsoft 365 Business Premium");
    env.sim.insert_item(STORAGE_ITEM, "Storage");
    let workers = env.spawn_workers(&halosync_tests::ALL_WORKERS);
    let n = TRICKLE_EVENTS;
    let period = ("2026-11-01", "2026-11-30");
    let line_qty = |env: &TestEnv, marker: &str, qty: f64| {
        env.sim
            .recurring_invoices()
            .into_iter()
            .chain(env.sim.invoices())
            .flat_map(|h| h["lines"].as_array().cloned().unwrap_or_default())
            .any(|l| {
                l["item_internal_reference"]
                    .as_str()
                    .is_some_and(|m| m.trim().starts_with(marker))
                    && l["qty_order"].as_f64() == Some(qty)
            })
    };
    let licence_count = |env: &TestEnv, sub: &str, count: i64| {
        let marker = format!("halosync.subscription:{sub}");
        env.sim.licences().iter().any(|l| {
            l["thirdparty_client_id"].as_str() == Some(marker.as_str())
                && l["count"].as_i64() == Some(count)
        })
    };
    let named = |env: &TestEnv, account: &str, name: &str| {
        customers_of(env, account)
            .iter()
            .any(|c| c["name"].as_str() == Some(name))
    };
    let mut cases: Vec<(&str, Vec<(Value, Check)>)> = Vec::new();
    cases.push((
        "account create",
        (0..n)
            .map(|i| {
                let (a, name) = (format!("acc_t{i}"), format!("Trickle {i}"));
                let ev = account_event(&format!("ta{i}"), &a, &name, true, 1);
                let check: Check = Box::new(move |env| named(env, &a, &name));
                (ev, check)
            })
            .collect(),
    ));
    cases.push((
        "account update",
        (0..n)
            .map(|i| {
                let (a, name) = (format!("acc_t{i}"), format!("Trickle {i} Ltd"));
                let ev = account_event(&format!("tb{i}"), &a, &name, true, 2);
                let check: Check = Box::new(move |env| named(env, &a, &name));
                (ev, check)
            })
            .collect(),
    ));
    // Subscription `{sub}{i}` of `acc_t{i}` at `qty`: its licence and its line.
    let subscription_case = move |id: &str, sub: &str, qty: u64, seq: u64| -> Vec<(Value, Check)> {
        (0..n)
            .map(|i| {
                let s = format!("{sub}{i}");
                let ev = subscription_event(
                    &format!("{id}{i}"),
                    &s,
                    &format!("acc_t{i}"),
                    qty,
                    "active",
                    seq,
                );
                let check: Check = Box::new(move |env| {
                    licence_count(env, &s, qty as i64)
                        && line_qty(env, &format!("halosync.subscription:{s}"), qty as f64)
                });
                (ev, check)
            })
            .collect()
    };
    cases.push((
        "subscription create, customer's first",
        subscription_case("tc", "sub_t", 5, 1),
    ));
    cases.push((
        "subscription create, another",
        subscription_case("td", "sub_u", 7, 1),
    ));
    cases.push((
        "subscription update",
        subscription_case("te", "sub_t", 9, 2),
    ));
    // `n` events, each applied once a line carrying its marker holds `qty`.
    let line_case = move |qty: f64, event: &dyn Fn(usize) -> (Value, String)| {
        (0..n)
            .map(|i| {
                let (ev, marker) = event(i);
                let check: Check = Box::new(move |env| line_qty(env, &marker, qty));
                (ev, check)
            })
            .collect::<Vec<_>>()
    };
    for (case, seq, qty) in [
        ("usage, first line", 1u64, 10.0),
        ("usage, update", 2, 12.0),
    ] {
        let usage = |i: usize| {
            let s = format!("sub_t{i}");
            let ev = halosync_tests::usage_event(
                &format!("tu{seq}-{i}"),
                &s,
                &format!("acc_t{i}"),
                "storage_gb",
                period,
                qty,
                seq,
            );
            (ev, format!("halosync.usage:{s}:storage_gb"))
        };
        cases.push((case, line_case(qty, &usage)));
    }
    for (case, seq, qty) in [
        ("overage, first charge", 1u64, 3.0),
        ("overage, update", 2, 4.0),
    ] {
        let overage = |i: usize| {
            let s = format!("sub_t{i}");
            let ev = halosync_tests::overage_event(
                &format!("to{seq}-{i}"),
                &s,
                &format!("acc_t{i}"),
                "storage_gb",
                period,
                qty,
                "0.50",
                seq,
            );
            (ev, format!("halosync.overage:{s}"))
        };
        cases.push((case, line_case(qty, &overage)));
    }
    let requests = |env: &TestEnv| -> u64 { env.sim.counts().values().sum() };
    let mut rows = Vec::new();
    for (case, events) in cases {
        let before = requests(&env);
        let started = Instant::now();
        for (ev, applied) in &events {
            tokio::time::sleep(gap).await;
            env.publish(ev).await;
            env.wait_for(case, Duration::from_secs(120), || applied(&env))
                .await;
        }
        // The last write (a version link) may follow the visible state.
        let mut last = requests(&env);
        loop {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let now = requests(&env);
            if now == last {
                break;
            }
            last = now;
        }
        let spent = last - before;
        eprintln!(
            "trickle: {case}: {spent} requests for {} events",
            events.len()
        );
        rows.push(Row {
            scenario: format!("trickle: {case}"),
            events: events.len(),
            seconds: started.elapsed().as_secs_f64(),
            requests: Some(spent),
            peak_rss_kib: None,
            note: format!(
                "one event every {:.0} s, each settled first (a batch of one)",
                gap.as_secs_f64()
            ),
        });
    }
    let limited = env.sim.rate_limited();
    for f in [
        Family::Account,
        Family::Subscription,
        Family::Usage,
        Family::Overage,
    ] {
        let dead = env.take_dead(f).await.len();
        if dead > 0 {
            eprintln!("trickle: {dead} dead letters of {f}");
        }
    }
    if limited > 0 {
        eprintln!("trickle: {limited} HTTP 429");
    }
    for w in workers {
        env.stop_worker(w);
    }
    rows
}

/// CPU time (user + system) a process has used so far, in seconds, from
/// `/proc/<pid>/stat` (fields 14 and 15, in clock ticks of 1/100 s, the
/// Linux default).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count from its ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// VmHWM (peak resident set) of a process, in KiB.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// `subscription`: events per second through one subscription worker
/// against halo-sim with no latency, as `account` measures the account
/// worker: events queued first, the clock started when the worker starts
/// consuming, stopped when the last event's final write (its version on the
/// line) is in HaloPSA. `subs` subscriptions of 10 customers are created,
/// then updated `rounds` times. halo-sim copies its dataset on every POST
/// (that is how it makes a POST atomic), so with thousands of records the
/// simulator, not the worker, sets the pace: keep `subs` modest.
async fn subscription_bench(subs: usize, rounds: u64) -> Vec<Row> {
    const ACCTS: usize = 10;
    const ITEM: i64 = 1001;
    const WORKER: &str = "halosync-subscription";
    let t = Duration::from_secs(120);
    let mut env = TestEnv::with(
        "bench-sub",
        bench_options(GENEROUS_BUDGET, &[("MS-365-BP", ITEM)]),
    )
    .await;
    env.sim.insert_item(ITEM, "Microsoft 365 Business Premium");
    let accounts = env.spawn_worker("halosync-account");
    for a in 0..ACCTS {
        env.publish(&account_event(
            &format!("acc-e{a}"),
            &format!("acc_{a}"),
            &format!("Customer {a}"),
            true,
            1,
        ))
        .await;
    }
    env.wait_for("customers created", t, || {
        (0..ACCTS).all(|a| customers_of(&env, &format!("acc_{a}")).len() == 1)
    })
    .await;
    env.stop_worker(accounts);
    // Warm up (not measured): the token, and every customer's recurring
    // invoice.
    let w = env.spawn_worker(WORKER);
    for a in 0..ACCTS {
        env.publish(&subscription_event(
            &format!("w{a}"),
            &format!("warm_{a}"),
            &format!("acc_{a}"),
            1,
            "active",
            1,
        ))
        .await;
    }
    env.wait_drained(Family::Subscription, t).await;
    env.stop_worker(w);
    // Subscriptions whose line carries version `seq`.
    let versioned = |env: &TestEnv, seq: u64| {
        let prefix = format!("s={seq};");
        recurring_lines(&env.sim)
            .into_iter()
            .filter(|l| {
                l["item_internal_reference"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("halosync.subscription:sub_"))
            })
            .filter(|l| {
                l["item_external_reference"]
                    .as_str()
                    .is_some_and(|v| v.starts_with(&prefix))
            })
            .count()
    };
    let mut rows = Vec::new();
    for (phase, first, last) in [("create", 1u64, 1u64), ("update", 2, 1 + rounds)] {
        let mut bodies = Vec::new();
        for seq in first..=last {
            for s in 0..subs {
                bodies.push(json_body(&subscription_event(
                    &format!("{seq}-{s}"),
                    &format!("sub_{s}"),
                    &format!("acc_{}", s % ACCTS),
                    seq,
                    "active",
                    seq,
                )));
            }
        }
        let events = bodies.len();
        publish_events_as(&env, "subscription.updated", bodies).await;
        let before = env.sim.counts().values().sum::<u64>();
        let w = env.spawn_worker(WORKER);
        let pid = env.worker(w).child.id();
        let queue = env.topology.work_queue(Family::Subscription);
        let deadline = Instant::now() + Duration::from_secs(30);
        while env.depth(&queue).await as usize == events && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let started = Instant::now();
        env.wait_for(
            &format!("subscription {phase} applied"),
            Duration::from_secs(1800),
            || versioned(&env, last) == subs,
        )
        .await;
        let seconds = started.elapsed().as_secs_f64();
        let rss = peak_rss_kib(pid);
        env.wait_drained(Family::Subscription, t).await;
        let requests = env.sim.counts().values().sum::<u64>() - before;
        env.stop_worker(w);
        rows.push(Row {
            scenario: format!("subscription-{phase}"),
            events,
            seconds,
            requests: Some(requests),
            peak_rss_kib: rss,
            note: format!("{subs} subscriptions of {ACCTS} customers"),
        });
    }
    rows
}

/// Quiet MSP events per `tenants` case, one every 0.5 s.
const QUIET_EVENTS: usize = 30;
/// The noisy MSP's backlog in the `tenants` cases.
const NOISY_EVENTS: usize = 3000;

/// `BENCH_TENANT_CASES="slow,1000"` runs only those cases (default: all:
/// idle, slow, throttled, down, 1000).
async fn tenants_bench() -> Vec<Row> {
    let wanted = std::env::var("BENCH_TENANT_CASES").unwrap_or_default();
    let run = |case: &str| wanted.is_empty() || wanted.split(',').any(|c| c.trim() == case);
    let mut rows = Vec::new();
    for mode in ["idle", "slow", "throttled", "down"] {
        if run(mode) {
            eprintln!("  tenants: noisy MSP {mode}...");
            rows.push(tenants_case(mode).await);
        }
    }
    if run("1000") {
        eprintln!("  tenants: 1,000 connections...");
        rows.push(many_connections(1000).await);
    }
    rows
}

/// One `tenants` case: the quiet MSP's publish-to-applied latencies while
/// the noisy one is `mode`.
async fn tenants_case(mode: &str) -> Row {
    let quiet = halo_sim::SimHandle::start(SimConfig::default())
        .await
        .expect("halo-sim must start");
    let (faults, budget) = match mode {
        "slow" => (
            Faults {
                latency_ms: 5_000,
                ..Default::default()
            },
            GENEROUS_BUDGET.to_string(),
        ),
        "throttled" => (
            Faults::default(),
            "requests_per_window = 10\nwindow_seconds = 10".to_string(),
        ),
        "down" => (
            Faults {
                error_rate: 1.0,
                ..Default::default()
            },
            GENEROUS_BUDGET.to_string(),
        ),
        _ => (Faults::default(), GENEROUS_BUDGET.to_string()),
    };
    let opts = EnvOptions {
        sim: SimConfig {
            faults,
            ..Default::default()
        },
        connection_extra: budget,
        // BENCH_LANE_STALL="250ms" measures another `worker.lane_stall`.
        extra: format!("{}{}", connection_toml("quiet", &quiet), worker_table("")),
        ..Default::default()
    };
    let mut env = TestEnv::with(&format!("bench-tenants-{mode}"), opts).await;
    let w = env.spawn_worker("halosync-account");
    if mode != "idle" {
        let bodies: Vec<Vec<u8>> = (0..NOISY_EVENTS)
            .map(|i| {
                json_body(&account_event(
                    &format!("n{i}"),
                    &format!("noisy_{i}"),
                    "Noisy",
                    true,
                    1,
                ))
            })
            .collect();
        publish_events(&env, bodies).await;
    }
    let started = Instant::now();
    let mut waiting: Vec<(String, Instant)> = Vec::new();
    let mut latencies: Vec<f64> = Vec::new();
    // (quiet event number, latency): the slowest are named in the note.
    let mut slowest: Vec<(String, f64)> = Vec::new();
    let mut poll = |waiting: &mut Vec<(String, Instant)>, latencies: &mut Vec<f64>| {
        waiting.retain(|(acc, t0)| {
            if linked_customers(&quiet, acc) > 0 {
                latencies.push(t0.elapsed().as_secs_f64());
                slowest.push((
                    acc.trim_start_matches("quiet_").to_string(),
                    t0.elapsed().as_secs_f64(),
                ));
                false
            } else {
                true
            }
        });
    };
    for i in 0..QUIET_EVENTS {
        let acc = format!("quiet_{i}");
        let mut ev = account_event(&format!("q{i}"), &acc, "Quiet", true, 1);
        ev["connection"] = "quiet".into();
        let t0 = Instant::now();
        env.publish(&ev).await;
        waiting.push((acc, t0));
        let next = t0 + Duration::from_millis(500);
        while Instant::now() < next {
            poll(&mut waiting, &mut latencies);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while !waiting.is_empty() && Instant::now() < deadline {
        poll(&mut waiting, &mut latencies);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    slowest.sort_by(|a, b| b.1.total_cmp(&a.1));
    let worst = slowest
        .iter()
        .take(3)
        .map(|(i, l)| format!("#{i} {l:.2} s"))
        .collect::<Vec<_>>()
        .join(", ");
    latencies.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| -> String {
        if latencies.is_empty() {
            return "-".into();
        }
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        format!("{:.2} s", latencies[i])
    };
    let noisy_applied = env.sim.clients().len();
    // BENCH_KEEP_LOGS=DIR keeps the worker's log (the lanes' stall and
    // "moving again" lines) as DIR/tenants-<case>.log.
    if let Ok(dir) = std::env::var("BENCH_KEEP_LOGS") {
        let to = Path::new(&dir).join(format!("tenants-{mode}.log"));
        if let Err(e) =
            std::fs::create_dir_all(&dir).and_then(|_| std::fs::copy(&env.worker(w).log, &to))
        {
            eprintln!("  could not keep the worker log as {}: {e}", to.display());
        }
    }
    Row {
        scenario: format!("tenants-{mode}"),
        events: QUIET_EVENTS,
        seconds,
        requests: None,
        peak_rss_kib: peak_rss_kib(env.worker(w).child.id()),
        note: format!(
            "noisy MSP {mode}: quiet MSP publish→applied p50 {} / p95 {}{}; slowest {worst}; noisy applied meanwhile: {noisy_applied}",
            pct(0.50),
            pct(0.95),
            if waiting.is_empty() {
                String::new()
            } else {
                format!(" ({} NOT applied within 2 min)", waiting.len())
            }
        ),
    }
}

/// One account worker with `n` connections in its config (secrets from
/// files, as a Kubernetes Secret mounts them), all on one halo-sim:
/// start-up to consuming, HaloPSA requests while idle, then one account
/// event per connection, all applied; peak RSS.
async fn many_connections(n: usize) -> Row {
    let many = halo_sim::SimHandle::start(SimConfig::default())
        .await
        .expect("halo-sim must start");
    let (mut extra, secrets) = halosync_tests::connections_with_secret_files(
        &many,
        n,
        "requests_per_window = 1000\nwindow_seconds = 60",
    );
    // BENCH_LANES_AT_ONCE=200 measures another `worker.lanes_at_once`.
    extra.push_str(&worker_table(""));
    let opts = EnvOptions {
        extra,
        ..Default::default()
    };
    let mut env = TestEnv::with("bench-many", opts).await;
    let spawned = Instant::now();
    let w = env.spawn_worker("halosync-account");
    let log = env.worker(w).log.clone();
    env.wait_for("consuming", Duration::from_secs(60), || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("\"consuming\""))
    })
    .await;
    let startup = spawned.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_requests = many.counts().values().sum::<u64>() + many.token_requests();
    let bodies: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            let mut ev = account_event(&format!("m{i}"), &format!("acc_{i}"), "Many", true, 1);
            ev["connection"] = format!("msp{i}").into();
            json_body(&ev)
        })
        .collect();
    let started = Instant::now();
    publish_events(&env, bodies).await;
    env.wait_for(
        "one customer per connection",
        Duration::from_secs(600),
        || many.clients().len() >= n,
    )
    .await;
    let seconds = started.elapsed().as_secs_f64();
    let rss = peak_rss_kib(env.worker(w).child.id());
    let tokens = many.token_requests();
    let _ = std::fs::remove_dir_all(&secrets);
    // All connections share one halo-sim here, so each imported every
    // connection's links (~350,000 id-map keys): too many for the
    // harness's one-shot cleanup; removed in chunks first.
    unlink_prefix(&env.prefix).await;
    Row {
        scenario: format!("tenants-{n}-connections"),
        events: n,
        seconds,
        requests: Some(many.counts().values().sum::<u64>()),
        peak_rss_kib: rss,
        note: format!(
            "start-up to consuming {startup:.2} s; {idle_requests} HaloPSA requests while idle; {tokens} token requests; {} customers",
            many.clients().len()
        ),
    }
}

/// Removes every Redis key of `prefix`, in chunks (SCAN, UNLINK).
async fn unlink_prefix(prefix: &str) {
    let mut r = halosync_tests::redis_conn().await;
    let mut cursor: u64 = 0;
    loop {
        let scanned: Result<(u64, Vec<String>), _> = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}halosync:*"))
            .arg("COUNT")
            .arg(10_000)
            .query_async(&mut r)
            .await;
        let Ok((next, keys)) = scanned else {
            eprintln!("could not clean up the keys of {prefix}");
            return;
        };
        if !keys.is_empty() {
            let _: Result<i64, _> = redis::cmd("UNLINK").arg(&keys).query_async(&mut r).await;
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}
