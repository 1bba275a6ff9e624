//! The HaloPSA half of `halosync check` (see [`super`]): the connection's
//! config, a token, one harmless GET per area, write access by scope.

use std::path::Path;
use std::time::Duration;

use halosync_shared::config::ConnectionConfig;
use halosync_shared::halo::error::message_from_body;
use halosync_shared::halo::http_client;
use serde_json::Value;

use super::item::Item;
use crate::settings::{self, raw_connection_key, Need};

const HTTP_TIMEOUT: Duration = Duration::from_secs(20);
const API_DETAILS: &str = "Configuration > Integrations > HaloPSA API";
const APPLICATIONS: &str = "Configuration > Integrations > HaloPSA API > View Applications";

/// One area the workers use.
struct Area {
    label: &'static str,
    path: &'static str,
    /// Scope names that grant it (`read:<n>` / `edit:<n>`).
    scopes: &'static [&'static str],
    /// The agent role's Feature Access entry.
    feature: &'static str,
    /// Whether the workers write to it (needs `edit:`).
    write: bool,
    used_by: &'static str,
}

const AREAS: [Area; 6] = [
    Area {
        label: "customers",
        path: "Client",
        scopes: &["customers"],
        feature: "Customers",
        write: true,
        used_by: "halosync-account creates and updates one Customer per account",
    },
    Area {
        label: "items",
        path: "Item",
        scopes: &["items"],
        feature: "Products (Items)",
        write: false,
        used_by: "recurring and invoice lines refer to the mapped items",
    },
    Area {
        label: "software licences",
        path: "SoftwareLicence",
        scopes: &["softwarelicensing", "software"],
        feature: "Software Licencing",
        write: true,
        used_by: "halosync-subscription keeps one Software Licence per subscription",
    },
    Area {
        label: "recurring invoices",
        path: "RecurringInvoice",
        scopes: &["invoices"],
        feature: "Invoices (Recurring Invoices)",
        write: true,
        used_by: "halosync-subscription and halosync-usage keep the recurring invoice lines",
    },
    Area {
        label: "invoices",
        path: "Invoice",
        scopes: &["invoices"],
        feature: "Invoices",
        write: true,
        used_by: "halosync-overage adds one-off invoice lines",
    },
    Area {
        label: "external links",
        path: "ExternalLink",
        scopes: &["customers"],
        feature: "Customers (integration links)",
        write: true,
        used_by: "every worker records billing id → HaloPSA id in an ExternalLink",
    },
];

/// Loads the config and picks the connection; a failure is the `config`
/// line of the checklist.
pub(super) fn prepare(
    path: Option<&Path>,
    name: Option<&str>,
) -> Result<(ConnectionConfig, String), Box<Item>> {
    let config_failure = |e: anyhow::Error| {
        let text = format!("{e:#}");
        let summary = if text.starts_with("config") {
            text
        } else {
            format!("config: {text}")
        };
        Box::new(Item::fail(
            "config",
            summary,
            "fix what is named above (in halosync.toml, or the environment variable or file it names), then run the check again".into(),
        ))
    };
    // Which connection: the one named, or the only one there is.
    let (file, text) = settings::read(path).map_err(config_failure)?;
    let file = file
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "(no config file: ./halosync.toml does not exist)".into());
    let names = settings::connection_names(&text);
    let name = match (name, names.as_slice()) {
        (Some(n), _) if names.iter().any(|c| c == n) => n.to_string(),
        (Some(n), []) => {
            return Err(Box::new(Item::fail(
                "config",
                format!("config: no connection {n:?} in {file}"),
                format!("add a [connections.{n}] table (resource_server, auth_server, tenant, client_id, client_secret_env), or point --config / HALOSYNC_CONFIG at your halosync.toml"),
            )))
        }
        (Some(n), some) => {
            return Err(Box::new(Item::fail(
                "config",
                format!("config: no connection {n:?} in {file}"),
                format!(
                    "configured connections: {}; use e.g. --connection {}",
                    some.join(", "),
                    some[0]
                ),
            )))
        }
        (None, [only]) => only.clone(),
        (None, []) => {
            return Err(Box::new(Item::fail(
                "config",
                format!("config: no HaloPSA connection is configured in {file}"),
                "add a [connections.NAME] table (resource_server, auth_server, tenant, client_id, client_secret_env) and pass --connection NAME, or point --config / HALOSYNC_CONFIG at your halosync.toml".into(),
            )))
        }
        (None, many) => {
            return Err(Box::new(Item::fail(
                "config",
                format!(
                    "config: {} connections are configured ({})",
                    many.len(),
                    many.join(", ")
                ),
                format!(
                    "say which one to test, e.g. halosync check --connection {}",
                    many[0]
                ),
            )))
        }
    };
    let loaded = settings::load(path, Need::Connection(name.clone())).map_err(config_failure)?;
    let conn = loaded.config.connection(&name).cloned().ok_or_else(|| {
        Box::new(Item::fail(
            "config",
            format!("config: connection {name:?} could not be read from {file}"),
            "check its table in halosync.toml".into(),
        ))
    })?;
    Ok((conn, loaded.text))
}

