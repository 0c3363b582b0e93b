//! The transport: publishing with `XADD` through a reconnecting connection manager.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use polybus_core::{
    Capabilities, Error, FailureKind, GroupInfo, Message, MessageQuery, Op, ReplayFrom, Result,
    StoredMessage, SubscribeOptions, Subscription, Support, TopicSpec, Transport,
};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncConnectionConfig, Client, Cmd, ErrorKind, RedisError, RedisResult, ServerErrorKind, Value};
use tokio::sync::watch;

use crate::config::{Settings, connect_error};
use crate::{fields, scripts, subscription};

/// Longest wait for a TCP (and TLS) connection to be established.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for the reply to a non-blocking command.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Times a command that failed because the connection broke is sent again.
const COMMAND_RETRIES: u32 = 5;

/// What the transport and its subscriptions share.
pub(crate) struct Shared {
    /// Makes the dedicated connections of blocking reads.
    pub client: Client,
    /// Every non-blocking command; reconnects by itself.
    pub manager: ConnectionManager,
    /// `host:port`, for errors and logs.
    pub address: String,
    /// Approximate stream length bound.
    pub max_len: Option<u64>,
    /// Set once the transport is closed; subscriptions stop when it is.
    pub closed: watch::Sender<bool>,
}

impl Shared {
    /// Runs `command` on the manager, sending it again (after a short backoff) when the
    /// connection broke under it; returns its value and whether it was sent more than once.
    pub async fn retrying<T, F, Fut>(&self, op: Op, stream: &str, mut command: F) -> Result<(T, bool)>
    where
        F: FnMut(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let mut attempt = 0;
        loop {
            match command(self.manager.clone()).await {
                Ok(value) => return Ok((value, attempt > 0)),
                Err(e) if attempt < COMMAND_RETRIES && connection_lost(&e) => {
                    attempt += 1;
                    let wait = Duration::from_millis(50 << attempt);
                    tracing::debug!(address = %self.address, stream, %op, error = %e, retry_in = ?wait,
                        "redis connection lost; sending again");
                    tokio::time::sleep(wait).await;
                }
                Err(e) => return Err(failed(op, target(stream), e)),
            }
        }
    }
}

/// The error target for `stream`.
pub(crate) fn target(stream: &str) -> String {
    format!("redis {stream}")
}

/// A transport error keeping Redis's error and saying what kind of failure it is.
pub(crate) fn failed(op: Op, target: impl Into<String>, e: RedisError) -> Error {
    Error::transport_from(op, target, failure_kind(&e), e)
}

/// What kind of failure `e` is, from its kind and the code of the server's reply.
pub(crate) fn failure_kind(e: &RedisError) -> FailureKind {
    if e.is_timeout() {
        return FailureKind::Timeout;
    }
    match e.kind() {
        ErrorKind::AuthenticationFailed | ErrorKind::Server(ServerErrorKind::NoPerm) => FailureKind::Auth,
        ErrorKind::Io
        | ErrorKind::ClusterConnectionNotFound
        | ErrorKind::Server(
            ServerErrorKind::BusyLoading
            | ServerErrorKind::TryAgain
            | ServerErrorKind::ClusterDown
            | ServerErrorKind::MasterDown
            | ServerErrorKind::ReadOnly,
        ) => FailureKind::Unavailable,
        ErrorKind::InvalidClientConfig | ErrorKind::UnexpectedReturnType | ErrorKind::Parse => {
            FailureKind::Invalid
        }
        _ => match e.code() {
            Some("NOAUTH" | "WRONGPASS") => FailureKind::Auth,
            Some(NO_GROUP) => FailureKind::NotFound,
            Some(GROUP_EXISTS | "WRONGTYPE") => FailureKind::Invalid,
            _ => FailureKind::Unknown,
        },
    }
}

/// The reply code when the stream or the group does not exist.
pub(crate) const NO_GROUP: &str = "NOGROUP";
/// The reply code of `XGROUP CREATE` when the group exists already.
pub(crate) const GROUP_EXISTS: &str = "BUSYGROUP";

/// The reply code of the Redis error behind `e`, when there is one.
pub(crate) fn reply_code(e: &Error) -> Option<&str> {
    e.cause().and_then(|cause| cause.downcast_ref::<RedisError>()).and_then(RedisError::code)
}

/// True when `e` means the connection broke (the command may or may not have run).
pub(crate) fn connection_lost(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_unrecoverable_error()
}

/// A connection to one Redis env.
pub struct RedisTransport {
    shared: Arc<Shared>,
}

