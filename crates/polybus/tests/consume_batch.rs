//! The batch form of the consume loop (`Bus::consume_batch`) on the embedded broker: the
//! single form's retry and dead-letter policy, applied per message of a batch.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use polybus::{
    BatchError, Broker, Bus, ConsumeOptions, ConsumeStats, Consumer, Group, HandlerError, Message, Registry,
    SqliteStore, Topic, wire,
};
use serde_json::json;

const EVENT: &str = "batches:orders";

async fn setup(dir: &std::path::Path) -> Bus {
    let store = SqliteStore::open(dir.join("registry.db")).await.expect("registry");
    let registry = Registry::new(Arc::new(store));
    let broker = json!({"name": "Batches", "tag": "batches", "envs": [
        {"slug": "dev", "type": "embedded", "config": {"path": dir.join("broker.db")}}]});
    registry.create_broker(Broker::from_value(broker).expect("broker")).await.expect("create broker");
    let topic = Topic::from_value(json!({"tag": EVENT, "maxAttempts": 3})).expect("topic");
    registry.create_topic(topic).await.expect("create topic");
    Bus::open(registry).await.expect("bus")
}

/// Waits until the loop's counters satisfy `done`, failing after 10 s.
async fn wait_for(consumer: &Consumer, done: impl Fn(&ConsumeStats) -> bool) -> ConsumeStats {
    let result = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let stats = consumer.stats();
            if done(&stats) {
                return stats;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    result.unwrap_or_else(|_| panic!("the consume loop did not get there: {:?}", consumer.stats()))
}

fn options(group: &str) -> ConsumeOptions {
    ConsumeOptions::new(group)
        .retry(Duration::from_millis(20), Duration::from_millis(20))
        .batch(4, Duration::from_millis(300))
        .concurrency(1)
}

#[tokio::test]
async fn consume_batch_acks_the_rest_and_dead_letters_only_the_failed_message() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bus = setup(dir.path()).await;
    let payloads = ["a", "b", "bad", "c", "d", "e"];
    bus.publish_batch("dev", EVENT, payloads.iter().map(|p| Message::text(*p)).collect())
        .await
        .expect("publish");
    let sizes = Arc::new(Mutex::new(Vec::new()));
    let seen = sizes.clone();
    let handler = move |batch: Vec<Message>| {
        seen.lock().expect("sizes").push(batch.len());
        let bad = batch.iter().position(|m| m.payload_str() == Some("bad"));
        async move {
            match bad {
                Some(i) => Err(BatchError::only([(i, HandlerError::permanent("cannot parse `bad`"))])),
                None => Ok(()),
            }
        }
    };
    let consumer = bus.consume_batch("dev", EVENT, options("billing"), handler).await.expect("consume");
    let stats = wait_for(&consumer, |s| s.acked + s.dead_lettered == 6).await;
    assert_eq!((stats.acked, stats.dead_lettered, stats.retried, stats.settle_errors), (5, 1, 0, 0));
    let final_stats = consumer.shutdown().await.expect("shutdown");
    assert_eq!(final_stats, stats, "nothing came back after the batches were settled");
    let sizes = sizes.lock().expect("sizes").clone();
    assert_eq!(sizes, vec![4, 2], "batches of at most 4, gathered while the messages were ready");

    let mut dead =
        bus.dead_letters("dev", EVENT, Group(polybus::DEAD_LETTER_GROUP)).await.expect("dead letters");
    let letter = tokio::time::timeout(Duration::from_secs(10), dead.next())
        .await
        .expect("a dead letter in time")
        .expect("open")
        .expect("received");
    assert_eq!(letter.payload_str(), Some("bad"));
    assert_eq!(letter.headers.get(wire::DEAD_LETTER_REASON).map(String::as_str), Some("cannot parse `bad`"));
    letter.ack().await.expect("ack");
    bus.close().await.expect("close");
}

#[tokio::test]
async fn consume_batch_retries_every_message_of_a_failed_batch_on_its_own() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bus = setup(dir.path()).await;
    bus.publish_batch("dev", EVENT, (0..3).map(|i| Message::text(format!("m{i}"))).collect())
        .await
        .expect("publish");
    let calls = Arc::new(Mutex::new(Vec::new()));
    let seen = calls.clone();
    let handler = move |batch: Vec<Message>| {
        let mut calls = seen.lock().expect("calls");
        calls.push(
            batch.iter().map(|m| (m.payload_str().unwrap_or("").to_owned(), m.attempt)).collect::<Vec<_>>(),
        );
        let first_call = calls.len() == 1;
        async move {
            if first_call {
                Err(std::io::Error::other("the database is down"))?;
            }
            Ok(())
        }
    };
    let consumer = bus.consume_batch("dev", EVENT, options("audit"), handler).await.expect("consume");
    let stats = wait_for(&consumer, |s| s.acked == 3).await;
    consumer.shutdown().await.expect("shutdown");
    assert_eq!((stats.retried, stats.dead_lettered, stats.settle_errors), (3, 0, 0));
    let calls = calls.lock().expect("calls").clone();
    assert_eq!(calls[0], vec![("m0".to_owned(), 1), ("m1".to_owned(), 1), ("m2".to_owned(), 1)]);
    let mut retried: Vec<_> = calls[1..].iter().flatten().cloned().collect();
    retried.sort();
    assert_eq!(retried, vec![("m0".to_owned(), 2), ("m1".to_owned(), 2), ("m2".to_owned(), 2)]);
    bus.close().await.expect("close");
}
