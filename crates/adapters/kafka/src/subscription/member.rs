//! The rdkafka consumer context of a member: commits before partitions are revoked and reads
//! delivery counts when they are assigned.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::{Offset, TopicPartitionList};

use super::Shared;
use crate::offsets::{Commit, Source};

/// How long committed offsets may take to read when partitions are assigned.
const COMMITTED_WAIT: Duration = Duration::from_secs(5);

/// The consumer's context: commits before partitions are revoked, reads delivery counts
/// when they are assigned.
pub(super) struct Member {
    shared: Arc<Shared>,
    /// Events of the main queue served by these callbacks. `poll` answers `None` both when the
    /// queue is empty and when it served an event that is not a message; this tells the two apart
    /// (an event no callback sees, as an OAuth token refresh, passes for an empty queue).
    pub(super) served: AtomicU64,
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
    /// The context of the consumer of `shared`'s member.
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        Member { shared, served: AtomicU64::new(0) }
    }

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
            let dropped = state.in_flight.retain(|slot, _| !revoked.contains(&(slot.source, slot.partition)));
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
pub(super) fn commit(
    consumer: &BaseConsumer<Member>,
    shared: &Shared,
    commits: Vec<Commit>,
    mode: CommitMode,
) {
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
