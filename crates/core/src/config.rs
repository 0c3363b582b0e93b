//! Typed config per broker type, with the field names of the seed's product (camelCase).
//!
//! Strings may be `${ENV_VAR}` references; numbers and booleans are literal.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::broker::BrokerType;
use crate::secret;

/// One string or a list of them (`servers: "nats://a"` or `servers: [..]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// A single value.
    One(String),
    /// Several values.
    Many(Vec<String>),
}

impl OneOrMany {
    /// The values as a list.
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => {
                s.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect()
            }
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// SASL mechanisms Kafka accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port`.
    pub brokers: Vec<String>,
    /// Client id.
    pub client_id: Option<String>,
    /// Default consumer group (the seed's field; groups are normally per subscription).
    pub group_id: Option<String>,
    /// Default topic (the seed's field; topics normally come from the topic definition).
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

/// How the Redis adapter uses Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    /// Streams with consumer groups (at-least-once, the default).
    Streams,
    /// Plain PUBLISH/SUBSCRIBE (at-most-once).
    Pubsub,
}

/// Redis config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://` or `rediss://` URL; alternative to host/port.
    pub url: Option<String>,
    /// Host name.
    pub host: Option<String>,
    /// Port (default 6379).
    pub port: Option<u16>,
    /// ACL user name.
    pub username: Option<String>,
    /// Password.
    pub password: Option<String>,
    /// Database number.
    pub db: Option<i64>,
    /// Use TLS.
    pub tls: Option<bool>,
    /// The seed's channel field (accepted; topics come from topic definitions).
    pub channel: Option<String>,
    /// Streams (default) or plain Pub/Sub.
    pub mode: Option<RedisMode>,
    /// Approximate maximum stream length (`MAXLEN ~`).
    pub max_len: Option<u64>,
}

/// RabbitMQ config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RabbitmqConfig {
    /// `amqp://` or `amqps://` URL; alternative to host/port/username/password.
    pub url: Option<String>,
    /// Host name.
    pub host: Option<String>,
    /// Port (default 5672).
    pub port: Option<u16>,
    /// User name.
    pub username: Option<String>,
    /// Password.
    pub password: Option<String>,
    /// Virtual host.
    pub vhost: Option<String>,
    /// Topic exchange messages are published to (default `polybus`).
    pub exchange: Option<String>,
    /// The seed's queue field (accepted; queues are per group).
    pub queue: Option<String>,
    /// The seed's routing key field (accepted; the topic is the routing key).
    pub routing_key: Option<String>,
    /// Use TLS.
    pub tls: Option<bool>,
}

/// Google Cloud Pub/Sub config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PubsubConfig {
    /// GCP project id.
    pub project_id: String,
    /// Default topic name (topics normally come from topic definitions).
    pub topic_name: Option<String>,
    /// Default subscription name.
    pub subscription_name: Option<String>,
    /// Path of a service-account key file.
    pub key_filename: Option<String>,
    /// Inline service-account JSON (use a `${VAR}` reference).
    pub credentials: Option<String>,
    /// Endpoint, e.g. an emulator at `http://127.0.0.1:8085`.
    pub endpoint: Option<String>,
}

/// AWS SQS config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SqsConfig {
    /// AWS region.
    pub region: String,
    /// Default queue URL (may also be set per env on the topic).
    pub queue_url: Option<String>,
    /// Access key id (default AWS chain when absent).
    pub access_key_id: Option<String>,
    /// Secret access key.
    pub secret_access_key: Option<String>,
    /// Endpoint for local or compatible servers.
    pub endpoint_url: Option<String>,
}

/// NATS JetStream config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URLs.
    pub servers: OneOrMany,
    /// User name.
    pub user: Option<String>,
    /// Password.
    pub pass: Option<String>,
    /// Token.
    pub token: Option<String>,
    /// Connection name.
    pub name: Option<String>,
    /// Reconnect attempts before giving up.
    pub max_reconnect_attempts: Option<i64>,
    /// Milliseconds between reconnect attempts.
    pub reconnect_time_wait: Option<u64>,
}

