//! What is particular to MQTT: redeliveries stay within their group, messages a leaving
//! member held go to the next member, late acks are refused, and bad names or
//! addresses fail clearly. Runs against `MQTT_HOST:MQTT_PORT` (default 127.0.0.1:1883).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{ENV, Native, WAIT, World, broker_address};
use polybus::{Broker, Bus, Error, FailureKind, Message, Registry, SubscribeOptions, Subscriber, Topic};
use polybus_mqtt::MqttConnector;
use serde_json::json;

fn options(group: &str, ack_deadline: Duration) -> SubscribeOptions {
    SubscribeOptions { ack_deadline, ..SubscribeOptions::new(group) }
}

async fn receive(sub: &mut Subscriber, what: &str) -> polybus::Delivery {
    match tokio::time::timeout(WAIT, sub.next()).await {
        Ok(Some(Ok(d))) => d,
        Ok(Some(Err(e))) => panic!("receiving {what}: {e}"),
        Ok(None) => panic!("receiving {what}: the subscription closed"),
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

async fn expect_nothing(sub: &mut Subscriber, window: Duration, what: &str) {
    if let Ok(next) = tokio::time::timeout(window, sub.next()).await {
        panic!("{what}: expected nothing within {window:?}, got {next:?}");
    }
}

#[tokio::test]
async fn a_nacked_message_comes_back_to_its_own_group_only() {
    let world = World::new().await;
    let mut billing =
        world.bus.subscribe(ENV, &world.event, options("billing", Duration::from_secs(30))).await.unwrap();
    let mut audit =
        world.bus.subscribe(ENV, &world.event, options("audit", Duration::from_secs(30))).await.unwrap();
    let id = world.bus.publish(ENV, &world.event, Message::text("once per group")).await.unwrap();

    let first = receive(&mut billing, "billing's delivery").await;
    receive(&mut audit, "audit's delivery").await.ack().await.unwrap();
    first.nack().await.unwrap();
    let again = receive(&mut billing, "billing's redelivery").await;
    assert_eq!((again.id.as_str(), again.attempt), (id.as_str(), 2));
    again.ack().await.unwrap();
    expect_nothing(&mut audit, Duration::from_millis(500), "audit after billing's nack").await;
    billing.close().await.unwrap();
    audit.close().await.unwrap();
    world.bus.close().await.unwrap();
    world.forget_groups(&["billing", "audit"]).await;
}

#[tokio::test]
async fn messages_queued_for_a_leaving_member_wait_for_the_next_member() {
    let world = World::new().await;
    // Prefetch 2: of six jobs, the member takes two and the broker queues the rest for it.
    let prefetch2 = SubscribeOptions { prefetch: 2, ..options("workers", Duration::from_secs(30)) };
    let mut leaving = world.bus.subscribe(ENV, &world.event, prefetch2).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(world.bus.publish(ENV, &world.event, Message::text(format!("job {i}"))).await.unwrap());
    }
    // Two jobs in hand when the member leaves; it finishes them after leaving, which frees
    // its prefetch slots for the four the broker had queued for it.
    let first = receive(&mut leaving, "the first job").await;
    let second = receive(&mut leaving, "the second job").await;
    let handled = [first.id.clone(), second.id.clone()];
    leaving.close().await.unwrap();
    drop(leaving);
    first.ack().await.unwrap();
    second.ack().await.unwrap();

    let mut next =
        world.bus.subscribe(ENV, &world.event, options("workers", Duration::from_secs(30))).await.unwrap();
    let mut got = Vec::new();
    for n in 0..4 {
        let d = receive(&mut next, &format!("left-over job {n}")).await;
        assert_eq!(d.attempt, 1, "a message never handed out keeps its attempt");
        got.push(d.id.clone());
        d.ack().await.unwrap();
    }
    got.sort();
    let mut expected: Vec<_> = ids.into_iter().filter(|id| !handled.contains(id)).collect();
    expected.sort();
    assert_eq!(got, expected, "the next member gets exactly the unhandled jobs");
    expect_nothing(&mut next, Duration::from_millis(500), "after the left-over jobs").await;

    // Adopted means cleared: no record of a gone member stays retained for the group.
    let mut native = Native::connect().await;
    native.subscribe(&format!("{}/+", polybus_mqtt::orphan_topic("workers", &world.topic))).await;
    let leftover = tokio::time::timeout(Duration::from_millis(500), native.publish_received()).await;
    assert!(leftover.is_err(), "a gone member's record was left retained: {leftover:?}");
    next.close().await.unwrap();
    world.bus.close().await.unwrap();
    world.forget_groups(&["workers"]).await;
}

#[tokio::test]
async fn an_ack_after_the_deadline_is_refused_and_the_message_comes_back() {
    let world = World::new().await;
    let mut sub =
        world.bus.subscribe(ENV, &world.event, options("slow", Duration::from_secs(1))).await.unwrap();
    let id = world.bus.publish(ENV, &world.event, Message::text("too slow")).await.unwrap();
    let late = receive(&mut sub, "the first delivery").await;
    let again = receive(&mut sub, "the redelivery after the deadline").await;
    assert_eq!((again.id.as_str(), again.attempt), (id.as_str(), 2));
    match late.ack().await {
        Err(Error::LeaseLost(lost)) => assert_eq!(lost, id),
        other => panic!("a late ack must be refused with LeaseLost, got {other:?}"),
    }
    again.ack().await.unwrap();
    expect_nothing(&mut sub, Duration::from_millis(1500), "after acking the redelivery").await;
    sub.close().await.unwrap();
    world.bus.close().await.unwrap();
    world.forget_groups(&["slow"]).await;
}

#[tokio::test]
async fn only_the_deliveries_left_unacked_come_back_after_the_deadline() {
    let world = World::new().await;
    let mut sub =
        world.bus.subscribe(ENV, &world.event, options("partial", Duration::from_secs(1))).await.unwrap();
    for i in 0..4 {
        world.bus.publish(ENV, &world.event, Message::text(format!("job {i}"))).await.unwrap();
    }
    let mut held = Vec::new();
    for n in 0..4 {
        held.push(receive(&mut sub, &format!("delivery {n}")).await);
    }
    // Acked out of order: the second and the last, so the deadlines left are not a prefix.
    let mut unacked = Vec::new();
    for (n, delivery) in held.into_iter().enumerate() {
        if n % 2 == 1 {
            delivery.ack().await.unwrap();
        } else {
            unacked.push(delivery);
        }
    }
    let mut expected: Vec<String> = unacked.iter().map(|d| d.id.clone()).collect();
    let mut back = Vec::new();
    for n in 0..2 {
        let again = receive(&mut sub, &format!("redelivery {n}")).await;
        assert_eq!(again.attempt, 2, "attempt of the redelivery of {}", again.id);
        back.push(again.id.clone());
        again.ack().await.unwrap();
    }
    expected.sort();
    back.sort();
    assert_eq!(back, expected, "the unacked deliveries, each once");
    expect_nothing(&mut sub, Duration::from_millis(1500), "after acking both redeliveries").await;
    for late in unacked {
        assert!(matches!(late.ack().await, Err(Error::LeaseLost(_))), "a late ack must be refused");
    }
    sub.close().await.unwrap();
    world.bus.close().await.unwrap();
    world.forget_groups(&["partial"]).await;
}

#[tokio::test]
async fn a_subscription_keeps_redelivering_after_its_bus_closed() {
    let world = World::new().await;
    let mut sub =
        world.bus.subscribe(ENV, &world.event, options("late", Duration::from_secs(30))).await.unwrap();
    let id = world.bus.publish(ENV, &world.event, Message::text("after close")).await.unwrap();
    world.bus.close().await.unwrap();

    let first = receive(&mut sub, "the delivery").await;
    first.nack().await.expect("a nack after the bus closed still redelivers");
    let again = receive(&mut sub, "the redelivery").await;
    assert_eq!((again.id.as_str(), again.attempt), (id.as_str(), 2));
    again.ack().await.unwrap();
    sub.close().await.unwrap();
    world.forget_groups(&["late"]).await;
}

#[tokio::test]
async fn topic_names_mqtt_cannot_publish_to_are_refused_clearly() {
    let world = World::new().await;
    let wild =
        Topic::from_value(json!({"tag": "mqtt-test:wild", "envs": [{"slug": ENV, "nativeName": "a/+/b"}]}))
            .unwrap();
    let err = world.registry.create_topic(wild).await.unwrap_err();
    assert_eq!(err.code(), "VALIDATION_FAILED");
    let shown = err.to_string();
    assert!(shown.contains("wildcard in MQTT topic filters"), "names the rule: {err}");
    world.bus.close().await.unwrap();
}

#[tokio::test]
async fn an_unreachable_broker_fails_to_connect_without_revealing_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::open(dir.path().join("r.db").to_str().unwrap()).await.unwrap();
    let (host, _) = broker_address();
    registry
        .create_broker(
            Broker::from_value(json!({"name": "Down", "tag": "down", "envs": [{"slug": ENV, "type": "mqtt",
                "config": {"url": format!("mqtt://svc:hunter2@{host}:1")}}]}))
            .unwrap(),
        )
        .await
        .unwrap();
    registry.create_topic(Topic::from_value(json!({"tag": "down:orders"})).unwrap()).await.unwrap();
    let bus = Bus::builder(registry).connector(Arc::new(MqttConnector)).build();
    let err = bus.publish(ENV, "down:orders", Message::text("x")).await.unwrap_err();
    assert_eq!(err.code(), "CONNECT_FAILED", "{err}");
    assert_eq!(err.failure_kind(), Some(FailureKind::Unavailable), "{err}");
    assert!(err.is_retryable(), "{err}");
    let shown = err.to_string();
    assert!(shown.contains(&format!("{host}:1")), "names the endpoint: {err}");
    assert!(!shown.contains("hunter2"), "{err}");
}

#[tokio::test]
async fn protocol_version_3_is_refused_as_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::open(dir.path().join("r.db").to_str().unwrap()).await.unwrap();
    let (host, port) = broker_address();
    registry
        .create_broker(
            Broker::from_value(json!({"name": "Old", "tag": "old", "envs": [{"slug": ENV, "type": "mqtt",
                "config": {"host": host, "port": port, "version": 3}}]}))
            .unwrap(),
        )
        .await
        .unwrap();
    registry.create_topic(Topic::from_value(json!({"tag": "old:orders"})).unwrap()).await.unwrap();
    let bus = Bus::builder(registry).connector(Arc::new(MqttConnector)).build();
    let err = bus.publish(ENV, "old:orders", Message::text("x")).await.unwrap_err();
    assert_eq!(err.code(), "UNSUPPORTED", "{err}");
    let shown = err.to_string();
    assert!(shown.contains("version: 5"), "says what to do: {err}");
}
