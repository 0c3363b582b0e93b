//! `POST …/replay` and `GET …/messages` on the embedded broker, in-process.

mod common;

use axum::http::StatusCode;
use common::TestApi;
use serde_json::{Value, json};

fn ids(messages: &[Value]) -> Vec<String> {
    messages.iter().map(|m| m["id"].as_str().expect("id").to_owned()).collect()
}

/// Pulls and acks until `count` messages arrived (a key's next message waits for its ack).
async fn pull_and_ack(api: &TestApi, event: &str, count: usize) -> Vec<String> {
    let mut got = Vec::new();
    while got.len() < count {
        let pulled = api.pull(event, "billing", json!({"max": count, "waitMs": 5000})).await;
        assert!(!pulled.is_empty(), "received {} of {count}", got.len());
        let leases: Vec<Value> = pulled.iter().map(|m| m["leaseId"].clone()).collect();
        api.ack(event, "billing", json!({"leaseIds": leases})).await;
        got.extend(ids(&pulled));
    }
    got
}

#[tokio::test]
async fn a_replayed_group_gets_every_message_again_and_stored_messages_are_queried() {
    let api = TestApi::new().await;
    let event = api.embedded_topic("bus", "orders").await;
    let mut sent = Vec::new();
    for (n, key) in [(1, "a"), (2, "b"), (3, "a")] {
        sent.extend(api.publish(&event, json!({"payload": {"n": n}, "key": key})).await);
    }
    assert_eq!(pull_and_ack(&api, &event, 3).await, sent);

    let replay = format!("/v1/envs/dev/events/{event}/replay");
    let replayed =
        api.ok("POST", &replay, Some(json!({"group": "billing", "from": "beginning"})), StatusCode::OK).await;
    assert_eq!(replayed, json!({"group": "billing", "from": "beginning"}));
    assert_eq!(pull_and_ack(&api, &event, 3).await, sent, "every message again, in order");

    let query = format!("/v1/envs/dev/events/{event}/messages");
    let keyed = api.ok("GET", &format!("{query}?key=a"), None, StatusCode::OK).await;
    let keyed = keyed["messages"].as_array().expect("messages").clone();
    assert_eq!(ids(&keyed), [sent[0].clone(), sent[2].clone()], "key a, oldest first");
    assert_eq!((&keyed[0]["payload"], &keyed[0]["encoding"]), (&json!({"n": 1}), &json!("json")));
    assert_eq!(keyed[0]["key"], "a");
    assert!(keyed[0]["position"].is_string(), "{}", keyed[0]);
    let by_id = api.ok("GET", &format!("{query}?id={}&limit=5", sent[1]), None, StatusCode::OK).await;
    assert_eq!(ids(by_id["messages"].as_array().expect("messages")), [sent[1].clone()]);
    let later = api.ok("GET", &format!("{query}?since=2999-01-01T00:00:00Z"), None, StatusCode::OK).await;
    assert_eq!(later, json!({"messages": []}));

    // A read-only key reads stored messages but cannot move a group.
    let reader = Some(api.reader.as_str());
    let (status, body) = api.call("GET", &query, reader, None).await;
    assert_eq!((status, body["messages"].as_array().map(Vec::len)), (StatusCode::OK, Some(3)), "{body}");
    let body = json!({"group": "billing", "from": "beginning"});
    let (status, answer) = api.call("POST", &replay, reader, Some(body)).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("FORBIDDEN")));
}

#[tokio::test]
async fn replay_and_query_requests_are_validated() {
    let api = TestApi::new().await;
    let event = api.embedded_topic("bus", "orders").await;
    let replay = format!("/v1/envs/dev/events/{event}/replay");
    let error = api
        .fails(
            "POST",
            &replay,
            Some(json!({"group": "g", "from": "yesterday"})),
            StatusCode::BAD_REQUEST,
            "VALIDATION_FAILED",
        )
        .await;
    assert_eq!(error["field"], "from");
    let error = api
        .fails(
            "POST",
            &replay,
            Some(json!({"group": "no spaces", "from": "beginning"})),
            StatusCode::BAD_REQUEST,
            "VALIDATION_FAILED",
        )
        .await;
    assert_eq!(error["field"], "group");
    let missing = json!({"from": "beginning"});
    let error = api.fails("POST", &replay, Some(missing), StatusCode::BAD_REQUEST, "VALIDATION_FAILED").await;
    assert_eq!(error["field"], "group");

    let query = format!("/v1/envs/dev/events/{event}/messages");
    for (params, field) in [
        ("since=today", "since"),
        ("until=2026-13-01T00:00:00Z", "until"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("since=2026-01-02T00:00:00Z&until=2026-01-01T00:00:00Z", "until"),
    ] {
        let error = api
            .fails("GET", &format!("{query}?{params}"), None, StatusCode::BAD_REQUEST, "VALIDATION_FAILED")
            .await;
        assert_eq!(error["field"], field, "{params}: {error}");
    }
    api.fails(
        "GET",
        "/v1/envs/dev/events/bus:missing/messages",
        None,
        StatusCode::NOT_FOUND,
        "TOPIC_NOT_FOUND",
    )
    .await;
}
