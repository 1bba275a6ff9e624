//! Live configuration: workers take new connections, item mappings and
//! rotated secrets from a changed config file (on SIGHUP, or when the file
//! changes on disk) without a restart; an invalid file is refused and the
//! running configuration stays.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use halo_sim::{SimConfig, SimHandle};
use halosync_shared::config::{Config, Env};
use halosync_shared::contract::Family;
use halosync_shared::outage::Health;
use halosync_shared::Services;
use halosync_tests::*;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const ITEM: i64 = 501;
const TEAMS_ITEM: i64 = 502;

fn sighup(env: &mut TestEnv, worker: usize) {
    let pid = env.worker(worker).child.id().to_string();
    let status = Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
}

async fn wait_log(env: &TestEnv, needle: &str, at_least: usize) {
    env.wait_for(
        &format!("{at_least} log lines with {needle:?}"),
        Duration::from_secs(30),
        || env.logs().matches(needle).count() >= at_least,
    )
    .await;
}

fn teams_subscription(id: &str, sub: &str, account: &str, seq: u64) -> Value {
    let mut e = subscription_event(id, sub, account, 3, "active", seq);
    e["data"]["product"] = json!({"sku": "MS-TEAMS", "name": "Microsoft Teams Essentials"});
    e
}

/// Lays the config out as a Kubernetes ConfigMap volume does:
/// `conf/halosync.toml -> ..data/halosync.toml`, `..data -> data-N`, so
/// that an update is one atomic swap of `..data` (which the workers'
/// watcher sees), while an edit inside `data-N` is not seen until SIGHUP.
struct ConfigMapDir {
    root: std::path::PathBuf,
    generation: u32,
}

impl ConfigMapDir {
    fn new(base: &Path, text: &str) -> ConfigMapDir {
        let root = base.join("configmap");
        std::fs::create_dir_all(root.join("conf")).expect("conf dir");
        let mut d = ConfigMapDir {
            root,
            generation: 0,
        };
        d.publish(text);
        std::os::unix::fs::symlink("..data/halosync.toml", d.path()).expect("symlink");
        d
    }

    /// What the workers are given as HALOSYNC_CONFIG.
    fn path(&self) -> std::path::PathBuf {
        self.root.join("conf/halosync.toml")
    }

