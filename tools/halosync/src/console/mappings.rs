//! The Item mappings page: the skus waiting in the dead letters as
//! `unmapped`, HaloPSA's items to choose from (search by name), and the
//! mappings in force. Choosing an item stores the mapping in HaloPSA
//! ([`crate::mappings::set_mapping`], as `halosync mappings set` does) and
//! offers to replay that sku's dead letters at once (through the usual
//! confirm step and job).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use halosync_shared::ErrorClass;
use maud::{html, Markup};
use serde::Deserialize;

use super::access::{Operator, Viewer};
use super::audit::AuditOutcome;
use super::auth::SignedIn;
use super::overview::Overview;
use super::{layout, problem, Shared};
use crate::mappings::{self, UnmappedSku};

/// The overview's unmapped count is re-read at most this often (reading
/// the dead queues is not free, and a job may be holding them).
const UNMAPPED_REFRESH: Duration = Duration::from_secs(15);
/// Above this many dead letters the overview does not re-read them.
const UNMAPPED_SCAN_MAX: usize = 1000;

#[derive(Debug, Default, Deserialize)]
pub struct MappingsQuery {
    connection: Option<String>,
    search: Option<String>,
}

/// The unmapped skus, unless a job holds the dead queues (`None`).
async fn unmapped(app: &Shared, wait: Duration) -> Option<anyhow::Result<Vec<UnmappedSku>>> {
    let guard = app.jobs.lock_dead(wait).await?;
    let r = mappings::unmapped_skus(&app.config, None).await;
    drop(guard);
    if let Ok(list) = &r {
        let mut per: BTreeMap<String, usize> = BTreeMap::new();
        for u in list {
            *per.entry(u.connection.clone()).or_default() += 1;
        }
        if let Ok(mut c) = app.unmapped_cache.lock() {
            *c = Some((Instant::now(), per));
        }
    }
    Some(r)
}

pub async fn fill_overview(app: &Shared, o: &mut Overview) {
    let fresh = app
        .unmapped_cache
        .lock()
        .ok()
        .and_then(|c| c.clone())
        .filter(|(at, _)| at.elapsed() < UNMAPPED_REFRESH);
    let per = match fresh {
        Some((_, per)) => Some(per),
        // Counting means reading every dead letter: live, only while that
        // is cheap; above, the figures of the last Item mappings page.
        None if o.total.dead as usize > UNMAPPED_SCAN_MAX => {
            o.problems.push(format!(
                "unmapped skus: not re-counted live above {UNMAPPED_SCAN_MAX} dead letters; the Item mappings page counts them"
            ));
            app.unmapped_cache
                .lock()
                .ok()
                .and_then(|c| c.clone())
                .map(|(_, p)| p)
        }
        None => match unmapped(app, Duration::ZERO).await {
            Some(Ok(_)) => app
                .unmapped_cache
                .lock()
                .ok()
                .and_then(|c| c.clone())
                .map(|(_, p)| p),
            Some(Err(e)) => {
                o.problems.push(format!("unmapped skus: {e:#}"));
                None
            }
            // A job holds the dead queues: keep the last figures.
            None => app
                .unmapped_cache
                .lock()
                .ok()
                .and_then(|c| c.clone())
                .map(|(_, p)| p),
        },
    };
    if let Some(per) = per {
        for (name, row) in o.connections.iter_mut() {
            row.unmapped = per.get(name).copied().unwrap_or(0);
        }
    }
}

fn choose_form(
    who: &SignedIn,
    u: &UnmappedSku,
    items: &[halosync_shared::halo::items::HaloItem],
) -> Markup {
    html! {
        @if who.is_operator() {
            form.inline method="post" action="/mappings/set" {
                (layout::csrf(who))
                input type="hidden" name="connection" value=(u.connection);
                select name="key" title="the item-map key to set (the plain sku fixes every event of it)" {
                    @for k in u.keys.iter().rev() { option value=(k) { (k) } }
                }
                " → "
                select name="item_id" class="item-choice" {
                    @for i in items { option value=(i.id) { (i.name) " (#" (i.id) ")" } }
                }
                " "
                button.btn.small type="submit" { "Map" }
            }
        }
    }
}

