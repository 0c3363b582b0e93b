//! Connection settings from an env's `MqttConfig`, and the client options built from them.

use std::sync::Arc;
use std::time::Duration;

use crate::kind::MqttConfig;
use polybus_core::tls::Tls;
use polybus_core::{ConnectTarget, Error, Result, ValidationError};
use rumqttc::v5::MqttOptions;
use rumqttc::{TlsConfiguration, Transport as Wire};
use rustls::ClientConfig;

/// Largest packet MQTT can carry (256 MiB); announced so the broker never withholds a message.
const MAX_PACKET_BYTES: u32 = 268_435_455;
/// How often an idle connection proves it is alive.
const KEEP_ALIVE: Duration = Duration::from_secs(10);
/// Seconds a TCP + MQTT handshake may take.
const CONNECT_TIMEOUT_SECS: u64 = 5;

/// Where and how to connect; the password never leaves this struct except into the client.
#[derive(Clone)]
pub(crate) struct Settings {
    host: String,
    port: u16,
    tls: bool,
    username: Option<String>,
    password: Option<String>,
    /// Prefix of every client id this transport uses.
    pub client_id: String,
    /// Built once per transport, when `tls`.
    tls_config: Option<Arc<ClientConfig>>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

impl Settings {
    /// Reads the env's config: `url` or `host`/`port`, credentials, `clientId`, `tls`, `version`.
    pub fn from_target(target: &ConnectTarget) -> Result<Settings> {
        let invalid = |field: &str, message: String| {
            Error::Validation(ValidationError::in_env(&target.env, field, message))
        };
        let config: MqttConfig = polybus_core::config::parse(&target.config)
            .map_err(|(field, message)| invalid(&field, message))?;
        match config.version {
            None | Some(5) => {}
            Some(3) => {
                return Err(Error::Unsupported {
                    broker_type: crate::BROKER_TYPE.to_string(),
                    what: "MQTT 3.1.1 (`version: 3`): headers, flow control and session expiry need \
                           MQTT 5; set `version: 5` (Mosquitto 1.6+ and every current broker speak it)"
                        .into(),
                });
            }
            Some(v) => return Err(invalid("config.version", format!("expected 3 or 5, got {v}"))),
        }
        let mut settings = match &config.url {
            Some(url) => parse_url(url).map_err(|message| invalid("config.url", message))?,
            None => {
                let host = config
                    .host
                    .clone()
                    .filter(|h| !h.trim().is_empty())
                    .ok_or_else(|| invalid("config", "one of `url` or `host` is required".into()))?;
                Settings {
                    host,
                    port: 0,
                    tls: false,
                    username: None,
                    password: None,
                    client_id: String::new(),
                    tls_config: None,
                }
            }
        };
        let block = config.tls.as_ref().and_then(Tls::block);
        if block.is_some() {
            settings.tls = true;
        }
        if let Some(port) = config.port {
            settings.port = port;
        }
        if settings.port == 0 {
            settings.port = if settings.tls { 8883 } else { 1883 };
        }
        if config.username.is_some() {
            settings.username = config.username.clone();
        }
        if config.password.is_some() {
            settings.password = config.password.clone();
        }
        settings.client_id =
            config.client_id.clone().filter(|c| !c.is_empty()).unwrap_or_else(|| "polybus".into());
        if settings.tls {
            // An `mqtts://` URL without a `tls` block: system roots.
            let config = block.unwrap_or_default().client_config().map_err(|e| e.in_env(&target.env))?;
            settings.tls_config = Some(Arc::new(config));
        }
        Ok(settings)
    }

