//! One fetch round: due delayed publishes and expired entries through the fetch script,
//! then a blocking `XREADGROUP` on the member's own connection.

use std::sync::atomic::Ordering;
use std::time::Duration;

use polybus_core::{Error, Op, Result};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Value};

use super::member::Member;
use super::pump::Stop;
use super::reply::{parse_claim, parse_read};
use crate::fields::Fields;
use crate::scripts;
use crate::transport::{CONNECT_TIMEOUT, NO_GROUP, Shared, reply_code};

/// Most delayed publishes one fetch moves into the stream.
const MAX_MOVED: usize = 100;
/// Shortest wait of a blocking read (`BLOCK 0` would wait forever).
const MIN_BLOCK: Duration = Duration::from_millis(1);

/// One stream entry as fetched for this member.
pub(super) struct Entry {
    pub(super) id: String,
    pub(super) fields: Fields,
    /// Times it has been delivered to this group, this delivery included.
    pub(super) count: u32,
}

impl Member {
    /// One fetch round for up to `count` entries; blocks (interruptibly) only when nothing
    /// was claimable.
    pub(super) async fn fetch(
        &self,
        reader: &mut Option<Reader>,
        cursor: &mut String,
        count: usize,
        stop: &mut Stop,
    ) -> Result<Vec<Entry>> {
        let mut entries = Vec::new();
        if self.until_claim().is_zero() {
            match self.claim(count, cursor).await {
                Ok(claimed) => entries = claimed,
                Err(e) if is_no_group(&e) => return self.recreate_group().await,
                Err(e) => return Err(e),
            }
        }
        if entries.len() >= count || stop.is_stopped() {
            return Ok(entries);
        }
        let block = entries.is_empty().then(|| self.until_claim().clamp(MIN_BLOCK, self.max_block));
        let mut open = match reader.take() {
            Some(open) => open,
            None => Reader::connect(&self.shared, self.max_block)
                .await
                .map_err(|e| self.failed(Op::Receive, e))?,
        };
        let client_id = open.client_id;
        let result = {
            let read = open.read(self, count - entries.len(), block);
            tokio::pin!(read);
            tokio::select! {
                result = &mut read => result,
                _ = stop.stopped() => {
                    // Wake the blocked read instead of dropping it, so entries it already took are
                    // handed back rather than lost until the ack deadline.
                    let mut conn = self.shared.manager.clone();
                    let unblocked =
                        redis::cmd("CLIENT").arg("UNBLOCK").arg(client_id).query_async::<i64>(&mut conn).await;
                    if let Err(e) = unblocked {
                        tracing::debug!(stream = %self.stream, error = %e, "unblocking a read");
                    }
                    tokio::time::timeout(self.max_block + CONNECT_TIMEOUT, &mut read)
                        .await
                        .unwrap_or_else(|_| Err(self.error(Op::Receive, "the blocking read did not end")))
                }
            }
        };
        match result {
            Ok(read) => {
                *reader = Some(open);
                entries.extend(read);
                Ok(entries)
            }
            Err(e) if entries.is_empty() && is_no_group(&e) => {
                *reader = Some(open);
                self.recreate_group().await
            }
            // The connection may be broken: the next round opens a new one. Entries already
            // claimed are still handed out.
            Err(e) if entries.is_empty() => Err(e),
            Err(e) => {
                tracing::debug!(error = %e, claimed = entries.len(),
                    "reading new entries failed; handing out the claimed ones, reopening next round");
                Ok(entries)
            }
        }
    }

    /// The stream or group was deleted under us: starts again from its beginning.
    async fn recreate_group(&self) -> Result<Vec<Entry>> {
        self.claim_within(Duration::ZERO);
        self.create_group().await?;
        Ok(Vec::new())
    }

    /// Runs the fetch script: due delayed publishes join the stream, expired entries are
    /// claimed. Schedules the next claim: at once while the scan of the group's pending
    /// entries is not through, else when the next delayed message or nack is due, at the
    /// latest after `max_block`.
    async fn claim(&self, count: usize, cursor: &mut String) -> Result<Vec<Entry>> {
        // A release answered from here on brings the next claim forward again.
        self.claim_at.store(u64::MAX, Ordering::Relaxed);
        let claimed = self.run_claim(count, cursor).await;
        let next = match &claimed {
            Ok((next_cursor, _, _)) if next_cursor != "0-0" => Duration::ZERO,
            Ok((_, _, wake)) => wake.map_or(self.max_block, |w| w.min(self.max_block)),
            Err(_) => Duration::ZERO,
        };
        self.claim_within(next);
        let (next_cursor, entries, _) = claimed?;
        *cursor = next_cursor;
        Ok(entries)
    }

    async fn run_claim(&self, count: usize, cursor: &str) -> Result<(String, Vec<Entry>, Option<Duration>)> {
        let keys = [self.stream.as_str(), self.delayed_key.as_str(), self.retry_key.as_str()];
        let (reply, _) = self
            .shared
            .retrying(Op::Receive, &self.stream, |mut conn| async move {
                scripts::FETCH
                    .key(keys[0])
                    .key(keys[1])
                    .key(keys[2])
                    .arg(&self.group)
                    .arg(&self.consumer)
                    .arg(self.ack_deadline_ms)
                    .arg(count)
                    .arg(cursor)
                    .arg(self.shared.max_len.unwrap_or(0))
                    .arg(MAX_MOVED)
                    .invoke_async::<Value>(&mut conn)
                    .await
            })
            .await?;
        parse_claim(reply).ok_or_else(|| self.error(Op::Receive, "unexpected reply to the fetch script"))
    }
}

/// The member's own connection for blocking reads, so they never hold up other commands.
pub(super) struct Reader {
    conn: MultiplexedConnection,
    client_id: i64,
}

impl Reader {
    async fn connect(shared: &Shared, max_block: Duration) -> redis::RedisResult<Reader> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(max_block + CONNECT_TIMEOUT));
        let mut conn = shared.client.get_multiplexed_async_connection_with_config(&config).await?;
        let client_id = redis::cmd("CLIENT").arg("ID").query_async::<i64>(&mut conn).await?;
        Ok(Reader { conn, client_id })
    }

    /// `XREADGROUP … COUNT n [BLOCK ms] STREAMS <stream> >`: entries never delivered to the group.
    async fn read(&mut self, member: &Member, count: usize, block: Option<Duration>) -> Result<Vec<Entry>> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP").arg(&member.group).arg(&member.consumer).arg("COUNT").arg(count);
        if let Some(block) = block {
            cmd.arg("BLOCK").arg(u64::try_from(block.as_millis()).unwrap_or(u64::MAX).max(1));
        }
        cmd.arg("STREAMS").arg(&member.stream).arg(">");
        let reply =
            cmd.query_async::<Value>(&mut self.conn).await.map_err(|e| member.failed(Op::Receive, e))?;
        parse_read(reply).ok_or_else(|| member.error(Op::Receive, "unexpected reply to XREADGROUP"))
    }
}

/// True when `e` says the stream or the group no longer exists.
fn is_no_group(e: &Error) -> bool {
    reply_code(e) == Some(NO_GROUP)
}
