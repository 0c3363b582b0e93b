//! Parses Redis's replies to `XREADGROUP` and to the fetch script into entries.

use std::time::Duration;

use redis::Value;

use super::fetch::Entry;
use crate::fields::Fields;

fn text(value: Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes).ok(),
        Value::SimpleString(s) => Some(s),
        Value::VerbatimString { text, .. } => Some(text),
        _ => None,
    }
}

fn bytes(value: Value) -> Option<Vec<u8>> {
    match value {
        Value::BulkString(bytes) => Some(bytes),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::VerbatimString { text, .. } => Some(text.into_bytes()),
        Value::Int(n) => Some(n.to_string().into_bytes()),
        _ => None,
    }
}

/// `[f1, v1, f2, v2, …]` (or a map, in RESP3).
fn parse_fields(value: Value) -> Option<Fields> {
    match value {
        Value::Array(items) => {
            let mut fields = Vec::with_capacity(items.len() / 2);
            let mut items = items.into_iter();
            while let (Some(name), Some(value)) = (items.next(), items.next()) {
                fields.push((bytes(name)?, bytes(value)?));
            }
            Some(fields)
        }
        Value::Map(pairs) => pairs.into_iter().map(|(k, v)| Some((bytes(k)?, bytes(v)?))).collect(),
        _ => None,
    }
}

/// An entry `[id, fields]` (with the delivery count appended by the fetch script).
fn parse_entry(value: Value, count: Option<u32>) -> Option<Entry> {
    let Value::Array(items) = value else { return None };
    let mut items = items.into_iter();
    let id = text(items.next()?)?;
    let fields = parse_fields(items.next()?)?;
    let count = match count {
        Some(count) => count,
        None => match items.next()? {
            Value::Int(n) => u32::try_from(n).ok()?,
            _ => return None,
        },
    };
    Some(Entry { id, fields, count })
}

/// The fetch script's `{cursor, entries, wake in ms or -1}`.
pub(super) fn parse_claim(value: Value) -> Option<(String, Vec<Entry>, Option<Duration>)> {
    let Value::Array(items) = value else { return None };
    let mut items = items.into_iter();
    let cursor = text(items.next()?)?;
    let Value::Array(claimed) = items.next()? else { return None };
    let entries = claimed.into_iter().map(|v| parse_entry(v, None)).collect::<Option<Vec<_>>>()?;
    let wake = match items.next()? {
        Value::Int(ms) if ms >= 0 => Some(Duration::from_millis(ms.unsigned_abs())),
        Value::Int(_) => None,
        _ => return None,
    };
    Some((cursor, entries, wake))
}

/// An `XREADGROUP` reply for one stream: nil, `[[name, entries]]`, or a RESP3 map.
pub(super) fn parse_read(value: Value) -> Option<Vec<Entry>> {
    let entries = match value {
        Value::Nil => return Some(Vec::new()),
        Value::Array(streams) => {
            let Value::Array(stream) = streams.into_iter().next()? else { return None };
            stream.into_iter().nth(1)?
        }
        Value::Map(streams) => streams.into_iter().next()?.1,
        _ => return None,
    };
    let Value::Array(entries) = entries else { return None };
    entries.into_iter().map(|v| parse_entry(v, Some(1))).collect()
}

/// An `XRANGE` reply: `[[id, fields], …]`, as entry ids and fields.
pub(crate) fn parse_range(value: Value) -> Option<Vec<(String, Fields)>> {
    let Value::Array(entries) = value else { return None };
    entries.into_iter().map(|v| parse_entry(v, Some(0)).map(|entry| (entry.id, entry.fields))).collect()
}
