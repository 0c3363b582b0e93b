//! Security: validation. What a key holder sends is checked against the rules of the broker it
//! reaches: native names cannot address other topics, headers mean the same on every broker,
//! names are bounded, documents have named fields, secrets are not shown to readers, a revoked
//! key stops streaming, and a lease is settled only by the key that took it.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use futures::StreamExt;
use polybus_registry::Kind;
use polybus_server::ApiKeys;
use serde_json::{Value, json};

use crate::common::{EventStream, TestApi};

/// A broker `bus` with an embedded env `dev` and envs of the given types (no broker is reached).
async fn broker_with(api: &TestApi, envs: &[(&str, Value)]) {
    let mut all =
        vec![json!({"slug": "dev", "type": "embedded", "config": {"path": crate::common::BROKER_DB}})];
    all.extend(envs.iter().map(|(slug, env)| {
        let mut env = env.clone();
        env["slug"] = json!(slug);
        env
    }));
    api.ok(
        "POST",
        "/v1/brokers",
        Some(json!({"name": "Bus", "tag": "bus", "envs": all})),
        StatusCode::CREATED,
    )
    .await;
}

fn rabbitmq() -> Value {
    json!({"type": "rabbitmq", "config": {"url": "amqp://127.0.0.1:5672"}})
}

#[tokio::test]
async fn wildcard_native_names_cannot_subscribe_to_other_topics() {
    let api = TestApi::new().await;
    broker_with(&api, &[("prd", rabbitmq()), ("edge", json!({"type": "mqtt", "config": {"host": "h"}}))])
        .await;
    for (env, name) in [("prd", "#"), ("prd", "*"), ("prd", "a.*"), ("edge", "#"), ("edge", "a/+")] {
        let topic = json!({"tag": "bus:all", "envs": [{"slug": env, "nativeName": name}]});
        let error =
            api.fails("POST", "/v1/topics", Some(topic), StatusCode::BAD_REQUEST, "VALIDATION_FAILED").await;
        assert_eq!(
            (error["env"].as_str(), error["field"].as_str()),
            (Some(env), Some("nativeName")),
            "{error}"
        );
        assert!(error["message"].as_str().is_some_and(|m| m.contains("wildcard")), "{error}");
    }
    // A patch cannot do it either, nor a dead-letter destination.
    api.ok("POST", "/v1/topics", Some(json!({"tag": "bus:orders"})), StatusCode::CREATED).await;
    let patch = json!({"envs": [{"slug": "prd", "nativeName": "#"}]});
    api.fails("PATCH", "/v1/topics/bus:orders", Some(patch), StatusCode::BAD_REQUEST, "VALIDATION_FAILED")
        .await;
    let patch = json!({"deadLetter": "orders.#"});
    let error = api
        .fails("PATCH", "/v1/topics/bus:orders", Some(patch), StatusCode::BAD_REQUEST, "VALIDATION_FAILED")
        .await;
    assert_eq!(error["field"], "deadLetter");
}

#[tokio::test]
async fn topic_names_are_checked_against_the_env_broker() {
    let api = TestApi::new().await;
    let pubsub = json!({"type": "google_pubsub", "config": {"projectId": "proj"}});
    let sqs = json!({"type": "aws_sqs", "config": {"region": "eu-west-1"}});
    broker_with(&api, &[("gcp", pubsub), ("aws", sqs)]).await;
    for name in ["with space", "nul\u{0}byte", "#", "goog-orders", "1orders"] {
        let topic = json!({"tag": "bus:orders", "envs": [{"slug": "gcp", "topicName": name}]});
        let error =
            api.fails("POST", "/v1/topics", Some(topic), StatusCode::BAD_REQUEST, "VALIDATION_FAILED").await;
        assert_eq!(
            (error["env"].as_str(), error["field"].as_str()),
            (Some("gcp"), Some("nativeName")),
            "{name:?}: `topicName` is read as `nativeName`"
        );
        assert!(!error["message"].as_str().unwrap_or_default().contains('\0'), "{error}");
    }
    let topic = json!({"tag": "bus:orders", "envs": [{"slug": "aws", "queueUrl": "file:///etc/passwd"}]});
    let error =
        api.fails("POST", "/v1/topics", Some(topic), StatusCode::BAD_REQUEST, "VALIDATION_FAILED").await;
    assert_eq!(error["field"], "options.queueUrl");
}

