//! Overage sync end to end: RabbitMQ and Redis for real, halo-sim in
//! process, `halosync-overage` (and `halosync-account`, which creates the
//! customers) as child processes.
//!
//! A charge is found in the sim the way the worker finds it without Redis:
//! the line of a one-off invoice whose `item_internal_reference` holds
//! `halosync.overage:<subscription>:<metric>:<period_start>`.

use std::collections::BTreeMap;
use std::time::Duration;

use halo_sim::{Faults, SimConfig};
use halosync_shared::contract::Family;
use halosync_tests::{
    api_requests, customers_of, delta, overage_event, seed_accounts, EnvOptions, TestEnv,
    CONNECTION, GENEROUS_BUDGET,
};
use serde_json::Value;

const WORKER: &str = "halosync-overage";
const ACCOUNTS: &str = "halosync-account";
const T: Duration = Duration::from_secs(30);
const ITEM: i64 = 1001;
const P1: (&str, &str) = ("2026-10-01", "2026-10-31");
const P2: (&str, &str) = ("2026-11-01", "2026-11-30");

fn marker(sub: &str, metric: &str, start: &str) -> String {
    format!("halosync.overage:{sub}:{metric}:{start}")
}

/// An `overage.detected` event of `acc_1`'s subscription `sub`.
fn charge(
    id: &str,
    sub: &str,
    metric: &str,
    period: (&str, &str),
    overage: f64,
    price: &str,
    sequence: u64,
) -> Value {
    overage_event(id, sub, "acc_1", metric, period, overage, price, sequence)
}

fn description(metric: &str, period: (&str, &str), overage: f64) -> String {
    format!(
        "{metric} overage {} to {}: {overage} over 100 included",
        period.0, period.1
    )
}

/// An environment mapping `overage:<metric>` for the metrics used here.
async fn env_with(name: &str, faults: Faults, extra: &str) -> TestEnv {
    let env = TestEnv::with(
        name,
        EnvOptions {
            sim: SimConfig {
                faults,
                ..Default::default()
            },
            connection_extra: format!(
                "{GENEROUS_BUDGET}\n[connections.{CONNECTION}.items]\n\"overage:storage_gb\" = {ITEM}\n\"overage:api_calls\" = {ITEM}\n"
            ),
            extra: extra.into(),
            ..Default::default()
        },
    )
    .await;
    env.sim.insert_item(ITEM, "Overage");
    env
}

fn all_lines(env: &TestEnv) -> Vec<Value> {
    env.sim
        .invoices()
        .into_iter()
        .flat_map(|h| {
            let ihid = h["id"].clone();
            h["lines"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |mut l| {
                    l["_header"] = ihid.clone();
                    l
                })
        })
        .collect()
}

fn lines_of(env: &TestEnv, sub: &str, metric: &str, start: &str) -> Vec<Value> {
    let m = marker(sub, metric, start);
    all_lines(env)
        .into_iter()
        .filter(|l| l["item_internal_reference"] == m.as_str())
        .collect()
}

/// The one line of an aggregate holding `qty`, if there is exactly one.
fn holds(env: &TestEnv, sub: &str, metric: &str, start: &str, qty: f64) -> bool {
    let lines = lines_of(env, sub, metric, start);
    lines.len() == 1 && lines[0]["qty_order"].as_f64() == Some(qty)
}

