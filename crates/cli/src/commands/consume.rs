//! `polybus consume --env SLUG EVENT --group G [--count N] [--timeout DURATION]`

use base64::Engine;
use polybus::{Batch, Message, SubscribeOptions, wire};
use serde_json::{Map, Value, json};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{Context, Source, progress};
use crate::cli::ConsumeArgs;
use crate::failure::{CliResult, EXIT_INTERRUPTED, EXIT_TIMEOUT, Failure};
use crate::output;
use crate::remote::{Client, MAX_PULL_WAIT};

/// Most deliveries fetched ahead of printing; small counts fetch no more than they need.
const PREFETCH: u64 = 64;
/// Batches of acks sent to the broker at the same time, behind the printing.
const ACKS_IN_FLIGHT: usize = 16;

/// Why the receiving stopped.
enum Stop {
    Done,
    TimedOut,
    Interrupted,
    Ended,
    Failed(Failure),
}

/// Receives, prints and acks messages until `--count`, the timeout, or Ctrl-C.
pub async fn run(ctx: &Context, args: ConsumeArgs) -> CliResult {
    if let Source::Remote(client) = ctx.source() {
        return consume_remote(ctx, client, &args).await;
    }
    let bus = ctx.bus().await?;
    let result = consume(ctx, &bus, &args).await;
    if let Err(e) = bus.close().await {
        tracing::warn!(error = %e, "closing broker connections");
    }
    result
}

async fn consume(ctx: &Context, bus: &polybus::Bus, args: &ConsumeArgs) -> CliResult {
    let mut options = SubscribeOptions::new(args.group.as_str());
    if let Some(count) = args.count {
        options.prefetch = count.min(PREFETCH) as usize;
    }
    let mut subscriber = bus.subscribe(&args.env, &args.event, options).await?;
    let bar = progress(args.count, "consuming");
    let deadline = args.timeout.map(|t| Instant::now() + t);
    let timeout = sleep_until(deadline);
    let interrupted = shutdown_signal();
    tokio::pin!(timeout, interrupted);

    let mut received = 0u64;
    let mut acks = Acks::default();
    let stop = 'receiving: loop {
        let max = match args.count {
            Some(count) if count == received => break Stop::Done,
            Some(count) => (count - received).min(PREFETCH),
            None => PREFETCH,
        };
        // What is ready is taken, printed and acked together.
        let next = tokio::select! {
            biased;
            _ = &mut interrupted => break Stop::Interrupted,
            _ = &mut timeout => break Stop::TimedOut,
            next = subscriber.next_batch(max as usize) => next,
        };
        let batch = match next {
            None => break Stop::Ended,
            Some(Err(e)) => break Stop::Failed(e.into()),
            Some(Ok(batch)) => batch,
        };
        let mut printed = Vec::with_capacity(batch.len());
        for delivery in batch {
            // Printed first, acked after: a message that could not be shown is redelivered.
            if let Err(e) = bar.suspend(|| print(ctx, &delivery)) {
                acks.send(printed.into()).await;
                break 'receiving Stop::Failed(e);
            }
            received += 1;
            bar.inc(1);
            printed.push(delivery);
        }
        acks.send(printed.into()).await;
    };
    bar.finish_and_clear();

    let settle = acks.finish();
    let failed_acks = tokio::select! {
        failed = settle => failed,
        _ = shutdown_signal() => {
            return Err(Failure::new("INTERRUPTED", "stopped before the printed messages were acked; they will be redelivered")
                .with_exit(EXIT_INTERRUPTED));
        }
    };
    if let Err(e) = subscriber.close().await {
        tracing::warn!(error = %e, "closing the subscription");
    }
    outcome(stop, received, failed_acks, args)
}

/// Receives through the server: pulls up to what is left (at most [`PREFETCH`] at a time),
/// prints, then acks what was printed, until `--count`, the timeout, or Ctrl-C. What was pulled
/// but not printed is left to its lease, which expires and has the message redelivered.
async fn consume_remote(ctx: &Context, client: &Client, args: &ConsumeArgs) -> CliResult {
    let bar = progress(args.count, "consuming");
    let deadline = args.timeout.map(|t| Instant::now() + t);
    let interrupted = shutdown_signal();
    tokio::pin!(interrupted);

    let mut received = 0u64;
    let mut failed_acks = 0u64;
    let stop = loop {
        let max = match args.count {
            Some(count) if count == received => break Stop::Done,
            Some(count) => (count - received).min(PREFETCH),
            None => PREFETCH,
        };
        let wait = match deadline {
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break Stop::TimedOut;
                }
                left.min(MAX_PULL_WAIT)
            }
            None => MAX_PULL_WAIT,
        };
        let pulled = tokio::select! {
            biased;
            _ = &mut interrupted => break Stop::Interrupted,
            pulled = client.pull(&args.env, &args.event, &args.group, max, wait) => pulled,
        };
        let leased = match pulled {
            Ok(leased) => leased,
            Err(e) => break Stop::Failed(e),
        };
        let mut printed = Vec::with_capacity(leased.len());
        let mut failed = None;
        for leased in &leased {
            // Printed first, acked after: a message that could not be shown is redelivered.
            if let Err(e) = leased.to_message().and_then(|m| bar.suspend(|| print(ctx, &m))) {
                failed = Some(e);
                break;
            }
            printed.push(leased.lease_id.clone());
            received += 1;
            bar.inc(1);
        }
        if !printed.is_empty() {
            match client.ack(&args.env, &args.event, &args.group, &printed).await {
                Ok(n) => failed_acks += n as u64,
                Err(e) => {
                    tracing::warn!(error = %e, "ack failed; the messages will be redelivered");
                    failed_acks += printed.len() as u64;
                }
            }
        }
        if let Some(e) = failed {
            break Stop::Failed(e);
        }
    };
    bar.finish_and_clear();
    outcome(stop, received, failed_acks, args)
}

