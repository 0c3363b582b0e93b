//! Per-group gauges for `/metrics`: members, pending, lag and oldest unacked age of the groups
//! of topics with recent traffic through this server, read from their brokers.
//!
//! Bounded: at most [`MAX_TOPICS`] topics, each read at most every [`REFRESH_EVERY`], a few at
//! a time, each within [`READ_WAIT`]. A scrape waits up to [`SCRAPE_WAIT`] for a refresh it
//! started; one that takes longer finishes in the background and the next scrape shows it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::StreamExt;
use polybus::{Bus, GroupInfo};
use tokio::task::JoinHandle;

use crate::metrics::TopicLabels;

/// Topics whose groups are read (the most recently active first).
pub const MAX_TOPICS: usize = 32;
/// Traffic within this long makes a topic's groups worth reading.
pub const RECENT: Duration = Duration::from_secs(600);
/// Group readings are reused for this long.
const REFRESH_EVERY: Duration = Duration::from_secs(15);
/// Longest wait for one topic's groups.
const READ_WAIT: Duration = Duration::from_secs(3);
/// Longest a scrape waits for a refresh.
const SCRAPE_WAIT: Duration = Duration::from_secs(2);
/// Topics read at once.
const CONCURRENT: usize = 4;

type Readings = BTreeMap<TopicLabels, Vec<GroupInfo>>;

/// The last readings of each active topic's groups.
#[derive(Default)]
pub struct GroupGauges {
    readings: Arc<Mutex<Readings>>,
    refresh: tokio::sync::Mutex<Option<(Instant, JoinHandle<()>)>>,
}

impl GroupGauges {
    /// Reads the groups of `topics` again when the last reading is older than [`REFRESH_EVERY`];
    /// waits for the reading up to [`SCRAPE_WAIT`].
    pub async fn refresh(&self, bus: &Bus, topics: Vec<TopicLabels>) {
        let mut running = self.refresh.lock().await;
        let due =
            running.as_ref().is_none_or(|(at, task)| task.is_finished() && at.elapsed() >= REFRESH_EVERY);
        if due {
            let task = tokio::spawn(read_all(bus.clone(), topics, self.readings.clone()));
            *running = Some((Instant::now(), task));
        }
        if let Some((_, task)) = running.as_mut()
            && !task.is_finished()
        {
            let _ = tokio::time::timeout(SCRAPE_WAIT, task).await;
        }
    }

    /// Sets the gauges of the last readings in the current recorder.
    pub fn record(&self) {
        let readings = self.readings.lock().unwrap_or_else(PoisonError::into_inner);
        for (labels, groups) in readings.iter() {
            for group in groups {
                let mut labels = labels.labels();
                labels.push(metrics::Label::new("group", group.group.clone()));
                for (name, value) in [
                    (LAG, group.lag.map(|n| n as f64)),
                    (PENDING, group.pending.map(|n| n as f64)),
                    (MEMBERS, group.members.map(|n| n as f64)),
                    (OLDEST, group.oldest_unacked.map(|age| age.as_secs_f64())),
                ] {
                    if let Some(value) = value {
                        metrics::gauge!(name, labels.clone()).set(value);
                    }
                }
            }
        }
    }
}

const LAG: &str = "polybus_group_lag";
const PENDING: &str = "polybus_group_pending";
const MEMBERS: &str = "polybus_group_members";
const OLDEST: &str = "polybus_group_oldest_unacked_seconds";

/// Describes the group gauges to the current recorder.
pub fn describe() {
    let only = "Only where the broker tells it.";
    metrics::describe_gauge!(LAG, format!("Messages published and not yet delivered to the group. {only}"));
    metrics::describe_gauge!(PENDING, format!("Messages delivered to the group and not settled yet. {only}"));
    metrics::describe_gauge!(MEMBERS, format!("Members of the group connected now. {only}"));
    metrics::describe_gauge!(
        OLDEST,
        format!("Age (since publish) of the group's oldest delivered-but-unsettled message. {only}")
    );
}

/// Reads the groups of every topic in `topics`; forgets topics no longer among them.
async fn read_all(bus: Bus, topics: Vec<TopicLabels>, readings: Arc<Mutex<Readings>>) {
    let read = futures::stream::iter(topics.clone())
        .map(|labels| {
            let bus = bus.clone();
            async move {
                let event = format!("{}:{}", labels.broker, labels.topic);
                let groups = match tokio::time::timeout(READ_WAIT, bus.groups(&labels.env, &event)).await {
                    Ok(Ok(groups)) => Some(groups),
                    // Nothing to tell (MQTT): no gauges, and nothing worth a log line.
                    Ok(Err(polybus::Error::Unsupported { .. })) => Some(Vec::new()),
                    Ok(Err(e)) => {
                        tracing::debug!(env = %labels.env, event, error = %e, "reading groups for /metrics failed");
                        None
                    }
                    Err(_) => {
                        tracing::debug!(env = %labels.env, event, "reading groups for /metrics timed out");
                        None
                    }
                };
                (labels, groups)
            }
        })
        .buffer_unordered(CONCURRENT)
        .collect::<Vec<_>>()
        .await;
    let mut readings = readings.lock().unwrap_or_else(PoisonError::into_inner);
    readings.retain(|labels, _| topics.contains(labels));
    for (labels, groups) in read {
        match groups {
            Some(groups) => readings.insert(labels, groups),
            // A reading that failed is dropped rather than shown stale.
            None => readings.remove(&labels),
        };
    }
}
