//! Replay and message query: the log is the topic's history, kept until compaction removes
//! what every group acked (unless `retention.keepAcked`) or the retention expires it.
//!
//! A replay moves the group's cursor back (or forward) to just before the first message at or
//! after the start, and drops the group's pending rows from there on: they are copied again
//! on the next fetch. Pending rows before the start stay as they are. A member connected
//! during the replay sees the new position at its next fetch; a delivery it holds from the
//! dropped rows fails to settle with `LeaseLost` and comes back with the replayed messages.

use polybus_core::{MessageQuery, Op, ReplayFrom, Result, StoredMessage, TopicSpec};
use rusqlite::{Connection, params};

use crate::log::{self, write_tx};
use crate::store::DbResult;
use crate::transport::EmbeddedTransport;

impl EmbeddedTransport {
    /// Moves `group` of `topic` so that its next deliveries start at `from`.
    pub(crate) async fn replay_group(&self, topic: &TopicSpec, group: &str, from: ReplayFrom) -> Result<()> {
        let store = &self.inner.store;
        let handle = store.topic(Op::Subscribe, &topic.native_name).await?;
        let (topic_id, group) = (handle.id, group.to_owned());
        let since = match from {
            ReplayFrom::Beginning => None,
            ReplayFrom::Time(at) => Some(at.timestamp_millis()),
        };
        store
            .run(Op::Subscribe, Some(&topic.native_name), move |conn| {
                move_group(conn, topic_id, &group, since)
            })
            .await?;
        handle.wake();
        Ok(())
    }

    /// Reads the log of `topic` as `query` selects, oldest first.
    pub(crate) async fn stored_messages(
        &self,
        topic: &TopicSpec,
        query: &MessageQuery,
    ) -> Result<Vec<StoredMessage>> {
        let store = &self.inner.store;
        let topic_id = store.topic(Op::Receive, &topic.native_name).await?.id;
        let query = query.clone();
        store.run(Op::Receive, Some(&topic.native_name), move |conn| select(conn, topic_id, &query)).await
    }
}

/// Sets the group's cursor before the first message published at or after `since_ms` (the
/// whole log when `None`), creating the group when new.
fn move_group(conn: &mut Connection, topic_id: i64, group: &str, since_ms: Option<i64>) -> DbResult<()> {
    let group_id = log::join_group(conn, topic_id, group)?;
    let tx = write_tx(conn)?;
    let cursor: i64 = match since_ms {
        None => 0,
        Some(since) => tx
            .prepare_cached(
                "SELECT COALESCE((SELECT MIN(seq) FROM messages WHERE topic_id = ?1 AND published_at >= ?2) - 1,
                                 (SELECT MAX(seq) FROM messages WHERE topic_id = ?1), 0)",
            )?
            .query_row(params![topic_id, since], |row| row.get(0))?,
    };
    tx.prepare_cached("DELETE FROM pending WHERE group_id = ?1 AND seq > ?2")?
        .execute(params![group_id, cursor])?;
    tx.prepare_cached("UPDATE consumer_groups SET cursor = ?2 WHERE id = ?1")?
        .execute(params![group_id, cursor])?;
    tx.commit()?;
    Ok(())
}

fn select(conn: &mut Connection, topic_id: i64, query: &MessageQuery) -> DbResult<Vec<StoredMessage>> {
    let limit = i64::try_from(query.limit).unwrap_or(i64::MAX);
    let mut statement = conn.prepare_cached(
        "SELECT seq, id, msg_key, content_type, headers, payload, published_at FROM messages
         WHERE topic_id = ?1 AND (?2 IS NULL OR id = ?2) AND (?3 IS NULL OR msg_key = ?3)
           AND (?4 IS NULL OR published_at >= ?4) AND (?5 IS NULL OR published_at < ?5)
         ORDER BY seq LIMIT ?6",
    )?;
    let rows = statement.query_map(
        params![
            topic_id,
            query.id,
            query.key,
            query.since.map(|t| t.timestamp_millis()),
            query.until.map(|t| t.timestamp_millis()),
            limit
        ],
        |row| Ok((row.get::<_, i64>(0)?, log::StoredMessage::from_row(row, 1)?)),
    )?;
    let mut found = Vec::new();
    for row in rows {
        let (seq, stored) = row?;
        found.push(StoredMessage { message: stored.into_message(0)?, position: Some(seq.to_string()) });
    }
    Ok(found)
}
