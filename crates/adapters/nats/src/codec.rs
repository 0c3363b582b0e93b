//! A polybus [`Message`] as a NATS message: payload as is, everything else as NATS headers.

use std::str::FromStr;

use async_nats::header::{HeaderMap, HeaderName, HeaderValue};
use chrono::{DateTime, Utc};
use polybus_core::{Message, wire};

/// JetStream's de-duplication header.
pub const MSG_ID: &str = "Nats-Msg-Id";
/// When a delayed message is due, RFC 3339 with milliseconds (only on the delayed stream).
pub const DELIVER_AT: &str = "polybus-deliver-at";

/// Headers polybus writes for message attributes; not user headers when read back.
const RESERVED: [&str; 5] = [wire::ID, wire::KEY, wire::CONTENT_TYPE, wire::PUBLISHED_AT, DELIVER_AT];

/// The NATS headers for `message`: its user headers, then id, key, content type and publish
/// time under the `polybus-*` names, and `Nats-Msg-Id` for JetStream's duplicate window.
pub fn encode(message: &Message) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::new();
    for (name, value) in &message.headers {
        if RESERVED.contains(&name.as_str()) || name.eq_ignore_ascii_case(MSG_ID) {
            return Err(format!("header `{name}` is reserved by polybus"));
        }
        insert(&mut headers, name, value)?;
    }
    insert(&mut headers, wire::ID, &message.id)?;
    insert(&mut headers, MSG_ID, &dedup_id(message))?;
    if let Some(key) = &message.key {
        insert(&mut headers, wire::KEY, key)?;
    }
    if let Some(content_type) = &message.content_type {
        insert(&mut headers, wire::CONTENT_TYPE, content_type)?;
    }
    insert(&mut headers, wire::PUBLISHED_AT, &wire::format_time(message.published_at))?;
    Ok(headers)
}

/// The id JetStream deduplicates on. A dead-lettered copy is a distinct message per group:
/// two groups giving up on one message must leave two dead letters.
fn dedup_id(message: &Message) -> String {
    match message.headers.get(wire::DEAD_LETTER_GROUP) {
        Some(group) => format!("{}:dead-letter:{group}", message.id),
        None => message.id.clone(),
    }
}

fn insert(headers: &mut HeaderMap, name: &str, value: &str) -> Result<(), String> {
    let header = HeaderName::from_str(name).map_err(|e| format!("header `{name}`: {e}"))?;
    let value = HeaderValue::from_str(value).map_err(|e| format!("header `{name}`: {e}"))?;
    headers.insert(header, value);
    Ok(())
}

/// What the broker says about a delivery, beyond its headers.
pub struct Delivered<'a> {
    /// Stream the message is in.
    pub stream: &'a str,
    /// Its sequence in that stream.
    pub sequence: u64,
    /// When the stream stored it.
    pub stored_at: DateTime<Utc>,
    /// Deliveries so far to this consumer, this one included.
    pub attempt: u32,
}

/// Reads a delivered NATS message back into a polybus [`Message`]. Messages published by
/// other clients get their attributes from JetStream: `Nats-Msg-Id` (or stream and sequence)
/// as id, the stream's timestamp as publish time.
pub fn decode(headers: Option<&HeaderMap>, payload: bytes::Bytes, delivered: Delivered<'_>) -> Message {
    let get = |name: &str| headers.and_then(|h| h.get(name)).map(|v| v.as_str().to_owned());
    let id = get(wire::ID)
        .or_else(|| get(MSG_ID))
        .unwrap_or_else(|| format!("{}:{}", delivered.stream, delivered.sequence));
    let published_at =
        get(wire::PUBLISHED_AT).and_then(|t| wire::parse_time(&t)).unwrap_or(delivered.stored_at);
    let mut message = Message::received(id, payload, published_at);
    message.key = get(wire::KEY);
    message.content_type = get(wire::CONTENT_TYPE);
    message.attempt = delivered.attempt;
    let ours = headers.is_some_and(|h| h.get(wire::ID).is_some());
    for (name, values) in headers.into_iter().flat_map(HeaderMap::iter) {
        let name: &str = name.as_ref();
        if RESERVED.contains(&name) || (ours && name == MSG_ID) {
            continue;
        }
        if let Some(value) = values.first() {
            message.headers.insert(name.to_owned(), value.as_str().to_owned());
        }
    }
    message
}

/// When a message on the delayed stream is due; `None` when it carries no valid time.
pub fn deliver_at(headers: Option<&HeaderMap>) -> Option<DateTime<Utc>> {
    headers.and_then(|h| h.get(DELIVER_AT)).and_then(|v| wire::parse_time(v.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivered() -> Delivered<'static> {
        Delivered { stream: "orders", sequence: 7, stored_at: Utc::now(), attempt: 2 }
    }

    #[test]
    fn attributes_and_headers_round_trip() {
        let sent = Message::text("hi").key("customer-42").header("traceparent", "00-ab-cd-01").id("m-1");
        let headers = encode(&sent).unwrap();
        assert_eq!(headers.get("Nats-Msg-Id").unwrap().as_str(), "m-1");
        let got = decode(Some(&headers), sent.payload.clone(), delivered());
        assert_eq!(got.id, "m-1");
        assert_eq!(got.key.as_deref(), Some("customer-42"));
        assert_eq!(got.content_type.as_deref(), Some("text/plain"));
        assert_eq!(wire::format_time(got.published_at), wire::format_time(sent.published_at));
        assert_eq!(got.headers, sent.headers);
        assert_eq!(got.attempt, 2);
    }

    #[test]
    fn native_messages_get_ids_from_jetstream() {
        let got = decode(None, "x".into(), delivered());
        assert_eq!(got.id, "orders:7");
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", "n-1");
        let got = decode(Some(&headers), "x".into(), delivered());
        assert_eq!(
            (got.id.as_str(), got.headers.get("Nats-Msg-Id").map(String::as_str)),
            ("n-1", Some("n-1"))
        );
    }

    #[test]
    fn dead_letters_of_different_groups_are_not_duplicates() {
        let a = Message::text("x").id("m").header(wire::DEAD_LETTER_GROUP, "a");
        let b = a.clone().header(wire::DEAD_LETTER_GROUP, "b");
        assert_ne!(dedup_id(&a), dedup_id(&b));
    }

    #[test]
    fn headers_nats_cannot_carry_are_refused() {
        assert!(encode(&Message::text("x").header("bad name", "v")).is_err());
        assert!(encode(&Message::text("x").header("h", "line\nbreak")).is_err());
        assert!(encode(&Message::text("x").header(wire::ID, "spoof")).is_err());
    }
}
