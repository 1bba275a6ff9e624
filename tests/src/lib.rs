//! The integration-test harness: a real RabbitMQ and Redis (they must be
//! running; a test fails loudly when they are not), halo-sim in process,
//! and the worker binaries as real child processes.
//!
//! Each [`TestEnv`] has its own name prefix (`t-xxxxxxxx.`) for exchanges,
//! queues and Redis keys, so tests run in parallel on one broker and one
//! Redis, and it deletes everything of its prefix when dropped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// TLS fixtures: private PKI, TLS-only redis-server, TLS front of RabbitMQ.
pub mod tls;

use halo_sim::{SimConfig, SimHandle};
use halosync_shared::amqp::{self, Publisher, Topology};
use halosync_shared::contract::Family;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, ExchangeDeleteOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use serde_json::{json, Value};

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const REDIS_URL: &str = "redis://127.0.0.1:6379/0";
pub const SECRET_ENV: &str = "HALOSYNC_TEST_SECRET";
pub const CONNECTION: &str = "acme";

/// Short retry tiers so that retries finish within a test.
pub const TEST_DELAYS_MS: [u64; 3] = [200, 400, 800];

pub const GENEROUS_BUDGET: &str = "requests_per_window = 100000\nwindow_seconds = 300";

/// Options for one test environment.
#[derive(Clone, Debug)]
pub struct EnvOptions {
    pub sim: SimConfig,
    /// Extra lines for the `[connections.acme]` table.
    pub connection_extra: String,
    /// Extra TOML appended at the end (e.g. `[worker]` settings).
    pub extra: String,
    pub max_attempts: u32,
    /// Attempts of a `dependency` failure before it is dead-lettered.
    pub dependency_max_attempts: u32,
    /// `retry.dependency_recheck`: how long a missing dependency is not
    /// asked for again.
    pub dependency_recheck: Duration,
    /// The broker, when not the shared one (a [`PrivateRabbit`]'s URL).
    pub amqp_url: Option<String>,
    /// `retry.delays` in ms (default [`TEST_DELAYS_MS`]).
    pub retry_delays_ms: Vec<u64>,
}

impl Default for EnvOptions {
    fn default() -> Self {
        EnvOptions {
            sim: SimConfig::default(),
            // A generous budget unless a test is about the budget.
            connection_extra: GENEROUS_BUDGET.into(),
            extra: String::new(),
            max_attempts: 4,
            dependency_max_attempts: 6,
            dependency_recheck: Duration::from_secs(1),
            amqp_url: None,
            retry_delays_ms: TEST_DELAYS_MS.to_vec(),
        }
    }
}

impl EnvOptions {
    /// Default options whose connection maps these skus (or
    /// `overage:<metric>`, `<sku>:<metric>` keys) to HaloPSA items, after
    /// `policy` lines (e.g. `overwrite_prices = true`) of `[connections.acme]`,
    /// with the generous budget.
    pub fn mapping(policy: &str, items: &[(&str, i64)]) -> EnvOptions {
        EnvOptions {
            connection_extra: items_toml(&format!("{GENEROUS_BUDGET}\n{policy}"), items),
            ..Default::default()
        }
    }

    /// Default options with halo-sim under `faults` and HaloPSA's rate
    /// limit: 429 past `requests` in `window_secs` (with `Retry-After`
    /// when `retry_after`); `budget` is the connection's own budget.
    pub fn rate_limited(
        requests: u64,
        window_secs: u64,
        retry_after: bool,
        faults: halo_sim::Faults,
        budget: &str,
    ) -> EnvOptions {
        EnvOptions {
            connection_extra: budget.into(),
            ..EnvOptions::faults(halo_sim::Faults {
                rate_limit: Some(halo_sim::RateLimit {
                    requests,
                    window_secs,
                    retry_after,
                }),
                ..faults
            })
        }
    }

    /// Default options with the workers' health endpoint on `port`.
    pub fn health_port(port: u16) -> EnvOptions {
        EnvOptions {
            extra: format!("[worker]\nhealth_port = {port}\n"),
            ..Default::default()
        }
    }

