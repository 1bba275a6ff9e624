//! Repairs (DESIGN §8) end to end: an MSP changes HaloPSA by hand, the
//! same events come again marked `x-halosync-repair: true` (what
//! `halosync reconcile --repair` publishes), and the workers put back what
//! drifted, in every family, even though the version is not newer; a
//! normal event newer than a repair still wins.
//!
//! RabbitMQ and Redis for real, halo-sim in process, the four workers as
//! child processes.

use std::time::Duration;

use halosync_shared::amqp::headers;
use halosync_shared::contract::Family;
use halosync_tests::{
    account_event, customers_of, overage_event, subscription_event, usage_event, EnvOptions,
    TestEnv, ALL_WORKERS,
};
use lapin::types::FieldTable;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);
const ITEM: i64 = 1001;
const STORAGE: i64 = 2001;
const PERIOD: (&str, &str) = ("2026-11-01", "2026-11-30");

async fn env(name: &str) -> TestEnv {
    let mut env = TestEnv::with(
        name,
        EnvOptions::mapping(
            "",
            &[
                ("MS-365-BP", ITEM),
                ("MS-365-BP:storage_gb", STORAGE),
                ("overage:storage_gb", STORAGE),
            ],
        ),
    )
    .await;
    env.sim.insert_item(ITEM, "Microsoft 365 Business Premium");
    env.sim.insert_item(STORAGE, "Storage");
    env.spawn_workers(&ALL_WORKERS);
    env
}

const FAMILIES: [Family; 4] = [
    Family::Account,
    Family::Subscription,
    Family::Usage,
    Family::Overage,
];

/// Every family's queues drained (waited for together).
async fn drained(env: &TestEnv) {
    futures::future::join_all(FAMILIES.map(|f| env.wait_drained(f, T))).await;
}

/// Publishes an event marked as a repair, as `reconcile --repair` does.
async fn publish_repair(env: &TestEnv, event: &Value) {
    let mut h = FieldTable::default();
    h.insert(
        headers::REPAIR.into(),
        lapin::types::AMQPValue::Boolean(true),
    );
    let body = serde_json::to_vec(event).expect("json");
    env.publisher
        .publish_raw(
            event["id"].as_str().unwrap_or("none"),
            event["type"].as_str().unwrap_or("none"),
            &body,
            h,
        )
        .await
        .expect("publish confirmed");
}

/// Every line of every invoice (recurring and one-off) carrying `marker`
/// exactly and live (not retired).
fn live_lines(env: &TestEnv, marker: &str) -> Vec<Value> {
    env.sim
        .recurring_invoices()
        .into_iter()
        .chain(env.sim.invoices())
        .flat_map(|h| h["lines"].as_array().cloned().unwrap_or_default())
        .filter(|l| l["item_internal_reference"].as_str().map(str::trim) == Some(marker))
        .collect()
}

fn licence(env: &TestEnv, sub: &str) -> Value {
    let marker = format!("halosync.subscription:{sub}");
    let found: Vec<Value> = env
        .sim
        .licences()
        .into_iter()
        .filter(|l| l["thirdparty_client_id"].as_str() == Some(marker.as_str()))
        .collect();
    assert_eq!(found.len(), 1, "one licence for {sub}: {found:?}");
    found[0].clone()
}