#[tokio::test]
async fn a_wildcard_topic_stored_before_the_rules_is_refused_when_used() {
    let api = TestApi::new().await;
    broker_with(&api, &[("prd", rabbitmq())]).await;
    let doc =
        json!({"name": "all", "tag": "bus:all", "envs": [{"slug": "prd", "nativeName": "#"}], "version": 1});
    api.state
        .registry()
        .store()
        .insert(Kind::Topic, "bus:all", Some("bus"), &doc)
        .await
        .expect("stored as-is");
    let pull = "/v1/envs/prd/events/bus:all/subscriptions/spy/pull";
    let error = api
        .fails("POST", pull, Some(json!({"waitMs": 0})), StatusCode::BAD_REQUEST, "VALIDATION_FAILED")
        .await;
    assert_eq!(
        (error["env"].as_str(), error["field"].as_str()),
        (Some("prd"), Some("nativeName")),
        "{error}"
    );
}

#[tokio::test]
async fn secrets_in_kafka_properties_and_url_passwords_with_slashes_are_not_shown_to_readers() {
    let api = TestApi::new().await;
    let kafka = json!({"type": "kafka", "config": {"brokers": ["k:9092"], "properties": {
        "sasl.password": "pw-sasl", "ssl.key.password": "pw-key", "ssl.keystore.password": "pw-store",
        "sasl.jaas.config": "PlainLoginModule required username=\"u\" password=\"pw-jaas\";",
        "ssl.endpoint.identification.algorithm": "https"}}});
    let amqp = json!({"type": "rabbitmq", "config": {"url": "amqp://app:pw/slash@rabbit:5672/"}});
    broker_with(&api, &[("k", kafka), ("r", amqp)]).await;
    for path in ["/v1/brokers/bus", "/v1/brokers"] {
        let (status, body) = api.call("GET", path, Some(&api.reader), None).await;
        assert_eq!(status, StatusCode::OK);
        let shown = body.to_string();
        assert!(!shown.contains("pw-") && !shown.contains("pw/slash"), "{path}: {shown}");
        assert!(shown.contains("amqp://app:****@rabbit:5672/"), "{shown}");
        assert!(
            shown.contains("\"ssl.endpoint.identification.algorithm\":\"https\""),
            "public settings stay readable: {shown}"
        );
    }
}

/// Reads an event stream until it ends; fails after `within`.
async fn rest_of_stream(events: EventStream, within: Duration) -> String {
    let (mut text, mut data) = events.into_parts();
    tokio::time::timeout(within, async {
        while let Some(chunk) = data.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.expect("stream failed")));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the stream was still open after {within:?}; it sent: {text:?}"));
    text
}

#[tokio::test]
async fn a_revoked_key_stops_streaming_within_a_second() {
    let api = TestApi::new().await;
    let event = api.embedded_topic("bus", "orders").await;
    let streamer = api.state.keys().create("streamer", false).await.expect("key").secret;
    let request = Request::get(format!("/v1/envs/dev/events/{event}/subscriptions/g/stream"))
        .header(header::AUTHORIZATION, format!("Bearer {streamer}"))
        .body(Body::empty())
        .expect("request");
    let response = api.send(request).await;
    assert_eq!(response.status(), StatusCode::OK);
    api.publish(&event, json!({"payload": "before"})).await;
    let mut events = EventStream::new(response);
    let first = events.next(Duration::from_secs(10)).await;
    assert_eq!(first.event, "message", "{first:?}");

    // Revoked as `polybus key revoke` does it: another process, writing the registry directly.
    let elsewhere = ApiKeys::new(api.state.registry());
    let revoked_at = Instant::now();
    assert!(elsewhere.revoke("streamer").await.expect("revoke"));
    let rest = rest_of_stream(events, Duration::from_secs(1)).await;
    assert!(revoked_at.elapsed() < Duration::from_secs(1));
    assert!(rest.contains("event: error") && rest.contains("UNAUTHORIZED"), "{rest:?}");
    assert!(!rest.contains("event: message"), "{rest:?}");
}

#[tokio::test]
async fn reserved_and_malformed_headers_are_refused_the_same_way_for_every_broker() {
    let api = TestApi::new().await;
    let event = api.embedded_topic("bus", "orders").await;
    let path = format!("/v1/envs/dev/events/{event}/messages");
    for headers in [
        json!({"polybus-attempt": "999"}),
        json!({"Polybus-Dead-Letter-Reason": "x"}),
        json!({"Nats-Rollup": "all"}),
        json!({"x-delivery-count": "999"}),
        json!({"CC": "other-topic"}),
        json!({"a\u{0}b": "v"}),
        json!({"": "v"}),
        json!({"h": "v\r\nInjected: 1"}),
        json!({"h": "v".repeat(1025)}),
    ] {
        let body = json!({"payload": 1, "headers": headers});
        let error = api.fails("POST", &path, Some(body), StatusCode::BAD_REQUEST, "VALIDATION_FAILED").await;
        assert_eq!(error["field"], "headers", "{headers}: {error}");
    }
    let batch = json!({"messages": [{"payload": 1}, {"payload": 2, "headers": {"polybus-id": "forged"}}]});
    let error = api.fails("POST", &path, Some(batch), StatusCode::BAD_REQUEST, "VALIDATION_FAILED").await;
    assert_eq!(error["field"], "messages[1].headers");
    let key = json!({"payload": 1, "key": "k\u{0}"});
    let error = api.fails("POST", &path, Some(key), StatusCode::BAD_REQUEST, "VALIDATION_FAILED").await;
    assert_eq!(error["field"], "key");
    // Nothing of the refused batch was published; a valid message still goes through.
    api.publish(&event, json!({"payload": "fine", "encoding": "text", "headers": {"x-tenant": "a b: c"}}))
        .await;
    let got = api.pull(&event, "g", json!({"max": 10, "waitMs": 3000})).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["headers"], json!({"x-tenant": "a b: c"}));
}

