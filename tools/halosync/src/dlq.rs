//! `halosync dlq list | show | replay | purge`: dead letters, read without
//! disturbing them.
//!
//! RabbitMQ has no "peek". Each dead queue is read on its own channel: the
//! ready count is taken first (`queue.declare` passive), then that many
//! messages are fetched with `basic.get` **unacknowledged** (so ones returned
//! meanwhile are never read twice), all held at once. `replay` republishes a
//! selected one to `halosync.events` (confirmed, mandatory) and only then
//! acks it; `purge` acks it. Everything else is returned by closing the
//! channel, which puts the held messages back in their original order;
//! the command then waits until the broker shows them ready again.
//!
//! Delivery counts: on RabbitMQ 3.10 (checked against 3.10.8 by the tests)
//! a quorum queue increments `x-delivery-count` for messages returned by a
//! channel close, exactly as for a nack with requeue, so every listing adds
//! one to that header. It is informative only: the dead queues have no
//! `x-delivery-limit` on 3.x, and halosync's own attempt counter
//! (`x-halosync-attempts`) is untouched. RabbitMQ 4.0–4.2 give quorum queues
//! a default delivery limit of 20, so the tool warns when a dead letter has
//! been handed out often (see [`DELIVERY_COUNT_WARNING`]); 4.3 no longer
//! counts returns.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use halosync_shared::amqp::publisher::{Pending, PublishError};
use halosync_shared::amqp::{Publisher, Topology};
use halosync_shared::{Config, Family};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicQosOptions};
use lapin::Connection;
use serde::Serialize;
use serde_json::json;

use crate::broker;
use crate::dead::{self, replay_headers, DeadLetter, FamilyArg, Filter};
use crate::dead::{FilterArgs, GroupBy};
use crate::table::{self, one_line, plural, shell_word, when};

/// How long to wait for returned dead letters to be ready again.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Warn above this `x-delivery-count` (RabbitMQ 4.0–4.2 default limit: 20).
pub const DELIVERY_COUNT_WARNING: i64 = 15;

/// What to do with each matching dead letter: the one description of a
/// dead-letter run that `halosync dlq` and the console both hand to [`run`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Read,
    Replay { dry_run: bool },
    Purge { dry_run: bool },
}

/// Live counters of a run, so that the console can show progress while a
/// replay of thousands of dead letters goes on server-side; `cancel` stops
/// it before the next dead letter (the rest stays untouched).
#[derive(Debug, Default)]
pub struct Progress {
    /// Dead letters in the queues read so far, when each was counted.
    pub total: AtomicU64,
    pub fetched: AtomicUsize,
    pub matched: AtomicUsize,
    pub removed: AtomicUsize,
    pub failed: AtomicUsize,
    pub cancel: AtomicBool,
}

/// What to do with each matching dead letter, with what it needs.
enum Mode<'a> {
    Read,
    Replay {
        publisher: &'a Publisher,
        exchange: String,
        dry_run: bool,
    },
    Purge {
        dry_run: bool,
    },
}

halosync_shared::labelled! {
    /// What happened to one matching dead letter (`halosync dlq`'s output,
    /// the console's jobs and confirmations).
    pub enum Handled ("dead-letter outcome") {
        Listed = "listed",
        WouldReplay = "would replay",
        Replayed = "replayed",
        WouldPurge = "would purge",
        Purged = "purged",
        Failed = "failed",
    }
}

impl Handled {
    /// Whether the dead letter left its dead queue.
    pub fn removed(self) -> bool {
        matches!(self, Handled::Replayed | Handled::Purged)
    }
}

