//! Faults against the local RabbitMQ: connections closed by the broker mid-stream, a member
//! that stops working with its connection open, an unreachable broker.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use polybus::{
    Broker, Bus, Error, FailureKind, Message, Registry, SqliteStore, SubscribeOptions, Subscriber, Topic,
};
use polybus_rabbitmq::{RabbitmqConnector, queue_name};
use serde_json::json;
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(10);

/// The test that closes every connection on the broker holds this exclusively; tests whose
/// connections must stay up share it.
static BROKER: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Receives until `sub` closes, acking everything and reporting each delivery's id.
fn member(mut sub: Subscriber, tx: mpsc::UnboundedSender<String>) -> tokio::task::JoinHandle<Subscriber> {
    tokio::spawn(async move {
        while let Some(next) = sub.next().await {
            match next {
                Ok(delivery) => {
                    let id = delivery.id.clone();
                    // After a reconnect an ack may fail; the message then comes back.
                    let _ = delivery.ack().await;
                    if tx.send(id).is_err() {
                        break;
                    }
                }
                Err(e) => eprintln!("receiving failed: {e}"),
            }
        }
        sub
    })
}

/// Publishes `m-<i>` for every `i` in `range`, eight at a time, one every `pace` when given.
async fn publish(
    bus: &Bus,
    event: &str,
    range: std::ops::Range<usize>,
    pace: Option<Duration>,
) -> Vec<(usize, Result<String, Error>)> {
    let slots = Arc::new(tokio::sync::Semaphore::new(8));
    let mut ticks = pace.map(tokio::time::interval);
    let mut tasks = Vec::with_capacity(range.len());
    for i in range {
        if let Some(ticks) = ticks.as_mut() {
            ticks.tick().await;
        }
        let slot = slots.clone().acquire_owned().await.expect("publish slots");
        let (bus, event) = (bus.clone(), event.to_owned());
        tasks.push(tokio::spawn(async move {
            let result = bus.publish(common::ENV, &event, Message::text(format!("m-{i}"))).await;
            drop(slot);
            (i, result)
        }));
    }
    futures::future::join_all(tasks).await.into_iter().map(|t| t.expect("publish task")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_confirmed_publish_arrives_although_the_broker_closes_all_connections_mid_stream() {
    const TOTAL: usize = 2000;
    let _alone = BROKER.write().await;
    let dir = tempfile::tempdir().expect("temporary directory");
    let (exchange, topic) = (common::unique("polybus.faults"), common::unique("orders"));
    let _cleanup = common::Cleanup {
        queues: vec![queue_name(&polybus::TopicSpec::named(topic.clone()), "workers")],
        exchanges: vec![exchange.clone()],
    };
    let bus = common::bus(dir.path(), "faults", &exchange, &topic).await;
    let event = format!("faults:{topic}");
    let options =
        SubscribeOptions { ack_deadline: Duration::from_secs(1), ..SubscribeOptions::new("workers") };

    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut members = Vec::new();
    for _ in 0..2 {
        let sub = common::within(WAIT, "subscribing", bus.subscribe(common::ENV, &event, options.clone()))
            .await
            .expect("subscribing");
        members.push(member(sub, tx.clone()));
    }

    // A quarter of the messages go out before the broker closes every connection, half are
    // paced so that they go out while it does, and the rest after it is done.
    let mut results = publish(&bus, &event, 0..TOTAL / 4, None).await;
    let killer = tokio::spawn(common::close_all_connections());
    results.extend(publish(&bus, &event, TOTAL / 4..TOTAL * 3 / 4, Some(Duration::from_millis(3))).await);
    killer.await.expect("closing every connection");
    results.extend(publish(&bus, &event, TOTAL * 3 / 4..TOTAL, None).await);

    let mut confirmed = HashSet::new();
    let mut failed = Vec::new();
    for (i, result) in results {
        match result {
            Ok(id) => {
                confirmed.insert(id);
            }
            Err(e) => failed.push((i, e.to_string())),
        }
    }
    eprintln!("{} of {TOTAL} publishes confirmed; failed: {failed:?}", confirmed.len());
    assert!(confirmed.len() >= TOTAL * 9 / 10, "too few publishes succeeded: {}", confirmed.len());

    let mut received: HashMap<String, usize> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !confirmed.iter().all(|id| received.contains_key(id)) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(id)) => *received.entry(id).or_default() += 1,
            Ok(None) => panic!("every member stopped"),
            Err(_) => {
                let missing = confirmed.iter().filter(|id| !received.contains_key(*id)).count();
                panic!("after 60 s, {missing} of {} confirmed messages never arrived", confirmed.len());
            }
        }
    }
    let duplicates: usize = received.values().map(|n| n - 1).sum();
    eprintln!("all {} confirmed messages received; {duplicates} duplicate deliveries", confirmed.len());

    drop(rx);
    bus.close().await.expect("closing the bus");
    for m in members {
        m.abort();
    }
}

