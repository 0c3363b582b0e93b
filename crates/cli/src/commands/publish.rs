//! `polybus publish --env SLUG EVENT [--data TEXT | --file PATH | stdin] …`

use std::io::IsTerminal;

use polybus::Message;
use serde_json::json;

use super::{Context, close, progress};
use crate::cli::PublishArgs;
use crate::failure::CliResult;
use crate::files::{read_payload, read_stdin};
use crate::output;

/// Messages sent per `publish_batch` call with `--count`.
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
        match args.delay {
            Some(delay) => message.delay(delay),
            None => message,
        }
    };

    let bus = ctx.bus().await?;
    let published = async {
        if args.count == 1 {
            let id = bus.publish(&args.env, &args.event, message()).await?;
            return print_ids(ctx, &[id]);
        }
        let bar = progress(Some(args.count), "publishing");
        let mut left = args.count;
        while left > 0 {
            let n = left.min(BATCH);
            let batch: Vec<Message> = (0..n).map(|_| message()).collect();
            let ids = bus.publish_batch(&args.env, &args.event, batch).await?;
            bar.suspend(|| print_ids(ctx, &ids))?;
            bar.inc(n);
            left -= n;
        }
        bar.finish_and_clear();
        Ok(())
    }
    .await;
    let closed = close(&bus).await;
    published.and(closed)
}

fn print_ids(ctx: &Context, ids: &[String]) -> CliResult {
    let lines: Vec<String> = if ctx.json() {
        ids.iter().map(|id| json!({ "id": id }).to_string()).collect()
    } else {
        ids.to_vec()
    };
    output::line(lines.join("\n"))
}