pub(super) async fn run_checks(conn: &ConnectionConfig, text: &str) -> Vec<Item> {
    let mut checks = vec![config_item(conn, text)];
    let http = match http_client(HTTP_TIMEOUT) {
        Ok(h) => h,
        Err(e) => {
            checks.push(Item::fail(
                "token",
                format!("token: cannot build an HTTP client: {e}"),
                "this is a local problem (TLS roots?); run with RUST_LOG=debug for details".into(),
            ));
            return checks;
        }
    };
    let token = mint(&http, conn, text).await;
    let bearer = token.1;
    checks.push(token.0);
    for area in &AREAS {
        match &bearer {
            Some(t) => checks.push(check_area(&http, conn, area, t).await),
            None => checks.push(Item {
                check: area.label.into(),
                ok: None,
                summary: format!("{}: not tried (no token)", area.label),
                ..Default::default()
            }),
        }
    }
    if let Some(item) = write_scope_item(conn) {
        checks.push(item);
    }
    checks
}

fn host_of(url: &str) -> Option<String> {
    reqwest::Url::parse(url)
        .ok()?
        .host_str()
        .map(|h| h.to_ascii_lowercase())
}

fn is_hosted(url: &str) -> bool {
    host_of(url).is_some_and(|h| {
        [
            ".halopsa.com",
            ".haloitsm.com",
            ".halocrm.io",
            ".haloservicedesk.com",
        ]
        .iter()
        .any(|s| h.ends_with(s))
    })
}

/// `acme` for `https://acme.halopsa.com/api`.
fn guess_tenant(conn: &ConnectionConfig) -> String {
    host_of(&conn.resource_server)
        .filter(|_| is_hosted(&conn.resource_server))
        .and_then(|h| h.split('.').next().map(str::to_string))
        .unwrap_or_else(|| "YOUR_TENANT".into())
}

fn raw_str(text: &str, name: &str, key: &str) -> Option<String> {
    raw_connection_key(text, name, key).and_then(|v| v.as_str().map(str::to_string))
}

