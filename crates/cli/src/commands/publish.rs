//! `polybus publish --env SLUG EVENT [--data TEXT | --file PATH | stdin] …`

use std::io::IsTerminal;

use polybus::{Bus, Message, Published};
use serde_json::json;

use super::{Context, Source, close, progress};
use crate::cli::PublishArgs;
use crate::failure::CliResult;
use crate::files::{read_payload, read_stdin};
use crate::output;
use crate::remote::{Client, OutgoingMessage};

/// Messages sent per batch (a `publish_batch` call, or one request to the server) with `--count`.
const BATCH: u64 = 500;

/// Publishes the message (`--count` copies of it) and prints the id of each.
pub async fn run(ctx: &Context, args: PublishArgs) -> CliResult {
    let payload = match (&args.data, &args.file) {
        (Some(data), _) => data.clone().into_bytes(),
        (None, Some(path)) => read_payload(path)?,
        (None, None) => {
            if std::io::stdin().is_terminal() {
                eprintln!(
                    "reading the payload from stdin; end it with Ctrl-D (or use --data TEXT / --file PATH)"
                );
            }
            read_stdin()?
        }
    };
    // Every copy shares the payload's bytes; only the id differs.
    let payload = Message::new(payload).payload;
    let message = || {
        let mut message = Message::new(payload.clone());
        message.key = args.key.clone();
        message.content_type = args.content_type.clone();
        message.headers.extend(args.headers.iter().cloned());
        message.idempotency_key = args.idempotency_key.clone();
        match args.delay {
            Some(delay) => message.delay(delay),
            None => message,
        }
    };

    let keyed = args.idempotency_key.is_some();
    let sender = match ctx.source() {
        Source::Local => Sender::Local(ctx.bus().await?),
        Source::Remote(client) => Sender::Remote(client),
    };
    let published = async {
        if args.count == 1 {
            let published = sender.send(&args.env, &args.event, vec![message()]).await?;
            return print_published(ctx, &published, keyed);
        }
        let bar = progress(Some(args.count), "publishing");
        let mut left = args.count;
        while left > 0 {
            let n = left.min(BATCH);
            let batch: Vec<Message> = (0..n).map(|_| message()).collect();
            let published = sender.send(&args.env, &args.event, batch).await?;
            bar.suspend(|| print_published(ctx, &published, keyed))?;
            bar.inc(n);
            left -= n;
        }
        bar.finish_and_clear();
        Ok(())
    }
    .await;
    let closed = sender.close().await;
    published.and(closed)
}

/// Where messages go: the broker, from this process, or the server.
enum Sender<'a> {
    Local(Bus),
    Remote(&'a Client),
}

impl Sender<'_> {
    /// Publishes `messages` in order; their ids, and which were duplicates not sent.
    async fn send(&self, env: &str, event: &str, mut messages: Vec<Message>) -> CliResult<Vec<Published>> {
        match self {
            Sender::Local(bus) if messages.len() == 1 => match messages.pop() {
                Some(message) => Ok(vec![bus.publish_outcome(env, event, message).await?]),
                None => Ok(Vec::new()),
            },
            Sender::Local(bus) => Ok(bus.publish_batch_outcome(env, event, messages).await?),
            Sender::Remote(client) => {
                let outgoing: Vec<OutgoingMessage> =
                    messages.iter().map(OutgoingMessage::from_message).collect();
                client.publish(env, event, &outgoing).await
            }
        }
    }

    /// Closes the bus, flushing what is still to be published.
    async fn close(&self) -> CliResult {
        match self {
            Sender::Local(bus) => close(bus).await,
            Sender::Remote(_) => Ok(()),
        }
    }
}

/// Prints each id; with an idempotency key, whether it was a duplicate (on stderr in text, so
/// stdout stays the ids).
fn print_published(ctx: &Context, published: &[Published], keyed: bool) -> CliResult {
    let lines: Vec<String> = if ctx.json() {
        let line = |p: &Published| match keyed {
            true => json!({ "id": p.id, "duplicate": p.duplicate }).to_string(),
            false => json!({ "id": p.id }).to_string(),
        };
        published.iter().map(line).collect()
    } else {
        published.iter().map(|p| p.id.clone()).collect()
    };
    output::line(lines.join("\n"))?;
    let duplicates = published.iter().filter(|p| p.duplicate).count();
    if !ctx.json() && duplicates > 0 {
        let what = if duplicates == 1 { "message was a duplicate" } else { "messages were duplicates" };
        eprintln!(
            "{duplicates} {what}: the idempotency key was published already (the id shown is the first \
             message's); not sent again"
        );
    }
    Ok(())
}
