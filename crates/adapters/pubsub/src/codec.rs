//! polybus `Message` ⇄ Pub/Sub message.
//!
//! Headers are attributes as they are; the key is the ordering key; id, content type and
//! publish time travel as the attributes `polybus-id`, `polybus-content-type` and
//! `polybus-published-at`. A message from another client has its Pub/Sub message id as id
//! and Pub/Sub's publish time.

use std::collections::HashMap;

use bytes::Bytes;
use google_cloud_pubsub::model::Message as PubsubMessage;
use polybus_core::{Message, wire};

/// The Pub/Sub message that carries `message`.
pub fn encode(message: &Message) -> PubsubMessage {
    let mut attributes: HashMap<String, String> =
        message.headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    attributes.insert(wire::ID.into(), message.id.clone());
    attributes.insert(wire::PUBLISHED_AT.into(), wire::format_time(message.published_at));
    if let Some(content_type) = &message.content_type {
        attributes.insert(wire::CONTENT_TYPE.into(), content_type.clone());
    }
    let encoded = PubsubMessage::new().set_data(message.payload.clone()).set_attributes(attributes);
    match &message.key {
        Some(key) => encoded.set_ordering_key(key.clone()),
        None => encoded,
    }
}

/// The parts of a received Pub/Sub message.
#[derive(Debug, Clone, Default)]
pub struct Received {
    /// Payload.
    pub data: Bytes,
    /// Attributes.
    pub attributes: HashMap<String, String>,
    /// Id Pub/Sub assigned.
    pub message_id: String,
    /// When Pub/Sub took it: seconds and nanoseconds since the epoch.
    pub publish_time: Option<(i64, i32)>,
    /// Ordering key, empty when none.
    pub ordering_key: String,
}

/// The polybus message a received Pub/Sub message stands for; `attempt` as Pub/Sub counted it
/// (it counts only on subscriptions with a dead-letter policy; 1 when it did not).
pub fn decode(received: Received, attempt: Option<usize>) -> Message {
    let Received { data, mut attributes, message_id, publish_time, ordering_key } = received;
    let id = attributes.remove(wire::ID).filter(|id| !id.is_empty()).unwrap_or(message_id);
    let content_type = attributes.remove(wire::CONTENT_TYPE);
    let published_at = attributes
        .remove(wire::PUBLISHED_AT)
        .and_then(|t| wire::parse_time(&t))
        .or_else(|| {
            let (seconds, nanos) = publish_time?;
            chrono::DateTime::from_timestamp(seconds, u32::try_from(nanos).unwrap_or(0))
        })
        .unwrap_or_else(polybus_core::message::now);
    Message {
        id,
        payload: data,
        headers: attributes.into_iter().collect(),
        key: Some(ordering_key).filter(|k| !k.is_empty()),
        content_type,
        published_at,
        attempt: attempt.and_then(|a| u32::try_from(a).ok()).filter(|a| *a > 0).unwrap_or(1),
        delay: None,
        idempotency_key: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_survives_the_round_trip() {
        let sent = Message::new(vec![0u8, 1, 255, b'\n'])
            .key("customer-42")
            .content_type("application/octet-stream")
            .header("traceparent", "00-abc-def-01");
        let encoded = encode(&sent);
        assert_eq!(encoded.ordering_key, "customer-42");
        assert_eq!(encoded.attributes.get("traceparent").map(String::as_str), Some("00-abc-def-01"));
        assert_eq!(encoded.attributes.get(wire::ID), Some(&sent.id));
        let received = decode(
            Received {
                data: encoded.data,
                attributes: encoded.attributes,
                message_id: "server-id".into(),
                publish_time: None,
                ordering_key: encoded.ordering_key,
            },
            Some(3),
        );
        assert_eq!(received.id, sent.id);
        assert_eq!(received.payload, sent.payload);
        assert_eq!(received.headers, sent.headers);
        assert_eq!(received.key, sent.key);
        assert_eq!(received.content_type, sent.content_type);
        assert_eq!(wire::format_time(received.published_at), wire::format_time(sent.published_at));
        assert_eq!(received.attempt, 3);
    }

    #[test]
    fn a_foreign_message_keeps_pubsub_id_and_all_its_attributes() {
        let foreign = Received {
            data: Bytes::from_static(b"hi"),
            attributes: [("origin".to_owned(), "gcloud".to_owned())].into(),
            message_id: "123456".into(),
            publish_time: Some((1_800_000_000, 5_000_000)),
            ordering_key: String::new(),
        };
        let received = decode(foreign, None);
        assert_eq!(received.id, "123456");
        assert_eq!(wire::format_time(received.published_at), "2027-01-15T08:00:00.005Z");
        assert_eq!(received.headers.get("origin").map(String::as_str), Some("gcloud"));
        assert_eq!(received.key, None);
        assert_eq!(received.attempt, 1);
    }
}