/// What happened to one matching dead letter.
#[derive(Clone, Debug, Serialize)]
pub struct Done {
    #[serde(flatten)]
    pub letter: DeadLetter,
    pub outcome: Handled,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replayed_to: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// The result of going through the dead queues.
pub struct Scan {
    pub done: Vec<Done>,
    /// Ready dead letters per queue when the scan started.
    pub totals: BTreeMap<String, u32>,
    /// How many were fetched (read) in all.
    pub fetched: usize,
    /// Removed from the dead queues (replayed or purged).
    pub removed: usize,
    /// A fatal problem that stopped the scan early (the rest is untouched).
    pub stopped: Option<String>,
    /// Queues whose returned messages were not back in time.
    pub unsettled: Vec<String>,
    /// Families whose dead queue was read.
    pub families: Vec<Family>,
}

impl Scan {
    pub fn total(&self) -> u64 {
        self.totals.values().map(|n| u64::from(*n)).sum()
    }
    /// `7 in t.halosync.account.dead`, or `7 in the account, subscription,
    /// usage and overage dead queues`.
    fn where_(&self) -> String {
        let total = self.total();
        if self.totals.len() == 1 {
            let q = self.totals.keys().next().cloned().unwrap_or_default();
            return format!("{total} in {q}");
        }
        let names: Vec<&str> = self.families.iter().map(|f| f.as_str()).collect();
        let list = match names.split_last() {
            Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
            _ => names.join(""),
        };
        format!("{total} in the {list} dead queues")
    }
}

/// Goes through the dead queues the filter names and applies `action` to
/// each matching dead letter: the single code path of `halosync dlq list |
/// show | replay | purge` and of the console's pages and jobs.
pub async fn run(
    config: &Config,
    filter: &Filter,
    action: Action,
    progress: &Progress,
) -> anyhow::Result<Scan> {
    let topo = topology(config);
    let what = match action {
        Action::Read => "dlq-list",
        Action::Replay { .. } => "dlq-replay",
        Action::Purge { .. } => "dlq-purge",
    };
    let conn = broker::connect(config, what).await?;
    let result = async {
        match action {
            Action::Read => scan(&conn, &topo, filter, &Mode::Read, progress).await,
            Action::Purge { dry_run } => {
                scan(&conn, &topo, filter, &Mode::Purge { dry_run }, progress).await
            }
            Action::Replay { dry_run } => {
                let channel = conn
                    .create_channel()
                    .await
                    .context("opening the publishing channel")?;
                let publisher = Publisher::on_channel(channel, topo.clone())
                    .await
                    .context("putting the publishing channel in confirm mode")?;
                let mode = Mode::Replay {
                    publisher: &publisher,
                    exchange: topo.events_exchange(),
                    dry_run,
                };
                scan(&conn, &topo, filter, &mode, progress).await
            }
        }
    }
    .await;
    broker::close(&conn).await;
    result
}

async fn scan(
    conn: &Connection,
    topology: &Topology,
    filter: &Filter,
    mode: &Mode<'_>,
    progress: &Progress,
) -> anyhow::Result<Scan> {
    let mut out = Scan {
        done: Vec::new(),
        totals: BTreeMap::new(),
        fetched: 0,
        removed: 0,
        stopped: None,
        unsettled: Vec::new(),
        families: Vec::new(),
    };
    let mut remaining = filter.limit;
    for family in &filter.families {
        if remaining == Some(0) || out.stopped.is_some() {
            break;
        }
        let queue = topology.dead_queue(*family);
        out.families.push(*family);
        let (held, removed_here) = scan_queue(
            conn,
            &queue,
            *family,
            filter,
            mode,
            &mut remaining,
            &mut out,
            progress,
        )
        .await?;
        // Closing the channel returns every message still held, in order.
        if !broker::wait_until_back(
            conn,
            &queue,
            held.saturating_sub(removed_here),
            SETTLE_TIMEOUT,
        )
        .await?
        {
            out.unsettled.push(queue);
        }
    }
    Ok(out)
}

/// One dead queue. Returns (messages held, messages removed).
#[allow(clippy::too_many_arguments)] // the scan's state, passed down as is
async fn scan_queue(
    conn: &Connection,
    queue: &str,
    family: Family,
    filter: &Filter,
    mode: &Mode<'_>,
    remaining: &mut Option<usize>,
    out: &mut Scan,
    progress: &Progress,
) -> anyhow::Result<(u32, u32)> {
    let channel = conn
        .create_channel()
        .await
        .context("opening a RabbitMQ channel")?;
    channel
        .basic_qos(0, BasicQosOptions::default())
        .await
        .context("setting the channel's prefetch")?;
    let initial = match broker::passive(&channel, queue).await {
        Ok(c) => c.messages,
        Err(e) if broker::is_not_found(&e) => anyhow::bail!(
            "dead-letter queue {queue} does not exist: is HALOSYNC_PREFIX (or `prefix` in halosync.toml) right? `halosync topology` declares it"
        ),
        Err(e) => return Err(e).with_context(|| format!("counting {queue}")),
    };
    out.totals.insert(queue.to_string(), initial);
    progress
        .total
        .fetch_add(u64::from(initial), Ordering::Relaxed);
    let mut held: Vec<Delivery> = Vec::new();
    let mut removed = 0u32;
    let mut in_flight: Vec<InFlight> = Vec::new();
    let result: anyhow::Result<()> = async {
        for position in 1..=initial as usize {
            if *remaining == Some(0) || out.stopped.is_some() {
                break;
            }
            if progress.cancel.load(Ordering::Relaxed) {
                out.stopped = Some(format!("{FATAL}cancelled by the operator"));
                break;
            }
            let Some(got) = channel
                .basic_get(queue.into(), BasicGetOptions { no_ack: false })
                .await
                .with_context(|| format!("reading {queue}"))?
            else {
                break;
            };
            let delivery = got.delivery;
            out.fetched += 1;
            progress.fetched.fetch_add(1, Ordering::Relaxed);
            let letter = DeadLetter::read(
                family,
                queue,
                position,
                &delivery.properties,
                &delivery.data,
            );
            let message_id = delivery
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_string());
            if filter.matches(&letter, message_id.as_deref()) {
                if let Some(n) = remaining.as_mut() {
                    *n -= 1;
                }
                progress.matched.fetch_add(1, Ordering::Relaxed);
                match settle(&delivery, letter, mode).await {
                    Settled::Now(done) => record(done, out, progress, &mut removed),
                    Settled::Later(f) => {
                        in_flight.push(f);
                        if in_flight.len() >= REPLAY_WINDOW {
                            flush(&mut in_flight, out, progress, &mut removed).await;
                        }
                    }
                }
            }
            held.push(delivery);
        }
        flush(&mut in_flight, out, progress, &mut removed).await;
        Ok(())
    }
    .await;
    // On an error above, republished ones still get their confirm (and are
    // removed) before the rest goes back.
    flush(&mut in_flight, out, progress, &mut removed).await;
    // Return whatever is still unacknowledged, in order; also on error.
    let _ = channel
        .close(200, "halosync dlq: returning dead letters".into())
        .await;
    result?;
    Ok((held.len() as u32, removed))
}

