//! Peak memory of a consumer started far behind: the backlog is published first, then a child
//! process consumes it all and reports its own peak RSS (`VmHWM`).

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use polybus::{Bus, Registry, SubscribeOptions};

use crate::polybus_way::fresh_topic;
use crate::way::{Workload, rate, unique};

/// Arguments of the `memory-consumer` child.
#[derive(Debug, clap::Args)]
pub struct ConsumerArgs {
    /// The registry file.
    #[arg(long)]
    registry: String,
    /// The env.
    #[arg(long)]
    env: String,
    /// The event.
    #[arg(long)]
    event: String,
    /// The group, already created.
    #[arg(long)]
    group: String,
    /// Messages to consume.
    #[arg(long)]
    count: usize,
    /// Most unacked messages held.
    #[arg(long)]
    prefetch: usize,
}

/// What the memory test measured.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Memory {
    /// The adapter.
    pub adapter: String,
    /// Messages the consumer started behind.
    pub behind: usize,
    /// Resident memory before subscribing, KiB.
    pub baseline_kib: u64,
    /// Peak resident memory over the whole consumption, KiB.
    pub peak_kib: u64,
    /// Consume+ack rate while catching up, messages per second.
    pub consume_rate: f64,
}

/// Publishes `behind` messages of 256 B to a fresh topic whose group already exists, then
/// lets a child process consume them and report its peak RSS.
pub async fn measure(
    bus: &Bus,
    registry: &Path,
    env: &str,
    behind: usize,
    prefetch: usize,
) -> Result<Memory> {
    let event = fresh_topic(bus.registry()).await?;
    let group = unique("g");
    let mut joined = bus.subscribe(env, &event, SubscribeOptions::new(group.as_str())).await?;
    joined.close().await?;
    drop(joined);
    let work = Workload {
        messages: behind,
        payload: Bytes::from(vec![b'x'; 256]),
        batch: 1000,
        prefetch,
        cold: false,
    };
    crate::polybus_way::publish(bus, env, &event, &work).await?;
    // The embedded broker's file is shared with the child: let go of it first.
    bus.close().await?;
    let output = tokio::process::Command::new(std::env::current_exe()?)
        .args(["memory-consumer", "--registry"])
        .arg(registry)
        .args(["--env", env, "--event", &event, "--group", &group])
        .args(["--count", &behind.to_string(), "--prefetch", &prefetch.to_string()])
        .stderr(std::process::Stdio::inherit())
        .output()
        .await?;
    if !output.status.success() {
        bail!("the consumer process failed ({})", output.status);
    }
    let mut memory: Memory = serde_json::from_slice(&output.stdout).context("the consumer's report")?;
    memory.adapter = env.to_owned();
    bus.registry().delete_topic(&event).await?;
    crate::polybus_way::drop_broker_side(env, &event).await?;
    Ok(memory)
}

/// The child: consumes `count` messages, prints [`Memory`] as JSON.
pub async fn child(args: &ConsumerArgs) -> Result<()> {
    let bus = Bus::open(Registry::open(&args.registry).await?).await?;
    let baseline_kib = status_kib("VmRSS")?;
    let mut options = SubscribeOptions::new(args.group.as_str());
    options.prefetch = args.prefetch;
    let mut subscriber = bus.subscribe(&args.env, &args.event, options).await?;
    let started = Instant::now();
    crate::polybus_way::consume(&mut subscriber, args.count, args.prefetch, |_| {}).await?;
    let consume_rate = rate(args.count, started.elapsed());
    subscriber.close().await?;
    let memory = Memory {
        adapter: args.env.clone(),
        behind: args.count,
        baseline_kib,
        peak_kib: status_kib("VmHWM")?,
        consume_rate,
    };
    println!("{}", serde_json::to_string(&memory)?);
    bus.close().await?;
    Ok(())
}

/// A `kB` field of `/proc/self/status`.
fn status_kib(field: &str) -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|line| {
            line.strip_prefix(field)?.strip_prefix(':')?.trim().strip_suffix("kB")?.trim().parse().ok()
        })
        .with_context(|| format!("no {field} in /proc/self/status"))
}
