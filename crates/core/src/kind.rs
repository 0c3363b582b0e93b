//! What a broker type's connector says about definitions: its name, its config, its topic
//! options, its native-name rules and the native objects a topic uses.
//!
//! Core validates the envelope (tags, envs, names, attempts); everything that depends on the
//! broker is asked of the [`BrokerKind`] that declares the env's type, through a [`Kinds`] set.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::broker::BrokerType;
use crate::topic::TopicSpec;

/// A problem in one field: `(field, message)`, the field a dotted path such as `config.port`.
pub type FieldError = (String, String);

/// A broker type as its connector describes it; everything here is synchronous and offline.
pub trait BrokerKind: Send + Sync {
    /// The name definitions use for this broker type (`"type": "redis"`).
    fn broker_type(&self) -> BrokerType;

    /// Checks an env's `config`: required fields, value types, unknown fields. The field of the
    /// error starts with `config`.
    fn validate_config(&self, config: &Value) -> Result<(), FieldError>;

    /// The JSON Schema of this type's `config`, as a subschema of `generator` (usually
    /// `generator.subschema_for::<MyConfig>()`). By default any object.
    fn config_schema(&self, generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let _ = generator;
        crate::schema::any_object()
    }

    /// Checks a topic's `options` for an env of this type. The field of the error starts with
    /// `options`. By default a broker type takes no options.
    fn validate_options(&self, options: &Map<String, Value>) -> Result<(), FieldError> {
        match options.keys().next() {
            Some(key) => Err((
                format!("options.{key}"),
                format!("unknown option `{key}`: {} takes no topic options", self.broker_type()),
            )),
            None => Ok(()),
        }
    }

    /// The options of a topic its dead-letter destination takes too (by default none).
    fn dead_letter_options(&self, options: &Map<String, Value>) -> Map<String, Value> {
        let _ = options;
        Map::new()
    }

    /// Checks a topic's native name or dead-letter destination beyond the rule every broker
    /// shares (checked by core); the error names the rule broken.
    fn check_native(&self, name: &str) -> Result<(), String> {
        let _ = name;
        Ok(())
    }

    /// Checks the names the group `group` derives on the topic `native`.
    fn check_group(&self, native: &str, group: &str) -> Result<(), String> {
        let _ = (native, group);
        Ok(())
    }

    /// The native objects a topic uses in an env with this `config`, in a line for people
    /// (`topic get`), where there is more to know than the native name.
    fn describe(&self, config: &Value, spec: &TopicSpec) -> Option<String> {
        let _ = (config, spec);
        None
    }
}

/// The broker types a registry or a bus knows, by name.
#[derive(Clone, Default)]
pub struct Kinds {
    by_type: BTreeMap<BrokerType, Arc<dyn BrokerKind>>,
    unchecked: bool,
}

impl Kinds {
    /// The set of `kinds`; a later kind of the same type replaces an earlier one.
    pub fn new(kinds: impl IntoIterator<Item = Arc<dyn BrokerKind>>) -> Self {
        let by_type = kinds.into_iter().map(|k| (k.broker_type(), k)).collect();
        Kinds { by_type, unchecked: false }
    }

    /// A set that knows no broker type and accepts every one: only the envelope of a
    /// definition is checked, each env's config and native names are left to the connector
    /// when it connects.
    pub fn unchecked() -> Self {
        Kinds { by_type: BTreeMap::new(), unchecked: true }
    }

    /// True for a set made by [`Kinds::unchecked`].
    pub fn is_unchecked(&self) -> bool {
        self.unchecked
    }

    /// Adds (or replaces) the kind for its broker type.
    pub fn insert(&mut self, kind: Arc<dyn BrokerKind>) {
        self.by_type.insert(kind.broker_type(), kind);
    }

    /// The kind of `broker_type`: `Ok(None)` when this set is unchecked and does not know it,
    /// an error naming the known types when it is checked.
    pub fn get(&self, broker_type: &BrokerType) -> Result<Option<&dyn BrokerKind>, String> {
        match self.by_type.get(broker_type) {
            Some(kind) => Ok(Some(kind.as_ref())),
            None if self.unchecked => Ok(None),
            None => Err(format!(
                "unknown broker type `{broker_type}`, expected one of {}",
                self.names().join(", ")
            )),
        }
    }

    /// The names of the known broker types, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.by_type.keys().map(BrokerType::as_str).collect()
    }

    /// The known kinds, by name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn BrokerKind>> {
        self.by_type.values()
    }
}

impl std::fmt::Debug for Kinds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kinds").field("types", &self.names()).field("unchecked", &self.unchecked).finish()
    }
}

/// Broker types for core's own tests, with rules in the style of real ones.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;

    use serde::Deserialize;
    use serde_json::{Map, Value};

    use super::{BrokerKind, FieldError, Kinds};
    use crate::broker::BrokerType;
    use crate::config::{parse, require_one};

    /// Any config with these fields (others are accepted).
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    #[allow(dead_code)]
    struct Config {
        url: Option<String>,
        host: Option<String>,
        port: Option<u16>,
        password: Option<String>,
        sasl: Option<Sasl>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Sasl {
        mechanism: String,
        username: String,
        password: String,
    }

    /// A test broker type: `address` requires `url` or `host`; `wildcards` refuses `#*>+` and
    /// names over 249 characters; `options` are the option names it takes.
    struct Test {
        name: &'static str,
        address: bool,
        wildcards: bool,
        options: &'static [&'static str],
    }

    impl BrokerKind for Test {
        fn broker_type(&self) -> BrokerType {
            BrokerType::from_static(self.name)
        }

        fn validate_config(&self, config: &Value) -> Result<(), FieldError> {
            let c: Config = parse(config)?;
            if self.address {
                require_one(&[(c.url.is_some(), "url"), (c.host.is_some(), "host")])?;
            }
            Ok(())
        }

        fn validate_options(&self, options: &Map<String, Value>) -> Result<(), FieldError> {
            match options.keys().find(|k| !self.options.contains(&k.as_str())) {
                Some(key) => Err((format!("options.{key}"), format!("unknown option `{key}`"))),
                None => Ok(()),
            }
        }

        fn check_native(&self, name: &str) -> Result<(), String> {
            if self.wildcards && name.contains(['#', '*', '>', '+']) {
                return Err(format!("`{name}` has a wildcard"));
            }
            if self.wildcards && name.chars().count() > 249 {
                return Err(format!("`{name}` is longer than 249 characters"));
            }
            Ok(())
        }
    }

    /// Test kinds named like the real broker types.
    pub(crate) fn kinds() -> Kinds {
        let kind = |name, address, wildcards, options| -> Arc<dyn BrokerKind> {
            Arc::new(Test { name, address, wildcards, options })
        };
        Kinds::new([
            kind("kafka", false, true, &["partitions"][..]),
            kind("redis", true, false, &[]),
            kind("rabbitmq", true, true, &[]),
            kind("google_pubsub", false, true, &[]),
            kind("aws_sqs", false, true, &["queueUrl", "fifo"]),
            kind("embedded", false, false, &[]),
        ])
    }
}
