//! What an `mqtt` env is: its config and the rules for names used as MQTT topics.

use polybus_core::BrokerType;
use polybus_core::config::{parse, require_one};
use polybus_core::kind::{BrokerKind, FieldError};
use polybus_core::limits::quote;
use polybus_core::tls::{Tls, TlsError};
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{BROKER_TYPE, MqttConnector};

/// Topic levels the adapter keeps for itself.
const RESERVED_LEVELS: [&str; 3] = ["polybus-retry", "polybus-parked", "polybus-drain"];

/// MQTT config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
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
    /// TLS: `true` (system roots) or a block with a private CA, a client certificate, a server
    /// name or `insecureSkipVerify`; an `mqtts://` URL turns it on too.
    pub tls: Option<Tls>,
    /// Protocol version, 3 (3.1.1) or 5.
    pub version: Option<u8>,
}

impl BrokerKind for MqttConnector {
    fn broker_type(&self) -> BrokerType {
        BROKER_TYPE
    }

    fn config_schema(&self, generator: &mut SchemaGenerator) -> Schema {
        generator.subschema_for::<MqttConfig>()
    }

    fn validate_config(&self, config: &Value) -> Result<(), FieldError> {
        // Before `parse`, whose message for a bad `tls` cannot say which shape was expected.
        let tls = Tls::from_config(config).map_err(TlsError::into_field)?;
        let c: MqttConfig = parse(config)?;
        require_one(&[(c.url.is_some(), "url"), (c.host.is_some(), "host")])?;
        if let Some(block) = tls {
            block.validate().map_err(TlsError::into_field)?;
        }
        match c.version {
            Some(v) if v != 3 && v != 5 => {
                Err(("config.version".into(), format!("expected 3 or 5, got {v}")))
            }
            _ => Ok(()),
        }
    }

    fn check_native(&self, name: &str) -> Result<(), String> {
        check_mqtt(name)
    }
}

/// MQTT's rule for topic names, and the levels the adapter keeps.
fn check_mqtt(name: &str) -> Result<(), String> {
    if let Some(c) = name.chars().find(|c| matches!(c, '#' | '+')) {
        return Err(format!(
            "{} contains `{c}`, a wildcard in MQTT topic filters: the topic would receive other topics' messages",
            quote(name)
        ));
    }
    if name.starts_with('$') {
        return Err(format!("{} starts with `$`, which MQTT reserves for the broker", quote(name)));
    }
    let first = name.split('/').next().unwrap_or_default();
    if RESERVED_LEVELS.contains(&first) {
        return Err(format!("{} is under `{first}/`, a topic level polybus keeps for itself", quote(name)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_address_is_required_and_the_version_is_3_or_5() {
        MqttConnector.validate_config(&json!({"host": "127.0.0.1", "version": 5})).unwrap();
        let (field, _) = MqttConnector.validate_config(&json!({"version": 5})).unwrap_err();
        assert_eq!(field, "config");
        let (field, message) =
            MqttConnector.validate_config(&json!({"host": "h", "version": 4})).unwrap_err();
        assert_eq!((field.as_str(), message.as_str()), ("config.version", "expected 3 or 5, got 4"));
    }

    #[test]
    fn the_tls_block_is_checked() {
        MqttConnector.validate_config(&json!({"host": "h", "tls": true})).unwrap();
        MqttConnector
            .validate_config(
                &json!({"host": "h", "tls": {"caFile": "ca.pem", "serverName": "mqtt.internal"}}),
            )
            .unwrap();
        let (field, _) = MqttConnector
            .validate_config(&json!({"host": "h", "tls": {"ca": "x", "caFile": "y"}}))
            .unwrap_err();
        assert_eq!(field, "config.tls.caFile");
        let (field, _) = MqttConnector.validate_config(&json!({"host": "h", "tls": 1})).unwrap_err();
        assert_eq!(field, "config.tls");
    }

    #[test]
    fn wildcards_and_reserved_levels_are_refused() {
        for name in ["#", "+", "a/+/b", "a/#"] {
            assert!(MqttConnector.check_native(name).unwrap_err().contains("wildcard in MQTT"), "{name}");
        }
        assert!(MqttConnector.check_native("$SYS/broker").unwrap_err().contains("reserves"));
        assert!(MqttConnector.check_native("polybus-retry/x").unwrap_err().contains("keeps for itself"));
        MqttConnector.check_native("a.*").unwrap();
    }
}
