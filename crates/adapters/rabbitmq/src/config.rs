//! From a broker env's config to an AMQP URI and the exchange to publish to.

use crate::kind::RabbitmqConfig;
use lapin::tcp::RustlsConnector;
use lapin::uri::{AMQPScheme, AMQPUri};
use polybus_core::tls::Tls;
use polybus_core::{ConnectTarget, Error, Result, ValidationError, secret};

/// The exchange used when the config names none.
pub const DEFAULT_EXCHANGE: &str = "polybus";

/// Heartbeat asked for when the URL does not set one: a silently dead peer is noticed in ~10 s.
const HEARTBEAT_SECS: u16 = 5;
/// TCP connect timeout when the URL does not set one.
const CONNECT_TIMEOUT_MS: u64 = 10_000;

/// Where and how to connect; `Debug` never shows the password.
#[derive(Clone)]
pub(crate) struct Settings {
    /// Full URI, credentials included: never log or display it.
    pub uri: AMQPUri,
    /// The topic exchange messages are published to.
    pub exchange: String,
    /// `amqp://host:port/vhost`, for logs.
    pub endpoint: String,
    /// The password, to scrub from client error messages.
    password: String,
    /// Connection name shown in RabbitMQ's management UI.
    pub name: String,
    /// For `amqps`: the TLS client and the name the server's certificate is checked against.
    pub tls: Option<(RustlsConnector, String)>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("endpoint", &self.endpoint)
            .field("exchange", &self.exchange)
            .finish_non_exhaustive()
    }
}

impl Settings {
    /// Reads a `rabbitmq` env config (secrets already resolved).
    pub fn from_target(target: &ConnectTarget) -> Result<Settings> {
        let invalid = |field: &str, message: String| {
            Error::Validation(ValidationError::in_env(&target.env, field, message))
        };
        let config: RabbitmqConfig = polybus_core::config::parse(&target.config)
            .map_err(|(field, message)| invalid(&field, message))?;
        let mut uri = match &config.url {
            // The URL is not echoed: a malformed one may hold a password in any place.
            Some(url) => parse_url(url).ok_or_else(|| {
                invalid("config.url", "not an AMQP URL; expected amqp://user:password@host:port/vhost".into())
            })?,
            None if config.host.is_some() => AMQPUri::default(),
            None => return Err(invalid("config", "one of `url` or `host` is required".into())),
        };
        let block = config.tls.as_ref().and_then(Tls::block);
        if block.is_some() && uri.scheme != AMQPScheme::AMQPS {
            if uri.authority.port == AMQPScheme::AMQP.default_port() {
                uri.authority.port = AMQPScheme::AMQPS.default_port();
            }
            uri.scheme = AMQPScheme::AMQPS;
        }
        if let Some(host) = &config.host {
            uri.authority.host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        }
        if let Some(port) = config.port {
            uri.authority.port = port;
        }
        if let Some(username) = &config.username {
            uri.authority.userinfo.username = username.clone();
        }
        if let Some(password) = &config.password {
            uri.authority.userinfo.password = password.clone();
        }
        if let Some(vhost) = &config.vhost {
            uri.vhost = vhost.clone();
        }
        uri.query.heartbeat.get_or_insert(HEARTBEAT_SECS);
        uri.query.connection_timeout.get_or_insert(CONNECT_TIMEOUT_MS);
        let exchange = config.exchange.clone().unwrap_or_else(|| DEFAULT_EXCHANGE.to_owned());
        if exchange.is_empty() || exchange.len() > 255 {
            return Err(invalid("config.exchange", "must be 1 to 255 characters".into()));
        }
        let tls = match uri.scheme {
            AMQPScheme::AMQPS => {
                // An `amqps://` URL without a `tls` block: system roots.
                let block = block.unwrap_or_default();
                let config = block.client_config().map_err(|e| e.in_env(&target.env))?;
                let name = block.server_name.clone().unwrap_or_else(|| uri.authority.host.clone());
                Some((RustlsConnector::from(config), name))
            }
            AMQPScheme::AMQP => None,
        };
        // The vhost as a URL path segment: the default `/` shows as `%2f`.
        let vhost = uri.vhost.replace('%', "%25").replace('/', "%2f");
        let endpoint = format!("{}://{}:{}/{vhost}", uri.scheme, uri.authority.host, uri.authority.port);
        Ok(Settings {
            password: uri.authority.userinfo.password.clone(),
            uri,
            exchange,
            endpoint,
            name: format!("polybus {}/{}", target.broker, target.env),
            tls,
        })
    }

