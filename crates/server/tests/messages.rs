//! Publishing, consuming over SSE and pull, leases, acks and redelivery, on the embedded broker.

mod common;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use common::{EventStream, TestApi};
use serde_json::{Value, json};

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn stream_request(api: &TestApi, event: &str, group: &str, query: &str) -> Request<Body> {
    Request::get(format!("/v1/envs/dev/events/{event}/subscriptions/{group}/stream?{query}"))
        .header(header::AUTHORIZATION, format!("Bearer {}", api.admin))
        .body(Body::empty())
        .expect("request")
}

#[tokio::test]
async fn payloads_as_json_text_and_base64_come_back_as_published() {
    let api = TestApi::new().await;
    let event = api.embedded_topic("bus", "orders").await;
    let one = api
        .publish(&event, json!({"payload": {"order": 42}, "key": "customer-42", "headers": {"h": "v"}}))
        .await;
    assert_eq!(one.len(), 1);
    let batch = api
        .publish(
            &event,
            json!({"messages": [
                {"payload": "plain text", "encoding": "text"},
                {"payload": "/wAB", "encoding": "base64"},
                {"id": "my-id", "payload": [1, 2], "contentType": "application/vnd.x+json"},
            ]}),
        )
        .await;
    assert_eq!(batch.len(), 3);
    assert_eq!(batch[2], "my-id");

    let messages = api.pull(&event, "g", json!({"max": 10, "waitMs": 5000})).await;
    let got: Vec<(Value, Value)> =
        messages.iter().map(|m| (m["payload"].clone(), m["encoding"].clone())).collect();
    assert_eq!(
        got,
        vec![
            (json!({"order": 42}), json!("json")),
            (json!("plain text"), json!("text")),
            (json!("/wAB"), json!("base64")),
            (json!([1, 2]), json!("json")),
        ]
    );
    assert_eq!(messages[0]["id"], one[0]);
    assert_eq!(messages[0]["key"], "customer-42");
    assert_eq!(messages[0]["headers"], json!({"h": "v"}));
    assert_eq!(messages[0]["contentType"], "application/json");
    assert_eq!(messages[0]["attempt"], 1);
    assert_eq!(messages[1]["contentType"], "text/plain");
    assert_eq!(messages[3]["contentType"], "application/vnd.x+json");
    let leases: Vec<&Value> = messages.iter().map(|m| &m["leaseId"]).collect();
    let acked = api.ack(&event, "g", json!({"leaseIds": leases})).await;
    assert_eq!(acked["settled"].as_array().map(Vec::len), Some(4));
    assert_eq!(acked["failed"], json!([]));
}

#[tokio::test]
async fn traceparent_of_the_request_travels_in_the_message_headers() {
    let api = TestApi::new().await;
    let event = api.embedded_topic("bus", "traced").await;
    let request = Request::post(format!("/v1/envs/dev/events/{event}/messages"))
        .header(header::AUTHORIZATION, format!("Bearer {}", api.admin))
        .header("traceparent", TRACEPARENT)
        .header("tracestate", "vendor=1")
        .body(Body::from(json!({"payload": "hi", "encoding": "text"}).to_string()))
        .expect("request");
    assert_eq!(api.send(request).await.status(), StatusCode::OK);
    let messages = api.pull(&event, "g", json!({"waitMs": 5000})).await;
    assert_eq!(messages[0]["headers"], json!({"traceparent": TRACEPARENT, "tracestate": "vendor=1"}));
}

