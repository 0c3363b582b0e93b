//! polybus embedded broker: a durable message log per topic in one local SQLite file, with
//! consumer groups, leases, delayed delivery and per-key order. No service to run; several
//! processes can share the file.
//!
//! Get a transport through [`EmbeddedConnector`] (what the registry uses) or directly with
//! [`EmbeddedTransport::open`].

mod checkpoint;
mod groups;
mod kind;
mod log;
mod ownership;
mod replay;
mod settle;
mod store;
mod subscription;
mod transport;

use std::sync::Arc;

use async_trait::async_trait;
use polybus_core::{BrokerType, ConnectTarget, Connector, Error, Result, Transport, ValidationError};

pub use kind::{EmbeddedConfig, RetentionConfig};
pub use ownership::APPLICATION_ID;
pub use store::check_file;
pub use transport::{DEFAULT_PATH, EmbeddedTransport};

/// Connects broker envs of type `embedded`.
#[derive(Debug, Clone, Copy, Default)]
pub struct EmbeddedConnector;

/// The broker type this crate serves, as definitions write it.
pub const BROKER_TYPE: BrokerType = BrokerType::from_static("embedded");

#[async_trait]
impl Connector for EmbeddedConnector {
    async fn connect(&self, target: &ConnectTarget) -> Result<Arc<dyn Transport>> {
        let config = if target.config.is_null() {
            EmbeddedConfig::default()
        } else {
            polybus_core::config::parse::<EmbeddedConfig>(&target.config).map_err(|(field, message)| {
                Error::Validation(ValidationError::in_env(&target.env, field, message))
            })?
        };
        match EmbeddedTransport::open(&config).await {
            Ok(transport) => Ok(Arc::new(transport)),
            Err(Error::Validation(invalid)) if invalid.env.is_none() => {
                Err(ValidationError { env: Some(target.env.clone()), ..invalid }.into())
            }
            Err(other) => Err(other),
        }
    }
}
