//! A member of a consumer group.
//!
//! Each subscription owns one rdkafka consumer, driven by a thread of its own (librdkafka's
//! calls block, and a consumer's drop waits for it to leave the group). That thread fetches
//! from the topic and from the group's retry topic, keeps not-yet-due retries until their
//! time, hands the rest to [`KafkaSubscription::next`] without ever exceeding `prefetch`
//! unsettled messages, and commits each partition up to its first unsettled message. A task
//! on the runtime copies deliveries whose ack deadline passed to the retry topic.
//!
//! Each assigned partition's messages come through a queue of their own, read only while the
//! member's buffer has room: librdkafka stops fetching a partition whose queue is full and keeps
//! what it prefetched (pausing would throw that away and fetch it again). The consumer's main
//! queue is read every turn, for rebalances and for what arrived before a partition was split,
//! until it is empty (or a bounded number of events were served); the partition queues only once
//! it has been found empty since the split, so that each partition's offsets are taken in order.
//!
//! The consumer thread is in `pump`, the rdkafka context (rebalances, commits) in `member`; the
//! ack deadlines are the kit's [`Leases`].

mod member;
mod pump;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use polybus_core::kit::leases::Leases;
use polybus_core::{Acker, Delivery, Error, Message, Op, Result, SubscribeOptions, Subscription};
use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio::sync::{mpsc, watch};

use crate::codec;
use crate::offsets::{Offsets, Slot, Source};
use crate::transport::Client;
use member::Member;

/// How long `subscribe` waits for the group to give this member its partitions.
const ASSIGNMENT_WAIT: Duration = Duration::from_secs(8);
/// How long `close` waits for the member to commit and leave its group.
const LEAVE_WAIT: Duration = Duration::from_secs(10);
/// Longest the consumer thread blocks before looking at acks, deadlines and commits again.
const TICK: Duration = Duration::from_millis(100);
/// Pause before trying a failed retry copy again.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// Native names of the two topics a member reads.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    /// The topic itself.
    pub main: String,
    /// The group's retry topic.
    pub retry: String,
}

impl Names {
    fn topic(&self, source: Source) -> &str {
        match source {
            Source::Main => &self.main,
            Source::Retry => &self.retry,
        }
    }

    fn source(&self, topic: &str) -> Option<Source> {
        if topic == self.main {
            Some(Source::Main)
        } else if topic == self.retry {
            Some(Source::Retry)
        } else {
            None
        }
    }
}

/// What the consumer thread hands to the subscription.
enum Fetched {
    /// A message to hand out.
    Deliver(Slot, Message),
    /// A delayed message on the topic itself: copy it to the retry topic, to wait there.
    Defer(Slot, Message, DateTime<Utc>),
}

#[derive(Default)]
struct State {
    offsets: Offsets,
    /// Handed out and not settled yet, with their ack deadlines.
    in_flight: Leases<Slot, Message>,
    /// Messages given to the subscription and not settled: queued, handed out, being copied.
    outstanding: usize,
    /// Bumped on every assignment change.
    assignment: u64,
}

/// What the subscription, its deliveries, its deadline task and its consumer thread share.
struct Shared {
    state: Mutex<State>,
    wake: SyncSender<()>,
    closing: AtomicBool,
    dropped: AtomicBool,
    assigned: watch::Sender<bool>,
    finished: watch::Sender<bool>,
    names: Names,
    client: Arc<Client>,
    options: SubscribeOptions,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Lets the consumer thread look again (room for more, or closing).
    fn wake(&self) {
        let _ = self.wake.try_send(());
    }

    /// Takes a handed-out delivery back for settling. `Ok(None)`: its partition was revoked
    /// meanwhile, so settling it is a no-op (the group's next owner redelivers it).
    fn take(&self, slot: &Slot, id: &str) -> Result<Option<(Message, Instant)>> {
        let mut state = self.lock();
        if let Some(lease) = state.in_flight.take_lease(slot) {
            return Ok(Some(lease));
        }
        if state.offsets.is_current(slot) { Err(Error::LeaseLost(id.to_owned())) } else { Ok(None) }
    }

    /// Puts back a delivery whose settling failed; its deadline brings it back.
    fn restore(&self, slot: Slot, message: Message, deadline: Instant) {
        let mut state = self.lock();
        if state.offsets.is_current(&slot) {
            state.in_flight.insert(slot, message, deadline);
        } else {
            state.outstanding = state.outstanding.saturating_sub(1);
        }
    }

    /// The message at `slot` is done with: acked, or copied to the retry topic.
    fn settle(&self, slot: &Slot) {
        {
            let mut state = self.lock();
            state.offsets.settle(slot);
            state.outstanding = state.outstanding.saturating_sub(1);
        }
        self.wake();
    }

    /// Publishes a copy of `message` to the group's retry topic, as delivery `attempt`.
    async fn copy_to_retry(
        &self,
        message: &Message,
        attempt: u32,
        not_before: Option<DateTime<Utc>>,
    ) -> Result<()> {
        let record = codec::encode(message, attempt, not_before);
        self.client.produce(&self.names.retry, record, Op::Nack).await
    }

