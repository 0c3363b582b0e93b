//! Pull requests to a durable consumer, made again after failures and reconnections.

use std::time::Duration;

use async_nats::Subject;
use async_nats::jetstream::consumer::{PullConsumer, pull};
use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::transport::{Shared, stream_gone};

/// How long one pull request waits on the server for messages.
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// How long after its expiry a pull request is given up without the server saying so.
const PULL_GRACE: Duration = Duration::from_secs(2);
/// Longest pause between attempts after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Why pulling failed.
pub enum PullError {
    /// The stream does not exist (any more).
    StreamGone(String),
    /// Anything else; worth trying again.
    Failed(String),
}

impl PullError {
    /// What went wrong.
    pub fn message(&self) -> &str {
        match self {
            PullError::StreamGone(m) | PullError::Failed(m) => m,
        }
    }
}

/// Makes pull requests on one durable consumer, recreating it after failures.
pub struct Puller {
    shared: Shared,
    stream: String,
    config: pull::Config,
    consumer: Option<PullConsumer>,
    failures: u32,
}

impl Puller {
    /// A puller of the consumer `config` on `stream`; `consumer` when it was just created.
    pub fn new(shared: Shared, stream: String, config: pull::Config, consumer: Option<PullConsumer>) -> Self {
        Puller { shared, stream, config, consumer, failures: 0 }
    }

    /// The stream pulled from.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// Asks for up to `n` messages.
    pub async fn batch(&mut self, n: usize) -> Result<Batch, PullError> {
        let consumer = match &self.consumer {
            Some(consumer) => consumer,
            None => {
                crate::replay::keep_start(&self.shared, &self.stream, &mut self.config).await;
                let created = self
                    .shared
                    .js
                    .create_consumer_on_stream(self.config.clone(), self.stream.clone())
                    .await
                    .map_err(|e| {
                        let message = self.shared.secrets.scrub(&e);
                        if stream_gone(&e) {
                            PullError::StreamGone(message)
                        } else {
                            PullError::Failed(message)
                        }
                    })?;
                self.consumer.insert(created)
            }
        };
        // Pull requests made before a reconnection are forgotten by the server.
        let mut connections = self.shared.connections.clone();
        connections.borrow_and_update();
        let inner = consumer
            .batch()
            .max_messages(n)
            .expires(PULL_EXPIRES)
            .messages()
            .await
            .map_err(|e| PullError::Failed(self.shared.secrets.scrub(e)))?;
        let expires = Instant::now() + PULL_EXPIRES;
        Ok(Batch { inner, expires, deadline: expires + PULL_GRACE, connections })
    }

    /// Records a failure; the consumer is looked up (or made) again next time. Returns how
    /// long to pause first.
    pub fn failed(&mut self) -> Duration {
        self.consumer = None;
        self.failures = self.failures.saturating_add(1);
        (Duration::from_millis(100) * 2u32.saturating_pow(self.failures.min(8))).min(MAX_BACKOFF)
    }

    /// Records a success.
    pub fn succeeded(&mut self) {
        self.failures = 0;
    }

    /// Failures in a row.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// The messages answering one pull request.
pub struct Batch {
    inner: pull::Batch,
    /// When the server ends the request at the latest.
    expires: Instant,
    deadline: Instant,
    connections: watch::Receiver<u64>,
}

impl Batch {
    /// When the server ends this request at the latest: until then, a message given back to
    /// the group can be sent to it again, even once its inbox is dropped.
    pub fn expires(&self) -> Instant {
        self.expires
    }

    /// The next message; `None` once the request is answered, expired, or lost to a reconnection.
    pub async fn next(&mut self) -> Option<Result<jetstream::Message, String>> {
        let reconnected = async {
            if self.connections.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            item = self.inner.next() => item.map(|r| r.map_err(|e| e.to_string())),
            () = tokio::time::sleep_until(self.deadline) => None,
            () = reconnected => None,
        }
    }
}

/// Settles a delivery and waits for the server to confirm.
pub async fn settle(shared: &Shared, reply: &Subject, kind: AckKind) -> Result<(), String> {
    let _in_flight = shared.in_flight.read().await;
    shared.client.request(reply.clone(), kind.into()).await.map(drop).map_err(|e| shared.secrets.scrub(e))
}

/// Resolves once the transport is closed.
pub async fn closed(closed: &mut watch::Receiver<bool>) {
    // An error means the transport is gone: closed as well.
    let _ = closed.wait_for(|closed| *closed).await;
}
