//! Secrets: `${ENV_VAR}` references resolved at connect time, and redaction of literals.

use serde_json::Value;

use crate::error::Error;

pub use crate::redact::{REDACTED, is_secret_field, redact, redact_url};

/// True when the whole string is a `${VAR}` reference.
pub fn is_reference(value: &str) -> bool {
    value.starts_with("${") && value.ends_with('}') && value.len() > 3
}

/// Returns a copy of `value` with every `${VAR}` (whole or embedded) replaced by the variable's value.
pub fn resolve(value: &Value) -> Result<Value, Error> {
    resolve_at(value, "config")
}

fn resolve_at(value: &Value, path: &str) -> Result<Value, Error> {
    Ok(match value {
        Value::String(s) => Value::String(resolve_str(s, path)?),
        Value::Array(items) => Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, v)| resolve_at(v, &format!("{path}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), resolve_at(v, &format!("{path}.{k}"))?)))
                .collect::<Result<_, Error>>()?,
        ),
        other => other.clone(),
    })
}

fn resolve_str(s: &str, field: &str) -> Result<String, Error> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            return Ok(out);
        };
        let var = &after[..end];
        let value = std::env::var(var)
            .map_err(|_| Error::MissingSecret { var: var.to_owned(), field: field.to_owned() })?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn urls_lose_their_password() {
        assert_eq!(redact_url("amqp://guest:guest@h:5672/vh").unwrap(), "amqp://guest:****@h:5672/vh");
        assert_eq!(redact_url("amqp://h:5672"), None);
        assert_eq!(redact_url("amqp://u:${P}@h"), None);
        let mut v = json!({"url": "redis://:pw@h:6379", "sasl": {"password": "x"}, "token": "${T}"});
        redact(&mut v);
        assert_eq!(v, json!({"url": "redis://:****@h:6379", "sasl": {"password": "****"}, "token": "${T}"}));
    }

    #[test]
    fn missing_variables_are_named_without_values() {
        let err = resolve(&json!({"password": "${POLYBUS_TEST_SURELY_UNSET}"})).unwrap_err();
        assert_eq!(err.code(), "SECRET_MISSING");
        assert!(err.to_string().contains("config.password"));
        let ok = resolve(&json!({"url": "amqp://u:${PATH}@h", "n": 1})).unwrap();
        assert!(!ok["url"].as_str().unwrap().contains("${"));
        assert_eq!(ok["n"], 1);
    }
}
