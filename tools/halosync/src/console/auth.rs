//! Sign-in, sessions, roles, CSRF and the sign-in rate limit.
//!
//! * Sessions live in the console's memory (one process per deployment):
//!   a random 256-bit id in a cookie `HttpOnly; SameSite=Strict; Path=/`,
//!   plus `Secure` when `console.secure_cookies` is set or the request came
//!   through a TLS proxy (`X-Forwarded-Proto: https`). A restart signs
//!   everyone out, which is acceptable for an operator's console.
//! * Every state-changing request carries the session's CSRF token in a
//!   form field (`csrf`), compared in constant time; SameSite=Strict is the
//!   second line of defence, not the only one.
//! * Failed sign-ins are counted per user name and per client address in a
//!   sliding window; beyond `console.login_attempts` the next tries are
//!   refused (429) until the window has passed.
//!
//! Cookies are parsed by hand (a few lines) rather than with another crate:
//! the console reads exactly one cookie and writes it in one place.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap};

use super::settings::{ConsoleSettings, Role};

pub const COOKIE: &str = "halosync_session";

/// Who made the request (from a valid session).
#[derive(Clone, Debug)]
pub struct SignedIn {
    pub user: String,
    pub role: Role,
    pub csrf: String,
    pub session: String,
}

impl SignedIn {
    pub fn is_operator(&self) -> bool {
        self.role == Role::Operator
    }
}

struct Session {
    user: String,
    role: Role,
    csrf: String,
    expires: Instant,
}

pub struct Auth {
    sessions: Mutex<HashMap<String, Session>>,
    failures: Mutex<HashMap<String, Vec<Instant>>>,
    ttl: Duration,
    attempts: u32,
    window: Duration,
    secure: bool,
}

/// 256 random bits as hex.
pub fn random_token() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Equal in constant time (for CSRF tokens).
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// Whether the request reached us over TLS (directly or via a proxy).
fn over_tls(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"))
}

impl Auth {
    pub fn new(settings: &ConsoleSettings) -> Auth {
        Auth {
            sessions: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            ttl: settings.session_ttl,
            attempts: settings.login_attempts,
            window: settings.login_window,
            secure: settings.secure_cookies,
        }
    }

    /// The session of this request, if valid.
    pub fn signed_in(&self, headers: &HeaderMap) -> Option<SignedIn> {
        let id = cookie(headers, COOKIE)?;
        let mut sessions = self.sessions.lock().ok()?;
        let now = Instant::now();
        sessions.retain(|_, s| s.expires > now);
        sessions.get(&id).map(|s| SignedIn {
            user: s.user.clone(),
            role: s.role,
            csrf: s.csrf.clone(),
            session: id.clone(),
        })
    }

    /// Starts a session; returns the `Set-Cookie` value.
    pub fn start(&self, user: &str, role: Role, headers: &HeaderMap) -> String {
        let id = random_token();
        if let Ok(mut s) = self.sessions.lock() {
            s.insert(
                id.clone(),
                Session {
                    user: user.to_string(),
                    role,
                    csrf: random_token(),
                    expires: Instant::now() + self.ttl,
                },
            );
        }
        self.set_cookie(&id, self.ttl.as_secs(), headers)
    }

    /// Ends a session; returns the `Set-Cookie` value that clears it.
    pub fn end(&self, session: &str, headers: &HeaderMap) -> String {
        if let Ok(mut s) = self.sessions.lock() {
            s.remove(session);
        }
        self.set_cookie("", 0, headers)
    }

    fn set_cookie(&self, value: &str, max_age: u64, headers: &HeaderMap) -> String {
        let secure = if self.secure || over_tls(headers) {
            "; Secure"
        } else {
            ""
        };
        format!("{COOKIE}={value}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age}{secure}")
    }

    /// Whether the form's CSRF token is this session's.
    pub fn csrf_ok(who: &SignedIn, sent: Option<&str>) -> bool {
        sent.is_some_and(|s| same(s, &who.csrf))
    }

    /// `Some(seconds)` when sign-in for this user or address is refused for now.
    pub fn locked_out(&self, user: &str, ip: Option<IpAddr>) -> Option<u64> {
        let mut f = self.failures.lock().ok()?;
        let now = Instant::now();
        let mut wait = None;
        for key in keys(user, ip) {
            if let Some(times) = f.get_mut(&key) {
                times.retain(|t| now.duration_since(*t) < self.window);
                if times.len() as u32 >= self.attempts {
                    let oldest = times.first().copied().unwrap_or(now);
                    let left = self.window.saturating_sub(now.duration_since(oldest));
                    wait = Some(wait.unwrap_or(0).max(left.as_secs().max(1)));
                }
            }
        }
        wait
    }

    pub fn failed(&self, user: &str, ip: Option<IpAddr>) {
        if let Ok(mut f) = self.failures.lock() {
            for key in keys(user, ip) {
                f.entry(key).or_default().push(Instant::now());
            }
        }
    }

    pub fn succeeded(&self, user: &str) {
        if let Ok(mut f) = self.failures.lock() {
            f.remove(&format!("user:{user}"));
        }
    }
}

fn keys(user: &str, ip: Option<IpAddr>) -> Vec<String> {
    let mut k = vec![format!("user:{user}")];
    if let Some(ip) = ip {
        k.push(format!("ip:{ip}"));
    }
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_session_cookie_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            "a=1; halosync_session=abc; b=2".parse().unwrap(),
        );
        assert_eq!(cookie(&h, COOKIE).as_deref(), Some("abc"));
        assert!(same("abc", "abc") && !same("abc", "abd") && !same("abc", "ab"));
    }
}
