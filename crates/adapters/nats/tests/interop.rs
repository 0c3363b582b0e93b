//! A message published through polybus is an ordinary JetStream message for NATS's own client,
//! and the reverse. Runs against the NATS server at `POLYBUS_NATS_URL` (default
//! `nats://127.0.0.1:4222`); every test deletes the streams it made.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::{AckPolicy, pull};
use async_nats::jetstream::{self, Context};
use futures::StreamExt;
use polybus::{Broker, Bus, Message, Registry, SubscribeOptions, Topic, wire};
use polybus_nats::NatsConnector;
use polybus_nats::names::TopicNames;
use serde_json::json;

const ENV: &str = "dev";
const WAIT: Duration = Duration::from_secs(10);

fn url() -> String {
    std::env::var("POLYBUS_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// A registry with the broker `interop` (one NATS env) and a topic of its own.
struct World {
    bus: Bus,
    event: String,
    native: String,
    names: TopicNames,
    js: Context,
    _dir: tempfile::TempDir,
}

impl World {
    async fn new() -> World {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("registry.db");
        let registry =
            Registry::open(path.to_str().expect("utf-8 path")).await.expect("opening the registry");
        let broker = Broker::from_value(json!({
            "name": "Interop", "tag": "interop",
            "envs": [{"slug": ENV, "type": "nats", "config": {"servers": url()}}],
        }))
        .expect("broker definition");
        registry.create_broker(broker).await.expect("creating the broker");
        let native = format!("i-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let event = format!("interop:{native}");
        registry
            .create_topic(Topic::from_value(json!({"tag": event})).expect("topic"))
            .await
            .expect("creating the topic");
        let bus = Bus::builder(registry).connector(Arc::new(NatsConnector)).build();
        let js = jetstream::new(async_nats::connect(url()).await.expect("connecting the native client"));
        World { bus, event, names: TopicNames::of(&native), native, js, _dir: dir }
    }

    /// Runs `test`, then deletes the topic's streams whether it passed or not.
    async fn run<F, Fut>(test: F)
    where
        F: FnOnce(Arc<World>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let world = Arc::new(World::new().await);
        let outcome = tokio::spawn(test(world.clone())).await;
        let _ = tokio::time::timeout(WAIT, world.bus.close()).await;
        for stream in [&world.names.stream, &world.names.delayed_stream] {
            // A stream the test never made is not there to delete.
            let _ = world.js.delete_stream(stream).await;
        }
        if let Err(e) = outcome {
            std::panic::resume_unwind(e.into_panic());
        }
    }

    fn options(&self, group: &str) -> SubscribeOptions {
        SubscribeOptions { ack_deadline: Duration::from_secs(1), ..SubscribeOptions::new(group) }
    }

    /// A native durable pull consumer on the topic's subject.
    async fn native_consumer(&self, name: &str) -> jetstream::consumer::PullConsumer {
        self.js
            .create_consumer_on_stream(
                pull::Config {
                    durable_name: Some(name.to_owned()),
                    ack_policy: AckPolicy::Explicit,
                    filter_subject: self.names.subject.clone(),
                    ..Default::default()
                },
                self.names.stream.clone(),
            )
            .await
            .expect("creating a native consumer")
    }
}

async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(WAIT, fut).await.unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).map(|v| v.as_str())
}

#[tokio::test]
async fn message_published_through_polybus_is_an_ordinary_jetstream_message() {
    World::run(|w| async move {
        let payload: Vec<u8> = (0..=255u8).collect();
        let sent = Message::new(payload.clone())
            .key("customer-42")
            .content_type("application/octet-stream")
            .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let id = within("publishing", w.bus.publish(ENV, &w.event, sent.clone())).await.expect("publishing");

        let consumer = w.native_consumer("native-reader").await;
        let mut batch = consumer.fetch().max_messages(1).expires(WAIT).messages().await.expect("fetching");
        let received =
            within("the native delivery", batch.next()).await.expect("a message").expect("a message");
        assert_eq!(received.subject.as_str(), format!("polybus.{}", w.native));
        assert_eq!(received.payload.as_ref(), payload.as_slice(), "payload bytes");
        let headers = received.headers.as_ref().expect("headers");
        assert_eq!(header(headers, "traceparent"), sent.headers.get("traceparent").map(String::as_str));
        assert_eq!(header(headers, wire::ID), Some(id.as_str()));
        assert_eq!(header(headers, "Nats-Msg-Id"), Some(id.as_str()), "JetStream de-duplicates on the id");
        assert_eq!(header(headers, wire::KEY), Some("customer-42"));
        assert_eq!(header(headers, wire::CONTENT_TYPE), Some("application/octet-stream"));
        let published_at =
            header(headers, wire::PUBLISHED_AT).and_then(wire::parse_time).expect("publish time");
        assert!((chrono::Utc::now() - published_at).num_seconds().abs() < 60, "publish time {published_at}");
        received.ack().await.expect("native ack");
    })
    .await;
}

#[tokio::test]
async fn message_published_natively_is_consumed_through_polybus() {
    World::run(|w| async move {
        let mut sub = within("subscribing", w.bus.subscribe(ENV, &w.event, w.options("readers")))
            .await
            .expect("subscribing");
        let mut headers = HeaderMap::new();
        headers.insert("traceparent", "00-abc-def-01");
        headers.insert("Nats-Msg-Id", "native-1");
        let payload = bytes::Bytes::from_static(b"\x00\xffnative bytes\r\n");
        let ack =
            w.js.publish_with_headers(w.names.subject.clone(), headers, payload.clone())
                .await
                .expect("publish");
        ack.await.expect("JetStream ack");
        w.js.publish(w.names.subject.clone(), "no headers at all".into())
            .await
            .expect("publish")
            .await
            .expect("ack");

        let first = within("the first delivery", sub.next()).await.expect("open").expect("delivery");
        assert_eq!(first.id, "native-1", "the id is JetStream's message id");
        assert_eq!(first.payload, payload, "payload bytes");
        assert_eq!(first.headers.get("traceparent").map(String::as_str), Some("00-abc-def-01"));
        assert_eq!(first.attempt, 1);
        assert_eq!((first.key.as_ref(), first.content_type.as_ref()), (None, None));
        first.ack().await.expect("acking");

        let second = within("the second delivery", sub.next()).await.expect("open").expect("delivery");
        assert_eq!(second.id, format!("{}:2", w.names.stream), "stream and sequence make the id");
        assert_eq!(second.payload_str(), Some("no headers at all"));
        assert!(second.headers.is_empty(), "headers {:?}", second.headers);
        second.ack().await.expect("acking");
        sub.close().await.expect("closing");
    })
    .await;
}

#[tokio::test]
async fn a_message_too_large_for_the_server_is_refused_and_the_connection_survives() {
    World::run(|w| async move {
        let caps = w.bus.capabilities(ENV, &w.event).await.expect("capabilities");
        let max_payload = async_nats::connect(url()).await.expect("connecting").server_info().max_payload;
        let Some(limit) = caps.max_payload_bytes else {
            assert!(max_payload > (1 << 20), "a server taking {max_payload} bytes needs a declared limit");
            return;
        };
        assert!(limit < max_payload, "declared {limit} leaves no room for headers in {max_payload}");
        let too_big = Message::new(vec![7u8; max_payload]);
        let err = w.bus.publish(ENV, &w.event, too_big).await.expect_err("an oversized message is refused");
        assert_eq!(err.code(), "PUBLISH_FAILED", "{err}");
        let fits = Message::new(vec![7u8; limit]);
        within("publishing the largest declared payload", w.bus.publish(ENV, &w.event, fits))
            .await
            .expect("the largest declared payload is accepted");
    })
    .await;
}

#[tokio::test]
async fn delayed_message_is_moved_by_a_subscriber_in_another_process() {
    World::run(|w| async move {
        let id = w
            .bus
            .publish(ENV, &w.event, Message::text("later").delay(Duration::from_millis(1500)))
            .await
            .expect("publishing");
        // The publishing process goes away; its mover with it.
        w.bus.close().await.expect("closing the publishing bus");
        let delayed =
            w.js.get_stream(&w.names.delayed_stream)
                .await
                .expect("the delayed stream")
                .get_info()
                .await
                .expect("info");
        assert_eq!(delayed.state.messages, 1, "the message waits on the delayed stream");

        let registry = w.bus.registry().clone();
        let reader = Bus::builder(registry).connector(Arc::new(NatsConnector)).build();
        let mut sub = reader.subscribe(ENV, &w.event, w.options("late")).await.expect("subscribing");
        let delivery = within("the delayed message", sub.next()).await.expect("open").expect("delivery");
        assert_eq!((delivery.id.as_str(), delivery.attempt), (id.as_str(), 1));
        delivery.ack().await.expect("acking");
        sub.close().await.expect("closing");
        reader.close().await.expect("closing the reading bus");
    })
    .await;
}
