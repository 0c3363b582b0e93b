//! The metrics a plain `Bus` emits through the `metrics` facade, read from a Prometheus
//! recorder the test installs for itself (no server involved).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusBuilder;
use polybus::{Broker, Bus, ConsumeOptions, HandlerError, Message, Registry, SqliteStore, Topic};
use serde_json::json;

const EVENT: &str = "measured:orders";

/// The value of the series `name{labels}` in `text`, where `labels` is the exact label set.
fn value(text: &str, name: &str, labels: &str) -> Option<f64> {
    let prefix = format!("{name}{{{labels}}} ");
    text.lines().find_map(|line| line.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok())
}

#[tokio::test]
async fn a_bus_counts_publishes_deliveries_retries_and_acks() {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    // This thread's recorder: the test's runtime runs every task on it.
    let _recorder = metrics::set_default_local_recorder(&recorder);
    polybus::metrics::describe();

    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(dir.path().join("registry.db")).await.expect("registry");
    let registry = Registry::new(Arc::new(store));
    let broker = json!({"name": "Measured", "tag": "measured", "envs": [
        {"slug": "dev", "type": "embedded", "config": {"path": dir.path().join("broker.db")}}]});
    registry.create_broker(Broker::from_value(broker).expect("broker")).await.expect("create broker");
    registry.create_topic(Topic::from_value(json!({"tag": EVENT})).expect("topic")).await.expect("topic");
    let bus = Bus::open(registry).await.expect("bus");

    for n in 0..3 {
        bus.publish("dev", EVENT, Message::text(format!("order {n}"))).await.expect("publish");
    }
    let calls = Arc::new(AtomicU32::new(0));
    let counted = calls.clone();
    let handler = move |_message: Message| {
        let call = counted.fetch_add(1, Ordering::SeqCst) + 1;
        async move { if call == 1 { Err::<(), HandlerError>("once".into()) } else { Ok(()) } }
    };
    let options = ConsumeOptions::new("billing").retry(Duration::from_millis(10), Duration::from_millis(10));
    let consumer = bus.consume("dev", EVENT, options, handler).await.expect("consume");
    let stats = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let stats = consumer.stats();
            if stats.acked == 3 {
                return stats;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("three acks within 10 s");
    assert_eq!(stats.retried, 1);
    consumer.shutdown().await.expect("shutdown");

    let text = handle.render();
    let topic = format!("system=\"embedded\",env=\"dev\",event=\"{EVENT}\"");
    let group = format!("{topic},group=\"billing\"");
    assert_eq!(value(&text, "polybus_published_total", &topic), Some(3.0), "{text}");
    assert_eq!(value(&text, "polybus_publish_failed_total", &topic), Some(0.0), "{text}");
    assert_eq!(value(&text, "polybus_publish_seconds_count", &topic), Some(3.0), "{text}");
    assert_eq!(value(&text, "polybus_delivered_total", &group), Some(4.0), "{text}");
    assert_eq!(value(&text, "polybus_retried_total", &group), Some(1.0), "{text}");
    assert_eq!(value(&text, "polybus_acked_total", &group), Some(3.0), "{text}");
    assert_eq!(value(&text, "polybus_handler_seconds_count", &group), Some(4.0), "{text}");
    assert_eq!(value(&text, "polybus_handlers_in_flight", &group), Some(0.0), "{text}");
    assert!(text.contains("# HELP polybus_published_total Messages published."), "{text}");
}
