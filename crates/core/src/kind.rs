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
