//! A topic's groups with their lag: committed offsets against the partitions' high watermarks.
//!
//! Every group of a topic has a retry topic `<native>--<group>.retry` (made when it joins), so
//! the topic's groups are found in the cluster's topic list. A group's lag counts both topics:
//! what waits on the retry topic (nacked, delayed) has not been handed out again yet. Members are
//! the group's members now. Kafka cannot tell what a member holds unacked from what it has not
//! fetched (both are past the committed offset), so pending and the oldest unacked stay unknown.

use std::collections::BTreeMap;
use std::time::Duration;

use polybus_core::{GroupInfo, Op, Result};
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::metadata::Metadata;
use rdkafka::producer::Producer;
use rdkafka::{Offset, TopicPartitionList};

use crate::retry_topic;
use crate::transport::{Client, Logger};

/// How long each request to the cluster may take.
const WAIT: Duration = Duration::from_secs(5);
/// Most groups of one topic reported.
const MAX_GROUPS: usize = 100;

/// The consumers the groups and replay code open log as the transport's clients do.
impl ConsumerContext for Logger {}

/// The groups of topic `native`, with their lag.
pub(crate) async fn of_topic(client: &Client, native: &str) -> Result<Vec<GroupInfo>> {
    let producer = client.producer();
    let partitions = {
        let producer = producer.clone();
        let read = move || producer.client().fetch_metadata(None, WAIT).map(|m| partitions_by_topic(&m));
        blocking(client, native, read).await?
    };
    let groups = group_names(native, &partitions);
    let mut infos = Vec::with_capacity(groups.len());
    for group in groups {
        let retry = retry_topic(native, &group);
        let mut topics = BTreeMap::new();
        for topic in [native, retry.as_str()] {
            topics.insert(topic.to_owned(), partitions.get(topic).cloned().unwrap_or_default());
        }
        let (settings, logger, producer) = (client.settings.clone(), client.logger(), producer.clone());
        let name = group.clone();
        let (members, lag) = blocking(client, native, move || {
            let members = producer.client().fetch_group_list(Some(&name), WAIT).ok().and_then(|list| {
                list.groups().iter().find(|g| g.name() == name).map(|g| g.members().len() as u64)
            });
            let consumer: BaseConsumer<Logger> = settings.consumer(&name).create_with_context(logger)?;
            let lag = lag(&consumer, producer.client(), &topics);
            // Dropped here, off the runtime: a consumer's drop can block.
            drop(consumer);
            Ok((members, lag?))
        })
        .await?;
        infos.push(GroupInfo { members, lag: Some(lag), ..GroupInfo::named(group) });
    }
    Ok(infos)
}

/// Runs blocking librdkafka calls on a thread of their own.
async fn blocking<T: Send + 'static>(
    client: &Client,
    native: &str,
    work: impl FnOnce() -> rdkafka::error::KafkaResult<T> + Send + 'static,
) -> Result<T> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result.map_err(|e| client.failed(Op::Receive, native, e)),
        Err(e) => Err(client.error(Op::Receive, native, e)),
    }
}

fn partitions_by_topic(metadata: &Metadata) -> BTreeMap<String, Vec<i32>> {
    metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| (t.name().to_owned(), t.partitions().iter().map(|p| p.id()).collect()))
        .collect()
}

/// The groups with a retry topic of `native`, by name. A candidate `a--b` is the group `b` of
/// the topic `<native>--a` when that topic exists, not a group of `native`.
fn group_names(native: &str, topics: &BTreeMap<String, Vec<i32>>) -> Vec<String> {
    let prefix = format!("{native}--");
    topics
        .keys()
        .filter_map(|topic| topic.strip_prefix(&prefix)?.strip_suffix(".retry"))
        .filter(|group| !group.is_empty())
        .filter(|group| {
            let mut parts = group.match_indices("--").map(|(at, _)| &group[..at]);
            !parts.any(|first| topics.contains_key(&format!("{prefix}{first}")))
        })
        .take(MAX_GROUPS)
        .map(str::to_owned)
        .collect()
}

/// Messages past the group's committed offsets (from the start when it committed none).
fn lag<C: ClientContext>(
    consumer: &BaseConsumer<Logger>,
    client: &rdkafka::client::Client<C>,
    topics: &BTreeMap<String, Vec<i32>>,
) -> rdkafka::error::KafkaResult<u64> {
    let mut wanted = TopicPartitionList::new();
    for (topic, partitions) in topics {
        for partition in partitions {
            wanted.add_partition(topic, *partition);
        }
    }
    let committed = consumer.committed_offsets(wanted, WAIT)?;
    let mut lag = 0;
    for element in committed.elements() {
        let (low, high) = client.fetch_watermarks(element.topic(), element.partition(), WAIT)?;
        let from = match element.offset() {
            Offset::Offset(offset) => offset.max(low),
            _ => low,
        };
        lag += u64::try_from(high - from).unwrap_or(0);
    }
    // Dropped before the consumer (see the Kafka gotchas in TEST-BROKERS.md).
    drop(committed);
    Ok(lag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_read_from_retry_topics_of_this_topic_only() {
        let topics: BTreeMap<String, Vec<i32>> = [
            "orders",
            "orders--billing.retry",
            "orders--a--b.retry",
            "orders--eu",
            "orders--eu--audit.retry",
            "orders-dlq",
        ]
        .into_iter()
        .map(|t| (t.to_owned(), vec![0]))
        .collect();
        assert_eq!(group_names("orders", &topics), ["a--b", "billing"]);
        assert_eq!(group_names("orders--eu", &topics), ["audit"]);
    }
}
