//! Header names polybus uses on brokers that have no native field for a message attribute.
//!
//! They are ordinary headers, so a broker's own clients see them too.

/// Message id.
pub const ID: &str = "polybus-id";
/// Ordering key.
pub const KEY: &str = "polybus-key";
/// Content type.
pub const CONTENT_TYPE: &str = "polybus-content-type";
/// Publish time, RFC 3339 with milliseconds.
pub const PUBLISHED_AT: &str = "polybus-published-at";
/// Attempt count carried by brokers that redeliver by republishing.
pub const ATTEMPT: &str = "polybus-attempt";
/// Why a message was dead-lettered.
pub const DEAD_LETTER_REASON: &str = "polybus-dead-letter-reason";
/// How many attempts a dead-lettered message had.
pub const DEAD_LETTER_ATTEMPTS: &str = "polybus-dead-letter-attempts";
/// The event a dead-lettered message came from.
pub const DEAD_LETTER_EVENT: &str = "polybus-dead-letter-event";
/// The group that gave up on a dead-lettered message.
pub const DEAD_LETTER_GROUP: &str = "polybus-dead-letter-group";
/// The id of the dead letter a redriven message is a copy of.
pub const REDRIVEN_FROM: &str = "polybus-redriven-from";
/// When a message was dead-lettered, RFC 3339 with milliseconds.
pub const DEAD_LETTERED_AT: &str = "polybus-dead-lettered-at";

/// Formats a publish time for a header.
pub fn format_time(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Parses a publish time header.
pub fn parse_time(s: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::parse_from_rfc3339(s).ok().map(|t| t.with_timezone(&chrono::Utc))
}
