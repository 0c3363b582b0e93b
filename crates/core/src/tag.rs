//! Tags (`message-bus`) and events (`message-bus:orders`).

use std::fmt;
use std::str::FromStr;

use crate::error::ValidationError;

/// Longest tag accepted.
pub const MAX_TAG_LEN: usize = 64;

/// Checks a broker tag, topic tag or env slug: `[a-z0-9][a-z0-9-_]*`, at most 64 characters.
pub fn check_tag(value: &str) -> Result<(), String> {
    let mut chars = value.chars();
    match chars.next() {
        None => return Err("must not be empty".into()),
        Some(c) if !(c.is_ascii_lowercase() || c.is_ascii_digit()) => {
            return Err(format!("`{value}` must start with a lower-case letter or digit"));
        }
        _ => {}
    }
    if value.len() > MAX_TAG_LEN {
        return Err(format!("`{value}` is longer than {MAX_TAG_LEN} characters"));
    }
    if let Some(bad) =
        chars.find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '_'))
    {
        return Err(format!("`{value}` contains `{bad}`; allowed are a-z, 0-9, `-` and `_`"));
    }
    Ok(())
}

/// A topic address, `broker-tag:topic-tag`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventRef {
    /// The broker's tag.
    pub broker: String,
    /// The topic's tag within the broker.
    pub topic: String,
}

impl EventRef {
    /// Parses `broker:topic`, naming `field` in the error.
    pub fn parse_field(value: &str, field: &str) -> Result<Self, ValidationError> {
        let Some((broker, topic)) = value.split_once(':') else {
            return Err(ValidationError::field(
                field,
                format!("`{value}` is not an event: expected `broker-tag:topic-tag`"),
            ));
        };
        check_tag(broker).map_err(|e| ValidationError::field(field, format!("broker tag {e}")))?;
        check_tag(topic).map_err(|e| ValidationError::field(field, format!("topic tag {e}")))?;
        Ok(Self { broker: broker.to_owned(), topic: topic.to_owned() })
    }
}

impl FromStr for EventRef {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse_field(s, "event")
    }
}

impl fmt::Display for EventRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.broker, self.topic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_follow_the_documented_pattern() {
        assert!(check_tag("message-bus").is_ok());
        assert!(check_tag("a_1").is_ok());
        assert!(check_tag("").is_err());
        assert!(check_tag("-bus").is_err());
        assert!(check_tag("Bus").is_err());
        assert!(check_tag("bus:x").is_err());
        assert!(check_tag(&"a".repeat(65)).is_err());
        assert!(check_tag(&"a".repeat(64)).is_ok());
    }

    #[test]
    fn events_parse_into_broker_and_topic() {
        let e: EventRef = "message-bus:orders".parse().unwrap();
        assert_eq!(e.broker, "message-bus");
        assert_eq!(e.topic, "orders");
        assert_eq!(e.to_string(), "message-bus:orders");
        assert!("orders".parse::<EventRef>().is_err());
        assert!("a:B".parse::<EventRef>().is_err());
    }
}
