//! Secrets: `${ENV_VAR}` and `$Secret{name}` references resolved at connect time, and
//! redaction of literals.

use serde_json::Value;

use crate::error::Error;
pub use crate::scrub::Scrubber;

pub use crate::redact::{REDACTED, is_secret_field, redact, redact_url};

/// True when the whole string is one `${VAR}` or `$Secret{name}` reference.
pub fn is_reference(value: &str) -> bool {
    matches!(pieces(value).as_slice(), [Piece::Ref(Reference::Env(n) | Reference::Stored(n))] if !n.is_empty())
}

/// Longest `$Secret{name}` name.
pub const MAX_NAME_LEN: usize = 64;

/// A secret reference inside a config string.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reference {
    /// `${VAR}`: an environment variable of the process that connects.
    Env(String),
    /// `$Secret{name}`: a secret kept encrypted in the registry.
    Stored(String),
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reference::Env(var) => write!(f, "${{{var}}}"),
            Reference::Stored(name) => write!(f, "$Secret{{{name}}}"),
        }
    }
}

/// Checks a `$Secret{name}` name: 1 to 64 of `A-Z a-z 0-9 _ -`.
pub fn check_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(format!("a secret name is 1 to {MAX_NAME_LEN} of the characters A-Z a-z 0-9 _ -"))
    }
}

/// A piece of a config string: literal text or a reference.
enum Piece<'a> {
    Text(&'a str),
    Ref(Reference),
}

/// Splits `s` into text and references; an unterminated `${` or `$Secret{` stays text.
fn pieces(s: &str) -> Vec<Piece<'_>> {
    const OPENERS: [&str; 2] = ["${", "$Secret{"];
    let mut out = Vec::new();
    let mut rest = s;
    loop {
        let next = OPENERS
            .iter()
            .filter_map(|o| rest.find(o).map(|at| (at, *o)))
            .min_by_key(|(at, o)| (*at, usize::MAX - o.len()));
        let Some((start, opener)) = next else { break };
        let after = &rest[start + opener.len()..];
        let Some(end) = after.find('}') else { break };
        if start > 0 {
            out.push(Piece::Text(&rest[..start]));
        }
        let name = after[..end].to_owned();
        out.push(Piece::Ref(if opener == "${" { Reference::Env(name) } else { Reference::Stored(name) }));
        rest = &after[end + 1..];
    }
    if !rest.is_empty() {
        out.push(Piece::Text(rest));
    }
    out
}

/// Every reference in `value`, with the dotted path of the field it is in (`config.url`).
pub fn references(value: &Value) -> Vec<(String, Reference)> {
    let mut found = Vec::new();
    collect(value, "config", &mut found);
    found
}

fn collect(value: &Value, path: &str, found: &mut Vec<(String, Reference)>) {
    match value {
        Value::String(s) => found.extend(pieces(s).into_iter().filter_map(|p| match p {
            Piece::Ref(r) => Some((path.to_owned(), r)),
            Piece::Text(_) => None,
        })),
        Value::Array(items) => {
            items.iter().enumerate().for_each(|(i, v)| collect(v, &format!("{path}[{i}]"), found))
        }
        Value::Object(map) => map.iter().for_each(|(k, v)| collect(v, &format!("{path}.{k}"), found)),
        _ => {}
    }
}

/// A config with its references resolved, and what turns their values back into references.
#[derive(Debug)]
pub struct Resolved {
    /// The config, references replaced by their values (never log it).
    pub config: Value,
    /// Maps each resolved value back to its reference, for every error of the connection.
    pub scrubber: Scrubber,
}

/// Returns a copy of `value` with every reference (whole or embedded) replaced by what
/// `lookup` answers for it, given the reference and the field it is in.
pub fn resolve(
    value: &Value,
    lookup: &mut dyn FnMut(&Reference, &str) -> Result<String, Error>,
) -> Result<Resolved, Error> {
    let mut scrubber = Scrubber::default();
    let config = resolve_at(value, "config", lookup, &mut scrubber)?;
    Ok(Resolved { config, scrubber })
}

/// Looks `${VAR}` up in this process's environment; `$Secret{..}` is not available.
pub fn env_lookup(reference: &Reference, field: &str) -> Result<String, Error> {
    match reference {
        Reference::Env(var) => {
            std::env::var(var).map_err(|_| Error::MissingSecret { var: var.clone(), field: field.to_owned() })
        }
        Reference::Stored(_) => Err(SecretError::Unavailable {
            reference: reference.to_string(),
            field: field.to_owned(),
            reason: "this process has no secret store".into(),
        }
        .into()),
    }
}

fn resolve_at(
    value: &Value,
    path: &str,
    lookup: &mut dyn FnMut(&Reference, &str) -> Result<String, Error>,
    scrubber: &mut Scrubber,
) -> Result<Value, Error> {
    Ok(match value {
        Value::String(s) => {
            let mut out = String::with_capacity(s.len());
            for piece in pieces(s) {
                match piece {
                    Piece::Text(text) => out.push_str(text),
                    Piece::Ref(reference) => {
                        let resolved = lookup(&reference, path)?;
                        scrubber.add(&resolved, &reference.to_string());
                        out.push_str(&resolved);
                    }
                }
            }
            Value::String(out)
        }
        Value::Array(items) => Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, v)| resolve_at(v, &format!("{path}[{i}]"), lookup, scrubber))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), resolve_at(v, &format!("{path}.{k}"), lookup, scrubber)?)))
                .collect::<Result<_, Error>>()?,
        ),
        other => other.clone(),
    })
}