/// Step 1: what the settings mean, and what was normalised.
fn config_item(conn: &ConnectionConfig, text: &str) -> Item {
    let mut notes = Vec::new();
    let raw_tenant = raw_str(text, &conn.name, "tenant");
    let hosted = is_hosted(&conn.resource_server);
    match (&raw_tenant, &conn.tenant) {
        (None, None) => notes.push(if hosted {
            format!(
                "⚠ no tenant, but {} looks Halo-hosted: hosted instances need tenant = \"{}\" (the Tenant in {API_DETAILS})",
                conn.resource_server,
                guess_tenant(conn)
            )
        } else {
            "ℹ no tenant: on-premise, so the token request carries no tenant".to_string()
        }),
        (Some(raw), None) => notes.push(format!(
            "ℹ tenant {raw:?} means on-premise (Gradient MSP's guide has on-premise users type \"Not set\"): no tenant parameter is sent"
        )),
        (Some(raw), Some(t)) if raw.trim() != t => notes.push(format!(
            "ℹ tenant {raw:?} was cut down to {t:?} (the bare tenant name is expected)"
        )),
        _ => {}
    }
    if let Some(raw) = raw_str(text, &conn.name, "auth_server") {
        if raw.trim().ends_with('/') {
            notes.push(format!(
                "ℹ auth_server {raw:?} ends with a slash (as Gradient MSP's guide asks); halosync strips it, so the token URL is {}",
                conn.token_url()
            ));
        }
    }
    if let Some(raw) = raw_str(text, &conn.name, "resource_server") {
        if raw.trim().ends_with('/') {
            notes.push(format!(
                "ℹ resource_server {raw:?} ends with a slash; halosync strips it"
            ));
        }
    }
    if !conn.resource_server.to_ascii_lowercase().ends_with("/api") {
        notes.push(format!(
            "⚠ resource_server {} does not end in /api: HaloPSA's Resource Server usually does (https://acme.halopsa.com/api)",
            conn.resource_server
        ));
    }
    let tenant = match &conn.tenant {
        Some(t) => format!("tenant {t}"),
        None => "on-premise (no tenant)".to_string(),
    };
    let mut item = Item::pass(
        "config",
        format!(
            "config: connection {}, {tenant}, scope {:?}, token URL {}",
            conn.name,
            conn.scope,
            conn.token_url()
        ),
    );
    item.notes = notes;
    item
}

/// Where the secret comes from, for advice.
fn secret_source(conn: &ConnectionConfig, text: &str) -> String {
    if let Some(var) = raw_str(text, &conn.name, "client_secret_env") {
        return format!("the environment variable {var}");
    }
    if let Some(file) = raw_str(text, &conn.name, "client_secret_file") {
        return format!("the file {file}");
    }
    "client_secret_env / client_secret_file".into()
}

