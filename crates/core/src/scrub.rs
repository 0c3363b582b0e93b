//! The scrubber: turns resolved secret values back into the references they came from, in
//! every error a connection reports, so a value never leaves the process that resolved it.

use std::fmt;

use crate::error::Error;

/// Maps resolved values back to their references (`db.internal` → `${REDIS_HOST}`).
///
/// Each value is also matched in the forms a client library may show it in: with any letter
/// case (host names are lower-cased by URL parsers), percent-encoded, percent-decoded and
/// escaped as in `{:?}`.
#[derive(Clone, Default)]
pub struct Scrubber {
    /// `(lower-cased needle, reference)`, longest needle first.
    needles: Vec<(String, String)>,
}

impl fmt::Debug for Scrubber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Scrubber({} forms)", self.needles.len())
    }
}

impl Scrubber {
    /// Replaces `value` (in any of its forms) with `reference` from now on.
    pub fn add(&mut self, value: &str, reference: &str) {
        if value.is_empty() {
            return;
        }
        let mut forms = vec![value.to_owned(), percent_encode(value)];
        if let Some(decoded) = percent_decode(value) {
            forms.push(decoded);
        }
        let debug = format!("{value:?}");
        forms.push(debug[1..debug.len() - 1].to_owned());
        for form in forms {
            self.push(form.to_ascii_lowercase(), reference);
        }
    }

    /// Adds every value `other` scrubs.
    pub fn extend(&mut self, other: &Scrubber) {
        for (needle, reference) in &other.needles {
            self.push(needle.clone(), reference);
        }
    }

    /// Adds a lower-cased needle unless known, keeping the longest first.
    fn push(&mut self, needle: String, reference: &str) {
        if needle.is_empty() || self.needles.iter().any(|(n, _)| *n == needle) {
            return;
        }
        self.needles.push((needle, reference.to_owned()));
        self.needles.sort_by_key(|(n, _)| std::cmp::Reverse(n.len()));
    }

    /// True when there is nothing to scrub.
    pub fn is_empty(&self) -> bool {
        self.needles.is_empty()
    }

    /// `text` with every value replaced by its reference.
    pub fn scrub_str(&self, text: &str) -> String {
        if self.needles.is_empty() {
            return text.to_owned();
        }
        // ASCII lower-casing keeps byte offsets, so positions in `lower` are positions in `text`.
        let lower = text.to_ascii_lowercase();
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        while at < text.len() {
            if let Some((needle, reference)) =
                self.needles.iter().find(|(n, _)| lower[at..].starts_with(n.as_str()))
            {
                out.push_str(reference);
                at += needle.len();
                continue;
            }
            let ch = text[at..].chars().next().unwrap_or_default();
            out.push(ch);
            at += ch.len_utf8().max(1);
        }
        out
    }

    /// `error` with every value in its text replaced by its reference.
    pub fn scrub(&self, error: Error) -> Error {
        if self.needles.is_empty() {
            return error;
        }
        error.map_text(|text| self.scrub_str(&text))
    }
}

/// Every byte outside the URL-unreserved set as `%XX` (upper-case hex).
fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `value` with `%XX` escapes decoded; `None` when it has none or does not decode to UTF-8.
fn percent_decode(value: &str) -> Option<String> {
    if !value.contains('%') {
        return None;
    }
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(decoded)) => {
                out.push(decoded);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok().filter(|decoded| decoded != value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{FailureKind, Op, ValidationError};

    fn scrubber() -> Scrubber {
        let mut s = Scrubber::default();
        s.add("Db.Internal", "${POLYBUS_BROKER_HOST}");
        s.add("team/a b", "${POLYBUS_BROKER_VHOST}");
        s.add("p%40ss", "$Secret{pw}");
        s.add("", "${EMPTY}");
        s
    }

    #[test]
    fn every_form_of_a_value_becomes_its_reference() {
        let s = scrubber();
        let text =
            "connect failed on redis db.internal:6379 (DB.INTERNAL); vhost team%2Fa%20b / \"team/a b\"; p@ss";
        assert_eq!(
            s.scrub_str(text),
            "connect failed on redis ${POLYBUS_BROKER_HOST}:6379 (${POLYBUS_BROKER_HOST}); vhost \
             ${POLYBUS_BROKER_VHOST} / \"${POLYBUS_BROKER_VHOST}\"; $Secret{pw}"
        );
        assert_eq!(s.scrub_str("nothing here, ünïcode kept"), "nothing here, ünïcode kept");
    }

    #[test]
    fn escaped_values_are_found_as_debug_prints_them() {
        let mut s = Scrubber::default();
        s.add("a\"b\\c\nd", "$Secret{odd}");
        assert_eq!(s.scrub_str(&format!("got {:?}", "a\"b\\c\nd")), "got \"$Secret{odd}\"");
    }

    #[test]
    fn the_longest_value_wins_and_references_are_not_scrubbed_again() {
        let mut s = Scrubber::default();
        s.add("host", "${SHORT}");
        s.add("host.example", "${LONG}");
        assert_eq!(s.scrub_str("host.example and host"), "${LONG} and ${SHORT}");
        let mut s = Scrubber::default();
        s.add("S", "${S}");
        assert_eq!(s.scrub_str("Ss"), "${S}${S}");
    }

    #[test]
    fn errors_are_scrubbed_in_every_text_field() {
        let s = scrubber();
        let error =
            s.scrub(Error::transport(Op::Connect, "redis db.internal:6379", "lookup db.internal failed"));
        assert_eq!(
            error.to_string(),
            "connect failed on redis ${POLYBUS_BROKER_HOST}:6379: lookup ${POLYBUS_BROKER_HOST} failed"
        );
        assert_eq!(error.code(), "CONNECT_FAILED");
        let error = s.scrub(ValidationError::in_env("dev", "config.url", "bad host `db.internal`").into());
        assert_eq!(
            error.to_string(),
            "invalid definition: env `dev`: field `config.url`: bad host `${POLYBUS_BROKER_HOST}`"
        );
        let error = s.scrub(Error::Closed("p@ss".into()));
        assert_eq!(error.to_string(), "closed: $Secret{pw}");
        assert_eq!(format!("{s:?}"), "Scrubber(6 forms)");
    }

    #[test]
    fn the_cause_of_a_transport_error_is_scrubbed_and_still_matchable() {
        let s = scrubber();
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused by db.internal");
        let error = s.scrub(Error::transport_from(Op::Connect, "redis", FailureKind::Unavailable, io));
        let cause = std::error::Error::source(&error).expect("a source");
        assert_eq!(cause.to_string(), "refused by ${POLYBUS_BROKER_HOST}");
        assert!(cause.source().is_none(), "the chain ends at the scrubbed cause");
        assert!(!format!("{error:?}").contains("db.internal"), "{error:?}");
        let kept = error.cause().and_then(|c| c.downcast_ref::<std::io::Error>()).expect("the io error");
        assert_eq!(kept.kind(), std::io::ErrorKind::ConnectionRefused);
        assert!(error.is_retryable());
    }
}
