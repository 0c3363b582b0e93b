//! polybus adapter for NATS JetStream.
//!
//! A topic is a stream (named after the topic's native name, see [`names`]) holding the
//! subject `polybus.<native>`; a group is a durable pull consumer `<native>--<group>` with
//! explicit acks, starting at the stream's first message. Message attributes travel as NATS
//! headers (`polybus-id`, `polybus-key`, `polybus-content-type`, `polybus-published-at`,
//! and `Nats-Msg-Id` for JetStream's duplicate window). Delayed delivery is emulated with a
//! second stream per topic (see the crate README). Dead-lettering is polybus's own.
//!
//! Get a transport through [`NatsConnector`], as the registry does.

mod codec;
mod connect;
mod groups;
mod kind;
mod mover;
pub mod names;
mod puller;
mod replay;
mod subscription;
mod transport;

use std::sync::Arc;

use async_trait::async_trait;
use polybus_core::{BrokerType, ConnectTarget, Connector, Error, Result, Transport, ValidationError};

pub use codec::DELIVER_AT;
pub use kind::{NatsConfig, OneOrMany};
pub use transport::NatsTransport;

/// Connects broker envs of type `nats`.
#[derive(Debug, Clone, Copy, Default)]
pub struct NatsConnector;

/// The broker type this crate serves, as definitions write it.
pub const BROKER_TYPE: BrokerType = BrokerType::from_static("nats");

#[async_trait]
impl Connector for NatsConnector {
    async fn connect(&self, target: &ConnectTarget) -> Result<Arc<dyn Transport>> {
        let config: NatsConfig =
            polybus_core::config::parse(&target.config).map_err(|(field, message)| {
                Error::Validation(ValidationError::in_env(&target.env, field, message))
            })?;
        let connection = connect::connect(&config, &target.env).await?;
        Ok(Arc::new(NatsTransport::new(connection)))
    }
}
