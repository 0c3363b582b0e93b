//! Replay and message query on the topic's log, which keeps every record until the topic's
//! retention removes it.
//!
//! A replay commits, for every partition of the topic, the group's offset at the start: the
//! earliest offset, or the first at or after the time (`offsets_for_times`; the partition's end
//! when nothing is that recent). Kafka takes such a commit only from a member while the group
//! has members, so a replay of a group with members connected is refused: stop them (close
//! their subscriptions), replay, then subscribe again. The group's retry topic is left as it
//! is. A query reads the partitions with a consumer that joins no group, from `since` (or the
//! beginning) up to the end each had when the query started.

use std::time::{Duration, Instant};

use polybus_core::{Error, FailureKind, MessageQuery, Op, ReplayFrom, Result, StoredMessage, TopicSpec};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message as _;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::codec;
use crate::transport::{Client, KafkaTransport, Logger};

/// How long each metadata, offset and commit request may take.
const REQUEST_WAIT: Duration = Duration::from_secs(10);
/// How long a query may read.
const QUERY_WAIT: Duration = Duration::from_secs(15);
/// Most records one query reads while filtering; narrow it with since and until.
const SCAN_MAX: usize = 100_000;

/// A partition's range to read: from `start` up to (not including) `end`.
struct Range {
    partition: i32,
    start: i64,
    end: i64,
}

impl KafkaTransport {
    /// Commits the offsets of `group` on `topic` at `from`.
    pub(crate) async fn replay_group(&self, topic: &TopicSpec, group: &str, from: ReplayFrom) -> Result<()> {
        let client = self.client().clone();
        let (name, group) = (topic.native_name.clone(), group.to_owned());
        let since = match from {
            ReplayFrom::Beginning => None,
            ReplayFrom::Time(at) => Some(at.timestamp_millis()),
        };
        blocking(&client, &topic.native_name, Op::Subscribe, move |client| {
            commit_at(client, &name, &group, since)
        })
        .await
    }

    /// Reads the records of `topic` that `query` selects, oldest first.
    pub(crate) async fn stored_messages(
        &self,
        topic: &TopicSpec,
        query: &MessageQuery,
    ) -> Result<Vec<StoredMessage>> {
        let client = self.client().clone();
        let (name, query) = (topic.native_name.clone(), query.clone());
        blocking(&client, &topic.native_name, Op::Receive, move |client| read(client, &name, &query)).await
    }
}

/// Runs `work` off the runtime: librdkafka's calls block.
async fn blocking<T, F>(client: &std::sync::Arc<Client>, topic: &str, op: Op, work: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(&Client) -> Result<T> + Send + 'static,
{
    let owned = client.clone();
    tokio::task::spawn_blocking(move || work(&owned))
        .await
        .map_err(|e| client.error(op, topic, format!("worker thread failed: {e}")))?
}

fn consumer(client: &Client, config: ClientConfig, op: Op, topic: &str) -> Result<BaseConsumer<Logger>> {
    config.create_with_context(client.logger()).map_err(|e| client.failed(op, topic, e))
}

/// Each partition of `topic` with its offset at `since_ms` (the earliest when `None`) and its end.
fn ranges(
    client: &Client,
    consumer: &BaseConsumer<Logger>,
    topic: &str,
    op: Op,
    since_ms: Option<i64>,
) -> Result<Vec<Range>> {
    let metadata =
        consumer.fetch_metadata(Some(topic), REQUEST_WAIT).map_err(|e| client.failed(op, topic, e))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(client
            .error(op, topic, "the topic does not exist (nothing was published or subscribed yet)")
            .with_kind(FailureKind::NotFound));
    }
    let mut ranges = Vec::with_capacity(partitions.len());
    for partition in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, *partition, REQUEST_WAIT)
            .map_err(|e| client.failed(op, topic, e))?;
        ranges.push(Range { partition: *partition, start: low, end: high });
    }
    if let Some(since) = since_ms {
        let mut times = TopicPartitionList::new();
        for range in &ranges {
            times
                .add_partition_offset(topic, range.partition, Offset::Offset(since))
                .map_err(|e| client.failed(op, topic, e))?;
        }
        let found =
            consumer.offsets_for_times(times, REQUEST_WAIT).map_err(|e| client.failed(op, topic, e))?;
        for range in &mut ranges {
            range.start = match found.find_partition(topic, range.partition).map(|p| p.offset()) {
                Some(Offset::Offset(offset)) => offset.max(range.start),
                // No record that recent: from the end.
                _ => range.end,
            };
        }
    }
    Ok(ranges)
}

