//! From a failed connection to what the operator must change.
//!
//! The libraries report a bad CA as `invalid peer certificate:
//! UnknownIssuer` somewhere down an error chain (lapin → io::Error →
//! rustls::Error; redis → io::Error → rustls::Error). [`diagnose`] finds the
//! rustls error by type where the chain exposes it, falls back to the text
//! where it does not, and names the service, the URL (without password),
//! the CA file in use and the key to set.

use std::error::Error as StdError;
use std::path::Path;

use rustls::{AlertDescription, CertificateError, InvalidMessage};

use super::{redact_url, FileError, Service};

/// What went wrong, for callers that react (and for `halosync check`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Problem {
    /// A configured TLS file cannot be used.
    File,
    /// The server's certificate is not signed by a trusted CA.
    UntrustedCertificate,
    /// The certificate does not name the host in the URL.
    WrongHostName,
    /// The certificate expired or is not valid yet.
    CertificateExpired,
    /// The server wants a (valid) client certificate.
    ClientCertificateRefused,
    /// TLS was expected but the server does not speak it (or the other way).
    NotTls,
    /// Nothing listens there.
    Refused,
    /// Wrong user or password.
    Authentication,
    /// No answer in time.
    Timeout,
    /// The URL cannot be used.
    Url,
    Other,
}

/// A connection to RabbitMQ or Redis that failed, explained.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{service} at {url}: {detail}; {advice}")]
pub struct ConnectError {
    pub service: Service,
    /// The URL with its password hidden.
    pub url: String,
    pub problem: Problem,
    /// What happened (the libraries' text, never a secret).
    pub detail: String,
    /// What to change.
    pub advice: String,
}

impl ConnectError {
    /// Whether waiting can fix it: nothing listening, no answer in time,
    /// or an unexplained I/O failure. A wrong CA, host name, certificate,
    /// password, URL or file is a configuration mistake instead.
    pub fn is_outage(&self) -> bool {
        matches!(
            self.problem,
            Problem::Refused | Problem::Timeout | Problem::Other
        )
    }

    pub fn new(
        service: Service,
        url: &str,
        problem: Problem,
        detail: impl Into<String>,
        advice: impl Into<String>,
    ) -> Self {
        ConnectError {
            service,
            url: redact_url(url),
            problem,
            detail: detail.into(),
            advice: advice.into(),
        }
    }

    pub fn from_file(url: &str, e: FileError) -> Self {
        let key = e.key;
        ConnectError::new(
            e.service,
            url,
            Problem::File,
            e.to_string(),
            format!("fix {key} in halosync.toml (or its environment override)"),
        )
    }
}

/// Every message of the chain, including the errors wrapped in an
/// `io::Error` (whose `source()` skips them).
fn chain<'a>(err: &'a (dyn StdError + 'static)) -> Vec<&'a (dyn StdError + 'static)> {
    let mut out = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        out.push(e);
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            out.push(inner);
            next = inner.source();
        } else {
            next = e.source();
        }
    }
    out
}

