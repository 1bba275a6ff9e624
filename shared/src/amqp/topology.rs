//! Names and declaration of every exchange and queue (DESIGN §4).
//!
//! ```text
//! publishers ──► {p}halosync.events (topic) ──account.*──► {p}halosync.account ──► worker
//!                      │ alternate exchange                   ▲          │
//!                      ▼                                      │ TTL      ├─ retry ─► {p}halosync.account.retry.5s
//!                {p}halosync.unrouted (fanout)                └──────────┘
//!                      ▼                                                 └─ dead ──► {p}halosync.account.dead
//!                {p}halosync.unrouted (queue)
//! ```
//!
//! Everything is a durable quorum queue, except the activity log
//! `{p}halosync.activity`, a stream with a 30-day max-age
//! ([`crate::activity`]). Delay queues are named after their
//! delay, so that changing the retry tiers adds queues rather than clashing
//! with the arguments of existing ones. Retry and dead-letter copies are
//! published by the worker to the default exchange, addressed by queue name.
//! The work queue's own dead-letter target (used by the broker for poison
//! messages past `x-delivery-limit`) is the family's dead queue.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};

use super::AmqpError;
use crate::contract::Family;

/// Deliveries of one message (crashes of the worker holding it) before the
/// broker dead-letters it as poison.
pub const DELIVERY_LIMIT: i64 = 10;

#[derive(Clone, Debug)]
pub struct Topology {
    prefix: String,
    /// Retry tier delays in milliseconds.
    delays_ms: Vec<u64>,
}

impl Topology {
    pub fn new(prefix: &str, delays_ms: &[u64]) -> Topology {
        Topology {
            prefix: prefix.to_string(),
            delays_ms: delays_ms.to_vec(),
        }
    }

    pub fn events_exchange(&self) -> String {
        format!("{}halosync.events", self.prefix)
    }
    pub fn unrouted_exchange(&self) -> String {
        format!("{}halosync.unrouted", self.prefix)
    }
    pub fn unrouted_queue(&self) -> String {
        format!("{}halosync.unrouted", self.prefix)
    }
    pub fn work_queue(&self, family: Family) -> String {
        format!("{}halosync.{}", self.prefix, family)
    }
    pub fn dead_queue(&self, family: Family) -> String {
        format!("{}halosync.{}.dead", self.prefix, family)
    }
    pub fn retry_queue(&self, family: Family, delay_ms: u64) -> String {
        format!(
            "{}halosync.{}.retry.{}",
            self.prefix,
            family,
            delay_label(delay_ms)
        )
    }
    /// The activity log: a stream queue (see [`crate::activity`]).
    pub fn activity_queue(&self) -> String {
        format!("{}halosync.activity", self.prefix)
    }
    pub fn delays_ms(&self) -> &[u64] {
        &self.delays_ms
    }
    /// Every queue of a family: work, retry tiers, dead.
    pub fn family_queues(&self, family: Family) -> Vec<String> {
        let mut q = vec![self.work_queue(family)];
        q.extend(self.delays_ms.iter().map(|d| self.retry_queue(family, *d)));
        q.push(self.dead_queue(family));
        q
    }
    /// Every queue this topology declares.
    pub fn all_queues(&self) -> Vec<String> {
        let mut q: Vec<String> = Family::ALL
            .iter()
            .flat_map(|f| self.family_queues(*f))
            .collect();
        q.push(self.unrouted_queue());
        q.push(self.activity_queue());
        q
    }
    pub fn exchanges(&self) -> Vec<String> {
        vec![self.events_exchange(), self.unrouted_exchange()]
    }