/// Why a secret reference or the secret store failed; never holds a secret's value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// A `${VAR}` outside the prefixes this process allows.
    #[error(
        "secret reference `{reference}` in {field} is not allowed here: only environment variables starting with {allowed} resolve (see `polybus serve --secret-env-prefix`)"
    )]
    NotAllowed {
        /// The reference, e.g. `${HOME}`.
        reference: String,
        /// Where it is.
        field: String,
        /// The allowed prefixes, for the message.
        allowed: String,
    },
    /// A `$Secret{name}` whose secret does not exist.
    #[error(
        "secret reference `{reference}` in {field}: no secret named `{name}`; set it with `polybus secret set {name}`"
    )]
    Missing {
        /// The reference.
        reference: String,
        /// Where it is.
        field: String,
        /// The secret's name.
        name: String,
    },
    /// A reference that cannot be resolved here (no secret store, no key, a malformed name).
    #[error("secret reference `{reference}` in {field}: {reason}")]
    Unavailable {
        /// The reference.
        reference: String,
        /// Where it is.
        field: String,
        /// Why.
        reason: String,
    },
    /// No secret with this name (deleting one).
    #[error("no secret named `{0}` (see `polybus secret list`)")]
    NotFound(String),
    /// The secret store cannot be used (no key, a different key, damaged data).
    #[error("secrets unavailable: {0}")]
    StoreUnavailable(String),
}

impl SecretError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            SecretError::NotAllowed { .. } => "SECRET_NOT_ALLOWED",
            SecretError::Missing { .. } => "SECRET_MISSING",
            SecretError::Unavailable { .. } | SecretError::StoreUnavailable(_) => "SECRETS_UNAVAILABLE",
            SecretError::NotFound(_) => "SECRET_NOT_FOUND",
        }
    }
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
    fn a_password_with_a_slash_is_hidden_too() {
        // Found by fuzzing: the authority ended at the password's `/`, so nothing was hidden.
        assert_eq!(redact_url("redis://:pa/ss@h:6379/0").unwrap(), "redis://:****@h:6379/0");
        assert_eq!(redact_url("amqp://u:p/a/ss@h/vh").unwrap(), "amqp://u:****@h/vh");
        assert_eq!(redact_url("amqp://h:5672/vh"), None);
    }

    #[test]
    fn dotted_secret_keys_are_redacted() {
        // Found by fuzzing: Kafka `properties` hold librdkafka names such as `sasl.password`.
        let mut v =
            json!({"properties": {"sasl.password": "hunter2", "ssl.key.password": "k", "linger.ms": "5"}});
        redact(&mut v);
        assert_eq!(
            v,
            json!({"properties": {"sasl.password": "****", "ssl.key.password": "****", "linger.ms": "5"}})
        );
    }

    #[test]
    fn missing_variables_are_named_without_values() {
        let err = resolve(&json!({"password": "${POLYBUS_TEST_SURELY_UNSET}"}), &mut env_lookup).unwrap_err();
        assert_eq!(err.code(), "SECRET_MISSING");
        assert!(err.to_string().contains("config.password"));
        let ok = resolve(&json!({"url": "amqp://u:${PATH}@h", "n": 1}), &mut env_lookup).unwrap();
        assert!(!ok.config["url"].as_str().unwrap().contains("${"));
        assert_eq!(ok.config["n"], 1);
    }

    #[test]
    fn both_forms_are_found_whole_and_embedded_with_their_field() {
        let config = json!({
            "url": "amqp://u:$Secret{rabbit-pw}@${HOST}:5672/x",
            "servers": ["nats://${A}", "plain"],
            "token": "$Secret{tok}",
            "open": "${unterminated",
            "dollar": "$Secretary{x} costs $5",
        });
        let mut found: Vec<(String, String)> =
            references(&config).into_iter().map(|(f, r)| (f, r.to_string())).collect();
        found.sort();
        assert_eq!(
            found,
            vec![
                ("config.servers[0]".to_owned(), "${A}".to_owned()),
                ("config.token".to_owned(), "$Secret{tok}".to_owned()),
                ("config.url".to_owned(), "$Secret{rabbit-pw}".to_owned()),
                ("config.url".to_owned(), "${HOST}".to_owned()),
            ]
        );
        assert!(is_reference("$Secret{tok}") && is_reference("${A}"));
        assert!(!is_reference("${}") && !is_reference("x${A}") && !is_reference("${A}${B}"));
    }

    #[test]
    fn resolving_replaces_each_reference_and_scrubs_its_value_back() {
        let config = json!({"url": "amqp://u:$Secret{pw}@${HOST}:5672/", "n": 2});
        let resolved = resolve(&config, &mut |r, _| {
            Ok(match r {
                Reference::Env(_) => "db.internal".to_owned(),
                Reference::Stored(_) => "hunter2".to_owned(),
            })
        })
        .unwrap();
        assert_eq!(resolved.config, json!({"url": "amqp://u:hunter2@db.internal:5672/", "n": 2}));
        assert_eq!(
            resolved.scrubber.scrub_str("cannot reach DB.INTERNAL:5672 as u:hunter2"),
            "cannot reach ${HOST}:5672 as u:$Secret{pw}"
        );
    }

    #[test]
    fn secret_names_are_checked() {
        assert!(check_name("rabbit_pw-2").is_ok());
        for bad in ["", "a b", "a/b", "é", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
