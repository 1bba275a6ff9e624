//! Connections: each configured HaloPSA connection with its settings
//! (never a secret: only where it comes from), and "Test", which runs the
//! very steps of `halosync check` ([`crate::check::report`]) against the
//! config file as it is now, so an edited file is tested at once.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::{html, Markup};

use super::access::{Operator, Viewer};
use super::audit::AuditOutcome;
use super::auth::SignedIn;
use super::{layout, problem, Shared};
use crate::check::{self, Report};
use crate::settings::{connection_names, raw_connection_key};

/// The keys shown, in order; anything else (a misplaced secret) never is.
const SHOWN: [&str; 12] = [
    "resource_server",
    "auth_server",
    "tenant",
    "client_id",
    "client_secret_env",
    "client_secret_file",
    "scope",
    "requests_per_window",
    "window_seconds",
    "match_existing_by_name",
    "overwrite_prices",
    "overwrite_names",
];

fn current_text(app: &Shared) -> String {
    crate::settings::read(app.config_path.as_deref())
        .map(|(_, t)| t)
        .unwrap_or_else(|_| app.config_text.clone())
}

fn settings_table(text: &str, name: &str) -> Markup {
    let items = raw_connection_key(text, name, "items")
        .and_then(|v| v.as_table().map(|t| t.len()))
        .unwrap_or(0);
    html! {
        table.settings {
            tbody {
                @for key in SHOWN {
                    @if let Some(v) = raw_connection_key(text, name, key) {
                        tr { th { (key) } td { code { (match v { toml::Value::String(s) => s, o => o.to_string() }) } } }
                    }
                }
                tr { th { "client secret" } td.muted { "never shown (read from the variable or file above)" } }
                tr { th { "item mappings in the file" } td { (items) } }
            }
        }
    }
}

fn report_view(r: &Report) -> Markup {
    html! {
        div.card #report {
            h2.mt0 {
                @if r.ok { span.pill.ok { "✔ all checks passed" } } @else { span.pill.bad { "✘ " (r.checks.iter().filter(|c| c.ok == Some(false)).count()) " of " (r.checks.len()) " checks failed" } }
            }
            ul.checks {
                @for c in &r.checks {
                    @let class = match c.ok { Some(true) => "ok", Some(false) => "bad", None => "skip" };
                    li class=(class) data-check=(c.check) {
                        span.mark { (match c.ok { Some(true) => "✔", Some(false) => "✘", None => "·" }) }
                        " " (c.summary)
                        @if let Some(m) = &c.halo_message { div.halo { "HaloPSA: " (m) } }
                        @if c.ok == Some(false) { @if let Some(a) = &c.advice { div.fix { b { "Fix: " } (a) } } }
                        @for n in &c.notes { div.muted { (n) } }
                    }
                }
            }
        }
    }
}

fn view(app: &Shared, who: &SignedIn, result: Option<(&str, &Report)>) -> Markup {
    let text = current_text(app);
    let names = connection_names(&text);
    layout::page(
        "Connections",
        "/connections",
        who,
        html! {
            h1 { "Connections" }
            p.sub { "Each HaloPSA connection of " code { (app.config_path.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "halosync.toml".into())) } ". Test runs the same steps as " code { "halosync check" } " against the file as it is now." }
            @if names.is_empty() { div.card.muted { "No [connections.NAME] table is configured." } }
            @for name in &names {
                div.card id={"conn-" (name)} {
                    div.row {
                        h2.m0.grow { (name) }
                        @if who.is_operator() {
                            form.inline method="post" action={"/connections/test#conn-" (name)} {
                                (layout::csrf(who))
                                input type="hidden" name="connection" value=(name);
                                button.btn type="submit" id={"test-" (name)} { "Test" }
                            }
                        }
                    }
                    (settings_table(&text, name))
                    @if let Some((n, r)) = result { @if n == name { (report_view(r)) } }
                }
            }
        },
    )
}

pub async fn list(State(app): State<Shared>, Viewer(who): Viewer) -> Response {
    view(&app, &who, None).into_response()
}

pub async fn test(State(app): State<Shared>, Operator { who, form }: Operator) -> Response {
    let Some(name) = form.get("connection").map(str::to_string) else {
        return problem(
            StatusCode::BAD_REQUEST,
            Some(&who),
            "Which connection?",
            "Press Test next to a connection.",
        );
    };
    let report = check::report(app.config_path.as_deref(), Some(&name)).await;
    let failed: Vec<String> = report
        .checks
        .iter()
        .filter(|c| c.ok == Some(false))
        .map(|c| c.check.clone())
        .collect();
    let detail = if failed.is_empty() {
        None
    } else {
        Some(format!("failed: {}", failed.join(", ")))
    };
    if let Err(r) = super::record(
        &app,
        &who,
        "test",
        &format!("connection {name}"),
        if report.ok {
            AuditOutcome::Succeeded
        } else {
            AuditOutcome::Failed
        },
        report.checks.len(),
        vec![],
        detail,
        None,
    )
    .await
    {
        return r;
    }
    view(&app, &who, Some((&name, &report))).into_response()
}
