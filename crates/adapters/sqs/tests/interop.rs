//! A message published through polybus is an ordinary SQS message for the AWS SDK, and the
//! reverse. Runs against the SQS endpoint at `POLYBUS_SQS_ENDPOINT` (default moto on
//! `http://127.0.0.1:4566`, started by `scripts/services sqs`); every test deletes its queues.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::{MessageAttributeValue, MessageSystemAttributeName, QueueAttributeName};
use base64::Engine;
use polybus::{Broker, Bus, Message, Registry, SubscribeOptions, Topic, wire};
use polybus_sqs::names::TopicQueues;
use polybus_sqs::{ENCODING, SqsConnector, TOPIC_TAG};
use serde_json::json;

const ENV: &str = "dev";
const WAIT: Duration = Duration::from_secs(10);

fn endpoint() -> String {
    std::env::var("POLYBUS_SQS_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:4566".to_owned())
}

/// A registry with the broker `interop` (one SQS env), a topic of its own and a native client.
struct World {
    bus: Bus,
    event: String,
    queues: TopicQueues,
    sqs: Client,
    _dir: tempfile::TempDir,
}

impl World {
    async fn new(fifo: bool) -> World {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("registry.db");
        let registry =
            Registry::open(path.to_str().expect("utf-8 path")).await.expect("opening the registry");
        let broker = Broker::from_value(json!({
            "name": "Interop", "tag": "interop",
            "envs": [{"slug": ENV, "type": "aws_sqs", "config": {
                "region": "us-east-1", "endpointUrl": endpoint(),
                "accessKeyId": "test", "secretAccessKey": "test",
            }}],
        }))
        .expect("broker definition");
        registry.create_broker(broker).await.expect("creating the broker");
        let native = format!("i-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let event = format!("interop:{native}");
        let topic =
            Topic::from_value(json!({"tag": event, "envs": [{"slug": ENV, "fifo": fifo}]})).expect("topic");
        registry.create_topic(topic).await.expect("creating the topic");
        let bus = Bus::builder(registry).connector(Arc::new(SqsConnector)).build();
        let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new("us-east-1"))
            .endpoint_url(endpoint())
            .credentials_provider(aws_sdk_sqs::config::Credentials::new("test", "test", None, None, "test"))
            .load()
            .await;
        World { bus, event, queues: TopicQueues::new(&native, fifo), sqs: Client::new(&config), _dir: dir }
    }

    /// Runs `test`, then deletes the topic's queues whether it passed or not.
    async fn run<F, Fut>(fifo: bool, test: F)
    where
        F: FnOnce(Arc<World>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let world = Arc::new(World::new(fifo).await);
        let outcome = tokio::spawn(test(world.clone())).await;
        let _ = tokio::time::timeout(WAIT, world.bus.close()).await;
        let prefix = world.queues.base().trim_end_matches(".fifo").to_owned();
        if let Ok(urls) = world.sqs.list_queues().queue_name_prefix(prefix).send().await {
            for url in urls.queue_urls() {
                let _ = world.sqs.delete_queue().queue_url(url).send().await;
            }
        }
        if let Err(e) = outcome {
            std::panic::resume_unwind(e.into_panic());
        }
    }

    fn options(&self, group: &str) -> SubscribeOptions {
        SubscribeOptions { ack_deadline: Duration::from_secs(1), ..SubscribeOptions::new(group) }
    }

    /// Creates `group`'s queue through polybus (without receiving) and returns its URL.
    async fn group_queue(&self, group: &str) -> String {
        let mut sub = within("subscribing", self.bus.subscribe(ENV, &self.event, self.options(group)))
            .await
            .expect("subscribing");
        sub.close().await.expect("closing");
        let name = self.queues.group(group);
        let out = self.sqs.get_queue_url().queue_name(&name).send().await.expect("the group's queue exists");
        out.queue_url().expect("a queue URL").to_owned()
    }

    /// The next message on `url`, received with the SDK (and deleted).
    async fn receive_natively(&self, url: &str) -> aws_sdk_sqs::types::Message {
        let out = within(
            "a native receive",
            self.sqs
                .receive_message()
                .queue_url(url)
                .max_number_of_messages(1)
                .wait_time_seconds(5)
                .message_attribute_names("All")
                .message_system_attribute_names(MessageSystemAttributeName::All)
                .send(),
        )
        .await
        .expect("receiving natively");
        let message = out.messages().first().cloned().expect("a message on the group's queue");
        let receipt = message.receipt_handle().expect("a receipt handle");
        self.sqs.delete_message().queue_url(url).receipt_handle(receipt).send().await.expect("deleting");
        message
    }
}