#[tokio::test]
async fn publishing_to_what_does_not_exist_names_it() {
    let api = TestApi::new().await;
    let event = api.embedded_topic("bus", "orders").await;
    let body = Some(json!({"payload": 1}));
    let error = api
        .fails(
            "POST",
            &format!("/v1/envs/prd/events/{event}/messages"),
            body.clone(),
            StatusCode::NOT_FOUND,
            "BROKER_ENV_NOT_FOUND",
        )
        .await;
    assert!(error["message"].as_str().expect("message").contains("no env `prd`"));
    api.fails(
        "POST",
        "/v1/envs/dev/events/bus:missing/messages",
        body.clone(),
        StatusCode::NOT_FOUND,
        "TOPIC_NOT_FOUND",
    )
    .await;
    api.fails(
        "POST",
        "/v1/envs/dev/events/nobus:orders/messages",
        body.clone(),
        StatusCode::NOT_FOUND,
        "TOPIC_NOT_FOUND",
    )
    .await;
    let error = api
        .fails(
            "POST",
            "/v1/envs/dev/events/orders/messages",
            body,
            StatusCode::BAD_REQUEST,
            "VALIDATION_FAILED",
        )
        .await;
    assert_eq!(error["field"], "event");
    let path = format!("/v1/envs/dev/events/{event}/subscriptions/g/pull");
    api.fails(
        "POST",
        &path.replace("/dev/", "/prd/"),
        Some(json!({})),
        StatusCode::NOT_FOUND,
        "BROKER_ENV_NOT_FOUND",
    )
    .await;
    api.fails(
        "POST",
        &path.replace("orders", "missing"),
        Some(json!({})),
        StatusCode::NOT_FOUND,
        "TOPIC_NOT_FOUND",
    )
    .await;
    let (status, body) = api
        .call("GET", "/v1/envs/dev/events/bus:missing/subscriptions/g/stream", Some(&api.admin), None)
        .await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("TOPIC_NOT_FOUND")));
}

#[tokio::test]
async fn bad_messages_name_the_field() {
    let api = TestApi::new().await;
    let event = api.embedded_topic("bus", "orders").await;
    let path = format!("/v1/envs/dev/events/{event}/messages");
    let cases = [
        (json!({}), "payload"),
        (json!({"payload": 1, "colour": "red"}), "colour"),
        (json!({"payload": 1, "encoding": "rot13"}), "encoding"),
        (json!({"payload": 1, "encoding": "text"}), "payload"),
        (json!({"payload": "***", "encoding": "base64"}), "payload"),
        (json!({"payload": 1, "delayMs": -5}), "delayMs"),
        (json!({"payload": 1, "delayMs": 40u64 * 24 * 3600 * 1000}), "delayMs"),
        (json!({"payload": 1, "headers": {"a": 1}}), "headers.a"),
        (json!({"messages": []}), "messages"),
        (json!({"messages": [{"payload": 1}, {"payload": 2, "encoding": "text"}]}), "messages[1].payload"),
        (json!({"messages": [{"payload": 1}, {}]}), "messages[1].payload"),
    ];
    for (body, field) in cases {
        let error =
            api.fails("POST", &path, Some(body.clone()), StatusCode::BAD_REQUEST, "VALIDATION_FAILED").await;
        assert_eq!(error["field"], field, "{body}: {error}");
    }
    let too_many: Vec<Value> = (0..1001).map(|i| json!({"payload": i})).collect();
    let error = api
        .fails(
            "POST",
            &path,
            Some(json!({"messages": too_many})),
            StatusCode::BAD_REQUEST,
            "VALIDATION_FAILED",
        )
        .await;
    assert_eq!(error["field"], "messages");
    let (status, body) = api.call_raw("POST", &path, Some(&api.admin), Some(b"payload=1".to_vec())).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("INVALID_JSON")));
}

