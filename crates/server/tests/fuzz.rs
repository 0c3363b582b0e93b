//! Fuzzing of what a key holder sends the server (issue 13): publish, pull and ack bodies,
//! message header maps, path segments, `traceparent`, and broker and topic documents, driven
//! through the router in-process.
//!
//! Properties: never a 500 (a panic caught by the server) nor a panic; a 400 is
//! `INVALID_JSON`/`INVALID_BODY`/`INVALID_PATH`/`INVALID_QUERY` or `VALIDATION_FAILED` naming
//! the field (and the env of a config field); no error or redacted definition shows a literal
//! secret; a valid message comes back exactly as published. `POLYBUS_FUZZ_CASES=N` sets the
//! cases per property.

mod common;
#[path = "../../core/tests/support/fuzzing.rs"]
mod fuzzing;

use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use base64::Engine;
use common::TestApi;
use fuzzing::*;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::{Map, Value, json};
use tokio::runtime::Runtime;

/// An event whose topic does not exist: a body that parses gets `TOPIC_NOT_FOUND`, at no cost.
const NO_TOPIC: &str = "nobus:nothing";

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

/// What every answer must be, whatever was sent; returns the status and body.
fn check_answer(status: StatusCode, body: &Value, allowed: &[&str]) -> Result<(), TestCaseError> {
    check(status != StatusCode::INTERNAL_SERVER_ERROR, || format!("500: {body}"))?;
    let text = body.to_string();
    check(!text.contains(SECRET_MARK), || format!("the answer shows a secret: {text}"))?;
    if status.is_success() {
        return Ok(());
    }
    let error = &body["error"];
    let code = error["code"].as_str().unwrap_or_default();
    check(allowed.contains(&code), || format!("{status} {code} is not one of {allowed:?}: {body}"))?;
    check(!error["message"].as_str().unwrap_or_default().is_empty(), || format!("no message: {body}"))?;
    if code == "VALIDATION_FAILED" {
        let field = error["field"].as_str().unwrap_or_default();
        check(!field.is_empty(), || format!("no field: {body}"))?;
        // A field of an env's config names its env; a body's own unknown `config` key has none.
        let message = error["message"].as_str().unwrap_or_default();
        let unknown_key = field == "config" && message.contains("unknown field `config`");
        check(!field.starts_with("config") || unknown_key || error["env"].is_string(), || {
            format!("no env: {body}")
        })?;
    }
    Ok(())
}

const BODY_ERRORS: [&str; 4] = ["VALIDATION_FAILED", "INVALID_JSON", "INVALID_BODY", "PAYLOAD_TOO_LARGE"];

/// A valid message: payload as its encoding needs, headers, key, id, content type, delay.
fn message() -> BoxedStrategy<Value> {
    let payload = prop_oneof![
        json_value().prop_map(|p| (p, "json")),
        nasty_string().prop_map(|s| (Value::String(s), "text")),
        prop::collection::vec(any::<u8>(), 0..64)
            .prop_map(|b| (json!(base64::engine::general_purpose::STANDARD.encode(b)), "base64")),
    ];
    (
        payload,
        any::<bool>(),
        prop::collection::btree_map(nasty_string(), nasty_string(), 0..4),
        prop::option::of(nasty_string()),
        prop::option::of("[a-zA-Z0-9._-]{1,40}"),
        prop::option::of(prop_oneof![Just(0u64), 1u64..100_000]),
    )
        .prop_map(|((payload, encoding), say_encoding, headers, key, id, delay)| {
            let mut m = Map::new();
            m.insert("payload".into(), payload);
            if say_encoding || encoding != "json" {
                m.insert("encoding".into(), json!(encoding));
            }
            let headers: Map<String, Value> =
                headers.into_iter().filter(|(k, _)| !k.is_empty()).map(|(k, v)| (k, json!(v))).collect();
            m.insert("headers".into(), Value::Object(headers));
            if let Some(key) = key {
                m.insert("key".into(), json!(key));
            }
            if let Some(id) = id {
                m.insert("id".into(), json!(id));
            }
            if let Some(delay) = delay {
                m.insert("delayMs".into(), json!(delay));
            }
            Value::Object(m)
        })
        .boxed()
}

