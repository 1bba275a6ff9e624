//! `halo-sim` binary: serves the simulator until SIGINT/SIGTERM.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use halo_sim::{parse_rate_limit, Faults, SimConfig, SimHandle};

/// Items seeded by default so that `make run` has a catalogue.
const DEFAULT_ITEMS: &[(i64, &str)] = &[
    (1001, "Microsoft 365 Business Basic"),
    (1002, "Microsoft 365 Business Premium"),
    (1003, "Managed Backup (per GB)"),
    (1004, "Endpoint Protection"),
    (1005, "Usage overage"),
];

#[derive(Debug, Parser)]
#[command(
    name = "halo-sim",
    version,
    about = "A HaloPSA REST API simulator with fault injection",
    long_about = "A HaloPSA REST API simulator with fault injection, for tests and `make run`.\n\n\
It serves the resource server at http://LISTEN/api and the authorisation server at \
http://LISTEN/auth (token endpoint: POST /auth/token, form-encoded client credentials). \
State is in memory only. Simulator controls live under /_sim/ (no auth): \
GET /_sim/state, GET /_sim/requests, POST /_sim/reset, GET|POST /_sim/faults, \
POST /_sim/revoke-tokens, POST /_sim/items.\n\n\
Logs are JSON lines on stdout (RUST_LOG sets the level).",
    after_help = "Example:\n  halo-sim --listen 127.0.0.1:18080 --client-id halosync-sim \\\n    \
--client-secret sim-secret --tenant acme --rate-limit 300/300 \\\n    \
--items '1234=Microsoft 365 Business Premium'\n\n\
  curl -s -X POST 'http://127.0.0.1:18080/auth/token?tenant=acme' \\\n    \
-d grant_type=client_credentials -d client_id=halosync-sim \\\n    \
-d client_secret=sim-secret -d scope=all"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:18080")]
    listen: SocketAddr,
    /// The accepted client id.
    #[arg(long, default_value = "halosync-sim")]
    client_id: String,
    /// The accepted client secret.
    #[arg(
        long,
        env = "HALO_SIM_CLIENT_SECRET",
        hide_env_values = true,
        default_value = "sim-secret"
    )]
    client_secret: String,
    /// Tenant required on token requests (omit for on-premise).
    #[arg(long)]
    tenant: Option<String>,
    /// Token lifetime (`expires_in`) in seconds.
    #[arg(long, default_value_t = 3600)]
    token_lifetime: u64,
    /// Milliseconds of latency added to every /api request.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Share (0..1) of /api requests answered 500 at random.
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Share (0..1) of successful writes whose answer is lost: applied, then
    /// answered 500.
    #[arg(long, default_value_t = 0.0)]
    lost_response_rate: f64,
    /// Make multi-element POSTs all-or-nothing (by default the elements
    /// before a refused one stay saved, as HaloPSA is not known to have
    /// transactions).
    #[arg(long)]
    transactional_arrays: bool,
    /// Rolling-window rate limit as N/SECS, e.g. 300/300 (429 beyond it).
    #[arg(long, value_name = "N/SECS")]
    rate_limit: Option<String>,
    /// Do not send Retry-After on 429.
    #[arg(long)]
    no_retry_after: bool,
    /// Answer expired/revoked tokens with 400 "Token not found" instead of 401.
    #[arg(long)]
    token_not_found: bool,
    /// Seed items: `ID=NAME` (repeatable, or several separated by `;`), or a
    /// file with one `ID=NAME` per line or a JSON array of {"id","name"}.
    #[arg(long, value_name = "FILE_OR_INLINE")]
    items: Vec<String>,
    /// Do not seed the default items (ids 1001..1005).
    #[arg(long)]
    no_default_items: bool,
}

fn parse_items(spec: &str) -> anyhow::Result<Vec<(i64, String)>> {
    let path = std::path::Path::new(spec);
    let text = if !spec.contains('=') && path.is_file() {
        std::fs::read_to_string(path).with_context(|| format!("reading items file {spec}"))?
    } else {
        spec.replace(';', "\n")
    };
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        let rows: Vec<serde_json::Value> =
            serde_json::from_str(trimmed).context("parsing items JSON")?;
        return rows
            .iter()
            .map(|r| {
                let id = r
                    .get("id")
                    .and_then(serde_json::Value::as_i64)
                    .context("item without integer id")?;
                let name = r
                    .get("name")
                    .and_then(serde_json::Value::as_str)
                    .context("item without name")?;
                Ok((id, name.to_string()))
            })
            .collect();
    }
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (id, name) = l
                .split_once('=')
                .with_context(|| format!("expected ID=NAME, got {l:?}"))?;
            let id: i64 = id
                .trim()
                .parse()
                .with_context(|| format!("bad item id in {l:?}"))?;
            Ok((id, name.trim().to_string()))
        })
        .collect()
}

async fn wait_for_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();

    let rate_limit = args
        .rate_limit
        .as_deref()
        .map(|s| parse_rate_limit(s, !args.no_retry_after))
        .transpose()?;
    if !(0.0..=1.0).contains(&args.error_rate) {
        anyhow::bail!("--error-rate must be between 0 and 1");
    }
    if !(0.0..=1.0).contains(&args.lost_response_rate) {
        anyhow::bail!(
            "--lost-response-rate must be between 0 and 1, e.g. 0.05, got {}",
            args.lost_response_rate
        );
    }
    let mut items: Vec<(i64, String)> = Vec::new();
    if !args.no_default_items {
        items.extend(DEFAULT_ITEMS.iter().map(|(id, n)| (*id, (*n).to_string())));
    }
    for spec in &args.items {
        items.extend(parse_items(spec)?);
    }

    let config = SimConfig {
        client_id: args.client_id,
        client_secret: args.client_secret,
        tenant: args.tenant,
        token_lifetime_secs: args.token_lifetime,
        faults: Faults {
            latency_ms: args.latency_ms,
            error_rate: args.error_rate,
            lost_response_rate: args.lost_response_rate,
            transactional_arrays: args.transactional_arrays,
            rate_limit,
            expired_token_status: if args.token_not_found { 400 } else { 401 },
            ..Faults::default()
        },
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let sim = SimHandle::start_on(listener, config).await?;
    for (id, name) in &items {
        sim.insert_item(*id, name);
    }
    tracing::info!(
        api_url = %sim.api_url(),
        auth_url = %sim.auth_url(),
        items = items.len(),
        "halo-sim ready"
    );
    wait_for_signal().await;
    tracing::info!("shutting down");
    sim.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_items;

    #[test]
    fn inline_items() {
        let items = parse_items("1234=Microsoft 365 Business Premium;7 = Backup").unwrap();
        assert_eq!(
            items,
            vec![
                (1234, "Microsoft 365 Business Premium".to_string()),
                (7, "Backup".to_string())
            ]
        );
        assert!(parse_items("nonsense-without-equals").is_err());
        let json = parse_items(r#"[{"id": 3, "name": "X"}]"#).unwrap();
        assert_eq!(json, vec![(3, "X".to_string())]);
    }
}