    /// `host:port`, for error messages.
    pub fn endpoint(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// Client options shared by every connection of this transport.
    pub fn options(&self, client_id: String) -> MqttOptions {
        let mut options = MqttOptions::new(client_id, self.host.clone(), self.port);
        options
            .set_keep_alive(KEEP_ALIVE)
            .set_connection_timeout(CONNECT_TIMEOUT_SECS)
            .set_max_packet_size(Some(MAX_PACKET_BYTES));
        if let Some(user) = &self.username {
            options.set_credentials(user.clone(), self.password.clone().unwrap_or_default());
        }
        if let Some(config) = &self.tls_config {
            options.set_transport(Wire::tls_with_config(TlsConfiguration::Rustls(config.clone())));
        }
        options
    }
}

/// `mqtt://[user[:password]@]host[:port]`; `mqtts://` (or `ssl://`) for TLS. Errors never echo the URL.
fn parse_url(url: &str) -> Result<Settings, String> {
    const EXPECTED: &str = "expected `mqtt://[user[:password]@]host[:port]` or `mqtts://…`";
    let (scheme, rest) = url.split_once("://").ok_or_else(|| EXPECTED.to_owned())?;
    let tls = match scheme.to_ascii_lowercase().as_str() {
        "mqtt" | "tcp" => false,
        "mqtts" | "ssl" | "tls" => true,
        other => return Err(format!("unsupported scheme `{other}`: {EXPECTED}")),
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((userinfo, hostport)) => (Some(userinfo), hostport),
        None => (None, authority),
    };
    let (username, password) = match userinfo {
        Some(info) => match info.split_once(':') {
            Some((user, password)) => (Some(percent_decode(user)?), Some(percent_decode(password)?)),
            None => (Some(percent_decode(info)?), None),
        },
        None => (None, None),
    };
    let (host, port) = if let Some(bracketed) = hostport.strip_prefix('[') {
        let (host, after) = bracketed.split_once(']').ok_or_else(|| EXPECTED.to_owned())?;
        (host, after.strip_prefix(':'))
    } else {
        match hostport.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (hostport, None),
        }
    };
    if host.is_empty() {
        return Err(format!("the URL has no host: {EXPECTED}"));
    }
    let port = match port {
        Some(p) => {
            p.parse::<u16>().map_err(|_| format!("the URL's port is not a number 1-65535: {EXPECTED}"))?
        }
        None => 0,
    };
    Ok(Settings {
        host: host.to_owned(),
        port,
        tls,
        username,
        password,
        client_id: String::new(),
        tls_config: None,
    })
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            let byte = hex
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| "the URL's user info has an invalid %-escape".to_owned())?;
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the URL's user info is not UTF-8 once decoded".to_owned())
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn target(config: serde_json::Value) -> ConnectTarget {
        ConnectTarget { broker: "b".into(), env: "dev".into(), broker_type: crate::BROKER_TYPE, config }
    }

    #[test]
    fn urls_give_host_port_tls_and_credentials() {
        let s =
            Settings::from_target(&target(json!({"url": "mqtts://us%40er:p%3Ass@broker.example"}))).unwrap();
        assert_eq!((s.endpoint(), s.tls), ("broker.example:8883".to_owned(), true));
        assert_eq!((s.username.as_deref(), s.password.as_deref()), (Some("us@er"), Some("p:ss")));
        let s =
            Settings::from_target(&target(json!({"url": "mqtt://[::1]:1884", "clientId": "svc"}))).unwrap();
        assert_eq!((s.endpoint(), s.tls, s.client_id.as_str()), ("::1:1884".to_owned(), false, "svc"));
    }

    #[test]
    fn host_and_port_fields_default_to_1883_and_polybus() {
        let s = Settings::from_target(&target(json!({"host": "127.0.0.1"}))).unwrap();
        assert_eq!((s.endpoint(), s.client_id.as_str()), ("127.0.0.1:1883".to_owned(), "polybus"));
        match Settings::from_target(&target(json!({"host": "h", "tls": true}))) {
            Ok(s) => {
                assert_eq!(s.endpoint(), "h:8883");
                assert!(s.tls_config.is_some(), "TLS verified against the system's roots");
            }
            // A machine without a CA bundle (no `ca-certificates`) says so instead of panicking.
            Err(e) => assert!(format!("{e}").contains("no usable CA certificates"), "{e}"),
        }
    }

    #[test]
    fn bad_urls_and_version_3_are_refused_without_echoing_secrets() {
        let err = Settings::from_target(&target(json!({"url": "http://u:hunter2@h"}))).unwrap_err();
        let shown = err.to_string();
        assert!(shown.contains("config.url"), "{err}");
        assert!(!shown.contains("hunter2"), "{err}");
        let err = Settings::from_target(&target(json!({"url": "mqtt://u:hunter2@h:99999"}))).unwrap_err();
        assert!(!format!("{err} {err:?}").contains("hunter2"), "{err}");
        let err = Settings::from_target(&target(json!({"host": "h", "version": 3}))).unwrap_err();
        assert_eq!(err.code(), "UNSUPPORTED");
        let s = Settings::from_target(&target(json!({"host": "h", "username": "u", "password": "hunter2"})))
            .unwrap();
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn a_tls_block_turns_tls_on_and_its_files_are_read() {
        let s = Settings::from_target(&target(json!({"host": "h", "tls": {"insecureSkipVerify": true}})))
            .unwrap();
        assert_eq!((s.endpoint(), s.tls, s.tls_config.is_some()), ("h:8883".to_owned(), true, true));
        let s = Settings::from_target(&target(json!({"host": "h", "tls": false}))).unwrap();
        assert_eq!((s.endpoint(), s.tls), ("h:1883".to_owned(), false));
        let err =
            Settings::from_target(&target(json!({"host": "h", "tls": {"caFile": "/nonexistent/ca.pem"}})))
                .unwrap_err();
        assert_eq!(err.code(), "VALIDATION_FAILED");
        assert!(err.to_string().contains("config.tls.caFile"), "{err}");
    }
}
