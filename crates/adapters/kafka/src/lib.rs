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
mod groups;
mod kind;
mod offsets;
mod refusal;
mod replay;
mod subscription;
mod transport;

use std::sync::Arc;

use async_trait::async_trait;
use polybus_core::{BrokerType, ConnectTarget, Connector, Result, Transport, ValidationError};

pub use codec::NOT_BEFORE;
pub use config::{DEFAULT_PARTITIONS, DEFAULT_REPLICATION_FACTOR};
pub use kind::{KafkaConfig, SaslConfig, SaslMechanism};
pub use transport::KafkaTransport;

/// Connects broker envs of type `kafka`.
#[derive(Debug, Clone, Copy, Default)]
pub struct KafkaConnector;

/// The broker type this crate serves, as definitions write it.
pub const BROKER_TYPE: BrokerType = BrokerType::from_static("kafka");

#[async_trait]
impl Connector for KafkaConnector {
    async fn connect(&self, target: &ConnectTarget) -> Result<Arc<dyn Transport>> {
        kind::check_mechanism(&target.config)
            .map_err(|(field, message)| ValidationError::in_env(&target.env, field, message))?;
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