pub async fn page(
    State(app): State<Shared>,
    Viewer(who): Viewer,
    Query(q): Query<MappingsQuery>,
) -> Response {
    let names: Vec<String> = app.config.connections.keys().cloned().collect();
    let chosen = q
        .connection
        .clone()
        .filter(|c| names.contains(c))
        .or_else(|| names.first().cloned());
    let search = q.search.clone().unwrap_or_default();
    let unmapped = unmapped(&app, Duration::from_secs(20)).await;
    let mut items = Vec::new();
    let mut rows = Vec::new();
    let mut problems = Vec::new();
    if let Some(name) = &chosen {
        match mappings::connect(&app.config, name).await {
            Ok(halo) => {
                match mappings::list_items(&halo, Some(&search)).await {
                    Ok(i) => items = i.into_iter().filter(|i| !i.inactive).collect(),
                    Err(e) => problems.push(format!("HaloPSA items: {e:#}")),
                }
                match mappings::mapping_rows(&halo).await {
                    Ok(r) => rows = r,
                    Err(e) => problems.push(format!("mappings: {e:#}")),
                }
            }
            Err(e) => problems.push(format!("{e:#}")),
        }
    }
    let body = html! {
        h1 { "Item mappings" }
        p.sub { "A product sku needs a HaloPSA item before its subscriptions, usage and overage can be written. Mappings chosen here are stored in HaloPSA; every worker uses them from its next message on." }
        @for p in &problems { div.msg.bad { (p) } }
        form.card.filters method="get" action="/mappings" {
            label { "Connection" select name="connection" {
                @for n in &names { option value=(n) selected[chosen.as_deref() == Some(n.as_str())] { (n) } }
            } }
            label { "HaloPSA items named" input #item-search type="search" name="search" value=(search) placeholder="business premium"; }
            button.btn type="submit" #search-items { "Search items" }
        }
        h2 { "Unmapped skus waiting in the dead letters" }
        @match &unmapped {
            None => div.msg.info { "A replay or purge is going through the dead queues; this list comes back when it ends (see Jobs)." },
            Some(Err(e)) => div.msg.bad { "Cannot read the dead letters: " (format!("{e:#}")) },
            Some(Ok(list)) if list.is_empty() => div.card.muted #no-unmapped { "No dead letter waits for an item mapping." },
            Some(Ok(list)) => table #unmapped {
                thead { tr { th { "Connection" } th { "Sku" } th { "Keys tried" } th { "Families" } th.num { "Dead letters" } th { "Last" } th { "Choose the HaloPSA item" } } }
                tbody {
                    @for u in list {
                        tr data-sku=(u.sku) {
                            td { (u.connection) }
                            td { b { code { (u.sku) } } }
                            td { @for k in &u.keys { code { (k) } " " } }
                            td { @for f in &u.families { span.pill { (f) } " " } }
                            td.num { (u.count) }
                            td { (layout::when(u.last.as_ref())) }
                            td { @if chosen.as_deref() == Some(u.connection.as_str()) { (choose_form(&who, u, &items)) } @else { a href={"/mappings?connection=" (u.connection)} { "choose in " (u.connection) } } }
                        }
                    }
                }
            },
        }
        @if let Some(name) = &chosen {
            h2 { "HaloPSA items" @if !search.is_empty() { " named “" (search) "”" } " (" (items.len()) ")" }
            table #items {
                thead { tr { th.num { "Id" } th { "Name" } th { "Description" } th.num { "Base price" } } }
                tbody { @for i in &items { tr { td.num { (i.id) } td { (i.name) } td.muted { (i.description.clone().unwrap_or_default()) } td.num { (i.baseprice.map(|p| format!("{p:.2}")).unwrap_or_default()) } } } }
            }
            h2 { "Mappings in force for " (name) }
            table #mappings {
                thead { tr { th { "Key" } th.num { "Item" } th { "Item name" } th { "Stored in" } } }
                tbody { @for r in &rows { tr { td { code { (r.key) } } td.num { (r.item_id) } td { (r.item_name.clone().unwrap_or_else(|| "(no such item)".into())) } td { span.pill { (r.source) } @if let Some(c) = r.overridden_by_config { " " span.pill.warn { "config overrides with " (c) } } } } } }
            }
        }
    };
    layout::page("Item mappings", "/mappings", &who, body).into_response()
}

