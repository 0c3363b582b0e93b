//! A polybus [`Message`] as an MQTT 5 publish, and back.
//!
//! Payload bytes travel unchanged; the content type is the MQTT 5 content-type property;
//! headers are user properties; id, key, publish time and (on redeliveries polybus makes)
//! the attempt are user properties named in [`polybus_core::wire`].

use std::collections::BTreeMap;

use polybus_core::{Message, wire};
use rumqttc::v5::mqttbytes::v5::{Publish, PublishProperties};

/// User properties polybus owns: never copied into, or taken from, a message's headers.
const RESERVED: [&str; 5] = [wire::ID, wire::KEY, wire::PUBLISHED_AT, wire::ATTEMPT, wire::CONTENT_TYPE];

/// The publish properties carrying `message`; `attempt` is the attempt its next delivery will be,
/// written only when above 1 (a redelivery polybus makes by publishing a copy).
pub(crate) fn encode(message: &Message, attempt: u32) -> PublishProperties {
    let mut user = Vec::with_capacity(message.headers.len() + 4);
    user.push((wire::ID.to_owned(), message.id.clone()));
    user.push((wire::PUBLISHED_AT.to_owned(), wire::format_time(message.published_at)));
    if let Some(key) = &message.key {
        user.push((wire::KEY.to_owned(), key.clone()));
    }
    if attempt > 1 {
        user.push((wire::ATTEMPT.to_owned(), attempt.to_string()));
    }
    for (name, value) in &message.headers {
        if !RESERVED.contains(&name.as_str()) {
            user.push((name.clone(), value.clone()));
        }
    }
    PublishProperties {
        user_properties: user,
        content_type: message.content_type.clone(),
        ..PublishProperties::default()
    }
}

/// The message a publish carries. A publish from a client that sets no polybus id gets a
/// fresh one; `attempt` counts the broker's redelivery flag on top of `polybus-attempt`.
pub(crate) fn decode(publish: Publish) -> Message {
    let (mut id, mut key, mut published_at, mut stated_attempt) = (None, None, None, None);
    let mut content_type = None;
    let mut headers = BTreeMap::new();
    if let Some(props) = publish.properties {
        content_type = props.content_type;
        for (name, value) in props.user_properties {
            match name.as_str() {
                wire::ID if !value.is_empty() => id = Some(value),
                wire::KEY => key = Some(value),
                wire::PUBLISHED_AT => {
                    if let Some(t) = wire::parse_time(&value) {
                        published_at = Some(t);
                    }
                }
                wire::ATTEMPT => stated_attempt = value.parse::<u32>().ok().filter(|n| *n >= 1),
                wire::CONTENT_TYPE => {
                    if content_type.is_none() {
                        content_type = Some(value);
                    }
                }
                wire::ID => {}
                _ => {
                    headers.insert(name, value);
                }
            }
        }
    }
    let payload = publish.payload;
    let mut message = match (id, published_at) {
        (Some(id), Some(published_at)) => Message::received(id, payload, published_at),
        // From another client: a fresh id, and the time it came, for what it lacks.
        (id, published_at) => {
            let mut message = Message::new(payload);
            message.id = id.unwrap_or(message.id);
            message.published_at = published_at.unwrap_or(message.published_at);
            message
        }
    };
    message.key = key;
    message.content_type = content_type;
    message.headers = headers;
    message.attempt = stated_attempt.unwrap_or(1).saturating_add(u32::from(publish.dup));
    message
}

/// A short stable hash of `s` (FNV-1a), the same in every build and process.
pub(crate) fn stable_hash(s: &str) -> u64 {
    let mut hash = Fnv::default();
    hash.write(s.as_bytes());
    hash.0
}

struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        // Separates fields so ("ab", "c") and ("a", "bc") differ.
        self.0 ^= 0xff;
        self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
    }
}

/// A publish as received, for tests.
#[cfg(test)]
fn received(message: &Message, attempt: u32, dup: bool) -> Publish {
    let mut p = Publish::new(
        "t",
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        message.payload.clone(),
        Some(encode(message, attempt)),
    );
    p.dup = dup;
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_survives_the_round_trip() {
        let sent = Message::new(vec![0u8, 159, 146, 150])
            .key("customer-42")
            .header("traceparent", "00-abc-def-01")
            .content_type("application/octet-stream");
        let got = decode(received(&sent, 1, false));
        assert_eq!(got.payload, sent.payload);
        assert_eq!((got.id.as_str(), got.key.as_deref()), (sent.id.as_str(), Some("customer-42")));
        assert_eq!(got.headers, sent.headers);
        assert_eq!(got.content_type.as_deref(), Some("application/octet-stream"));
        assert_eq!(got.published_at.timestamp_millis(), sent.published_at.timestamp_millis());
        assert_eq!(got.attempt, 1);
    }

    #[test]
    fn attempts_come_from_the_property_and_the_dup_flag() {
        let m = Message::text("x");
        assert_eq!(decode(received(&m, 3, false)).attempt, 3);
        assert_eq!(decode(received(&m, 3, true)).attempt, 4);
        assert_eq!(decode(received(&m, 1, true)).attempt, 2);
    }

    #[test]
    fn reserved_names_never_leak_into_headers() {
        let m = Message::text("x").header(wire::KEY, "spoof").header(wire::DEAD_LETTER_REASON, "why");
        let got = decode(received(&m, 2, false));
        assert_eq!(got.key, None);
        assert_eq!(got.headers.len(), 1);
        assert_eq!(got.headers[wire::DEAD_LETTER_REASON], "why");
    }
}
