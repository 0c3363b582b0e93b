//! Operations on a topic's stored messages and groups: lag, replay and message query.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::message::{Message, Timestamp};

/// One consumer group of a topic as the broker reports it.
///
/// A field is `None` when the broker cannot tell it; a number the broker only estimates
/// (SQS, RabbitMQ) is reported as it is given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GroupInfo {
    /// Group name as given to `subscribe`.
    pub group: String,
    /// Members connected now.
    pub members: Option<u64>,
    /// Delivered to a member and not yet settled.
    pub pending: Option<u64>,
    /// Published and not yet delivered to this group.
    pub lag: Option<u64>,
    /// Age (since it was published) of the oldest delivered-but-unsettled message.
    #[serde(with = "opt_millis", rename = "oldestUnackedMs", default)]
    pub oldest_unacked: Option<Duration>,
}

impl GroupInfo {
    /// A group with nothing known yet.
    pub fn named(group: impl Into<String>) -> Self {
        GroupInfo { group: group.into(), members: None, pending: None, lag: None, oldest_unacked: None }
    }
}

/// Where a replay moves a group to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayFrom {
    /// The oldest message the broker still holds.
    Beginning,
    /// The first message published at or after this time.
    Time(Timestamp),
}

impl std::str::FromStr for ReplayFrom {
    type Err = String;

    /// `beginning`, or an RFC 3339 time such as `2026-05-01T12:00:00Z`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("beginning") {
            return Ok(ReplayFrom::Beginning);
        }
        crate::wire::parse_time(s).map(ReplayFrom::Time).ok_or_else(|| {
            format!("`{s}` is neither `beginning` nor an RFC 3339 time such as 2026-05-01T12:00:00Z")
        })
    }
}

/// Which stored messages to read back.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MessageQuery {
    /// Only the message with this polybus id.
    pub id: Option<String>,
    /// Only messages with this key.
    pub key: Option<String>,
    /// Only messages published at or after this time.
    pub since: Option<Timestamp>,
    /// Only messages published before this time.
    pub until: Option<Timestamp>,
    /// At most this many, oldest first.
    pub limit: usize,
}

/// Default and largest `MessageQuery::limit`.
pub const QUERY_LIMIT_DEFAULT: usize = 100;
/// Largest `MessageQuery::limit` accepted.
pub const QUERY_LIMIT_MAX: usize = 1000;

/// A message read back from a retaining broker.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    /// The message as published.
    pub message: Message,
    /// The broker's own position of it (offset, stream id, sequence), for display.
    pub position: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_from_is_beginning_or_an_rfc3339_time() {
        assert_eq!("Beginning".parse::<ReplayFrom>(), Ok(ReplayFrom::Beginning));
        let at = crate::wire::parse_time("2026-05-01T12:00:00Z").expect("a time");
        assert_eq!("2026-05-01T14:00:00+02:00".parse::<ReplayFrom>(), Ok(ReplayFrom::Time(at)));
        let refused = "yesterday".parse::<ReplayFrom>().expect_err("not a time");
        assert!(refused.contains("`yesterday` is neither `beginning` nor an RFC 3339 time"), "{refused}");
    }
}

mod opt_millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(d) => s.serialize_some(&(d.as_millis() as u64)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
    }
}
