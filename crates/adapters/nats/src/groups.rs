//! A topic's groups with their lag, from the info of each group's durable consumer.
//!
//! Lag is the consumer's `num_pending` (messages not yet delivered), pending its
//! `num_ack_pending`. The oldest unacked message is the one after the consumer's ack floor.
//! Members are not reported: a pull consumer only knows its open pull requests (`num_waiting`),
//! and a member holding its whole prefetch has none open.

use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::consumer::Info;
use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::stream::Stream;
use futures::TryStreamExt;
use polybus_core::{Error, GroupInfo, Op, Result};

use crate::names::TopicNames;
use crate::transport::Shared;

/// What the description of a group's consumer starts with (see `consumer_config`).
const GROUP_DESCRIPTION: &str = "polybus group `";

/// The groups of the topic named by `names`; none when its stream does not exist yet.
pub(crate) async fn of_topic(shared: &Shared, names: &TopicNames) -> Result<Vec<GroupInfo>> {
    let failed = |e: &dyn std::fmt::Display| {
        Error::transport(Op::Receive, format!("nats {}", names.stream), shared.secrets.scrub(e))
    };
    let stream = match shared.js.get_stream(&names.stream).await {
        Ok(stream) => stream,
        Err(e) if matches!(e.kind(), GetStreamErrorKind::JetStream(ref js) if js.error_code() == ErrorCode::STREAM_NOT_FOUND) =>
        {
            return Ok(Vec::new());
        }
        Err(e) => return Err(failed(&e)),
    };
    let consumers: Vec<Info> = stream.consumers().try_collect().await.map_err(|e| failed(&e))?;
    let mut infos = Vec::new();
    for consumer in consumers {
        let Some(group) = group_of(&consumer) else { continue };
        let oldest_unacked = match consumer.num_ack_pending {
            0 => None,
            _ => age_after(&stream, consumer.ack_floor.stream_sequence).await,
        };
        infos.push(GroupInfo {
            pending: Some(consumer.num_ack_pending as u64),
            lag: Some(consumer.num_pending),
            oldest_unacked,
            ..GroupInfo::named(group)
        });
    }
    Ok(infos)
}

/// The polybus group a consumer serves, from its description; `None` for other consumers.
fn group_of(consumer: &Info) -> Option<String> {
    let description = consumer.config.description.as_deref()?;
    Some(description.strip_prefix(GROUP_DESCRIPTION)?.strip_suffix('`')?.to_owned())
}

/// Age of the message after stream sequence `floor` (gone, or unreadable: unknown).
async fn age_after(stream: &Stream, floor: u64) -> Option<std::time::Duration> {
    let message = stream.get_raw_message(floor + 1).await.ok()?;
    (chrono::Utc::now() - message.time).to_std().ok()
}
