//! What a `kafka` env is: its config, its topic options (`partitions`) and Kafka's rules for
//! topic names.

use std::collections::BTreeMap;

use polybus_core::config::{not_used, parse};
use polybus_core::kind::{BrokerKind, FieldError};
use polybus_core::limits::quote;
use polybus_core::names::GROUP_SEPARATOR;
use polybus_core::{BrokerType, TopicSpec};
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{BROKER_TYPE, KafkaConnector};

/// Longest Kafka topic name.
pub const MAX_KAFKA_CHARS: usize = 249;
/// The topic option naming how many partitions a topic is created with.
const PARTITIONS: &str = "partitions";

/// SASL mechanisms Kafka accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SaslMechanism {
    /// PLAIN.
    #[serde(rename = "plain", alias = "PLAIN")]
    Plain,
    /// SCRAM-SHA-256.
    #[serde(rename = "scram-sha-256", alias = "SCRAM-SHA-256")]
    ScramSha256,
    /// SCRAM-SHA-512.
    #[serde(rename = "scram-sha-512", alias = "SCRAM-SHA-512")]
    ScramSha512,
}

/// Kafka SASL credentials.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SaslConfig {
    /// Mechanism.
    pub mechanism: SaslMechanism,
    /// User name.
    pub username: String,
    /// Password (use a `${VAR}` reference).
    pub password: String,
}

/// Kafka config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port`.
    pub brokers: Vec<String>,
    /// Client id.
    pub client_id: Option<String>,
    /// The seed's default consumer group (refused: each subscription names its group).
    pub group_id: Option<String>,
    /// The seed's default topic (refused: topics come from topic definitions).
    pub topic: Option<String>,
    /// Use TLS.
    pub ssl: Option<bool>,
    /// SASL authentication.
    pub sasl: Option<SaslConfig>,
    /// Partitions for topics created on demand.
    pub partitions: Option<i32>,
    /// Replication factor for topics created on demand.
    pub replication_factor: Option<i32>,
    /// librdkafka properties passed through as they are, for experts.
    pub properties: Option<BTreeMap<String, String>>,
}

/// Partitions `topic` asks for in its options, if any.
pub(crate) fn partitions_of(topic: &TopicSpec) -> Option<i32> {
    topic.options.get(PARTITIONS).and_then(Value::as_i64).and_then(|p| i32::try_from(p).ok())
}

impl BrokerKind for KafkaConnector {
    fn broker_type(&self) -> BrokerType {
        BROKER_TYPE
    }

    fn config_schema(&self, generator: &mut SchemaGenerator) -> Schema {
        generator.subschema_for::<KafkaConfig>()
    }

    fn validate_config(&self, config: &Value) -> Result<(), FieldError> {
        let c: KafkaConfig = parse(config)?;
        if c.brokers.is_empty() {
            return Err(("config.brokers".into(), "at least one `host:port` is required".into()));
        }
        not_used(
            c.group_id.is_some(),
            "groupId",
            "each subscription names its group (`polybus consume --group`, `Group(..)`); \
                 remove `groupId`",
        )?;
        not_used(
            c.topic.is_some(),
            "topic",
            "topics come from topic definitions (`polybus topic create`; a topic env's \
                 `nativeName` names an existing Kafka topic); remove `topic`",
        )?;
        Ok(())
    }

    fn validate_options(&self, options: &Map<String, Value>) -> Result<(), FieldError> {
        for (key, value) in options {
            let field = format!("options.{key}");
            if key != PARTITIONS {
                return Err((field, format!("unknown option `{key}`; Kafka takes `{PARTITIONS}`")));
            }
            if !value.as_i64().is_some_and(|p| p >= 1 && i32::try_from(p).is_ok()) {
                return Err((field, format!("expected a whole number from 1 to {}", i32::MAX)));
            }
        }
        Ok(())
    }

    fn dead_letter_options(&self, options: &Map<String, Value>) -> Map<String, Value> {
        options.iter().filter(|(key, _)| *key == PARTITIONS).map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    fn check_native(&self, name: &str) -> Result<(), String> {
        check_kafka(name)
    }

    fn check_group(&self, native: &str, group: &str) -> Result<(), String> {
        let retry = format!("{native}{GROUP_SEPARATOR}{group}.retry");
        check_kafka(&retry).map_err(|e| format!("the group's retry topic: {e}"))
    }
}

/// Kafka's rule for topic names.
fn check_kafka(name: &str) -> Result<(), String> {
    if name == "." || name == ".." {
        return Err(format!("{} is not a Kafka topic name", quote(name)));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(format!("{} contains `{c}`; Kafka topic names are `[A-Za-z0-9._-]`", quote(name)));
    }
    if name.chars().count() > MAX_KAFKA_CHARS {
        return Err(format!("{} is longer than Kafka's {MAX_KAFKA_CHARS} characters", quote(name)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn brokers_is_a_list_and_fields_that_would_be_ignored_are_refused() {
        let seed = json!({"brokers": ["a:9092"], "clientId": "c", "ssl": false,
            "sasl": {"mechanism": "scram-sha-256", "username": "u", "password": "${P}"}});
        KafkaConnector.validate_config(&seed).unwrap();
        for (field, says) in
            [("groupId", "each subscription names its group"), ("topic", "topic definitions")]
        {
            let mut with = seed.clone();
            with[field] = json!("orders");
            let (named, message) = KafkaConnector.validate_config(&with).unwrap_err();
            assert_eq!(named, format!("config.{field}"));
            assert!(message.contains(says) && message.contains(&format!("remove `{field}`")), "{message}");
        }
        let (field, _) = KafkaConnector.validate_config(&json!({"brokers": "a:9092"})).unwrap_err();
        assert_eq!(field, "config.brokers");
        let (field, _) = KafkaConnector.validate_config(&json!({"brokers": []})).unwrap_err();
        assert_eq!(field, "config.brokers");
    }

    #[test]
    fn topic_names_have_kafkas_character_set_and_length() {
        KafkaConnector.check_native(&"k".repeat(249)).unwrap();
        KafkaConnector.check_native("orders.v1").unwrap();
        assert!(KafkaConnector.check_native(&"k".repeat(250)).unwrap_err().contains("249"));
        assert!(KafkaConnector.check_native("..").unwrap_err().contains("not a Kafka topic name"));
        assert!(KafkaConnector.check_native("a/b").unwrap_err().contains("[A-Za-z0-9._-]"));
    }

    #[test]
    fn a_groups_retry_topic_must_stay_legal() {
        KafkaConnector.check_group("orders", "billing").unwrap();
        assert!(KafkaConnector.check_group(&"k".repeat(240), "billing").unwrap_err().contains("retry topic"));
    }

    #[test]
    fn partitions_is_the_one_option_and_dead_letters_keep_it() {
        let options = |v: Value| v.as_object().cloned().unwrap_or_default();
        KafkaConnector.validate_options(&options(json!({"partitions": 4}))).unwrap();
        for bad in [json!({"partitions": 0}), json!({"partitions": "4"}), json!({"partitions": 1u64 << 40})] {
            let (field, _) = KafkaConnector.validate_options(&options(bad)).unwrap_err();
            assert_eq!(field, "options.partitions");
        }
        let (field, message) = KafkaConnector.validate_options(&options(json!({"fifo": true}))).unwrap_err();
        assert_eq!(field, "options.fifo");
        assert!(message.contains("Kafka takes `partitions`"), "{message}");
        let kept = KafkaConnector.dead_letter_options(&options(json!({"partitions": 4})));
        assert_eq!(Value::Object(kept), json!({"partitions": 4}));
    }
}
