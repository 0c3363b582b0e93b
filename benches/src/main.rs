//! `polybus-bench-compare`: the same workload through polybus, the broker's raw Rust client and
//! `omniqueue`, alternating, on every broker that is up; prints the results as markdown.

mod latency;
mod memory;
#[cfg(feature = "omniqueue")]
mod omni;
mod polybus_way;
mod raw;
mod report;
mod way;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use clap::{Parser, Subcommand};
use polybus::Bus;
use serde_json::{Value, json};

use crate::way::{Kind, Way, Workload};

/// Redis for the raw client and omniqueue (polybus gets the same through its env config).
const REDIS_URL: &str = "redis://127.0.0.1:6379";
const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const NATS_URL: &str = "nats://127.0.0.1:4222";
const KAFKA_BROKERS: &str = "127.0.0.1:9092";
const MQTT_HOST: &str = "127.0.0.1";
/// moto's SQS server, as `scripts/services sqs` starts it.
const SQS_ENDPOINT: &str = "http://127.0.0.1:4566";
/// Google's Pub/Sub emulator, as `scripts/services pubsub` starts it.
const PUBSUB_EMULATOR: &str = "127.0.0.1:8085";
const PUBSUB_PROJECT: &str = "polybus-bench";

/// Compare polybus with the raw clients and omniqueue, side by side.
#[derive(Debug, Parser)]
#[command(name = "polybus-bench-compare")]
struct Args {
    /// Messages per run for small payloads.
    #[arg(long, default_value_t = 100_000)]
    messages: usize,
    /// Messages per run for payloads over 1 KiB (default: a tenth of `--messages`).
    #[arg(long)]
    messages_large: Option<usize>,
    /// Payload sizes in bytes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "256,16384")]
    sizes: Vec<usize>,
    /// Repetitions of each way.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Adapters to run, comma-separated; the ones whose broker is down are skipped.
    #[arg(long, value_delimiter = ',', default_value = "embedded,redis,rabbitmq,nats,kafka,mqtt,sqs,pubsub")]
    adapters: Vec<String>,
    /// Messages per publish batch (one `publish_batch`, one pipeline, one round of confirms).
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Most unacked messages a consumer holds.
    #[arg(long, default_value_t = 256)]
    prefetch: usize,
    /// Backlog the memory test's consumer starts behind; 0 skips the memory test.
    #[arg(long, default_value_t = 1_000_000)]
    memory_behind: usize,
    /// Seconds of the embedded broker's latency test at 1,000 msg/s; 0 skips it.
    #[arg(long, default_value_t = 10)]
    latency_secs: u64,
    /// Messages of each one-by-one run (one publisher awaiting every publish, 256 B); 0 skips them.
    #[arg(long, default_value_t = 2_000)]
    one_messages: usize,
    /// Repetitions of each one-by-one way.
    #[arg(long, default_value_t = 3)]
    one_reps: usize,
    /// Adapters whose consumers are also measured from a backlog: joining only once everything
    /// is published, so neither client holds messages when its consume clock starts.
    #[arg(long, value_delimiter = ',', default_value = "kafka")]
    backlog: Vec<String>,
    /// Deliveries polybus takes at once (`next_batch`, acked with `ack_all`); 1 takes them one by
    /// one with `next`, each acked on its own.
    #[arg(long, default_value_t = 1)]
    consume_batch: usize,
    /// Longest one run may take, in seconds.
    #[arg(long, default_value_t = 120)]
    run_limit: u64,
    /// Port of the Mosquitto to use (on 127.0.0.1); `scripts/bench` starts one that queues without limit.
    #[arg(long, default_value_t = 1883)]
    mqtt_port: u16,
    /// Most messages per MQTT run: Mosquitto drops what it queues for a session beyond its
    /// `max_queued_messages` (1,000 by default), and each run publishes its backlog first.
    #[arg(long, default_value_t = 900)]
    mqtt_messages: usize,
    /// Most messages per SQS run: the emulator (moto, in Python) handles a few hundred a second.
    #[arg(long, default_value_t = 2_000)]
    sqs_messages: usize,
    /// Most messages per Pub/Sub run (Google's emulator).
    #[arg(long, default_value_t = 10_000)]
    pubsub_messages: usize,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Internal modes.
    #[command(subcommand)]
    child: Option<Child>,
}

/// Modes the benchmark runs itself in, as a child process.
#[derive(Debug, Subcommand)]
enum Child {
    /// Consume a backlog and print the peak RSS of this process as JSON.
    MemoryConsumer(memory::ConsumerArgs),
}

/// One adapter the benchmark knows, and where its broker listens.
struct Adapter {
    name: &'static str,
    /// The broker type of its env.
    kind: &'static str,
    port: Option<u16>,
    config: Value,
}

