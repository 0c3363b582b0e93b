//! The orders example (`crates/polybus/examples/orders.rs`) runs unchanged on every broker:
//! one broker definition with an env per broker type, and only the env slug differs.

#[path = "../../polybus/examples/orders.rs"]
mod orders;

use std::sync::Arc;

use polybus::{Broker, Bus, Registry, Topic};
use serde_json::json;

async fn bus_with_every_env() -> (Bus, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let registry = Registry::open(dir.path().join("registry.db").to_str().expect("utf-8 path"))
        .await
        .expect("opening the registry");
    let broker_db = dir.path().join("broker.db");
    let broker = Broker::from_value(json!({
        "name": "Orders", "tag": "orders-app",
        "envs": [
            {"slug": "local", "type": "embedded", "config": {"path": broker_db}},
            {"slug": "redis", "type": "redis", "config": {"host": "127.0.0.1", "port": 6379}},
            {"slug": "rabbitmq", "type": "rabbitmq", "config": {"url": "amqp://guest:guest@127.0.0.1:5672/%2f"}},
            {"slug": "nats", "type": "nats", "config": {"servers": ["nats://127.0.0.1:4222"]}},
            {"slug": "mqtt", "type": "mqtt", "config": {"host": "127.0.0.1", "port": 1883}}
        ]
    }))
    .expect("valid broker");
    registry.create_broker(broker).await.expect("creating the broker");
    let topic = format!("orders-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let event = format!("orders-app:{topic}");
    registry
        .create_topic(Topic::from_value(json!({ "tag": event })).expect("valid topic"))
        .await
        .expect("topic");
    let bus = Bus::builder(registry)
        .connector(Arc::new(polybus_redis::RedisConnector))
        .connector(Arc::new(polybus_rabbitmq::RabbitmqConnector))
        .connector(Arc::new(polybus_nats::NatsConnector))
        .connector(Arc::new(polybus_mqtt::MqttConnector))
        .build();
    (bus, event, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orders_example_runs_unchanged_on_every_broker() {
    let (bus, event, _dir) = bus_with_every_env().await;
    for env in ["local", "redis", "rabbitmq", "nats", "mqtt"] {
        let arrived = orders::run(&bus, env, &event, 20).await.unwrap_or_else(|e| panic!("env `{env}`: {e}"));
        assert_eq!(arrived, 20, "env `{env}`: {arrived} of 20 orders arrived");
    }
    bus.close().await.expect("closing the bus");
}
