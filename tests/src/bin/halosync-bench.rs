//! `make bench`: throughput and memory of the workers on this machine,
//! against the real RabbitMQ and Redis and an in-process halo-sim with no
//! latency. Prints one table. Not part of `make test`: figures are
//! measured, never asserted.
//!
//! `halosync-bench [--events N] [SCENARIO...]`, scenarios: `raw`,
//! `account-create`, `account-update` (default: all).

use std::time::{Duration, Instant};

use futures::future::join_all;
use futures::StreamExt;
use halo_sim::{Faults, SimConfig};
use halosync_shared::amqp::publisher::event_properties;
use halosync_shared::contract::Family;
use halosync_tests::{account_event, EnvOptions, TestEnv, AMQP_URL};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use serde_json::Value;

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
            "-h" | "--help" => usage(""),
            s if ["raw", "account-create", "account-update", "scale"].contains(&s) => {
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
        ];
    }
    let mut rows = Vec::new();
    for s in &scenarios {
        eprintln!("running {s} with {events} events...");
        match s.as_str() {
            "raw" => rows.push(raw(events).await),
            "account-create" => rows.push(account(events, false).await),
            "account-update" => rows.push(account(events, true).await),
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
    eprintln!("usage: halosync-bench [--events N] [raw] [account-create] [account-update] [scale]");
    std::process::exit(if problem.is_empty() { 0 } else { 2 })
}

/// (a) A minimal lapin consumer acking each message of a quorum queue,
/// with the workers' prefetch (32): the broker's ceiling on this machine.
async fn raw(n: usize) -> Row {
    let conn = halosync_shared::amqp::connect(AMQP_URL, "bench-raw")
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
    let posts_before = env.count("POST /api/Client");
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
    let target = posts_before + n as u64;
    env.wait_for("all applied", Duration::from_secs(1800), || {
        env.count("POST /api/Client") >= target
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

fn json_body(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("json")
}

async fn publish_events(env: &TestEnv, bodies: Vec<Vec<u8>>) {
    publish_pipelined(
        env.publisher.channel(),
        &env.topology.events_exchange(),
        "account.updated",
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