fn adapters(dir: &std::path::Path, mqtt_port: u16) -> Vec<Adapter> {
    let adapter = |name, kind, port, config| Adapter { name, kind, port, config };
    vec![
        adapter("embedded", "embedded", None, json!({"path": dir.join("embedded.db")})),
        adapter("redis", "redis", Some(6379), json!({"url": REDIS_URL})),
        adapter("rabbitmq", "rabbitmq", Some(5672), json!({"url": AMQP_URL})),
        adapter("nats", "nats", Some(4222), json!({"servers": NATS_URL})),
        adapter("kafka", "kafka", Some(9092), json!({"brokers": [KAFKA_BROKERS]})),
        adapter("mqtt", "mqtt", Some(mqtt_port), json!({"host": MQTT_HOST, "port": mqtt_port})),
        adapter(
            "sqs",
            "aws_sqs",
            Some(4566),
            json!({"region": "us-east-1", "endpointUrl": SQS_ENDPOINT,
                   "accessKeyId": "test", "secretAccessKey": "test"}),
        ),
        adapter(
            "pubsub",
            "google_pubsub",
            Some(8085),
            json!({"projectId": PUBSUB_PROJECT, "endpoint": format!("http://{PUBSUB_EMULATOR}")}),
        ),
    ]
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Quiet unless RUST_LOG asks (e.g. RUST_LOG=polybus_kafka=debug to see an adapter's decisions).
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    if let Some(Child::MemoryConsumer(child)) = &args.child {
        return memory::child(child).await;
    }
    let dir = tempfile::tempdir()?;
    let mut results = report::Results::default();
    let mut selected = Vec::new();
    for adapter in adapters(dir.path(), args.mqtt_port) {
        if !args.adapters.iter().any(|a| a == adapter.name) {
            continue;
        }
        match adapter.port {
            Some(port) if !port_open(port).await => {
                results.skipped.push(format!("{}: nothing listens on 127.0.0.1:{port}", adapter.name));
            }
            _ => selected.push(adapter),
        }
    }
    let envs: Vec<_> =
        selected.iter().map(|a| (a.name.to_owned(), a.kind.to_owned(), a.config.clone())).collect();
    let registry_path = dir.path().join("registry.db");
    let registry = polybus_way::registry(&registry_path, &envs).await?;
    let bus = Bus::open(registry).await?;
    let limit = Duration::from_secs(args.run_limit);

    for adapter in &selected {
        for &size in &args.sizes {
            let messages = if size > 1024 {
                args.messages_large.unwrap_or(args.messages / 10).max(1)
            } else {
                args.messages
            };
            let messages = match adapter.name {
                "mqtt" => messages.min(args.mqtt_messages),
                "sqs" => messages.min(args.sqs_messages),
                "pubsub" => messages.min(args.pubsub_messages),
                _ => messages,
            };
            let work = Workload {
                messages,
                payload: Bytes::from(vec![b'x'; size]),
                batch: args.batch,
                prefetch: args.prefetch,
                cold: false,
            };
            let kinds: Vec<Kind> = [Kind::Polybus, Kind::Raw, Kind::Omniqueue]
                .into_iter()
                .filter(|&kind| make(kind, adapter.name, &bus, &args).is_some())
                .collect();
            for rep in 1..=args.reps {
                for &kind in &kinds {
                    let Some(mut way) = make(kind, adapter.name, &bus, &args) else { continue };
                    let outcome = way::run(way.as_mut(), &work, limit).await;
                    match &outcome {
                        Ok(r) => eprintln!(
                            "{:<9} {:>6} B × {:<7} {:<9} rep {rep}: publish {:>9.0}/s  consume {:>9.0}/s",
                            adapter.name,
                            size,
                            messages,
                            kind.name(),
                            r.publish,
                            r.consume
                        ),
                        Err(e) => eprintln!(
                            "{:<9} {size} B {:<9} rep {rep}: FAILED {e:#}",
                            adapter.name,
                            kind.name()
                        ),
                    }
                    results.record(adapter.name, size, messages, kind, outcome);
                }
            }
        }
    }

    if args.one_messages > 0 {
        for adapter in &selected {
            let messages = match adapter.name {
                // moto answers a few hundred calls a second; the emulator's publisher is slow one by one.
                "sqs" => args.one_messages.min(200),
                "pubsub" => args.one_messages.min(1_000),
                "mqtt" => args.one_messages.min(args.mqtt_messages),
                _ => args.one_messages,
            };
            let work = Workload {
                messages,
                payload: Bytes::from(vec![b'x'; 256]),
                batch: 1,
                prefetch: args.prefetch,
                cold: false,
            };
            let show = |r: &way::Rates| {
                format!(
                    "{:>7.0}/s  p50 {} µs  p99 {} µs",
                    r.publish, r.publish_call.p50_us, r.publish_call.p99_us
                )
            };
            let what = format!("one by one × {messages}");
            for (kind, outcome) in
                alternate(&bus, &args, adapter.name, &work, args.one_reps, &what, show).await
            {
                results.record_one(adapter.name, messages, kind, outcome);
            }
        }
    }

    for adapter in selected.iter().filter(|a| args.backlog.iter().any(|b| b == a.name)) {
        let work = Workload {
            messages: args.messages,
            payload: Bytes::from(vec![b'x'; 256]),
            batch: args.batch,
            prefetch: args.prefetch,
            cold: true,
        };
        let what = format!("from a backlog × {}", work.messages);
        let show = |r: &way::Rates| format!("consume {:>9.0}/s", r.consume);
        for (kind, outcome) in alternate(&bus, &args, adapter.name, &work, args.reps, &what, show).await {
            results.record_backlog(adapter.name, work.messages, kind, outcome);
        }
    }

    if selected.iter().any(|a| a.name == "embedded") && args.latency_secs > 0 {
        eprintln!("embedded: latency at 1,000 msg/s for {}s", args.latency_secs);
        match latency::fixed_rate(&bus, "embedded", 1000, Duration::from_secs(args.latency_secs)).await {
            Ok(l) => results.embedded_latency = Some(l),
            Err(e) => results.failures.push(format!("embedded latency: {e:#}")),
        }
    }
    if args.memory_behind > 0 {
        for adapter in selected.iter().filter(|a| matches!(a.name, "embedded" | "redis")) {
            eprintln!("{}: memory of a consumer {} messages behind", adapter.name, args.memory_behind);
            match memory::measure(&bus, &registry_path, adapter.name, args.memory_behind, args.prefetch).await
            {
                Ok(m) => results.memory.push(m),
                Err(e) => results.failures.push(format!("{} memory: {e:#}", adapter.name)),
            }
        }
    }
    if let Err(e) = bus.close().await {
        eprintln!("closing: {e}");
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&results)?)?;
    }
    print!("{}", results.markdown());
    Ok(())
}

