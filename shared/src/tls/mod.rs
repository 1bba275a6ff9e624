//! TLS and credentials for RabbitMQ and Redis (and the HaloPSA handshake
//! probe of `halosync check`).
//!
//! Managed brokers and caches (Azure Cache for Redis, ElastiCache with
//! in-transit encryption, Memorystore, Amazon MQ, CloudAMQP) speak TLS only,
//! often with a private CA and ACL users. This module is the one place that
//! knows how to reach them:
//!
//! * [`files`]: reading CA files and client identities (PEM or PKCS#12),
//!   with errors that name the service, the config key and the file;
//! * [`clients`]: the TLS-aware `redis::Client` and lapin connection every
//!   binary uses (`store::connect_with`, `amqp::connect_with`);
//! * [`diagnose`]: turning a failed connection into a [`ConnectError`] that
//!   says which service failed and what to change (e.g. "set redis_ca_file to
//!   the CA that signed the server's certificate");
//! * [`probe`]: a bare TLS handshake that reports the protocol version, for
//!   `halosync check`;
//! * [`redact_url`]: URLs without their passwords, for every message.
//!
//! Files are read again at every (re)connect, so that a rotated certificate
//! is picked up without a restart; the configuration checks them once at
//! start so that a wrong path stops the binary with the key named.

pub mod clients;
pub mod diagnose;
pub mod files;
pub mod probe;

use std::fmt;
use std::path::PathBuf;

use crate::config::Secret;

pub use diagnose::{ConnectError, Problem};
pub use files::FileError;

/// A service halosync connects to, as operators know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Service {
    Redis,
    #[serde(rename = "RabbitMQ")]
    Broker,
    #[serde(rename = "HaloPSA")]
    HaloPsa,
}

impl Service {
    pub fn name(self) -> &'static str {
        match self {
            Service::Redis => "Redis",
            Service::Broker => "RabbitMQ",
            Service::HaloPsa => "HaloPSA",
        }
    }

    /// The config key of this service's CA file.
    pub fn ca_key(self) -> &'static str {
        match self {
            Service::Redis => "redis_ca_file",
            Service::Broker => "amqp_ca_file",
            Service::HaloPsa => "(the system trust store)",
        }
    }

    /// The config key of this service's URL.
    pub fn url_key(self) -> &'static str {
        match self {
            Service::Redis => "redis_url",
            Service::Broker => "amqp_url",
            Service::HaloPsa => "resource_server",
        }
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How to reach Redis beyond its URL: the CA to trust for `rediss://` and
/// the ACL user's credentials (the password from an env var or a file, so
/// that it need not sit in the URL).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RedisAccess {
    /// PEM CA certificate(s); with it, only these are trusted (as
    /// `redis-cli --cacert` does); without it, the system trust store.
    pub ca_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<Secret>,
}

/// How to reach RabbitMQ beyond its URL: extra CA, client certificate,
/// and credentials.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AmqpAccess {
    /// PEM CA certificate(s), trusted in addition to the system trust store
    /// (lapin's platform verifier).
    pub ca_file: Option<PathBuf>,
    pub identity: Option<ClientIdentity>,
    pub username: Option<String>,
    pub password: Option<Secret>,
}

/// A client certificate for mutual TLS.
#[derive(Clone, Debug, PartialEq)]
pub enum ClientIdentity {
    /// A PEM certificate chain and its PEM private key (PKCS#8, PKCS#1 or SEC1).
    Pem {
        cert_file: PathBuf,
        key_file: PathBuf,
    },
    /// A PKCS#12 bundle (`.p12` / `.pfx`) and its password.
    Pkcs12 { file: PathBuf, password: Secret },
}

/// Makes sure rustls has its process-wide crypto provider (aws-lc-rs, the
/// one lapin and reqwest already use). The redis crate builds its TLS
/// config with the process default, which is ambiguous should another
/// dependency ever enable a second provider; installing ours first keeps it
/// deterministic. Idempotent.
pub fn ensure_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Err only means another thread installed one first: fine.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    }
}

