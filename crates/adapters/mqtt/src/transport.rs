//! The MQTT 5 [`Transport`]: one publishing connection, one connection per group member.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use polybus_core::{
    Capabilities, Error, Message, Op, Result, SubscribeOptions, Subscription, Support, TopicSpec, Transport,
};
use tokio::time::Instant;

use crate::codec;
use crate::config::Settings;
use crate::orphan::{DRAIN_PREFIX, ORPHAN_PREFIX};
use crate::publisher::{Ack, Pending, Publisher};
use crate::subscription::{self, RETRY_PREFIX};

/// How long after a reconnection a publish no subscription took is sent again.
const RESUBSCRIBE_GRACE: Duration = Duration::from_secs(10);
/// First pause before sending such a publish again.
const RESUBSCRIBE_PAUSE: Duration = Duration::from_millis(50);

/// What MQTT 5 (with shared subscriptions) can do, and what this adapter builds on top.
pub(crate) const CAPABILITIES: Capabilities = Capabilities {
    at_least_once: true,
    ordering_per_key: false,
    delayed_delivery: Support::Unsupported,
    nack_delay: Support::Emulated,
    fan_out: Support::Native,
    replay: false,
    counts_attempts: true,
    max_payload_bytes: None,
};

/// A connection to one MQTT broker env.
pub(crate) struct MqttTransport {
    settings: Settings,
    /// Also used by this transport's group members for their redeliveries, so it outlives
    /// `close` while they do.
    publisher: Publisher,
    closed: AtomicBool,
}

impl MqttTransport {
    /// Connects the publishing client; fails when the broker cannot be reached.
    pub async fn connect(settings: Settings) -> Result<MqttTransport> {
        let endpoint = settings.endpoint();
        let publisher = Publisher::connect(settings.clone()).await.map_err(|(e, kind)| {
            Error::transport(Op::Connect, format!("mqtt {endpoint}"), e).with_kind(kind)
        })?;
        Ok(MqttTransport { settings, publisher, closed: AtomicBool::new(false) })
    }

    async fn start(&self, topic: &str, message: Message) -> Result<Pending> {
        self.check_open(Op::Publish, topic)?;
        if message.delay.is_some() {
            return Err(Error::Unsupported {
                broker_type: crate::BROKER_TYPE.to_string(),
                what: "delayed delivery".into(),
            });
        }
        let properties = codec::encode(&message, 1);
        self.publisher
            .start(topic, false, message.payload, properties)
            .await
            .map_err(|e| Error::transport(Op::Publish, format!("mqtt {topic}"), e))
    }

    fn check_open(&self, op: Op, topic: &str) -> Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::transport(op, format!("mqtt {topic}"), "the transport is closed"));
        }
        Ok(())
    }
}

/// Checks `topic` can be published to: not empty, no wildcards, not a `$` system topic, and
/// not under the topic levels polybus keeps for itself.
pub(crate) fn check_topic(topic: &str) -> std::result::Result<(), String> {
    if topic.is_empty() || topic.len() > usize::from(u16::MAX) {
        return Err("an MQTT topic has 1 to 65535 bytes".into());
    }
    if topic.contains(['+', '#', '\0']) {
        return Err(format!("`{topic}` is not an MQTT topic name: `+`, `#` and NUL are not allowed"));
    }
    if topic.starts_with('$') {
        return Err(format!("`{topic}` starts with `$`, which MQTT reserves for the broker"));
    }
    let first_level = topic.split('/').next().unwrap_or_default();
    if [RETRY_PREFIX, ORPHAN_PREFIX, DRAIN_PREFIX].contains(&first_level) {
        return Err(format!("`{topic}` is under `{first_level}/`, a topic level polybus keeps for itself"));
    }
    Ok(())
}

fn checked(op: Op, spec: &TopicSpec) -> Result<&str> {
    let topic = spec.native_name.as_str();
    check_topic(topic).map_err(|e| Error::transport(op, format!("mqtt {topic}"), e))?;
    Ok(topic)
}

#[async_trait]
impl Transport for MqttTransport {
    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    /// MQTT topics exist as soon as someone publishes; this only checks the name.
    async fn ensure_topic(&self, topic: &TopicSpec) -> Result<()> {
        checked(Op::EnsureTopic, topic).map(|_| ())
    }

    /// Shortly after a reconnection, a message no subscription took is sent again for a while:
    /// the broker may have restarted without the groups' shared subscriptions (Mosquitto 2.0
    /// forgets them) while their members subscribe again.
    async fn publish(&self, topic: &TopicSpec, mut message: Message) -> Result<()> {
        let name = checked(Op::Publish, topic)?;
        let started = Instant::now();
        let mut pause = RESUBSCRIBE_PAUSE;
        loop {
            let again = (self.publisher.reconnecting(RESUBSCRIBE_GRACE)
                && started.elapsed() < RESUBSCRIBE_GRACE)
                .then(|| message.clone());
            let ack = self
                .start(name, message)
                .await?
                .wait()
                .await
                .map_err(|e| Error::transport(Op::Publish, format!("mqtt {name}"), e))?;
            match (ack, again) {
                (Ack::NoSubscribers, Some(copy)) if self.publisher.reconnecting(RESUBSCRIBE_GRACE) => {
                    tracing::debug!(topic = %name, retry_in = ?pause, "no subscription took the message after a reconnection; sending it again");
                    message = copy;
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                _ => return Ok(()),
            }
        }
    }

    /// Sends every message before waiting for the first PUBACK; QoS 1 on one connection
    /// keeps their order.
    async fn publish_batch(&self, topic: &TopicSpec, messages: Vec<Message>) -> Result<()> {
        if self.publisher.reconnecting(RESUBSCRIBE_GRACE) {
            for message in messages {
                self.publish(topic, message).await?;
            }
            return Ok(());
        }
        let name = checked(Op::Publish, topic)?;
        let mut pending = Vec::with_capacity(messages.len());
        let mut outcome = Ok(());
        for message in messages {
            match self.start(name, message).await {
                Ok(p) => pending.push(p),
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            }
        }
        for p in pending {
            if let Err(e) = p.wait().await
                && outcome.is_ok()
            {
                outcome = Err(Error::transport(Op::Publish, format!("mqtt {name}"), e));
            }
        }
        outcome
    }

    async fn subscribe(
        &self,
        topic: &TopicSpec,
        options: &SubscribeOptions,
    ) -> Result<Box<dyn Subscription>> {
        let name = checked(Op::Subscribe, topic)?;
        self.check_open(Op::Subscribe, name)?;
        let subscription =
            subscription::subscribe(&self.settings, self.publisher.clone(), name, options).await?;
        Ok(Box::new(subscription))
    }

    async fn ping(&self) -> Result<()> {
        self.publisher
            .ping()
            .await
            .map_err(|e| Error::transport(Op::Ping, format!("mqtt {}", self.publisher.endpoint()), e))
    }

    /// Waits for pending PUBACKs and disconnects; while subscriptions made through this
    /// transport are alive, the connection stays for their redeliveries and closes after them.
    async fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let closed =
            if self.publisher.shared() { self.publisher.flush().await } else { self.publisher.close().await };
        closed.map_err(|e| Error::transport(Op::Close, format!("mqtt {}", self.publisher.endpoint()), e))
    }
}
