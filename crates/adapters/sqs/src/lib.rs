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

mod batcher;
mod codec;
mod connect;
mod fail;
mod groups;
pub mod names;
mod settle;
mod subscription;
mod transport;

use std::sync::Arc;

use async_trait::async_trait;
use polybus_core::config::SqsConfig;
use polybus_core::kind::{BrokerKind, FieldError};
use polybus_core::{BrokerType, ConnectTarget, Connector, Error, Result, Transport, ValidationError};

pub use codec::{ENCODING, HEADERS, MAX_PAYLOAD_BYTES};
pub use groups::{GROUP_TAG, TOPIC_TAG};
pub use transport::SqsTransport;

/// Connects broker envs of type `aws_sqs`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SqsConnector;

/// The topic option giving the queue a topic uses as it is (no queue per group).
const QUEUE_URL: &str = "queueUrl";
/// The topic option asking for FIFO queues (the key becomes the message group).
const FIFO: &str = "fifo";

/// The queue URL `topic` names in its options, if any.
pub(crate) fn queue_url_of(topic: &polybus_core::TopicSpec) -> Option<&str> {
    topic.options.get(QUEUE_URL).and_then(serde_json::Value::as_str)
}

/// Whether `topic` asks for FIFO queues.
pub(crate) fn fifo_of(topic: &polybus_core::TopicSpec) -> bool {
    topic.options.get(FIFO).and_then(serde_json::Value::as_bool).unwrap_or(false)
}

/// The broker type this crate serves, as definitions write it.
pub const BROKER_TYPE: BrokerType = BrokerType::from_static("aws_sqs");

impl BrokerKind for SqsConnector {
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
            let field = format!("options.{key}");
            match key.as_str() {
                QUEUE_URL => {
                    let url =
                        value.as_str().ok_or_else(|| (field.clone(), "expected a string".to_owned()))?;
                    polybus_core::names::check_queue_url(url)
                        .map_err(|e| (field, format!("not a valid {BROKER_TYPE} name: {e}")))?;
                }
                FIFO if value.is_boolean() => {}
                FIFO => return Err((field, "expected true or false".into())),
                _ => {
                    return Err((
                        field,
                        format!("unknown option `{key}`; SQS takes `{QUEUE_URL}` and `{FIFO}`"),
                    ));
                }
            }
        }
        Ok(())
    }

    fn describe(&self, config: &serde_json::Value, spec: &polybus_core::TopicSpec) -> Option<String> {
        let _ = config;
        Some(match queue_url_of(spec) {
            Some(url) => format!("queue URL {url}"),
            None => format!("queue `{}--<group>` per group", spec.native_name),
        })
    }
}

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
