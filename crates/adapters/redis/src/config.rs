//! From a `redis` env config to what the client needs, without ever showing the password.

use crate::kind::RedisConfig;
use polybus_core::{Error, Result, ValidationError, secret};
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo};

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
        let tls = config.tls.unwrap_or(false);
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
        if tls && let ConnectionAddr::Tcp(host, port) = info.addr().clone() {
            info = info.set_addr(ConnectionAddr::TcpTls { host, port, insecure: false, tls_params: None });
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
        if matches!(info.addr(), ConnectionAddr::TcpTls { .. }) {
            install_tls_provider();
        }
        Ok(Settings { info, address, max_len: config.max_len.filter(|n| *n > 0) })
    }
}

/// rustls needs a process-wide crypto provider; when none was installed (or several crates
/// enabled competing ones) it would panic on the first TLS connection.
fn install_tls_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing the race to another installer is fine: a provider is then in place.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// A `Connect` error that names the address but never the credentials.
pub(crate) fn connect_error(address: &str, e: redis::RedisError) -> Error {
    crate::transport::failed(polybus_core::Op::Connect, format!("redis {address}"), e)
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
}
