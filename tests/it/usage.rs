//! `halosync-usage` end to end: real RabbitMQ and Redis, halo-sim for
//! HaloPSA, the account and subscription workers to seed customers,
//! licences and recurring invoices.

use std::collections::BTreeMap;
use std::time::Duration;

use halo_sim::{Faults, SimConfig};
use halosync_shared::contract::Family;
use halosync_tests::{
    account_event, recurring_lines, shuffle, subscription_event, usage_event, EnvOptions, TestEnv,
    CONNECTION, GENEROUS_BUDGET,
};
use serde_json::{json, Value};

const WORKER: &str = "halosync-usage";
const T: Duration = Duration::from_secs(30);
const ITEM: i64 = 1001;
const STORAGE_ITEM: i64 = 2001;
const PRODUCT: &str = "Microsoft 365 Business Premium";

const NOV: (&str, &str) = ("2026-11-01", "2026-11-30");
const DEC: (&str, &str) = ("2026-12-01", "2026-12-31");

fn options(budget: &str, faults: Faults, extra: &str) -> EnvOptions {
    EnvOptions {
        sim: SimConfig {
            faults,
            ..Default::default()
        },
        // `[connections.acme.items]` must come last.
        connection_extra: format!(
            "{budget}\n[connections.{CONNECTION}.items]\n\"MS-365-BP\" = {ITEM}\n\"MS-365-BP:storage_gb\" = {STORAGE_ITEM}\n"
        ),
        extra: extra.into(),
        ..Default::default()
    }
}

async fn env_with(name: &str, opts: EnvOptions) -> TestEnv {
    let env = TestEnv::with(name, opts).await;
    env.sim.insert_item(ITEM, PRODUCT);
    env.sim.insert_item(STORAGE_ITEM, "Storage");
    env
}

/// Accounts `acc_<a>` with subscriptions `sub_<a>_<s>`, created through the
/// account and subscription workers (stopped afterwards).
async fn seed(env: &mut TestEnv, accounts: usize, subs: usize) -> Vec<(String, String)> {
    let acc_w = env.spawn_worker("halosync-account");
    let sub_w = env.spawn_worker("halosync-subscription");
    let mut pairs = Vec::new();
    for a in 0..accounts {
        let acc = format!("acc_{a}");
        env.publish(&account_event(
            &format!("seed-a{a}"),
            &acc,
            &format!("Customer {a}"),
            true,
            1,
        ))
        .await;
        for s in 0..subs {
            let sub = format!("sub_{a}_{s}");
            env.publish(&subscription_event(
                &format!("seed-s{a}-{s}"),
                &sub,
                &acc,
                5,
                "active",
                1,
            ))
            .await;
            pairs.push((acc.clone(), sub));
        }
    }
    env.wait_drained(Family::Account, T).await;
    env.wait_drained(Family::Subscription, Duration::from_secs(45))
        .await;
    let n = pairs.len();
    env.wait_for("subscription lines", T, || subscription_lines(env) == n)
        .await;
    env.stop_worker(acc_w);
    env.stop_worker(sub_w);
    env.assert_no_dead(Family::Subscription).await;
    pairs
}

fn all_lines(env: &TestEnv) -> Vec<Value> {
    recurring_lines(&env.sim)
}

fn subscription_lines(env: &TestEnv) -> usize {
    all_lines(env)
        .iter()
        .filter(|l| {
            l["item_internal_reference"]
                .as_str()
                .is_some_and(|m| m.starts_with("halosync.subscription:"))
        })
        .count()
}

/// marker -> the usage lines carrying it.
fn usage_lines(env: &TestEnv) -> BTreeMap<String, Vec<Value>> {
    let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for l in all_lines(env) {
        if let Some(m) = l["item_internal_reference"].as_str() {
            if m.starts_with("halosync.usage:") {
                out.entry(m.to_string()).or_default().push(l.clone());
            }
        }
    }
    out
}