#[tokio::test]
async fn a_stuck_member_with_its_connection_open_loses_its_messages_to_another_after_the_deadline() {
    let _shared = BROKER.read().await;
    let dir = tempfile::tempdir().expect("temporary directory");
    let (exchange, topic) = (common::unique("polybus.faults"), common::unique("orders"));
    let _cleanup = common::Cleanup {
        queues: vec![queue_name(&polybus::TopicSpec::named(topic.clone()), "workers")],
        exchanges: vec![exchange.clone()],
    };
    let bus = common::bus(dir.path(), "faults", &exchange, &topic).await;
    let event = format!("faults:{topic}");
    let options =
        SubscribeOptions { ack_deadline: Duration::from_secs(1), ..SubscribeOptions::new("workers") };

    let mut stuck = bus.subscribe(common::ENV, &event, options.clone()).await.expect("subscribing");
    let id = bus.publish(common::ENV, &event, Message::text("finish me")).await.expect("publishing");
    let held = match common::within(WAIT, "the first delivery", stuck.next()).await {
        Some(Ok(d)) => d,
        other => panic!("expected a delivery, got {other:?}"),
    };
    assert_eq!((held.id.as_str(), held.attempt), (id.as_str(), 1));

    // The stuck member keeps its subscription (and connection) open, and neither acks nor asks
    // for more; the other member must get the message after the ack deadline.
    let mut survivor = bus.subscribe(common::ENV, &event, options).await.expect("subscribing");
    let again = match common::within(WAIT, "the redelivery", survivor.next()).await {
        Some(Ok(d)) => d,
        other => panic!("expected a redelivery, got {other:?}"),
    };
    assert_eq!(again.id, id);
    assert!(again.attempt >= 2, "attempt of the redelivery: {}", again.attempt);

    // The stuck member's late ack is refused rather than silently lost.
    match held.ack().await {
        Err(Error::LeaseLost(lost)) => assert_eq!(lost, id),
        other => panic!("a late ack should fail with LeaseLost, got {other:?}"),
    }
    again.ack().await.expect("acking the redelivery");

    stuck.close().await.expect("closing");
    survivor.close().await.expect("closing");
    bus.close().await.expect("closing the bus");
}

#[tokio::test]
async fn a_delay_queue_deleted_meanwhile_is_declared_again_rather_than_dropping_messages() {
    let _shared = BROKER.read().await;
    let dir = tempfile::tempdir().expect("temporary directory");
    let (exchange, topic) = (common::unique("polybus.faults"), common::unique("orders"));
    let delay = Duration::from_millis(200);
    let delay_queue = polybus_rabbitmq::delay_queue(200, &exchange);
    let _cleanup = common::Cleanup {
        queues: vec![queue_name(&polybus::TopicSpec::named(topic.clone()), "workers"), delay_queue.clone()],
        // Safe even while others use it: a delayed publish that finds no binding is declared again.
        exchanges: vec![exchange.clone(), polybus_rabbitmq::DELAY_EXCHANGE.to_owned()],
    };
    let bus = common::bus(dir.path(), "faults", &exchange, &topic).await;
    let event = format!("faults:{topic}");
    let mut sub =
        bus.subscribe(common::ENV, &event, SubscribeOptions::new("workers")).await.expect("subscribing");

    for round in ["before", "after"] {
        let id = bus
            .publish(common::ENV, &event, Message::text(round).delay(delay))
            .await
            .unwrap_or_else(|e| panic!("publishing {round} the delay queue was deleted: {e}"));
        let delivery = match common::within(WAIT, "the delayed message", sub.next()).await {
            Some(Ok(d)) => d,
            other => panic!("expected the message published {round}, got {other:?}"),
        };
        assert_eq!(delivery.id, id, "the message published {round} the delay queue was deleted");
        delivery.ack().await.expect("acking");
        // The adapter still believes the queue exists: the next delayed publish is returned
        // as unroutable, and must lead to a new declaration, not a lost message.
        common::delete(std::slice::from_ref(&delay_queue), &[]).await;
    }
    sub.close().await.expect("closing");
    bus.close().await.expect("closing the bus");
}

