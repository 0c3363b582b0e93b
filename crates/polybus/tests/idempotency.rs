//! Idempotent publishing through `Bus` when the broker fails or is slow: a failed publish gives
//! its key back, and a publish of a key another publisher holds waits for it, then answers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use polybus::core::kind::FieldError;
use polybus::core::{ConnectTarget, Op, SubscribeOptions, Subscription};
use polybus::{
    Broker, BrokerKind, BrokerType, Bus, Capabilities, Connector, Error, Group, IdempotencyState, Message,
    Registry, SqliteStore, Topic, TopicSpec, Transport,
};
use serde_json::{Value, json};
use tokio::sync::watch;

const EVENT: &str = "flaky:payments";

/// What the test makes the broker do: refuse publishes, or hold them until let go.
struct Control {
    refuse: AtomicBool,
    hold: watch::Sender<bool>,
}

/// The embedded broker, with publishes the test can refuse or hold.
struct Flaky(Arc<Control>);

impl BrokerKind for Flaky {
    fn broker_type(&self) -> BrokerType {
        BrokerType::from_static("flaky")
    }

    fn validate_config(&self, _: &Value) -> Result<(), FieldError> {
        Ok(())
    }
}

#[async_trait]
impl Connector for Flaky {
    async fn connect(&self, target: &ConnectTarget) -> polybus::Result<Arc<dyn Transport>> {
        let inner = polybus_embedded::EmbeddedConnector.connect(target).await?;
        Ok(Arc::new(FlakyTransport { inner, control: self.0.clone() }))
    }
}

struct FlakyTransport {
    inner: Arc<dyn Transport>,
    control: Arc<Control>,
}

impl FlakyTransport {
    async fn gate(&self) -> polybus::Result<()> {
        if self.control.refuse.load(Ordering::SeqCst) {
            return Err(Error::transport(Op::Publish, "flaky", "the broker refused the publish"));
        }
        let mut held = self.control.hold.subscribe();
        held.wait_for(|hold| !hold).await.map_err(|_| Error::Closed("the test ended".into()))?;
        Ok(())
    }
}

#[async_trait]
impl Transport for FlakyTransport {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn ensure_topic(&self, topic: &TopicSpec) -> polybus::Result<()> {
        self.inner.ensure_topic(topic).await
    }
    async fn publish(&self, topic: &TopicSpec, message: Message) -> polybus::Result<()> {
        self.gate().await?;
        self.inner.publish(topic, message).await
    }
    async fn publish_batch(&self, topic: &TopicSpec, messages: Vec<Message>) -> polybus::Result<()> {
        self.gate().await?;
        self.inner.publish_batch(topic, messages).await
    }
    async fn subscribe(
        &self,
        topic: &TopicSpec,
        options: &SubscribeOptions,
    ) -> polybus::Result<Box<dyn Subscription>> {
        self.inner.subscribe(topic, options).await
    }
    async fn ping(&self) -> polybus::Result<()> {
        self.inner.ping().await
    }
    async fn close(&self) -> polybus::Result<()> {
        self.inner.close().await
    }
}

async fn setup(dir: &std::path::Path) -> (Arc<Control>, Bus) {
    let control = Arc::new(Control { refuse: AtomicBool::new(false), hold: watch::Sender::new(false) });
    let store = SqliteStore::open(dir.join("registry.db")).await.expect("registry");
    let bus =
        Bus::builder(Registry::new(Arc::new(store))).connector(Arc::new(Flaky(control.clone()))).build();
    let path = dir.join("broker.db").display().to_string();
    let broker = json!({"name": "Flaky", "tag": "flaky", "envs": [
        {"slug": "dev", "type": "flaky", "config": {"path": path}}]});
    bus.registry().create_broker(Broker::from_value(broker).expect("broker")).await.expect("create broker");
    let topic = Topic::from_value(json!({"tag": EVENT})).expect("topic");
    bus.registry().create_topic(topic).await.expect("create topic");
    (control, bus)
}

async fn payloads(bus: &Bus, count: usize) -> Vec<String> {
    let mut sub = bus.subscribe("dev", EVENT, Group("billing")).await.expect("subscribe");
    let mut got = Vec::new();
    while got.len() < count {
        let next =
            tokio::time::timeout(Duration::from_secs(10), sub.next()).await.expect("a delivery in time");
        let delivery = next.expect("open").expect("a delivery");
        got.push(delivery.payload_str().unwrap_or_default().to_owned());
        delivery.ack().await.expect("ack");
    }
    got
}

#[tokio::test]
async fn a_failed_publish_gives_its_key_back_so_a_retry_publishes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (control, bus) = setup(dir.path()).await;
    control.refuse.store(true, Ordering::SeqCst);
    let err = bus.publish("dev", EVENT, Message::text("lost").idempotency_key("pay-1")).await.unwrap_err();
    assert_eq!(err.code(), "PUBLISH_FAILED");
    assert_eq!(bus.check_idempotency("dev", EVENT, "pay-1").await.expect("check"), None);

    control.refuse.store(false, Ordering::SeqCst);
    let retry = bus.publish_outcome("dev", EVENT, Message::text("retry").idempotency_key("pay-1")).await;
    let retry = retry.expect("the retry publishes");
    assert!(!retry.duplicate);
    let again =
        bus.publish("dev", EVENT, Message::text("again").idempotency_key("pay-1")).await.expect("dup");
    assert_eq!(again, retry.id);
    bus.publish("dev", EVENT, Message::text("marker")).await.expect("marker");
    assert_eq!(payloads(&bus, 2).await, ["retry", "marker"]);
    bus.close().await.expect("close");
}

#[tokio::test]
async fn a_publish_of_a_pending_key_waits_for_it_then_answers_its_id_or_gives_up() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (control, bus) = setup(dir.path()).await;
    bus.publish("dev", EVENT, Message::text("warm-up")).await.expect("connect");
    control.hold.send_replace(true);
    let first = Message::text("first").idempotency_key("pay-2");
    let first_id = first.id.clone();
    let holder = tokio::spawn({
        let bus = bus.clone();
        async move { bus.publish_outcome("dev", EVENT, first).await }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let record = bus.check_idempotency("dev", EVENT, "pay-2").await.expect("check");
        if record.is_some_and(|r| r.state == IdempotencyState::Pending && r.message_id == first_id) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the first publish never claimed its key");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Held past the wait: a clear, retryable error naming the key and the message holding it.
    let err =
        bus.publish("dev", EVENT, Message::text("impatient").idempotency_key("pay-2")).await.unwrap_err();
    assert_eq!(err.code(), "IDEMPOTENCY_PENDING");
    assert!(err.is_retryable());
    assert!(err.to_string().contains("pay-2") && err.to_string().contains(&first_id), "{err}");

    // Let go while another publish waits: it answers the first message's id.
    let waiter = tokio::spawn({
        let bus = bus.clone();
        async move { bus.publish_outcome("dev", EVENT, Message::text("second").idempotency_key("pay-2")).await }
    });
    control.hold.send_replace(false);
    let first = holder.await.expect("joined").expect("the first publish");
    let second = waiter.await.expect("joined").expect("the waiting publish");
    assert_eq!((first.id.as_str(), first.duplicate), (first_id.as_str(), false));
    assert_eq!((second.id.as_str(), second.duplicate), (first_id.as_str(), true));
    bus.publish("dev", EVENT, Message::text("marker")).await.expect("marker");
    assert_eq!(payloads(&bus, 3).await, ["warm-up", "first", "marker"]);
    bus.close().await.expect("close");
}