const FATAL: &str = "stopped: ";

/// Republishes in flight at once: their confirms are awaited together,
/// instead of one broker round trip (and quorum-queue disk sync) each.
const REPLAY_WINDOW: usize = 128;

/// A dead letter republished, waiting for the broker's confirm before it
/// is removed from the dead queue.
struct InFlight {
    acker: lapin::Acker,
    letter: DeadLetter,
    target: String,
    pending: Pending,
}

enum Settled {
    Now(Done),
    Later(InFlight),
}

fn record(done: Done, out: &mut Scan, progress: &Progress, removed: &mut u32) {
    if done.outcome.removed() {
        *removed += 1;
        out.removed += 1;
        progress.removed.fetch_add(1, Ordering::Relaxed);
    }
    if done.outcome == Handled::Failed {
        progress.failed.fetch_add(1, Ordering::Relaxed);
        if done.problem.as_deref().is_some_and(is_fatal) && out.stopped.is_none() {
            out.stopped = done.problem.clone();
        }
    }
    out.done.push(done);
}

/// Awaits the confirms in order; each confirmed one is then removed.
async fn flush(
    in_flight: &mut Vec<InFlight>,
    out: &mut Scan,
    progress: &Progress,
    removed: &mut u32,
) {
    for f in in_flight.drain(..) {
        let done = |letter, outcome: Handled, problem: Option<String>| Done {
            letter,
            outcome,
            replayed_to: Some(f.target.clone()),
            problem,
        };
        let d = match f.pending.confirmed().await {
            Ok(()) => match f.acker.ack(BasicAckOptions::default()).await {
                Ok(_) => done(f.letter, Handled::Replayed, None),
                Err(e) => done(f.letter, Handled::Failed, Some(format!(
                    "{FATAL}republished, but could not remove it from the dead queue ({e}); it may be replayed twice, which the workers absorb (same event id)"
                ))),
            },
            Err(e) => {
                let fatal = matches!(e, PublishError::Broker(_));
                let problem = format!(
                    "{}republish to {} failed: {e}; it stays in the dead queue",
                    if fatal { FATAL } else { "" },
                    f.target
                );
                done(f.letter, Handled::Failed, Some(problem))
            }
        };
        record(d, out, progress, removed);
    }
}

