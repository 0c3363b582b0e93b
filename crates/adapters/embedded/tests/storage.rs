//! The embedded broker's file: compaction, retention, sharing between processes, connecting.

mod common;

use std::collections::HashSet;
use std::sync::Arc;

use common::{PATIENCE, broker, config, next, options, text, topic};
use polybus_core::{BrokerKind, ConnectTarget, Connector, Error, Message, ReplayFrom, Transport};
use polybus_embedded::RetentionConfig;
use polybus_embedded::{EmbeddedConnector, EmbeddedTransport};
use serde_json::json;

#[tokio::test]
async fn compaction_removes_only_what_every_group_has_acked() {
    let (_dir, broker) = broker().await;
    let orders = topic("compact");
    let mut billing = broker.subscribe(&orders, &options("billing", 16, 5_000)).await.expect("subscribe");
    let mut shipping = broker.subscribe(&orders, &options("shipping", 16, 5_000)).await.expect("subscribe");
    broker
        .publish_batch(&orders, (0..10).map(|i| Message::text(format!("m{i}"))).collect())
        .await
        .expect("publish");

    for _ in 0..10 {
        next(&mut billing).await.ack().await.expect("ack");
    }
    assert_eq!(broker.compact().await.expect("compact"), 0, "shipping has not acked yet");
    for _ in 0..6 {
        next(&mut shipping).await.ack().await.expect("ack");
    }
    assert_eq!(broker.compact().await.expect("compact"), 6);
    for _ in 0..4 {
        next(&mut shipping).await.ack().await.expect("ack");
    }
    assert_eq!(broker.compact().await.expect("compact"), 4);

    // A topic nobody subscribed to keeps its messages for its first group.
    let unread = topic("unread");
    broker.publish(&unread, Message::text("kept")).await.expect("publish");
    assert_eq!(broker.compact().await.expect("compact"), 0);
    let mut late = broker.subscribe(&unread, &options("late", 8, 5_000)).await.expect("subscribe");
    assert_eq!(text(&next(&mut late).await), "kept");
}

#[tokio::test]
async fn retention_keeps_the_newest_messages() {
    let dir = tempfile::tempdir().expect("temp dir");
    let retention = RetentionConfig { max_messages: Some(3), ..RetentionConfig::default() };
    let broker = EmbeddedTransport::open(&config(&dir, Some(retention))).await.expect("open");
    let orders = topic("retention");
    let mut sub = broker.subscribe(&orders, &options("g", 16, 5_000)).await.expect("subscribe");
    let keyed = (0..10).map(|i| Message::text(format!("m{i}")).key("k")).collect();
    broker.publish_batch(&orders, keyed).await.expect("publish");
    // Leased but not acked: retention removes it anyway, and the key moves on.
    let leased = next(&mut sub).await;
    assert_eq!(text(&leased), "m0");

    assert_eq!(broker.compact().await.expect("compact"), 7);
    assert!(matches!(leased.ack().await, Err(Error::LeaseLost(_))));
    for expected in ["m7", "m8", "m9"] {
        let delivery = next(&mut sub).await;
        assert_eq!(text(&delivery), expected);
        delivery.ack().await.expect("ack");
    }
}

#[tokio::test]
async fn keep_acked_keeps_acked_messages_for_a_replay_until_the_retention_removes_them() {
    let dir = tempfile::tempdir().expect("temp dir");
    let retention =
        RetentionConfig { keep_acked: Some(true), max_messages: Some(4), ..RetentionConfig::default() };
    let broker = EmbeddedTransport::open(&config(&dir, Some(retention))).await.expect("open");
    let orders = topic("kept");
    let mut sub = broker.subscribe(&orders, &options("g", 16, 5_000)).await.expect("subscribe");
    broker
        .publish_batch(&orders, (0..6).map(|i| Message::text(format!("m{i}"))).collect())
        .await
        .expect("publish");
    for _ in 0..6 {
        next(&mut sub).await.ack().await.expect("ack");
    }
    assert_eq!(broker.compact().await.expect("compact"), 2, "only what the retention removes");
    sub.close().await.expect("close");
    broker.replay(&orders, "g", ReplayFrom::Beginning).await.expect("replay");
    let mut sub = broker.subscribe(&orders, &options("g", 16, 5_000)).await.expect("subscribe");
    for expected in ["m2", "m3", "m4", "m5"] {
        let delivery = next(&mut sub).await;
        assert_eq!(text(&delivery), expected);
        delivery.ack().await.expect("ack");
    }
}

