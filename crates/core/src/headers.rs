//! What a message may carry in its headers (and in its id, key and content type, which travel as
//! headers on some brokers), checked once before publishing so that every broker gives the
//! same answer: a header one broker would refuse, drop, interpret or choke on is refused on all.
//!
//! - Names: 1 to 128 bytes of visible ASCII without `:` (NATS's header-name rule, the
//!   strictest); not reserved (below).
//! - Values, id, key, content type: no control characters (U+0000–U+001F, U+007F–U+009F; so no
//!   NUL, CR, LF or tab: MQTT brokers drop the connection on them, NATS refuses CR and LF) and no
//!   Unicode non-characters (U+FFFE, U+FFFF, …: refused by MQTT brokers and SQS).
//! - Sizes: at most 64 headers, each value up to 1,024 bytes (Pub/Sub's attribute limit), all
//!   names and values together up to 4 KiB; id and content type up to 255 bytes, key up to
//!   1,024 bytes.
//! - Reserved names (any letter case): `polybus-*` (polybus's own attributes: id, key, attempt,
//!   dead-letter reason…), `nats-*` (JetStream acts on them: de-duplication, expected sequence,
//!   roll-ups), `goog*` (Pub/Sub refuses them), `x-death`, `x-delivery-count`,
//!   `x-first-death-*`, `x-last-death-*` (RabbitMQ's delivery bookkeeping: one would set the
//!   attempt count), `cc`, `bcc` (RabbitMQ routes the message to the routing keys they list).

use crate::error::ValidationError;
use crate::limits::quote;
use crate::message::Message;

/// Most headers on one message.
pub const MAX_HEADERS: usize = 64;
/// Longest header name, in bytes.
pub const MAX_NAME_BYTES: usize = 128;
/// Longest header value, in bytes.
pub const MAX_VALUE_BYTES: usize = 1024;
/// Most bytes of all header names and values of one message together.
pub const MAX_TOTAL_BYTES: usize = 4096;
/// Longest message id, in bytes.
pub const MAX_ID_BYTES: usize = 255;
/// Longest ordering key, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// Longest content type, in bytes.
pub const MAX_CONTENT_TYPE_BYTES: usize = 255;

/// Reserved name prefixes (lower case) and who reserves them.
const RESERVED_PREFIXES: [(&str, &str); 5] = [
    ("polybus-", "polybus"),
    ("nats-", "NATS JetStream"),
    ("goog", "Google Pub/Sub"),
    ("x-first-death-", "RabbitMQ"),
    ("x-last-death-", "RabbitMQ"),
];
/// Reserved names (lower case) and who reserves them.
const RESERVED_NAMES: [(&str, &str); 4] =
    [("x-death", "RabbitMQ"), ("x-delivery-count", "RabbitMQ"), ("cc", "RabbitMQ"), ("bcc", "RabbitMQ")];

/// Checks the id, key, content type, idempotency key and headers of a message about to be
/// published.
pub fn check(message: &Message) -> Result<(), ValidationError> {
    check_text("id", &message.id, 1, MAX_ID_BYTES)?;
    if let Some(key) = &message.key {
        check_text("key", key, 0, MAX_KEY_BYTES)?;
    }
    if let Some(content_type) = &message.content_type {
        check_text("contentType", content_type, 0, MAX_CONTENT_TYPE_BYTES)?;
    }
    if let Some(key) = &message.idempotency_key {
        crate::message::check_idempotency_key(key)?;
    }
    if message.headers.len() > MAX_HEADERS {
        return Err(ValidationError::field(
            "headers",
            format!("{} headers; at most {MAX_HEADERS} are allowed", message.headers.len()),
        ));
    }
    let mut total = 0;
    for (name, value) in &message.headers {
        check_name(name)?;
        check_text("headers", value, 0, MAX_VALUE_BYTES)
            .map_err(|e| ValidationError::field("headers", format!("header `{name}`: {}", e.message)))?;
        total += name.len() + value.len();
    }
    if total > MAX_TOTAL_BYTES {
        return Err(ValidationError::field(
            "headers",
            format!("names and values add up to {total} bytes; at most {MAX_TOTAL_BYTES} are allowed"),
        ));
    }
    Ok(())
}

