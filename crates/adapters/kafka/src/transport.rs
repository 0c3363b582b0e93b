//! The Kafka transport: one idempotent producer and one admin client per broker env; a
//! consumer of its own for every subscription.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use polybus_core::{
    Capabilities, Error, GroupInfo, Message, MessageQuery, Op, ReplayFrom, Result, StoredMessage,
    SubscribeOptions, Subscription, Support, TopicSpec, Transport,
};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

use crate::codec::{self, Record};
use crate::config::{Coded, MAX_MESSAGE_BYTES, Settings};
use crate::refusal::Refusals;
use crate::subscription;

/// How long a publish may wait for room in librdkafka's queue.
const QUEUE_WAIT: Duration = Duration::from_secs(10);
/// How long metadata requests (ping, connect) may take.
const METADATA_WAIT: Duration = Duration::from_secs(5);
/// How long one topic creation request may take (it is tried twice).
const ADMIN_WAIT: Duration = Duration::from_secs(4);
/// How long `close` waits for pending publishes.
const FLUSH_WAIT: Duration = Duration::from_secs(10);

/// Forwards librdkafka's logs and errors to `tracing`, and records refused connections.
#[derive(Debug, Clone)]
pub(crate) struct Logger {
    refusals: Arc<Refusals>,
}

impl ClientContext for Logger {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        log(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.refusals.report(&error, reason);
        client_error(&error, reason);
    }
}

/// Logs a librdkafka log line at the matching level.
pub(crate) fn log(level: RDKafkaLogLevel, facility: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => {
            tracing::error!(target: "librdkafka", facility, "{message}")
        }
        RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", facility, "{message}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", facility, "{message}")
        }
        RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", facility, "{message}"),
    }
}

/// Logs an error librdkafka reports outside any call (lost connections, mostly; it retries).
pub(crate) fn client_error(error: &KafkaError, reason: &str) {
    tracing::warn!(target: "librdkafka", %error, "{reason}");
}

/// The clients of one broker env, shared by the transport and its subscriptions.
pub(crate) struct Client {
    /// How to make clients, and how to word errors.
    pub settings: Settings,
    /// Replaced when librdkafka declares it fatally failed (see [`Client::recover`]).
    producer: Mutex<FutureProducer<Logger>>,
    admin: AdminClient<Logger>,
    ensured: Mutex<HashSet<String>>,
    /// TLS handshakes and logins the brokers refused, as the clients report them.
    refusals: Arc<Refusals>,
}

impl Client {
    /// Makes the producer and the admin client (librdkafka connects in the background).
    fn new(settings: Settings) -> Result<Client> {
        let servers = settings.servers.clone();
        let refusals = Refusals::new();
        let logger = Logger { refusals: refusals.clone() };
        let producer = settings
            .producer()
            .create_with_context(logger.clone())
            .map_err(|e| settings.failed(Op::Connect, &servers, e))?;
        let admin = settings
            .admin()
            .create_with_context(logger)
            .map_err(|e| settings.failed(Op::Connect, &servers, e))?;
        Ok(Client {
            settings,
            producer: Mutex::new(producer),
            admin,
            ensured: Mutex::new(HashSet::new()),
            refusals,
        })
    }

    /// A transport error about `topic`, with secrets scrubbed.
    pub fn error(&self, op: Op, topic: &str, cause: impl std::fmt::Display) -> Error {
        self.settings.error(op, topic, cause)
    }

    /// A transport error about `topic` keeping librdkafka's error, with secrets scrubbed.
    pub fn failed(&self, op: Op, topic: &str, cause: impl Coded) -> Error {
        self.settings.failed(op, topic, cause)
    }

