//! Broker definitions: a tag, and one typed config per env.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::error::ValidationError;
use crate::kind::Kinds;
use crate::tag::check_tag;
use crate::{limits, secret};

/// The kind of broker an env runs on: a name its connector declares (`redis`, `aws_sqs`).
///
/// Written in any case, stored in lower case.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BrokerType(Cow<'static, str>);

/// Longest broker type name.
const MAX_TYPE_CHARS: usize = 64;

impl BrokerType {
    /// A broker type named by a constant, for connectors: `BrokerType::from_static("redis")`.
    /// The name must already be a valid, lower-case type name.
    pub const fn from_static(name: &'static str) -> Self {
        BrokerType(Cow::Borrowed(name))
    }

    /// The stored (lower snake case) name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BrokerType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BrokerType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.to_ascii_lowercase();
        let plain = !lower.is_empty() && !lower.chars().any(|c| c.is_whitespace() || c.is_control());
        if !plain || lower.len() > MAX_TYPE_CHARS {
            return Err(format!(
                "{} is not a broker type name: 1 to {MAX_TYPE_CHARS} bytes, no spaces or control characters",
                limits::quote(s)
            ));
        }
        Ok(BrokerType(Cow::Owned(lower)))
    }
}

impl JsonSchema for BrokerType {
    fn schema_name() -> Cow<'static, str> {
        "BrokerType".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({"type": "string", "description": "A broker type a connector declares, e.g. `redis`."})
    }
}

impl Serialize for BrokerType {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for BrokerType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One environment of a broker: which broker type and how to reach it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BrokerEnv {
    /// Env slug, e.g. `prd`.
    pub slug: String,
    /// Broker type for this env.
    #[serde(rename = "type")]
    pub broker_type: BrokerType,
    /// Type-specific config; strings may be `${ENV_VAR}` references.
    #[serde(default = "empty_object")]
    pub config: Value,
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

/// A broker definition: one name for the product, one config per env.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Broker {
    /// Display name.
    pub name: String,
    /// Unique tag, `[a-z0-9][a-z0-9-_]*`.
    pub tag: String,
    /// Short description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The envs, each with its own broker type and config.
    pub envs: Vec<BrokerEnv>,
    /// Version, bumped by every write (0 before the first).
    #[serde(default)]
    pub version: u64,
}

impl Broker {
    /// Deserializes a broker from a parsed YAML/JSON document and checks its envelope (tag,
    /// names, env slugs); each env's config is checked by [`Broker::validate`].
    pub fn from_value(value: Value) -> Result<Self, ValidationError> {
        let broker: Broker = from_value_at(value, "")?;
        broker.validate(&Kinds::unchecked())?;
        Ok(broker)
    }

    /// Checks tag, names, env slugs, and each env's type and config through `kinds`.
    pub fn validate(&self, kinds: &Kinds) -> Result<(), ValidationError> {
        limits::check_name("name", &self.name)?;
        if let Some(description) = &self.description {
            limits::check_description("description", description)?;
        }
        check_tag(&self.tag).map_err(|e| ValidationError::field("tag", e))?;
        if self.envs.is_empty() {
            return Err(ValidationError::field("envs", "at least one env is required"));
        }
        let mut seen = HashSet::new();
        for (i, env) in self.envs.iter().enumerate() {
            check_tag(&env.slug).map_err(|e| ValidationError::field(format!("envs[{i}].slug"), e))?;
            if !seen.insert(env.slug.as_str()) {
                return Err(ValidationError::field(
                    format!("envs[{i}].slug"),
                    format!("env slug `{}` appears more than once", env.slug),
                ));
            }
            if !env.config.is_object() {
                return Err(ValidationError::in_env(&env.slug, "config", "expected an object"));
            }
            let kind = kinds
                .get(&env.broker_type)
                .map_err(|message| ValidationError::in_env(&env.slug, "type", message))?;
            if let Some(kind) = kind {
                kind.validate_config(&env.config)
                    .map_err(|(field, message)| ValidationError::in_env(&env.slug, field, message))?;
            }
        }
        Ok(())
    }

    /// The env with this slug.
    pub fn env(&self, slug: &str) -> Option<&BrokerEnv> {
        self.envs.iter().find(|e| e.slug == slug)
    }

    /// The env slugs, comma separated (for messages).
    pub fn env_slugs(&self) -> String {
        self.envs.iter().map(|e| e.slug.as_str()).collect::<Vec<_>>().join(", ")
    }