    /// Declares everything, idempotently. Safe to run from every worker at
    /// start and from `halosync topology`, concurrently.
    pub async fn declare(&self, channel: &Channel) -> Result<(), AmqpError> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let wrap = |what: String| {
            move |e: lapin::Error| {
                AmqpError::Topology(format!(
                    "declaring {what}: {e} (if it exists with other arguments, an older halosync or another tool declared it: delete it, or use another prefix)"
                ))
            }
        };
        channel
            .exchange_declare(
                self.unrouted_exchange().into(),
                ExchangeKind::Fanout,
                durable,
                FieldTable::default(),
            )
            .await
            .map_err(wrap(self.unrouted_exchange()))?;
        let mut ev_args = FieldTable::default();
        ev_args.insert(
            "alternate-exchange".into(),
            long_str(&self.unrouted_exchange()),
        );
        channel
            .exchange_declare(
                self.events_exchange().into(),
                ExchangeKind::Topic,
                durable,
                ev_args,
            )
            .await
            .map_err(wrap(self.events_exchange()))?;
        self.queue(channel, &self.unrouted_queue(), parked())
            .await?;
        channel
            .queue_bind(
                self.unrouted_queue().into(),
                self.unrouted_exchange().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(wrap(format!("binding {}", self.unrouted_queue())))?;
        for family in Family::ALL {
            self.queue(channel, &self.dead_queue(family), parked())
                .await?;
            let work = self.work_queue(family);
            let mut args = dead_lettering("", &self.dead_queue(family));
            args.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongLongInt(DELIVERY_LIMIT),
            );
            self.queue(channel, &work, args).await?;
            for delay in &self.delays_ms {
                let mut args = dead_lettering("", &work);
                args.insert(
                    "x-message-ttl".into(),
                    AMQPValue::LongLongInt(*delay as i64),
                );
                self.queue(channel, &self.retry_queue(family, *delay), args)
                    .await?;
            }
            channel
                .queue_bind(
                    work.clone().into(),
                    self.events_exchange().into(),
                    format!("{family}.*").into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(wrap(format!("binding {work}")))?;
        }
        crate::activity::declare_stream(channel, &self.activity_queue())
            .await
            .map_err(wrap(self.activity_queue()))?;
        Ok(())
    }

    async fn queue(
        &self,
        channel: &Channel,
        name: &str,
        args: FieldTable,
    ) -> Result<(), AmqpError> {
        channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await
            .map_err(|e| {
                AmqpError::Topology(format!(
                    "declaring queue {name}: {e} (if it exists with other arguments, delete it or use another prefix)"
                ))
            })?;
        Ok(())
    }
}

fn long_str(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

fn quorum() -> FieldTable {
    let mut t = FieldTable::default();
    t.insert("x-queue-type".into(), long_str("quorum"));
    t
}

/// A queue where messages wait for an operator (dead letters, unrouted).
/// Reading them (`halosync dlq list`) returns them to the queue, which
/// quorum queues count as a delivery; RabbitMQ 4.0+ defaults the delivery
/// limit to 20 and would then drop them, so the limit is set explicitly
/// and very high (not -1: on 3.10, -1 drops a message on its first return).
fn parked() -> FieldTable {
    let mut t = quorum();
    t.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(1_000_000_000),
    );
    t
}

/// Quorum-queue dead-lettering that never drops a message: at-least-once
/// (RabbitMQ ≥ 3.10) needs `x-overflow = reject-publish`.
fn dead_lettering(exchange: &str, routing_key: &str) -> FieldTable {
    let mut t = quorum();
    t.insert("x-dead-letter-exchange".into(), long_str(exchange));
    t.insert("x-dead-letter-routing-key".into(), long_str(routing_key));
    t.insert("x-dead-letter-strategy".into(), long_str("at-least-once"));
    t.insert("x-overflow".into(), long_str("reject-publish"));
    t
}

/// `1500` → `1500ms`, `5000` → `5s`, `120000` → `2m`, `3600000` → `1h`.
pub fn delay_label(ms: u64) -> String {
    if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_prefix_and_the_delay() {
        let t = Topology::new("t1.", &[500, 5000, 120_000, 3_600_000]);
        assert_eq!(t.events_exchange(), "t1.halosync.events");
        assert_eq!(t.work_queue(Family::Usage), "t1.halosync.usage");
        assert_eq!(t.dead_queue(Family::Account), "t1.halosync.account.dead");
        assert_eq!(
            t.retry_queue(Family::Account, 500),
            "t1.halosync.account.retry.500ms"
        );
        assert_eq!(t.family_queues(Family::Account).len(), 6);
        assert_eq!(t.all_queues().len(), 26);
        assert_eq!(t.activity_queue(), "t1.halosync.activity");
        assert_eq!(delay_label(120_000), "2m");
        assert_eq!(delay_label(3_600_000), "1h");
    }
}
