//! The transport part of `halosync check`: for RabbitMQ, Redis and the
//! HaloPSA connection, the TLS handshake (protocol version and cipher
//! suite, what the certificate was verified against, or "not TLS"), then a
//! real login through the same code the workers use, so that a wrong CA, a
//! refused client certificate or a wrong password each show up as a ✘ with
//! the service named and the key to fix.

use std::path::Path;
use std::time::Duration;

use halosync_shared::config::ConnectionConfig;
use halosync_shared::tls::probe::{self, Handshake};
use halosync_shared::tls::{clients, redact_url, ConnectError};
use halosync_shared::{amqp, store, Config};

use super::item::Item;
use crate::settings::{self, Need};

const TIMEOUT: Duration = Duration::from_secs(10);

/// One item per service, in the order RabbitMQ, Redis, HaloPSA.
pub async fn items(config_path: Option<&Path>, conn: &ConnectionConfig) -> Vec<Item> {
    let config = match settings::load(config_path, Need::NoConnections) {
        Ok(l) => l.config,
        Err(e) => {
            return vec![Item {
                check: "transport".into(),
                ok: Some(false),
                summary: format!("transport: {e:#}"),
                advice: Some(
                    "fix the key named above in halosync.toml, then run the check again".into(),
                ),
                ..Default::default()
            }]
        }
    };
    vec![
        broker(&config).await,
        redis(&config).await,
        halopsa(conn).await,
    ]
}

fn failed(check: &str, e: &ConnectError) -> Item {
    Item {
        check: check.into(),
        ok: Some(false),
        summary: format!("{} at {}: {}", e.service, e.url, e.detail),
        advice: Some(e.advice.clone()),
        ..Default::default()
    }
}

fn passed(check: &str, summary: String, notes: Vec<String>) -> Item {
    Item {
        check: check.into(),
        ok: Some(true),
        summary,
        notes,
        ..Default::default()
    }
}

fn describe(h: &Handshake) -> String {
    format!(
        "{} ({}) with {}, certificate verified against {}{}",
        h.protocol,
        h.cipher_suite,
        h.peer,
        h.trusted_via,
        if h.client_certificate {
            ", client certificate presented"
        } else {
            ""
        }
    )
}

fn plain_note(service: &str, scheme: &str, key: &str) -> String {
    format!("ℹ traffic to {service} is not encrypted; outside a private network use {scheme} (and {key} for a private CA)")
}

async fn broker(config: &Config) -> Item {
    let url = &config.amqp_url;
    let access = &config.amqp_access;
    let handshake = match probe::probe_amqp(url, access, TIMEOUT).await {
        Ok(h) => h,
        Err(e) => return failed("RabbitMQ", &e),
    };
    let user = clients::amqp_uri(url, access)
        .map(|u| u.authority.userinfo.username)
        .unwrap_or_default();
    match amqp::connect_with(url, access, "halosync-cli:check").await {
        Ok(c) => {
            let _ = c.close(200, "check done".into()).await;
        }
        Err(amqp::AmqpError::Connect(e)) => return failed("RabbitMQ", &e),
        Err(e) => {
            return Item {
                check: "RabbitMQ".into(),
                ok: Some(false),
                summary: format!("RabbitMQ at {}: {e}", redact_url(url)),
                advice: Some("check amqp_url and the broker's log".into()),
                ..Default::default()
            }
        }
    }
    match handshake {
        Some(h) => passed(
            "RabbitMQ",
            format!("RabbitMQ: {}; logged in as {user}", describe(&h)),
            vec![],
        ),
        None => passed(
            "RabbitMQ",
            format!(
                "RabbitMQ: not TLS ({}); logged in as {user}",
                redact_url(url)
            ),
            vec![plain_note("RabbitMQ", "amqps://", "amqp_ca_file")],
        ),
    }
}

async fn redis(config: &Config) -> Item {
    let url = &config.redis_url;
    let access = &config.redis_access;
    let handshake = match probe::probe_redis(url, access, TIMEOUT).await {
        Ok(h) => h,
        Err(e) => return failed("Redis", &e),
    };
    let mut r = match store::connect_with(url, access).await {
        Ok(r) => r,
        Err(e) => return failed("Redis", &e),
    };
    if let Err(e) = redis::cmd("PING").query_async::<String>(&mut r).await {
        let e = halosync_shared::tls::diagnose::diagnose(
            halosync_shared::tls::Service::Redis,
            url,
            clients::redis_is_tls(url),
            access.ca_file.as_deref(),
            &e,
        );
        return failed("Redis", &e);
    }
    let user = access
        .username
        .clone()
        .or_else(|| {
            reqwest::Url::parse(url)
                .ok()
                .map(|u| u.username().to_string())
                .filter(|u| !u.is_empty())
        })
        .unwrap_or_else(|| "default".into());
    match handshake {
        Some(h) => passed(
            "Redis",
            format!("Redis: {}; PING answered as user {user}", describe(&h)),
            vec![],
        ),
        None => passed(
            "Redis",
            format!(
                "Redis: not TLS ({}); PING answered as user {user}",
                redact_url(url)
            ),
            vec![plain_note("Redis", "rediss://", "redis_ca_file")],
        ),
    }
}

async fn halopsa(conn: &ConnectionConfig) -> Item {
    let mut notes = Vec::new();
    let mut parts = Vec::new();
    let mut servers = vec![("resource_server", conn.resource_server.as_str())];
    let host = |u: &str| {
        reqwest::Url::parse(u)
            .ok()
            .map(|u| (u.host_str().map(str::to_string), u.port_or_known_default()))
    };
    if host(&conn.auth_server) != host(&conn.resource_server) {
        servers.push(("auth_server", conn.auth_server.as_str()));
    }
    for (key, url) in servers {
        match probe::probe_https(url, TIMEOUT).await {
            Ok(Some(h)) => parts.push(format!("{key} {}", describe(&h))),
            Ok(None) => {
                parts.push(format!("{key} not TLS ({url})"));
                notes.push(format!("⚠ {key} is plain HTTP: fine for halo-sim or a lab, but a real HaloPSA is https:// only"));
            }
            Err(e) => {
                let mut item = failed("HaloPSA", &e);
                item.advice = Some(format!("{} (connection {}, {key})", e.advice, conn.name));
                return item;
            }
        }
    }
    let summary = match parts.as_slice() {
        [one] if one.starts_with("resource_server not TLS") => {
            format!("HaloPSA: not TLS ({})", conn.resource_server)
        }
        _ => format!("HaloPSA: {}", parts.join("; ")),
    };
    passed("HaloPSA", summary, notes)
}
