//! A topic's groups with their lag, from `XINFO GROUPS`, `XINFO CONSUMERS` and the `XPENDING`
//! summary of its stream.
//!
//! Lag is the `lag` field of `XINFO GROUPS` (Redis 7). When Redis cannot tell it (before 7, or
//! after entries were deleted from the middle of the stream) the entries after the group's last
//! delivered id are counted, up to [`COUNT_MAX`]; beyond that the lag is unknown. Pending is the
//! group's pending entries list, which also holds what a member nacked (it is handed out again
//! from there). Members are the consumers that read within [`MEMBER_IDLE`] or hold entries: Redis
//! keeps a consumer that died without leaving until a member of polybus removes it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use polybus_core::{GroupInfo, Op, Result};
use redis::streams::{StreamInfoConsumersReply, StreamInfoGroup, StreamInfoGroupsReply, StreamPendingReply};
use redis::{RedisResult, Value};

use crate::transport::Shared;

/// A consumer idle longer than this, holding nothing, is not counted as a member: a live
/// member reads at least every second.
const MEMBER_IDLE: Duration = Duration::from_secs(30);
/// Most entries counted when Redis cannot tell a group's lag.
const COUNT_MAX: usize = 1000;

/// The groups of `stream`; none when the stream does not exist yet.
pub(crate) async fn of_stream(shared: &Shared, stream: &str) -> Result<Vec<GroupInfo>> {
    let (exists, _) = shared
        .retrying(Op::Receive, stream, |mut conn| async move {
            redis::cmd("EXISTS").arg(stream).query_async::<bool>(&mut conn).await
        })
        .await?;
    if !exists {
        return Ok(Vec::new());
    }
    let (reply, _) = shared
        .retrying(Op::Receive, stream, |mut conn| async move {
            redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(stream)
                .query_async::<StreamInfoGroupsReply>(&mut conn)
                .await
        })
        .await?;
    let mut infos = Vec::with_capacity(reply.groups.len());
    for group in reply.groups {
        infos.push(one(shared, stream, group).await?);
    }
    Ok(infos)
}

async fn one(shared: &Shared, stream: &str, group: StreamInfoGroup) -> Result<GroupInfo> {
    let name = group.name.as_str();
    let ((consumers, pending), _) = shared
        .retrying(Op::Receive, stream, |mut conn| async move {
            redis::pipe()
                .cmd("XINFO")
                .arg("CONSUMERS")
                .arg(stream)
                .arg(name)
                .cmd("XPENDING")
                .arg(stream)
                .arg(name)
                .query_async::<(StreamInfoConsumersReply, StreamPendingReply)>(&mut conn)
                .await
        })
        .await?;
    let idle_max = MEMBER_IDLE.as_millis() as usize;
    let members = consumers.consumers.iter().filter(|c| c.idle < idle_max || c.pending > 0).count();
    let oldest_unacked = match &pending {
        StreamPendingReply::Data(data) if data.count > 0 => age_of(&data.start_id),
        _ => None,
    };
    let lag = match group.lag {
        Some(lag) => Some(lag as u64),
        None => count_after(shared, stream, &group.last_delivered_id).await?,
    };
    Ok(GroupInfo {
        members: Some(members as u64),
        pending: Some(group.pending as u64),
        lag,
        oldest_unacked,
        ..GroupInfo::named(group.name.clone())
    })
}

/// How many entries follow `last` in `stream`, when at most [`COUNT_MAX`].
async fn count_after(shared: &Shared, stream: &str, last: &str) -> Result<Option<u64>> {
    let start = format!("({last}");
    let start = start.as_str();
    let (entries, _) = shared
        .retrying(Op::Receive, stream, |mut conn| async move {
            let reply: RedisResult<Vec<Value>> = redis::cmd("XRANGE")
                .arg(stream)
                .arg(start)
                .arg("+")
                .arg("COUNT")
                .arg(COUNT_MAX + 1)
                .query_async(&mut conn)
                .await;
            reply
        })
        .await?;
    Ok((entries.len() <= COUNT_MAX).then_some(entries.len() as u64))
}

/// Time since the entry `id` (`<ms>-<seq>`) was added.
fn age_of(id: &str) -> Option<Duration> {
    let added = id.split('-').next()?.parse::<u64>().ok()?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_millis() as u64;
    Some(Duration::from_millis(now.saturating_sub(added)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_id_tells_when_it_was_added() {
        assert!(age_of("0-1").is_some_and(|age| age > Duration::from_secs(1_000_000)));
        assert_eq!(age_of("not-an-id"), None);
    }
}
