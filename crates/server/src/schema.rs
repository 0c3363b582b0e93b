//! OpenAPI descriptions of the registry documents. The core types validate themselves and do
//! not depend on `utoipa`; these mirror their JSON shape for the OpenAPI document only.

#![allow(dead_code)]

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

/// The kind of broker an env runs on: a type name one of the server's connectors declares
/// (`kafka`, `redis`, `rabbitmq`, `google_pubsub`, `aws_sqs`, `nats`, `mqtt`, `embedded` in the
/// standard build; upper-case spellings are accepted too).
#[derive(Serialize, ToSchema)]
pub struct BrokerType(String);

/// One env of a broker.
#[derive(Serialize, ToSchema)]
pub struct BrokerEnv {
    /// Env slug, e.g. `prd`.
    slug: String,
    /// Broker type.
    #[serde(rename = "type")]
    broker_type: BrokerType,
    /// Type-specific config (camelCase fields); strings may be `${ENV_VAR}`. Literal secrets
    /// are returned as `****`.
    #[schema(value_type = Object)]
    config: Value,
}

/// A broker definition.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Broker {
    /// Display name.
    name: String,
    /// Unique tag, `[a-z0-9][a-z0-9-_]*`, at most 64 characters.
    tag: String,
    /// Short description.
    description: Option<String>,
    /// The envs.
    envs: Vec<BrokerEnv>,
    /// Version, bumped by every update (ignored on create).
    version: Option<u64>,
}

/// A partial update of a broker; a stale `version` is refused with `409 CONFLICT`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BrokerPatch {
    /// New display name.
    name: Option<String>,
    /// New description.
    description: Option<String>,
    /// Envs to replace (same slug) or add.
    envs: Option<Vec<BrokerEnv>>,
    /// Slugs of envs to remove.
    remove_envs: Option<Vec<String>>,
    /// The version this patch is based on.
    version: Option<u64>,
}

/// Per-env settings of a topic.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TopicEnv {
    /// Env slug of the topic's broker.
    slug: String,
    /// Name on the broker (default: the topic tag); `topicName` is read as this too.
    native_name: Option<String>,
    /// Settings of the env's broker type, checked by its connector: `queueUrl` and `fifo` on
    /// SQS, `partitions` on Kafka (the same fields beside `slug` are read into here).
    #[schema(value_type = Object)]
    options: Option<Value>,
}

/// A topic.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Topic {
    /// The event, `broker-tag:topic-tag`.
    tag: String,
    /// Display name (default: the topic tag).
    name: Option<String>,
    /// Short description.
    description: Option<String>,
    /// Deliveries before a message is dead-lettered (default 5).
    max_attempts: Option<u32>,
    /// Native name of the dead-letter destination (default `<native>-dlq`).
    dead_letter: Option<String>,
    /// Per-env settings.
    envs: Option<Vec<TopicEnv>>,
    /// An example payload.
    sample: Option<Value>,
    /// Version, bumped by every update (ignored on create).
    version: Option<u64>,
}

/// A partial update of a topic.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TopicPatch {
    /// New display name.
    name: Option<String>,
    /// New description.
    description: Option<String>,
    /// New attempt limit.
    max_attempts: Option<u32>,
    /// New dead-letter native name.
    dead_letter: Option<String>,
    /// Env settings to replace (same slug) or add.
    envs: Option<Vec<TopicEnv>>,
    /// Env settings to remove.
    remove_envs: Option<Vec<String>>,
    /// New sample payload.
    sample: Option<Value>,
    /// The version this patch is based on.
    version: Option<u64>,
}

/// Where a topic lives on the broker of one env.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NativeName {
    /// Env slug.
    env: String,
    /// Broker type of the env.
    #[serde(rename = "type")]
    broker_type: BrokerType,
    /// Name on the broker.
    native_name: String,
    /// Native name of the dead-letter destination.
    dead_letter: String,
}

/// A topic with the native names it maps to in each env of its broker.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TopicDetail {
    /// The topic.
    #[serde(flatten)]
    topic: Topic,
    /// One entry per env of the broker.
    native_names: Vec<NativeName>,
}

/// String headers of a message.
pub type Headers = BTreeMap<String, String>;
