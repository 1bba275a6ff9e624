//! The AMQP side: topology (DESIGN §4), message headers, the confirmed
//! publisher, and the connection helper. The consume loop lives in
//! [`crate::runtime`].

pub mod headers;
pub mod publisher;
pub mod topology;

use lapin::{Connection, ConnectionProperties};

pub use publisher::{PublishError, Publisher};
pub use topology::Topology;

#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    #[error("RabbitMQ: {0}")]
    Lapin(#[from] lapin::Error),
    #[error("topology: {0}")]
    Topology(String),
    /// Connecting failed; the message names RabbitMQ and what to change.
    #[error("{0}")]
    Connect(#[from] crate::tls::ConnectError),
}

/// Opens a connection named `name` (shown by `rabbitmqctl
/// list_connections` and in the management UI) with the configuration's TLS
/// and credentials ([`crate::tls::AmqpAccess`]); the one way halosync
/// connects to RabbitMQ. A failure says that RabbitMQ failed, at which URL
/// (password hidden), and what to change.
///
/// Recovery is done by [`crate::runtime`] rebuilding the connection, not by
/// lapin's auto-recovery: a delivery taken on a lost channel can never be
/// acked on a new one, and the runtime must know about it to stop work that
/// would otherwise be acked into the void.
pub async fn connect_with(
    url: &str,
    access: &crate::tls::AmqpAccess,
    name: &str,
) -> Result<Connection, AmqpError> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    Ok(crate::tls::clients::amqp_connect(url, access, props).await?)
}

/// Hides the password of a broker or Redis URL for messages (see
/// [`crate::tls::redact_url`]).
pub fn redact_url(url: &str) -> String {
    crate::tls::redact_url(url)
}

#[cfg(test)]
mod tests {
    #[test]
    fn redacts_password() {
        assert_eq!(
            super::redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(super::redact_url("amqp://h/%2f"), "amqp://h/%2f");
        assert_eq!(
            super::redact_url("rediss://user:p@ss:w0rd@cache.example:6380/0"),
            "rediss://user:***@cache.example:6380/0"
        );
        assert_eq!(
            super::redact_url("redis://:hunter2@h:6379"),
            "redis://:***@h:6379"
        );
        assert!(!super::redact_url("amqp://u:pw@[bad").contains("pw"));
    }
}
