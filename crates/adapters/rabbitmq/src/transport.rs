//! Publishing with publisher confirms, delay queues, and the [`Transport`] implementation.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, ExchangeKind, PublisherConfirm};
use polybus_core::{
    Capabilities, Error, FailureKind, GroupInfo, Message, Op, Result, SubscribeOptions, Subscription,
    Support, TopicSpec, Transport,
};
use tokio::sync::{Mutex, RwLock, RwLockReadGuard};

use crate::codec;
use crate::config::Settings;
use crate::link::{Link, LinkError, failed};

/// Headers exchange that routes delayed copies into their delay queue.
pub const DELAY_EXCHANGE: &str = "polybus.delay";
/// Longest a publish (or a batch) takes, retries included, before it fails: a broker that
/// takes messages but confirms none (a blocked connection, a queue without a leader) makes
/// it fail in this time, not after every retry waited as long.
pub const PUBLISH_DEADLINE: Duration = Duration::from_secs(30);
/// A delay queue is deleted by the broker after this long without being declared (or used).
const DELAY_QUEUE_IDLE_MS: u64 = 10 * 60 * 1000;
/// A delay queue is declared again after this long, which keeps it from expiring while in use.
const DELAY_QUEUE_REDECLARE: Duration = Duration::from_secs(60);
/// Longest delay: what fits in a queue TTL together with the idle time.
const MAX_DELAY_MS: u64 = u32::MAX as u64 - DELAY_QUEUE_IDLE_MS;

/// What the RabbitMQ adapter can do.
pub const CAPABILITIES: Capabilities = Capabilities {
    at_least_once: true,
    ordering_per_key: false,
    delayed_delivery: Support::Emulated,
    nack_delay: Support::Emulated,
    fan_out: Support::Native,
    replay: false,
    counts_attempts: true,
    max_payload_bytes: None,
};

/// `rabbitmq {exchange}/{routing_key}`: what an error is about.
pub(crate) fn target(exchange: &str, routing_key: &str) -> String {
    format!("rabbitmq {exchange}/{routing_key}")
}

/// The delay queue for `delay_ms` whose messages go on to `target_exchange` (`""`: default exchange).
pub fn delay_queue(delay_ms: u64, target_exchange: &str) -> String {
    if target_exchange.is_empty() {
        format!("polybus.delay.{delay_ms}")
    } else {
        format!("polybus.delay.{target_exchange}.{delay_ms}")
    }
}

/// A delay in whole milliseconds, within what a queue TTL can hold.
pub(crate) fn delay_ms(delay: Duration) -> u64 {
    u64::try_from(delay.as_millis()).unwrap_or(u64::MAX).clamp(1, MAX_DELAY_MS)
}

/// Why one publish attempt failed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Worth another try on a fresh channel (lost connection, no confirm, unroutable delay
    /// copy); when the tries run out, the broker is [unavailable](FailureKind::Unavailable).
    Retry(String),
    /// Final: the broker refused the message, or the transport is closed.
    Fatal(Error),
}

impl Failure {
    fn into_error(self, target: &str) -> Error {
        match self {
            Failure::Retry(message) => retries_ran_out(Op::Publish, target, message),
            Failure::Fatal(error) => error,
        }
    }
}

/// The error of an operation whose retries all failed.
fn retries_ran_out(op: Op, target: impl Into<String>, message: String) -> Error {
    Error::transport(op, target, message).with_kind(FailureKind::Unavailable)
}

/// One message on its way: where to, and as what.
pub(crate) struct Outgoing {
    /// Exchange published to.
    pub exchange: String,
    /// Routing key.
    pub routing_key: String,
    /// Properties and headers.
    pub props: BasicProperties,
    /// Body.
    pub payload: Bytes,
    /// Through a delay queue: its delay and the exchange it dead-letters to.
    pub delay: Option<(u64, String)>,
    /// What errors name.
    pub target: String,
}

