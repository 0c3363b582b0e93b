//! polybus: one interface for every message broker a product uses, with the broker chosen
//! per environment in a registry.
//!
//! ```no_run
//! # async fn demo() -> polybus::Result<()> {
//! use polybus::{Bus, Group, Message, Registry};
//! let bus = Bus::open(Registry::open("polybus.db").await?).await?;
//! bus.publish("dev", "message-bus:orders", Message::text("hello").key("customer-42")).await?;
//! let mut sub = bus.subscribe("dev", "message-bus:orders", Group("billing")).await?;
//! while let Some(delivery) = sub.next().await {
//!     let delivery = delivery?;
//!     println!("{:?}", delivery.payload_str());
//!     delivery.ack().await?;
//! }
//! # Ok(()) }
//! ```

mod batch;
mod bus;
mod consume;
mod delivery;
mod dlq;
pub mod files;
mod idempotency;
pub mod jobs;
pub mod metrics;
mod ops;
mod secrets;
pub mod telemetry;

pub use batch::Batch;
pub use bus::{Bus, BusBuilder, Group};
pub use consume::{BatchError, ConsumeOptions, ConsumeStats, Consumer, HandlerError};
pub use delivery::{Delivery, SettlePolicy, Settled, Subscriber};
pub use dlq::{DeadLetter, DeadLetterFilter, DeadLetterOutcome, SCAN_MAX as DEAD_LETTER_SCAN_MAX};
pub use files::FilePolicy;
pub use idempotency::{
    CLAIM_LEASE as IDEMPOTENCY_CLAIM_LEASE, PENDING_WAIT as IDEMPOTENCY_PENDING_WAIT, Published,
};
pub use secrets::{DEFAULT_ENV_PREFIX, SecretPolicy, scrub_log};

/// The OpenTelemetry crates polybus's spans are bridged to, at the versions it was built with.
pub use {opentelemetry, opentelemetry_sdk, tracing_opentelemetry};

pub use polybus_core::{
    self as core, Broker, BrokerEnv, BrokerKind, BrokerPatch, BrokerType, Capabilities, Cause, Connector,
    Error, EventRef, FailureKind, GroupInfo, Kinds, Message, MessageQuery, ReplayFrom, Result, StoredMessage,
    SubscribeOptions, Support, Topic, TopicPatch, TopicSpec, Transport, wire,
};
pub use polybus_registry::{
    IdempotencyRecord, IdempotencyState, Registry, SecretInfo, Secrets, SecretsKey, SqliteStore, Store,
    find_key as find_secrets_key,
};

/// The group that always exists on a dead-letter destination: read dead letters with
/// `bus.dead_letters(env, event, Group(DEAD_LETTER_GROUP))`.
pub const DEAD_LETTER_GROUP: &str = "dead-letters";

/// The connectors compiled into this build, one per enabled adapter feature.
#[allow(clippy::vec_init_then_push)]
pub fn default_connectors() -> Vec<std::sync::Arc<dyn Connector>> {
    #[allow(unused_mut)]
    let mut connectors: Vec<std::sync::Arc<dyn Connector>> = Vec::new();
    #[cfg(feature = "embedded")]
    connectors.push(std::sync::Arc::new(polybus_embedded::EmbeddedConnector));
    #[cfg(feature = "nats")]
    connectors.push(std::sync::Arc::new(polybus_nats::NatsConnector));
    #[cfg(feature = "mqtt")]
    connectors.push(std::sync::Arc::new(polybus_mqtt::MqttConnector));
    #[cfg(feature = "redis")]
    connectors.push(std::sync::Arc::new(polybus_redis::RedisConnector));
    #[cfg(feature = "rabbitmq")]
    connectors.push(std::sync::Arc::new(polybus_rabbitmq::RabbitmqConnector));
    #[cfg(feature = "kafka")]
    connectors.push(std::sync::Arc::new(polybus_kafka::KafkaConnector));
    #[cfg(feature = "pubsub")]
    connectors.push(std::sync::Arc::new(polybus_pubsub::PubsubConnector));
    #[cfg(feature = "sqs")]
    connectors.push(std::sync::Arc::new(polybus_sqs::SqsConnector));
    connectors
}

/// The broker types of [`default_connectors`], to validate definitions with
/// ([`Registry::with_kinds`]).
pub fn default_kinds() -> Kinds {
    bus::kinds_of(&default_connectors())
}

/// The JSON Schema of broker definitions whose envs are of the types of
/// [`default_connectors`].
pub fn broker_schema() -> serde_json::Value {
    polybus_core::schema::broker(&default_kinds())
}

/// The JSON Schema of topic definitions.
pub fn topic_schema() -> serde_json::Value {
    polybus_core::schema::topic()
}
