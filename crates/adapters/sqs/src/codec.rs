//! A polybus message as an SQS message body and message attributes, and back.
//!
//! The body is the payload when it is non-empty text SQS accepts, else its base64 with the
//! attribute `polybus-encoding: base64` (`empty` for an empty payload, whose body is `empty`:
//! SQS refuses empty bodies). Id, key, content type and publish time travel as the String
//! attributes `polybus-id`, `polybus-key`, `polybus-content-type`, `polybus-published-at`;
//! user headers as String attributes of their own name, or all together as one JSON object in
//! `polybus-headers` when they would not fit SQS's 10 attributes or are not valid attributes.

use std::collections::{BTreeMap, HashMap};

use aws_sdk_sqs::types::{MessageAttributeValue, MessageSystemAttributeName};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use polybus_core::{Message, wire};

/// Attribute naming how the body encodes the payload (`base64` or `empty`); absent for text.
pub const ENCODING: &str = "polybus-encoding";
/// Attribute holding the user headers as one JSON object, when they are packed.
pub const HEADERS: &str = "polybus-headers";
/// Most message attributes SQS takes on one message.
pub const MAX_ATTRIBUTES: usize = 10;
/// Largest message SQS takes: body plus attribute names, types and values.
pub const MAX_MESSAGE_BYTES: usize = 262_144;
/// Room kept for attributes when declaring the largest payload.
pub const ATTRIBUTE_ROOM: usize = 8 * 1024;
/// Largest payload that always fits, even base64-encoded, with up to [`ATTRIBUTE_ROOM`] of attributes.
pub const MAX_PAYLOAD_BYTES: usize = (MAX_MESSAGE_BYTES - ATTRIBUTE_ROOM) / 4 * 3;

const BASE64: &str = "base64";
const EMPTY: &str = "empty";
const STRING: &str = "String";
/// Attributes polybus writes itself; user headers of these names are packed.
const RESERVED: [&str; 6] = [wire::ID, wire::KEY, wire::CONTENT_TYPE, wire::PUBLISHED_AT, ENCODING, HEADERS];

/// A message ready to send.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// The message body.
    pub body: String,
    /// String attributes by name.
    pub attributes: Vec<(String, String)>,
}

impl Encoded {
    /// Size as SQS counts it against its limit.
    pub fn size(&self) -> usize {
        self.body.len() + self.attributes.iter().map(|(n, v)| n.len() + STRING.len() + v.len()).sum::<usize>()
    }

    /// The attributes as the SDK wants them.
    pub fn sdk_attributes(&self) -> HashMap<String, MessageAttributeValue> {
        self.attributes
            .iter()
            .map(|(name, value)| {
                let value = MessageAttributeValue::builder().data_type(STRING).string_value(value).build();
                // `data_type` is the only required field and is always set.
                (name.clone(), value.expect("data type is set"))
            })
            .collect()
    }
}

/// Encodes `message`; `Err` names a field SQS cannot carry.
pub fn encode(message: &Message) -> Result<Encoded, String> {
    let mut attributes = vec![
        (wire::ID.to_owned(), message.id.clone()),
        (wire::PUBLISHED_AT.to_owned(), wire::format_time(message.published_at)),
    ];
    if let Some(key) = &message.key {
        attributes.push((wire::KEY.to_owned(), key.clone()));
    }
    if let Some(content_type) = &message.content_type {
        attributes.push((wire::CONTENT_TYPE.to_owned(), content_type.clone()));
    }
    for (name, value) in &attributes {
        if !valid_value(value) {
            return Err(format!(
                "{name} {value:?} cannot be an SQS attribute (it must be non-empty text without control characters)"
            ));
        }
    }
    let body = match std::str::from_utf8(&message.payload) {
        Ok(text) if !text.is_empty() && text.chars().all(valid_char) => text.to_owned(),
        _ if message.payload.is_empty() => {
            attributes.push((ENCODING.to_owned(), EMPTY.to_owned()));
            EMPTY.to_owned()
        }
        _ => {
            attributes.push((ENCODING.to_owned(), BASE64.to_owned()));
            STANDARD.encode(&message.payload)
        }
    };
    let one_each = attributes.len() + message.headers.len() <= MAX_ATTRIBUTES
        && message.headers.iter().all(|(name, value)| valid_name(name) && valid_value(value));
    if one_each {
        attributes.extend(message.headers.iter().map(|(n, v)| (n.clone(), v.clone())));
    } else {
        let packed = serde_json::to_string(&message.headers).map_err(|e| format!("packing headers: {e}"))?;
        attributes.push((HEADERS.to_owned(), packed));
    }
    Ok(Encoded { body, attributes })
}