/// State shared by the transport, its subscriptions and their ackers.
pub(crate) struct Inner {
    pub settings: Arc<Settings>,
    publisher: Link,
    /// The connection subscriptions open their channels on.
    pub consumers: Link,
    channel: Mutex<Option<Channel>>,
    delay_queues: std::sync::Mutex<HashMap<String, Instant>>,
    /// The groups joined through this transport, for `groups`.
    pub joined: crate::groups::Joined,
    /// True once closed; publishes hold a read guard so `close` can wait for them.
    closed: RwLock<bool>,
}

impl Inner {
    /// A read guard while the transport is open.
    async fn open(&self) -> Result<RwLockReadGuard<'_, bool>> {
        let guard = self.closed.read().await;
        if *guard {
            return Err(Error::Closed(format!("rabbitmq transport {}", self.settings.endpoint)));
        }
        Ok(guard)
    }

    /// The publishing channel (confirm mode, exchange declared), opened again when it died.
    async fn channel(&self) -> Result<Channel, Failure> {
        let mut current = self.channel.lock().await;
        if let Some(channel) = current.as_ref()
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        let conn = self.publisher.connection().await.map_err(|e| match e {
            e @ LinkError::Connect { .. } if e.is_transient() => Failure::Retry(e.to_string()),
            e => Failure::Fatal(e.into_error(
                &self.settings,
                Op::Connect,
                format!("rabbitmq {}", self.settings.endpoint),
            )),
        })?;
        let target = format!("rabbitmq {} exchange {}", self.settings.endpoint, self.settings.exchange);
        let fail = |e| self.declare_failure(e, Op::Connect, &target);
        let channel = conn.create_channel().await.map_err(fail)?;
        channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(fail)?;
        declare_exchange(&channel, &self.settings.exchange).await.map_err(fail)?;
        self.delay_queues.lock().unwrap_or_else(|p| p.into_inner()).clear();
        *current = Some(channel.clone());
        Ok(channel)
    }

    /// A failed declaration: final when the broker refused it (access, an inequivalent existing
    /// object), worth retrying when the connection or channel went away.
    fn declare_failure(&self, e: lapin::Error, op: Op, target: &str) -> Failure {
        if e.is_amqp_soft_error() {
            Failure::Fatal(failed(&self.settings, op, target, e))
        } else {
            Failure::Retry(self.settings.scrub(e))
        }
    }

    /// One attempt: publish on the current channel and wait for the broker's confirm.
    async fn send(&self, out: &Outgoing, deadline: Instant) -> Result<(), Failure> {
        let channel = self.channel().await?;
        let confirm = self.start(&channel, out).await?;
        self.settle(out, confirm, deadline).await
    }

    /// Sends the message without waiting for its confirm.
    async fn start(&self, channel: &Channel, out: &Outgoing) -> Result<PublisherConfirm, Failure> {
        if let Some((ms, target_exchange)) = &out.delay {
            self.ensure_delay_queue(channel, *ms, target_exchange).await?;
        }
        let (exchange, routing_key) = (
            codec::short(&out.exchange, "exchange").map_err(|e| self.invalid(out, e))?,
            codec::short(&out.routing_key, "routing key").map_err(|e| self.invalid(out, e))?,
        );
        // Delayed copies are mandatory: a delay queue that expired meanwhile must not drop them.
        let options = BasicPublishOptions { mandatory: out.delay.is_some(), immediate: false };
        channel
            .basic_publish(exchange, routing_key, options, &out.payload, out.props.clone())
            .await
            .map_err(|e| Failure::Retry(self.settings.scrub(e)))
    }

    /// Waits until `deadline` for the confirm of a message sent with [`start`](Inner::start).
    async fn settle(
        &self,
        out: &Outgoing,
        confirm: PublisherConfirm,
        deadline: Instant,
    ) -> Result<(), Failure> {
        match tokio::time::timeout_at(deadline.into(), confirm).await {
            Err(_) => Err(Failure::Fatal(unconfirmed(&out.target))),
            Ok(Err(e)) => Err(Failure::Retry(self.settings.scrub(e))),
            Ok(Ok(Confirmation::Ack(None) | Confirmation::NotRequested)) => Ok(()),
            Ok(Ok(Confirmation::Ack(Some(returned)))) => {
                self.delay_queues.lock().unwrap_or_else(|p| p.into_inner()).clear();
                Err(Failure::Retry(format!("returned as unroutable: {}", returned.reply_text)))
            }
            Ok(Ok(Confirmation::Nack(_))) => Err(Failure::Fatal(
                Error::transport(
                    Op::Publish,
                    &out.target,
                    "the broker refused the message (publisher confirm nack)",
                )
                .with_kind(FailureKind::Invalid),
            )),
        }
    }

    fn invalid(&self, out: &Outgoing, message: String) -> Failure {
        Failure::Fatal(Error::transport(Op::Publish, &out.target, message).with_kind(FailureKind::Invalid))
    }

    /// Publishes and waits for the confirm, retrying on a fresh channel while that may help,
    /// for at most [`PUBLISH_DEADLINE`].
    pub async fn deliver(&self, out: &Outgoing) -> Result<()> {
        let _open = self.open().await?;
        self.deliver_until(out, Instant::now() + PUBLISH_DEADLINE).await
    }

    async fn deliver_until(&self, out: &Outgoing, deadline: Instant) -> Result<()> {
        let attempts = (|| self.send(out, deadline))
            .retry(retry_backoff())
            .when(|f| matches!(f, Failure::Retry(_)))
            .notify(|f, wait| tracing::debug!(target = %out.target, failure = ?f, ?wait, "publish retry"));
        match tokio::time::timeout_at(deadline.into(), attempts).await {
            Ok(result) => result.map_err(|f| f.into_error(&out.target)),
            Err(_) => Err(unconfirmed(&out.target)),
        }
    }

    /// Declares the delay queue (and the delay exchange) unless declared recently.
    async fn ensure_delay_queue(
        &self,
        channel: &Channel,
        ms: u64,
        target_exchange: &str,
    ) -> Result<(), Failure> {
        let name = delay_queue(ms, target_exchange);
        let fresh = {
            let queues = self.delay_queues.lock().unwrap_or_else(|p| p.into_inner());
            queues.get(&name).is_some_and(|at| at.elapsed() < DELAY_QUEUE_REDECLARE)
        };
        if fresh {
            return Ok(());
        }
        let target = format!("rabbitmq {DELAY_EXCHANGE}/{name}");
        let scrub = |e| self.declare_failure(e, Op::Publish, &target);
        channel
            .exchange_declare(
                DELAY_EXCHANGE.into(),
                ExchangeKind::Headers,
                ExchangeDeclareOptions { durable: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .map_err(scrub)?;
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), codec::long("classic"));
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ms as i64));
        args.insert("x-expires".into(), AMQPValue::LongLongInt((ms + DELAY_QUEUE_IDLE_MS) as i64));
        args.insert("x-dead-letter-exchange".into(), codec::long(target_exchange));
        channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions { durable: true, ..Default::default() },
                args,
            )
            .await
            .map_err(scrub)?;
        let mut binding = FieldTable::default();
        binding.insert("x-match".into(), codec::long("all"));
        codec::delay_headers(&mut binding, ms, target_exchange);
        channel
            .queue_bind(
                name.as_str().into(),
                DELAY_EXCHANGE.into(),
                "".into(),
                QueueBindOptions::default(),
                binding,
            )
            .await
            .map_err(scrub)?;
        self.delay_queues.lock().unwrap_or_else(|p| p.into_inner()).insert(name, Instant::now());
        Ok(())
    }

    /// What `message` becomes on the wire for `topic`.
    fn outgoing(&self, topic: &TopicSpec, message: &Message) -> Result<Outgoing> {
        let exchange = self.settings.exchange.clone();
        let target = target(&exchange, &topic.native_name);
        let mut props = codec::properties(message).map_err(|e| Error::transport(Op::Publish, &target, e))?;
        let delay = message.delay.filter(|d| !d.is_zero()).map(|d| (delay_ms(d), exchange.clone()));
        let exchange = match &delay {
            Some((ms, target_exchange)) => {
                let mut headers = props.headers().clone().unwrap_or_default();
                codec::delay_headers(&mut headers, *ms, target_exchange);
                props = props.with_headers(headers);
                DELAY_EXCHANGE.to_owned()
            }
            None => exchange,
        };
        Ok(Outgoing {
            exchange,
            routing_key: topic.native_name.clone(),
            props,
            payload: message.payload.clone(),
            delay,
            target,
        })
    }
}