/// A problem without its internal "stopped: " marker, for people.
pub fn problem_text(problem: &str) -> &str {
    problem.trim_start_matches(FATAL)
}

fn is_fatal(problem: &str) -> bool {
    problem.starts_with(FATAL)
}

/// Applies the mode to one matching, held dead letter; a republish is left
/// in flight (its confirm is awaited with others, in [`flush`]).
async fn settle(delivery: &Delivery, letter: DeadLetter, mode: &Mode<'_>) -> Settled {
    Settled::Now(match settle_now(delivery, letter, mode).await {
        Ok(done) => done,
        Err(f) => return Settled::Later(f),
    })
}

async fn settle_now(
    delivery: &Delivery,
    letter: DeadLetter,
    mode: &Mode<'_>,
) -> Result<Done, InFlight> {
    let done = |letter, outcome: Handled| Done {
        letter,
        outcome,
        replayed_to: None,
        problem: None,
    };
    Ok(match mode {
        Mode::Read => done(letter, Handled::Listed),
        Mode::Purge { dry_run: true } => done(letter, Handled::WouldPurge),
        Mode::Purge { dry_run: false } => {
            match delivery.acker.ack(BasicAckOptions::default()).await {
                Ok(_) => done(letter, Handled::Purged),
                Err(e) => Done {
                    problem: Some(format!("{FATAL}could not remove it: {e}")),
                    ..done(letter, Handled::Failed)
                },
            }
        }
        Mode::Replay {
            publisher,
            exchange,
            dry_run,
        } => {
            let Some(routing_key) = letter.original_routing_key.clone() else {
                return Ok(Done {
                    problem: Some(
                        "no routing key: it has neither x-halosync-original-routing-key, a `type` property nor an envelope `type`; left in the dead queue".into(),
                    ),
                    ..done(letter, Handled::Failed)
                });
            };
            let target = format!("{exchange} [{routing_key}]");
            if *dry_run {
                return Ok(Done {
                    replayed_to: Some(target),
                    ..done(letter, Handled::WouldReplay)
                });
            }
            let mut props = delivery
                .properties
                .clone()
                .with_headers(replay_headers(delivery.properties.headers().as_ref()))
                .with_delivery_mode(2);
            if props.message_id().is_none() {
                if let Some(id) = &letter.event_id {
                    props = props.with_message_id(id.as_str().into());
                }
            }
            match publisher
                .start_publish(exchange, &routing_key, &delivery.data, props)
                .await
            {
                Ok(pending) => {
                    return Err(InFlight {
                        acker: delivery.acker.clone(),
                        letter,
                        target,
                        pending,
                    })
                }
                Err(e) => {
                    let fatal = matches!(e, PublishError::Broker(_));
                    Done {
                        problem: Some(format!(
                            "{}republish to {target} failed: {e}; it stays in the dead queue",
                            if fatal { FATAL } else { "" }
                        )),
                        ..done(letter, Handled::Failed)
                    }
                }
            }
        }
    })
}