fn check_name(name: &str) -> Result<(), ValidationError> {
    let refuse =
        |why: String| ValidationError::field("headers", format!("header name {}: {why}", quote(name)));
    if name.is_empty() {
        return Err(refuse("must not be empty".into()));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(refuse(format!("is {} bytes long; at most {MAX_NAME_BYTES} are allowed", name.len())));
    }
    if name.chars().any(|c| !c.is_ascii_graphic() || c == ':') {
        return Err(refuse("must be visible ASCII characters without spaces or `:`".into()));
    }
    let lower = name.to_ascii_lowercase();
    let reserved = RESERVED_NAMES
        .iter()
        .find(|(n, _)| lower == *n)
        .or_else(|| RESERVED_PREFIXES.iter().find(|(p, _)| lower.starts_with(p)));
    if let Some((_, owner)) = reserved {
        return Err(refuse(format!("is reserved by {owner}")));
    }
    Ok(())
}

fn check_text(field: &str, text: &str, least: usize, most: usize) -> Result<(), ValidationError> {
    if text.len() < least || text.len() > most {
        let size = if least == 0 { format!("at most {most}") } else { format!("{least} to {most}") };
        return Err(ValidationError::field(
            field,
            format!("is {} bytes long; {size} are allowed", text.len()),
        ));
    }
    if let Some(c) = text.chars().find(|c| c.is_control() || is_noncharacter(*c)) {
        return Err(ValidationError::field(
            field,
            format!("must not contain control characters or non-characters (found {})", c.escape_unicode()),
        ));
    }
    Ok(())
}

/// Unicode non-characters: U+FDD0–U+FDEF and the last two code points of every plane.
fn is_noncharacter(c: char) -> bool {
    let n = u32::from(c);
    (0xFDD0..=0xFDEF).contains(&n) || n & 0xFFFE == 0xFFFE
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(name: &str, value: &str) -> Message {
        Message::text("x").header(name, value)
    }

    #[track_caller]
    fn refused(message: &Message, says: &str) {
        let err = check(message).expect_err("refused");
        assert!(err.to_string().contains(says), "{err}");
    }

    #[test]
    fn ordinary_headers_pass() {
        let message = with("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .header("x-tenant", "äöü ✓ with spaces: and colons")
            .header("X.Custom_Name~1", "v".repeat(MAX_VALUE_BYTES))
            .key("customer-42");
        check(&message).unwrap();
    }

    #[test]
    fn reserved_names_are_refused_in_any_case() {
        for name in [
            "polybus-attempt",
            "Polybus-Id",
            "Nats-Msg-Id",
            "nats-rollup",
            "googclient_x",
            "x-death",
            "X-Delivery-Count",
            "CC",
            "bcc",
            "x-first-death-queue",
        ] {
            refused(&with(name, "999"), "is reserved by");
        }
        check(&with("x-deathly", "ok")).unwrap();
    }

    #[test]
    fn names_and_values_without_control_characters() {
        refused(&with("a\0b", "v"), "visible ASCII");
        refused(&with("", "v"), "must not be empty");
        refused(&with("with space", "v"), "visible ASCII");
        refused(&with("a:b", "v"), "visible ASCII");
        refused(&with("größe", "v"), "visible ASCII");
        refused(&with(&"n".repeat(129), "v"), "at most 128");
        for value in ["a\0b", "a\r\nInjected: yes", "tab\there", "\u{85}", "\u{FFFF}"] {
            refused(&with("h", value), "control characters or non-characters");
        }
        refused(&with("h", &"v".repeat(MAX_VALUE_BYTES + 1)), "at most 1024");
        refused(&Message::text("x").key("k\0"), "field `key`");
        refused(&Message::text("x").id("i\n"), "field `id`");
        refused(&Message::text("x").content_type("text/plain\r\n"), "field `contentType`");
    }

    #[test]
    fn idempotency_keys_are_named_bounded_and_without_control_characters() {
        check(&Message::text("x").idempotency_key("order-42 ✓")).unwrap();
        check(&Message::text("x").idempotency_key("é".repeat(200))).unwrap();
        for (key, says) in [
            ("", "must not be empty"),
            ("  ", "must not be empty"),
            ("a\nb", "control character U+000A"),
            ("\u{7f}", "control character U+007F"),
        ] {
            refused(&Message::text("x").idempotency_key(key), says);
        }
        let err = check(&Message::text("x").idempotency_key("k".repeat(201))).unwrap_err();
        assert_eq!(err.field, "idempotencyKey");
        assert!(err.message.contains("201 characters; at most 200"), "{err}");
    }

    #[test]
    fn counts_and_total_size_are_bounded() {
        let many = (0..=MAX_HEADERS).fold(Message::text("x"), |m, i| m.header(format!("h{i}"), "v"));
        refused(&many, "65 headers; at most 64");
        let big = (0..5).fold(Message::text("x"), |m, i| m.header(format!("h{i}"), "v".repeat(1000)));
        refused(&big, "at most 4096");
    }
}
