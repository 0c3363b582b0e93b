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

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use polybus_core::{Acker, Delivery, Error, Message, Op, Result, SubscribeOptions, Subscription};
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch};

use crate::codec;
use crate::offsets::{Commit, Offsets, Slot, Source};
use crate::transport::Client;

/// How long `subscribe` waits for the group to give this member its partitions.
const ASSIGNMENT_WAIT: Duration = Duration::from_secs(8);
/// How long a closed subscription waits for its last deliveries to be settled, past their deadline.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// How long `close` waits for the member to commit and leave its group.
const LEAVE_WAIT: Duration = Duration::from_secs(10);
/// Longest the consumer thread blocks before looking at acks, deadlines and commits again.
const TICK: Duration = Duration::from_millis(100);
/// How long committed offsets may take to read when partitions are assigned.
const COMMITTED_WAIT: Duration = Duration::from_secs(5);
/// Least time between two commits of one member's progress while it consumes.
const COMMIT_INTERVAL: Duration = Duration::from_millis(50);
/// Least time between two commits of new delivery counts: soon after a hand-out (a rebalance
/// that starts later refuses commits), but not once per message under load.
const COUNT_INTERVAL: Duration = Duration::from_millis(5);
/// Most records taken from librdkafka in one go before acks and commits are looked at again.
const POLL_BATCH: usize = 256;
/// Most events of the main queue that are not messages (log lines, commit results, rebalances,
/// errors) served in one turn before acks and commits are looked at again.
const EVENT_BATCH: usize = 1024;
/// A member stops taking from its partition queues once this many messages wait to be handed
/// out (or `prefetch`, when larger)…
const BUFFER_MESSAGES: usize = 1024;
/// …or this many bytes of them.
const BUFFER_BYTES: usize = 16 << 20;
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

/// A delivery handed out and not settled yet.
struct InFlight {
    message: Message,
    deadline: Instant,
}

#[derive(Default)]
struct State {
    offsets: Offsets,
    in_flight: HashMap<Slot, InFlight>,
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
    fn take(&self, slot: &Slot, id: &str) -> Result<Option<InFlight>> {
        let mut state = self.lock();
        if let Some(in_flight) = state.in_flight.remove(slot) {
            return Ok(Some(in_flight));
        }
        if state.offsets.is_current(slot) { Err(Error::LeaseLost(id.to_owned())) } else { Ok(None) }
    }

