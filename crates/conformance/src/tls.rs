//! For the adapters' TLS tests: the servers `scripts/services tls` starts (read from the env
//! file it writes), and one publish/consume round trip through a connector.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use polybus::core::{Message, SubscribeOptions, TopicSpec};
use polybus::{BrokerType, Connector};

/// Longest wait for the round trip's message.
const RECEIVE_WITHIN: Duration = Duration::from_secs(15);

/// The ports, users, passwords and certificate paths of the local TLS servers.
pub struct TlsServers {
    path: PathBuf,
    vars: BTreeMap<String, String>,
}

impl TlsServers {
    /// Reads `$POLYBUS_TLS_DIR/env` (default `~/.cache/polybus/tls/env`).
    ///
    /// # Panics
    /// When the file is missing: the TLS servers are not running, and a test that needs them
    /// must fail rather than pass without them.
    pub fn load() -> TlsServers {
        let dir = std::env::var_os("POLYBUS_TLS_DIR").map(PathBuf::from).unwrap_or_else(|| {
            let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
            home.join(".cache/polybus/tls")
        });
        let path = dir.join("env");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "the TLS test servers are not set up: {} cannot be read ({e}); start them with \
                 `scripts/services tls`",
                path.display()
            )
        });
        let vars = text
            .lines()
            .filter_map(|line| line.split_once('='))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        TlsServers { path, vars }
    }

    /// The value of `key` (e.g. `POLYBUS_TLS_REDIS_PORT`).
    ///
    /// # Panics
    /// When the file has no such key (written by an older `scripts/services tls`).
    pub fn get(&self, key: &str) -> String {
        match self.vars.get(key) {
            Some(value) => value.clone(),
            None => panic!(
                "{} has no `{key}`; run `scripts/services tls` again to rewrite it",
                self.path.display()
            ),
        }
    }
}

/// A name no other test run uses: `polybus-tls-<label>-<random>`.
pub fn unique(label: &str) -> String {
    format!("polybus-tls-{label}-{}", uuid::Uuid::new_v4().simple())
}

/// Connects to a `broker_type` env with `config`, subscribes group `group` to `native`,
/// publishes one message to it and returns once that message is received and acked.
///
/// # Panics
/// When a step fails or the message does not arrive within 15 s.
pub async fn round_trip(
    connector: &dyn Connector,
    broker_type: BrokerType,
    config: serde_json::Value,
    native: &str,
    group: &str,
) {
    let target = crate::failures::target(broker_type, config);
    let transport = connector.connect(&target).await.unwrap_or_else(|e| panic!("connect: {e}"));
    let spec = TopicSpec::named(native);
    transport.ensure_topic(&spec).await.unwrap_or_else(|e| panic!("ensure topic: {e}"));
    let mut subscription = transport
        .subscribe(&spec, &SubscribeOptions::new(group))
        .await
        .unwrap_or_else(|e| panic!("subscribe: {e}"));
    let payload = format!("over TLS {}", uuid::Uuid::new_v4());
    let message = Message::new(payload.clone().into_bytes());
    let id = message.id.clone();
    transport.publish(&spec, message).await.unwrap_or_else(|e| panic!("publish: {e}"));
    let delivery = tokio::time::timeout(RECEIVE_WITHIN, subscription.next())
        .await
        .unwrap_or_else(|_| panic!("the message did not arrive within {RECEIVE_WITHIN:?}"))
        .expect("the subscription ended")
        .unwrap_or_else(|e| panic!("receive: {e}"));
    assert_eq!(delivery.message.id, id);
    assert_eq!(delivery.message.payload.as_ref(), payload.as_bytes());
    delivery.ack().await.unwrap_or_else(|e| panic!("ack: {e}"));
    subscription.close().await.unwrap_or_else(|e| panic!("close the subscription: {e}"));
    transport.close().await.unwrap_or_else(|e| panic!("close: {e}"));
}