#[tokio::test(flavor = "multi_thread")]
async fn one_charge_per_subscription_metric_period_updated_in_place_none_for_zero() {
    let mut env = env_with("ovg-life", Faults::default(), "").await;
    env.spawn_worker(ACCOUNTS);
    env.spawn_worker(WORKER);
    seed_accounts(&env, &["acc_1"]).await;
    let customer = customers_of(&env, "acc_1")[0]["id"].as_i64().unwrap();

    // First charge: a line on a new one-off invoice of the customer.
    env.publish(&charge("o1", "sub_1", "storage_gb", P1, 10.0, "0.25", 1))
        .await;
    env.wait_for("first charge", T, || {
        holds(&env, "sub_1", "storage_gb", P1.0, 10.0)
    })
    .await;
    let line = lines_of(&env, "sub_1", "storage_gb", P1.0).remove(0);
    assert_eq!(line["unit_price"].as_f64(), Some(0.25));
    assert_eq!(line["startdate"], P1.0);
    assert_eq!(line["enddate"], P1.1);
    assert_eq!(line["_itemid"], ITEM);
    assert_eq!(line["isinactive"], false);
    assert_eq!(
        line["item_shortdescription"],
        description("storage_gb", P1, 10.0)
    );
    let invoices = env.sim.invoices();
    assert_eq!(invoices.len(), 1, "{invoices:#?}");
    assert_eq!(invoices[0]["client_id"], customer);
    let line_id = line["id"].clone();

    // A newer version updates the same line; an older one changes nothing.
    env.publish(&charge("o2", "sub_1", "storage_gb", P1, 25.0, "0.30", 2))
        .await;
    env.wait_for("updated in place", T, || {
        holds(&env, "sub_1", "storage_gb", P1.0, 25.0)
    })
    .await;
    env.publish(&charge("o-old", "sub_1", "storage_gb", P1, 99.0, "0.25", 1))
        .await;
    env.wait_drained(Family::Overage, T).await;
    let lines = lines_of(&env, "sub_1", "storage_gb", P1.0);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert_eq!(lines[0]["id"], line_id);
    assert_eq!(lines[0]["qty_order"].as_f64(), Some(25.0));
    assert_eq!(lines[0]["unit_price"].as_f64(), Some(0.30));

    // Another metric of the same period: a second line on the same invoice.
    // Another period: its own invoice.
    env.publish(&charge("o3", "sub_1", "api_calls", P1, 5.0, "0.01", 1))
        .await;
    env.publish(&charge("o4", "sub_1", "storage_gb", P2, 7.0, "0.25", 1))
        .await;
    env.wait_for("other metric and period", T, || {
        holds(&env, "sub_1", "api_calls", P1.0, 5.0)
            && holds(&env, "sub_1", "storage_gb", P2.0, 7.0)
    })
    .await;
    let a = lines_of(&env, "sub_1", "api_calls", P1.0).remove(0);
    assert_eq!(a["_header"], lines[0]["_header"]);
    assert_eq!(env.sim.invoices().len(), 2);

    // Zero overage where there was no charge: an inactive line of quantity
    // 0 that carries the version (so that it survives a lost Redis) ...
    env.publish(&charge("z1", "sub_2", "storage_gb", P1, 0.0, "0.25", 2))
        .await;
    // ... and an earlier charge zeroed and made inactive, never a second line.
    env.publish(&charge("z2", "sub_1", "storage_gb", P1, 0.0, "0.30", 3))
        .await;
    env.wait_drained(Family::Overage, T).await;
    // An older non-zero version arriving after the zero one is superseded.
    env.publish(&charge("z1-old", "sub_2", "storage_gb", P1, 9.0, "0.25", 1))
        .await;
    env.wait_drained(Family::Overage, T).await;
    let none = lines_of(&env, "sub_2", "storage_gb", P1.0);
    assert_eq!(none.len(), 1, "{none:#?}");
    assert_eq!(none[0]["qty_order"].as_f64(), Some(0.0));
    assert_eq!(none[0]["isinactive"], true);
    let zeroed = lines_of(&env, "sub_1", "storage_gb", P1.0);
    assert_eq!(zeroed.len(), 1, "{zeroed:#?}");
    assert_eq!(zeroed[0]["id"], line_id);
    assert_eq!(zeroed[0]["qty_order"].as_f64(), Some(0.0));
    assert_eq!(zeroed[0]["isinactive"], true);
    assert_eq!(env.sim.invoices().len(), 2);
    assert_eq!(all_lines(&env).len(), 4);

    // With Redis lost, a redelivered old event still changes nothing: the
    // version is on the line.
    env.flush_redis().await;
    env.publish(&charge(
        "o-old2",
        "sub_1",
        "storage_gb",
        P1,
        50.0,
        "0.25",
        2,
    ))
    .await;
    env.publish(&charge(
        "z1-old2",
        "sub_2",
        "storage_gb",
        P1,
        9.0,
        "0.25",
        1,
    ))
    .await;
    env.wait_drained(Family::Overage, T).await;
    for sub in ["sub_1", "sub_2"] {
        let after = lines_of(&env, sub, "storage_gb", P1.0);
        assert_eq!(after.len(), 1, "{sub}: {after:#?}");
        assert_eq!(after[0]["qty_order"].as_f64(), Some(0.0), "{sub}");
        assert_eq!(after[0]["isinactive"], true, "{sub}");
    }
    env.assert_no_dead(Family::Overage).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_with_one_rejected_line_applies_the_others_and_dead_letters_that_one() {
    let bad = description("storage_gb", P1, 13.0);
    let mut env = env_with(
        "ovg-reject",
        Faults {
            reject_names: vec![bad.clone()],
            ..Default::default()
        },
        "[worker]\nbatch_max = 100\nbatch_wait = \"500ms\"\n",
    )
    .await;
    env.spawn_worker(ACCOUNTS);
    seed_accounts(&env, &["acc_1"]).await;
    // Queued before the worker starts, so they arrive as one batch.
    let quantities = [11.0, 12.0, 13.0, 14.0, 15.0, 16.0, 17.0, 18.0];
    for (i, q) in quantities.iter().enumerate() {
        env.publish(&overage_event(
            &format!("r{i}"),
            &format!("sub_{i}"),
            "acc_1",
            "storage_gb",
            P1,
            *q,
            "0.25",
            1,
        ))
        .await;
    }
    env.spawn_worker(WORKER);
    env.wait_drained(Family::Overage, T).await;
    for (i, q) in quantities.iter().enumerate() {
        let sub = format!("sub_{i}");
        if *q == 13.0 {
            assert!(lines_of(&env, &sub, "storage_gb", P1.0).is_empty());
        } else {
            assert!(
                holds(&env, &sub, "storage_gb", P1.0, *q),
                "{sub}: {:#?}",
                lines_of(&env, &sub, "storage_gb", P1.0)
            );
        }
    }
    assert_eq!(env.sim.invoices().len(), 1);
    let dead = env.take_dead(Family::Overage).await;
    assert_eq!(dead.len(), 1, "{dead:#?}");
    assert_eq!(dead[0].header("x-halosync-error-class"), "rejected");
    assert!(dead[0].header("x-halosync-event-id") == "r2", "{dead:#?}");
    let msg = dead[0].header("x-halosync-error-message");
    assert!(msg.contains("rejected by validation"), "{msg}");
    assert_eq!(dead[0].header("x-halosync-halo-status"), "400");
    // HaloPSA saved the lines before the refused one (no transaction):
    // they were read back, not sent again, and the rest split in halves
    // down to the refused line: at most 1 + 2·log2(8) requests, not one
    // per line after the first failure.
    assert!(
        env.sim.partial_saves() >= 1,
        "the array was not saved in part"
    );
    // POST /Invoice: the invoice with its 8 lines inline (refused whole),
    // the header alone, then the add_lines arrays.
    let posts = env.count("POST /api/Invoice");
    assert!(posts <= 2 + 7, "{posts} POST /Invoice for 8 lines");
    assert_eq!(all_lines(&env).len(), quantities.len() - 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_mid_batch_loses_nothing_and_doubles_nothing() {
    let mut env = env_with(
        "ovg-kill",
        Faults {
            latency_ms: 150,
            ..Default::default()
        },
        "[worker]\nbatch_max = 100\nbatch_wait = \"300ms\"\n",
    )
    .await;
    env.spawn_worker(ACCOUNTS);
    let accounts = ["acc_1", "acc_2", "acc_3", "acc_4"];
    seed_accounts(&env, &accounts).await;
    let mut expected = Vec::new();
    for (a, acc) in accounts.iter().enumerate() {
        for s in 0..6 {
            let sub = format!("sub_{a}_{s}");
            let q = (a * 10 + s + 1) as f64;
            env.publish(&overage_event(
                &format!("k-{sub}"),
                &sub,
                acc,
                "storage_gb",
                P1,
                q,
                "0.25",
                1,
            ))
            .await;
            expected.push((sub, q));
        }
    }
    let w = env.spawn_worker(WORKER);
    // Kill it after its first lines were written, before it has finished.
    env.wait_for("first lines written", T, || {
        env.count("POST /api/Invoice") >= 1
    })
    .await;
    env.kill_worker(w);
    let written_before = all_lines(&env).len();
    assert!(
        written_before < expected.len(),
        "the worker finished before it was killed"
    );
    env.spawn_worker(WORKER);
    env.wait_drained(Family::Overage, T).await;
    for (sub, q) in &expected {
        assert!(
            holds(&env, sub, "storage_gb", P1.0, *q),
            "{sub}: {:#?}",
            lines_of(&env, sub, "storage_gb", P1.0)
        );
    }
    assert_eq!(all_lines(&env).len(), expected.len());
    assert_eq!(env.sim.invoices().len(), accounts.len());
    env.assert_no_dead(Family::Overage).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn steady_state_updates_a_batch_in_one_request() {
    let mut env = env_with(
        "ovg-steady",
        Faults::default(),
        "[worker]\nbatch_max = 100\nbatch_wait = \"300ms\"\n",
    )
    .await;
    env.spawn_worker(ACCOUNTS);
    seed_accounts(&env, &["acc_1"]).await;
    let n = 20;
    publish_all(&env, n, 1).await;
    let w = env.spawn_worker(WORKER);
    env.wait_drained(Family::Overage, T).await;
    // Queue the second versions while no worker runs: one batch.
    env.stop_worker(w);
    publish_all(&env, n, 2).await;
    let before = api_requests(&env);
    env.spawn_worker(WORKER);
    env.wait_drained(Family::Overage, T).await;
    let used = delta(&api_requests(&env), &before);
    for s in 0..n {
        assert!(holds(
            &env,
            &format!("sub_{s}"),
            "storage_gb",
            P1.0,
            (s + 2) as f64
        ));
    }
    assert_eq!(all_lines(&env).len(), n);
    let total: u64 = used.values().sum();
    eprintln!("steady state: {total} requests for {n} events: {used:?}");
    assert_eq!(
        used.get("POST /api/Invoice/updatelines").copied(),
        Some(1),
        "{used:?}"
    );
    assert!(total <= 1, "{used:?}");
}

async fn publish_all(env: &TestEnv, n: usize, version: u64) {
    for s in 0..n {
        env.publish(&overage_event(
            &format!("s{s}-v{version}"),
            &format!("sub_{s}"),
            "acc_1",
            "storage_gb",
            P1,
            (s as u64 + version) as f64,
            "0.25",
            version,
        ))
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_item_follows_the_subscriptions_sku_when_the_metric_has_no_mapping() {
    const SKU_ITEM: i64 = 1002;
    const METRIC_ITEM: i64 = 1003;
    let mut env = TestEnv::with(
        "ovg-sku",
        EnvOptions {
            connection_extra: format!(
                "{GENEROUS_BUDGET}\n[connections.{CONNECTION}.items]\n\"MS-365-BP\" = {SKU_ITEM}\n\"MS-365-BP:bandwidth\" = {METRIC_ITEM}\n"
            ),
            ..Default::default()
        },
    )
    .await;
    env.sim
        .insert_item(SKU_ITEM, "Microsoft 365 Business Premium");
    env.sim.insert_item(METRIC_ITEM, "Bandwidth overage");
    env.spawn_worker(ACCOUNTS);
    env.spawn_worker("halosync-subscription");
    env.spawn_worker(WORKER);
    seed_accounts(&env, &["acc_1"]).await;
    env.publish(&halosync_tests::subscription_event(
        "s1", "sub_1", "acc_1", 5, "active", 1,
    ))
    .await;
    env.wait_drained(Family::Subscription, T).await;
    // `<sku>:<metric>` first, then `<sku>`.
    env.publish(&charge("b1", "sub_1", "bandwidth", P1, 3.0, "1.50", 1))
        .await;
    env.publish(&charge("c1", "sub_1", "calls", P1, 4.0, "0.10", 1))
        .await;
    // A subscription HaloPSA does not have yet: dependency, retried, then
    // dead-lettered as such.
    env.publish(&charge("m1", "sub_missing", "calls", P1, 4.0, "0.10", 1))
        .await;
    env.wait_drained(Family::Overage, T).await;
    let b = lines_of(&env, "sub_1", "bandwidth", P1.0);
    assert_eq!(b.len(), 1, "{b:#?}");
    assert_eq!(b[0]["_itemid"], METRIC_ITEM);
    let c = lines_of(&env, "sub_1", "calls", P1.0);
    assert_eq!(c.len(), 1, "{c:#?}");
    assert_eq!(c[0]["_itemid"], SKU_ITEM);
    assert!(lines_of(&env, "sub_missing", "calls", P1.0).is_empty());
    // Its retries may outlast the drain check: wait for its dead letter.
    let deadline = std::time::Instant::now() + T;
    let mut dead = Vec::new();
    while dead.is_empty() && std::time::Instant::now() < deadline {
        dead = env.take_dead(Family::Overage).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(dead.len(), 1, "{dead:#?}");
    assert_eq!(dead[0].header("x-halosync-error-class"), "dependency");
    assert!(dead[0]
        .header("x-halosync-error-message")
        .contains("sub_missing"));
}

/// Publishes one charge per `(sub, account, overage)` of period `p`, with
/// `sequence`, while no overage worker runs (so that they arrive as one
/// batch), then runs one until the queue is drained.
async fn batch_of(
    env: &mut TestEnv,
    p: (&str, &str),
    charges: &[(String, &str, f64)],
    sequence: u64,
) {
    for (sub, account, q) in charges {
        env.publish(&overage_event(
            &format!("{sub}-{}-{sequence}", p.0),
            sub,
            account,
            "storage_gb",
            p,
            *q,
            "0.25",
            sequence,
        ))
        .await;
    }
    let w = env.spawn_worker(WORKER);
    env.wait_drained(Family::Overage, T).await;
    env.stop_worker(w);
}

/// New and known periods while the `POST /Invoice` that carries the lines
/// (inline on the create, `add_lines` on a known invoice) loses its
/// answer or is saved in part: exactly one charge per (subscription,
/// metric, period), holding the newest quantity.
#[tokio::test(flavor = "multi_thread")]
async fn add_lines_saved_in_part_or_unanswered_leave_one_charge_at_the_newest_quantity() {
    let bad = description("storage_gb", P1, 66.0);
    let reject = |lose_next| Faults {
        reject_names: vec![bad.clone()],
        lose_next,
        ..Default::default()
    };
    let mut env = env_with(
        "ovg-addlines",
        reject(0),
        "[worker]\nbatch_max = 100\nbatch_wait = \"300ms\"\n",
    )
    .await;
    let a = env.spawn_worker(ACCOUNTS);
    seed_accounts(&env, &["acc_1", "acc_2"]).await;
    env.wait_drained(Family::Account, T).await;
    env.stop_worker(a);
    let charges = |range: std::ops::Range<usize>, bump: f64| -> Vec<(String, &'static str, f64)> {
        range
            .flat_map(|i| {
                [
                    (format!("sub_a{i}"), "acc_1", 10.0 + i as f64 + bump),
                    (format!("sub_b{i}"), "acc_2", 20.0 + i as f64 + bump),
                ]
            })
            .collect()
    };
    let mut expected: BTreeMap<String, f64> = BTreeMap::new();

    // 1. A new period: each account's invoice is created with its lines
    //    inline, and the answer of the first create is lost.
    env.sim.set_faults(reject(1));
    let first = charges(0..4, 0.0);
    batch_of(&mut env, P1, &first, 1).await;
    assert_eq!(env.sim.lost_responses(), 1);
    assert_eq!(env.sim.invoices().len(), 2, "{:#?}", env.sim.invoices());
    expected.extend(first.iter().map(|(s, _, q)| (s.clone(), *q)));

    // 2. The known period: new charges through `add_lines` on
    //    `POST /Invoice`; the first such answer is lost.
    let posts_before = env.count("POST /api/Invoice");
    env.sim.set_faults(reject(1));
    let second = charges(4..8, 0.0);
    batch_of(&mut env, P1, &second, 1).await;
    assert_eq!(env.sim.lost_responses(), 2);
    assert!(env.count("POST /api/Invoice") > posts_before);
    expected.extend(second.iter().map(|(s, _, q)| (s.clone(), *q)));

    // 3. Saved in part: on acc_2's invoice the line after sub_b8 is
    //    refused (its description is refused by validation); sub_b8 is
    //    saved, the request answers 400. sub_b9 alone is dead-lettered.
    env.sim.set_faults(reject(0));
    let mut third = charges(8..11, 0.0);
    for c in &mut third {
        if c.0 == "sub_b9" {
            c.2 = 66.0;
        }
    }
    batch_of(&mut env, P1, &third, 1).await;
    assert!(env.sim.partial_saves() >= 1, "no partial save");
    let dead = env.take_dead(Family::Overage).await;
    assert_eq!(dead.len(), 1, "{dead:#?}");
    assert_eq!(dead[0].header("x-halosync-error-class"), "rejected");
    assert!(lines_of(&env, "sub_b9", "storage_gb", P1.0).is_empty());
    expected.extend(
        third
            .iter()
            .filter(|(s, _, _)| s != "sub_b9")
            .map(|(s, _, q)| (s.clone(), *q)),
    );

    // 4. Newer quantities for every charge (updates, and sub_b9's add),
    //    with lost answers again.
    env.sim.set_faults(reject(2));
    let newer = charges(0..11, 100.0);
    batch_of(&mut env, P1, &newer, 2).await;
    expected = newer.iter().map(|(s, _, q)| (s.clone(), *q)).collect();

    for (sub, q) in &expected {
        assert!(
            holds(&env, sub, "storage_gb", P1.0, *q),
            "{sub} should hold {q}: {:#?}",
            lines_of(&env, sub, "storage_gb", P1.0)
        );
    }
    assert_eq!(
        all_lines(&env).len(),
        expected.len(),
        "a charge was doubled"
    );
    assert_eq!(env.sim.invoices().len(), 2);
    env.assert_no_dead(Family::Overage).await;
}
