//! A group member: a consumer on the group's quorum queue, with ack deadlines and reconnects.
//!
//! A background worker owns the channel. It buffers what the broker pushes (at most `prefetch`
//! unacked), returns a delivery to the queue when its ack deadline passes unsettled, gives back
//! the buffer when the application stops asking for messages, and opens a new channel (and
//! connection) after it drops.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use backon::{BackoffBuilder, Retryable};
use bytes::Bytes;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Consumer, ErrorKind};
use polybus_core::{
    Acker, Delivery, Error, FailureKind, Message, Op, Result, SubscribeOptions, Subscription, TopicSpec,
};
use tokio::sync::{Notify, watch};

use crate::codec;
use crate::link::{failed, reconnect_backoff};
use crate::transport::{self, DELAY_EXCHANGE, Inner, Outgoing};

/// How long `close` waits for the worker to cancel the consumer and give back the buffer.
const CLOSE_WAIT: Duration = Duration::from_secs(5);
/// How long the worker waits for the client to send a give-back or a reject: lapin may never
/// answer one sent just as its connection dies.
const SEND_WAIT: Duration = Duration::from_secs(5);

/// The queue of `group` on `topic`: `<native>--<group>`.
pub fn queue_name(topic: &TopicSpec, group: &str) -> String {
    format!("{}--{group}", topic.native_name)
}

/// A delivery the broker pushed, not yet handed to the application.
struct Held {
    message: Message,
    props: BasicProperties,
    acker: lapin::Acker,
    received: Instant,
}

/// A delivery handed to the application, not yet settled.
struct Out {
    acker: lapin::Acker,
    deadline: Instant,
}

#[derive(Default)]
struct State {
    buffer: VecDeque<Held>,
    outstanding: HashMap<u64, Out>,
    next_seq: u64,
    last_poll: Option<Instant>,
    polling: bool,
    closing: bool,
    ended: bool,
}

/// What the subscription, its worker and its ackers share.
struct Shared {
    inner: Arc<Inner>,
    exchange: String,
    routing_key: String,
    queue: String,
    consumer_tag: String,
    target: String,
    prefetch: u16,
    ack_deadline: Duration,
    started: Instant,
    state: std::sync::Mutex<State>,
    /// A delivery arrived, or the subscription ended.
    wake_next: Notify,
    /// Close was asked, or an outstanding delivery was settled.
    wake_worker: Notify,
    /// The consumer is cancelled and the buffer given back.
    cancelled: watch::Sender<bool>,
    /// Counts the channels lost: a settlement still waiting on a lost channel stops waiting.
    epoch: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn scrub(&self, e: lapin::Error) -> String {
        self.inner.settings.scrub(e)
    }

    fn setup_error(&self, e: lapin::Error) -> SetupError {
        // Channel-level refusals (access, missing or inequivalent objects) will not heal by retrying.
        let transient = !e.is_amqp_soft_error();
        SetupError { transient, error: failed(&self.inner.settings, Op::Subscribe, &self.target, e) }
    }

