//! A polybus [`Message`] as a Kafka record and back.
//!
//! Payload, key, headers and timestamp are Kafka's own; the message's id, content type and
//! publish time travel as the headers of [`polybus_core::wire`]; retry copies add
//! `polybus-attempt` and [`NOT_BEFORE`]. A record from another client (no `polybus-id`) gets
//! the id `<topic>-<partition>-<offset>`, the same on every delivery.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use polybus_core::{Message, wire};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message as _, OwnedHeaders};

/// Header holding the earliest time a record may be handed out (RFC 3339, milliseconds).
pub const NOT_BEFORE: &str = "polybus-not-before";

/// Headers polybus sets itself; they are not part of the message's own headers.
const RESERVED: [&str; 5] = [wire::ID, wire::CONTENT_TYPE, wire::PUBLISHED_AT, wire::ATTEMPT, NOT_BEFORE];

/// Key, payload and timestamp of a record to produce (its headers travel beside it).
pub(crate) struct Record {
    pub key: Option<String>,
    pub payload: bytes::Bytes,
    pub timestamp: i64,
}

/// The record for `message`; `attempt` above 1 and `not_before` are written for retry copies.
pub(crate) fn encode(
    message: &Message,
    attempt: u32,
    not_before: Option<DateTime<Utc>>,
) -> (Record, OwnedHeaders) {
    let mut headers = OwnedHeaders::new_with_capacity(message.headers.len() + 5);
    for (name, value) in &message.headers {
        if !RESERVED.contains(&name.as_str()) {
            headers = headers.insert(Header { key: name, value: Some(value.as_str()) });
        }
    }
    headers = headers.insert(Header { key: wire::ID, value: Some(message.id.as_str()) });
    if let Some(content_type) = &message.content_type {
        headers = headers.insert(Header { key: wire::CONTENT_TYPE, value: Some(content_type.as_str()) });
    }
    let published_at = wire::format_time(message.published_at);
    headers = headers.insert(Header { key: wire::PUBLISHED_AT, value: Some(published_at.as_str()) });
    if attempt > 1 {
        headers = headers.insert(Header { key: wire::ATTEMPT, value: Some(attempt.to_string().as_str()) });
    }
    if let Some(at) = not_before {
        headers = headers.insert(Header { key: NOT_BEFORE, value: Some(wire::format_time(at).as_str()) });
    }
    let record = Record {
        key: message.key.clone(),
        payload: message.payload.clone(),
        timestamp: message.published_at.timestamp_millis(),
    };
    (record, headers)
}

/// A fetched record as a message.
#[derive(Debug, Clone)]
pub(crate) struct Decoded {
    /// The message; its attempt is the one the record asks for (1 unless a retry copy).
    pub message: Message,
    /// Not to be handed out before this time.
    pub not_before: Option<DateTime<Utc>>,
}

/// Reads a fetched record.
pub(crate) fn decode(record: &BorrowedMessage<'_>) -> Decoded {
    let mut id = None;
    let mut content_type = None;
    let mut published_at = None;
    let mut attempt = None;
    let mut not_before = None;
    let mut others = BTreeMap::new();
    if let Some(headers) = record.headers() {
        for header in headers.iter() {
            let value = header.value.map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default();
            match header.key {
                wire::ID => id = Some(value),
                wire::CONTENT_TYPE => content_type = Some(value),
                wire::PUBLISHED_AT => published_at = wire::parse_time(&value),
                wire::ATTEMPT => attempt = value.parse::<u32>().ok(),
                NOT_BEFORE => not_before = wire::parse_time(&value),
                name => {
                    others.insert(name.to_owned(), value);
                }
            }
        }
    }
    let id = id.unwrap_or_else(|| format!("{}-{}-{}", record.topic(), record.partition(), record.offset()));
    let published_at = published_at
        .or_else(|| record.timestamp().to_millis().and_then(DateTime::from_timestamp_millis))
        .unwrap_or_else(Utc::now);
    let payload = record.payload().map(bytes::Bytes::copy_from_slice).unwrap_or_default();
    let mut message = Message::received(id, payload, published_at);
    message.key = record.key().map(|k| String::from_utf8_lossy(k).into_owned());
    message.content_type = content_type;
    message.headers = others;
    message.attempt = attempt.unwrap_or(1).max(1);
    Decoded { message, not_before }
}
