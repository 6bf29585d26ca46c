//! What the tokio driver's test files share: the agent's HTTP API, reached through the driver's
//! own [`Client::call`] (so these tests also exercise it).
#![allow(dead_code)]

use std::time::Duration;

use consul_lock_core::api::{ApiError, ClientConfig, Endpoint, Key, KvGet, KvList, KvPair};
use consul_lock_tokio::{CallError, Client};

/// The agent's HTTP API, for checking what the lock did behind the driver's back.
#[derive(Clone, Debug)]
pub(crate) struct Wire {
    client: Client,
}

impl Wire {
    /// A wire to the agent `config` names.
    pub(crate) fn new(config: ClientConfig) -> Wire {
        Wire {
            client: Client::new(config).expect("an HTTP client"),
        }
    }

    /// Sends `endpoint`; Consul's answer or refusal. A request that gets no answer fails the test.
    pub(crate) async fn call<E: Endpoint>(&self, endpoint: E) -> Result<E::Output, ApiError> {
        match self.client.call(&endpoint, Duration::from_secs(30)).await {
            Ok(output) => Ok(output),
            Err(CallError::Api(api)) => Err(api),
            Err(other) => panic!("the agent answers: {other}"),
        }
    }

    /// The entry at `key`, if any.
    pub(crate) async fn get(&self, key: &str) -> Option<KvPair> {
        self.call(KvGet::new(Key::new(key).expect("a valid key")))
            .await
            .expect("a KV read")
            .value
    }

    /// The entries under `prefix` (a plain string prefix).
    pub(crate) async fn entries_under(&self, prefix: &str) -> Result<Vec<KvPair>, ApiError> {
        let list = KvList::new(Key::new(prefix).expect("a valid prefix"));
        Ok(self.call(list).await?.value)
    }
}
