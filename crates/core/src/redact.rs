//! Redaction by rule: what a broker definition shows to anyone who may read it.
//!
//! A config value is a secret when its key (at any depth, `properties` included, dotted names
//! too) contains `password`, `passwd`, `secret`, `token`, `jaas`, `key`, `credential` or
//! `private`, or is `pass`: letters are compared without case and without `.`, `_` or `-`
//! (`sasl.password`, `ssl.key.password`, `sasl.jaas.config`, `secretAccessKey`, `apiKey`).
//! Names that contain such a word but hold no secret are public: `keyFilename` and `keyFile` (paths),
//! `accessKeyId` (an identifier), `routingKey`, `key.serializer`, `key.deserializer`,
//! `ssl.key.location`, `ssl.keystore.location`, `ssl.keystore.type`, `sasl.kerberos.keytab`,
//! `sasl.oauthbearer.token.endpoint.url`. A secret value is shown as `****`, unless it is a
//! whole secret reference (`${VAR}`), which names where the secret is, not the secret.
//!
//! Every other string that holds a URL with user info (`scheme://user:password@host`) has the
//! password replaced. The user info ends at the *last* `@` of the string, so a password holding
//! `/`, `?`, `#` or `@` unencoded is masked whole; for `nats://` a user info without `:` is a
//! token and is masked too.

use serde_json::Value;

use crate::secret::is_reference;

/// What a redacted literal secret is shown as.
pub const REDACTED: &str = "****";

/// Words that make a config key secret.
const SECRET_WORDS: [&str; 8] =
    ["password", "passwd", "secret", "token", "jaas", "key", "credential", "private"];
/// Keys that are secret although they hold none of the words.
const SECRET_NAMES: [&str; 1] = ["pass"];
/// Keys that hold one of the words but no secret (normalised: lower case, letters and digits).
const PUBLIC_NAMES: [&str; 11] = [
    "keyfilename",
    "keyfile",
    "accesskeyid",
    "routingkey",
    "keyserializer",
    "keydeserializer",
    "sslkeylocation",
    "sslkeystorelocation",
    "sslkeystoretype",
    "saslkerberoskeytab",
    "sasloauthbearertokenendpointurl",
];
/// URL schemes whose user info without a password is a token.
const TOKEN_IN_USER_SCHEMES: [&str; 2] = ["nats", "tls"];

/// True when a config key's value is a secret (see the module docs for the rule).
pub fn is_secret_key(key: &str) -> bool {
    let normal: String =
        key.chars().filter(char::is_ascii_alphanumeric).map(|c| c.to_ascii_lowercase()).collect();
    if PUBLIC_NAMES.contains(&normal.as_str()) {
        return false;
    }
    SECRET_NAMES.contains(&normal.as_str()) || SECRET_WORDS.iter().any(|w| normal.contains(w))
}

/// True when a dotted field path (`config.properties.sasl.jaas.config`) ends at a secret, or
/// names one on its way: error messages about it must not quote its value.
pub fn is_secret_field(path: &str) -> bool {
    let tail = path.strip_prefix("config.").unwrap_or(path);
    let tail = tail.strip_prefix("properties.").unwrap_or(tail);
    is_secret_key(tail) || path.split(['.', '[', ']']).any(is_secret_key)
}

