//! Item mappings stored in HaloPSA (`halo::items`), end to end: an unmapped
//! sku is dead-lettered, shows up in `halosync mappings unmapped` (the data
//! of the console's Item mappings page), the operator picks a HaloPSA item
//! (`halosync items`, `halosync mappings set`), replays, and the
//! subscription is applied exactly once, by the same worker process, never
//! restarted. The config's `[items]` keeps precedence over HaloPSA.

use std::time::Duration;

use halosync_shared::contract::Family;
use halosync_tests::{
    account_event, customers_of, recurring_lines, subscription_event, EnvOptions, TestEnv,
    CONNECTION, GENEROUS_BUDGET,
};
use serde_json::{json, Value};

const SUBS: &str = "halosync-subscription";
const ACCOUNTS: &str = "halosync-account";
const USAGE: &str = "halosync-usage";
const T: Duration = Duration::from_secs(30);
const BACKUP_ITEM: i64 = 2001;
const OTHER_ITEM: i64 = 2002;
const THIRD_ITEM: i64 = 2003;
const CONFIG_ITEM: i64 = 2010;

/// An environment whose config maps only `MS-365-BP` (to [`CONFIG_ITEM`]).
async fn env(name: &str) -> TestEnv {
    let env = TestEnv::with(
        name,
        EnvOptions {
            connection_extra: format!(
                "{GENEROUS_BUDGET}\n[connections.{CONNECTION}.items]\n\"MS-365-BP\" = {CONFIG_ITEM}\n"
            ),
            ..Default::default()
        },
    )
    .await;
    env.sim.insert_item(BACKUP_ITEM, "Acme Backup 1 TB");
    env.sim.insert_item(OTHER_ITEM, "Acme Backup 5 TB");
    env.sim.insert_item(THIRD_ITEM, "Storage add-on");
    env.sim
        .insert_item(CONFIG_ITEM, "Microsoft 365 Business Premium");
    env
}

async fn seed_account(env: &TestEnv, account: &str) {
    env.publish(&account_event("acc-e1", account, "Contoso Ltd", true, 1))
        .await;
    env.wait_for("customer created", T, || {
        customers_of(env, account).len() == 1
    })
    .await;
}