    /// A copy safe to show: literal passwords, keys and tokens replaced by `****`.
    pub fn redacted(&self) -> Broker {
        let mut copy = self.clone();
        for env in &mut copy.envs {
            secret::redact(&mut env.config);
        }
        copy
    }
}

/// A partial update of a broker: given fields replace, envs are matched by slug.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BrokerPatch {
    /// New display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// New description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Envs to replace (same slug) or add (new slug).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub envs: Vec<BrokerEnv>,
    /// Slugs of envs to remove.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove_envs: Vec<String>,
    /// The version this patch was based on; a stale one is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// Accepted and ignored so a fetched broker can be sent back as a patch; it must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

impl BrokerPatch {
    /// Deserializes a patch from a parsed YAML/JSON document.
    pub fn from_value(value: Value) -> Result<Self, ValidationError> {
        from_value_at(value, "")
    }

    /// Applies the patch to `current`, returning the result validated through `kinds`
    /// (version unchanged).
    pub fn apply(&self, current: &Broker, kinds: &Kinds) -> Result<Broker, ValidationError> {
        if let Some(tag) = &self.tag
            && tag != &current.tag
        {
            return Err(ValidationError::field(
                "tag",
                format!("a broker's tag cannot change (`{}` → `{tag}`)", current.tag),
            ));
        }
        let mut next = current.clone();
        if let Some(name) = &self.name {
            next.name = name.clone();
        }
        if let Some(description) = &self.description {
            next.description = Some(description.clone());
        }
        for slug in &self.remove_envs {
            if next.env(slug).is_none() {
                return Err(ValidationError::field(
                    "removeEnvs",
                    format!("env `{slug}` does not exist (envs: {})", current.env_slugs()),
                ));
            }
            next.envs.retain(|e| &e.slug != slug);
        }
        for env in &self.envs {
            match next.envs.iter_mut().find(|e| e.slug == env.slug) {
                Some(existing) => *existing = env.clone(),
                None => next.envs.push(env.clone()),
            }
        }
        let mut slugs = HashSet::new();
        for env in &self.envs {
            if !slugs.insert(env.slug.as_str()) {
                return Err(ValidationError::field(
                    "envs",
                    format!("env slug `{}` appears more than once", env.slug),
                ));
            }
        }
        next.validate(kinds)?;
        Ok(next)
    }
}

/// Deserializes `T`, turning a serde error into a [`ValidationError`] naming the field and env.
pub(crate) fn from_value_at<T: serde::de::DeserializeOwned>(
    value: Value,
    prefix: &str,
) -> Result<T, ValidationError> {
    let envs = value.get("envs").cloned();
    serde_path_to_error::deserialize(crate::strict::Strict(value)).map_err(|err| {
        let path = err.path().to_string();
        let message = err.inner().to_string();
        // `envs[2].config.port` → env named by its slug when the document has one.
        let (env, field) = split_env(&path, envs.as_ref());
        let field = match (prefix.is_empty(), field.as_str()) {
            (true, _) => field,
            (false, "." | "") => prefix.to_owned(),
            (false, f) => format!("{prefix}.{f}"),
        };
        let field = match (field.as_str(), crate::config::missing_field(&message)) {
            ("." | "", Some(missing)) => missing.to_owned(),
            (f, Some(missing)) if f.ends_with(&format!(".{missing}")) => f.to_owned(),
            (f, Some(missing)) if !f.contains(missing) => format!("{f}.{missing}"),
            ("." | "", None) => "document".to_owned(),
            _ => field,
        };
        let message = if secret::is_secret_field(&field) { "expected a string".to_owned() } else { message };
        ValidationError { env, field, message }
    })
}

fn split_env(path: &str, envs: Option<&Value>) -> (Option<String>, String) {
    let Some(rest) = path.strip_prefix("envs[") else { return (None, path.to_owned()) };
    let Some((index, tail)) = rest.split_once(']') else { return (None, path.to_owned()) };
    let slug =
        index.parse::<usize>().ok().and_then(|i| envs?.get(i)?.get("slug")?.as_str().map(str::to_owned));
    match slug {
        Some(slug) => (Some(slug), tail.trim_start_matches('.').to_owned()),
        None => (None, path.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kind::testing::kinds as test_kinds;
    use serde_json::json;

    fn checked(value: Value) -> Result<Broker, ValidationError> {
        let broker = Broker::from_value(value)?;
        broker.validate(&test_kinds())?;
        Ok(broker)
    }

    fn two_envs() -> Value {
        json!({
            "name": "Message Bus",
            "tag": "message-bus",
            "envs": [
                {"slug": "prd", "type": "RABBITMQ", "config": {"url": "${RABBITMQ_URL}", "exchange": "events"}},
                {"slug": "dev", "type": "redis", "config": {"host": "127.0.0.1", "port": 6379, "password": "hunter2"}}
            ]
        })
    }

    #[test]
    fn accepts_upper_case_types_and_stores_lower_case() {
        let b = checked(two_envs()).unwrap();
        assert_eq!(b.envs[0].broker_type, BrokerType::from_static("rabbitmq"));
        assert_eq!(serde_json::to_value(&b).unwrap()["envs"][0]["type"], "rabbitmq");
        assert_eq!("GOOGLE_PUBSUB".parse::<BrokerType>().unwrap(), BrokerType::from_static("google_pubsub"));
    }

    #[test]
    fn wrong_type_names_env_and_field() {
        let mut v = two_envs();
        v["envs"][1]["config"]["port"] = json!("six");
        let err = checked(v).unwrap_err();
        assert_eq!(err.env.as_deref(), Some("dev"));
        assert_eq!(err.field, "config.port");
        assert!(err.message.contains("expected"), "{err}");
    }

    #[test]
    fn missing_required_field_names_it() {
        let mut v = two_envs();
        v["envs"][0]["config"] = json!({"exchange": "events"});
        let err = checked(v).unwrap_err();
        assert_eq!(err.env.as_deref(), Some("prd"));
        assert!(err.field.contains("url") || err.message.contains("url"), "{err}");
    }

    #[test]
    fn unknown_type_is_rejected() {
        let mut v = two_envs();
        v["envs"][0]["type"] = json!("carrier-pigeon");
        let err = checked(v).unwrap_err();
        assert_eq!(err.env.as_deref(), Some("prd"));
        assert_eq!(err.field, "type");
        assert!(err.message.contains("unknown broker type"), "{err}");
    }

    #[test]
    fn duplicate_env_slugs_are_rejected() {
        let mut v = two_envs();
        v["envs"][1]["slug"] = json!("prd");
        let err = checked(v).unwrap_err();
        assert!(err.message.contains("more than once"), "{err}");
    }

    #[test]
    fn patch_replaces_adds_and_removes_envs() {
        let b = checked(two_envs()).unwrap();
        let patch = BrokerPatch::from_value(json!({
            "envs": [{"slug": "prd", "type": "KAFKA", "config": {"brokers": ["127.0.0.1:9092"]}},
                     {"slug": "local", "type": "embedded"}],
            "removeEnvs": ["dev"]
        }))
        .unwrap();
        let next = patch.apply(&b, &test_kinds()).unwrap();
        let slugs: Vec<_> = next.envs.iter().map(|e| (e.slug.as_str(), e.broker_type.as_str())).collect();
        assert_eq!(slugs, vec![("prd", "kafka"), ("local", "embedded")]);
    }

    #[test]
    fn redaction_hides_literal_secrets_only() {
        let b = checked(two_envs()).unwrap().redacted();
        assert_eq!(b.envs[1].config["password"], "****");
        assert_eq!(b.envs[0].config["url"], "${RABBITMQ_URL}");
    }

    #[test]
    fn huge_or_control_character_names_are_refused() {
        let mut v = two_envs();
        v["name"] = json!("n".repeat(65_536));
        assert_eq!(checked(v).unwrap_err().field, "name");
        let mut v = two_envs();
        v["name"] = json!("red\u{1b}[31m");
        assert_eq!(checked(v).unwrap_err().field, "name");
        let mut v = two_envs();
        v["description"] = json!("d".repeat(1 << 20));
        assert_eq!(checked(v).unwrap_err().field, "description");
    }

    #[test]
    fn arrays_in_place_of_objects_are_refused_with_the_field_named() {
        let err = checked(json!(["Bus", "bus", null, [["dev", "embedded", {}]]])).unwrap_err();
        assert!(err.message.contains("named fields"), "{err}");
        let mut v = two_envs();
        v["envs"][1] = json!(["dev", "redis", {"host": "h"}]);
        let err = checked(v).unwrap_err();
        assert_eq!(err.field, "envs[1]", "{err}");
        let mut v = two_envs();
        v["envs"][0] = json!({"slug": "k", "type": "kafka", "config": {"brokers": ["h:1"], "sasl": ["plain", "u", "p"]}});
        let err = checked(v).unwrap_err();
        assert_eq!((err.env.as_deref(), err.field.as_str()), (Some("k"), "config.sasl"), "{err}");
    }

    #[test]
    fn kafka_properties_and_odd_url_passwords_are_redacted() {
        let b = checked(json!({"name": "B", "tag": "b", "envs": [
            {"slug": "k", "type": "kafka", "config": {"brokers": ["h:9092"], "properties": {
                "sasl.password": "pw-1", "ssl.key.password": "pw-2", "sasl.jaas.config": "x password=\"pw-3\";"}}},
            {"slug": "r", "type": "rabbitmq", "config": {"url": "amqp://app:pw/4@rabbit:5672/"}}]}))
        .unwrap()
        .redacted();
        let shown = serde_json::to_string(&b).unwrap();
        assert!(!shown.contains("pw"), "{shown}");
        assert_eq!(b.envs[1].config["url"], "amqp://app:****@rabbit:5672/");
    }
}
