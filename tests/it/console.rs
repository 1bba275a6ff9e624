//! The operator's web console in a real browser: Debian's `chromium`,
//! headless, driven over WebDriver by `chromedriver` (started here on a
//! free port), against a `halosync console` child process, the real
//! RabbitMQ and Redis, and halo-sim in process.
//!
//! These tests fail loudly, never skip, when chromium, chromedriver,
//! RabbitMQ or Redis is missing (`make test` installs the two Debian
//! packages). Each page they visit is saved as a PNG under
//! `target/console-screenshots/`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use halo_sim::{Faults, SimConfig, SimHandle};
use halosync_shared::amqp::headers as h;
use halosync_shared::Family;
use halosync_tests::{
    account_event, binary_path, customers_of, subscription_event, EnvOptions, PrivateRedis,
    TestEnv, CONNECTION, GENEROUS_BUDGET, SECRET_ENV,
};
use lapin::options::BasicPublishOptions;
use lapin::types::FieldTable;
use lapin::BasicProperties;
use serde_json::json;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const ALICE: (&str, &str) = ("alice", "alice-operator-pw");
const VICTOR: (&str, &str) = ("victor", "victor-viewer-pw");
const WRONG_SECRET_ENV: &str = "HALOSYNC_TEST_WRONG_SECRET";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `target/` (the test runs from target/debug/deps).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.ancestors()
        .find(|p| p.file_name().is_some_and(|n| n == "target"))
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
}

fn screenshot_dir() -> PathBuf {
    let d = target_dir().join("console-screenshots");
    std::fs::create_dir_all(&d).expect("screenshot dir");
    d
}

