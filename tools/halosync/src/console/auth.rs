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
//! * Sign-in attempts are counted per client address and per user name
//!   *before* the password is checked ([`Auth::begin_attempt`]): a hard
//!   limit per address (`console.login_attempts` per window), and an
//!   exponential delay per user name after as many failures. The client
//!   address comes from `X-Forwarded-For` only when the peer is one of
//!   `console.trusted_proxies`.
//! * The sign-in form carries its own token (a cookie and a field, see
//!   [`LOGIN_COOKIE`]) and a cross-origin `Origin` is refused.
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
    limits: Mutex<Limits>,
    trusted_proxies: Vec<IpAddr>,
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
            limits: Mutex::new(Limits::default()),
            trusted_proxies: settings.trusted_proxies.clone(),
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

    /// Counts a sign-in attempt *before* its password is checked, so that
    /// concurrent attempts cannot all pass a check made before any failed:
    /// `Err(seconds)` when it is refused for now. The address has a hard
    /// limit (`login_attempts` per window, successes given back); a user
    /// name that failed `login_attempts` times waits 1, 2, 4 … up to
    /// [`USER_DELAY_MAX`] seconds between tries, so that nobody can lock a
    /// real user out for long by guessing. Failures are forgotten a window
    /// after the last one.
    pub fn begin_attempt(&self, user: &str, ip: IpAddr) -> Result<(), u64> {
        let Ok(mut l) = self.limits.lock() else {
            return Err(1);
        };
        let now = Instant::now();
        let window = self.window;
        if l.addresses.len() + l.users.len() > PRUNE_ABOVE {
            l.addresses.retain(|_, t| {
                t.retain(|at| now.duration_since(*at) < window);
                !t.is_empty()
            });
            l.users
                .retain(|_, u| now.duration_since(u.last) < window || u.next_allowed > now);
        }
        let times = l.addresses.entry(ip).or_default();
        times.retain(|at| now.duration_since(*at) < window);
        if times.len() as u32 >= self.attempts {
            let oldest = times.first().copied().unwrap_or(now);
            let left = window.saturating_sub(now.duration_since(oldest));
            return Err(left.as_secs().max(1));
        }
        let attempts = self.attempts;
        let u = l.users.entry(user.to_string()).or_insert(UserFailures {
            count: 0,
            last: now,
            next_allowed: now,
        });
        if now.duration_since(u.last) >= window && u.next_allowed <= now {
            u.count = 0;
        }
        if u.next_allowed > now {
            return Err(u.next_allowed.duration_since(now).as_secs().max(1));
        }
        u.count = u.count.saturating_add(1);
        u.last = now;
        if u.count >= attempts {
            let doublings = (u.count - attempts).min(16);
            let delay = Duration::from_secs(1u64 << doublings).min(USER_DELAY_MAX);
            u.next_allowed = now + delay;
        }
        l.addresses.entry(ip).or_default().push(now);
        Ok(())
    }

    /// A right password: the user's failures are forgotten and the
    /// address gets its attempt back.
    pub fn succeeded(&self, user: &str, ip: IpAddr) {
        if let Ok(mut l) = self.limits.lock() {
            l.users.remove(user);
            if let Some(t) = l.addresses.get_mut(&ip) {
                t.pop();
            }
        }
    }

    /// The client's address: the peer, or, when the peer is a configured
    /// trusted proxy, the right-most `X-Forwarded-For` entry that is not
    /// itself a trusted proxy (entries further left are the client's word).
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.trusted_proxies.contains(&peer) {
            return peer;
        }
        let forwarded: Vec<IpAddr> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|a| a.trim().parse::<IpAddr>().ok())
            .collect();
        forwarded
            .into_iter()
            .rev()
            .find(|a| !self.trusted_proxies.contains(a))
            .unwrap_or(peer)
    }

    /// Whether the session still exists (live streams end with it).
    pub fn alive(&self, session: &str) -> bool {
        let now = Instant::now();
        self.sessions
            .lock()
            .map(|s| s.get(session).is_some_and(|s| s.expires > now))
            .unwrap_or(false)
    }
}

/// The longest a user name waits between sign-in attempts.
pub const USER_DELAY_MAX: Duration = Duration::from_secs(60);
/// Expired rate-limit entries are dropped once this many are kept.
const PRUNE_ABOVE: usize = 1024;

/// The sign-in form's token (login CSRF): the same random value in a
/// cookie `HttpOnly; SameSite=Strict; Path=/login` and in a hidden field.
/// Another site can neither read nor set the cookie, so it cannot forge a
/// sign-in form that a victim's browser would post with a matching pair.
pub const LOGIN_COOKIE: &str = "halosync_login";

/// The `Set-Cookie` value carrying a fresh sign-in token, and the token.
pub fn login_token(headers: &HeaderMap, secure_cookies: bool) -> (String, String) {
    let token = random_token();
    let secure = if secure_cookies || over_tls(headers) {
        "; Secure"
    } else {
        ""
    };
    (
        format!(
            "{LOGIN_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/login; Max-Age=3600{secure}"
        ),
        token,
    )
}