    /// Default options with halo-sim started under these faults.
    pub fn faults(faults: halo_sim::Faults) -> EnvOptions {
        EnvOptions {
            sim: SimConfig {
                faults,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// Default options with a fixed latency on every HaloPSA request.
    pub fn latency(ms: u64) -> EnvOptions {
        EnvOptions::faults(halo_sim::Faults {
            latency_ms: ms,
            ..Default::default()
        })
    }
}

/// One isolated world: prefix, halo-sim, config file, worker processes.
pub struct TestEnv {
    pub prefix: String,
    /// The broker this world uses: [`AMQP_URL`] unless a test brought its
    /// own ([`EnvOptions::amqp_url`]).
    pub amqp_url: String,
    pub sim: SimHandle,
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub topology: Topology,
    pub publisher: Publisher,
    secret: String,
    workers: Vec<Worker>,
    next_worker: usize,
}

/// A worker child process.
pub struct Worker {
    pub child: Child,
    pub log: PathBuf,
}

/// Every worker binary, one per family.
pub const ALL_WORKERS: [&str; 4] = [
    "halosync-account",
    "halosync-subscription",
    "halosync-usage",
    "halosync-overage",
];

/// A `connection_extra` mapping skus (or `overage:<metric>`,
/// `<sku>:<metric>` keys) to HaloPSA items: `lines` of `[connections.acme]`
/// (budget, policy), then `[connections.acme.items]` (it must come last:
/// nothing of the parent table may follow its header).
pub fn items_toml(lines: &str, items: &[(&str, i64)]) -> String {
    let mut toml = format!("{}\n[connections.{CONNECTION}.items]\n", lines.trim_end());
    for (key, item) in items {
        toml.push_str(&format!("\"{key}\" = {item}\n"));
    }
    toml
}

impl TestEnv {
    pub async fn new(name: &str) -> TestEnv {
        TestEnv::with(name, EnvOptions::default()).await
    }

    pub async fn with(name: &str, opts: EnvOptions) -> TestEnv {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let prefix = format!("t-{}-{}.", name, &id[..8]);
        let amqp_url = opts
            .amqp_url
            .clone()
            .unwrap_or_else(|| AMQP_URL.to_string());
        let sim = SimHandle::start(opts.sim.clone())
            .await
            .expect("halo-sim must start");
        let dir = std::env::temp_dir().join(format!("halosync-{}", prefix.trim_end_matches('.')));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let config_path = dir.join("halosync.toml");
        let delays = opts
            .retry_delays_ms
            .iter()
            .map(|ms| format!("\"{ms}ms\""))
            .collect::<Vec<_>>()
            .join(", ");
        let tenant = opts
            .sim
            .tenant
            .as_ref()
            .map(|t| format!("tenant = \"{t}\"\n"))
            .unwrap_or_default();
        let config = format!(
            r#"amqp_url = "{amqp_url}"
redis_url = "{REDIS_URL}"
prefix = "{prefix}"

[retry]
delays = [{delays}]
max_attempts = {max_attempts}
dependency_max_attempts = {dependency_max_attempts}
dependency_recheck = "{dependency_recheck}ms"
rate_limited_min_delay = "400ms"

[connections.{CONNECTION}]
resource_server = "{api}"
auth_server = "{auth}/"
{tenant}client_id = "{client_id}"
client_secret_env = "{SECRET_ENV}"
{connection_extra}
{extra}
"#,
            max_attempts = opts.max_attempts,
            dependency_max_attempts = opts.dependency_max_attempts,
            dependency_recheck = opts.dependency_recheck.as_millis(),
            api = sim.api_url(),
            auth = sim.auth_url(),
            client_id = opts.sim.client_id,
            connection_extra = opts.connection_extra,
            extra = with_flush_grace(&opts.extra),
        );
        std::fs::write(&config_path, config).expect("write config");
        let topology = Topology::new(&prefix, &opts.retry_delays_ms);
        // Under load RabbitMQ 3.10 sometimes refuses to declare a quorum
        // queue at once ("cluster_not_formed", a hard error that closes the
        // connection); the workers retry through their reconnect loop, and
        // so does the harness, on a new connection, a few times.
        let mut tries = 0;
        let publisher = loop {
            tries += 1;
            let publisher = Publisher::connect(&amqp_url, &Default::default(), &prefix, "tests")
                .await
                .unwrap_or_else(|e| panic!("RabbitMQ must be running at {amqp_url}: {e}"));
            match topology.declare(publisher.channel()).await {
                Ok(()) => break publisher,
                Err(e) if tries < 4 => {
                    eprintln!("declaring the topology failed (try {tries}), again: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => panic!("declare topology: {e:?}"),
            }
        };
        // Fail loudly if Redis is down.
        let mut r = redis_conn().await;
        let _: String = redis::cmd("PING")
            .query_async(&mut r)
            .await
            .unwrap_or_else(|e| panic!("Redis must be running at {REDIS_URL}: {e}"));
        TestEnv {
            prefix,
            amqp_url,
            secret: opts.sim.client_secret.clone(),
            sim,
            dir,
            config_path,
            topology,
            publisher,
            workers: Vec::new(),
            next_worker: 0,
        }
    }

    /// Starts one worker binary (`halosync-account`, ...) as a child.
    pub fn spawn_worker(&mut self, binary: &str) -> usize {
        self.spawn_worker_with(binary, &[])
    }

    /// Starts a worker with extra environment variables.
    pub fn spawn_worker_with(&mut self, binary: &str, env: &[(&str, &str)]) -> usize {
        let log = self.dir.join(format!("{binary}-{}.log", self.next_worker));
        self.next_worker += 1;
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = Command::new(binary_path(binary))
            .env("HALOSYNC_CONFIG", &self.config_path)
            .env(SECRET_ENV, &self.secret)
            .env("RUST_LOG", "info")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {binary}: {e}"));
        self.workers.push(Worker { child, log });
        self.workers.len() - 1
    }

    /// Starts each of `binaries` once; their indexes, in order.
    pub fn spawn_workers(&mut self, binaries: &[&str]) -> Vec<usize> {
        binaries.iter().map(|b| self.spawn_worker(b)).collect()
    }

    pub fn worker(&mut self, index: usize) -> &mut Worker {
        &mut self.workers[index]
    }

    /// SIGKILL: the process dies with whatever it has in flight.
    pub fn kill_worker(&mut self, index: usize) {
        let w = &mut self.workers[index];
        let _ = w.child.kill();
        let _ = w.child.wait();
    }

    /// SIGTERM, then waits for the exit status.
    pub fn stop_worker(&mut self, index: usize) -> std::process::ExitStatus {
        let w = &mut self.workers[index];
        let pid = w.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = w.child.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "worker {pid} did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The logs of every worker so far (for assertion messages).
    pub fn logs(&self) -> String {
        self.workers
            .iter()
            .map(|w| std::fs::read_to_string(&w.log).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Publishes one event (as a publisher would, confirmed).
    pub async fn publish(&self, event: &Value) {
        self.publish_with_headers(event, FieldTable::default())
            .await;
    }

    /// Publishes one event with AMQP headers of the publisher's choosing
    /// (a publisher forging halosync's own, say).
    pub async fn publish_with_headers(&self, event: &Value, headers: FieldTable) {
        let body = serde_json::to_vec(event).expect("json");
        let id = event["id"].as_str().unwrap_or("none");
        let ty = event["type"].as_str().unwrap_or("none");
        self.publisher
            .publish_raw(id, ty, &body, headers)
            .await
            .expect("publish confirmed");
    }

    /// Publishes, for each `a` of `accounts`, the event `{id}{a}` of the
    /// active account `acc_{a}` named `name(a)`, at `sequence`.
    pub async fn publish_accounts(
        &self,
        id: &str,
        accounts: impl IntoIterator<Item = usize>,
        sequence: u64,
        name: impl Fn(usize) -> String,
    ) {
        for a in accounts {
            self.publish(&account_event(
                &format!("{id}{a}"),
                &format!("acc_{a}"),
                &name(a),
                true,
                sequence,
            ))
            .await;
        }
    }

    /// Publishes a raw body with a routing key (to test invalid input).
    pub async fn publish_raw(&self, routing_key: &str, body: &[u8]) {
        self.publisher
            .publish_raw("raw", routing_key, body, FieldTable::default())
            .await
            .expect("publish confirmed");
    }

    /// The client secret halo-sim accepts.
    pub fn sim_secret(&self) -> String {
        self.secret.clone()
    }

    /// Opens a new publishing connection (after the broker was restarted
    /// under the test).
    pub async fn reconnect_publisher(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match Publisher::connect(&self.amqp_url, &Default::default(), &self.prefix, "tests")
                .await
            {
                Ok(p) => {
                    self.publisher = p;
                    return;
                }
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "cannot reconnect to RabbitMQ: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }
    }

    /// Messages waiting in a family's dead queue.
    pub async fn dead_count(&self, family: Family) -> u32 {
        self.depth(&self.topology.dead_queue(family)).await
    }

    /// Messages ready in a queue.
    pub async fn depth(&self, queue: &str) -> u32 {
        let ch = self.publisher.channel();
        ch.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map(|q| q.message_count())
        .unwrap_or_else(|e| panic!("queue {queue}: {e}"))
    }

    /// Waits (10 s at most) until `queue` holds `expected` ready messages,
    /// else panics with `what` and the last count. For a dead queue while
    /// a console runs: reading dead letters (a page, the overview's
    /// collector, a job) holds them unacknowledged for a moment and then
    /// returns them, so the ready count dips below what the queue holds.
    /// A letter that really left never comes back, so this still fails.
    pub async fn wait_depth(&self, queue: &str, expected: u32, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let n = self.depth(queue).await;
            if n == expected {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: {queue} holds {n} ready messages, not {expected}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Takes (and acks) every message of a family's dead queue.
    pub async fn take_dead(&self, family: Family) -> Vec<DeadLetter> {
        let ch = self.publisher.channel();
        let mut out = Vec::new();
        while let Some(m) = ch
            .basic_get(
                self.topology.dead_queue(family).into(),
                BasicGetOptions::default(),
            )
            .await
            .expect("basic_get")
        {
            let headers = amqp::headers::to_json(m.delivery.properties.headers().as_ref());
            out.push(DeadLetter {
                headers,
                body: String::from_utf8_lossy(&m.delivery.data).into_owned(),
            });
            m.delivery
                .acker
                .ack(BasicAckOptions::default())
                .await
                .expect("ack");
        }
        out
    }

    /// Takes (and acks) dead letters of `family` until there are at least
    /// `n`, for up to about ten seconds; all it took.
    pub async fn take_dead_at_least(&self, family: Family, n: usize) -> Vec<DeadLetter> {
        let mut dead = Vec::new();
        for _ in 0..100 {
            dead.extend(self.take_dead(family).await);
            if dead.len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        dead
    }

    /// Panics when `family`'s dead queue holds anything, naming each dead
    /// letter's class and reason and showing the workers' logs, so that a
    /// failure says why the event was dead-lettered, not only that it was.
    pub async fn assert_no_dead(&self, family: Family) {
        let dead = self.take_dead(family).await;
        if dead.is_empty() {
            return;
        }
        let why: Vec<String> = dead
            .iter()
            .map(|d| {
                format!(
                    "{} {} {}: {}",
                    d.header(amqp::headers::EVENT_ID),
                    d.header(amqp::headers::ERROR_CLASS),
                    d.header(amqp::headers::ATTEMPTS),
                    d.header(amqp::headers::ERROR_MESSAGE)
                )
            })
            .collect();
        panic!(
            "{} dead letter(s) in {family:?}:\n{}\n--- logs ---\n{}",
            dead.len(),
            why.join("\n"),
            self.logs()
        );
    }

    /// Polls `cond` until it holds, or panics with `what` and the logs.
    pub async fn wait_for<F>(&self, what: &str, timeout: Duration, mut cond: F)
    where
        F: FnMut() -> bool,
    {
        let deadline = Instant::now() + timeout;
        while !cond() {
            if Instant::now() > deadline {
                panic!(
                    "timed out after {timeout:?} waiting for: {what}\nsim state: {}\nworker logs (tail):\n{}",
                    self.sim.state(),
                    tail(&self.logs(), 60)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until a queue is empty and stays empty for `quiet`.
    pub async fn wait_drained(&self, family: Family, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut quiet_since: Option<Instant> = None;
        loop {
            let mut total = self.depth(&self.topology.work_queue(family)).await;
            for d in self.topology.delays_ms().to_vec() {
                total += self.depth(&self.topology.retry_queue(family, d)).await;
            }
            let unacked = self.unacked(&self.topology.work_queue(family));
            if total == 0 && unacked == 0 {
                let since = *quiet_since.get_or_insert_with(Instant::now);
                // Longer than the longest test tier, so that a message moving
                // between a delay queue and the work queue is not missed, and
                // than RabbitMQ's statistics interval (5 s), after which the
                // unacked count (read from its statistics) is current: a batch
                // still in flight then shows.
                if since.elapsed() > Duration::from_millis(5500) {
                    return;
                }
            } else {
                quiet_since = None;
            }
            if Instant::now() > deadline {
                panic!(
                    "queues of {family} not drained after {timeout:?} ({total} ready, {unacked} unacked)\nworker logs (tail):\n{}",
                    tail(&self.logs(), 60)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Unacknowledged messages of a queue, read with rabbitmqctl.
    pub fn unacked(&self, queue: &str) -> u64 {
        let out = Command::new("rabbitmqctl")
            .args([
                "list_queues",
                "-q",
                "--no-table-headers",
                "name",
                "messages_unacknowledged",
            ])
            .output()
            .expect("rabbitmqctl must be on PATH");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                let name = it.next()?;
                let n = it.next()?.parse::<u64>().ok()?;
                (name == queue).then_some(n)
            })
            .sum()
    }

    /// Every Redis key of this environment.
    pub async fn redis_keys(&self) -> Vec<String> {
        let mut r = redis_conn().await;
        redis::cmd("KEYS")
            .arg(format!("{}halosync:*", self.prefix))
            .query_async(&mut r)
            .await
            .expect("redis KEYS")
    }

    /// Deletes every Redis key of this environment ("Redis flushed").
    pub async fn flush_redis(&self) {
        let keys = self.redis_keys().await;
        if keys.is_empty() {
            return;
        }
        let mut r = redis_conn().await;
        let _: i64 = redis::cmd("DEL")
            .arg(&keys)
            .query_async(&mut r)
            .await
            .expect("redis DEL");
    }

    /// Closes every broker connection whose name contains `needle`.
    pub fn close_broker_connections(&self, needle: &str) -> usize {
        let out = Command::new("rabbitmqctl")
            .args([
                "list_connections",
                "-q",
                "--no-table-headers",
                "pid",
                "client_properties",
            ])
            .output()
            .expect("rabbitmqctl");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut closed = 0;
        for line in text.lines().filter(|l| l.contains(needle)) {
            if let Some(pid) = line.split_whitespace().next() {
                let status = Command::new("rabbitmqctl")
                    .args(["close_connection", pid, "test: dropping the connection"])
                    .status()
                    .expect("rabbitmqctl close_connection");
                if status.success() {
                    closed += 1;
                }
            }
        }
        closed
    }

    /// HaloPSA loses everything (through halo-sim's `/_sim/reset`, as a
    /// deleted record or a fresh instance would), Redis keeps its mappings.
    pub async fn reset_halo(&self) {
        let reset = reqwest::Client::new()
            .post(format!("{}/_sim/reset", self.sim.base_url()))
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST /_sim/reset: {e}"));
        assert!(reset.status().is_success());
    }

    /// Customers in the sim, excluding nothing.
    pub fn clients(&self) -> Vec<Value> {
        self.sim.clients()
    }

    /// Count of sim requests to one endpoint key, e.g. `POST /api/Client`.
    pub fn count(&self, endpoint: &str) -> u64 {
        self.sim.counts().get(endpoint).copied().unwrap_or(0)
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        for w in &mut self.workers {
            let _ = w.child.kill();
            let _ = w.child.wait();
        }
        remove_everything_of(&self.amqp_url, &self.prefix, &self.topology, &self.dir);
        // Every test ends by checking that halosync spoke HaloPSA's models:
        // a property the model lacks is dropped by HaloPSA without a word
        // (halo-sim drops and counts it). Not while already panicking (the
        // test's own failure is the one to read).
        if !std::thread::panicking() {
            if let Err(report) = no_ignored_properties(&self.sim) {
                panic!("{report}");
            }
        }
    }
}

/// Removes everything a test's prefix holds: its queues and exchanges on
/// the shared broker, its Redis keys (`{prefix}halosync:*`, never a flush)
/// and its temporary directory. Called by every test world's `Drop`, also
/// when the test failed.
pub fn remove_everything_of(amqp_url: &str, prefix: &str, topology: &Topology, dir: &Path) {
    let amqp_url = amqp_url.to_string();
    let prefix = prefix.to_string();
    let topology = topology.clone();
    // Drop cannot await: clean up on a thread with its own runtime.
    let cleanup = std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async move {
            if let Ok(conn) =
                amqp::connect_with(&amqp_url, &Default::default(), "tests-cleanup").await
            {
                if let Ok(ch) = conn.create_channel().await {
                    for q in topology.all_queues() {
                        let _ = ch
                            .queue_delete(q.into(), QueueDeleteOptions::default())
                            .await;
                    }
                    for e in topology.exchanges() {
                        let _ = ch
                            .exchange_delete(e.into(), ExchangeDeleteOptions::default())
                            .await;
                    }
                }
                let _ = conn.close(200, "bye".into()).await;
            }
            if let Ok(mut r) = redis_at(REDIS_URL).await {
                let keys: Vec<String> = redis::cmd("KEYS")
                    .arg(format!("{prefix}halosync:*"))
                    .query_async(&mut r)
                    .await
                    .unwrap_or_default();
                if !keys.is_empty() {
                    let _: Result<i64, _> = redis::cmd("DEL").arg(&keys).query_async(&mut r).await;
                }
            }
        });
    });
    let _ = cleanup.join();
    let _ = std::fs::remove_dir_all(dir);
}

/// `Err` naming, per endpoint, the properties halo-sim ignored because the
/// request's model (HaloPSA's OpenAPI document) lacks them, or the paths
/// halosync spelt otherwise than the document. [`TestEnv`]
/// checks it when dropped; tests with a second simulator call it for that
/// one.
pub fn no_ignored_properties(sim: &SimHandle) -> Result<(), String> {
    let misspelt = sim.misspelt_paths();
    if !misspelt.is_empty() {
        return Err(format!(
            "halosync spelt paths otherwise than HaloPSA's OpenAPI document: {misspelt:?}"
        ));
    }
    let ignored = sim.ignored_properties();
    if ignored.is_empty() {
        return Ok(());
    }
    let lines: Vec<String> = ignored
        .iter()
        .map(|(endpoint, i)| {
            format!(
                "  {endpoint}: {} ignored: {}",
                i.count,
                i.properties.iter().cloned().collect::<Vec<_>>().join(", ")
            )
        })
        .collect();
    Err(format!(
        "halo-sim ignored properties halosync sent that HaloPSA's models lack (a real HaloPSA drops them without a word):\n{}",
        lines.join("\n")
    ))
}

/// A dead letter taken from a dead queue.
#[derive(Debug)]
pub struct DeadLetter {
    pub headers: Value,
    pub body: String,
}

impl DeadLetter {
    pub fn header(&self, key: &str) -> String {
        match &self.headers[key] {
            Value::String(s) => s.clone(),
            Value::Null => String::new(),
            other => other.to_string(),
        }
    }
}

pub async fn redis_conn() -> redis::aio::MultiplexedConnection {
    redis_at(REDIS_URL)
        .await
        .unwrap_or_else(|e| panic!("Redis must be running at {REDIS_URL}: {e}"))
}

/// A connection to the Redis at `url`, as every test opens one: with the
/// workers' patience (`store.rs`: 5 s) and more, not redis-rs's defaults
/// (1 s to connect, 500 ms per answer), which a loaded machine running a
/// dozen tests at once exceeds now and then, failing a test for nothing.
/// A Redis that is down still fails at once (connection refused).
pub async fn redis_at(url: &str) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(10)))
        .set_response_timeout(Some(Duration::from_secs(30)));
    redis::Client::open(url)?
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

/// The path of a workspace binary next to the running test's target dir.
pub fn binary_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/debug/deps/test-xxxx -> target/debug
    // A test runs from target/<profile>/deps, a harness binary (the
    // benchmark) from target/<profile>: look in both.
    let here = exe.parent().expect("exe dir").to_path_buf();
    let path = [Some(here.clone()), here.parent().map(Path::to_path_buf)]
        .into_iter()
        .flatten()
        .map(|d| d.join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| here.join(name));
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace --bins` first (`make test` does)",
        path.display()
    );
    path
}

/// The last `lines` lines of `text` (for assertion messages).
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// An `account.*` event.
pub fn account_event(id: &str, account_id: &str, name: &str, active: bool, sequence: u64) -> Value {
    let ty = if active {
        "account.updated"
    } else {
        "account.deactivated"
    };
    json!({
        "id": id,
        "type": if sequence == 1 { "account.created" } else { ty },
        "schema_version": 1,
        "connection": CONNECTION,
        "occurred_at": "2026-11-22T10:15:00.123Z",
        "sequence": sequence,
        "data": {
            "account_id": account_id,
            "name": name,
            "active": active,
            "website": format!("https://{account_id}.example"),
            "currency": "GBP"
        }
    })
}

/// The sim's customers linked to `account_id` (through ExternalLinks).
pub fn customers_of(env: &TestEnv, account_id: &str) -> Vec<Value> {
    customers_in(&env.sim, account_id)
}

/// The customers of `sim` linked to `account_id` (through ExternalLinks).
pub fn customers_in(sim: &SimHandle, account_id: &str) -> Vec<Value> {
    let ids: Vec<i64> = sim
        .external_links()
        .iter()
        .filter(|l| {
            l["third_party_id"] == account_id && l["third_party_type"] == "halosync.account"
        })
        .filter_map(|l| l["halo_id"].as_i64())
        .collect();
    sim.clients()
        .into_iter()
        .filter(|c| c["id"].as_i64().is_some_and(|id| ids.contains(&id)))
        .collect()
}

/// A `subscription.*` event: product `MS-365-BP` ("Microsoft 365 Business
/// Premium") at `"22.00"` (cost `"18.70"`), GBP, monthly from 2026-11-01.
/// Sequence 1 is a `subscription.created`, status `cancelled` a
/// `subscription.cancelled`, anything else a `subscription.updated`. Tests
/// change other fields on the returned value.
pub fn subscription_event(
    id: &str,
    subscription_id: &str,
    account_id: &str,
    quantity: u64,
    status: &str,
    sequence: u64,
) -> Value {
    let ty = match (sequence, status) {
        (_, "cancelled") => "subscription.cancelled",
        (1, _) => "subscription.created",
        _ => "subscription.updated",
    };
    json!({
        "id": id,
        "type": ty,
        "schema_version": 1,
        "connection": CONNECTION,
        "occurred_at": "2026-11-22T10:15:00.123Z",
        "sequence": sequence,
        "data": {
            "subscription_id": subscription_id,
            "account_id": account_id,
            "product": {"sku": "MS-365-BP", "name": "Microsoft 365 Business Premium"},
            "quantity": quantity,
            "unit_price": "22.00",
            "unit_cost": "18.70",
            "currency": "GBP",
            "billing_cycle": "monthly",
            "start_date": "2026-11-01",
            "end_date": null,
            "status": status
        }
    })
}

impl TestEnv {
    /// Runs the operator's tool (`halosync ARGS...`) on this environment's
    /// configuration; returns whether it succeeded, and its output.
    pub fn run_halosync(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(binary_path("halosync"))
            .arg("--config")
            .arg(&self.config_path)
            .args(args)
            .env(SECRET_ENV, &self.secret)
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run halosync: {e}"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }
}

/// A free TCP port on 127.0.0.1 for a server a test starts (a worker's
/// health port, a console), bound once here to check it, then released.
///
/// Taken below the kernel's ephemeral range, in order, never the same
/// twice in one run: a port the kernel hands out for `:0` is also what it
/// picks as the local port of outgoing connections, so between this
/// check and the server's bind another test's connection to RabbitMQ or
/// Redis could take it ("Address already in use"). Below the range only
/// another listener can.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // 32768 is Linux's default start of the range.
    let ephemeral_low: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u32, ephemeral_low.min(65_536));
    if high > low + 1_000 {
        let span = high - low;
        // Processes running side by side start at different places.
        let start = (std::process::id() % 16) * (span / 16);
        for _ in 0..span {
            let n = NEXT.fetch_add(1, Ordering::SeqCst);
            let port = low + (start + n) % span;
            if let Ok(p) = u16::try_from(port) {
                if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
                    return p;
                }
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

/// A RabbitMQ node of a test's own (never the shared one), for tests that
/// stop or restart the broker: Debian's `rabbitmq-server` started as a
/// second node (its own name, ports, data and log directory, no plugins),
/// so that the other tests' connections to the shared broker never notice.
/// Stopped and removed when dropped. Fails loudly when it cannot start.
pub struct PrivateRabbit {
    pub port: u16,
    node: String,
    dir: PathBuf,
}

impl PrivateRabbit {
    /// Boots the node and waits until it serves AMQP (a boot takes 5–20 s).
    pub fn start() -> PrivateRabbit {
        let port = free_port();
        let dist_port = free_port();
        let node = format!("halosynctest{port}@localhost");
        let dir = std::env::temp_dir().join(format!("halosync-rabbit-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("log")).expect("private rabbit dir");
        std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("plugins file");
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.local = 127.0.0.1:{port}\nloopback_users = none\n"),
        )
        .expect("rabbitmq.conf");
        // Started by root, rabbitmq-server runs as the `rabbitmq` user,
        // which must own the node's directory.
        if Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
        {
            let _ = Command::new("chown")
                .args(["-R", "rabbitmq:rabbitmq"])
                .arg(&dir)
                .status();
        }
        let status = Command::new("rabbitmq-server")
            .arg("-detached")
            .env("RABBITMQ_NODENAME", &node)
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_PID_FILE", dir.join("pid"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap_or_else(|e| {
                panic!("cannot start rabbitmq-server (is Debian's rabbitmq-server installed?): {e}")
            });
        assert!(
            status.success(),
            "rabbitmq-server -detached failed: {status}"
        );
        let rabbit = PrivateRabbit { port, node, dir };
        // `-detached` returns before the node is up (and `await_startup`
        // fails while its name is not registered yet): wait for the port.
        let deadline = Instant::now() + Duration::from_secs(90);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the private RabbitMQ node {} did not listen on {port} within 90 s; its log: {}",
                rabbit.node,
                rabbit.dir.join("log").display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        rabbit.ctl(&["await_startup"]);
        rabbit
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// `rabbitmqctl -n NODE ARGS`, failing loudly.
    pub fn ctl(&self, args: &[&str]) {
        let out = Command::new("rabbitmqctl")
            .arg("-n")
            .arg(&self.node)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run rabbitmqctl: {e}"));
        assert!(
            out.status.success(),
            "rabbitmqctl -n {} {args:?} failed: {}{}",
            self.node,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The whole broker application stops (connections closed, refused
    /// until [`start_app`](Self::start_app)), as in a broker restart.
    pub fn stop_app(&self) {
        self.ctl(&["stop_app"]);
    }

    pub fn start_app(&self) {
        self.ctl(&["start_app"]);
        self.ctl(&["await_startup"]);
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .arg("-n")
            .arg(&self.node)
            .arg("stop")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis server of a test's own (never the shared one), for tests that
/// stop, restart or flush Redis. Killed when dropped.
pub struct PrivateRedis {
    pub port: u16,
    child: Option<Child>,
}

impl PrivateRedis {
    /// A port for a Redis that is not started yet.
    pub fn unstarted() -> PrivateRedis {
        PrivateRedis {
            port: free_port(),
            child: None,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Starts `redis-server` on the port (empty, nothing kept on disk) and
    /// waits until it answers. Fails loudly when Debian's redis-server is
    /// not installed.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "private redis already running");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start redis-server (is Debian's redis-server installed?): {e}")
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "private redis-server did not listen on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A private Redis, started.
    pub fn started() -> PrivateRedis {
        let mut r = PrivateRedis::unstarted();
        r.start();
        r
    }

    /// `FLUSHALL`, as an operator losing Redis would, and checks that it is
    /// empty. Only ever on a private server, never on the shared one.
    pub async fn flushall(&self) {
        let mut c = redis_at(&self.url()).await.expect("private redis");
        let _: String = redis::cmd("FLUSHALL")
            .query_async(&mut c)
            .await
            .expect("FLUSHALL");
        let n: u64 = redis::cmd("DBSIZE")
            .query_async(&mut c)
            .await
            .expect("DBSIZE");
        assert_eq!(n, 0);
    }

    /// Kills the server: everything it held is gone, as after a crash.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The status and body of `GET http://127.0.0.1:PORT/PATH` (a worker's
/// health endpoint); `None` when nothing answers.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let r = reqwest::get(format!("http://127.0.0.1:{port}{path}"))
        .await
        .ok()?;
    let status = r.status().as_u16();
    Some((status, r.text().await.unwrap_or_default()))
}

/// A `usage.reported` event (unit `GB`).
pub fn usage_event(
    id: &str,
    sub: &str,
    account: &str,
    metric: &str,
    period: (&str, &str),
    quantity: f64,
    sequence: u64,
) -> Value {
    json!({
        "id": id,
        "type": "usage.reported",
        "schema_version": 1,
        "connection": CONNECTION,
        "occurred_at": "2026-11-22T10:15:00.123Z",
        "sequence": sequence,
        "data": {
            "subscription_id": sub,
            "account_id": account,
            "metric": metric,
            "period_start": period.0,
            "period_end": period.1,
            "quantity": quantity,
            "unit": "GB"
        }
    })
}

/// An `overage.detected` event: 100 included, `used` = 100 + `overage`.
#[allow(clippy::too_many_arguments)]
pub fn overage_event(
    id: &str,
    sub: &str,
    account: &str,
    metric: &str,
    period: (&str, &str),
    overage: f64,
    price: &str,
    sequence: u64,
) -> Value {
    json!({
        "id": id,
        "type": "overage.detected",
        "schema_version": 1,
        "connection": CONNECTION,
        "occurred_at": "2026-11-23T10:00:00Z",
        "sequence": sequence,
        "data": {
            "subscription_id": sub,
            "account_id": account,
            "metric": metric,
            "period_start": period.0,
            "period_end": period.1,
            "included_quantity": 100,
            "used_quantity": 100.0 + overage,
            "overage_quantity": overage,
            "unit_price": price,
            "currency": "EUR"
        }
    })
}

/// A deterministic shuffle (no rand dependency needed).
pub fn shuffle<T>(v: &mut [T], mut seed: u64) {
    for i in (1..v.len()).rev() {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let j = (seed >> 33) as usize % (i + 1);
        v.swap(i, j);
    }
}

/// `extra` with `flush_grace` in its `[worker]` table (added when absent):
/// each test has a fresh prefix, so a fresh epoch, and would otherwise wait
/// the whole production default (`http_timeout`) before its first write.
/// halo-sim answers within milliseconds, so half a second covers a write
/// on the wire when a test flushes Redis.
fn with_flush_grace(extra: &str) -> String {
    if extra.contains("flush_grace") {
        return extra.to_string();
    }
    const LINE: &str = "flush_grace = \"500ms\"\n";
    match extra.find("[worker]\n") {
        Some(at) => {
            let end = at + "[worker]\n".len();
            format!("{}{LINE}{}", &extra[..end], &extra[end..])
        }
        None => format!("{extra}\n[worker]\n{LINE}"),
    }
}

/// The TOML table of one more connection, `name`, on its own halo-sim
/// `sim` (default credentials, the secret from [`SECRET_ENV`]) and a
/// generous budget; append it to [`EnvOptions::extra`] for a test or bench
/// with several MSPs.
pub fn connection_toml(name: &str, sim: &SimHandle) -> String {
    connection_table(
        name,
        sim,
        &format!("client_secret_env = \"{SECRET_ENV}\""),
        GENEROUS_BUDGET,
    )
}

/// The TOML table of connection `name` on `sim` (default credentials), its
/// secret as `secret_line` says (`client_secret_env = ...` or
/// `client_secret_file = ...`), then `budget`.
fn connection_table(name: &str, sim: &SimHandle, secret_line: &str, budget: &str) -> String {
    let defaults = SimConfig::default();
    let tenant = defaults
        .tenant
        .as_ref()
        .map(|t| format!("tenant = \"{t}\"\n"))
        .unwrap_or_default();
    format!(
        "[connections.{name}]\nresource_server = \"{api}\"\nauth_server = \"{auth}/\"\n{tenant}client_id = \"{id}\"\n{secret_line}\n{budget}\n",
        api = sim.api_url(),
        auth = sim.auth_url(),
        id = defaults.client_id,
    )
}

/// `n` connections `msp0` .. `msp{n-1}`, all on `sim`, each with its secret
/// in a file of its own (as a Kubernetes Secret mounts them) and `budget`:
/// the TOML to append to [`EnvOptions::extra`], and the directory of the
/// secret files (the caller removes it).
pub fn connections_with_secret_files(sim: &SimHandle, n: usize, budget: &str) -> (String, PathBuf) {
    let secrets = std::env::temp_dir().join(format!(
        "halosync-secrets-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&secrets).expect("secrets dir");
    let secret = SimConfig::default().client_secret;
    let mut toml = String::new();
    for i in 0..n {
        let file = secrets.join(format!("msp{i}"));
        std::fs::write(&file, &secret).expect("secret file");
        toml.push_str(&connection_table(
            &format!("msp{i}"),
            sim,
            &format!("client_secret_file = \"{}\"", file.display()),
            budget,
        ));
    }
    (toml, secrets)
}

/// Creates the customers of `accounts` through the account worker (which
/// must be running) and waits until each has exactly one.
pub async fn seed_accounts<A: AsRef<str>>(env: &TestEnv, accounts: &[A]) {
    for (i, a) in accounts.iter().enumerate() {
        let a = a.as_ref();
        env.publish(&account_event(
            &format!("acc-e{i}"),
            a,
            &format!("Customer {a}"),
            true,
            1,
        ))
        .await;
    }
    env.wait_for("customers created", Duration::from_secs(30), || {
        accounts
            .iter()
            .all(|a| customers_of(env, a.as_ref()).len() == 1)
    })
    .await;
}

/// Every line of every recurring invoice of `sim`.
pub fn recurring_lines(sim: &SimHandle) -> Vec<Value> {
    sim.recurring_invoices()
        .into_iter()
        .flat_map(|h| h["lines"].as_array().cloned().unwrap_or_default())
        .collect()
}

/// `halosync console --hash-password` for `password`.
pub fn hash_password(password: &str) -> String {
    use std::io::Write;
    let mut child = Command::new(binary_path("halosync"))
        .args(["console", "--hash-password"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run halosync console --hash-password");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(password.as_bytes())
        .expect("write password");
    let out = child.wait_with_output().expect("hash output");
    assert!(out.status.success(), "--hash-password failed");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The body of `GET url` through `client` (a console page).
pub async fn page_text(client: &reqwest::Client, url: &str) -> String {
    client
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .text()
        .await
        .unwrap_or_else(|e| panic!("GET {url} (body): {e}"))
}

/// The value of the hidden field `name` in a page.
pub fn hidden_field(page: &str, name: &str) -> String {
    page.split(&format!("name=\"{name}\" value=\""))
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap_or_else(|| panic!("no {name} field in the page:\n{page}"))
        .to_string()
}

/// The sign-in token of the console's sign-in form at `login_url`, fetched
/// through `client` (which keeps the cookie that goes with it).
pub async fn login_token(client: &reqwest::Client, login_url: &str) -> String {
    hidden_field(&page_text(client, login_url).await, "login_token")
}

/// How many customers of `sim` are linked to `account_id`.
pub fn linked_customers(sim: &SimHandle, account_id: &str) -> usize {
    customers_in(sim, account_id).len()
}

/// HaloPSA API requests so far, per endpoint (`POST /api/Client`, ...),
/// not counting the token endpoint.
pub fn api_requests(env: &TestEnv) -> BTreeMap<String, u64> {
    env.sim
        .counts()
        .into_iter()
        .filter(|(k, _)| k.contains(" /api/"))
        .collect()
}

/// The requests per endpoint from `before` to `after` (of
/// [`api_requests`]), endpoints with none left out.
pub fn delta(
    after: &BTreeMap<String, u64>,
    before: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect()
}