fn hash(password: &str) -> String {
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

/// A `halosync console` child on a free port.
struct Console {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Console {
    /// Adds the `[console]` table (and `extra`) to the env's config file
    /// and starts the console on it.
    async fn start(env: &TestEnv, extra: &str, vars: &[(&str, &str)]) -> Console {
        let mut config = std::fs::read_to_string(&env.config_path).expect("config");
        if !config.contains("\n[console]\n") {
            config.push_str(&format!(
            "{extra}\n[console]\naudit_file = \"audit/audit.jsonl\"\nlogin_attempts = 5\n[console.users.{}]\nrole = \"operator\"\npassword_hash_env = \"H_ALICE\"\n[console.users.{}]\nrole = \"viewer\"\npassword_hash_env = \"H_VICTOR\"\n",
            ALICE.0, VICTOR.0
        ));
        }
        std::fs::write(&env.config_path, config).expect("write config");
        let port = free_port();
        let log = env.dir.join("console.log");
        let out = std::fs::File::create(&log).expect("console log");
        let err = out.try_clone().expect("console log");
        let child = Command::new(binary_path("halosync"))
            .arg("--config")
            .arg(&env.config_path)
            .args(["console", "--listen", &format!("127.0.0.1:{port}")])
            .current_dir(&env.dir)
            .env(SECRET_ENV, SimConfig::default().client_secret)
            .env("H_ALICE", hash(ALICE.1))
            .env("H_VICTOR", hash(VICTOR.1))
            .env("RUST_LOG", "info")
            .env_remove("HALOSYNC_CONFIG")
            .env_remove("HALOSYNC_PREFIX")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .envs(vars.iter().copied())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start halosync console");
        let mut c = Console {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = reqwest::get(format!("{}/healthz", c.url)).await {
                if r.status().is_success() {
                    break;
                }
            }
            if let Ok(Some(status)) = c.child.try_wait() {
                panic!("the console exited ({status}):\n{}", c.logs());
            }
            assert!(
                Instant::now() < deadline,
                "the console did not start:\n{}",
                c.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        c
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Headless chromium through a chromedriver of our own.
struct Browser {
    client: Option<Client>,
    driver: Child,
    profile: PathBuf,
    name: String,
}

impl Browser {
    async fn start(name: &str) -> Browser {
        for (path, package) in [(CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")] {
            assert!(
                std::path::Path::new(path).exists(),
                "{path} is missing: install the Debian package {package} (`make test` does, via deploy/local/install-packages.sh)"
            );
        }
        let port = free_port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let profile = std::env::temp_dir().join(format!(
            "halosync-chromium-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&profile).expect("profile dir");
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1400,1000",
                    format!("--user-data-dir={}", profile.display()),
                ]
            }),
        );
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = loop {
            match ClientBuilder::rustls()
                .expect("rustls")
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(c) => break c,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "chromedriver at {url} with {CHROMIUM} did not start a session: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        Browser {
            client: Some(client),
            driver,
            profile,
            name: name.to_string(),
        }
    }

    fn c(&self) -> &Client {
        self.client.as_ref().expect("browser client")
    }

    async fn goto(&self, url: &str) {
        self.c().goto(url).await.expect("navigate");
    }

    async fn shot(&self, what: &str) {
        let png = self.c().screenshot().await.expect("screenshot");
        let path = screenshot_dir().join(format!("{}-{what}.png", self.name));
        std::fs::write(&path, png).expect("write screenshot");
    }

    async fn text(&self, css: &str) -> String {
        self.c()
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no element {css}: {e}"))
            .text()
            .await
            .expect("text")
    }

    async fn count(&self, css: &str) -> usize {
        self.c()
            .find_all(Locator::Css(css))
            .await
            .map(|v| v.len())
            .unwrap_or(0)
    }

    async fn click(&self, css: &str) {
        self.c()
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no element {css}: {e}"))
            .click()
            .await
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    async fn fill(&self, css: &str, text: &str) {
        let el = self
            .c()
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no element {css}: {e}"));
        el.clear().await.expect("clear");
        el.send_keys(text).await.expect("type");
    }

    async fn body(&self) -> String {
        self.text("body").await
    }

    async fn path(&self) -> String {
        self.c()
            .current_url()
            .await
            .expect("url")
            .path()
            .to_string()
    }

    async fn sign_in(&self, console: &Console, who: (&str, &str)) {
        self.goto(&console.at("/login")).await;
        self.fill("#user", who.0).await;
        self.fill("#password", who.1).await;
        self.click("#sign-in").await;
        self.wait_text("header", who.0, Duration::from_secs(30))
            .await;
    }

    /// Waits until the element's text contains `needle`.
    async fn wait_text(&self, css: &str, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(el) = self.c().find(Locator::Css(css)).await {
                if let Ok(t) = el.text().await {
                    if t.contains(needle) {
                        return t;
                    }
                }
            }
            if Instant::now() > deadline {
                let body = self.body().await;
                panic!("timed out waiting for {needle:?} in {css}; the page says:\n{body}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            // Closing ends chromium; do it on a thread with its own runtime.
            let _ = std::thread::spawn(move || {
                if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    rt.block_on(async move {
                        let _ = c.close().await;
                    });
                }
            })
            .join();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// A dead letter as a worker writes it (DESIGN §3), put straight into the
/// family's dead queue; publishes are pipelined, confirms awaited at the end.
async fn put_dead(env: &TestEnv, family: Family, letters: &[(String, &str, String)]) {
    let ch = env.publisher.channel();
    let mut confirms = Vec::new();
    let event_type = match family {
        Family::Account => "account.created",
        Family::Subscription => "subscription.created",
        Family::Usage => "usage.reported",
        Family::Overage => "overage.detected",
    };
    let now = chrono::Utc::now().to_rfc3339();
    for (id, class, message) in letters {
        let mut t = FieldTable::default();
        h::set_str(&mut t, h::ERROR_CLASS, class);
        h::set_str(&mut t, h::ERROR_MESSAGE, message);
        h::set_i64(&mut t, h::ATTEMPTS, 1);
        h::set_str(&mut t, h::FIRST_FAILURE, &now);
        h::set_str(&mut t, h::LAST_FAILURE, &now);
        h::set_str(&mut t, h::WORKER, "halosync-test@host:1");
        h::set_str(&mut t, h::FAMILY, family.as_str());
        h::set_str(&mut t, h::ORIGINAL_ROUTING_KEY, event_type);
        h::set_str(&mut t, h::CONNECTION, "acme");
        h::set_str(&mut t, h::EVENT_ID, id);
        let body = json!({"id": id, "type": event_type, "schema_version": 1, "connection": "acme",
            "occurred_at": "2026-11-22T10:15:00.123Z", "data": {}})
        .to_string();
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(id.as_str().into())
            .with_type(event_type.into())
            .with_headers(t);
        let c = ch
            .basic_publish(
                "".into(),
                env.topology.dead_queue(family).as_str().into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                props,
            )
            .await
            .expect("publish dead letter");
        confirms.push(c);
    }
    for c in confirms {
        assert!(
            c.await.expect("confirm").is_ack(),
            "broker nacked a dead letter"
        );
    }
}

/// A reqwest client signed in as `who` (cookies kept), and its CSRF token
/// read from a page, as a browser would see it.
async fn http_session(console: &Console, who: (&str, &str)) -> (reqwest::Client, String) {
    let client = reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("http client");
    let r = client
        .post(console.at("/login"))
        .form(&[("user", who.0), ("password", who.1)])
        .send()
        .await
        .expect("sign in");
    assert_eq!(r.status(), 303, "sign-in as {} must succeed", who.0);
    let page = client
        .get(console.at("/connections"))
        .send()
        .await
        .expect("page")
        .text()
        .await
        .expect("page text");
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("a csrf field on the page")
        .to_string();
    (client, csrf)
}

#[tokio::test(flavor = "multi_thread")]
async fn signing_in_is_required_viewers_cannot_act_and_csrf_is_enforced() {
    let env = TestEnv::new("con-auth").await;
    put_dead(
        &env,
        Family::Account,
        &[(
            "evt_auth_1".into(),
            "rejected",
            "HaloPSA refused the customer".into(),
        )],
    )
    .await;
    let console = Console::start(&env, "", &[]).await;
    let b = Browser::start("auth").await;

    // Not signed in: every page sends you to the sign-in form.
    b.goto(&console.at("/dead")).await;
    assert_eq!(b.path().await, "/login");
    b.shot("01-sign-in").await;
    b.fill("#user", ALICE.0).await;
    b.fill("#password", "not-the-password").await;
    b.click("#sign-in").await;
    let err = b
        .wait_text("#login-error", "Wrong", Duration::from_secs(30))
        .await;
    assert!(err.contains("Wrong user name or password"), "{err}");
    b.shot("02-sign-in-refused").await;

    // A viewer sees the dead letters but no replay or purge button.
    b.sign_in(&console, VICTOR).await;
    b.goto(&console.at("/dead")).await;
    b.wait_text("#letters", "evt_auth_1", Duration::from_secs(30))
        .await;
    assert_eq!(
        b.count("button[value=replay]").await,
        0,
        "a viewer sees no replay button"
    );
    assert_eq!(
        b.count("button[value=purge]").await,
        0,
        "a viewer sees no purge button"
    );
    assert_eq!(b.count("#test-acme").await, 0);
    b.shot("03-viewer-dead-letters").await;

    // ... and the request itself is refused with 403, CSRF token or not.
    let (viewer, csrf) = http_session(&console, VICTOR).await;
    let r = viewer
        .post(console.at("/dead/action"))
        .form(&[
            ("csrf", csrf.as_str()),
            ("action", "replay"),
            ("event_id", "evt_auth_1"),
        ])
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap_or_default().contains("viewer"));
    let r = viewer
        .post(console.at("/dead/run"))
        .form(&[
            ("csrf", csrf.as_str()),
            ("action", "purge"),
            ("event_id", "evt_auth_1"),
            ("expected", "1"),
            ("confirm_word", "purge"),
        ])
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 403);

    // An operator without the CSRF token is refused too; with it, asked to confirm.
    let (op, csrf) = http_session(&console, ALICE).await;
    let r = op
        .post(console.at("/dead/action"))
        .form(&[("action", "replay"), ("event_id", "evt_auth_1")])
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap_or_default().contains("CSRF"));
    let r = op
        .post(console.at("/dead/action"))
        .form(&[
            ("csrf", "0".repeat(64).as_str()),
            ("action", "replay"),
            ("event_id", "evt_auth_1"),
        ])
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 403, "a wrong token is no token");
    let r = op
        .post(console.at("/dead/action"))
        .form(&[
            ("csrf", csrf.as_str()),
            ("action", "replay"),
            ("event_id", "evt_auth_1"),
        ])
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 200);
    assert!(r
        .text()
        .await
        .unwrap_or_default()
        .contains("Replay 1 dead letters?"));
    // Nothing moved: the dead letter is still there.
    assert_eq!(
        env.depth(&env.topology.dead_queue(Family::Account)).await,
        1
    );

    // Not signed in at all: 401 for a state-changing request.
    let anon = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let r = anon
        .post(console.at("/dead/run"))
        .form(&[
            ("action", "purge"),
            ("expected", "1"),
            ("confirm_word", "purge"),
        ])
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 401);

    // Sign-in attempts are rate-limited (5 per window here), per user name
    // and per address (this client comes from 127.0.0.3).
    let guesser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .local_address(std::net::IpAddr::from([127, 0, 0, 3]))
        .build()
        .expect("client");
    let mut statuses = Vec::new();
    for _ in 0..7 {
        let r = guesser
            .post(console.at("/login"))
            .form(&[("user", "mallory"), ("password", "guess")])
            .send()
            .await
            .expect("post");
        statuses.push(r.status().as_u16());
    }
    assert_eq!(
        statuses,
        [401, 401, 401, 401, 401, 429, 429],
        "{statuses:?}"
    );

    let r = guesser
        .post(console.at("/login"))
        .form(&[("user", ALICE.0), ("password", ALICE.1)])
        .send()
        .await
        .expect("post");
    // The address is locked out for now, even for a right password.
    assert_eq!(r.status(), 429);
    let fresh = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .expect("client");
    let r = fresh
        .post(console.at("/login"))
        .header("x-forwarded-proto", "https")
        .form(&[("user", VICTOR.0), ("password", VICTOR.1)])
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 303, "another address is not locked out");
    // The session cookie's flags (Secure: the request came through TLS).
    let cookie = r
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    for flag in ["HttpOnly", "SameSite=Strict", "Secure"] {
        assert!(cookie.contains(flag), "{flag} missing: {cookie}");
    }

    // Sign-ins are in the audit trail.
    b.goto(&console.at("/audit")).await;
    let audit = b.text("#audit").await;
    assert!(
        audit.contains("sign-in") && audit.contains(VICTOR.0),
        "{audit}"
    );
    b.shot("04-audit").await;
    drop(console);
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_test_shows_each_mistake_and_its_fix() {
    let env = TestEnv::with(
        "con-check",
        EnvOptions {
            sim: SimConfig {
                tenant: Some("acme".into()),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await;
    let perm = SimHandle::start(SimConfig {
        tenant: Some("acme".into()),
        ..Default::default()
    })
    .await
    .expect("second halo-sim");
    perm.set_faults(Faults {
        deny: vec!["items:read".into()],
        ..Default::default()
    });
    let sim = &env.sim;
    let extra = format!(
        r#"
[connections.wrongsecret]
resource_server = "{api}"
auth_server = "{auth}"
tenant = "acme"
client_id = "{id}"
client_secret_env = "{WRONG_SECRET_ENV}"

[connections.notenant]
resource_server = "{api}"
auth_server = "{auth}"
client_id = "{id}"
client_secret_env = "{SECRET_ENV}"

[connections.noperm]
resource_server = "{papi}"
auth_server = "{pauth}"
tenant = "acme"
client_id = "{id}"
client_secret_env = "{SECRET_ENV}"
"#,
        api = sim.api_url(),
        auth = sim.auth_url(),
        papi = perm.api_url(),
        pauth = perm.auth_url(),
        id = SimConfig::default().client_id,
    );
    let console = Console::start(&env, &extra, &[(WRONG_SECRET_ENV, "not-the-secret")]).await;
    let b = Browser::start("connections").await;
    b.sign_in(&console, ALICE).await;
    b.goto(&console.at("/connections")).await;
    let page = b.body().await;
    assert!(
        page.contains(WRONG_SECRET_ENV),
        "shows where the secret comes from"
    );
    assert!(!page.contains("not-the-secret"), "never the secret itself");
    assert!(!page.contains(&SimConfig::default().client_secret));
    b.shot("01-list").await;

    b.click("#test-acme").await;
    let r = b
        .wait_text("#conn-acme #report", "checks", Duration::from_secs(60))
        .await;
    assert!(r.contains("all checks passed"), "{r}");
    b.shot("02-acme-ok").await;

    b.click("#test-wrongsecret").await;
    let r = b
        .wait_text(
            "#conn-wrongsecret #report",
            "failed",
            Duration::from_secs(60),
        )
        .await;
    assert!(r.contains("✘ token: 401 invalid_client"), "{r}");
    assert!(
        r.contains("Fix:") && r.contains("the client id or secret is wrong"),
        "{r}"
    );
    assert!(
        r.contains(WRONG_SECRET_ENV),
        "names where the secret comes from: {r}"
    );
    b.shot("03-wrong-secret").await;

    b.click("#test-notenant").await;
    let r = b
        .wait_text("#conn-notenant #report", "failed", Duration::from_secs(60))
        .await;
    assert!(r.contains("✘ token: 500 HTML error page"), "{r}");
    assert!(r.contains("tenant"), "{r}");
    assert!(
        r.contains("try tenant = \"acme\""),
        "the fix names the tenant: {r}"
    );
    b.shot("04-missing-tenant").await;

    b.click("#test-noperm").await;
    let r = b
        .wait_text("#conn-noperm #report", "failed", Duration::from_secs(60))
        .await;
    assert!(r.contains("✘ items: 403 You do not have permission"), "{r}");
    assert!(r.contains("Feature Access: Products (Items)"), "{r}");
    assert!(r.contains("✔ customers"), "{r}");
    b.shot("05-missing-permission").await;

    // Each test is in the audit trail, with who ran it.
    b.goto(&console.at("/audit?action=test")).await;
    let audit = b.text("#audit").await;
    for name in ["acme", "wrongsecret", "notenant", "noperm"] {
        assert!(
            audit.contains(&format!("connection {name}")),
            "{name}: {audit}"
        );
    }
    assert!(audit.contains(ALICE.0));
    b.shot("06-audit").await;
    drop(console);
    perm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn replaying_a_group_of_5000_dead_letters_runs_server_side_with_progress() {
    let env = TestEnv::new("con-bulk").await;
    const N: usize = 5000;
    let letters: Vec<(String, &str, String)> = (0..N)
        .map(|i| {
            (
                format!("evt_bulk_{i:05}"),
                "unmapped",
                format!(
                    "no HaloPSA item mapping for sku \"SKU-{}\" (connection acme)",
                    i % 7
                ),
            )
        })
        .collect();
    put_dead(&env, Family::Subscription, &letters).await;
    // And one dead letter of another cause, which the group replay leaves alone.
    put_dead(
        &env,
        Family::Account,
        &[("evt_other".into(), "rejected", "HaloPSA said no".into())],
    )
    .await;
    let console = Console::start(&env, "", &[]).await;
    let b = Browser::start("bulk").await;
    b.sign_in(&console, ALICE).await;
    b.goto(&console.at("/dead")).await;
    let groups = b
        .wait_text("#groups", "5000", Duration::from_secs(120))
        .await;
    assert!(
        groups.contains("no HaloPSA item mapping for sku \"SKU-#\""),
        "numbers are folded: {groups}"
    );
    b.shot("01-groups").await;
    // The group's replay button (the biggest group comes first).
    b.click("#groups tr.group button[value=replay]").await;
    let n = b
        .wait_text("#affected", "5000", Duration::from_secs(120))
        .await;
    assert_eq!(n, "5000");
    b.shot("02-confirm").await;
    assert_eq!(
        env.depth(&env.topology.dead_queue(Family::Subscription))
            .await,
        N as u32,
        "asking changes nothing"
    );
    b.click("#go").await;
    b.wait_text("#job-state", "", Duration::from_secs(10)).await;
    assert!(b.path().await.starts_with("/jobs/"));
    // While it runs, the progress goes up in the page (no reload) and other
    // pages still answer.
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let removed: usize = b.text("#job-removed").await.trim().parse().unwrap_or(0);
        let state = b.text("#job-state").await;
        if seen.last() != Some(&removed) {
            seen.push(removed);
        }
        if seen.len() == 3 {
            b.shot("03-progress").await;
        }
        if state.contains("done") || state.contains("failed") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the job did not end; seen {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        seen.iter().any(|n| *n > 0 && *n < N),
        "progress was shown while the job ran: {seen:?}"
    );
    let state = b.text("#job-state").await;
    assert_eq!(state, "done", "{}", b.body().await);
    assert_eq!(b.text("#job-removed").await, N.to_string());
    assert_eq!(b.text("#job-failed").await, "0");
    b.shot("04-done").await;
    assert_eq!(
        env.depth(&env.topology.dead_queue(Family::Subscription))
            .await,
        0
    );
    assert_eq!(
        env.depth(&env.topology.work_queue(Family::Subscription))
            .await,
        N as u32
    );
    assert_eq!(
        env.depth(&env.topology.dead_queue(Family::Account)).await,
        1,
        "the other group stays"
    );
    // Who did it, how many, with the event ids.
    b.goto(&console.at("/audit?action=replay")).await;
    let audit = b.text("#audit").await;
    assert!(
        audit.contains(ALICE.0) && audit.contains("5000") && audit.contains("evt_bulk_"),
        "{audit}"
    );
    b.shot("05-audit").await;
    let file = std::fs::read_to_string(env.dir.join("audit/audit.jsonl")).expect("audit file");
    let done = file
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e["action"] == "replay" && e["outcome"] == "done")
        .expect("a done replay entry");
    assert_eq!(done["count"], N);
    assert_eq!(done["event_ids"].as_array().map(Vec::len), Some(N));
    assert_eq!(done["user"], ALICE.0);
    drop(console);
}

#[tokio::test(flavor = "multi_thread")]
async fn overview_numbers_equal_the_broker_and_halo_sim_after_a_run_with_failures() {
    let mut env = TestEnv::new("con-over").await;
    env.spawn_worker("halosync-account");
    for i in 0..6 {
        env.publish(&account_event(
            &format!("evt_ok_{i}"),
            &format!("acc_{i}"),
            &format!("Customer {i}"),
            true,
            1,
        ))
        .await;
    }
    // Failures: an unknown connection and a schema violation are dead-lettered at once.
    let mut bad = account_event("evt_bad_conn", "acc_x", "X", true, 1);
    bad["connection"] = json!("nosuch");
    env.publish(&bad).await;
    let mut bad = account_event("evt_bad_schema", "acc_y", "Y", true, 1);
    bad["data"]["active"] = json!("yes");
    env.publish(&bad).await;
    env.wait_drained(Family::Account, Duration::from_secs(60))
        .await;
    let dead = env.depth(&env.topology.dead_queue(Family::Account)).await;
    assert_eq!(dead, 2);
    let console = Console::start(&env, "", &[]).await;
    let b = Browser::start("overview").await;
    b.sign_in(&console, VICTOR).await;
    b.goto(&console.at("/")).await;
    assert_eq!(b.text("#total-dead").await, dead.to_string());
    assert_eq!(
        b.text("#family-account td:nth-child(4)").await,
        dead.to_string()
    );
    assert_eq!(b.text("#family-account td:nth-child(2)").await, "0");
    assert_eq!(
        b.text("#family-account td:nth-child(5)").await,
        "1",
        "one account worker consumes"
    );
    // The budget used is what halo-sim counted (every API request of the run).
    let api_requests = env.sim.max_requests_in_any_window(300);
    assert!(api_requests > 0);
    let used = b.text("#conn-acme td:nth-child(5)").await;
    assert!(
        used.starts_with(&format!("{api_requests} / ")),
        "{used} vs {api_requests}"
    );
    assert!(b
        .text("#conn-acme td:nth-child(6)")
        .await
        .contains("valid until"));
    b.shot("01-overview").await;
    // Live: a new dead letter shows up without a reload.
    put_dead(
        &env,
        Family::Usage,
        &[("evt_live".into(), "invalid", "late".into())],
    )
    .await;
    b.wait_text(
        "#total-dead",
        &(dead + 1).to_string(),
        Duration::from_secs(20),
    )
    .await;
    b.wait_text(
        "#family-usage td:nth-child(4)",
        "1",
        Duration::from_secs(20),
    )
    .await;
    b.shot("02-overview-live").await;
    assert_eq!(env.clients().len(), 6);
    drop(console);
}

/// Points the env's config (workers and console) at another Redis.
fn use_redis(env: &TestEnv, url: &str) {
    let text = std::fs::read_to_string(&env.config_path).expect("config");
    let text: String = text
        .lines()
        .map(|l| {
            if l.starts_with("redis_url") {
                format!("redis_url = \"{url}\"")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&env.config_path, text + "\n").expect("config");
}

#[tokio::test(flavor = "multi_thread")]
async fn activity_page_searches_pages_exports_and_survives_flushall() {
    let redis = PrivateRedis::started();
    let mut env = TestEnv::new("con-act").await;
    use_redis(&env, &redis.url());
    env.spawn_worker("halosync-account");
    for i in 0..60 {
        env.publish(&account_event(
            &format!("evt_a_{i:02}"),
            &format!("acc_{i}"),
            &format!("Customer {i}"),
            true,
            1,
        ))
        .await;
    }
    let mut bad = account_event("evt_a_bad", "acc_bad", "Bad", true, 1);
    bad["data"]["active"] = json!("yes");
    env.publish(&bad).await;
    env.wait_drained(Family::Account, Duration::from_secs(90))
        .await;
    let console = Console::start(&env, "", &[]).await;
    let b = Browser::start("activity").await;
    b.sign_in(&console, VICTOR).await;
    b.goto(&console.at("/activity")).await;
    b.wait_text("#activity-total", "61 matching", Duration::from_secs(30))
        .await;
    assert_eq!(b.count("#activity tbody tr").await, 50, "50 per page");
    assert_eq!(b.text("#page-of").await, "page 1 of 2");
    b.shot("01-all").await;
    b.click("#older").await;
    b.wait_text("#page-of", "page 2 of 2", Duration::from_secs(10))
        .await;
    assert_eq!(b.count("#activity tbody tr").await, 11);
    // Filters live in the URL: typed in the form, kept by the address.
    b.goto(&console.at("/activity")).await;
    b.fill("input[name=event_id]", "evt_a_4").await;
    b.click("form.filters button[type=submit]").await;
    b.wait_text("#activity-total", "10 matching", Duration::from_secs(10))
        .await; // evt_a_40 ..= evt_a_49 (ids are zero-padded)
    let url = b.c().current_url().await.expect("url");
    assert!(url.as_str().contains("event_id=evt_a_4"), "{url}");
    b.goto(&console.at("/activity?outcome=dead-lettered")).await;
    let t = b
        .wait_text("#activity", "evt_a_bad", Duration::from_secs(10))
        .await;
    assert!(t.contains("dead-lettered") && t.contains("invalid"), "{t}");
    assert_eq!(b.text("#activity-total").await, "1 matching");
    b.shot("02-dead-lettered").await;
    // CSV of everything matching (both pages).
    let (http, _) = http_session(&console, VICTOR).await;
    let csv = http
        .get(console.at("/activity.csv?outcome=applied"))
        .send()
        .await
        .expect("csv");
    assert_eq!(csv.status(), 200);
    assert!(csv.headers()["content-type"]
        .to_str()
        .unwrap_or("")
        .starts_with("text/csv"));
    let text = csv.text().await.expect("csv body");
    assert_eq!(
        text.lines().count(),
        1 + 60,
        "header + 60 applied: {}",
        &text[..text.len().min(400)]
    );
    // FLUSHALL on Redis, console restarted: the log is in the broker's stream.
    drop(b);
    drop(console);
    redis.flushall().await;
    let console = Console::start(&env, "", &[]).await;
    let b = Browser::start("activity-after-flushall").await;
    b.sign_in(&console, VICTOR).await;
    b.goto(&console.at("/activity")).await;
    b.wait_text("#activity-total", "61 matching", Duration::from_secs(30))
        .await;
    b.shot("03-after-flushall").await;
    env.kill_worker(0);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unmapped_sku_is_mapped_on_the_page_replayed_and_applied_exactly_once() {
    const ITEM: i64 = 2001;
    let mut env = TestEnv::with(
        "con-map",
        EnvOptions {
            connection_extra: format!(
                "{GENEROUS_BUDGET}\n[connections.{CONNECTION}.items]\n\"MS-365-BP\" = 2010\n"
            ),
            ..Default::default()
        },
    )
    .await;
    env.sim.insert_item(ITEM, "Acme Backup 1 TB");
    env.sim.insert_item(2002, "Acme Backup 5 TB");
    env.sim.insert_item(2003, "Storage add-on");
    env.sim.insert_item(2010, "Microsoft 365 Business Premium");
    env.spawn_worker("halosync-account");
    env.spawn_worker("halosync-subscription");
    env.publish(&account_event("acc-e1", "acc_1", "Contoso Ltd", true, 1))
        .await;
    env.wait_for("customer", Duration::from_secs(30), || {
        customers_of(&env, "acc_1").len() == 1
    })
    .await;
    let mut e = subscription_event("s1", "sub_1", "acc_1", 5, "active", 1);
    e["data"]["product"] = json!({"sku": "ACME-BACKUP-1TB", "name": "Backup 1 TB"});
    env.publish(&e).await;
    let dead = env.topology.dead_queue(Family::Subscription);
    let deadline = Instant::now() + Duration::from_secs(30);
    while env.depth(&dead).await == 0 {
        assert!(Instant::now() < deadline, "{}", env.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let marker = "halosync.subscription:sub_1";
    let licences = |env: &TestEnv| {
        env.sim
            .licences()
            .into_iter()
            .filter(|l| l["thirdparty_client_id"] == marker)
            .count()
    };
    assert_eq!(licences(&env), 0);

    let console = Console::start(&env, "", &[]).await;
    let b = Browser::start("mappings").await;
    b.sign_in(&console, ALICE).await;
    b.goto(&console.at("/mappings")).await;
    let t = b
        .wait_text("#unmapped", "ACME-BACKUP-1TB", Duration::from_secs(30))
        .await;
    assert!(t.contains("subscription"), "{t}");
    b.shot("01-unmapped").await;
    // Search HaloPSA's items by name, pick one.
    b.fill("#item-search", "Backup").await;
    b.click("#search-items").await;
    let items = b
        .wait_text("#items", "Acme Backup 1 TB", Duration::from_secs(30))
        .await;
    assert!(
        !items.contains("Storage add-on"),
        "only the matching items: {items}"
    );
    b.shot("02-search").await;
    b.c()
        .find(Locator::Css(
            "tr[data-sku='ACME-BACKUP-1TB'] select.item-choice",
        ))
        .await
        .expect("item choice")
        .select_by_value(&ITEM.to_string())
        .await
        .expect("choose the item");
    b.click("tr[data-sku='ACME-BACKUP-1TB'] button[type=submit]")
        .await;
    let msg = b
        .wait_text("#mapped", "Mapped", Duration::from_secs(30))
        .await;
    assert!(
        msg.contains("ACME-BACKUP-1TB") && msg.contains("2001"),
        "{msg}"
    );
    assert_eq!(b.text("#waiting").await, "1");
    b.shot("03-mapped").await;
    // Replay that sku's dead letters: confirm, then the job.
    b.click("#replay-sku").await;
    assert_eq!(
        b.wait_text("#affected", "1", Duration::from_secs(30)).await,
        "1"
    );
    b.click("#go").await;
    b.wait_text("#job-state", "done", Duration::from_secs(60))
        .await;
    b.shot("04-replayed").await;
    env.wait_for("licence written", Duration::from_secs(30), || {
        licences(&env) == 1
    })
    .await;
    env.wait_drained(Family::Subscription, Duration::from_secs(30))
        .await;
    assert_eq!(licences(&env), 1, "applied exactly once");
    assert_eq!(env.depth(&dead).await, 0);
    // Who did it.
    b.goto(&console.at("/audit")).await;
    let audit = b.text("#audit").await;
    assert!(
        audit.contains("mapping") && audit.contains("ACME-BACKUP-1TB → item 2001"),
        "{audit}"
    );
    assert!(
        audit.contains("replay") && audit.contains("s1") && audit.contains(ALICE.0),
        "{audit}"
    );
    b.shot("05-audit").await;
    drop(console);
}

/// The Reconcile page shows the last report that `halosync reconcile` kept
/// in Redis: when, the snapshot's size, the counts per drift kind and the
/// drifted aggregates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_page_shows_the_last_report() {
    let env = TestEnv::new("con-rec").await;
    // HaloPSA as the workers would have left it, then edited by the MSP:
    // acc_1's customer inactivated; sub_1 never written.
    let client = env
        .sim
        .insert_record("Client", json!({"name": "Contoso Ltd", "inactive": true}))
        .expect("client");
    env.sim.insert_record(
        "ExternalLink",
        json!({"third_party_id": "acc_1", "third_party_type": "halosync.account",
               "halo_id": client, "table_id": 2, "third_party_secondary_id": "s=1"}),
    );
    let mut account = account_event("e1", "acc_1", "Contoso Ltd", true, 1);
    account["data"]
        .as_object_mut()
        .expect("data")
        .remove("website");
    let snapshot = env.dir.join("snapshot.jsonl");
    std::fs::write(
        &snapshot,
        format!(
            "{account}\n{}\n",
            subscription_event("e2", "sub_1", "acc_1", 5, "active", 1)
        ),
    )
    .expect("snapshot");
    let out = Command::new(binary_path("halosync"))
        .arg("--config")
        .arg(&env.config_path)
        .args(["reconcile", "--connection", CONNECTION, "--snapshot"])
        .arg(&snapshot)
        .env(SECRET_ENV, SimConfig::default().client_secret)
        .output()
        .expect("run halosync reconcile");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let console = Console::start(&env, "", &[]).await;
    let b = Browser::start("reconcile").await;
    b.sign_in(&console, VICTOR).await;
    b.goto(&console.at("/reconcile")).await;
    let t = b
        .wait_text("#drifted", "2 aggregates drifted", Duration::from_secs(10))
        .await;
    assert!(t.contains("drifted"), "{t}");
    let body = b.body().await;
    assert!(body.contains("snapshot.jsonl: 2 events"), "{body}");
    assert_eq!(b.text("td[data-kind=differs]").await, "1");
    assert_eq!(b.text("td[data-kind=missing]").await, "2");
    assert_eq!(b.text("td[data-kind=orphaned]").await, "0");
    assert_eq!(b.count("tr[data-aggregate=acc_1]").await, 1);
    assert_eq!(b.count("tr[data-aggregate=sub_1]").await, 2);
    assert!(body.contains("active: true ≠ false"), "{body}");
    b.shot("01-last-report").await;
}