    fn error(&self, op: Op, cause: impl std::fmt::Display) -> Error {
        self.client.error(op, &self.names.main, cause)
    }
}

/// Joins `options.group` on `names.main` (and its retry topic) and waits for partitions.
pub(crate) async fn start(
    client: Arc<Client>,
    names: Names,
    options: SubscribeOptions,
) -> Result<KafkaSubscription> {
    let (tx, rx) = mpsc::unbounded_channel();
    let (wake, woken) = sync_channel(1);
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        wake,
        closing: AtomicBool::new(false),
        dropped: AtomicBool::new(false),
        assigned: watch::Sender::new(false),
        finished: watch::Sender::new(false),
        names,
        client,
        options,
    });
    let config = shared.client.settings.consumer(&shared.options.group);
    let consumer: BaseConsumer<Member> = config
        .create_with_context(Member::new(shared.clone()))
        .map_err(|e| shared.client.failed(Op::Subscribe, &shared.names.main, e))?;
    if let Err(e) = consumer.subscribe(&[&shared.names.main, &shared.names.retry]) {
        // A consumer's drop blocks until it has left its group: off the runtime.
        tokio::task::spawn_blocking(move || drop(consumer));
        return Err(shared.client.failed(Op::Subscribe, &shared.names.main, e));
    }
    let mut assigned = shared.assigned.subscribe();
    let member = shared.clone();
    std::thread::Builder::new()
        .name(format!("polybus-kafka {}", shared.options.group))
        .spawn(move || pump::run(consumer, member, tx, woken))
        .map_err(|e| shared.error(Op::Subscribe, e))?;
    tokio::spawn(expire(shared.clone()));
    if tokio::time::timeout(ASSIGNMENT_WAIT, assigned.wait_for(|a| *a)).await.is_err() {
        tracing::warn!(topic = %shared.names.main, group = %shared.options.group,
            "no partitions assigned after {ASSIGNMENT_WAIT:?}; the member keeps trying to join");
    }
    Ok(KafkaSubscription { shared, rx, closed: false })
}

/// A member of a consumer group; see the module docs.
pub(crate) struct KafkaSubscription {
    shared: Arc<Shared>,
    rx: mpsc::UnboundedReceiver<Fetched>,
    closed: bool,
}

impl KafkaSubscription {
    fn hand_out(&self, slot: Slot, message: Message) -> Option<Delivery> {
        let mut state = self.shared.lock();
        if !state.offsets.is_current(&slot) {
            state.outstanding = state.outstanding.saturating_sub(1);
            drop(state);
            self.shared.wake();
            return None;
        }
        state.offsets.handed_out(&slot, message.attempt);
        let deadline = Instant::now() + self.shared.options.ack_deadline;
        state.in_flight.insert(slot, message.clone(), deadline);
        drop(state);
        // The new delivery count is committed at once: the partition may move any moment.
        self.shared.wake();
        let acker = KafkaAcker { shared: self.shared.clone(), slot, id: message.id.clone() };
        Some(Delivery::new(message, Box::new(acker)))
    }

    /// Hands out several fetched messages under one lock and with one wake of the consumer
    /// thread; those of partitions revoked meanwhile are dropped.
    fn hand_out_all(&self, fetched: Vec<(Slot, Message)>, into: &mut Vec<Delivery>) {
        if fetched.is_empty() {
            return;
        }
        let deadline = Instant::now() + self.shared.options.ack_deadline;
        let mut state = self.shared.lock();
        for (slot, message) in fetched {
            if !state.offsets.is_current(&slot) {
                state.outstanding = state.outstanding.saturating_sub(1);
                continue;
            }
            state.offsets.handed_out(&slot, message.attempt);
            state.in_flight.insert(slot, message.clone(), deadline);
            let acker = KafkaAcker { shared: self.shared.clone(), slot, id: message.id.clone() };
            into.push(Delivery::new(message, Box::new(acker)));
        }
        drop(state);
        self.shared.wake();
    }

    /// A message to hand out, or `None` for a delayed one, sent off to wait on the retry topic.
    fn deliverable(&self, fetched: Fetched) -> Option<(Slot, Message)> {
        match fetched {
            Fetched::Deliver(slot, message) => Some((slot, message)),
            Fetched::Defer(slot, message, not_before) => {
                tokio::spawn(defer(self.shared.clone(), slot, message, not_before));
                None
            }
        }
    }
}

