//! polybus adapter for Redis Streams.
//!
//! A topic is a stream (its native name is the stream key), a group is a consumer group
//! (`XGROUP CREATE … 0 MKSTREAM`: a new group starts at the beginning of the stream), a
//! member reads with `XREADGROUP` and settles with `XACK`. A delivery nobody settles is
//! taken over by any member of its group once it has been idle for the ack deadline
//! (`XAUTOCLAIM`, which members run as part of fetching when a claim is due); its attempt is
//! the pending entry's delivery counter. Delayed publishes and delayed nacks are emulated with
//! sorted sets that members move into the stream (or back into reach) with Lua scripts. See
//! the crate's README for the stream fields a message is stored as.

mod config;
mod fields;
mod groups;
mod kind;
mod replay;
mod scripts;
mod settle;
mod subscription;
mod transport;

use std::sync::Arc;

use async_trait::async_trait;
use polybus_core::{BrokerType, ConnectTarget, Connector, Error, Result, Transport, ValidationError};

pub use fields::{CONTENT_TYPE, HEADER_PREFIX, ID, KEY, PAYLOAD, PUBLISHED_AT};
pub use kind::{RedisConfig, RedisMode};
pub use transport::RedisTransport;

/// Connects `redis` broker envs: Redis Streams with consumer groups.
#[derive(Debug, Clone, Copy, Default)]
pub struct RedisConnector;

/// The broker type this crate serves, as definitions write it.
pub const BROKER_TYPE: BrokerType = BrokerType::from_static("redis");

#[async_trait]
impl Connector for RedisConnector {
    async fn connect(&self, target: &ConnectTarget) -> Result<Arc<dyn Transport>> {
        let parsed: crate::kind::RedisConfig = polybus_core::config::parse(&target.config)
            .map_err(|(field, message)| ValidationError::in_env(&target.env, field, message))?;
        if parsed.mode == Some(RedisMode::Pubsub) {
            return Err(Error::Unsupported {
                broker_type: BROKER_TYPE.to_string(),
                what: "`mode: pubsub` (this adapter implements `mode: streams`, the default)".into(),
            });
        }
        let settings = config::Settings::from_config(&parsed, &target.env)?;
        Ok(Arc::new(RedisTransport::connect(settings).await?))
    }
}