    /// Opens a channel, declares the exchange and the group's queue, binds it and consumes.
    async fn establish(&self) -> Result<(Channel, Consumer), SetupError> {
        let conn = self.inner.consumers.connection().await.map_err(|e| SetupError {
            transient: e.is_transient(),
            error: e.into_error(&self.inner.settings, Op::Subscribe, &self.target),
        })?;
        let channel = conn.create_channel().await.map_err(|e| self.setup_error(e))?;
        transport::declare_exchange(&channel, &self.exchange).await.map_err(|e| self.setup_error(e))?;
        let mut args = FieldTable::default();
        // Quorum queues count deliveries (`x-delivery-count`), which gives each message its attempt.
        args.insert("x-queue-type".into(), codec::long("quorum"));
        let durable = QueueDeclareOptions { durable: true, ..Default::default() };
        let channel = match channel.queue_declare(self.queue.as_str().into(), durable, args).await {
            Ok(_) => channel,
            Err(e) if precondition_failed(&e) => {
                // The queue exists with other arguments (made by another tool): use it as it is.
                tracing::warn!(queue = %self.queue, error = %self.scrub(e),
                    "group queue exists with other arguments; using it as it is");
                let channel = conn.create_channel().await.map_err(|e| self.setup_error(e))?;
                let passive = QueueDeclareOptions { passive: true, ..Default::default() };
                channel
                    .queue_declare(self.queue.as_str().into(), passive, FieldTable::default())
                    .await
                    .map_err(|e| self.setup_error(e))?;
                channel
            }
            Err(e) => return Err(self.setup_error(e)),
        };
        channel
            .queue_bind(
                self.queue.as_str().into(),
                self.exchange.as_str().into(),
                self.routing_key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| self.setup_error(e))?;
        channel
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| self.setup_error(e))?;
        let consumer = channel
            .basic_consume(
                self.queue.as_str().into(),
                self.consumer_tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| self.setup_error(e))?;
        Ok((channel, consumer))
    }

    /// Buffers a pushed delivery, or gives it straight back when closing.
    async fn receive(&self, delivery: lapin::message::Delivery) {
        let lapin::message::Delivery { data, properties, acker, redelivered, .. } = delivery;
        let message = codec::message(&properties, Bytes::from(data), redelivered);
        {
            let mut state = self.lock();
            if !state.closing {
                state.buffer.push_back(Held { message, props: properties, acker, received: Instant::now() });
                drop(state);
                self.wake_next.notify_one();
                return;
            }
        }
        give_back(&acker).await;
    }

    /// Returns expired deliveries to the queue, and the buffer when nobody asks for it.
    async fn sweep(&self) {
        let now = Instant::now();
        let (expired, unclaimed) = {
            let mut state = self.lock();
            let keys: Vec<u64> =
                state.outstanding.iter().filter(|(_, o)| o.deadline <= now).map(|(k, _)| *k).collect();
            let expired: Vec<Out> = keys.iter().filter_map(|k| state.outstanding.remove(k)).collect();
            // Buffered deliveries are held only while the application keeps asking for
            // messages: one that stopped (stuck or gone) gives them back after the deadline.
            let idle_since = state.last_poll.unwrap_or(self.started);
            let mut unclaimed = Vec::new();
            if !state.polling && now.duration_since(idle_since) >= self.ack_deadline {
                while state
                    .buffer
                    .front()
                    .is_some_and(|h| now.duration_since(h.received) >= self.ack_deadline)
                {
                    unclaimed.extend(state.buffer.pop_front());
                }
            }
            (expired, unclaimed)
        };
        if !expired.is_empty() {
            tracing::debug!(queue = %self.queue, count = expired.len(), "ack deadline passed; redelivering");
        }
        for out in expired {
            // A reject counts as a failed attempt (RabbitMQ 4.3+ counts only rejects).
            match tokio::time::timeout(SEND_WAIT, out.acker.reject(BasicRejectOptions { requeue: true }))
                .await
            {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::debug!(queue = %self.queue, error = %self.scrub(e), "returning an expired delivery")
                }
                Err(_) => tracing::debug!(queue = %self.queue, "returning an expired delivery: no answer"),
            }
        }
        for held in unclaimed {
            give_back(&held.acker).await;
        }
    }

    /// Forgets every delivery of a channel that died: the broker has requeued them.
    fn forget_all(&self) {
        let mut state = self.lock();
        state.buffer.clear();
        state.outstanding.clear();
        self.epoch.send_modify(|e| *e += 1);
    }

    fn end(&self) {
        let mut state = self.lock();
        state.ended = true;
        state.buffer.clear();
        state.outstanding.clear();
        self.epoch.send_modify(|e| *e += 1);
        drop(state);
        self.cancelled.send_replace(true);
        self.wake_next.notify_one();
    }

    fn request_close(&self) {
        self.lock().closing = true;
        self.wake_worker.notify_one();
        self.wake_next.notify_one();
    }
}

/// Why a consumer could not be set up.
#[derive(Debug)]
struct SetupError {
    /// What the subscriber hears when no try succeeded.
    error: Error,
    /// Another try (on a new connection) may succeed.
    transient: bool,
}

/// Returns a delivery that was never handed out; not a failed attempt.
async fn give_back(acker: &lapin::Acker) {
    let sent = acker.nack(BasicNackOptions { multiple: false, requeue: true });
    match tokio::time::timeout(SEND_WAIT, sent).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "giving back a buffered delivery"),
        Err(_) => tracing::debug!("giving back a buffered delivery: no answer"),
    }
}

fn precondition_failed(e: &lapin::Error) -> bool {
    matches!(e.kind(), ErrorKind::ProtocolError(err)
        if err.kind() == &AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED))
}

/// The next delivery of `consumer`; pending forever once there is none.
async fn next_of(consumer: &mut Option<Consumer>) -> Option<lapin::Result<lapin::message::Delivery>> {
    match consumer {
        Some(c) => c.next().await,
        None => std::future::pending().await,
    }
}

