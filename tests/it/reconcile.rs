//! `halosync reconcile` end to end: state set up through the real workers
//! (RabbitMQ and Redis for real, halo-sim in process), then edited in
//! halo-sim as an MSP would, then the `halosync` binary run on a snapshot.
//!
//! * `reports_each_msp_edit_as_its_own_drift`: one edit per drift kind, one
//!   step each; after every step the report names exactly the drifts made
//!   so far (aggregate, kind, record, fields) and exits 1; the untouched
//!   state exits 0; `--repair` publishes the drifted aggregates' snapshot
//!   events with `x-halosync-repair: true` (seen on a test queue), orphans
//!   excluded.
//! * `drift_is_repaired_by_repair_events`: the round trip; needs the
//!   workers to apply repairs (DESIGN §8), which the worker side provides.
//! * `an_invalid_snapshot_line_stops_before_any_request`,
//!   `bad_command_lines_say_what_to_type`.
//! * `three_thousand_subscriptions_fit_one_fair_use_window`: a seeded tenant,
//!   read at about one request per 100 records under a 300/5 min limit.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use halo_sim::Faults;
use halosync_shared::contract::Family;
use halosync_tests::{
    account_event, binary_path, customers_of, overage_event, subscription_event, usage_event,
    EnvOptions, TestEnv, ALL_WORKERS, CONNECTION, SECRET_ENV,
};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(40);
const ITEM: i64 = 1001;

/// The result of one `halosync reconcile` run.
struct Run {
    code: i32,
    report: Value,
    stderr: String,
}

fn reconcile(env: &TestEnv, config: &Path, snapshot: &Path, extra: &[&str]) -> Run {
    let out = Command::new(binary_path("halosync"))
        .arg("--config")
        .arg(config)
        .args([
            "reconcile",
            "--connection",
            CONNECTION,
            "--json",
            "--snapshot",
        ])
        .arg(snapshot)
        .args(extra)
        .env(SECRET_ENV, env.sim_secret())
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run halosync: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let report = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    Run {
        code: out.status.code().unwrap_or(-1),
        report,
        stderr: format!("{stdout}{stderr}"),
    }
}

fn write_snapshot(env: &TestEnv, name: &str, events: &[&Value]) -> PathBuf {
    let path = env.dir.join(name);
    let text: String = events.iter().map(|e| format!("{e}\n")).collect();
    std::fs::write(&path, text).expect("write snapshot");
    path
}

/// (family, aggregate, kind, record, fields) of every drift of a report.
fn drifts(report: &Value) -> BTreeSet<(String, String, String, String, Vec<String>)> {
    report["drifts"]
        .as_array()
        .unwrap_or_else(|| panic!("no drifts in {report:#}"))
        .iter()
        .map(|d| {
            let mut fields: Vec<String> = d["fields"]
                .as_array()
                .map(|f| {
                    f.iter()
                        .map(|x| x["field"].as_str().unwrap_or("").to_string())
                        .collect()
                })
                .unwrap_or_default();
            fields.sort();
            (
                d["family"].as_str().unwrap_or("").to_string(),
                d["aggregate"].as_str().unwrap_or("").to_string(),
                d["kind"].as_str().unwrap_or("").to_string(),
                d["record"].as_str().unwrap_or("").to_string(),
                fields,
            )
        })
        .collect()
}

fn d(
    family: &str,
    aggregate: &str,
    kind: &str,
    record: &str,
    fields: &[&str],
) -> (String, String, String, String, Vec<String>) {
    (
        family.into(),
        aggregate.into(),
        kind.into(),
        record.into(),
        fields.iter().map(|f| f.to_string()).collect(),
    )
}

fn marker(sub: &str) -> String {
    format!("halosync.subscription:{sub}")
}

fn licence_of(env: &TestEnv, sub: &str) -> Value {
    let found: Vec<Value> = env
        .sim
        .licences()
        .into_iter()
        .filter(|l| l["thirdparty_client_id"] == marker(sub))
        .collect();
    assert_eq!(found.len(), 1, "licence of {sub}: {found:?}");
    found[0].clone()
}

