//! The activity log (`halosync_shared::activity`), end to end: workers
//! record every settled message to the `{prefix}halosync.activity` stream;
//! `halosync activity` and `ActivityLog` read it back, filtered, paged and
//! as CSV; and it survives FLUSHALL on Redis (a private redis-server, never
//! the shared one).

use std::time::{Duration, Instant};

use halo_sim::Faults;
use halosync_shared::activity::{ActivityFilter, ActivityLog};
use halosync_shared::contract::Family;
use halosync_shared::Settled;
use halosync_tests::{account_event, customers_of, PrivateRedis, TestEnv, AMQP_URL, CONNECTION};
use serde_json::{json, Value};

const ACCOUNTS: &str = "halosync-account";
const T: Duration = Duration::from_secs(30);

fn json_of(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// `halosync --json activity ARGS` → the page.
fn activity(env: &TestEnv, args: &[&str]) -> Value {
    let mut all = vec!["--json", "activity"];
    all.extend_from_slice(args);
    let (ok, out) = env.run_halosync(&all);
    assert!(ok, "{out}");
    json_of(&out)
}

/// The records of one event id, oldest first.
fn records_of(env: &TestEnv, event_id: &str) -> Vec<Value> {
    let page = activity(env, &["--event-id", event_id, "--per-page", "1000"]);
    let mut rows: Vec<Value> = page["rows"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r["event_id"] == event_id)
        .collect();
    rows.reverse();
    rows
}

/// Waits until `event_id` has records with exactly these outcomes, in order.
async fn wait_outcomes(env: &TestEnv, event_id: &str, outcomes: &[&str]) -> Vec<Value> {
    let deadline = Instant::now() + T;
    loop {
        let rows = records_of(env, event_id);
        let got: Vec<&str> = rows.iter().filter_map(|r| r["outcome"].as_str()).collect();
        if got == outcomes {
            return rows;
        }
        assert!(
            Instant::now() < deadline,
            "{event_id}: outcomes {got:?}, expected {outcomes:?}\n{}",
            env.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn assert_common(r: &Value, family: &str, aggregate: &str, attempts: u64) {
    assert_eq!(r["connection"], CONNECTION, "{r}");
    assert_eq!(r["family"], family, "{r}");
    assert_eq!(r["aggregate"], aggregate, "{r}");
    assert_eq!(r["attempts"], attempts, "{r}");
    assert!(
        r["worker"]
            .as_str()
            .is_some_and(|w| w.starts_with(&format!("halosync-{family}@"))),
        "{r}"
    );
    assert!(
        r["time"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .is_some(),
        "{r}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_outcome_is_recorded_with_its_fields_and_can_be_searched_paged_and_exported() {
    let mut env = TestEnv::new("act-all").await;
    env.spawn_worker(ACCOUNTS);

    // applied, then a duplicate (same id), then superseded (older version).
    let applied = account_event("a-new", "acc_1", "Contoso Ltd", true, 5);
    env.publish(&applied).await;
    env.wait_for("acc_1 applied", T, || {
        customers_of(&env, "acc_1").len() == 1
    })
    .await;
    env.wait_drained(Family::Account, T).await;
    env.publish(&applied).await;
    env.publish(&account_event("a-old", "acc_1", "Contoso (old)", true, 2))
        .await;
    // dead-lettered: an unknown connection is `invalid`.
    let mut dead = account_event("a-dead", "acc_2", "Fabrikam", true, 1);
    dead["connection"] = json!("nope");
    env.publish(&dead).await;
    env.wait_drained(Family::Account, T).await;
    // retried: HaloPSA answers 503 once, the retry applies it.
    env.sim.set_faults(Faults {
        fail_next: 1,
        ..Default::default()
    });
    env.publish(&account_event("a-retry", "acc_3", "Northwind", true, 1))
        .await;

    let rows = wait_outcomes(&env, "a-new", &["applied", "duplicate"]).await;
    for r in &rows {
        assert_common(r, "account", "acc_1", 1);
        assert_eq!(r["event_type"], "account.updated", "{r}");
        assert!(r.get("class").is_none(), "{r}");
    }
    let rows = wait_outcomes(&env, "a-old", &["superseded"]).await;
    assert_common(&rows[0], "account", "acc_1", 1);
    let rows = wait_outcomes(&env, "a-dead", &["dead-lettered"]).await;
    let r = &rows[0];
    assert_eq!(r["class"], "invalid", "{r}");
    assert_eq!(r["connection"], "nope", "{r}");
    assert!(
        r["message"]
            .as_str()
            .is_some_and(|m| m.contains("unknown connection \"nope\"")),
        "{r}"
    );
    let rows = wait_outcomes(&env, "a-retry", &["retried", "applied"]).await;
    assert_common(&rows[0], "account", "acc_3", 1);
    assert_eq!(rows[0]["class"], "transient", "{}", rows[0]);
    assert_eq!(rows[0]["halo_status"], 503, "{}", rows[0]);
    assert!(rows[0]["message"].is_string(), "{}", rows[0]);
    assert_common(&rows[1], "account", "acc_3", 2);

    // Filters.
    let page = activity(&env, &["--outcome", "applied"]);
    assert_eq!(page["total"], 2, "{page}");
    assert!(page["rows"]
        .as_array()
        .is_some_and(|r| r.iter().all(|r| r["outcome"] == "applied")));
    let page = activity(&env, &["--aggregate", "acc_1"]);
    assert_eq!(page["total"], 3, "applied, duplicate, superseded: {page}");
    let page = activity(&env, &["--connection", "nope"]);
    assert_eq!(page["total"], 1, "{page}");
    let page = activity(&env, &["--family", "subscription"]);
    assert_eq!(page["total"], 0, "{page}");
    let page = activity(&env, &["--since", "1h"]);
    assert_eq!(page["total"], 6, "{page}");
    let page = activity(&env, &["--until", "1h"]);
    assert_eq!(page["total"], 0, "{page}");

    // Paging: newest first, 4 + 2.
    let p1 = activity(&env, &["--per-page", "4"]);
    let p2 = activity(&env, &["--per-page", "4", "--page", "2"]);
    assert_eq!(
        (p1["total"].clone(), p1["pages"].clone()),
        (json!(6), json!(2))
    );
    assert_eq!(p1["rows"].as_array().map(Vec::len), Some(4));
    assert_eq!(p2["rows"].as_array().map(Vec::len), Some(2));
    let times: Vec<String> = p1["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(p2["rows"].as_array().into_iter().flatten())
        .filter_map(|r| r["time"].as_str().map(str::to_string))
        .collect();
    let mut sorted = times.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(times, sorted, "newest first across pages");
    assert_eq!(p2["rows"][1]["event_id"], "a-new", "the oldest record last");

    // The table, as a person reads it.
    let (ok, out) = env.run_halosync(&["activity", "--per-page", "4"]);
    assert!(ok, "{out}");
    assert!(out.starts_with("TIME"), "{out}");
    assert!(
        out.contains(
            "Page 1 of 2 (6 records, newest first). Next: halosync activity --page 2 --per-page 4"
        ),
        "{out}"
    );

    // CSV: every matching record, paging ignored.
    let (ok, out) = env.run_halosync(&["activity", "--csv", "--per-page", "1"]);
    assert!(ok, "{out}");
    let mut lines = out.lines();
    assert_eq!(
        lines.next(),
        Some("time,connection,family,event_id,event_type,aggregate,outcome,class,halo_status,attempts,worker,message")
    );
    assert_eq!(out.lines().count(), 7, "{out}");
    assert!(
        out.contains(
            ",account,a-retry,account.created,acc_3,retried,transient,503,1,halosync-account@"
        ),
        "{out}"
    );

    // Bad input says what to type.
    let (ok, out) = env.run_halosync(&["activity", "--outcome", "done"]);
    assert!(!ok && out.contains("dead-lettered"), "{out}");

    // The library API the console uses: counts, daily tiles, live updates.
    let log = ActivityLog::connect(
        AMQP_URL,
        &Default::default(),
        "tests-activity",
        &env.prefix,
        1000,
    )
    .await
    .expect("activity log");
    log.wait_caught_up(Duration::from_millis(400), T).await;
    assert_eq!(log.len(), 6);
    let counts = log.counts(None);
    let applied: u64 = counts
        .iter()
        .filter(|c| {
            c.outcome == Settled::Applied && c.family == "account" && c.connection == CONNECTION
        })
        .map(|c| c.count)
        .sum();
    assert_eq!(applied, 2, "{counts:?}");
    let days = log.daily(30);
    assert_eq!(days.len(), 30);
    assert_eq!(days[29].total, 6, "today's tile: {:?}", days[29]);
    assert_eq!(days[29].by_outcome.get(&Settled::Retried), Some(&1));
    let mut live = log.subscribe();
    env.publish(&account_event("a-live", "acc_4", "Tailspin", true, 1))
        .await;
    let got = tokio::time::timeout(T, async {
        loop {
            match live.recv().await {
                Ok(r) if r.event_id == "a-live" => break r,
                Ok(_) => continue,
                Err(e) => panic!("live updates: {e}"),
            }
        }
    })
    .await
    .expect("a live record");
    assert_eq!(got.outcome, Settled::Applied);
    let page = log.query(
        &ActivityFilter {
            event_id: Some("a-live".into()),
            ..Default::default()
        },
        1,
        10,
    );
    assert_eq!(page.total, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_activity_log_survives_flushall_on_redis() {
    let redis = PrivateRedis::started();
    let mut env = TestEnv::new("act-flush").await;
    env.spawn_worker_with(ACCOUNTS, &[("REDIS_URL", redis.url().as_str())]);
    env.publish(&account_event("f1", "acc_1", "Contoso Ltd", true, 1))
        .await;
    wait_outcomes(&env, "f1", &["applied"]).await;

    redis.flushall().await;

    // Everything recorded before is still there (it lives in RabbitMQ) ...
    let rows = wait_outcomes(&env, "f1", &["applied"]).await;
    assert_common(&rows[0], "account", "acc_1", 1);
    // ... and recording goes on after the flush: the ledger is gone, so a
    // redelivered event is applied again as far as Redis knows, but
    // HaloPSA's link says the version is already there: superseded.
    env.publish(&account_event("f1", "acc_1", "Contoso Ltd", true, 1))
        .await;
    env.publish(&account_event("f2", "acc_2", "Fabrikam", true, 1))
        .await;
    wait_outcomes(&env, "f2", &["applied"]).await;
    let rows = wait_outcomes(&env, "f1", &["applied", "superseded"]).await;
    assert_eq!(rows[1]["aggregate"], "acc_1");
    assert_eq!(customers_of(&env, "acc_1").len(), 1);
}
