//! What a `nats` env is: its config and the rules for names used as subjects.

use polybus_core::BrokerType;
use polybus_core::config::parse;
use polybus_core::kind::{BrokerKind, FieldError};
use polybus_core::limits::quote;
use polybus_core::tls::{Tls, TlsError};
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{BROKER_TYPE, NatsConnector};

/// One string or a list of them (`servers: "nats://a"` or `servers: [..]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
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

/// NATS JetStream config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
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
    /// TLS: `true` (system roots) or a block with a private CA, a client certificate, a server
    /// name or `insecureSkipVerify`; a `tls://` server URL turns it on too (system roots).
    pub tls: Option<Tls>,
}

impl BrokerKind for NatsConnector {
    fn broker_type(&self) -> BrokerType {
        BROKER_TYPE
    }

    fn config_schema(&self, generator: &mut SchemaGenerator) -> Schema {
        generator.subschema_for::<NatsConfig>()
    }

    fn validate_config(&self, config: &Value) -> Result<(), FieldError> {
        // Before `parse`, whose message for a bad `tls` cannot say which shape was expected.
        let tls = Tls::from_config(config).map_err(TlsError::into_field)?;
        let c: NatsConfig = parse(config)?;
        if c.servers.to_vec().is_empty() {
            return Err(("config.servers".into(), "at least one server URL is required".into()));
        }
        if let Some(block) = tls {
            block.validate().map_err(TlsError::into_field)?;
        }
        Ok(())
    }

    fn check_native(&self, name: &str) -> Result<(), String> {
        check_nats(name)
    }
}

/// NATS's rule for subjects used as topic names.
fn check_nats(name: &str) -> Result<(), String> {
    if let Some(c) = name.chars().find(|c| matches!(c, '*' | '>')) {
        return Err(format!(
            "{} contains `{c}`, a wildcard in NATS subjects: the topic would receive other topics' messages",
            quote(name)
        ));
    }
    if name.split('.').any(str::is_empty) {
        return Err(format!(
            "{} has an empty subject token: no leading, trailing or doubled `.` in NATS",
            quote(name)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn servers_are_one_or_many_and_required() {
        NatsConnector
            .validate_config(&json!({"servers": ["nats://127.0.0.1:4222"], "maxReconnectAttempts": 3}))
            .unwrap();
        NatsConnector.validate_config(&json!({"servers": "nats://a:4222, nats://b:4222"})).unwrap();
        let (field, _) = NatsConnector.validate_config(&json!({"servers": []})).unwrap_err();
        assert_eq!(field, "config.servers");
    }

    #[test]
    fn the_tls_block_is_checked() {
        let servers = "tls://h:4222";
        NatsConnector.validate_config(&json!({"servers": servers, "tls": true})).unwrap();
        NatsConnector
            .validate_config(
                &json!({"servers": servers, "tls": {"caFile": "ca.pem", "serverName": "nats.internal"}}),
            )
            .unwrap();
        let (field, message) =
            NatsConnector.validate_config(&json!({"servers": servers, "tls": {"keyFile": "k"}})).unwrap_err();
        assert_eq!(field, "config.tls.cert");
        assert!(message.contains("needs its certificate"), "{message}");
        let (field, _) = NatsConnector
            .validate_config(&json!({"servers": servers, "tls": {"verify": false}}))
            .unwrap_err();
        assert_eq!(field, "config.tls");
    }

    #[test]
    fn wildcards_and_empty_tokens_are_refused() {
        for name in ["*", ">", "a.*", "a.>"] {
            assert!(NatsConnector.check_native(name).unwrap_err().contains("wildcard in NATS"), "{name}");
        }
        for name in [".a", "a.", "a..b"] {
            assert!(NatsConnector.check_native(name).unwrap_err().contains("empty subject token"), "{name}");
        }
        NatsConnector.check_native("orders.eu").unwrap();
    }
}
