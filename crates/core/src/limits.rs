//! Sizes and characters of the free-text fields of a definition: display names and
//! descriptions. Tags and env slugs have their own pattern (`tag.rs`); message headers theirs
//! (`headers.rs`); native names theirs per broker (`names.rs`).
//!
//! | field | limit |
//! |---|---|
//! | broker / topic `name` | 1 to 200 characters, no control characters |
//! | `description` | up to 2,000 characters, no control characters but line feed and tab |
//! | tag, env slug, group | `[a-z0-9][a-z0-9-_]*`, up to 64 characters |

use crate::error::ValidationError;

/// Most characters in a broker's or topic's display name.
pub const MAX_NAME_CHARS: usize = 200;
/// Most characters in a description.
pub const MAX_DESCRIPTION_CHARS: usize = 2000;
/// Most characters of a user's value quoted in an error message.
const QUOTED_CHARS: usize = 64;

/// Checks a display name: not blank, at most [`MAX_NAME_CHARS`], one line of printable text.
pub fn check_name(field: &str, name: &str) -> Result<(), ValidationError> {
    if name.trim().is_empty() {
        return Err(ValidationError::field(field, "must not be empty"));
    }
    check_text(field, name, MAX_NAME_CHARS, &[])
}

/// Checks a description: at most [`MAX_DESCRIPTION_CHARS`], printable text, lines and tabs allowed.
pub fn check_description(field: &str, description: &str) -> Result<(), ValidationError> {
    check_text(field, description, MAX_DESCRIPTION_CHARS, &['\n', '\t'])
}

fn check_text(field: &str, text: &str, max: usize, allowed: &[char]) -> Result<(), ValidationError> {
    let chars = text.chars().count();
    if chars > max {
        return Err(ValidationError::field(
            field,
            format!("is {chars} characters long; at most {max} are allowed"),
        ));
    }
    if let Some(c) = text.chars().find(|c| c.is_control() && !allowed.contains(c)) {
        return Err(ValidationError::field(
            field,
            format!("must not contain control characters (found {}) in {}", c.escape_unicode(), quote(text)),
        ));
    }
    Ok(())
}

/// A user's value as an error message shows it: in backquotes, control characters escaped, cut
/// to a few dozen characters, so a message stays one short, harmless line.
pub fn quote(value: &str) -> String {
    let mut shown = String::with_capacity(value.len().min(QUOTED_CHARS * 2) + 2);
    shown.push('`');
    for (i, c) in value.chars().enumerate() {
        if i == QUOTED_CHARS {
            shown.push('…');
            break;
        }
        if c.is_control() {
            shown.extend(c.escape_default());
        } else {
            shown.push(c);
        }
    }
    shown.push('`');
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_one_bounded_line() {
        assert!(check_name("name", "Message Bus ✓").is_ok());
        assert!(check_name("name", &"n".repeat(MAX_NAME_CHARS)).is_ok());
        let err = check_name("name", &"n".repeat(65_536)).unwrap_err();
        assert_eq!(err.field, "name");
        assert!(err.message.contains("65536 characters long; at most 200"), "{err}");
        assert!(check_name("name", " ").is_err());
        let err = check_name("name", "evil\u{1b}[2J").unwrap_err();
        assert!(err.message.contains("control characters"), "{err}");
        assert!(!err.message.contains('\u{1b}'), "the message itself stays harmless: {err}");
        assert!(check_name("name", "two\nlines").is_err());
    }

    #[test]
    fn descriptions_may_have_lines_but_no_escapes() {
        assert!(check_description("description", "line one\n\tline two").is_ok());
        assert!(check_description("description", &"d".repeat(MAX_DESCRIPTION_CHARS + 1)).is_err());
        assert!(check_description("description", "bell\u{7}").is_err());
    }

    #[test]
    fn quoted_values_are_short_and_escaped() {
        assert_eq!(quote("a\u{0}b"), "`a\\u{0}b`");
        assert_eq!(quote(&"x".repeat(100)).chars().count(), QUOTED_CHARS + 3);
    }
}
