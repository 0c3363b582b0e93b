//! Reading definition files (YAML or JSON, `-` for stdin) and payloads.

use std::io::Read;
use std::path::Path;

use serde_json::Value;

use crate::failure::{CliResult, Failure};

/// A parsed definition file and the name to use for it in messages.
#[derive(Debug)]
pub struct Document {
    /// The file as the user named it, or `<stdin>`.
    pub name: String,
    /// Its content.
    pub value: Value,
}

/// Reads and parses a YAML or JSON document; `-` reads stdin.
pub fn read_document(path: &Path) -> CliResult<Document> {
    let (name, bytes) = read_source(path)?;
    let is_json = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"));
    parse_document(name, bytes, is_json)
}

/// Parses a file's bytes as JSON or YAML; `name` is the file's, for messages.
fn parse_document(name: String, bytes: Vec<u8>, is_json: bool) -> CliResult<Document> {
    let text = String::from_utf8(bytes)
        .map_err(|e| invalid(&name, format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to())))?;
    if text.trim().is_empty() {
        return Err(invalid(&name, "the document is empty"));
    }
    let value = if is_json { parse_json(&name, &text)? } else { parse_yaml(&name, &text)? };
    Ok(Document { name, value })
}

/// Reads a payload file as bytes; `-` reads stdin.
pub fn read_payload(path: &Path) -> CliResult<Vec<u8>> {
    Ok(read_source(path)?.1)
}

/// Reads all of stdin.
pub fn read_stdin() -> CliResult<Vec<u8>> {
    let mut bytes = Vec::new();
    std::io::stdin()
        .read_to_end(&mut bytes)
        .map_err(|e| Failure::new("FILE_UNREADABLE", format!("<stdin>: {e}")))?;
    Ok(bytes)
}

fn read_source(path: &Path) -> CliResult<(String, Vec<u8>)> {
    if path == Path::new("-") {
        return Ok(("<stdin>".to_owned(), read_stdin()?));
    }
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| Failure::new("FILE_UNREADABLE", format!("{name}: {e}")))?;
    Ok((name, bytes))
}

fn parse_json(name: &str, text: &str) -> CliResult<Value> {
    serde_json::from_str(text).map_err(|e| {
        let what = e.to_string();
        // serde_json appends " at line L column C"; say it our way, before the reason.
        let reason = what.split(" at line ").next().unwrap_or(&what);
        invalid(name, format!("line {} column {}: {reason}", e.line(), e.column()))
    })
}

fn parse_yaml(name: &str, text: &str) -> CliResult<Value> {
    // YAML 1.2: `y`, `on`, `007` and `1_000` are strings, as a tag or a name may well be.
    let options = serde_saphyr::options! {
        strict_booleans: true,
        leading_zero_numbers_as_strings: true,
        underscored_numbers_as_strings: true,
        with_snippet: false,
    };
    serde_saphyr::from_str_with_options::<Value>(text, options).map_err(|e| {
        let plain = e.without_snippet().render_with_formatter(&serde_saphyr::UserMessageFormatter);
        let reason = plain.lines().next().unwrap_or("malformed YAML").trim();
        match e.location() {
            Some(at) => {
                let suffix = format!(" at line {}, column {}", at.line(), at.column());
                let reason = reason.strip_suffix(&suffix).unwrap_or(reason);
                invalid(name, format!("line {} column {}: {reason}", at.line(), at.column()))
            }
            None => invalid(name, reason.to_owned()),
        }
    })
}

fn invalid(name: &str, reason: impl std::fmt::Display) -> Failure {
    Failure::new("INVALID_DOCUMENT", format!("{name}: {reason}"))
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> std::path::PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write test file");
        path
    }

    #[test]
    fn yaml_and_json_give_the_same_value() {
        let dir = tempfile::tempdir().expect("tempdir");
        let yaml =
            read_document(&write(&dir, "a.yaml", "name: x\nport: 6379\nlist: [a, b]\n")).expect("yaml");
        let json =
            read_document(&write(&dir, "a.json", r#"{"name": "x", "port": 6379, "list": ["a", "b"]}"#))
                .expect("json");
        assert_eq!(yaml.value, json.value);
    }

    #[test]
    fn yaml_1_1_booleans_and_odd_numbers_stay_strings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let yaml = read_document(&write(&dir, "a.yaml", "tag: y\nslug: on\nid: 007\nn: 1_000\nok: true\n"))
            .expect("yaml");
        assert_eq!(
            yaml.value,
            serde_json::json!({"tag": "y", "slug": "on", "id": "007", "n": "1_000", "ok": true})
        );
    }

    #[test]
    fn malformed_files_name_file_line_and_column() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(&dir, "bad.yaml", "name: x\nenvs: [a, b\n  tag: : :\n");
        let message = read_document(&path).expect_err("malformed").to_string();
        assert!(message.starts_with(&format!("INVALID_DOCUMENT: {}: line ", path.display())), "{message}");
        assert_eq!(message.lines().count(), 1, "{message}");

        let path = write(&dir, "bad.json", "{\n  \"name\": \"x\",\n  oops\n}");
        let message = read_document(&path).expect_err("malformed").to_string();
        assert!(
            message.starts_with(&format!("INVALID_DOCUMENT: {}: line 3 column 3: ", path.display())),
            "{message}"
        );
    }

    #[test]
    fn empty_and_missing_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let message = read_document(&write(&dir, "empty.yaml", "\n")).expect_err("empty").to_string();
        assert!(message.ends_with("empty.yaml: the document is empty"), "{message}");
        let missing = dir.path().join("missing.yaml");
        let failure = read_document(&missing).expect_err("missing");
        assert_eq!(failure.code(), "FILE_UNREADABLE");
    }
}