#[tokio::test]
async fn an_exchange_of_another_type_is_a_clear_error_at_once() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let (exchange, topic) = (common::unique("polybus.faults"), common::unique("orders"));
    let _cleanup = common::Cleanup { queues: vec![], exchanges: vec![exchange.clone()] };
    let (conn, channel) = common::lapin_channel().await;
    channel
        .exchange_declare(
            exchange.as_str().into(),
            lapin::ExchangeKind::Direct,
            lapin::options::ExchangeDeclareOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("declaring a direct exchange");
    let _ = conn.close(200, "OK".into()).await;

    let bus = common::bus(dir.path(), "faults", &exchange, &topic).await;
    let started = std::time::Instant::now();
    let event = format!("faults:{topic}");
    let publish = bus.publish(common::ENV, &event, Message::text("x"));
    let err =
        common::within(WAIT, "publishing", publish).await.expect_err("the exchange is not a topic exchange");
    assert_eq!(err.failure_kind(), Some(FailureKind::Invalid), "{err}");
    assert!(!err.is_retryable(), "{err}");
    let refused = err.cause().and_then(|c| c.downcast_ref::<lapin::Error>()).map(|e| e.kind());
    assert!(
        matches!(refused, Some(lapin::ErrorKind::ProtocolError(e))
            if matches!(e.kind(), AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED))),
        "{refused:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?} to refuse: {err}", started.elapsed());
}

/// A bus whose only broker, `nowhere`, has `url`, with topic `nowhere:orders`.
async fn bus_at(dir: &std::path::Path, url: &str) -> Bus {
    let store = SqliteStore::open(dir.join("registry.db")).await.expect("opening the registry");
    let registry = Registry::new(Arc::new(store));
    let broker = Broker::from_value(json!({
        "name": "Nowhere",
        "tag": "nowhere",
        "envs": [{"slug": common::ENV, "type": "rabbitmq", "config": {"url": url}}],
    }))
    .expect("a valid broker");
    registry.create_broker(broker).await.expect("creating the broker");
    let topic = Topic::from_value(json!({"tag": "nowhere:orders"})).expect("a valid topic");
    registry.create_topic(topic).await.expect("creating the topic");
    Bus::builder(registry).connector(Arc::new(RabbitmqConnector)).build()
}

#[tokio::test]
async fn an_unreachable_broker_is_an_error_that_does_not_show_the_password() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let bus = bus_at(dir.path(), "amqp://guest:s3cret-pw@127.0.0.1:1/%2f").await;
    let publish = bus.publish(common::ENV, "nowhere:orders", Message::text("x"));
    let err = common::within(WAIT, "publishing", publish).await.expect_err("nothing listens on port 1");
    let shown = format!("{err} {err:?}");
    assert_eq!(err.code(), "CONNECT_FAILED", "{shown}");
    assert!(err.is_retryable(), "{shown}");
    assert_eq!(err.failure_kind(), Some(FailureKind::Unavailable), "{shown}");
    assert!(!shown.contains("s3cret-pw"), "the error shows the password: {shown}");
}

#[tokio::test]
async fn wrong_credentials_are_refused_at_once_without_showing_the_password() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let url = common::url().replacen("guest:guest@", "guest:n0t-the-pw@", 1);
    let bus = bus_at(dir.path(), &url).await;
    let started = std::time::Instant::now();
    let publish = bus.publish(common::ENV, "nowhere:orders", Message::text("x"));
    let err = common::within(WAIT, "publishing", publish).await.expect_err("the password is wrong");
    let shown = format!("{err} {err:?}");
    assert_eq!(err.code(), "CONNECT_FAILED", "{shown}");
    assert!(!shown.contains("n0t-the-pw"), "the error shows the password: {shown}");
    assert_eq!(err.failure_kind(), Some(FailureKind::Auth), "{shown}");
    assert!(!err.is_retryable(), "{shown}");
    // Refused credentials are not retried like an unreachable broker.
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}: {shown}", started.elapsed());
    eprintln!("{shown}");
}

/// A publish the broker never confirms fails with an error that says so within the adapter's
/// publish deadline (30 s), instead of retrying for minutes (it took 7 × 30 s). The broker: a
/// node of this test's own whose memory alarm is always on, so it blocks every publisher.
#[tokio::test]
async fn a_publish_the_broker_never_confirms_fails_within_its_deadline() {
    let node = common::private_node("vm_memory_high_watermark.absolute = 1MB\n");
    let (node, config) = tokio::task::spawn_blocking(move || {
        let config = node.config().unwrap_or_else(|e| panic!("starting a private RabbitMQ node: {e}"));
        (node, config)
    })
    .await
    .expect("starting a private RabbitMQ node");
    let url = config["url"].as_str().expect("the private node's URL").to_owned();
    let dir = tempfile::tempdir().expect("temporary directory");
    let bus = bus_at(dir.path(), &url).await;
    let started = std::time::Instant::now();
    let publish = bus.publish(common::ENV, "nowhere:orders", Message::text("x"));
    let err = common::within(Duration::from_secs(40), "the publish to fail", publish)
        .await
        .expect_err("a blocked publisher gets no confirm");
    let shown = format!("{err}");
    assert_eq!(err.code(), "PUBLISH_FAILED", "{shown}");
    assert!(shown.contains("confirm"), "the error does not say what is missing: {shown}");
    eprintln!("failed after {:?}: {shown}", started.elapsed());
    let _ = tokio::time::timeout(Duration::from_secs(5), bus.close()).await;
    drop(node);
}