#[tokio::test]
async fn a_repair_puts_back_what_the_msp_changed_in_every_family() {
    let env = env("repair-every-family").await;
    let account = account_event("a1", "acc_1", "Contoso Ltd", true, 1);
    let sub = subscription_event("s1", "sub_1", "acc_1", 5, "active", 1);
    let usage = usage_event("u1", "sub_1", "acc_1", "storage_gb", PERIOD, 10.0, 1);
    let overage = overage_event("o1", "sub_1", "acc_1", "storage_gb", PERIOD, 3.0, "0.50", 1);
    let sub_marker = "halosync.subscription:sub_1";
    let usage_marker = "halosync.usage:sub_1:storage_gb";
    let overage_marker = "halosync.overage:sub_1:storage_gb:2026-11-01";
    env.publish(&account).await;
    env.wait_for("the customer", T, || customers_of(&env, "acc_1").len() == 1)
        .await;
    env.publish(&sub).await;
    env.wait_for("the subscription's line", T, || {
        live_lines(&env, sub_marker).len() == 1
    })
    .await;
    env.publish(&usage).await;
    env.publish(&overage).await;
    env.wait_for("the usage line and the charge", T, || {
        live_lines(&env, usage_marker).len() == 1 && live_lines(&env, overage_marker).len() == 1
    })
    .await;
    drained(&env).await;

    // The MSP edits HaloPSA by hand.
    let customer = customers_of(&env, "acc_1")[0].clone();
    let customer_id = customer["id"].as_i64().expect("customer id");
    env.sim
        .update_record("Client", customer_id, json!({"inactive": true}));
    let licence_id = licence(&env, "sub_1")["id"].as_i64().expect("licence id");
    env.sim
        .update_record("SoftwareLicence", licence_id, json!({"count": 99}));
    let sub_line = live_lines(&env, sub_marker)[0]["id"]
        .as_i64()
        .expect("line id");
    assert!(env.sim.delete_line("RecurringInvoiceLine", sub_line));
    let usage_line = live_lines(&env, usage_marker)[0].clone();
    // The MSP adds a copy of it (halo-sim's control, as a UI edit would).
    let mut copy = usage_line.clone();
    if let Some(o) = copy.as_object_mut() {
        o.remove("id");
    }
    let ihid = usage_line["ihid"].as_i64().expect("the line's invoice");
    assert!(env
        .sim
        .insert_line("RecurringInvoiceLine", ihid, copy)
        .is_some());
    assert_eq!(
        live_lines(&env, usage_marker).len(),
        2,
        "the MSP's duplicate"
    );
    let charge = live_lines(&env, overage_marker)[0]["id"]
        .as_i64()
        .expect("charge id");
    env.sim
        .update_record("InvoiceLine", charge, json!({"qty_order": 30.0}));
    let requests_before: u64 = env.sim.counts().values().sum();

    // The same events again, not marked: duplicates, nothing written.
    for e in [&account, &sub, &usage, &overage] {
        env.publish(e).await;
    }
    drained(&env).await;
    let requests_after: u64 = env.sim.counts().values().sum();
    assert_eq!(
        requests_after, requests_before,
        "a plain redelivery of the applied versions costs no HaloPSA request"
    );
    assert_eq!(customers_of(&env, "acc_1")[0]["inactive"], true);

    // Marked as repairs: every drift is put back.
    for e in [&account, &sub, &usage, &overage] {
        publish_repair(&env, e).await;
    }
    env.wait_for("every drift repaired", T, || {
        let c = &customers_of(&env, "acc_1")[0];
        let sub_lines = live_lines(&env, sub_marker);
        let usage_lines: Vec<Value> = live_lines(&env, usage_marker);
        let charges = live_lines(&env, overage_marker);
        c["inactive"] != true
            && licence(&env, "sub_1")["count"] == 5
            && sub_lines.len() == 1
            && sub_lines[0]["qty_order"] == 5.0
            && usage_lines.len() == 1
            && usage_lines[0]["qty_order"] == 10.0
            && charges.len() == 1
            && charges[0]["qty_order"] == 3.0
    })
    .await;
    drained(&env).await;
    for f in FAMILIES {
        env.assert_no_dead(f).await;
    }
    // The kept usage line is the lowest id; the MSP's copy was retired.
    assert_eq!(
        live_lines(&env, usage_marker)[0]["id"],
        usage_line["id"],
        "the lowest line id is kept"
    );
    assert_eq!(customers_of(&env, "acc_1").len(), 1, "no second customer");
    // Recorded as repairs in the logs.
    let logs = env.logs();
    let repaired = logs
        .lines()
        .filter(|l| l.contains("\"repair\":true") && l.contains("\"outcome\":\"applied\""))
        .count();
    assert_eq!(repaired, 4, "one applied repair per family in the logs");
}

