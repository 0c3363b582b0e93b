//! What an `embedded` env is: its config (the embedded broker has no rules for topic names
//! beyond the common one).

use polybus_core::BrokerType;
use polybus_core::config::parse;
use polybus_core::kind::{BrokerKind, FieldError};
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{BROKER_TYPE, EmbeddedConnector};

/// Retention of the embedded broker's log.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetentionConfig {
    /// Messages older than this many seconds may be removed.
    pub max_age_seconds: Option<u64>,
    /// At most this many messages are kept per topic.
    pub max_messages: Option<u64>,
    /// Keeps messages every group acked until the age or count above removes them, so that a
    /// group can replay them and a query finds them (default false: compacted within 30 s).
    pub keep_acked: Option<bool>,
}

/// Embedded broker config.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EmbeddedConfig {
    /// Path of the broker's SQLite file (default `polybus-broker.db`).
    pub path: Option<String>,
    /// Retention of messages; acked-by-all messages are compacted unless `keepAcked`.
    pub retention: Option<RetentionConfig>,
}

impl BrokerKind for EmbeddedConnector {
    fn broker_type(&self) -> BrokerType {
        BROKER_TYPE
    }

    fn config_schema(&self, generator: &mut SchemaGenerator) -> Schema {
        generator.subschema_for::<EmbeddedConfig>()
    }

    fn validate_config(&self, config: &Value) -> Result<(), FieldError> {
        parse::<EmbeddedConfig>(config).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_empty_config_is_valid_and_unknown_fields_are_named() {
        EmbeddedConnector.validate_config(&json!({})).unwrap();
        EmbeddedConnector.validate_config(&json!({"path": "b.db", "retention": {"maxMessages": 3}})).unwrap();
        let (field, _) = EmbeddedConnector.validate_config(&json!({"paht": "b.db"})).unwrap_err();
        assert_eq!(field, "config.paht");
        let options = json!({"fifo": true}).as_object().cloned().unwrap_or_default();
        let (field, _) = EmbeddedConnector.validate_options(&options).unwrap_err();
        assert_eq!(field, "options.fifo");
    }
}
