//! A message published through polybus is an ordinary Pub/Sub message for Google's own client,
//! and the reverse; and an acked message stays acked when another one is redelivered. Runs against the emulator at `PUBSUB_EMULATOR_HOST` (default
//! `127.0.0.1:8085`, as `scripts/services pubsub` starts it); every test deletes the topics
//! and subscriptions it made.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use google_cloud_auth::credentials::anonymous;
use google_cloud_pubsub::client::{Publisher, Subscriber, SubscriptionAdmin, TopicAdmin};
use google_cloud_pubsub::model::Message as NativeMessage;
use polybus::{Broker, Bus, Message, Registry, SubscribeOptions, Topic, wire};
use polybus_pubsub::PubsubConnector;
use serde_json::json;

const ENV: &str = "dev";
const PROJECT: &str = "polybus-test";
const WAIT: Duration = Duration::from_secs(10);
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn endpoint() -> String {
    let host = std::env::var("PUBSUB_EMULATOR_HOST").unwrap_or_else(|_| "127.0.0.1:8085".to_owned());
    format!("http://{host}")
}

/// Awaits `fut`, failing when it takes longer than [`WAIT`].
async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(WAIT, fut).await.unwrap_or_else(|_| panic!("timed out after {WAIT:?} {what}"))
}

/// A registry with the broker `interop` (one Pub/Sub env) and a topic of its own, and Google's
/// admin clients to look at (and clean up) what it maps to.
struct World {
    bus: Bus,
    event: String,
    native: String,
    topics: TopicAdmin,
    subscriptions: SubscriptionAdmin,
    _dir: tempfile::TempDir,
}

