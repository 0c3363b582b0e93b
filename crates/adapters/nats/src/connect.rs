//! From a `NatsConfig` to a connected client that reconnects by itself.

use std::sync::Arc;
use std::time::Duration;

use crate::kind::NatsConfig;
use async_nats::{Client, ConnectErrorKind, ConnectOptions, Event};
use polybus_core::tls::{self, Tls};
use polybus_core::{FailureKind, Result, ValidationError, secret};
use tokio::sync::watch;

/// Literal secrets of one connection, blanked out of every error message.
#[derive(Clone, Default)]
pub struct Secrets(Arc<[String]>);

impl Secrets {
    fn of(config: &NatsConfig) -> Self {
        let mut secrets: Vec<String> = config.pass.iter().chain(&config.token).cloned().collect();
        for url in config.servers.to_vec() {
            // Up to the last `@`: a password or token may hold an unescaped `/` (a NATS URL
            // has no path that could hold an `@`).
            if let Some((userinfo, _host)) =
                url.split_once("://").map_or(url.as_str(), |(_, rest)| rest).rsplit_once('@')
            {
                // `user:password@` or a bare `token@`.
                secrets.push(userinfo.split_once(':').map_or(userinfo, |(_, pass)| pass).to_owned());
            }
        }
        secrets.retain(|s| !s.is_empty());
        Secrets(secrets.into())
    }

    /// `text` with every secret replaced by `****`.
    pub fn scrub(&self, text: impl std::fmt::Display) -> String {
        let mut text = text.to_string();
        for secret in self.0.iter() {
            text = text.replace(secret.as_str(), secret::REDACTED);
        }
        text
    }
}

/// A connected client, and a counter bumped on every (re)connection: pull requests made
/// before a reconnection are gone from the server and must be made again.
pub struct Connection {
    /// The client.
    pub client: Client,
    /// Connections so far.
    pub connections: watch::Receiver<u64>,
    /// What to blank out of error messages.
    pub secrets: Secrets,
}

/// Connects with `config`; `env` names the env in validation errors.
pub async fn connect(config: &NatsConfig, env: &str) -> Result<Connection> {
    let servers = config.servers.to_vec();
    if servers.is_empty() {
        return Err(
            ValidationError::in_env(env, "config.servers", "at least one server URL is required").into()
        );
    }
    let secrets = Secrets::of(config);
    let (connected, connections) = watch::channel(0u64);
    let mut options = ConnectOptions::new()
        .name(config.name.clone().unwrap_or_else(|| "polybus".to_owned()))
        .max_reconnects(
            config.max_reconnect_attempts.and_then(|n| usize::try_from(n).ok()).filter(|n| *n > 0),
        )
        .event_callback(move |event| {
            let connected = connected.clone();
            async move {
                match event {
                    Event::Connected => {
                        connected.send_modify(|n| *n += 1);
                        tracing::debug!("nats connected");
                    }
                    Event::Disconnected => tracing::warn!("nats connection lost; reconnecting"),
                    Event::Closed => tracing::debug!("nats connection closed"),
                    other => tracing::debug!(event = %other, "nats event"),
                }
            }
        });
    if let Some(wait) = config.reconnect_time_wait {
        let wait = Duration::from_millis(wait);
        options =
            options.reconnect_delay_callback(move |attempt| if attempt <= 1 { Duration::ZERO } else { wait });
    }
    match (&config.user, &config.pass, &config.token) {
        (Some(_), _, Some(_)) => {
            return Err(ValidationError::in_env(
                env,
                "config.token",
                "give either `user` and `pass` or `token`",
            )
            .into());
        }
        (Some(user), Some(pass), None) => options = options.user_and_password(user.clone(), pass.clone()),
        (Some(_), None, None) => {
            return Err(ValidationError::in_env(env, "config.pass", "required when `user` is set").into());
        }
        (None, Some(_), _) => {
            return Err(ValidationError::in_env(env, "config.user", "required when `pass` is set").into());
        }
        (None, None, Some(token)) => options = options.token(token.clone()),
        (None, None, None) => {}
    }
    if let Some(block) = config.tls.as_ref().and_then(Tls::block) {
        let tls = block.client_config().map_err(|e| e.in_env(env))?;
        options = options.tls_client_config(tls).require_tls(true);
    }
    let shown: Vec<String> =
        servers.iter().map(|s| secret::redact_url(s).unwrap_or_else(|| s.clone())).collect();
    let client = options.connect(servers.as_slice()).await.map_err(|e| {
        let kind = match e.kind() {
            ConnectErrorKind::Authentication | ConnectErrorKind::AuthorizationViolation => FailureKind::Auth,
            ConnectErrorKind::TimedOut => FailureKind::Timeout,
            ConnectErrorKind::ServerParse | ConnectErrorKind::Tls => FailureKind::Invalid,
            ConnectErrorKind::Dns | ConnectErrorKind::Io | ConnectErrorKind::MaxReconnects => {
                FailureKind::Unavailable
            }
        };
        tls::connect_error(format!("nats {}", shown.join(",")), kind, e).map_text(|text| secrets.scrub(text))
    })?;
    Ok(Connection { client, connections, secrets })
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kind::OneOrMany;

    fn config(servers: &str) -> NatsConfig {
        NatsConfig {
            servers: OneOrMany::One(servers.into()),
            user: None,
            pass: Some("s3cret".into()),
            token: None,
            name: None,
            max_reconnect_attempts: None,
            reconnect_time_wait: None,
            tls: None,
        }
    }

    #[test]
    fn secrets_are_blanked_out_of_messages() {
        let secrets = Secrets::of(&config("nats://u:urlpass@h:4222, nats://tok@h2"));
        assert_eq!(
            secrets.scrub("auth failed for s3cret, urlpass and tok"),
            "auth failed for ****, **** and ****"
        );
    }

    #[test]
    fn a_url_password_with_a_slash_is_blanked_out_too() {
        // Found by fuzzing: the user info was taken to end at the password's `/`.
        let secrets = Secrets::of(&config("nats://u:pa/ss@h:4222, tok/en@h2"));
        assert_eq!(
            secrets.scrub("refused: nats://u:pa/ss@h:4222 tok/en"),
            "refused: nats://u:****@h:4222 ****"
        );
    }

    #[tokio::test]
    async fn a_password_without_user_is_refused_before_connecting() {
        let err = connect(&config("nats://127.0.0.1:1"), "dev").await.err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("invalid definition: env `dev`: field `config.user`: required when `pass` is set")
        );
    }
}
