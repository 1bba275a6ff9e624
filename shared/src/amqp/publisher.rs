//! The confirmed publisher: every publish waits for the broker's confirm,
//! with the mandatory flag, so that a message is either safely stored or
//! the caller knows it is not.
//!
//! This is also the public API for Rust programs that publish events:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use halosync_shared::amqp::Publisher;
//! use halosync_shared::contract::Contract;
//!
//! // TLS and credentials as in halosync.toml (here: none beyond the URL).
//! let access = halosync_shared::tls::AmqpAccess::default();
//! let publisher = Publisher::connect("amqp://guest:guest@127.0.0.1:5672/%2f", &access, "", "billing").await?;
//! let contract = Contract::new()?;
//! let body = br#"{"id":"evt_1","type":"account.created","schema_version":1,
//!   "connection":"acme","occurred_at":"2026-11-22T10:15:00Z","sequence":1,
//!   "data":{"account_id":"acc_1","name":"Contoso Ltd","active":true}}"#;
//! let event = contract.validate(body, 256 * 1024)?; // the same schemas as the workers
//! publisher.publish_event(&event).await?;        // returns once the broker confirmed it
//! # Ok(()) }
//! ```

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection, PublisherConfirm};

use super::headers;
use super::topology::Topology;
use crate::contract::Envelope;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("RabbitMQ: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the broker refused (nacked) the message to {exchange}/{routing_key}")]
    Nacked {
        exchange: String,
        routing_key: String,
    },
    #[error("the broker returned the message to {exchange}/{routing_key} as unroutable: {reply}")]
    Returned {
        exchange: String,
        routing_key: String,
        reply: String,
    },
    #[error("cannot serialise the event: {0}")]
    Serialise(String),
    #[error("{0}")]
    Topology(String),
    /// Connecting failed: says what to change.
    #[error("{0}")]
    Connect(#[from] crate::tls::ConnectError),
}

/// A channel in confirm mode.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
    topology: Topology,
    /// Kept alive while the publisher lives (when it owns its connection).
    _connection: Option<std::sync::Arc<Connection>>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("topology", &self.topology)
            .finish()
    }
}

impl Publisher {
    /// Connects with the configuration's TLS and credentials (`access`),
    /// opens a confirm channel and declares the topology.
    pub async fn connect(
        amqp_url: &str,
        access: &crate::tls::AmqpAccess,
        prefix: &str,
        name: &str,
    ) -> Result<Publisher, PublishError> {
        let connection = match super::connect_with(
            amqp_url,
            access,
            &format!("halosync-publisher:{name}"),
        )
        .await
        {
            Ok(c) => c,
            Err(super::AmqpError::Lapin(e)) => return Err(PublishError::Broker(e)),
            Err(super::AmqpError::Connect(e)) => return Err(PublishError::Connect(e)),
            Err(super::AmqpError::Topology(t)) => return Err(PublishError::Topology(t)),
        };
        let channel = connection.create_channel().await?;
        // Exchanges, work and dead queues; the retry tiers are the workers'.
        let topology = Topology::new(prefix, &[]);
        topology
            .declare(&channel)
            .await
            .map_err(|e| PublishError::Topology(e.to_string()))?;
        let mut p = Publisher::on_channel(channel, topology).await?;
        p._connection = Some(std::sync::Arc::new(connection));
        Ok(p)
    }

    /// Uses an existing channel (put into confirm mode here).
    pub async fn on_channel(
        channel: Channel,
        topology: Topology,
    ) -> Result<Publisher, PublishError> {
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Publisher {
            channel,
            topology,
            _connection: None,
        })
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Publishes one event to `halosync.events` with the contract's
    /// properties (DESIGN §1) and waits for the confirm.
    pub async fn publish_event(&self, event: &Envelope) -> Result<(), PublishError> {
        let body = serde_json::to_vec(event).map_err(|e| PublishError::Serialise(e.to_string()))?;
        self.publish_raw(&event.id, &event.event_type, &body, FieldTable::default())
            .await
    }

    /// Publishes a body (already validated) with extra headers.
    pub async fn publish_raw(
        &self,
        event_id: &str,
        event_type: &str,
        body: &[u8],
        headers: FieldTable,
    ) -> Result<(), PublishError> {
        let props = event_properties(event_id, event_type, headers);
        self.publish_to(&self.topology.events_exchange(), event_type, body, props)
            .await
    }

    /// Publishes to any exchange (`""` addresses a queue by name) and waits
    /// for the broker's confirm; a nack or a return is an error.
    pub async fn publish_to(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        self.start_publish(exchange, routing_key, body, properties)
            .await?
            .confirmed()
            .await
    }

    /// Sends a publish without waiting for its confirm, so that many can be
    /// in flight (a replay of thousands of dead letters would otherwise
    /// wait one broker round trip and disk sync per message); await
    /// [`Pending::confirmed`] before treating it as published.
    pub async fn start_publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<Pending, PublishError> {
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                properties,
            )
            .await?;
        Ok(Pending {
            confirm,
            exchange: exchange.to_string(),
            routing_key: routing_key.to_string(),
        })
    }
}

/// A publish sent, its confirm not yet awaited.
pub struct Pending {
    confirm: PublisherConfirm,
    exchange: String,
    routing_key: String,
}

impl Pending {
    /// Waits for the broker's confirm; a nack or a return is an error.
    pub async fn confirmed(self) -> Result<(), PublishError> {
        let (exchange, routing_key) = (self.exchange.as_str(), self.routing_key.as_str());
        let confirm = self.confirm.await?;
        match confirm {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(returned)) => Err(PublishError::Returned {
                exchange: exchange.to_string(),
                routing_key: routing_key.to_string(),
                reply: format!("{} {}", returned.reply_code, returned.reply_text.as_str()),
            }),
            Confirmation::Nack(_) => Err(PublishError::Nacked {
                exchange: exchange.to_string(),
                routing_key: routing_key.to_string(),
            }),
        }
    }
}

/// The AMQP properties of an event message (DESIGN §1).
pub fn event_properties(
    event_id: &str,
    event_type: &str,
    mut headers: FieldTable,
) -> BasicProperties {
    if !headers.contains_key(headers::TRACEPARENT) {
        if let Some((tp, ts)) = crate::telemetry::current_traceparent() {
            headers::set_str(&mut headers, headers::TRACEPARENT, &tp);
            if let Some(ts) = ts {
                headers::set_str(&mut headers, headers::TRACESTATE, &ts);
            }
        }
    }
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(event_id.into())
        .with_type(event_type.into())
        .with_headers(headers)
}