#[tokio::test]
async fn a_normal_event_newer_than_a_repair_wins_whichever_comes_first() {
    let env = env("repair-race").await;
    env.publish(&account_event("a1", "acc_1", "Contoso Ltd", true, 1))
        .await;
    env.wait_for("the customer", T, || customers_of(&env, "acc_1").len() == 1)
        .await;
    let marker = |s: &str| format!("halosync.subscription:{s}");
    for s in ["sub_1", "sub_2"] {
        env.publish(&subscription_event(
            &format!("{s}-v1"),
            s,
            "acc_1",
            5,
            "active",
            1,
        ))
        .await;
    }
    env.wait_for("both lines", T, || {
        ["sub_1", "sub_2"]
            .iter()
            .all(|s| live_lines(&env, &marker(s)).len() == 1)
    })
    .await;
    // sub_1: the newer event first, then a repair of the older state.
    env.publish(&subscription_event(
        "sub_1-v2", "sub_1", "acc_1", 8, "active", 2,
    ))
    .await;
    env.wait_for("sub_1 at version 2", T, || {
        live_lines(&env, &marker("sub_1"))[..]
            .first()
            .is_some_and(|l| l["qty_order"] == 8.0)
    })
    .await;
    publish_repair(
        &env,
        &subscription_event("sub_1-v1", "sub_1", "acc_1", 5, "active", 1),
    )
    .await;
    // sub_2: the repair of the older state first, then the newer event.
    publish_repair(
        &env,
        &subscription_event("sub_2-v1", "sub_2", "acc_1", 5, "active", 1),
    )
    .await;
    env.publish(&subscription_event(
        "sub_2-v2", "sub_2", "acc_1", 8, "active", 2,
    ))
    .await;
    env.wait_drained(Family::Subscription, T).await;
    for s in ["sub_1", "sub_2"] {
        let lines = live_lines(&env, &marker(s));
        assert_eq!(lines.len(), 1, "{s}: one line");
        assert_eq!(lines[0]["qty_order"], 8.0, "{s}: the newer state won");
        assert_eq!(licence(&env, s)["count"], 8, "{s}: the newer licence count");
    }
    env.assert_no_dead(Family::Subscription).await;
    assert!(
        env.logs().lines().any(|l| l.contains("\"repair\":true")
            && l.contains("sub_1-v1")
            && l.contains("\"outcome\":\"superseded\"")),
        "the older repair is logged as superseded"
    );
}

/// The ids of the recurring (or one-off) invoice headers HaloPSA has, and
/// the records the `halosync.<kind>` ExternalLinks of `billing_id` point at.
fn headers_and_links(
    env: &TestEnv,
    kind: &str,
    billing_id: &str,
    one_off: bool,
) -> (Vec<i64>, Vec<i64>) {
    let headers: Vec<i64> = if one_off {
        env.sim.invoices()
    } else {
        env.sim.recurring_invoices()
    }
    .iter()
    .filter_map(|h| h["id"].as_i64())
    .collect();
    let links: Vec<i64> = env
        .sim
        .external_links()
        .iter()
        .filter(|l| {
            l["third_party_type"] == format!("halosync.{kind}").as_str()
                && l["third_party_id"] == billing_id
        })
        .filter_map(|l| l["halo_id"].as_i64())
        .collect();
    (headers, links)
}