/// Request bodies: mutated valid ones, any JSON, and raw bytes (broken, truncated, nested).
fn bodies(valid: BoxedStrategy<Value>) -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        6 => mutated(valid.clone()).prop_map(|(doc, _)| doc.to_string().into_bytes()),
        2 => json_value().prop_map(|v| v.to_string().into_bytes()),
        1 => prop::collection::vec(any::<u8>(), 0..200),
        1 => (valid, any::<prop::sample::Index>()).prop_map(|(doc, cut)| {
            let text = doc.to_string().into_bytes();
            text[..cut.index(text.len() + 1)].to_vec()
        }),
        1 => (1usize..3000, prop::sample::select(vec!["[", "{\"a\":", "[{\"messages\":"]))
            .prop_map(|(depth, open)| open.repeat(depth).into_bytes()),
    ]
    .boxed()
}

/// `None` when `path` is no URI (too long, say): nothing to send.
fn post(path: &str, key: &str, body: Vec<u8>, traceparent: Option<&str>) -> Option<Request<Body>> {
    let mut request = Request::post(path)
        .header(header::AUTHORIZATION, format!("Bearer {key}"))
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(value) = traceparent {
        request = request.header("traceparent", value);
    }
    request.body(Body::from(body)).ok()
}

async fn send(api: &TestApi, request: Request<Body>) -> (StatusCode, Value) {
    let response = api.send(request).await;
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.expect("body");
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, value)
}

#[test]
fn publish_bodies_never_fail_the_server() {
    let rt = runtime();
    let api = rt.block_on(TestApi::new());
    let traceparent = prop::option::of(prop_oneof!["00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]", "[ -~]{0,60}",]);
    let batch = prop::collection::vec(message(), 1..4).prop_map(|m| json!({"messages": m}));
    let cases = (bodies(prop_oneof![message(), batch].boxed()), traceparent);
    fuzz("publish bodies", cases, |(body, traceparent)| {
        let path = format!("/v1/envs/dev/events/{NO_TOPIC}/messages");
        let request = post(&path, &api.admin, body, traceparent.as_deref()).expect("a valid request");
        let (status, answer) = rt.block_on(send(&api, request));
        check_answer(status, &answer, &[&BODY_ERRORS[..], &["TOPIC_NOT_FOUND"]].concat())
    });
}

#[test]
fn pull_and_ack_bodies_never_fail_the_server() {
    let rt = runtime();
    let api = rt.block_on(TestApi::new());
    let pull = (
        prop::option::of(prop_oneof![0u64..300, any::<u64>()]),
        prop::option::of(prop_oneof![0u64..700_000, any::<u64>()]),
        prop::option::of(prop_oneof![0u64..40_000, any::<u64>()]),
    )
        .prop_map(|(max, deadline, wait)| json!({"max": max, "ackDeadlineMs": deadline, "waitMs": wait}));
    let ack = (
        prop::collection::vec(nasty_string(), 0..4),
        any::<(bool, bool)>(),
        prop::option::of(any::<u64>()),
        prop::option::of(nasty_string()),
    )
        .prop_map(|(leases, (nack, dead), delay, reason)| {
            json!({"leaseIds": leases, "nack": nack, "deadLetter": dead, "delayMs": delay, "reason": reason})
        });
    let cases = (any::<bool>(), prop_oneof![bodies(pull.boxed()), bodies(ack.boxed())], tag());
    fuzz("pull and ack bodies", cases, |(is_pull, body, group)| {
        let what = if is_pull { "pull" } else { "ack" };
        let path = format!("/v1/envs/dev/events/{NO_TOPIC}/subscriptions/{group}/{what}");
        let request = post(&path, &api.admin, body, None).expect("a valid request");
        let (status, answer) = rt.block_on(send(&api, request));
        check_answer(status, &answer, &[&BODY_ERRORS[..], &["TOPIC_NOT_FOUND"]].concat())?;
        if !is_pull && status == StatusCode::OK {
            let failed = answer["failed"].as_array().cloned().unwrap_or_default();
            check(failed.iter().all(|f| f["error"]["code"] == "LEASE_NOT_FOUND"), || format!("{answer}"))?;
            check(answer["settled"] == json!([]), || format!("an unknown lease was settled: {answer}"))?;
        }
        Ok(())
    });
}

