//! [`NatsTransport`]: publish, ensure topic and subscribe on JetStream.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{self, ConsumerErrorKind, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, Context, ErrorCode};
use async_nats::{Client, HeaderMap};
use async_trait::async_trait;
use bytes::Bytes;
use chrono::Datelike;
use polybus_core::{
    Capabilities, Error, FailureKind, GroupInfo, Message, MessageQuery, Op, ReplayFrom, Result,
    StoredMessage, SubscribeOptions, Subscription, Support, TopicSpec, Transport, wire,
};
use tokio::sync::{RwLock, watch};
use tokio::task::JoinHandle;

use crate::codec::{self, DELIVER_AT};
use crate::connect::{Connection, Secrets};
use crate::mover;
use crate::names::{self, TopicNames};
use crate::replay;
use crate::subscription::NatsSubscription;

/// Room left for headers when the server's `max_payload` is below 1 MiB plus headers.
const HEADER_ALLOWANCE: usize = 8 * 1024;
/// Longest wait for the server in `ping` and `close`.
const SERVER_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection to one NATS env: a JetStream stream per topic, a durable pull consumer per group.
#[derive(Clone)]
pub struct NatsTransport {
    inner: Arc<Inner>,
}

/// What a transport shares with its subscriptions and delayed-message movers.
#[derive(Clone)]
pub(crate) struct Shared {
    pub client: Client,
    pub js: Context,
    pub secrets: Secrets,
    /// Bumped on every (re)connection.
    pub connections: watch::Receiver<u64>,
    /// True once the transport is closed.
    pub closed: watch::Receiver<bool>,
    /// Closes: shared, so subscriptions outlive a dropped (not closed) transport.
    close: Arc<watch::Sender<bool>>,
    /// Held (shared) by every publish and settle under way; `close` waits for them.
    pub in_flight: Arc<RwLock<()>>,
}

struct Inner {
    shared: Shared,
    /// Native names whose streams are known to exist.
    ensured: Mutex<HashSet<String>>,
    /// One mover per delayed stream, while it runs.
    movers: Mutex<HashMap<String, JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for (_, mover) in self.movers.get_mut().unwrap_or_else(PoisonError::into_inner).drain() {
            mover.abort();
        }
    }
}

