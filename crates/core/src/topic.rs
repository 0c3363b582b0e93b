//! Topics: `broker-tag:topic-tag`, with optional per-env native names and settings.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::broker::{Broker, BrokerType, from_value_at};
use crate::error::ValidationError;
use crate::kind::Kinds;
use crate::tag::EventRef;
use crate::{limits, names};

/// Attempts before a message is dead-lettered, unless the topic says otherwise.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;

/// How long an idempotency key holds, unless the topic says otherwise: 24 hours.
pub const DEFAULT_IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// Shortest `idempotencyWindow`: 1 second.
pub const MIN_IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(1);
/// Longest `idempotencyWindow`: 30 days.
pub const MAX_IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(30 * 24 * 3600);

/// Parses an `idempotencyWindow` (`24h`, `90m`, `7d`, `1h 30m`) and checks its bounds.
pub fn parse_idempotency_window(text: &str) -> Result<Duration, ValidationError> {
    let invalid = |why: String| ValidationError::field("idempotencyWindow", why);
    let window = humantime::parse_duration(text.trim()).map_err(|e| {
        invalid(format!("{} is not a duration like `24h`, `30m` or `7d`: {e}", limits::quote(text)))
    })?;
    if !(MIN_IDEMPOTENCY_WINDOW..=MAX_IDEMPOTENCY_WINDOW).contains(&window) {
        return Err(invalid(format!(
            "{} is out of range: from 1s to 30d",
            humantime::format_duration(window)
        )));
    }
    Ok(window)
}

/// Per-env settings of a topic.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", try_from = "TopicEnvDoc")]
pub struct TopicEnv {
    /// Env slug of the topic's broker.
    pub slug: String,
    /// Name on the broker (default: the topic tag).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub native_name: Option<String>,
    /// Settings of the env's broker type (`fifo` on SQS, `partitions` on Kafka…), checked by
    /// its connector.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub options: Map<String, Value>,
}

/// A topic env as written: the per-broker fields of earlier versions are still read, into
/// `nativeName` and `options`.
#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TopicEnvDoc {
    /// Env slug of the topic's broker.
    slug: String,
    /// Name on the broker (default: the topic tag).
    #[serde(default)]
    native_name: Option<String>,
    /// Settings of the env's broker type: `partitions` on Kafka, `queueUrl` and `fifo` on SQS.
    #[serde(default)]
    options: Map<String, Value>,
    /// Pub/Sub's name for the native name.
    #[serde(default)]
    topic_name: Option<String>,
    /// SQS: now `options.queueUrl`.
    #[serde(default)]
    queue_url: Option<String>,
    /// SQS: now `options.fifo`.
    #[serde(default)]
    fifo: Option<bool>,
    /// Kafka: now `options.partitions`.
    #[serde(default)]
    partitions: Option<i64>,
}

impl TryFrom<TopicEnvDoc> for TopicEnv {
    type Error = String;

    fn try_from(doc: TopicEnvDoc) -> Result<Self, String> {
        let native_name = match (doc.native_name, doc.topic_name) {
            (Some(native), Some(topic)) if native != topic => {
                return Err(format!(
                    "`topicName` ({}) and `nativeName` ({}) differ: write `nativeName` only",
                    limits::quote(&topic),
                    limits::quote(&native)
                ));
            }
            (native, topic) => native.or(topic),
        };
        let mut options = doc.options;
        let legacy = [
            ("queueUrl", doc.queue_url.map(Value::from)),
            ("fifo", doc.fifo.map(Value::from)),
            ("partitions", doc.partitions.map(Value::from)),
        ];
        for (key, value) in legacy {
            let Some(value) = value else { continue };
            if options.get(key).is_some_and(|v| v != &value) {
                return Err(format!("`{key}` and `options.{key}` differ: write `options.{key}` only"));
            }
            options.insert(key.to_owned(), value);
        }
        Ok(TopicEnv { slug: doc.slug, native_name, options })
    }
}

/// The seed's SQS form: `queueUrl: [{ env_slug, url }]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QueueUrl {
    /// Env slug.
    pub env_slug: String,
    /// Queue URL.
    pub url: String,
}