fn json_of(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// The licences of a subscription (by the marker the worker writes).
fn licences(env: &TestEnv, sub: &str) -> Vec<Value> {
    let marker = format!("halosync.subscription:{sub}");
    env.sim
        .licences()
        .into_iter()
        .filter(|l| l["thirdparty_client_id"] == marker.as_str())
        .collect()
}

/// Every recurring-invoice line carrying the subscription's marker.
fn lines(env: &TestEnv, sub: &str) -> Vec<Value> {
    let marker = format!("halosync.subscription:{sub}");
    recurring_lines(&env.sim)
        .into_iter()
        .filter(|l| l["item_internal_reference"] == marker.as_str())
        .collect()
}

fn item_links(env: &TestEnv) -> Vec<Value> {
    env.sim
        .external_links()
        .into_iter()
        .filter(|l| l["third_party_type"] == "halosync.item")
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn unmapped_sku_is_mapped_in_halopsa_and_replayed_exactly_once_without_a_restart() {
    let mut env = env("map-e2e").await;
    env.spawn_worker(ACCOUNTS);
    let worker = env.spawn_worker(SUBS);
    seed_account(&env, "acc_1").await;

    let mut e = subscription_event("s1", "sub_1", "acc_1", 5, "active", 1);
    e["data"]["product"] = json!({"sku": "ACME-BACKUP-1TB", "name": "Backup 1 TB"});
    env.publish(&e).await;
    let dead_queue = env.topology.dead_queue(Family::Subscription);
    let deadline = std::time::Instant::now() + T;
    while env.depth(&dead_queue).await == 0 {
        assert!(std::time::Instant::now() < deadline, "{}", env.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The mappings page's data: the sku waits, with its keys and event.
    let (ok, out) = env.run_halosync(&["--json", "mappings", "unmapped"]);
    assert!(ok, "{out}");
    let unmapped = json_of(&out);
    assert_eq!(unmapped.as_array().map(Vec::len), Some(1), "{out}");
    let u = &unmapped[0];
    assert_eq!(u["connection"], CONNECTION);
    assert_eq!(u["sku"], "ACME-BACKUP-1TB");
    assert_eq!(u["keys"], json!(["ACME-BACKUP-1TB"]));
    assert_eq!(u["families"], json!(["subscription"]));
    assert_eq!(u["count"], 1);
    assert_eq!(u["event_ids"], json!(["s1"]));
    assert!(u["last"].is_string(), "{out}");
    // Still in the dead queue: reading took nothing away.
    assert_eq!(env.depth(&dead_queue).await, 1);

    // HaloPSA's items to choose from, searched by name.
    let (ok, out) = env.run_halosync(&["--json", "items", "--search", "backup"]);
    assert!(ok, "{out}");
    let found: Vec<i64> = json_of(&out)
        .as_array()
        .unwrap_or(&Vec::new())
        .iter()
        .filter_map(|i| i["id"].as_i64())
        .collect();
    assert_eq!(found, [BACKUP_ITEM, OTHER_ITEM], "{out}");
    let (ok, out) = env.run_halosync(&["items", "--search", "1 tb"]);
    assert!(
        ok && out.contains("Acme Backup 1 TB") && !out.contains("5 TB"),
        "{out}"
    );

    // A wrong item id is refused, saying what to do; nothing is stored.
    let (ok, out) = env.run_halosync(&[
        "mappings",
        "set",
        "--sku",
        "ACME-BACKUP-1TB",
        "--item",
        "999999",
    ]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("no item 999999") && out.contains("halosync items"),
        "{out}"
    );
    assert!(item_links(&env).is_empty());

    // The operator picks the item and replays at once.
    let (ok, out) = env.run_halosync(&[
        "mappings",
        "set",
        "--sku",
        "ACME-BACKUP-1TB",
        "--item",
        &BACKUP_ITEM.to_string(),
        "--replay",
    ]);
    assert!(ok, "{out}");
    assert!(
        out.contains("Mapped \"ACME-BACKUP-1TB\" to HaloPSA item 2001 (Acme Backup 1 TB)"),
        "{out}"
    );
    assert!(out.to_lowercase().contains("replayed"), "{out}");
    // Stored in HaloPSA: one ExternalLink on the item.
    let links = item_links(&env);
    assert_eq!(links.len(), 1, "{links:?}");
    assert_eq!(links[0]["third_party_id"], "ACME-BACKUP-1TB");
    assert_eq!(links[0]["halo_id"], BACKUP_ITEM);
    assert_eq!(links[0]["table_id"], 8);

    env.wait_for("the subscription applied with the mapped item", T, || {
        let l = lines(&env, "sub_1");
        licences(&env, "sub_1").len() == 1 && l.len() == 1 && l[0]["_itemid"] == BACKUP_ITEM
    })
    .await;
    env.wait_drained(Family::Subscription, T).await;
    assert_eq!(env.depth(&dead_queue).await, 0, "the dead letter is gone");
    assert_eq!(env.count("POST /api/SoftwareLicence"), 1, "exactly once");
    assert_eq!(licences(&env, "sub_1")[0]["count"], 5);
    assert_eq!(lines(&env, "sub_1").len(), 1);
    assert!(
        env.worker(worker).child.try_wait().ok().flatten().is_none(),
        "the worker was never restarted (still the same process)"
    );

    // Nothing waits any more; the mapping is listed, from HaloPSA.
    let (ok, out) = env.run_halosync(&["--json", "mappings", "unmapped"]);
    assert!(ok && json_of(&out) == json!([]), "{out}");
    let (ok, out) = env.run_halosync(&["--json", "mappings", "list"]);
    assert!(ok, "{out}");
    let rows = json_of(&out);
    let halo_row = rows
        .as_array()
        .and_then(|r| r.iter().find(|r| r["key"] == "ACME-BACKUP-1TB"))
        .cloned()
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(halo_row["source"], "halopsa");
    assert_eq!(halo_row["item_id"], BACKUP_ITEM);
    assert_eq!(halo_row["item_name"], "Acme Backup 1 TB");

    // Setting the same mapping again writes nothing; replaying again and
    // republishing change nothing in HaloPSA.
    let links_before = env.count("POST /api/ExternalLink");
    let (ok, out) = env.run_halosync(&[
        "mappings",
        "set",
        "--sku",
        "ACME-BACKUP-1TB",
        "--item",
        "2001",
    ]);
    assert!(ok && out.contains("already mapped"), "{out}");
    assert_eq!(env.count("POST /api/ExternalLink"), links_before);
    env.publish(&e).await;
    env.wait_drained(Family::Subscription, T).await;
    assert_eq!(env.count("POST /api/SoftwareLicence"), 1);
    assert_eq!(lines(&env, "sub_1").len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn config_items_win_and_replacing_a_mapping_moves_it() {
    let mut env = env("map-prec").await;
    env.spawn_worker(ACCOUNTS);
    env.spawn_worker(SUBS);
    seed_account(&env, "acc_1").await;

    // A HaloPSA mapping for a sku the config maps too: the config wins, and
    // the CLI says so.
    let (ok, out) = env.run_halosync(&["mappings", "set", "--sku", "MS-365-BP", "--item", "2002"]);
    assert!(ok, "{out}");
    assert!(out.contains("the config takes precedence"), "{out}");
    env.publish(&subscription_event("s1", "sub_1", "acc_1", 3, "active", 1))
        .await;
    env.wait_for("applied", T, || lines(&env, "sub_1").len() == 1)
        .await;
    assert_eq!(lines(&env, "sub_1")[0]["_itemid"], CONFIG_ITEM);
    let (ok, out) = env.run_halosync(&["mappings", "list"]);
    assert!(ok && out.contains("overridden by config: 2010"), "{out}");

    // Replacing a mapping moves it: one link per key, the newest item.
    let (ok, out) = env.run_halosync(&["mappings", "set", "--sku", "ACME-X", "--item", "2001"]);
    assert!(ok, "{out}");
    let (ok, out) = env.run_halosync(&["mappings", "set", "--sku", "ACME-X", "--item", "2003"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("Moved \"ACME-X\" from HaloPSA item 2001 to item 2003"),
        "{out}"
    );
    let links: Vec<Value> = item_links(&env)
        .into_iter()
        .filter(|l| l["third_party_id"] == "ACME-X")
        .collect();
    assert_eq!(links.len(), 1, "{links:?}");
    assert_eq!(links[0]["halo_id"], THIRD_ITEM);

    // And a worker picks the moved mapping up at once (the cache was
    // rewritten by `mappings set`), without a restart.
    let mut e = subscription_event("s2", "sub_2", "acc_1", 1, "active", 1);
    e["data"]["product"] = json!({"sku": "ACME-X", "name": "X"});
    env.publish(&e).await;
    env.wait_for("applied with the moved mapping", T, || {
        lines(&env, "sub_2")
            .first()
            .is_some_and(|l| l["_itemid"] == THIRD_ITEM)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_lines_use_halopsa_mappings_in_chain_order() {
    let mut env = env("map-usage").await;
    env.spawn_worker(ACCOUNTS);
    env.spawn_worker(SUBS);
    env.spawn_worker(USAGE);
    seed_account(&env, "acc_1").await;
    // The subscription's sku is mapped in HaloPSA; its storage metric has
    // a more specific mapping, which wins over the sku's.
    for (sku, item) in [
        ("ACME-BACKUP-1TB", "2001"),
        ("ACME-BACKUP-1TB:storage_gb", "2003"),
    ] {
        let (ok, out) = env.run_halosync(&["mappings", "set", "--sku", sku, "--item", item]);
        assert!(ok, "{out}");
    }
    let mut e = subscription_event("s1", "sub_1", "acc_1", 1, "active", 1);
    e["data"]["product"] = json!({"sku": "ACME-BACKUP-1TB", "name": "Backup"});
    env.publish(&e).await;
    env.wait_for("subscription applied", T, || {
        lines(&env, "sub_1").len() == 1
    })
    .await;
    for (id, metric) in [("u1", "storage_gb"), ("u2", "seats")] {
        env.publish(&json!({
            "id": id,
            "type": "usage.reported",
            "schema_version": 1,
            "connection": CONNECTION,
            "occurred_at": "2026-11-22T10:15:00Z",
            "sequence": 1,
            "data": {
                "subscription_id": "sub_1",
                "account_id": "acc_1",
                "metric": metric,
                "period_start": "2026-11-01",
                "period_end": "2026-11-30",
                "quantity": 12.5,
                "unit": "GB"
            }
        }))
        .await;
    }
    let usage_line = |metric: &str| {
        let marker = format!("halosync.usage:sub_1:{metric}");
        recurring_lines(&env.sim)
            .into_iter()
            .find(|l| l["item_internal_reference"] == marker.as_str())
    };
    env.wait_for("both usage lines", T, || {
        usage_line("storage_gb").is_some() && usage_line("seats").is_some()
    })
    .await;
    assert_eq!(
        usage_line("storage_gb").map(|l| l["_itemid"].clone()),
        Some(json!(THIRD_ITEM))
    );
    assert_eq!(
        usage_line("seats").map(|l| l["_itemid"].clone()),
        Some(json!(BACKUP_ITEM))
    );
}
