//! Outages of what a worker depends on (issue "Ready for production"):
//! a worker started while Redis is down waits for it; under a steady
//! stream, a broker restart, a Redis restart and a HaloPSA outage longer
//! than the retry horizon lose nothing and double nothing, and what was
//! dead-lettered during the outage is one `dlq replay` away.
//!
//! What they stop and restart is their own: a private Redis
//! ([`PrivateRedis`]), a TCP front of the broker, and for the broker
//! restart a private RabbitMQ node ([`PrivateRabbit`]), so they run beside
//! every other test without disturbing the shared services.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use halosync_shared::amqp::Publisher;
use halosync_shared::contract::Family;
use halosync_tests::*;
use lapin::types::FieldTable;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_started_with_redis_down_waits_then_becomes_ready_and_processes() {
    let mut redis = PrivateRedis::unstarted();
    let health = free_port();
    let mut env = TestEnv::with("redisdown", EnvOptions::health_port(health)).await;
    let w = env.spawn_worker_with("halosync-account", &[("REDIS_URL", &redis.url())]);

    // It serves /readyz at once, not ready, naming what it waits for.
    let body = wait_readyz(&env, health, 503, "redis unreachable").await;
    assert!(
        !body.contains(&redis.url()) || !body.contains('@'),
        "{body}"
    );
    env.publish_accounts("e", 0..5, 1, |i| format!("Customer {i}"))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        env.worker(w).child.try_wait().expect("wait").is_none(),
        "the worker exited instead of waiting for Redis:\n{}",
        env.logs()
    );
    assert_eq!(
        env.clients().len(),
        0,
        "nothing can be applied without Redis"
    );

    redis.start();
    env.wait_for(
        "5 customers once Redis is up",
        Duration::from_secs(60),
        || env.clients().len() == 5,
    )
    .await;
    wait_readyz(&env, health, 200, "ready").await;
    let logs = env.logs();
    let waiting = logs.matches("redis unreachable; waiting for it").count();
    assert!(
        (1..=2).contains(&waiting),
        "one log line a minute while waiting, got {waiting}:\n{logs}"
    );
    assert!(logs.contains("redis reachable again"), "{logs}");
    assert_eq!(env.stop_worker(w).code(), Some(0));
}

/// Forwards `127.0.0.1:port` to the real broker, from the moment it is
/// called: before that, the port refuses connections like a broker that
/// is down.
async fn start_broker_front(port: u16) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind the broker front");
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect("127.0.0.1:5672").await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_started_with_the_broker_down_waits_then_consumes() {
    let broker_port = free_port();
    let health = free_port();
    let mut env = TestEnv::with("brokerdown", EnvOptions::health_port(health)).await;
    let url = format!("amqp://guest:guest@127.0.0.1:{broker_port}/%2f");
    let w = env.spawn_worker_with("halosync-account", &[("AMQP_URL", &url)]);
    let body = wait_readyz(&env, health, 503, "rabbitmq unreachable").await;
    assert!(
        !body.contains("guest:guest"),
        "no password in /readyz: {body}"
    );
    env.publish_accounts("e", 0..5, 1, |i| format!("Customer {i}"))
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        env.worker(w).child.try_wait().expect("wait").is_none(),
        "{}",
        env.logs()
    );
    assert_eq!(env.clients().len(), 0);

    let front = start_broker_front(broker_port).await;
    env.wait_for(
        "5 customers once the broker is reachable",
        Duration::from_secs(60),
        || env.clients().len() == 5,
    )
    .await;
    wait_readyz(&env, health, 200, "ready").await;
    let logs = env.logs();
    let lines = logs.matches("broker unreachable or session lost").count();
    assert!(
        (1..=2).contains(&lines),
        "one log line a minute while waiting, got {lines}:\n{logs}"
    );
    assert!(!logs.contains("guest:guest"), "no password in the logs");
    assert!(logs.contains("broker reachable again"), "{logs}");
    assert_eq!(env.stop_worker(w).code(), Some(0));
    front.abort();
}