/// A topic definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Topic {
    /// Display name (default: the topic tag).
    #[serde(default)]
    pub name: String,
    /// The event, `broker-tag:topic-tag`.
    pub tag: String,
    /// The broker's tag (optional; must match the event's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_broker_tag: Option<String>,
    /// Short description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Deliveries before a message goes to the dead-letter destination (default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Native name of the dead-letter destination (default `<native>-dlq`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<String>,
    /// How long a message published with an idempotency key keeps later publishes with the
    /// same key from being delivered, e.g. `24h`, `30m`, `7d` (1s to 30d; default 24h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_window: Option<String>,
    /// Per-env overrides.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub envs: Vec<TopicEnv>,
    /// The seed's per-env SQS queue URLs (merged into `envs` as `options.queueUrl`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_url: Option<Vec<QueueUrl>>,
    /// An example payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample: Option<Value>,
    /// Version, bumped by every write.
    #[serde(default)]
    pub version: u64,
}

impl Topic {
    /// Deserializes a topic from a parsed YAML/JSON document and normalises it (no broker checks).
    pub fn from_value(value: Value) -> Result<Self, ValidationError> {
        let mut topic: Topic = from_value_at(value, "")?;
        topic.normalise()?;
        Ok(topic)
    }

    fn normalise(&mut self) -> Result<(), ValidationError> {
        let event = self.event()?;
        if self.name.trim().is_empty() {
            self.name = event.topic.clone();
        }
        if let Some(urls) = self.queue_url.take() {
            for QueueUrl { env_slug, url } in urls {
                let env = match self.envs.iter().position(|e| e.slug == env_slug) {
                    Some(i) => &mut self.envs[i],
                    None => {
                        self.envs.push(TopicEnv { slug: env_slug, ..Default::default() });
                        self.envs.last_mut().expect("just pushed")
                    }
                };
                env.options.insert("queueUrl".into(), Value::String(url));
            }
        }
        Ok(())
    }

    /// The parsed event address.
    pub fn event(&self) -> Result<EventRef, ValidationError> {
        EventRef::parse_field(&self.tag, "tag")
    }

    /// Checks the topic against its broker: tags, env slugs, settings, and native names through
    /// the kinds of the broker's envs.
    pub fn validate(&self, broker: &Broker, kinds: &Kinds) -> Result<(), ValidationError> {
        let event = self.event()?;
        if event.broker != broker.tag {
            return Err(ValidationError::field("tag", format!("broker part must be `{}`", broker.tag)));
        }
        if let Some(tag) = &self.message_broker_tag
            && tag != &event.broker
        {
            return Err(ValidationError::field(
                "messageBrokerTag",
                format!("`{tag}` does not match the event's broker `{}`", event.broker),
            ));
        }
        if self.max_attempts == Some(0) {
            return Err(ValidationError::field("maxAttempts", "must be at least 1"));
        }
        if let Some(window) = &self.idempotency_window {
            parse_idempotency_window(window)?;
        }
        if !self.name.is_empty() {
            limits::check_name("name", &self.name)?;
        }
        if let Some(description) = &self.description {
            limits::check_description("description", description)?;
        }
        let mut seen = std::collections::HashSet::new();
        for (i, env) in self.envs.iter().enumerate() {
            if broker.env(&env.slug).is_none() {
                return Err(ValidationError::field(
                    format!("envs[{i}].slug"),
                    format!(
                        "broker `{}` has no env `{}` (envs: {})",
                        broker.tag,
                        env.slug,
                        broker.env_slugs()
                    ),
                ));
            }
            if !seen.insert(env.slug.as_str()) {
                return Err(ValidationError::field(
                    format!("envs[{i}].slug"),
                    format!("env slug `{}` appears more than once", env.slug),
                ));
            }
            let broker_type = broker.env(&env.slug).map(|e| &e.broker_type);
            let kind = match broker_type {
                Some(t) => kinds.get(t).map_err(|e| ValidationError::in_env(&env.slug, "type", e))?,
                None => None,
            };
            if let Some(kind) = kind {
                kind.validate_options(&env.options)
                    .map_err(|(field, message)| ValidationError::in_env(&env.slug, field, message))?;
            }
        }
        for env in &broker.envs {
            self.check_native_names(&env.slug, &env.broker_type, kinds)?;
        }
        Ok(())
    }

    /// Checks every native name this topic uses in `env` against the rules every broker shares
    /// and those of `broker_type`'s kind in `kinds`.
    pub fn check_native_names(
        &self,
        env: &str,
        broker_type: &BrokerType,
        kinds: &Kinds,
    ) -> Result<(), ValidationError> {
        let kind = kinds.get(broker_type).map_err(|e| ValidationError::in_env(env, "type", e))?;
        let check = |name: &str| {
            names::check_plain(name)?;
            kind.map_or(Ok(()), |k| k.check_native(name))
        };
        let invalid = |field: &str, e: String| {
            ValidationError::in_env(env, field, format!("not a valid {broker_type} name: {e}"))
        };
        let named = self.envs.iter().find(|e| e.slug == env).and_then(|o| o.native_name.as_ref());
        if let Some(name) = named {
            check(name).map_err(|e| invalid("nativeName", e))?;
        }
        let spec = self.spec(env)?;
        if named.is_none() {
            check(&spec.native_name)
                .map_err(|e| invalid("tag", format!("{e}; set `nativeName` for this env")))?;
        }
        check(&spec.dead_letter).map_err(|e| match &self.dead_letter {
            Some(_) => invalid("deadLetter", e),
            None => invalid("deadLetter", format!("the default `<native>-dlq`: {e}; set `deadLetter`")),
        })
    }

