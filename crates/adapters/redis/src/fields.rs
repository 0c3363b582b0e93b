//! A message as stream entry fields, and back.
//!
//! Field names are plain so a native client reads them; an entry written by a native client
//! is read sensibly: a missing `id` becomes the entry id, a missing `published-at` the entry
//! id's time, and without a `payload` field the payload is a JSON object of the entry's fields.

use std::collections::BTreeMap;

use bytes::Bytes;
use chrono::{TimeZone, Utc};
use polybus_core::{Message, wire};

/// Field holding the payload bytes, unchanged.
pub const PAYLOAD: &str = "payload";
/// Field holding the message id.
pub const ID: &str = "id";
/// Field holding the ordering key.
pub const KEY: &str = "key";
/// Field holding the content type.
pub const CONTENT_TYPE: &str = "content-type";
/// Field holding the publish time, RFC 3339 with milliseconds.
pub const PUBLISHED_AT: &str = "published-at";
/// Prefix of one field per header: header `trace` is field `h:trace`.
pub const HEADER_PREFIX: &str = "h:";

/// Field name / value pairs, in stream order.
pub(crate) type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// Calls `field` with each name and value `message` is stored as, in stream order (its
/// `attempt` and `delay` are not stored).
pub(crate) fn each(message: &Message, mut field: impl FnMut(&[u8], &[u8])) {
    field(PAYLOAD.as_bytes(), &message.payload);
    field(ID.as_bytes(), message.id.as_bytes());
    if let Some(key) = &message.key {
        field(KEY.as_bytes(), key.as_bytes());
    }
    if let Some(content_type) = &message.content_type {
        field(CONTENT_TYPE.as_bytes(), content_type.as_bytes());
    }
    field(PUBLISHED_AT.as_bytes(), wire::format_time(message.published_at).as_bytes());
    for (name, value) in &message.headers {
        field(format!("{HEADER_PREFIX}{name}").as_bytes(), value.as_bytes());
    }
}

/// The fields `message` is stored as.
#[cfg(test)]
fn encode(message: &Message) -> Fields {
    let mut fields = Fields::new();
    each(message, |name, value| fields.push((name.to_vec(), value.to_vec())));
    fields
}

/// The message stored as entry `entry_id` with `fields`, delivered for the `attempt`th time.
///
/// Fields with other names become headers when there is a `payload` field, and the payload
/// (a JSON object of strings) when there is none.
pub(crate) fn decode(entry_id: &str, fields: Fields, attempt: u32) -> Message {
    let mut payload = None;
    let mut id = None;
    let mut key = None;
    let mut content_type = None;
    let mut published_at = None;
    let mut headers = BTreeMap::new();
    let mut others = Vec::new();
    for (name, value) in fields {
        match name.as_slice() {
            n if n == PAYLOAD.as_bytes() => payload = Some(Bytes::from(value)),
            n if n == ID.as_bytes() => id = Some(lossy(value)),
            n if n == KEY.as_bytes() => key = Some(lossy(value)),
            n if n == CONTENT_TYPE.as_bytes() => content_type = Some(lossy(value)),
            n if n == PUBLISHED_AT.as_bytes() => published_at = wire::parse_time(&lossy(value)),
            n if n.starts_with(HEADER_PREFIX.as_bytes()) => {
                headers.insert(lossy(n[HEADER_PREFIX.len()..].to_vec()), lossy(value));
            }
            _ => others.push((lossy(name), lossy(value))),
        }
    }
    let payload = match payload {
        Some(payload) => {
            headers.extend(others);
            payload
        }
        None => {
            let object: serde_json::Map<String, serde_json::Value> =
                others.into_iter().map(|(k, v)| (k, serde_json::Value::String(v))).collect();
            content_type.get_or_insert_with(|| "application/json".to_owned());
            Bytes::from(serde_json::Value::Object(object).to_string())
        }
    };
    Message {
        id: id.filter(|id| !id.is_empty()).unwrap_or_else(|| entry_id.to_owned()),
        payload,
        headers,
        key,
        content_type,
        published_at: published_at.or_else(|| entry_time(entry_id)).unwrap_or_else(Utc::now),
        attempt,
        delay: None,
        idempotency_key: None,
    }
}

fn lossy(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// The time in a stream entry id (`<ms>-<seq>`).
fn entry_time(entry_id: &str) -> Option<chrono::DateTime<Utc>> {
    let ms = entry_id.split('-').next()?.parse::<i64>().ok()?;
    Utc.timestamp_millis_opt(ms).single()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(items: &[(&str, &[u8])]) -> Fields {
        items.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.to_vec())).collect()
    }

    #[test]
    fn a_message_round_trips_through_its_fields() {
        let sent = Message::new(vec![0u8, 159, 146, 150, 255])
            .key("customer-42")
            .content_type("application/octet-stream")
            .header("traceparent", "00-abc-def-01")
            .header("h:odd", "x");
        let got = decode("1700000000000-0", encode(&sent), 3);
        assert_eq!(got.id, sent.id);
        assert_eq!(got.payload, sent.payload);
        assert_eq!(got.headers, sent.headers);
        assert_eq!(got.key, sent.key);
        assert_eq!(got.content_type, sent.content_type);
        assert_eq!(got.published_at.timestamp_millis(), sent.published_at.timestamp_millis());
        assert_eq!(got.attempt, 3);
    }

    #[test]
    fn a_native_entry_gets_the_entry_id_and_time_and_extra_fields_as_headers() {
        let got = decode("1700000000123-4", pairs(&[("payload", b"hi"), ("source", b"cli")]), 1);
        assert_eq!(got.id, "1700000000123-4");
        assert_eq!(got.payload_str(), Some("hi"));
        assert_eq!(got.headers.get("source").map(String::as_str), Some("cli"));
        assert_eq!(got.published_at.timestamp_millis(), 1_700_000_000_123);
    }

    #[test]
    fn a_native_entry_without_payload_becomes_a_json_object() {
        let got = decode("1-0", pairs(&[("order", b"42"), ("amount", b"9.5")]), 1);
        assert_eq!(got.content_type.as_deref(), Some("application/json"));
        let value: serde_json::Value = got.payload_json().expect("json payload");
        assert_eq!(value, serde_json::json!({"order": "42", "amount": "9.5"}));
        assert!(got.headers.is_empty());
    }
}