#[tokio::test]
async fn sse_stream_delivers_with_leases_and_ack_settles() {
    let api = TestApi::new().await;
    let event = api.embedded_topic("bus", "streamed").await;
    let ids = api
        .publish(
            &event,
            json!({"messages": [{"payload": "a", "encoding": "text"}, {"payload": "b", "encoding": "text"}]}),
        )
        .await;
    let response = api.send(stream_request(&api, &event, "sse", "ackDeadlineMs=10000")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()[header::CONTENT_TYPE], "text/event-stream");
    let mut events = EventStream::new(response);
    let mut leases = Vec::new();
    for expected in &ids {
        let sse = events.next(Duration::from_secs(10)).await;
        assert_eq!(sse.event, "message");
        let message: Value = serde_json::from_str(&sse.data).expect("JSON data");
        assert_eq!(&message["id"], expected);
        assert_eq!(sse.id.as_deref(), message["leaseId"].as_str());
        leases.push(message["leaseId"].clone());
    }
    let acked = api.ack(&event, "sse", json!({"leaseIds": leases})).await;
    assert_eq!(acked["settled"].as_array().map(Vec::len), Some(2), "{acked}");
    let again = api.ack(&event, "sse", json!({"leaseIds": [leases[0]]})).await;
    assert_eq!(again["failed"][0]["error"]["code"], "LEASE_NOT_FOUND");

    let later = api.publish(&event, json!({"payload": "c", "encoding": "text"})).await;
    let sse = events.next(Duration::from_secs(10)).await;
    let message: Value = serde_json::from_str(&sse.data).expect("JSON data");
    assert_eq!((&message["id"], message["attempt"].as_u64()), (&json!(later[0]), Some(1)));
    drop(events);
    let stats = api.ok("GET", "/v1/stats", None, StatusCode::OK).await;
    assert_eq!(
        (stats["topics"][0]["delivered"].as_u64(), stats["topics"][0]["acked"].as_u64()),
        (Some(3), Some(2))
    );
}

#[tokio::test]
async fn a_client_that_drops_its_stream_gets_the_unacked_message_again() {
    let api = TestApi::new().await;
    let event = api.embedded_topic("bus", "dropped").await;
    let ids = api.publish(&event, json!({"payload": "once", "encoding": "text"})).await;
    let mut events = EventStream::new(api.send(stream_request(&api, &event, "g", "ackDeadlineMs=300")).await);
    let first: Value = serde_json::from_str(&events.next(Duration::from_secs(10)).await.data).expect("JSON");
    assert_eq!((&first["id"], first["attempt"].as_u64()), (&json!(ids[0]), Some(1)));
    drop(events);

    let again = api.pull(&event, "g", json!({"waitMs": 10000, "ackDeadlineMs": 5000})).await;
    assert_eq!(again.len(), 1);
    assert_eq!((&again[0]["id"], again[0]["attempt"].as_u64()), (&json!(ids[0]), Some(2)));
    let stale = api.ack(&event, "g", json!({"leaseIds": [first["leaseId"]]})).await;
    assert_eq!(stale["failed"][0]["error"]["code"], "LEASE_NOT_FOUND");
    let acked = api.ack(&event, "g", json!({"leaseIds": [again[0]["leaseId"]]})).await;
    assert_eq!(acked["settled"], json!([again[0]["leaseId"]]));
}

#[tokio::test]
async fn pulled_message_whose_lease_expires_is_redelivered() {
    let api = TestApi::new().await;
    let event = api.embedded_topic("bus", "leased").await;
    let ids = api.publish(&event, json!({"payload": {"n": 1}})).await;
    let first = api.pull(&event, "workers", json!({"max": 5, "ackDeadlineMs": 1000, "waitMs": 5000})).await;
    assert_eq!(first.len(), 1);
    assert_eq!((&first[0]["id"], first[0]["attempt"].as_u64()), (&json!(ids[0]), Some(1)));
    assert!(first[0]["leaseExpiresAt"].is_string());
    let none = api.pull(&event, "workers", json!({"ackDeadlineMs": 1000, "waitMs": 0})).await;
    assert!(none.is_empty(), "leased to someone else until it expires: {none:?}");

    tokio::time::sleep(Duration::from_millis(1200)).await;
    let second = api.pull(&event, "workers", json!({"ackDeadlineMs": 1000, "waitMs": 5000})).await;
    assert_eq!(second.len(), 1);
    assert_eq!((&second[0]["id"], second[0]["attempt"].as_u64()), (&json!(ids[0]), Some(2)));
    assert_ne!(second[0]["leaseId"], first[0]["leaseId"]);
    let result =
        api.ack(&event, "workers", json!({"leaseIds": [first[0]["leaseId"], second[0]["leaseId"]]})).await;
    assert_eq!(result["settled"], json!([second[0]["leaseId"]]));
    assert_eq!(result["failed"][0]["leaseId"], first[0]["leaseId"]);
    let stats = api.ok("GET", "/v1/stats", None, StatusCode::OK).await;
    assert_eq!(stats["topics"][0]["nacked"], 1, "the expired lease was nacked: {stats}");
}