    /// What an adapter needs to know about this topic in `env`.
    pub fn spec(&self, env: &str) -> Result<TopicSpec, ValidationError> {
        let event = self.event()?;
        let overrides = self.envs.iter().find(|e| e.slug == env).cloned().unwrap_or_default();
        let native_name = overrides.native_name.clone().unwrap_or_else(|| event.topic.clone());
        let dead_letter = self.dead_letter.clone().unwrap_or_else(|| format!("{native_name}-dlq"));
        let idempotency_window = match &self.idempotency_window {
            Some(window) => parse_idempotency_window(window)?,
            None => DEFAULT_IDEMPOTENCY_WINDOW,
        };
        Ok(TopicSpec {
            event: self.tag.clone(),
            native_name,
            dead_letter,
            max_attempts: self.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS),
            idempotency_window,
            options: overrides.options,
        })
    }
}

/// A partial update of a topic.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TopicPatch {
    /// New display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// New description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// New attempt limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// New dead-letter native name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<String>,
    /// New idempotency window, e.g. `24h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_window: Option<String>,
    /// Env overrides to replace (same slug) or add.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub envs: Vec<TopicEnv>,
    /// Env overrides to remove.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove_envs: Vec<String>,
    /// New sample payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample: Option<Value>,
    /// The version this patch was based on; a stale one is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// Accepted so a fetched topic can be sent back; it must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Accepted so a fetched topic can be sent back; it must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_broker_tag: Option<String>,
}

impl TopicPatch {
    /// Deserializes a patch from a parsed YAML/JSON document.
    pub fn from_value(value: Value) -> Result<Self, ValidationError> {
        from_value_at(value, "")
    }

    /// Applies the patch to `current` and validates the result against `broker` through `kinds`.
    pub fn apply(&self, current: &Topic, broker: &Broker, kinds: &Kinds) -> Result<Topic, ValidationError> {
        if let Some(tag) = &self.tag
            && tag != &current.tag
        {
            return Err(ValidationError::field(
                "tag",
                format!("a topic's tag cannot change (`{}`)", current.tag),
            ));
        }
        let mut next = current.clone();
        if let Some(v) = &self.name {
            // Blank is the default name, as when the topic is created.
            next.name = if v.trim().is_empty() { current.event()?.topic } else { v.clone() };
        }
        if let Some(v) = &self.description {
            next.description = Some(v.clone());
        }
        if let Some(v) = self.max_attempts {
            next.max_attempts = Some(v);
        }
        if let Some(v) = &self.dead_letter {
            next.dead_letter = Some(v.clone());
        }
        if let Some(v) = &self.idempotency_window {
            next.idempotency_window = Some(v.clone());
        }
        if let Some(v) = &self.sample {
            next.sample = Some(v.clone());
        }
        if let Some(v) = &self.message_broker_tag {
            next.message_broker_tag = Some(v.clone());
        }
        for slug in &self.remove_envs {
            next.envs.retain(|e| &e.slug != slug);
        }
        for env in &self.envs {
            match next.envs.iter_mut().find(|e| e.slug == env.slug) {
                Some(existing) => *existing = env.clone(),
                None => next.envs.push(env.clone()),
            }
        }
        next.validate(broker, kinds)?;
        Ok(next)
    }
}

/// A topic as resolved for one env: what an adapter publishes to and consumes from.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicSpec {
    /// The event, `broker:topic`.
    pub event: String,
    /// Name on the broker.
    pub native_name: String,
    /// Native name of the dead-letter destination.
    pub dead_letter: String,
    /// Deliveries before dead-lettering.
    pub max_attempts: u32,
    /// How long an idempotency key keeps later publishes with it from being delivered.
    pub idempotency_window: Duration,
    /// The topic's options in this env, as its connector validated them.
    pub options: Map<String, Value>,
}

