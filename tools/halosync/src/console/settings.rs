//! The `[console]` table of halosync.toml: who may sign in, with which
//! role, and where the audit trail is kept.
//!
//! ```toml
//! [console]
//! listen = "127.0.0.1:8088"          # --listen overrides it
//! audit_file = "halosync-audit.jsonl"
//! secure_cookies = false             # true when served over TLS (or behind a TLS proxy)
//! session_hours = 12
//! login_attempts = 5                 # sign-ins per address within the window (hard limit);
//!                                    # beyond this many failures a user name waits 1, 2, 4 … 60 s
//! login_window_seconds = 300         # the window of both
//! login_concurrency = 2              # password checks (argon2, ~19 MiB each) at once
//! trusted_proxies = ["10.0.0.5"]     # X-Forwarded-For is read only from these addresses
//!
//! [console.users.alice]
//! role = "operator"                  # or "viewer"
//! password_hash_env = "HALOSYNC_CONSOLE_ALICE"   # or password_hash_file = "/run/secrets/alice"
//! ```
//!
//! Password hashes are argon2 PHC strings (`halosync console --hash-password`
//! prints one); like HaloPSA secrets they come from the environment or a
//! file, never from the file's own text. The shared `Config` only passes the
//! table through; it is parsed here because only the console reads it.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use argon2::password_hash::phc::PasswordHash;
use serde::Deserialize;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8088";

/// A role: what a signed-in user may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads every page; changes nothing.
    Viewer,
    /// Also replays, purges, edits mappings, runs connection tests.
    Operator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
        }
    }
}

/// One user who may sign in. The hash never prints.
#[derive(Clone)]
pub struct User {
    pub name: String,
    pub role: Role,
    pub password_hash: String,
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("password_hash", &"***")
            .finish()
    }
}

