//! `polybus bench --env SLUG EVENT [--messages N] [--size BYTES] [--publishers P] [--consumers C] [--batch B]
//! [--consume-batch K] [--backlog]`
//!
//! Joins a fresh group, then publishes and consumes at the same time, and reports publish and
//! consume+ack throughput and publish→deliver latency.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Args;
use polybus::{Batch, Bus, Delivery, Message, SubscribeOptions, Subscriber};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{Context, progress};
use crate::failure::{CliResult, EXIT_TIMEOUT, Failure};
use crate::output;

/// `polybus bench …`
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The env to run in.
    #[arg(long)]
    pub env: String,
    /// The event, `broker-tag:topic-tag`.
    pub event: String,
    /// Messages to publish and consume.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub messages: u64,
    /// Payload size in bytes; payloads of 8 bytes or more carry their send time.
    #[arg(long, default_value_t = 256)]
    pub size: usize,
    /// Concurrent publishers.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub publishers: u64,
    /// Concurrent consumers, members of one fresh group.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub consumers: u64,
    /// Messages per publish batch.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub batch: u64,
    /// Messages each consumer takes at once (`Subscriber::next_batch`) and acks together
    /// (`Batch::ack_all`); 1 takes and acks them one by one.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub consume_batch: u64,
    /// Publish every message before consuming any: consumption measured alone, from a backlog.
    #[arg(long)]
    pub backlog: bool,
    /// Most unacked messages each consumer holds.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub prefetch: u64,
    /// Give up when the messages have not all come back after this long, e.g. `5m`.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// What one bench run measured.
#[derive(Debug, Serialize)]
struct Report {
    env: String,
    event: String,
    group: String,
    messages: u64,
    size: usize,
    publishers: u64,
    consumers: u64,
    batch: u64,
    consume_batch: u64,
    backlog: bool,
    publish_seconds: f64,
    publish_per_second: f64,
    consume_seconds: f64,
    consume_per_second: f64,
    latency_ms: Latency,
    /// How long one awaited publish call took (one message with `--batch 1`, else one batch).
    publish_call_ms: Percentiles,
}

/// Publish→deliver latency, milliseconds.
#[derive(Debug, Serialize)]
struct Latency {
    measured_from: &'static str,
    #[serde(flatten)]
    percentiles: Percentiles,
}

/// p50, p99 and max of microsecond samples, in milliseconds (0 when there are none).
#[derive(Debug, Serialize)]
struct Percentiles {
    p50: f64,
    p99: f64,
    max: f64,
}

impl Percentiles {
    fn of(mut samples_us: Vec<u64>) -> Self {
        samples_us.sort_unstable();
        let at = |q: usize| {
            let i = (samples_us.len() * q / 100).min(samples_us.len().saturating_sub(1));
            samples_us.get(i).copied().unwrap_or(0) as f64 / 1000.0
        };
        Percentiles { p50: at(50), p99: at(99), max: at(100) }
    }

    /// `p50 … p99 … max …`, for the table.
    fn show(&self) -> String {
        format!("p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms", self.p50, self.p99, self.max)
    }
}

/// Runs the benchmark and prints the report.
pub async fn run(ctx: &Context, args: BenchArgs) -> CliResult {
    let bus = ctx.bus().await?;
    let result = bench(&bus, &args).await;
    if let Err(e) = bus.close().await {
        tracing::warn!(error = %e, "closing broker connections");
    }
    let report = result?;
    if ctx.json() {
        return output::json(&report);
    }
    let rate = |n: f64| format!("{n:.0} msg/s");
    let rows = vec![
        vec!["workload".into(), workload(&report)],
        vec!["group".into(), report.group.clone()],
        vec![
            "publish".into(),
            format!("{} ({:.2} s)", rate(report.publish_per_second), report.publish_seconds),
        ],
        vec![
            "consume+ack".into(),
            format!("{} ({:.2} s)", rate(report.consume_per_second), report.consume_seconds),
        ],
        vec![
            "latency".into(),
            format!("{}  (from {})", report.latency_ms.percentiles.show(), report.latency_ms.measured_from),
        ],
        vec![
            "publish call".into(),
            format!(
                "{}  (one awaited {})",
                report.publish_call_ms.show(),
                if report.batch == 1 { "publish".to_owned() } else { format!("batch of {}", report.batch) }
            ),
        ],
    ];
    output::line(output::columns(&rows))
}

fn workload(r: &Report) -> String {
    format!(
        "{} × {} B to `{}` in `{}`, {} publisher(s) in batches of {}, {} consumer(s) taking up to {} at once{}",
        r.messages,
        r.size,
        r.event,
        r.env,
        r.publishers,
        r.batch,
        r.consumers,
        r.consume_batch,
        if r.backlog { ", once all are published (latency includes the wait)" } else { "" }
    )
}