fn rustls_error<'a>(links: &[&'a (dyn StdError + 'static)]) -> Option<&'a rustls::Error> {
    links.iter().find_map(|e| e.downcast_ref::<rustls::Error>())
}

/// The chain as one line, each message once.
fn text(links: &[&(dyn StdError + 'static)]) -> String {
    let mut parts: Vec<String> = Vec::new();
    for e in links {
        let s = e.to_string();
        if parts.iter().any(|p| p.contains(&s)) {
            continue;
        }
        parts.retain(|p| !s.contains(p.as_str()));
        parts.push(s);
    }
    parts.join(": ")
}

fn classify(rustls: Option<&rustls::Error>, text: &str) -> Problem {
    use CertificateError as C;
    match rustls {
        Some(rustls::Error::InvalidCertificate(c)) => match c {
            C::UnknownIssuer | C::BadSignature => Problem::UntrustedCertificate,
            C::NotValidForName | C::NotValidForNameContext { .. } => Problem::WrongHostName,
            C::Expired
            | C::ExpiredContext { .. }
            | C::NotValidYet
            | C::NotValidYetContext { .. } => Problem::CertificateExpired,
            _ => Problem::UntrustedCertificate,
        },
        Some(rustls::Error::AlertReceived(
            AlertDescription::CertificateRequired
            | AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::HandshakeFailure
            | AlertDescription::CertificateUnknown,
        )) => Problem::ClientCertificateRefused,
        Some(rustls::Error::InvalidMessage(InvalidMessage::InvalidContentType)) => Problem::NotTls,
        _ => classify_text(text),
    }
}

fn classify_text(text: &str) -> Problem {
    let t = text.to_ascii_lowercase();
    let has = |s: &str| t.contains(s);
    if has("unknownissuer") || has("unknown issuer") || has("badsignature") {
        Problem::UntrustedCertificate
    } else if has("notvalidforname") || has("not valid for name") {
        Problem::WrongHostName
    } else if has("expired") || has("notvalidyet") {
        Problem::CertificateExpired
    } else if has("certificaterequired")
        || has("certificate required")
        || has("badcertificate")
        || has("unknownca")
    {
        Problem::ClientCertificateRefused
    } else if has("invalidcontenttype") || has("corrupt message") || has("wrong version number") {
        Problem::NotTls
    } else if has("wrongpass")
        || has("noauth")
        || has("access_refused")
        || has("access-refused")
        || has("authentication")
        || has("login was refused")
    {
        Problem::Authentication
    } else if has("connection refused") {
        Problem::Refused
    } else if has("timed out") || has("timeout") {
        Problem::Timeout
    } else {
        Problem::Other
    }
}

/// Where the trust comes from, for messages.
fn trust(service: Service, ca_file: Option<&Path>) -> String {
    match ca_file {
        Some(p) => format!("{} = \"{}\"", service.ca_key(), p.display()),
        None => "the system trust store".to_string(),
    }
}

fn plain_scheme(service: Service) -> &'static str {
    match service {
        Service::Redis => "redis://",
        Service::Broker => "amqp://",
        Service::HaloPsa => "http://",
    }
}

fn tls_scheme(service: Service) -> &'static str {
    match service {
        Service::Redis => "rediss://",
        Service::Broker => "amqps://",
        Service::HaloPsa => "https://",
    }
}

/// Explains a failed connection. `ca_file` is the CA file in use (if any),
/// `tls` whether the URL asked for TLS.
pub fn diagnose(
    service: Service,
    url: &str,
    tls: bool,
    ca_file: Option<&Path>,
    err: &(dyn StdError + 'static),
) -> ConnectError {
    let links = chain(err);
    let rustls = rustls_error(&links);
    let detail = text(&links);
    let problem = classify(rustls, &detail);
    let key = service.ca_key();
    let url_key = service.url_key();
    let advice = match problem {
        Problem::UntrustedCertificate => match ca_file {
            Some(p) => format!(
                "TLS handshake failed: the server's certificate is not signed by the CA in {key} = \"{}\"; set {key} to the CA that signed the server's certificate (PEM)",
                p.display()
            ),
            None => format!(
                "TLS handshake failed: the server's certificate is not signed by a CA in the system trust store; set {key} to the CA that signed the server's certificate (PEM)"
            ),
        },
        Problem::WrongHostName => format!(
            "TLS handshake failed: the server's certificate does not name the host in {url_key}; use the host name the certificate was issued for (in {url_key}), or reissue the certificate with this host in its subject alternative names"
        ),
        Problem::CertificateExpired => format!(
            "TLS handshake failed: the server's certificate has expired or is not valid yet (trusted via {}); renew it on the server, and check this machine's clock",
            trust(service, ca_file)
        ),
        Problem::ClientCertificateRefused => match service {
            Service::Broker => "TLS handshake failed: the broker refused our client certificate (or wants one); set amqp_client_cert_file + amqp_client_key_file (or amqp_client_pkcs12_file) to a certificate signed by the CA the broker trusts".to_string(),
            _ => format!("TLS handshake failed: the server refused the connection at the TLS level; it may want a client certificate, or not accept this TLS version (trusted via {})", trust(service, ca_file)),
        },
        Problem::NotTls if tls => format!(
            "the server does not speak TLS on this port; use its TLS port, or {} if it really is plain-text",
            plain_scheme(service)
        ),
        Problem::NotTls => format!(
            "the server expects TLS on this port; use {} in {url_key}",
            tls_scheme(service)
        ),
        Problem::Authentication => match service {
            Service::Redis => "Redis refused the credentials; check the ACL user (redis_username or the user in redis_url) and the password (redis_password_env / redis_password_file or the URL)".to_string(),
            _ => "RabbitMQ refused the login; check the user and password (in amqp_url, or amqp_username and amqp_password_env / amqp_password_file) and that the user may use this virtual host".to_string(),
        },
        Problem::Refused => format!(
            "nothing accepts connections there: is {service} running? Set {url_key} (or its environment variable) to its address{}",
            if tls { "" } else { ", and use the TLS scheme if it only listens for TLS" }
        ),
        Problem::Timeout if tls => format!(
            "no answer in time: check the host and port in {url_key} and the firewall; a server that does not speak TLS on this port stays silent like this too (then use its TLS port, or {})",
            plain_scheme(service)
        ),
        Problem::Timeout => format!(
            "no answer in time: check the host and port in {url_key}, the firewall, and whether the server only speaks TLS (then use {})",
            tls_scheme(service)
        ),
        Problem::File | Problem::Url => format!("fix {url_key} or the TLS keys in halosync.toml"),
        Problem::Other if !tls => format!(
            "check {url_key}; if {service} only accepts TLS, use {} (a plain-text client talking to a TLS port is dropped like this)",
            tls_scheme(service)
        ),
        Problem::Other => format!("check {url_key} and the TLS settings (trusted via {})", trust(service, ca_file)),
    };
    ConnectError::new(service, url, problem, detail, advice)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_issuer_inside_io_errors_names_service_and_ca_file() {
        let inner = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, inner);
        let e = diagnose(
            Service::Redis,
            "rediss://u:hunter2@cache:6380/0",
            true,
            Some(Path::new("/etc/halosync/redis-ca.pem")),
            &io,
        );
        assert_eq!(e.problem, Problem::UntrustedCertificate);
        let msg = e.to_string();
        assert!(
            msg.starts_with("Redis at rediss://u:***@cache:6380/0"),
            "{msg}"
        );
        assert!(
            msg.contains("set redis_ca_file to the CA that signed the server's certificate"),
            "{msg}"
        );
        assert!(msg.contains("/etc/halosync/redis-ca.pem"), "{msg}");
        assert!(!msg.contains("hunter2"), "{msg}");
    }

    #[test]
    fn text_only_errors_are_classified_too() {
        let io = std::io::Error::other("IO error: invalid peer certificate: UnknownIssuer");
        let e = diagnose(Service::Broker, "amqps://h:5671/%2f", true, None, &io);
        assert_eq!(e.problem, Problem::UntrustedCertificate);
        assert!(e.to_string().contains("set amqp_ca_file"), "{e}");
        let io = std::io::Error::other("Connection refused (os error 111)");
        let e = diagnose(Service::Broker, "amqp://h:5672/%2f", false, None, &io);
        assert_eq!(e.problem, Problem::Refused);
        assert!(e.to_string().contains("is RabbitMQ running"), "{e}");
    }
}