#[tokio::test]
async fn delayed_message_is_delivered_after_its_delay() {
    let api = TestApi::new().await;
    let event = api.embedded_topic("bus", "later").await;
    let started = std::time::Instant::now();
    let ids = api.publish(&event, json!({"payload": "later", "encoding": "text", "delayMs": 800})).await;
    assert!(api.pull(&event, "g", json!({"waitMs": 200})).await.is_empty(), "not before its delay");
    let messages = api.pull(&event, "g", json!({"waitMs": 10000})).await;
    assert_eq!(messages[0]["id"], ids[0]);
    assert!(started.elapsed() >= Duration::from_millis(800), "{:?}", started.elapsed());
}

#[tokio::test]
async fn nack_redelivers_and_dead_letter_gives_up() {
    let api = TestApi::new().await;
    let event = api.embedded_topic("bus", "retried").await;
    let ids = api.publish(&event, json!({"payload": 7})).await;
    let first = api.pull(&event, "g", json!({"waitMs": 5000})).await;
    let nacked = api.ack(&event, "g", json!({"leaseIds": [first[0]["leaseId"]], "nack": true})).await;
    assert_eq!(nacked["settled"].as_array().map(Vec::len), Some(1), "{nacked}");
    let second = api.pull(&event, "g", json!({"waitMs": 5000})).await;
    assert_eq!((&second[0]["id"], second[0]["attempt"].as_u64()), (&json!(ids[0]), Some(2)));
    let dead = api
        .ack(&event, "g", json!({"leaseIds": [second[0]["leaseId"]], "deadLetter": true, "reason": "poison"}))
        .await;
    assert_eq!(dead["settled"].as_array().map(Vec::len), Some(1), "{dead}");
    assert!(api.pull(&event, "g", json!({"waitMs": 300})).await.is_empty());
    let stats = api.ok("GET", "/v1/stats", None, StatusCode::OK).await;
    assert_eq!(
        (stats["topics"][0]["nacked"].as_u64(), stats["topics"][0]["deadLettered"].as_u64()),
        (Some(1), Some(1))
    );
}

#[tokio::test]
async fn pull_and_ack_requests_are_validated() {
    let api = TestApi::new().await;
    let event = api.embedded_topic("bus", "orders").await;
    let pull = format!("/v1/envs/dev/events/{event}/subscriptions/g/pull");
    let ack = format!("/v1/envs/dev/events/{event}/subscriptions/g/ack");
    for (path, body, field) in [
        (&pull, json!({"max": 0}), "max"),
        (&pull, json!({"max": 100000}), "max"),
        (&pull, json!({"ackDeadlineMs": 5}), "ackDeadlineMs"),
        (&pull, json!({"waitMs": 3600000}), "waitMs"),
        (&pull, json!({"maxx": 1}), "maxx"),
        (&ack, json!({"leaseIds": []}), "leaseIds"),
        (&ack, json!({}), "leaseIds"),
        (&ack, json!({"leaseIds": ["x"], "nack": true, "deadLetter": true}), "deadLetter"),
        (&ack, json!({"leaseIds": ["x"], "delayMs": 5}), "delayMs"),
        (&ack, json!({"leaseIds": ["x"], "nack": true, "delayMs": u64::MAX}), "delayMs"),
    ] {
        let error =
            api.fails("POST", path, Some(body.clone()), StatusCode::BAD_REQUEST, "VALIDATION_FAILED").await;
        assert_eq!(error["field"], field, "{body}: {error}");
    }
    let error = api
        .fails(
            "POST",
            &pull.replace("/g/", "/Bad Group/").replace(' ', "%20"),
            Some(json!({})),
            StatusCode::BAD_REQUEST,
            "VALIDATION_FAILED",
        )
        .await;
    assert_eq!(error["field"], "group");
    let (status, body) = api.call_raw("POST", &pull, Some(&api.admin), None).await;
    assert_eq!(
        (status, body["messages"].clone()),
        (StatusCode::OK, json!([])),
        "an empty body takes the defaults"
    );
    let (status, body) = api
        .call(
            "GET",
            &format!("/v1/envs/dev/events/{event}/subscriptions/g/stream?prefetch=0"),
            Some(&api.admin),
            None,
        )
        .await;
    assert_eq!((status, body["error"]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("prefetch")));
}

