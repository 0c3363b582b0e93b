//! A message published through polybus is an ordinary MQTT 5 message to any client, and
//! the reverse. Runs against the Mosquitto on `MQTT_HOST:MQTT_PORT` (default 127.0.0.1:1883).

mod common;

use bytes::Bytes;
use common::{ENV, Native, WAIT, World, user_property};
use polybus::{Group, Message, wire};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::PublishProperties;

#[tokio::test]
async fn message_published_through_polybus_reaches_a_native_subscriber_unchanged() {
    let world = World::new().await;
    let mut native = Native::connect().await;
    native.subscribe(&world.topic).await;

    let payload: Vec<u8> = (0..=255u8).collect();
    let sent = Message::new(payload.clone())
        .key("customer-42")
        .content_type("application/octet-stream")
        .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .header("x-tenant", "äöü");
    let id = world.bus.publish(ENV, &world.event, sent.clone()).await.expect("publishing through polybus");

    let got = native.publish_received().await;
    assert_eq!(got.topic, Bytes::from(world.topic.clone()), "topic is the native name, unprefixed");
    assert_eq!(got.qos, QoS::AtLeastOnce);
    assert_eq!(got.payload.as_ref(), payload.as_slice(), "payload bytes unchanged");
    let props = got.properties.as_ref().expect("publish properties");
    assert_eq!(props.content_type.as_deref(), Some("application/octet-stream"));
    assert_eq!(user_property(&got, "traceparent"), Some(sent.headers["traceparent"].as_str()));
    assert_eq!(user_property(&got, "x-tenant"), Some("äöü"));
    assert_eq!(user_property(&got, wire::ID), Some(id.as_str()));
    assert_eq!(user_property(&got, wire::KEY), Some("customer-42"));
    assert!(user_property(&got, wire::PUBLISHED_AT).and_then(wire::parse_time).is_some(), "publish time");
    assert_eq!(user_property(&got, wire::ATTEMPT), None, "no attempt on a first publish");
    world.bus.close().await.expect("closing the bus");
}

#[tokio::test]
async fn message_published_natively_is_consumed_through_polybus() {
    let world = World::new().await;
    let mut sub = world.bus.subscribe(ENV, &world.event, Group("billing")).await.expect("subscribing");
    let native = Native::connect().await;

    let properties = PublishProperties {
        content_type: Some("application/json".into()),
        user_properties: vec![("x-origin".into(), "native".into())],
        ..PublishProperties::default()
    };
    native
        .client
        .publish_with_properties(world.topic.clone(), QoS::AtLeastOnce, false, r#"{"total":42}"#, properties)
        .await
        .expect("publishing natively");

    let delivery = tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("a delivery within the wait")
        .expect("the subscription is open")
        .expect("receiving");
    assert_eq!(delivery.payload_str(), Some(r#"{"total":42}"#));
    assert_eq!(delivery.content_type.as_deref(), Some("application/json"));
    assert_eq!(delivery.headers.get("x-origin").map(String::as_str), Some("native"));
    assert_eq!(
        delivery.headers.len(),
        1,
        "no polybus properties invented as headers: {:?}",
        delivery.headers
    );
    assert_eq!(delivery.key, None);
    assert_eq!(delivery.attempt, 1);
    assert!(!delivery.id.is_empty(), "a message without a polybus id gets one");
    delivery.ack().await.expect("acking");
    sub.close().await.expect("closing the subscription");
    world.bus.close().await.expect("closing the bus");
    world.forget_groups(&["billing"]).await;
}

#[tokio::test]
async fn a_native_qos0_publish_is_delivered_and_settles_without_error() {
    let world = World::new().await;
    let mut sub = world.bus.subscribe(ENV, &world.event, Group("billing")).await.expect("subscribing");
    let native = Native::connect().await;
    native
        .client
        .publish(world.topic.clone(), QoS::AtMostOnce, false, "fire and forget")
        .await
        .expect("publishing");
    let delivery =
        tokio::time::timeout(WAIT, sub.next()).await.expect("a delivery").expect("open").expect("receiving");
    assert_eq!(delivery.payload_str(), Some("fire and forget"));
    delivery.ack().await.expect("acking a QoS 0 delivery is a no-op");
    sub.close().await.expect("closing the subscription");
    world.bus.close().await.expect("closing the bus");
    world.forget_groups(&["billing"]).await;
}
