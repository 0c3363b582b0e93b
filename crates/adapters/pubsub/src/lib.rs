//! polybus adapter for Google Cloud Pub/Sub, on Google's own client (`google-cloud-pubsub`).
//!
//! A topic is a Pub/Sub topic named by the topic's native name; a group is a subscription
//! `<native>--<group>` (message ordering off, a dead-letter policy only so that Pub/Sub counts
//! delivery attempts). Headers travel as attributes, the key as the ordering key, and the
//! polybus id, content type and publish time as the attributes `polybus-id`,
//! `polybus-content-type` and `polybus-published-at`. Ack deadlines shorter than Pub/Sub's
//! 10 s minimum and nacks with a delay are kept by a local timer (see the crate README).
//!
//! Get a transport through [`PubsubConnector`], as the registry does.

mod acks;
mod codec;
mod connect;
mod fail;
mod groups;
mod kind;
pub mod names;
mod subscription;
mod transport;

use std::sync::Arc;

use async_trait::async_trait;
use polybus_core::{BrokerType, ConnectTarget, Connector, Error, Result, Transport, ValidationError};

pub use kind::PubsubConfig;
pub use transport::PubsubTransport;

/// Connects broker envs of type `google_pubsub`.
#[derive(Debug, Clone, Copy, Default)]
pub struct PubsubConnector;

/// The broker type this crate serves, as definitions write it.
pub const BROKER_TYPE: BrokerType = BrokerType::from_static("google_pubsub");

#[async_trait]
impl Connector for PubsubConnector {
    async fn connect(&self, target: &ConnectTarget) -> Result<Arc<dyn Transport>> {
        let config: PubsubConfig =
            polybus_core::config::parse(&target.config).map_err(|(field, message)| {
                Error::Validation(ValidationError::in_env(&target.env, field, message))
            })?;
        let settings = connect::Settings::resolve(&config, &target.env).await?;
        Ok(Arc::new(PubsubTransport::connect(settings).await?))
    }
}