/// The MSP deletes both invoices (as `DELETE /RecurringInvoice/{id}` and
/// `DELETE /Invoice/{id}` do: the lines go, the links stay) while their
/// ids are cached; asserts each family's line is back onto one header
/// found or created again, and nothing was dead-lettered.
async fn delete_both_invoices(env: &TestEnv, markers: [&str; 3]) {
    let [sub_marker, _, overage_marker] = markers;
    let recurring = live_lines(env, sub_marker)[0]["ihid"]
        .as_i64()
        .expect("the recurring invoice");
    let one_off = live_lines(env, overage_marker)[0]["ihid"]
        .as_i64()
        .expect("the overage invoice");
    assert!(env.sim.delete_record("RecurringInvoice", recurring));
    assert!(env.sim.delete_record("Invoice", one_off));
    for m in markers {
        assert!(live_lines(env, m).is_empty(), "{m}: gone with its invoice");
    }
}

async fn assert_put_back(env: &TestEnv, markers: [&str; 3], quantities: [f64; 3]) {
    env.wait_for("every line back on an invoice", T, || {
        markers.iter().zip(quantities).all(|(m, q)| {
            let l = live_lines(env, m);
            l.len() == 1 && l[0]["qty_order"] == q
        })
    })
    .await;
    drained(env).await;
    for f in FAMILIES {
        env.assert_no_dead(f).await;
    }
    for (kind, billing_id, one_off) in [
        ("recurring_invoice", "acc_1", false),
        ("overage_invoice", "acc_1:2026-11-01", true),
    ] {
        let (headers, links) = headers_and_links(env, kind, billing_id, one_off);
        assert_eq!(headers.len(), 1, "{kind}: one header, {headers:?}");
        assert_eq!(
            links, headers,
            "{kind}: one link, onto the header HaloPSA has"
        );
    }
}

/// Issue 22: an invoice the MSP deleted in HaloPSA while its id was cached
/// in Redis is found or created again, and every family's line put back
/// on it, by the next event and, deleted again, by a repair of the same
/// versions (what `halosync reconcile --repair` publishes); nothing is
/// dead-lettered and each invoice ends with one header and one link.
#[tokio::test]
async fn an_invoice_the_msp_deleted_is_created_again_by_the_next_event_and_by_a_repair() {
    let env = env("repair-deleted-invoice").await;
    let markers = [
        "halosync.subscription:sub_1",
        "halosync.usage:sub_1:storage_gb",
        "halosync.overage:sub_1:storage_gb:2026-11-01",
    ];
    env.publish(&account_event("a1", "acc_1", "Contoso Ltd", true, 1))
        .await;
    env.wait_for("the customer", T, || customers_of(&env, "acc_1").len() == 1)
        .await;
    env.publish(&subscription_event("s1", "sub_1", "acc_1", 5, "active", 1))
        .await;
    env.wait_for("the subscription's line", T, || {
        live_lines(&env, markers[0]).len() == 1
    })
    .await;
    env.publish(&usage_event(
        "u1",
        "sub_1",
        "acc_1",
        "storage_gb",
        PERIOD,
        10.0,
        1,
    ))
    .await;
    env.publish(&overage_event(
        "o1",
        "sub_1",
        "acc_1",
        "storage_gb",
        PERIOD,
        3.0,
        "0.50",
        1,
    ))
    .await;
    assert_put_back(&env, markers, [5.0, 10.0, 3.0]).await;

    // Deleted; the next event of each family.
    delete_both_invoices(&env, markers).await;
    let next = [
        subscription_event("s2", "sub_1", "acc_1", 6, "active", 2),
        usage_event("u2", "sub_1", "acc_1", "storage_gb", PERIOD, 11.0, 2),
        overage_event("o2", "sub_1", "acc_1", "storage_gb", PERIOD, 4.0, "0.50", 2),
    ];
    for e in &next {
        env.publish(e).await;
    }
    assert_put_back(&env, markers, [6.0, 11.0, 4.0]).await;

    // Deleted again; the same versions as repairs.
    delete_both_invoices(&env, markers).await;
    for e in &next {
        publish_repair(&env, e).await;
    }
    assert_put_back(&env, markers, [6.0, 11.0, 4.0]).await;
}
