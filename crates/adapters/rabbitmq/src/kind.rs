//! What a `rabbitmq` env is: its config and the rules for names used as routing keys.

use polybus_core::config::{not_used, parse, require_one};
use polybus_core::kind::{BrokerKind, FieldError};
use polybus_core::limits::quote;
use polybus_core::names::{GROUP_SEPARATOR, MAX_NATIVE_BYTES};
use polybus_core::tls::{Tls, TlsError};
use polybus_core::{BrokerType, TopicSpec};
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{BROKER_TYPE, RabbitmqConnector};

/// RabbitMQ config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
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
    /// The seed's queue field (refused: queues are per group).
    pub queue: Option<String>,
    /// The seed's routing key field (refused: the topic is the routing key).
    pub routing_key: Option<String>,
    /// TLS: `true` (system roots) or a block with a private CA, a client certificate, a server
    /// name or `insecureSkipVerify`; an `amqps://` URL turns it on too.
    pub tls: Option<Tls>,
}

impl BrokerKind for RabbitmqConnector {
    fn broker_type(&self) -> BrokerType {
        BROKER_TYPE
    }

    fn config_schema(&self, generator: &mut SchemaGenerator) -> Schema {
        generator.subschema_for::<RabbitmqConfig>()
    }

    fn validate_config(&self, config: &Value) -> Result<(), FieldError> {
        // Before `parse`, whose message for a bad `tls` cannot say which shape was expected.
        let tls = Tls::from_config(config).map_err(TlsError::into_field)?;
        let c: RabbitmqConfig = parse(config)?;
        require_one(&[(c.url.is_some(), "url"), (c.host.is_some(), "host")])?;
        if let Some(block) = tls {
            block.validate().map_err(TlsError::into_field)?;
        }
        not_used(
            c.queue.is_some(),
            "queue",
            "each group has its own queue, `<native name>--<group>`; remove `queue`",
        )?;
        not_used(
            c.routing_key.is_some(),
            "routingKey",
            "a topic's native name is its routing key; remove `routingKey` and set \
                 `nativeName` on the topic env",
        )?;
        Ok(())
    }

    fn check_native(&self, name: &str) -> Result<(), String> {
        check_rabbitmq(name)
    }

    fn check_group(&self, native: &str, group: &str) -> Result<(), String> {
        let queue = format!("{native}{GROUP_SEPARATOR}{group}");
        if queue.len() > MAX_NATIVE_BYTES {
            return Err(format!(
                "the group's queue: {} is {} bytes long; at most {MAX_NATIVE_BYTES} are allowed",
                quote(&queue),
                queue.len()
            ));
        }
        Ok(())
    }

    fn describe(&self, config: &Value, spec: &TopicSpec) -> Option<String> {
        let exchange = config.get("exchange").and_then(Value::as_str).unwrap_or("polybus");
        let native = &spec.native_name;
        Some(format!("exchange `{exchange}`, routing key `{native}`; queue `{native}--<group>` per group"))
    }
}

/// RabbitMQ's rule for routing keys used as topic names.
fn check_rabbitmq(name: &str) -> Result<(), String> {
    if let Some(c) = name.chars().find(|c| matches!(c, '#' | '*')) {
        return Err(format!(
            "{} contains `{c}`, a wildcard in RabbitMQ binding keys: the topic would receive other topics' messages",
            quote(name)
        ));
    }
    if name.starts_with("amq.") {
        return Err(format!("{} starts with `amq.`, which RabbitMQ reserves", quote(name)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_address_is_required_and_fields_that_would_be_ignored_are_refused() {
        let seed = json!({"host": "h", "port": 5672, "username": "u", "password": "p", "exchange": "e"});
        RabbitmqConnector.validate_config(&seed).unwrap();
        for field in ["queue", "routingKey"] {
            let mut with = seed.clone();
            with[field] = json!("orders");
            let (named, message) = RabbitmqConnector.validate_config(&with).unwrap_err();
            assert_eq!(named, format!("config.{field}"));
            assert!(message.contains(&format!("remove `{field}`")), "{message}");
        }
        let (field, message) = RabbitmqConnector.validate_config(&json!({"exchange": "events"})).unwrap_err();
        assert_eq!(field, "config");
        assert!(message.contains("`url`"), "{message}");
    }

    #[test]
    fn the_tls_block_is_checked() {
        RabbitmqConnector.validate_config(&json!({"host": "h", "tls": true})).unwrap();
        RabbitmqConnector
            .validate_config(
                &json!({"host": "h", "tls": {"caFile": "ca.pem", "serverName": "rabbit.internal",
                "insecureSkipVerify": false}}),
            )
            .unwrap();
        let (field, _) =
            RabbitmqConnector.validate_config(&json!({"host": "h", "tls": {"cert": "x"}})).unwrap_err();
        assert_eq!(field, "config.tls.key");
        let (field, _) = RabbitmqConnector.validate_config(&json!({"host": "h", "tls": "on"})).unwrap_err();
        assert_eq!(field, "config.tls");
    }

    #[test]
    fn wildcards_and_reserved_names_are_refused() {
        for name in ["#", "*", "a.*", "a.#.b"] {
            assert!(
                RabbitmqConnector.check_native(name).unwrap_err().contains("wildcard in RabbitMQ"),
                "{name}"
            );
        }
        assert!(RabbitmqConnector.check_native("amq.orders").unwrap_err().contains("reserves"));
        RabbitmqConnector.check_native("a/+").unwrap();
    }

    #[test]
    fn a_groups_queue_must_stay_within_255_bytes() {
        RabbitmqConnector.check_group("orders", "billing").unwrap();
        assert!(RabbitmqConnector.check_group(&"r".repeat(250), "billing").unwrap_err().contains("queue"));
    }
}
