//! Writing results to stdout: aligned tables for people, JSON for scripts.

use std::io::Write;

use serde::Serialize;

use crate::failure::{CliResult, Failure};

/// Writes `text` and a newline to stdout, flushed, so that what is printed is really out.
pub fn line(text: impl std::fmt::Display) -> CliResult {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}").and_then(|_| out.flush()).map_err(write_failed)
}

/// Writes `value` as pretty JSON.
pub fn json<T: Serialize + ?Sized>(value: &T) -> CliResult {
    line(pretty(value)?)
}

/// `value` as pretty JSON text.
pub fn pretty<T: Serialize + ?Sized>(value: &T) -> CliResult<String> {
    serde_json::to_string_pretty(value).map_err(encode_failed)
}

/// `value` as a JSON value.
pub fn value<T: Serialize + ?Sized>(value: &T) -> CliResult<serde_json::Value> {
    serde_json::to_value(value).map_err(encode_failed)
}

/// `value` as JSON on one line.
pub fn compact<T: Serialize + ?Sized>(value: &T) -> CliResult<String> {
    serde_json::to_string(value).map_err(encode_failed)
}

/// Widest a table cell is shown, in characters; longer text is cut with `…` (`--output json`
/// shows it whole).
pub const MAX_CELL_CHARS: usize = 60;
/// Widest the last cell of a row is shown (it is not padded, so it may be wider).
pub const MAX_LAST_CELL_CHARS: usize = 1000;

/// Writes rows as columns aligned under `header`, two spaces apart.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> CliResult {
    line(align(header, rows))
}

/// Rows aligned into columns under `header`.
pub fn align(header: &[&str], rows: &[Vec<String>]) -> String {
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    let all: Vec<Vec<String>> = std::iter::once(header).chain(rows.iter().cloned()).collect();
    columns(&all)
}

/// Rows aligned into columns, two spaces apart; the last column is not padded. Control
/// characters are shown escaped (`\u{1b}`), never sent to the terminal, and cells are cut to
/// [`MAX_CELL_CHARS`] ([`MAX_LAST_CELL_CHARS`] for the last).
pub fn columns(rows: &[Vec<String>]) -> String {
    let all: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            let last = row.len().saturating_sub(1);
            row.iter()
                .enumerate()
                .map(|(c, cell)| shown(cell, if c == last { MAX_LAST_CELL_CHARS } else { MAX_CELL_CHARS }))
                .collect()
        })
        .collect();
    let columns = all.iter().map(|r| r.len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| all.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0))
        .collect();
    let mut text = String::new();
    for (i, row) in all.iter().enumerate() {
        if i > 0 {
            text.push('\n');
        }
        let mut cells = Vec::with_capacity(row.len());
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                cells.push(cell.clone());
            } else {
                cells.push(format!("{cell:<width$}", width = widths[c]));
            }
        }
        text.push_str(cells.join("  ").trim_end());
    }
    text
}

/// `text` safe for a terminal: control characters escaped, cut to `max` characters with `…`.
pub fn shown(text: &str, max: usize) -> String {
    let mut escaped = text.chars().flat_map(|c| {
        let escape = c.is_control().then(|| c.escape_default());
        escape.into_iter().flatten().chain((!c.is_control()).then_some(c))
    });
    let mut out: String = escaped.by_ref().take(max).collect();
    if escaped.next().is_some() {
        out.pop();
        out.push('…');
    }
    out
}

fn encode_failed(error: serde_json::Error) -> Failure {
    Failure::new("OUTPUT_FAILED", format!("cannot encode JSON: {error}"))
}

fn write_failed(error: std::io::Error) -> Failure {
    if error.kind() == std::io::ErrorKind::BrokenPipe {
        // The reader (`| head`) has all it wanted: stop without a word.
        Failure::quiet()
    } else {
        Failure::new("OUTPUT_FAILED", format!("cannot write to stdout: {error}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_aligned_and_lines_not_padded() {
        let rows = vec![
            vec!["message-bus".to_owned(), "Message Bus".to_owned(), "2".to_owned()],
            vec!["q".to_owned(), "Q".to_owned(), "10".to_owned()],
        ];
        assert_eq!(
            align(&["TAG", "NAME", "VERSION"], &rows),
            "TAG          NAME         VERSION\nmessage-bus  Message Bus  2\nq            Q            10"
        );
    }

    #[test]
    fn cells_are_escaped_and_cut() {
        let rows = vec![vec!["n".repeat(70_000), "evil\u{1b}[2J\u{7}".to_owned(), "last\nline".to_owned()]];
        let text = columns(&rows);
        assert!(!text.chars().any(|c| c.is_control()), "{text:?}");
        let first = text.split("  ").next().unwrap_or_default();
        assert_eq!(first.chars().count(), MAX_CELL_CHARS);
        assert!(first.ends_with('…'));
        assert!(text.contains("evil\\u{1b}[2J\\u{7}"), "{text:?}");
        assert!(text.ends_with("last\\nline"), "{text:?}");
        assert_eq!(shown("short", 60), "short");
        assert_eq!(shown(&"x".repeat(60), 60), "x".repeat(60));
        assert_eq!(shown(&"x".repeat(61), 60).chars().count(), 60);
    }
}
