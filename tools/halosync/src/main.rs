//! `halosync`: the operator's tool (DESIGN §7), the command line of the
//! `halosync_cli` library (`lib.rs`): this file parses the arguments and
//! calls the library's operations; the library never calls back here.
//!
//! Exit codes: 0 success, 1 the command ran and something failed (an
//! invalid event, a nacked publish, a failed check, a refused purge), 2 a
//! bad command line (clap). `reconcile` follows DESIGN §8: 0 in step, 1
//! drift found, 2 it could not run (bad snapshot, unreachable service).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use clap::builder::{PossibleValuesParser, TypedValueParser};
use halosync_cli::dead::{parse_since, FamilyArg, FilterArgs, GroupBy, Since};
use halosync_cli::settings::with_connection;
use halosync_cli::{activity, check, console, dlq, mappings, publish, reconcile, settings, status};
use halosync_shared::Settled;

const ROOT_EXAMPLES: &str = "\
Examples:
  halosync status                                   queue depths, consumers, dead letters
  halosync publish events.jsonl                     validate, then publish with confirms
  halosync dlq list --group-by class                dead letters grouped by failure class
  halosync dlq replay --class unmapped --dry-run    what a replay would move back
  halosync check --connection acme                  test a HaloPSA connection (\"Save and Test\")
  halosync reconcile --connection acme --snapshot state.jsonl   HaloPSA vs the billing platform

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
invoices, external links) and explains each failure with HaloPSA's own text. Then
reports the TLS handshake of RabbitMQ, Redis and HaloPSA (protocol version, what the
certificate was verified against, or \"not TLS\") and logs in to RabbitMQ and Redis as
the workers do. Exit code 0 only if everything the workers need works.

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
    /// The activity log: every settled message of the last 30 days.
    #[command(after_help = "\
Reads the activity stream (halosync.activity) and shows the newest records first,
50 per page. Filters combine; --event-id and --aggregate match a part of the id.
--csv writes every matching record (all pages) as CSV; --json prints the page.

Examples:
  halosync activity
  halosync activity --connection acme --outcome dead-lettered --since 24h
  halosync activity --event-id evt_01JD3V6Q8Y
  halosync activity --aggregate sub_42 --family subscription
  halosync activity --since 2026-11-20 --until 2026-11-21 --csv > activity.csv
  halosync activity --page 2 --per-page 100 --json")]
    Activity(ActivityArgs),
    /// Item mappings (sku -> HaloPSA item) stored in HaloPSA: list, set, unmapped.
    #[command(
        subcommand,
        after_help = "\
Examples:
  halosync mappings unmapped                                 skus waiting in the dead letters
  halosync items --connection acme --search \"business premium\"
  halosync mappings set --connection acme --sku MS-365-BP --item 1001 --replay
  halosync mappings list --connection acme"
    )]
    Mappings(MappingsCommand),
    /// HaloPSA's items (from /Item), to choose a mapping from.
    #[command(after_help = "\
Examples:
  halosync items --connection acme
  halosync items --connection acme --search premium
  halosync items --connection acme --json")]
    Items(ItemsArgs),
    /// Compare HaloPSA with the billing platform's snapshot; report (and --repair) drift.
    #[command(after_help = "\
The snapshot is the billing platform's current state as JSON lines, one event per
aggregate, in the `halosync publish` format; every line is validated first, and a bad
line stops the command (exit 2) before anything is read. HaloPSA is read in bulk
(paged lists, at most one request per 100 records) within the connection's shared
budget. Drift per aggregate: missing, differs (field by field, honouring
overwrite_prices / overwrite_names), duplicated, orphaned (reported, never deleted).
Nothing is written without --repair, which republishes the snapshot event of each
drifted aggregate (not orphans) with the header x-halosync-repair: true. The report is
kept in Redis for the console's Reconcile page.

Exit status: 0 in step, 1 drift found, 2 could not run.

