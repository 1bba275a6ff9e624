//! The TLS-aware clients: a `redis::Client` with the CA file and the ACL
//! credentials, and a lapin connection with the CA file, the client
//! certificate and the credentials. `store::connect_with` and
//! `amqp::connect_with` are built on these; nothing else opens a
//! connection to Redis or RabbitMQ from a configured binary.

use lapin::tcp::OwnedTLSConfig;
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Connect, Connection, ConnectionProperties};
use redis::{ConnectionAddr, IntoConnectionInfo};

use super::diagnose::{diagnose, ConnectError, Problem};
use super::files::{lapin_identity, read_ca};
use super::{ensure_crypto_provider, AmqpAccess, RedisAccess, Service};

/// Whether a Redis URL asks for TLS.
pub fn redis_is_tls(url: &str) -> bool {
    url.starts_with("rediss://")
}

/// Whether an AMQP URL asks for TLS.
pub fn amqp_is_tls(url: &str) -> bool {
    url.starts_with("amqps://")
}

/// A Redis client for `url` with `access` applied: credentials set, and
/// for `rediss://` with a CA file, only that CA trusted.
pub fn redis_client(url: &str, access: &RedisAccess) -> Result<redis::Client, ConnectError> {
    ensure_crypto_provider();
    let bad_url = |e: redis::RedisError| {
        // redis' parse errors do not quote the URL; ours shows it redacted.
        ConnectError::new(
            Service::Redis,
            url,
            Problem::Url,
            format!("cannot parse the URL ({e})"),
            "write redis_url as redis://HOST:PORT/DB or rediss://[USER@]HOST:PORT/DB (password in redis_password_env / redis_password_file)",
        )
    };
    let info = url.into_connection_info().map_err(bad_url)?;
    let mut settings = info.redis_settings().clone();
    if let Some(user) = &access.username {
        settings = settings.set_username(user);
    }
    if let Some(password) = &access.password {
        settings = settings.set_password(password.expose());
    }
    let is_tls = matches!(info.addr(), ConnectionAddr::TcpTls { .. });
    let info = info.set_redis_settings(settings);
    match (&access.ca_file, is_tls) {
        (Some(ca), true) => {
            let (pem, _) = read_ca(Service::Redis, "redis_ca_file", ca)
                .map_err(|e| ConnectError::from_file(url, e))?;
            redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.into_bytes()),
                },
            )
            .map_err(|e| diagnose(Service::Redis, url, true, Some(ca), &e))
        }
        _ => redis::Client::open(info).map_err(bad_url),
    }
}

/// The URL with `access`'s credentials put in (lapin takes them from the URL).
pub fn amqp_uri(url: &str, access: &AmqpAccess) -> Result<AMQPUri, ConnectError> {
    let mut uri: AMQPUri = url.parse().map_err(|e: String| {
        // amq-protocol's parse error quotes nothing secret, but keep it short.
        ConnectError::new(
            Service::Broker,
            url,
            Problem::Url,
            format!("cannot parse the URL ({})", crate::error::excerpt(&e, 120)),
            "write amqp_url as amqp://USER:PASSWORD@HOST:5672/VHOST or amqps://USER@HOST:5671/VHOST (%2f is the default vhost \"/\")",
        )
    })?;
    if let Some(user) = &access.username {
        uri.authority.userinfo.username = user.clone();
    }
    if let Some(password) = &access.password {
        uri.authority.userinfo.password = password.expose().to_string();
    }
    Ok(uri)
}

/// The lapin TLS settings for `access` (files read now).
pub fn amqp_tls(url: &str, access: &AmqpAccess) -> Result<OwnedTLSConfig, ConnectError> {
    let mut tls = OwnedTLSConfig::default();
    if let Some(ca) = &access.ca_file {
        let (pem, _) = read_ca(Service::Broker, "amqp_ca_file", ca)
            .map_err(|e| ConnectError::from_file(url, e))?;
        tls.cert_chain = Some(pem);
    }
    if let Some(identity) = &access.identity {
        tls.identity = Some(lapin_identity(identity).map_err(|e| ConnectError::from_file(url, e))?);
    }
    Ok(tls)
}

/// Opens a lapin connection with `access` applied.
pub async fn amqp_connect(
    url: &str,
    access: &AmqpAccess,
    props: ConnectionProperties,
) -> Result<Connection, ConnectError> {
    ensure_crypto_provider();
    let uri = amqp_uri(url, access)?;
    let is_tls = uri.scheme == AMQPScheme::AMQPS;
    let tls = amqp_tls(url, access)?;
    let runtime = lapin::runtime::default_runtime()
        .map_err(|e| diagnose(Service::Broker, url, is_tls, access.ca_file.as_deref(), &e))?;
    uri.connect_with_config(props, tls, runtime)
        .await
        .map_err(|e| diagnose(Service::Broker, url, is_tls, access.ca_file.as_deref(), &e))
}
