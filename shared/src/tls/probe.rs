//! A bare TLS handshake with a service, to report what was negotiated
//! (`halosync check`). It trusts what the real client trusts: RabbitMQ and
//! HaloPSA the system store (plus `amqp_ca_file`), Redis `redis_ca_file`
//! alone when set, else the system store; and it presents the configured
//! client certificate to RabbitMQ.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use redis::{ConnectionAddr, IntoConnectionInfo};
use rustls::pki_types::ServerName;
use rustls::RootCertStore;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::clients::amqp_uri;
use super::diagnose::{diagnose, ConnectError, Problem};
use super::files::{read_ca, read_identity};
use super::{AmqpAccess, ClientIdentity, RedisAccess, Service};

/// What a handshake negotiated.
#[derive(Clone, Debug, Serialize)]
pub struct Handshake {
    /// `TLS 1.3`, `TLS 1.2`.
    pub protocol: String,
    pub cipher_suite: String,
    /// `host:port`.
    pub peer: String,
    /// What the server's certificate was verified against.
    pub trusted_via: String,
    /// Whether a client certificate was offered.
    pub client_certificate: bool,
}

/// Where trust comes from.
#[derive(Clone, Debug)]
pub enum Trust {
    /// The system trust store.
    System,
    /// The system store plus these CA certificates.
    SystemAnd(PathBuf),
    /// Only these CA certificates.
    Only(PathBuf),
}

/// A service's address as its URL gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Tls { host: String, port: u16 },
    Plain { address: String },
}

pub fn amqp_endpoint(url: &str) -> Result<Endpoint, ConnectError> {
    let uri = amqp_uri(url, &AmqpAccess::default())?;
    let (host, port) = (uri.authority.host, uri.authority.port);
    Ok(match uri.scheme {
        lapin::uri::AMQPScheme::AMQPS => Endpoint::Tls { host, port },
        lapin::uri::AMQPScheme::AMQP => Endpoint::Plain {
            address: format!("{host}:{port}"),
        },
    })
}

pub fn redis_endpoint(url: &str) -> Result<Endpoint, ConnectError> {
    let info = url.into_connection_info().map_err(|e| {
        ConnectError::new(
            Service::Redis,
            url,
            Problem::Url,
            format!("cannot parse the URL ({e})"),
            "write redis_url as redis://HOST:PORT/DB or rediss://HOST:PORT/DB",
        )
    })?;
    Ok(match info.addr() {
        ConnectionAddr::TcpTls { host, port, .. } => Endpoint::Tls {
            host: host.to_string(),
            port: *port,
        },
        ConnectionAddr::Tcp(host, port) => Endpoint::Plain {
            address: format!("{host}:{port}"),
        },
        other => Endpoint::Plain {
            address: other.to_string(),
        },
    })
}

pub fn https_endpoint(url: &str) -> Result<Endpoint, ConnectError> {
    let u = reqwest::Url::parse(url).map_err(|e| {
        ConnectError::new(
            Service::HaloPsa,
            url,
            Problem::Url,
            e.to_string(),
            "write resource_server as https://TENANT.halopsa.com/api",
        )
    })?;
    let host = u.host_str().unwrap_or_default().to_string();
    let port = u.port_or_known_default().unwrap_or(443);
    Ok(if u.scheme() == "https" {
        Endpoint::Tls { host, port }
    } else {
        Endpoint::Plain {
            address: format!("{host}:{port}"),
        }
    })
}

fn roots(service: Service, trust: &Trust) -> Result<RootCertStore, super::FileError> {
    let mut store = RootCertStore::empty();
    let system = |store: &mut RootCertStore| {
        let found = rustls_native_certs::load_native_certs();
        store.add_parsable_certificates(found.certs);
    };
    match trust {
        Trust::System => system(&mut store),
        Trust::SystemAnd(ca) => {
            system(&mut store);
            store.add_parsable_certificates(read_ca(service, service.ca_key(), ca)?.1);
        }
        Trust::Only(ca) => {
            store.add_parsable_certificates(read_ca(service, service.ca_key(), ca)?.1);
        }
    }
    Ok(store)
}

