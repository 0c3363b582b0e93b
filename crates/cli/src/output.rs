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

/// Rows aligned into columns, two spaces apart; the last column is not padded.
pub fn columns(all: &[Vec<String>]) -> String {
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
}