/// (header id, line) of the subscription's recurring lines.
fn lines_of(env: &TestEnv, marker: &str) -> Vec<(i64, Value)> {
    let mut out = Vec::new();
    for inv in env.sim.recurring_invoices() {
        for l in inv["lines"].as_array().cloned().unwrap_or_default() {
            if l["item_internal_reference"] == marker {
                out.push((inv["id"].as_i64().unwrap_or(0), l));
            }
        }
    }
    out
}

fn overage_lines(env: &TestEnv) -> usize {
    env.sim
        .invoices()
        .iter()
        .flat_map(|i| i["lines"].as_array().cloned().unwrap_or_default())
        .filter(|l| {
            l["item_internal_reference"]
                .as_str()
                .is_some_and(|m| m.starts_with("halosync.overage:"))
        })
        .count()
}

/// HaloPSA writes so far (every POST and DELETE under /api).
fn writes(env: &TestEnv) -> u64 {
    env.sim
        .counts()
        .iter()
        .filter(|(k, _)| k.starts_with("POST /api") || k.starts_with("DELETE /api"))
        .map(|(_, v)| *v)
        .sum()
}

const SUBS: [&str; 5] = ["sub_del", "sub_qty", "sub_price", "sub_dup", "sub_orphan"];
const USAGE_MARKER: &str = "halosync.usage:sub_qty:storage_gb";

/// Two accounts, five subscriptions of `acc_1`, a usage figure and an
/// overage charge, all written by the workers. Returns the events (the
/// in-step snapshot).
async fn setup(name: &str) -> (TestEnv, Vec<Value>) {
    let mut env = TestEnv::with(
        name,
        EnvOptions::mapping("overwrite_prices = true", &[("MS-365-BP", ITEM)]),
    )
    .await;
    env.sim.insert_item(ITEM, "Microsoft 365 Business Premium");
    env.spawn_workers(&ALL_WORKERS);
    let mut events = vec![
        account_event("e-acc-1", "acc_1", "Contoso Ltd", true, 1),
        account_event("e-acc-2", "acc_2", "Fabrikam Inc", true, 1),
    ];
    for (i, s) in SUBS.iter().enumerate() {
        events.push(subscription_event(
            &format!("e-{s}"),
            s,
            "acc_1",
            5 + i as u64,
            "active",
            1,
        ));
    }
    events.push(usage_event(
        "e-usage-1",
        "sub_qty",
        "acc_1",
        "storage_gb",
        ("2026-11-01", "2026-11-30"),
        12.5,
        1,
    ));
    events.push(overage_event(
        "e-over-1",
        "sub_qty",
        "acc_1",
        "bandwidth",
        ("2026-11-01", "2026-11-30"),
        5.0,
        "0.50",
        1,
    ));
    for (i, e) in events.iter().enumerate() {
        env.publish(e).await;
        // Accounts first, so that the others do not wait for a retry tier.
        if i == 1 {
            env.wait_for("customers", T, || {
                customers_of(&env, "acc_1").len() == 1 && customers_of(&env, "acc_2").len() == 1
            })
            .await;
        }
    }
    env.wait_for("every record written", T, || {
        SUBS.iter().all(|s| lines_of(&env, &marker(s)).len() == 1)
            && env.sim.licences().len() == SUBS.len()
            && lines_of(&env, USAGE_MARKER).len() == 1
            && overage_lines(&env) == 1
    })
    .await;
    (env, events)
}

