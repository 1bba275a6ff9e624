//! `halosync`: the operator's tool (DESIGN §7).
//!
//! | command | what it does | module |
//! |---|---|---|
//! | `publish` | validate JSON events against `schemas/`, publish them with confirms | [`publish`] |
//! | `dlq list / show / replay / purge` | dead letters, grouped, replayed, purged | [`dlq`], [`dead`] |
//! | `check` | HaloPSA connection test: token, then each permission the workers need | [`check`] |
//! | `topology` | declare every exchange and queue (idempotent) | [`status`] |
//! | `status` | queue depths, consumers, retry tiers, dead letters, unrouted | [`status`] |
//! | `console` | the operator's web console (sign-in, roles, audit) | [`console`] |
//!
//! Exit codes: 0 success, 1 the command ran and something failed (an
//! invalid event, a nacked publish, a failed check, a refused purge), 2 a
//! bad command line (clap).

mod broker;
mod check;
mod console;
mod dead;
mod dlq;
mod publish;
mod settings;
mod status;
mod table;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::dead::{parse_since, FamilyArg, Since, CLASSES};

const ROOT_EXAMPLES: &str = "\
Examples:
  halosync status                                   queue depths, consumers, dead letters
  halosync publish events.jsonl                     validate, then publish with confirms
  halosync dlq list --group-by class                dead letters grouped by failure class
  halosync dlq replay --class unmapped --dry-run    what a replay would move back
  halosync check --connection acme                  test a HaloPSA connection (\"Save and Test\")

Configuration: --config FILE or HALOSYNC_CONFIG (default ./halosync.toml; without
one, the defaults apply). AMQP_URL, REDIS_URL and HALOSYNC_PREFIX override the file.";

#[derive(Debug, Parser)]
#[command(
    name = "halosync",
    version,
    about = "The halosync operator's tool: publish events, inspect and replay dead letters, test a HaloPSA connection, declare the topology, show queue status.",
    after_help = ROOT_EXAMPLES,
    propagate_version = true
)]
struct Cli {
    /// The TOML config file [default: ./halosync.toml, or built-in defaults
    /// when it does not exist].
    #[arg(
        long,
        short = 'c',
        env = "HALOSYNC_CONFIG",
        global = true,
        value_name = "FILE"
    )]
    config: Option<PathBuf>,
    /// Print JSON instead of text (for scripts).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate events against the schemas, then publish them with confirms.
    #[command(after_help = "\
Each FILE holds JSON lines (one envelope per line), one pretty-printed event, or a
JSON array of events; a directory means its *.json and *.jsonl files; `-` (or no
FILE) reads standard input. Every event is validated against schemas/ first: if
any is invalid, nothing is published (unless --skip-invalid).

