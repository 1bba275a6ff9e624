//! `halosync publish`: events from files, directories or standard input,
//! validated against the embedded `schemas/` first, then published to
//! `halosync.events` with confirms and the mandatory flag through the same
//! [`Publisher`] Rust programs use.
//!
//! A file holds JSON lines (one envelope per line), one pretty-printed event
//! (or several, one after the other), or a JSON array of events. If any
//! event of the input is invalid, nothing is published unless
//! `--skip-invalid` is given.

use std::fmt;
use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tracing::Instrument;

use anyhow::Context;
use halosync_shared::amqp::{publisher::PublishError, Publisher, Topology};
use halosync_shared::{Config, Contract, Envelope};
use lapin::types::FieldTable;
use serde::Serialize;
use serde_json::{json, Value};

use crate::broker;

pub struct Options {
    pub inputs: Vec<PathBuf>,
    pub skip_invalid: bool,
    pub dry_run: bool,
    pub json: bool,
}

/// Where an event came from: `file:line` or `file[index]` (JSON arrays).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Location {
    pub source: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.index) {
            (_, Some(i)) => write!(f, "{}[{i}]", self.source),
            (Some(l), None) => write!(f, "{}:{l}", self.source),
            (None, None) => f.write_str(&self.source),
        }
    }
}

/// One event's text, before validation.
#[derive(Debug, PartialEq)]
pub struct Record {
    pub at: Location,
    pub raw: String,
}

/// Something wrong with an event (or a file).
#[derive(Clone, Debug, Serialize)]
pub struct Problem {
    #[serde(flatten)]
    pub at: Location,
    pub error: String,
}

fn at(source: &str, line: Option<usize>, index: Option<usize>) -> Location {
    Location {
        source: source.to_string(),
        line,
        index,
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Splits one input into event records: JSON lines, concatenated
/// (pretty-printed) JSON documents, or a JSON array.
pub fn split(source: &str, text: &str) -> (Vec<Record>, Vec<Problem>) {
    let mut records = Vec::new();
    let mut problems = Vec::new();
    let trimmed = text.trim_start();
    if trimmed.is_empty() {
        return (records, problems);
    }
    let first_offset = text.len() - trimmed.len();
    if trimmed.starts_with('[') {
        match serde_json::from_str::<Vec<Value>>(text) {
            Ok(items) => {
                let line = line_of(text, first_offset);
                for (i, item) in items.into_iter().enumerate() {
                    records.push(Record {
                        at: at(source, Some(line), Some(i)),
                        raw: item.to_string(),
                    });
                }
            }
            Err(e) => problems.push(Problem {
                at: at(source, Some(e.line()), None),
                error: format!("not a JSON array of events: {e}"),
            }),
        }
        return (records, problems);
    }
    let first_line = trimmed.lines().next().unwrap_or("").trim();
    let is_lines = match serde_json::from_str::<Value>(first_line) {
        Ok(_) => true,
        Err(e) => !e.is_eof(),
    };
    if is_lines {
        for (i, line) in text.lines().enumerate() {
            let raw = line.trim();
            if !raw.is_empty() {
                records.push(Record {
                    at: at(source, Some(i + 1), None),
                    raw: raw.to_string(),
                });
            }
        }
        return (records, problems);
    }
    // One or more multi-line documents.
    let mut stream = serde_json::Deserializer::from_str(text).into_iter::<Value>();
    let mut start = 0usize;
    loop {
        match stream.next() {
            None => break,
            Some(Ok(_)) => {
                let end = stream.byte_offset();
                let chunk = &text[start..end];
                let lead = chunk.len() - chunk.trim_start().len();
                records.push(Record {
                    at: at(source, Some(line_of(text, start + lead)), None),
                    raw: chunk.trim().to_string(),
                });
                start = end;
            }
            Some(Err(e)) => {
                problems.push(Problem {
                    at: at(source, Some(e.line()), None),
                    error: format!("not valid JSON: {e}"),
                });
                break;
            }
        }
    }
    (records, problems)
}

/// Reads every input: files, directories (their `*.json`, `*.jsonl`,
/// `*.ndjson`, sorted) and `-` for standard input.
fn read_inputs(inputs: &[PathBuf]) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut stdin_used = false;
    for input in inputs {
        if input.as_os_str() == "-" {
            if stdin_used {
                anyhow::bail!("`-` (standard input) is given twice; give it once");
            }
            stdin_used = true;
            let mut stdin = std::io::stdin();
            if stdin.is_terminal() {
                eprintln!("Reading events from standard input (end with Ctrl-D); give a FILE to publish a file.");
            }
            let mut text = String::new();
            stdin
                .read_to_string(&mut text)
                .context("reading events from standard input (it must be UTF-8)")?;
            out.push(("<stdin>".to_string(), text));
        } else if input.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(input)
                .with_context(|| format!("cannot list directory {}", input.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.is_file()
                        && p.extension()
                            .and_then(|e| e.to_str())
                            .is_some_and(|e| matches!(e, "json" | "jsonl" | "ndjson"))
                })
                .collect();
            files.sort();
            if files.is_empty() {
                anyhow::bail!(
                    "directory {} holds no *.json, *.jsonl or *.ndjson files",
                    input.display()
                );
            }
            for f in files {
                out.push((f.display().to_string(), read_file(&f)?));
            }
        } else {
            out.push((input.display().to_string(), read_file(input)?));
        }
    }
    Ok(out)
}

