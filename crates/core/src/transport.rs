//! The transport contract: what every broker adapter implements.
//!
//! Semantics (the same on every broker): at-least-once delivery until acked; members of one
//! group compete, every group gets every message; `nack` redelivers, optionally after a delay;
//! a subscription holds at most `prefetch` unacked deliveries. Retry policy, dead-lettering
//! and concurrency are not here: they live once, in the `polybus` crate.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use serde_json::Value;

use crate::broker::BrokerType;
use crate::error::Result;
use crate::kind::BrokerKind;
use crate::message::Message;
use crate::ops::{GroupInfo, MessageQuery, ReplayFrom, StoredMessage};
use crate::secret;
use crate::topic::TopicSpec;

/// How an adapter provides a feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Support {
    /// The broker does it itself.
    Native,
    /// The adapter builds it from other broker features.
    Emulated,
    /// Not available on this broker.
    Unsupported,
}

impl Support {
    /// True unless unsupported.
    pub fn available(self) -> bool {
        self != Support::Unsupported
    }
}

/// What an adapter can do; the behaviour suite skips what is not declared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Capabilities {
    /// Messages are kept until acked and redelivered otherwise.
    pub at_least_once: bool,
    /// Messages with the same key are delivered in publish order within a group.
    pub ordering_per_key: bool,
    /// Delayed publish.
    pub delayed_delivery: Support,
    /// Nack with a redelivery delay.
    pub nack_delay: Support,
    /// Every group gets every message.
    pub fan_out: Support,
    /// A new group can read messages published before it existed.
    pub replay: bool,
    /// Deliveries carry an accurate attempt count.
    pub counts_attempts: bool,
    /// Largest payload the broker accepts, when it has a limit below 1 MiB + headers.
    pub max_payload_bytes: Option<usize>,
}

/// How to subscribe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeOptions {
    /// Consumer group: members of a group compete, every group gets every message.
    pub group: String,
    /// This member's name within the group.
    pub consumer: String,
    /// Most unacked deliveries held at once.
    pub prefetch: usize,
    /// An unacked delivery is redelivered after this long.
    pub ack_deadline: Duration,
}

impl SubscribeOptions {
    /// Options for `group` with defaults: prefetch 32, ack deadline 30 s, a random member name.
    pub fn new(group: impl Into<String>) -> Self {
        SubscribeOptions {
            group: group.into(),
            consumer: format!("c-{}", uuid::Uuid::new_v4().simple()),
            prefetch: 32,
            ack_deadline: Duration::from_secs(30),
        }
    }
}

/// Settles one delivery on its broker.
#[async_trait]
pub trait Acker: Send + Sync {
    /// Removes the message for this group.
    async fn ack(self: Box<Self>) -> Result<()>;
    /// Makes the message available again, after `delay` when given.
    async fn nack(self: Box<Self>, delay: Option<Duration>) -> Result<()>;
}

/// A received message and the right to settle it, exactly once.
pub struct Delivery {
    /// The message, with its attempt number.
    pub message: Message,
    acker: Box<dyn Acker>,
}

impl Delivery {
    /// A delivery settled through `acker`.
    pub fn new(message: Message, acker: Box<dyn Acker>) -> Self {
        Delivery { message, acker }
    }

    /// Acknowledges: the group will not see this message again.
    pub async fn ack(self) -> Result<()> {
        self.acker.ack().await
    }

    /// Negatively acknowledges: the message is redelivered, after `delay` when given.
    pub async fn nack(self, delay: Option<Duration>) -> Result<()> {
        self.acker.nack(delay).await
    }

    /// Splits into the message and its acker.
    pub fn into_parts(self) -> (Message, Box<dyn Acker>) {
        (self.message, self.acker)
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery").field("message", &self.message).finish_non_exhaustive()
    }
}

/// A stream of deliveries for one group member.
#[async_trait]
pub trait Subscription: Send {
    /// The next delivery; waits until one is available. `None` once closed.
    async fn next(&mut self) -> Option<Result<Delivery>>;

    /// Up to `max` deliveries (at least one): waits for the first as [`next`](Self::next)
    /// does, then takes what else is ready ([`next_ready`](Self::next_ready) with `max - 1`
    /// and `wait`). `None` once closed. Cancel-safe while it waits for the first delivery;
    /// once it has one it returns within `wait`.
    async fn next_batch(&mut self, max: usize, wait: Duration) -> Option<Result<Vec<Delivery>>> {
        let first = match self.next().await? {
            Ok(delivery) => delivery,
            Err(e) => return Some(Err(e)),
        };
        let mut batch = vec![first];
        if max > 1 {
            // An error now ends the batch; if it persists, the next call returns it.
            batch.extend(self.next_ready(max - 1, wait).await.unwrap_or_default());
        }
        Some(Ok(batch))
    }

    /// Up to `max` deliveries that are ready now or arrive within `wait`, without waiting
    /// for any in particular: empty when none came, or the subscription is closed. Returns
    /// within `wait`; when it is zero, without ever pending (so `next_batch` with no wait is
    /// cancel-safe throughout). An error only when nothing was taken.
    ///
    /// The default is built on `next`; an adapter that buffers fetched messages overrides it
    /// to take them in one go.
    async fn next_ready(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        let mut batch = Vec::new();
        let until = tokio::time::Instant::now() + wait;
        while batch.len() < max {
            // `next` is cancel-safe. With no wait it is polled once, not raced against a timer:
            // a timer whose deadline has passed still fires only on the runtime's next tick, so
            // the call would pend, and a caller racing it could drop the deliveries taken.
            let next = if wait.is_zero() {
                let mut next = std::pin::pin!(self.next());
                let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                match next.as_mut().poll(&mut cx) {
                    std::task::Poll::Ready(next) => next,
                    std::task::Poll::Pending => break,
                }
            } else {
                match tokio::time::timeout_at(until, self.next()).await {
                    Ok(next) => next,
                    Err(_) => break,
                }
            };
            match next {
                Some(Ok(delivery)) => batch.push(delivery),
                Some(Err(e)) if batch.is_empty() => return Err(e),
                Some(Err(_)) | None => break,
            }
        }
        Ok(batch)
    }

