//! Names of the registry documents for the OpenAPI document's route annotations. The schemas
//! of broker and topic documents themselves are generated (schemars) from the core types and
//! each connector's config type when the document is rendered; only the server's own response
//! shapes are described here.

#![allow(dead_code)]

use std::collections::BTreeMap;

use serde::Serialize;
use utoipa::ToSchema;

/// The kind of broker an env runs on: a type name one of the server's connectors declares
/// (upper-case spellings are accepted too).
#[derive(Serialize, ToSchema)]
pub struct BrokerType(String);

// The documents below are named here for the route annotations only: their schemas in the
// served document are derived from polybus's own types and the server's connectors
// (`polybus::core::schema::openapi_components`), replacing these placeholders.

/// A broker definition.
#[derive(Serialize, ToSchema)]
pub struct Broker {}

/// A partial update of a broker; a stale `version` is refused with `409 CONFLICT`.
#[derive(Serialize, ToSchema)]
pub struct BrokerPatch {}

/// A topic.
#[derive(Serialize, ToSchema)]
pub struct Topic {}

/// A partial update of a topic.
#[derive(Serialize, ToSchema)]
pub struct TopicPatch {}

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