/// Runs until the subscription is closed and settled, or the transport closes.
async fn worker(shared: Arc<Shared>, channel: Channel, consumer: Consumer) {
    let (mut channel, mut consumer) = (channel, Some(consumer));
    let mut cancelled = false;
    let period = (shared.ack_deadline / 10).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let (closing, settled) = {
            let state = shared.lock();
            (state.closing, state.outstanding.is_empty())
        };
        if closing && !cancelled {
            cancelled = true;
            if consumer.is_some() && channel.status().connected() {
                let tag = shared.consumer_tag.as_str().into();
                if let Err(e) = channel.basic_cancel(tag, BasicCancelOptions::default()).await {
                    tracing::debug!(queue = %shared.queue, error = %shared.scrub(e), "cancelling consumer");
                }
            }
            let buffered: Vec<Held> = shared.lock().buffer.drain(..).collect();
            for held in buffered {
                give_back(&held.acker).await;
            }
            shared.cancelled.send_replace(true);
        }
        if closing && settled {
            if channel.status().connected() {
                let _ = channel.close(200, "OK".into()).await;
            }
            shared.end();
            return;
        }
        let lost = tokio::select! {
            delivery = next_of(&mut consumer) => match delivery {
                Some(Ok(delivery)) => {
                    shared.receive(delivery).await;
                    None
                }
                Some(Err(e)) => Some(shared.scrub(e)),
                None if closing => {
                    consumer = None;
                    None
                }
                None => Some("the broker cancelled the consumer".to_owned()),
            },
            _ = tick.tick() => {
                shared.sweep().await;
                (!channel.status().connected()).then(|| "the channel closed".to_owned())
            }
            _ = shared.wake_worker.notified() => None,
        };
        let Some(reason) = lost else { continue };
        shared.forget_all();
        // A channel that outlived its consumer gives back whatever it still holds.
        if channel.status().connected() {
            let _ = channel.close(200, "OK".into()).await;
        }
        if closing || shared.inner.consumers.is_closed() {
            shared.end();
            return;
        }
        tracing::warn!(queue = %shared.queue, %reason, "rabbitmq consumer lost; reconnecting");
        let mut delays = reconnect_backoff().build();
        loop {
            if shared.lock().closing || shared.inner.consumers.is_closed() {
                shared.end();
                return;
            }
            match shared.establish().await {
                Ok((ch, c)) => {
                    tracing::info!(queue = %shared.queue, "rabbitmq consumer resumed");
                    (channel, consumer) = (ch, Some(c));
                    break;
                }
                Err(e) => {
                    let wait = delays.next().unwrap_or(Duration::from_secs(5));
                    tracing::warn!(queue = %shared.queue, error = %e.error, retry_in = ?wait, "rabbitmq consumer reconnect failed");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shared.wake_worker.notified() => {}
                    }
                }
            }
        }
    }
}

/// Marks the application as asking for messages while alive.
struct Polling<'a>(&'a Shared);

impl<'a> Polling<'a> {
    fn start(shared: &'a Shared) -> Self {
        let mut state = shared.lock();
        state.polling = true;
        state.last_poll = Some(Instant::now());
        Polling(shared)
    }
}

impl Drop for Polling<'_> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.polling = false;
        state.last_poll = Some(Instant::now());
    }
}

/// A member of a consumer group on RabbitMQ.
pub struct RabbitmqSubscription {
    shared: Arc<Shared>,
    closed: bool,
}

impl std::fmt::Debug for RabbitmqSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitmqSubscription").field("queue", &self.shared.queue).finish_non_exhaustive()
    }
}

impl RabbitmqSubscription {
    /// Declares the group's queue, binds it and starts consuming.
    pub(crate) async fn start(
        inner: Arc<Inner>,
        topic: &TopicSpec,
        options: &SubscribeOptions,
    ) -> Result<RabbitmqSubscription> {
        let exchange = inner.settings.exchange.clone();
        let target = transport::target(&exchange, &topic.native_name);
        let queue = queue_name(topic, &options.group);
        let too_long = [(&queue, "queue name"), (&options.consumer, "consumer name")]
            .into_iter()
            .find_map(|(value, what)| codec::short(value, what).err());
        if let Some(message) = too_long {
            return Err(Error::transport(Op::Subscribe, &target, message));
        }
        let shared = Arc::new(Shared {
            inner,
            exchange,
            routing_key: topic.native_name.clone(),
            queue,
            consumer_tag: options.consumer.clone(),
            target: target.clone(),
            prefetch: u16::try_from(options.prefetch.max(1)).unwrap_or(u16::MAX),
            ack_deadline: options.ack_deadline.max(Duration::from_millis(10)),
            started: Instant::now(),
            state: std::sync::Mutex::new(State::default()),
            wake_next: Notify::new(),
            wake_worker: Notify::new(),
            cancelled: watch::Sender::new(false),
            epoch: watch::Sender::new(0),
        });
        let (channel, consumer) = (|| shared.establish())
            .retry(transport::retry_backoff())
            .when(|e| e.transient)
            .notify(|e, wait| tracing::debug!(target = %target, error = %e.error, ?wait, "subscribe retry"))
            .await
            .map_err(|e| if e.transient { e.error.with_kind(FailureKind::Unavailable) } else { e.error })?;
        tokio::spawn(worker(shared.clone(), channel, consumer));
        Ok(RabbitmqSubscription { shared, closed: false })
    }
}

