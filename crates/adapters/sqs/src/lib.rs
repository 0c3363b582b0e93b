//! polybus adapter for AWS SQS.
//!
//! SQS has queues and no consumer groups, so a topic with native name `N` is a base queue `N`
//! and one queue `N--G` per group `G`, created when the group first subscribes; a publish goes
//! to every group queue of the topic (emulated fan-out; a group gets the messages published
//! after it first subscribed). A topic that sets a `queueUrl` has that one queue instead, on
//! which every group competes. FIFO topics use `.fifo` queues with the key as message group.
//! ack = `DeleteMessage`, nack = `ChangeMessageVisibility`, the ack deadline is the visibility
//! timeout, the attempt is `ApproximateReceiveCount`. See the crate README for the whole mapping.
//!
//! Get a transport through [`SqsConnector`], as the registry does.

mod codec;
mod connect;
mod fail;
mod groups;
mod kind;
mod lag;
pub mod names;
mod settle;
mod subscription;
mod transport;

use std::sync::Arc;

use async_trait::async_trait;
use polybus_core::{BrokerType, ConnectTarget, Connector, Error, Result, Transport, ValidationError};

pub use codec::{ENCODING, HEADERS, MAX_PAYLOAD_BYTES};
pub use groups::{GROUP_TAG, TOPIC_TAG};
pub use kind::SqsConfig;
pub use transport::SqsTransport;

/// Entries SQS takes in one batch call.
const MAX_ENTRIES: usize = 10;

/// Connects broker envs of type `aws_sqs`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SqsConnector;

/// The broker type this crate serves, as definitions write it.
pub const BROKER_TYPE: BrokerType = BrokerType::from_static("aws_sqs");

#[async_trait]
impl Connector for SqsConnector {
    async fn connect(&self, target: &ConnectTarget) -> Result<Arc<dyn Transport>> {
        let config: SqsConfig = polybus_core::config::parse(&target.config).map_err(|(field, message)| {
            Error::Validation(ValidationError::in_env(&target.env, field, message))
        })?;
        let client = connect::client(&config, &target.env).await?;
        Ok(Arc::new(SqsTransport::new(client, config.queue_url)))
    }
}
