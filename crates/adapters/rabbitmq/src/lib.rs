//! polybus adapter for RabbitMQ (AMQP 0-9-1, through `lapin`).
//!
//! Mapping: one durable topic exchange per broker env (config `exchange`, default `polybus`);
//! a topic is a routing key on it (the topic's native name); a group is a durable quorum queue
//! `<native>--<group>` bound with that key, so groups fan out and members of a group compete.
//! Publishes are persistent and wait for their publisher confirm. Delays (delayed publish and
//! nack with a delay) go through per-delay TTL queues that dead-letter back, without plugins.
//!
//! RabbitMQ drops a message routed to no queue: a group receives what is published after
//! its first subscribe, not before (`replay: false`).

mod codec;
mod config;
mod groups;
mod kind;
mod link;
mod subscription;
mod transport;

use std::sync::Arc;

use async_trait::async_trait;
use polybus_core::{BrokerType, ConnectTarget, Connector, Result, Transport};

pub use config::DEFAULT_EXCHANGE;
pub use kind::RabbitmqConfig;
pub use subscription::{RabbitmqSubscription, queue_name};
pub use transport::{CAPABILITIES, DELAY_EXCHANGE, PUBLISH_DEADLINE, RabbitmqTransport, delay_queue};

/// Connects broker envs of type `rabbitmq`.
#[derive(Debug, Clone, Copy, Default)]
pub struct RabbitmqConnector;

/// The broker type this crate serves, as definitions write it.
pub const BROKER_TYPE: BrokerType = BrokerType::from_static("rabbitmq");

#[async_trait]
impl Connector for RabbitmqConnector {
    async fn connect(&self, target: &ConnectTarget) -> Result<Arc<dyn Transport>> {
        let settings = config::Settings::from_target(target)?;
        Ok(Arc::new(RabbitmqTransport::connect(settings).await?))
    }
}