/// Step 2: a token straight from the authorisation server.
async fn mint(
    http: &reqwest::Client,
    conn: &ConnectionConfig,
    text: &str,
) -> (Item, Option<String>) {
    let form = [
        ("grant_type", "client_credentials"),
        ("client_id", conn.client_id.as_str()),
        ("client_secret", conn.client_secret.expose()),
        ("scope", conn.scope.as_str()),
    ];
    let url = conn.token_url();
    let response = match http.post(&url).form(&form).send().await {
        Ok(r) => r,
        Err(e) => {
            let mut item = Item::fail(
                "token",
                format!("token: cannot reach {url}: {}", e.without_url()),
                format!(
                    "check auth_server: it must be the Authorisation Server shown in {API_DETAILS} (for hosted instances usually https://TENANT.halopsa.com/auth; it may be another host)"
                ),
            );
            item.notes.extend(discovery(http, conn).await.notes);
            return (item, None);
        }
    };
    let status = response.status().as_u16();
    let body = response.text().await.unwrap_or_default();
    if (200..300).contains(&status) {
        let parsed: Option<Value> = serde_json::from_str(&body).ok();
        let token = parsed
            .as_ref()
            .and_then(|v| v.get("access_token"))
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .map(str::to_string);
        let Some(token) = token else {
            let item = Item {
                status: Some(status),
                ..Item::fail(
                    "token",
                    format!("token: {url} answered {status} without an access_token"),
                    format!(
                        "auth_server must be the Authorisation Server from {API_DETAILS}, not the web address of HaloPSA"
                    ),
                )
            };
            return (item, None);
        };
        let granted = parsed
            .as_ref()
            .and_then(|v| v.get("scope"))
            .and_then(Value::as_str)
            .map(str::to_string);
        let expires = parsed
            .as_ref()
            .and_then(|v| v.get("expires_in"))
            .and_then(Value::as_u64);
        let scope_text = match &granted {
            Some(s) if s.trim().is_empty() => "no scope".to_string(),
            Some(s) => format!("scope {s}"),
            None => format!("scope not reported; asked for {}", conn.scope),
        };
        let expiry = expires
            .map(|e| format!(", expires in {e} s"))
            .unwrap_or_default();
        let mut item = Item {
            status: Some(status),
            ..Item::pass("token", format!("token ({scope_text}{expiry})"))
        };
        if let Some(g) = &granted {
            if g.trim().is_empty() {
                item.notes.push(
                    "⚠ HaloPSA issued a token without scope: every API call will get 401; set scope = \"all\"".into(),
                );
            } else if g.trim() != conn.scope.trim() {
                item.notes.push(format!(
                    "ℹ HaloPSA granted {g:?} while {:?} was asked for",
                    conn.scope
                ));
            }
        }
        return (item, Some(token));
    }
    // Failures, explained.
    let found = if status >= 404 {
        discovery(http, conn).await
    } else {
        Discovered::default()
    };
    let halo = halo_text(&body);
    let lower = body.to_ascii_lowercase();
    let html = body.trim_start().starts_with('<') || lower.contains("<html");
    let summary = format!("token: {status} {halo}");
    let advice = if lower.contains("invalid_client") {
        format!(
            "the client id or secret is wrong. Copy the Client ID again from {APPLICATIONS} (it can change when the application is saved: take the latest) and put the current client secret in {} (HaloPSA shows a secret only once: generate a new one if it is lost)",
            secret_source(conn, text)
        )
    } else if status == 500 && html {
        match &conn.tenant {
            None => format!(
                "HaloPSA answered its HTML error page, which is what a Halo-hosted instance does when the tenant is missing: set tenant = \"{}\" in [connections.{}] (the Tenant in {API_DETAILS}). On-premise instances leave it out or write \"Not set\"",
                found.tenant.clone().unwrap_or_else(|| guess_tenant(conn)),
                conn.name
            ),
            Some(t) => format!(
                "HaloPSA answered its HTML error page: the tenant {t:?} may be wrong (compare it with the Tenant in {API_DETAILS}), the client id may be unknown, or the application may have no agent to log in as (Login Type: Agent)"
            ),
        }
    } else if status == 404 || status == 405 {
        format!(
            "there is no token endpoint at {url}: auth_server must be the Authorisation Server from {API_DETAILS}; it may be another host (https://auth.haloservicedesk.com) or, on trial tenants, have no /auth"
        )
    } else if lower.contains("invalid_scope") {
        format!(
            "HaloPSA refused the scope {:?}: use scope = \"all\", or space-separated scopes such as \"read:customers edit:customers\"",
            conn.scope
        )
    } else if lower.contains("unauthorized_client") {
        format!(
            "the application may not use client credentials: set its Authentication Method to \"Client ID and Secret (Services)\" in {APPLICATIONS}"
        )
    } else {
        halosync_shared::halo::token::explain_token_failure(status, &body, conn.tenant.is_some())
    };
    let mut item = Item {
        status: Some(status),
        halo_message: Some(halo),
        ..Item::fail("token", summary, advice)
    };
    item.notes.extend(found.notes);
    (item, None)
}

/// HaloPSA's message, with the HTML error page named by its headline.
fn halo_text(body: &str) -> String {
    if body.contains("Sorry, something went wrong") {
        return "HTML error page \"Sorry, something went wrong\"".into();
    }
    message_from_body(body)
}

/// What HaloPSA's discovery endpoint (`GET {resource_server}/AuthInfo`)
/// says, when it differs from the config.
#[derive(Default)]
struct Discovered {
    notes: Vec<String>,
    tenant: Option<String>,
}

async fn discovery(http: &reqwest::Client, conn: &ConnectionConfig) -> Discovered {
    // Spelt as HaloPSA's OpenAPI document spells it (routes are case-insensitive).
    let url = format!("{}/AuthInfo", conn.resource_server);
    let Ok(resp) = http.get(&url).send().await else {
        return Discovered::default();
    };
    if !resp.status().is_success() {
        return Discovered::default();
    }
    let Ok(v) = resp.json::<Value>().await else {
        return Discovered::default();
    };
    let mut notes = Vec::new();
    let auth_url = v.get("auth_url").and_then(Value::as_str).unwrap_or("");
    let tenant = v.get("tenant_id").and_then(Value::as_str).unwrap_or("");
    if !auth_url.is_empty()
        && auth_url.trim_end_matches('/') != conn.auth_server.trim_end_matches('/')
    {
        notes.push(format!(
            "ℹ HaloPSA's discovery ({url}) names the authorisation server {auth_url:?}: try auth_server = \"{auth_url}\""
        ));
    }
    if !tenant.is_empty() && conn.tenant.as_deref() != Some(tenant) {
        notes.push(format!(
            "ℹ HaloPSA's discovery ({url}) names the tenant {tenant:?}: try tenant = \"{tenant}\""
        ));
    }
    Discovered {
        notes,
        tenant: Some(tenant.to_string()).filter(|t| !t.is_empty()),
    }
}