fn read_file(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read {} (give a JSON or JSON-lines file, a directory, or `-` for standard input)",
            path.display()
        )
    })
}

/// A valid event, ready to publish.
struct Valid {
    at: Location,
    event: Envelope,
    raw: String,
}

#[derive(Serialize)]
pub struct Failed {
    #[serde(flatten)]
    pub at: Location,
    pub event_id: String,
    pub error: String,
}

pub async fn run(config: &Config, opts: &Options) -> anyhow::Result<ExitCode> {
    let contract = Contract::new().context("loading the embedded schemas")?;
    let max = config.worker.max_message_bytes;
    let mut valid = Vec::new();
    let mut invalid: Vec<Problem> = Vec::new();
    for (source, text) in read_inputs(&opts.inputs)? {
        let (records, problems) = split(&source, &text);
        invalid.extend(problems);
        for r in records {
            match contract.validate(r.raw.as_bytes(), max) {
                Ok(event) => valid.push(Valid {
                    at: r.at,
                    event,
                    raw: r.raw,
                }),
                Err(e) => invalid.push(Problem {
                    at: r.at,
                    error: e.to_string(),
                }),
            }
        }
    }
    let total = valid.len() + invalid.len();
    if !opts.json {
        for p in &invalid {
            eprintln!("{}: {}", p.at, p.error);
        }
    }
    let exchange = Topology::new(&config.prefix, &[]).events_exchange();
    let report = |published: usize, failed: &[Failed], note: &str| {
        json!({
            "exchange": exchange,
            "dry_run": opts.dry_run,
            "events": total,
            "valid": valid.len(),
            "invalid": invalid,
            "published": published,
            "failed": failed,
            "note": note,
        })
    };
    if total == 0 {
        anyhow::bail!("no events in the input: give JSON-lines or JSON files (e.g. `halosync publish events.jsonl`)");
    }
    if !invalid.is_empty() && !opts.skip_invalid {
        let note = if valid.is_empty() {
            format!(
                "{} of {total} events are invalid; nothing was published. Fix them and publish again.",
                invalid.len()
            )
        } else {
            format!(
                "{} of {total} events are invalid; nothing was published. Fix them, or pass --skip-invalid to publish the {} valid ones.",
                invalid.len(),
                valid.len()
            )
        };
        if opts.json {
            println!("{}", serde_json::to_string_pretty(&report(0, &[], &note))?);
        } else {
            eprintln!("error: {note}");
        }
        return Ok(ExitCode::FAILURE);
    }
    if opts.dry_run {
        let note = format!(
            "{} of {total} events are valid; nothing was published (--dry-run).",
            valid.len()
        );
        if opts.json {
            println!("{}", serde_json::to_string_pretty(&report(0, &[], &note))?);
        } else {
            println!("{note}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    if valid.is_empty() {
        anyhow::bail!("every event of the input is invalid; nothing to publish");
    }

    let outgoing: Vec<Outgoing> = valid
        .iter()
        .map(|v| Outgoing {
            at: &v.at,
            event: &v.event,
            raw: &v.raw,
        })
        .collect();
    let (published, failed, stopped) =
        publish_events(config, "publish", &outgoing, &FieldTable::default()).await?;

    let mut note = format!(
        "published {published} of {} events to {exchange}, each confirmed by the broker",
        valid.len()
    );
    if !invalid.is_empty() {
        note.push_str(&format!("; skipped {} invalid ones", invalid.len()));
    }
    if opts.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report(published, &failed, &note))?
        );
    } else {
        for f in &failed {
            eprintln!("{}: {} was not published: {}", f.at, f.event_id, f.error);
        }
        println!("{}.", capitalised(&note));
    }
    if let Some(why) = &stopped {
        eprintln!(
            "error: stopped after {published} events: {why}; the events after it were not published (publishing again is safe: workers ignore event ids they have applied)"
        );
    } else if !failed.is_empty() {
        eprintln!(
            "error: {} events were refused by the broker (nacked or returned); publish them again once the broker is healthy",
            failed.len()
        );
    }
    Ok(if failed.is_empty() && stopped.is_none() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// One event to publish: where it came from, the validated envelope, and
/// its text (published as is).
pub struct Outgoing<'a> {
    pub at: &'a Location,
    pub event: &'a Envelope,
    pub raw: &'a str,
}