#[derive(Clone, Debug)]
pub struct ConsoleSettings {
    pub listen: SocketAddr,
    pub audit_file: PathBuf,
    pub secure_cookies: bool,
    pub session_ttl: Duration,
    pub login_attempts: u32,
    pub login_window: Duration,
    /// Password checks running at once; the rest wait briefly, then 429.
    pub login_concurrency: usize,
    /// Reverse proxies whose `X-Forwarded-For` names the client address.
    pub trusted_proxies: Vec<IpAddr>,
    pub users: BTreeMap<String, User>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConsole {
    listen: Option<String>,
    audit_file: Option<PathBuf>,
    secure_cookies: Option<bool>,
    session_hours: Option<u64>,
    login_attempts: Option<u32>,
    login_window_seconds: Option<u64>,
    login_concurrency: Option<usize>,
    #[serde(default)]
    trusted_proxies: Vec<String>,
    #[serde(default)]
    users: BTreeMap<String, RawUser>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUser {
    role: Role,
    password_hash_env: Option<String>,
    password_hash_file: Option<PathBuf>,
    /// Refused with an explanation, as `client_secret` is.
    password_hash: Option<toml::Value>,
    password: Option<toml::Value>,
}

/// Where a user's hash comes from: the same seam as the rest of the
/// configuration (tests pass their own).
pub use halosync_shared::config::{Env, ProcessEnv};

impl ConsoleSettings {
    /// Parses the `[console]` table; `listen` (from `--listen`) wins over
    /// the file. Every mistake names the key and what to write.
    pub fn parse(
        table: Option<&toml::Table>,
        listen: Option<&str>,
        env: &dyn Env,
    ) -> anyhow::Result<ConsoleSettings> {
        let raw: RawConsole = match table {
            Some(t) => toml::Value::Table(t.clone())
                .try_into()
                .map_err(|e| anyhow!("config: [console]: {e}"))?,
            None => bail!(
                "config: no [console] table, so nobody could sign in; add one with a user, e.g.\n\n[console]\n[console.users.alice]\nrole = \"operator\"\npassword_hash_env = \"HALOSYNC_CONSOLE_ALICE\"\n\nand set HALOSYNC_CONSOLE_ALICE to the output of `halosync console --hash-password`"
            ),
        };
        let listen_text = listen
            .map(str::to_string)
            .or(raw.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let listen: SocketAddr = listen_text.parse().map_err(|_| {
            anyhow!(
                "console listen address {listen_text:?} is not HOST:PORT with an IP address; write e.g. 127.0.0.1:8088 (or 0.0.0.0:8088 in a container)"
            )
        })?;
        if raw.users.is_empty() {
            bail!("config: console.users is empty, so nobody could sign in; add [console.users.NAME] with role = \"operator\" or \"viewer\" and password_hash_env = \"VAR\"");
        }
        let mut users = BTreeMap::new();
        for (name, u) in raw.users {
            let key = format!("console.users.{name}");
            if u.password.is_some() || u.password_hash.is_some() {
                bail!("config: {key}: passwords and their hashes are never read from the config file; use password_hash_env = \"ENV_VAR_NAME\" or password_hash_file = \"/run/secrets/NAME\" holding the output of `halosync console --hash-password`");
            }
            let hash = match (u.password_hash_env, u.password_hash_file) {
                (Some(_), Some(_)) => bail!(
                    "config: {key}: give either password_hash_env or password_hash_file, not both"
                ),
                (None, None) => bail!(
                    "config: {key}.password_hash_env is missing; set it to the name of an environment variable holding the user's argon2 hash (`halosync console --hash-password` prints one)"
                ),
                (Some(var), None) => env.var(&var).ok_or_else(|| {
                    anyhow!("config: {key}.password_hash_env: the environment variable {var} is not set; set it to the output of `halosync console --hash-password`")
                })?,
                (None, Some(path)) => std::fs::read_to_string(&path).with_context(|| {
                    format!("config: {key}.password_hash_file: cannot read {}", path.display())
                })?,
            };
            let hash = hash.trim().to_string();
            if PasswordHash::new(&hash).is_err() || !hash.starts_with("$argon2") {
                bail!("config: {key}: the password hash is not an argon2 PHC string ($argon2id$v=19$...); make one with `halosync console --hash-password`");
            }
            users.insert(
                name.clone(),
                User {
                    name,
                    role: u.role,
                    password_hash: hash,
                },
            );
        }
        let session_hours = raw.session_hours.unwrap_or(12);
        if session_hours == 0 {
            bail!("config: console.session_hours must be at least 1, e.g. 12");
        }
        let login_attempts = raw.login_attempts.unwrap_or(5);
        if login_attempts == 0 {
            bail!("config: console.login_attempts must be at least 1, e.g. 5");
        }
        let login_concurrency = raw.login_concurrency.unwrap_or(2);
        if !(1..=64).contains(&login_concurrency) {
            bail!("config: console.login_concurrency must be between 1 and 64, e.g. 2 (each password check holds ~19 MiB while it runs)");
        }
        let mut trusted_proxies = Vec::new();
        for p in &raw.trusted_proxies {
            trusted_proxies.push(p.trim().parse::<IpAddr>().map_err(|_| {
                anyhow!("config: console.trusted_proxies: {p:?} is not an IP address; list each proxy's address, e.g. trusted_proxies = [\"10.0.0.5\"]")
            })?);
        }
        Ok(ConsoleSettings {
            listen,
            audit_file: raw
                .audit_file
                .unwrap_or_else(|| PathBuf::from("halosync-audit.jsonl")),
            secure_cookies: raw.secure_cookies.unwrap_or(false),
            session_ttl: Duration::from_secs(session_hours * 3600),
            login_attempts,
            login_window: Duration::from_secs(raw.login_window_seconds.unwrap_or(300).max(1)),
            login_concurrency,
            trusted_proxies,
            users,
        })
    }
}

/// An argon2id PHC string for `password` (random salt).
pub fn hash_password(password: &str) -> anyhow::Result<String> {
    use argon2::password_hash::PasswordHasher;
    argon2::Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| anyhow!("hashing the password: {e}"))
}

/// Whether `password` matches the PHC string, by the argon2 crate's own
/// verifier: the reference that the console's
/// [`super::passwords::verify_with`] is tested against.
#[cfg(test)]
pub fn verify_password(password: &str, hash: &str) -> bool {
    use argon2::password_hash::PasswordVerifier;
    match PasswordHash::new(hash) {
        Ok(parsed) => argon2::Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Vars(Vec<(&'static str, String)>);
    impl Env for Vars {
        fn var(&self, key: &str) -> Option<String> {
            self.0
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.clone())
        }
    }

    fn table(text: &str) -> toml::Table {
        let t: toml::Table = toml::from_str(text).unwrap();
        t["console"].as_table().unwrap().clone()
    }

    #[test]
    fn reads_users_from_env_and_refuses_inline_hashes() {
        let hash = hash_password("s3cret").unwrap();
        assert!(verify_password("s3cret", &hash));
        assert!(!verify_password("wrong", &hash));
        let env = Vars(vec![("H_ALICE", hash.clone())]);
        let t = table("[console]\n[console.users.alice]\nrole = \"operator\"\npassword_hash_env = \"H_ALICE\"\n");
        let s = ConsoleSettings::parse(Some(&t), Some("127.0.0.1:9999"), &env).unwrap();
        assert_eq!(s.users["alice"].role, Role::Operator);
        assert_eq!(s.listen.port(), 9999);
        assert!(!format!("{:?}", s.users["alice"]).contains(&hash));
        let t = table("[console]\n[console.users.bob]\nrole = \"viewer\"\npassword_hash = \"x\"\n");
        let e = ConsoleSettings::parse(Some(&t), None, &env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("password_hash_env"), "{e}");
        let t = table(
            "[console]\n[console.users.bob]\nrole = \"admin\"\npassword_hash_env = \"H_ALICE\"\n",
        );
        let e = ConsoleSettings::parse(Some(&t), None, &env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("viewer") && e.contains("operator"), "{e}");
        let t = table(
            "[console]\n[console.users.bob]\nrole = \"viewer\"\npassword_hash_env = \"NOPE\"\n",
        );
        let e = ConsoleSettings::parse(Some(&t), None, &env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("NOPE is not set"), "{e}");
        let e = ConsoleSettings::parse(None, None, &env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("[console.users.alice]"), "{e}");
        let t = table("[console]\nlisten = \"localhost\"\n[console.users.alice]\nrole = \"operator\"\npassword_hash_env = \"H_ALICE\"\n");
        let e = ConsoleSettings::parse(Some(&t), None, &env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("127.0.0.1:8088"), "{e}");
    }
}