fn scope_tokens(scope: &str) -> Vec<String> {
    scope
        .split_whitespace()
        .map(|s| s.to_ascii_lowercase())
        .collect()
}

fn scope_is_all(scope: &str) -> bool {
    scope_tokens(scope)
        .iter()
        .any(|t| t == "all" || t.starts_with("all:"))
}

fn scope_grants(scope: &str, area: &Area, write: bool) -> bool {
    scope_is_all(scope)
        || scope_tokens(scope).iter().any(|t| {
            area.scopes
                .iter()
                .any(|s| *t == format!("edit:{s}") || (!write && *t == format!("read:{s}")))
        })
}

fn scope_hint(area: &Area) -> String {
    if area.write {
        format!("read:{0} edit:{0}", area.scopes[0])
    } else {
        format!("read:{0}", area.scopes[0])
    }
}

/// Step 3: one harmless read of an area.
async fn check_area(
    http: &reqwest::Client,
    conn: &ConnectionConfig,
    area: &Area,
    token: &str,
) -> Item {
    let url = format!("{}/{}", conn.resource_server, area.path);
    let label = area.label;
    let request = format!("GET /{}", area.path);
    let response = match http
        .get(&url)
        .query(&[("count", "1")])
        .bearer_auth(token)
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) => {
            return Item::fail(
                label,
                format!("{label}: cannot reach {url}: {}", e.without_url()),
                format!(
                    "check resource_server: it must be the Resource Server from {API_DETAILS} (https://TENANT.halopsa.com/api)"
                ),
            )
        }
    };
    let status = response.status().as_u16();
    let body = response.text().await.unwrap_or_default();
    if (200..300).contains(&status) {
        if serde_json::from_str::<Value>(&body).is_err() {
            return Item {
                status: Some(status),
                ..Item::fail(
                    label,
                    format!("{label}: {request} answered {status} but not JSON"),
                    format!(
                        "resource_server must be the Resource Server from {API_DETAILS} (ending in /api), not HaloPSA's web address"
                    ),
                )
            };
        }
        return Item {
            status: Some(status),
            ..Item::pass(label, format!("{label} ({request}: {status})"))
        };
    }
    let halo = halo_text(&body);
    let scope_covers = scope_grants(&conn.scope, area, false);
    let advice = match status {
        401 => format!(
            "HaloPSA refused a token it had just issued: the token's scope is missing or insufficient. Set scope = \"all\" in [connections.{}] (or space-separated scopes including {}), and tick the same permissions on the application's Permissions tab ({APPLICATIONS})",
            conn.name,
            scope_hint(area)
        ),
        400 if body.contains("Token not found") => format!(
            "HaloPSA did not recognise a token it had just issued: auth_server and resource_server may point at different HaloPSA instances (both are in {API_DETAILS})"
        ),
        403 if !scope_covers => format!(
            "the scope {:?} does not include {label}: add {} to scope in [connections.{}] (or use scope = \"all\"), and tick them on the application's Permissions tab ({APPLICATIONS})",
            conn.scope,
            scope_hint(area),
            conn.name
        ),
        403 => format!(
            "grant {label} to the API application and to its agent: the application's Permissions tab ({APPLICATIONS}: {} or all), and the role of the agent it logs in as (Configuration > Teams & Agents > Agents > that agent > Permissions > Feature Access: {} = {}). Needed because {}",
            scope_hint(area),
            area.feature,
            if area.write { "Read and Modify" } else { "Read" },
            area.used_by
        ),
        404 => format!(
            "HaloPSA has no /{} here: check resource_server (the Resource Server from {API_DETAILS}, ending in /api)",
            area.path
        ),
        429 => "HaloPSA's rate limit was hit: wait a minute and run the check again (the workers share requests_per_window per connection)".to_string(),
        s if s >= 500 => "HaloPSA failed on its side: run the check again; if it persists, HaloPSA support has the details".to_string(),
        _ => format!("HaloPSA refused {request}"),
    };
    Item {
        status: Some(status),
        halo_message: Some(halo.clone()),
        ..Item::fail(label, format!("{label}: {status} {halo}"), advice)
    }
}

