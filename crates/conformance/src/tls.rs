//! For the adapters' TLS tests: the servers `scripts/services tls` starts (read from the env
//! file it writes), and one publish/consume round trip through a connector.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use polybus::core::{Message, SubscribeOptions, TopicSpec};
use polybus::{BrokerType, Connector, Error};

/// Longest wait for the round trip's message.
const RECEIVE_WITHIN: Duration = Duration::from_secs(15);
/// Longest wait for a connect to fail or for the round trip's other steps.
const STEP_WITHIN: Duration = Duration::from_secs(20);

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
    let transport = within("connect", connector.connect(&target)).await;
    let spec = TopicSpec::named(native);
    within("ensure topic", transport.ensure_topic(&spec)).await;
    let mut subscription =
        within("subscribe", transport.subscribe(&spec, &SubscribeOptions::new(group))).await;
    let payload = format!("over TLS {}", uuid::Uuid::new_v4());
    let message = Message::new(payload.clone().into_bytes());
    let id = message.id.clone();
    within("publish", transport.publish(&spec, message)).await;
    let delivery = tokio::time::timeout(RECEIVE_WITHIN, subscription.next())
        .await
        .unwrap_or_else(|_| panic!("the message did not arrive within {RECEIVE_WITHIN:?}"))
        .expect("the subscription ended")
        .unwrap_or_else(|e| panic!("receive: {e}"));
    assert_eq!(delivery.message.id, id);
    assert_eq!(delivery.message.payload.as_ref(), payload.as_bytes());
    within("ack", delivery.ack()).await;
    within("close the subscription", subscription.close()).await;
    within("close", transport.close()).await;
}

/// The error connecting to a `broker_type` env with `config` gives, within 20 s.
///
/// # Panics
/// When it connects, or takes longer.
pub async fn refused(connector: &dyn Connector, broker_type: BrokerType, config: serde_json::Value) -> Error {
    tokio::time::timeout(STEP_WITHIN, crate::failures::connect_error(connector, broker_type, config))
        .await
        .unwrap_or_else(|_| panic!("connecting neither failed nor succeeded within {STEP_WITHIN:?}"))
}

/// The value of `step`, which must succeed within 20 s.
async fn within<T>(what: &str, step: impl Future<Output = polybus::Result<T>>) -> T {
    match tokio::time::timeout(STEP_WITHIN, step).await {
        Ok(Ok(value)) => value,
        Ok(Err(e)) => panic!("{what}: {e}"),
        Err(_) => panic!("{what}: no answer within {STEP_WITHIN:?}"),
    }
}
