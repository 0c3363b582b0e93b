//! `polybus replay` and `polybus messages` on the embedded broker, through the real binary.

mod common;

use common::Sandbox;
use serde_json::{Value, json};

fn json_lines(text: &str) -> Vec<Value> {
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect()
}

/// Broker `bus` whose embedded env keeps acked messages, and topic `bus:TOPIC`.
fn retaining_topic(sandbox: &Sandbox, topic: &str) -> String {
    let broker = format!(
        "name: Bus\ntag: bus\nenvs:\n  - slug: dev\n    type: embedded\n    config:\n      path: {}\n      \
         retention:\n        keepAcked: true\n",
        sandbox.broker_db().display()
    );
    let file = sandbox.write("bus.yaml", broker);
    sandbox.run(&["broker", "create", "-f", &file]).ok();
    let event = format!("bus:{topic}");
    let file = sandbox.write("topic.yaml", format!("tag: {event}\n"));
    sandbox.run(&["topic", "create", "-f", &file]).ok();
    event
}

fn consume_ids(sandbox: &Sandbox, event: &str, count: usize) -> Vec<String> {
    let count = count.to_string();
    let args =
        ["consume", "--env", "dev", event, "--group", "billing", "--count", &count, "--output", "json"];
    json_lines(sandbox.run(&args).ok()).iter().map(|m| m["id"].as_str().expect("id").to_owned()).collect()
}

#[test]
fn replay_from_the_beginning_redelivers_and_messages_reads_them_back() {
    let sandbox = Sandbox::new();
    let event = retaining_topic(&sandbox, "orders");
    let mut ids = Vec::new();
    for (n, key) in [(1, "a"), (2, "b"), (3, "a")] {
        let data = format!("{{\"n\": {n}}}");
        let published = sandbox.run(&["publish", "--env", "dev", &event, "--data", &data, "--key", key]);
        ids.push(published.ok().trim_end().to_owned());
    }
    assert_eq!(consume_ids(&sandbox, &event, 3), ids, "consumed and acked in order");

    let replayed =
        sandbox.run(&["replay", "--env", "dev", &event, "--group", "billing", "--from", "beginning"]);
    assert!(
        replayed.ok().contains("group billing of bus:orders in dev starts again at beginning"),
        "{replayed:?}"
    );
    assert_eq!(consume_ids(&sandbox, &event, 3), ids, "every message again, in order");

    let listed =
        json_lines(sandbox.run(&["messages", "--env", "dev", &event, "--key", "a", "--output", "json"]).ok());
    let keyed: Vec<&str> = listed.iter().map(|m| m["id"].as_str().expect("id")).collect();
    assert_eq!(keyed, [ids[0].as_str(), ids[2].as_str()], "key a, oldest first");
    assert_eq!(listed[0]["payload"], json!(r#"{"n": 1}"#));
    assert_eq!(listed[0]["key"], json!("a"));
    assert!(listed[0]["position"].is_string(), "{}", listed[0]);
    assert!(listed[0].get("attempt").is_none(), "a stored message has no attempt: {}", listed[0]);

    let one = json_lines(
        sandbox.run(&["messages", "--env", "dev", &event, "--id", &ids[1], "--output", "json"]).ok(),
    );
    assert_eq!(one.len(), 1);
    assert_eq!(one[0]["id"], json!(ids[1]));
    let first = sandbox.run(&["messages", "--env", "dev", &event, "--limit", "1"]);
    let table: Vec<&str> = first.ok().lines().collect();
    assert_eq!(table.len(), 2, "a header and one row: {table:?}");
    assert!(table[0].starts_with("ID") && table[1].starts_with(&ids[0]), "{table:?}");
    let later = sandbox.run(&["messages", "--env", "dev", &event, "--since", "2999-01-01T00:00:00Z"]);
    assert_eq!(later.ok().lines().count(), 1, "only the header: {later:?}");
}

#[test]
fn replay_and_messages_refuse_bad_arguments() {
    let sandbox = Sandbox::new();
    let event = retaining_topic(&sandbox, "orders");
    let bad_from =
        sandbox.run(&["replay", "--env", "dev", &event, "--group", "billing", "--from", "yesterday"]);
    assert_eq!(bad_from.code, Some(2), "{bad_from:?}");
    assert!(bad_from.stderr.contains("neither `beginning` nor an RFC 3339 time"), "{bad_from:?}");
    let bad_since = sandbox.run(&["messages", "--env", "dev", &event, "--since", "today"]);
    assert_eq!(bad_since.code, Some(2), "{bad_since:?}");
    assert!(bad_since.stderr.contains("not an RFC 3339 time"), "{bad_since:?}");
    let backwards = sandbox.run(&[
        "messages",
        "--env",
        "dev",
        &event,
        "--since",
        "2026-01-02T00:00:00Z",
        "--until",
        "2026-01-01T00:00:00Z",
    ]);
    assert!(backwards.failed(1).contains("until"), "{backwards:?}");
    let too_many = sandbox.run(&["messages", "--env", "dev", &event, "--limit", "1001"]);
    assert_eq!(too_many.code, Some(2), "{too_many:?}");
    assert!(too_many.stderr.contains("1001"), "{too_many:?}");
}