fn topology(config: &Config) -> Topology {
    Topology::new(&config.prefix, &config.retry.delays_ms())
}

fn warn_unsettled(scan: &Scan) {
    for q in &scan.unsettled {
        eprintln!(
            "warning: the broker has not yet put every dead letter back in {q} after {}s; they are safe (unacknowledged messages of a closed channel always return) and will show up shortly",
            SETTLE_TIMEOUT.as_secs()
        );
    }
}

fn warn_delivery_counts(letters: &[&DeadLetter], prefix: &str) {
    let max = letters
        .iter()
        .filter_map(|d| d.delivery_count)
        .max()
        .unwrap_or(0);
    if max >= DELIVERY_COUNT_WARNING {
        let pattern = format!("^{}halosync\\..*\\.dead$", prefix.replace('.', "\\."));
        eprintln!(
            "warning: a dead letter has been handed out {max} times (x-delivery-count; before RabbitMQ 4.3 every listing counts one). \
RabbitMQ 4.0–4.2 give quorum queues a default delivery limit of 20, after which the dead queue would drop it. \
On those versions lift the limit with: rabbitmqctl set_policy --apply-to quorum_queues halosync-dead {} '{{\"delivery-limit\":1000000000}}'",
            shell_word(&pattern)
        );
    }
}

/// The dead letters matching `args`, read without disturbing them (they
/// stay in place and in order), for callers other than `dlq list`: the
/// console and `halosync mappings unmapped`.
pub async fn read(config: &Config, args: &FilterArgs) -> anyhow::Result<Vec<DeadLetter>> {
    let filter = Filter::new(args, Utc::now());
    let scan = run(config, &filter, Action::Read, &Progress::default()).await?;
    warn_unsettled(&scan);
    Ok(scan.done.into_iter().map(|d| d.letter).collect())
}

