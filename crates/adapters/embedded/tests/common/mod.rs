//! Helpers shared by the embedded broker's tests.

#![allow(dead_code)]

use std::time::Duration;

use polybus_core::{Delivery, SubscribeOptions, Subscription, TopicSpec};
use polybus_embedded::EmbeddedTransport;
use polybus_embedded::{EmbeddedConfig, RetentionConfig};
use tempfile::TempDir;

/// Longest wait for something that should happen.
pub const PATIENCE: Duration = Duration::from_secs(5);

/// The config of a broker file inside `dir`.
pub fn config(dir: &TempDir, retention: Option<RetentionConfig>) -> EmbeddedConfig {
    EmbeddedConfig { path: Some(dir.path().join("broker.db").to_string_lossy().into_owned()), retention }
}

/// A fresh broker file and a transport on it.
pub async fn broker() -> (TempDir, EmbeddedTransport) {
    let dir = tempfile::tempdir().expect("temp dir");
    let transport = EmbeddedTransport::open(&config(&dir, None)).await.expect("open broker");
    (dir, transport)
}

/// A topic whose name no other test uses.
pub fn topic(name: &str) -> TopicSpec {
    TopicSpec::named(format!("{name}-{}", uuid::Uuid::new_v4().simple()))
}

/// Subscribe options with a small prefetch and a short ack deadline.
pub fn options(group: &str, prefetch: usize, ack_deadline_ms: u64) -> SubscribeOptions {
    let mut options = SubscribeOptions::new(group);
    options.prefetch = prefetch;
    options.ack_deadline = Duration::from_millis(ack_deadline_ms);
    options
}

/// The next delivery, failing the test when none comes within [`PATIENCE`].
pub async fn next(subscription: &mut Box<dyn Subscription>) -> Delivery {
    tokio::time::timeout(PATIENCE, subscription.next())
        .await
        .expect("a delivery within 5 s")
        .expect("subscription still open")
        .expect("delivery without error")
}

/// Asserts that nothing is delivered within `ms` milliseconds.
pub async fn nothing_within(subscription: &mut Box<dyn Subscription>, ms: u64) {
    if let Ok(delivery) = tokio::time::timeout(Duration::from_millis(ms), subscription.next()).await {
        panic!("expected no delivery, got {delivery:?}");
    }
}

/// The payload of a delivery as text.
pub fn text(delivery: &Delivery) -> String {
    delivery.message.payload_str().expect("utf-8 payload").to_owned()
}