/// A publish that was not confirmed by its deadline; the broker may still have the message.
fn unconfirmed(target: &str) -> Error {
    Error::transport(
        Op::Publish,
        target,
        format!(
            "no publisher confirm within {PUBLISH_DEADLINE:?}, retries included: the broker may or may not \
             have the message (publishing it again may duplicate it)"
        ),
    )
}

/// Retries of one connect, publish or subscribe: 50 ms doubling to 1 s, 6 times; 2.5 to 5 s in
/// all with jitter, so a caller hears of an outage within seconds.
pub(crate) fn retry_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(1))
        .with_max_times(6)
        .with_jitter()
}

/// Declares the durable topic exchange polybus publishes to.
pub(crate) async fn declare_exchange(channel: &Channel, exchange: &str) -> lapin::Result<()> {
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions { durable: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
}

/// A connection to one RabbitMQ broker env: a topic exchange, a quorum queue per group.
pub struct RabbitmqTransport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RabbitmqTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitmqTransport").field("settings", &self.inner.settings).finish_non_exhaustive()
    }
}

impl RabbitmqTransport {
    /// Connects, opens the publishing channel and declares the exchange.
    pub(crate) async fn connect(settings: Settings) -> Result<RabbitmqTransport> {
        let settings = Arc::new(settings);
        let inner = Arc::new(Inner {
            publisher: Link::new(settings.clone(), "publisher"),
            consumers: Link::new(settings.clone(), "consumer"),
            settings,
            channel: Mutex::new(None),
            delay_queues: std::sync::Mutex::new(HashMap::new()),
            joined: Default::default(),
            closed: RwLock::new(false),
        });
        // Retried a little: a broker that is restarting or just dropped us will answer soon.
        (|| inner.channel()).retry(retry_backoff()).when(|f| matches!(f, Failure::Retry(_))).await.map_err(
            |f| match f {
                Failure::Retry(message) => retries_ran_out(
                    Op::Connect,
                    format!("rabbitmq {} exchange {}", inner.settings.endpoint, inner.settings.exchange),
                    message,
                ),
                Failure::Fatal(error) => error,
            },
        )?;
        Ok(RabbitmqTransport { inner })
    }