/// `halosync dlq list`
pub async fn list(
    config: &Config,
    args: &FilterArgs,
    group_by: Option<GroupBy>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let now = Utc::now();
    let filter = Filter::new(args, now);
    let scan = run(config, &filter, Action::Read, &Progress::default()).await?;
    warn_unsettled(&scan);
    let letters: Vec<&DeadLetter> = scan.done.iter().map(|d| &d.letter).collect();
    warn_delivery_counts(&letters, &config.prefix);
    if let Some(by) = group_by {
        let owned: Vec<DeadLetter> = letters.iter().map(|d| (*d).clone()).collect();
        let groups = dead::group(&owned, by);
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({
                    "group_by": match by { GroupBy::Class => "class", GroupBy::Error => "error" },
                    "matched": owned.len(),
                    "in_dead_queues": scan.total(),
                    "groups": groups,
                }))?
            );
            return Ok(ExitCode::SUCCESS);
        }
        if groups.is_empty() {
            println!("No dead letters match ({}).", scan.where_());
            return Ok(ExitCode::SUCCESS);
        }
        let rows: Vec<Vec<String>> = groups
            .iter()
            .map(|g| {
                let families: Vec<&str> = g.families.iter().map(|f| f.as_str()).collect();
                let id = g.sample_event_id.as_deref().unwrap_or("(no id)");
                let sample = match by {
                    GroupBy::Class => format!("{id}: {}", g.sample_message),
                    GroupBy::Error => id.to_string(),
                };
                let mut row = vec![g.count.to_string(), g.class.to_string()];
                if by == GroupBy::Error {
                    row.push(one_line(g.error.as_deref().unwrap_or(""), 90));
                }
                row.extend([
                    families.join(","),
                    when(g.first_failure_at.as_ref(), &now),
                    when(g.last_failure_at.as_ref(), &now),
                    one_line(&sample, 90),
                ]);
                row
            })
            .collect();
        let mut header = vec!["COUNT", "CLASS"];
        if by == GroupBy::Error {
            header.push("ERROR");
        }
        header.extend(["FAMILIES", "FIRST FAILURE", "LAST FAILURE"]);
        header.push(match by {
            GroupBy::Class => "SAMPLE",
            GroupBy::Error => "SAMPLE EVENT",
        });
        print!("{}", table::render(&header, &rows, &[0]));
        println!();
        println!(
            "{} in {}, of {}; the queues are unchanged.",
            plural(owned.len() as u64, "dead letter"),
            plural(groups.len() as u64, "group"),
            scan.where_()
        );
        if let Some(g) = groups.first() {
            println!(
                "Once a cause is fixed, replay its group: halosync dlq replay --class {} --dry-run",
                g.class
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&letters)?);
        return Ok(ExitCode::SUCCESS);
    }
    if letters.is_empty() {
        println!("No dead letters match (of {}).", scan.where_());
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = letters
        .iter()
        .map(|d| {
            vec![
                d.family.to_string(),
                d.position.to_string(),
                d.event_id.clone().unwrap_or_else(|| "-".into()),
                d.event_type.clone().unwrap_or_else(|| "-".into()),
                d.connection.clone().unwrap_or_else(|| "-".into()),
                d.class.to_string(),
                d.attempts.map_or_else(|| "-".into(), |a| a.to_string()),
                when(d.last_failure_at.as_ref(), &now),
                one_line(&d.reason(), 100),
            ]
        })
        .collect();
    print!(
        "{}",
        table::render(
            &[
                "FAMILY",
                "#",
                "EVENT ID",
                "TYPE",
                "CONNECTION",
                "CLASS",
                "ATTEMPTS",
                "LAST FAILURE",
                "ERROR",
            ],
            &rows,
            &[1, 6],
        )
    );
    println!();
    println!(
        "{} listed, of {}; the queues are unchanged.",
        plural(letters.len() as u64, "dead letter"),
        scan.where_()
    );
    println!("Details: halosync dlq show EVENT_ID    Summary: halosync dlq list --group-by class");
    Ok(ExitCode::SUCCESS)
}

/// `halosync dlq show EVENT_ID`
pub async fn show(
    config: &Config,
    event_id: &str,
    families: &[FamilyArg],
    json: bool,
) -> anyhow::Result<ExitCode> {
    let args = FilterArgs {
        family: families.to_vec(),
        event_id: vec![event_id.to_string()],
        ..Default::default()
    };
    let filter = Filter::new(&args, Utc::now());
    let scan = run(config, &filter, Action::Read, &Progress::default()).await?;
    warn_unsettled(&scan);
    let letters: Vec<&DeadLetter> = scan.done.iter().map(|d| &d.letter).collect();
    warn_delivery_counts(&letters, &config.prefix);
    if letters.is_empty() {
        anyhow::bail!(
            "no dead letter with event id {event_id:?} (there are {}); `halosync dlq list` shows what is there",
            scan.where_()
        );
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&letters)?);
        return Ok(ExitCode::SUCCESS);
    }
    let now = Utc::now();
    for (i, d) in letters.iter().enumerate() {
        if i > 0 {
            println!("\n{}\n", "─".repeat(72));
        }
        print_letter(d, scan.totals.get(&d.queue).copied(), &now);
    }
    println!();
    println!(
        "Replay it once the cause is fixed: halosync dlq replay --event-id {}",
        shell_word(event_id)
    );
    Ok(ExitCode::SUCCESS)
}