    /// Stops receiving ahead of [`close`](Self::close), so deliveries given back (nacked) after
    /// it go to other members rather than to this one's open fetch; `next` then ends. Brokers
    /// whose nacks cannot reach a closing member need nothing here.
    async fn stop(&mut self) -> Result<()> {
        Ok(())
    }

    /// Stops fetching; deliveries already handed out can still be settled.
    async fn close(&mut self) -> Result<()>;
}

/// A connection to one broker env.
#[async_trait]
pub trait Transport: Send + Sync {
    /// What this adapter can do.
    fn capabilities(&self) -> Capabilities;
    /// Creates the topic on the broker when it does not exist.
    async fn ensure_topic(&self, topic: &TopicSpec) -> Result<()>;
    /// Publishes one message (its id and publish time are already set).
    async fn publish(&self, topic: &TopicSpec, message: Message) -> Result<()>;
    /// Publishes several messages, in order.
    async fn publish_batch(&self, topic: &TopicSpec, messages: Vec<Message>) -> Result<()> {
        for message in messages {
            self.publish(topic, message).await?;
        }
        Ok(())
    }
    /// Joins `options.group` on `topic`, creating the group when needed.
    async fn subscribe(&self, topic: &TopicSpec, options: &SubscribeOptions)
    -> Result<Box<dyn Subscription>>;
    /// Checks the broker answers.
    async fn ping(&self) -> Result<()>;
    /// The topic's consumer groups with members, pending and lag, as far as the broker can tell.
    async fn groups(&self, _topic: &TopicSpec) -> Result<Vec<GroupInfo>> {
        Err(unsupported("listing consumer groups"))
    }
    /// Moves `group` back (or forward) so its next deliveries start at `from`.
    async fn replay(&self, _topic: &TopicSpec, _group: &str, _from: ReplayFrom) -> Result<()> {
        Err(unsupported("replay (it does not retain consumed messages)"))
    }
    /// Reads stored messages back without consuming them.
    async fn messages(&self, _topic: &TopicSpec, _query: &MessageQuery) -> Result<Vec<StoredMessage>> {
        Err(unsupported("message query (it does not retain consumed messages)"))
    }
    /// Flushes pending publishes and closes the connection.
    async fn close(&self) -> Result<()>;
}

/// The error of an operation an adapter does not provide; `Bus` names the broker type.
pub fn unsupported(what: &str) -> crate::error::Error {
    crate::error::Error::Unsupported { broker_type: String::new(), what: what.to_string() }
}

/// Where to connect: a broker env with its secrets already resolved.
#[derive(Clone)]
pub struct ConnectTarget {
    /// Broker tag.
    pub broker: String,
    /// Env slug.
    pub env: String,
    /// Broker type.
    pub broker_type: BrokerType,
    /// Config with `${VAR}` references resolved (never log it).
    pub config: Value,
}

impl fmt::Debug for ConnectTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut config = self.config.clone();
        secret::redact(&mut config);
        f.debug_struct("ConnectTarget")
            .field("broker", &self.broker)
            .field("env", &self.env)
            .field("broker_type", &self.broker_type)
            .field("config", &config)
            .finish()
    }
}

/// Makes transports for one broker type; as a [`BrokerKind`] it declares the type's name and
/// checks its definitions.
#[async_trait]
pub trait Connector: BrokerKind {
    /// Connects to the broker env described by `target`.
    async fn connect(&self, target: &ConnectTarget) -> Result<Arc<dyn Transport>>;
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::future::Future;
    use std::task::{Context, Poll, Waker};

    use super::*;

    /// Hands out what it holds, then waits for ever.
    struct Queued(VecDeque<Delivery>);

    struct NoAcker;

    #[async_trait]
    impl Acker for NoAcker {
        async fn ack(self: Box<Self>) -> Result<()> {
            Ok(())
        }
        async fn nack(self: Box<Self>, _: Option<Duration>) -> Result<()> {
            Ok(())
        }
    }

    #[async_trait]
    impl Subscription for Queued {
        async fn next(&mut self) -> Option<Result<Delivery>> {
            match self.0.pop_front() {
                Some(delivery) => Some(Ok(delivery)),
                None => std::future::pending().await,
            }
        }
        async fn close(&mut self) -> Result<()> {
            Ok(())
        }
    }

    fn queued(n: usize) -> Queued {
        Queued((0..n).map(|i| Delivery::new(Message::text(i.to_string()), Box::new(NoAcker))).collect())
    }

    /// A batch with no wait is taken in one poll: racing it (`select!`) can never drop deliveries.
    #[tokio::test]
    async fn next_batch_without_wait_takes_what_is_ready_in_one_poll() {
        let mut sub = queued(3);
        let mut cx = Context::from_waker(Waker::noop());
        let mut batch = std::pin::pin!(sub.next_batch(10, Duration::ZERO));
        let Poll::Ready(Some(Ok(batch))) = batch.as_mut().poll(&mut cx) else {
            panic!("the batch was not ready at once")
        };
        assert_eq!(batch.len(), 3);
        let mut sub = queued(5);
        let batch = sub.next_batch(2, Duration::ZERO).await.expect("open").expect("batch");
        assert_eq!(batch.len(), 2, "never more than max");
        let rest = sub.next_ready(10, Duration::from_millis(20)).await.expect("ready");
        assert_eq!(rest.len(), 3);
    }
}
