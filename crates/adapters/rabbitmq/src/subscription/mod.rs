//! A group member: a consumer on the group's quorum queue, with ack deadlines and reconnects.
//!
//! A background worker owns the channel. It buffers what the broker pushes (at most `prefetch`
//! unacked), returns a delivery to the queue when its ack deadline passes unsettled, gives back
//! the buffer when the application stops asking for messages, and opens a new channel (and
//! connection) after it drops. The deadlines and the buffer are the kit's
//! [`Leases`](polybus_core::kit::leases::Leases) and [`Buffer`](polybus_core::kit::leases::Buffer);
//! the worker is in `channel`, settling in `acker`.

mod acker;
mod channel;

use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use backon::Retryable;
use bytes::Bytes;
use lapin::BasicProperties;
use lapin::options::{BasicNackOptions, BasicRejectOptions};
use polybus_core::kit::leases::{Buffer, Leases, Polling};
use polybus_core::{
    Delivery, Error, FailureKind, Message, Op, Result, SubscribeOptions, Subscription, TopicSpec,
};
use tokio::sync::{Notify, watch};

use crate::codec;
use crate::transport::{self, Inner};
use acker::RabbitmqAcker;
use channel::worker;

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
}

/// What the worker, the subscription and its ackers change under one lock.
struct State {
    /// Pushed by the broker, not handed out yet.
    buffer: Buffer<Held>,
    /// Handed out and not settled, by lease id: what settles each.
    outstanding: Leases<u64, lapin::Acker>,
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

    /// Buffers a pushed delivery, or gives it straight back when closing.
    async fn receive(&self, delivery: lapin::message::Delivery) {
        let lapin::message::Delivery { data, properties, acker, redelivered, .. } = delivery;
        let message = codec::message(&properties, Bytes::from(data), redelivered);
        {
            let mut state = self.lock();
            if !state.closing {
                state.buffer.push(Held { message, props: properties, acker }, Instant::now());
                drop(state);
                self.wake_next.notify_one();
                return;
            }
        }
        self.give_back(&acker).await;
    }

    /// Returns expired deliveries to the queue, and the buffer when nobody asks for it.
    async fn sweep(&self) {
        let now = Instant::now();
        let (expired, unclaimed) = {
            let mut state = self.lock();
            let expired = state.outstanding.expired(now);
            // Buffered deliveries are held only while the application keeps asking for
            // messages: one that stopped (stuck or gone) gives them back after the deadline.
            let unclaimed = state.buffer.unclaimed(now, self.ack_deadline);
            (expired, unclaimed)
        };
        if !expired.is_empty() {
            tracing::debug!(queue = %self.queue, count = expired.len(), "ack deadline passed; redelivering");
        }
        for (_, acker) in expired {
            // A reject counts as a failed attempt (RabbitMQ 4.3+ counts only rejects).
            let sent = acker.reject(BasicRejectOptions { requeue: true });
            self.send_bounded("returning an expired delivery", sent).await;
        }
        for held in unclaimed {
            self.give_back(&held.acker).await;
        }
    }

    /// Returns a delivery that was never handed out; not a failed attempt.
    async fn give_back(&self, acker: &lapin::Acker) {
        let sent = acker.nack(BasicNackOptions { multiple: false, requeue: true });
        self.send_bounded("giving back a buffered delivery", sent).await;
    }

    /// Waits at most [`SEND_WAIT`] for a settlement the worker sent itself (lapin may never
    /// answer one sent as its connection dies); a failure is only logged, as `what`.
    async fn send_bounded(&self, what: &str, sent: impl Future<Output = lapin::Result<bool>>) {
        match tokio::time::timeout(SEND_WAIT, sent).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::debug!(queue = %self.queue, error = %self.scrub(e), "{what}"),
            Err(_) => tracing::debug!(queue = %self.queue, "{what}: no answer"),
        }
    }

    /// Forgets every delivery of a channel that died: the broker has requeued them.
    fn forget_all(&self) {
        let mut state = self.lock();
        state.buffer.clear();
        state.outstanding.forget_all();
        self.epoch.send_modify(|e| *e += 1);
    }

    fn end(&self) {
        let mut state = self.lock();
        state.ended = true;
        state.buffer.clear();
        state.outstanding.forget_all();
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
            state: std::sync::Mutex::new(State {
                buffer: Buffer::new(Instant::now()),
                outstanding: Leases::new(),
                closing: false,
                ended: false,
            }),
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
        // Marks the application as asking for messages until this call returns.
        let _polling = Polling::start(&shared.state, |s| &mut s.buffer);
        loop {
            let notified = shared.wake_next.notified();
            {
                let mut state = shared.lock();
                if self.closed || state.closing {
                    return None;
                }
                if let Some(held) = state.buffer.pop() {
                    let seq = state.outstanding.lease(held.acker, Instant::now() + shared.ack_deadline);
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
