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
}

/// A fresh topic and group on one broker, driven by one client.
#[async_trait]
pub trait Way: Send {
    /// Creates the topic and joins the group, so the group keeps what is published next.
    async fn prepare(&mut self, work: &Workload) -> Result<()>;
    /// Publishes the workload's messages, each confirmed by the broker.
    async fn publish(&mut self, work: &Workload) -> Result<()>;
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
}

/// Runs the workload once through `way`; cleans up whatever happened.
pub async fn run(way: &mut dyn Way, work: &Workload, limit: Duration) -> Result<Rates> {
    let timed = async {
        way.prepare(work).await?;
        let started = Instant::now();
        way.publish(work).await?;
        let published = started.elapsed();
        let started = Instant::now();
        way.consume(work).await?;
        let consumed = started.elapsed();
        anyhow::Ok(Rates { publish: rate(work.messages, published), consume: rate(work.messages, consumed) })
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
