//! The Pub/Sub transport: topics and subscriptions made on demand, one publisher per topic.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use google_cloud_gax::error::rpc::Code;
use google_cloud_gax::retry_policy::RetryPolicyExt;
use google_cloud_pubsub::client::{BasePublisher, Publisher, SubscriptionAdmin, TopicAdmin};
use google_cloud_pubsub::error::PublishError;
use google_cloud_pubsub::model::DeadLetterPolicy;
use google_cloud_pubsub::publisher::PublishFuture;
use google_cloud_pubsub::retry_policy::RetryableErrors;
use polybus_core::{
    Capabilities, Error, GroupInfo, Message, Op, Result, SubscribeOptions, Subscription, Support, TopicSpec,
    Transport,
};

use crate::fail::{failure_kind, publish_kind};

use crate::codec;
use crate::connect::Settings;
use crate::names::{Names, topic_id};
use crate::subscription::PubsubSubscription;

/// How long a publish keeps retrying transient failures before it returns the error.
const PUBLISH_RETRY_LIMIT: Duration = Duration::from_secs(30);
/// Pub/Sub's bounds for a subscription's ack deadline.
const ACK_DEADLINE_BOUNDS: (u64, u64) = (10, 600);
/// Delivery attempts before Pub/Sub itself dead-letters (its maximum). polybus dead-letters
/// long before, after the topic's `maxAttempts`; the policy is there so Pub/Sub counts attempts.
const NATIVE_MAX_ATTEMPTS: i32 = 100;

/// Sets endpoint and credentials on any of the client builders (each has its own type).
macro_rules! configured {
    ($builder:expr, $settings:expr) => {{
        let mut builder = $builder;
        if let Some(endpoint) = &$settings.endpoint {
            builder = builder.with_endpoint(endpoint.clone());
        }
        if let Some(credentials) = &$settings.credentials {
            builder = builder.with_credentials(credentials.clone());
        }
        builder
    }};
}

/// The server-side ack deadline for `options`, in Pub/Sub's bounds.
fn server_ack_deadline(options: &SubscribeOptions) -> i32 {
    let (min, max) = ACK_DEADLINE_BOUNDS;
    options.ack_deadline.as_secs().clamp(min, max) as i32
}

/// What a transport and its subscriptions share.
pub(crate) struct Shared {
    pub names: Names,
    pub topics: TopicAdmin,
    subscriptions: SubscriptionAdmin,
    publisher: BasePublisher,
    /// What the pull client is built with.
    settings: Settings,
    pull_client: tokio::sync::OnceCell<gcloud_pubsub::client::Client>,
    /// One publisher (its own batching and ordering-key queues) per topic path.
    publishers: Mutex<HashMap<String, Publisher>>,
    /// Topic paths known to exist.
    known_topics: Mutex<HashSet<String>>,
}

impl Shared {
    /// The client members pull with, connected on first use.
    pub async fn pull_client(&self, target: &str) -> Result<&gcloud_pubsub::client::Client> {
        self.pull_client
            .get_or_try_init(|| async {
                let config = self.settings.pull_config()?;
                gcloud_pubsub::client::Client::new(config)
                    .await
                    .map_err(|e| Error::transport(Op::Subscribe, target, format!("pull client: {e}")))
            })
            .await
    }

    /// Creates the topic `native` unless it is known to exist.
    async fn ensure_topic(&self, native: &str) -> Result<()> {
        let path = self.names.topic(native);
        if self.known_topics.lock().is_ok_and(|known| known.contains(&path)) {
            return Ok(());
        }
        match self.topics.create_topic().set_name(path.clone()).send().await {
            Ok(_) => {}
            Err(e) if has_code(&e, Code::AlreadyExists) => {}
            Err(e) => return Err(client_error(Op::EnsureTopic, format!("pubsub {native}"), e)),
        }
        if let Ok(mut known) = self.known_topics.lock() {
            known.insert(path);
        }
        Ok(())
    }

    fn forget_topic(&self, native: &str) {
        if let Ok(mut known) = self.known_topics.lock() {
            known.remove(&self.names.topic(native));
        }
    }