impl TopicSpec {
    /// A spec for a bare native name with defaults (used for dead-letter destinations and tests).
    pub fn named(native_name: impl Into<String>) -> Self {
        let native_name = native_name.into();
        TopicSpec {
            event: native_name.clone(),
            dead_letter: format!("{native_name}-dlq"),
            native_name,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            idempotency_window: DEFAULT_IDEMPOTENCY_WINDOW,
            options: Map::new(),
        }
    }

    /// The spec of this topic's dead-letter destination, with `options` (those of the topic
    /// its connector carries over, [`crate::BrokerKind::dead_letter_options`]).
    pub fn dead_letter_spec(&self, options: Map<String, Value>) -> TopicSpec {
        let mut spec = TopicSpec::named(self.dead_letter.clone());
        spec.event = format!("{} (dead letters)", self.event);
        spec.options = options;
        spec
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kind::testing::kinds as test_kinds;
    use serde_json::json;

    fn broker() -> Broker {
        Broker::from_value(json!({"name": "B", "tag": "message-bus", "envs": [
            {"slug": "prd", "type": "aws_sqs", "config": {"region": "eu-west-1"}},
            {"slug": "dev", "type": "embedded"}]}))
        .unwrap()
    }

    #[test]
    fn seed_queue_urls_become_env_overrides() {
        let t = Topic::from_value(json!({"tag": "message-bus:orders",
            "queueUrl": [{"env_slug": "prd", "url": "http://q/orders"}]}))
        .unwrap();
        t.validate(&broker(), &test_kinds()).unwrap();
        assert_eq!(t.name, "orders");
        assert_eq!(t.spec("prd").unwrap().options["queueUrl"], "http://q/orders");
        let dev = t.spec("dev").unwrap();
        assert_eq!((dev.native_name.as_str(), dev.dead_letter.as_str()), ("orders", "orders-dlq"));
    }

    #[test]
    fn per_broker_fields_of_earlier_versions_are_read_into_options() {
        let t = Topic::from_value(json!({"tag": "message-bus:orders", "envs": [
            {"slug": "prd", "fifo": true, "partitions": 3, "queueUrl": "http://q/1/orders"},
            {"slug": "dev", "topicName": "orders-v2"}]}))
        .unwrap();
        let prd = t.spec("prd").unwrap();
        assert_eq!(
            serde_json::Value::Object(prd.options),
            json!({"fifo": true, "partitions": 3, "queueUrl": "http://q/1/orders"})
        );
        assert_eq!(t.spec("dev").unwrap().native_name, "orders-v2");
        let stored = serde_json::to_value(&t).unwrap();
        assert_eq!(stored["envs"][1], json!({"slug": "dev", "nativeName": "orders-v2"}));
        let err = Topic::from_value(json!({"tag": "message-bus:orders", "envs": [
            {"slug": "prd", "fifo": true, "options": {"fifo": false}}]}))
        .unwrap_err();
        assert!(err.message.contains("write `options.fifo` only"), "{err}");
    }

    #[test]
    fn a_blank_name_in_a_patch_is_the_default_name_as_on_creation() {
        // Found by fuzzing: the patched topic kept `""`, and read back it was `orders`.
        let t = Topic::from_value(json!({"tag": "message-bus:orders", "name": "Orders"})).unwrap();
        let patched = TopicPatch::from_value(json!({"name": " "}))
            .unwrap()
            .apply(&t, &broker(), &test_kinds())
            .unwrap();
        assert_eq!(patched.name, "orders");
        assert_eq!(Topic::from_value(serde_json::to_value(&patched).unwrap()).unwrap(), patched);
    }

    #[test]
    fn topic_of_another_broker_or_unknown_env_is_refused() {
        let t = Topic::from_value(json!({"tag": "other:orders"})).unwrap();
        assert_eq!(t.validate(&broker(), &test_kinds()).unwrap_err().field, "tag");
        let t = Topic::from_value(json!({"tag": "message-bus:orders", "envs": [{"slug": "stg"}]})).unwrap();
        assert!(t.validate(&broker(), &test_kinds()).unwrap_err().message.contains("no env `stg`"));
    }

    fn on(broker_type: &str) -> Broker {
        Broker::from_value(json!({"name": "B", "tag": "bus", "envs": [
        {"slug": "dev", "type": "embedded"},
        {"slug": "prd", "type": broker_type, "config": match broker_type {
            "rabbitmq" => json!({"url": "amqp://127.0.0.1"}),
            "nats" => json!({"servers": "nats://127.0.0.1"}),
            "mqtt" => json!({"host": "127.0.0.1"}),
            "kafka" => json!({"brokers": ["127.0.0.1:9092"]}),
            "google_pubsub" => json!({"projectId": "proj"}),
            "aws_sqs" => json!({"region": "eu-west-1"}),
            _ => json!({"host": "127.0.0.1"}),
        }}]}))
        .unwrap()
    }

    fn in_prd(overrides: Value) -> Topic {
        let mut env = json!({"slug": "prd"});
        env.as_object_mut().unwrap().extend(overrides.as_object().unwrap().clone());
        Topic::from_value(json!({"tag": "bus:orders", "envs": [env]})).unwrap()
    }

    #[test]
    fn wildcard_native_names_are_refused_naming_env_field_and_rule() {
        for (broker_type, name) in
            [("rabbitmq", "#"), ("rabbitmq", "a.*"), ("kafka", ">"), ("aws_sqs", "a/+")]
        {
            let err =
                in_prd(json!({"nativeName": name})).validate(&on(broker_type), &test_kinds()).unwrap_err();
            assert_eq!((err.env.as_deref(), err.field.as_str()), (Some("prd"), "nativeName"), "{err}");
            assert!(err.message.contains("wildcard"), "{broker_type} {name}: {err}");
        }
        // The same names are plain on the embedded env of the same broker.
        let t =
            Topic::from_value(json!({"tag": "bus:orders", "envs": [{"slug": "dev", "nativeName": "a.*"}]}))
                .unwrap();
        t.validate(&on("rabbitmq"), &test_kinds()).unwrap();
    }

    #[test]
    fn topic_name_and_dead_letter_are_validated_per_broker() {
        for bad in ["with space", "nul\u{0}", "#"] {
            let err =
                in_prd(json!({"topicName": bad})).validate(&on("google_pubsub"), &test_kinds()).unwrap_err();
            assert_eq!((err.env.as_deref(), err.field.as_str()), (Some("prd"), "nativeName"), "{err}");
        }
        let mut t = in_prd(json!({}));
        t.dead_letter = Some("#".into());
        let err = t.validate(&on("rabbitmq"), &test_kinds()).unwrap_err();
        assert_eq!((err.env.as_deref(), err.field.as_str()), (Some("prd"), "deadLetter"), "{err}");
        let t = in_prd(json!({"nativeName": "k".repeat(249)}));
        let err = t.validate(&on("kafka"), &test_kinds()).unwrap_err();
        assert!(err.field == "deadLetter" && err.message.contains("default"), "{err}");
    }

    #[test]
    fn idempotency_window_defaults_to_a_day_and_is_bounded() {
        let t = Topic::from_value(json!({"tag": "bus:orders"})).unwrap();
        assert_eq!(t.spec("dev").unwrap().idempotency_window, DEFAULT_IDEMPOTENCY_WINDOW);
        let t = Topic::from_value(json!({"tag": "bus:orders", "idempotencyWindow": "90m"})).unwrap();
        t.validate(&on("redis"), &test_kinds()).unwrap();
        assert_eq!(t.spec("dev").unwrap().idempotency_window, Duration::from_secs(90 * 60));
        for bad in ["0s", "500ms", "31d", "soon", ""] {
            let t = Topic::from_value(json!({"tag": "bus:orders", "idempotencyWindow": bad})).unwrap();
            let err = t.validate(&on("redis"), &test_kinds()).unwrap_err();
            assert_eq!(err.field, "idempotencyWindow", "{bad}: {err}");
        }
        let patch = TopicPatch::from_value(json!({"idempotencyWindow": "1h"})).unwrap();
        let patched = patch.apply(&t_plain(), &on("redis"), &test_kinds()).unwrap();
        assert_eq!(patched.idempotency_window.as_deref(), Some("1h"));
        let patch = TopicPatch::from_value(json!({"idempotencyWindow": "0s"})).unwrap();
        assert_eq!(
            patch.apply(&t_plain(), &on("redis"), &test_kinds()).unwrap_err().field,
            "idempotencyWindow"
        );
    }

    fn t_plain() -> Topic {
        Topic::from_value(json!({"tag": "bus:orders"})).unwrap()
    }

    #[test]
    fn names_and_descriptions_are_bounded() {
        let mut t = Topic::from_value(json!({"tag": "bus:orders"})).unwrap();
        t.name = "n".repeat(65_536);
        assert_eq!(t.validate(&on("redis"), &test_kinds()).unwrap_err().field, "name");
        t.name = "Orders".into();
        t.description = Some("\u{1b}]0;owned\u{7}".into());
        assert_eq!(t.validate(&on("redis"), &test_kinds()).unwrap_err().field, "description");
    }
}
