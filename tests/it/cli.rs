//! The `halosync` binary (publish, dlq, status, check) against the real
//! RabbitMQ and Redis, with halo-sim in process for `check`.
//!
//! `World` is a lighter [`halosync_tests::TestEnv`]: a prefix, a config
//! file written by the test and no workers; its guard removes what the
//! prefix holds through the same harness function
//! ([`halosync_tests::remove_everything_of`]), also when the test fails.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use halo_sim::{Faults, SimConfig, SimHandle};
use halosync_shared::amqp::headers as h;
use halosync_shared::amqp::Topology;
use halosync_shared::Family;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeleteOptions,
};
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::{json, Value};

use halosync_tests::{AMQP_URL as AMQP, REDIS_URL as REDIS};
/// Long retry tiers, so nothing moves by itself during a test.
const DELAYS: [u64; 2] = [60_000, 120_000];
const SECRET_VAR: &str = "HALOSYNC_TEST_HALO_SECRET";

/// One test's world: a prefix, a config file, a broker connection, and a
/// guard that cleans everything up.
struct World {
    prefix: String,
    dir: PathBuf,
    config: PathBuf,
    topology: Topology,
    conn: Connection,
}

impl World {
    async fn new() -> World {
        World::with_config("").await
    }

    /// `extra` is appended to the config file (e.g. a connection).
    async fn with_config(extra: &str) -> World {
        let conn = Connection::connect(AMQP, ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| panic!("RabbitMQ must be running at {AMQP} for these tests: {e}"));
        let mut r = halosync_tests::redis_at(REDIS)
            .await
            .unwrap_or_else(|e| panic!("Redis must be running at {REDIS} for these tests: {e}"));
        let _: () = redis::cmd("PING")
            .query_async(&mut r)
            .await
            .unwrap_or_else(|e| panic!("Redis at {REDIS} does not answer PING: {e}"));
        let id = uuid::Uuid::new_v4().simple().to_string();
        let prefix = format!("t-{}.", &id[..8]);
        let dir = std::env::temp_dir().join(format!("halosync-cli-test-{}", &id[..8]));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let config = dir.join("halosync.toml");
        std::fs::write(
            &config,
            format!(
                "prefix = \"{prefix}\"\namqp_url = \"{AMQP}\"\nredis_url = \"{REDIS}\"\n[retry]\ndelays_ms = {DELAYS:?}\n{extra}"
            ),
        )
        .expect("config file");
        World {
            topology: Topology::new(&prefix, &DELAYS),
            prefix,
            dir,
            config,
            conn,
        }
    }

    /// Runs `halosync --config FILE ARGS`.
    async fn run(&self, args: &[&str]) -> Output {
        self.run_env(args, &[]).await
    }

