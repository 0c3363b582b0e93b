//! What a `google_pubsub` env is: its config and Pub/Sub's rules for topic and subscription
//! ids.

use polybus_core::config::{not_used, parse};
use polybus_core::kind::{BrokerKind, FieldError};
use polybus_core::limits::quote;
use polybus_core::names::GROUP_SEPARATOR;
use polybus_core::{BrokerType, TopicSpec, secret};
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{BROKER_TYPE, PubsubConnector};

/// Google Cloud Pub/Sub config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
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

impl BrokerKind for PubsubConnector {
    fn broker_type(&self) -> BrokerType {
        BROKER_TYPE
    }

    fn config_schema(&self, generator: &mut SchemaGenerator) -> Schema {
        generator.subschema_for::<PubsubConfig>()
    }

    fn validate_config(&self, config: &Value) -> Result<(), FieldError> {
        let c: PubsubConfig = parse(config)?;
        if c.project_id.len() < 3 && !secret::is_reference(&c.project_id) {
            return Err(("config.projectId".into(), "a project id has at least 3 characters".into()));
        }
        not_used(
            c.topic_name.is_some(),
            "topicName",
            "topics come from topic definitions (a topic env's `nativeName` names an \
                 existing Pub/Sub topic); remove `topicName`",
        )?;
        not_used(
            c.subscription_name.is_some(),
            "subscriptionName",
            "each group has its own subscription, `<topic id>--<group>`; remove \
                 `subscriptionName`",
        )?;
        Ok(())
    }

    fn check_native(&self, name: &str) -> Result<(), String> {
        check_pubsub_topic(name)
    }

    fn check_group(&self, native: &str, group: &str) -> Result<(), String> {
        let id = native.rsplit('/').next().unwrap_or(native);
        check_pubsub_id(&format!("{id}{GROUP_SEPARATOR}{group}"))
            .map_err(|e| format!("the group's subscription: {e}"))
    }

    fn describe(&self, _config: &Value, spec: &TopicSpec) -> Option<String> {
        Some(format!("subscription `{}--<group>` per group", spec.native_name))
    }
}

/// Pub/Sub's rule for a topic: an id, or `projects/<project>/topics/<id>`.
fn check_pubsub_topic(name: &str) -> Result<(), String> {
    if let Some(path) = name.strip_prefix("projects/") {
        let Some((project, id)) = path.split_once("/topics/") else {
            return Err(format!(
                "{} is neither a topic id nor `projects/<project>/topics/<id>`",
                quote(name)
            ));
        };
        let project_ok = !project.is_empty()
            && project
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.' | ':'));
        if !project_ok {
            return Err(format!("{} names no valid project", quote(name)));
        }
        return check_pubsub_id(id);
    }
    check_pubsub_id(name)
}

/// Pub/Sub's rule for topic and subscription ids.
fn check_pubsub_id(id: &str) -> Result<(), String> {
    let first_is_letter = id.chars().next().is_some_and(|c| c.is_ascii_alphabetic());
    if !first_is_letter || !(3..=255).contains(&id.len()) {
        return Err(format!(
            "{} is not a Pub/Sub name: it starts with a letter and has 3 to 255 characters",
            quote(id)
        ));
    }
    if let Some(c) =
        id.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '~' | '+' | '%')))
    {
        return Err(format!("{} contains `{c}`; Pub/Sub names are `[A-Za-z0-9-_.~+%]`", quote(id)));
    }
    if id.to_ascii_lowercase().starts_with("goog") {
        return Err(format!("{} starts with `goog`, which Pub/Sub reserves", quote(id)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_project_id_is_checked_and_fields_that_would_be_ignored_are_refused() {
        PubsubConnector.validate_config(&json!({"projectId": "proj", "keyFilename": "k.json"})).unwrap();
        for field in ["topicName", "subscriptionName"] {
            let (named, message) =
                PubsubConnector.validate_config(&json!({"projectId": "proj", field: "orders"})).unwrap_err();
            assert_eq!(named, format!("config.{field}"));
            assert!(message.contains(&format!("remove `{field}`")), "{message}");
        }
        PubsubConnector.validate_config(&json!({"projectId": "${P}"})).unwrap();
        let (field, _) = PubsubConnector.validate_config(&json!({"projectId": "ab"})).unwrap_err();
        assert_eq!(field, "config.projectId");
    }

    #[test]
    fn topic_ids_follow_pubsubs_rule() {
        let refused = |name: &str, says: &str| {
            let e = PubsubConnector.check_native(name).unwrap_err();
            assert!(e.contains(says), "{name}: {e}");
        };
        refused("1orders", "starts with a letter");
        refused("ab", "3 to 255");
        refused("google-orders", "goog");
        refused("a/b", "`/`");
        refused("projects/x/subscriptions/y", "neither");
        PubsubConnector.check_native("orders.v1~+%").unwrap();
        PubsubConnector.check_native("projects/other-project/topics/orders").unwrap();
    }

    #[test]
    fn a_groups_subscription_must_stay_legal() {
        assert!(
            PubsubConnector.check_group(&"p".repeat(250), "billing").unwrap_err().contains("subscription")
        );
        PubsubConnector.check_group("projects/p/topics/orders", "billing").unwrap();
    }
}