Examples:
  halosync publish events.jsonl
  halosync publish schemas/examples/valid/*.json
  halosync publish schemas/examples/valid/
  cat events.jsonl | halosync publish -
  halosync publish --dry-run events.jsonl           validate only")]
    Publish(PublishArgs),
    /// Dead letters: list, show, replay, purge.
    #[command(
        subcommand,
        after_help = "\
Examples:
  halosync dlq list --group-by class
  halosync dlq list --family subscription --class unmapped --since 2h
  halosync dlq show evt_01JD3V6Q8Y
  halosync dlq replay --class unmapped --dry-run
  halosync dlq purge --class invalid --yes"
    )]
    Dlq(DlqCommand),
    /// Test a HaloPSA connection: token, then each permission the workers need.
    #[command(after_help = "\
Mints a token directly (not from the Redis cache), then makes one harmless GET per
area the workers use (customers, items, software licences, recurring invoices,
invoices, external links) and explains each failure with HaloPSA's own text.
Exit code 0 only if everything the workers need works.

Examples:
  halosync check --connection acme
  halosync check --connection acme --json")]
    Check(CheckArgs),
    /// Declare every exchange and queue (idempotent; workers do it too).
    #[command(after_help = "\
Examples:
  halosync topology
  HALOSYNC_PREFIX=staging. halosync topology")]
    Topology,
    /// Per family: work queue depth, consumers, retry tiers, dead letters; unrouted.
    #[command(after_help = "\
Examples:
  halosync status
  halosync status --json | jq '.families.account.dead'")]
    Status,
    /// Serve the operator's web console (sign-in required, roles, audit trail).
    #[command(after_help = "\
Users, roles and the audit file come from the [console] table of halosync.toml:

  [console]
  audit_file = \"/var/lib/halosync/audit.jsonl\"
  [console.users.alice]
  role = \"operator\"                      # or \"viewer\"
  password_hash_env = \"HALOSYNC_CONSOLE_ALICE\"

Examples:
  halosync console                                  http://127.0.0.1:8088/
  halosync console --listen 0.0.0.0:8088            in a container
  halosync console --hash-password                  read a password on stdin, print its argon2 hash")]
    Console(ConsoleArgs),
}

#[derive(Debug, Args)]
struct ConsoleArgs {
    /// Address to listen on [default: console.listen, else 127.0.0.1:8088].
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Read a password from standard input and print its argon2 hash (for
    /// password_hash_env / password_hash_file), then exit.
    #[arg(long)]
    hash_password: bool,
}

#[derive(Debug, Args)]
struct PublishArgs {
    /// JSON-lines or JSON files, directories, or `-` for standard input.
    #[arg(value_name = "FILE|DIR|-", default_value = "-")]
    inputs: Vec<PathBuf>,
    /// Publish the valid events even if some are invalid (those are reported
    /// and skipped).
    #[arg(long)]
    skip_invalid: bool,
    /// Validate only; publish nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// List dead letters (oldest first), or group them with --group-by.
    #[command(after_help = "\
Reading never loses or reorders a dead letter: they are fetched unacknowledged and
all returned, in their order, when the listing ends.

Examples:
  halosync dlq list
  halosync dlq list --group-by class
  halosync dlq list --group-by error --family subscription
  halosync dlq list --class rejected --connection acme --since 1h --limit 20
  halosync dlq list --json | jq '.[].event_id'")]
    List(ListArgs),
    /// Show one dead letter: envelope, every header, HaloPSA's message.
    #[command(after_help = "\
Examples:
  halosync dlq show evt_01JD3V6Q8Y
  halosync dlq show evt_01JD3V6Q8Y --family account --json")]
    Show(ShowArgs),
    /// Republish matching dead letters to halosync.events, then remove them.
    #[command(after_help = "\
Each matching dead letter is republished with its original routing key and event
id, the failure headers removed and x-halosync-replay-count added; it is removed
from the dead queue only after the broker confirmed the republish.

Examples:
  halosync dlq replay --class unmapped --dry-run
  halosync dlq replay --class unmapped
  halosync dlq replay --event-id evt_01JD3V6Q8Y
  halosync dlq replay --family usage --since 30m --limit 100")]
    Replay(ReplayArgs),
    /// Delete matching dead letters (asks for --yes).
    #[command(after_help = "\
Examples:
  halosync dlq purge --class invalid                shows what would go, deletes nothing
  halosync dlq purge --class invalid --yes
  halosync dlq purge --event-id evt_01JD3V6Q8Y --yes")]
    Purge(PurgeArgs),
}

/// The filters every `dlq` command takes.
#[derive(Debug, Args, Clone, Default)]
pub struct FilterArgs {
    /// Only these families' dead queues (repeat or comma-separate) [default: all four].
    #[arg(long, value_enum, value_delimiter = ',', value_name = "FAMILY")]
    pub family: Vec<FamilyArg>,
    /// Only this failure class (x-halosync-error-class; `poison` = the broker's delivery limit).
    #[arg(long, value_delimiter = ',', value_name = "CLASS",
          value_parser = clap::builder::PossibleValuesParser::new(CLASSES))]
    pub class: Vec<String>,
    /// Only events of this connection (header or envelope).
    #[arg(long, value_delimiter = ',', value_name = "NAME")]
    pub connection: Vec<String>,
    /// Only this event id (header, message_id or envelope id).
    #[arg(long, value_delimiter = ',', value_name = "ID")]
    pub event_id: Vec<String>,
    /// Only this failure group: the error message with numbers folded to `#`,
    /// as `dlq list --group-by error` prints it.
    #[arg(long, value_name = "TEXT")]
    pub error: Option<String>,
    /// Only dead letters whose last failure is this recent: a duration (30m,
    /// 1h, 2d, 1h30m) or an RFC 3339 time (2026-11-22T10:00:00Z).
    #[arg(long, value_name = "WHEN", value_parser = parse_since)]
    pub since: Option<Since>,
    /// At most this many dead letters (oldest first).
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GroupBy {
    /// By failure class.
    Class,
    /// By class and error message (numbers folded), like ServicePulse's failure groups.
    Error,
}

#[derive(Debug, Args)]
struct ListArgs {
    #[command(flatten)]
    filters: FilterArgs,
    /// Summarise instead of listing: count, first and last failure, a sample.
    #[arg(long, value_enum, value_name = "class|error")]
    group_by: Option<GroupBy>,
}

#[derive(Debug, Args)]
struct ShowArgs {
    /// The event id (the envelope `id`, also the message_id).
    #[arg(value_name = "EVENT_ID")]
    event_id: String,
    /// Only look in these families' dead queues [default: all four].
    #[arg(long, value_enum, value_delimiter = ',', value_name = "FAMILY")]
    family: Vec<FamilyArg>,
}

#[derive(Debug, Args)]
struct ReplayArgs {
    #[command(flatten)]
    filters: FilterArgs,
    /// Show what would be replayed; change nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Debug, Args)]
struct PurgeArgs {
    #[command(flatten)]
    filters: FilterArgs,
    /// Really delete the matching dead letters.
    #[arg(long)]
    yes: bool,
    /// Show what would be purged; change nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Debug, Args)]
struct CheckArgs {
    /// The connection to test, as in [connections.NAME] (may be left out when
    /// only one is configured).
    #[arg(long, value_name = "NAME")]
    connection: Option<String>,
}

fn main() -> ExitCode {
    // An empty HALOSYNC_CONFIG means "not set" (clap would refuse it). This
    // runs before any thread exists.
    if std::env::var_os("HALOSYNC_CONFIG").is_some_and(|v| v.is_empty()) {
        std::env::remove_var("HALOSYNC_CONFIG");
    }
    let cli = Cli::parse();
    // Traces (when OTEL_EXPORTER_OTLP_ENDPOINT is set) and, with RUST_LOG,
    // logs on stderr; stdout stays the command's own output.
    let _telemetry = halosync_shared::telemetry::init_cli("halosync");
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let json = cli.json;
    let config_path = cli.config.as_deref();
    match cli.command {
        Command::Publish(a) => {
            let loaded = settings::load(config_path, settings::Need::NoConnections)?;
            publish::run(
                &loaded.config,
                &publish::Options {
                    inputs: a.inputs,
                    skip_invalid: a.skip_invalid,
                    dry_run: a.dry_run,
                    json,
                },
            )
            .await
        }
        Command::Dlq(cmd) => {
            let loaded = settings::load(config_path, settings::Need::NoConnections)?;
            let config = &loaded.config;
            match cmd {
                DlqCommand::List(a) => dlq::list(config, &a.filters, a.group_by, json).await,
                DlqCommand::Show(a) => dlq::show(config, &a.event_id, &a.family, json).await,
                DlqCommand::Replay(a) => dlq::replay(config, &a.filters, a.dry_run, json).await,
                DlqCommand::Purge(a) => {
                    dlq::purge(config, &a.filters, a.yes, a.dry_run, json).await
                }
            }
        }
        Command::Check(a) => check::run(config_path, a.connection.as_deref(), json).await,
        Command::Topology => {
            let loaded = settings::load(config_path, settings::Need::NoConnections)?;
            status::topology(&loaded.config, json).await
        }
        Command::Console(a) => {
            if a.hash_password {
                let mut line = String::new();
                std::io::stdin().read_line(&mut line).map_err(|e| {
                    anyhow::anyhow!("reading the password from standard input: {e}")
                })?;
                let password = line.trim_end_matches(['\r', '\n']);
                if password.is_empty() {
                    anyhow::bail!("no password on standard input; type it, or e.g. `printf %s 'the password' | halosync console --hash-password`");
                }
                println!("{}", console::settings::hash_password(password)?);
                return Ok(ExitCode::SUCCESS);
            }
            console::serve(config_path, a.listen.as_deref()).await
        }
        Command::Status => {
            let loaded = settings::load(config_path, settings::Need::NoConnections)?;
            status::status(&loaded.config, json).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_subcommand_has_an_example() {
        fn walk(cmd: &clap::Command, path: &str) {
            let name = format!("{path} {}", cmd.get_name());
            let help = cmd
                .get_after_help()
                .map(|s| s.to_string())
                .unwrap_or_default();
            assert!(help.contains("Example"), "`{name} --help` has no example");
            for sub in cmd.get_subcommands() {
                if sub.get_name() != "help" {
                    walk(sub, &name);
                }
            }
        }
        walk(&Cli::command(), "");
    }

    #[test]
    fn bad_arguments_say_what_to_type() {
        let err = Cli::try_parse_from(["halosync", "dlq", "list", "--class", "nope"])
            .expect_err("unknown class must be refused");
        let text = err.to_string();
        assert!(
            text.contains("unmapped") && text.contains("poison"),
            "{text}"
        );
        let err = Cli::try_parse_from(["halosync", "dlq", "list", "--since", "yesterday"])
            .expect_err("bad --since must be refused");
        assert!(err.to_string().contains("30m"), "{err}");
        let err = Cli::try_parse_from(["halosync", "dlq", "list", "--family", "acount"])
            .expect_err("bad family must be refused");
        assert!(err.to_string().contains("account"), "{err}");
    }
}
