//! polybus adapter for MQTT 5: QoS 1 publishes that wait for their PUBACK, and one
//! connection per group member on a shared subscription (`$share/<group>/<topic>`) with a
//! session that never expires, manual acks and receive-maximum = prefetch; a gone member's
//! session is adopted by another member of its group.
//!
//! The native name of a topic is its MQTT topic, unprefixed, so any MQTT 5 client reaches
//! the same messages; headers travel as user properties. What MQTT cannot do, and how this
//! adapter makes up for it, is in the crate's README.

mod codec;
mod config;
mod kind;
mod orphan;
mod publisher;
mod subscription;
mod transport;

use std::sync::Arc;

use async_trait::async_trait;
use polybus_core::{BrokerType, ConnectTarget, Connector, Result, Transport};

pub use kind::MqttConfig;

/// Connects polybus to MQTT brokers (broker type `mqtt`).
#[derive(Debug, Clone, Copy, Default)]
pub struct MqttConnector;

/// The broker type this crate serves, as definitions write it.
pub const BROKER_TYPE: BrokerType = BrokerType::from_static("mqtt");

#[async_trait]
impl Connector for MqttConnector {
    async fn connect(&self, target: &ConnectTarget) -> Result<Arc<dyn Transport>> {
        let settings = config::Settings::from_target(target)?;
        Ok(Arc::new(transport::MqttTransport::connect(settings).await?))
    }
}

/// The MQTT topic a group's redeliveries of `topic` travel on: `polybus-retry/<group>/<topic>`.
pub fn retry_topic(group: &str, topic: &str) -> String {
    subscription::retry_topic(group, topic)
}

/// The topic level under which the records of a group's gone members of `topic` are
/// retained, one topic per gone session: `polybus-orphans/<group>/<topic>/<incarnation>`.
pub fn orphan_topic(group: &str, topic: &str) -> String {
    orphan::orphan_level(group, topic)
}
