//! One AMQP connection, re-established on demand after it drops.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use backon::ExponentialBuilder;
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::tcp::{AMQPUriTcpExt, RustlsConnector};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Connection, ConnectionProperties, ErrorKind};
use polybus_core::{Error, FailureKind, Op};
use tokio::sync::Mutex;

use crate::config::Settings;

/// Why a connection could not be had.
#[derive(Debug)]
pub(crate) enum LinkError {
    /// The transport was closed.
    Closed,
    /// Connecting failed.
    Connect {
        /// What the client said, scrubbed of the password.
        message: String,
        /// The client's error.
        error: lapin::Error,
    },
}

impl LinkError {
    /// True when trying again later may succeed: the broker was unreachable or dropped us,
    /// not when it refused the credentials or the vhost.
    pub fn is_transient(&self) -> bool {
        matches!(self, LinkError::Connect { error, .. } if retry_connect(error))
    }

    /// The error `op` on `target` reports: keeps lapin's error and its kind.
    pub fn into_error(self, settings: &Settings, op: Op, target: impl Into<String>) -> Error {
        match self {
            LinkError::Closed => Error::Closed(format!("rabbitmq {}", settings.endpoint)),
            LinkError::Connect { message, error } => {
                let kind = failure_kind(&error);
                let message = match tls_failure(&error) {
                    Some(why) => format!("TLS handshake failed, a certificate problem: {why} ({message})"),
                    None => message,
                };
                Error::transport(op, target, format!("cannot connect: {message}"))
                    .with_kind(kind)
                    .with_cause(error)
                    .map_text(|text| settings.scrub(text))
            }
        }
    }
}

/// A transport error keeping lapin's error and its kind, its texts scrubbed of the password.
pub(crate) fn failed(settings: &Settings, op: Op, target: impl Into<String>, e: lapin::Error) -> Error {
    Error::transport_from(op, target, failure_kind(&e), e).map_text(|text| settings.scrub(text))
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkError::Closed => f.write_str("the transport is closed"),
            LinkError::Connect { message, .. } => write!(f, "cannot connect: {message}"),
        }
    }
}

/// Delays between reconnect attempts: 100 ms doubling to 5 s, with jitter.
pub(crate) fn reconnect_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
}

/// Whether a failed connect is worth repeating: yes unless the broker refused who we are. A
/// soft refusal while a node restarts (a queue's home node not back yet) heals, so it is
/// repeated although its kind, reported to the user, is not retryable.
fn retry_connect(e: &lapin::Error) -> bool {
    if tls_failure(e).is_some() {
        return false;
    }
    match e.kind() {
        ErrorKind::ProtocolError(err) => !matches!(
            err.kind(),
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
                | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED)
        ),
        ErrorKind::AuthProviderError(_)
        | ErrorKind::InvalidProtocolVersion(_)
        | ErrorKind::NoDefaultRuntime => false,
        _ => true,
    }
}

/// What kind of failure `e` is, from the AMQP reply code or the client's error kind. A
/// channel-level (soft) refusal never heals by retrying.
pub(crate) fn failure_kind(e: &lapin::Error) -> FailureKind {
    if tls_failure(e).is_some() {
        return FailureKind::Invalid;
    }
    match e.kind() {
        ErrorKind::ProtocolError(err) => match err.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
            | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => FailureKind::Auth,
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => FailureKind::NotFound,
            AMQPErrorKind::Soft(AMQPSoftError::CONTENTTOOLARGE) => FailureKind::TooLarge,
            AMQPErrorKind::Soft(_) => FailureKind::Invalid,
            AMQPErrorKind::Hard(
                AMQPHardError::CONNECTIONFORCED | AMQPHardError::RESOURCEERROR | AMQPHardError::INTERNALERROR,
            ) => FailureKind::Unavailable,
            AMQPErrorKind::Hard(_) => FailureKind::Unknown,
        },
        ErrorKind::AuthProviderError(_) => FailureKind::Auth,
        ErrorKind::InvalidProtocolVersion(_) | ErrorKind::NoDefaultRuntime => FailureKind::Invalid,
        ErrorKind::IOError(_)
        | ErrorKind::RuntimeShutdownError(_)
        | ErrorKind::MissingHeartbeatError
        | ErrorKind::InvalidConnectionState(_)
        | ErrorKind::InvalidChannelState(..)
        | ErrorKind::ChannelsLimitReached => FailureKind::Unavailable,
        _ => FailureKind::Unknown,
    }
}

/// What is wrong with the certificates when `e` is a failed TLS handshake.
fn tls_failure(e: &lapin::Error) -> Option<String> {
    match e.kind() {
        ErrorKind::IOError(io) => polybus_core::tls::handshake_failure(&**io),
        _ => None,
    }
}

/// Opens an AMQP connection over TLS with `connector`, checking the server's certificate
/// against `name`: lapin's own TLS can neither skip verification nor check another name.
async fn connect_tls(
    uri: AMQPUri,
    connector: RustlsConnector,
    name: String,
    props: ConnectionProperties,
) -> lapin::Result<Connection> {
    let runtime = lapin::runtime::default_runtime()?;
    let connect = async move |uri: AMQPUri, runtime| {
        let plain = AMQPUri { scheme: AMQPScheme::AMQP, ..uri };
        let stream = plain.connect_async(&runtime).await?;
        Ok(stream.into_rustls(&connector, &name).await?)
    };
    Connection::connector(uri, runtime, connect, props).await
}

/// A connection shared by the channels of one role (publishing or consuming).
pub(crate) struct Link {
    settings: Arc<Settings>,
    role: &'static str,
    current: Mutex<Option<Arc<Connection>>>,
    closed: AtomicBool,
}

impl Link {
    /// A link that connects on first use.
    pub fn new(settings: Arc<Settings>, role: &'static str) -> Self {
        Link { settings, role, current: Mutex::new(None), closed: AtomicBool::new(false) }
    }

    /// The open connection, connecting (once) when there is none or it dropped.
    pub async fn connection(&self) -> Result<Arc<Connection>, LinkError> {
        let mut current = self.current.lock().await;
        if self.closed.load(Ordering::SeqCst) {
            return Err(LinkError::Closed);
        }
        if let Some(conn) = current.as_ref()
            && conn.status().connected()
        {
            return Ok(conn.clone());
        }
        let reconnect = current.is_some();
        let props = ConnectionProperties::default()
            .with_connection_name(format!("{} ({})", self.settings.name, self.role).into());
        let uri = self.settings.uri.clone();
        let conn = match &self.settings.tls {
            Some((connector, name)) => connect_tls(uri, connector.clone(), name.clone(), props).await,
            None => Connection::connect_uri(uri, props).await,
        }
        .map_err(|error| LinkError::Connect { message: self.settings.scrub(&error), error })?;
        if reconnect {
            tracing::info!(endpoint = %self.settings.endpoint, role = self.role, "reconnected to rabbitmq");
        }
        let conn = Arc::new(conn);
        *current = Some(conn.clone());
        Ok(conn)
    }

    /// True once [`close`](Link::close) was called.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Closes the connection; later calls to [`connection`](Link::connection) fail.
    pub async fn close(&self) -> Result<(), String> {
        let mut current = self.current.lock().await;
        self.closed.store(true, Ordering::SeqCst);
        match current.take() {
            Some(conn) if conn.status().connected() => {
                conn.close(200, "closed by polybus".into()).await.map_err(|e| self.settings.scrub(e))
            }
            _ => Ok(()),
        }
    }
}