    /// The exchange messages are published to.
    pub fn exchange(&self) -> &str {
        &self.inner.settings.exchange
    }
}

#[async_trait]
impl Transport for RabbitmqTransport {
    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    async fn ensure_topic(&self, topic: &TopicSpec) -> Result<()> {
        let _open = self.inner.open().await?;
        let target = target(&self.inner.settings.exchange, &topic.native_name);
        // Opening the channel declares the exchange; declaring it again heals a deleted exchange.
        let channel = self.inner.channel().await.map_err(|f| match f {
            Failure::Retry(message) => retries_ran_out(Op::EnsureTopic, &target, message),
            Failure::Fatal(error) => error,
        })?;
        declare_exchange(&channel, &self.inner.settings.exchange)
            .await
            .map_err(|e| failed(&self.inner.settings, Op::EnsureTopic, &target, e))
    }

    async fn publish(&self, topic: &TopicSpec, message: Message) -> Result<()> {
        let out = self.inner.outgoing(topic, &message)?;
        self.inner.deliver(&out).await
    }

    async fn publish_batch(&self, topic: &TopicSpec, messages: Vec<Message>) -> Result<()> {
        let _open = self.inner.open().await?;
        let deadline = Instant::now() + PUBLISH_DEADLINE;
        let outs = messages.iter().map(|m| self.inner.outgoing(topic, m)).collect::<Result<Vec<_>>>()?;
        // Pipelined: send all on one channel, then collect the confirms in order. Whatever
        // failed is sent again one by one, with retries.
        let mut retry = Vec::new();
        match self.inner.channel().await {
            Ok(channel) => {
                let mut confirms = Vec::with_capacity(outs.len());
                for out in &outs {
                    confirms.push(self.inner.start(&channel, out).await);
                }
                for (out, confirm) in outs.iter().zip(confirms) {
                    let settled = match confirm {
                        Ok(confirm) => self.inner.settle(out, confirm, deadline).await,
                        Err(failure) => Err(failure),
                    };
                    match settled {
                        Ok(()) => {}
                        Err(Failure::Retry(_)) => retry.push(out),
                        Err(Failure::Fatal(error)) => return Err(error),
                    }
                }
            }
            Err(Failure::Fatal(error)) => return Err(error),
            Err(Failure::Retry(_)) => retry.extend(outs.iter()),
        }
        for out in retry {
            self.inner.deliver_until(out, deadline).await?;
        }
        Ok(())
    }