/// Decodes a received message (one sent by another client gets SQS's message id).
pub fn decode(received: &aws_sdk_sqs::types::Message) -> Message {
    let attributes = received.message_attributes();
    let text = |name: &str| attributes.and_then(|a| a.get(name)).and_then(|v| v.string_value());
    let system = |name: MessageSystemAttributeName| received.attributes().and_then(|a| a.get(&name));
    let body = received.body().unwrap_or_default();

    let payload = match text(ENCODING) {
        Some(BASE64) => match STANDARD.decode(body) {
            Ok(bytes) => Bytes::from(bytes),
            Err(e) => {
                tracing::warn!(sqs_id = received.message_id(), error = %e, "body marked base64 is not; delivering it as it is");
                Bytes::copy_from_slice(body.as_bytes())
            }
        },
        Some(EMPTY) => Bytes::new(),
        _ => Bytes::copy_from_slice(body.as_bytes()),
    };
    let mut headers = BTreeMap::new();
    if let Some(packed) = text(HEADERS) {
        match serde_json::from_str::<BTreeMap<String, String>>(packed) {
            Ok(packed) => headers.extend(packed),
            Err(e) => {
                tracing::warn!(sqs_id = received.message_id(), error = %e, "{HEADERS} is not a JSON object of strings")
            }
        }
    }
    for (name, value) in attributes.into_iter().flatten() {
        if RESERVED.contains(&name.as_str()) {
            continue;
        }
        let value = match (value.string_value(), value.binary_value()) {
            (Some(s), _) => s.to_owned(),
            (None, Some(blob)) => STANDARD.encode(blob.as_ref()),
            (None, None) => continue,
        };
        headers.insert(name.clone(), value);
    }
    let published_at = text(wire::PUBLISHED_AT)
        .and_then(wire::parse_time)
        .or_else(|| {
            system(MessageSystemAttributeName::SentTimestamp)
                .and_then(|ms| ms.parse().ok())
                .and_then(chrono::DateTime::from_timestamp_millis)
        })
        .unwrap_or_else(polybus_core::message::now);
    let key = text(wire::KEY)
        .map(str::to_owned)
        .or_else(|| system(MessageSystemAttributeName::MessageGroupId).cloned());
    Message {
        id: text(wire::ID).or(received.message_id()).unwrap_or_default().to_owned(),
        payload,
        headers,
        key,
        content_type: text(wire::CONTENT_TYPE).map(str::to_owned),
        published_at,
        attempt: system(MessageSystemAttributeName::ApproximateReceiveCount)
            .and_then(|n| n.parse().ok())
            .unwrap_or(1),
        delay: None,
        idempotency_key: None,
    }
}

/// Characters SQS accepts in bodies and String attributes.
fn valid_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r') || (c >= ' ' && c != '\u{FFFE}' && c != '\u{FFFF}')
}

fn valid_value(value: &str) -> bool {
    !value.is_empty() && value.chars().all(valid_char)
}