impl World {
    async fn new() -> World {
        let dir = tempfile::tempdir().expect("temporary directory");
        let registry = Registry::open(dir.path().join("registry.db").to_str().expect("utf-8 path"))
            .await
            .expect("opening the registry");
        let broker = Broker::from_value(json!({
            "name": "Interop", "tag": "interop",
            "envs": [{"slug": ENV, "type": "google_pubsub",
                      "config": {"projectId": PROJECT, "endpoint": endpoint()}}],
        }))
        .expect("broker definition");
        registry.create_broker(broker).await.expect("creating the broker");
        let native = format!("i-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let event = format!("interop:{native}");
        registry
            .create_topic(Topic::from_value(json!({"tag": event})).expect("topic"))
            .await
            .expect("creating the topic");
        let bus = Bus::builder(registry).connector(Arc::new(PubsubConnector)).build();
        let topics = TopicAdmin::builder()
            .with_endpoint(endpoint())
            .with_credentials(anonymous::Builder::new().build())
            .build()
            .await
            .expect("topic admin client");
        let subscriptions = SubscriptionAdmin::builder()
            .with_endpoint(endpoint())
            .with_credentials(anonymous::Builder::new().build())
            .build()
            .await
            .expect("subscription admin client");
        World { bus, event, native, topics, subscriptions, _dir: dir }
    }

    /// Runs `test`, then deletes what it made on the emulator whether it passed or not.
    async fn run<F, Fut>(test: F)
    where
        F: FnOnce(Arc<World>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let world = Arc::new(World::new().await);
        let outcome = tokio::spawn(test(world.clone())).await;
        let _ = tokio::time::timeout(WAIT, world.bus.close()).await;
        world.clean_up().await;
        if let Err(e) = outcome {
            std::panic::resume_unwind(e.into_panic());
        }
    }

    fn topic_path(&self) -> String {
        format!("projects/{PROJECT}/topics/{}", self.native)
    }

    /// Deletes the topic, its dead-letter topic and every subscription named after it.
    async fn clean_up(&self) {
        let page = self
            .subscriptions
            .list_subscriptions()
            .set_project(format!("projects/{PROJECT}"))
            .set_page_size(1000)
            .send()
            .await;
        let prefix = format!("projects/{PROJECT}/subscriptions/{}", self.native);
        for subscription in page.map(|p| p.subscriptions).unwrap_or_default() {
            if subscription.name.starts_with(&prefix) {
                let _ =
                    self.subscriptions.delete_subscription().set_subscription(subscription.name).send().await;
            }
        }
        for topic in [self.topic_path(), format!("{}-dlq", self.topic_path())] {
            let _ = self.topics.delete_topic().set_topic(topic).send().await;
        }
    }
}

#[tokio::test]
async fn a_polybus_message_reaches_a_native_subscriber_unchanged() {
    World::run(|world| async move {
        // A native subscription must exist before the publish, as with any Pub/Sub subscriber.
        let subscription = format!("projects/{PROJECT}/subscriptions/{}-native", world.native);
        within("creating the topic", world.topics.create_topic().set_name(world.topic_path()).send())
            .await
            .expect("creating the topic");
        within(
            "creating the native subscription",
            world
                .subscriptions
                .create_subscription()
                .set_name(&subscription)
                .set_topic(world.topic_path())
                .send(),
        )
        .await
        .expect("creating the native subscription");

        let payload: Vec<u8> = (0..=255u8).collect();
        let sent = Message::new(payload.clone())
            .key("customer-42")
            .content_type("application/octet-stream")
            .header("traceparent", TRACEPARENT)
            .header("x-tenant", "äöü ✓");
        let id = within("publishing through polybus", world.bus.publish(ENV, &world.event, sent.clone()))
            .await
            .expect("publishing through polybus");

        let client = Subscriber::builder()
            .with_endpoint(endpoint())
            .with_credentials(anonymous::Builder::new().build())
            .build()
            .await
            .expect("native subscriber");
        let mut stream = client.subscribe(&subscription).build();
        let (message, handler) = within("the native subscriber to receive", stream.next())
            .await
            .expect("the stream ended")
            .expect("receiving natively");
        handler.ack();
        assert_eq!(message.data.as_ref(), payload.as_slice(), "payload bytes");
        assert_eq!(message.ordering_key, "customer-42", "ordering key");
        let mut expected: HashMap<String, String> =
            sent.headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        expected.insert(wire::ID.into(), id);
        expected.insert(wire::CONTENT_TYPE.into(), "application/octet-stream".into());
        expected.insert(wire::PUBLISHED_AT.into(), message.attributes[wire::PUBLISHED_AT].clone());
        assert_eq!(message.attributes, expected, "attributes");
        assert!(
            wire::parse_time(&message.attributes[wire::PUBLISHED_AT]).is_some(),
            "publish time attribute"
        );
    })
    .await;
}

#[tokio::test]
async fn a_native_message_is_consumed_through_polybus() {
    World::run(|world| async move {
        // The group's subscription exists from here on; earlier messages would not reach it.
        let options =
            SubscribeOptions { ack_deadline: Duration::from_secs(10), ..SubscribeOptions::new("billing") };
        let mut sub = within("subscribing through polybus", world.bus.subscribe(ENV, &world.event, options))
            .await
            .expect("subscribing through polybus");

        let publisher = Publisher::builder(world.topic_path())
            .with_endpoint(endpoint())
            .with_credentials(anonymous::Builder::new().build())
            .build()
            .await
            .expect("native publisher");
        let payload = vec![0u8, 159, 146, 150, b'\n', 255];
        let native_id = within(
            "publishing natively",
            publisher.publish(
                NativeMessage::new()
                    .set_data(payload.clone())
                    .set_attributes([("x-origin", "google-cloud-pubsub"), ("traceparent", TRACEPARENT)])
                    .set_ordering_key("k-2"),
            ),
        )
        .await
        .expect("publishing natively");

        let delivery = within("receiving through polybus", sub.next())
            .await
            .expect("the subscription closed")
            .expect("receiving through polybus");
        assert_eq!(delivery.payload.as_ref(), payload.as_slice(), "payload bytes");
        assert_eq!(delivery.id, native_id, "id is Pub/Sub's message id");
        assert_eq!(delivery.key.as_deref(), Some("k-2"), "key is the ordering key");
        assert_eq!(delivery.content_type, None, "content type");
        assert_eq!(delivery.attempt, 1, "attempt");
        let headers: Vec<(&str, &str)> =
            delivery.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(headers, [("traceparent", TRACEPARENT), ("x-origin", "google-cloud-pubsub")], "headers");
        let age = polybus::core::message::now() - delivery.published_at;
        assert!(
            age < chrono::TimeDelta::seconds(30),
            "published_at is Pub/Sub's publish time: {}",
            delivery.published_at
        );
        within("acking", delivery.ack()).await.expect("acking");
        within("closing", sub.close()).await.expect("closing");
    })
    .await;
}

/// Found with a consumer process killed mid-stream (issue 13): on a subscription with message
/// ordering on, the emulator redelivers every later message, acked ones included, when an
/// earlier one is redelivered, even without ordering keys.
#[tokio::test]
async fn acked_messages_stay_acked_when_an_earlier_one_is_redelivered() {
    World::run(|world| async move {
        let options = SubscribeOptions { ack_deadline: Duration::from_secs(1), ..SubscribeOptions::new("g") };
        let mut sub =
            within("subscribing", world.bus.subscribe(ENV, &world.event, options)).await.expect("subscribe");
        let mut ids = Vec::new();
        for i in 0..4 {
            let message = Message::text(format!("m{i}"));
            ids.push(
                within("publishing", world.bus.publish(ENV, &world.event, message)).await.expect("publish"),
            );
        }
        // The first delivery is left to expire; the others are acked.
        let mut first = None;
        for _ in 0..4 {
            let delivery = within("a delivery", sub.next()).await.expect("open").expect("delivery");
            if first.is_none() {
                first = Some(delivery.id.clone());
                continue;
            }
            delivery.ack().await.expect("ack");
        }
        let first = first.expect("a first delivery");
        let again = within("the redelivery of the unacked message", sub.next())
            .await
            .expect("open")
            .expect("delivery");
        assert_eq!((again.id.as_str(), again.attempt), (first.as_str(), 2), "the unacked message comes back");
        again.ack().await.expect("ack");
        // Longer than the ack deadline: time enough for any acked message to come back.
        let mut came_back = Vec::new();
        while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(3), sub.next()).await {
            came_back.push(d.id.clone());
            d.ack().await.expect("ack");
        }
        assert!(came_back.is_empty(), "acked messages were delivered again: {came_back:?}");
        sub.close().await.expect("close");
    })
    .await;
}