fn print_letter(d: &DeadLetter, queue_len: Option<u32>, now: &chrono::DateTime<Utc>) {
    let dash = || "-".to_string();
    println!(
        "Dead letter {} ({}, connection {})",
        d.event_id.clone().unwrap_or_else(dash),
        d.event_type.clone().unwrap_or_else(dash),
        d.connection.clone().unwrap_or_else(dash)
    );
    let pos = match queue_len {
        Some(n) => format!("{} (position {} of {n})", d.queue, d.position),
        None => format!("{} (position {})", d.queue, d.position),
    };
    let halo = match (&d.halo_status, &d.halo_message) {
        (Some(s), Some(m)) => format!("{s}: {m}"),
        (Some(s), None) => s.to_string(),
        (None, Some(m)) => m.clone(),
        (None, None) => "-".into(),
    };
    let fields = [
        ("queue", pos),
        ("class", d.class.to_string()),
        ("error", d.error_message.clone().unwrap_or_else(dash)),
        ("HaloPSA says", halo),
        ("attempts", d.attempts.map_or_else(dash, |a| a.to_string())),
        ("first failure", when(d.first_failure_at.as_ref(), now)),
        ("last failure", when(d.last_failure_at.as_ref(), now)),
        ("worker", d.worker.clone().unwrap_or_else(dash)),
        (
            "routing key",
            d.original_routing_key.clone().unwrap_or_else(dash),
        ),
        ("replays", d.replay_count.to_string()),
        ("body", format!("{} bytes", d.body_bytes)),
    ];
    for (k, v) in fields {
        println!("  {k:<14} {v}");
    }
    println!("\nHeaders:");
    if let Some(map) = d.headers.as_object() {
        let mut keys: Vec<&String> = map.keys().collect();
        // x-halosync-* first, then the broker's and the publisher's.
        keys.sort_by_key(|k| (!k.starts_with("x-halosync-"), (*k).clone()));
        for k in keys {
            let v = &map[k];
            let text = match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            println!("  {k}: {text}");
        }
    }
    match (&d.envelope, &d.body_text) {
        (Some(env), _) => {
            println!("\nEnvelope:");
            println!(
                "{}",
                serde_json::to_string_pretty(env).unwrap_or_else(|_| env.to_string())
            );
        }
        (None, Some(text)) => {
            println!("\nBody (not JSON):");
            println!("{}", one_line(text, 2000));
        }
        (None, None) => {}
    }
}

/// `halosync dlq replay`
pub async fn replay(
    config: &Config,
    args: &FilterArgs,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let filter = Filter::new(args, Utc::now());
    let scan = run(
        config,
        &filter,
        Action::Replay { dry_run },
        &Progress::default(),
    )
    .await?;
    warn_unsettled(&scan);
    report_changes(&scan, &filter, dry_run, json, "replay", "replayed")
}

/// `halosync dlq purge`
pub async fn purge(
    config: &Config,
    args: &FilterArgs,
    yes: bool,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let filter = Filter::new(args, Utc::now());
    let really = yes && !dry_run;
    let scan = run(
        config,
        &filter,
        Action::Purge { dry_run: !really },
        &Progress::default(),
    )
    .await?;
    warn_unsettled(&scan);
    if !yes && !dry_run {
        let n = scan.done.len();
        let filters = filter.as_args();
        let sep = if filters.is_empty() { "" } else { " " };
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({
                    "refused": true,
                    "matched": n,
                    "purged": 0,
                    "reason": "purge deletes dead letters for good; pass --yes",
                    "dead_letters": scan.done,
                }))?
            );
        } else {
            for d in &scan.done {
                println!("{} {}", Handled::WouldPurge, describe(&d.letter));
            }
        }
        let what = if filter.is_empty() {
            format!("all {}", plural(n as u64, "dead letter"))
        } else {
            format!(
                "{n} matching {}",
                if n == 1 {
                    "dead letter"
                } else {
                    "dead letters"
                }
            )
        };
        eprintln!(
            "error: refusing to purge {what} without --yes; nothing was deleted. Review them with `halosync dlq list{sep}{filters}`, then run `halosync dlq purge{sep}{filters} --yes`"
        );
        return Ok(ExitCode::FAILURE);
    }
    report_changes(&scan, &filter, !really, json, "purge", "purged")
}