    /// The current producer.
    pub(crate) fn producer(&self) -> FutureProducer<Logger> {
        self.producer.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Replaces `failed` with a new producer when librdkafka declared it fatally failed: an
    /// idempotent producer does so when the broker lost its sequence state (a crashed broker
    /// restarted), and then fails every later send for good.
    fn recover(&self, failed: &FutureProducer<Logger>) {
        let Some((code, reason)) = failed.client().fatal_error() else { return };
        let mut current = self.producer.lock().unwrap_or_else(PoisonError::into_inner);
        if current.client().fatal_error().is_none() {
            return; // Another publish replaced it already.
        }
        match self.settings.producer().create_with_context(self.logger()) {
            Ok(fresh) => {
                tracing::warn!(servers = %self.settings.servers, ?code, %reason, "kafka producer failed fatally; replaced it");
                let old = std::mem::replace(&mut *current, fresh);
                // Destroying a producer waits for librdkafka's threads: not on the async runtime.
                std::thread::spawn(move || drop(old));
            }
            Err(e) => {
                tracing::warn!(servers = %self.settings.servers, error = %e, "kafka producer failed fatally; making a new one failed")
            }
        }
    }

    /// A context for a new client of this env.
    pub(crate) fn logger(&self) -> Logger {
        Logger { refusals: self.refusals.clone() }
    }

    /// Runs `request`, failing with the reason as soon as a broker refuses a connection (a TLS
    /// handshake, a login) meanwhile; a request that failed otherwise (timed out, most likely)
    /// while a refusal is current fails with the refusal's reason instead.
    async fn unless_refused<T>(
        &self,
        op: Op,
        target: &str,
        request: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let refused = self.refusals.next();
        let outcome = tokio::select! {
            outcome = request => outcome,
            refusal = refused => return Err(self.failed(op, target, refusal)),
        };
        match outcome {
            Ok(value) => {
                self.refusals.clear();
                Ok(value)
            }
            Err(e) if e.is_retryable() => match self.refusals.current() {
                Some(refusal) => Err(self.failed(op, target, refusal)),
                None => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// Fails a publish before anything is enqueued while a broker refuses connections: it
    /// could only wait for `message.timeout.ms`.
    fn check_refused(&self, op: Op, topic: &str) -> Result<()> {
        match self.refusals.current() {
            Some(refusal) => Err(self.failed(op, topic, refusal)),
            None => Ok(()),
        }
    }

    /// Produces one record to `topic` and waits for the broker's acknowledgement.
    pub async fn produce(&self, topic: &str, record: (Record, OwnedHeaders), op: Op) -> Result<()> {
        self.check_refused(op, topic)?;
        self.unless_refused(op, topic, self.produce_one(topic, record, op)).await
    }

    async fn produce_one(
        &self,
        topic: &str,
        (record, headers): (Record, OwnedHeaders),
        op: Op,
    ) -> Result<()> {
        let producer = self.producer();
        let delivery =
            producer.send(future_record(topic, &record, headers), Timeout::After(QUEUE_WAIT)).await;
        delivery.map(|_| ()).map_err(|(e, _)| {
            self.recover(&producer);
            self.failed(op, topic, e)
        })
    }

    /// Enqueues every record, then waits for all of them: the first failure is returned.
    async fn produce_all(&self, topic: &str, records: Vec<(Record, OwnedHeaders)>) -> Result<()> {
        self.check_refused(Op::Publish, topic)?;
        let producer = self.producer();
        let result =
            self.unless_refused(Op::Publish, topic, self.produce_all_with(&producer, topic, records)).await;
        if result.is_err() {
            self.recover(&producer);
        }
        result
    }

    async fn produce_all_with(
        &self,
        producer: &FutureProducer<Logger>,
        topic: &str,
        records: Vec<(Record, OwnedHeaders)>,
    ) -> Result<()> {
        let mut pending: VecDeque<DeliveryFuture> = VecDeque::with_capacity(records.len());
        let mut first_error = None;
        let (bodies, headers): (Vec<Record>, Vec<OwnedHeaders>) = records.into_iter().unzip();
        for (record, headers) in bodies.iter().zip(headers) {
            let mut next = future_record(topic, record, headers);
            loop {
                match producer.send_result(next) {
                    Ok(delivery) => {
                        pending.push_back(delivery);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        next = back;
                        match pending.pop_front() {
                            Some(delivery) => {
                                if let Err(e) = self.delivered(topic, delivery).await {
                                    first_error.get_or_insert(e);
                                }
                            }
                            None => tokio::time::sleep(Duration::from_millis(10)).await,
                        }
                    }
                    Err((e, _)) => {
                        // Wait for what is already enqueued so its outcome is known, then report.
                        for delivery in pending {
                            let _ = self.delivered(topic, delivery).await;
                        }
                        return Err(self.failed(Op::Publish, topic, e));
                    }
                }
            }
        }
        for delivery in pending {
            if let Err(e) = self.delivered(topic, delivery).await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    async fn delivered(&self, topic: &str, delivery: DeliveryFuture) -> Result<()> {
        match delivery.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((e, _))) => Err(self.failed(Op::Publish, topic, e)),
            Err(_) => {
                Err(self.error(Op::Publish, topic, "the producer was shut down before the broker answered"))
            }
        }
    }

    /// Creates `name` with `partitions` unless it exists (or was made through this client).
    pub async fn ensure(&self, name: &str, partitions: i32) -> Result<()> {
        if self.ensured.lock().unwrap_or_else(PoisonError::into_inner).contains(name) {
            return Ok(());
        }
        self.unless_refused(Op::EnsureTopic, name, self.create_unless_exists(name, partitions)).await
    }

    async fn create_unless_exists(&self, name: &str, partitions: i32) -> Result<()> {
        let replication = || TopicReplication::Fixed(self.settings.replication_factor);
        let options =
            AdminOptions::new().request_timeout(Some(ADMIN_WAIT)).operation_timeout(Some(ADMIN_WAIT));
        let roomy =
            NewTopic::new(name, partitions, replication()).set("max.message.bytes", MAX_MESSAGE_BYTES);
        let mut outcome = self.create(&roomy, &options).await?;
        if outcome == Err(RDKafkaErrorCode::InvalidConfig) {
            // A broker that refuses the per-topic size limit still gets the topic.
            outcome = self.create(&NewTopic::new(name, partitions, replication()), &options).await?;
        }
        match outcome {
            Ok(()) | Err(RDKafkaErrorCode::TopicAlreadyExists) => {}
            // No right to create topics, but it may exist already.
            Err(code) if self.exists(name).await? => {
                tracing::debug!(topic = name, %code, "topic not created, but it exists");
            }
            Err(code) => return Err(self.failed(Op::EnsureTopic, name, code)),
        }
        self.ensured.lock().unwrap_or_else(PoisonError::into_inner).insert(name.to_owned());
        Ok(())
    }

    /// Asks for `topic`; a request lost to a dropped connection (a broker restarting) is
    /// asked once more.
    async fn create(
        &self,
        topic: &NewTopic<'_>,
        options: &AdminOptions,
    ) -> Result<std::result::Result<(), RDKafkaErrorCode>> {
        let mut tries = 0;
        loop {
            tries += 1;
            let outcome = match self.admin.create_topics([topic], options).await {
                Ok(results) => {
                    Ok(results.into_iter().try_for_each(|r| r.map(|_| ()).map_err(|(_, code)| code)))
                }
                Err(e) => Err(e),
            };
            let transient = match &outcome {
                Err(_) => true,
                Ok(Err(code)) => matches!(
                    code,
                    RDKafkaErrorCode::RequestTimedOut
                        | RDKafkaErrorCode::OperationTimedOut
                        | RDKafkaErrorCode::BrokerTransportFailure
                        | RDKafkaErrorCode::AllBrokersDown
                        | RDKafkaErrorCode::NotController
                ),
                Ok(Ok(())) => false,
            };
            if !transient || tries == 2 {
                return outcome.map_err(|e| self.failed(Op::EnsureTopic, topic.name, e));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn exists(&self, name: &str) -> Result<bool> {
        let producer = self.producer();
        let topic = name.to_owned();
        let metadata = tokio::task::spawn_blocking(move || {
            producer.client().fetch_metadata(Some(&topic), METADATA_WAIT).map(|m| {
                m.topics()
                    .iter()
                    .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
            })
        })
        .await
        .map_err(|e| self.error(Op::EnsureTopic, name, e))?;
        metadata.map_err(|e| self.failed(Op::EnsureTopic, name, e))
    }

    /// Asks the cluster for its metadata.
    async fn metadata(&self, op: Op) -> Result<()> {
        self.unless_refused(op, &self.settings.servers, self.fetch_metadata(op)).await
    }

    async fn fetch_metadata(&self, op: Op) -> Result<()> {
        let producer = self.producer();
        let result = tokio::task::spawn_blocking(move || {
            producer.client().fetch_metadata(None, METADATA_WAIT).map(|_| ())
        })
        .await
        .map_err(|e| self.error(op, &self.settings.servers, e))?;
        result.map_err(|e| self.failed(op, &self.settings.servers, e))
    }
}

fn future_record<'a>(
    topic: &'a str,
    record: &'a Record,
    headers: OwnedHeaders,
) -> FutureRecord<'a, str, [u8]> {
    let mut future =
        FutureRecord::to(topic).payload(&record.payload[..]).headers(headers).timestamp(record.timestamp);
    if let Some(key) = &record.key {
        future = future.key(key.as_str());
    }
    future
}

/// A connection to one Kafka broker env.
pub struct KafkaTransport {
    client: Arc<Client>,
    closed: AtomicBool,
}

impl KafkaTransport {
    /// Makes the producer and the admin client and checks the cluster answers.
    pub(crate) async fn connect(settings: Settings) -> Result<KafkaTransport> {
        let client = Arc::new(Client::new(settings)?);
        client.metadata(Op::Connect).await?;
        Ok(KafkaTransport { client, closed: AtomicBool::new(false) })
    }

    fn check_open(&self, topic: &str) -> Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed(format!("kafka transport (publishing to {topic})")));
        }
        Ok(())
    }

    /// The clients of this env.
    pub(crate) fn client(&self) -> &Arc<Client> {
        &self.client
    }

    fn partitions(&self, topic: &TopicSpec) -> i32 {
        crate::kind::partitions_of(topic).unwrap_or(self.client.settings.partitions)
    }
}

fn encode_for_publish(message: &Message) -> (Record, OwnedHeaders) {
    let not_before =
        message.delay.and_then(|d| chrono::TimeDelta::from_std(d).ok()).map(|d| message.published_at + d);
    codec::encode(message, 1, not_before)
}

#[async_trait]
impl Transport for KafkaTransport {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            at_least_once: true,
            ordering_per_key: true,
            delayed_delivery: Support::Emulated,
            nack_delay: Support::Emulated,
            fan_out: Support::Native,
            replay: true,
            counts_attempts: true,
            max_payload_bytes: None,
        }
    }

