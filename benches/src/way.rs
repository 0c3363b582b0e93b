//! One way of moving a workload through a broker, and the timing of it.

use std::time::{Duration, Instant};

use anyhow::Result;
use async_trait::async_trait;
use bytes::Bytes;
use tokio::task::JoinSet;

/// Which client does the work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Through polybus's `Bus`.
    Polybus,
    /// The broker's own Rust client, doing the same semantics.
    Raw,
    /// The Rust peer, `omniqueue`.
    Omniqueue,
}

impl Kind {
    /// The name used in tables and summary lines.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Polybus => "polybus",
            Kind::Raw => "raw",
            Kind::Omniqueue => "omniqueue",
        }
    }
}

/// The workload every way runs: `messages` copies of `payload`, published in batches of
/// `batch`, consumed by one member holding at most `prefetch` unacked messages.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Messages to publish and then consume.
    pub messages: usize,
    /// The payload of each message.
    pub payload: Bytes,
    /// Messages per publish batch (one pipeline / one round of confirms).
    pub batch: usize,
    /// Most unacked messages a consumer holds.
    pub prefetch: usize,
    /// The consumer joins only once everything is published, so its clock starts with nothing
    /// fetched (the backlog is read from the broker, not from a client's buffer).
    pub cold: bool,
}

/// A fresh topic and group on one broker, driven by one client.
#[async_trait]
pub trait Way: Send {
    /// Creates the topic and joins the group, so the group keeps what is published next.
    async fn prepare(&mut self, work: &Workload) -> Result<()>;
    /// Publishes `n` copies of the workload's payload as one batch, each confirmed by the broker.
    async fn publish_batch(&mut self, work: &Workload, n: usize) -> Result<()>;
    /// Joins the group if `prepare` did not (a cold workload); the consume clock starts after.
    async fn join(&mut self, _work: &Workload) -> Result<()> {
        Ok(())
    }
    /// Receives and acks `work.messages` messages.
    async fn consume(&mut self, work: &Workload) -> Result<()>;
    /// Removes what `prepare` created, best effort.
    async fn cleanup(&mut self) -> Result<()>;
}

/// Publish and consume+ack rates of one run, in messages per second.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Rates {
    /// Published (and confirmed) messages per second.
    pub publish: f64,
    /// Received and acked messages per second.
    pub consume: f64,
    /// Time of one publish call (a batch, or one message one by one).
    pub publish_call: Calls,
}

/// Percentiles of the time the calls of one run took, in microseconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Calls {
    /// Median.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
}

impl Calls {
    /// The percentiles of `took`.
    pub fn of(mut took: Vec<Duration>) -> Self {
        if took.is_empty() {
            return Calls::default();
        }
        took.sort_unstable();
        let at = |q: f64| {
            let i = ((took.len() as f64 * q).ceil() as usize).clamp(1, took.len()) - 1;
            u64::try_from(took[i].as_micros()).unwrap_or(u64::MAX)
        };
        Calls { p50_us: at(0.50), p99_us: at(0.99) }
    }
}

/// Publishes the workload in batches of `work.batch`; returns how long each batch took.
pub async fn publish(way: &mut dyn Way, work: &Workload) -> Result<Vec<Duration>> {
    let mut took = Vec::with_capacity(work.messages.div_ceil(work.batch.max(1)));
    let mut left = work.messages;
    while left > 0 {
        let n = left.min(work.batch.max(1));
        let started = Instant::now();
        way.publish_batch(work, n).await?;
        took.push(started.elapsed());
        left -= n;
    }
    Ok(took)
}

/// Runs the workload once through `way`; cleans up whatever happened.
pub async fn run(way: &mut dyn Way, work: &Workload, limit: Duration) -> Result<Rates> {
    let timed = async {
        way.prepare(work).await?;
        let started = Instant::now();
        let calls = publish(way, work).await?;
        let published = started.elapsed();
        way.join(work).await?;
        let started = Instant::now();
        way.consume(work).await?;
        let consumed = started.elapsed();
        anyhow::Ok(Rates {
            publish: rate(work.messages, published),
            consume: rate(work.messages, consumed),
            publish_call: Calls::of(calls),
        })
    };
    let result = match tokio::time::timeout(limit, timed).await {
        Ok(result) => result,
        Err(_) => Err(anyhow::anyhow!("did not finish within {}s", limit.as_secs())),
    };
    if let Err(e) = way.cleanup().await {
        eprintln!("  cleanup: {e:#}");
    }
    result
}

/// Messages per second.
pub fn rate(messages: usize, took: Duration) -> f64 {
    messages as f64 / took.as_secs_f64().max(1e-9)
}

/// A short unique name for one run's topic and group.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// Waits until at most `limit` of `tasks` are still running; fails with the first that failed.
pub async fn wait_below(tasks: &mut JoinSet<Result<()>>, limit: usize) -> Result<()> {
    while tasks.len() > limit {
        if let Some(done) = tasks.join_next().await {
            done??;
        }
    }
    Ok(())
}