#[tokio::test]
async fn pull_takes_up_to_max_ready_messages_in_one_request() {
    let api = TestApi::new().await;
    let event = api.embedded_topic("bus", "pulled").await;
    let messages: Vec<Value> = (0..30).map(|n| json!({"payload": {"n": n}})).collect();
    let ids = api.publish(&event, json!({ "messages": messages })).await;
    let first = api.pull(&event, "g", json!({"max": 12, "waitMs": 5000})).await;
    assert_eq!(first.len(), 12, "all 30 are ready: a pull takes as many as it may");
    let rest = api.pull(&event, "g", json!({"max": 100, "waitMs": 5000})).await;
    let pulled: Vec<Value> = first.iter().chain(&rest).map(|m| m["id"].clone()).collect();
    let published: Vec<Value> = ids.iter().map(|id| json!(id)).collect();
    assert_eq!(pulled, published, "every message once, in publish order");
    let leases: Vec<&Value> = first.iter().chain(&rest).map(|m| &m["leaseId"]).collect();
    let acked = api.ack(&event, "g", json!({ "leaseIds": leases })).await;
    assert_eq!((acked["settled"].as_array().map(Vec::len), &acked["failed"]), (Some(30), &json!([])));
    assert!(api.pull(&event, "g", json!({"waitMs": 300})).await.is_empty(), "nothing comes back");
}

#[tokio::test]
async fn a_key_published_twice_is_sent_once_and_the_key_can_be_checked() {
    let api = TestApi::new().await;
    let event = api.embedded_topic("bus", "payments").await;
    let path = format!("/v1/envs/dev/events/{event}/messages");
    let check = format!("/v1/envs/dev/events/{event}/idempotency/pay-1");
    let free = api.ok("GET", &check, None, StatusCode::OK).await;
    assert_eq!(free, json!({"key": "pay-1", "record": null}));

    let body = json!({"payload": "charge", "encoding": "text", "idempotencyKey": "pay-1"});
    let first = api.ok("POST", &path, Some(body.clone()), StatusCode::OK).await;
    assert_eq!((first["duplicate"].clone(), first["duplicates"].clone()), (json!(false), json!([false])));
    let second = api.ok("POST", &path, Some(body), StatusCode::OK).await;
    assert_eq!((second["duplicate"].clone(), second["ids"].clone()), (json!(true), first["ids"].clone()));
    let batch = json!({"messages": [
        {"payload": "again", "encoding": "text", "idempotencyKey": "pay-1"},
        {"payload": "other", "encoding": "text", "idempotencyKey": "pay-2"},
    ]});
    let batch = api.ok("POST", &path, Some(batch), StatusCode::OK).await;
    assert_eq!(batch["duplicates"], json!([true, false]));
    assert_eq!(batch["ids"][0], first["ids"][0]);
    assert!(batch.get("duplicate").is_none(), "{batch}");

    let messages = api.pull(&event, "g", json!({"max": 10, "waitMs": 2000})).await;
    let payloads: Vec<&Value> = messages.iter().map(|m| &m["payload"]).collect();
    assert_eq!(payloads, [&json!("charge"), &json!("other")]);

    let held = api.ok("GET", &check, None, StatusCode::OK).await;
    assert_eq!(held["record"]["messageId"], first["ids"][0]);
    assert_eq!(held["record"]["state"], "published");
    assert!(held["record"]["expiresAt"].as_str().is_some_and(|t| t.ends_with('Z')), "{held}");

    let error = api
        .fails(
            "POST",
            &path,
            Some(json!({"payload": 1, "idempotencyKey": "a\u{7}b"})),
            StatusCode::BAD_REQUEST,
            "VALIDATION_FAILED",
        )
        .await;
    assert_eq!(error["field"], "idempotencyKey");
    api.fails(
        "GET",
        "/v1/envs/dev/events/bus:nothing/idempotency/pay-1",
        None,
        StatusCode::NOT_FOUND,
        "TOPIC_NOT_FOUND",
    )
    .await;
}
