//! A polybus [`Message`] as AMQP properties and headers, and back.
//!
//! Id → `message_id`, content type → `content_type`, publish time → `timestamp` (seconds) and the
//! `polybus-published-at` header (milliseconds), key → the `polybus-key` header, headers → AMQP
//! headers (long strings), persistent delivery mode. Values too long for an AMQP short string
//! travel in the `polybus-id` / `polybus-content-type` headers instead.

use std::collections::BTreeMap;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use polybus_core::{Message, wire};

/// Header carrying a delayed copy's delay, matched by the delay exchange's bindings.
pub(crate) const DELAY_MS: &str = "polybus-delay-ms";
/// Header naming the exchange a delayed copy goes to when its delay is over (`""`: default).
pub(crate) const DELAY_TARGET: &str = "polybus-delay-target";
/// Header quorum queues set on redeliveries.
const DELIVERY_COUNT: &str = "x-delivery-count";
/// Persistent delivery mode.
const PERSISTENT: u8 = 2;

/// AMQP properties for a message published through polybus.
pub(crate) fn properties(message: &Message) -> Result<BasicProperties, String> {
    let mut headers = FieldTable::default();
    for (name, value) in &message.headers {
        headers.insert(short(name, "header name")?, long(value));
    }
    if let Some(key) = &message.key {
        headers.insert(wire::KEY.into(), long(key));
    }
    headers.insert(wire::PUBLISHED_AT.into(), long(&wire::format_time(message.published_at)));
    let mut props = BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_timestamp(u64::try_from(message.published_at.timestamp()).unwrap_or(0));
    match ShortString::try_new(message.id.as_str()) {
        Ok(id) => props = props.with_message_id(id),
        Err(_) => {
            headers.insert(wire::ID.into(), long(&message.id));
        }
    }
    if let Some(content_type) = &message.content_type {
        match ShortString::try_new(content_type.as_str()) {
            Ok(ct) => props = props.with_content_type(ct),
            Err(_) => {
                headers.insert(wire::CONTENT_TYPE.into(), long(content_type));
            }
        }
    }
    Ok(props.with_headers(headers))
}

/// `props` for a copy republished by the adapter: broker bookkeeping removed, `attempt` carried
/// in `polybus-attempt`, and the delay headers routing it through a delay queue.
pub(crate) fn republished(
    props: &BasicProperties,
    attempt: u32,
    delay_ms: u64,
    target_exchange: &str,
) -> BasicProperties {
    let mut headers = FieldTable::default();
    if let Some(existing) = props.headers() {
        for (name, value) in existing.inner() {
            if !is_bookkeeping(name.as_str()) && name.as_str() != wire::ATTEMPT {
                headers.insert(name.clone(), value.clone());
            }
        }
    }
    headers.insert(wire::ATTEMPT.into(), long(&attempt.to_string()));
    delay_headers(&mut headers, delay_ms, target_exchange);
    props.clone().with_headers(headers).with_delivery_mode(PERSISTENT)
}

/// Adds the headers the delay exchange routes on.
pub(crate) fn delay_headers(headers: &mut FieldTable, delay_ms: u64, target_exchange: &str) {
    headers.insert(DELAY_MS.into(), long(&delay_ms.to_string()));
    headers.insert(DELAY_TARGET.into(), long(target_exchange));
}

