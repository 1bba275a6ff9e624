//! deploy/monitoring against real workers: every `halosync_*` metric name
//! the alert rules and the Grafana dashboard use is one that a running
//! worker exports, and a real Prometheus (Debian's `prometheus`, listed in
//! deploy/local/debian-packages.txt) scraping two workers evaluates every
//! dashboard query with data and fires the alerts the events call for.
//!
//! The workers are driven through success and failure: an account applied,
//! a body that is not JSON (dead-lettered `invalid`), an account on a
//! connection whose credentials HaloPSA refuses (token requests answered
//! 401), usage of a subscription HaloPSA does not have yet (retried as a
//! dependency, through the batching runtime).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use halosync_shared::contract::Family;
use halosync_tests::{
    account_event, free_port, usage_event, EnvOptions, TestEnv, CONNECTION, SECRET_ENV,
};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);
/// A second connection whose client id HaloPSA does not know.
const BROKEN: &str = "broken";

fn monitoring_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/monitoring")
}

/// `halosync_*` tokens of PromQL expressions: a metric-name scan, which is
/// all the check needs (label values hold no such token).
fn halosync_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut from = 0;
    while let Some(i) = text[from..].find("halosync_") {
        let start = from + i;
        let mut end = start + "halosync_".len();
        while end < bytes.len() && ident(bytes[end]) {
            end += 1;
        }
        if start == 0 || !ident(bytes[start - 1]) {
            names.insert(text[start..end].to_string());
        }
        from = end;
    }
    names
}

/// The `expr:` values of a Prometheus rules file, one-line or block
/// (`expr: |`). A reader of just this key rather than a YAML crate: the
/// workspace has none, and deploy/checks/monitoring.py parses the file as
/// YAML anyway; this only has to find the expressions.
fn rule_exprs(rules: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut lines = rules.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        let Some(rest) = trimmed.strip_prefix("expr:") else {
            continue;
        };
        let rest = rest.trim();
        if rest.starts_with('|') || rest.starts_with('>') {
            let indent = line.len() - trimmed.len();
            let mut block = String::new();
            while let Some(next) = lines.peek() {
                let next_indent = next.len() - next.trim_start().len();
                if !next.trim().is_empty() && next_indent <= indent {
                    break;
                }
                block.push_str(next.trim());
                block.push('\n');
                lines.next();
            }
            out.push(block);
        } else {
            out.push(rest.to_string());
        }
    }
    out
}

/// Metric names of a Prometheus text exposition (histograms as
/// `_bucket`, `_sum`, `_count`, as queries name them).
fn exposed_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// The value of the first sample whose line starts with `prefix`.
fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Every query of the dashboard (panels and the `connection` variable's
/// selector), with Grafana's variables replaced for a short test run.
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().into_iter().flatten() {
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                let expr = e
                    .replace("$__rate_interval", "20s")
                    .replace("$family", ".*")
                    .replace("$connection", ".*");
                out.push((p["title"].as_str().unwrap_or("?").to_string(), expr));
            }
        }
    }
    out
}

async fn get_text(http: &reqwest::Client, url: &str) -> Option<String> {
    let r = http.get(url).send().await.ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.text().await.ok()
}