    /// A new generation, swapped in atomically (what the kubelet does).
    fn publish(&mut self, text: &str) {
        self.generation += 1;
        let data = self.root.join(format!("data-{}", self.generation));
        std::fs::create_dir_all(&data).expect("data dir");
        std::fs::write(data.join("halosync.toml"), text).expect("write");
        let tmp = self.root.join("conf/..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(format!("../data-{}", self.generation), &tmp).expect("symlink");
        std::fs::rename(&tmp, self.root.join("conf/..data")).expect("swap ..data");
    }

    /// Edits the current generation in place: no event in `conf/`.
    fn edit_in_place(&self, text: &str) {
        let file = self
            .root
            .join(format!("data-{}/halosync.toml", self.generation));
        std::fs::write(file, text).expect("edit");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sighup_adds_a_connection_and_an_item_mapping_and_an_invalid_update_is_refused() {
    let health = free_port();
    let mut env = TestEnv::with(
        "reload",
        EnvOptions {
            connection_extra: format!(
                "{GENEROUS_BUDGET}\n[connections.{CONNECTION}.items]\n\"MS-365-BP\" = {ITEM}\n"
            ),
            extra: format!("[worker]\nhealth_port = {health}\n"),
            ..Default::default()
        },
    )
    .await;
    env.sim.insert_item(ITEM, "Microsoft 365 Business Premium");
    env.sim
        .insert_item(TEAMS_ITEM, "Microsoft Teams Essentials");
    let original = std::fs::read_to_string(&env.config_path).expect("config");
    let mut configmap = ConfigMapDir::new(&env.dir, &original);
    let config = configmap.path().display().to_string();
    let account = env.spawn_worker_with("halosync-account", &[("HALOSYNC_CONFIG", &config)]);
    let subscription =
        env.spawn_worker_with("halosync-subscription", &[("HALOSYNC_CONFIG", &config)]);

    env.publish(&account_event("a1", "acc_1", "Acme Ltd", true, 1))
        .await;
    env.publish(&teams_subscription("s1", "sub_1", "acc_1", 1))
        .await;
    env.wait_for("the customer", Duration::from_secs(30), || {
        !env.sim.clients().is_empty()
    })
    .await;
    env.wait_drained(Family::Subscription, Duration::from_secs(30))
        .await;
    assert_eq!(
        env.dead_count(Family::Subscription).await,
        1,
        "MS-TEAMS is not mapped yet"
    );

    // A second MSP's HaloPSA, with its secret in a file.
    let globex = SimHandle::start(SimConfig {
        client_id: "globex-app".into(),
        client_secret: "globex-secret".into(),
        ..Default::default()
    })
    .await
    .expect("second halo-sim");
    let secret_file = env.dir.join("globex.secret");
    std::fs::write(&secret_file, "globex-secret\n").expect("secret file");
    let with_mapping = original.replace(
        &format!("\"MS-365-BP\" = {ITEM}\n"),
        &format!("\"MS-365-BP\" = {ITEM}\n\"MS-TEAMS\" = {TEAMS_ITEM}\n"),
    );
    assert_ne!(with_mapping, original);
    let grown = format!(
        "{with_mapping}\n[connections.globex]\nresource_server = \"{}\"\nauth_server = \"{}\"\nclient_id = \"globex-app\"\nclient_secret_file = \"{}\"\n{GENEROUS_BUDGET}\n",
        globex.api_url(),
        globex.auth_url(),
        secret_file.display()
    );

    // 1. The file is edited where the watcher does not look; nothing
    // happens until SIGHUP, then both workers reload.
    configmap.edit_in_place(&grown);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        env.logs().matches("config reloaded").count(),
        0,
        "not before SIGHUP"
    );
    sighup(&mut env, account);
    sighup(&mut env, subscription);
    wait_log(&env, "config reloaded", 2).await;
    let logs = env.logs();
    assert_eq!(
        logs.matches("\"trigger\":\"Sighup\"").count(),
        2,
        "{}",
        tail(&logs, 20)
    );
    assert!(
        logs.contains("\"added\":\"[\\\"globex\\\"]\""),
        "{}",
        tail(&logs, 20)
    );
    assert!(
        logs.contains("\"changed\":\"[\\\"acme\\\"]\""),
        "{}",
        tail(&logs, 20)
    );

    // The mapping works without a restart: the dead letter is replayed once.
    let (ok, out) = env.run_halosync(&[
        "dlq",
        "replay",
        "--family",
        "subscription",
        "--class",
        "unmapped",
    ]);
    assert!(ok, "{out}");
    env.wait_for("the Teams licence", Duration::from_secs(30), || {
        env.sim.licences().len() == 1
    })
    .await;
    // And the new connection takes events.
    let mut e = account_event("g1", "gacc_1", "Globex Corp", true, 1);
    e["connection"] = json!("globex");
    env.publish(&e).await;
    env.wait_for("the Globex customer", Duration::from_secs(30), || {
        globex.clients().len() == 1
    })
    .await;

    // 2. An invalid update, swapped in as a ConfigMap update is: the
    // watcher reloads on its own and refuses it with the start's message.
    let invalid = grown.replace(
        GENEROUS_BUDGET,
        "requests_per_window = 0\nwindow_seconds = 300",
    );
    configmap.publish(&invalid);
    wait_log(&env, "config reload refused", 2).await;
    let logs = env.logs();
    assert_eq!(
        logs.matches("\"trigger\":\"FileChanged\"").count(),
        2,
        "{}",
        tail(&logs, 20)
    );
    assert!(
        logs.contains("requests_per_window") && logs.contains("must be at least 1"),
        "the refusal names the key as a start would:\n{}",
        tail(&logs, 20)
    );
    // 3. SIGHUP with the invalid file: refused again; work goes on.
    sighup(&mut env, account);
    sighup(&mut env, subscription);
    wait_log(&env, "config reload refused", 4).await;
    let mut e = account_event("g2", "gacc_2", "Globex Two", true, 1);
    e["connection"] = json!("globex");
    env.publish(&e).await;
    env.publish(&teams_subscription("s2", "sub_2", "acc_1", 1))
        .await;
    env.wait_for(
        "work goes on with the running config",
        Duration::from_secs(30),
        || globex.clients().len() == 2 && env.sim.licences().len() == 2,
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = http_get(health, "/metrics")
            .await
            .map(|r| r.1)
            .unwrap_or_default();
        if metrics.contains("halosync_config_reloads_total{result=\"refused\"} 2") {
            assert!(metrics.contains("halosync_config_reload_ok 0"), "{metrics}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no refused-reload metric:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(env
        .worker(account)
        .child
        .try_wait()
        .expect("wait")
        .is_none());
    assert!(env
        .worker(subscription)
        .child
        .try_wait()
        .expect("wait")
        .is_none());
    assert_eq!(env.dead_count(Family::Account).await, 0);
    assert_eq!(env.dead_count(Family::Subscription).await, 0);
    globex.shutdown().await;
}

struct MapEnv(Vec<(String, String)>);
impl Env for MapEnv {
    fn var(&self, key: &str) -> Option<String> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rotated_secret_drops_the_cached_token_and_keeps_unchanged_clients() {
    let env = TestEnv::new("rotate").await;
    let text = std::fs::read_to_string(&env.config_path).expect("config");
    let vars = |secret: &str| MapEnv(vec![(SECRET_ENV.to_string(), secret.to_string())]);
    let config =
        Config::from_toml(&text, Path::new("t"), &vars(&env.sim_secret())).expect("config");
    let shutdown = CancellationToken::new();
    let services = Services::connect(config, Arc::new(Health::new()), &shutdown)
        .await
        .expect("connect")
        .expect("not shut down");
    let before = services.halo(CONNECTION).expect("client");
    before.tokens().get().await.expect("a token");
    let token_key = format!("{}halosync:{CONNECTION}:token", env.prefix);
    assert!(
        env.redis_keys().await.contains(&token_key),
        "the token is cached in Redis: {:?}",
        env.redis_keys().await
    );

    // The same file again: nothing changes, the client is kept.
    let same = Config::from_toml(&text, Path::new("t"), &vars(&env.sim_secret())).expect("config");
    let summary = services.reload(same).await;
    assert!(
        summary.changed.is_empty() && summary.tokens_dropped.is_empty(),
        "{summary:?}"
    );
    assert!(Arc::ptr_eq(
        &before,
        &services.halo(CONNECTION).expect("client")
    ));

    // A rotated secret: a new client, and the old token is gone.
    let rotated = Config::from_toml(&text, Path::new("t"), &vars("rotated")).expect("config");
    let summary = services.reload(rotated).await;
    assert_eq!(summary.tokens_dropped, [CONNECTION]);
    assert!(!env.redis_keys().await.contains(&token_key));
    let after = services.halo(CONNECTION).expect("client");
    assert!(!Arc::ptr_eq(&before, &after));
    assert_eq!(after.connection().client_secret.expose(), "rotated");

    // What only a restart changes is kept, and named.
    let moved = text.replace(
        &format!("prefix = \"{}\"", env.prefix),
        "prefix = \"elsewhere.\"",
    );
    let summary = services
        .reload(Config::from_toml(&moved, Path::new("t"), &vars("rotated")).expect("config"))
        .await;
    assert_eq!(summary.needs_restart, ["prefix"]);
    assert_eq!(services.config().prefix, env.prefix);
}