/// MQTT config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MqttConfig {
    /// `mqtt://` or `mqtts://` URL; alternative to host/port.
    pub url: Option<String>,
    /// Host name.
    pub host: Option<String>,
    /// Port (default 1883).
    pub port: Option<u16>,
    /// User name.
    pub username: Option<String>,
    /// Password.
    pub password: Option<String>,
    /// Client id prefix.
    pub client_id: Option<String>,
    /// Use TLS.
    pub tls: Option<bool>,
    /// Protocol version, 3 (3.1.1) or 5.
    pub version: Option<u8>,
}

/// Retention of the embedded broker's log.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetentionConfig {
    /// Messages older than this many seconds may be removed.
    pub max_age_seconds: Option<u64>,
    /// At most this many messages are kept per topic.
    pub max_messages: Option<u64>,
}

/// Embedded broker config.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EmbeddedConfig {
    /// Path of the broker's SQLite file (default `polybus-broker.db`).
    pub path: Option<String>,
    /// Retention of messages; acked-by-all messages are compacted regardless.
    pub retention: Option<RetentionConfig>,
}

/// Parses a typed config, returning `(field, message)` on error.
pub fn parse<T: DeserializeOwned>(value: &Value) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(crate::strict::Strict(value.clone())).map_err(|err| {
        let path = err.path().to_string();
        let mut field = if path == "." { "config".to_owned() } else { format!("config.{path}") };
        if let Some(missing) = missing_field(&err.inner().to_string()) {
            field = format!("{field}.{missing}");
        }
        let message = if secret::is_secret_field(&field) {
            "expected a string".to_owned()
        } else {
            err.inner().to_string()
        };
        (field, message)
    })
}

/// The field name in a serde "missing field `x`" message.
pub(crate) fn missing_field(message: &str) -> Option<&str> {
    message.strip_prefix("missing field `")?.split('`').next()
}

/// Refuses a config that has none of `present` (`(given, field name)`).
pub fn require_one(present: &[(bool, &str)]) -> Result<(), (String, String)> {
    if present.iter().any(|(p, _)| *p) {
        return Ok(());
    }
    let names: Vec<_> = present.iter().map(|(_, n)| format!("`{n}`")).collect();
    Err(("config".into(), format!("one of {} is required", names.join(" or "))))
}

/// Validates `config` for `broker_type`: required fields, value types, unknown fields.
pub fn validate(broker_type: &BrokerType, config: &Value) -> Result<(), (String, String)> {
    if !config.is_object() {
        return Err(("config".into(), "expected an object".into()));
    }
    match broker_type.as_str() {
        "kafka" => {
            let c: KafkaConfig = parse(config)?;
            if c.brokers.is_empty() {
                return Err(("config.brokers".into(), "at least one `host:port` is required".into()));
            }
        }
        "redis" => {
            let c: RedisConfig = parse(config)?;
            require_one(&[(c.url.is_some(), "url"), (c.host.is_some(), "host")])?;
        }
        "rabbitmq" => {
            let c: RabbitmqConfig = parse(config)?;
            require_one(&[(c.url.is_some(), "url"), (c.host.is_some(), "host")])?;
        }
        "google_pubsub" => {
            let c: PubsubConfig = parse(config)?;
            if c.project_id.len() < 3 && !secret::is_reference(&c.project_id) {
                return Err(("config.projectId".into(), "a project id has at least 3 characters".into()));
            }
        }
        "aws_sqs" => {
            parse::<SqsConfig>(config)?;
        }
        "nats" => {
            let c: NatsConfig = parse(config)?;
            if c.servers.to_vec().is_empty() {
                return Err(("config.servers".into(), "at least one server URL is required".into()));
            }
        }
        "mqtt" => {
            let c: MqttConfig = parse(config)?;
            require_one(&[(c.url.is_some(), "url"), (c.host.is_some(), "host")])?;
            if let Some(v) = c.version
                && v != 3
                && v != 5
            {
                return Err(("config.version".into(), format!("expected 3 or 5, got {v}")));
            }
        }
        "embedded" => {
            parse::<EmbeddedConfig>(config)?;
        }
        other => return Err(("type".into(), format!("no built-in config for `{other}`"))),
    }
    Ok(())
}