Examples:
  halosync reconcile --connection acme --snapshot state.jsonl
  halosync reconcile --connection acme --snapshot state.jsonl --json
  halosync reconcile --connection acme --snapshot state.jsonl --family subscription,usage
  halosync reconcile --connection acme --snapshot state.jsonl --account acc_1001
  fetch-billing-state | halosync reconcile --connection acme --snapshot - --repair")]
    Reconcile(ReconcileArgs),
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
struct ReconcileArgs {
    /// The connection, as in [connections.NAME] (may be left out when only one is configured).
    #[arg(long, value_name = "NAME")]
    connection: Option<String>,
    /// The billing platform's state: a JSON-lines file, or `-` for standard input.
    #[arg(long, value_name = "FILE|-")]
    snapshot: PathBuf,
    /// Only these families (repeat or comma-separate) [default: all four].
    #[arg(long, value_enum, value_delimiter = ',', value_name = "FAMILY")]
    family: Vec<FamilyArg>,
    /// Only one customer: this account and its subscriptions, usage and overage.
    #[arg(long, value_name = "ACCOUNT_ID", value_parser = parse_account)]
    account: Option<String>,
    /// Republish the snapshot event of each drifted aggregate with x-halosync-repair: true.
    #[arg(long)]
    repair: bool,
}

/// A billing account id as in the events (DESIGN §1: 1-128 of
/// `[A-Za-z0-9_.:-]`).
fn parse_account(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.:-".contains(c));
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not a billing account id; type the account_id of the events, e.g. --account acc_1001"
        ))
    }
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
struct ActivityArgs {
    /// Only this connection.
    #[arg(long, value_name = "NAME")]
    connection: Option<String>,
    /// Only event ids containing this.
    #[arg(long, value_name = "ID")]
    event_id: Option<String>,
    /// Only aggregates containing this (e.g. sub_42, acc_7).
    #[arg(long, value_name = "KEY")]
    aggregate: Option<String>,
    /// Only this outcome.
    #[arg(long, value_name = "OUTCOME",
          value_parser = PossibleValuesParser::new(Settled::LABELS).try_map(|s| s.parse::<Settled>()))]
    outcome: Option<Settled>,
    /// Only this family.
    #[arg(long, value_enum, value_name = "FAMILY")]
    family: Option<FamilyArg>,
    /// Only records this recent: a duration (30m, 24h, 7d) or a time (RFC 3339, or YYYY-MM-DD).
    #[arg(long, value_name = "WHEN", value_parser = parse_since)]
    since: Option<Since>,
    /// Only records before this: a duration back from now (1h) or a time.
    #[arg(long, value_name = "WHEN", value_parser = parse_since)]
    until: Option<Since>,
    /// Page to show (1 = newest).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    page: u32,
    /// Records per page (1 to 1000).
    #[arg(long, value_name = "N", default_value_t = activity::DEFAULT_PER_PAGE as u32,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    per_page: u32,
    /// Write every matching record as CSV instead of a table.
    #[arg(long, conflicts_with = "json")]
    csv: bool,
}