    async fn subscribe(
        &self,
        topic: &TopicSpec,
        options: &SubscribeOptions,
    ) -> Result<Box<dyn Subscription>> {
        let _open = self.inner.open().await?;
        let subscription =
            crate::subscription::RabbitmqSubscription::start(self.inner.clone(), topic, options).await?;
        self.inner.joined.add(topic, &options.group);
        Ok(Box::new(subscription))
    }

    async fn groups(&self, topic: &TopicSpec) -> Result<Vec<GroupInfo>> {
        let _open = self.inner.open().await?;
        crate::groups::of_topic(&self.inner, topic).await
    }

    async fn ping(&self) -> Result<()> {
        let settings = &self.inner.settings;
        let target = format!("rabbitmq {} exchange {}", settings.endpoint, settings.exchange);
        let fail = |e| failed(settings, Op::Ping, &target, e);
        let conn = self.inner.publisher.connection().await.map_err(|e| match e {
            LinkError::Closed => Error::transport(Op::Ping, &target, e),
            e => e.into_error(settings, Op::Ping, &target),
        })?;
        // A throw-away channel: a failed passive declare closes the channel it ran on.
        let channel = conn.create_channel().await.map_err(fail)?;
        let declared = channel
            .exchange_declare(
                settings.exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions { passive: true, ..Default::default() },
                FieldTable::default(),
            )
            .await;
        if channel.status().connected() {
            let _ = channel.close(200, "OK".into()).await;
        }
        declared.map_err(fail)
    }

    async fn close(&self) -> Result<()> {
        // Taking the write side waits for every publish in flight to get its confirm.
        let mut closed = self.inner.closed.write().await;
        if *closed {
            return Ok(());
        }
        *closed = true;
        if let Some(channel) = self.inner.channel.lock().await.take()
            && channel.status().connected()
        {
            let _ = channel.close(200, "OK".into()).await;
        }
        // Nothing is pending any more: a connection that does not close cleanly is only logged.
        for (link, role) in [(&self.inner.consumers, "consumer"), (&self.inner.publisher, "publisher")] {
            if let Err(e) = link.close().await {
                tracing::debug!(endpoint = %self.inner.settings.endpoint, role, error = %e, "closing connection");
            }
        }
        Ok(())
    }
}
