//! A message published through polybus is an ordinary stream entry for any Redis client,
//! and an entry written by any Redis client is consumed through polybus.
//!
//! Needs the Redis on `POLYBUS_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use polybus::{Broker, Bus, Message, Registry, SubscribeOptions, Subscriber, Topic};
use polybus_redis::RedisConnector;
use redis::aio::ConnectionManager;
use serde_json::json;

const ENV: &str = "dev";

/// An `XRANGE` entry: id and fields.
type RawEntry = (String, Vec<(String, Vec<u8>)>);
/// The `XPENDING <stream> <group>` summary: count, lowest and highest id, count per consumer.
type PendingSummary = (i64, Option<String>, Option<String>, Option<Vec<(String, String)>>);
const WAIT: Duration = Duration::from_secs(10);

fn redis_url() -> String {
    std::env::var("POLYBUS_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A registry with one Redis broker and one topic of its own, a bus over it, and a plain
/// Redis connection to look behind polybus's back.
struct World {
    bus: Bus,
    native: ConnectionManager,
    event: String,
    stream: String,
    _dir: tempfile::TempDir,
}

impl World {
    async fn new(config: serde_json::Value) -> World {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("registry.db");
        let registry = Registry::open(path.to_str().expect("utf-8 path")).await.expect("registry");
        registry
            .create_broker(
                Broker::from_value(json!({
                    "name": "Interop", "tag": "interop",
                    "envs": [{"slug": ENV, "type": "redis", "config": config}],
                }))
                .expect("broker definition"),
            )
            .await
            .expect("creating the broker");
        let id = uuid::Uuid::new_v4().simple().to_string();
        let stream = format!("polybus-interop-{}", &id[..12]);
        let event = format!("interop:orders-{}", &id[..12]);
        registry
            .create_topic(
                Topic::from_value(json!({"tag": event, "envs": [{"slug": ENV, "nativeName": stream}]}))
                    .expect("topic definition"),
            )
            .await
            .expect("creating the topic");
        let bus = Bus::builder(registry).connector(Arc::new(RedisConnector)).build();
        let client = redis::Client::open(redis_url()).expect("redis url");
        let native = ConnectionManager::new(client).await.expect("native connection");
        World { bus, native, event, stream, _dir: dir }
    }

    async fn subscribe(&self, group: &str) -> Subscriber {
        let options =
            SubscribeOptions { ack_deadline: Duration::from_secs(1), ..SubscribeOptions::new(group) };
        self.bus.subscribe(ENV, &self.event, options).await.expect("subscribing")
    }

    /// Runs `cmd` on the plain connection; again when another test killed the connection.
    async fn native<T: redis::FromRedisValue>(&self, cmd: &mut redis::Cmd) -> T {
        let mut conn = self.native.clone();
        let mut tries = 0;
        loop {
            match cmd.query_async(&mut conn).await {
                Ok(value) => return value,
                Err(e) if tries < 3 && (e.is_io_error() || e.is_unrecoverable_error()) => tries += 1,
                Err(e) => panic!("{cmd:?}: {e}"),
            }
        }
    }

    /// Every entry of the stream: id and fields as raw bytes.
    async fn entries(&self) -> Vec<(String, HashMap<String, Vec<u8>>)> {
        let reply: Vec<RawEntry> =
            self.native(redis::cmd("XRANGE").arg(&self.stream).arg("-").arg("+")).await;
        reply.into_iter().map(|(id, fields)| (id, fields.into_iter().collect())).collect()
    }

    async fn cleanup(self) {
        let keys =
            [self.stream.clone(), format!("{}:delayed", self.stream), format!("{}:retry:*", self.stream)];
        let mut doomed: Vec<String> = keys[..2].to_vec();
        let retry: Vec<String> = self.native(redis::cmd("KEYS").arg(&keys[2])).await;
        doomed.extend(retry);
        let _: i64 = self.native(redis::cmd("DEL").arg(&doomed)).await;
        self.bus.close().await.expect("closing the bus");
    }
}

async fn next(sub: &mut Subscriber) -> polybus::Delivery {
    match tokio::time::timeout(WAIT, sub.next()).await {
        Ok(Some(Ok(delivery))) => delivery,
        Ok(Some(Err(e))) => panic!("receiving: {e}"),
        Ok(None) => panic!("the subscription closed"),
        Err(_) => panic!("nothing delivered within {WAIT:?}"),
    }
}

#[tokio::test]
async fn published_message_is_a_plain_stream_entry() {
    let world = World::new(json!({"host": "127.0.0.1", "port": 6379})).await;
    let payload: Vec<u8> = (0..=255u8).chain([0, 0, 13, 10]).collect();
    let message = Message::new(payload.clone())
        .key("customer-42")
        .content_type("application/octet-stream")
        .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .header("tenant", "acme");
    let id = world.bus.publish(ENV, &world.event, message).await.expect("publishing");

    let entries = world.entries().await;
    assert_eq!(entries.len(), 1, "one entry in the stream");
    let fields = &entries[0].1;
    let text = |name: &str| fields.get(name).map(|v| String::from_utf8_lossy(v).into_owned());
    assert_eq!(fields.get("payload"), Some(&payload), "payload bytes unchanged");
    assert_eq!(text("id").as_deref(), Some(id.as_str()));
    assert_eq!(text("key").as_deref(), Some("customer-42"));
    assert_eq!(text("content-type").as_deref(), Some("application/octet-stream"));
    assert_eq!(
        text("h:traceparent").as_deref(),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    assert_eq!(text("h:tenant").as_deref(), Some("acme"));
    let published_at = text("published-at").expect("a published-at field");
    assert!(polybus::wire::parse_time(&published_at).is_some(), "published-at is RFC 3339: {published_at}");
    assert_eq!(fields.len(), 7, "no other fields: {:?}", fields.keys().collect::<Vec<_>>());
    world.cleanup().await;
}

#[tokio::test]
async fn natively_added_entry_is_consumed_through_polybus() {
    let world = World::new(json!({"url": redis_url()})).await;
    let mut sub = world.subscribe("billing").await;
    let entry_id: String = world
        .native(
            redis::cmd("XADD")
                .arg(&world.stream)
                .arg("*")
                .arg("payload")
                .arg(b"\x00native\xff".as_slice())
                .arg("source")
                .arg("redis-cli"),
        )
        .await;

    let delivery = next(&mut sub).await;
    assert_eq!(delivery.id, entry_id, "without an id field, the id is the entry id");
    assert_eq!(delivery.payload.as_ref(), b"\x00native\xff");
    assert_eq!(delivery.headers.get("source").map(String::as_str), Some("redis-cli"));
    assert_eq!(delivery.attempt, 1);
    let entry_ms: i64 = entry_id.split('-').next().and_then(|ms| ms.parse().ok()).expect("entry id time");
    assert_eq!(delivery.published_at.timestamp_millis(), entry_ms, "publish time from the entry id");
    delivery.ack().await.expect("acking");

    let pending: PendingSummary =
        world.native(redis::cmd("XPENDING").arg(&world.stream).arg("billing")).await;
    assert_eq!(pending.0, 0, "the ack is an XACK: nothing pending for the group");
    sub.close().await.expect("closing");
    world.cleanup().await;
}

#[tokio::test]
async fn native_entry_without_payload_field_becomes_a_json_payload() {
    let world = World::new(json!({"host": "127.0.0.1"})).await;
    let mut sub = world.subscribe("audit").await;
    let _: String = world
        .native(
            redis::cmd("XADD").arg(&world.stream).arg("*").arg("order").arg("42").arg("amount").arg("9.50"),
        )
        .await;
    let delivery = next(&mut sub).await;
    assert_eq!(delivery.content_type.as_deref(), Some("application/json"));
    let payload: serde_json::Value = delivery.payload_json().expect("a JSON payload");
    assert_eq!(payload, json!({"order": "42", "amount": "9.50"}));
    delivery.ack().await.expect("acking");
    sub.close().await.expect("closing");
    world.cleanup().await;
}

#[tokio::test]
async fn max_len_bounds_the_stream() {
    let world = World::new(json!({"host": "127.0.0.1", "maxLen": 100})).await;
    let batch: Vec<Message> = (0..1000).map(|i| Message::text(format!("m-{i}"))).collect();
    world.bus.publish_batch(ENV, &world.event, batch).await.expect("publishing a batch");
    let len: usize = world.native(redis::cmd("XLEN").arg(&world.stream)).await;
    // `MAXLEN ~` trims whole nodes of the stream (100 entries each by default).
    assert!((100..=300).contains(&len), "stream trimmed to about 100 entries, found {len}");
    world.cleanup().await;
}

#[tokio::test]
async fn delayed_publish_waits_in_a_sorted_set_then_joins_the_stream() {
    let world = World::new(json!({"host": "127.0.0.1"})).await;
    let mut sub = world.subscribe("later").await;
    let id = world
        .bus
        .publish(ENV, &world.event, Message::text("later").delay(Duration::from_millis(700)))
        .await
        .expect("publishing with a delay");
    let waiting: i64 = world.native(redis::cmd("ZCARD").arg(format!("{}:delayed", world.stream))).await;
    assert_eq!(waiting, 1, "the delayed message waits in <stream>:delayed");
    assert!(world.entries().await.is_empty(), "not in the stream before its delay");
    let delivery = next(&mut sub).await;
    assert_eq!(delivery.id, id);
    assert!(delivery.published_at + chrono::Duration::milliseconds(690) <= chrono::Utc::now());
    delivery.ack().await.expect("acking");
    assert_eq!(world.entries().await.len(), 1, "then it is an ordinary entry");
    sub.close().await.expect("closing");
    world.cleanup().await;
}

#[tokio::test]
async fn a_group_whose_stream_was_deleted_starts_again() {
    let world = World::new(json!({"host": "127.0.0.1"})).await;
    let mut sub = world.subscribe("survivor").await;
    world.bus.publish(ENV, &world.event, Message::text("first")).await.expect("publishing");
    next(&mut sub).await.ack().await.expect("acking");
    let _: i64 = world.native(redis::cmd("DEL").arg(&world.stream)).await;
    let id = world.bus.publish(ENV, &world.event, Message::text("second")).await.expect("publishing again");
    let delivery = next(&mut sub).await;
    assert_eq!(delivery.id, id);
    delivery.ack().await.expect("acking");
    sub.close().await.expect("closing");
    world.cleanup().await;
}

#[tokio::test]
async fn connect_errors_never_show_the_password() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let registry =
        Registry::open(dir.path().join("r.db").to_str().expect("utf-8 path")).await.expect("registry");
    registry
        .create_broker(
            Broker::from_value(json!({
                "name": "Nowhere", "tag": "nowhere",
                "envs": [{"slug": ENV, "type": "redis", "config": {"url": "redis://app:s3cr3t-pw@127.0.0.1:1/0"}}],
            }))
            .expect("broker definition"),
        )
        .await
        .expect("creating the broker");
    let bus = Bus::builder(registry).connector(Arc::new(RedisConnector)).build();
    let err = bus.test_connection("nowhere", ENV).await.expect_err("nothing listens on port 1");
    let text = format!("{err} / {err:?}");
    assert!(!text.contains("s3cr3t-pw"), "{text}");
    assert!(text.contains("127.0.0.1:1"), "the error names the address: {text}");
    assert_eq!(err.code(), "CONNECT_FAILED");
}

#[tokio::test]
async fn pubsub_mode_is_refused_clearly() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let registry =
        Registry::open(dir.path().join("r.db").to_str().expect("utf-8 path")).await.expect("registry");
    registry
        .create_broker(
            Broker::from_value(json!({
                "name": "Chat", "tag": "chat",
                "envs": [{"slug": ENV, "type": "redis", "config": {"host": "127.0.0.1", "mode": "pubsub"}}],
            }))
            .expect("broker definition"),
        )
        .await
        .expect("creating the broker");
    let bus = Bus::builder(registry).connector(Arc::new(RedisConnector)).build();
    let err = bus.test_connection("chat", ENV).await.expect_err("pubsub mode is not implemented");
    assert_eq!(err.code(), "UNSUPPORTED", "{err}");
    let shown = err.to_string();
    assert!(shown.contains("pubsub"), "names the mode: {err}");
}

#[tokio::test]
async fn tls_to_a_plain_port_fails_with_an_error_not_a_panic() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let registry =
        Registry::open(dir.path().join("r.db").to_str().expect("utf-8 path")).await.expect("registry");
    registry
        .create_broker(
            Broker::from_value(json!({
                "name": "Secure", "tag": "secure",
                "envs": [{"slug": ENV, "type": "redis", "config": {"host": "127.0.0.1", "port": 6379, "tls": true}}],
            }))
            .expect("broker definition"),
        )
        .await
        .expect("creating the broker");
    let bus = Bus::builder(registry).connector(Arc::new(RedisConnector)).build();
    let err = bus.test_connection("secure", ENV).await.expect_err("Redis here does not speak TLS");
    assert_eq!(err.code(), "CONNECT_FAILED", "{err}");
}
