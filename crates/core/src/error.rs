//! Errors shared by every polybus crate, each with a stable machine-readable code.

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
        /// What the broker or client said.
        message: String,
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
        }
    }

    /// Shorthand for a [`Error::Transport`].
    pub fn transport(op: Op, target: impl Into<String>, message: impl fmt::Display) -> Self {
        Error::Transport { op, target: target.into(), message: message.to_string() }
    }
}