#[tokio::test]
async fn names_and_descriptions_are_bounded_and_free_of_control_characters() {
    let api = TestApi::new().await;
    let embedded = json!([{"slug": "dev", "type": "embedded"}]);
    for (field, broker) in [
        ("name", json!({"name": "n".repeat(65_536), "tag": "big", "envs": embedded})),
        (
            "description",
            json!({"name": "N", "description": "d".repeat(1 << 20), "tag": "big", "envs": embedded}),
        ),
        ("name", json!({"name": "evil\u{1b}]0;owned\u{7}", "tag": "big", "envs": embedded})),
    ] {
        let error = api
            .fails("POST", "/v1/brokers", Some(broker), StatusCode::BAD_REQUEST, "VALIDATION_FAILED")
            .await;
        assert_eq!(error["field"], field);
        assert!(!error["message"].as_str().unwrap_or_default().contains('\u{1b}'), "{error}");
    }
    api.embedded_topic("bus", "orders").await;
    let patch = json!({"name": "t".repeat(201)});
    let error = api
        .fails("PATCH", "/v1/topics/bus:orders", Some(patch), StatusCode::BAD_REQUEST, "VALIDATION_FAILED")
        .await;
    assert_eq!(error["field"], "name");
}

#[tokio::test]
async fn arrays_are_refused_where_objects_are_expected() {
    let api = TestApi::new().await;
    let event = api.embedded_topic("bus", "orders").await;
    let broker = json!(["Bus", "array-bus", null, [["dev", "embedded", {}]]]);
    api.fails("POST", "/v1/brokers", Some(broker), StatusCode::BAD_REQUEST, "VALIDATION_FAILED").await;
    let (status, _) = api.call("GET", "/v1/brokers/array-bus", Some(&api.admin), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let base = format!("/v1/envs/dev/events/{event}");
    for (path, body, field) in [
        (format!("{base}/messages"), json!([null, "by position", "text"]), "body"),
        (format!("{base}/messages"), json!({"messages": [[null, "by position", "text"]]}), "messages[0]"),
        (format!("{base}/subscriptions/g/pull"), json!([5, 1000, 0]), "body"),
        (format!("{base}/subscriptions/g/ack"), json!([["lease"]]), "body"),
        ("/v1/topics".to_owned(), json!({"tag": "bus:x", "envs": [["dev", "x"]]}), "envs[0]"),
    ] {
        let error = api.fails("POST", &path, Some(body), StatusCode::BAD_REQUEST, "VALIDATION_FAILED").await;
        assert_eq!(error["field"], field, "{path}: {error}");
    }
}

#[tokio::test]
async fn a_lease_is_settled_only_by_the_key_that_took_it() {
    let api = TestApi::new().await;
    let event = api.embedded_topic("bus", "orders").await;
    let other = api.state.keys().create("other", false).await.expect("key").secret;
    api.publish(&event, json!({"payload": 1})).await;
    let leased = api.pull(&event, "g", json!({"waitMs": 3000})).await;
    let lease = leased[0]["leaseId"].clone();
    let ack = format!("/v1/envs/dev/events/{event}/subscriptions/g/ack");

    let (status, by_other) = api.call("POST", &ack, Some(&other), Some(json!({"leaseIds": [lease]}))).await;
    assert_eq!(status, StatusCode::OK);
    let (_, unknown) =
        api.call("POST", &ack, Some(&other), Some(json!({"leaseIds": ["no-such-lease"]}))).await;
    assert_eq!(by_other["settled"], json!([]));
    let failure = &by_other["failed"][0]["error"];
    assert_eq!(failure["code"], "LEASE_NOT_FOUND");
    let unknown = &unknown["failed"][0]["error"]["message"];
    assert_eq!(
        failure["message"].as_str().map(|m| m.replace(lease.as_str().unwrap_or_default(), "ID")),
        unknown.as_str().map(|m| m.replace("no-such-lease", "ID")),
        "the same answer as for an unknown lease"
    );

    let by_owner = api.ack(&event, "g", json!({"leaseIds": [lease]})).await;
    assert_eq!(by_owner["settled"], json!([lease]));
}