    async fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = tokio::process::Command::new(halosync_tests::binary_path("halosync"));
        cmd.arg("--config")
            .arg(&self.config)
            .args(args)
            .current_dir(&self.dir)
            .env_remove("HALOSYNC_PREFIX")
            .env_remove("HALOSYNC_CONFIG")
            .env_remove("AMQP_URL")
            .env_remove("REDIS_URL")
            .env_remove("RUST_LOG");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
            .await
            .expect("halosync took over 30 s")
            .expect("run halosync");
        eprintln!(
            "$ halosync {}\n[exit {:?}]\n{}{}",
            args.join(" "),
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    async fn declare(&self) {
        let ch = self.conn.create_channel().await.expect("channel");
        self.topology.declare(&ch).await.expect("declare topology");
    }

    async fn count(&self, queue: &str) -> (u32, u32) {
        let ch = self.conn.create_channel().await.expect("channel");
        let q = ch
            .queue_declare(
                queue.into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("queue {queue} must exist: {e}"));
        let _ = ch.close(200, "".into()).await;
        (q.message_count(), q.consumer_count())
    }

    async fn ready(&self, queue: &str) -> u32 {
        self.count(queue).await.0
    }

    /// Publishes (confirmed) to the default exchange, i.e. straight into `queue`.
    async fn put(&self, queue: &str, body: &[u8], props: BasicProperties) {
        self.publish("", queue, body, props).await;
    }

    async fn publish(&self, exchange: &str, key: &str, body: &[u8], props: BasicProperties) {
        let ch = self.conn.create_channel().await.expect("channel");
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        let confirm = ch
            .basic_publish(
                exchange.into(),
                key.into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack(), "broker nacked the test's publish");
        let _ = ch.close(200, "".into()).await;
    }

    /// A dead letter as a worker writes it (DESIGN §3).
    async fn dead_letter(&self, family: Family, d: &Dead<'_>) {
        let event_type = match family {
            Family::Account => "account.created",
            Family::Subscription => "subscription.created",
            Family::Usage => "usage.reported",
            Family::Overage => "overage.detected",
        };
        let mut t = FieldTable::default();
        h::set_str(&mut t, h::ERROR_CLASS, d.class);
        h::set_str(&mut t, h::ERROR_MESSAGE, d.message);
        if let Some(s) = d.halo_status {
            h::set_i64(&mut t, h::HALO_STATUS, s);
            h::set_str(
                &mut t,
                h::HALO_BODY,
                "You do not have permission to access this resource",
            );
        }
        h::set_i64(&mut t, h::ATTEMPTS, 1);
        h::set_str(&mut t, h::FIRST_FAILURE, d.at);
        h::set_str(&mut t, h::LAST_FAILURE, d.at);
        h::set_str(&mut t, h::WORKER, &format!("halosync-{family}@test:1"));
        h::set_str(&mut t, h::FAMILY, family.as_str());
        h::set_str(&mut t, h::ORIGINAL_ROUTING_KEY, event_type);
        h::set_str(&mut t, h::CONNECTION, d.connection);
        h::set_str(&mut t, h::EVENT_ID, d.id);
        h::set_str(
            &mut t,
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        );
        let body = envelope(d.id, event_type, d.connection);
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(d.id.into())
            .with_type(event_type.into())
            .with_headers(t);
        self.put(&self.topology.dead_queue(family), body.as_bytes(), props)
            .await;
    }

    /// A poison dead letter as the broker makes it: no x-halosync headers,
    /// an x-death entry with reason delivery_limit.
    async fn poison(&self, family: Family, id: &str) {
        let mut death = FieldTable::default();
        death.insert("reason".into(), ls("delivery_limit"));
        death.insert("queue".into(), ls(&self.topology.work_queue(family)));
        death.insert("count".into(), AMQPValue::LongLongInt(1));
        death.insert("exchange".into(), ls(""));
        death.insert(
            "time".into(),
            AMQPValue::Timestamp(chrono::Utc::now().timestamp() as u64),
        );
        death.insert(
            "routing-keys".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![ls("account.created")])),
        );
        let mut t = FieldTable::default();
        t.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
        );
        t.insert("x-first-death-reason".into(), ls("delivery_limit"));
        t.insert(
            "x-first-death-queue".into(),
            ls(&self.topology.work_queue(family)),
        );
        let body = envelope(id, "account.created", "acme");
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(id.into())
            .with_type("account.created".into())
            .with_headers(t);
        self.put(&self.topology.dead_queue(family), body.as_bytes(), props)
            .await;
    }

    /// The event ids of every message of `queue`, in order (taken, as
    /// [`World::drain`] does).
    async fn drain_ids(&self, queue: &str) -> Vec<String> {
        snapshot(&self.drain(queue).await)
            .into_iter()
            .map(|(id, _, _)| id)
            .collect()
    }

    /// Takes every message of `queue` (acked: the test is done with them).
    async fn drain(&self, queue: &str) -> Vec<lapin::message::Delivery> {
        let ch = self.conn.create_channel().await.expect("channel");
        let mut out = Vec::new();
        while let Some(m) = ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic_get")
        {
            out.push(m.delivery);
        }
        let _ = ch.close(200, "".into()).await;
        out
    }
}

impl Drop for World {
    fn drop(&mut self) {
        halosync_tests::remove_everything_of(AMQP, &self.prefix, &self.topology, &self.dir);
    }
}

fn ls(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

struct Dead<'a> {
    id: &'a str,
    class: &'a str,
    message: &'a str,
    connection: &'a str,
    halo_status: Option<i64>,
    at: &'a str,
}

fn dead<'a>(id: &'a str, class: &'a str, message: &'a str) -> Dead<'a> {
    Dead {
        id,
        class,
        message,
        connection: "acme",
        halo_status: None,
        at: "2026-11-22T10:15:00.000Z",
    }
}

fn envelope(id: &str, event_type: &str, connection: &str) -> String {
    json!({
        "id": id, "type": event_type, "schema_version": 1, "connection": connection,
        "occurred_at": "2026-11-22T10:00:00Z", "sequence": 1,
        "data": {"account_id": "acc_1", "name": "Contoso", "active": true}
    })
    .to_string()
}