fn trusted_via(service: Service, trust: &Trust) -> String {
    match trust {
        Trust::System => "the system trust store".into(),
        Trust::SystemAnd(p) => format!(
            "{} = \"{}\" and the system trust store",
            service.ca_key(),
            p.display()
        ),
        Trust::Only(p) => format!("{} = \"{}\"", service.ca_key(), p.display()),
    }
}

fn ca_of(trust: &Trust) -> Option<&Path> {
    match trust {
        Trust::System => None,
        Trust::SystemAnd(p) | Trust::Only(p) => Some(p),
    }
}

/// One TLS handshake with `host:port`; `url` is only used in messages.
pub async fn handshake(
    service: Service,
    url: &str,
    host: &str,
    port: u16,
    trust: &Trust,
    identity: Option<&ClientIdentity>,
    timeout: Duration,
) -> Result<Handshake, ConnectError> {
    let file_err = |e| ConnectError::from_file(url, e);
    let store = roots(service, trust).map_err(file_err)?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| diagnose(service, url, true, ca_of(trust), &e))?
        .with_root_certificates(store);
    let config = match identity {
        Some(id) => {
            let (certs, key) = read_identity(service, id).map_err(file_err)?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| diagnose(service, url, true, ca_of(trust), &e))?
        }
        None => builder.with_no_client_auth(),
    };
    let name = ServerName::try_from(host.to_string()).map_err(|e| {
        ConnectError::new(
            service,
            url,
            Problem::Url,
            format!("{host:?} is not a host name ({e})"),
            format!("fix the host in {}", service.url_key()),
        )
    })?;
    let connect = async {
        let tcp = TcpStream::connect((host, port)).await?;
        TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
    };
    let stream = match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(diagnose(service, url, true, ca_of(trust), &e)),
        Err(_) => {
            let e = std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("TLS handshake timed out after {} s", timeout.as_secs()),
            );
            return Err(diagnose(service, url, true, ca_of(trust), &e));
        }
    };
    let (_, conn) = stream.get_ref();
    let protocol = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLS 1.3".to_string(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLS 1.2".to_string(),
        Some(v) => format!("{v:?}"),
        None => "unknown".to_string(),
    };
    let cipher_suite = conn
        .negotiated_cipher_suite()
        .map(|s| format!("{:?}", s.suite()))
        .unwrap_or_default();
    Ok(Handshake {
        protocol,
        cipher_suite,
        peer: format!("{host}:{port}"),
        trusted_via: trusted_via(service, trust),
        client_certificate: identity.is_some(),
    })
}

/// The handshake with the broker, `Ok(None)` for a plain `amqp://` URL.
pub async fn probe_amqp(
    url: &str,
    access: &AmqpAccess,
    timeout: Duration,
) -> Result<Option<Handshake>, ConnectError> {
    match amqp_endpoint(url)? {
        Endpoint::Plain { .. } => Ok(None),
        Endpoint::Tls { host, port } => {
            let trust = match &access.ca_file {
                Some(p) => Trust::SystemAnd(p.clone()),
                None => Trust::System,
            };
            handshake(
                Service::Broker,
                url,
                &host,
                port,
                &trust,
                access.identity.as_ref(),
                timeout,
            )
            .await
            .map(Some)
        }
    }
}

/// The handshake with Redis, `Ok(None)` for `redis://` or `unix://`.
pub async fn probe_redis(
    url: &str,
    access: &RedisAccess,
    timeout: Duration,
) -> Result<Option<Handshake>, ConnectError> {
    match redis_endpoint(url)? {
        Endpoint::Plain { .. } => Ok(None),
        Endpoint::Tls { host, port } => {
            let trust = match &access.ca_file {
                Some(p) => Trust::Only(p.clone()),
                None => Trust::System,
            };
            handshake(Service::Redis, url, &host, port, &trust, None, timeout)
                .await
                .map(Some)
        }
    }
}

/// The handshake with a HaloPSA server, `Ok(None)` for `http://`.
pub async fn probe_https(url: &str, timeout: Duration) -> Result<Option<Handshake>, ConnectError> {
    match https_endpoint(url)? {
        Endpoint::Plain { .. } => Ok(None),
        Endpoint::Tls { host, port } => handshake(
            Service::HaloPsa,
            url,
            &host,
            port,
            &Trust::System,
            None,
            timeout,
        )
        .await
        .map(Some),
    }
}
