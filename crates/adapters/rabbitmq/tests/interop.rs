//! A message published through polybus is an ordinary RabbitMQ message, and the reverse:
//! checked with `lapin` as a plain AMQP client, against the local RabbitMQ.

mod common;

use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, ExchangeKind};
use polybus::{Message, SubscribeOptions, wire};
use polybus_rabbitmq::queue_name;

const WAIT: Duration = Duration::from_secs(10);
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn header<'a>(props: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    props.headers().as_ref()?.inner().get(name)
}

fn long_string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

#[tokio::test]
async fn message_published_through_polybus_is_read_by_a_plain_amqp_consumer() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let (exchange, topic) = (common::unique("polybus.interop"), common::unique("orders"));
    let queue = common::unique("plain-reader");
    let _cleanup = common::Cleanup { queues: vec![queue.clone()], exchanges: vec![exchange.clone()] };
    let bus = common::bus(dir.path(), "interop", &exchange, &topic).await;
    let event = format!("interop:{topic}");

    // A plain client binds its own queue to the exchange with the topic's native name.
    let (conn, channel) = common::lapin_channel().await;
    let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
    channel
        .exchange_declare(exchange.as_str().into(), ExchangeKind::Topic, durable, FieldTable::default())
        .await
        .expect("declaring the exchange");
    channel
        .queue_declare(queue.as_str().into(), QueueDeclareOptions::default(), FieldTable::default())
        .await
        .expect("declaring the plain queue");
    channel
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            topic.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("binding the plain queue");
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "plain".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consuming");

    let payload: Vec<u8> = (0..=255u8).chain(*b"\r\n\0end").collect();
    let sent = Message::new(payload.clone())
        .key("customer-42")
        .content_type("application/octet-stream")
        .header("traceparent", TRACEPARENT)
        .header("x-tenant", "äöü ✓");
    let id = common::within(WAIT, "publishing", bus.publish(common::ENV, &event, sent.clone()))
        .await
        .expect("publishing through polybus");

    let delivery = common::within(WAIT, "the plain consumer's delivery", consumer.next())
        .await
        .expect("a delivery")
        .expect("a delivery without error");
    assert_eq!(delivery.data, payload, "payload bytes");
    assert_eq!(delivery.exchange.as_str(), exchange, "exchange");
    assert_eq!(delivery.routing_key.as_str(), topic, "routing key is the topic's native name");
    let props = &delivery.properties;
    assert_eq!(props.message_id().as_ref().map(|s| s.as_str()), Some(id.as_str()), "message_id");
    assert_eq!(props.content_type().as_ref().map(|s| s.as_str()), Some("application/octet-stream"));
    assert_eq!(props.delivery_mode(), &Some(2), "persistent delivery mode");
    assert!(props.timestamp().is_some(), "timestamp property");
    assert_eq!(header(props, "traceparent"), Some(&long_string(TRACEPARENT)), "traceparent header");
    assert_eq!(header(props, "x-tenant"), Some(&long_string("äöü ✓")), "x-tenant header");
    assert_eq!(header(props, wire::KEY), Some(&long_string("customer-42")), "key header");
    assert!(header(props, wire::PUBLISHED_AT).is_some(), "publish time header");
    delivery.acker.ack(BasicAckOptions::default()).await.expect("acking");

    bus.close().await.expect("closing the bus");
    let _ = conn.close(200, "OK".into()).await;
}

#[tokio::test]
async fn message_published_by_a_plain_amqp_client_is_consumed_through_polybus() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let (exchange, topic) = (common::unique("polybus.interop"), common::unique("orders"));
    let _cleanup = common::Cleanup {
        queues: vec![queue_name(&polybus::TopicSpec::named(topic.clone()), "billing")],
        exchanges: vec![exchange.clone()],
    };
    let bus = common::bus(dir.path(), "interop", &exchange, &topic).await;
    let event = format!("interop:{topic}");

    // The group's queue exists from its first subscribe on.
    let options =
        SubscribeOptions { ack_deadline: Duration::from_secs(1), ..SubscribeOptions::new("billing") };
    let mut sub = common::within(WAIT, "subscribing", bus.subscribe(common::ENV, &event, options))
        .await
        .expect("subscribing through polybus");

    let (conn, channel) = common::lapin_channel().await;
    channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirm mode");
    let mut headers = FieldTable::default();
    headers.insert("traceparent".into(), long_string(TRACEPARENT));
    headers.insert("retries".into(), AMQPValue::LongInt(7));
    headers.insert(wire::KEY.into(), long_string("customer-7"));
    let props = BasicProperties::default()
        .with_message_id("native-1".into())
        .with_content_type("application/json".into())
        .with_timestamp(1_700_000_000)
        .with_headers(headers);
    let payload = br#"{"order": 7}"#;
    let confirm = channel
        .basic_publish(
            exchange.as_str().into(),
            topic.as_str().into(),
            BasicPublishOptions::default(),
            payload,
            props,
        )
        .await
        .expect("publishing natively")
        .await
        .expect("the broker's confirm");
    assert!(confirm.is_ack(), "the broker acked the native publish");

    let delivery = match common::within(WAIT, "the delivery through polybus", sub.next()).await {
        Some(Ok(delivery)) => delivery,
        other => panic!("expected a delivery, got {other:?}"),
    };
    assert_eq!(delivery.payload.as_ref(), payload, "payload bytes");
    assert_eq!(delivery.id, "native-1", "id from message_id");
    assert_eq!(delivery.content_type.as_deref(), Some("application/json"));
    assert_eq!(delivery.key.as_deref(), Some("customer-7"), "key from the polybus-key header");
    assert_eq!(delivery.published_at.timestamp(), 1_700_000_000, "publish time from the timestamp");
    assert_eq!(delivery.attempt, 1, "first delivery");
    let expected = [("retries", "7"), ("traceparent", TRACEPARENT)]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    assert_eq!(delivery.headers, expected, "headers as strings");
    delivery.ack().await.expect("acking");

    sub.close().await.expect("closing the subscription");
    bus.close().await.expect("closing the bus");
    let _ = conn.close(200, "OK".into()).await;
}