async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(WAIT, fut).await.unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

fn attributes(message: &aws_sdk_sqs::types::Message) -> BTreeMap<String, String> {
    message
        .message_attributes()
        .into_iter()
        .flatten()
        .map(|(name, value)| (name.clone(), value.string_value().unwrap_or_default().to_owned()))
        .collect()
}

fn string(value: &str) -> MessageAttributeValue {
    MessageAttributeValue::builder().data_type("String").string_value(value).build().expect("attribute")
}

#[tokio::test]
async fn message_published_through_polybus_is_an_ordinary_sqs_message() {
    World::run(false, |w| async move {
        let url = w.group_queue("native").await;
        let tags = w.sqs.list_queue_tags().queue_url(&url).send().await.expect("tags");
        assert_eq!(tags.tags().and_then(|t| t.get(TOPIC_TAG)), Some(&w.queues.base()), "group queue tag");

        let text = Message::text("hello ✓")
            .key("customer-42")
            .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let id = within("publishing", w.bus.publish(ENV, &w.event, text.clone())).await.expect("publishing");
        let received = w.receive_natively(&url).await;
        assert_eq!(received.body(), Some("hello ✓"), "text travels as the body, unchanged");
        let expected: BTreeMap<String, String> = [
            (wire::ID, id.as_str()),
            (wire::KEY, "customer-42"),
            (wire::CONTENT_TYPE, "text/plain"),
            ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
        .collect();
        let mut got = attributes(&received);
        let published_at =
            got.remove(wire::PUBLISHED_AT).and_then(|t| wire::parse_time(&t)).expect("publish time");
        assert!((chrono::Utc::now() - published_at).num_seconds().abs() < 60, "publish time {published_at}");
        assert_eq!(got, expected, "message attributes");

        let payload: Vec<u8> = (0..=255u8).collect();
        let binary = Message::new(payload.clone()).content_type("application/octet-stream");
        within("publishing", w.bus.publish(ENV, &w.event, binary)).await.expect("publishing");
        let received = w.receive_natively(&url).await;
        assert_eq!(attributes(&received).get(ENCODING).map(String::as_str), Some("base64"));
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(received.body().expect("a body"))
            .expect("a base64 body");
        assert_eq!(decoded, payload, "binary payload, base64-encoded");
    })
    .await;
}

#[tokio::test]
async fn message_sent_natively_is_consumed_through_polybus() {
    World::run(false, |w| async move {
        let mut sub = within("subscribing", w.bus.subscribe(ENV, &w.event, w.options("app")))
            .await
            .expect("subscribing");
        let url = w.sqs.get_queue_url().queue_name(w.queues.group("app")).send().await.expect("queue");
        let url = url.queue_url().expect("a queue URL");
        let sent = w
            .sqs
            .send_message()
            .queue_url(url)
            .message_body(r#"{"order": 42}"#)
            .message_attributes("origin", string("aws-sdk"))
            .message_attributes(
                "priority",
                MessageAttributeValue::builder()
                    .data_type("Number")
                    .string_value("7")
                    .build()
                    .expect("number"),
            )
            .send()
            .await
            .expect("sending natively");

        let delivery = within("the delivery", sub.next()).await.expect("open").expect("a delivery");
        assert_eq!(Some(delivery.id.as_str()), sent.message_id(), "the id is SQS's message id");
        assert_eq!(delivery.payload_str(), Some(r#"{"order": 42}"#));
        assert_eq!(delivery.headers.get("origin").map(String::as_str), Some("aws-sdk"));
        assert_eq!(delivery.headers.get("priority").map(String::as_str), Some("7"));
        assert_eq!((delivery.attempt, delivery.key.as_ref()), (1, None));
        assert!((chrono::Utc::now() - delivery.published_at).num_seconds().abs() < 60, "SentTimestamp");
        delivery.ack().await.expect("acking");
        sub.close().await.expect("closing");

        let left = w
            .sqs
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await
            .expect("queue attributes");
        let count = |name| left.attributes().and_then(|a| a.get(&name)).cloned();
        assert_eq!(count(QueueAttributeName::ApproximateNumberOfMessages).as_deref(), Some("0"));
        assert_eq!(
            count(QueueAttributeName::ApproximateNumberOfMessagesNotVisible).as_deref(),
            Some("0"),
            "acked = deleted"
        );
    })
    .await;
}

#[tokio::test]
async fn fifo_topic_keeps_the_order_of_each_key() {
    World::run(true, |w| async move {
        // One delivery at a time, so no message group is in flight when the next receive starts.
        let options = SubscribeOptions { prefetch: 1, ..w.options("ordered") };
        let mut sub =
            within("subscribing", w.bus.subscribe(ENV, &w.event, options)).await.expect("subscribing");
        const KEYS: usize = 3;
        const PER_KEY: usize = 8;
        for seq in 0..PER_KEY {
            for key in 0..KEYS {
                let message = Message::text(seq.to_string()).key(format!("key-{key}"));
                within("publishing", w.bus.publish(ENV, &w.event, message)).await.expect("publishing");
            }
        }
        let url = w.sqs.get_queue_url().queue_name(w.queues.group("ordered")).send().await.expect("queue");
        assert!(url.queue_url().expect("a queue URL").ends_with("--ordered.fifo"), "a FIFO group queue");

        let mut seen: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for _ in 0..KEYS * PER_KEY {
            let delivery = within("a delivery", sub.next()).await.expect("open").expect("a delivery");
            let key = delivery.key.clone().expect("the key");
            seen.entry(key)
                .or_default()
                .push(delivery.payload_str().and_then(|s| s.parse().ok()).expect("seq"));
            delivery.ack().await.expect("acking");
        }
        let in_order: Vec<usize> = (0..PER_KEY).collect();
        for key in 0..KEYS {
            assert_eq!(seen.get(&format!("key-{key}")), Some(&in_order), "order of key-{key}");
        }
        sub.close().await.expect("closing");
    })
    .await;
}

#[tokio::test]
async fn delays_sqs_cannot_take_are_refused_at_publish() {
    World::run(false, |w| async move {
        w.group_queue("big").await;
        let too_long = Message::text("next week").delay(Duration::from_secs(16 * 60));
        let err = w.bus.publish(ENV, &w.event, too_long).await.expect_err("a 16 minute delay is refused");
        assert_eq!(err.code(), "UNSUPPORTED", "{err}");
        let too_big = Message::new(vec![0u8; polybus_sqs::MAX_PAYLOAD_BYTES * 2]);
        let err = w.bus.publish(ENV, &w.event, too_big).await.expect_err("an oversized message is refused");
        assert_eq!(err.code(), "UNSUPPORTED", "{err}");
        let fits = Message::new(vec![0u8; polybus_sqs::MAX_PAYLOAD_BYTES]);
        within("publishing the largest declared payload", w.bus.publish(ENV, &w.event, fits))
            .await
            .expect("the largest declared payload is accepted");
    })
    .await;
}

/// A long poll outlives the client that sent it: SQS (and moto) may still hand it a message
/// after the member that polled has closed. That message must come back at once, not after
/// the member's ack deadline (60 s here, far past this test's deadline).
#[tokio::test]
async fn a_message_taken_by_a_closed_members_open_poll_comes_back_at_once() {
    World::run(false, |w| async move {
        let options =
            SubscribeOptions { ack_deadline: Duration::from_secs(60), ..SubscribeOptions::new("leavers") };
        let mut leaving = within("subscribing", w.bus.subscribe(ENV, &w.event, options.clone()))
            .await
            .expect("subscribing");
        // Asking for a delivery sends the member's long poll; the queue is empty, so it stays open.
        let asked = tokio::time::timeout(Duration::from_millis(500), leaving.next()).await;
        assert!(asked.is_err(), "nothing was published, so nothing is delivered");
        within("closing", leaving.close()).await.expect("closing");

        // The only poll open at SQS now is the closed member's: it takes this message.
        let id = within("publishing", w.bus.publish(ENV, &w.event, Message::text("after close")))
            .await
            .expect("publishing");
        let mut staying =
            within("subscribing", w.bus.subscribe(ENV, &w.event, options)).await.expect("subscribing");
        let delivery = within("the message the closed member's poll took", staying.next())
            .await
            .expect("open")
            .expect("a delivery");
        assert_eq!(delivery.id, id, "the message published after the close");
        delivery.ack().await.expect("acking");
        staying.close().await.expect("closing");
    })
    .await;
}