fn account_event(id: &str) -> String {
    json!({
        "id": id, "type": "account.created", "schema_version": 1, "connection": "acme",
        "occurred_at": "2026-11-22T10:00:00Z", "sequence": 1,
        "data": {"account_id": format!("acc_{id}"), "name": "Contoso", "active": true}
    })
    .to_string()
}

fn usage_event(id: &str) -> String {
    json!({
        "id": id, "type": "usage.reported", "schema_version": 1, "connection": "acme",
        "occurred_at": "2026-11-22T10:00:00Z",
        "data": {"subscription_id": "sub_1", "account_id": "acc_1", "metric": "storage_gb",
                 "period_start": "2026-11-01", "period_end": "2026-11-30", "quantity": 12.5}
    })
    .to_string()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json_out(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", stdout(o)))
}

/// The id and x-halosync-* headers of each message, in queue order.
fn snapshot(
    deliveries: &[lapin::message::Delivery],
) -> Vec<(String, BTreeMap<String, String>, Vec<u8>)> {
    deliveries
        .iter()
        .map(|d| {
            let headers = h::to_json(d.properties.headers().as_ref());
            let halosync: BTreeMap<String, String> = headers
                .as_object()
                .map(|m| {
                    m.iter()
                        .filter(|(k, _)| {
                            k.starts_with("x-halosync-")
                                || k.starts_with("x-death")
                                || k.starts_with("x-first")
                        })
                        .map(|(k, v)| (k.clone(), v.to_string()))
                        .collect()
                })
                .unwrap_or_default();
            let id = d
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_string())
                .unwrap_or_default();
            (id, halosync, d.data.clone())
        })
        .collect()
}

// ---------------------------------------------------------------- publish

#[tokio::test(flavor = "multi_thread")]
async fn publish_confirms_every_valid_event_into_the_work_queues() {
    let w = World::new().await;
    // The shipped examples: one pretty-printed event per file, as `make run` does.
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../schemas/examples/valid");
    let mut files: Vec<String> = std::fs::read_dir(&examples)
        .expect("examples")
        .map(|e| e.expect("entry").path().display().to_string())
        .collect();
    files.sort();
    // Plus a JSON-lines file.
    let lines = w.dir.join("events.jsonl");
    std::fs::write(
        &lines,
        format!(
            "{}\n{}\n\n{}\n",
            account_event("evt_l1"),
            account_event("evt_l2"),
            usage_event("evt_l3")
        ),
    )
    .expect("write");
    let mut args = vec!["publish"];
    args.extend(files.iter().map(String::as_str));
    let lines_arg = lines.display().to_string();
    args.push(&lines_arg);
    let out = w.run(&args).await;
    assert!(out.status.success(), "publish failed: {}", stderr(&out));
    assert!(
        stdout(&out).contains("Published 14 of 14 events"),
        "{}",
        stdout(&out)
    );
    // 5 account + 4 subscription + 1 usage + 1 overage examples, + 2 account + 1 usage lines.
    assert_eq!(w.ready(&w.topology.work_queue(Family::Account)).await, 7);
    assert_eq!(
        w.ready(&w.topology.work_queue(Family::Subscription)).await,
        4
    );
    assert_eq!(w.ready(&w.topology.work_queue(Family::Usage)).await, 2);
    assert_eq!(w.ready(&w.topology.work_queue(Family::Overage)).await, 1);
    assert_eq!(w.ready(&w.topology.unrouted_queue()).await, 0);
    // The contract's properties: message_id = id, type = type, persistent.
    let got = w.drain(&w.topology.work_queue(Family::Usage)).await;
    let last = got.last().expect("usage message");
    assert_eq!(
        last.properties.message_id().as_ref().map(|m| m.as_str()),
        Some("evt_l3")
    );
    assert_eq!(
        last.properties.kind().as_ref().map(|m| m.as_str()),
        Some("usage.reported")
    );
    assert_eq!(last.properties.delivery_mode(), &Some(2));
    assert_eq!(last.routing_key.as_str(), "usage.reported");
}