#[tokio::test]
async fn two_processes_share_one_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let publisher = EmbeddedTransport::open_separate(&config(&dir, None)).await.expect("open");
    let consumer = EmbeddedTransport::open_separate(&config(&dir, None)).await.expect("open");
    let orders = topic("shared");
    let mut sub = consumer.subscribe(&orders, &options("g", 64, 10_000)).await.expect("subscribe");

    const TOTAL: usize = 10_000;
    let publishing = tokio::spawn({
        let orders = orders.clone();
        async move {
            for batch in 0..(TOTAL / 500) {
                let messages = (0..500).map(|i| Message::text(format!("m{}", batch * 500 + i))).collect();
                publisher.publish_batch(&orders, messages).await.expect("publish");
            }
        }
    });
    let mut seen = HashSet::new();
    while seen.len() < TOTAL {
        let delivery = next(&mut sub).await;
        assert_eq!(delivery.message.attempt, 1);
        seen.insert(text(&delivery));
        delivery.ack().await.expect("ack");
    }
    publishing.await.expect("publisher");
    assert_eq!(seen.len(), TOTAL);
    assert!(tokio::time::timeout(std::time::Duration::from_millis(200), sub.next()).await.is_err());
    // The publisher's own compaction may have run already; either way nothing acked is left.
    consumer.compact().await.expect("compact");
    let mut late = consumer.subscribe(&orders, &options("late", 8, 5_000)).await.expect("subscribe");
    assert!(tokio::time::timeout(std::time::Duration::from_millis(200), late.next()).await.is_err());
}

fn target(config: serde_json::Value) -> ConnectTarget {
    ConnectTarget {
        broker: "bus".into(),
        env: "dev".into(),
        broker_type: polybus_embedded::BROKER_TYPE,
        config,
    }
}

#[tokio::test]
async fn connector_shares_one_store_per_file_and_names_bad_fields() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("nested").join("broker.db");
    let connector = EmbeddedConnector;
    assert_eq!(connector.broker_type(), polybus_embedded::BROKER_TYPE);

    let first: Arc<dyn Transport> = connector.connect(&target(json!({"path": path}))).await.expect("connect");
    let spelled_differently = dir.path().join("nested").join(".").join("broker.db");
    let second = connector.connect(&target(json!({"path": spelled_differently}))).await.expect("connect");
    first.ping().await.expect("ping");
    let orders = topic("connector");
    let mut sub = second.subscribe(&orders, &options("g", 8, 5_000)).await.expect("subscribe");
    let started = std::time::Instant::now();
    first.publish(&orders, Message::text("hello")).await.expect("publish");
    assert_eq!(text(&next(&mut sub).await), "hello");
    assert!(started.elapsed() < PATIENCE);

    // Closing one connection leaves the other working.
    first.close().await.expect("close");
    second.publish(&orders, Message::text("still")).await.expect("publish");
    assert_eq!(text(&next(&mut sub).await), "still");

    match connector.connect(&target(json!({"path": 12}))).await {
        Err(Error::Validation(err)) => {
            assert_eq!((err.env.as_deref(), err.field.as_str()), (Some("dev"), "config.path"));
        }
        Err(other) => panic!("expected a validation error, got {other}"),
        Ok(_) => panic!("a numeric path was accepted"),
    }
}

#[tokio::test]
async fn a_file_that_is_not_a_broker_is_refused_with_a_hint() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("broker.db");
    std::fs::write(&path, vec![b'x'; 4096]).expect("write");
    let config =
        polybus_embedded::EmbeddedConfig { path: Some(path.to_string_lossy().into_owned()), retention: None };
    let err = EmbeddedTransport::open(&config).await.expect_err("not a database");
    assert_eq!(err.code(), "VALIDATION_FAILED", "the config's fault: {err}");
    assert!(!err.is_retryable(), "{err}");
    let shown = err.to_string();
    assert!(shown.contains("not a SQLite database"), "says what to do: {err}");
}
