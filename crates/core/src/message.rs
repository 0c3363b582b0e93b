//! The message that travels through every broker.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::error::ValidationError;

/// A message: id, payload bytes, headers, optional key, content type, publish time, attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Unique id (a UUIDv7 unless the publisher set one).
    pub id: String,
    /// The payload, unchanged byte for byte.
    pub payload: Bytes,
    /// String headers; trace context travels here.
    pub headers: BTreeMap<String, String>,
    /// Ordering / partition key.
    pub key: Option<String>,
    /// MIME type of the payload.
    pub content_type: Option<String>,
    /// When it was published.
    pub published_at: DateTime<Utc>,
    /// Delivery attempt, 1 on first delivery (0 on a message not yet delivered).
    pub attempt: u32,
    /// Publish only: deliver no earlier than this long after publishing.
    pub delay: Option<Duration>,
    /// Publish only: a second publish with this key to the same topic and env, within the
    /// topic's `idempotencyWindow`, is not delivered again and answers the first message's id.
    pub idempotency_key: Option<String>,
}

impl Message {
    /// A message carrying `payload`, with a fresh id.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Message { attempt: 0, ..Message::received(uuid::Uuid::now_v7().to_string(), payload, Utc::now()) }
    }

    /// A message read from a broker, with the id and publish time it carries, attempt 1 (no
    /// fresh id is made: a consumer reads the one it was published with).
    pub fn received(id: String, payload: impl Into<Bytes>, published_at: DateTime<Utc>) -> Self {
        Message {
            id,
            payload: payload.into(),
            headers: BTreeMap::new(),
            key: None,
            content_type: None,
            published_at,
            attempt: 1,
            delay: None,
            idempotency_key: None,
        }
    }

    /// A `text/plain` message.
    pub fn text(text: impl Into<String>) -> Self {
        Message::new(text.into()).content_type("text/plain")
    }

    /// An `application/json` message serialized from `value`.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Self, serde_json::Error> {
        Ok(Message::new(serde_json::to_vec(value)?).content_type("application/json"))
    }

    /// Sets the ordering / partition key.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Sets the content type.
    pub fn content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = Some(content_type.into());
        self
    }

    /// Sets the id (for idempotent publishing).
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    /// Delays delivery by `delay`.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay).filter(|d| !d.is_zero());
        self
    }

    /// Publishes this message at most once per `key` within the topic's idempotency window.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// The payload as UTF-8 text, when it is.
    pub fn payload_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.payload).ok()
    }

    /// The payload parsed as JSON.
    pub fn payload_json<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.payload)
    }
}

/// Longest idempotency key, in characters.
pub const MAX_IDEMPOTENCY_KEY_CHARS: usize = 200;

/// Checks an idempotency key: 1 to [`MAX_IDEMPOTENCY_KEY_CHARS`] characters, not blank, no
/// control characters.
pub fn check_idempotency_key(key: &str) -> Result<(), ValidationError> {
    let invalid = |why: String| ValidationError::field("idempotencyKey", why);
    if key.trim().is_empty() {
        return Err(invalid("must not be empty or blank".into()));
    }
    let chars = key.chars().count();
    if chars > MAX_IDEMPOTENCY_KEY_CHARS {
        return Err(invalid(format!("{chars} characters; at most {MAX_IDEMPOTENCY_KEY_CHARS} are allowed")));
    }
    if let Some(c) = key.chars().find(|c| c.is_control()) {
        return Err(invalid(format!("holds the control character U+{:04X}", c as u32)));
    }
    Ok(())
}

/// A point in time, UTC.
pub type Timestamp = DateTime<Utc>;

/// The current time.
pub fn now() -> Timestamp {
    Utc::now()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_received_message_keeps_the_id_and_time_it_carries() {
        let at = DateTime::from_timestamp_millis(1_700_000_000_123).expect("a valid time");
        let message = Message::received("m-7".to_owned(), "hi", at);
        assert_eq!((message.id.as_str(), message.published_at, message.attempt), ("m-7", at, 1));
        assert_eq!(message.payload, Bytes::from_static(b"hi"));
        assert!(message.headers.is_empty() && message.key.is_none() && message.content_type.is_none());
    }
}