/// `value` percent-encoded as one path segment.
fn segment(value: &str) -> String {
    value
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~:".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[test]
fn path_segments_never_fail_the_server() {
    let rt = runtime();
    let api = rt.block_on(TestApi::new());
    let cases = (nasty_string(), nasty_string(), nasty_string(), 0usize..4, any::<bool>());
    fuzz("path segments", cases, |(env, event, group, route, raw)| {
        let (env, event, group) = if raw {
            (segment(&env), segment(&event), segment(&group))
        } else {
            ("dev".to_owned(), segment(&event), segment(&group))
        };
        let path = match route {
            0 => format!("/v1/envs/{env}/events/{event}/messages"),
            1 => format!("/v1/envs/{env}/events/{event}/subscriptions/{group}/pull"),
            2 => format!("/v1/envs/{env}/events/{event}/subscriptions/{group}/ack"),
            _ => format!("/v1/topics/{event}"),
        };
        let body = match route {
            0 => json!({"payload": 1}),
            2 => json!({"leaseIds": ["x"]}),
            _ => json!({}),
        };
        let request = if route == 3 {
            Request::get(&path)
                .header(header::AUTHORIZATION, format!("Bearer {}", api.admin))
                .body(Body::empty())
                .ok()
        } else {
            post(&path, &api.admin, body.to_string().into_bytes(), None)
        };
        let Some(request) = request else { return Ok(()) };
        let (status, answer) = rt.block_on(send(&api, request));
        let allowed =
            ["VALIDATION_FAILED", "INVALID_PATH", "TOPIC_NOT_FOUND", "NOT_FOUND", "BROKER_NOT_FOUND"];
        check_answer(status, &answer, &allowed)
    });
}

#[test]
fn definitions_never_fail_the_server_nor_show_a_secret() {
    let rt = runtime();
    let api = rt.block_on(TestApi::new());
    // One broker the patches and topics refer to.
    let base = json!({"name": "Base", "tag": "base", "envs": [{"slug": "dev", "type": "embedded"},
        {"slug": "prd", "type": "redis", "config": {"host": "h", "password": format!("{SECRET_MARK}base")}}]});
    let (status, answer) = rt.block_on(api.call("POST", "/v1/brokers", Some(&api.admin), Some(base)));
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    let topic = topic_doc("base".into(), vec!["dev".into(), "prd".into()]);
    let cases = (0usize..4, bodies(broker_doc()), bodies(topic));
    fuzz_scaled("definitions", 2, cases, |(route, broker, topic)| {
        let (method, path, body) = match route {
            0 => ("POST", "/v1/brokers".to_owned(), broker),
            1 => ("PATCH", "/v1/brokers/base".to_owned(), broker),
            2 => ("POST", "/v1/topics".to_owned(), topic),
            _ => ("PATCH", "/v1/topics/base:orders".to_owned(), topic),
        };
        let (status, answer) = rt.block_on(api.call_raw(method, &path, Some(&api.admin), Some(body)));
        let allowed = [
            &BODY_ERRORS[..],
            &["ALREADY_EXISTS", "CONFLICT", "TOPIC_NOT_FOUND", "BROKER_NOT_FOUND", "BROKER_ENV_NOT_FOUND"],
        ]
        .concat();
        check_answer(status, &answer, &allowed)?;
        if status.is_success() && route < 2 {
            let tag = answer["tag"].as_str().unwrap_or_default().to_owned();
            let (_, shown) =
                rt.block_on(api.call("GET", &format!("/v1/brokers/{tag}"), Some(&api.admin), None));
            check(!shown.to_string().contains(SECRET_MARK), || format!("GET shows a secret: {shown}"))?;
        }
        Ok(())
    });
}

/// What the server hands back for a published message: `(payload, encoding)`.
fn expected_payload(message: &Value) -> (Value, &'static str) {
    let payload = message["payload"].clone();
    match message["encoding"].as_str().unwrap_or("json") {
        "text" => (payload, "text"),
        "base64" => {
            let bytes =
                base64::engine::general_purpose::STANDARD.decode(payload.as_str().unwrap_or_default());
            match String::from_utf8(bytes.unwrap_or_default()) {
                Ok(text) => (json!(text), "text"),
                Err(_) => (payload, "base64"),
            }
        }
        _ => (payload, "json"),
    }
}

#[test]
fn valid_messages_come_back_exactly() {
    let rt = runtime();
    let api = rt.block_on(TestApi::new());
    let event = rt.block_on(api.embedded_topic("fuzz", "messages"));
    let n = AtomicU64::new(0);
    fuzz_scaled("message round trips", 4, message(), |mut message| {
        // Unique ids: a repeated id is deduplicated by design.
        let i = n.fetch_add(1, Ordering::Relaxed);
        let id = format!("{i}-{}", message["id"].as_str().unwrap_or("m"));
        message["id"] = json!(id);
        if let Some(map) = message.as_object_mut() {
            map.remove("delayMs");
        }
        let path = format!("/v1/envs/dev/events/{event}/messages");
        let (status, answer) = rt.block_on(api.call("POST", &path, Some(&api.admin), Some(message.clone())));
        check_answer(status, &answer, &["VALIDATION_FAILED"])?;
        if status != StatusCode::OK {
            // Refused by a rule on headers or keys: fine, as long as it names the field.
            return Ok(());
        }
        check(answer["ids"] == json!([id]), || format!("{answer}"))?;
        let pull = format!("/v1/envs/dev/events/{event}/subscriptions/g/pull");
        let (status, pulled) =
            rt.block_on(api.call("POST", &pull, Some(&api.admin), Some(json!({"max": 1, "waitMs": 5000}))));
        check(status == StatusCode::OK, || format!("pull: {status} {pulled}"))?;
        let got = &pulled["messages"][0];
        let (payload, encoding) = expected_payload(&message);
        check(got["id"] == json!(id), || format!("pulled {pulled}"))?;
        check((&got["payload"], got["encoding"].as_str()) == (&payload, Some(encoding)), || {
            format!("sent {message}\ngot {got}")
        })?;
        check(got["headers"] == message["headers"], || format!("sent {message}\ngot {got}"))?;
        check(got["key"] == message.get("key").cloned().unwrap_or(Value::Null), || {
            format!("sent {message}\ngot {got}")
        })?;
        let ack = format!("/v1/envs/dev/events/{event}/subscriptions/g/ack");
        let (status, acked) = rt.block_on(api.call(
            "POST",
            &ack,
            Some(&api.admin),
            Some(json!({"leaseIds": [got["leaseId"]]})),
        ));
        check(status == StatusCode::OK && acked["settled"].as_array().map(Vec::len) == Some(1), || {
            format!("ack: {acked}")
        })
    });
}

/// Each connector's config validation names the field and never quotes a secret.
#[test]
fn each_broker_types_config_names_the_field() {
    let cases = prop::sample::select(BROKER_TYPES.to_vec()).prop_flat_map(|t| {
        (Just(t), prop_oneof![3 => mutated(config_for(t)).prop_map(|(c, _)| c), 1 => json_value()])
    });
    let kinds = polybus::default_kinds();
    fuzz("configs", cases, |(broker_type, config)| {
        let broker_type: polybus::BrokerType = broker_type.parse().expect("a known type");
        let kind = kinds.get(&broker_type).ok().flatten().expect("a connector of this build");
        if let Err((field, message)) = kind.validate_config(&config) {
            check(field == "config" || field.starts_with("config."), || format!("field `{field}`"))?;
            check(!message.is_empty(), || format!("no message for `{field}`"))?;
            let secrets = secrets_in(&config);
            check(leaked(&message, &secrets).is_none(), || format!("`{field}`: {message} quotes a secret"))?;
        }
        Ok(())
    });
}