/// Polls a worker's `/readyz` until it answers `status` with a body that
/// contains `needle`; returns the body. Fails after 20 s with the logs.
async fn wait_readyz(env: &TestEnv, port: u16, status: u16, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some((got, body)) = http_get(port, "/readyz").await {
            if got == status && body.contains(needle) {
                return body;
            }
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never answered {status} with {needle:?}:\n{}",
            env.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Publishes with confirms like a careful publisher: on any failure it
/// reconnects (the broker may be restarting) and sends the same event
/// again, so every event reaches the broker at least once.
async fn publish_resilient(publisher: &mut Publisher, url: &str, prefix: &str, event: &Value) {
    let body = serde_json::to_vec(event).expect("json");
    let id = event["id"].as_str().unwrap_or("none");
    let ty = event["type"].as_str().unwrap_or("none");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match publisher
            .publish_raw(id, ty, &body, FieldTable::default())
            .await
        {
            Ok(()) => return,
            Err(_) => loop {
                assert!(Instant::now() < deadline, "the broker did not come back");
                tokio::time::sleep(Duration::from_millis(300)).await;
                if let Ok(p) =
                    Publisher::connect(url, &Default::default(), prefix, "outage-test").await
                {
                    *publisher = p;
                    break;
                }
            },
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_restart_redis_restart_and_a_halopsa_outage_under_load_lose_and_double_nothing() {
    let mut redis = PrivateRedis::unstarted();
    redis.start();
    let rabbit = PrivateRabbit::start();
    let mut env = TestEnv::with(
        "outages",
        EnvOptions {
            max_attempts: 3,
            amqp_url: Some(rabbit.url()),
            ..Default::default()
        },
    )
    .await;
    let url = redis.url();
    for _ in 0..2 {
        env.spawn_worker_with("halosync-account", &[("REDIS_URL", &url)]);
    }

    // 60 accounts x 5 versions, shuffled, plus duplicates of 40 ids.
    let mut events = Vec::new();
    for a in 0..60 {
        for v in 1..=5u64 {
            events.push(account_event(
                &format!("e{a}-{v}"),
                &format!("acc_{a}"),
                &format!("Customer {a} v{v}"),
                true,
                v,
            ));
        }
    }
    let dupes: Vec<Value> = events.iter().step_by(7).take(40).cloned().collect();
    events.extend(dupes);
    let mut seed = 42u64;
    for i in (1..events.len()).rev() {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        events.swap(i, (seed >> 33) as usize % (i + 1));
    }
    let total = events.len();

    let prefix = env.prefix.clone();
    let amqp_url = env.amqp_url.clone();
    let sim = &env.sim;
    let started = Instant::now();
    let stream = tokio::spawn(async move {
        let mut publisher =
            Publisher::connect(&amqp_url, &Default::default(), &prefix, "outage-test")
                .await
                .expect("publisher");
        // ~20 events/s: the faults below happen while the stream flows.
        for e in &events {
            publish_resilient(&mut publisher, &amqp_url, &prefix, e).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });

    // t≈2 s: the whole broker application restarts.
    tokio::time::sleep(Duration::from_secs(2)).await;
    rabbit.stop_app();
    tokio::time::sleep(Duration::from_secs(3)).await;
    rabbit.start_app();
    // Redis restarts empty: locks, ledger, id map and tokens are gone.
    tokio::time::sleep(Duration::from_secs(3)).await;
    redis.stop();
    tokio::time::sleep(Duration::from_secs(1)).await;
    redis.start();
    // HaloPSA answers 503 to everything for longer than the retry horizon
    // (tiers 200/400/800 ms, 3 attempts).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut faults = sim.faults();
    faults.fail_next = u64::MAX / 2;
    sim.set_faults(faults.clone());
    tokio::time::sleep(Duration::from_secs(6)).await;
    faults.fail_next = 0;
    sim.set_faults(faults);
    stream.await.expect("publishing task");
    let outage_over = started.elapsed();

    // Reconnect the harness's own publisher (the restart closed it).
    env.reconnect_publisher().await;
    env.wait_drained(Family::Account, Duration::from_secs(180))
        .await;
    let dead = env.dead_count(Family::Account).await;
    assert!(
        dead > 0,
        "the HaloPSA outage should have exhausted some events' retries (else this test proves nothing)"
    );
    let (ok, out) = env.run_halosync(&[
        "dlq",
        "replay",
        "--family",
        "account",
        "--class",
        "exhausted",
    ]);
    assert!(ok, "replay failed: {out}");
    env.wait_drained(Family::Account, Duration::from_secs(120))
        .await;
    assert_eq!(
        env.dead_count(Family::Account).await,
        0,
        "everything replayed was applied"
    );

    let mut by_account: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for a in 0..60 {
        by_account.insert(format!("acc_{a}"), customers_of(&env, &format!("acc_{a}")));
    }
    let mut wrong = HashMap::new();
    for (account, customers) in &by_account {
        let n = account.trim_start_matches("acc_");
        let names: Vec<&str> = customers
            .iter()
            .filter_map(|c| c["name"].as_str())
            .collect();
        if names != [format!("Customer {n} v5").as_str()] {
            wrong.insert(account.clone(), names.join(" | "));
        }
    }
    assert!(
        wrong.is_empty(),
        "every account must end with exactly one customer holding version 5; wrong: {wrong:?}\n{}",
        tail(&env.logs(), 80)
    );
    assert_eq!(env.clients().len(), 60, "no customer twice");
    eprintln!(
        "{total} events ({dead} dead-lettered during the HaloPSA outage, then replayed); faults over after {:.1}s",
        outage_over.as_secs_f64()
    );
}