/// What the command answers once the receiving stopped and the printed messages were acked.
fn outcome(stop: Stop, received: u64, failed_acks: u64, args: &ConsumeArgs) -> CliResult {
    if failed_acks > 0 {
        return Err(Failure::new(
            "ACK_FAILED",
            format!(
                "{failed_acks} of {received} printed messages could not be acked; they will be redelivered"
            ),
        ));
    }
    let of_count = |count: u64| format!("received {received} of {count} messages");
    match (stop, args.count) {
        (Stop::Done, _) => Ok(()),
        (Stop::Failed(e), _) => Err(e),
        (Stop::TimedOut, Some(count)) => {
            let waited = humantime::format_duration(args.timeout.unwrap_or_default());
            Err(Failure::new("TIMEOUT", format!("{} within {waited}", of_count(count)))
                .with_exit(EXIT_TIMEOUT))
        }
        (Stop::Interrupted, Some(count)) => {
            Err(Failure::new("INTERRUPTED", of_count(count)).with_exit(EXIT_INTERRUPTED))
        }
        (Stop::Ended, Some(count)) => {
            Err(Failure::new("CLOSED", format!("the subscription ended: {}", of_count(count))))
        }
        (Stop::Ended, None) => {
            Err(Failure::new("CLOSED", format!("the subscription ended after {received} messages")))
        }
        (Stop::TimedOut | Stop::Interrupted, None) => Ok(()),
    }
}

/// Acks sent behind the printing, a batch at a time, a few batches at once.
#[derive(Default)]
struct Acks {
    /// Each task acks one printed batch; its output is how many of those acks failed.
    pending: JoinSet<u64>,
    failed: u64,
}

impl Acks {
    async fn send(&mut self, printed: Batch) {
        if printed.is_empty() {
            return;
        }
        self.pending.spawn(async move {
            let mut failed = 0;
            for outcome in printed.ack_each().await {
                if let Err(e) = outcome {
                    failed += 1;
                    tracing::warn!(error = %e, "ack failed; the message will be redelivered");
                }
            }
            failed
        });
        while self.pending.len() > ACKS_IN_FLIGHT {
            self.settle_one().await;
        }
    }

    async fn settle_one(&mut self) {
        match self.pending.join_next().await {
            Some(Ok(failed)) => self.failed += failed,
            None => {}
            Some(Err(e)) => {
                // How many messages that task held is unknown here; at least one was not acked.
                self.failed += 1;
                tracing::warn!(error = %e, "ack task failed; its messages will be redelivered");
            }
        }
    }

    /// Waits for every ack; returns how many failed.
    async fn finish(mut self) -> u64 {
        while !self.pending.is_empty() {
            self.settle_one().await;
        }
        self.failed
    }
}

fn print(ctx: &Context, message: &Message) -> CliResult {
    if ctx.json() {
        output::line(output::compact(&as_json(message))?)
    } else {
        output::line(as_line(message)?)
    }
}

/// One JSON object: the payload as text, or as `payload_base64` when it is not UTF-8.
pub(super) fn as_json(message: &Message) -> Value {
    let mut object = Map::new();
    object.insert("id".into(), json!(message.id));
    match message.payload_str() {
        Some(text) => object.insert("payload".into(), json!(text)),
        None => object.insert("payload_base64".into(), json!(base64(&message.payload))),
    };
    object.insert("headers".into(), json!(message.headers));
    object.insert("key".into(), json!(message.key));
    object.insert("content_type".into(), json!(message.content_type));
    object.insert("attempt".into(), json!(message.attempt));
    object.insert("published_at".into(), json!(wire::format_time(message.published_at)));
    Value::Object(object)
}

/// `id  published-at  attempt N  [key K]  [headers {…}]  payload`, on one line.
fn as_line(message: &Message) -> CliResult<String> {
    let mut parts = vec![
        message.id.clone(),
        wire::format_time(message.published_at),
        format!("attempt {}", message.attempt),
    ];
    if let Some(key) = &message.key {
        parts.push(format!("key {key}"));
    }
    if !message.headers.is_empty() {
        parts.push(format!("headers {}", output::compact(&message.headers)?));
    }
    parts.push(match message.payload_str() {
        Some(text) if !text.chars().any(char::is_control) => text.to_owned(),
        Some(text) => output::compact(text)?,
        None => format!("base64:{}", base64(&message.payload)),
    });
    Ok(parts.join("  "))
}

pub(super) fn base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Completes on Ctrl-C or SIGTERM; never, when no handler could be installed.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_utf8_payloads_are_base64() {
        let message = Message::new(vec![0xff, 0x00, 0x01]).key("k").header("h", "v");
        let value = as_json(&message);
        assert_eq!(value["payload_base64"], "/wAB");
        assert!(value.get("payload").is_none());
        assert_eq!(value["headers"], json!({"h": "v"}));
        assert_eq!(value["key"], "k");
    }

    #[test]
    fn table_lines_stay_on_one_line() {
        let line = as_line(&Message::new("two\nlines")).expect("line");
        assert!(line.ends_with(r#"attempt 0  "two\nlines""#), "{line}");
        let line = as_line(&Message::new("hi").key("k")).expect("line");
        assert!(line.ends_with("attempt 0  key k  hi"), "{line}");
    }
}
