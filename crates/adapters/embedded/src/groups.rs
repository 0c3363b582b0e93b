//! A topic's groups with their lag, read from the broker file, which holds every group's state.
//!
//! A group's lag is what it has not been handed yet: log messages past its cursor, plus copied
//! ones waiting for (re)delivery (never leased, nacked, or whose lease expired). Pending is what
//! a member holds under a live lease. Members are not recorded in the file (members of other
//! processes share it), so they are not reported.

use std::time::Duration;

use std::sync::Arc;

use polybus_core::{GroupInfo, Op, Result};
use rusqlite::{Connection, params};

use crate::store::{DbResult, Store, now_ms};

/// The groups of topic `name` (none when the topic has no log yet), by name.
pub(crate) async fn of_topic(store: &Arc<Store>, name: &str) -> Result<Vec<GroupInfo>> {
    let owned = name.to_owned();
    store.run(Op::Receive, Some(name), move |conn| read(conn, &owned)).await
}

fn read(conn: &mut Connection, name: &str) -> DbResult<Vec<GroupInfo>> {
    // One read transaction: every count from the same snapshot.
    let tx = conn.transaction()?;
    let now = now_ms();
    let groups: Vec<(i64, i64, String, i64)> = tx
        .prepare_cached(
            "SELECT g.id, g.topic_id, g.name, g.cursor FROM consumer_groups g
             JOIN topics t ON t.id = g.topic_id WHERE t.name = ?1 ORDER BY g.name",
        )?
        .query_map([name], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut infos = Vec::with_capacity(groups.len());
    for (group_id, topic_id, group, cursor) in groups {
        let unread: i64 = tx
            .prepare_cached("SELECT COUNT(*) FROM messages WHERE topic_id = ?1 AND seq > ?2")?
            .query_row(params![topic_id, cursor], |row| row.get(0))?;
        let (copied, leased, oldest): (i64, i64, Option<i64>) = tx
            .prepare_cached(
                "SELECT COUNT(*),
                        COALESCE(SUM(p.lease IS NOT NULL AND p.available_at > ?2), 0),
                        MIN(CASE WHEN p.lease IS NOT NULL AND p.available_at > ?2 THEN m.published_at END)
                 FROM pending p LEFT JOIN messages m ON m.seq = p.seq WHERE p.group_id = ?1",
            )?
            .query_row(params![group_id, now], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
        infos.push(GroupInfo {
            members: None,
            pending: Some(count(leased)),
            lag: Some(count(unread) + count(copied - leased)),
            oldest_unacked: oldest.map(|published| Duration::from_millis(count(now - published))),
            ..GroupInfo::named(group)
        });
    }
    tx.commit()?;
    Ok(infos)
}

fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}