    /// Creates the subscription of `options.group` on `topic` when it does not exist (its
    /// topic and the dead-letter topic first); returns the subscription's ack deadline in seconds.
    pub async fn ensure_subscription(&self, topic: &TopicSpec, options: &SubscribeOptions) -> Result<i32> {
        self.ensure_topic(&topic.native_name).await?;
        self.ensure_topic(&topic.dead_letter).await?;
        let path = self.names.subscription(&topic.native_name, &options.group);
        let target = || format!("pubsub {}--{}", topic_id(&topic.native_name), options.group);
        let created = self
            .subscriptions
            .create_subscription()
            .set_name(path.clone())
            .set_topic(self.names.topic(&topic.native_name))
            .set_ack_deadline_seconds(server_ack_deadline(options))
            // Off: with ordering on, a redelivery brings back every later message of its key,
            // acked ones too (on the emulator, every later message, key or not).
            .set_enable_message_ordering(false)
            .set_dead_letter_policy(
                DeadLetterPolicy::new()
                    .set_dead_letter_topic(self.names.topic(&topic.dead_letter))
                    .set_max_delivery_attempts(NATIVE_MAX_ATTEMPTS),
            )
            .send()
            .await;
        match created {
            Ok(subscription) => Ok(subscription.ack_deadline_seconds),
            Err(e) if has_code(&e, Code::AlreadyExists) => self
                .subscriptions
                .get_subscription()
                .set_subscription(path)
                .send()
                .await
                .map(|s| {
                    if s.enable_message_ordering {
                        tracing::warn!(subscription = %s.name,
                            "the subscription has message ordering on, so a redelivered message brings back \
                             every later message of its ordering key, acked ones too (on the emulator, every \
                             later message); make it again to turn ordering off");
                    }
                    if s.dead_letter_policy.is_none() {
                        tracing::warn!(subscription = %s.name,
                            "the subscription has no dead-letter policy, so Pub/Sub does not count delivery \
                             attempts on it and polybus cannot dead-letter after the topic's maxAttempts");
                    }
                    s.ack_deadline_seconds
                })
                .map_err(|e| client_error(Op::Subscribe, target(), e)),
            Err(e) => {
                if has_code(&e, Code::NotFound) {
                    self.forget_topic(&topic.native_name);
                    self.forget_topic(&topic.dead_letter);
                }
                Err(client_error(Op::Subscribe, target(), e))
            }
        }
    }

    fn publisher(&self, native: &str) -> Publisher {
        let path = self.names.topic(native);
        let mut publishers = match self.publishers.lock() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        };
        publishers.entry(path.clone()).or_insert_with(|| self.publisher.publisher(path).build()).clone()
    }

    /// Publishes `messages` to `topic` (all sent before any is awaited, so they batch) and waits
    /// for the server to take each. A missing topic is created and the messages sent again once.
    async fn publish_all(&self, topic: &TopicSpec, messages: &[Message]) -> Result<()> {
        let publisher = self.publisher(&topic.native_name);
        let outcome = send_all(&publisher, messages).await;
        let error = match outcome {
            Ok(()) => return Ok(()),
            Err(e) if is_not_found(&e) => {
                self.forget_topic(&topic.native_name);
                self.ensure_topic(&topic.native_name).await?;
                match send_all(&publisher, messages).await {
                    Ok(()) => return Ok(()),
                    Err(e) => e,
                }
            }
            Err(e) => e,
        };
        let kind = publish_kind(&error);
        Err(Error::transport_from(Op::Publish, format!("pubsub {}", topic.native_name), kind, error))
    }
}

/// A transport error keeping the client's error, of the kind its status says.
pub(crate) fn client_error(op: Op, target: String, e: google_cloud_pubsub::Error) -> Error {
    Error::transport_from(op, target, failure_kind(&e), e)
}

/// Sends every message, then awaits each; on failure, resumes the ordering keys the client paused.
async fn send_all(publisher: &Publisher, messages: &[Message]) -> std::result::Result<(), PublishError> {
    let pending: Vec<(Option<&str>, PublishFuture)> =
        messages.iter().map(|m| (m.key.as_deref(), publisher.publish(codec::encode(m)))).collect();
    // The caller waits for every message anyway: send what the client still holds back (a batch
    // under its count and byte thresholds waits 10 ms for more) now.
    publisher.flush().await;
    let mut first_error = None;
    for (key, sent) in pending {
        if let Err(e) = sent.await {
            // The client pauses a key after a failure, so that later messages cannot overtake
            // the failed one; the caller gets the error and decides, so accept the key again.
            if let Some(key) = key {
                publisher.resume_publish(key);
            }
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

pub(crate) fn has_code(error: &google_cloud_pubsub::Error, code: Code) -> bool {
    error.status().is_some_and(|s| s.code == code)
}

fn is_not_found(error: &PublishError) -> bool {
    matches!(error, PublishError::Rpc(e) if has_code(e, Code::NotFound))
}

/// A connection to one Pub/Sub project (or emulator).
pub struct PubsubTransport {
    shared: Arc<Shared>,
    closed: AtomicBool,
}

impl PubsubTransport {
    /// Builds the clients; no request is made until the transport is used.
    pub(crate) async fn connect(settings: Settings) -> Result<PubsubTransport> {
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            Error::transport(
                Op::Connect,
                format!("pubsub project {}", settings.project),
                format!("{what}: {e}"),
            )
        };
        let topics = configured!(TopicAdmin::builder(), settings)
            .build()
            .await
            .map_err(|e| fail("topic admin client", &e))?;
        let subscriptions = configured!(SubscriptionAdmin::builder(), settings)
            .build()
            .await
            .map_err(|e| fail("subscription admin client", &e))?;
        let publisher = configured!(BasePublisher::builder(), settings)
            .with_retry_policy(RetryableErrors.with_time_limit(PUBLISH_RETRY_LIMIT))
            .build()
            .await
            .map_err(|e| fail("publisher client", &e))?;
        Ok(PubsubTransport {
            shared: Arc::new(Shared {
                names: Names::new(settings.project.clone()),
                topics,
                subscriptions,
                publisher,
                settings,
                pull_client: tokio::sync::OnceCell::new(),
                publishers: Mutex::new(HashMap::new()),
                known_topics: Mutex::new(HashSet::new()),
            }),
            closed: AtomicBool::new(false),
        })
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed("pubsub transport".into()));
        }
        Ok(())
    }
}