/// Step 4: the edit permissions the workers need, by scope.
fn write_scope_item(conn: &ConnectionConfig) -> Option<Item> {
    if scope_is_all(&conn.scope) {
        return None;
    }
    let missing: Vec<&Area> = AREAS
        .iter()
        .filter(|a| a.write && !scope_grants(&conn.scope, a, true))
        .collect();
    if missing.is_empty() {
        return Some(Item::pass(
            "write access",
            format!(
                "write access: scope {:?} includes edit on every area the workers write",
                conn.scope
            ),
        ));
    }
    let labels: Vec<&str> = missing.iter().map(|a| a.label).collect();
    let mut add: Vec<String> = missing
        .iter()
        .map(|a| format!("edit:{}", a.scopes[0]))
        .collect();
    add.dedup();
    add.sort();
    add.dedup();
    Some(Item::fail(
        "write access",
        format!(
            "write access: scope {:?} grants no edit on {}",
            conn.scope,
            labels.join(", ")
        ),
        format!(
            "the workers create and update these: add {} to scope in [connections.{}] (or use scope = \"all\") and on the application's Permissions tab",
            add.join(" "),
            conn.name
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_are_read_like_halopsa() {
        let items = &AREAS[1];
        let customers = &AREAS[0];
        assert!(scope_grants("all", customers, true));
        assert!(scope_grants("read:customers", customers, false));
        assert!(!scope_grants("read:customers", customers, true));
        assert!(scope_grants("edit:customers", customers, true));
        assert!(!scope_grants("read:customers", items, false));
        assert!(scope_grants("edit:softwarelicensing", &AREAS[2], true));
    }

    fn conn(scope: &str) -> ConnectionConfig {
        let text = format!(
            "[connections.acme]\nresource_server = \"https://acme.halopsa.com/api\"\nauth_server = \"https://acme.halopsa.com/auth/\"\ntenant = \"Not set\"\nclient_id = \"x\"\nclient_secret_env = \"PATH\"\nscope = \"{scope}\"\n"
        );
        let c = halosync_shared::Config::from_toml(
            &text,
            Path::new("t"),
            &halosync_shared::config::ProcessEnv,
        )
        .unwrap();
        c.connections["acme"].clone()
    }

    #[test]
    fn read_only_scope_fails_the_write_check() {
        let item = write_scope_item(&conn("read:customers")).unwrap();
        assert_eq!(item.ok, Some(false));
        assert!(item.summary.contains("customers"), "{}", item.summary);
        let advice = item.advice.unwrap();
        assert!(
            advice.contains("edit:customers") && advice.contains("edit:invoices"),
            "{advice}"
        );
        assert!(write_scope_item(&conn("all")).is_none());
        let full = "edit:customers edit:softwarelicensing edit:invoices read:items";
        assert_eq!(write_scope_item(&conn(full)).unwrap().ok, Some(true));
    }

    #[test]
    fn config_notes_explain_normalisations() {
        let c = conn("all");
        let text = "[connections.acme]\ntenant = \"Not set\"\nauth_server = \"https://acme.halopsa.com/auth/\"\n";
        let item = config_item(&c, text);
        let notes = item.notes.join("\n");
        assert!(notes.contains("\"Not set\" means on-premise"), "{notes}");
        assert!(notes.contains("ends with a slash"), "{notes}");
        assert!(
            notes.contains("https://acme.halopsa.com/auth/token"),
            "{notes}"
        );
        assert_eq!(guess_tenant(&c), "acme");
    }
}
