//! The runtime's coalescing for batching handlers, against the real
//! RabbitMQ and Redis, with a recording handler run in process: batches
//! carry only the newest event per aggregate, duplicates and invalid
//! messages never reach the handler, one failing event does not fail the
//! others, and every message is settled.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use halosync_shared::config::{Config, Env};
use halosync_shared::contract::{AccountData, Event, Family};
use halosync_shared::halo::HaloClient;
use halosync_shared::runtime::{self, Batch, Handler, Outcome, Results, Services};
use halosync_shared::Failure;
use halosync_tests::{account_event, EnvOptions, TestEnv};
use tokio_util::sync::CancellationToken;

/// Records what it is given; fails events whose name is "reject me".
#[derive(Default)]
struct Recorder {
    batches: Mutex<Vec<Vec<(String, u64)>>>,
}

#[async_trait]
impl Handler for Recorder {
    const FAMILY: Family = Family::Account;
    type Data = AccountData;

    fn aggregate(data: &AccountData) -> String {
        data.account_id.clone()
    }

    async fn apply_batch(
        &self,
        _: &Services,
        _: &HaloClient,
        mut events: Batch<Event<AccountData>>,
    ) -> Results {
        self.batches.lock().unwrap().push(
            events
                .open()
                .map(|e| (e.data.account_id.clone(), e.version.sequence.unwrap_or(0)))
                .collect(),
        );
        for e in events.open() {
            if e.data.name == "reject me" {
                e.settle(Err(Failure::rejected("HaloPSA said no")));
            } else {
                e.settle(Ok(Outcome::Applied));
            }
        }
        events.finish()
    }
}

struct SecretEnv;
impl Env for SecretEnv {
    fn var(&self, key: &str) -> Option<String> {
        (key == halosync_tests::SECRET_ENV).then(|| "sim-secret".to_string())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn batches_keep_the_newest_per_aggregate_and_settle_every_message() {
    let env = TestEnv::with(
        "batch",
        EnvOptions {
            extra: "[worker]\nbatch_max = 100\nbatch_wait = \"300ms\"\n".into(),
            ..Default::default()
        },
    )
    .await;
    // Everything is queued before the consumer starts, so batches are full.
    let mut expected_newest: BTreeMap<String, u64> = BTreeMap::new();
    for seq in [3u64, 1, 5, 2, 4] {
        for a in 0..10 {
            let acc = format!("acc_{a}");
            env.publish(&account_event(
                &format!("e-{a}-{seq}"),
                &acc,
                "C",
                true,
                seq,
            ))
            .await;
            let e = expected_newest.entry(acc).or_default();
            *e = (*e).max(seq);
        }
    }
    env.publish(&account_event("e-0-5", "acc_0", "C", true, 5))
        .await; // duplicate id
    env.publish_raw("account.created", b"{broken").await;
    env.publish(&account_event("rej", "acc_bad", "reject me", true, 1))
        .await;

    let text = std::fs::read_to_string(&env.config_path).unwrap();
    let config = Config::from_toml(&text, Path::new("test"), &SecretEnv).unwrap();
    let shutdown = CancellationToken::new();
    let health = Arc::new(halosync_shared::outage::Health::new());
    let services = Arc::new(
        Services::connect(config, health, &shutdown)
            .await
            .unwrap()
            .expect("not shut down"),
    );
    let recorder = Arc::new(Recorder::default());
    let worker = tokio::spawn(runtime::run(services, recorder.clone(), shutdown.clone()));

    env.wait_drained(Family::Account, Duration::from_secs(30))
        .await;
    shutdown.cancel();
    worker.await.unwrap();

    let batches = recorder.batches.lock().unwrap().clone();
    assert!(!batches.is_empty());
    let mut applied: BTreeMap<String, u64> = BTreeMap::new();
    for b in &batches {
        // within one batch, one event per aggregate
        let mut seen = std::collections::BTreeSet::new();
        for (acc, _) in b {
            assert!(
                seen.insert(acc.clone()),
                "aggregate {acc} twice in one batch: {b:?}"
            );
        }
        for (acc, seq) in b {
            let e = applied.entry(acc.clone()).or_default();
            *e = (*e).max(*seq);
        }
    }
    // the first batch held all 53 messages: 11 aggregates, newest of each
    assert_eq!(batches[0].len(), 11, "{batches:?}");
    let handled: usize = batches.iter().map(Vec::len).sum();
    assert!(
        handled < 50,
        "coalescing did not happen: {handled} events handled"
    );
    for (acc, seq) in &expected_newest {
        assert_eq!(applied.get(acc), Some(seq), "newest of {acc}");
    }
    let dead = env.take_dead(Family::Account).await;
    let mut classes: Vec<String> = dead
        .iter()
        .map(|d| d.header("x-halosync-error-class"))
        .collect();
    classes.sort();
    assert_eq!(classes, ["invalid", "rejected"], "{dead:#?}");
    assert!(dead.iter().any(|d| d
        .header("x-halosync-error-message")
        .contains("HaloPSA said no")));
}
