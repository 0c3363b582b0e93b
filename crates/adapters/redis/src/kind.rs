//! What a `redis` env is: its config (Redis has no rules for stream names beyond the common
//! one).

use polybus_core::config::{not_used, parse, require_one};
use polybus_core::kind::{BrokerKind, FieldError};
use polybus_core::tls::{Tls, TlsBlock, TlsError};
use polybus_core::{BrokerType, TopicSpec};
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{BROKER_TYPE, RedisConnector};

/// How the Redis adapter uses Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    /// Streams with consumer groups (at-least-once, the default).
    Streams,
    /// Plain PUBLISH/SUBSCRIBE (at-most-once).
    Pubsub,
}

/// Redis config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
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
    /// TLS: `true` (system roots) or a block with a private CA, a client certificate or
    /// `insecureSkipVerify`; a `rediss://` URL turns it on too.
    pub tls: Option<Tls>,
    /// The seed's channel field (refused: topics come from topic definitions).
    pub channel: Option<String>,
    /// Streams (default) or plain Pub/Sub.
    pub mode: Option<RedisMode>,
    /// Approximate maximum stream length (`MAXLEN ~`).
    pub max_len: Option<u64>,
}

impl BrokerKind for RedisConnector {
    fn broker_type(&self) -> BrokerType {
        BROKER_TYPE
    }

    fn config_schema(&self, generator: &mut SchemaGenerator) -> Schema {
        generator.subschema_for::<RedisConfig>()
    }

    fn validate_config(&self, config: &Value) -> Result<(), FieldError> {
        // Before `parse`, whose message for a bad `tls` cannot say which shape was expected.
        let tls = Tls::from_config(config).map_err(TlsError::into_field)?;
        let c: RedisConfig = parse(config)?;
        require_one(&[(c.url.is_some(), "url"), (c.host.is_some(), "host")])?;
        not_used(
            c.channel.is_some(),
            "channel",
            "topics come from topic definitions, each a stream named by its `nativeName`; \
                 remove `channel`",
        )?;
        if c.mode == Some(RedisMode::Pubsub) {
            return Err((
                "config.mode".into(),
                "`pubsub` (at-most-once PUBLISH/SUBSCRIBE) is not available: this adapter runs on streams \
                 with consumer groups; remove `mode` or write `streams`"
                    .into(),
            ));
        }
        if let Some(block) = tls {
            check_tls(&block).map_err(TlsError::into_field)?;
        }
        Ok(())
    }

    fn describe(&self, _config: &Value, spec: &TopicSpec) -> Option<String> {
        Some(format!("stream `{}`", spec.native_name))
    }
}

/// The TLS block's shape, and what the Redis client cannot do with it.
pub(crate) fn check_tls(block: &TlsBlock) -> Result<(), TlsError> {
    block.validate()?;
    if block.server_name.is_some() {
        return Err(TlsError {
            field: "tls.serverName".into(),
            reason: "the Redis client checks the server's certificate against the host it connects to \
                     and cannot check another name; connect by a name the certificate holds (`host` or \
                     the URL's host) and remove `serverName`"
                .into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_address_is_required_and_fields_are_named() {
        RedisConnector
            .validate_config(&json!({"host": "h", "port": 6379, "password": "${P}", "mode": "streams"}))
            .unwrap();
        let (field, message) =
            RedisConnector.validate_config(&json!({"host": "h", "channel": "c"})).unwrap_err();
        assert_eq!(field, "config.channel");
        assert!(message.contains("remove `channel`"), "{message}");
        let (field, message) =
            RedisConnector.validate_config(&json!({"host": "h", "mode": "pubsub"})).unwrap_err();
        assert_eq!(field, "config.mode");
        assert!(message.contains("write `streams`"), "{message}");
        let (field, message) = RedisConnector.validate_config(&json!({"port": 6379})).unwrap_err();
        assert_eq!((field.as_str(), message.as_str()), ("config", "one of `url` or `host` is required"));
        let (field, message) = RedisConnector.validate_config(&json!({"hots": "x"})).unwrap_err();
        assert_eq!(field, "config.hots");
        assert!(message.contains("unknown field `hots`"), "{message}");
        let (field, message) =
            RedisConnector.validate_config(&json!({"host": "h", "password": 1234567})).unwrap_err();
        assert_eq!(field, "config.password");
        assert!(!message.contains("1234567"), "{message}");
    }

    #[test]
    fn the_tls_block_is_checked_and_a_server_name_refused() {
        RedisConnector.validate_config(&json!({"host": "h", "tls": true})).unwrap();
        RedisConnector
            .validate_config(&json!({"host": "h", "tls": {"caFile": "ca.pem", "certFile": "c.pem",
                "keyFile": "c.key", "insecureSkipVerify": false}}))
            .unwrap();
        let (field, message) =
            RedisConnector.validate_config(&json!({"host": "h", "tls": {"certFile": "c.pem"}})).unwrap_err();
        assert_eq!(field, "config.tls.key");
        assert!(message.contains("needs its key"), "{message}");
        let (field, message) = RedisConnector
            .validate_config(&json!({"host": "h", "tls": {"serverName": "redis.internal"}}))
            .unwrap_err();
        assert_eq!(field, "config.tls.serverName");
        assert!(message.contains("cannot check another name"), "{message}");
        let (field, message) =
            RedisConnector.validate_config(&json!({"host": "h", "tls": {"caFiles": "x"}})).unwrap_err();
        assert_eq!(field, "config.tls");
        assert!(message.contains("caFile/ca"), "{message}");
    }

    #[test]
    fn stream_names_follow_the_common_rule_only() {
        RedisConnector.check_native("a.*").unwrap();
        RedisConnector.check_native("a/+#").unwrap();
    }
}
