//! What the adapter's group tests share: a bus on a Kafka env with a fresh topic of the test's own,
//! and deleting that topic and its group's retry topic afterwards.

use std::sync::Arc;

use polybus::{Broker, Bus, Registry, Subscriber, Topic};
use polybus_kafka::KafkaConnector;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

/// The env every test broker has.
pub const ENV: &str = "test";

/// A bus and the topic a test publishes to.
pub struct Setup {
    /// The bus, with the Kafka connector.
    pub bus: Bus,
    /// The topic's event reference, `<tag>:<native name>`.
    pub event: String,
    /// The topic's native name (`<name>-<id>`).
    pub topic: String,
    /// A fresh id, for names the test makes up (groups).
    pub id: String,
    /// Holds the registry's database: keep it to the end of the test.
    pub dir: tempfile::TempDir,
}

/// A bus whose broker `tag` has [`ENV`] with the kafka `config`, and a topic `<name>-<fresh id>`.
pub async fn setup(tag: &str, name: &str, config: Value) -> Setup {
    let dir = tempfile::tempdir().expect("temporary directory");
    let registry =
        Registry::open(dir.path().join("registry.db").to_str().expect("UTF-8 path")).await.expect("registry");
    let broker = json!({"name": tag, "tag": tag, "envs": [{"slug": ENV, "type": "kafka", "config": config}]});
    registry
        .create_broker(Broker::from_value(broker).expect("broker definition"))
        .await
        .expect("creating broker");
    let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let topic = format!("{name}-{id}");
    let event = format!("{tag}:{topic}");
    registry
        .create_topic(Topic::from_value(json!({"tag": event})).expect("topic"))
        .await
        .expect("creating topic");
    let bus = Bus::builder(registry).connector(Arc::new(KafkaConnector)).build();
    Setup { bus, event, topic, id, dir }
}

/// Deletes `topic` and `group`'s retry topic on `brokers`; says so when it cannot.
pub async fn delete_topics(brokers: &str, topic: &str, group: &str) {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().expect("admin client");
    let retry = polybus_kafka::retry_topic(topic, group);
    if let Err(e) = admin.delete_topics(&[topic, &retry], &AdminOptions::new()).await {
        eprintln!("deleting the test's topics: {e}");
    }
    // Its drop joins a polling thread: off the runtime.
    let _ = tokio::task::spawn_blocking(move || drop(admin)).await;
}

/// A group member that acks every delivery and reports its id until told to stop, then leaves.
#[allow(dead_code, reason = "group_failover's members behave otherwise")]
pub async fn member(
    mut sub: Subscriber,
    seen: mpsc::UnboundedSender<String>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let next = tokio::select! {
            next = sub.next() => next,
            _ = stop.changed() => break,
        };
        match next {
            Some(Ok(delivery)) => {
                let id = delivery.id.clone();
                if delivery.ack().await.is_ok() {
                    let _ = seen.send(id);
                }
            }
            Some(Err(e)) => eprintln!("receiving failed: {e}"),
            None => break,
        }
    }
    // Waits until the member has left: librdkafka threads still running at exit can crash it.
    if let Err(e) = sub.close().await {
        eprintln!("closing a member: {e}");
    }
}

/// Stops the [`member`]s, waits until they have left, closes the bus and deletes the topics.
#[allow(dead_code, reason = "group_failover's members behave otherwise")]
pub async fn stop_members(
    members: Vec<tokio::task::JoinHandle<()>>,
    stop: watch::Sender<bool>,
    bus: &Bus,
    brokers: &str,
    topic: &str,
    group: &str,
) {
    stop.send_replace(true);
    for m in members {
        let _ = m.await;
    }
    bus.close().await.expect("closing the bus");
    delete_topics(brokers, topic, group).await;
}