async fn bench(bus: &Bus, args: &BenchArgs) -> CliResult<Report> {
    let group = format!("bench-{}", &uuid_suffix());
    // Joined before publishing: RabbitMQ, MQTT, SQS and Pub/Sub keep messages only for existing groups.
    let mut subscribers = Vec::new();
    for _ in 0..args.consumers {
        let mut options = SubscribeOptions::new(group.as_str());
        options.prefetch = args.prefetch as usize;
        subscribers.push(bus.subscribe(&args.env, &args.event, options).await?);
    }
    let bar = progress(Some(args.messages), "bench");
    let consumed = Arc::new(AtomicU64::new(0));
    let (done_tx, done_rx) = watch::channel(false);
    let stamped = args.size >= 8;
    let mut consumers = JoinSet::new();
    let mut states = Vec::new();
    for subscriber in subscribers {
        let state = ConsumerState {
            consumed: consumed.clone(),
            total: args.messages,
            done_tx: done_tx.clone(),
            done_rx: done_rx.clone(),
            bar: bar.clone(),
            stamped,
            in_flight: args.prefetch as usize,
            take: args.consume_batch as usize,
        };
        states.push((subscriber, state));
    }
    let (start_now, mut start_later) = if args.backlog { (Vec::new(), states) } else { (states, Vec::new()) };
    for (subscriber, state) in start_now {
        consumers.spawn(consume(subscriber, state));
    }

    let started = Instant::now();
    let mut publishers: JoinSet<polybus::Result<Vec<u64>>> = JoinSet::new();
    for p in 0..args.publishers {
        let count = args.messages / args.publishers + u64::from(p < args.messages % args.publishers);
        let (bus, env, event) = (bus.clone(), args.env.clone(), args.event.clone());
        let (size, batch) = (args.size, args.batch);
        publishers.spawn(async move {
            let mut left = count;
            // Microseconds of each awaited call.
            let mut calls = Vec::with_capacity(count.div_ceil(batch) as usize);
            while left > 0 {
                let n = left.min(batch);
                let call = Instant::now();
                if batch == 1 {
                    bus.publish(&env, &event, Message::new(payload(size))).await?;
                } else {
                    let messages = (0..n).map(|_| Message::new(payload(size))).collect();
                    bus.publish_batch(&env, &event, messages).await?;
                }
                calls.push(call.elapsed().as_micros() as u64);
                left -= n;
            }
            Ok(calls)
        });
    }
    let collected = async {
        let mut calls = Vec::new();
        while let Some(done) = publishers.join_next().await {
            calls.extend(done.map_err(|e| Failure::new("PUBLISH_FAILED", e.to_string()))??);
        }
        let published = started.elapsed();
        for (subscriber, state) in start_later.drain(..) {
            consumers.spawn(consume(subscriber, state));
        }
        let mut first = None::<Instant>;
        let mut last = started;
        let mut samples = Vec::with_capacity(args.messages as usize);
        while let Some(done) = consumers.join_next().await {
            let outcome = done.map_err(|e| Failure::new("CONSUME_FAILED", e.to_string()))??;
            first = match (first, outcome.first) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            last = last.max(outcome.last);
            samples.extend(outcome.latencies_us);
        }
        CliResult::Ok((published, first.unwrap_or(started), last, samples, calls))
    };
    let (published, first, last, samples, calls) = match tokio::time::timeout(args.timeout, collected).await {
        Ok(outcome) => outcome?,
        Err(_) => {
            let _ = done_tx.send(true);
            bar.finish_and_clear();
            return Err(Failure::new(
                "TIMEOUT",
                format!(
                    "{} of {} messages came back within {}",
                    consumed.load(Ordering::Relaxed).min(args.messages),
                    args.messages,
                    humantime::format_duration(args.timeout)
                ),
            )
            .with_exit(EXIT_TIMEOUT));
        }
    };
    bar.finish_and_clear();
    let consume_time = last.saturating_duration_since(first);
    let per_second = |d: Duration| args.messages as f64 / d.as_secs_f64().max(1e-9);
    Ok(Report {
        env: args.env.clone(),
        event: args.event.clone(),
        group,
        messages: args.messages,
        size: args.size,
        publishers: args.publishers,
        consumers: args.consumers,
        batch: args.batch,
        consume_batch: args.consume_batch,
        backlog: args.backlog,
        publish_seconds: published.as_secs_f64(),
        publish_per_second: per_second(published),
        consume_seconds: consume_time.as_secs_f64(),
        consume_per_second: per_second(consume_time),
        latency_ms: Latency {
            measured_from: if stamped { "send time in the payload" } else { "published_at" },
            percentiles: Percentiles::of(samples),
        },
        publish_call_ms: Percentiles::of(calls),
    })
}