#[async_trait]
impl Subscription for KafkaSubscription {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        loop {
            if self.closed {
                return None;
            }
            match self.rx.recv().await? {
                Fetched::Deliver(slot, message) => {
                    if let Some(delivery) = self.hand_out(slot, message) {
                        return Some(Ok(delivery));
                    }
                }
                Fetched::Defer(slot, message, not_before) => {
                    tokio::spawn(defer(self.shared.clone(), slot, message, not_before));
                }
            }
        }
    }

    // Takes what the consumer thread handed over in one go (one lock, one wake) rather than
    // a delivery at a time.
    async fn next_ready(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        let mut batch = Vec::new();
        let until = tokio::time::Instant::now() + wait;
        while batch.len() < max && !self.closed {
            let mut ready = Vec::new();
            while batch.len() + ready.len() < max {
                match self.rx.try_recv() {
                    Ok(fetched) => ready.extend(self.deliverable(fetched)),
                    Err(_) => break,
                }
            }
            if ready.is_empty() {
                if wait.is_zero() {
                    break;
                }
                match tokio::time::timeout_at(until, self.rx.recv()).await {
                    Ok(Some(fetched)) => ready.extend(self.deliverable(fetched)),
                    Ok(None) | Err(_) => break,
                }
            }
            self.hand_out_all(ready, &mut batch);
        }
        Ok(batch)
    }

    async fn close(&mut self) -> Result<()> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        self.shared.closing.store(true, Ordering::SeqCst);
        // What was fetched and not handed out stays uncommitted: the group gets it again.
        self.rx.close();
        while self.rx.try_recv().is_ok() {}
        self.shared.wake();
        let idle = self.shared.lock().in_flight.is_empty();
        if idle {
            let mut finished = self.shared.finished.subscribe();
            if tokio::time::timeout(LEAVE_WAIT, finished.wait_for(|f| *f)).await.is_err() {
                tracing::warn!(topic = %self.shared.names.main, group = %self.shared.options.group,
                    "the member had not left its group {LEAVE_WAIT:?} after close");
            }
        }
        Ok(())
    }
}

impl Drop for KafkaSubscription {
    fn drop(&mut self) {
        self.shared.dropped.store(true, Ordering::SeqCst);
        self.shared.wake();
    }
}

/// Settles one delivery.
struct KafkaAcker {
    shared: Arc<Shared>,
    slot: Slot,
    id: String,
}

#[async_trait]
impl Acker for KafkaAcker {
    async fn ack(self: Box<Self>) -> Result<()> {
        if self.shared.take(&self.slot, &self.id)?.is_some() {
            self.shared.settle(&self.slot);
        }
        Ok(())
    }

    async fn nack(self: Box<Self>, delay: Option<Duration>) -> Result<()> {
        let Some((message, deadline)) = self.shared.take(&self.slot, &self.id)? else {
            return Ok(());
        };
        let not_before = delay.and_then(|d| chrono::TimeDelta::from_std(d).ok()).map(|d| Utc::now() + d);
        let (shared, slot) = (self.shared.clone(), self.slot);
        // Spawned, so that a caller giving up half-way cannot leave the message in limbo.
        let copy = tokio::spawn(async move {
            let attempt = message.attempt.saturating_add(1);
            match shared.copy_to_retry(&message, attempt, not_before).await {
                Ok(()) => {
                    shared.settle(&slot);
                    Ok(())
                }
                Err(e) => {
                    shared.restore(slot, message, deadline);
                    Err(e)
                }
            }
        });
        copy.await.map_err(|e| self.shared.error(Op::Nack, e))?
    }
}

/// Copies a delayed message from the topic to the retry topic, where it waits for its time
/// without holding up the partition it came from.
async fn defer(shared: Arc<Shared>, slot: Slot, message: Message, not_before: DateTime<Utc>) {
    loop {
        if !shared.lock().offsets.is_current(&slot) {
            // The partition's next owner defers it instead.
            shared.settle(&slot);
            return;
        }
        match shared.copy_to_retry(&message, message.attempt, Some(not_before)).await {
            Ok(()) => {
                shared.settle(&slot);
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, id = %message.id, "deferring a delayed message failed; trying again");
                if shared.dropped.load(Ordering::SeqCst) {
                    return;
                }
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    }
}

/// Redelivers handed-out messages whose ack deadline passed: a copy with the next attempt
/// number goes to the retry topic and the original counts as settled.
async fn expire(shared: Arc<Shared>) {
    loop {
        if shared.dropped.load(Ordering::SeqCst) {
            return;
        }
        let now = Instant::now();
        let (expired, next) = {
            let mut state = shared.lock();
            let expired = state.in_flight.expired(now);
            (expired, state.in_flight.next_deadline())
        };
        let copies = expired.into_iter().map(|(slot, message)| {
            let shared = shared.clone();
            async move {
                let attempt = message.attempt.saturating_add(1);
                match shared.copy_to_retry(&message, attempt, None).await {
                    Ok(()) => {
                        tracing::debug!(id = %message.id, attempt, "ack deadline passed; redelivering");
                        shared.settle(&slot);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, id = %message.id, "redelivering after the ack deadline failed");
                        shared.restore(slot, message, Instant::now() + RETRY_PAUSE);
                    }
                }
            }
        });
        futures::future::join_all(copies).await;
        if *shared.finished.borrow() && shared.lock().in_flight.is_empty() {
            return;
        }
        let wake_at = next.map_or(now + TICK * 2, |n| n.min(now + TICK * 2));
        tokio::time::sleep_until(wake_at.into()).await;
    }
}