fn commit_at(client: &Client, topic: &str, group: &str, since_ms: Option<i64>) -> Result<()> {
    let consumer = consumer(client, client.settings.consumer(group), Op::Subscribe, topic)?;
    if let Ok(groups) = consumer.fetch_group_list(Some(group), REQUEST_WAIT)
        && let Some(found) = groups.groups().iter().find(|g| g.name() == group)
        && !found.members().is_empty()
    {
        return Err(members_connected(client, topic, group, found.members().len()));
    }
    let mut offsets = TopicPartitionList::new();
    for range in ranges(client, &consumer, topic, Op::Subscribe, since_ms)? {
        offsets
            .add_partition_offset(topic, range.partition, Offset::Offset(range.start))
            .map_err(|e| client.failed(Op::Subscribe, topic, e))?;
    }
    match consumer.commit(&offsets, CommitMode::Sync) {
        Ok(()) => Ok(()),
        Err(KafkaError::ConsumerCommit(
            RDKafkaErrorCode::UnknownMemberId
            | RDKafkaErrorCode::IllegalGeneration
            | RDKafkaErrorCode::RebalanceInProgress,
        )) => Err(members_connected(client, topic, group, 0)),
        Err(e) => Err(client.failed(Op::Subscribe, topic, e)),
    }
}

fn members_connected(client: &Client, topic: &str, group: &str, members: usize) -> Error {
    let how_many =
        if members > 0 { format!("{members} connected members") } else { "connected members".into() };
    client
        .error(
            Op::Subscribe,
            topic,
            format!(
                "group `{group}` has {how_many}, and Kafka moves a group's offsets only while it has none: \
                 stop its consumers, replay, then start them again"
            ),
        )
        .with_kind(FailureKind::Invalid)
}

fn read(client: &Client, topic: &str, query: &MessageQuery) -> Result<Vec<StoredMessage>> {
    // A group id librdkafka asks for, never joined or committed: partitions are assigned.
    let group = format!("polybus-query-{}", uuid::Uuid::new_v4().simple());
    let consumer = consumer(client, client.settings.consumer(&group), Op::Receive, topic)?;
    let since = query.since.map(|t| t.timestamp_millis());
    let mut ranges: Vec<Range> = ranges(client, &consumer, topic, Op::Receive, since)?
        .into_iter()
        .filter(|r| r.start < r.end)
        .collect();
    let mut assignment = TopicPartitionList::new();
    for range in &ranges {
        assignment
            .add_partition_offset(topic, range.partition, Offset::Offset(range.start))
            .map_err(|e| client.failed(Op::Receive, topic, e))?;
    }
    consumer.assign(&assignment).map_err(|e| client.failed(Op::Receive, topic, e))?;
    let until = query.until.map(|t| t.timestamp_millis());
    let deadline = Instant::now() + QUERY_WAIT;
    // Each partition keeps its first `limit` matches; merged by time below.
    let mut found: Vec<(i64, i32, i64, polybus_core::Message)> = Vec::new();
    let mut per_partition = std::collections::HashMap::<i32, usize>::new();
    let mut scanned = 0;
    while !ranges.is_empty() && scanned < SCAN_MAX {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(client
                .error(Op::Receive, topic, format!("the query read for {QUERY_WAIT:?} without reaching the end; narrow it with since and until"))
                .with_kind(FailureKind::Timeout));
        }
        let Some(next) = consumer.poll(left.min(Duration::from_millis(500))) else { continue };
        let record = next.map_err(|e| client.failed(Op::Receive, topic, e))?;
        scanned += 1;
        let (partition, offset) = (record.partition(), record.offset());
        let Some(at) = ranges.iter().position(|r| r.partition == partition) else { continue };
        if offset + 1 >= ranges[at].end {
            ranges.swap_remove(at);
        }
        let timestamp = record.timestamp().to_millis().unwrap_or(0);
        if until.is_some_and(|until| timestamp >= until) {
            continue;
        }
        let message = codec::decode(&record).message;
        let id_matches = query.id.as_ref().is_none_or(|id| *id == message.id);
        let kept = per_partition.entry(partition).or_default();
        if id_matches && (query.key.is_none() || query.key == message.key) && *kept < query.limit {
            *kept += 1;
            found.push((timestamp, partition, offset, message));
        }
    }
    // Within one millisecond, polybus ids (UUIDv7, monotonic per publisher) keep publish order
    // across partitions.
    found.sort_by(|a, b| (a.0, &a.3.id, a.1, a.2).cmp(&(b.0, &b.3.id, b.1, b.2)));
    Ok(found
        .into_iter()
        .take(query.limit)
        .map(|(_, partition, offset, mut message)| {
            message.attempt = 0;
            StoredMessage { message, position: Some(format!("{partition}:{offset}")) }
        })
        .collect())
}
