//! Fuzzing of definition files as the CLI reads them (issue 13): YAML and JSON text, broken,
//! hostile (deep nesting, alias bombs, tags, control characters) or valid.
//!
//! Properties: no panic and no hang; a bad file is one `INVALID_DOCUMENT` line that names the
//! file; a valid broker or topic written as YAML or JSON reads back as the same definition.
//! `POLYBUS_FUZZ_CASES=N` sets the cases per property.

#[path = "../../../core/tests/support/fuzzing.rs"]
mod fuzzing;

use fuzzing::*;
use polybus::{Broker, Topic};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use super::{parse_document, parse_json, parse_yaml};

const NAME: &str = "fuzz.yaml";

/// A failure must be one line, `INVALID_DOCUMENT: <file>: …`.
fn check_failure(failure: &crate::failure::Failure) -> Result<(), TestCaseError> {
    let text = failure.to_string();
    check(failure.code() == "INVALID_DOCUMENT", || format!("code {}: {text}", failure.code()))?;
    check(text.starts_with(&format!("INVALID_DOCUMENT: {NAME}: ")), || format!("no file name: {text}"))?;
    check(text.lines().count() == 1, || format!("more than one line: {text}"))
}

/// YAML-ish text: its punctuation, anchors, aliases, tags, block scalars, documents, indentation.
fn yaml_text() -> BoxedStrategy<String> {
    let token = prop_oneof![
        4 => prop::sample::select(vec![
            ": ", "- ", "[", "]", "{", "}", ", ", "\n", "\n  ", "\n    ", "&a ", "*a", "&b ", "*b", "!!str ",
            "!!binary ", "!!map ", "!x ", "|\n  ", ">-\n  ", "'", "\"", "# c\n", "---\n", "...\n", "%YAML 1.2\n",
            "? ", "<<: *a\n", "\t", "\0", "\u{feff}", "\r\n", "~", "null", "true", "on", "0x1F", "1e400",
            "-.inf", ".nan", "007", "1_000", "99999999999999999999999", "name", "tag", "envs", "slug", "type",
            "config", "redis", "\\u0000", "\"\\x00\"", "\"\\ud800\"",
        ])
        .prop_map(str::to_owned),
        1 => nasty_string(),
    ];
    prop::collection::vec(token, 0..40).prop_map(|t| t.concat()).boxed()
}

/// Text that nests `depth` levels in flow or block style.
fn nested_text() -> BoxedStrategy<String> {
    (1usize..3000, 0usize..4)
        .prop_map(|(depth, style)| match style {
            0 => "[".repeat(depth),
            1 => format!("{}x{}", "[".repeat(depth), "]".repeat(depth)),
            2 => "{a: ".repeat(depth),
            _ => (0..depth.min(400)).map(|i| format!("{}- \n", " ".repeat(i * 2))).collect(),
        })
        .boxed()
}

/// Billion laughs: `levels` anchors, each aliasing the previous one `width` times.
fn alias_bomb(levels: usize, width: usize) -> String {
    let mut text = "a0: &a0 [lol]\n".to_owned();
    for level in 1..levels {
        let aliases = vec![format!("*a{}", level - 1); width].join(", ");
        text.push_str(&format!("a{level}: &a{level} [{aliases}]\n"));
    }
    text
}

#[test]
fn any_text_is_read_or_refused_in_one_line() {
    let text = prop_oneof![
        3 => yaml_text(),
        1 => nested_text(),
        // Small bombs: a large one takes seconds to refuse in a debug build (see below).
        1 => (2usize..7, 2usize..8).prop_map(|(levels, width)| alias_bomb(levels, width)),
        1 => json_value().prop_map(|v| v.to_string()),
        1 => (json_value(), any::<prop::sample::Index>()).prop_map(|(v, cut)| {
            let text = v.to_string();
            let mut at = cut.index(text.len() + 1);
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            text[..at].to_owned()
        }),
        1 => prop::collection::vec(any::<u8>(), 0..100).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ];
    fuzz("definition file text", text, |text| {
        for parsed in [parse_yaml(NAME, &text), parse_json(NAME, &text)] {
            if let Err(failure) = parsed {
                check_failure(&failure)?;
            }
        }
        Ok(())
    });
}

#[test]
fn any_bytes_are_read_or_refused_in_one_line() {
    let bytes =
        prop_oneof![prop::collection::vec(any::<u8>(), 0..200), yaml_text().prop_map(String::into_bytes),];
    fuzz("definition file bytes", (bytes, any::<bool>()), |(bytes, json)| {
        if let Err(failure) = parse_document(NAME.to_owned(), bytes, json) {
            check_failure(&failure)?;
        }
        Ok(())
    });
}

#[test]
fn valid_definitions_read_back_the_same_from_yaml_and_json() {
    fuzz_scaled("definition files", 2, broker_doc(), |doc| {
        let broker = Broker::from_value(doc.clone()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let json = serde_json::to_string_pretty(&doc).expect("JSON");
        let yaml = serde_saphyr::to_string(&doc).map_err(|e| TestCaseError::fail(e.to_string()))?;
        for (format, text) in [("json", &json), ("yaml", &yaml)] {
            let read = if format == "json" { parse_json(NAME, text) } else { parse_yaml(NAME, text) };
            let read = read.map_err(|f| TestCaseError::fail(format!("{format} refused: {f}\n{text}")))?;
            let again = Broker::from_value(read.clone());
            check(again.as_ref() == Ok(&broker), || {
                format!("{format}:\n{text}\nread as {read:#}\n{again:?}")
            })?;
        }
        let tag = format!("{}:t", broker.tag);
        let topic = serde_json::json!({"tag": tag, "sample": doc});
        let yaml = serde_saphyr::to_string(&topic).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let read = parse_yaml(NAME, &yaml).map_err(|f| TestCaseError::fail(f.to_string()))?;
        check(Topic::from_value(read).is_ok_and(|t| t.sample.as_ref() == Some(&doc)), || yaml.clone())
    });
}

#[test]
fn hostile_yaml_is_refused_quickly() {
    // 11^10 nodes, refused at the parser's budget after ~2 s in a debug build.
    for text in [alias_bomb(11, 11), alias_bomb(40, 2), "[".repeat(100_000), "- ".repeat(50_000)] {
        let started = std::time::Instant::now();
        let failure = parse_yaml(NAME, &text).expect_err("refused");
        assert!(started.elapsed() < std::time::Duration::from_secs(20), "{:?}", started.elapsed());
        assert_eq!(failure.code(), "INVALID_DOCUMENT");
    }
}