/// What one consumer needs to know and share.
struct ConsumerState {
    consumed: Arc<AtomicU64>,
    total: u64,
    done_tx: watch::Sender<bool>,
    done_rx: watch::Receiver<bool>,
    bar: indicatif::ProgressBar,
    stamped: bool,
    in_flight: usize,
    /// Deliveries taken at once; 1 takes them with `next`.
    take: usize,
}

/// What one consumer saw.
struct Consumed {
    first: Option<Instant>,
    last: Instant,
    latencies_us: Vec<u64>,
}

/// Receives and acks until the group as a whole has every message.
async fn consume(mut subscriber: Subscriber, mut state: ConsumerState) -> CliResult<Consumed> {
    let mut seen = Consumed { first: None, last: Instant::now(), latencies_us: Vec::new() };
    // Each ack task settles one delivery or one batch and says how many messages it settled.
    let mut acks: JoinSet<(usize, polybus::Result<()>)> = JoinSet::new();
    let mut unsettled = 0usize;
    let outcome = async {
        loop {
            if *state.done_rx.borrow() {
                break;
            }
            let take = async {
                if state.take <= 1 {
                    subscriber.next().await.map(|next| next.map(|d| Batch::from(vec![d])))
                } else {
                    subscriber.next_batch(state.take).await
                }
            };
            let next = tokio::select! {
                next = take => next,
                Some(done) = acks.join_next(), if !acks.is_empty() => {
                    unsettled -= settled(done, &state, &mut seen)?;
                    continue;
                }
                _ = state.done_rx.changed() => break,
            };
            let batch = match next {
                None => {
                    return Err(Failure::new(
                        "CLOSED",
                        "the subscription ended before every message came back",
                    ));
                }
                Some(batch) => batch?,
            };
            seen.first.get_or_insert_with(Instant::now);
            seen.latencies_us.extend(batch.iter().map(|d| latency_us(d, state.stamped)));
            let n = batch.len();
            unsettled += n;
            acks.spawn(async move { (n, batch.ack_all().await) });
            while unsettled >= state.in_flight.max(1) {
                if let Some(done) = acks.join_next().await {
                    unsettled -= settled(done, &state, &mut seen)?;
                }
            }
        }
        Ok(())
    }
    .await;
    while let Some(done) = acks.join_next().await {
        settled(done, &state, &mut seen)?;
    }
    if let Err(e) = subscriber.close().await {
        tracing::warn!(error = %e, "closing the subscription");
    }
    outcome.map(|()| seen)
}

/// Counts a finished ack of `n` messages (and returns `n`); tells every consumer to stop once
/// all messages are acked.
fn settled(
    done: Result<(usize, polybus::Result<()>), tokio::task::JoinError>,
    state: &ConsumerState,
    seen: &mut Consumed,
) -> CliResult<usize> {
    let (n, acked) = done.map_err(|e| Failure::new("ACK_FAILED", e.to_string()))?;
    acked?;
    seen.last = Instant::now();
    state.bar.inc(n as u64);
    if state.consumed.fetch_add(n as u64, Ordering::Relaxed) + n as u64 >= state.total {
        let _ = state.done_tx.send(true);
    }
    Ok(n)
}

fn latency_us(delivery: &Delivery, stamped: bool) -> u64 {
    if stamped && let Some(bytes) = delivery.payload.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
        return now_ns().saturating_sub(u64::from_le_bytes(bytes)) / 1000;
    }
    let age = polybus::core::message::now() - delivery.published_at;
    age.num_microseconds().unwrap_or(0).max(0) as u64
}

/// A payload of `size` bytes; from 8 bytes on, it starts with the send time (ns since 1970, LE).
fn payload(size: usize) -> Vec<u8> {
    let mut payload = vec![b'x'; size];
    if size >= 8 {
        payload[..8].copy_from_slice(&now_ns().to_le_bytes());
    }
    payload
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// The random tail of a fresh UUIDv7.
fn uuid_suffix() -> String {
    let id = Message::new(Vec::new()).id;
    id.rsplit('-').next().unwrap_or(&id).to_owned()
}

fn parse_duration(value: &str) -> Result<Duration, String> {
    humantime::parse_duration(value)
        .map_err(|e| format!("`{value}` is not a duration like `10s` or `1m`: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_carry_their_send_time() {
        let before = now_ns();
        let p = payload(16);
        let stamp = u64::from_le_bytes(p[..8].try_into().expect("8 bytes"));
        assert!(stamp >= before && stamp <= now_ns());
        assert_eq!(payload(4), b"xxxx");
    }
}
