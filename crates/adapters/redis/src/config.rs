//! From a `redis` env config to what the client needs, without ever showing the password.

use crate::kind::RedisConfig;
use polybus_core::tls::Tls;
use polybus_core::{Error, Result, ValidationError, secret};
use redis::{Client, ClientTlsConfig, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, TlsCertificates};

const DEFAULT_PORT: u16 = 6379;

/// Where and how to connect, resolved from a [`RedisConfig`].
#[derive(Clone)]
pub(crate) struct Settings {
    /// Address, credentials and database for the client.
    pub info: ConnectionInfo,
    /// `host:port` (or socket path), safe to show in errors and logs.
    pub address: String,
    /// Approximate stream length bound (`XADD … MAXLEN ~ n`).
    pub max_len: Option<u64>,
}

impl Settings {
    /// Resolves `config` of env `env`; a malformed URL is a validation error naming the env.
    pub fn from_config(config: &RedisConfig, env: &str) -> Result<Settings> {
        let tls = config.tls.as_ref().and_then(Tls::block);
        let mut info = match (&config.url, &config.host) {
            (Some(url), _) => url.as_str().into_connection_info().map_err(|_| {
                let shown = secret::redact_url(url).unwrap_or_else(|| url.clone());
                ValidationError::in_env(
                    env,
                    "config.url",
                    format!(
                        "`{shown}` is not a Redis URL (expected redis://[user:password@]host[:port][/db])"
                    ),
                )
            })?,
            (None, Some(host)) => ConnectionAddr::Tcp(host.clone(), config.port.unwrap_or(DEFAULT_PORT))
                .into_connection_info()
                .map_err(|e| ValidationError::in_env(env, "config.host", e.to_string()))?,
            (None, None) => {
                return Err(
                    ValidationError::in_env(env, "config", "one of `url` or `host` is required").into()
                );
            }
        };
        if tls.is_some()
            && let ConnectionAddr::Tcp(host, port) = info.addr().clone()
        {
            info = info.set_addr(ConnectionAddr::TcpTls { host, port, insecure: false, tls_params: None });
        }
        if let ConnectionAddr::TcpTls { host, port, .. } = info.addr().clone() {
            // A `rediss://` URL without a `tls` block: system roots.
            let block = tls.unwrap_or_default();
            crate::kind::check_tls(&block).map_err(|e| e.in_env(env))?;
            let pem = block.load().map_err(|e| e.in_env(env))?;
            polybus_core::tls::install_crypto_provider();
            info = info.set_addr(ConnectionAddr::TcpTls {
                host,
                port,
                insecure: pem.insecure,
                tls_params: None,
            });
            if pem.ca.is_some() || pem.identity.is_some() {
                let certificates = TlsCertificates {
                    client_tls: pem.identity.map(|(cert, key)| ClientTlsConfig {
                        client_cert: cert.into_bytes(),
                        client_key: key.into_bytes(),
                    }),
                    root_cert: pem.ca.map(String::into_bytes),
                };
                // Only the PEM was parsed already; this also takes the key apart.
                info = Client::build_with_tls(info, certificates)
                    .map_err(|_| {
                        ValidationError::in_env(
                            env,
                            "config.tls",
                            "the client certificate or key cannot be used",
                        )
                    })?
                    .get_connection_info()
                    .clone();
            }
        }
        let mut redis = info.redis_settings().clone();
        if let Some(username) = &config.username {
            redis = redis.set_username(username);
        }
        if let Some(password) = &config.password {
            redis = redis.set_password(password);
        }
        if let Some(db) = config.db {
            redis = redis.set_db(db);
        }
        let info = info.set_redis_settings(redis);
        let address = info.addr().to_string();
        Ok(Settings { info, address, max_len: config.max_len.filter(|n| *n > 0) })
    }
}

/// A `Connect` error that names the address but never the credentials, and says so when the
/// TLS handshake failed.
pub(crate) fn connect_error(address: &str, e: redis::RedisError) -> Error {
    let kind = crate::transport::failure_kind(&e);
    polybus_core::tls::connect_error(format!("redis {address}"), kind, e)
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;

    fn config(value: serde_json::Value) -> RedisConfig {
        polybus_core::config::parse(&value).expect("valid config")
    }

    #[test]
    fn host_port_credentials_and_db_are_applied() {
        let s = Settings::from_config(
            &config(serde_json::json!({"host": "h", "port": 7000, "username": "u", "password": "p", "db": 3, "maxLen": 10})),
            "dev",
        )
        .expect("settings");
        assert_eq!(s.address, "h:7000");
        assert_eq!(s.info.redis_settings().username(), Some("u"));
        assert_eq!(s.info.redis_settings().password(), Some("p"));
        assert_eq!(s.info.redis_settings().db(), 3);
        assert_eq!(s.max_len, Some(10));
    }

    #[test]
    fn url_is_used_and_a_bad_one_is_reported_without_its_password() {
        let s =
            Settings::from_config(&config(serde_json::json!({"url": "redis://:pw@127.0.0.1:6390/2"})), "dev")
                .expect("settings");
        assert_eq!(s.address, "127.0.0.1:6390");
        assert_eq!(s.info.redis_settings().db(), 2);
        let err = Settings::from_config(&config(serde_json::json!({"url": "nope://u:secret@h"})), "dev")
            .err()
            .expect("a bad url is refused");
        let text = err.to_string();
        assert!(text.contains("config.url") && !text.contains("secret"), "{text}");
    }

    #[test]
    fn tls_comes_from_the_scheme_or_the_block() {
        let tls = |s: &Settings| match s.info.addr() {
            ConnectionAddr::TcpTls { insecure, .. } => Some(*insecure),
            _ => None,
        };
        let s = Settings::from_config(&config(serde_json::json!({"url": "rediss://h:6380"})), "dev").unwrap();
        assert_eq!(tls(&s), Some(false));
        let s = Settings::from_config(
            &config(serde_json::json!({"host": "h", "tls": {"insecureSkipVerify": true}})),
            "dev",
        )
        .unwrap();
        assert_eq!(tls(&s), Some(true));
        let s =
            Settings::from_config(&config(serde_json::json!({"host": "h", "tls": false})), "dev").unwrap();
        assert_eq!(tls(&s), None);
        let err = Settings::from_config(
            &config(serde_json::json!({"host": "h", "tls": {"caFile": "/nonexistent/ca.pem"}})),
            "dev",
        )
        .err()
        .expect("a missing CA file is refused");
        assert_eq!(err.code(), "VALIDATION_FAILED");
        assert!(err.to_string().contains("config.tls.caFile"), "{err}");
    }
}
