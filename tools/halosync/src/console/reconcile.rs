//! The Reconcile page: per connection, the last `halosync reconcile`
//! report (kept in Redis by the command itself, e.g. the nightly CronJob):
//! when it ran, the snapshot's size, the drift counts per kind, and the
//! drifted aggregates. Read-only: a repair is run by the command
//! (`--repair`), where its snapshot is.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use maud::{html, Markup};

use super::access::Viewer;
use super::{layout, Shared};
use crate::reconcile::diff::DriftKind;
use crate::reconcile::report::{what, Report};
use crate::table;

/// Drifted aggregates shown per connection (the rest are counted).
const SHOWN: usize = 200;

fn view(name: &str, report: &anyhow::Result<Option<Report>>) -> Markup {
    html! {
        div.card data-connection=(name) {
            h2.mt0 { "Connection " code { (name) } }
            @match report {
                Err(e) => { div.msg.bad { "Cannot read the last report: " (format!("{e:#}")) } }
                Ok(None) => {
                    p.muted { "No reconcile has run yet. Run "
                        code { "halosync reconcile --connection " (name) " --snapshot FILE" }
                        " (or enable the nightly CronJob / compose profile " code { "reconcile" } ")." }
                }
                Ok(Some(r)) => {
                    p {
                        @if r.in_step { span.pill.ok #in-step { "✔ in step" } }
                        @else { span.pill.bad #drifted { "✘ " (r.drifted_aggregates) " aggregates drifted" } }
                        " "
                        span.muted {
                            "at " (table::time(&r.at)) " (" (table::age(&r.at, &chrono::Utc::now())) "), snapshot "
                            code { (r.snapshot.source) } ": " (r.snapshot.events) " events, "
                            (r.snapshot.aggregates) " aggregates in scope (" (r.families.join(", "))
                            @if let Some(a) = &r.account { ", account " (a) }
                            "); " (r.requests) " HaloPSA requests"
                        }
                    }
                    table.counts.wauto {
                        thead { tr { @for k in DriftKind::ALL { th { (k.as_str()) } } } }
                        tbody { tr { @for k in DriftKind::ALL {
                            td data-kind=(k.as_str()) { (r.counts.get(k.as_str()).copied().unwrap_or(0)) }
                        } } }
                    }
                    @if let Some(rep) = &r.repair {
                        p { "Repair: " (rep.published) " snapshot events republished with "
                            code { "x-halosync-repair: true" }
                            @if !rep.failed.is_empty() { span.pill.bad { (rep.failed.len()) " refused by the broker" } } }
                    }
                    @if !r.drifts.is_empty() {
                        table.drifts {
                            thead { tr { th { "family" } th { "aggregate" } th { "drift" } th { "record" } th { "HaloPSA id" }
                                th { "snapshot version" } th { "applied version" } th { "what (snapshot ≠ HaloPSA)" } } }
                            tbody {
                                @for d in r.drifts.iter().take(SHOWN) {
                                    tr data-aggregate=(d.aggregate) data-kind=(d.kind.as_str()) {
                                        td { (d.family.as_str()) }
                                        td { code { (d.aggregate) } }
                                        td { span class=(format!("pill {}", if d.kind == DriftKind::Orphaned { "warn" } else { "bad" })) { (d.kind.as_str()) } }
                                        td { (d.record) }
                                        td { (d.halo_ids.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")) }
                                        td.muted { (d.snapshot_version.as_deref().unwrap_or("–")) }
                                        td.muted { (d.applied_version.as_deref().unwrap_or("–")) }
                                        td { (table::one_line(&what(d), 160)) }
                                    }
                                }
                            }
                        }
                        @let hidden = r.drifts.len().saturating_sub(SHOWN) + r.drifts_omitted;
                        @if hidden > 0 { p.muted { "… and " (hidden) " more (run the command with --json for all)." } }
                    }
                }
            }
        }
    }
}

pub async fn page(State(app): State<Shared>, Viewer(who): Viewer) -> Response {
    let mut cards = Vec::new();
    for name in app.config.connections.keys() {
        let report = crate::reconcile::last_report(&app.store, name).await;
        cards.push(view(name, &report));
    }
    let body = html! {
        h1 { "Reconcile" }
        p.muted { "The last " code { "halosync reconcile" } " of each connection: HaloPSA compared with the billing platform's snapshot. Orphans are reported, never deleted; " code { "--repair" } " republishes the snapshot events of the other drifts." }
        @if cards.is_empty() { p.muted { "No connection is configured." } }
        @for c in &cards { (c) }
    };
    layout::page("Reconcile", "/reconcile", &who, body).into_response()
}