/// A queue bound to the events exchange, to see what `--repair` publishes.
async fn watch_events(env: &TestEnv) -> lapin::Consumer {
    let ch = env.publisher.channel();
    let queue = format!("{}reconcile-watch", env.prefix);
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare the watch queue");
    ch.queue_bind(
        queue.as_str().into(),
        env.topology.events_exchange().as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind the watch queue");
    ch.basic_consume(
        queue.as_str().into(),
        "reconcile-watch".into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("consume the watch queue")
}

/// The (aggregate, repair header) of `n` messages of the watch queue.
async fn take_published(consumer: &mut lapin::Consumer, n: usize) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    while out.len() < n {
        let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "only {} of {n} repair events were published: {out:?}",
                    out.len()
                )
            })
            .expect("consumer ended")
            .expect("delivery");
        let body: Value = serde_json::from_slice(&delivery.data).expect("JSON body");
        let repair = matches!(
            delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get(halosync_shared::amqp::headers::REPAIR)),
            Some(AMQPValue::Boolean(true))
        );
        let d = &body["data"];
        let key = d["subscription_id"]
            .as_str()
            .or(d["account_id"].as_str())
            .unwrap_or("")
            .to_string();
        out.push((key, repair));
        delivery.ack(BasicAckOptions::default()).await.expect("ack");
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reports_each_msp_edit_as_its_own_drift() {
    let (env, events) = setup("rec-drift").await;
    let all: Vec<&Value> = events.iter().collect();
    let snap = write_snapshot(&env, "all.jsonl", &all);
    let config = env.config_path.clone();
    // The workers' last writes (link versions) may still be landing: wait
    // until HaloPSA's write count holds still, then count.
    let mut writes_at_start = writes(&env);
    loop {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let now = writes(&env);
        if now == writes_at_start {
            break;
        }
        writes_at_start = now;
    }

    // In step: exit 0, no drift, every family compared.
    let r = reconcile(&env, &config, &snap, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.report["in_step"], true);
    assert_eq!(r.report["snapshot"]["aggregates"], 9, "{:#}", r.report);
    let mut expected = BTreeSet::new();

    // 1. A recurring line deleted.
    let (_, line) = lines_of(&env, &marker("sub_del")).remove(0);
    assert!(env
        .sim
        .delete_line("RecurringInvoiceLine", line["id"].as_i64().unwrap()));
    expected.insert(d(
        "subscription",
        "sub_del",
        "missing",
        "recurring line",
        &[],
    ));
    let r = reconcile(&env, &config, &snap, &[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(drifts(&r.report), expected, "{:#}", r.report);
    assert_eq!(r.report["counts"]["missing"], 1);

    // 2. A licence count changed.
    let lic = licence_of(&env, "sub_qty");
    env.sim.update_record(
        "SoftwareLicence",
        lic["id"].as_i64().unwrap(),
        json!({"count": 99}),
    );
    expected.insert(d(
        "subscription",
        "sub_qty",
        "differs",
        "licence",
        &["quantity"],
    ));
    let r = reconcile(&env, &config, &snap, &[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(drifts(&r.report), expected, "{:#}", r.report);
    let qty = r.report["drifts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["aggregate"] == "sub_qty")
        .unwrap()
        .clone();
    assert_eq!(qty["fields"][0]["snapshot"], 6);
    assert_eq!(qty["fields"][0]["halo"], 99);
    assert_eq!(qty["snapshot_version"], "s=1;t=2026-11-22T10:15:00.123Z");
    assert!(qty["applied_version"].is_string(), "{qty:#}");

    // 3. A customer inactivated.
    let c = customers_of(&env, "acc_2").remove(0);
    env.sim.update_record(
        "Client",
        c["id"].as_i64().unwrap(),
        json!({"inactive": true}),
    );
    expected.insert(d("account", "acc_2", "differs", "customer", &["active"]));
    let r = reconcile(&env, &config, &snap, &[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(drifts(&r.report), expected, "{:#}", r.report);

    // 4. A price changed by the MSP: drift under overwrite_prices = true,
    //    not under false.
    let lic = licence_of(&env, "sub_price");
    env.sim.update_record(
        "SoftwareLicence",
        lic["id"].as_i64().unwrap(),
        json!({"price": 30.0}),
    );
    let (_, line) = lines_of(&env, &marker("sub_price")).remove(0);
    env.sim.update_record(
        "RecurringInvoiceLine",
        line["id"].as_i64().unwrap(),
        json!({"unit_price": 30.0}),
    );
    let r = reconcile(&env, &config, &snap, &[]);
    let mut with_prices = expected.clone();
    with_prices.insert(d(
        "subscription",
        "sub_price",
        "differs",
        "licence",
        &["unit_price"],
    ));
    with_prices.insert(d(
        "subscription",
        "sub_price",
        "differs",
        "recurring line",
        &["unit_price"],
    ));
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(drifts(&r.report), with_prices, "{:#}", r.report);
    let text = std::fs::read_to_string(&config).unwrap();
    let keep_prices = env.dir.join("keep-prices.toml");
    std::fs::write(
        &keep_prices,
        text.replace("overwrite_prices = true", "overwrite_prices = false"),
    )
    .unwrap();
    let r = reconcile(&env, &keep_prices, &snap, &[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(
        drifts(&r.report),
        expected,
        "an MSP price under overwrite_prices = false is not drift: {:#}",
        r.report
    );
    expected = with_prices;

    // 5. A duplicate line added (same content, same marker).
    let (ihid, line) = lines_of(&env, &marker("sub_dup")).remove(0);
    let mut copy = line.clone();
    copy.as_object_mut().unwrap().remove("id");
    env.sim
        .insert_line("RecurringInvoiceLine", ihid, copy)
        .expect("header exists");
    expected.insert(d(
        "subscription",
        "sub_dup",
        "duplicated",
        "recurring line",
        &[],
    ));
    let r = reconcile(&env, &config, &snap, &[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(drifts(&r.report), expected, "{:#}", r.report);

    // 6. An orphan: a subscription the snapshot does not hold.
    let without: Vec<&Value> = events
        .iter()
        .filter(|e| {
            e["data"]["subscription_id"] != "sub_orphan" || e["type"] != "subscription.created"
        })
        .collect();
    let snap2 = write_snapshot(&env, "without-orphan.jsonl", &without);
    expected.insert(d("subscription", "sub_orphan", "orphaned", "licence", &[]));
    expected.insert(d(
        "subscription",
        "sub_orphan",
        "orphaned",
        "recurring line",
        &[],
    ));
    let r = reconcile(&env, &config, &snap2, &[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(drifts(&r.report), expected, "{:#}", r.report);
    assert_eq!(r.report["counts"]["orphaned"], 2);
    assert!(env.sim.licences().len() == SUBS.len(), "nothing deleted");

    // Scope: --family and --account narrow the report.
    let r = reconcile(&env, &config, &snap2, &["--family", "account"]);
    assert_eq!(
        drifts(&r.report),
        [d("account", "acc_2", "differs", "customer", &["active"])].into(),
        "{:#}",
        r.report
    );
    let r = reconcile(&env, &config, &snap2, &["--account", "acc_2"]);
    assert_eq!(
        drifts(&r.report),
        [d("account", "acc_2", "differs", "customer", &["active"])].into(),
        "{:#}",
        r.report
    );
    let r = reconcile(&env, &config, &snap2, &["--family", "usage,overage"]);
    assert_eq!(r.code, 0, "{:#}", r.report);

    // Nothing was written by any of these runs.
    assert_eq!(writes(&env), writes_at_start, "{:?}", env.sim.counts());

    // --repair: the drifted aggregates' snapshot events, with the header;
    // never the orphan's.
    let mut watch = watch_events(&env).await;
    let r = reconcile(&env, &config, &snap2, &["--repair"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(r.report["repair"]["published"], 5, "{:#}", r.report);
    let published = take_published(&mut watch, 5).await;
    assert_eq!(
        published,
        vec![
            ("acc_2".to_string(), true),
            ("sub_del".to_string(), true),
            ("sub_dup".to_string(), true),
            ("sub_price".to_string(), true),
            ("sub_qty".to_string(), true),
        ]
    );
    // The table form is what an operator reads (and the README shows).
    let out = Command::new(binary_path("halosync"))
        .arg("--config")
        .arg(&config)
        .args(["reconcile", "--connection", CONNECTION, "--snapshot"])
        .arg(&snap2)
        .env(SECRET_ENV, env.sim_secret())
        .output()
        .expect("run halosync");
    let table = String::from_utf8_lossy(&out.stdout);
    eprintln!("{table}");
    assert!(
        table.contains("sub_orphan") && table.contains("orphaned"),
        "{table}"
    );
}

/// Runs `reconcile` (no repair) until it exits 0, failing after `T` with
/// the last report and the workers' logs.
async fn until_clean(env: &TestEnv, config: &Path, snap: &Path) {
    let deadline = Instant::now() + T;
    loop {
        let r = reconcile(env, config, snap, &[]);
        if r.code == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still drifted after the repair events: {:#}\nworker logs:\n{}",
            r.report,
            halosync_tests::tail(&env.logs(), 40)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The round trip: `--repair` republishes, the workers apply the repairs,
/// and the next reconcile is clean. Needs the worker side of DESIGN §8
/// (a repair is applied even when its version equals the applied one, is
/// not dropped by the processed-event ledger, re-adds a deleted line,
/// retires duplicate lines keeping the lowest id, re-activates a customer).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drift_is_repaired_by_repair_events() {
    let (env, events) = setup("rec-repair").await;
    let all: Vec<&Value> = events.iter().collect();
    let snap = write_snapshot(&env, "all.jsonl", &all);
    let config = env.config_path.clone();
    // The MSP's edits.
    let (_, line) = lines_of(&env, &marker("sub_del")).remove(0);
    env.sim
        .delete_line("RecurringInvoiceLine", line["id"].as_i64().unwrap());
    let lic = licence_of(&env, "sub_qty");
    env.sim.update_record(
        "SoftwareLicence",
        lic["id"].as_i64().unwrap(),
        json!({"count": 99}),
    );
    let c = customers_of(&env, "acc_2").remove(0);
    env.sim.update_record(
        "Client",
        c["id"].as_i64().unwrap(),
        json!({"inactive": true}),
    );
    let (ihid, dup_line) = lines_of(&env, &marker("sub_dup")).remove(0);
    let kept = dup_line["id"].as_i64().unwrap();
    let mut copy = dup_line.clone();
    copy.as_object_mut().unwrap().remove("id");
    env.sim
        .insert_line("RecurringInvoiceLine", ihid, copy)
        .unwrap();
    let (_, usage_line) = lines_of(&env, USAGE_MARKER).remove(0);
    env.sim.update_record(
        "RecurringInvoiceLine",
        usage_line["id"].as_i64().unwrap(),
        json!({"qty_order": 1.0}),
    );

    // A price the MSP changed, under overwrite_prices = true: drift.
    let lic = licence_of(&env, "sub_price");
    env.sim.update_record(
        "SoftwareLicence",
        lic["id"].as_i64().unwrap(),
        json!({"price": 30.0}),
    );
    let (_, price_line) = lines_of(&env, &marker("sub_price")).remove(0);
    env.sim.update_record(
        "RecurringInvoiceLine",
        price_line["id"].as_i64().unwrap(),
        json!({"unit_price": 30.0}),
    );

    let r = reconcile(&env, &config, &snap, &["--repair"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(r.report["repair"]["published"], 6, "{:#}", r.report);

    // The workers apply the repairs; the next reconcile is clean.
    until_clean(&env, &config, &snap).await;
    let lines = lines_of(&env, &marker("sub_dup"));
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(
        lines[0].1["id"].as_i64(),
        Some(kept),
        "the lowest id is kept"
    );
    assert_eq!(lines_of(&env, &marker("sub_del")).len(), 1, "re-added");
    assert_eq!(
        licence_of(&env, "sub_price")["price"],
        22.0,
        "price put back"
    );
    assert_eq!(licence_of(&env, "sub_qty")["count"], 6, "count put back");
    assert_eq!(
        customers_of(&env, "acc_2")[0]["inactive"],
        false,
        "active again"
    );
}

/// Issue 22: the MSP deletes the customer's halosync recurring invoice and
/// the overage invoice in HaloPSA (`DELETE /RecurringInvoice/{id}`,
/// `DELETE /Invoice/{id}`: the lines go, the links stay) while Redis still
/// caches their ids. `--repair` reports and republishes; the workers find
/// or create each invoice again and put every line back, nothing is
/// dead-lettered, and the next reconcile is clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deleted_invoice_is_put_back_by_repair_events() {
    let (env, events) = setup("rec-deleted-invoice").await;
    let all: Vec<&Value> = events.iter().collect();
    let snap = write_snapshot(&env, "all.jsonl", &all);
    let config = env.config_path.clone();
    let (recurring, _) = lines_of(&env, &marker("sub_qty")).remove(0);
    assert!(env.sim.delete_record("RecurringInvoice", recurring));
    let one_off: Vec<i64> = env
        .sim
        .invoices()
        .iter()
        .filter_map(|i| i["id"].as_i64())
        .collect();
    assert_eq!(one_off.len(), 1, "one overage invoice");
    assert!(env.sim.delete_record("Invoice", one_off[0]));
    assert_eq!(overage_lines(&env), 0);

    let r = reconcile(&env, &config, &snap, &["--repair"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    until_clean(&env, &config, &snap).await;
    for s in SUBS {
        assert_eq!(lines_of(&env, &marker(s)).len(), 1, "{s}: its line back");
    }
    assert_eq!(lines_of(&env, USAGE_MARKER).len(), 1, "the usage line back");
    assert_eq!(overage_lines(&env), 1, "the charge back");
    assert_eq!(
        env.sim.recurring_invoices().len(),
        1,
        "one recurring invoice"
    );
    assert_eq!(env.sim.invoices().len(), 1, "one overage invoice");
    for f in [
        Family::Account,
        Family::Subscription,
        Family::Usage,
        Family::Overage,
    ] {
        env.assert_no_dead(f).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_snapshot_line_stops_before_any_request() {
    let env = TestEnv::new("rec-invalid").await;
    let good = account_event("e1", "acc_1", "Contoso", true, 1);
    let mut bad = subscription_event("e2", "sub_1", "acc_1", 1, "active", 1);
    bad["data"]["quantity"] = json!(-3);
    let path = env.dir.join("bad.jsonl");
    std::fs::write(&path, format!("{good}\n\n{bad}\n")).unwrap();
    let r = reconcile(&env, &env.config_path, &path, &["--repair"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("snapshot line 3"), "{}", r.stderr);
    assert!(r.stderr.contains("quantity"), "the reason: {}", r.stderr);
    std::fs::write(&path, format!("{good}\n{{\"id\": oops\n")).unwrap();
    let r = reconcile(&env, &env.config_path, &path, &[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("snapshot line 2") && r.stderr.contains("JSON"),
        "{}",
        r.stderr
    );
    // Nothing read, nothing written: not even a token.
    assert!(env.sim.counts().is_empty(), "{:?}", env.sim.counts());
    // An unreachable file is "could not run" too.
    let r = reconcile(
        &env,
        &env.config_path,
        Path::new("/nonexistent/state.jsonl"),
        &[],
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("cannot read the snapshot"),
        "{}",
        r.stderr
    );
}

#[tokio::test]
async fn bad_command_lines_say_what_to_type() {
    let env = TestEnv::new("rec-cli").await;
    let snap = env.dir.join("none.jsonl");
    let r = reconcile(&env, &env.config_path, &snap, &["--family", "acount"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("account, subscription, usage, overage"),
        "{}",
        r.stderr
    );
    let r = reconcile(&env, &env.config_path, &snap, &["--account", "acc 1"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("--account acc_1001"), "{}", r.stderr);
    let out = Command::new(binary_path("halosync"))
        .args(["--config"])
        .arg(&env.config_path)
        .args(["reconcile", "--connection", "nope", "--snapshot", "-"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("--connection acme"), "{text}");
}

/// 3,000 subscriptions of 30 customers, seeded straight into halo-sim in
/// the shape the workers write, reconciled under HaloPSA's fair-use limit
/// (300 requests per rolling 5 minutes, enforced by the sim) and the same
/// budget in the config: in step, about one request per 100 records, no
/// 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_thousand_subscriptions_fit_one_fair_use_window() {
    const ACCOUNTS: usize = 30;
    const PER_ACCOUNT: usize = 100;
    let env = TestEnv::with(
        "rec-3000",
        EnvOptions::rate_limited(
            300,
            300,
            true,
            Faults::default(),
            "requests_per_window = 300\nwindow_seconds = 300",
        ),
    )
    .await;
    let sim = &env.sim;
    // A customer holds the id of HaloPSA's `/Currency` row, not the code.
    let gbp = sim
        .currencies()
        .into_iter()
        .find(|c| c["code"] == "GBP")
        .map(|c| c["id"].clone())
        .unwrap_or_default();
    let mut snapshot = Vec::new();
    let mut records = 0usize;
    for a in 0..ACCOUNTS {
        let account = format!("acc_{a:03}");
        let ev = account_event(
            &format!("e-{account}"),
            &account,
            &format!("Customer {a}"),
            true,
            1,
        );
        let client = sim
            .insert_record(
                "Client",
                json!({"name": format!("Customer {a}"), "inactive": false,
                       "website": format!("https://{account}.example"), "default_currency_code": gbp}),
            )
            .unwrap();
        sim.insert_record(
            "ExternalLink",
            json!({"third_party_id": account, "third_party_type": "halosync.account",
                   "halo_id": client, "table_id": 2, "third_party_secondary_id": "s=1"}),
        );
        let invoice = sim
            .insert_record(
                "RecurringInvoice",
                json!({"client_id": client, "reference": format!("halosync {account}")}),
            )
            .unwrap();
        sim.insert_record(
            "ExternalLink",
            json!({"third_party_id": account, "third_party_type": "halosync.recurring_invoice",
                   "halo_id": invoice, "table_id": 995}),
        );
        records += 4;
        snapshot.push(ev);
        for s in 0..PER_ACCOUNT {
            let sub = format!("sub_{a:03}_{s:03}");
            let qty = 1 + (s as u64 % 20);
            snapshot.push(subscription_event(
                &format!("e-{sub}"),
                &sub,
                &account,
                qty,
                "active",
                1,
            ));
            let licence = sim
                .insert_record(
                    "SoftwareLicence",
                    json!({"client_id": client, "name": "Microsoft 365 Business Premium",
                           "count": qty, "start_date": "2026-11-01T00:00:00", "billing_cycle": "monthly",
                           "status": "active", "is_active": true, "product_sku": "MS-365-BP",
                           "price": 22.0, "purchase_price": 18.7, "thirdparty_client_id": marker(&sub)}),
                )
                .unwrap();
            sim.insert_record(
                "ExternalLink",
                json!({"third_party_id": sub, "third_party_type": "halosync.subscription",
                       "halo_id": licence, "table_id": 0, "third_party_secondary_id": "s=1"}),
            );
            sim.insert_line(
                "RecurringInvoiceLine",
                invoice,
                json!({"_itemid": ITEM, "qty_order": qty as f64, "isinactive": false,
                       "startdate": "2026-11-01T00:00:00", "item_internal_reference": marker(&sub),
                       "item_shortdescription": "Microsoft 365 Business Premium",
                       "unit_price": 22.0, "unit_cost": 18.7}),
            )
            .unwrap();
            records += 2;
        }
    }
    let refs: Vec<&Value> = snapshot.iter().collect();
    let snap = write_snapshot(&env, "3000.jsonl", &refs);
    let started = Instant::now();
    let r = reconcile(&env, &env.config_path, &snap, &[]);
    let took = started.elapsed();
    assert_eq!(r.code, 0, "{}", r.stderr);
    let api_requests: u64 = env
        .sim
        .counts()
        .iter()
        .filter(|(k, _)| k.starts_with("GET /api"))
        .map(|(_, v)| *v)
        .sum();
    let writes: u64 = env
        .sim
        .counts()
        .iter()
        .filter(|(k, _)| !k.starts_with("GET ") && !k.contains("/auth/"))
        .map(|(_, v)| *v)
        .sum();
    eprintln!(
        "3,000 subscriptions ({records} HaloPSA records): {api_requests} requests in {took:?}; report says {}",
        r.report["requests"]
    );
    assert_eq!(r.report["requests"].as_u64(), Some(api_requests));
    assert!(
        api_requests as usize <= records.div_ceil(100) + 6,
        "{api_requests} requests for {records} records"
    );
    assert_eq!(env.sim.rate_limited(), 0, "no 429");
    assert!(env.sim.max_requests_in_any_window(300) <= 300);
    assert_eq!(writes, 0, "nothing written: {:?}", env.sim.counts());
}