/// A private Prometheus server, killed when dropped.
struct Prometheus {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Prometheus {
    fn start(dir: &Path, targets: &[u16]) -> Prometheus {
        let port = free_port();
        let rules = monitoring_dir().join("alerts.yaml");
        let targets = targets
            .iter()
            .map(|p| format!("\"127.0.0.1:{p}\""))
            .collect::<Vec<_>>()
            .join(", ");
        // Job "halosync", as in deploy/monitoring/prometheus.yaml (the
        // not-ready alert names it).
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: halosync\n    static_configs:\n      - targets: [{targets}]\n",
            rules.display()
        );
        let config_path = dir.join("prometheus.yaml");
        std::fs::write(&config_path, config).expect("write prometheus.yaml");
        let log = dir.join("prometheus.log");
        let out = std::fs::File::create(&log).expect("prometheus log");
        let err = out.try_clone().expect("prometheus log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start prometheus ({e}): install Debian's prometheus package (make packages)")
            });
        Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// An instant query: the result vector, or Prometheus' error.
    async fn query(&self, http: &reqwest::Client, expr: &str) -> Result<Vec<Value>, String> {
        let r = http
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", expr)])
            .send()
            .await
            .map_err(|e| format!("prometheus unreachable: {e}"))?;
        let body: Value = r.json().await.map_err(|e| format!("not JSON: {e}"))?;
        if body["status"] != "success" {
            return Err(format!("{}: {}", body["errorType"], body["error"]));
        }
        Ok(body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    async fn alerts(&self, http: &reqwest::Client) -> Vec<Value> {
        let Ok(r) = http.get(format!("{}/api/v1/alerts", self.url)).send().await else {
            return Vec::new();
        };
        let body: Value = r.json().await.unwrap_or(Value::Null);
        body["data"]["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `cond` holds for a fresh `/metrics` of `port`.
async fn wait_metrics(
    http: &reqwest::Client,
    port: u16,
    what: &str,
    env: &TestEnv,
    cond: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + T;
    let url = format!("http://127.0.0.1:{port}/metrics");
    loop {
        if let Some(text) = get_text(http, &url).await {
            if cond(&text) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what} in\n{text}\n{}",
                env.logs()
            );
        } else {
            assert!(
                Instant::now() < deadline,
                "no /metrics on {port}: {}",
                env.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn alerts_and_dashboard_use_only_metrics_the_workers_export_and_fire_on_real_failures() {
    let account_port = free_port();
    let usage_port = free_port();
    let mut env = TestEnv::with(
        "monitoring",
        EnvOptions {
            connection_extra: format!(
                "{}\n[connections.{CONNECTION}.items]\n\"MS-365-BP\" = 1001\n",
                halosync_tests::GENEROUS_BUDGET
            ),
            extra: String::new(),
            ..Default::default()
        },
    )
    .await;
    // One config per worker: same everything, its own health port, and
    // the broken connection (same HaloPSA, a client id it does not know).
    let base = std::fs::read_to_string(&env.config_path).expect("read config");
    let broken = format!(
        "\n[connections.{BROKEN}]\nresource_server = \"{api}\"\nauth_server = \"{auth}\"\nclient_id = \"nobody\"\nclient_secret_env = \"{SECRET_ENV}\"\n",
        api = env.sim.api_url(),
        auth = env.sim.auth_url(),
    );
    let config_for = |port: u16, name: &str| {
        let path = env.dir.join(name);
        // The harness's config has a `[worker]` table already.
        let with_port = base.replacen(
            "[worker]\n",
            &format!("[worker]\nhealth_port = {port}\n"),
            1,
        );
        std::fs::write(&path, format!("{with_port}{broken}")).expect("write worker config");
        path.display().to_string()
    };
    let account_config = config_for(account_port, "account.toml");
    let usage_config = config_for(usage_port, "usage.toml");
    env.spawn_worker_with("halosync-account", &[("HALOSYNC_CONFIG", &account_config)]);
    let usage = env.spawn_worker_with("halosync-usage", &[("HALOSYNC_CONFIG", &usage_config)]);
    let http = reqwest::Client::new();
    for port in [account_port, usage_port] {
        wait_metrics(&http, port, "halosync_ready 1", &env, |t| {
            sample(t, "halosync_ready ") == Some(1.0)
        })
        .await;
    }

    let prometheus_dir = env.dir.join("prometheus");
    std::fs::create_dir_all(&prometheus_dir).expect("prometheus dir");
    let prometheus = Prometheus::start(&prometheus_dir, &[account_port, usage_port]);
    // Two scrapes of both workers before any failure, so that the failures
    // are increases Prometheus sees.
    let deadline = Instant::now() + T;
    loop {
        let up = prometheus
            .query(&http, "count_over_time(halosync_ready[1m])")
            .await;
        if matches!(&up, Ok(r) if r.len() == 2 && r.iter().all(|s| s["value"][1].as_str().and_then(|v| v.parse::<f64>().ok()) >= Some(2.0)))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "prometheus did not scrape both workers twice: {up:?}\n{}",
            prometheus.logs()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    env.publish(&account_event("mon-ok", "acc_1", "Contoso", true, 1))
        .await;
    env.publish_raw("account.created", b"not json").await;
    let mut on_broken = account_event("mon-broken", "acc_2", "Globex", true, 1);
    on_broken["connection"] = json!(BROKEN);
    env.publish(&on_broken).await;
    env.publish(&usage_event(
        "mon-usage",
        "sub_not_there_yet",
        "acc_1",
        "storage_gb",
        ("2026-11-01", "2026-11-30"),
        3.5,
        1,
    ))
    .await;
    env.wait_for("the account applied", T, || env.clients().len() == 1)
        .await;

    let account = wait_metrics(&http, account_port, "the failures", &env, |t| {
        sample(
            t,
            "halosync_dead_letters_total{family=\"account\",class=\"invalid\"}",
        ) == Some(1.0)
            && t.contains(&format!(
                "halosync_token_requests_total{{connection=\"{BROKEN}\",status=\"401\"}}"
            ))
            // The customer is in halo-sim as soon as it answered, but the
            // worker records the request's latency only once it has read
            // the answer: wait for that too rather than race it.
            && t.contains(&format!(
                "halosync_halo_request_seconds_bucket{{connection=\"{CONNECTION}\",method=\"POST\",endpoint=\"/Client\""
            ))
    })
    .await;
    let usage_text = wait_metrics(&http, usage_port, "a usage batch", &env, |t| {
        let settled = |outcome: &str| {
            sample(
                t,
                &format!("halosync_messages_total{{family=\"usage\",outcome=\"{outcome}\"}}"),
            )
            .unwrap_or(0.0)
        };
        t.contains("halosync_batch_size_bucket")
            && settled("retried") + settled("dead-lettered") > 0.0
    })
    .await;

    // The new metrics, with their labels.
    assert_eq!(sample(&account, "halosync_ready "), Some(1.0));
    let ratio = sample(
        &account,
        &format!("halosync_budget_used_ratio{{connection=\"{CONNECTION}\"}}"),
    )
    .expect("halosync_budget_used_ratio of acme");
    assert!(ratio > 0.0 && ratio <= 1.0, "budget ratio {ratio}");
    assert!(account.contains(&format!(
        "halosync_halo_request_seconds_bucket{{connection=\"{CONNECTION}\",method=\"POST\",endpoint=\"/Client\""
    )));
    assert_eq!(
        sample(
            &account,
            "halosync_dead_letters_total{family=\"account\",class=\"exhausted\"}"
        ),
        Some(0.0),
        "dead-letter counters are registered at zero"
    );
    for text in [&account, &usage_text] {
        for id in ["acc_1", "acc_2", "sub_not_there_yet", "mon-"] {
            assert!(!text.contains(id), "an id ({id}) became a label:\n{text}");
        }
    }

    // Every halosync_* name of the rules and the dashboard is exported.
    let rules_text =
        std::fs::read_to_string(monitoring_dir().join("alerts.yaml")).expect("read alerts.yaml");
    let dashboard_text = std::fs::read_to_string(monitoring_dir().join("dashboard.json"))
        .expect("read dashboard.json");
    let dashboard: Value = serde_json::from_str(&dashboard_text).expect("dashboard.json");
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 10, "{queries:?}");
    let exprs = rule_exprs(&rules_text);
    assert_eq!(
        exprs.len(),
        rules_text.matches("- alert:").count(),
        "{exprs:?}"
    );
    let used: BTreeSet<String> = exprs
        .iter()
        .chain(queries.iter().map(|(_, e)| e))
        .flat_map(|e| halosync_names(e))
        .collect();
    assert!(used.len() >= 10, "too few names found: {used:?}");
    let exported: BTreeSet<String> = exposed_names(&account)
        .into_iter()
        .chain(exposed_names(&usage_text))
        .collect();
    let missing: Vec<&String> = used.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "deploy/monitoring uses metrics no worker exports: {missing:?}\nexported: {exported:?}"
    );

    // Every dashboard query evaluates; those on halosync metrics only
    // return data (the rabbitmq_* ones need the broker's plugin, which this
    // Prometheus does not scrape; their names are checked by make
    // check-deploy against the plugin's documented names).
    // A few more scrapes after the events, for the rates.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (title, expr) in &queries {
        let result = prometheus.query(&http, expr).await;
        let result = result.unwrap_or_else(|e| panic!("panel {title:?}: {expr}: {e}"));
        if !expr.contains("rabbitmq_") {
            assert!(
                !result.is_empty(),
                "panel {title:?}: no data for {expr}\n{}",
                prometheus.logs()
            );
        }
    }

    // The alerts the events call for fire, with the labels alerts.test.yaml
    // expects.
    let has = |alerts: &[Value], name: &str, label: &str, value: &str, state: &str| {
        alerts.iter().any(|a| {
            a["labels"]["alertname"] == name && a["labels"][label] == value && a["state"] == state
        })
    };
    let deadline = Instant::now() + T;
    loop {
        let alerts = prometheus.alerts(&http).await;
        if has(
            &alerts,
            "HalosyncDeadLettersGrowing",
            "class",
            "invalid",
            "firing",
        ) && has(
            &alerts,
            "HalosyncTokenRequestsFailing",
            "connection",
            BROKEN,
            "firing",
        ) {
            assert!(
                !has(
                    &alerts,
                    "HalosyncDeadLettersGrowing",
                    "class",
                    "unmapped",
                    "firing"
                ),
                "nothing was dead-lettered as unmapped: {alerts:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "alerts did not fire: {alerts:?}\n{}",
            prometheus.logs()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // A worker that goes away is "not ready" (pending for its 5 minutes).
    env.kill_worker(usage);
    let instance = format!("127.0.0.1:{usage_port}");
    let deadline = Instant::now() + T;
    loop {
        let alerts = prometheus.alerts(&http).await;
        if has(
            &alerts,
            "HalosyncWorkerNotReady",
            "instance",
            &instance,
            "pending",
        ) {
            assert!(
                !alerts
                    .iter()
                    .any(|a| a["labels"]["alertname"] == "HalosyncWorkerNotReady"
                        && a["labels"]["instance"] == format!("127.0.0.1:{account_port}")),
                "the account worker is ready: {alerts:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "HalosyncWorkerNotReady not pending for the killed worker: {alerts:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    env.take_dead(Family::Account).await;
}
