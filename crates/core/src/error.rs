//! Errors shared by every polybus crate, each with a stable machine-readable code.
//!
//! # Errors
//!
//! One [`Error`] enum for every crate. Each variant has a stable [`code`](Error::code)
//! (`TOPIC_NOT_FOUND`, `PUBLISH_FAILED`, …) that the CLI prints and the HTTP API returns;
//! codes never change meaning. Texts say what to do and never contain a secret: every error
//! leaving a connection passes through the [`Scrubber`](crate::scrub::Scrubber), which
//! rewrites each text the error shows ([`Error::map_text`]), the cause's included.
//!
//! A broker failure is an [`Error::Transport`]: the operation ([`Op`], which gives the
//! code), the target (broker type and native name), a message, a [`FailureKind`] and, when
//! the adapter kept it, the client library's error as a [`Cause`].
//!
//! - **Retryable or not.** [`Error::is_retryable`] is true for the kinds `Unavailable`
//!   (connection refused or lost, broker down or busy), `Timeout` and `Unknown` (the adapter
//!   cannot tell), and for a failing registry store; false for `Auth`, `NotFound`,
//!   `TooLarge`, `Invalid` and for every non-transport error (a bad definition, a missing
//!   secret, a closed subscription, a lost lease). Adapters set the kind from the client's
//!   typed error (error kinds and codes of redis, lapin, async-nats, rumqttc, rdkafka…),
//!   never from its text.
//! - **The cause.** [`Error::cause`] gives the client's error for matching
//!   ([`Cause::downcast_ref`]); `std::error::Error::source` gives the same [`Cause`], which
//!   shows the scrubbed text and ends the chain there, so walking the chain cannot reach an
//!   unscrubbed text. The message already includes the cause's text: print the error, not
//!   its chain.
//! - **Handlers.** A consume handler returns `polybus::HandlerError`: any error converts
//!   into one and is retried with backoff; `HandlerError::permanent(..)` dead-letters the
//!   message at once. With a `Subscriber`, `Delivery::fail` makes the same decision.

use std::error::Error as StdError;
use std::fmt;

/// Result with the polybus [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A definition that failed validation: where, which field, and what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    /// The env slug the problem is in, when it is inside an env.
    pub env: Option<String>,
    /// Dotted path of the offending field, e.g. `config.port`.
    pub field: String,
    /// What was expected or what is wrong.
    pub message: String,
}

impl ValidationError {
    /// A problem with a top-level field.
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { env: None, field: field.into(), message: message.into() }
    }

    /// A problem with a field inside the env `env`.
    pub fn in_env(env: impl Into<String>, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { env: Some(env.into()), field: field.into(), message: message.into() }
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.env {
            Some(env) => write!(f, "env `{env}`: field `{}`: {}", self.field, self.message),
            None => write!(f, "field `{}`: {}", self.field, self.message),
        }
    }
}

impl std::error::Error for ValidationError {}

/// The data-plane operation that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Connecting to the broker.
    Connect,
    /// Publishing one or more messages.
    Publish,
    /// Creating a subscription.
    Subscribe,
    /// Receiving the next message.
    Receive,
    /// Acknowledging a message.
    Ack,
    /// Negatively acknowledging a message.
    Nack,
    /// Creating the topic or its groups on the broker.
    EnsureTopic,
    /// Health check.
    Ping,
    /// Closing the connection.
    Close,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Connect => "connect",
            Op::Publish => "publish",
            Op::Subscribe => "subscribe",
            Op::Receive => "receive",
            Op::Ack => "ack",
            Op::Nack => "nack",
            Op::EnsureTopic => "ensure topic",
            Op::Ping => "ping",
            Op::Close => "close",
        })
    }
}

/// What kind of broker failure a [`Error::Transport`] is: whether trying again can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// The connection was refused or lost, or the broker is unavailable or overloaded.
    Unavailable,
    /// The broker did not answer in time.
    Timeout,
    /// The credentials were refused, or they do not allow the operation.
    Auth,
    /// The topic, queue, stream, group or subscription does not exist.
    NotFound,
    /// The message or batch is larger than the broker accepts.
    TooLarge,
    /// The broker refused the request as invalid (a name, an argument, a conflicting setting).
    Invalid,
    /// The adapter cannot tell; treated as retryable.
    Unknown,
}