#[tokio::test(flavor = "multi_thread")]
async fn publish_refuses_a_file_with_an_invalid_line_unless_told_to_skip_it() {
    let w = World::new().await;
    w.declare().await;
    let file = w.dir.join("events.jsonl");
    let mut bad: Value = serde_json::from_str(&account_event("evt_bad")).expect("json");
    bad.as_object_mut().expect("object").remove("id");
    std::fs::write(
        &file,
        format!(
            "{}\n{}\n{}\n",
            account_event("evt_1"),
            bad,
            account_event("evt_3")
        ),
    )
    .expect("write");
    let path = file.display().to_string();
    let work = w.topology.work_queue(Family::Account);

    let out = w.run(&["publish", &path]).await;
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("{path}:2:")),
        "line number missing: {err}"
    );
    assert!(
        err.contains("\"id\" is a required property"),
        "schema complaint missing: {err}"
    );
    assert!(err.contains("nothing was published"), "{err}");
    assert!(err.contains("--skip-invalid"), "{err}");
    assert_eq!(
        w.ready(&work).await,
        0,
        "nothing of an invalid file may be published"
    );

    let out = w.run(&["publish", "--skip-invalid", &path]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("Published 2 of 2 events"),
        "{}",
        stdout(&out)
    );
    assert!(
        stdout(&out).contains("skipped 1 invalid"),
        "{}",
        stdout(&out)
    );
    assert_eq!(w.ready(&work).await, 2);
    let ids: Vec<String> = w
        .drain(&work)
        .await
        .iter()
        .filter_map(|d| d.properties.message_id().as_ref().map(|m| m.to_string()))
        .collect();
    assert_eq!(ids, ["evt_1", "evt_3"]);
}

// ---------------------------------------------------------------- dlq

