//! Who holds a delivery: leases that expire, deliveries handed back on close.
//!
//! Needs the Redis on `POLYBUS_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`).

use std::sync::Arc;
use std::time::Duration;

use polybus::core::{ConnectTarget, Delivery, Subscription};
use polybus::{Connector, Message, SubscribeOptions, TopicSpec, Transport};
use polybus_redis::RedisConnector;

const WAIT: Duration = Duration::from_secs(10);

fn redis_url() -> String {
    std::env::var("POLYBUS_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

async fn transport() -> Arc<dyn Transport> {
    let target = ConnectTarget {
        broker: "leases".into(),
        env: "dev".into(),
        broker_type: polybus_redis::BROKER_TYPE,
        config: serde_json::json!({ "url": redis_url() }),
    };
    RedisConnector.connect(&target).await.expect("connecting")
}

fn topic() -> TopicSpec {
    TopicSpec::named(format!("polybus-leases-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]))
}

fn options(group: &str, ack_deadline: Duration, prefetch: usize) -> SubscribeOptions {
    SubscribeOptions { ack_deadline, prefetch, ..SubscribeOptions::new(group) }
}

async fn next(sub: &mut Box<dyn Subscription>) -> Delivery {
    match tokio::time::timeout(WAIT, sub.next()).await {
        Ok(Some(Ok(delivery))) => delivery,
        Ok(Some(Err(e))) => panic!("receiving: {e}"),
        Ok(None) => panic!("the subscription closed"),
        Err(_) => panic!("nothing delivered within {WAIT:?}"),
    }
}

async fn delete(topic: &TopicSpec) {
    let client = redis::Client::open(redis_url()).expect("redis url");
    let mut conn = client.get_multiplexed_async_connection().await.expect("connecting");
    let keys = [topic.native_name.clone(), format!("{}:delayed", topic.native_name)];
    let _: i64 = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await.expect("DEL");
}

#[tokio::test]
async fn acking_after_another_member_took_the_message_over_is_lease_lost() {
    let (transport, topic) = (transport().await, topic());
    let deadline = Duration::from_millis(500);
    let mut one = transport.subscribe(&topic, &options("workers", deadline, 1)).await.expect("subscribing");
    let mut two = transport.subscribe(&topic, &options("workers", deadline, 1)).await.expect("subscribing");
    transport.publish(&topic, Message::text("contested")).await.expect("publishing");

    // Whoever gets it first sits on it past the deadline; the other then takes it over.
    let (first, one_got_it) = tokio::select! {
        d = next(&mut one) => (d, true),
        d = next(&mut two) => (d, false),
    };
    let mut second_member = if one_got_it { two } else { one };
    assert_eq!(first.message.attempt, 1);
    let taken_over = next(&mut second_member).await;
    assert_eq!(taken_over.message.id, first.message.id);
    assert_eq!(taken_over.message.attempt, 2);

    let err = first.ack().await.expect_err("the first delivery no longer holds the message");
    assert_eq!(err.code(), "LEASE_LOST", "{err}");
    taken_over.ack().await.expect("the holder acks");
    delete(&topic).await;
}

#[tokio::test]
async fn closing_hands_buffered_messages_back_at_once_without_counting_an_attempt() {
    let (transport, topic) = (transport().await, topic());
    // A deadline far longer than the test: only the hand-back can make the others visible.
    let deadline = Duration::from_secs(60);
    let mut first =
        transport.subscribe(&topic, &options("readers", deadline, 10)).await.expect("subscribing");
    let batch: Vec<Message> = (0..5).map(|i| Message::text(format!("m-{i}"))).collect();
    let ids: Vec<String> = batch.iter().map(|m| m.id.clone()).collect();
    transport.publish_batch(&topic, batch).await.expect("publishing");

    let held = next(&mut first).await;
    // Wait until the member has fetched the rest into its buffer.
    let client = redis::Client::open(redis_url()).expect("redis url");
    let mut conn = client.get_multiplexed_async_connection().await.expect("connecting");
    let buffered_by = tokio::time::Instant::now() + WAIT;
    loop {
        let summary: (i64, redis::Value, redis::Value, redis::Value) = redis::cmd("XPENDING")
            .arg(&topic.native_name)
            .arg("readers")
            .query_async(&mut conn)
            .await
            .expect("XPENDING");
        if summary.0 == 5 {
            break;
        }
        assert!(tokio::time::Instant::now() < buffered_by, "the member fetched only {} of 5", summary.0);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.close().await.expect("closing");
    let held_id = held.message.id.clone();
    held.ack().await.expect("a delivery handed out before close can still be acked");

    let mut second =
        transport.subscribe(&topic, &options("readers", deadline, 10)).await.expect("subscribing");
    let mut rest = Vec::new();
    for _ in 0..4 {
        let delivery = next(&mut second).await;
        assert_eq!(delivery.message.attempt, 1, "a message never handed out was not attempted");
        rest.push(delivery.message.id.clone());
        delivery.ack().await.expect("acking");
    }
    rest.push(held_id);
    rest.sort();
    let mut expected = ids;
    expected.sort();
    assert_eq!(rest, expected);
    second.close().await.expect("closing");
    delete(&topic).await;
}

#[tokio::test]
async fn closing_the_transport_ends_its_subscriptions_and_refuses_publishes() {
    let (transport, topic) = (transport().await, topic());
    let mut sub = transport
        .subscribe(&topic, &options("closers", Duration::from_secs(1), 4))
        .await
        .expect("subscribing");
    transport.close().await.expect("closing");
    match tokio::time::timeout(WAIT, sub.next()).await {
        Ok(None) => {}
        Ok(Some(other)) => panic!("expected the subscription to end, got {other:?}"),
        Err(_) => panic!("the subscription did not end within {WAIT:?} of closing the transport"),
    }
    let err = transport.publish(&topic, Message::text("too late")).await.expect_err("closed");
    assert_eq!(err.code(), "CLOSED", "{err}");
    delete(&topic).await;
}