fn line_of(env: &TestEnv, sub: &str, metric: &str) -> Value {
    let lines = usage_lines(env);
    let found = lines
        .get(&format!("halosync.usage:{sub}:{metric}"))
        .unwrap_or_else(|| panic!("no usage line for {sub}:{metric}: {lines:#?}"));
    assert_eq!(
        found.len(),
        1,
        "one line per subscription and metric: {found:#?}"
    );
    found[0].clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn shuffled_cumulative_quantities_with_duplicates_converge_to_the_newest() {
    let mut env = env_with(
        "usage-conv",
        options(
            GENEROUS_BUDGET,
            Faults::default(),
            "[worker]\nbatch_max = 50\nbatch_wait = \"100ms\"\n",
        ),
    )
    .await;
    let pairs = seed(&mut env, 2, 3).await;
    let mut events = Vec::new();
    for (acc, sub) in &pairs {
        for metric in ["storage_gb", "api_calls"] {
            for seq in 1..=6u64 {
                let e = usage_event(
                    &format!("u-{sub}-{metric}-{seq}"),
                    sub,
                    acc,
                    metric,
                    NOV,
                    seq as f64 * 10.5,
                    seq,
                );
                events.push(e.clone());
                if seq % 2 == 0 {
                    events.push(e); // duplicate delivery
                }
            }
        }
    }
    shuffle(&mut events, 42);
    // Published in two halves around the worker's start, so that some
    // batches meet lines already written (older events then supersede).
    let half = events.len() / 2;
    for e in &events[..half] {
        env.publish(e).await;
    }
    env.spawn_worker(WORKER);
    for e in &events[half..] {
        env.publish(e).await;
    }
    env.wait_drained(Family::Usage, T).await;
    env.assert_no_dead(Family::Usage).await;
    for (_, sub) in &pairs {
        let storage = line_of(&env, sub, "storage_gb");
        assert_eq!(storage["qty_order"].as_f64(), Some(63.0), "{storage}");
        // `sku:metric` is mapped; `api_calls` falls back to the sku's item.
        assert_eq!(storage["_itemid"].as_i64(), Some(STORAGE_ITEM));
        assert_eq!(
            storage["item_shortdescription"],
            format!("{PRODUCT} — storage_gb (2026-11-01 to 2026-11-30)")
        );
        let calls = line_of(&env, sub, "api_calls");
        assert_eq!(calls["qty_order"].as_f64(), Some(63.0), "{calls}");
        assert_eq!(calls["_itemid"].as_i64(), Some(ITEM));
    }
    // Lines of one customer are on its one recurring invoice, next to the
    // subscription lines.
    assert_eq!(env.sim.recurring_invoices().len(), 2);
    assert_eq!(subscription_lines(&env), pairs.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_period_replaces_the_old_and_an_older_period_changes_nothing() {
    let mut env = env_with(
        "usage-period",
        options(GENEROUS_BUDGET, Faults::default(), ""),
    )
    .await;
    let pairs = seed(&mut env, 1, 1).await;
    let (acc, sub) = pairs[0].clone();
    env.spawn_worker(WORKER);
    env.publish(&usage_event("p1", &sub, &acc, "storage_gb", NOV, 120.0, 10))
        .await;
    env.wait_drained(Family::Usage, T).await;
    assert_eq!(
        line_of(&env, &sub, "storage_gb")["qty_order"].as_f64(),
        Some(120.0)
    );

    env.publish(&usage_event("p2", &sub, &acc, "storage_gb", DEC, 7.0, 11))
        .await;
    env.wait_drained(Family::Usage, T).await;
    let line = line_of(&env, &sub, "storage_gb");
    assert_eq!(line["qty_order"].as_f64(), Some(7.0));
    assert_eq!(line["startdate"], "2026-12-01T00:00:00");
    assert_eq!(line["enddate"], "2026-12-31T00:00:00");

    // A late November report, even with a higher sequence, changes nothing.
    env.publish(&usage_event("p3", &sub, &acc, "storage_gb", NOV, 999.0, 12))
        .await;
    // And an older December one neither.
    env.publish(&usage_event("p4", &sub, &acc, "storage_gb", DEC, 3.0, 9))
        .await;
    env.wait_drained(Family::Usage, T).await;
    let line = line_of(&env, &sub, "storage_gb");
    assert_eq!(line["qty_order"].as_f64(), Some(7.0), "{line}");
    assert_eq!(line["startdate"], "2026-12-01T00:00:00");
    env.assert_no_dead(Family::Usage).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_refused_line_is_dead_lettered_and_the_others_applied() {
    let bad = format!("{PRODUCT} — bad_metric (2026-11-01 to 2026-11-30)");
    let mut env = env_with(
        "usage-reject",
        options(
            GENEROUS_BUDGET,
            Faults {
                reject_names: vec![bad.clone()],
                ..Default::default()
            },
            "[worker]\nbatch_max = 100\nbatch_wait = \"500ms\"\n",
        ),
    )
    .await;
    let pairs = seed(&mut env, 2, 4).await;
    // Everything queued before the worker starts: one batch.
    for (k, (acc, sub)) in pairs.iter().enumerate() {
        env.publish(&usage_event(
            &format!("ok-{k}"),
            sub,
            acc,
            "storage_gb",
            NOV,
            k as f64,
            1,
        ))
        .await;
    }
    let (bad_acc, bad_sub) = &pairs[3];
    env.publish(&usage_event(
        "bad",
        bad_sub,
        bad_acc,
        "bad_metric",
        NOV,
        1.0,
        1,
    ))
    .await;
    env.spawn_worker(WORKER);
    env.wait_drained(Family::Usage, T).await;
    for (k, (_, sub)) in pairs.iter().enumerate() {
        assert_eq!(
            line_of(&env, sub, "storage_gb")["qty_order"].as_f64(),
            Some(k as f64)
        );
    }
    assert!(!usage_lines(&env).contains_key(&format!("halosync.usage:{bad_sub}:bad_metric")));
    // The lines before the refused one were saved (no transaction) and
    // read back, not added again: one line each (`line_of` above).
    assert!(
        env.sim.partial_saves() >= 1,
        "the array was not saved in part"
    );
    let dead = env.take_dead(Family::Usage).await;
    assert_eq!(dead.len(), 1, "{dead:#?}");
    assert_eq!(dead[0].header("x-halosync-error-class"), "rejected");
    assert!(dead[0].body.contains("\"bad\""), "{}", dead[0].body);
    let msg = dead[0].header("x-halosync-error-message");
    assert!(msg.contains("was rejected by validation"), "{msg}");
    assert!(msg.contains("bad_metric"), "{msg}");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_usage_workers_and_one_overage_worker_never_exceed_the_shared_budget() {
    const N: u64 = 12;
    let budget = format!("requests_per_window = {N}\nwindow_seconds = 2");
    let mut env = env_with(
        "usage-budget",
        options(
            &budget,
            Faults::default(),
            "[worker]\nbatch_max = 20\nbatch_wait = \"100ms\"\n",
        ),
    )
    .await;
    let pairs = seed(&mut env, 2, 2).await;
    env.spawn_worker(WORKER);
    env.spawn_worker(WORKER);
    env.spawn_worker("halosync-overage");
    env.spawn_worker("halosync-account");
    for round in 1..=4u64 {
        for (k, (acc, sub)) in pairs.iter().enumerate() {
            env.publish(&json!({
                "id": format!("o-{k}-{round}"),
                "type": "overage.detected",
                "schema_version": 1,
                "connection": CONNECTION,
                "occurred_at": "2026-11-30T23:00:00Z",
                "sequence": round,
                "data": {
                    "subscription_id": sub, "account_id": acc, "metric": "storage_gb",
                    "period_start": NOV.0, "period_end": NOV.1,
                    "included_quantity": 100, "used_quantity": 100 + round,
                    "overage_quantity": round, "unit_price": "0.15", "currency": "GBP"
                }
            }))
            .await;
        }
        for (k, (acc, sub)) in pairs.iter().enumerate() {
            for metric in ["storage_gb", "api_calls"] {
                env.publish(&usage_event(
                    &format!("b-{k}-{metric}-{round}"),
                    sub,
                    acc,
                    metric,
                    NOV,
                    round as f64,
                    round,
                ))
                .await;
            }
        }
        for a in 0..2 {
            env.publish(&account_event(
                &format!("b-acc{a}-{round}"),
                &format!("acc_{a}"),
                &format!("Renamed {a} {round}"),
                true,
                round + 1,
            ))
            .await;
        }
    }
    env.wait_drained(Family::Usage, Duration::from_secs(40))
        .await;
    env.wait_drained(Family::Overage, Duration::from_secs(40))
        .await;
    env.wait_drained(Family::Account, T).await;
    for (_, sub) in &pairs {
        for metric in ["storage_gb", "api_calls"] {
            assert_eq!(line_of(&env, sub, metric)["qty_order"].as_f64(), Some(4.0));
        }
    }
    // one overage charge per subscription, at the newest quantity
    let charges: Vec<Value> = env
        .sim
        .invoices()
        .iter()
        .flat_map(|i| i["lines"].as_array().cloned().unwrap_or_default())
        .collect();
    assert_eq!(charges.len(), pairs.len(), "{charges:#?}");
    assert!(
        charges.iter().all(|l| l["qty_order"].as_f64() == Some(4.0)),
        "{charges:#?}"
    );
    let max = env.sim.max_requests_in_any_window(2);
    assert!(max <= N, "{max} requests in one 2 s window, budget {N}");
    assert_eq!(env.sim.rate_limited(), 0);
    env.assert_no_dead(Family::Usage).await;
    env.assert_no_dead(Family::Overage).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_mid_batch_loses_nothing_and_doubles_nothing() {
    let mut env = env_with(
        "usage-kill",
        options(
            GENEROUS_BUDGET,
            Faults::default(),
            "[worker]\nbatch_max = 10\nbatch_wait = \"50ms\"\n",
        ),
    )
    .await;
    let pairs = seed(&mut env, 2, 5).await;
    // Slow HaloPSA from now on, so that the kill lands mid-batch.
    env.sim.set_faults(Faults {
        latency_ms: 150,
        ..Default::default()
    });
    let mut events = Vec::new();
    for seq in 1..=3u64 {
        for (k, (acc, sub)) in pairs.iter().enumerate() {
            for metric in ["storage_gb", "api_calls"] {
                events.push(usage_event(
                    &format!("k-{k}-{metric}-{seq}"),
                    sub,
                    acc,
                    metric,
                    NOV,
                    seq as f64 * 2.0,
                    seq,
                ));
            }
        }
    }
    for e in &events {
        env.publish(e).await;
    }
    let w = env.spawn_worker(WORKER);
    env.wait_for("a first line written", T, || {
        env.sim
            .counts()
            .get("POST /api/RecurringInvoice/Lines")
            .copied()
            .unwrap_or(0)
            >= 1
    })
    .await;
    env.kill_worker(w);
    let written_before = usage_lines(&env).len();
    assert!(written_before < pairs.len() * 2, "the kill came too late");
    env.sim.set_faults(Faults::default());
    env.spawn_worker(WORKER);
    env.wait_drained(Family::Usage, T).await;
    for (_, sub) in &pairs {
        for metric in ["storage_gb", "api_calls"] {
            // line_of asserts exactly one line per aggregate.
            assert_eq!(line_of(&env, sub, metric)["qty_order"].as_f64(), Some(6.0));
        }
    }
    assert_eq!(usage_lines(&env).len(), pairs.len() * 2);
    env.assert_no_dead(Family::Usage).await;
}
