//! Replay on Kafka: refused while the group has members, saying to stop them; done once they left.

use std::time::Duration;

use common::{ENV, Setup};
use polybus::{Message, ReplayFrom, SubscribeOptions, Subscriber};
use serde_json::json;

mod common;

/// The Kafka-protocol broker of the behaviour suite, unless `KAFKA_BROKERS` says otherwise.
const ADDRESS: &str = "127.0.0.1:9092";
const WAIT: Duration = Duration::from_secs(20);

async fn receive(sub: &mut Subscriber, what: &str) -> String {
    let delivery = tokio::time::timeout(WAIT, sub.next())
        .await
        .unwrap_or_else(|_| panic!("no {what} within {WAIT:?}"))
        .unwrap_or_else(|| panic!("the subscription closed before {what}"))
        .unwrap_or_else(|e| panic!("receiving {what}: {e}"));
    let id = delivery.id.clone();
    delivery.ack().await.unwrap_or_else(|e| panic!("acking {what}: {e}"));
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_is_refused_while_the_group_has_members_and_done_once_they_left() {
    let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| ADDRESS.to_owned());
    let Setup { bus, event, topic, id, dir: _registry } =
        common::setup("replay", "jobs", json!({"brokers": [&brokers]})).await;
    let group = format!("replayed-{id}");
    let sent = bus.publish(ENV, &event, Message::text("once")).await.expect("publishing");
    let mut sub = bus.subscribe(ENV, &event, SubscribeOptions::new(&group)).await.expect("subscribing");
    assert_eq!(receive(&mut sub, "the message").await, sent);

    let refused =
        bus.replay(ENV, &event, &group, ReplayFrom::Beginning).await.expect_err("a member is connected");
    assert!(refused.to_string().contains("stop its consumers"), "{refused}");

    sub.close().await.expect("closing the member");
    bus.replay(ENV, &event, &group, ReplayFrom::Beginning).await.expect("replaying once the member left");
    let mut sub = bus.subscribe(ENV, &event, SubscribeOptions::new(&group)).await.expect("subscribing again");
    assert_eq!(receive(&mut sub, "the replayed message").await, sent);
    sub.close().await.expect("closing the member");
    bus.close().await.expect("closing the bus");
    common::delete_topics(&brokers, &topic, &group).await;
}