/// Publishes validated events to `halosync.events` with confirms and the
/// mandatory flag, each with `headers` added (`halosync reconcile --repair`
/// adds `x-halosync-repair`). Returns how many were confirmed, the ones the
/// broker refused, and why publishing stopped early (a broker failure), if
/// it did. The one publishing path of the tool.
pub async fn publish_events(
    config: &Config,
    connection_name: &str,
    events: &[Outgoing<'_>],
    headers: &FieldTable,
) -> anyhow::Result<(usize, Vec<Failed>, Option<String>)> {
    let conn = broker::connect(config, connection_name).await?;
    let result = publish_all(config, &conn, events, headers).await;
    broker::close(&conn).await;
    result
}

async fn publish_all(
    config: &Config,
    conn: &lapin::Connection,
    valid: &[Outgoing<'_>],
    headers: &FieldTable,
) -> anyhow::Result<(usize, Vec<Failed>, Option<String>)> {
    let topology = Topology::new(&config.prefix, &config.retry.delays_ms());
    let channel = conn
        .create_channel()
        .await
        .context("opening a RabbitMQ channel")?;
    topology
        .declare(&channel)
        .await
        .context("declaring the topology before publishing")?;
    let publisher = Publisher::on_channel(channel, topology)
        .await
        .context("putting the channel in confirm mode")?;
    let mut published = 0;
    let mut failed = Vec::new();
    for v in valid {
        // Each event starts a trace; its `traceparent` header lets the
        // worker's spans continue it (exported when OTEL_EXPORTER_OTLP_ENDPOINT
        // is set).
        let span = tracing::info_span!("publish", event_id = %v.event.id, event_type = %v.event.event_type);
        match publisher
            .publish_raw(
                &v.event.id,
                &v.event.event_type,
                v.raw.as_bytes(),
                headers.clone(),
            )
            .instrument(span)
            .await
        {
            Ok(()) => published += 1,
            Err(PublishError::Broker(e)) => {
                return Ok((
                    published,
                    failed,
                    Some(format!("{} ({}): RabbitMQ: {e}", v.at, v.event.id)),
                ))
            }
            Err(e) => failed.push(Failed {
                at: v.at.clone(),
                event_id: v.event.id.clone(),
                error: e.to_string(),
            }),
        }
    }
    Ok((published, failed, None))
}

fn capitalised(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_keep_their_line_numbers() {
        let text = "{\"a\":1}\n\n{\"b\":2}\nnot json\n";
        let (r, p) = split("f", text);
        assert!(p.is_empty());
        let lines: Vec<usize> = r.iter().filter_map(|r| r.at.line).collect();
        assert_eq!(lines, vec![1, 3, 4]);
        assert_eq!(r[2].raw, "not json");
        assert_eq!(r[0].at.to_string(), "f:1");
    }

    #[test]
    fn pretty_documents_are_one_event_each() {
        let text = "\n{\n  \"a\": 1\n}\n{\n  \"b\": 2\n}\n";
        let (r, p) = split("f", text);
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].at.line, Some(2));
        assert_eq!(r[1].at.line, Some(5));
        assert_eq!(r[0].raw, "{\n  \"a\": 1\n}");
    }

    #[test]
    fn a_broken_pretty_document_names_its_line() {
        let text = "{\n  \"a\": 1,\n  oops\n}\n";
        let (r, p) = split("f", text);
        assert!(r.is_empty());
        assert_eq!(p[0].at.line, Some(3));
    }

    #[test]
    fn arrays_are_split_by_index() {
        let (r, p) = split("f", "[{\"a\":1}, {\"b\":2}]");
        assert!(p.is_empty());
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].at.to_string(), "f[1]");
    }

    #[test]
    fn validates_the_shipped_examples() {
        let contract = Contract::new().unwrap();
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas/examples");
        for (sub, ok) in [("valid", true), ("invalid", false)] {
            for entry in std::fs::read_dir(dir.join(sub)).unwrap() {
                let path = entry.unwrap().path();
                let text = std::fs::read_to_string(&path).unwrap();
                let (records, problems) = split("x", &text);
                assert!(problems.is_empty(), "{}", path.display());
                assert_eq!(records.len(), 1, "{}", path.display());
                let result = contract.validate(records[0].raw.as_bytes(), 256 * 1024);
                assert_eq!(result.is_ok(), ok, "{}: {result:?}", path.display());
            }
        }
    }
}