pub async fn set(State(app): State<Shared>, Operator { who, form }: Operator) -> Response {
    let (Some(connection), Some(key)) = (form.get("connection"), form.get("key")) else {
        return problem(
            StatusCode::BAD_REQUEST,
            Some(&who),
            "Which sku?",
            "Choose an item next to an unmapped sku on the Item mappings page.",
        );
    };
    let Some(item_id) = form
        .get("item_id")
        .and_then(|i| i.trim().parse::<i64>().ok())
        .filter(|i| *i > 0)
    else {
        return problem(
            StatusCode::BAD_REQUEST,
            Some(&who),
            "Which item?",
            "Pick a HaloPSA item from the list (search by name if it is not there).",
        );
    };
    let halo = match mappings::connect(&app.config, connection).await {
        Ok(h) => h,
        Err(e) => {
            return problem(
                StatusCode::BAD_REQUEST,
                Some(&who),
                "Cannot reach the connection",
                &format!("{e:#}"),
            )
        }
    };
    let result = mappings::set_mapping(&halo, key, item_id).await;
    let (outcome, detail) = match &result {
        Ok(r) => (AuditOutcome::Done, r.describe()),
        Err(e) => (AuditOutcome::Failed, format!("{e:#}")),
    };
    if let Err(r) = super::record(
        &app,
        &who,
        "mapping",
        &format!("connection {connection}: {key} → item {item_id}"),
        outcome,
        1,
        vec![],
        Some(detail.clone()),
        None,
    )
    .await
    {
        return r;
    }
    let result = match result {
        Ok(r) => r,
        Err(_) => {
            return problem(
                StatusCode::BAD_GATEWAY,
                Some(&who),
                "The mapping was not stored",
                &detail,
            )
        }
    };
    // The dead letters that waited for this key, to replay at once.
    let waiting: Vec<UnmappedSku> = match unmapped(&app, Duration::from_secs(20)).await {
        Some(Ok(list)) => list
            .into_iter()
            .filter(|u| u.connection == connection && u.keys.iter().any(|k| k == key.trim()))
            .collect(),
        _ => Vec::new(),
    };
    let ids: Vec<String> = waiting.iter().flat_map(|u| u.event_ids.clone()).collect();
    let body = html! {
        h1 { "Mapping stored" }
        div.msg.ok #mapped { (result.describe()) }
        @if ids.is_empty() {
            p { "No dead letter waits for " code { (key) } "." } p { a.btn.ghost href="/mappings" { "Back to the mappings" } }
        } @else {
            div.card {
                p { b #waiting { (ids.len()) } " dead letters were waiting for " code { (key) } ". Replay them now?" }
                form.inline method="post" action="/dead/action" {
                    (layout::csrf(&who))
                    input type="hidden" name="class" value=(ErrorClass::Unmapped.as_str());
                    input type="hidden" name="connection" value=(connection);
                    @for id in &ids { input type="hidden" name="id" value=(id); }
                    button.btn #replay-sku name="action" value="replay" type="submit" { "Replay " (ids.len()) " dead letters" }
                }
                " " a.btn.ghost href="/mappings" { "Not now" }
            }
        }
    };
    layout::page("Mapping stored", "/mappings", &who, body).into_response()
}