    /// Puts back a delivery whose settling failed; its deadline brings it back.
    fn restore(&self, slot: Slot, in_flight: InFlight) {
        let mut state = self.lock();
        if state.offsets.is_current(&slot) {
            state.in_flight.insert(slot, in_flight);
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
        .create_with_context(Member { shared: shared.clone(), served: AtomicU64::new(0) })
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
        .spawn(move || run(consumer, member, tx, woken))
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
        state.in_flight.insert(slot, InFlight { message: message.clone(), deadline });
        drop(state);
        // The new delivery count is committed at once: the partition may move any moment.
        self.shared.wake();
        let acker = KafkaAcker { shared: self.shared.clone(), slot, id: message.id.clone() };
        Some(Delivery::new(message, Box::new(acker)))
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
        let Some(in_flight) = self.shared.take(&self.slot, &self.id)? else {
            return Ok(());
        };
        let not_before = delay.and_then(|d| chrono::TimeDelta::from_std(d).ok()).map(|d| Utc::now() + d);
        let (shared, slot) = (self.shared.clone(), self.slot);
        // Spawned, so that a caller giving up half-way cannot leave the message in limbo.
        let copy = tokio::spawn(async move {
            let attempt = in_flight.message.attempt.saturating_add(1);
            match shared.copy_to_retry(&in_flight.message, attempt, not_before).await {
                Ok(()) => {
                    shared.settle(&slot);
                    Ok(())
                }
                Err(e) => {
                    shared.restore(slot, in_flight);
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
            let due: Vec<Slot> =
                state.in_flight.iter().filter(|(_, f)| f.deadline <= now).map(|(s, _)| *s).collect();
            let expired: Vec<(Slot, InFlight)> =
                due.into_iter().filter_map(|slot| state.in_flight.remove(&slot).map(|f| (slot, f))).collect();
            (expired, state.in_flight.values().map(|f| f.deadline).min())
        };
        let copies = expired.into_iter().map(|(slot, in_flight)| {
            let shared = shared.clone();
            async move {
                let attempt = in_flight.message.attempt.saturating_add(1);
                match shared.copy_to_retry(&in_flight.message, attempt, None).await {
                    Ok(()) => {
                        tracing::debug!(id = %in_flight.message.id, attempt, "ack deadline passed; redelivering");
                        shared.settle(&slot);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, id = %in_flight.message.id, "redelivering after the ack deadline failed");
                        shared.restore(slot, InFlight { deadline: Instant::now() + RETRY_PAUSE, ..in_flight });
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

/// The consumer's context: commits before partitions are revoked, reads delivery counts
/// when they are assigned.
struct Member {
    shared: Arc<Shared>,
    /// Events of the main queue served by these callbacks. `poll` answers `None` both when the
    /// queue is empty and when it served an event that is not a message; this tells the two apart
    /// (an event no callback sees, as an OAuth token refresh, passes for an empty queue).
    served: AtomicU64,
}

impl ClientContext for Member {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        self.served_one();
        crate::transport::log(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.served_one();
        crate::transport::client_error(&error, reason);
    }

    fn stats_raw(&self, statistics: &[u8]) {
        self.served_one();
        tracing::info!(target: "librdkafka", "statistics: {}", String::from_utf8_lossy(statistics));
    }
}

impl ConsumerContext for Member {
    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        self.served_one();
        if let Err(e) = result {
            tracing::debug!(group = %self.shared.options.group, error = %e,
                "asynchronous commit failed; a later commit overtakes it");
        }
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.served_one();
        match rebalance {
            Rebalance::Revoke(list) => self.revoke(consumer, list),
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => {
                tracing::warn!(group = %self.shared.options.group, error = %e, "rebalance failed")
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            self.assign(consumer, list);
        }
    }
}

impl Member {
    fn served_one(&self) {
        self.served.fetch_add(1, Ordering::Relaxed);
    }

    fn partitions(&self, list: &TopicPartitionList) -> Vec<(Source, i32)> {
        list.elements()
            .iter()
            .filter_map(|e| self.shared.names.source(e.topic()).map(|source| (source, e.partition())))
            .collect()
    }

    /// Commits what is safe for the revoked partitions and forgets their deliveries: settling
    /// one of them later is a no-op, the partition's next owner redelivers it.
    fn revoke(&self, consumer: &BaseConsumer<Self>, list: &TopicPartitionList) {
        let revoked = self.partitions(list);
        let commits = {
            let mut state = self.shared.lock();
            let commits: Vec<Commit> =
                revoked.iter().filter_map(|&(s, p)| state.offsets.revoke(s, p)).collect();
            let before = state.in_flight.len();
            state.in_flight.retain(|slot, _| !revoked.contains(&(slot.source, slot.partition)));
            let dropped = before - state.in_flight.len();
            state.outstanding = state.outstanding.saturating_sub(dropped);
            state.assignment += 1;
            commits
        };
        commit(consumer, &self.shared, commits, CommitMode::Sync);
        tracing::debug!(group = %self.shared.options.group, partitions = revoked.len(), "partitions revoked");
    }

    /// Tracks newly assigned partitions, with the delivery counts their last commit recorded.
    fn assign(&self, consumer: &BaseConsumer<Self>, list: &TopicPartitionList) {
        let assigned = self.partitions(list);
        let mut metadata: HashMap<(Source, i32), String> = HashMap::new();
        match consumer.committed_offsets(list.clone(), COMMITTED_WAIT) {
            Ok(committed) => {
                for element in committed.elements() {
                    if let Some(source) = self.shared.names.source(element.topic()) {
                        // Another client's metadata may not be UTF-8; it carries nothing for us then.
                        let text = catch_unwind(AssertUnwindSafe(|| element.metadata().to_owned()))
                            .unwrap_or_default();
                        metadata.insert((source, element.partition()), text);
                    }
                }
            }
            Err(e) => tracing::warn!(group = %self.shared.options.group, error = %e,
                "reading committed offsets failed; attempt numbers restart for these partitions"),
        }
        {
            let mut state = self.shared.lock();
            for &(source, partition) in &assigned {
                let text = metadata.get(&(source, partition)).map_or("", String::as_str);
                state.offsets.assign(source, partition, text);
            }
            state.assignment += 1;
        }
        self.shared.assigned.send_replace(true);
        tracing::debug!(group = %self.shared.options.group, partitions = assigned.len(), "partitions assigned");
    }
}

/// Commits `commits`. A failed synchronous commit is forgotten, so the next round commits
/// again; an asynchronous one that fails is overtaken by the next progress, and a member
/// always commits synchronously before its partitions go.
fn commit(consumer: &BaseConsumer<Member>, shared: &Shared, commits: Vec<Commit>, mode: CommitMode) {
    if commits.is_empty() {
        return;
    }
    let mut list = TopicPartitionList::with_capacity(commits.len());
    for c in &commits {
        let mut element = list.add_partition(shared.names.topic(c.source), c.partition);
        if element.set_offset(Offset::Offset(c.offset)).is_ok() {
            element.set_metadata(&c.metadata);
        }
    }
    if let Err(e) = consumer.commit(&list, mode) {
        tracing::debug!(group = %shared.options.group, error = %e, "commit failed; it is retried");
        let mut state = shared.lock();
        for c in &commits {
            state.offsets.commit_failed(c.source, c.partition);
        }
    }
}

/// A retry that is not due yet, kept by the consumer thread.
struct Held {
    due: Instant,
    seq: u64,
    slot: Slot,
    message: Message,
}

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}

impl Eq for Held {}

impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Held {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(other.due, other.seq))
    }
}

/// The consumer thread's own state.
struct Pump {
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<Fetched>,
    prefetch: usize,
    /// Fetched and due, not handed over yet (no room).
    backlog: VecDeque<(Slot, Message)>,
    backlog_bytes: usize,
    /// Retries that are not due yet.
    held: BinaryHeap<Reverse<Held>>,
    held_bytes: usize,
    seq: u64,
    /// The assignment under which every partition was paused (once closing).
    paused_under: Option<u64>,
    seen_assignment: u64,
    closing_since: Option<Instant>,
    /// The queue of each assigned partition, split off the consumer's main queue.
    queues: HashMap<(Source, i32), PartitionQueue<Member>>,
    /// The assignment the queues were split under.
    queues_under: u64,
    /// The main queue was found empty since the queues were split: what it held from before
    /// the split (earlier offsets of the same partitions) is taken, so the partition queues,
    /// which hold only later offsets, may be read.
    main_drained: bool,
    /// When progress was last committed.
    committed_at: Instant,
    /// When delivery counts were last committed.
    counted_at: Instant,
}

/// The consumer thread: fetch, hold back, hand over, commit; on close or drop, commit and leave.
fn run(
    consumer: BaseConsumer<Member>,
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<Fetched>,
    woken: Receiver<()>,
) {
    // librdkafka wakes the thread when it has something, as acks and hand-outs do.
    let wake = shared.wake.clone();
    let mut consumer = consumer;
    consumer.set_nonempty_callback(move || {
        let _ = wake.try_send(());
    });
    // Shared with the partition queues split off it.
    let consumer = Arc::new(consumer);
    let mut pump = Pump {
        prefetch: shared.options.prefetch.max(1),
        shared,
        tx,
        backlog: VecDeque::new(),
        backlog_bytes: 0,
        held: BinaryHeap::new(),
        held_bytes: 0,
        seq: 0,
        paused_under: None,
        seen_assignment: 0,
        closing_since: None,
        queues: HashMap::new(),
        queues_under: 0,
        main_drained: false,
        committed_at: Instant::now(),
        counted_at: Instant::now(),
    };
    while !pump.should_leave() {
        let now = Instant::now();
        pump.forget_revoked();
        pump.split_queues(&consumer);
        pump.hand_over(now);
        // After handing over, so the counts of what just went out are committed this turn.
        let commit_in = pump.commit_progress(&consumer, Instant::now());
        pump.pause_when_closing(&consumer);
        if !pump.fetch(&consumer) {
            let due_in = pump.held.peek().map_or(TICK, |Reverse(h)| h.due.saturating_duration_since(now));
            let _ = woken.recv_timeout(TICK.min(commit_in).min(due_in));
        }
    }
    pump.leave(consumer);
}

impl Pump {
    fn should_leave(&mut self) -> bool {
        if self.shared.dropped.load(Ordering::SeqCst) {
            return true;
        }
        if self.shared.closing.load(Ordering::SeqCst) {
            let since = *self.closing_since.get_or_insert_with(Instant::now);
            let grace = self.shared.options.ack_deadline + CLOSE_GRACE;
            return self.shared.lock().in_flight.is_empty() || since.elapsed() > grace;
        }
        self.tx.is_closed()
    }

    /// Commits new delivery counts at most every [`COUNT_INTERVAL`] and progress at most every
    /// [`COMMIT_INTERVAL`]; returns how long until the next commit may be due.
    fn commit_progress(&mut self, consumer: &BaseConsumer<Member>, now: Instant) -> Duration {
        let next_progress = self.committed_at + COMMIT_INTERVAL;
        let next_counts = self.counted_at + COUNT_INTERVAL;
        let moved = now >= next_progress;
        let counts = now >= next_counts;
        if moved {
            self.committed_at = now;
        }
        let (commits, counts_left) = {
            let mut state = self.shared.lock();
            let commits = if moved || counts { state.offsets.progress(moved, counts) } else { Vec::new() };
            (commits, state.offsets.has_counts())
        };
        if counts && !commits.is_empty() {
            self.counted_at = now;
        }
        commit(consumer, &self.shared, commits, CommitMode::Async);
        let progress_in = (self.committed_at + COMMIT_INTERVAL).saturating_duration_since(now);
        if counts_left {
            progress_in.min((self.counted_at + COUNT_INTERVAL).saturating_duration_since(now))
        } else {
            progress_in
        }
    }

    /// Drops what was fetched from partitions revoked since the last look.
    fn forget_revoked(&mut self) {
        let state = self.shared.lock();
        if state.assignment != self.seen_assignment {
            self.seen_assignment = state.assignment;
            self.backlog.retain(|(slot, _)| state.offsets.is_current(slot));
            self.held.retain(|Reverse(h)| state.offsets.is_current(&h.slot));
            self.backlog_bytes = self.backlog.iter().map(|(_, m)| size(m)).sum();
            self.held_bytes = self.held.iter().map(|Reverse(h)| size(&h.message)).sum();
        }
    }

    /// Hands due retries and the backlog to the subscription, within prefetch.
    fn hand_over(&mut self, now: Instant) {
        let outstanding = self.shared.lock().outstanding;
        let mut room =
            if self.closing_since.is_some() { 0 } else { self.prefetch.saturating_sub(outstanding) };
        let mut due = Vec::new();
        while room > due.len() && self.held.peek().is_some_and(|Reverse(h)| h.due <= now) {
            due.extend(self.held.pop().map(|Reverse(h)| (h.slot, h.message)));
        }
        for item in due.into_iter().rev() {
            self.held_bytes -= size(&item.1);
            self.backlog_bytes += size(&item.1);
            self.backlog.push_front(item);
        }
        while room > 0 {
            let Some((slot, message)) = self.backlog.pop_front() else { break };
            self.backlog_bytes -= size(&message);
            self.send(Fetched::Deliver(slot, message));
            room -= 1;
        }
    }

    fn send(&mut self, fetched: Fetched) {
        self.shared.lock().outstanding += 1;
        // A closed channel means the subscription is gone; the loop notices and leaves.
        let _ = self.tx.send(fetched);
    }

    /// Stops fetching once the member is closing (again after a rebalance); otherwise the
    /// partition queues, read only while there is room, hold back what does not fit.
    fn pause_when_closing(&mut self, consumer: &BaseConsumer<Member>) {
        if self.closing_since.is_none() || self.paused_under == Some(self.seen_assignment) {
            return;
        }
        let assigned: Vec<(Source, i32)> = self.shared.lock().offsets.assigned().collect();
        let mut pause = TopicPartitionList::new();
        for (source, partition) in assigned {
            pause.add_partition(self.shared.names.topic(source), partition);
        }
        if pause.count() > 0
            && let Err(e) = consumer.pause(&pause)
        {
            tracing::debug!(group = %self.shared.options.group, error = %e, "pausing partitions failed");
        }
        self.paused_under = Some(self.seen_assignment);
    }

    /// Splits the queue of every assigned partition off the main queue, after each rebalance
    /// (assigning partitions joins their queues to the main one again).
    fn split_queues(&mut self, consumer: &Arc<BaseConsumer<Member>>) {
        if self.queues_under == self.seen_assignment {
            return;
        }
        self.queues_under = self.seen_assignment;
        self.queues.clear();
        self.main_drained = false;
        let assigned: Vec<(Source, i32)> = self.shared.lock().offsets.assigned().collect();
        for (source, partition) in assigned {
            match consumer.split_partition_queue(self.shared.names.topic(source), partition) {
                Some(mut queue) => {
                    let wake = self.shared.wake.clone();
                    queue.set_nonempty_callback(move || {
                        let _ = wake.try_send(());
                    });
                    self.queues.insert((source, partition), queue);
                }
                None => {
                    tracing::debug!(partition, "cannot split a partition queue; it is read with the rest")
                }
            }
        }
    }

    /// How many more messages from `source` fit in the buffer (retries waiting count for retry).
    fn room(&self, source: Source) -> usize {
        if self.closing_since.is_some() {
            return 0;
        }
        let (messages, bytes) = match source {
            Source::Main => (self.backlog.len(), self.backlog_bytes),
            Source::Retry => (self.backlog.len() + self.held.len(), self.backlog_bytes + self.held_bytes),
        };
        if bytes >= BUFFER_BYTES { 0 } else { self.prefetch.max(BUFFER_MESSAGES).saturating_sub(messages) }
    }

    /// Takes what librdkafka has fetched: the main queue (serving rebalances on the way), then,
    /// once the main queue holds nothing from before the split, each partition queue while there
    /// is room. Offsets of a partition are thus taken in order, which [`Offsets`] relies on.
    /// True when there is more to do at once: messages were taken, or the main queue was left
    /// with events in it.
    fn fetch(&mut self, consumer: &BaseConsumer<Member>) -> bool {
        let (mut taken, emptied) = self.drain_main(consumer);
        if emptied {
            self.main_drained = true;
        }
        // A rebalance served just now joined the partitions to the main queue again: the queues
        // are split afresh next turn.
        let rebalanced = self.shared.lock().assignment != self.queues_under;
        if rebalanced || !self.main_drained {
            return taken > 0 || !emptied || rebalanced;
        }
        let queues = std::mem::take(&mut self.queues);
        for (&(source, _), queue) in &queues {
            let mut from_queue = 0;
            while from_queue < POLL_BATCH && self.room(source) > 0 {
                let Some(record) = queue.poll(Duration::ZERO) else { break };
                if !self.take(record) {
                    break;
                }
                from_queue += 1;
            }
            taken += from_queue;
        }
        self.queues = queues;
        taken > 0 || !emptied
    }

    /// Serves the main queue until it is empty, [`POLL_BATCH`] messages were taken, [`EVENT_BATCH`]
    /// other events were served or a rebalance changed the assignment. librdkafka puts log lines
    /// and commit results ahead of rebalances and messages there, and `poll` returns after each
    /// one it serves, so a single poll per turn could leave the queue ever further behind.
    /// Returns how many messages were taken and whether the queue was found empty.
    fn drain_main(&mut self, consumer: &BaseConsumer<Member>) -> (usize, bool) {
        let (mut taken, mut events) = (0, 0);
        let assignment = self.shared.lock().assignment;
        while taken < POLL_BATCH && events < EVENT_BATCH {
            let served = consumer.context().served.load(Ordering::Relaxed);
            match consumer.poll(Duration::ZERO) {
                Some(record) => {
                    if self.take(record) {
                        taken += 1;
                    } else {
                        events += 1;
                    }
                }
                None if consumer.context().served.load(Ordering::Relaxed) != served => {
                    events += 1;
                    if self.shared.lock().assignment != assignment {
                        break;
                    }
                }
                None => return (taken, true),
            }
        }
        (taken, false)
    }

    /// Files one fetched record into the backlog (or holds it until due); false on a fetch error.
    fn take(&mut self, record: KafkaResult<BorrowedMessage<'_>>) -> bool {
        let record = match record {
            Ok(record) => record,
            Err(e) => {
                tracing::debug!(group = %self.shared.options.group, error = %e, "fetch error; librdkafka retries");
                return false;
            }
        };
        let Some(source) = self.shared.names.source(record.topic()) else { return true };
        let (partition, offset, decoded) = (record.partition(), record.offset(), codec::decode(&record));
        self.file(source, partition, offset, decoded);
        true
    }

    /// Puts one decoded message where it belongs: the backlog, the runtime (not due, main topic)
    /// or the held retries.
    fn file(&mut self, source: Source, partition: i32, offset: i64, decoded: codec::Decoded) {
        let fetched = self.shared.lock().offsets.fetched(source, partition, offset);
        let Some((slot, before)) = fetched else { return };
        let mut message = decoded.message;
        message.attempt = message.attempt.max(before.saturating_add(1));
        match decoded.not_before.filter(|t| *t > Utc::now()) {
            None => {
                self.backlog_bytes += size(&message);
                self.backlog.push_back((slot, message));
            }
            Some(not_before) if source == Source::Main => {
                self.send(Fetched::Defer(slot, message, not_before))
            }
            Some(not_before) => {
                let wait = (not_before - Utc::now()).to_std().unwrap_or_default();
                self.seq += 1;
                self.held_bytes += size(&message);
                self.held.push(Reverse(Held { due: Instant::now() + wait, seq: self.seq, slot, message }));
            }
        }
    }

    /// Commits what is safe (with delivery counts for the next owner), then leaves the group.
    fn leave(mut self, consumer: Arc<BaseConsumer<Member>>) {
        let commits = self.shared.lock().offsets.everything();
        commit(&consumer, &self.shared, commits, CommitMode::Sync);
        // The partition queues hold the consumer too: it leaves the group when the last goes.
        self.queues.clear();
        drop(consumer);
        self.shared.finished.send_replace(true);
        tracing::debug!(topic = %self.shared.names.main, group = %self.shared.options.group, "member left its group");
    }
}

/// Roughly what a waiting message occupies.
fn size(message: &Message) -> usize {
    message.payload.len() + message.headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>() + 256
}
