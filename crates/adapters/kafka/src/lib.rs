//! polybus adapter for Kafka, on `rdkafka` (librdkafka).
//!
//! A topic is a Kafka topic (its native name; created on demand with the topic's or the env's
//! partitions), a group is a consumer group (`group.id` is the group name), a key is the
//! record key (so per-key order is Kafka's per-partition order), headers are record headers.
//! Acks commit offsets in order: a partition's offset moves past a message only once it and
//! every earlier message of that partition are settled.
//!
//! Kafka has no per-message nack, delayed delivery or ack deadline; they are emulated with a
//! retry topic per group, `<native>--<group>.retry` ([`retry_topic`]): a nack, or a delivery
//! whose ack deadline passed, publishes a copy there with the next attempt number (and a
//! [`NOT_BEFORE`] time for delays), then settles the original. See the crate's README.

mod codec;
mod config;
mod offsets;
mod subscription;
mod transport;

use std::sync::Arc;

use async_trait::async_trait;
use polybus_core::config::KafkaConfig;
use polybus_core::kind::{BrokerKind, FieldError};
use polybus_core::{BrokerType, ConnectTarget, Connector, Result, Transport, ValidationError};

pub use codec::NOT_BEFORE;
pub use config::{DEFAULT_PARTITIONS, DEFAULT_REPLICATION_FACTOR};
pub use transport::KafkaTransport;

/// Connects broker envs of type `kafka`.
#[derive(Debug, Clone, Copy, Default)]
pub struct KafkaConnector;

/// The topic option naming how many partitions a topic is created with.
const PARTITIONS: &str = "partitions";

/// Partitions `topic` asks for in its options, if any.
pub(crate) fn partitions_of(topic: &polybus_core::TopicSpec) -> Option<i32> {
    topic.options.get(PARTITIONS).and_then(serde_json::Value::as_i64).and_then(|p| i32::try_from(p).ok())
}

/// The broker type this crate serves, as definitions write it.
pub const BROKER_TYPE: BrokerType = BrokerType::from_static("kafka");

impl BrokerKind for KafkaConnector {
    fn broker_type(&self) -> BrokerType {
        BROKER_TYPE
    }

    fn validate_config(&self, config: &serde_json::Value) -> std::result::Result<(), FieldError> {
        polybus_core::config::validate(&BROKER_TYPE, config)
    }

    fn check_native(&self, name: &str) -> std::result::Result<(), String> {
        polybus_core::names::check_native(&BROKER_TYPE, name)
    }

    fn check_group(&self, native: &str, group: &str) -> std::result::Result<(), String> {
        polybus_core::names::check_group(&BROKER_TYPE, native, group)
    }

    fn validate_options(
        &self,
        options: &serde_json::Map<String, serde_json::Value>,
    ) -> std::result::Result<(), FieldError> {
        for (key, value) in options {
            match key.as_str() {
                PARTITIONS => {
                    let valid = value.as_i64().is_some_and(|p| p >= 1 && i32::try_from(p).is_ok());
                    if !valid {
                        return Err((
                            format!("options.{key}"),
                            format!("expected a whole number from 1 to {}", i32::MAX),
                        ));
                    }
                }
                _ => {
                    return Err((
                        format!("options.{key}"),
                        format!("unknown option `{key}`; Kafka takes `{PARTITIONS}`"),
                    ));
                }
            }
        }
        Ok(())
    }

    fn dead_letter_options(
        &self,
        options: &serde_json::Map<String, serde_json::Value>,
    ) -> serde_json::Map<String, serde_json::Value> {
        options
            .iter()
            .filter(|(key, _)| key.as_str() == PARTITIONS)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

#[async_trait]
impl Connector for KafkaConnector {
    async fn connect(&self, target: &ConnectTarget) -> Result<Arc<dyn Transport>> {
        let parsed: KafkaConfig = polybus_core::config::parse(&target.config)
            .map_err(|(field, message)| ValidationError::in_env(&target.env, field, message))?;
        let settings = config::Settings::from_config(&parsed, &target.env)?;
        Ok(Arc::new(KafkaTransport::connect(settings).await?))
    }
}

/// Native name of the topic where `group`'s retries of topic `native` wait.
pub fn retry_topic(native: &str, group: &str) -> String {
    format!("{native}--{group}.retry")
}