    async fn ensure_topic(&self, topic: &TopicSpec) -> Result<()> {
        self.client.ensure(&topic.native_name, self.partitions(topic)).await
    }

    async fn publish(&self, topic: &TopicSpec, message: Message) -> Result<()> {
        self.check_open(&topic.native_name)?;
        self.client.produce(&topic.native_name, encode_for_publish(&message), Op::Publish).await
    }

    async fn publish_batch(&self, topic: &TopicSpec, messages: Vec<Message>) -> Result<()> {
        self.check_open(&topic.native_name)?;
        let records = messages.iter().map(encode_for_publish).collect();
        self.client.produce_all(&topic.native_name, records).await
    }

    async fn subscribe(
        &self,
        topic: &TopicSpec,
        options: &SubscribeOptions,
    ) -> Result<Box<dyn Subscription>> {
        let partitions = self.partitions(topic);
        let retry = crate::retry_topic(&topic.native_name, &options.group);
        self.client.ensure(&topic.native_name, partitions).await?;
        self.client.ensure(&retry, partitions).await?;
        let names = subscription::Names { main: topic.native_name.clone(), retry };
        Ok(Box::new(subscription::start(self.client.clone(), names, options.clone()).await?))
    }

    async fn groups(&self, topic: &TopicSpec) -> Result<Vec<GroupInfo>> {
        crate::groups::of_topic(&self.client, &topic.native_name).await
    }