/// Runs `work` `reps` times through polybus and the raw client (where `adapter` has one),
/// alternating; prints each outcome (`show` for a success) and returns them in order.
async fn alternate(
    bus: &Bus,
    args: &Args,
    adapter: &str,
    work: &Workload,
    reps: usize,
    what: &str,
    show: impl Fn(&way::Rates) -> String,
) -> Vec<(Kind, Result<way::Rates>)> {
    let limit = Duration::from_secs(args.run_limit);
    let mut outcomes = Vec::new();
    for rep in 1..=reps {
        for kind in [Kind::Polybus, Kind::Raw] {
            let Some(mut way) = make(kind, adapter, bus, args) else { continue };
            let outcome = way::run(way.as_mut(), work, limit).await;
            match &outcome {
                Ok(r) => eprintln!("{adapter:<9} {what} {:<9} rep {rep}: {}", kind.name(), show(r)),
                Err(e) => eprintln!("{adapter:<9} {what} {:<9} rep {rep}: FAILED {e:#}", kind.name()),
            }
            outcomes.push((kind, outcome));
        }
    }
    outcomes
}

/// The way `kind` runs on `adapter`, when there is one.
fn make(kind: Kind, adapter: &str, bus: &Bus, args: &Args) -> Option<Box<dyn Way>> {
    match (kind, adapter) {
        (Kind::Polybus, _) => {
            Some(Box::new(polybus_way::PolybusWay::new(bus.clone(), adapter, args.consume_batch)))
        }
        (Kind::Raw, "redis") => Some(Box::new(raw::redis::RawRedis::new(REDIS_URL))),
        (Kind::Raw, "rabbitmq") => Some(Box::new(raw::rabbitmq::RawRabbitmq::new(AMQP_URL))),
        (Kind::Raw, "nats") => Some(Box::new(raw::nats::RawNats::new(NATS_URL))),
        (Kind::Raw, "kafka") => Some(Box::new(raw::kafka::RawKafka::new(KAFKA_BROKERS))),
        (Kind::Raw, "mqtt") => Some(Box::new(raw::mqtt::RawMqtt::new(MQTT_HOST, args.mqtt_port))),
        (Kind::Raw, "sqs") => Some(Box::new(raw::sqs::RawSqs::new(SQS_ENDPOINT))),
        (Kind::Raw, "pubsub") => Some(Box::new(raw::pubsub::RawPubsub::new(PUBSUB_EMULATOR, PUBSUB_PROJECT))),
        #[cfg(feature = "omniqueue")]
        (Kind::Omniqueue, "redis") => Some(Box::new(omni::OmniRedis::new(REDIS_URL))),
        #[cfg(feature = "omniqueue")]
        (Kind::Omniqueue, "rabbitmq") => Some(Box::new(omni::OmniRabbitmq::new(AMQP_URL))),
        #[cfg(feature = "omniqueue")]
        (Kind::Omniqueue, "sqs") => Some(Box::new(omni::OmniSqs::new(SQS_ENDPOINT))),
        _ => None,
    }
}

async fn port_open(port: u16) -> bool {
    let connect = tokio::net::TcpStream::connect(("127.0.0.1", port));
    matches!(tokio::time::timeout(Duration::from_secs(1), connect).await, Ok(Ok(_)))
}