impl FailureKind {
    /// True when the same operation may succeed if tried again later.
    pub fn is_retryable(self) -> bool {
        matches!(self, FailureKind::Unavailable | FailureKind::Timeout | FailureKind::Unknown)
    }

    /// Stable machine-readable name.
    pub fn code(self) -> &'static str {
        match self {
            FailureKind::Unavailable => "UNAVAILABLE",
            FailureKind::Timeout => "TIMEOUT",
            FailureKind::Auth => "AUTH_FAILED",
            FailureKind::NotFound => "NOT_FOUND",
            FailureKind::TooLarge => "TOO_LARGE",
            FailureKind::Invalid => "INVALID",
            FailureKind::Unknown => "UNKNOWN",
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// The client library's error behind a [`Error::Transport`].
///
/// It shows the text of the whole chain of the original error, scrubbed like every other
/// error text, and ends the chain there: the original error's own text may hold resolved
/// secrets, so it is reachable only on purpose, for matching ([`Cause::downcast_ref`]).
pub struct Cause {
    shown: String,
    error: Box<dyn StdError + Send + Sync>,
}

impl Cause {
    /// Keeps `error`, showing its text and that of the errors under it.
    pub fn new(error: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        let error = error.into();
        let mut shown = error.to_string();
        let mut under = error.source();
        while let Some(e) = under {
            let text = e.to_string();
            // Many clients repeat their source's text in their own.
            if !shown.contains(&text) {
                shown.push_str(": ");
                shown.push_str(&text);
            }
            under = e.source();
        }
        Cause { shown, error }
    }

    /// The original error, when it is a `T`. Its text is not scrubbed: do not show it.
    pub fn downcast_ref<T: StdError + 'static>(&self) -> Option<&T> {
        self.error.downcast_ref::<T>()
    }

    /// The shown text, after `f` (the scrubber) rewrote it.
    pub(crate) fn map_text(self, f: impl Fn(String) -> String) -> Self {
        Cause { shown: f(self.shown), error: self.error }
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl fmt::Debug for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Cause").field(&self.shown).finish()
    }
}

impl StdError for Cause {}

/// Everything that can go wrong in polybus.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A broker or topic definition is invalid.
    #[error("invalid definition: {0}")]
    Validation(#[from] ValidationError),
    /// No broker with this tag.
    #[error("broker `{0}` not found")]
    BrokerNotFound(String),
    /// The broker exists but has no such env.
    #[error("broker `{tag}` has no env `{env}` (envs: {available})")]
    BrokerEnvNotFound {
        /// Broker tag.
        tag: String,
        /// Requested env slug.
        env: String,
        /// The env slugs the broker has, comma separated.
        available: String,
    },
    /// No topic with this event name.
    #[error("topic `{0}` not found")]
    TopicNotFound(String),
    /// A broker or topic with this tag exists already.
    #[error("{kind} `{tag}` already exists")]
    AlreadyExists {
        /// `broker` or `topic`.
        kind: &'static str,
        /// The tag that is taken.
        tag: String,
    },
    /// An update carried a version that is no longer current.
    #[error(
        "{kind} `{tag}` was changed meanwhile: update sent version {sent}, current is {current}; fetch it again and retry"
    )]
    Conflict {
        /// `broker` or `topic`.
        kind: &'static str,
        /// Its tag.
        tag: String,
        /// The version the update was based on.
        sent: u64,
        /// The version stored now.
        current: u64,
    },
    /// A broker cannot be deleted while topics use it.
    #[error("broker `{tag}` still has topics ({topics}); delete them first or delete with force")]
    InUse {
        /// Broker tag.
        tag: String,
        /// The topics that use it, comma separated.
        topics: String,
    },
    /// A `${VAR}` reference names an environment variable that is not set.
    #[error("secret reference `${{{var}}}` in {field}: environment variable `{var}` is not set")]
    MissingSecret {
        /// The environment variable.
        var: String,
        /// Where the reference is.
        field: String,
    },
    /// A `${VAR}` refused by policy, a `$Secret{name}` that cannot be resolved, or the
    /// secret store failing.
    #[error(transparent)]
    Secret(#[from] crate::secret::SecretError),
    /// The broker type cannot do what was asked.
    #[error("{broker_type} does not support {what}")]
    Unsupported {
        /// Broker type name.
        broker_type: String,
        /// The missing feature.
        what: String,
    },
    /// No adapter for this broker type is compiled in.
    #[error("no adapter for broker type `{0}` in this build (enable the polybus feature of that name)")]
    NoAdapter(String),
    /// A data-plane operation failed on the broker.
    #[error("{op} failed on {target}: {message}")]
    Transport {
        /// The operation.
        op: Op,
        /// Broker type and native name involved (never credentials).
        target: String,
        /// What the broker or client said (already includes the text of `source`).
        message: String,
        /// What kind of failure it is; decides [`Error::is_retryable`].
        kind: FailureKind,
        /// The client library's error, when the adapter kept it.
        #[source]
        source: Option<Cause>,
    },
    /// The registry store failed.
    #[error("registry storage: {0}")]
    Storage(String),
    /// The subscription or transport has been closed.
    #[error("closed: {0}")]
    Closed(String),
    /// A delivery was already acknowledged or its lease expired and was taken by another member.
    #[error("delivery {0} is no longer held by this consumer (already settled, or its lease expired)")]
    LeaseLost(String),
    /// Another publisher is publishing a message with this idempotency key right now.
    #[error(
        "idempotency key `{key}` of {event} is being published by another publisher (message {message_id}); retry shortly: you will get that message's id, or publish if it failed"
    )]
    IdempotencyPending {
        /// The event.
        event: String,
        /// The idempotency key.
        key: String,
        /// The id of the message the other publisher is publishing.
        message_id: String,
    },
}

