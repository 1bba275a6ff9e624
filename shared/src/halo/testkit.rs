//! Unit tests' HaloPSA: halo-sim in process (bound to HaloPSA's OpenAPI
//! document, as in the integration tests) with a real [`HaloClient`] and a
//! [`Store`] of its own key prefix on the shared Redis, removed by
//! [`Kit::cleanup`]. Only built for tests.

use std::path::Path;
use std::time::Duration;

use halo_sim::{SimConfig, SimHandle};

use super::HaloClient;
use crate::config::{Config, Env};
use crate::store::{connect_with, Keys, Store};

/// The connection's name in every kit.
pub const CONNECTION: &str = "acme";

struct SecretEnv(String);

impl Env for SecretEnv {
    fn var(&self, key: &str) -> Option<String> {
        (key == "KIT_SECRET").then(|| self.0.clone())
    }
}

pub struct Kit {
    pub sim: SimHandle,
    pub store: Store,
    /// The client as a worker holds it: its writes are refused until it is
    /// fenced.
    pub base: HaloClient,
    /// The engines' tests write without aggregate locks: explicitly
    /// unfenced.
    pub halo: HaloClient,
    pub config: Config,
}

impl Kit {
    /// A fresh halo-sim and key prefix. Redis must be running at
    /// `REDIS_URL` (default `redis://127.0.0.1:6379/0`).
    pub async fn start() -> Kit {
        let sim_config = SimConfig::default();
        let secret = sim_config.client_secret.clone();
        let client_id = sim_config.client_id.clone();
        let sim = SimHandle::start(sim_config)
            .await
            .unwrap_or_else(|e| panic!("halo-sim did not start: {e}"));
        let prefix = format!("t-kit-{}.", uuid::Uuid::new_v4().simple());
        let toml = format!(
            r#"
prefix = "{prefix}"
[connections.{CONNECTION}]
resource_server = "{api}"
auth_server = "{auth}"
client_id = "{client_id}"
client_secret_env = "KIT_SECRET"
requests_per_window = 10000
window_seconds = 60
"#,
            api = sim.api_url(),
            auth = sim.auth_url(),
        );
        let config = Config::from_toml(&toml, Path::new("kit.toml"), &SecretEnv(secret))
            .unwrap_or_else(|e| panic!("kit config: {e}"));
        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into());
        let redis = connect_with(&url, &Default::default())
            .await
            .unwrap_or_else(|e| panic!("Redis must be running at {url}: {e}"));
        let keys = Keys::new(&prefix);
        let base = super::client_for(
            &config.connections[CONNECTION],
            reqwest::Client::new(),
            redis.clone(),
            &keys,
            &config.worker,
            Duration::from_secs(1),
        );
        let store = Store::new(redis, keys, Duration::from_secs(60));
        Kit {
            sim,
            store,
            halo: base
                .unfenced("unit tests of the HaloPSA engines: no runtime, no aggregate locks"),
            base,
            config,
        }
    }

    /// Removes every Redis key of this kit's prefix, after checking that
    /// halo-sim dropped no property halosync sent (one its model lacks).
    pub async fn cleanup(self) {
        let ignored = self.sim.ignored_properties();
        assert!(
            ignored.is_empty(),
            "properties HaloPSA's models lack: {ignored:?}"
        );
        self.store.remove_everything().await;
        self.sim.shutdown().await;
    }

    /// Requests halo-sim counted for `endpoint` (`"POST /api/RecurringInvoice"`).
    pub fn count(&self, endpoint: &str) -> u64 {
        self.sim.counts().get(endpoint).copied().unwrap_or(0)
    }
}
