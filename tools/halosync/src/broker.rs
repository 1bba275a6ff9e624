//! RabbitMQ plumbing shared by the commands: connecting with an error that
//! says what to fix, counting a queue without disturbing it, and waiting for
//! returned dead letters to be back in their queue.

use std::time::{Duration, Instant};

use anyhow::Context;
use halosync_shared::amqp;
use halosync_shared::Config;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection};

/// Opens a connection named `halosync-cli:<what>` (visible in
/// `rabbitmqctl list_connections`), with the configured TLS and
/// credentials; the error names RabbitMQ and says what to fix.
pub async fn connect(config: &Config, what: &str) -> anyhow::Result<Connection> {
    amqp::connect_with(
        &config.amqp_url,
        &config.amqp_access,
        &format!("halosync-cli:{what}"),
    )
    .await
    .map_err(|e| anyhow::anyhow!("cannot connect: {e}"))
}

/// Closes the connection politely (the broker then logs no "client
/// unexpectedly closed TCP connection").
pub async fn close(conn: &Connection) {
    let _ = conn.close(200, "halosync done".into()).await;
}

/// What a passive declare says about a queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueCount {
    /// Ready messages (quorum queues do not count unacknowledged ones).
    pub messages: u32,
    pub consumers: u32,
}

/// Counts a queue through `queue.declare(passive)`, which creates nothing.
/// `Ok(None)`: the queue does not exist. A missing queue closes the channel
/// it was asked on, so each call uses its own short-lived channel.
pub async fn count(conn: &Connection, queue: &str) -> anyhow::Result<Option<QueueCount>> {
    let channel = conn
        .create_channel()
        .await
        .context("opening a RabbitMQ channel")?;
    let result = passive(&channel, queue).await;
    match result {
        Ok(q) => {
            let _ = channel.close(200, "counted".into()).await;
            Ok(Some(q))
        }
        Err(_) if !conn.status().connected() => {
            anyhow::bail!("lost the RabbitMQ connection while counting {queue}")
        }
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("counting queue {queue}")),
    }
}

pub async fn passive(channel: &Channel, queue: &str) -> Result<QueueCount, lapin::Error> {
    let q = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(QueueCount {
        messages: q.message_count(),
        consumers: q.consumer_count(),
    })
}

/// True for the broker's 404 NOT_FOUND channel error.
pub fn is_not_found(e: &lapin::Error) -> bool {
    let text = e.to_string();
    text.contains("NOT_FOUND") || text.contains("404")
}

/// After a channel holding unacknowledged messages is closed, the broker
/// returns them asynchronously. Waits (up to `timeout`) until `queue` holds
/// at least `expected` ready messages again, so that the next command (or
/// the next `status`) sees the queue as it was. Returns whether it did.
pub async fn wait_until_back(
    conn: &Connection,
    queue: &str,
    expected: u32,
    timeout: Duration,
) -> anyhow::Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        let now = count(conn, queue).await?;
        if now.is_some_and(|c| c.messages >= expected) {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