impl Error {
    /// Stable machine-readable code, shared by the CLI and the HTTP API.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Validation(_) => "VALIDATION_FAILED",
            Error::BrokerNotFound(_) => "BROKER_NOT_FOUND",
            Error::BrokerEnvNotFound { .. } => "BROKER_ENV_NOT_FOUND",
            Error::TopicNotFound(_) => "TOPIC_NOT_FOUND",
            Error::AlreadyExists { .. } => "ALREADY_EXISTS",
            Error::Conflict { .. } => "CONFLICT",
            Error::InUse { .. } => "IN_USE",
            Error::MissingSecret { .. } => "SECRET_MISSING",
            Error::Secret(e) => e.code(),
            Error::Unsupported { .. } => "UNSUPPORTED",
            Error::NoAdapter(_) => "NO_ADAPTER",
            Error::Transport { op, .. } => match op {
                Op::Connect | Op::Ping => "CONNECT_FAILED",
                Op::Publish => "PUBLISH_FAILED",
                Op::Subscribe | Op::Receive | Op::EnsureTopic => "SUBSCRIBE_FAILED",
                Op::Ack | Op::Nack | Op::Close => "ACK_FAILED",
            },
            Error::Storage(_) => "STORAGE_FAILED",
            Error::Closed(_) => "CLOSED",
            Error::LeaseLost(_) => "LEASE_LOST",
            Error::IdempotencyPending { .. } => "IDEMPOTENCY_PENDING",
        }
    }

    /// True when the same operation may succeed if tried again later: a transport failure
    /// of a retryable [`FailureKind`], or the registry store failing. A definition, a
    /// secret, a closed subscription or a lost lease do not get better by retrying; a publish
    /// whose idempotency key another publisher holds does.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Transport { kind, .. } => kind.is_retryable(),
            Error::Storage(_) | Error::IdempotencyPending { .. } => true,
            _ => false,
        }
    }

    /// The kind of a transport failure.
    pub fn failure_kind(&self) -> Option<FailureKind> {
        match self {
            Error::Transport { kind, .. } => Some(*kind),
            _ => None,
        }
    }

    /// The client library's error behind a transport failure, when the adapter kept it.
    pub fn cause(&self) -> Option<&Cause> {
        match self {
            Error::Transport { source, .. } => source.as_ref(),
            _ => None,
        }
    }

    /// A [`Error::Transport`] of unknown kind (retryable) with only a message.
    pub fn transport(op: Op, target: impl Into<String>, message: impl fmt::Display) -> Self {
        Error::Transport {
            op,
            target: target.into(),
            message: message.to_string(),
            kind: FailureKind::Unknown,
            source: None,
        }
    }

    /// A [`Error::Transport`] of `kind` caused by the client library's `error`, whose text
    /// becomes the message.
    pub fn transport_from(
        op: Op,
        target: impl Into<String>,
        kind: FailureKind,
        error: impl Into<Box<dyn StdError + Send + Sync>>,
    ) -> Self {
        let cause = Cause::new(error);
        Error::Transport { op, target: target.into(), message: cause.to_string(), kind, source: Some(cause) }
    }

    /// This error with its transport failure kind set to `kind` (other errors unchanged).
    pub fn with_kind(mut self, kind: FailureKind) -> Self {
        if let Error::Transport { kind: k, .. } = &mut self {
            *k = kind;
        }
        self
    }

    /// This transport error with the client library's `error` kept as its cause (other errors
    /// unchanged); its message stays as it is.
    pub fn with_cause(mut self, error: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        if let Error::Transport { source, .. } = &mut self {
            *source = Some(Cause::new(error));
        }
        self
    }

    /// This error with `f` applied to every text it shows (how the scrubber replaces
    /// resolved secret values with their references).
    pub fn map_text(self, f: impl Fn(String) -> String) -> Error {
        match self {
            Error::Validation(v) => Error::Validation(ValidationError {
                env: v.env.map(&f),
                field: f(v.field),
                message: f(v.message),
            }),
            Error::BrokerNotFound(tag) => Error::BrokerNotFound(f(tag)),
            Error::BrokerEnvNotFound { tag, env, available } => {
                Error::BrokerEnvNotFound { tag: f(tag), env: f(env), available: f(available) }
            }
            Error::TopicNotFound(event) => Error::TopicNotFound(f(event)),
            Error::AlreadyExists { kind, tag } => Error::AlreadyExists { kind, tag: f(tag) },
            Error::Conflict { kind, tag, sent, current } => {
                Error::Conflict { kind, tag: f(tag), sent, current }
            }
            Error::InUse { tag, topics } => Error::InUse { tag: f(tag), topics: f(topics) },
            Error::MissingSecret { var, field } => Error::MissingSecret { var, field },
            Error::Secret(e) => Error::Secret(e),
            Error::Unsupported { broker_type, what } => Error::Unsupported { broker_type, what: f(what) },
            Error::NoAdapter(name) => Error::NoAdapter(f(name)),
            Error::Transport { op, target, message, kind, source } => Error::Transport {
                op,
                target: f(target),
                message: f(message),
                kind,
                source: source.map(|cause| cause.map_text(&f)),
            },
            Error::Storage(message) => Error::Storage(f(message)),
            Error::Closed(message) => Error::Closed(f(message)),
            Error::LeaseLost(id) => Error::LeaseLost(f(id)),
            Error::IdempotencyPending { event, key, message_id } => {
                Error::IdempotencyPending { event: f(event), key: f(key), message_id }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("handshake rejected")]
    struct Rejected(#[source] std::io::Error);

    #[test]
    fn the_cause_shows_the_whole_chain_once() {
        let inner = std::io::Error::other("bad password");
        let error = Error::transport_from(Op::Connect, "rabbitmq h:5672", FailureKind::Auth, Rejected(inner));
        assert_eq!(error.to_string(), "connect failed on rabbitmq h:5672: handshake rejected: bad password");
        assert_eq!(error.code(), "CONNECT_FAILED");
        assert_eq!(error.failure_kind(), Some(FailureKind::Auth));
        assert!(!error.is_retryable());
        assert!(error.cause().and_then(|c| c.downcast_ref::<Rejected>()).is_some());
    }

    #[test]
    fn only_transient_failures_are_retryable() {
        let plain = Error::transport(Op::Publish, "redis s", "connection reset");
        assert!(plain.is_retryable(), "an unknown transport failure is retried");
        for (kind, retryable) in [
            (FailureKind::Unavailable, true),
            (FailureKind::Timeout, true),
            (FailureKind::Auth, false),
            (FailureKind::NotFound, false),
            (FailureKind::TooLarge, false),
            (FailureKind::Invalid, false),
        ] {
            let error = Error::transport(Op::Publish, "redis s", "x").with_kind(kind);
            assert_eq!(error.is_retryable(), retryable, "{kind}");
            assert_eq!(error.code(), "PUBLISH_FAILED", "the code names the operation");
        }
        assert!(Error::Storage("database is locked".into()).is_retryable());
        assert!(!Error::TopicNotFound("orders".into()).is_retryable());
        assert!(!Error::Closed("subscription".into()).with_kind(FailureKind::Timeout).is_retryable());
    }
}
