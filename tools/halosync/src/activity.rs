//! `halosync activity`: the activity log (every settled message of the last
//! 30 days), searched and paged through the same
//! `halosync_shared::activity::ActivityLog` the console uses.
//!
//! The command reads the stream into memory, waits until it has caught up
//! (no delivery for [`IDLE`]), answers, and exits. `--csv` writes every
//! matching record (paging does not apply), `--json` the page.

use std::process::ExitCode;
use std::time::Duration;

use chrono::Utc;
use halosync_shared::activity::{self, ActivityFilter, ActivityLog, ActivityPage};
use halosync_shared::{Config, Settled};

use crate::dead::Since;
use crate::table;

/// The backlog is read when the broker has sent nothing for this long.
pub const IDLE: Duration = Duration::from_millis(400);
/// Reading the backlog gives up waiting after this long (and answers with
/// what it has).
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// The parsed command line of `halosync activity`.
#[derive(Debug, Default)]
pub struct Options {
    pub connection: Option<String>,
    pub event_id: Option<String>,
    pub aggregate: Option<String>,
    pub outcome: Option<Settled>,
    pub family: Option<String>,
    pub since: Option<Since>,
    pub until: Option<Since>,
    pub page: usize,
    pub per_page: usize,
    pub csv: bool,
    pub json: bool,
}

impl Options {
    pub fn filter(&self) -> ActivityFilter {
        let now = Utc::now();
        ActivityFilter {
            event_id: self.event_id.clone(),
            aggregate: self.aggregate.clone(),
            connection: self.connection.clone(),
            family: self.family.clone(),
            outcome: self.outcome,
            since: self.since.as_ref().map(|s| s.cutoff(now)),
            until: self.until.as_ref().map(|s| s.cutoff(now)),
        }
    }

    /// These options as arguments (for the "next page" hint).
    fn as_args(&self, page: usize) -> String {
        let mut out = vec!["halosync activity".to_string()];
        let mut push = |flag: &str, v: &Option<String>| {
            if let Some(v) = v {
                out.push(format!("{flag} {}", table::shell_word(v)));
            }
        };
        push("--connection", &self.connection);
        push("--event-id", &self.event_id);
        push("--aggregate", &self.aggregate);
        push("--outcome", &self.outcome.map(|o| o.as_str().to_string()));
        push("--family", &self.family);
        if let Some(s) = &self.since {
            out.push(format!("--since {}", table::shell_word(&s.as_arg())));
        }
        if let Some(s) = &self.until {
            out.push(format!("--until {}", table::shell_word(&s.as_arg())));
        }
        out.push(format!("--page {page}"));
        if self.per_page != DEFAULT_PER_PAGE {
            out.push(format!("--per-page {}", self.per_page));
        }
        out.join(" ")
    }
}

pub const DEFAULT_PER_PAGE: usize = 50;

/// Opens the log and reads it up to now.
pub async fn open(config: &Config) -> anyhow::Result<ActivityLog> {
    let log = ActivityLog::connect(
        &config.amqp_url,
        &config.amqp_access,
        "halosync-cli:activity",
        &config.prefix,
        activity::DEFAULT_MAX_RECORDS,
    )
    .await?;
    log.wait_caught_up(IDLE, MAX_WAIT).await;
    Ok(log)
}

/// `halosync activity`
pub async fn run(config: &Config, o: &Options) -> anyhow::Result<ExitCode> {
    let log = open(config).await?;
    let filter = o.filter();
    if o.csv {
        let rows = log.all(&filter);
        let stdout = std::io::stdout();
        activity::write_csv(&rows, stdout.lock())?;
        return Ok(ExitCode::SUCCESS);
    }
    let page = log.query(&filter, o.page, o.per_page);
    if o.json {
        println!("{}", serde_json::to_string_pretty(&page)?);
        return Ok(ExitCode::SUCCESS);
    }
    print!("{}", render(&page, o));
    Ok(ExitCode::SUCCESS)
}

/// The page as a table with a footer.
pub fn render(page: &ActivityPage, o: &Options) -> String {
    if page.total == 0 {
        return "No activity matches (the log keeps 30 days; widen --since or drop a filter).\n"
            .to_string();
    }
    let rows: Vec<Vec<String>> = page
        .rows
        .iter()
        .map(|r| {
            let mut detail = r.class.map(|c| c.to_string()).unwrap_or_default();
            if let Some(s) = r.halo_status {
                detail = format!("{detail} HTTP {s}").trim().to_string();
            }
            if let Some(m) = &r.message {
                detail = format!("{detail}: {}", table::one_line(m, 80))
                    .trim_start_matches(": ")
                    .to_string();
            }
            vec![
                table::time(&r.time),
                r.connection.clone(),
                r.family.clone(),
                r.event_id.clone(),
                r.aggregate.clone(),
                r.outcome.to_string(),
                r.attempts.to_string(),
                detail,
            ]
        })
        .collect();
    let mut out = table::render(
        &[
            "TIME",
            "CONNECTION",
            "FAMILY",
            "EVENT",
            "AGGREGATE",
            "OUTCOME",
            "ATTEMPT",
            "DETAIL",
        ],
        &rows,
        &[6],
    );
    out.push_str(&format!(
        "\nPage {} of {} ({}, newest first).",
        page.page,
        page.pages,
        table::plural(page.total as u64, "record")
    ));
    if page.page < page.pages {
        out.push_str(&format!(" Next: {}", o.as_args(page.page + 1)));
    }
    out.push('\n');
    out
}
