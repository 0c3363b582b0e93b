//! The log and the groups' state, as blocking SQLite calls.
//!
//! `messages` is the durable log of every topic. Each group has a `cursor` (the highest log
//! `seq` copied into its state) and a `pending` row for every message it has not acked yet:
//! copied from the log lazily, in bounded chunks, when a member fetches. A pending row is
//! deliverable when its `available_at` has passed (first visibility, lease expiry or nack
//! delay) and it is the `head` of its key: the group's earliest unacked message with that key.

use std::collections::BTreeMap;

use bytes::Bytes;
use chrono::DateTime;
use polybus_core::Message;
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};

use crate::store::{DbError, DbResult, now_ms};

/// Log rows copied into a group's state per statement.
const CHUNK: i64 = 1024;
/// Chunks copied per fetch, so one fetch never holds the write lock for long.
const CHUNKS_PER_FETCH: i64 = 8;
/// Log rows removed per transaction when compacting: each chunk is its own call on the
/// connection, so that publishes and fetches wait for one chunk at most (about a millisecond).
pub(crate) const DELETE_CHUNK: u64 = 512;

pub(crate) fn write_tx(conn: &mut Connection) -> rusqlite::Result<Transaction<'_>> {
    // Taking the write lock up front means the busy timeout applies, instead of a failed
    // upgrade from a read snapshot that another process has moved past.
    conn.transaction_with_behavior(TransactionBehavior::Immediate)
}

