//! Registry behaviour, written against the `Registry` API so every store runs the same cases.

use polybus_core::{Broker, BrokerPatch, Topic, TopicPatch};
use polybus_registry::{Registry, SqliteStore};
use serde_json::json;
use std::sync::Arc;

async fn sqlite() -> (Registry, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("registry.db")).await.unwrap();
    (Registry::new(Arc::new(store)), dir)
}

fn broker(tag: &str) -> Broker {
    Broker::from_value(json!({
        "name": "Message Bus", "tag": tag,
        "envs": [
            {"slug": "prd", "type": "rabbitmq", "config": {"url": "amqp://app:s3cret@127.0.0.1:5672/%2f"}},
            {"slug": "dev", "type": "embedded", "config": {"path": "dev.db"}}
        ]
    }))
    .unwrap()
}

#[tokio::test]
async fn broker_round_trips_through_create_update_fetch_delete() {
    let (reg, _dir) = sqlite().await;
    let created = reg.create_broker(broker("message-bus")).await.unwrap();
    assert_eq!(created.version, 1);
    let fetched = reg.fetch_broker("message-bus").await.unwrap();
    assert_eq!(fetched, created);
    assert_eq!(fetched.redacted().envs[0].config["url"], "amqp://app:****@127.0.0.1:5672/%2f");

    let patch = BrokerPatch::from_value(json!({"version": 1,
        "envs": [{"slug": "prd", "type": "KAFKA", "config": {"brokers": ["127.0.0.1:9092"]}}]}))
    .unwrap();
    let updated = reg.update_broker("message-bus", patch).await.unwrap();
    assert_eq!(updated.version, 2);
    assert_eq!(updated.envs[0].broker_type.as_str(), "kafka");
    assert_eq!(updated.envs.len(), 2);

    reg.create_broker(broker("audit")).await.unwrap();
    let all: Vec<_> = reg.fetch_brokers().await.unwrap().into_iter().map(|b| (b.tag, b.version)).collect();
    assert_eq!(all, vec![("audit".to_owned(), 1), ("message-bus".to_owned(), 2)]);

    reg.delete_broker("message-bus", false).await.unwrap();
    assert_eq!(reg.fetch_broker("message-bus").await.unwrap_err().code(), "BROKER_NOT_FOUND");
}

#[tokio::test]
async fn stale_version_is_refused_and_nothing_changes() {
    let (reg, _dir) = sqlite().await;
    reg.create_broker(broker("bus")).await.unwrap();
    reg.update_broker("bus", BrokerPatch { name: Some("A".into()), version: Some(1), ..Default::default() })
        .await
        .unwrap();
    let err = reg
        .update_broker("bus", BrokerPatch { name: Some("B".into()), version: Some(1), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), "CONFLICT");
    assert!(err.to_string().contains("current is 2"), "{err}");
    let now = reg.fetch_broker("bus").await.unwrap();
    assert_eq!((now.name.as_str(), now.version), ("A", 2));
}

#[tokio::test]
async fn invalid_update_and_duplicate_create_store_nothing() {
    let (reg, _dir) = sqlite().await;
    reg.create_broker(broker("bus")).await.unwrap();
    let err = reg.create_broker(broker("bus")).await.unwrap_err();
    assert_eq!(err.code(), "ALREADY_EXISTS");
    let bad =
        BrokerPatch::from_value(json!({"envs": [{"slug": "dev", "type": "redis", "config": {"port": 1}}]}))
            .unwrap();
    let err = reg.update_broker("bus", bad).await.unwrap_err();
    assert_eq!(err.code(), "VALIDATION_FAILED");
    assert!(err.to_string().contains("env `dev`"), "{err}");
    assert_eq!(reg.fetch_broker("bus").await.unwrap(), broker_v1("bus"));
}

fn broker_v1(tag: &str) -> Broker {
    let mut b = broker(tag);
    b.version = 1;
    b
}

#[tokio::test]
async fn concurrent_unversioned_updates_all_land() {
    let (reg, _dir) = sqlite().await;
    reg.create_broker(broker("bus")).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let reg = reg.clone();
        tasks.push(tokio::spawn(async move {
            let patch = BrokerPatch::from_value(
                json!({"envs": [{"slug": format!("e{i}"), "type": "embedded", "config": {}}]}),
            )
            .unwrap();
            reg.update_broker("bus", patch).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let b = reg.fetch_broker("bus").await.unwrap();
    assert_eq!(b.envs.len(), 10);
    assert_eq!(b.version, 9);
}

#[tokio::test]
async fn topics_belong_to_an_existing_broker_and_block_its_deletion() {
    let (reg, _dir) = sqlite().await;
    let orphan = Topic::from_value(json!({"tag": "nobody:orders"})).unwrap();
    assert_eq!(reg.create_topic(orphan).await.unwrap_err().code(), "BROKER_NOT_FOUND");

    reg.create_broker(broker("bus")).await.unwrap();
    let t =
        Topic::from_value(json!({"tag": "bus:orders", "envs": [{"slug": "prd", "nativeName": "orders.v1"}]}))
            .unwrap();
    let t = reg.create_topic(t).await.unwrap();
    assert_eq!(t.spec("prd").unwrap().native_name, "orders.v1");
    reg.create_topic(Topic::from_value(json!({"tag": "bus:refunds"})).unwrap()).await.unwrap();

    let patch = TopicPatch { max_attempts: Some(3), version: Some(1), ..Default::default() };
    assert_eq!(reg.update_topic("bus:orders", patch.clone()).await.unwrap().version, 2);
    assert_eq!(reg.update_topic("bus:orders", patch).await.unwrap_err().code(), "CONFLICT");

    let listed: Vec<_> = reg.fetch_topics(Some("bus")).await.unwrap().into_iter().map(|t| t.tag).collect();
    assert_eq!(listed, vec!["bus:orders", "bus:refunds"]);

    let err = reg.delete_broker("bus", false).await.unwrap_err();
    assert_eq!(err.code(), "IN_USE");
    reg.delete_topic("bus:refunds").await.unwrap();
    assert_eq!(reg.fetch_topic("bus:refunds").await.unwrap_err().code(), "TOPIC_NOT_FOUND");
    reg.delete_broker("bus", true).await.unwrap();
    assert!(reg.fetch_topics(None).await.unwrap().is_empty());
}

#[tokio::test]
async fn two_handles_on_one_file_see_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    let a = Registry::open(path.to_str().unwrap()).await.unwrap();
    let b = Registry::open(&format!("sqlite://{}", path.display())).await.unwrap();
    a.create_broker(broker("bus")).await.unwrap();
    assert_eq!(b.fetch_broker("bus").await.unwrap().version, 1);
}