    /// `message` with the password replaced by `****`, should a client error quote it.
    pub fn scrub(&self, message: impl std::fmt::Display) -> String {
        let message = message.to_string();
        if self.password.len() < 3 {
            return message;
        }
        message.replace(&self.password, secret::REDACTED)
    }
}

/// Parses an `amqp://` / `amqps://` URL; `None` when it is not one.
fn parse_url(url: &str) -> Option<AMQPUri> {
    let mut uri: AMQPUri = url.parse().ok()?;
    // The URI parser keeps only domain names and falls back to `localhost` for IP addresses.
    uri.authority.host = url_host(url)?;
    Some(uri)
}

/// The host part of a URL, without brackets around an IPv6 address.
fn url_host(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = match host_port.strip_prefix('[') {
        Some(v6) => v6.split_once(']')?.0,
        None => host_port.split(':').next()?,
    };
    (!host.is_empty()).then(|| host.to_owned())
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn settings(config: Value) -> Result<Settings> {
        Settings::from_target(&ConnectTarget {
            broker: "bus".into(),
            env: "dev".into(),
            broker_type: crate::BROKER_TYPE,
            config,
        })
    }

    #[test]
    fn url_with_ip_host_keeps_the_ip_and_credentials() {
        let s = settings(json!({"url": "amqp://user:s3cret@127.0.0.1:5673/%2f"})).unwrap();
        assert_eq!(s.uri.authority.host, "127.0.0.1");
        assert_eq!(s.uri.authority.port, 5673);
        assert_eq!(s.uri.authority.userinfo.username, "user");
        assert_eq!(s.uri.authority.userinfo.password, "s3cret");
        assert_eq!(s.uri.vhost, "/");
        assert_eq!(s.endpoint, "amqp://127.0.0.1:5673/%2f");
        assert_eq!(s.exchange, "polybus");
        assert!(!format!("{s:?}").contains("s3cret"));
        assert_eq!(s.scrub("login as user:s3cret refused"), "login as user:**** refused");
    }

    #[test]
    fn fields_build_a_uri_and_override_the_url() {
        let s = settings(json!({"host": "rabbit", "username": "u", "password": "p", "vhost": "v",
            "exchange": "events", "queue": "ignored", "routingKey": "ignored",
            "tls": {"insecureSkipVerify": true, "serverName": "rabbit.internal"}}))
        .unwrap();
        assert_eq!(s.uri.scheme, AMQPScheme::AMQPS);
        assert_eq!(s.tls.as_ref().map(|(_, name)| name.as_str()), Some("rabbit.internal"));
        assert_eq!((s.uri.authority.host.as_str(), s.uri.authority.port), ("rabbit", 5671));
        assert_eq!(s.uri.vhost, "v");
        assert_eq!(s.exchange, "events");
        assert_eq!(s.endpoint, "amqps://rabbit:5671/v");
        let s = settings(json!({"url": "amqp://a:b@[::1]:5672/x", "port": 6000})).unwrap();
        assert_eq!((s.uri.authority.host.as_str(), s.uri.authority.port), ("::1", 6000));
    }

    #[test]
    fn bad_urls_are_named_without_their_password() {
        let err = settings(json!({"url": "http//user:hunter2@host"})).unwrap_err().to_string();
        assert!(err.contains("config.url"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        let err = settings(json!({"exchange": "e"})).unwrap_err().to_string();
        assert!(err.contains("`url` or `host`"), "{err}");
    }

    #[test]
    fn a_tls_file_that_cannot_be_read_is_named() {
        let err = settings(json!({"host": "h", "tls": {"caFile": "/nonexistent/ca.pem"}})).unwrap_err();
        assert_eq!(err.code(), "VALIDATION_FAILED");
        assert!(err.to_string().contains("config.tls.caFile"), "{err}");
        let s = settings(json!({"host": "h", "tls": false})).unwrap();
        assert_eq!((s.uri.scheme, s.tls.is_none()), (AMQPScheme::AMQP, true));
    }
}