impl RedisTransport {
    /// Connects and returns once Redis answers `PING`.
    pub(crate) async fn connect(settings: Settings) -> Result<RedisTransport> {
        let address = settings.address.clone();
        let client = Client::open(settings.info).map_err(|e| connect_error(&address, e))?;
        // One attempt, so a wrong address or TLS setting fails at once; the manager's own
        // retries are for reconnecting later.
        let probe = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&probe)
            .await
            .map_err(|e| connect_error(&address, e))?;
        redis::cmd("PING").query_async::<String>(&mut conn).await.map_err(|e| connect_error(&address, e))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(4)
            .set_max_delay(Duration::from_secs(1));
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|e| connect_error(&address, e))?;
        let (closed, _) = watch::channel(false);
        tracing::debug!(%address, "connected to redis");
        Ok(RedisTransport {
            shared: Arc::new(Shared { client, manager, address, max_len: settings.max_len, closed }),
        })
    }

    /// What the transport and its subscriptions share.
    pub(crate) fn shared(&self) -> &Shared {
        &self.shared
    }

    fn check_open(&self, op: Op) -> Result<()> {
        if *self.shared.closed.borrow() {
            return Err(Error::Closed(format!("redis transport to {} ({op})", self.shared.address)));
        }
        Ok(())
    }

    /// The command that publishes `message` to `stream`: `XADD`, or the delayed-publish script.
    fn publish_command(&self, stream: &str, message: &Message) -> Cmd {
        match message.delay.filter(|d| !d.is_zero()) {
            None => {
                let mut cmd = redis::cmd("XADD");
                cmd.arg(stream);
                if let Some(max_len) = self.shared.max_len {
                    cmd.arg("MAXLEN").arg("~").arg(max_len);
                }
                cmd.arg("*");
                fields::each(message, |name, value| {
                    cmd.arg(name).arg(value);
                });
                cmd
            }
            Some(delay) => {
                // EVAL rather than EVALSHA: it also works inside a pipeline on a server that
                // has not seen the script yet, and Redis caches the compiled script anyway.
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(scripts::PUBLISH_DELAYED)
                    .arg(1)
                    .arg(scripts::delayed_key(stream))
                    .arg(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX))
                    .arg(uuid::Uuid::new_v4().simple().to_string());
                fields::each(message, |name, value| {
                    cmd.arg(name).arg(value);
                });
                cmd
            }
        }
    }
}

#[async_trait]
impl Transport for RedisTransport {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            at_least_once: true,
            ordering_per_key: false,
            delayed_delivery: Support::Emulated,
            nack_delay: Support::Emulated,
            fan_out: Support::Native,
            replay: true,
            counts_attempts: true,
            max_payload_bytes: None,
        }
    }

    async fn ensure_topic(&self, topic: &TopicSpec) -> Result<()> {
        self.check_open(Op::EnsureTopic)?;
        let stream = topic.native_name.as_str();
        let (kind, _) = self
            .shared
            .retrying(Op::EnsureTopic, stream, |mut conn| async move {
                redis::cmd("TYPE").arg(stream).query_async::<String>(&mut conn).await
            })
            .await?;
        // The stream itself appears with the first publish or group.
        match kind.as_str() {
            "none" | "stream" => Ok(()),
            other => Err(Error::transport(
                Op::EnsureTopic,
                target(stream),
                format!("key `{stream}` holds a {other}, not a stream; choose another native name"),
            )
            .with_kind(FailureKind::Invalid)),
        }
    }

    async fn publish(&self, topic: &TopicSpec, message: Message) -> Result<()> {
        self.check_open(Op::Publish)?;
        let command = self.publish_command(&topic.native_name, &message);
        self.shared
            .retrying(Op::Publish, &topic.native_name, |mut conn| {
                let command = &command;
                async move { command.query_async::<Value>(&mut conn).await }
            })
            .await?;
        Ok(())
    }

    async fn publish_batch(&self, topic: &TopicSpec, messages: Vec<Message>) -> Result<()> {
        self.check_open(Op::Publish)?;
        if messages.is_empty() {
            return Ok(());
        }
        let mut pipeline = redis::pipe();
        for message in &messages {
            pipeline.add_command(self.publish_command(&topic.native_name, message));
        }
        self.shared
            .retrying(Op::Publish, &topic.native_name, |mut conn| {
                let pipeline = &pipeline;
                async move { pipeline.query_async::<Vec<Value>>(&mut conn).await }
            })
            .await?;
        Ok(())
    }

    async fn subscribe(
        &self,
        topic: &TopicSpec,
        options: &SubscribeOptions,
    ) -> Result<Box<dyn Subscription>> {
        self.check_open(Op::Subscribe)?;
        let subscription =
            subscription::RedisSubscription::start(self.shared.clone(), topic, options).await?;
        Ok(Box::new(subscription))
    }

    async fn groups(&self, topic: &TopicSpec) -> Result<Vec<GroupInfo>> {
        self.check_open(Op::Receive)?;
        crate::groups::of_stream(&self.shared, &topic.native_name).await
    }

    async fn ping(&self) -> Result<()> {
        let mut conn = self.shared.manager.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map_err(|e| failed(Op::Ping, format!("redis {}", self.shared.address), e))?;
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        // Publishes are written before `publish` returns: nothing is left to flush.
        self.shared.closed.send_replace(true);
        Ok(())
    }

    async fn replay(&self, topic: &TopicSpec, group: &str, from: ReplayFrom) -> Result<()> {
        self.replay_group(topic, group, from).await
    }

    async fn messages(&self, topic: &TopicSpec, query: &MessageQuery) -> Result<Vec<StoredMessage>> {
        self.stored_messages(topic, query).await
    }
}