/// Attribute names SQS accepts and polybus does not use itself.
fn valid_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    (1..=256).contains(&name.len())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.')
        && !name.ends_with('.')
        && !name.contains("..")
        && !lower.starts_with("aws.")
        && !lower.starts_with("amazon.")
        && !RESERVED.contains(&name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_sqs::types::Message as SqsMessage;

    fn received(encoded: &Encoded, receive_count: u32) -> SqsMessage {
        let mut builder = SqsMessage::builder()
            .message_id("sqs-1")
            .body(&encoded.body)
            .attributes(MessageSystemAttributeName::ApproximateReceiveCount, receive_count.to_string());
        for (name, value) in encoded.sdk_attributes() {
            builder = builder.message_attributes(name, value);
        }
        builder.build()
    }

    #[test]
    fn text_travels_as_it_is_with_one_attribute_per_header() {
        let mut message = Message::text("hello ✓").key("k-1").header("traceparent", "00-ab-cd-01");
        // The wire keeps milliseconds.
        message.published_at = wire::parse_time("2026-11-01T12:00:00.123Z").unwrap();
        let encoded = encode(&message).unwrap();
        assert_eq!(encoded.body, "hello ✓");
        assert!(encoded.attributes.contains(&("traceparent".into(), "00-ab-cd-01".into())));
        assert!(!encoded.attributes.iter().any(|(n, _)| n == ENCODING || n == HEADERS));
        let back = decode(&received(&encoded, 2));
        assert_eq!(back.attempt, 2);
        assert_eq!(Message { attempt: 0, ..back }, message);
    }

    #[test]
    fn binary_and_empty_payloads_are_encoded() {
        let binary = Message::new((0..=255u8).collect::<Vec<_>>());
        let encoded = encode(&binary).unwrap();
        assert!(encoded.attributes.contains(&(ENCODING.into(), "base64".into())));
        assert_eq!(decode(&received(&encoded, 1)).payload, binary.payload);

        let empty = Message::new(Vec::new());
        let encoded = encode(&empty).unwrap();
        assert_eq!((encoded.body.as_str(), decode(&received(&encoded, 1)).payload.len()), ("empty", 0));
        assert!(encode(&Message::text("a\u{0}b")).unwrap().attributes.iter().any(|(n, _)| n == ENCODING));
    }

    #[test]
    fn headers_are_packed_when_they_do_not_fit() {
        let mut many = Message::new("x");
        for i in 0..9 {
            many = many.header(format!("h{i}"), format!("v{i}"));
        }
        let odd = Message::new("x").header("with space", "v").header("empty", "").header(wire::KEY, "mine");
        for message in [many, odd] {
            let encoded = encode(&message).unwrap();
            assert!(encoded.attributes.len() <= MAX_ATTRIBUTES);
            assert!(encoded.attributes.iter().any(|(n, _)| n == HEADERS));
            let back = decode(&received(&encoded, 1));
            assert_eq!((back.headers, back.key), (message.headers, None));
        }
    }

    #[test]
    fn fields_sqs_cannot_carry_are_refused() {
        assert!(encode(&Message::new("x").key("")).unwrap_err().contains(wire::KEY));
    }

    #[test]
    fn native_messages_get_sqs_id_and_attributes_as_headers() {
        let native = SqsMessage::builder()
            .message_id("sqs-9")
            .body("{}")
            .message_attributes(
                "origin",
                MessageAttributeValue::builder().data_type("String").string_value("boto").build().unwrap(),
            )
            .attributes(MessageSystemAttributeName::SentTimestamp, "1700000000000")
            .build();
        let message = decode(&native);
        assert_eq!((message.id.as_str(), message.attempt), ("sqs-9", 1));
        assert_eq!(message.headers.get("origin").map(String::as_str), Some("boto"));
        assert_eq!(message.published_at.timestamp_millis(), 1_700_000_000_000);
    }

    #[test]
    fn declared_payload_limit_fits_base64() {
        let message = Message::new(vec![0xffu8; MAX_PAYLOAD_BYTES]).content_type("application/octet-stream");
        assert!(encode(&message).unwrap().size() <= MAX_MESSAGE_BYTES);
    }
}