/// Whether a sign-in POST carries the token of its own cookie.
pub fn login_token_ok(headers: &HeaderMap, sent: Option<&str>) -> bool {
    match (cookie(headers, LOGIN_COOKIE), sent) {
        (Some(c), Some(s)) => !c.is_empty() && same(&c, s),
        _ => false,
    }
}

/// Whether the request's `Origin` (when the browser sent one) is this
/// console itself (the `Host` it was asked for). A missing `Origin` is
/// left to the token; `null` or another origin is refused.
pub fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    match url::Url::parse(origin) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => {
            let port = u.port().map(|p| format!(":{p}")).unwrap_or_default();
            u.host_str()
                .is_some_and(|h| format!("{h}{port}").eq_ignore_ascii_case(host))
        }
        _ => false,
    }
}

struct UserFailures {
    count: u32,
    last: Instant,
    next_allowed: Instant,
}

#[derive(Default)]
struct Limits {
    /// Attempts per client address (successes removed), in time order.
    addresses: HashMap<IpAddr, Vec<Instant>>,
    users: HashMap<String, UserFailures>,
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

    fn auth(attempts: u32, proxies: &[&str]) -> Auth {
        let mut s = crate::console::settings::ConsoleSettings::parse(
            Some(
                &toml::from_str("[users.a]\nrole = \"viewer\"\npassword_hash_env = \"H\"\n")
                    .unwrap(),
            ),
            None,
            &Hash,
        )
        .unwrap();
        s.login_attempts = attempts;
        s.trusted_proxies = proxies.iter().map(|p| p.parse().unwrap()).collect();
        Auth::new(&s)
    }

    struct Hash;
    impl crate::console::settings::Env for Hash {
        fn var(&self, _: &str) -> Option<String> {
            static H: std::sync::OnceLock<String> = std::sync::OnceLock::new();
            Some(
                H.get_or_init(|| crate::console::settings::hash_password("pw").unwrap())
                    .clone(),
            )
        }
    }

    #[test]
    fn attempts_are_counted_before_the_check_and_the_address_has_a_hard_limit() {
        let a = auth(5, &[]);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        // 40 at once: only 5 ever get to a password check.
        let allowed = (0..40)
            .filter(|i| a.begin_attempt(&format!("u{i}"), ip).is_ok())
            .count();
        assert_eq!(allowed, 5);
        // Another address is not affected.
        assert!(a.begin_attempt("u0", "192.0.2.2".parse().unwrap()).is_ok());
    }

    #[test]
    fn a_user_name_slows_down_rather_than_locks_out() {
        let a = auth(3, &[]);
        let ips: Vec<IpAddr> = (1..=9)
            .map(|i| format!("198.51.100.{i}").parse().unwrap())
            .collect();
        // Three failures from three addresses: the fourth try waits 1 s.
        for ip in &ips[..3] {
            assert!(a.begin_attempt("alice", *ip).is_ok());
        }
        let wait = a.begin_attempt("alice", ips[3]).unwrap_err();
        assert!((1..=USER_DELAY_MAX.as_secs()).contains(&wait), "{wait}");
        // A success gives the user a clean slate.
        a.succeeded("alice", ips[2]);
        assert!(a.begin_attempt("alice", ips[4]).is_ok());
    }

    #[test]
    fn forwarded_for_is_read_only_from_trusted_proxies() {
        let a = auth(5, &["10.0.0.5"]);
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "6.6.6.6, 203.0.113.9".parse().unwrap());
        let proxy: IpAddr = "10.0.0.5".parse().unwrap();
        let other: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(
            a.client_ip(proxy, &h),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
        assert_eq!(a.client_ip(other, &h), other);
        assert_eq!(a.client_ip(proxy, &HeaderMap::new()), proxy);
    }

    #[test]
    fn the_sign_in_post_checks_origin_and_its_token() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "127.0.0.1:8088".parse().unwrap());
        assert!(same_origin(&h), "no Origin: left to the token");
        h.insert(header::ORIGIN, "http://127.0.0.1:8088".parse().unwrap());
        assert!(same_origin(&h));
        for bad in ["https://evil.example", "null", "http://127.0.0.1:9999"] {
            h.insert(header::ORIGIN, bad.parse().unwrap());
            assert!(!same_origin(&h), "{bad}");
        }
        let (set, token) = login_token(&HeaderMap::new(), false);
        assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict"));
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            format!("{LOGIN_COOKIE}={token}").parse().unwrap(),
        );
        assert!(login_token_ok(&h, Some(&token)));
        assert!(!login_token_ok(&h, Some("x")));
        assert!(!login_token_ok(&h, None));
        assert!(!login_token_ok(&HeaderMap::new(), Some(&token)));
    }
}
