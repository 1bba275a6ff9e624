//! Configuration parsing (`Config::from_toml`): the deployment configs and
//! the README's example, mutated, and arbitrary text.

use std::collections::HashMap;
use std::path::Path;

use halosync_shared::config::{Config, Env};
use proptest::prelude::*;

use crate::corpus::{self, mutated, repo};

struct MapEnv(HashMap<String, String>);

impl Env for MapEnv {
    fn var(&self, key: &str) -> Option<String> {
        self.0.get(key).cloned()
    }
}

fn env() -> MapEnv {
    MapEnv(HashMap::from([
        ("DEMO_HALO_SECRET".to_string(), "demo-secret".to_string()),
        ("ACME_HALO_SECRET".to_string(), "acme-secret".to_string()),
    ]))
}

/// deploy/local and deploy/compose configs, and the README's example.
fn configs() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for p in ["deploy/local/halosync.toml", "deploy/compose/halosync.toml"] {
        let path = repo().join(p);
        out.push(std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())));
    }
    let readme = std::fs::read_to_string(repo().join("README.md"))
        .unwrap_or_else(|e| panic!("README.md: {e}"));
    let example = readme
        .split("```toml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .unwrap_or_else(|| panic!("README.md has no ```toml example"));
    out.push(example.as_bytes().to_vec());
    out
}

/// What every outcome must satisfy.
fn check(text: &str) -> Result<(), TestCaseError> {
    match Config::from_toml(text, Path::new("fuzz.toml"), &env()) {
        Err(e) => {
            let msg = e.to_string();
            prop_assert!(!msg.trim().is_empty());
            // Secrets never show up in errors.
            prop_assert!(
                !msg.contains("demo-secret") && !msg.contains("acme-secret"),
                "{msg}"
            );
        }
        Ok(c) => {
            // What validation promises the rest of the code.
            prop_assert!(c.worker.prefetch >= 1);
            prop_assert!(!c.retry.delays_ms().is_empty() && !c.retry.delays_ms().contains(&0));
            prop_assert!(c.retry.max_attempts >= 1);
            for conn in c.connections.values() {
                prop_assert!(conn.requests_per_window >= 1);
                prop_assert!(!conn.window.is_zero());
                prop_assert!(!conn.client_id.is_empty());
                prop_assert!(conn.items.values().all(|id| *id > 0));
                let _ = conn.token_url();
                let shown = format!("{conn:?}");
                prop_assert!(!shown.contains("-secret"), "a secret in {}", shown);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(corpus::config())]

    #[test]
    fn mutated_configs_load_or_say_what_is_wrong(text in mutated(configs(), 8)) {
        check(&String::from_utf8_lossy(&text))?;
    }

    #[test]
    fn arbitrary_text_loads_or_says_what_is_wrong(text in "\\PC{0,200}") {
        check(&text)?;
    }

    #[test]
    fn any_value_of_a_known_key_loads_or_says_what_is_wrong(
        (i, line) in (0..3usize, any::<usize>()),
        value in prop_oneof![
            any::<i64>().prop_map(|n| n.to_string()),
            "\"\\PC{0,30}\"",
            Just("true".to_string()),
            Just("[]".to_string()),
            Just("[1, 0, 5]".to_string()),
            Just("9223372036854775807".to_string()),
            Just("-1".to_string()),
            Just("1.5".to_string()),
            Just("{}".to_string()),
            Just("1979-05-27T07:32:00Z".to_string()),
        ],
    ) {
        // Replace the value of one `key = value` line of a real config.
        let text = String::from_utf8_lossy(&configs()[i]).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        let keyed: Vec<usize> = lines.iter().enumerate()
            .filter(|(_, l)| l.contains(" = ") && !l.trim_start().starts_with('#'))
            .map(|(n, _)| n)
            .collect();
        prop_assume!(!keyed.is_empty());
        let n = keyed[line % keyed.len()];
        let mut out: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        if let Some((key, _)) = lines[n].split_once(" = ") {
            // Never point client_secret_file at a device or a huge file.
            prop_assume!(!key.contains("secret_file"));
            out[n] = format!("{key} = {value}");
        }
        check(&out.join("\n"))?;
    }
}

#[test]
fn the_corpus_configs_load() {
    for c in configs() {
        let text = String::from_utf8_lossy(&c).into_owned();
        // The README's example reads its secret from ACME_HALO_SECRET.
        let loaded = Config::from_toml(&text, Path::new("corpus.toml"), &env());
        assert!(loaded.is_ok(), "{text}\n{loaded:?}");
    }
}
