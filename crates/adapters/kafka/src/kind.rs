//! What a `kafka` env is: its config, its topic options (`partitions`) and Kafka's rules for
//! topic names.

use std::collections::BTreeMap;

use polybus_core::config::{not_used, parse};
use polybus_core::kind::{BrokerKind, FieldError};
use polybus_core::limits::quote;
use polybus_core::names::GROUP_SEPARATOR;
use polybus_core::tls::{Tls, TlsBlock};
use polybus_core::{BrokerType, TopicSpec};
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{BROKER_TYPE, KafkaConnector};

/// Longest Kafka topic name.
pub const MAX_KAFKA_CHARS: usize = 249;
/// The topic option naming how many partitions a topic is created with.
const PARTITIONS: &str = "partitions";

/// SASL mechanisms polybus's librdkafka speaks (OAUTHBEARER and GSSAPI are refused by
/// [`check_mechanism`], with the reason).
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
    /// The seed's shorthand for `tls: true`.
    pub ssl: Option<bool>,
    /// TLS: `true` (system roots) or a block (`caFile`/`ca`, `certFile`/`cert`,
    /// `keyFile`/`key`, `insecureSkipVerify`; `serverName` is refused: librdkafka cannot honour it).
    pub tls: Option<Tls>,
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
        check_mechanism(config)?;
        let c: KafkaConfig = parse(config)?;
        if c.brokers.is_empty() {
            return Err(("config.brokers".into(), "at least one `host:port` is required".into()));
        }
        tls_of(&c)?;
        check_sasl(&c)?;
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

/// Refuses, with the reason, the SASL mechanisms Kafka has but polybus's librdkafka cannot use.
/// Checked before the config is parsed, so the message says more than "unknown variant".
pub(crate) fn check_mechanism(config: &Value) -> Result<(), FieldError> {
    let Some(mechanism) = config.pointer("/sasl/mechanism").and_then(Value::as_str) else {
        return Ok(());
    };
    let why = match mechanism.to_ascii_uppercase().as_str() {
        "OAUTHBEARER" => {
            "OAUTHBEARER is not supported: librdkafka gets its tokens either from an OIDC token endpoint \
             over the network (not built into polybus) or from a token callback polybus does not have; \
             use PLAIN or SCRAM-SHA-256/SCRAM-SHA-512"
        }
        "GSSAPI" => {
            "GSSAPI (Kerberos) is not built into polybus's librdkafka; use PLAIN or \
             SCRAM-SHA-256/SCRAM-SHA-512"
        }
        _ => return Ok(()),
    };
    Err(("config.sasl.mechanism".into(), why.into()))
}

/// Checks the SASL block beyond its shape: a user name is required.
pub(crate) fn check_sasl(c: &KafkaConfig) -> Result<(), FieldError> {
    match &c.sasl {
        Some(sasl) if sasl.username.trim().is_empty() => {
            Err(("config.sasl.username".into(), "is empty; give the SASL user name (or API key)".into()))
        }
        _ => Ok(()),
    }
}

/// The TLS settings of a config (`None`: plaintext), checked: `ssl` and `tls` agree, the
/// block's pairs fit, and no `serverName`, which librdkafka cannot honour.
pub(crate) fn tls_of(c: &KafkaConfig) -> Result<Option<TlsBlock>, FieldError> {
    if let (Some(ssl), Some(tls)) = (c.ssl, &c.tls)
        && ssl != tls.enabled()
    {
        return Err((
            "config.ssl".into(),
            format!(
                "`ssl: {ssl}` contradicts `tls`; `ssl` is the seed's shorthand for `tls: true`: remove it"
            ),
        ));
    }
    let block = match &c.tls {
        Some(tls) => tls.block(),
        None => (c.ssl == Some(true)).then(TlsBlock::default),
    };
    if let Some(block) = &block {
        block.validate().map_err(polybus_core::tls::TlsError::into_field)?;
        if block.server_name.is_some() {
            return Err((
                "config.tls.serverName".into(),
                "librdkafka cannot honour it: it checks each broker's certificate against the host \
                 it connects to (from `brokers` and the addresses the brokers advertise) and has no \
                 SNI or verify-name override; remove `serverName` and name the brokers by a host \
                 their certificate has"
                    .into(),
            ));
        }
    }
    Ok(block)
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
    fn tls_and_sasl_are_checked_with_their_reasons() {
        let ok = json!({"brokers": ["a:9093"], "ssl": true, "tls": {"caFile": "ca.pem"},
            "sasl": {"mechanism": "SCRAM-SHA-512", "username": "u", "password": "${P}"}});
        KafkaConnector.validate_config(&ok).unwrap();
        let refused = |config: Value| KafkaConnector.validate_config(&config).unwrap_err();

        let (field, message) = refused(json!({"brokers": ["a:9093"], "tls": {"serverName": "k.internal"}}));
        assert_eq!(field, "config.tls.serverName");
        assert!(message.contains("librdkafka cannot honour it") && message.contains("SNI"), "{message}");
        let (field, message) = refused(json!({"brokers": ["a:9093"], "ssl": false, "tls": true}));
        assert_eq!(field, "config.ssl");
        assert!(message.contains("contradicts"), "{message}");
        let (field, _) = refused(json!({"brokers": ["a:9093"], "tls": {"ca": "x", "caFile": "y"}}));
        assert_eq!(field, "config.tls.caFile");
        for (mechanism, says) in [("OAUTHBEARER", "OIDC"), ("oauthbearer", "OIDC"), ("GSSAPI", "Kerberos")] {
            let (field, message) = refused(json!({"brokers": ["a:9093"],
                "sasl": {"mechanism": mechanism, "username": "u", "password": "hunter2"}}));
            assert_eq!(field, "config.sasl.mechanism");
            assert!(message.contains(says) && message.contains("SCRAM"), "{message}");
            assert!(!message.contains("hunter2"));
        }
        let (field, _) = refused(json!({"brokers": ["a:9093"],
            "sasl": {"mechanism": "PLAIN", "username": " ", "password": "p"}}));
        assert_eq!(field, "config.sasl.username");
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