/// The message of a delivery, with its attempt number.
pub(crate) fn message(props: &BasicProperties, payload: Bytes, redelivered: bool) -> Message {
    let mut headers = BTreeMap::new();
    let (mut key, mut published_at, mut id, mut content_type) = (None, None, None, None);
    let (mut base_attempt, mut delivery_count) = (None, None);
    if let Some(table) = props.headers() {
        for (name, value) in table.inner() {
            match name.as_str() {
                wire::KEY => key = text(value),
                wire::PUBLISHED_AT => published_at = text(value).and_then(|t| wire::parse_time(&t)),
                wire::ID => id = text(value),
                wire::CONTENT_TYPE => content_type = text(value),
                wire::ATTEMPT => base_attempt = number(value),
                DELIVERY_COUNT => delivery_count = number(value),
                name if is_bookkeeping(name) => {}
                name => {
                    if let Some(value) = text(value) {
                        headers.insert(name.to_owned(), value);
                    }
                }
            }
        }
    }
    let published_at = published_at
        .or_else(|| props.timestamp().and_then(|t| DateTime::<Utc>::from_timestamp(t as i64, 0)))
        .unwrap_or_else(Utc::now);
    // Quorum queues count returns in `x-delivery-count`; other queues only flag a redelivery.
    let redeliveries = delivery_count.unwrap_or(0).max(u32::from(redelivered));
    Message {
        id: props
            .message_id()
            .as_ref()
            .map(|id| id.to_string())
            .or(id)
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
        payload,
        headers,
        key,
        content_type: props.content_type().as_ref().map(|ct| ct.to_string()).or(content_type),
        published_at,
        attempt: base_attempt.unwrap_or(1).max(1).saturating_add(redeliveries),
        delay: None,
        idempotency_key: None,
    }
}

/// Headers the broker or the adapter's delay routing add, not part of the message.
fn is_bookkeeping(name: &str) -> bool {
    matches!(name, DELAY_MS | DELAY_TARGET | DELIVERY_COUNT | "x-death")
        || name.starts_with("x-first-death-")
        || name.starts_with("x-last-death-")
}

pub(crate) fn short(value: &str, what: &str) -> Result<ShortString, String> {
    ShortString::try_new(value).map_err(|_| format!("{what} longer than 255 bytes: `{value:.40}…`"))
}

pub(crate) fn long(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

/// A header value as text; tables, arrays and byte arrays are not headers polybus can carry.
fn text(value: &AMQPValue) -> Option<String> {
    Some(match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Float(n) => n.to_string(),
        AMQPValue::Double(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        _ => return None,
    })
}

fn number(value: &AMQPValue) -> Option<u32> {
    text(value)?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_survives_the_round_trip() {
        let sent = Message::text("hello").key("k-1").header("traceparent", "00-abc").id("id-1");
        let props = properties(&sent).unwrap();
        assert_eq!(props.message_id().as_ref().map(|s| s.as_str()), Some("id-1"));
        assert_eq!(props.delivery_mode(), &Some(PERSISTENT));
        let got = message(&props, sent.payload.clone(), false);
        assert_eq!(got.id, "id-1");
        assert_eq!(got.key.as_deref(), Some("k-1"));
        assert_eq!(got.content_type.as_deref(), Some("text/plain"));
        assert_eq!(got.headers, sent.headers);
        assert_eq!(wire::format_time(got.published_at), wire::format_time(sent.published_at));
        assert_eq!(got.attempt, 1);
    }

    #[test]
    fn attempt_counts_redeliveries_and_republished_copies() {
        let props = properties(&Message::new("x")).unwrap();
        assert_eq!(message(&props, Bytes::new(), true).attempt, 2);
        let mut headers = props.headers().clone().unwrap_or_default();
        headers.insert(DELIVERY_COUNT.into(), AMQPValue::LongLongInt(3));
        assert_eq!(message(&props.clone().with_headers(headers), Bytes::new(), true).attempt, 4);
        let copy = republished(&props, 3, 500, "");
        let got = message(&copy, Bytes::new(), false);
        assert_eq!(got.attempt, 3);
        assert!(got.headers.is_empty(), "{:?}", got.headers);
    }

    #[test]
    fn long_ids_travel_as_headers() {
        let id = "i".repeat(300);
        let props = properties(&Message::new("x").id(id.clone())).unwrap();
        assert!(props.message_id().is_none());
        assert_eq!(message(&props, Bytes::new(), false).id, id);
    }
}
