//! What an `aws_sqs` env is: its config, its topic options (`queueUrl`, `fifo`) and SQS's
//! rules for queue names.

use polybus_core::config::parse;
use polybus_core::kind::{BrokerKind, FieldError};
use polybus_core::limits::quote;
use polybus_core::names::check_plain;
use polybus_core::{BrokerType, TopicSpec};
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{BROKER_TYPE, SqsConnector};

/// Longest SQS queue name, `.fifo` included.
pub const MAX_SQS_CHARS: usize = 80;
/// The topic option giving the queue a topic uses as it is (no queue per group).
const QUEUE_URL: &str = "queueUrl";
/// The topic option asking for FIFO queues (the key becomes the message group).
const FIFO: &str = "fifo";

/// AWS SQS config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
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

/// The queue URL `topic` names in its options, if any.
pub(crate) fn queue_url_of(topic: &TopicSpec) -> Option<&str> {
    topic.options.get(QUEUE_URL).and_then(Value::as_str)
}

/// Whether `topic` asks for FIFO queues.
pub(crate) fn fifo_of(topic: &TopicSpec) -> bool {
    topic.options.get(FIFO).and_then(Value::as_bool).unwrap_or(false)
}

impl BrokerKind for SqsConnector {
    fn broker_type(&self) -> BrokerType {
        BROKER_TYPE
    }

    fn config_schema(&self, generator: &mut SchemaGenerator) -> Schema {
        generator.subschema_for::<SqsConfig>()
    }

    fn validate_config(&self, config: &Value) -> Result<(), FieldError> {
        parse::<SqsConfig>(config).map(|_| ())
    }

    fn validate_options(&self, options: &Map<String, Value>) -> Result<(), FieldError> {
        for (key, value) in options {
            let field = format!("options.{key}");
            match key.as_str() {
                QUEUE_URL => {
                    let url =
                        value.as_str().ok_or_else(|| (field.clone(), "expected a string".to_owned()))?;
                    check_queue_url(url)
                        .map_err(|e| (field, format!("not a valid {BROKER_TYPE} name: {e}")))?;
                }
                FIFO if value.is_boolean() => {}
                FIFO => return Err((field, "expected true or false".into())),
                _ => {
                    return Err((
                        field,
                        format!("unknown option `{key}`; SQS takes `{QUEUE_URL}` and `{FIFO}`"),
                    ));
                }
            }
        }
        Ok(())
    }

    fn check_native(&self, name: &str) -> Result<(), String> {
        check_sqs(name)
    }

    fn describe(&self, _config: &Value, spec: &TopicSpec) -> Option<String> {
        Some(match queue_url_of(spec) {
            Some(url) => format!("queue URL {url}"),
            None => format!("queue `{}--<group>` per group", spec.native_name),
        })
    }
}

/// Checks an SQS queue URL: `http(s)://host/…/<queue name>`, without credentials.
fn check_queue_url(url: &str) -> Result<(), String> {
    check_plain(url)?;
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| format!("{} is not an http:// or https:// URL", quote(url)))?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    if authority.is_empty() || authority.contains('@') {
        return Err(format!("{} must name a host, without credentials", quote(url)));
    }
    if url.contains(['?', '#']) {
        return Err(format!("{} must not have a query or fragment", quote(url)));
    }
    let name = path.trim_end_matches('/').rsplit('/').next().unwrap_or_default();
    check_sqs(name).map_err(|e| format!("its queue name: {e}"))
}

/// SQS's rule for queue names.
fn check_sqs(name: &str) -> Result<(), String> {
    let stem = name.strip_suffix(".fifo").unwrap_or(name);
    if stem.is_empty() {
        return Err(format!("{} is not an SQS queue name", quote(name)));
    }
    if let Some(c) = stem.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))) {
        return Err(format!(
            "{} contains `{c}`; SQS queue names are `[A-Za-z0-9_-]` with an optional `.fifo` end",
            quote(name)
        ));
    }
    if name.len() > MAX_SQS_CHARS {
        return Err(format!("{} is longer than SQS's {MAX_SQS_CHARS} characters", quote(name)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn options(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn the_region_is_required() {
        let seed = json!({"region": "eu-west-1", "queueUrl": "http://q", "accessKeyId": "a", "secretAccessKey": "s"});
        SqsConnector.validate_config(&seed).unwrap();
        let (field, message) = SqsConnector.validate_config(&json!({})).unwrap_err();
        assert_eq!(field, "config.region");
        assert!(message.contains("region"), "{message}");
    }

    #[test]
    fn queue_names_have_sqss_character_set_and_length() {
        SqsConnector.check_native("orders.fifo").unwrap();
        assert!(SqsConnector.check_native("orders.eu").unwrap_err().contains("[A-Za-z0-9_-]"));
        assert!(SqsConnector.check_native(&"q".repeat(81)).unwrap_err().contains("80"));
    }

    #[test]
    fn queue_urls_are_http_urls_of_a_queue() {
        check_queue_url("http://127.0.0.1:4566/000000000000/orders").unwrap();
        check_queue_url("https://sqs.eu-west-1.amazonaws.com/1/orders.fifo").unwrap();
        assert!(check_queue_url("file:///etc/passwd").unwrap_err().contains("http"));
        assert!(check_queue_url("http://u:p@h/1/q").unwrap_err().contains("credentials"));
        assert!(check_queue_url("http://h/1/q?x=1").unwrap_err().contains("query"));
        assert!(check_queue_url("http://h/1/a.b").unwrap_err().contains("queue name"));
    }

    #[test]
    fn queue_url_and_fifo_are_the_options() {
        SqsConnector
            .validate_options(&options(json!({"queueUrl": "http://h/1/orders", "fifo": true})))
            .unwrap();
        let (field, _) =
            SqsConnector.validate_options(&options(json!({"queueUrl": "file:///etc/passwd"}))).unwrap_err();
        assert_eq!(field, "options.queueUrl");
        let (field, _) = SqsConnector.validate_options(&options(json!({"fifo": "yes"}))).unwrap_err();
        assert_eq!(field, "options.fifo");
        let (field, message) = SqsConnector.validate_options(&options(json!({"partitions": 3}))).unwrap_err();
        assert_eq!(field, "options.partitions");
        assert!(message.contains("SQS takes"), "{message}");
    }
}