#[derive(Debug, Subcommand)]
enum MappingsCommand {
    /// The mappings in force: the config's [items] and those stored in HaloPSA.
    #[command(after_help = "\
Examples:
  halosync mappings list --connection acme
  halosync mappings list --connection acme --json")]
    List(ConnectionArg),
    /// Map a sku (or sku:metric, overage:metric) to a HaloPSA item, stored in HaloPSA.
    #[command(after_help = "\
Checks that the item exists, stores the mapping as an ExternalLink on the item
(replacing the sku's previous mapping, if any), and tells which dead letters wait
for it; --replay replays those at once. Every worker sees the mapping from its
next message on, without a restart. The config's [items] keeps precedence.

Examples:
  halosync mappings set --connection acme --sku MS-365-BP --item 1001
  halosync mappings set --connection acme --sku MS-365-BP:storage_gb --item 1002 --replay")]
    Set(SetArgs),
    /// Skus dead-lettered as `unmapped`, grouped, with the keys the workers tried.
    #[command(after_help = "\
Examples:
  halosync mappings unmapped
  halosync mappings unmapped --connection acme --json")]
    Unmapped(OptionalConnectionArg),
}

#[derive(Debug, Args)]
struct ConnectionArg {
    /// The connection, as in [connections.NAME] (may be left out when only one is configured).
    #[arg(long, value_name = "NAME")]
    connection: Option<String>,
}

#[derive(Debug, Args)]
struct OptionalConnectionArg {
    /// Only this connection's dead letters.
    #[arg(long, value_name = "NAME")]
    connection: Option<String>,
}

#[derive(Debug, Args)]
struct SetArgs {
    /// The connection, as in [connections.NAME] (may be left out when only one is configured).
    #[arg(long, value_name = "NAME")]
    connection: Option<String>,
    /// The product sku as in the events (data.product.sku), or sku:metric, or overage:metric.
    #[arg(long, value_name = "SKU")]
    sku: String,
    /// The HaloPSA item id (see `halosync items`).
    #[arg(long, value_name = "ID")]
    item: i64,
    /// Replay the sku's unmapped dead letters right after mapping it.
    #[arg(long)]
    replay: bool,
}

#[derive(Debug, Args)]
struct ItemsArgs {
    /// The connection, as in [connections.NAME] (may be left out when only one is configured).
    #[arg(long, value_name = "NAME")]
    connection: Option<String>,
    /// Only items whose name contains this (case-insensitive).
    #[arg(long, value_name = "TEXT")]
    search: Option<String>,
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
        Command::Activity(a) => {
            let loaded = settings::load(config_path, settings::Need::NoConnections)?;
            let options = activity::Options {
                connection: a.connection,
                event_id: a.event_id,
                aggregate: a.aggregate,
                outcome: a.outcome,
                family: a
                    .family
                    .map(|f| halosync_shared::Family::from(f).as_str().to_string()),
                since: a.since,
                until: a.until,
                page: a.page as usize,
                per_page: a.per_page as usize,
                csv: a.csv,
                json,
            };
            activity::run(&loaded.config, &options).await
        }
        Command::Mappings(cmd) => match cmd {
            MappingsCommand::List(a) => {
                let (config, name) = with_connection(config_path, a.connection.as_deref())?;
                mappings::cli_list(&config, &name, json).await
            }
            MappingsCommand::Set(a) => {
                let (config, name) = with_connection(config_path, a.connection.as_deref())?;
                mappings::cli_set(&config, &name, &a.sku, a.item, a.replay, json).await
            }
            MappingsCommand::Unmapped(a) => {
                let loaded = settings::load(config_path, settings::Need::NoConnections)?;
                mappings::cli_unmapped(&loaded.config, a.connection.as_deref(), json).await
            }
        },
        Command::Reconcile(a) => {
            // DESIGN §8: 2 when the command could not run, whatever the
            // reason (config, snapshot, Redis, HaloPSA), not anyhow's 1.
            let run = async {
                let (config, connection) = with_connection(config_path, a.connection.as_deref())?;
                reconcile::run(
                    &config,
                    &reconcile::Options {
                        connection,
                        snapshot: a.snapshot,
                        families: a.family.into_iter().map(Into::into).collect(),
                        account: a.account,
                        repair: a.repair,
                        json,
                    },
                )
                .await
            };
            match run.await {
                Ok(code) => Ok(code),
                Err(e) => {
                    eprintln!("error: {e:#}");
                    Ok(ExitCode::from(reconcile::CANNOT_RUN))
                }
            }
        }
        Command::Items(a) => {
            let (config, name) = with_connection(config_path, a.connection.as_deref())?;
            mappings::cli_items(&config, &name, a.search.as_deref(), json).await
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
