//! JSON Schema (draft 2020-12) of broker and topic definitions, for editors validating YAML and
//! for the server's API: the envelope is derived from core's types, each env's `config` from
//! the config type of the connector that declares the env's `type`.

use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde_json::{Map, Value};

use crate::broker::{Broker, BrokerPatch};
use crate::kind::Kinds;
use crate::topic::{Topic, TopicPatch};

/// The schema of a broker definition whose envs are of the types in `kinds`: an env's `type`
/// is one of their names, and its `config` follows that type's config schema (an `if`/`then`
/// per type, so a validator names the config field that is wrong).
pub fn broker(kinds: &Kinds) -> Value {
    let mut generator = SchemaGenerator::default();
    let envs = EnvTypes::of(kinds, &mut generator);
    let mut root = generator.into_root_schema_for::<Broker>().to_value();
    if let Some(env) = root.pointer_mut("/$defs/BrokerEnv") {
        envs.apply(env);
    }
    root
}

/// The schemas of broker, topic and patch documents for the `components.schemas` of an
/// OpenAPI 3.1 document (their references point there), envs typed by `kinds`.
pub fn openapi_components(kinds: &Kinds) -> Map<String, Value> {
    let mut settings = SchemaSettings::draft2020_12();
    settings.definitions_path = "/components/schemas".into();
    settings.meta_schema = None;
    let mut generator = settings.into_generator();
    let envs = EnvTypes::of(kinds, &mut generator);
    generator.subschema_for::<Broker>();
    generator.subschema_for::<BrokerPatch>();
    generator.subschema_for::<Topic>();
    generator.subschema_for::<TopicPatch>();
    let mut components = generator.take_definitions(true);
    if let Some(env) = components.get_mut("BrokerEnv") {
        envs.apply(env);
    }
    components
}

/// The env types of a broker schema: their names, and a rule per type for `config`.
struct EnvTypes {
    names: Vec<String>,
    rules: Vec<Value>,
}

impl EnvTypes {
    fn of(kinds: &Kinds, generator: &mut SchemaGenerator) -> Self {
        let mut names = Vec::new();
        let mut rules = Vec::new();
        for kind in kinds.iter() {
            let name = kind.broker_type().as_str().to_owned();
            let config = kind.config_schema(generator);
            rules.push(
                json_schema!({
                    "if": {"properties": {"type": {"const": name}}, "required": ["type"]},
                    "then": {"properties": {"config": config}},
                })
                .to_value(),
            );
            names.push(name);
        }
        EnvTypes { names, rules }
    }

    /// Turns the derived env schema into one whose `type` and `config` follow these types.
    fn apply(self, env: &mut Value) {
        if let Some(broker_type) = env.pointer_mut("/properties/type") {
            let description = format!("The broker type: {}.", self.names.join(", "));
            *broker_type = serde_json::json!({"enum": self.names, "description": description});
        }
        if let Value::Object(env) = env {
            env.insert("allOf".to_owned(), Value::Array(self.rules));
        }
    }
}

/// The schema of a topic definition.
pub fn topic() -> Value {
    SchemaGenerator::default().into_root_schema_for::<Topic>().to_value()
}

/// An object with any fields, for a broker type whose connector does not describe its config.
pub fn any_object() -> Schema {
    json_schema!({"type": "object"})
}

/// The schema `T` derives, as a reference into `generator`'s definitions.
pub fn subschema<T: JsonSchema>(generator: &mut SchemaGenerator) -> Schema {
    generator.subschema_for::<T>()
}
