//! Helpers for connectors that check an env's config: a typed parse whose errors name the
//! field (`config.port`) and never quote a secret, and the common "one of these" rule.
//!
//! Each broker type's config struct lives in its adapter crate, beside its connector.

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::secret;

/// Parses a typed config, returning `(field, message)` on error.
pub fn parse<T: DeserializeOwned>(value: &Value) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(crate::strict::Strict(value.clone())).map_err(|err| {
        let path = err.path().to_string();
        let mut field = if path == "." { "config".to_owned() } else { format!("config.{path}") };
        if let Some(missing) = missing_field(&err.inner().to_string()) {
            field = format!("{field}.{missing}");
        }
        let message = if secret::is_secret_field(&field) {
            "expected a string".to_owned()
        } else {
            err.inner().to_string()
        };
        (field, message)
    })
}

/// The field name in a serde "missing field `x`" message.
pub(crate) fn missing_field(message: &str) -> Option<&str> {
    message.strip_prefix("missing field `")?.split('`').next()
}

/// Refuses a config that has none of `present` (`(given, field name)`).
pub fn require_one(present: &[(bool, &str)]) -> Result<(), (String, String)> {
    if present.iter().any(|(p, _)| *p) {
        return Ok(());
    }
    let names: Vec<_> = present.iter().map(|(_, n)| format!("`{n}`")).collect();
    Err(("config".into(), format!("one of {} is required", names.join(" or "))))
}

/// Refuses a seed field polybus would otherwise ignore: `config.<field>`, "not used: <why>".
pub fn not_used(given: bool, field: &str, why: &str) -> Result<(), (String, String)> {
    if given { Err((format!("config.{field}"), format!("not used: {why}"))) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    #[allow(dead_code)]
    struct Example {
        host: String,
        port: Option<u16>,
        password: Option<String>,
    }

    #[test]
    fn unknown_and_missing_fields_are_named() {
        let (field, msg) = parse::<Example>(&json!({"host": "h", "hots": "x"})).unwrap_err();
        assert_eq!(field, "config.hots");
        assert!(msg.contains("unknown field `hots`"), "{msg}");
        let (field, msg) = parse::<Example>(&json!({})).unwrap_err();
        assert_eq!(field, "config.host");
        assert!(msg.contains("host"), "{msg}");
        let (field, _) = parse::<Example>(&json!({"host": "h", "port": "six"})).unwrap_err();
        assert_eq!(field, "config.port");
    }

    #[test]
    fn secret_values_never_appear_in_type_errors() {
        let (field, msg) = parse::<Example>(&json!({"host": "h", "password": 1234567})).unwrap_err();
        assert_eq!(field, "config.password");
        assert!(!msg.contains("1234567"));
    }

    #[test]
    fn one_of_several_fields_is_required() {
        require_one(&[(false, "url"), (true, "host")]).unwrap();
        let (field, msg) = require_one(&[(false, "url"), (false, "host")]).unwrap_err();
        assert_eq!((field.as_str(), msg.as_str()), ("config", "one of `url` or `host` is required"));
    }
}