/// A broker type whose config and native names are checked by this module, for the
/// connectors that have not taken their rules over yet.
#[derive(Debug, Clone)]
pub struct Builtin(pub BrokerType);

impl crate::kind::BrokerKind for Builtin {
    fn broker_type(&self) -> BrokerType {
        self.0.clone()
    }

    fn validate_config(&self, config: &Value) -> Result<(), (String, String)> {
        validate(&self.0, config)
    }

    fn check_native(&self, name: &str) -> Result<(), String> {
        crate::names::check_native(&self.0, name)
    }

    fn check_group(&self, native: &str, group: &str) -> Result<(), String> {
        crate::names::check_group(&self.0, native, group)
    }
}

/// The built-in kinds.
pub fn builtin_kinds() -> crate::kind::Kinds {
    let names = ["kafka", "redis", "rabbitmq", "google_pubsub", "aws_sqs", "nats", "mqtt", "embedded"];
    crate::kind::Kinds::new(names.map(|n| {
        std::sync::Arc::new(Builtin(BrokerType::from_static(n)))
            as std::sync::Arc<dyn crate::kind::BrokerKind>
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn each_type_accepts_its_seed_fields() {
        let cases = [
            (
                BrokerType::from_static("kafka"),
                json!({"brokers": ["a:9092"], "clientId": "c", "groupId": "g", "ssl": false,
                "sasl": {"mechanism": "scram-sha-256", "username": "u", "password": "${P}"}}),
            ),
            (
                BrokerType::from_static("redis"),
                json!({"host": "h", "port": 6379, "channel": "c", "password": "${P}"}),
            ),
            (
                BrokerType::from_static("rabbitmq"),
                json!({"host": "h", "port": 5672, "username": "u", "password": "p",
                "exchange": "e", "queue": "q", "routingKey": "r"}),
            ),
            (
                BrokerType::from_static("google_pubsub"),
                json!({"projectId": "proj", "topicName": "t", "keyFilename": "k.json"}),
            ),
            (
                BrokerType::from_static("aws_sqs"),
                json!({"region": "eu-west-1", "queueUrl": "http://q", "accessKeyId": "a",
                "secretAccessKey": "s"}),
            ),
            (
                BrokerType::from_static("nats"),
                json!({"servers": ["nats://127.0.0.1:4222"], "maxReconnectAttempts": 3}),
            ),
            (BrokerType::from_static("mqtt"), json!({"host": "127.0.0.1", "version": 5})),
            (BrokerType::from_static("embedded"), json!({})),
        ];
        for (t, c) in cases {
            validate(&t, &c).unwrap_or_else(|e| panic!("{t}: {e:?}"));
        }
    }

    #[test]
    fn unknown_and_missing_fields_are_named() {
        let (field, msg) = validate(&BrokerType::from_static("redis"), &json!({"hots": "x"})).unwrap_err();
        assert_eq!(field, "config.hots");
        assert!(msg.contains("unknown field `hots`"), "{msg}");
        let (field, msg) = validate(&BrokerType::from_static("aws_sqs"), &json!({})).unwrap_err();
        assert_eq!(field, "config.region");
        assert!(msg.contains("region"), "{msg}");
        let (field, _) =
            validate(&BrokerType::from_static("kafka"), &json!({"brokers": "a:9092"})).unwrap_err();
        assert_eq!(field, "config.brokers");
    }

    #[test]
    fn secret_values_never_appear_in_type_errors() {
        let (field, msg) =
            validate(&BrokerType::from_static("redis"), &json!({"host": "h", "password": 1234567}))
                .unwrap_err();
        assert_eq!(field, "config.password");
        assert!(!msg.contains("1234567"));
    }
}
