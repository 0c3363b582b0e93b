//! `polybus serve --log-format json --otlp-endpoint URL`: one JSON object per log line, and
//! the spans of a publish exported over OTLP to a local receiver (no network), in the trace of
//! the HTTP request's `traceparent`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use common::Sandbox;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use serde_json::Value;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// An OTLP/HTTP receiver on a free port: every POSTed body goes to the channel.
fn receiver() -> (String, mpsc::Receiver<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = listener.local_addr().expect("address");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let tx = tx.clone();
            std::thread::spawn(move || serve_one(stream, tx));
        }
    });
    (format!("http://{address}"), rx)
}

fn serve_one(stream: TcpStream, tx: mpsc::Sender<Vec<u8>>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(stream);
    loop {
        let mut length = 0usize;
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let _ = tx.send(body);
        let answer = "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
        if reader.get_mut().write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

/// `POST path` with a JSON body, a Bearer key and a `traceparent`; returns the response.
fn post(address: &str, path: &str, key: &str, body: &str) -> String {
    let mut stream = TcpStream::connect(address).expect("connect to the server");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {key}\r\n\
         traceparent: 00-{TRACE_ID}-{CALLER_SPAN}-01\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    response
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    let kv = span.attributes.iter().find(|kv| kv.key == key)?;
    match kv.value.as_ref()?.value.as_ref()? {
        AnyValue::StringValue(s) => Some(s.clone()),
        other => Some(format!("{other:?}")),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn serve_logs_json_lines_and_exports_the_publish_trace_over_otlp() {
    let (collector, bodies) = receiver();
    let sandbox = Sandbox::new();
    // A relative path: the server keeps broker files in its data folder.
    let broker = sandbox.write(
        "bus.yaml",
        "name: Bus\ntag: bus\nenvs:\n  - slug: dev\n    type: embedded\n    config:\n      path: broker.db\n",
    );
    sandbox.run(&["broker", "create", "-f", &broker]).ok();
    let topic = sandbox.write("topic.yaml", "tag: bus:traced\n");
    sandbox.run(&["topic", "create", "-f", &topic]).ok();
    let event = "bus:traced".to_owned();
    let mut server = sandbox.spawn(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--output",
        "json",
        "--log-format",
        "json",
        "--otlp-endpoint",
        &collector,
    ]);
    let mut stdout = BufReader::new(server.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("first line");
    let started: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    let address = started["url"].as_str().expect("url").strip_prefix("http://").expect("http").to_owned();
    let key = started["createdKey"]["key"].as_str().expect("a first key").to_owned();

    let status =
        post(&address, &format!("/v1/envs/dev/events/{event}/messages"), &key, r#"{"payload": {"n": 1}}"#);
    assert!(status.contains("200"), "{status}");

    let stopped = Command::new("kill").args(["-TERM", &server.id().to_string()]).status().expect("kill");
    assert!(stopped.success());
    let mut stderr = String::new();
    server.stderr.take().expect("stderr").read_to_string(&mut stderr).expect("stderr");
    assert_eq!(server.wait().expect("server exits").code(), Some(0), "{stderr}");

    // One JSON object per log line, the message a field of its own.
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "the server logged nothing");
    for line in &lines {
        let object: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(object["level"].is_string() && object["timestamp"].is_string(), "{line}");
    }
    assert!(
        lines.iter().any(|l| l.contains("\"message\":\"finished processing request\"")),
        "the request is logged with its fields: {stderr}"
    );
    assert!(!stderr.contains(&key), "the API key is never logged");

    // The exported spans (flushed at shutdown): the request joined the caller's trace, and the
    // publish span is its descendant with the messaging attributes.
    let mut spans = Vec::new();
    while let Ok(body) = bodies.recv_timeout(Duration::from_secs(5)) {
        let request = ExportTraceServiceRequest::decode(body.as_slice()).expect("an OTLP trace export");
        for resource in request.resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        if spans.iter().any(|s| s.name.starts_with("publish ")) {
            break;
        }
    }
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    let request =
        spans.iter().find(|s| s.name == "request").unwrap_or_else(|| panic!("a request span: {names:?}"));
    assert_eq!(hex(&request.trace_id), TRACE_ID, "the request joined the caller's trace");
    assert_eq!(hex(&request.parent_span_id), CALLER_SPAN, "as a child of the caller's span");
    let publish = spans
        .iter()
        .find(|s| s.name == format!("publish {event}"))
        .unwrap_or_else(|| panic!("a publish span: {names:?}"));
    assert_eq!(hex(&publish.trace_id), TRACE_ID, "the publish is in the same trace");
    assert_eq!(attribute(publish, "messaging.system").as_deref(), Some("embedded"));
    assert_eq!(attribute(publish, "messaging.destination.name"), Some(event.clone()));
    let mut parent = publish.parent_span_id.clone();
    let mut chain = 0;
    while parent != request.span_id {
        let up = spans.iter().find(|s| s.span_id == parent).unwrap_or_else(|| {
            panic!("the publish span descends from the request span; lost at {}: {names:?}", hex(&parent))
        });
        parent = up.parent_span_id.clone();
        chain += 1;
        assert!(chain < 10, "no cycle");
    }
}
