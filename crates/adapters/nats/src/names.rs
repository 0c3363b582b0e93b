//! How a topic's native name maps to JetStream streams, subjects and consumers.
//!
//! Stream and consumer names may not contain `.`, `*`, `>` or whitespace, so every character
//! outside `[A-Za-z0-9_-]` becomes `_`; when anything was replaced (or the name was cut to
//! [`MAX_NAME`]) a hash of the original is appended, so two native names never share a stream.

/// Prefix of the subject a topic's messages are published to.
pub const SUBJECT_PREFIX: &str = "polybus";
/// Prefix of the subject delayed messages wait on.
pub const DELAYED_SUBJECT_PREFIX: &str = "polybus-delayed";
/// Suffix of the stream delayed messages wait in.
pub const DELAYED_STREAM_SUFFIX: &str = "_delayed";
/// The durable consumer that moves due delayed messages to their topic.
pub const MOVER_CONSUMER: &str = "polybus-mover";

/// Longest stream or consumer name this adapter makes (before the delayed-stream suffix).
const MAX_NAME: usize = 200;

/// The JetStream names of one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicNames {
    /// The stream holding the topic's messages.
    pub stream: String,
    /// The subject its messages are published to.
    pub subject: String,
    /// The stream delayed messages wait in until they are due.
    pub delayed_stream: String,
    /// The subject delayed messages are published to.
    pub delayed_subject: String,
}

impl TopicNames {
    /// The names for the topic whose native name is `native`.
    pub fn of(native: &str) -> Self {
        let stream = sanitise(native);
        let tail = if is_subject_tail(native) { native } else { stream.as_str() };
        TopicNames {
            subject: format!("{SUBJECT_PREFIX}.{tail}"),
            delayed_subject: format!("{DELAYED_SUBJECT_PREFIX}.{tail}"),
            delayed_stream: format!("{stream}{DELAYED_STREAM_SUFFIX}"),
            stream,
        }
    }
}

/// The durable consumer of `group` on the topic `native`: `<native>--<group>`, sanitised.
pub fn consumer(native: &str, group: &str) -> String {
    sanitise(&format!("{native}--{group}"))
}

/// `name` reduced to `[A-Za-z0-9_-]`, with a hash suffix when that changed it.
pub fn sanitise(name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' })
        .collect();
    if clean == name && !name.is_empty() && name.len() <= MAX_NAME {
        return clean;
    }
    let cut: String = clean.chars().take(MAX_NAME - 9).collect();
    format!("{cut}_{:08x}", fnv1a(name) as u32)
}

/// True when `name` can follow `polybus.` in a subject as it is: non-empty dot-separated
/// tokens without wildcards or whitespace.
fn is_subject_tail(name: &str) -> bool {
    !name.is_empty()
        && name.split('.').all(|token| {
            !token.is_empty()
                && !token.contains(['*', '>'])
                && !token.chars().any(|c| c.is_whitespace() || c.is_control())
        })
}

/// FNV-1a, 64 bit: stable across builds and Rust versions, unlike `DefaultHasher`.
fn fnv1a(s: &str) -> u64 {
    s.bytes()
        .fold(0xcbf2_9ce4_8422_2325, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_native_names_are_used_as_they_are() {
        let names = TopicNames::of("orders");
        assert_eq!(names.stream, "orders");
        assert_eq!(names.subject, "polybus.orders");
        assert_eq!(names.delayed_stream, "orders_delayed");
        assert_eq!(names.delayed_subject, "polybus-delayed.orders");
        assert_eq!(consumer("orders", "billing"), "orders--billing");
    }

    #[test]
    fn dotted_names_keep_their_subject_hierarchy_but_not_their_stream_name() {
        let names = TopicNames::of("orders.eu");
        assert_eq!(names.subject, "polybus.orders.eu");
        assert!(names.stream.starts_with("orders_eu_"), "{}", names.stream);
        assert_ne!(names.stream, TopicNames::of("orders_eu").stream);
    }

    #[test]
    fn wildcards_never_reach_a_subject() {
        let names = TopicNames::of("a.*.>");
        assert!(!names.subject.contains(['*', '>']), "{}", names.subject);
        assert_eq!(names.subject, format!("polybus.{}", names.stream));
        assert!(!TopicNames::of("a..b").subject.contains(".."));
    }

    #[test]
    fn long_names_are_cut_with_a_hash() {
        let long = "x".repeat(300);
        let name = sanitise(&long);
        assert_eq!(name.len(), MAX_NAME);
        assert_ne!(name, sanitise(&"x".repeat(299)));
    }
}