/// Five subscription dead letters and two account ones (one poison).
async fn seed_dead_letters(w: &World) {
    w.declare().await;
    let s = Family::Subscription;
    w.dead_letter(
        s,
        &dead(
            "evt_s1",
            "unmapped",
            "no HaloPSA item mapping for sku \"MS-365-BP\" (add it under [connections.acme.items])",
        ),
    )
    .await;
    w.dead_letter(
        s,
        &Dead {
            halo_status: Some(403),
            ..dead(
                "evt_s2",
                "rejected",
                "HaloPSA POST /SoftwareLicence returned 403",
            )
        },
    )
    .await;
    w.dead_letter(
        s,
        &dead(
            "evt_s3",
            "unmapped",
            "no HaloPSA item mapping for sku \"MS-365-E3\" (add it under [connections.acme.items])",
        ),
    )
    .await;
    w.dead_letter(
        s,
        &Dead {
            connection: "globex",
            ..dead(
                "evt_s4",
                "dependency",
                "account acc_1001 is not in HaloPSA yet",
            )
        },
    )
    .await;
    w.dead_letter(
        s,
        &dead(
            "evt_s5",
            "unmapped",
            "no HaloPSA item mapping for sku \"MS-365-BP\" (add it under [connections.acme.items])",
        ),
    )
    .await;
    w.dead_letter(
        Family::Account,
        &dead("evt_a1", "invalid", "unknown connection \"nope\""),
    )
    .await;
    w.poison(Family::Account, "evt_a2").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn list_and_show_leave_the_dead_letters_exactly_as_they_were() {
    let w = World::new().await;
    seed_dead_letters(&w).await;
    let sub_dead = w.topology.dead_queue(Family::Subscription);
    let acc_dead = w.topology.dead_queue(Family::Account);

    let out = w.run(&["dlq", "list"]).await;
    assert!(out.status.success());
    let text = stdout(&out);
    for id in [
        "evt_s1", "evt_s2", "evt_s3", "evt_s4", "evt_s5", "evt_a1", "evt_a2",
    ] {
        assert!(text.contains(id), "{id} missing from the list");
    }
    assert!(
        text.contains("poison"),
        "the broker's delivery-limit dead letter is poison"
    );

    let out = w.run(&["dlq", "list", "--group-by", "class"]).await;
    assert!(out.status.success());
    let text = stdout(&out);
    let first = text.lines().nth(1).unwrap_or("");
    assert!(
        first.trim_start().starts_with('3') && first.contains("unmapped"),
        "{text}"
    );

    let out = w
        .run(&["dlq", "list", "--group-by", "error", "--json"])
        .await;
    let groups = json_out(&out);
    assert_eq!(groups["matched"], 7);
    let g0 = &groups["groups"][0];
    assert_eq!(g0["class"], "unmapped");
    assert_eq!(g0["count"], 2, "sku MS-#-BP twice: {groups}");

    let out = w
        .run(&[
            "dlq",
            "list",
            "--class",
            "unmapped",
            "--family",
            "subscription",
            "--json",
        ])
        .await;
    let ids: Vec<String> = json_out(&out)
        .as_array()
        .expect("array")
        .iter()
        .map(|d| d["event_id"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        ids,
        ["evt_s1", "evt_s3", "evt_s5"],
        "filter keeps queue order"
    );
    let out = w
        .run(&["dlq", "list", "--connection", "globex", "--json"])
        .await;
    assert_eq!(json_out(&out).as_array().map(Vec::len), Some(1));
    let out = w.run(&["dlq", "list", "--limit", "2", "--json"]).await;
    assert_eq!(json_out(&out).as_array().map(Vec::len), Some(2));
    let out = w.run(&["dlq", "list", "--since", "1h", "--json"]).await;
    let recent: Vec<String> = json_out(&out)
        .as_array()
        .expect("array")
        .iter()
        .map(|d| d["event_id"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        recent,
        ["evt_a2"],
        "only the poison one failed within the hour"
    );

    let out = w.run(&["dlq", "show", "evt_s2"]).await;
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(text.contains("x-halosync-error-class: rejected"), "{text}");
    assert!(
        text.contains("403: You do not have permission to access this resource"),
        "{text}"
    );
    assert!(
        text.contains("\"subscription_id\"") || text.contains("\"account_id\""),
        "envelope missing: {text}"
    );
    let out = w.run(&["dlq", "show", "evt_s2", "--json"]).await;
    assert_eq!(json_out(&out)[0]["halo_status"], 403);
    let out = w.run(&["dlq", "show", "evt_nope"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no dead letter with event id"),
        "{}",
        stderr(&out)
    );

    // Exactly as they were: same count, same order, same halosync headers.
    assert_eq!(w.ready(&sub_dead).await, 5);
    assert_eq!(w.ready(&acc_dead).await, 2);
    let after = snapshot(&w.drain(&sub_dead).await);
    let ids: Vec<&str> = after.iter().map(|(id, _, _)| id.as_str()).collect();
    assert_eq!(ids, ["evt_s1", "evt_s2", "evt_s3", "evt_s4", "evt_s5"]);
    assert_eq!(
        after[1].1.get(h::ERROR_CLASS).map(String::as_str),
        Some("\"rejected\"")
    );
    assert_eq!(
        after[1].1.get(h::ATTEMPTS).map(String::as_str),
        Some("1"),
        "attempts untouched"
    );
    let acc = snapshot(&w.drain(&acc_dead).await);
    let ids: Vec<&str> = acc.iter().map(|(id, _, _)| id.as_str()).collect();
    assert_eq!(ids, ["evt_a1", "evt_a2"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn dry_run_and_purge_without_yes_change_nothing() {
    let w = World::new().await;
    seed_dead_letters(&w).await;
    let sub_dead = w.topology.dead_queue(Family::Subscription);
    let out = w
        .run(&["dlq", "replay", "--class", "unmapped", "--dry-run"])
        .await;
    assert!(out.status.success());
    let text = stdout(&out);
    assert_eq!(text.matches("would replay").count(), 3, "{text}");
    assert!(text.contains("nothing was changed"), "{text}");
    assert_eq!(
        w.ready(&w.topology.work_queue(Family::Subscription)).await,
        0
    );

    let out = w.run(&["dlq", "purge", "--class", "unmapped"]).await;
    assert_eq!(out.status.code(), Some(1), "purge without --yes must fail");
    let err = stderr(&out);
    assert!(
        err.contains("refusing to purge 3 matching dead letters without --yes"),
        "{err}"
    );
    assert!(
        err.contains("halosync dlq purge --class unmapped --yes"),
        "{err}"
    );

    let out = w.run(&["dlq", "purge", "--dry-run", "--yes"]).await;
    assert!(out.status.success());
    assert!(
        stdout(&out).contains("Dry run: 7 dead letters would be purged"),
        "{}",
        stdout(&out)
    );

    assert_eq!(w.ready(&sub_dead).await, 5);
    assert_eq!(w.ready(&w.topology.dead_queue(Family::Account)).await, 2);
    let ids = w.drain_ids(&sub_dead).await;
    assert_eq!(ids, ["evt_s1", "evt_s2", "evt_s3", "evt_s4", "evt_s5"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_moves_matching_dead_letters_back_without_failure_headers() {
    let w = World::new().await;
    seed_dead_letters(&w).await;
    let sub_dead = w.topology.dead_queue(Family::Subscription);
    let sub_work = w.topology.work_queue(Family::Subscription);

    let out = w.run(&["dlq", "replay", "--class", "unmapped"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("Replayed 3 dead letters"), "{text}");
    assert!(text.contains("replayed evt_s1"), "{text}");

    assert_eq!(w.ready(&sub_work).await, 3);
    assert_eq!(w.ready(&sub_dead).await, 2);
    let replayed = w.drain(&sub_work).await;
    let ids: Vec<String> = replayed
        .iter()
        .filter_map(|d| d.properties.message_id().as_ref().map(|m| m.to_string()))
        .collect();
    assert_eq!(
        ids,
        ["evt_s1", "evt_s3", "evt_s5"],
        "same event ids, in order"
    );
    for d in &replayed {
        let t = d.properties.headers().as_ref();
        for k in h::FAILURE_HEADERS {
            assert!(h::get_str(t, k).is_none(), "{k} must be removed on replay");
        }
        assert_eq!(h::get_i64(t, h::REPLAY_COUNT), Some(1));
        assert!(
            h::get_str(t, "traceparent").is_some(),
            "other headers are kept"
        );
        assert_eq!(
            d.routing_key.as_str(),
            "subscription.created",
            "original routing key"
        );
        assert_eq!(d.exchange.as_str(), w.topology.events_exchange());
        assert!(
            serde_json::from_slice::<Value>(&d.data).is_ok(),
            "body unchanged"
        );
    }
    let left = w.drain_ids(&sub_dead).await;
    assert_eq!(left, ["evt_s2", "evt_s4"], "the others stay, in order");

    // The poison one replays too (by its type), and --limit is honoured.
    let out = w
        .run(&[
            "dlq", "replay", "--family", "account", "--limit", "1", "--json",
        ])
        .await;
    assert!(out.status.success());
    assert_eq!(json_out(&out)["removed"], 1);
    assert_eq!(w.ready(&w.topology.work_queue(Family::Account)).await, 1);
    assert_eq!(w.ready(&w.topology.dead_queue(Family::Account)).await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_keeps_the_dead_letter_when_the_republish_fails() {
    let w = World::new().await;
    seed_dead_letters(&w).await;
    // Without the events exchange, the broker refuses the republish.
    let ch = w.conn.create_channel().await.expect("channel");
    ch.exchange_delete(
        w.topology.events_exchange().as_str().into(),
        ExchangeDeleteOptions::default(),
    )
    .await
    .expect("delete exchange");
    let out = w.run(&["dlq", "replay", "--event-id", "evt_s3"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("stopped early"), "{}", stderr(&out));
    let ids = w
        .drain_ids(&w.topology.dead_queue(Family::Subscription))
        .await;
    assert_eq!(ids, ["evt_s1", "evt_s2", "evt_s3", "evt_s4", "evt_s5"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn purge_with_yes_deletes_only_the_matching_dead_letters() {
    let w = World::new().await;
    seed_dead_letters(&w).await;
    let out = w
        .run(&["dlq", "purge", "--class", "unmapped,dependency", "--yes"])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("Purged 4 dead letters"),
        "{}",
        stdout(&out)
    );
    let ids = w
        .drain_ids(&w.topology.dead_queue(Family::Subscription))
        .await;
    assert_eq!(ids, ["evt_s2"]);
    assert_eq!(w.ready(&w.topology.dead_queue(Family::Account)).await, 2);
}

// ---------------------------------------------------------------- topology, status

#[tokio::test(flavor = "multi_thread")]
async fn status_numbers_match_the_broker() {
    let w = World::new().await;
    let out = w.run(&["topology"]).await;
    assert!(out.status.success());
    let again = w.run(&["topology"]).await;
    assert!(again.status.success(), "topology is idempotent");

    let file = w.dir.join("events.jsonl");
    std::fs::write(
        &file,
        [
            account_event("e1"),
            account_event("e2"),
            account_event("e3"),
            usage_event("e4"),
        ]
        .join("\n"),
    )
    .expect("write");
    let out = w.run(&["publish", &file.display().to_string()]).await;
    assert!(out.status.success());
    // Two dead letters, one message waiting in a retry tier, one unrouted.
    w.dead_letter(Family::Subscription, &dead("d1", "unmapped", "x"))
        .await;
    w.dead_letter(Family::Subscription, &dead("d2", "unmapped", "x"))
        .await;
    w.put(
        &w.topology.retry_queue(Family::Account, DELAYS[0]),
        account_event("r1").as_bytes(),
        BasicProperties::default(),
    )
    .await;
    w.publish(
        &w.topology.events_exchange(),
        "mystery.event",
        b"{}",
        BasicProperties::default(),
    )
    .await;
    // One consumer on the (empty) overage queue.
    let ch = w.conn.create_channel().await.expect("channel");
    let _consumer = ch
        .basic_consume(
            w.topology.work_queue(Family::Overage).as_str().into(),
            "status-test".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");

    let out = w.run(&["status", "--json"]).await;
    assert!(out.status.success());
    let s = json_out(&out);
    let fam =
        |f: &str, part: &str, field: &str| s["families"][f][part][field].as_u64().unwrap_or(999);
    assert_eq!(fam("account", "work", "messages"), 3);
    assert_eq!(fam("usage", "work", "messages"), 1);
    assert_eq!(fam("subscription", "dead", "messages"), 2);
    assert_eq!(fam("overage", "work", "consumers"), 1);
    assert_eq!(s["families"]["account"]["retry"]["1m"]["messages"], 1);
    assert_eq!(s["families"]["account"]["retry"]["2m"]["messages"], 0);
    assert_eq!(s["unrouted"]["messages"], 1);
    assert_eq!(s["missing_queues"].as_array().map(Vec::len), Some(0));
    // And against the broker's own numbers, queue by queue.
    for f in Family::ALL {
        let (m, c) = w.count(&w.topology.work_queue(f)).await;
        assert_eq!(fam(f.as_str(), "work", "messages"), u64::from(m));
        assert_eq!(fam(f.as_str(), "work", "consumers"), u64::from(c));
        assert_eq!(
            fam(f.as_str(), "dead", "messages"),
            u64::from(w.ready(&w.topology.dead_queue(f)).await)
        );
    }
    let text = stdout(&w.run(&["status"]).await);
    assert!(text.contains("RETRY 1m/2m"), "{text}");
    assert!(text.contains("2 dead letters"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn status_works_on_a_fresh_machine_without_a_config_file() {
    let w = World::new().await;
    let fresh = w.dir.join("fresh");
    std::fs::create_dir_all(&fresh).expect("dir");
    let out = tokio::process::Command::new(halosync_tests::binary_path("halosync"))
        .arg("status")
        .current_dir(&fresh)
        .env_remove("HALOSYNC_CONFIG")
        .env("HALOSYNC_PREFIX", &w.prefix)
        .output()
        .await
        .expect("run");
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains(&format!("{}halosync.account", w.prefix)),
        "{text}"
    );
    assert!(text.contains("not declared"), "{text}");
}

// ---------------------------------------------------------------- check

struct Sim {
    sim: SimHandle,
    world: World,
}

/// A halo-sim and a config whose connection `acme` points at it.
async fn sim_world(sim_tenant: Option<&str>, conn_extra: &str) -> Sim {
    let sim = SimHandle::start(SimConfig {
        client_id: "halosync-test".into(),
        client_secret: "right-secret".into(),
        tenant: sim_tenant.map(str::to_string),
        ..Default::default()
    })
    .await
    .expect("start halo-sim");
    let mut conn = format!(
        "[connections.acme]\nresource_server = \"{}\"\nclient_id = \"halosync-test\"\nclient_secret_env = \"{SECRET_VAR}\"\n",
        sim.api_url()
    );
    if !conn_extra.contains("{auth}") {
        conn.push_str(&format!("auth_server = \"{}\"\n", sim.auth_url()));
    }
    conn.push_str(conn_extra);
    let world = World::with_config(&conn.replace("{auth}", &sim.auth_url())).await;
    Sim { sim, world }
}

impl Sim {
    /// `halosync check` with the right secret: its output, once it exited
    /// with `code`.
    async fn check_exits(&self, code: i32) -> String {
        let out = self.check("right-secret", false).await;
        let text = stdout(&out);
        assert_eq!(out.status.code(), Some(code), "{text}");
        text
    }

    async fn check(&self, secret: &str, json: bool) -> Output {
        let mut args = vec!["check", "--connection", "acme"];
        if json {
            args.push("--json");
        }
        self.world.run_env(&args, &[(SECRET_VAR, secret)]).await
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn check_is_all_green_with_the_right_settings() {
    let s = sim_world(Some("acme"), "tenant = \"acme\"\nscope = \"all\"\n").await;
    let text = s.check_exits(0).await;
    assert!(
        text.contains("✔ token (scope all, expires in 3600 s)"),
        "{text}"
    );
    for area in [
        "customers",
        "items",
        "software licences",
        "recurring invoices",
        "invoices",
        "external links",
    ] {
        assert!(text.contains(&format!("✔ {area} (GET /")), "{area}: {text}");
    }
    assert!(!text.contains('✘'), "{text}");
    assert!(
        !text.contains("right-secret"),
        "the secret is never printed"
    );
    let out = s.check("right-secret", true).await;
    let report = json_out(&out);
    assert_eq!(report["ok"], true);
    // 8 HaloPSA checks, then RabbitMQ, Redis and HaloPSA transport (tls_check).
    assert_eq!(report["checks"].as_array().map(Vec::len), Some(11));
    assert!(
        !stdout(&out).contains("access_token"),
        "the token is never printed"
    );
    let _ = &s.sim;
}

#[tokio::test(flavor = "multi_thread")]
async fn check_explains_a_wrong_secret() {
    let s = sim_world(Some("acme"), "tenant = \"acme\"\n").await;
    let out = s.check("wrong-secret", false).await;
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("✘ token: 401 invalid_client"), "{text}");
    assert!(text.contains("the client id or secret is wrong"), "{text}");
    assert!(
        text.contains(SECRET_VAR),
        "names where the secret comes from: {text}"
    );
    assert!(text.contains("· customers: not tried (no token)"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn check_explains_a_missing_tenant_on_a_hosted_instance() {
    let s = sim_world(Some("acme"), "").await;
    let text = s.check_exits(1).await;
    assert!(text.contains("✘ token: 500 HTML error page"), "{text}");
    assert!(
        text.contains("a Halo-hosted instance does when the tenant is missing"),
        "{text}"
    );
    assert!(
        text.contains("try tenant = \"acme\""),
        "discovery names the tenant: {text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn check_accepts_a_not_set_tenant_on_premise() {
    let s = sim_world(None, "tenant = \"Not set\"\n").await;
    let text = s.check_exits(0).await;
    assert!(
        text.contains("tenant \"Not set\" means on-premise"),
        "{text}"
    );
    assert!(text.contains("on-premise (no tenant)"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn check_accepts_an_auth_server_with_a_trailing_slash() {
    let s = sim_world(
        Some("acme"),
        "tenant = \"acme\"\nauth_server = \"{auth}/\"\n",
    )
    .await;
    let text = s.check_exits(0).await;
    assert!(text.contains("ends with a slash"), "{text}");
    assert!(
        text.contains(&format!("{}/token?tenant=acme", s.sim.auth_url())),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn check_names_the_missing_permission() {
    let s = sim_world(Some("acme"), "tenant = \"acme\"\n").await;
    s.sim.set_faults(Faults {
        deny: vec!["items:read".into()],
        ..Default::default()
    });
    let text = s.check_exits(1).await;
    assert!(
        text.contains("✘ items: 403 You do not have permission"),
        "{text}"
    );
    assert!(
        text.contains("grant items to the API application and to its agent"),
        "{text}"
    );
    assert!(text.contains("Permissions tab"), "{text}");
    assert!(text.contains("Feature Access: Products (Items)"), "{text}");
    assert!(text.contains("✔ customers"), "{text}");
    let report = json_out(&s.check("right-secret", true).await);
    let items = report["checks"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["check"] == "items"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(items["status"], 403);
    assert_eq!(items["ok"], false);
}

#[tokio::test(flavor = "multi_thread")]
async fn check_explains_an_insufficient_scope() {
    let s = sim_world(
        Some("acme"),
        "tenant = \"acme\"\nscope = \"read:customers\"\n",
    )
    .await;
    let text = s.check_exits(1).await;
    assert!(text.contains("✔ token (scope read:customers"), "{text}");
    assert!(text.contains("✔ customers"), "{text}");
    assert!(text.contains("✘ software licences: 403"), "{text}");
    assert!(
        text.contains("the scope \"read:customers\" does not include software licences"),
        "{text}"
    );
    assert!(
        text.contains("✘ write access: scope \"read:customers\" grants no edit"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn check_explains_an_empty_scope() {
    let s = sim_world(Some("acme"), "tenant = \"acme\"\nscope = \"\"\n").await;
    let text = s.check_exits(1).await;
    assert!(text.contains("connections.acme.scope"), "{text}");
    assert!(text.contains("401 on every call"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn check_tests_one_connection_even_if_another_is_broken() {
    // globex's secret variable is not set: that must not stop acme's check.
    let s = sim_world(
        Some("acme"),
        "tenant = \"acme\"\n[connections.globex]\nresource_server = \"https://globex.halopsa.com/api\"\nauth_server = \"https://globex.halopsa.com/auth\"\nclient_id = \"g\"\nclient_secret_env = \"HALOSYNC_TEST_UNSET_SECRET\"\n",
    )
    .await;
    let out = s.check("right-secret", false).await;
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let out = s
        .world
        .run_env(&["check"], &[(SECRET_VAR, "right-secret")])
        .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("--connection acme"),
        "{}",
        stdout(&out)
    );
    let out = s
        .world
        .run_env(&["check", "--connection", "nope"], &[(SECRET_VAR, "x")])
        .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("no connection \"nope\""),
        "{}",
        stdout(&out)
    );
}