fn millis(duration: std::time::Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// Appends `messages` to the log of topic `topic_id` in one transaction.
pub(crate) fn publish(conn: &mut Connection, topic_id: i64, messages: &[Message]) -> DbResult<()> {
    let tx = write_tx(conn)?;
    let now = now_ms();
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO messages (topic_id, id, msg_key, content_type, headers, payload, published_at, visible_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?;
        for message in messages {
            let published_at = message.published_at.timestamp_millis();
            let visible_at = match message.delay {
                Some(delay) => now.max(published_at.saturating_add(millis(delay))),
                None => now,
            };
            let headers = serde_json::to_string(&message.headers)?;
            insert.execute(params![
                topic_id,
                message.id,
                message.key,
                message.content_type,
                headers,
                message.payload.as_ref(),
                published_at,
                visible_at,
            ])?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// The id of group `name` on topic `topic_id`, created at the start of the retained log when new.
pub(crate) fn join_group(conn: &mut Connection, topic_id: i64, name: &str) -> DbResult<i64> {
    conn.prepare_cached(
        "INSERT INTO consumer_groups (topic_id, name, cursor) VALUES (?1, ?2, 0) ON CONFLICT (topic_id, name) DO NOTHING",
    )?
    .execute(params![topic_id, name])?;
    Ok(conn
        .prepare_cached("SELECT id FROM consumer_groups WHERE topic_id = ?1 AND name = ?2")?
        .query_row(params![topic_id, name], |row| row.get(0))?)
}

/// A message leased to one member.
#[derive(Debug)]
pub(crate) struct Leased {
    /// Log position.
    pub seq: i64,
    /// The token that proves this member still holds the lease.
    pub lease: i64,
    /// When the message was available before this lease, to restore it if never handed out.
    pub available_before: i64,
    /// When the lease was taken.
    pub leased_at: std::time::Instant,
    /// The message, its attempt counted.
    pub message: Message,
}

/// What one fetch found.
#[derive(Debug, Default)]
pub(crate) struct Fetched {
    /// Messages now leased to the caller, in delivery order.
    pub leased: Vec<Leased>,
    /// The log has messages not yet copied into the group: fetch again without waiting.
    pub more: bool,
    /// When nothing was leased: the earliest time (ms) a pending message becomes available.
    pub next_due: Option<i64>,
}

fn cursor_and_last(conn: &Connection, group_id: i64, topic_id: i64) -> DbResult<(i64, i64)> {
    let cursor: i64 = conn
        .prepare_cached("SELECT cursor FROM consumer_groups WHERE id = ?1")?
        .query_row([group_id], |row| row.get(0))?;
    let last: Option<i64> = conn
        .prepare_cached("SELECT MAX(seq) FROM messages WHERE topic_id = ?1")?
        .query_row([topic_id], |row| row.get(0))?;
    Ok((cursor, last.unwrap_or(0)))
}

fn next_due(conn: &Connection, group_id: i64, now: i64) -> DbResult<Option<i64>> {
    Ok(conn
        .prepare_cached(
            "SELECT MIN(available_at) FROM pending WHERE group_id = ?1 AND head = 1 AND available_at > ?2",
        )?
        .query_row(params![group_id, now], |row| row.get(0))?)
}

/// Leases up to `want` deliverable messages of group `group_id` for `deadline_ms`.
pub(crate) fn fetch(
    conn: &mut Connection,
    topic_id: i64,
    group_id: i64,
    want: usize,
    deadline_ms: i64,
) -> DbResult<Fetched> {
    // Look without the write lock first: idle members poll, and must not stall publishers.
    let now = now_ms();
    let (cursor, last) = cursor_and_last(conn, group_id, topic_id)?;
    let ready: bool = conn
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM pending WHERE group_id = ?1 AND head = 1 AND available_at <= ?2)",
        )?
        .query_row(params![group_id, now], |row| row.get(0))?;
    if cursor >= last && !ready {
        return Ok(Fetched { next_due: next_due(conn, group_id, now)?, ..Fetched::default() });
    }

    let tx = write_tx(conn)?;
    let now = now_ms();
    let (mut cursor, last) = cursor_and_last(&tx, group_id, topic_id)?;
    let mut leased = Vec::new();
    let mut chunks = 0;
    let lease = Lease { base: new_lease_base(), now, deadline_ms };
    loop {
        lease_ready(&tx, group_id, want - leased.len(), lease, &mut leased)?;
        if leased.len() >= want || cursor >= last || chunks == CHUNKS_PER_FETCH {
            break;
        }
        cursor = copy_chunk(&tx, topic_id, group_id, cursor)?.unwrap_or(last);
        chunks += 1;
    }
    let next_due = if leased.is_empty() { next_due(&tx, group_id, now)? } else { None };
    tx.commit()?;
    Ok(Fetched { leased, more: cursor < last, next_due })
}

/// Copies the next chunk of the log after `cursor` into the group; returns the new cursor.
fn copy_chunk(tx: &Transaction<'_>, topic_id: i64, group_id: i64, cursor: i64) -> DbResult<Option<i64>> {
    let upto: Option<i64> = tx
        .prepare_cached(
            "SELECT MAX(seq) FROM (SELECT seq FROM messages WHERE topic_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3)",
        )?
        .query_row(params![topic_id, cursor, CHUNK], |row| row.get(0))?;
    let Some(upto) = upto else { return Ok(None) };
    // A keyed message is its key's head when no earlier message with that key is pending,
    // neither already in the group nor earlier in this chunk.
    tx.prepare_cached(
        "INSERT INTO pending (group_id, seq, msg_key, head, available_at, attempts, lease)
         SELECT ?1, m.seq, m.msg_key,
                CASE WHEN m.msg_key IS NULL THEN 1
                     WHEN row_number() OVER (PARTITION BY m.msg_key ORDER BY m.seq) = 1
                          AND NOT EXISTS (SELECT 1 FROM pending p WHERE p.group_id = ?1 AND p.msg_key = m.msg_key)
                     THEN 1 ELSE 0 END,
                m.visible_at, 0, NULL
         FROM messages m WHERE m.topic_id = ?2 AND m.seq > ?3 AND m.seq <= ?4",
    )?
    .execute(params![group_id, topic_id, cursor, upto])?;
    tx.prepare_cached("UPDATE consumer_groups SET cursor = ?2 WHERE id = ?1")?
        .execute(params![group_id, upto])?;
    Ok(Some(upto))
}

/// A log row as stored.
pub(crate) struct StoredMessage {
    id: String,
    key: Option<String>,
    content_type: Option<String>,
    headers: String,
    payload: Vec<u8>,
    published_at: i64,
}

impl StoredMessage {
    /// Reads the row's columns `id, msg_key, content_type, headers, payload, published_at`
    /// starting at column `first`.
    pub(crate) fn from_row(row: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<Self> {
        Ok(StoredMessage {
            id: row.get(first)?,
            key: row.get(first + 1)?,
            content_type: row.get(first + 2)?,
            headers: row.get(first + 3)?,
            payload: row.get(first + 4)?,
            published_at: row.get(first + 5)?,
        })
    }

    /// The message as published, on its `attempt`.
    pub(crate) fn into_message(self, attempt: u32) -> DbResult<Message> {
        let StoredMessage { id, key, content_type, headers, payload, published_at } = self;
        let headers: BTreeMap<String, String> = serde_json::from_str(&headers)?;
        let published_at = DateTime::from_timestamp_millis(published_at).ok_or_else(|| {
            DbError::Incompatible(format!("message {id} has an invalid publish time {published_at}"))
        })?;
        Ok(Message {
            id,
            payload: Bytes::from(payload),
            headers,
            key,
            content_type,
            published_at,
            attempt,
            delay: None,
            idempotency_key: None,
        })
    }
}

/// How one fetch leases.
#[derive(Clone, Copy)]
struct Lease {
    /// Random per fetch; a message's token is this plus its `seq`.
    base: i64,
    /// The fetch's time.
    now: i64,
    /// How long a lease lasts.
    deadline_ms: i64,
}

fn lease_ready(
    tx: &Transaction<'_>,
    group_id: i64,
    want: usize,
    Lease { base, now, deadline_ms }: Lease,
    leased: &mut Vec<Leased>,
) -> DbResult<()> {
    let limit = i64::try_from(want).unwrap_or(i64::MAX);
    let rows: Vec<(i64, i64, i64, Option<StoredMessage>)> = tx
        .prepare_cached(
            "SELECT p.seq, p.attempts, p.available_at,
                    m.id, m.msg_key, m.content_type, m.headers, m.payload, m.published_at
             FROM pending p LEFT JOIN messages m ON m.seq = p.seq
             WHERE p.group_id = ?1 AND p.head = 1 AND p.available_at <= ?2
             ORDER BY p.available_at, p.seq LIMIT ?3",
        )?
        .query_map(params![group_id, now, limit], |row| {
            let message = match row.get::<_, Option<String>>(3)? {
                Some(_) => Some(StoredMessage::from_row(row, 3)?),
                None => None,
            };
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, message))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut take = tx.prepare_cached(
        "UPDATE pending SET available_at = ?3, attempts = attempts + 1, lease = ?4 WHERE group_id = ?1 AND seq = ?2",
    )?;
    for (seq, attempts, available_before, message) in rows {
        let Some(message) = message else {
            // Removed from the log by retention meanwhile: nothing left to deliver.
            let key: Option<String> = tx
                .prepare_cached("DELETE FROM pending WHERE group_id = ?1 AND seq = ?2 RETURNING msg_key")?
                .query_row(params![group_id, seq], |row| row.get(0))?;
            if let Some(key) = key {
                promote_next(tx, group_id, &key)?;
            }
            continue;
        };
        let lease = base.wrapping_add(seq);
        take.execute(params![group_id, seq, now.saturating_add(deadline_ms), lease])?;
        let message = message.into_message(u32::try_from(attempts.saturating_add(1)).unwrap_or(u32::MAX))?;
        leased.push(Leased { seq, lease, available_before, leased_at: std::time::Instant::now(), message });
    }
    Ok(())
}

fn new_lease_base() -> i64 {
    // Random, so a stale holder (even in another process) can never match a newer lease; one
    // draw per fetch, its messages' distinct positions keep their tokens apart.
    let (high, _) = uuid::Uuid::new_v4().as_u64_pair();
    i64::from_ne_bytes(high.to_ne_bytes())
}

/// Outcome of settling a lease.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Settled {
    /// Done; `true` when another message may have become deliverable.
    Done(bool),
    /// The lease is no longer this holder's.
    LeaseLost,
}

/// What a member does with a leased message.
#[derive(Debug)]
pub(crate) enum Settle {
    /// Done with it: remove it from the group.
    Ack {
        /// The message's key, whose next message becomes deliverable.
        key: Option<String>,
    },
    /// Deliver it again after `delay_ms`.
    Nack {
        /// Milliseconds before it is deliverable again.
        delay_ms: i64,
    },
}

/// An ack or nack of one leased message.
#[derive(Debug)]
pub(crate) struct Settlement {
    /// The group holding the message.
    pub group_id: i64,
    /// The message's log position.
    pub seq: i64,
    /// The lease the settling member holds.
    pub lease: i64,
    /// Ack or nack.
    pub settle: Settle,
}

/// Applies every settlement whose lease still holds, in one transaction; returns each one's
/// outcome in order.
pub(crate) fn settle(conn: &mut Connection, settlements: &[Settlement]) -> DbResult<Vec<Settled>> {
    let tx = write_tx(conn)?;
    let now = now_ms();
    let mut outcomes = Vec::with_capacity(settlements.len());
    for Settlement { group_id, seq, lease, settle } in settlements {
        outcomes.push(match settle {
            Settle::Ack { key } => ack(&tx, *group_id, *seq, *lease, key.as_deref())?,
            Settle::Nack { delay_ms } => nack(&tx, *group_id, *seq, *lease, now.saturating_add(*delay_ms))?,
        });
    }
    tx.commit()?;
    Ok(outcomes)
}

/// Removes message `seq` (with `key`) from the group when `lease` still holds it.
fn ack(tx: &Transaction<'_>, group_id: i64, seq: i64, lease: i64, key: Option<&str>) -> DbResult<Settled> {
    // No RETURNING: SQLite would build a temporary table for it on every ack.
    let removed = tx
        .prepare_cached("DELETE FROM pending WHERE group_id = ?1 AND seq = ?2 AND lease = ?3")?
        .execute(params![group_id, seq, lease])?;
    Ok(match (removed, key) {
        (0, _) => Settled::LeaseLost,
        (_, None) => Settled::Done(false),
        (_, Some(key)) => Settled::Done(promote_next(tx, group_id, key)?),
    })
}

/// Makes the group's earliest pending message with `key` deliverable; true when there is one.
fn promote_next(tx: &Transaction<'_>, group_id: i64, key: &str) -> DbResult<bool> {
    let promoted = tx
        .prepare_cached(
            "UPDATE pending SET head = 1 WHERE group_id = ?1 AND seq =
             (SELECT MIN(seq) FROM pending WHERE group_id = ?1 AND msg_key = ?2)",
        )?
        .execute(params![group_id, key])?;
    Ok(promoted > 0)
}

/// Makes message `seq` available again at `available_at` when `lease` still holds it.
fn nack(tx: &Transaction<'_>, group_id: i64, seq: i64, lease: i64, available_at: i64) -> DbResult<Settled> {
    let changed = tx
        .prepare_cached("UPDATE pending SET available_at = ?4, lease = NULL WHERE group_id = ?1 AND seq = ?2 AND lease = ?3")?
        .execute(params![group_id, seq, lease, available_at])?;
    Ok(if changed == 0 { Settled::LeaseLost } else { Settled::Done(true) })
}

/// Renews a lease for `deadline_ms` from now; false when it is no longer this holder's.
pub(crate) fn extend(
    conn: &mut Connection,
    group_id: i64,
    seq: i64,
    lease: i64,
    deadline_ms: i64,
) -> DbResult<bool> {
    let changed = conn
        .prepare_cached(
            "UPDATE pending SET available_at = ?4 WHERE group_id = ?1 AND seq = ?2 AND lease = ?3",
        )?
        .execute(params![group_id, seq, lease, now_ms().saturating_add(deadline_ms)])?;
    Ok(changed > 0)
}

/// Gives back leases that were fetched but never handed to the user, uncounted.
pub(crate) fn release(conn: &mut Connection, group_id: i64, leases: &[(i64, i64, i64)]) -> DbResult<()> {
    let tx = write_tx(conn)?;
    {
        let mut give_back = tx.prepare_cached(
            "UPDATE pending SET available_at = ?4, attempts = MAX(attempts - 1, 0), lease = NULL
             WHERE group_id = ?1 AND seq = ?2 AND lease = ?3",
        )?;
        for (seq, lease, available_at) in leases {
            give_back.execute(params![group_id, seq, lease, available_at])?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// Ids of every topic in the file.
pub(crate) fn topic_ids(conn: &mut Connection) -> DbResult<Vec<i64>> {
    Ok(conn
        .prepare_cached("SELECT id FROM topics ORDER BY id")?
        .query_map([], |row| row.get(0))?
        .collect::<rusqlite::Result<_>>()?)
}

/// The newest log position of topic `topic_id` beyond the `keep` newest, when there is one.
pub(crate) fn beyond_newest(conn: &mut Connection, topic_id: i64, keep: u64) -> DbResult<Option<i64>> {
    let keep = i64::try_from(keep).unwrap_or(i64::MAX);
    Ok(conn
        .prepare_cached("SELECT seq FROM messages WHERE topic_id = ?1 ORDER BY seq DESC LIMIT 1 OFFSET ?2")?
        .query_row(params![topic_id, keep], |row| row.get(0))
        .optional()?)
}

/// Removes the topic's oldest messages up to position `upto`: at most [`DELETE_CHUNK`], in one
/// transaction; returns how many.
pub(crate) fn delete_upto(conn: &mut Connection, topic_id: i64, upto: i64) -> DbResult<u64> {
    let tx = write_tx(conn)?;
    let deleted = delete_below(&tx, topic_id, upto.saturating_add(1))?;
    tx.commit()?;
    Ok(deleted)
}

/// Removes the topic's messages published before `before_ms`: at most [`DELETE_CHUNK`], in one
/// transaction; returns how many.
pub(crate) fn delete_published_before(conn: &mut Connection, topic_id: i64, before_ms: i64) -> DbResult<u64> {
    let tx = write_tx(conn)?;
    let deleted = tx
        .prepare_cached(
            "DELETE FROM messages WHERE seq IN
             (SELECT seq FROM messages WHERE topic_id = ?1 AND published_at < ?2 ORDER BY seq LIMIT ?3)",
        )?
        .execute(params![topic_id, before_ms, DELETE_CHUNK.cast_signed()])?;
    tx.commit()?;
    Ok(deleted as u64)
}

/// Removes the topic's oldest messages that every group has acked: at most [`DELETE_CHUNK`], in
/// one transaction; returns how many.
pub(crate) fn delete_acked(conn: &mut Connection, topic_id: i64) -> DbResult<u64> {
    let tx = write_tx(conn)?;
    // Everything below the lowest position some group still needs has been acked by all.
    // Computed in the deleting transaction, so a group that joins meanwhile keeps what is left.
    // A topic without groups keeps its log, so that a first subscriber reads it all.
    let below: Option<i64> = tx
        .prepare_cached(
            "SELECT MIN(COALESCE((SELECT MIN(seq) FROM pending p WHERE p.group_id = g.id), g.cursor + 1))
             FROM consumer_groups g WHERE g.topic_id = ?1",
        )?
        .query_row([topic_id], |row| row.get(0))?;
    let deleted = match below {
        Some(below) => delete_below(&tx, topic_id, below)?,
        None => 0,
    };
    tx.commit()?;
    Ok(deleted)
}

fn delete_below(tx: &Transaction<'_>, topic_id: i64, below: i64) -> DbResult<u64> {
    let deleted = tx
        .prepare_cached(
            "DELETE FROM messages WHERE seq IN
             (SELECT seq FROM messages WHERE topic_id = ?1 AND seq < ?2 ORDER BY seq LIMIT ?3)",
        )?
        .execute(params![topic_id, below, DELETE_CHUNK.cast_signed()])?;
    Ok(deleted as u64)
}

/// Drops the groups' pending rows of messages retention removed from topic `topic_id`, and
/// makes the next message of each affected key its head.
pub(crate) fn forget_removed(conn: &mut Connection, topic_id: i64) -> DbResult<()> {
    let tx = write_tx(conn)?;
    forget_expired(&tx, topic_id)?;
    tx.commit()?;
    Ok(())
}

/// Drops the groups' pending rows of messages retention removed, and makes the next message of
/// each affected key its head.
fn forget_expired(tx: &Transaction<'_>, topic_id: i64) -> DbResult<()> {
    tx.prepare_cached(
        "DELETE FROM pending WHERE group_id IN (SELECT id FROM consumer_groups WHERE topic_id = ?1)
         AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.seq = pending.seq)",
    )?
    .execute([topic_id])?;
    tx.prepare_cached(
        "UPDATE pending SET head = 1
         WHERE group_id IN (SELECT id FROM consumer_groups WHERE topic_id = ?1) AND head = 0
         AND NOT EXISTS (SELECT 1 FROM pending p
                         WHERE p.group_id = pending.group_id AND p.msg_key = pending.msg_key AND p.seq < pending.seq)",
    )?
    .execute([topic_id])?;
    Ok(())
}