/// Refuses delayed messages: Pub/Sub cannot hold a message back.
fn check_no_delay(messages: &[Message]) -> Result<()> {
    if messages.iter().any(|m| m.delay.is_some()) {
        return Err(Error::Unsupported {
            broker_type: "google_pubsub".into(),
            what: "delayed delivery".into(),
        });
    }
    Ok(())
}

#[async_trait]
impl Transport for PubsubTransport {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            at_least_once: true,
            // The emulator delivers later messages of a key after a nack of an earlier one.
            ordering_per_key: false,
            delayed_delivery: Support::Unsupported,
            // ModifyAckDeadline; delays over 10 minutes are kept by extending it again.
            nack_delay: Support::Native,
            fan_out: Support::Native,
            replay: false,
            counts_attempts: true,
            max_payload_bytes: None,
        }
    }

    async fn ensure_topic(&self, topic: &TopicSpec) -> Result<()> {
        self.check_open()?;
        self.shared.ensure_topic(&topic.native_name).await
    }

    async fn publish(&self, topic: &TopicSpec, message: Message) -> Result<()> {
        self.check_open()?;
        let messages = [message];
        check_no_delay(&messages)?;
        self.shared.publish_all(topic, &messages).await
    }

    async fn publish_batch(&self, topic: &TopicSpec, messages: Vec<Message>) -> Result<()> {
        self.check_open()?;
        check_no_delay(&messages)?;
        self.shared.publish_all(topic, &messages).await
    }

    async fn subscribe(
        &self,
        topic: &TopicSpec,
        options: &SubscribeOptions,
    ) -> Result<Box<dyn Subscription>> {
        self.check_open()?;
        let server_deadline = self.shared.ensure_subscription(topic, options).await?;
        let subscription =
            PubsubSubscription::start(self.shared.clone(), topic.clone(), options.clone(), server_deadline)
                .await?;
        Ok(Box::new(subscription))
    }

    async fn groups(&self, topic: &TopicSpec) -> Result<Vec<GroupInfo>> {
        self.check_open()?;
        crate::groups::of_topic(&self.shared, &topic.native_name).await
    }

    async fn ping(&self) -> Result<()> {
        self.check_open()?;
        self.shared
            .topics
            .list_topics()
            .set_project(self.shared.names.project())
            .set_page_size(1)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| client_error(Op::Ping, format!("pubsub {}", self.shared.names.project()), e))
    }

    async fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let publishers: Vec<Publisher> = match self.shared.publishers.lock() {
            Ok(mut p) => p.drain().map(|(_, p)| p).collect(),
            Err(poisoned) => poisoned.into_inner().drain().map(|(_, p)| p).collect(),
        };
        for publisher in publishers {
            publisher.flush().await;
        }
        Ok(())
    }

    async fn replay(&self, _: &TopicSpec, _: &str, _: polybus_core::ReplayFrom) -> Result<()> {
        Err(polybus_core::transport::unsupported(NOT_RETAINED_REPLAY))
    }

    async fn messages(
        &self,
        _: &TopicSpec,
        _: &polybus_core::MessageQuery,
    ) -> Result<Vec<polybus_core::StoredMessage>> {
        Err(polybus_core::transport::unsupported(NOT_RETAINED_QUERY))
    }
}

/// Why a replay is refused: seeking back needs retained acked messages.
const NOT_RETAINED_REPLAY: &str = "replay (its subscriptions do not retain acked messages, so there is nothing \
     to seek back to; republish what is needed instead)";
/// Why a message query is refused: Pub/Sub cannot read messages without consuming them.
const NOT_RETAINED_QUERY: &str = "message query (it does not retain consumed messages, and reading one \
     would deliver it to a subscription)";