impl NatsTransport {
    pub(crate) fn new(connection: Connection) -> Self {
        let (close, closed) = watch::channel(false);
        let js = jetstream::new(connection.client.clone());
        NatsTransport {
            inner: Arc::new(Inner {
                shared: Shared {
                    client: connection.client,
                    js,
                    secrets: connection.secrets,
                    connections: connection.connections,
                    closed,
                    close: Arc::new(close),
                    in_flight: Arc::new(RwLock::new(())),
                },
                ensured: Mutex::new(HashSet::new()),
                movers: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The underlying client, for what polybus does not cover.
    pub fn client(&self) -> &Client {
        &self.inner.shared.client
    }

    pub(crate) fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    fn check_open(&self, op: Op, names: &TopicNames) -> Result<()> {
        if *self.shared().closed.borrow() {
            return Err(Error::Closed(format!("nats transport ({op} on {})", names.stream)));
        }
        Ok(())
    }

    pub(crate) fn error(&self, op: Op, names: &TopicNames, e: impl std::fmt::Display) -> Error {
        Error::transport(op, format!("nats {}", names.stream), self.shared().secrets.scrub(e))
    }

    /// A transport error keeping the client's `e`, of `kind`, scrubbed of the secrets.
    pub(crate) fn failed(
        &self,
        op: Op,
        names: &TopicNames,
        kind: FailureKind,
        e: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Error {
        let secrets = &self.shared().secrets;
        Error::transport_from(op, format!("nats {}", names.stream), kind, e)
            .map_text(|text| secrets.scrub(text))
    }

    /// Creates the topic's stream and its delayed stream when missing.
    async fn ensure_streams(&self, names: &TopicNames) -> Result<()> {
        self.ensure_stream(names, &names.stream, &names.subject, RetentionPolicy::Limits).await?;
        // Acked delayed messages have been moved: a work queue forgets them.
        self.ensure_stream(names, &names.delayed_stream, &names.delayed_subject, RetentionPolicy::WorkQueue)
            .await
    }

    async fn ensure_stream(
        &self,
        names: &TopicNames,
        name: &str,
        subject: &str,
        retention: RetentionPolicy,
    ) -> Result<()> {
        let config = stream::Config {
            name: name.to_owned(),
            subjects: vec![subject.to_owned()],
            retention,
            storage: StorageType::File,
            ..Default::default()
        };
        let stream = self
            .shared()
            .js
            .get_or_create_stream(config)
            .await
            .map_err(|e| self.error(Op::EnsureTopic, names, e))?;
        let subjects = &stream.cached_info().config.subjects;
        if !subjects.iter().any(|s| s == subject) {
            return Err(self.error(
                Op::EnsureTopic,
                names,
                format!(
                    "stream `{name}` already exists with subjects {subjects:?}, not `{subject}`; \
                     give the topic another nativeName"
                ),
            ));
        }
        Ok(())
    }

    pub(crate) async fn ensure_once(&self, topic: &TopicSpec, names: &TopicNames) -> Result<()> {
        if self.inner.ensured.lock().unwrap_or_else(PoisonError::into_inner).contains(&topic.native_name) {
            return Ok(());
        }
        self.ensure_streams(names).await?;
        self.inner.ensured.lock().unwrap_or_else(PoisonError::into_inner).insert(topic.native_name.clone());
        Ok(())
    }

    /// Starts the mover of `names`' delayed stream unless it runs already.
    fn start_mover(&self, names: &TopicNames) {
        let mut movers = self.inner.movers.lock().unwrap_or_else(PoisonError::into_inner);
        if movers.get(&names.delayed_stream).is_some_and(|m| !m.is_finished()) {
            return;
        }
        let task = tokio::spawn(mover::run(self.shared().clone(), names.clone()));
        movers.insert(names.delayed_stream.clone(), task);
    }

    /// Where `message` goes and with which headers: delayed messages wait on the delayed subject.
    fn route(&self, names: &TopicNames, message: &Message) -> Result<(String, HeaderMap)> {
        let mut headers = codec::encode(message).map_err(|e| self.error(Op::Publish, names, e))?;
        match message.delay {
            Some(delay) => {
                let due = chrono::Duration::from_std(delay)
                    .ok()
                    .and_then(|delay| chrono::Utc::now().checked_add_signed(delay))
                    .filter(|due| due.year() <= 9999)
                    .ok_or_else(|| {
                        self.error(Op::Publish, names, format!("a delay of {delay:?} is too long"))
                    })?;
                headers.insert(DELIVER_AT, wire::format_time(due).as_str());
                Ok((names.delayed_subject.clone(), headers))
            }
            None => Ok((names.subject.clone(), headers)),
        }
    }

    async fn send(
        &self,
        subject: String,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<PublishAckFuture, PublishError> {
        self.shared()
            .js
            .send_publish(subject, PublishMessage::build().payload(payload).headers(headers))
            .await
            .map_err(PublishError::from)
    }

    /// Sends the `only` ones of `messages` and waits for all their acks; returns the indexes
    /// whose stream was missing. Sends what `routed` holds for a message (taking it: no copy is
    /// kept), or encodes it again when a first send took it.
    async fn send_all(
        &self,
        names: &TopicNames,
        messages: &[Message],
        routed: &mut [Option<(String, HeaderMap)>],
        only: &[usize],
    ) -> Result<Vec<usize>> {
        let mut pending = Vec::with_capacity(only.len());
        for &i in only {
            let message = &messages[i];
            let (subject, headers) = match routed[i].take() {
                Some(routed) => routed,
                None => self.route(names, message)?,
            };
            pending.push((i, self.send(subject, headers, message.payload.clone()).await));
        }
        let mut missing = Vec::new();
        let mut first_error = None;
        for (i, sent) in pending {
            let acked = match sent {
                Ok(ack) => ack.await.map(drop).map_err(PublishError::from),
                Err(e) => Err(e),
            };
            match acked {
                Ok(()) => {}
                Err(PublishError::StreamNotFound) => missing.push(i),
                Err(PublishError::Other(e)) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(self.failed(Op::Publish, names, publish_failure(e.kind()), e)),
            None => Ok(missing),
        }
    }

    async fn publish_all(&self, topic: &TopicSpec, messages: Vec<Message>) -> Result<()> {
        let names = TopicNames::of(&topic.native_name);
        let _in_flight = self.shared().in_flight.read().await;
        self.check_open(Op::Publish, &names)?;
        if messages.iter().any(|m| m.delay.is_some()) {
            self.ensure_once(topic, &names).await?;
            self.start_mover(&names);
        }
        // Every message is encoded (and so checked) before the first is sent.
        let mut routed =
            messages.iter().map(|m| self.route(&names, m).map(Some)).collect::<Result<Vec<_>>>()?;
        let all: Vec<usize> = (0..messages.len()).collect();
        let missing = self.send_all(&names, &messages, &mut routed, &all).await?;
        if missing.is_empty() {
            return Ok(());
        }
        // The stream was deleted behind our back (or never made): make it, send those again.
        // Their `Nats-Msg-Id` keeps a message that did land from being stored twice.
        self.inner.ensured.lock().unwrap_or_else(PoisonError::into_inner).remove(&topic.native_name);
        self.ensure_once(topic, &names).await?;
        let still_missing = self.send_all(&names, &messages, &mut routed, &missing).await?;
        if !still_missing.is_empty() {
            return Err(self.error(Op::Publish, &names, "no stream found for the topic's subject"));
        }
        Ok(())
    }
}

/// A failed publish: the stream is missing, or anything else.
enum PublishError {
    StreamNotFound,
    Other(async_nats::jetstream::context::PublishError),
}

impl From<async_nats::jetstream::context::PublishError> for PublishError {
    fn from(e: async_nats::jetstream::context::PublishError) -> Self {
        match e.kind() {
            PublishErrorKind::StreamNotFound => PublishError::StreamNotFound,
            _ => PublishError::Other(e),
        }
    }
}

/// What kind of failure a publish error of `kind` is.
fn publish_failure(kind: PublishErrorKind) -> FailureKind {
    match kind {
        PublishErrorKind::StreamNotFound => FailureKind::NotFound,
        PublishErrorKind::TimedOut => FailureKind::Timeout,
        PublishErrorKind::BrokenPipe | PublishErrorKind::MaxAckPending => FailureKind::Unavailable,
        PublishErrorKind::MaxPayloadExceeded => FailureKind::TooLarge,
        PublishErrorKind::WrongLastMessageId | PublishErrorKind::WrongLastSequence => FailureKind::Invalid,
        _ => FailureKind::Unknown,
    }
}

/// The durable pull consumer of `options.group` on the topic named by `names`.
pub(crate) fn consumer_config(native: &str, names: &TopicNames, options: &SubscribeOptions) -> pull::Config {
    pull::Config {
        durable_name: Some(names::consumer(native, &options.group)),
        description: Some(format!("polybus group `{}`", options.group)),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait: options.ack_deadline,
        max_ack_pending: i64::try_from(options.prefetch.max(1)).unwrap_or(i64::MAX),
        filter_subject: names.subject.clone(),
        ..Default::default()
    }
}

/// True when a consumer could not be made because its stream does not exist.
pub(crate) fn stream_gone(e: &async_nats::jetstream::stream::ConsumerError) -> bool {
    matches!(e.kind(), ConsumerErrorKind::JetStream(ref js) if js.error_code() == ErrorCode::STREAM_NOT_FOUND)
}

/// The largest payload that fits in `max_payload` with room for headers, when below 1 MiB.
fn payload_limit(max_payload: usize) -> Option<usize> {
    (max_payload < (1 << 20) + HEADER_ALLOWANCE).then(|| max_payload.saturating_sub(HEADER_ALLOWANCE))
}

#[async_trait]
impl Transport for NatsTransport {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            at_least_once: true,
            ordering_per_key: false,
            delayed_delivery: Support::Emulated,
            nack_delay: Support::Native,
            fan_out: Support::Native,
            replay: true,
            counts_attempts: true,
            max_payload_bytes: payload_limit(self.shared().client.server_info().max_payload),
        }
    }

    async fn ensure_topic(&self, topic: &TopicSpec) -> Result<()> {
        let names = TopicNames::of(&topic.native_name);
        self.check_open(Op::EnsureTopic, &names)?;
        self.ensure_streams(&names).await?;
        self.inner.ensured.lock().unwrap_or_else(PoisonError::into_inner).insert(topic.native_name.clone());
        Ok(())
    }

    async fn publish(&self, topic: &TopicSpec, message: Message) -> Result<()> {
        self.publish_all(topic, vec![message]).await
    }

    async fn publish_batch(&self, topic: &TopicSpec, messages: Vec<Message>) -> Result<()> {
        self.publish_all(topic, messages).await
    }

    async fn subscribe(
        &self,
        topic: &TopicSpec,
        options: &SubscribeOptions,
    ) -> Result<Box<dyn Subscription>> {
        let names = TopicNames::of(&topic.native_name);
        self.check_open(Op::Subscribe, &names)?;
        self.ensure_once(topic, &names).await?;
        let shared = self.shared();
        let mut config = consumer_config(&topic.native_name, &names, options);
        replay::keep_start(shared, &names.stream, &mut config).await;
        // Creating an existing durable consumer updates its ack wait and max ack pending.
        let create = || shared.js.create_consumer_on_stream(config.clone(), names.stream.clone());
        let consumer = match create().await {
            Err(e) if stream_gone(&e) => {
                // Deleted since this transport made it: make it again.
                self.ensure_streams(&names).await?;
                create().await
            }
            created => created,
        }
        .map_err(|e| self.error(Op::Subscribe, &names, e))?;
        self.start_mover(&names);
        Ok(Box::new(NatsSubscription::start(
            shared.clone(),
            names.stream.clone(),
            config,
            consumer,
            options.prefetch.max(1),
        )))
    }

    async fn groups(&self, topic: &TopicSpec) -> Result<Vec<GroupInfo>> {
        let names = TopicNames::of(&topic.native_name);
        self.check_open(Op::Receive, &names)?;
        crate::groups::of_topic(self.shared(), &names).await
    }

    async fn ping(&self) -> Result<()> {
        let shared = self.shared();
        let fail = |e: String| Error::transport(Op::Ping, "nats", shared.secrets.scrub(e));
        tokio::time::timeout(SERVER_TIMEOUT, shared.client.flush())
            .await
            .map_err(|_| fail(format!("no answer within {SERVER_TIMEOUT:?}")))?
            .map_err(|e| fail(e.to_string()))?;
        // The raw account info: the client's typed one expects fields newer servers add.
        let reply = shared
            .client
            .request("$JS.API.INFO", Bytes::new())
            .await
            .map_err(|e| fail(format!("JetStream: {e}")))?;
        let info: serde_json::Value = serde_json::from_slice(&reply.payload)
            .map_err(|e| fail(format!("JetStream account info: {e}")))?;
        match info.get("error") {
            Some(error) => Err(fail(format!("JetStream: {}", error.get("description").unwrap_or(error)))),
            None => Ok(()),
        }
    }

    async fn close(&self) -> Result<()> {
        let shared = self.shared();
        if shared.close.send_replace(true) {
            return Ok(());
        }
        let fail = |e: String| Error::transport(Op::Close, "nats", shared.secrets.scrub(e));
        // Publishes under way finish first: their acks arrive on the connection about to close.
        let quiet = tokio::time::timeout(2 * SERVER_TIMEOUT, shared.in_flight.write()).await.map_err(|_| {
            fail(format!("publishes still waiting for their acks after {:?}", 2 * SERVER_TIMEOUT))
        });
        let flushed = match tokio::time::timeout(SERVER_TIMEOUT, shared.client.flush()).await {
            Ok(flushed) => flushed.map_err(|e| fail(e.to_string())),
            Err(_) => Err(fail(format!("pending messages not flushed within {SERVER_TIMEOUT:?}"))),
        };
        let drained = shared.client.drain().await.map_err(|e| fail(e.to_string()));
        quiet.map(drop).and(flushed).and(drained)
    }

    async fn replay(&self, topic: &TopicSpec, group: &str, from: ReplayFrom) -> Result<()> {
        self.replay_group(topic, group, from).await
    }

    async fn messages(&self, topic: &TopicSpec, query: &MessageQuery) -> Result<Vec<StoredMessage>> {
        self.stored_messages(topic, query).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_limit_is_declared_only_below_a_mebibyte_plus_headers() {
        assert_eq!(payload_limit(1 << 20), Some((1 << 20) - HEADER_ALLOWANCE));
        assert_eq!(payload_limit(8 << 20), None);
    }
}
