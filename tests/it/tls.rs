//! TLS everywhere, against real servers: a TLS-only redis-server of the
//! test's own (ACL user, password from env or file), and a TLS front
//! (requiring a client certificate) of the shared RabbitMQ. Workers run as
//! child processes with the CA files, client certificate and credentials
//! in their config; `halosync check` reports each service's handshake.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use halosync_shared::tls::RedisAccess;
use halosync_tests::tls::{Pki, TlsProxy, TlsRedis, P12_PASSWORD};
use halosync_tests::{
    account_event, binary_path, customers_of, hash_password, login_token, page_text, TestEnv,
};

const WORKER: &str = "halosync-account";
const T: Duration = Duration::from_secs(30);
const REDIS_USER: &str = "halosync";
const REDIS_PASSWORD: &str = "redis-acl-pw-7f3k";

/// Everything TLS one test needs: PKI, private TLS redis, TLS proxy.
struct Tls {
    pki: Pki,
    redis: TlsRedis,
    proxy: TlsProxy,
    dir: std::path::PathBuf,
}

impl Tls {
    async fn start(name: &str, require_client_cert: bool) -> Tls {
        let dir = std::env::temp_dir().join(format!(
            "halosync-tls-{name}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ));
        let pki = Pki::new(&dir);
        let redis = TlsRedis::start(&pki, REDIS_USER, REDIS_PASSWORD);
        let upstream = "127.0.0.1:5672".parse().expect("broker address");
        let proxy = TlsProxy::start(&pki, upstream, require_client_cert).await;
        Tls {
            pki,
            redis,
            proxy,
            dir,
        }
    }

    fn amqps_url(&self) -> String {
        format!("amqps://guest@127.0.0.1:{}/%2f", self.proxy.port)
    }

    /// Points `env`'s config at both TLS services, trusting `redis_ca` /
    /// `amqp_ca`, with the client certificate and the passwords from the
    /// env vars `REDIS_PW` / `AMQP_PW` (the harness itself keeps publishing
    /// to the shared broker directly).
    fn retarget(&self, env: &TestEnv, redis_ca: &Path, amqp_ca: &Path) {
        let top = format!(
            "redis_ca_file = \"{}\"\nredis_password_env = \"REDIS_PW\"\namqp_ca_file = \"{}\"\namqp_client_cert_file = \"{}\"\namqp_client_key_file = \"{}\"\namqp_password_env = \"AMQP_PW\"\n",
            redis_ca.display(),
            amqp_ca.display(),
            self.pki.client_cert.display(),
            self.pki.client_key.display(),
        );
        rewrite_config(env, &self.amqps_url(), &self.redis.url(REDIS_USER), &top);
    }
}

/// Replaces the `amqp_url` and `redis_url` lines of the harness's config
/// and the other top-level `redis_*` / `amqp_*` keys by `top` (so it can
/// be called again on the same file).
fn rewrite_config(env: &TestEnv, amqp_url: &str, redis_url: &str, top: &str) {
    let text = std::fs::read_to_string(&env.config_path).expect("read config");
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with("amqp_url =") {
            out.push_str(&format!("amqp_url = \"{amqp_url}\"\n"));
        } else if line.starts_with("redis_url =") {
            out.push_str(&format!("redis_url = \"{redis_url}\"\n{top}"));
        } else if line.starts_with("redis_") || line.starts_with("amqp_") {
            // a previous call's top-level key: replaced by `top`
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    std::fs::write(&env.config_path, out).expect("write config");
}

impl Drop for Tls {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const SECRETS: [(&str, &str); 2] = [("REDIS_PW", REDIS_PASSWORD), ("AMQP_PW", "guest")];

/// Waits until the worker's log contains every needle, or panics with it.
async fn wait_for_log(env: &TestEnv, needles: &[&str], timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let logs = env.logs();
        if needles.iter().all(|n| logs.contains(n)) {
            return logs;
        }
        assert!(
            Instant::now() < deadline,
            "the worker log never said {needles:?}:\n{logs}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_applies_events_over_tls_redis_and_tls_rabbitmq() {
    let tls = Tls::start("ok", true).await;
    let mut env = TestEnv::new("tls-ok").await;
    tls.retarget(&env, &tls.pki.ca, &tls.pki.ca);
    env.spawn_worker_with(WORKER, &SECRETS);
    env.publish(&account_event("tls-e1", "acc_tls", "Fabrikam TLS", true, 1))
        .await;
    env.wait_for("customer created through the TLS worker", T, || {
        customers_of(&env, "acc_tls").len() == 1
    })
    .await;
    assert!(
        tls.proxy.handshakes.load(Ordering::SeqCst) >= 1,
        "the worker reached RabbitMQ through the TLS front"
    );
    // The worker's state is in the private TLS redis, reached as the ACL user.
    let access = RedisAccess {
        ca_file: Some(tls.pki.ca.clone()),
        username: None,
        password: Some(halosync_shared::config::Secret::new(REDIS_PASSWORD)),
    };
    let mut r = halosync_shared::store::connect_with(&tls.redis.url(REDIS_USER), &access)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}halosync:*", env.prefix))
        .query_async(&mut r)
        .await
        .expect("KEYS on the TLS redis");
    assert!(
        keys.iter().any(|k| k.contains(":event:tls-e1")),
        "the ledger lives in the TLS redis: {keys:?}"
    );
    // Without the ACL password the same server refuses (default is off).
    let anonymous = RedisAccess {
        ca_file: Some(tls.pki.ca.clone()),
        ..Default::default()
    };
    let url = format!("rediss://127.0.0.1:{}/0", tls.redis.port);
    let mut r = halosync_shared::store::connect_with(&url, &anonymous)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let refused: Result<String, _> = redis::cmd("PING").query_async(&mut r).await;
    assert!(refused.is_err(), "default user is disabled: {refused:?}");
    // A wrong ACL password is refused at connect, explained.
    let wrong = RedisAccess {
        ca_file: Some(tls.pki.ca.clone()),
        username: None,
        password: Some(halosync_shared::config::Secret::new("not-the-password")),
    };
    let err = match halosync_shared::store::connect_with(&tls.redis.url(REDIS_USER), &wrong).await {
        Ok(_) => panic!("a wrong password must be refused"),
        Err(e) => e,
    };
    assert_eq!(
        err.problem,
        halosync_shared::tls::Problem::Authentication,
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.starts_with("Redis at rediss://halosync@127.0.0.1:"),
        "{msg}"
    );
    assert!(msg.contains("redis_password_env"), "{msg}");
    assert!(!msg.contains("not-the-password"), "{msg}");
    let logs = env.logs();
    assert!(
        !logs.contains(REDIS_PASSWORD),
        "the password never reaches a log"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_redis_password_can_come_from_a_file() {
    let tls = Tls::start("pwfile", false).await;
    let pw = tls.dir.join("redis-password");
    std::fs::write(&pw, format!("{REDIS_PASSWORD}\n")).expect("password file");
    let mut env = TestEnv::new("tls-pwfile").await;
    let top = format!(
        "redis_ca_file = \"{}\"\nredis_password_file = \"{}\"\namqp_ca_file = \"{}\"\n",
        tls.pki.ca.display(),
        pw.display(),
        tls.pki.ca.display()
    );
    let amqps = format!("amqps://guest:guest@127.0.0.1:{}/%2f", tls.proxy.port);
    rewrite_config(&env, &amqps, &tls.redis.url(REDIS_USER), &top);
    env.spawn_worker(WORKER);
    env.publish(&account_event(
        "tls-f1",
        "acc_tlsf",
        "Northwind TLS",
        true,
        1,
    ))
    .await;
    env.wait_for("customer created with the file password", T, || {
        customers_of(&env, "acc_tlsf").len() == 1
    })
    .await;
    assert!(!env.logs().contains(REDIS_PASSWORD));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_redis_ca_is_named_with_the_fix() {
    let tls = Tls::start("badredis", true).await;
    let mut env = TestEnv::new("tls-badr").await;
    tls.retarget(&env, &tls.pki.other_ca, &tls.pki.ca);
    let w = env.spawn_worker_with(WORKER, &SECRETS);
    let deadline = Instant::now() + T;
    let status = loop {
        if let Ok(Some(s)) = env.worker(w).child.try_wait() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the worker did not stop:\n{}",
            env.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status.code(), Some(1), "{}", env.logs());
    let logs = env.logs();
    let other = tls.pki.other_ca.display().to_string();
    for needle in [
        "Redis at rediss://halosync@127.0.0.1:",
        "set redis_ca_file to the CA that signed the server's certificate",
        other.as_str(),
    ] {
        assert!(logs.contains(needle), "missing {needle:?} in:\n{logs}");
    }
    assert!(!logs.contains("panicked"), "{logs}");
    assert!(!logs.contains(REDIS_PASSWORD), "{logs}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_rabbitmq_ca_is_named_with_the_fix() {
    let tls = Tls::start("badamqp", true).await;
    let mut env = TestEnv::new("tls-bada").await;
    tls.retarget(&env, &tls.pki.ca, &tls.pki.other_ca);
    env.spawn_worker_with(WORKER, &SECRETS);
    let other = tls.pki.other_ca.display().to_string();
    let logs = wait_for_log(
        &env,
        &[
            "RabbitMQ at amqps://guest@127.0.0.1:",
            "set amqp_ca_file to the CA that signed the server's certificate",
            other.as_str(),
        ],
        T,
    )
    .await;
    assert!(!logs.contains("panicked"), "{logs}");
    assert!(!logs.contains(":guest@"), "{logs}");
    assert_eq!(tls.proxy.handshakes.load(Ordering::SeqCst), 0);
}

/// Runs `halosync check` on a config file.
fn check(config: &std::path::Path, secret: &str) -> (i32, String) {
    check_env(config, secret, &[])
}

fn check_env(config: &std::path::Path, secret: &str, env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(binary_path("halosync"))
        .args(["check", "--connection", halosync_tests::CONNECTION])
        .env("HALOSYNC_CONFIG", config)
        .env(halosync_tests::SECRET_ENV, secret)
        .envs(SECRETS)
        .envs(env.iter().copied())
        .env_remove("AMQP_URL")
        .env_remove("REDIS_URL")
        .env_remove("HALOSYNC_PREFIX")
        .output()
        .expect("run halosync check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test(flavor = "multi_thread")]
async fn halosync_check_shows_the_tls_handshake_of_each_service() {
    let tls = Tls::start("check", true).await;
    let secret = halo_sim::SimConfig::default().client_secret;
    let env = TestEnv::new("tls-check").await;
    tls.retarget(&env, &tls.pki.ca, &tls.pki.ca);
    let (code, text) = check(&env.config_path, &secret);
    assert_eq!(code, 0, "{text}");
    for needle in [
        "✔ RabbitMQ: TLS 1.3",
        "✔ Redis: TLS 1.3",
        "✔ HaloPSA: not TLS",
        "client certificate",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    assert!(!text.contains(REDIS_PASSWORD), "{text}");
    // Both CAs wrong: each service is failed with the key to fix.
    let config = std::fs::read_to_string(&env.config_path).expect("config");
    let ca = tls.pki.ca.display().to_string();
    let other = tls.pki.other_ca.display().to_string();
    let bad = env.dir.join("bad-ca.toml");
    std::fs::write(&bad, config.replace(&ca, &other)).expect("bad config");
    let (code, text) = check(&bad, &secret);
    assert_eq!(code, 1, "{text}");
    for needle in [
        "✘ RabbitMQ",
        "set amqp_ca_file to the CA that signed the server's certificate",
        "✘ Redis",
        "set redis_ca_file to the CA that signed the server's certificate",
        other.as_str(),
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pkcs12_client_certificate_works_and_a_missing_one_is_explained() {
    let tls = Tls::start("p12", true).await;
    let secret = halo_sim::SimConfig::default().client_secret;
    let env = TestEnv::new("tls-p12").await;
    let ca = tls.pki.ca.display();
    let top = format!(
        "redis_ca_file = \"{ca}\"\nredis_password_env = \"REDIS_PW\"\namqp_ca_file = \"{ca}\"\namqp_client_pkcs12_file = \"{}\"\namqp_client_pkcs12_password_env = \"P12_PW\"\n",
        tls.pki.client_p12.display()
    );
    let amqps = format!("amqps://guest:guest@127.0.0.1:{}/%2f", tls.proxy.port);
    rewrite_config(&env, &amqps, &tls.redis.url(REDIS_USER), &top);
    let (code, text) = check_env(&env.config_path, &secret, &[("P12_PW", P12_PASSWORD)]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("✔ RabbitMQ: TLS 1.3"), "{text}");
    assert!(text.contains("client certificate presented"), "{text}");
    assert!(!text.contains(P12_PASSWORD), "{text}");
    // A wrong PKCS#12 password stops at the config, naming the key.
    let (code, text) = check_env(&env.config_path, &secret, &[("P12_PW", "nope")]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("amqp_client_pkcs12_file"), "{text}");
    // No client certificate for a broker that requires one.
    let top = format!(
        "redis_ca_file = \"{ca}\"\nredis_password_env = \"REDIS_PW\"\namqp_ca_file = \"{ca}\"\n"
    );
    rewrite_config(&env, &amqps, &tls.redis.url(REDIS_USER), &top);
    let (code, text) = check(&env.config_path, &secret);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("✘ RabbitMQ"), "{text}");
    assert!(text.contains("amqp_client_cert_file"), "{text}");
}

/// Kills the console child at the end of the test, whatever happens.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn activity_console_mappings_and_reconcile_connect_as_configured() {
    // A private CA for both services, both passwords from files, and a
    // broker reached only through the TLS front.
    let tls = Tls::start("paths", false).await;
    let redis_pw = tls.dir.join("redis-password");
    std::fs::write(&redis_pw, format!("{REDIS_PASSWORD}\n")).expect("password file");
    let amqp_pw = tls.dir.join("amqp-password");
    std::fs::write(&amqp_pw, "guest\n").expect("password file");
    let mut env = TestEnv::new("tls-paths").await;
    let ca = tls.pki.ca.display();
    let top = format!(
        "redis_ca_file = \"{ca}\"\nredis_password_file = \"{}\"\namqp_ca_file = \"{ca}\"\namqp_password_file = \"{}\"\n",
        redis_pw.display(),
        amqp_pw.display()
    );
    let amqps = format!("amqps://guest@127.0.0.1:{}/%2f", tls.proxy.port);
    rewrite_config(&env, &amqps, &tls.redis.url(REDIS_USER), &top);
    env.spawn_worker(WORKER);
    let event = account_event("tls-p1", "acc_tlsp", "Litware TLS", true, 1);
    env.publish(&event).await;
    env.wait_for("customer created", T, || {
        customers_of(&env, "acc_tlsp").len() == 1
    })
    .await;

    // The worker's activity recorder reached the broker through TLS with
    // the private CA: `halosync activity` (same settings) reads the record.
    let deadline = Instant::now() + T;
    loop {
        let (ok, out) = env.run_halosync(&["--json", "activity", "--event-id", "tls-p1"]);
        assert!(ok, "{out}");
        if out.contains("tls-p1") && out.contains("applied") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the activity log never recorded tls-p1:\n{out}\n{}",
            env.logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // `halosync mappings` keeps its mapping in HaloPSA and reads the TLS Redis.
    env.sim.insert_item(4242, "TLS add-on");
    let (ok, out) = env.run_halosync(&["mappings", "set", "--sku", "TLS-SKU", "--item", "4242"]);
    assert!(ok, "{out}");
    let (ok, out) = env.run_halosync(&["mappings", "list"]);
    assert!(ok && out.contains("TLS-SKU"), "{out}");

    // `halosync reconcile` against the same TLS Redis: in step, report kept.
    let snapshot = tls.dir.join("snapshot.jsonl");
    std::fs::write(&snapshot, format!("{event}\n")).expect("snapshot");
    let snapshot = snapshot.display().to_string();
    let (ok, out) =
        env.run_halosync(&["reconcile", "--family", "account", "--snapshot", &snapshot]);
    assert!(ok, "{out}");
    assert!(!out.contains("could not be kept in Redis"), "{out}");

    // The console starts (Redis over TLS), and its pages read the queues,
    // the budgets and the activity log through the configured TLS.
    let mut config = std::fs::read_to_string(&env.config_path).expect("config");
    config.push_str(&format!(
        "\n[console]\naudit_file = \"{}\"\n[console.users.alice]\nrole = \"viewer\"\npassword_hash_env = \"H_ALICE\"\n",
        env.dir.join("audit.jsonl").display()
    ));
    std::fs::write(&env.config_path, config).expect("config");
    let port = halosync_tests::free_port();
    let log = env.dir.join("console.log");
    let out = std::fs::File::create(&log).expect("console log");
    let mut console = Child(
        Command::new(binary_path("halosync"))
            .arg("--config")
            .arg(&env.config_path)
            .args(["console", "--listen", &format!("127.0.0.1:{port}")])
            .env(halosync_tests::SECRET_ENV, env.sim_secret())
            .env("H_ALICE", hash_password("alice-pw"))
            .env("RUST_LOG", "info")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("start the console"),
    );
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let deadline = Instant::now() + T;
    loop {
        if let Ok(r) = client.get(format!("{base}/healthz")).send().await {
            if r.status().is_success() {
                break;
            }
        }
        if let Ok(Some(status)) = console.0.try_wait() {
            panic!(
                "the console exited ({status}):\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "the console did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let token = login_token(&client, &format!("{base}/login")).await;
    let r = client
        .post(format!("{base}/login"))
        .form(&[
            ("login_token", token.as_str()),
            ("user", "alice"),
            ("password", "alice-pw"),
        ])
        .send()
        .await
        .expect("sign in");
    assert_eq!(r.status(), 303);
    let page = page_text(&client, &format!("{base}/")).await;
    assert!(page.contains("family-account"), "{page}");
    for problem in ["queues:", "budget:", "activity log:"] {
        assert!(
            !page.contains(problem),
            "the overview says {problem}:\n{page}"
        );
    }
    let deadline = Instant::now() + T;
    loop {
        let page = page_text(&client, &format!("{base}/activity?event_id=tls-p1")).await;
        if page.contains("<code>tls-p1</code>") && page.contains("applied</span>") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the console's activity log never showed tls-p1:\n{page}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let page = page_text(&client, &format!("{base}/mappings")).await;
    assert!(
        page.contains("TLS-SKU"),
        "the mapping set above, read over TLS:\n{page}"
    );
    let logs = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!logs.contains(REDIS_PASSWORD), "{logs}");
    assert!(
        tls.proxy.handshakes.load(Ordering::SeqCst) >= 3,
        "everything went through the TLS front"
    );
}
