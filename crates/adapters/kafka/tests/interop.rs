//! A message published through polybus is an ordinary Kafka record that rdkafka reads with
//! its payload, key and headers; a record produced with rdkafka is consumed through polybus.
//! Needs a Kafka-protocol broker on 127.0.0.1:9092 (`scripts/services kafka`), or `KAFKA_BROKERS`.

use std::sync::Arc;
use std::time::Duration;

use polybus::{Broker, Bus, Message, Registry, SubscribeOptions, Topic, wire};
use polybus_kafka::KafkaConnector;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message as _, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;

const ENV: &str = "test";
const WAIT: Duration = Duration::from_secs(20);

fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

fn unique(label: &str) -> String {
    format!("interop-{label}-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// A bus over a registry of its own, with broker `interop` and topic `interop:<topic>`.
async fn bus(topic: &str) -> (Bus, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("registry.db");
    let registry = Registry::open(path.to_str().expect("UTF-8 path")).await.expect("registry");
    let broker = json!({"name": "Interop", "tag": "interop",
        "envs": [{"slug": ENV, "type": "kafka", "config": {"brokers": [brokers()], "clientId": "interop"}}]});
    registry
        .create_broker(Broker::from_value(broker).expect("broker definition"))
        .await
        .expect("creating broker");
    let event = format!("interop:{topic}");
    registry
        .create_topic(Topic::from_value(json!({"tag": event})).expect("topic definition"))
        .await
        .expect("creating topic");
    (Bus::builder(registry).connector(Arc::new(KafkaConnector)).build(), event, dir)
}

/// The first record of `topic`, read by a plain rdkafka consumer of a new group.
async fn read_natively(topic: &str) -> OwnedMessage {
    let config = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique("native-reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .clone();
    let topic = topic.to_owned();
    // rdkafka's calls (and a consumer's drop) block: off the runtime.
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = config.create().expect("native consumer");
        consumer.subscribe(&[&topic]).expect("subscribing natively");
        let started = std::time::Instant::now();
        let record = loop {
            assert!(started.elapsed() < WAIT, "no record on {topic} within {WAIT:?}");
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(record)) => break record.detach(),
                Some(Err(e)) => eprintln!("native poll: {e}"),
                None => {}
            }
        };
        drop(consumer);
        record
    })
    .await
    .expect("native reader")
}

/// Deletes the topics a test made (tests clean up after themselves).
async fn delete_topics(names: Vec<String>) {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers()).create().expect("admin client");
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    if let Err(e) = admin.delete_topics(&refs, &AdminOptions::new()).await {
        eprintln!("deleting {names:?}: {e}");
    }
    // Its drop joins a polling thread: off the runtime.
    let _ = tokio::task::spawn_blocking(move || drop(admin)).await;
}

fn header_map(record: &OwnedMessage) -> std::collections::BTreeMap<String, String> {
    record
        .headers()
        .map(|headers| {
            headers
                .iter()
                .map(|h| {
                    (h.key.to_owned(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned())
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_published_through_polybus_is_an_ordinary_kafka_record() {
    let topic = unique("out");
    let (bus, event, _dir) = bus(&topic).await;
    let payload: Vec<u8> = (0..=255u8).collect();
    let sent = Message::new(payload.clone())
        .key("customer-42")
        .content_type("application/octet-stream")
        .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .header("x-tenant", "äöü");
    let id = tokio::time::timeout(WAIT, bus.publish(ENV, &event, sent.clone()))
        .await
        .expect("publish in time")
        .expect("publish");

    let record = read_natively(&topic).await;
    assert_eq!(record.payload(), Some(&payload[..]), "payload");
    assert_eq!(record.key(), Some(&b"customer-42"[..]), "key");
    let headers = header_map(&record);
    assert_eq!(headers.get("traceparent"), sent.headers.get("traceparent"), "headers: {headers:?}");
    assert_eq!(headers.get("x-tenant").map(String::as_str), Some("äöü"));
    assert_eq!(headers.get(wire::ID), Some(&id), "the id travels as {}", wire::ID);
    assert_eq!(headers.get(wire::CONTENT_TYPE).map(String::as_str), Some("application/octet-stream"));
    let published_at =
        headers.get(wire::PUBLISHED_AT).and_then(|t| wire::parse_time(t)).expect("publish time header");
    assert_eq!(
        record.timestamp().to_millis(),
        Some(published_at.timestamp_millis()),
        "record timestamp is the publish time"
    );
    bus.close().await.expect("closing the bus");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_produced_with_rdkafka_is_consumed_through_polybus() {
    let topic = unique("in");
    let (bus, event, _dir) = bus(&topic).await;
    let group = unique("g");
    let options = SubscribeOptions { ack_deadline: Duration::from_secs(1), ..SubscribeOptions::new(&group) };
    let mut sub = tokio::time::timeout(WAIT, bus.subscribe(ENV, &event, options))
        .await
        .expect("subscribe in time")
        .expect("subscribe");

    let producer: FutureProducer =
        ClientConfig::new().set("bootstrap.servers", brokers()).create().expect("native producer");
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: "traceparent",
            value: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        })
        .insert(Header { key: "x-source", value: Some("rdkafka") });
    let payload = br#"{"order": 7}"#;
    let record = FutureRecord::to(&topic).key("order-7").payload(&payload[..]).headers(headers);
    // A recent timestamp: brokers delete records older than their retention.
    let timestamp = chrono::Utc::now().timestamp_millis() - 5_000;
    let produced =
        producer.send(record.timestamp(timestamp), WAIT).await.map_err(|(e, _)| e).expect("native produce");

    let delivery = tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("delivery in time")
        .expect("open")
        .expect("delivery");
    assert_eq!(&delivery.payload[..], payload, "payload");
    assert_eq!(delivery.key.as_deref(), Some("order-7"), "key");
    let expected: std::collections::BTreeMap<String, String> =
        [("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"), ("x-source", "rdkafka")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
    assert_eq!(delivery.headers, expected, "headers");
    let place = format!("{topic}-{}-{}", produced.partition, produced.offset);
    assert_eq!(delivery.id, place, "a record without polybus-id is named by its place");
    assert_eq!(delivery.published_at.timestamp_millis(), timestamp, "publish time is the record timestamp");
    assert_eq!((delivery.attempt, delivery.content_type.as_deref()), (1, None));
    delivery.ack().await.expect("ack");
    sub.close().await.expect("closing the subscription");
    bus.close().await.expect("closing the bus");
    delete_topics(vec![polybus_kafka::retry_topic(&topic, &group), topic]).await;
}
