//! `polybus replay --env E EVENT --group G --from beginning|TIME` and `polybus messages --env E
//! EVENT [--id ID] [--key K] [--since T] [--until T] [--limit N]`: a group moved back and
//! stored messages read back, on brokers that retain them; locally or through `--server`.

use clap::Args;
use polybus::{MessageQuery, ReplayFrom, StoredMessage, wire};
use serde_json::{Value, json};

use super::consume::as_json;
use super::dlq::preview;
use super::{Context, Source};
use crate::failure::CliResult;
use crate::output;

/// `polybus replay …`
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// The env.
    #[arg(long)]
    pub env: String,
    /// The event, `broker-tag:topic-tag`.
    pub event: String,
    /// The consumer group to move.
    #[arg(long)]
    pub group: String,
    /// `beginning`, or an RFC 3339 time such as `2026-05-01T12:00:00Z`: the group's next
    /// deliveries start there.
    #[arg(long, value_parser = parse_from)]
    pub from: ReplayFrom,
}

/// `polybus messages …`
#[derive(Debug, Args)]
pub struct MessagesArgs {
    /// The env.
    #[arg(long)]
    pub env: String,
    /// The event, `broker-tag:topic-tag`.
    pub event: String,
    /// Only the message with this id.
    #[arg(long)]
    pub id: Option<String>,
    /// Only messages with this key.
    #[arg(long)]
    pub key: Option<String>,
    /// Only messages published at or after this RFC 3339 time.
    #[arg(long, value_parser = parse_time)]
    pub since: Option<polybus::core::message::Timestamp>,
    /// Only messages published before this RFC 3339 time.
    #[arg(long, value_parser = parse_time)]
    pub until: Option<polybus::core::message::Timestamp>,
    /// At most this many, oldest first.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub limit: u64,
}

fn parse_from(value: &str) -> Result<ReplayFrom, String> {
    value.parse()
}

fn parse_time(value: &str) -> Result<polybus::core::message::Timestamp, String> {
    wire::parse_time(value)
        .ok_or_else(|| format!("`{value}` is not an RFC 3339 time such as 2026-05-01T12:00:00Z"))
}

/// Runs `polybus replay`.
pub async fn replay(ctx: &Context, args: ReplayArgs) -> CliResult {
    let from = match args.from {
        ReplayFrom::Beginning => "beginning".to_owned(),
        ReplayFrom::Time(at) => wire::format_time(at),
    };
    match ctx.source() {
        Source::Remote(client) => client.replay(&args.env, &args.event, &args.group, &from).await?,
        Source::Local => {
            let bus = ctx.bus().await?;
            let replayed = bus.replay(&args.env, &args.event, &args.group, args.from).await;
            let _ = bus.close().await;
            replayed?;
        }
    }
    if ctx.json() {
        output::line(output::compact(&json!({"group": args.group, "from": from}))?)
    } else {
        output::line(format!(
            "group {} of {} in {} starts again at {from}; members connected meanwhile may need a restart \
             (see the broker's README)",
            args.group, args.event, args.env
        ))
    }
}

/// Runs `polybus messages`.
pub async fn messages(ctx: &Context, args: MessagesArgs) -> CliResult {
    let query = MessageQuery {
        id: args.id,
        key: args.key,
        since: args.since,
        until: args.until,
        limit: usize::try_from(args.limit).unwrap_or(polybus::core::ops::QUERY_LIMIT_MAX),
    };
    let found = match ctx.source() {
        Source::Remote(client) => client.messages(&args.env, &args.event, &query).await?,
        Source::Local => {
            let bus = ctx.bus().await?;
            let found = bus.messages(&args.env, &args.event, query).await;
            let _ = bus.close().await;
            found?
        }
    };
    if ctx.json() {
        for stored in &found {
            output::line(output::compact(&as_stored_json(stored))?)?;
        }
        return Ok(());
    }
    let rows: Vec<Vec<String>> = found
        .iter()
        .map(|s| {
            vec![
                s.message.id.clone(),
                wire::format_time(s.message.published_at),
                s.message.key.clone().unwrap_or_else(|| "-".into()),
                s.position.clone().unwrap_or_else(|| "-".into()),
                preview(&s.message),
            ]
        })
        .collect();
    output::table(&["ID", "PUBLISHED", "KEY", "POSITION", "PAYLOAD"], &rows)
}

/// One stored message as JSON: the message (as `polybus consume` prints it) and its position.
fn as_stored_json(stored: &StoredMessage) -> Value {
    let mut value = as_json(&stored.message);
    if let Value::Object(object) = &mut value {
        object.remove("attempt");
        object.insert("position".into(), json!(stored.position));
    }
    value
}
