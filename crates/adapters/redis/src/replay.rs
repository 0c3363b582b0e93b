//! Replay and message query on the stream: it keeps every entry until `maxLen` trims it,
//! acked or not.
//!
//! A replay sets the group's last-delivered id (`XGROUP SETID`, or `XGROUP CREATE` for a new
//! group) to just before the first entry at or after the start; entries the group still has
//! pending stay pending and come back after their ack deadline. Connected members read from the
//! new position at their next fetch. A query reads the stream with `XRANGE` between the times
//! (entry ids are the server's time of publishing) and filters on the polybus id and key.

use polybus_core::{Error, MessageQuery, Op, ReplayFrom, Result, StoredMessage, TopicSpec};
use redis::Value;

use crate::fields;
use crate::subscription::parse_range;
use crate::transport::{GROUP_EXISTS, RedisTransport, reply_code, target};

/// Entries read per `XRANGE`.
const PAGE: usize = 500;
/// Most entries one query reads while filtering by id or key; narrow it with since and until.
const SCAN_MAX: usize = 100_000;

/// The last-delivered id that makes a group read from `from` on.
fn last_delivered(from: ReplayFrom) -> String {
    match from {
        ReplayFrom::Beginning => "0".to_owned(),
        ReplayFrom::Time(at) => match at.timestamp_millis() {
            ms if ms <= 0 => "0".to_owned(),
            ms => format!("{}-{}", ms - 1, u64::MAX),
        },
    }
}

/// The entry id after `id` (`<ms>-<seq>`), where the next page starts.
fn after(id: &str) -> Option<String> {
    let (ms, seq) = id.split_once('-')?;
    let (ms, seq) = (ms.parse::<u64>().ok()?, seq.parse::<u64>().ok()?);
    Some(match seq.checked_add(1) {
        Some(seq) => format!("{ms}-{seq}"),
        None => format!("{}-0", ms.checked_add(1)?),
    })
}

impl RedisTransport {
    /// Moves `group` on `topic`'s stream to `from`, creating the group when new.
    pub(crate) async fn replay_group(&self, topic: &TopicSpec, group: &str, from: ReplayFrom) -> Result<()> {
        let stream = topic.native_name.as_str();
        let id = last_delivered(from);
        let id = id.as_str();
        let created = self
            .shared()
            .retrying(Op::Subscribe, stream, |mut conn| async move {
                redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(stream)
                    .arg(group)
                    .arg(id)
                    .arg("MKSTREAM")
                    .query_async::<Value>(&mut conn)
                    .await
            })
            .await;
        match created {
            Err(e) if reply_code(&e) == Some(GROUP_EXISTS) => {}
            other => return other.map(|_| ()),
        }
        self.shared()
            .retrying(Op::Subscribe, stream, |mut conn| async move {
                redis::cmd("XGROUP")
                    .arg("SETID")
                    .arg(stream)
                    .arg(group)
                    .arg(id)
                    .query_async::<Value>(&mut conn)
                    .await
            })
            .await?;
        Ok(())
    }

    /// Reads the entries of `topic`'s stream that `query` selects, oldest first.
    pub(crate) async fn stored_messages(
        &self,
        topic: &TopicSpec,
        query: &MessageQuery,
    ) -> Result<Vec<StoredMessage>> {
        let stream = topic.native_name.as_str();
        let mut start =
            query.since.map_or_else(|| "-".to_owned(), |t| t.timestamp_millis().max(0).to_string());
        let end = match query.until.map(|t| t.timestamp_millis()) {
            Some(ms) if ms <= 0 => return Ok(Vec::new()),
            Some(ms) => (ms - 1).to_string(),
            None => "+".to_owned(),
        };
        let mut found = Vec::new();
        let mut scanned = 0;
        while found.len() < query.limit && scanned < SCAN_MAX {
            let (start_id, end_id) = (start.as_str(), end.as_str());
            let (reply, _) = self
                .shared()
                .retrying(Op::Receive, stream, |mut conn| async move {
                    redis::cmd("XRANGE")
                        .arg(stream)
                        .arg(start_id)
                        .arg(end_id)
                        .arg("COUNT")
                        .arg(PAGE)
                        .query_async::<Value>(&mut conn)
                        .await
                })
                .await?;
            let entries = parse_range(reply).ok_or_else(|| {
                Error::transport(Op::Receive, target(stream), "XRANGE returned an unexpected reply")
            })?;
            let Some((last, _)) = entries.last() else { break };
            let next = after(last);
            let full = entries.len() == PAGE;
            scanned += entries.len();
            for (entry_id, entry_fields) in entries {
                let message = fields::decode(&entry_id, entry_fields, 0);
                let id_matches = query.id.as_ref().is_none_or(|id| *id == message.id);
                let key_matches = query.key.is_none() || query.key == message.key;
                if id_matches && key_matches && found.len() < query.limit {
                    found.push(StoredMessage { message, position: Some(entry_id) });
                }
            }
            match next {
                Some(next) if full => start = next,
                _ => break,
            }
        }
        if scanned >= SCAN_MAX && found.len() < query.limit {
            tracing::warn!(stream, scanned, "message query stopped scanning; narrow it with since and until");
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_time_replays_from_its_first_millisecond() {
        let at = chrono::DateTime::from_timestamp_millis(1_700_000_000_123).expect("a time");
        assert_eq!(last_delivered(ReplayFrom::Time(at)), format!("1700000000122-{}", u64::MAX));
        assert_eq!(last_delivered(ReplayFrom::Beginning), "0");
    }

    #[test]
    fn the_next_page_starts_after_the_last_entry() {
        assert_eq!(after("5-7").as_deref(), Some("5-8"));
        assert_eq!(after(&format!("5-{}", u64::MAX)).as_deref(), Some("6-0"));
        assert_eq!(after("junk"), None);
    }
}
