//! The consumer thread of a member: fetch, hold back, hand over, commit; on close or drop,
//! commit and leave. See the parent module's docs for how partition queues are read.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use chrono::Utc;
use polybus_core::Message;
use rdkafka::TopicPartitionList;
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Message as _};
use tokio::sync::mpsc;

use super::member::{Member, commit};
use super::{Fetched, Shared, TICK};
use crate::codec;
use crate::offsets::{Slot, Source};

/// How long a closed subscription waits for its last deliveries to be settled, past their deadline.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
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
pub(super) fn run(
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
