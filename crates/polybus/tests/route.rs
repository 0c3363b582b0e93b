//! One resolve step per publish (issue 18): a cold publish reads each definition it needs
//! once, a warm one reads nothing, and a changed broker definition is noticed and reconnected.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use polybus::{Broker, BrokerPatch, Bus, Message, Registry, Result, SqliteStore, Store, Topic};
use polybus_registry::{Kind, Record};
use serde_json::{Value, json};

/// A store that counts the reads of single definitions.
struct Counting {
    inner: SqliteStore,
    gets: AtomicUsize,
}

#[async_trait]
impl Store for Counting {
    async fn get(&self, kind: Kind, key: &str) -> Result<Option<Record>> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        self.inner.get(kind, key).await
    }
    async fn list(&self, kind: Kind, parent: Option<&str>) -> Result<Vec<Record>> {
        self.inner.list(kind, parent).await
    }
    async fn insert(&self, kind: Kind, key: &str, parent: Option<&str>, doc: &Value) -> Result<()> {
        self.inner.insert(kind, key, parent, doc).await
    }
    async fn replace(&self, kind: Kind, key: &str, expected: u64, doc: &Value) -> Result<bool> {
        self.inner.replace(kind, key, expected, doc).await
    }
    async fn delete(&self, kind: Kind, key: &str) -> Result<bool> {
        self.inner.delete(kind, key).await
    }
    async fn ping(&self) -> Result<()> {
        self.inner.ping().await
    }
}

async fn setup(dir: &std::path::Path) -> (Arc<Counting>, Bus) {
    let inner = SqliteStore::open(dir.join("registry.db")).await.expect("registry");
    let store = Arc::new(Counting { inner, gets: AtomicUsize::new(0) });
    let registry = Registry::new(store.clone());
    let broker = json!({"name": "Route", "tag": "route", "envs": [
        {"slug": "dev", "type": "embedded", "config": {"path": dir.join("broker.db")}}]});
    registry.create_broker(Broker::from_value(broker).expect("broker")).await.expect("create broker");
    let topic = Topic::from_value(json!({"tag": "route:orders"})).expect("topic");
    registry.create_topic(topic).await.expect("create topic");
    let bus = Bus::open(registry).await.expect("bus");
    (store, bus)
}

#[tokio::test]
async fn a_cold_publish_reads_each_definition_once_and_a_warm_one_none() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, bus) = setup(dir.path()).await;
    store.gets.store(0, Ordering::SeqCst);
    bus.publish("dev", "route:orders", Message::text("cold")).await.expect("cold publish");
    // The topic and the broker, once each (it was four reads: the broker three times).
    assert_eq!(store.gets.load(Ordering::SeqCst), 2, "registry reads for a cold publish");
    store.gets.store(0, Ordering::SeqCst);
    for i in 0..10 {
        bus.publish("dev", "route:orders", Message::text(format!("warm {i}"))).await.expect("warm publish");
    }
    assert_eq!(store.gets.load(Ordering::SeqCst), 0, "registry reads for warm publishes");
    bus.close().await.expect("close");
}

#[tokio::test]
async fn a_changed_broker_definition_is_used_after_the_refresh() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (_store, bus) = setup(dir.path()).await;
    bus.publish("dev", "route:orders", Message::text("before")).await.expect("publish");
    // Move the env to another file: the next resolve after the refresh connects there.
    let moved = dir.path().join("moved.db");
    let patch = BrokerPatch::from_value(json!({"envs": [
        {"slug": "dev", "type": "embedded", "config": {"path": moved}}]}))
    .expect("patch");
    bus.registry().update_broker("route", patch).await.expect("update broker");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !moved.exists() {
        assert!(tokio::time::Instant::now() < deadline, "the new definition was never connected to");
        bus.publish("dev", "route:orders", Message::text("after")).await.expect("publish");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bus.close().await.expect("close");
}