#[async_trait]
impl Subscription for RabbitmqSubscription {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        let shared = self.shared.clone();
        let _polling = Polling::start(&shared);
        loop {
            let notified = shared.wake_next.notified();
            {
                let mut state = shared.lock();
                if self.closed || state.closing {
                    return None;
                }
                if let Some(held) = state.buffer.pop_front() {
                    let seq = state.next_seq;
                    state.next_seq += 1;
                    let deadline = Instant::now() + shared.ack_deadline;
                    state.outstanding.insert(seq, Out { acker: held.acker, deadline });
                    // Read under the lock that a lost channel's forget_all takes.
                    let epoch = *shared.epoch.borrow();
                    drop(state);
                    let acker = RabbitmqAcker {
                        shared: shared.clone(),
                        seq,
                        epoch,
                        id: held.message.id.clone(),
                        attempt: held.message.attempt,
                        props: held.props,
                        payload: held.message.payload.clone(),
                    };
                    return Some(Ok(Delivery::new(held.message, Box::new(acker))));
                }
                if state.ended {
                    return None;
                }
            }
            notified.await;
        }
    }

    async fn close(&mut self) -> Result<()> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        self.shared.request_close();
        let mut cancelled = self.shared.cancelled.subscribe();
        if tokio::time::timeout(CLOSE_WAIT, cancelled.wait_for(|c| *c)).await.is_err() {
            tracing::warn!(queue = %self.shared.queue, "closing the subscription took longer than {CLOSE_WAIT:?}");
        }
        Ok(())
    }
}

impl Drop for RabbitmqSubscription {
    fn drop(&mut self) {
        if !self.closed {
            self.shared.request_close();
        }
    }
}

/// Settles one delivery: basic.ack, basic.reject with requeue, or a delayed copy.
struct RabbitmqAcker {
    shared: Arc<Shared>,
    seq: u64,
    /// The channel the delivery came on, counted by `Shared::epoch`.
    epoch: u64,
    id: String,
    attempt: u32,
    props: BasicProperties,
    payload: Bytes,
}

impl RabbitmqAcker {
    /// Takes the delivery out of the outstanding set: whoever does settles it.
    fn take(&self) -> Result<lapin::Acker> {
        let out = self.shared.lock().outstanding.remove(&self.seq);
        self.shared.wake_worker.notify_one();
        out.map(|o| o.acker).ok_or_else(|| Error::LeaseLost(self.id.clone()))
    }

    fn fail(&self, op: Op, e: lapin::Error) -> Error {
        failed(&self.shared.inner.settings, op, &self.shared.target, e)
    }

    /// Waits for a settlement `sent` on the delivery's channel, or until that channel is lost:
    /// lapin may never answer a settlement sent as its connection dies, and the broker requeues
    /// the delivery of a lost channel itself.
    async fn done(&self, op: Op, sent: impl Future<Output = lapin::Result<bool>>) -> Result<()> {
        let mut epoch = self.shared.epoch.subscribe();
        let result = tokio::select! {
            result = sent => result,
            _ = epoch.wait_for(|e| *e != self.epoch) => return Err(Error::LeaseLost(self.id.clone())),
        };
        match result {
            Ok(true) => Ok(()),
            // The channel died meanwhile: the broker requeues the message.
            Ok(false) => Err(Error::LeaseLost(self.id.clone())),
            Err(e) => Err(self.fail(op, e)),
        }
    }
}

#[async_trait]
impl Acker for RabbitmqAcker {
    async fn ack(self: Box<Self>) -> Result<()> {
        let acker = self.take()?;
        self.done(Op::Ack, acker.ack(BasicAckOptions::default())).await
    }

    async fn nack(self: Box<Self>, delay: Option<Duration>) -> Result<()> {
        let acker = self.take()?;
        let Some(delay) = delay.filter(|d| !d.is_zero()) else {
            return self.done(Op::Nack, acker.reject(BasicRejectOptions { requeue: true })).await;
        };
        // No plugin needed: a copy waits in a TTL queue that dead-letters it back to the
        // group's queue through the default exchange; then the original is acked.
        let ms = transport::delay_ms(delay);
        let copy = Outgoing {
            exchange: DELAY_EXCHANGE.to_owned(),
            routing_key: self.shared.queue.clone(),
            props: codec::republished(&self.props, self.attempt.saturating_add(1), ms, ""),
            payload: self.payload.clone(),
            delay: Some((ms, String::new())),
            target: self.shared.target.clone(),
        };
        if let Err(e) = self.shared.inner.deliver(&copy).await {
            let _ = self.done(Op::Nack, acker.reject(BasicRejectOptions { requeue: true })).await;
            return Err(e);
        }
        self.done(Op::Nack, acker.ack(BasicAckOptions::default())).await
    }
}
