//! `halosync topology` (declare everything, idempotently) and `halosync
//! status` (per family: ready messages and consumers of the work queue,
//! each retry tier's depth, dead letters; plus unrouted messages).
//!
//! Counts come from passive `queue.declare`, which creates nothing and
//! touches no message. Quorum queues report **ready** messages: those a
//! worker is processing right now (unacknowledged) are not counted.

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::Context;
use halosync_shared::amqp::topology::delay_label;
use halosync_shared::amqp::{redact_url, Topology};
use halosync_shared::{Config, Family};
use serde::Serialize;
use serde_json::json;

use crate::broker::{self, QueueCount};
use crate::table::{self, plural};

/// `halosync topology`
pub async fn topology(config: &Config, json: bool) -> anyhow::Result<ExitCode> {
    let topo = Topology::new(&config.prefix, &config.retry.delays_ms());
    let conn = broker::connect(config, "topology").await?;
    let result = async {
        let channel = conn
            .create_channel()
            .await
            .context("opening a RabbitMQ channel")?;
        topo.declare(&channel).await.map_err(anyhow::Error::from)
    }
    .await;
    broker::close(&conn).await;
    result?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "prefix": config.prefix,
                "exchanges": topo.exchanges(),
                "queues": topo.all_queues(),
            }))?
        );
    } else {
        println!(
            "Declared {} exchanges and {} quorum queues on {} (prefix {:?}); declaring again changes nothing.",
            topo.exchanges().len(),
            topo.all_queues().len(),
            redact_url(&config.amqp_url),
            config.prefix
        );
        for e in topo.exchanges() {
            println!("  exchange {e}");
        }
        for q in topo.all_queues() {
            println!("  queue    {q}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One queue in the status report.
#[derive(Clone, Debug, Serialize)]
pub struct QueueStatus {
    pub queue: String,
    /// False when the queue is not declared.
    pub exists: bool,
    pub messages: u32,
    pub consumers: u32,
}

impl QueueStatus {
    fn from(queue: String, c: Option<QueueCount>) -> QueueStatus {
        QueueStatus {
            queue,
            exists: c.is_some(),
            messages: c.map_or(0, |c| c.messages),
            consumers: c.map_or(0, |c| c.consumers),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct FamilyStatus {
    pub work: QueueStatus,
    /// Retry tier label (`5s`, `2m`) → its delay queue.
    pub retry: BTreeMap<String, QueueStatus>,
    pub dead: QueueStatus,
}

/// Every queue's counts: per family, and the unrouted queue.
pub type Counts = (BTreeMap<Family, FamilyStatus>, QueueStatus);

/// Counts every queue: the single code path of `halosync status` and of the
/// console's overview.
pub async fn collect(config: &Config) -> anyhow::Result<Counts> {
    let conn = broker::connect(config, "status").await?;
    let result = collect_on(&conn, config).await;
    broker::close(&conn).await;
    result
}

/// [`collect`] on a connection the caller keeps (the console reuses one).
pub async fn collect_on(conn: &lapin::Connection, config: &Config) -> anyhow::Result<Counts> {
    let topo = Topology::new(&config.prefix, &config.retry.delays_ms());
    let result: anyhow::Result<(BTreeMap<Family, FamilyStatus>, QueueStatus)> = async {
        let mut families = BTreeMap::new();
        for f in Family::ALL {
            let work = topo.work_queue(f);
            let work = QueueStatus::from(work.clone(), broker::count(conn, &work).await?);
            let mut retry = BTreeMap::new();
            for d in topo.delays_ms() {
                let q = topo.retry_queue(f, *d);
                let c = broker::count(conn, &q).await?;
                retry.insert(delay_label(*d), QueueStatus::from(q, c));
            }
            let dead = topo.dead_queue(f);
            let dead = QueueStatus::from(dead.clone(), broker::count(conn, &dead).await?);
            families.insert(f, FamilyStatus { work, retry, dead });
        }
        let unrouted = topo.unrouted_queue();
        let unrouted = QueueStatus::from(unrouted.clone(), broker::count(conn, &unrouted).await?);
        Ok((families, unrouted))
    }
    .await;
    result
}

/// `halosync status`
pub async fn status(config: &Config, json: bool) -> anyhow::Result<ExitCode> {
    let topo = Topology::new(&config.prefix, &config.retry.delays_ms());
    let (families, unrouted) = collect(config).await?;
    let missing: Vec<&str> = families
        .values()
        .flat_map(|f| {
            std::iter::once(&f.work)
                .chain(f.retry.values())
                .chain(std::iter::once(&f.dead))
        })
        .chain(std::iter::once(&unrouted))
        .filter(|q| !q.exists)
        .map(|q| q.queue.as_str())
        .collect();
    if json {
        let fams: BTreeMap<&str, &FamilyStatus> =
            families.iter().map(|(f, s)| (f.as_str(), s)).collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "prefix": config.prefix,
                "families": fams,
                "unrouted": unrouted,
                "missing_queues": missing,
            }))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    let tiers: Vec<String> = topo.delays_ms().iter().map(|d| delay_label(*d)).collect();
    let retry_header = format!("RETRY {}", tiers.join("/"));
    let num = |q: &QueueStatus, v: u32| {
        if q.exists {
            v.to_string()
        } else {
            "-".to_string()
        }
    };
    let rows: Vec<Vec<String>> = families
        .iter()
        .map(|(f, s)| {
            let retry: Vec<String> = topo
                .delays_ms()
                .iter()
                .map(|d| {
                    s.retry
                        .get(&delay_label(*d))
                        .map_or("-".into(), |q| num(q, q.messages))
                })
                .collect();
            vec![
                f.to_string(),
                s.work.queue.clone(),
                num(&s.work, s.work.messages),
                num(&s.work, s.work.consumers),
                retry.join("/"),
                num(&s.dead, s.dead.messages),
            ]
        })
        .collect();
    println!(
        "halosync status on {} (prefix {:?})\n",
        redact_url(&config.amqp_url),
        config.prefix
    );
    print!(
        "{}",
        table::render(
            &[
                "FAMILY",
                "WORK QUEUE",
                "READY",
                "CONSUMERS",
                &retry_header,
                "DEAD"
            ],
            &rows,
            &[2, 3, 4, 5],
        )
    );
    println!(
        "\nunrouted ({}): {}",
        unrouted.queue,
        num(&unrouted, unrouted.messages)
    );
    // Hints, like a good dashboard.
    let dead_total: u32 = families.values().map(|s| s.dead.messages).sum();
    if dead_total > 0 {
        println!(
            "\n{}: see them grouped by cause with `halosync dlq list --group-by class`.",
            plural(dead_total, "dead letter")
        );
    }
    for (f, s) in &families {
        if s.work.exists && s.work.consumers == 0 && s.work.messages > 0 {
            println!(
                "No worker consumes {}: start halosync-{f} to process its {}.",
                s.work.queue,
                plural(s.work.messages, "message")
            );
        }
    }
    if unrouted.messages > 0 {
        println!(
            "{} matched no family queue (their routing key is not account.*, subscription.*, usage.* or overage.*); they wait in {}.",
            plural(unrouted.messages, "message"),
            unrouted.queue
        );
    }
    if !missing.is_empty() {
        println!(
            "{} queues are not declared (shown as -): run `halosync topology`, or start a worker.",
            missing.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}
