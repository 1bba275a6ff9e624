//! Loading the configuration for the operator's tool.
//!
//! * `--config FILE` / `HALOSYNC_CONFIG` name a file that must exist;
//! * without either, `./halosync.toml` is read if it exists, else the
//!   built-in defaults apply (plus `AMQP_URL`, `REDIS_URL`,
//!   `HALOSYNC_PREFIX`), so `halosync status` works on a fresh machine;
//! * commands that never talk to HaloPSA (publish, dlq, topology, status)
//!   do not need `[connections]`: if a connection cannot be loaded (say its
//!   secret's environment variable is not set in this shell), they go on
//!   without it (`halosync check` is where connections are reported);
//! * `check --connection NAME` reads only that connection, so that another
//!   connection's missing secret does not stop the test of this one.

use std::path::{Path, PathBuf};

use anyhow::Context;
use halosync_shared::config::{ConfigError, ProcessEnv, DEFAULT_CONFIG_PATH};
use halosync_shared::Config;

/// Which HaloPSA connections the command needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Need {
    /// Only this one (the others are left out before validation).
    Connection(String),
    /// None: a broken `[connections]` is ignored with a warning.
    NoConnections,
}

/// A loaded configuration and where it came from.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    /// The file's text (for `check`, which explains what it normalised).
    pub text: String,
}

/// Reads the config file's text: the one named, else `./halosync.toml` if
/// it exists, else nothing (the defaults).
pub fn read(explicit: Option<&Path>) -> anyhow::Result<(Option<PathBuf>, String)> {
    match explicit {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| {
                format!(
                    "cannot read config file {} (named by --config or HALOSYNC_CONFIG); \
                     give the path of your halosync.toml, or leave both out to use ./halosync.toml or the defaults",
                    p.display()
                )
            })?;
            Ok((Some(p.to_path_buf()), text))
        }
        None => {
            let p = PathBuf::from(DEFAULT_CONFIG_PATH);
            match std::fs::read_to_string(&p) {
                Ok(text) => Ok((Some(p), text)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((None, String::new())),
                Err(e) => Err(e).with_context(|| {
                    format!("cannot read {} in the current directory", p.display())
                }),
            }
        }
    }
}

pub fn load(explicit: Option<&Path>, need: Need) -> anyhow::Result<Loaded> {
    let (path, text) = read(explicit)?;
    let origin = path
        .clone()
        .unwrap_or_else(|| PathBuf::from("(built-in defaults)"));
    if let Need::Connection(name) = &need {
        let only = only_connection(&text, name)?;
        let config =
            Config::from_toml(&only, &origin, &ProcessEnv).map_err(|e| anyhow::anyhow!("{e}"))?;
        return Ok(Loaded { config, text });
    }
    match Config::from_toml(&text, &origin, &ProcessEnv) {
        Ok(config) => Ok(Loaded { config, text }),
        Err(ConfigError::Key { key, .. })
            if need == Need::NoConnections && key.starts_with("connections") =>
        {
            // This command never talks to HaloPSA: a connection that cannot
            // be loaded here (say its secret is not in this shell) does not
            // matter; `halosync check` reports it.
            let stripped = without_connections(&text)?;
            let config = Config::from_toml(&stripped, &origin, &ProcessEnv)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            Ok(Loaded { config, text })
        }
        Err(e) => Err(anyhow::anyhow!("{e}")),
    }
}

/// The names of the connections in the file, as written.
pub fn connection_names(text: &str) -> Vec<String> {
    toml::from_str::<toml::Table>(text)
        .ok()
        .and_then(|t| {
            t.get("connections")?
                .as_table()
                .map(|c| c.keys().cloned().collect())
        })
        .unwrap_or_default()
}

/// The same TOML with only the connection `name` (if it is there).
fn only_connection(text: &str, name: &str) -> anyhow::Result<String> {
    let mut value: toml::Table = toml::from_str(text).context("parsing the config file")?;
    if let Some(toml::Value::Table(conns)) = value.get_mut("connections") {
        conns.retain(|k, _| k == name);
    }
    toml::to_string(&value).context("re-serialising the config file")
}

/// The same TOML without its `[connections]` table.
fn without_connections(text: &str) -> anyhow::Result<String> {
    let mut value: toml::Table = toml::from_str(text).context("parsing the config file")?;
    value.remove("connections");
    toml::to_string(&value).context("re-serialising the config file")
}

/// The raw (un-normalised) value of `connections.<name>.<key>` as written.
pub fn raw_connection_key(text: &str, name: &str, key: &str) -> Option<toml::Value> {
    let table: toml::Table = toml::from_str(text).ok()?;
    table
        .get("connections")?
        .as_table()?
        .get(name)?
        .as_table()?
        .get(key)
        .cloned()
}

/// The config with the connection named, or with the only one configured.
pub fn with_connection(
    config_path: Option<&std::path::Path>,
    name: Option<&str>,
) -> anyhow::Result<(halosync_shared::Config, String)> {
    let (_, text) = read(config_path)?;
    let names = connection_names(&text);
    let name = match (name, names.as_slice()) {
        (Some(n), _) if names.iter().any(|c| c == n) => n.to_string(),
        (Some(n), []) => anyhow::bail!(
            "no connection {n:?} is configured: add a [connections.{n}] table to halosync.toml, or point --config / HALOSYNC_CONFIG at yours"
        ),
        (Some(n), some) => anyhow::bail!(
            "no connection {n:?} is configured; configured: {}; use e.g. --connection {}",
            some.join(", "),
            some[0]
        ),
        (None, [only]) => only.clone(),
        (None, []) => anyhow::bail!(
            "no HaloPSA connection is configured: add a [connections.NAME] table to halosync.toml and pass --connection NAME, or point --config / HALOSYNC_CONFIG at yours"
        ),
        (None, many) => anyhow::bail!(
            "{} connections are configured ({}); say which with e.g. --connection {}",
            many.len(),
            many.join(", "),
            many[0]
        ),
    };
    let loaded = load(config_path, Need::Connection(name.clone()))?;
    Ok((loaded.config, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_connections_only() {
        let text =
            "prefix = \"p.\"\n[connections.acme]\nclient_id = \"x\"\n[retry]\ndelays_ms = [1000]\n";
        let out = without_connections(text).unwrap();
        assert!(!out.contains("acme"));
        assert!(out.contains("p."));
        assert!(out.contains("delays_ms"));
    }

    #[test]
    fn keeps_only_the_named_connection() {
        let text =
            "[connections.acme]\nclient_id = \"x\"\n[connections.globex]\nclient_id = \"y\"\n";
        let out = only_connection(text, "acme").unwrap();
        assert!(out.contains("acme") && !out.contains("globex"), "{out}");
        assert_eq!(connection_names(text), ["acme", "globex"]);
    }

    #[test]
    fn raw_keys_are_read_as_written() {
        let text = "[connections.acme]\ntenant = \"Not set\"\nauth_server = \"https://a/auth/\"\n";
        assert_eq!(
            raw_connection_key(text, "acme", "tenant").and_then(|v| v.as_str().map(String::from)),
            Some("Not set".to_string())
        );
        assert!(raw_connection_key(text, "acme", "scope").is_none());
        assert!(raw_connection_key(text, "other", "tenant").is_none());
    }
}
