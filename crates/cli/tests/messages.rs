//! `polybus publish` and `polybus consume` on the embedded broker, through the real binary.

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};

use base64::Engine;
use common::{Sandbox, finish};
use serde_json::{Value, json};

fn json_lines(text: &str) -> Vec<Value> {
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect()
}

#[test]
fn published_message_comes_back_with_payload_key_and_headers() {
    let sandbox = Sandbox::new();
    let event = sandbox.embedded_topic("orders");
    let published = sandbox.run(&[
        "publish",
        "--env",
        "dev",
        &event,
        "--data",
        r#"{"order":42}"#,
        "--key",
        "customer-42",
        "--header",
        "traceparent=00-abc-01",
        "--header",
        "source=cli=yes",
    ]);
    let id = published.ok().trim_end().to_owned();
    assert_eq!(published.stderr, "");
    assert_eq!(id.lines().count(), 1);

    let consumed = sandbox
        .run(&["consume", "--env", "dev", &event, "--group", "billing", "--count", "1", "--output", "json"]);
    let messages = json_lines(consumed.ok());
    assert_eq!(consumed.stderr, "");
    assert_eq!(messages.len(), 1);
    let message = &messages[0];
    assert_eq!(message["id"], json!(id));
    assert_eq!(message["payload"], json!(r#"{"order":42}"#));
    assert_eq!(message["key"], json!("customer-42"));
    assert_eq!(message["headers"], json!({"traceparent": "00-abc-01", "source": "cli=yes"}));
    assert_eq!(message["attempt"], json!(1));
    assert!(message.get("payload_base64").is_none());
    assert!(message["published_at"].as_str().is_some_and(|t| t.ends_with('Z')), "{message}");

    // Acked once printed: the group has nothing left.
    let again = sandbox.run(&[
        "consume",
        "--env",
        "dev",
        &event,
        "--group",
        "billing",
        "--count",
        "1",
        "--timeout",
        "300ms",
    ]);
    assert_eq!(again.failed(3), "error: TIMEOUT: received 0 of 1 messages within 300ms");
}

#[test]
fn binary_payload_comes_back_as_base64_and_stdin_payload_as_text() {
    let sandbox = Sandbox::new();
    let event = sandbox.embedded_topic("blobs");
    let bytes: Vec<u8> = (0..=255u8).rev().collect();
    let file = sandbox.write("blob.bin", &bytes);
    let binary_id =
        sandbox.run(&["publish", "--env", "dev", &event, "--file", &file]).ok().trim_end().to_owned();
    let piped = sandbox
        .run_with_stdin(&["publish", "--env", "dev", &event, "--output", "json"], "from stdin\n".as_bytes());
    let piped_id = piped.json()["id"].as_str().expect("id").to_owned();

    let consumed =
        sandbox.run(&["consume", "--env", "dev", &event, "--group", "g", "--count", "2", "--output", "json"]);
    let messages = json_lines(consumed.ok());
    assert_eq!(messages.len(), 2);
    let binary = messages.iter().find(|m| m["id"] == json!(binary_id)).expect("binary message");
    assert_eq!(binary["payload_base64"], json!(base64::engine::general_purpose::STANDARD.encode(&bytes)));
    assert!(binary.get("payload").is_none());
    let text = messages.iter().find(|m| m["id"] == json!(piped_id)).expect("piped message");
    assert_eq!(text["payload"], json!("from stdin\n"));
}

#[test]
fn table_output_prints_one_readable_line_per_message() {
    let sandbox = Sandbox::new();
    let event = sandbox.embedded_topic("lines");
    let id =
        sandbox.run(&["publish", "--env", "dev", &event, "--data", "hello", "--key", "k", "--header", "a=b"]);
    let id = id.ok().trim_end().to_owned();
    let consumed = sandbox.run(&["consume", "--env", "dev", &event, "--group", "g", "--count", "1"]);
    let line = consumed.ok().trim_end();
    assert!(line.starts_with(&format!("{id}  ")), "{line}");
    assert!(line.ends_with(r#"  attempt 1  key k  headers {"a":"b"}  hello"#), "{line}");
}

#[test]
fn consume_times_out_with_exit_code_3_when_too_few_arrive() {
    let sandbox = Sandbox::new();
    let event = sandbox.embedded_topic("quiet");
    let run =
        sandbox.run(&["consume", "--env", "dev", &event, "--group", "g", "--count", "5", "--timeout", "1s"]);
    assert_eq!(run.failed(3), "error: TIMEOUT: received 0 of 5 messages within 1s");
    assert_eq!(run.stdout, "");

    sandbox.run(&["publish", "--env", "dev", &event, "--data", "x", "--count", "2"]).ok();
    let run =
        sandbox.run(&["consume", "--env", "dev", &event, "--group", "g", "--count", "5", "--timeout", "1s"]);
    assert_eq!(run.failed(3), "error: TIMEOUT: received 2 of 5 messages within 1s");
    assert_eq!(run.stdout.lines().count(), 2);
}

#[test]
fn publishing_to_unknown_places_names_them() {
    let sandbox = Sandbox::new();
    let event = sandbox.embedded_topic("orders");
    let run = sandbox.run(&["publish", "--env", "prd", &event, "--data", "x"]);
    assert_eq!(run.failed(1), "error: BROKER_ENV_NOT_FOUND: broker `bus` has no env `prd` (envs: dev)");
    let run = sandbox.run(&["publish", "--env", "dev", "bus:nothing", "--data", "x"]);
    assert_eq!(run.failed(1), "error: TOPIC_NOT_FOUND: topic `bus:nothing` not found");
    let run = sandbox.run(&["consume", "--env", "dev", &event, "--group", "Bad Group", "--count", "1"]);
    assert!(run.failed(1).starts_with("error: VALIDATION_FAILED: field `group`: "), "{run:#?}");
}

#[test]
fn ten_thousand_messages_published_by_one_process_all_reach_another() {
    const N: usize = 10_000;
    let sandbox = Sandbox::new();
    let event = sandbox.embedded_topic("bulk");
    // The group exists before anything is published, as a long-running consumer's would.
    sandbox.run(&["consume", "--env", "dev", &event, "--group", "bulk", "--timeout", "100ms"]).ok();

    let count = N.to_string();
    let consumer = sandbox.spawn(&[
        "consume",
        "--env",
        "dev",
        &event,
        "--group",
        "bulk",
        "--count",
        &count,
        "--timeout",
        "300s",
        "--output",
        "json",
    ]);
    let publisher =
        sandbox.spawn(&["publish", "--env", "dev", &event, "--data", "payload", "--count", &count]);

    let published = finish(publisher.wait_with_output().expect("publisher"));
    let published_ids: HashSet<String> = published.ok().lines().map(str::to_owned).collect();
    assert_eq!(published_ids.len(), N);
    assert_eq!(published.stderr, "");

    let consumed = finish(consumer.wait_with_output().expect("consumer"));
    let messages = json_lines(consumed.ok());
    assert_eq!(consumed.stderr, "");
    assert_eq!(messages.len(), N);
    let received: HashSet<String> =
        messages.iter().map(|m| m["id"].as_str().expect("id").to_owned()).collect();
    assert_eq!(received.len(), N, "duplicates received");
    assert_eq!(received, published_ids);
    assert!(messages.iter().all(|m| m["payload"] == json!("payload")));
}

#[cfg(unix)]
#[test]
fn interrupted_consumer_acks_what_it_printed_and_exits_cleanly() {
    let sandbox = Sandbox::new();
    let event = sandbox.embedded_topic("interrupt");
    sandbox.run(&["publish", "--env", "dev", &event, "--data", "x", "--count", "3"]).ok();

    let mut consumer =
        sandbox.spawn(&["consume", "--env", "dev", &event, "--group", "g", "--output", "json"]);
    let mut stdout = BufReader::new(consumer.stdout.take().expect("stdout"));
    let mut lines = Vec::new();
    for _ in 0..3 {
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read a message");
        lines.push(line);
    }
    let status = std::process::Command::new("kill")
        .args(["-INT", &consumer.id().to_string()])
        .status()
        .expect("send SIGINT");
    assert!(status.success());
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).expect("read the rest");
    let exit = consumer.wait().expect("consumer exits");
    assert_eq!(exit.code(), Some(0));
    assert_eq!(rest, "");
    assert_eq!(json_lines(&lines.concat()).len(), 3);

    let again = sandbox.run(&[
        "consume",
        "--env",
        "dev",
        &event,
        "--group",
        "g",
        "--count",
        "1",
        "--timeout",
        "300ms",
    ]);
    assert_eq!(again.failed(3), "error: TIMEOUT: received 0 of 1 messages within 300ms");
}

#[test]
fn bench_reports_the_time_of_each_awaited_publish() {
    let sandbox = Sandbox::new();
    let event = sandbox.embedded_topic("bench-calls");
    for batch in ["1", "10"] {
        let run = sandbox.run(&[
            "--output",
            "json",
            "bench",
            "--env",
            "dev",
            &event,
            "--messages",
            "40",
            "--batch",
            batch,
            "--timeout",
            "30s",
        ]);
        let report: Value = serde_json::from_str(run.ok()).expect("one JSON report");
        assert_eq!(report["messages"], json!(40));
        assert_eq!(report["batch"], json!(batch.parse::<u64>().expect("a number")));
        let calls = &report["publish_call_ms"];
        let (p50, p99, max) = (calls["p50"].as_f64(), calls["p99"].as_f64(), calls["max"].as_f64());
        let (Some(p50), Some(p99), Some(max)) = (p50, p99, max) else { panic!("publish_call_ms: {report}") };
        assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "percentiles out of order: {report}");
        // Forty calls of one message take longer in all than each one does.
        let total_ms = report["publish_seconds"].as_f64().expect("publish_seconds") * 1000.0;
        assert!(max <= total_ms, "a call took longer than the whole run: {report}");
    }
}

#[test]
fn consume_takes_ready_messages_in_batches_but_never_more_than_count() {
    let sandbox = Sandbox::new();
    let event = sandbox.embedded_topic("batched");
    sandbox.run(&["publish", "--env", "dev", &event, "--data", "x", "--count", "20"]).ok();
    let consume = |count: &str| {
        sandbox
            .run(&["consume", "--env", "dev", &event, "--group", "g", "--count", count, "--output", "json"])
    };
    let first = json_lines(consume("12").ok());
    let rest = json_lines(consume("8").ok());
    assert_eq!((first.len(), rest.len()), (12, 8));
    let ids: HashSet<&Value> = first.iter().chain(&rest).map(|m| &m["id"]).collect();
    assert_eq!(ids.len(), 20, "every message once: the first run acked all it printed, took no more");
    let again = sandbox.run(&[
        "consume",
        "--env",
        "dev",
        &event,
        "--group",
        "g",
        "--count",
        "1",
        "--timeout",
        "300ms",
    ]);
    assert_eq!(again.failed(3), "error: TIMEOUT: received 0 of 1 messages within 300ms");
}

#[test]
fn bench_consumes_a_backlog_in_batches_when_asked() {
    let sandbox = Sandbox::new();
    let event = sandbox.embedded_topic("bench-batches");
    let run = sandbox.run(&[
        "--output",
        "json",
        "bench",
        "--env",
        "dev",
        &event,
        "--messages",
        "60",
        "--consume-batch",
        "16",
        "--backlog",
        "--timeout",
        "30s",
    ]);
    let report: Value = serde_json::from_str(run.ok()).expect("one JSON report");
    assert_eq!(
        (&report["messages"], &report["consume_batch"], &report["backlog"]),
        (&json!(60), &json!(16), &json!(true))
    );
    assert!(report["consume_per_second"].as_f64().is_some_and(|r| r > 0.0), "{report}");
}

#[test]
fn a_key_published_twice_is_sent_once_and_checked() {
    let sandbox = Sandbox::new();
    let event = sandbox.embedded_topic("payments");
    let check = ["idempotency", "check", "--env", "dev", &event, "pay-1"];
    assert_eq!(sandbox.run(&check).ok(), "key `pay-1` is free: a publish with it would be sent\n");

    let publish = ["publish", "--env", "dev", &event, "--data", "charge", "--idempotency-key", "pay-1"];
    let first = sandbox.run(&publish);
    let id = first.ok().trim_end().to_owned();
    assert_eq!(first.stderr, "");
    let second = sandbox.run(&publish);
    assert_eq!(second.ok().trim_end(), id, "the duplicate prints the first message's id");
    assert!(second.stderr.contains("1 message was a duplicate"), "{second:?}");
    let json = sandbox.run(&[&publish[..], &["--output", "json"]].concat()).json();
    assert_eq!(json, json!({"id": id, "duplicate": true}));

    let checked = sandbox.run(&[&check[..], &["--output", "json"]].concat()).json();
    assert_eq!((checked["key"].clone(), checked["state"].clone()), (json!("pay-1"), json!("published")));
    assert_eq!(checked["message_id"], json!(id));
    let table = sandbox.run(&check);
    assert!(
        table.ok().lines().nth(1).is_some_and(|l| l.contains(&id) && l.contains("published")),
        "{table:?}"
    );

    let consumed = sandbox.run(&[
        "consume",
        "--env",
        "dev",
        &event,
        "--group",
        "g",
        "--count",
        "2",
        "--timeout",
        "500ms",
        "--output",
        "json",
    ]);
    let messages = json_lines(&consumed.stdout);
    assert_eq!(messages.len(), 1, "{consumed:?}");
    assert_eq!(messages[0]["id"], json!(id));

    let bad = sandbox.run(&["publish", "--env", "dev", &event, "--data", "x", "--idempotency-key", " "]);
    assert!(bad.failed(1).contains("idempotencyKey"), "{bad:?}");
}
