//! JSON Schema (draft 2020-12) of broker and topic definitions, for editors validating YAML and
//! for the server's API: the envelope is derived from core's types, each env's `config` from
//! the config type of the connector that declares the env's `type`.

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde_json::Value;

use crate::broker::Broker;
use crate::kind::Kinds;
use crate::topic::Topic;

/// The schema of a broker definition whose envs are of the types in `kinds`: an env's `type`
/// is one of their names, and its `config` follows that type's config schema (an `if`/`then`
/// per type, so a validator names the config field that is wrong).
pub fn broker(kinds: &Kinds) -> Value {
    let mut generator = SchemaGenerator::default();
    let mut names = Vec::new();
    let mut per_type = Vec::new();
    for kind in kinds.iter() {
        let name = kind.broker_type().as_str().to_owned();
        let config = kind.config_schema(&mut generator);
        per_type.push(json_schema!({
            "if": {"properties": {"type": {"const": name}}, "required": ["type"]},
            "then": {"properties": {"config": config}},
        }));
        names.push(name);
    }
    let mut root = generator.into_root_schema_for::<Broker>().to_value();
    if let Some(env) = root.pointer_mut("/$defs/BrokerEnv/properties/type") {
        let description = format!("The broker type: {}.", names.join(", "));
        *env = serde_json::json!({"enum": names, "description": description});
    }
    if let Some(Value::Object(env)) = root.pointer_mut("/$defs/BrokerEnv") {
        env.insert("allOf".to_owned(), Value::Array(per_type.into_iter().map(Schema::to_value).collect()));
    }
    root
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