    async fn ping(&self) -> Result<()> {
        self.client.metadata(Op::Ping).await
    }

    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::SeqCst);
        let producer = self.client.producer();
        let flushed = tokio::task::spawn_blocking(move || producer.flush(FLUSH_WAIT))
            .await
            .map_err(|e| self.client.error(Op::Close, &self.client.settings.servers, e))?;
        flushed.map_err(|e| self.client.error(Op::Close, &self.client.settings.servers, e))
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
    use std::time::Instant;

    use polybus_core::Message;
    use serde_json::json;

    use super::*;
    use crate::kind::KafkaConfig;

    /// Far below the waits a refused connection otherwise ends in: 5 s for metadata, 2 × 4 s
    /// for a topic creation, `message.timeout.ms` (30 s) for a publish.
    const AT_ONCE: Duration = Duration::from_secs(2);

    /// A client whose broker address has nothing listening (librdkafka keeps retrying it).
    fn client_of_a_closed_port() -> Arc<Client> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let config: KafkaConfig =
            polybus_core::config::parse(&json!({"brokers": [format!("127.0.0.1:{port}")]})).expect("config");
        Arc::new(Client::new(Settings::from_config(&config, "dev").expect("settings")).expect("client"))
    }

    /// Reports a refused TLS handshake on `client` after a moment, as librdkafka's callback would.
    fn refuse_soon(client: &Arc<Client>) -> tokio::task::JoinHandle<()> {
        let client = client.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let error = KafkaError::Global(RDKafkaErrorCode::SSL);
            client
                .refusals
                .report(&error, "ssl://b:9093/bootstrap: SSL handshake failed: certificate verify failed");
        })
    }

    fn says_tls_refused(error: &Error, started: Instant) {
        let text = error.to_string();
        assert!(text.contains("TLS handshake refused") && text.contains("b:9093"), "{text}");
        assert_eq!(error.failure_kind(), Some(polybus_core::FailureKind::Auth), "{text}");
        assert!(started.elapsed() < AT_ONCE, "took {:?}: {text}", started.elapsed());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_fail_at_once_when_a_broker_refuses_the_connection() {
        let client = client_of_a_closed_port();
        let record = || encode_for_publish(&Message::text("x"));

        let refused = refuse_soon(&client);
        let started = Instant::now();
        let error = client.ensure("refused", 1).await.expect_err("ensure");
        assert_eq!(error.code(), "SUBSCRIBE_FAILED");
        says_tls_refused(&error, started);
        refused.await.expect("reporter");

        // While the refusal is current, a publish fails before anything is enqueued.
        let started = Instant::now();
        let error = client.produce("refused", record(), Op::Publish).await.expect_err("publish");
        assert_eq!(error.code(), "PUBLISH_FAILED");
        says_tls_refused(&error, started);

        // A publish waiting for its broker ends as soon as a refusal is reported.
        client.refusals.clear();
        let refused = refuse_soon(&client);
        let started = Instant::now();
        let error = client.produce_all("refused", vec![record(), record()]).await.expect_err("batch");
        says_tls_refused(&error, started);
        refused.await.expect("reporter");

        client.refusals.clear();
        let refused = refuse_soon(&client);
        let started = Instant::now();
        let error = client.metadata(Op::Ping).await.expect_err("ping");
        assert_eq!(error.code(), "CONNECT_FAILED");
        says_tls_refused(&error, started);
        refused.await.expect("reporter");

        // Destroying librdkafka clients waits for their threads: not on the runtime.
        let _ = tokio::task::spawn_blocking(move || drop(client)).await;
    }
}
