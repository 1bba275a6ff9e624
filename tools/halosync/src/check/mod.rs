//! `halosync check --connection NAME`: the "Save and Test" of the seeds'
//! integrations (Appxite, Gradient MSP), for one configured HaloPSA
//! connection.
//!
//! 1. **config**: what the connection's settings mean, saying what was
//!    normalised: a `Not set` tenant (on-premise), a pasted host as tenant,
//!    a trailing slash on `auth_server`; a hosted-looking instance without a
//!    tenant is flagged.
//! 2. **token**: minted directly over HTTP (not through the Redis cache:
//!    the check shows what HaloPSA answers *now*); `invalid_client`, the HTML
//!    500 of a missing or wrong tenant, a wrong authorisation server and a
//!    refused scope are each explained. The token is never printed.
//! 3. **one harmless GET per area** the workers use (`count=1`): customers,
//!    items, software licences, recurring invoices, invoices, external
//!    links. A 401 right after minting means the scope is missing or
//!    insufficient; a 403 means the application's Permissions tab or the
//!    login agent's role lacks the area.
//! 4. **write access by scope**: HaloPSA has no dry run for writes, so the
//!    edit permissions the workers need are checked against the scope.
//!
//! | module | what it checks |
//! |---|---|
//! | [`halopsa`] | steps 1 to 4 above |
//! | [`transport`] | the TLS handshake and login of RabbitMQ, Redis and HaloPSA |
//! | [`item`] | the checklist's lines, which both produce |
//!
//! Exit code 0 only if every check passes.

mod halopsa;
mod item;
mod transport;

use std::path::Path;
use std::process::ExitCode;

pub use item::{Item, Report};

/// `halosync check`
pub async fn run(
    config_path: Option<&Path>,
    name: Option<&str>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let report = report(config_path, name).await;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Runs every step of the check for one connection: the single code path
/// of `halosync check` and of the console's "Test" button.
pub async fn report(config_path: Option<&Path>, name: Option<&str>) -> Report {
    match halopsa::prepare(config_path, name) {
        Err(item) => Report {
            connection: name.map(str::to_string),
            ok: false,
            checks: vec![*item],
        },
        Ok((conn, text)) => {
            let mut checks = halopsa::run_checks(&conn, &text).await;
            // The TLS handshake and login of RabbitMQ, Redis and HaloPSA.
            checks.extend(transport::items(config_path, &conn).await);
            Report {
                connection: Some(conn.name.clone()),
                ok: checks.iter().all(|c| c.ok == Some(true)),
                checks,
            }
        }
    }
}

fn print_report(report: &Report) {
    if let Some(c) = &report.connection {
        println!("halosync check: connection {c}\n");
    }
    for item in &report.checks {
        let mark = match item.ok {
            Some(true) => "✔",
            Some(false) => "✘",
            None => "·",
        };
        println!("{mark} {}", item.summary);
        if item.ok == Some(false) {
            if let Some(a) = &item.advice {
                println!("    → {a}");
            }
        }
        for n in &item.notes {
            println!("    {n}");
        }
    }
    println!();
    let failed = report.checks.iter().filter(|c| c.ok == Some(false)).count();
    let total = report.checks.len();
    if report.ok {
        println!(
            "All {total} checks passed: the workers can use this connection. (Reads were tried; write permissions were judged from the scope, since HaloPSA has no dry run for writes: the login agent's role also needs Read and Modify on Customers, Software Licencing and Invoices.)"
        );
    } else {
        let again = match &report.connection {
            Some(c) => format!("halosync check --connection {c}"),
            None => "halosync check".to_string(),
        };
        println!(
            "{failed} of {total} checks failed: the workers cannot use this connection until the ✘ items are fixed; then run `{again}` again."
        );
    }
}