/// Replaces literal secrets in a config with `****`, and passwords inside URLs.
pub fn redact(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                if is_secret_key(key) {
                    match v {
                        Value::String(s) if is_reference(s) => {}
                        Value::Null => {}
                        _ => *v = Value::String(REDACTED.into()),
                    }
                } else {
                    redact(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        Value::String(s) => {
            if let Some(clean) = redact_url(s) {
                *s = clean;
            }
        }
        _ => {}
    }
}

/// `scheme://user:secret@host…` → `scheme://user:****@host…`; `None` when there is nothing to
/// hide (no user info, no password, or the password is a whole secret reference).
pub fn redact_url(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let is_scheme = !scheme.is_empty()
        && scheme.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !is_scheme {
        return None;
    }
    let at = rest.rfind('@')?;
    let (userinfo, host) = (&rest[..at], &rest[at + 1..]);
    match userinfo.split_once(':') {
        Some((_, password)) if password.is_empty() || is_reference(password) => None,
        Some((user, _)) => Some(format!("{scheme}://{user}:{REDACTED}@{host}")),
        None if TOKEN_IN_USER_SCHEMES.contains(&scheme.to_ascii_lowercase().as_str())
            && !userinfo.is_empty()
            && !is_reference(userinfo) =>
        {
            Some(format!("{scheme}://{REDACTED}@{host}"))
        }
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn kafka_properties_are_redacted_by_their_names() {
        let mut config = json!({"brokers": ["k:9092"], "properties": {
            "sasl.password": "pw1", "ssl.key.password": "pw2", "sasl.jaas.config":
            "org.apache.kafka.common.security.plain.PlainLoginModule required username=\"u\" password=\"pw3\";",
            "ssl.keystore.password": "pw4", "sasl.oauthbearer.client.secret": "pw5", "ssl.key.pem": "pw6",
            "ssl.key.location": "/etc/k.pem", "key.serializer": "StringSerializer", "client.id": "c",
            "sasl.oauthbearer.token.endpoint.url": "https://idp/token"}});
        redact(&mut config);
        let props = &config["properties"];
        for key in [
            "sasl.password",
            "ssl.key.password",
            "sasl.jaas.config",
            "ssl.keystore.password",
            "sasl.oauthbearer.client.secret",
            "ssl.key.pem",
        ] {
            assert_eq!(props[key], REDACTED, "{key}");
        }
        assert_eq!(props["ssl.key.location"], "/etc/k.pem");
        assert_eq!(props["key.serializer"], "StringSerializer");
        assert_eq!(props["client.id"], "c");
        assert_eq!(props["sasl.oauthbearer.token.endpoint.url"], "https://idp/token");
        assert!(!config.to_string().contains("pw"), "{config}");
    }

    #[test]
    fn every_config_type_keeps_its_public_fields_and_hides_its_secrets() {
        let mut config = json!({"keyFilename": "k.json", "credentials": "{\"private_key\": \"x\"}",
            "accessKeyId": "AKIA", "secretAccessKey": "s", "routingKey": "r", "pass": "p", "token": "t",
            "apiKey": "a", "sasl": {"password": "p"}, "user": "u", "password": "${REDIS_PASSWORD}"});
        redact(&mut config);
        assert_eq!(
            config,
            json!({"keyFilename": "k.json", "credentials": REDACTED, "accessKeyId": "AKIA",
                "secretAccessKey": REDACTED, "routingKey": "r", "pass": REDACTED, "token": REDACTED,
                "apiKey": REDACTED, "sasl": {"password": REDACTED}, "user": "u", "password": "${REDIS_PASSWORD}"})
        );
    }

    #[test]
    fn url_passwords_are_masked_whatever_they_hold() {
        for (url, shown) in [
            ("amqp://guest:guest@h:5672/vh", "amqp://guest:****@h:5672/vh"),
            ("amqp://app:pa/ss@rabbit:5672/", "amqp://app:****@rabbit:5672/"),
            ("amqp://app:12/ss@rabbit", "amqp://app:****@rabbit"),
            ("amqp://app:p#s?s@rabbit", "amqp://app:****@rabbit"),
            ("amqp://app:p@ss@rabbit", "amqp://app:****@rabbit"),
            ("redis://:pw@h:6379", "redis://:****@h:6379"),
            ("nats://s3cr3t-token@h:4222", "nats://****@h:4222"),
        ] {
            assert_eq!(redact_url(url).as_deref(), Some(shown), "{url}");
        }
        for url in
            ["amqp://h:5672", "amqp://u:${P}@h", "postgres://bus@db/test", "not a url", "nats://${T}@h"]
        {
            assert_eq!(redact_url(url), None, "{url}");
        }
    }

    #[test]
    fn secret_fields_are_recognised_in_paths() {
        assert!(is_secret_field("config.properties.sasl.jaas.config"));
        assert!(is_secret_field("config.sasl.password"));
        assert!(is_secret_field("config.pass"));
        assert!(!is_secret_field("config.port"));
        assert!(!is_secret_field("config.keyFilename"));
    }
}
