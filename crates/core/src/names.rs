//! The rule every native name follows, whatever the broker: a topic's native name (its tag or
//! `nativeName`), its dead-letter destination (`deadLetter`, default `<native>-dlq`) are 1 to
//! 255 bytes without spaces or control characters. Each broker type's own rules (wildcards,
//! character sets, lengths, the names a group derives) are checked by its connector
//! ([`crate::BrokerKind::check_native`], [`crate::BrokerKind::check_group`]), in the adapter's
//! `kind.rs`.

use crate::limits::quote;

/// Longest native name on any broker.
pub const MAX_NATIVE_BYTES: usize = 255;
/// What separates a topic's native name from a group's in the names groups derive.
pub const GROUP_SEPARATOR: &str = "--";

/// Checks the rule every broker shares: 1 to 255 bytes, no spaces or control characters.
pub fn check_plain(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    within(name, MAX_NATIVE_BYTES)?;
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{} must not contain spaces or control characters", quote(name)));
    }
    Ok(())
}

/// Refuses a name longer than `max` bytes.
pub fn within(name: &str, max: usize) -> Result<(), String> {
    if name.len() > max {
        return Err(format!("{} is {} bytes long; at most {max} are allowed", quote(name), name.len()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_pass() {
        for name in ["orders", "orders-v1", "orders_eu", "orders-dlq", "a.*", "a/+"] {
            check_plain(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn spaces_control_characters_and_length_are_refused() {
        assert!(check_plain("with space").unwrap_err().contains("spaces or control"));
        assert!(check_plain("nul\0").unwrap_err().contains("spaces or control"));
        assert!(check_plain("").unwrap_err().contains("empty"));
        assert!(check_plain(&"a".repeat(256)).unwrap_err().contains("at most 255"));
    }
}