fn describe(d: &DeadLetter) -> String {
    format!(
        "{} ({}, {}, class {}) from {}",
        d.event_id.as_deref().unwrap_or("(no id)"),
        d.event_type.as_deref().unwrap_or("-"),
        d.connection.as_deref().unwrap_or("-"),
        d.class,
        d.queue
    )
}

fn report_changes(
    scan: &Scan,
    filter: &Filter,
    dry_run: bool,
    json: bool,
    verb: &str,
    past: &str,
) -> anyhow::Result<ExitCode> {
    let failed: Vec<&Done> = scan
        .done
        .iter()
        .filter(|d| d.outcome == Handled::Failed)
        .collect();
    let mut per_family: BTreeMap<&str, usize> = BTreeMap::new();
    for d in scan.done.iter().filter(|d| d.outcome != Handled::Failed) {
        *per_family.entry(d.letter.family.as_str()).or_default() += 1;
    }
    let ok = failed.is_empty() && scan.stopped.is_none();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "action": verb,
                "dry_run": dry_run,
                "matched": scan.done.len(),
                "removed": if dry_run { 0 } else { scan.removed },
                "failed": failed.len(),
                "stopped": scan.stopped,
                "in_dead_queues_before": scan.total(),
                "dead_letters": scan.done,
            }))?
        );
        return Ok(if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    for d in &scan.done {
        let target = d
            .replayed_to
            .as_deref()
            .map(|t| format!(" → {t}"))
            .unwrap_or_default();
        let count = if verb == "replay" && d.outcome != Handled::Failed {
            format!(", replay #{}", d.letter.replay_count.saturating_add(1))
        } else {
            String::new()
        };
        match &d.problem {
            Some(p) => println!(
                "FAILED {}: {}",
                describe(&d.letter),
                p.trim_start_matches(FATAL)
            ),
            None => println!("{} {}{target}{count}", d.outcome, describe(&d.letter)),
        }
    }
    if !scan.done.is_empty() {
        println!();
    }
    let breakdown = per_family
        .iter()
        .map(|(f, n)| format!("{f} {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    let breakdown = if breakdown.is_empty() {
        String::new()
    } else {
        format!(" ({breakdown})")
    };
    let filters = filter.as_args();
    let sep = if filters.is_empty() { "" } else { " " };
    if dry_run {
        println!(
            "Dry run: {} would be {past}{breakdown}; nothing was changed. Run again without --dry-run{}.",
            plural((scan.done.len() - failed.len()) as u64, "dead letter"),
            if verb == "purge" { " and with --yes" } else { "" }
        );
    } else if scan.done.is_empty() {
        println!(
            "No dead letters match (of {}); nothing was {past}.",
            scan.where_()
        );
    } else {
        println!(
            "{} {}{breakdown}; {} left in the dead queues.",
            capitalise(past),
            plural(scan.removed as u64, "dead letter"),
            scan.total().saturating_sub(scan.removed as u64)
        );
    }
    if let Some(why) = &scan.stopped {
        eprintln!(
            "error: stopped early: {}; the dead letters not yet handled are untouched. Fix it and run `halosync dlq {verb}{sep}{filters}` again.",
            why.trim_start_matches(FATAL)
        );
    } else if !failed.is_empty() {
        eprintln!(
            "error: {} could not be {past} and stay in the dead queues (see FAILED above).",
            plural(failed.len() as u64, "dead letter")
        );
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}