/// The URL with every password hidden, for messages and logs:
/// `scheme://user:***@host/...`, and `password=`/`pass=`/`token=` query
/// values as `***`. Parsed with the `url` crate (so `@` or `:` inside a
/// password cannot fool it); what it cannot parse as a URL with a host is
/// cut down to what follows its last `@`, behind `***@`, so that no part of
/// an unparseable userinfo is ever shown.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.has_host() => {
            if u.password().is_some() {
                // Only fails for URLs that cannot carry a password at all.
                let _ = u.set_password(Some("***"));
            }
            if u.query().is_some() {
                let pairs: Vec<(String, String)> = u
                    .query_pairs()
                    .map(|(k, v)| {
                        let secret = ["password", "pass", "pwd", "secret", "token"]
                            .iter()
                            .any(|s| k.eq_ignore_ascii_case(s));
                        let v = if secret { "***".into() } else { v.into_owned() };
                        (k.into_owned(), v)
                    })
                    .collect();
                u.query_pairs_mut().clear().extend_pairs(pairs);
            }
            u.to_string()
        }
        _ => match url.rsplit_once('@') {
            Some((before, host)) => {
                let scheme = before
                    .split_once("://")
                    .map(|(s, _)| format!("{s}://"))
                    .unwrap_or_default();
                format!("{scheme}***@{}", redact_query_text(host))
            }
            None if url.contains("://") => redact_query_text(url),
            None => "<not a URL>".to_string(),
        },
    }
}

/// For text that is not a URL: drops everything after a `?` (it may hold
/// a password parameter).
fn redact_query_text(text: &str) -> String {
    match text.split_once('?') {
        Some((before, _)) => format!("{before}?***"),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_never_leaks_a_password() {
        let cases = [
            (
                "amqp://guest:hunter2@127.0.0.1:5672/%2f",
                "amqp://guest:***@127.0.0.1:5672/%2f",
            ),
            (
                "amqps://u:hunter2@mq.example:5671/vh",
                "amqps://u:***@mq.example:5671/vh",
            ),
            (
                "rediss://:hunter2@cache.example:6380/0",
                "rediss://:***@cache.example:6380/0",
            ),
            (
                "rediss://halosync:hunter2@cache.example:6380/0",
                "rediss://halosync:***@cache.example:6380/0",
            ),
            ("rediss://u:hun@ter2@h:6380/0", "rediss://u:***@h:6380/0"),
            ("rediss://u:hun:ter2@h:6380/0", "rediss://u:***@h:6380/0"),
            ("rediss://u:hun/ter2@h:6380/0", "rediss://***@h:6380/0"),
            (
                "redis://h:6379/0?password=hunter2&protocol=resp3",
                "redis://h:6379/0?password=***&protocol=resp3",
            ),
            ("u:hunter2@h", "***@h"),
            ("hunter2@h", "***@h"),
        ];
        for (url, want) in cases {
            let got = redact_url(url);
            assert_eq!(got, want, "{url}");
            assert!(
                !got.contains("hunter2") && !got.contains("ter2"),
                "{url} -> {got}"
            );
        }
    }

    #[test]
    fn urls_without_secrets_are_unchanged() {
        for url in [
            "amqp://127.0.0.1:5672/%2f",
            "rediss://cache.example:6380/0",
            "unix:///run/redis.sock",
            "https://acme.halopsa.com/api",
            "rediss://halosync@cache.example:6380/0",
        ] {
            assert_eq!(redact_url(url), url);
        }
    }

    #[test]
    fn services_name_their_keys() {
        assert_eq!(Service::Redis.ca_key(), "redis_ca_file");
        assert_eq!(Service::Broker.ca_key(), "amqp_ca_file");
        assert_eq!(Service::Broker.to_string(), "RabbitMQ");
    }
}
