//! polybus domain model: broker and topic definitions with their validation, secrets,
//! the [`Message`] type and the [`Transport`] contract every adapter implements.
//!
//! The error model (codes, retryable kinds, kept causes, scrubbing) is described in [`error`];
//! the [`kit`] holds the concurrency pieces adapters share.

pub mod broker;
pub mod config;
pub mod error;
pub mod headers;
pub mod kind;
pub mod kit;
pub mod limits;
pub mod message;
pub mod names;
pub mod ops;
pub mod redact;
pub mod schema;
pub mod scrub;
pub mod secret;
pub mod strict;
pub mod tag;
pub mod tls;
pub mod topic;
pub mod transport;
pub mod wire;

pub use broker::{Broker, BrokerEnv, BrokerPatch, BrokerType};
pub use error::{Cause, Error, FailureKind, Op, Result, ValidationError};
pub use kind::{BrokerKind, Kinds};
pub use message::Message;
pub use ops::{GroupInfo, MessageQuery, ReplayFrom, StoredMessage};
pub use schemars;
pub use tag::EventRef;
pub use topic::{Topic, TopicEnv, TopicPatch, TopicSpec};
pub use transport::{
    Acker, Capabilities, ConnectTarget, Connector, Delivery, SubscribeOptions, Subscription, Support,
    Transport,
};
