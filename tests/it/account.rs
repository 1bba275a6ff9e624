//! Account sync end to end: RabbitMQ and Redis for real, halo-sim in
//! process, `halosync-account` as child processes.

use std::time::Duration;

use halo_sim::{Faults, SimConfig};
use halosync_shared::contract::Family;
use halosync_tests::{
    account_event, customers_of, EnvOptions, TestEnv, CONNECTION, GENEROUS_BUDGET,
};
use serde_json::json;

const WORKER: &str = "halosync-account";
const T: Duration = Duration::from_secs(30);

fn one_customer(env: &TestEnv, account: &str) -> serde_json::Value {
    let found = customers_of(env, account);
    assert_eq!(found.len(), 1, "account {account}: {found:?}");
    found.into_iter().next().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn lifecycle_ordering_and_duplicates() {
    let mut env = TestEnv::new("acct-life").await;
    env.spawn_worker(WORKER);

    env.publish(&account_event("e1", "acc_1", "Contoso Ltd", true, 1))
        .await;
    env.wait_for("customer created", T, || {
        customers_of(&env, "acc_1").len() == 1
    })
    .await;
    env.wait_drained(Family::Account, T).await;
    let c = one_customer(&env, "acc_1");
    assert_eq!(c["name"], "Contoso Ltd");
    assert_eq!(c["inactive"], false);
    assert_eq!(c["website"], "https://acc_1.example");

    // update
    env.publish(&account_event("e2", "acc_1", "Contoso Group", true, 2))
        .await;
    env.wait_for("renamed", T, || {
        one_customer(&env, "acc_1")["name"] == "Contoso Group"
    })
    .await;
    // deactivate: inactive, never deleted
    env.publish(&account_event("e3", "acc_1", "Contoso Group", false, 3))
        .await;
    env.wait_for("inactive", T, || {
        one_customer(&env, "acc_1")["inactive"] == true
    })
    .await;
    assert_eq!(env.count("DELETE /api/Client/{id}"), 0);
    // reactivate
    env.publish(&account_event("e4", "acc_1", "Contoso Group", true, 4))
        .await;
    env.wait_for("active again", T, || {
        one_customer(&env, "acc_1")["inactive"] == false
    })
    .await;
    env.wait_drained(Family::Account, T).await;

    // an older sequence after a newer one changes nothing
    let posts = env.count("POST /api/Client");
    env.publish(&account_event("e-old", "acc_1", "Stale Name", false, 2))
        .await;
    env.wait_drained(Family::Account, T).await;
    let c = one_customer(&env, "acc_1");
    assert_eq!(c["name"], "Contoso Group");
    assert_eq!(c["inactive"], false);
    assert_eq!(
        env.count("POST /api/Client"),
        posts,
        "a superseded event wrote to HaloPSA"
    );

    // the same event id twice is applied once
    env.publish(&account_event("e5", "acc_1", "Contoso Five", true, 5))
        .await;
    env.publish(&account_event("e5", "acc_1", "Contoso Five", true, 5))
        .await;
    env.wait_drained(Family::Account, T).await;
    assert_eq!(one_customer(&env, "acc_1")["name"], "Contoso Five");
    assert_eq!(
        env.count("POST /api/Client"),
        posts + 1,
        "the duplicate was applied twice"
    );
    env.assert_no_dead(Family::Account).await;
    assert_eq!(env.clients().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_workers_racing_create_one_customer_each() {
    let mut env = TestEnv::with("acct-race", EnvOptions::latency(5)).await;
    env.spawn_worker(WORKER);
    env.spawn_worker(WORKER);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Every account gets several events at once; both workers take some.
    for seq in 1..=4u64 {
        for a in 0..25 {
            let acc = format!("acc_{a}");
            env.publish(&account_event(
                &format!("e-{a}-{seq}"),
                &acc,
                &format!("Customer {a} v{seq}"),
                true,
                seq,
            ))
            .await;
        }
    }
    env.wait_drained(Family::Account, Duration::from_secs(60))
        .await;
    for a in 0..25 {
        let c = one_customer(&env, &format!("acc_{a}"));
        assert_eq!(c["name"], format!("Customer {a} v4"));
    }
    assert_eq!(env.clients().len(), 25, "duplicates created");
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_flushed_mid_stream_still_one_customer_each() {
    let mut env = TestEnv::with("acct-flush", EnvOptions::latency(3)).await;
    env.spawn_worker(WORKER);
    env.spawn_worker(WORKER);
    for seq in 1..=3u64 {
        for a in 0..30 {
            let acc = format!("acc_{a}");
            env.publish(&account_event(
                &format!("e-{a}-{seq}"),
                &acc,
                &format!("Customer {a} v{seq}"),
                true,
                seq,
            ))
            .await;
        }
        env.flush_redis().await;
    }
    // And again once idle, then an out-of-order old event for every account:
    // ordering must hold without Redis (the version lives in HaloPSA).
    env.wait_drained(Family::Account, Duration::from_secs(60))
        .await;
    env.flush_redis().await;
    for a in 0..30 {
        env.publish(&account_event(
            &format!("late-{a}"),
            &format!("acc_{a}"),
            "Stale",
            false,
            2,
        ))
        .await;
    }
    env.wait_drained(Family::Account, Duration::from_secs(60))
        .await;
    for a in 0..30 {
        let c = one_customer(&env, &format!("acc_{a}"));
        assert_eq!(c["name"], format!("Customer {a} v3"));
        assert_eq!(c["inactive"], false);
    }
    assert_eq!(env.clients().len(), 30);
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_expire_and_are_revoked_mid_stream() {
    let mut env = TestEnv::with(
        "acct-token",
        EnvOptions {
            sim: SimConfig {
                token_lifetime_secs: 2,
                faults: Faults {
                    // expired tokens answer 400 "Token not found"
                    expired_token_status: 400,
                    latency_ms: 2,
                    ..Default::default()
                },
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await;
    env.spawn_worker(WORKER);
    // Three waves, each only once the one before is in HaloPSA (batches
    // take a wave in very few requests): the second meets a revoked token,
    // the third one that expired while the worker idled.
    for wave in 0..3 {
        if wave == 1 {
            env.sim.revoke_tokens();
        }
        if wave == 2 {
            tokio::time::sleep(Duration::from_millis(2500)).await;
        }
        env.publish_accounts("e", wave * 20..(wave + 1) * 20, 1, |_| "C".to_string())
            .await;
        let want = (wave + 1) * 20;
        env.wait_for("the wave's customers", Duration::from_secs(30), || {
            env.clients().len() >= want
        })
        .await;
    }
    env.wait_drained(Family::Account, Duration::from_secs(60))
        .await;
    assert_eq!(env.clients().len(), 60);
    env.assert_no_dead(Family::Account).await;
    assert!(
        env.sim.token_requests() >= 3,
        "tokens were not refreshed after the revocation and the expiry: {} token requests",
        env.sim.token_requests()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn eight_workers_starting_together_make_one_token_request() {
    let mut env = TestEnv::new("acct-8tok").await;
    for _ in 0..8 {
        env.spawn_worker(WORKER);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    env.publish_accounts("e", 0..40, 1, |_| "C".to_string())
        .await;
    env.wait_drained(Family::Account, T).await;
    assert_eq!(env.clients().len(), 40);
    assert_eq!(env.sim.token_requests(), 1, "{}", env.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn fivexx_and_429_are_retried_then_applied() {
    let mut env = TestEnv::with(
        "acct-5xx",
        EnvOptions {
            // One event per batch: ten arrays of one (one request each)
            // meet HaloPSA's limit of 3 a second (one array of ten would not).
            extra: "[worker]\nbatch_max = 1\n".into(),
            max_attempts: 12,
            ..EnvOptions::rate_limited(
                3,
                1,
                false,
                Faults {
                    fail_next: 3,
                    ..Default::default()
                },
                // a budget far above HaloPSA's, so that 429s do happen
                "requests_per_window = 1000\nwindow_seconds = 1",
            )
        },
    )
    .await;
    env.spawn_worker(WORKER);
    env.publish_accounts("e", 0..10, 1, |_| "C".to_string())
        .await;
    env.wait_for("all ten applied", Duration::from_secs(60), || {
        env.clients().len() == 10
    })
    .await;
    env.wait_drained(Family::Account, Duration::from_secs(60))
        .await;
    assert!(
        env.sim.rate_limited() > 0,
        "no 429 happened; the test proves nothing"
    );
    assert!(env.count("POST /api/Client") >= 10);
    env.assert_no_dead(Family::Account).await;
    let logs = env.logs();
    assert!(
        logs.contains("\"outcome\":\"retried\""),
        "nothing went through the delay queues"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn persistent_failure_is_dead_lettered_as_exhausted() {
    let mut env = TestEnv::with(
        "acct-exh",
        EnvOptions {
            max_attempts: 3,
            ..EnvOptions::faults(Faults {
                error_rate: 1.0,
                ..Default::default()
            })
        },
    )
    .await;
    env.spawn_worker(WORKER);
    env.publish(&account_event("e1", "acc_1", "C", true, 1))
        .await;
    let dead = env.take_dead_at_least(Family::Account, 1).await;
    assert_eq!(dead.len(), 1, "{}", env.logs());
    let d = &dead[0];
    assert_eq!(d.header("x-halosync-error-class"), "exhausted");
    assert_eq!(d.header("x-halosync-attempts"), "3");
    assert_eq!(d.header("x-halosync-halo-status"), "500");
    assert_eq!(
        d.header("x-halosync-original-routing-key"),
        "account.created"
    );
    assert_eq!(d.header("x-halosync-event-id"), "e1");
    assert_eq!(d.header("x-halosync-connection"), CONNECTION);
    assert!(
        d.header("x-halosync-error-message")
            .contains("Simulated server error"),
        "{d:?}"
    );
    assert!(d
        .header("x-halosync-halo-body")
        .contains("Simulated server error"));
    assert!(!d.header("x-halosync-first-failure-at").is_empty());
    assert!(!d.header("x-halosync-last-failure-at").is_empty());
    assert!(d
        .header("x-halosync-worker")
        .starts_with("halosync-account@"));
    assert!(d.body.contains("\"acc_1\""), "the body is kept as it was");
    assert!(env.clients().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_messages_are_dead_lettered_at_once_with_the_reason() {
    let mut env = TestEnv::new("acct-inv").await;
    env.spawn_worker(WORKER);
    let good = account_event("ok", "acc_1", "C", true, 1);
    env.publish_raw("account.created", b"{not json").await;
    let mut missing_name = good.clone();
    missing_name["id"] = json!("no-name");
    missing_name["data"]
        .as_object_mut()
        .map(|d| d.remove("name"));
    env.publish(&missing_name).await;
    let mut unknown_type = good.clone();
    unknown_type["id"] = json!("unknown-type");
    unknown_type["type"] = json!("account.deleted");
    env.publish(&unknown_type).await;
    let mut unknown_conn = good.clone();
    unknown_conn["id"] = json!("unknown-conn");
    unknown_conn["connection"] = json!("globex");
    env.publish(&unknown_conn).await;
    let mut big = good.clone();
    big["id"] = json!("big");
    big["data"]["notes"] = json!("x".repeat(300 * 1024));
    env.publish(&big).await;
    env.publish(&good).await;

    env.wait_for("good one applied", T, || env.clients().len() == 1)
        .await;
    let dead = env.take_dead_at_least(Family::Account, 5).await;
    assert_eq!(dead.len(), 5, "{dead:#?}");
    let reason = |needle: &str| {
        dead.iter()
            .find(|d| d.body.contains(needle) || d.header("x-halosync-event-id") == needle)
            .map(|d| {
                assert_eq!(d.header("x-halosync-error-class"), "invalid", "{d:?}");
                assert_eq!(d.header("x-halosync-attempts"), "1");
                d.header("x-halosync-error-message")
            })
            .unwrap_or_else(|| panic!("no dead letter for {needle}"))
    };
    assert!(reason("{not json").contains("not UTF-8 JSON"));
    assert!(reason("no-name").contains("name"));
    assert!(reason("unknown-type").contains("unknown event type \"account.deleted\""));
    assert!(reason("unknown-conn").contains("unknown connection \"globex\""));
    assert!(reason("xxxxxxxxxxxxxxxx").contains("over the 262144-byte limit"));
    assert_eq!(env.count("POST /api/Client"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_with_messages_in_flight_loses_and_doubles_nothing() {
    const N: usize = 400;
    // Every event is queued before the worker starts; halo-sim answers the
    // first write (a batch of new customers) and then holds every further
    // write unanswered: the worker is killed while a write is on the wire
    // and a full prefetch window is in flight, on any machine, at any speed.
    let mut env = TestEnv::with(
        "acct-kill",
        EnvOptions::faults(Faults {
            hold_writes_after: Some(1),
            ..Default::default()
        }),
    )
    .await;
    env.publish_accounts("e", 0..N, 1, |i| format!("C{i}"))
        .await;
    let first = env.spawn_worker(WORKER);
    env.wait_for("a write held after the first", T, || {
        env.sim.held_writes() > 0
    })
    .await;
    env.kill_worker(first);
    let mut faults = env.sim.faults();
    faults.hold_writes_after = None;
    env.sim.set_faults(faults);
    let applied_before = env.clients().len();
    assert!(
        applied_before < N,
        "the worker finished before it was killed"
    );
    env.spawn_worker(WORKER);
    env.wait_for("all applied", Duration::from_secs(180), || {
        env.clients().len() >= N
    })
    .await;
    env.wait_drained(Family::Account, Duration::from_secs(180))
        .await;
    for i in 0..N {
        assert_eq!(
            one_customer(&env, &format!("acc_{i}"))["name"],
            format!("C{i}")
        );
    }
    assert_eq!(env.clients().len(), N);
    let dead = env.take_dead(Family::Account).await;
    assert!(dead.is_empty(), "{dead:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn broker_connection_dropped_worker_reconnects() {
    let mut env = TestEnv::new("acct-drop").await;
    env.spawn_worker(WORKER);
    env.publish(&account_event("e1", "acc_1", "C1", true, 1))
        .await;
    env.wait_for("first applied", T, || env.clients().len() == 1)
        .await;
    let needle = format!("halosync-account:{}", env.prefix);
    // the worker's connection carries its name; wait until it is listed
    let mut closed = 0;
    for _ in 0..20 {
        closed = env.close_broker_connections(&needle);
        if closed > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(closed > 0, "no worker connection found to close");
    env.publish_accounts("e", 2..=20, 1, |_| "C".to_string())
        .await;
    env.wait_for("applied after reconnect", Duration::from_secs(40), || {
        env.clients().len() == 20
    })
    .await;
    assert!(env.logs().contains("reconnecting"), "{}", env.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_finishes_in_flight_work_and_exits_zero() {
    let mut env = TestEnv::with("acct-term", EnvOptions::latency(30)).await;
    let w = env.spawn_worker(WORKER);
    env.publish_accounts("e", 0..60, 1, |_| "C".to_string())
        .await;
    env.wait_for("some applied", T, || env.clients().len() >= 5)
        .await;
    let status = env.stop_worker(w);
    assert!(status.success(), "exit status {status:?}");
    // Whatever it started it finished: everything else is still queued.
    // (A batch whose answer came too late on a loaded machine is applied
    // and also back in the queue, as a retry: then it is counted twice
    // here, and the ledger makes the second a no-op below.)
    let applied = env.clients().len() as u32;
    let mut queued = env.depth(&env.topology.work_queue(Family::Account)).await;
    for d in halosync_tests::TEST_DELAYS_MS {
        queued += env
            .depth(&env.topology.retry_queue(Family::Account, d))
            .await;
    }
    assert!(
        applied + queued >= 60,
        "lost: applied {applied} + queued {queued} < 60"
    );
    env.spawn_worker(WORKER);
    env.wait_drained(Family::Account, T).await;
    assert_eq!(env.clients().len(), 60);
}

#[tokio::test(flavor = "multi_thread")]
async fn match_existing_by_name_adopts_one_and_refuses_ambiguity() {
    let mut env = TestEnv::with(
        "acct-match",
        EnvOptions {
            connection_extra: format!("match_existing_by_name = true\n{GENEROUS_BUDGET}"),
            ..Default::default()
        },
    )
    .await;
    env.spawn_worker(WORKER);
    // The MSP already has these customers (created through the API).
    let http = reqwest::Client::new();
    let token: serde_json::Value = http
        .post(format!("{}/token", env.sim.auth_url()))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", "halosync-sim"),
            ("client_secret", "sim-secret"),
            ("scope", "all"),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let bearer = token["access_token"].as_str().unwrap().to_string();
    for name in ["Contoso Ltd", "Twin Co", "Twin Co", "Contoso Ltd (old)"] {
        let r = http
            .post(format!("{}/Client", env.sim.api_url()))
            .bearer_auth(&bearer)
            .json(&json!([{"name": name}]))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }
    env.publish(&account_event("e1", "acc_1", "Contoso Ltd", true, 1))
        .await;
    env.publish(&account_event("e2", "acc_2", "Twin Co", true, 1))
        .await;
    env.wait_drained(Family::Account, T).await;
    let c = one_customer(&env, "acc_1");
    assert_eq!(c["id"], 1, "the existing customer was adopted");
    assert_eq!(env.clients().len(), 4, "nothing new was created");
    let dead = env.take_dead(Family::Account).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].header("x-halosync-error-class"), "unmapped");
    assert!(dead[0]
        .header("x-halosync-error-message")
        .contains("2 HaloPSA customers are named exactly \"Twin Co\""));
}

#[tokio::test(flavor = "multi_thread")]
async fn customer_deleted_in_halopsa_is_recreated_not_dead_lettered() {
    let mut env = TestEnv::new("acct-stale").await;
    env.spawn_worker(WORKER);
    env.publish(&account_event("e1", "acc_1", "Contoso", true, 1))
        .await;
    env.wait_for("created", T, || env.clients().len() == 1)
        .await;
    env.wait_drained(Family::Account, T).await;
    // The HaloPSA side loses everything (a deleted customer, or a fresh
    // instance), while Redis still maps acc_1 to the old id.
    env.reset_halo().await;
    assert!(env.clients().is_empty());
    env.publish(&account_event("e2", "acc_1", "Contoso Two", true, 2))
        .await;
    env.wait_for("recreated", T, || env.clients().len() == 1)
        .await;
    env.wait_drained(Family::Account, T).await;
    assert_eq!(one_customer(&env, "acc_1")["name"], "Contoso Two");
    env.assert_no_dead(Family::Account).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_serves_metrics_health_and_readiness() {
    let port = halosync_tests::free_port();
    let mut env = TestEnv::with("acct-metrics", EnvOptions::health_port(port)).await;
    env.spawn_worker(WORKER);
    let http = reqwest::Client::new();
    let url = |p: &str| format!("http://127.0.0.1:{port}{p}");
    let mut ready = false;
    for _ in 0..100 {
        if let Ok(r) = http.get(url("/readyz")).send().await {
            if r.status().is_success() {
                ready = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "/readyz never became ready: {}", env.logs());
    let health = http.get(url("/healthz")).send().await.unwrap();
    assert!(health.status().is_success());
    env.publish(&account_event("e1", "acc_1", "C", true, 1))
        .await;
    env.publish_raw("account.created", b"nope").await;
    env.wait_for("applied", T, || env.clients().len() == 1)
        .await;
    env.wait_drained(Family::Account, T).await;
    let text = http
        .get(url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "halosync_messages_total{family=\"account\",outcome=\"applied\"} 1",
        "halosync_dead_letters_total{family=\"account\",class=\"invalid\"} 1",
        "halosync_halo_requests_total{connection=\"acme\",method=\"POST\",endpoint=\"/Client\",status=\"200\"} 1",
        "halosync_token_requests_total{connection=\"acme\",status=\"200\"} 1",
        "halosync_processing_seconds_bucket",
        "halosync_rate_wait_seconds_bucket",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    assert!(!text.contains("acc_1"), "an account id became a label");
    // Readiness follows the broker connection.
    env.close_broker_connections(&format!("halosync-account:{}", env.prefix));
    let mut saw_unready = false;
    for _ in 0..50 {
        let r = http.get(url("/readyz")).send().await.unwrap();
        if r.status().as_u16() == 503 {
            saw_unready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        saw_unready,
        "/readyz stayed ready without a broker connection"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn four_workers_together_stay_within_a_tight_shared_budget() {
    // 12 requests per 2 s for all processes together; HaloPSA (the sim)
    // would answer 429 past 12 in its own 2 s window.
    let mut env = TestEnv::with(
        "acct-budget",
        EnvOptions {
            extra: "[worker]\nrate_margin = \"300ms\"\n".into(),
            max_attempts: 20,
            ..EnvOptions::rate_limited(
                12,
                2,
                true,
                Faults::default(),
                "requests_per_window = 12\nwindow_seconds = 2",
            )
        },
    )
    .await;
    for _ in 0..4 {
        env.spawn_worker(WORKER);
    }
    env.publish_accounts("e", 0..16, 1, |_| "C".to_string())
        .await;
    env.wait_for("all applied", Duration::from_secs(90), || {
        env.clients().len() == 16
    })
    .await;
    env.wait_drained(Family::Account, Duration::from_secs(60))
        .await;
    let max = env.sim.max_requests_in_any_window(2);
    assert!(
        max <= 12,
        "{max} requests reached HaloPSA within 2 s (budget 12)"
    );
    assert_eq!(env.sim.rate_limited(), 0, "HaloPSA answered 429");
    env.assert_no_dead(Family::Account).await;
}

/// #9 item 4: account events coalesce. Published while no worker runs,
/// then taken as batches:
/// 1. 30 new accounts, one of which HaloPSA refuses (halo-sim saves the
///    array's elements before it and stops: no transaction): exactly one
///    customer for each of the 29, the refused one dead-lettered as
///    `rejected`, nothing created twice;
/// 2. 20 more new accounts and newer versions of 20 known ones, all clean:
///    a handful of requests for 40 events (arrays), not 2–3 per event;
/// 3. 10 new accounts whose create array is saved but its answer lost: read
///    back, not sent again: no duplicate, and no second array.
#[tokio::test(flavor = "multi_thread")]
async fn account_events_coalesce_and_a_partly_saved_or_lost_array_doubles_nothing() {
    let mut env = TestEnv::with(
        "acct-coalesce",
        EnvOptions {
            extra: "[worker]\nbatch_max = 200\nbatch_wait = \"500ms\"\n".into(),
            ..EnvOptions::faults(Faults {
                reject_names: vec!["Refused 7".into()],
                ..Default::default()
            })
        },
    )
    .await;
    let name = |a: usize, v: u64| {
        if a == 7 {
            "Refused 7".to_string()
        } else {
            format!("Customer {a} v{v}")
        }
    };
    let one_each =
        |env: &TestEnv, accounts: std::ops::Range<usize>, v: u64| -> Result<(), String> {
            for a in accounts {
                if a == 7 {
                    continue;
                }
                let c = customers_of(env, &format!("acc_{a}"));
                if c.len() != 1 || c[0]["name"] != name(a, v).as_str() {
                    return Err(format!("acc_{a}: {c:?}"));
                }
            }
            Ok(())
        };

    // 1. A partly saved array.
    env.publish_accounts("c", 0..30, 1, |a| name(a, 1)).await;
    let w = env.spawn_worker(WORKER);
    env.wait_for("29 customers", T, || one_each(&env, 0..30, 1).is_ok())
        .await;
    env.wait_drained(Family::Account, T).await;
    assert_eq!(env.clients().len(), 29, "{:#?}", env.clients());
    // The 30 events were queued before the worker started: one batch, one
    // create array, saved up to the refused element; what follows it goes
    // one by one, so no second array is saved in part.
    assert_eq!(
        env.sim.partial_saves(),
        1,
        "the array was saved in part exactly once"
    );
    let dead = env.take_dead(Family::Account).await;
    assert_eq!(dead.len(), 1, "{dead:#?}");
    assert_eq!(dead[0].header("x-halosync-event-id"), "c7");
    assert_eq!(dead[0].header("x-halosync-error-class"), "rejected");
    env.stop_worker(w);

    // 2. Clean arrays: 20 new, 20 updated.
    let before = env.sim.counts();
    env.publish_accounts("c", 30..50, 1, |a| name(a, 1)).await;
    env.publish_accounts("u", 10..30, 2, |a| name(a, 2)).await;
    let w = env.spawn_worker(WORKER);
    env.wait_for("40 events applied", T, || {
        one_each(&env, 30..50, 1).is_ok() && one_each(&env, 10..30, 2).is_ok()
    })
    .await;
    env.wait_drained(Family::Account, T).await;
    env.assert_no_dead(Family::Account).await;
    let after = env.sim.counts();
    let spent = |endpoint: &str| {
        after.get(endpoint).copied().unwrap_or(0) - before.get(endpoint).copied().unwrap_or(0)
    };
    let total: u64 = after.values().sum::<u64>() - before.values().sum::<u64>();
    eprintln!("40 account events (20 new, 20 updated): {total} HaloPSA requests: {after:?}");
    // One batch: 1 resolve list + 1 create array + 1 read-back list + 1
    // update array + 1 version array (+ the token). Two batches at most
    // double that; one request per event would be 40 or more.
    assert!(
        spent("POST /api/Client") <= 4 && total <= 12,
        "{total} requests for 40 account events: {after:#?}"
    );
    env.stop_worker(w);

    // 3. The create array's answer is lost.
    let mut faults = env.sim.faults();
    faults.lose_next = 1;
    env.sim.set_faults(faults);
    let before_posts = env.count("POST /api/Client");
    env.publish_accounts("c", 50..60, 1, |a| name(a, 1)).await;
    env.spawn_worker(WORKER);
    env.wait_for("10 more customers", T, || one_each(&env, 50..60, 1).is_ok())
        .await;
    env.wait_drained(Family::Account, T).await;
    env.assert_no_dead(Family::Account).await;
    assert_eq!(env.sim.lost_responses(), 1, "no answer was lost");
    assert_eq!(env.clients().len(), 59);
    assert_eq!(
        env.count("POST /api/Client") - before_posts,
        1,
        "the lost array was sent again"
    );
}

/// `Area.default_currency_code` is the id of HaloPSA's `/Currency` row, not
/// the ISO code: USD and GBP become their ids; NOK, which this HaloPSA does
/// not have, is dead-lettered `unmapped` with the reason and where to fix
/// it, and applied once the MSP adds it and the dead letter is replayed.
#[tokio::test(flavor = "multi_thread")]
async fn currencies_are_written_as_ids_and_an_unknown_one_waits_unmapped_until_added() {
    let mut env = TestEnv::new("acct-ccy").await;
    env.spawn_worker(WORKER);
    for (id, account, code) in [
        ("ccy-1", "acc_usd", "USD"),
        ("ccy-2", "acc_gbp", "GBP"),
        ("ccy-3", "acc_nok", "NOK"),
    ] {
        let mut e = account_event(id, account, &format!("Customer {code}"), true, 1);
        e["data"]["currency"] = json!(code);
        env.publish(&e).await;
    }
    env.wait_for("the USD and GBP customers", T, || {
        customers_of(&env, "acc_usd").len() == 1 && customers_of(&env, "acc_gbp").len() == 1
    })
    .await;
    env.wait_drained(Family::Account, T).await;
    let id_of = |code: &str| {
        env.sim
            .currencies()
            .into_iter()
            .find(|c| c["code"] == code)
            .map(|c| c["id"].clone())
            .unwrap_or_default()
    };
    assert!(id_of("USD").is_i64() && id_of("GBP").is_i64());
    assert_eq!(
        one_customer(&env, "acc_usd")["default_currency_code"],
        id_of("USD")
    );
    assert_eq!(
        one_customer(&env, "acc_gbp")["default_currency_code"],
        id_of("GBP")
    );
    assert!(customers_of(&env, "acc_nok").is_empty());
    // The currencies are asked once per connection, and again only for a
    // code the cache lacks (NOK): at most two look-ups for three events.
    let lookups = env.count("GET /api/Currency");
    assert!((1..=2).contains(&lookups), "{lookups} GET /Currency");

    assert_eq!(env.dead_count(Family::Account).await, 1);
    let (ok, shown) = env.run_halosync(&["dlq", "show", "ccy-3"]);
    assert!(ok, "{shown}");
    assert!(shown.contains("unmapped"), "{shown}");
    assert!(
        shown.contains(
            "currency NOK is not set up in HaloPSA (Configuration > Financials > Currencies)"
        ),
        "{shown}"
    );

    // The MSP adds the currency; the dead letter is replayed.
    let nok = env.sim.add_currency("NOK", "Norwegian Krone");
    let (ok, out) = env.run_halosync(&["dlq", "replay", "--class", "unmapped"]);
    assert!(ok, "{out}");
    env.wait_for("the NOK customer", T, || {
        customers_of(&env, "acc_nok").len() == 1
    })
    .await;
    env.wait_drained(Family::Account, T).await;
    assert_eq!(
        one_customer(&env, "acc_nok")["default_currency_code"],
        json!(nok)
    );
    env.assert_no_dead(Family::Account).await;
}

/// A currency HaloPSA lacks is asked about once, not once per batch: the
/// miss is remembered per code (`currency::MISSING_FOR`), so more events in
/// it fail `unmapped` without another `GET /Currency`; an operator's replay
/// asks again at once and applies them.
#[tokio::test(flavor = "multi_thread")]
async fn a_missing_currency_is_not_asked_about_again_for_every_batch() {
    let mut env = TestEnv::new("acct-ccy-miss").await;
    env.spawn_worker(WORKER);
    let nok_event = |i: usize| {
        let mut e = account_event(
            &format!("miss-{i}"),
            &format!("acc_nok_{i}"),
            &format!("Customer NOK {i}"),
            true,
            1,
        );
        e["data"]["currency"] = json!("NOK");
        e
    };
    // One event at a time, so that each is a batch of its own.
    for i in 0..4u32 {
        env.publish(&nok_event(i as usize)).await;
        let deadline = std::time::Instant::now() + T;
        while env.dead_count(Family::Account).await < i + 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "event {i} not dead-lettered\n{}",
                env.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(
        env.count("GET /api/Currency"),
        1,
        "one look-up for four batches"
    );

    let nok = env.sim.add_currency("NOK", "Norwegian Krone");
    let (ok, out) = env.run_halosync(&["dlq", "replay", "--class", "unmapped"]);
    assert!(ok, "{out}");
    env.wait_for("the four NOK customers", T, || {
        (0..4).all(|i| customers_of(&env, &format!("acc_nok_{i}")).len() == 1)
    })
    .await;
    env.wait_drained(Family::Account, T).await;
    assert_eq!(
        one_customer(&env, "acc_nok_3")["default_currency_code"],
        json!(nok)
    );
    assert_eq!(env.count("GET /api/Currency"), 2, "the replay asked again");
    env.assert_no_dead(Family::Account).await;
}
