//! The registry routes, auth, errors, operations and the OpenAPI document, in-process.

mod common;

use std::collections::BTreeSet;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use common::TestApi;
use polybus_server::Options;
use serde_json::{Value, json};

/// Every route the server has, as `(METHOD, path)`.
const ROUTES: [(&str, &str); 41] = [
    ("GET", "/"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/v1/stats"),
    ("GET", "/v1/openapi.json"),
    ("GET", "/v1/schema/broker"),
    ("GET", "/v1/schema/topic"),
    ("POST", "/v1/brokers"),
    ("GET", "/v1/brokers"),
    ("GET", "/v1/brokers/{tag}"),
    ("PATCH", "/v1/brokers/{tag}"),
    ("DELETE", "/v1/brokers/{tag}"),
    ("POST", "/v1/brokers/{tag}/test"),
    ("POST", "/v1/topics"),
    ("GET", "/v1/topics"),
    ("GET", "/v1/topics/{event}"),
    ("PATCH", "/v1/topics/{event}"),
    ("DELETE", "/v1/topics/{event}"),
    ("POST", "/v1/secrets"),
    ("GET", "/v1/secrets"),
    ("DELETE", "/v1/secrets/{name}"),
    ("POST", "/v1/envs/{env}/events/{event}/messages"),
    ("POST", "/v1/envs/{env}/events/{event}/subscriptions/{group}/pull"),
    ("POST", "/v1/envs/{env}/events/{event}/subscriptions/{group}/ack"),
    ("GET", "/v1/envs/{env}/events/{event}/dead-letters"),
    ("GET", "/v1/envs/{env}/events/{event}/dead-letters/{id}"),
    ("POST", "/v1/envs/{env}/events/{event}/dead-letters/redrive"),
    ("POST", "/v1/envs/{env}/events/{event}/dead-letters/purge"),
    ("GET", "/v1/envs/{env}/events/{event}/groups"),
    ("GET", "/v1/envs/{env}/events/{event}/idempotency/{key}"),
    ("POST", "/v1/envs/{env}/events/{event}/replay"),
    ("GET", "/v1/envs/{env}/events/{event}/messages"),
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs"),
    ("GET", "/v1/jobs/{id}"),
    ("DELETE", "/v1/jobs/{id}"),
    ("POST", "/v1/jobs/{id}/pause"),
    ("POST", "/v1/jobs/{id}/resume"),
    ("GET", "/v1/jobs/{id}/runs"),
    ("POST", "/v1/jobs/{id}/runs/{run}/retry"),
];

#[tokio::test]
async fn openapi_document_lists_every_route() {
    let api = TestApi::new().await;
    let doc = api.ok("GET", "/v1/openapi.json", None, StatusCode::OK).await;
    let mut listed = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            listed.insert((method.to_uppercase(), path.clone()));
        }
    }
    let mut expected: BTreeSet<(String, String)> =
        ROUTES.iter().map(|(m, p)| ((*m).to_owned(), (*p).to_owned())).collect();
    expected.insert(("GET".into(), "/v1/envs/{env}/events/{event}/subscriptions/{group}/stream".into()));
    assert_eq!(listed, expected);
    assert_eq!(doc["components"]["securitySchemes"]["apiKey"]["scheme"], "bearer");
    assert_eq!(doc["paths"]["/healthz"]["get"]["security"], json!([{}]));
    assert!(doc["components"]["schemas"]["ErrorBody"].is_object());
    // The definition documents are the generated schemas, each env's config by its type.
    let schemas = &doc["components"]["schemas"];
    assert_eq!(schemas["Broker"]["properties"]["envs"]["items"]["$ref"], "#/components/schemas/BrokerEnv");
    assert_eq!(schemas["RedisConfig"]["properties"]["port"]["type"], json!(["integer", "null"]));
    assert!(schemas["TopicEnv"]["properties"]["options"].is_object());
}

#[tokio::test]
async fn the_schemas_describe_each_env_type_and_topic_options() {
    let api = TestApi::new().await;
    let broker = api.ok("GET", "/v1/schema/broker", None, StatusCode::OK).await;
    assert_eq!(broker["$schema"], "https://json-schema.org/draft/2020-12/schema");
    let env = &broker["$defs"]["BrokerEnv"];
    let types = env["properties"]["type"]["enum"].as_array().expect("the env types");
    for name in ["aws_sqs", "embedded", "google_pubsub", "kafka", "mqtt", "nats", "rabbitmq", "redis"] {
        assert!(types.contains(&json!(name)), "{name} in {types:?}");
    }
    let redis = env["allOf"]
        .as_array()
        .expect("a rule per type")
        .iter()
        .find(|rule| rule["if"]["properties"]["type"]["const"] == "redis");
    assert_eq!(
        redis.expect("a rule for redis")["then"]["properties"]["config"]["$ref"],
        "#/$defs/RedisConfig"
    );
    assert_eq!(broker["$defs"]["RedisConfig"]["additionalProperties"], false);
    assert_eq!(broker["$defs"]["RedisConfig"]["properties"]["port"]["type"], json!(["integer", "null"]));
    let topic = api.ok("GET", "/v1/schema/topic", None, StatusCode::OK).await;
    assert_eq!(topic["required"], json!(["tag"]));
    assert!(topic["$defs"]["TopicEnv"]["properties"]["options"].is_object(), "{topic}");
}

#[tokio::test]
async fn every_api_route_needs_a_key_but_health_readiness_and_the_page() {
    let api = TestApi::new().await;
    for (method, path) in ROUTES {
        let path = path
            .replace("{tag}", "bus")
            .replace("{event}", "bus:orders")
            .replace("{env}", "dev")
            .replace("{group}", "g")
            .replace("{name}", "pw")
            .replace("{id}", "m1")
            .replace("{key}", "order-1")
            .replace("{run}", "1");
        let (status, body) = api.call(method, &path, None, None).await;
        if ["/", "/healthz", "/readyz"].contains(&path.as_str()) {
            assert_eq!(status, StatusCode::OK, "{method} {path}: {body}");
        } else {
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}: {body}");
            assert_eq!(body["error"]["code"], "UNAUTHORIZED");
        }
    }
}

#[tokio::test]
async fn missing_wrong_and_revoked_keys_are_refused() {
    let api = TestApi::new().await;
    let request = Request::get("/v1/brokers").body(Body::empty()).expect("request");
    let response = api.send(request).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");

    let (status, body) = api.call("GET", "/v1/brokers", Some("pbk_not-a-key"), None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("UNAUTHORIZED")));
    assert!(body["error"]["message"].as_str().expect("message").contains("invalid API key"));

    let request = Request::get("/v1/brokers")
        .header(header::AUTHORIZATION, format!("Basic {}", api.admin))
        .body(Body::empty())
        .expect("request");
    assert_eq!(api.send(request).await.status(), StatusCode::UNAUTHORIZED);

    let temporary = api.state.keys().create("temporary", false).await.expect("key").secret;
    let (status, _) = api.call("GET", "/v1/brokers", Some(&temporary), None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(api.state.keys().revoke("temporary").await.expect("revoke"));
    let (status, _) = api.call("GET", "/v1/brokers", Some(&temporary), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn read_only_keys_read_and_test_but_cannot_write_publish_consume_or_ack() {
    let api = TestApi::new().await;
    let event = api.embedded_topic("bus", "orders").await;
    let reader = Some(api.reader.as_str());
    for path in [
        "/v1/brokers",
        "/v1/brokers/bus",
        "/v1/topics",
        &format!("/v1/topics/{event}"),
        &format!("/v1/envs/dev/events/{event}/groups"),
        "/v1/stats",
        "/metrics",
    ] {
        let (status, body) = api.call("GET", path, reader, None).await;
        assert_eq!(status, StatusCode::OK, "GET {path}: {body}");
    }
    let (status, body) = api.call("POST", "/v1/brokers/bus/test?env=dev", reader, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let writes: [(&str, String, Value); 9] = [
        (
            "POST",
            "/v1/brokers".into(),
            json!({"name": "X", "tag": "x", "envs": [{"slug": "dev", "type": "embedded"}]}),
        ),
        ("PATCH", "/v1/brokers/bus".into(), json!({"name": "Renamed"})),
        ("DELETE", "/v1/brokers/bus?force=true".into(), Value::Null),
        ("POST", "/v1/topics".into(), json!({"tag": "bus:other"})),
        ("DELETE", format!("/v1/topics/{event}"), Value::Null),
        ("POST", format!("/v1/envs/dev/events/{event}/messages"), json!({"payload": 1})),
        ("POST", format!("/v1/envs/dev/events/{event}/subscriptions/g/pull"), json!({})),
        ("POST", format!("/v1/envs/dev/events/{event}/subscriptions/g/ack"), json!({"leaseIds": ["x"]})),
        ("POST", format!("/v1/envs/dev/events/{event}/replay"), json!({"group": "g", "from": "beginning"})),
    ];
    for (method, path, body) in writes {
        let body = (!body.is_null()).then_some(body);
        let (status, answer) = api.call(method, &path, reader, body).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}: {answer}");
        assert_eq!(answer["error"]["code"], "FORBIDDEN");
    }
    let stream = format!("/v1/envs/dev/events/{event}/subscriptions/g/stream");
    let (status, _) = api.call("GET", &stream, reader, None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = api.call("GET", "/v1/brokers/bus", reader, None).await;
    assert_eq!(status, StatusCode::OK, "nothing was changed or deleted");
}

#[tokio::test]
async fn broker_lifecycle_with_redaction_versions_and_conflicts() {
    let api = TestApi::new().await;
    let broker = json!({
        "name": "Message Bus",
        "tag": "message-bus",
        "envs": [
            {"slug": "dev", "type": "REDIS", "config": {"host": "127.0.0.1", "port": 6379, "password": "hunter2"}},
            {"slug": "local", "type": "embedded", "config": {"path": common::BROKER_DB}},
        ],
    });
    let created = api.ok("POST", "/v1/brokers", Some(broker.clone()), StatusCode::CREATED).await;
    assert_eq!(created["version"], 1);
    assert_eq!(created["envs"][0]["type"], "redis");
    assert_eq!(created["envs"][0]["config"]["password"], "****");
    api.fails("POST", "/v1/brokers", Some(broker), StatusCode::CONFLICT, "ALREADY_EXISTS").await;

    let listed = api.ok("GET", "/v1/brokers", None, StatusCode::OK).await;
    assert_eq!(listed.as_array().map(Vec::len), Some(1));
    assert!(!listed.to_string().contains("hunter2"));
    let fetched = api.ok("GET", "/v1/brokers/message-bus", None, StatusCode::OK).await;
    assert_eq!(fetched["envs"][0]["config"]["password"], "****");

    let patched = api
        .ok("PATCH", "/v1/brokers/message-bus", Some(json!({"name": "Bus", "version": 1})), StatusCode::OK)
        .await;
    assert_eq!((patched["name"].as_str(), patched["version"].as_u64()), (Some("Bus"), Some(2)));
    let stale = api
        .fails(
            "PATCH",
            "/v1/brokers/message-bus",
            Some(json!({"name": "Old", "version": 1})),
            StatusCode::CONFLICT,
            "CONFLICT",
        )
        .await;
    assert!(stale["message"].as_str().expect("message").contains("current is 2"));

    api.ok("POST", "/v1/topics", Some(json!({"tag": "message-bus:orders"})), StatusCode::CREATED).await;
    api.fails("DELETE", "/v1/brokers/message-bus", None, StatusCode::CONFLICT, "IN_USE").await;
    let deleted = api.ok("DELETE", "/v1/brokers/message-bus?force=true", None, StatusCode::OK).await;
    assert_eq!(deleted, json!({"deleted": "broker", "tag": "message-bus"}));
    api.fails("GET", "/v1/brokers/message-bus", None, StatusCode::NOT_FOUND, "BROKER_NOT_FOUND").await;
    api.fails(
        "PATCH",
        "/v1/brokers/message-bus",
        Some(json!({"name": "x"})),
        StatusCode::NOT_FOUND,
        "BROKER_NOT_FOUND",
    )
    .await;
    api.fails("DELETE", "/v1/brokers/message-bus", None, StatusCode::NOT_FOUND, "BROKER_NOT_FOUND").await;
    api.fails("GET", "/v1/topics/message-bus:orders", None, StatusCode::NOT_FOUND, "TOPIC_NOT_FOUND").await;
}

#[tokio::test]
async fn invalid_definitions_name_the_env_and_field_and_store_nothing() {
    let api = TestApi::new().await;
    let broker = json!({
        "name": "Bus", "tag": "bus",
        "envs": [{"slug": "dev", "type": "redis", "config": {"host": "127.0.0.1", "port": "six"}}],
    });
    let error =
        api.fails("POST", "/v1/brokers", Some(broker), StatusCode::BAD_REQUEST, "VALIDATION_FAILED").await;
    assert_eq!((error["env"].as_str(), error["field"].as_str()), (Some("dev"), Some("config.port")));
    let error = api
        .fails(
            "POST",
            "/v1/brokers",
            Some(json!({"name": "B", "tag": "Bad Tag", "envs": []})),
            StatusCode::BAD_REQUEST,
            "VALIDATION_FAILED",
        )
        .await;
    assert_eq!(error["field"], "tag");
    let error = api
        .fails(
            "POST",
            "/v1/brokers",
            Some(json!({"tag": "bus", "envs": []})),
            StatusCode::BAD_REQUEST,
            "VALIDATION_FAILED",
        )
        .await;
    assert_eq!(error["field"], "name");
    assert_eq!(api.ok("GET", "/v1/brokers", None, StatusCode::OK).await, json!([]));

    api.embedded_broker("bus").await;
    let error = api
        .fails(
            "POST",
            "/v1/topics",
            Some(json!({"tag": "bus:orders", "envs": [{"slug": "prd"}]})),
            StatusCode::BAD_REQUEST,
            "VALIDATION_FAILED",
        )
        .await;
    assert!(error["message"].as_str().expect("message").contains("no env `prd`"), "{error}");
    api.fails(
        "POST",
        "/v1/topics",
        Some(json!({"tag": "nobus:orders"})),
        StatusCode::NOT_FOUND,
        "BROKER_NOT_FOUND",
    )
    .await;
    api.fails("GET", "/v1/topics/not-an-event", None, StatusCode::BAD_REQUEST, "VALIDATION_FAILED").await;
    api.fails("GET", "/v1/topics?broker=nobus", None, StatusCode::NOT_FOUND, "BROKER_NOT_FOUND").await;
}

#[tokio::test]
async fn topic_lifecycle_with_native_names() {
    let api = TestApi::new().await;
    api.embedded_broker("bus").await;
    let created = api
        .ok(
            "POST",
            "/v1/topics",
            Some(json!({"tag": "bus:orders", "envs": [{"slug": "dev", "nativeName": "orders.v1"}]})),
            StatusCode::CREATED,
        )
        .await;
    assert_eq!((created["name"].as_str(), created["version"].as_u64()), (Some("orders"), Some(1)));
    api.fails(
        "POST",
        "/v1/topics",
        Some(json!({"tag": "bus:orders"})),
        StatusCode::CONFLICT,
        "ALREADY_EXISTS",
    )
    .await;
    let fetched = api.ok("GET", "/v1/topics/bus:orders", None, StatusCode::OK).await;
    assert_eq!(
        fetched["nativeNames"],
        json!([{"env": "dev", "type": "embedded", "nativeName": "orders.v1", "deadLetter": "orders.v1-dlq"}])
    );
    let listed = api.ok("GET", "/v1/topics?broker=bus", None, StatusCode::OK).await;
    assert_eq!(listed.as_array().map(Vec::len), Some(1));
    let patched = api
        .ok("PATCH", "/v1/topics/bus:orders", Some(json!({"maxAttempts": 3, "version": 1})), StatusCode::OK)
        .await;
    assert_eq!((patched["maxAttempts"].as_u64(), patched["version"].as_u64()), (Some(3), Some(2)));
    api.fails(
        "PATCH",
        "/v1/topics/bus:orders",
        Some(json!({"maxAttempts": 0})),
        StatusCode::BAD_REQUEST,
        "VALIDATION_FAILED",
    )
    .await;
    api.fails(
        "PATCH",
        "/v1/topics/bus:orders",
        Some(json!({"version": 1})),
        StatusCode::CONFLICT,
        "CONFLICT",
    )
    .await;
    let deleted = api.ok("DELETE", "/v1/topics/bus:orders", None, StatusCode::OK).await;
    assert_eq!(deleted, json!({"deleted": "topic", "tag": "bus:orders"}));
    api.fails("DELETE", "/v1/topics/bus:orders", None, StatusCode::NOT_FOUND, "TOPIC_NOT_FOUND").await;
    api.fails("PATCH", "/v1/topics/bus:orders", Some(json!({})), StatusCode::NOT_FOUND, "TOPIC_NOT_FOUND")
        .await;
}

#[tokio::test]
async fn bad_bodies_are_400s_naming_the_problem() {
    let api = TestApi::new().await;
    let key = Some(api.admin.as_str());
    let (status, body) = api.call_raw("POST", "/v1/brokers", key, Some(b"{\"name\": ".to_vec())).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("INVALID_JSON")));
    assert!(body["error"]["message"].as_str().expect("message").contains("line 1 column"), "{body}");
    let (status, body) = api.call_raw("POST", "/v1/brokers", key, None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("INVALID_JSON")));
    let (status, body) = api.call_raw("POST", "/v1/topics", key, Some(vec![0xff, 0xfe])).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("INVALID_JSON")));
    let error = api
        .fails("POST", "/v1/brokers", Some(json!([1, 2])), StatusCode::BAD_REQUEST, "VALIDATION_FAILED")
        .await;
    assert!(error["message"].as_str().expect("message").contains("expected"), "{error}");
    let error = api
        .fails(
            "PATCH",
            "/v1/brokers/x",
            Some(json!({"nmae": "typo"})),
            StatusCode::BAD_REQUEST,
            "VALIDATION_FAILED",
        )
        .await;
    assert!(error["message"].as_str().expect("message").contains("nmae"), "{error}");
    api.fails("DELETE", "/v1/brokers/x?force=maybe", None, StatusCode::BAD_REQUEST, "INVALID_QUERY").await;
    api.fails("POST", "/v1/brokers/x/test", None, StatusCode::BAD_REQUEST, "INVALID_QUERY").await;
}

#[tokio::test]
async fn bodies_over_the_limit_are_413() {
    let api = TestApi::with_options(Options { body_limit: 1024, ..Options::default() }).await;
    let event = api.embedded_topic("bus", "orders").await;
    let big = json!({"payload": "x".repeat(4096), "encoding": "text"});
    api.fails(
        "POST",
        &format!("/v1/envs/dev/events/{event}/messages"),
        Some(big),
        StatusCode::PAYLOAD_TOO_LARGE,
        "PAYLOAD_TOO_LARGE",
    )
    .await;
    let fits = json!({"payload": "x".repeat(512), "encoding": "text"});
    api.ok("POST", &format!("/v1/envs/dev/events/{event}/messages"), Some(fits), StatusCode::OK).await;
}

#[tokio::test]
async fn connection_test_reports_type_and_latency() {
    let api = TestApi::new().await;
    api.embedded_broker("bus").await;
    let tested = api.ok("POST", "/v1/brokers/bus/test?env=dev", None, StatusCode::OK).await;
    assert_eq!((tested["type"].as_str(), tested["ok"].as_bool()), (Some("embedded"), Some(true)));
    assert!(tested["latencyMs"].as_f64().is_some());
    let error = api
        .fails("POST", "/v1/brokers/bus/test?env=prd", None, StatusCode::NOT_FOUND, "BROKER_ENV_NOT_FOUND")
        .await;
    assert!(error["message"].as_str().expect("message").contains("envs: dev"));
    api.fails("POST", "/v1/brokers/nobus/test?env=dev", None, StatusCode::NOT_FOUND, "BROKER_NOT_FOUND")
        .await;
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json() {
    let api = TestApi::new().await;
    api.fails("GET", "/v1/nothing", None, StatusCode::NOT_FOUND, "NOT_FOUND").await;
    api.fails("PUT", "/v1/brokers", None, StatusCode::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED").await;
}

#[tokio::test]
async fn health_readiness_metrics_and_stats() {
    let api = TestApi::new().await;
    assert_eq!(api.call("GET", "/healthz", None, None).await, (StatusCode::OK, json!({"status": "ok"})));
    assert_eq!(api.call("GET", "/readyz", None, None).await, (StatusCode::OK, json!({"status": "ready"})));

    let event = api.embedded_topic("bus", "orders").await;
    api.publish(&event, json!({"messages": [{"payload": 1}, {"payload": 2}]})).await;
    let messages = api.pull(&event, "g", json!({"max": 2})).await;
    let leases: Vec<&Value> = messages.iter().map(|m| &m["leaseId"]).collect();
    api.ack(&event, "g", json!({"leaseIds": leases})).await;

    let (status, text) = api.call("GET", "/metrics", Some(&api.reader), None).await;
    assert_eq!(status, StatusCode::OK);
    let text = text.as_str().expect("text").to_owned();
    let labels = r#"broker="bus",env="dev",topic="orders""#;
    for line in [
        format!("polybus_messages_published_total{{{labels}}} 2"),
        format!("polybus_messages_delivered_total{{{labels}}} 2"),
        format!("polybus_messages_acked_total{{{labels}}} 2"),
        format!("polybus_messages_nacked_total{{{labels}}} 0"),
        format!("polybus_messages_dead_lettered_total{{{labels}}} 0"),
        format!("polybus_publish_duration_seconds_count{{{labels}}} 1"),
        r#"polybus_connection_up{broker="bus",env="dev"} 1"#.to_owned(),
        r#"polybus_http_requests_total{method="POST",route="/v1/envs/{env}/events/{event}/messages",status="200"} 1"#.to_owned(),
    ] {
        assert!(text.lines().any(|l| l == line), "missing `{line}` in:\n{text}");
    }
    let stats = api.ok("GET", "/v1/stats", None, StatusCode::OK).await;
    assert_eq!(stats["topics"][0]["event"], "bus:orders");
    assert_eq!(stats["topics"][0]["published"], 2);
    assert_eq!(stats["connections"][0]["up"], true);
}

#[tokio::test]
async fn dashboard_asks_for_a_key_and_refuses_a_wrong_one() {
    let api = TestApi::new().await;
    let (status, page) = api.call("GET", "/", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.as_str().expect("html").contains("name=\"key\""));
    let (status, page) = api.call("GET", "/?key=pbk_wrong", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(page.as_str().expect("html").contains("not valid"));
    api.embedded_topic("bus", "orders").await;
    let (status, page) = api.call("GET", &format!("/?key={}", api.reader), None, None).await;
    assert_eq!(status, StatusCode::OK);
    let page = page.as_str().expect("html");
    assert!(page.contains("<td class=\"env-type\">embedded</td>") && page.contains("bus:orders"), "{page}");
}

#[tokio::test]
async fn metrics_include_the_series_of_a_bus_the_server_does_not_drive() {
    polybus_server::install_library_recorder();
    let api = TestApi::new().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let store = polybus::SqliteStore::open(dir.path().join("registry.db")).await.expect("registry");
    let registry = polybus::Registry::new(std::sync::Arc::new(store));
    let broker = json!({"name": "Library", "tag": "library-bus", "envs": [
        {"slug": "dev", "type": "embedded", "config": {"path": dir.path().join("broker.db")}}]});
    registry
        .create_broker(polybus::Broker::from_value(broker).expect("broker"))
        .await
        .expect("create broker");
    let topic = polybus::Topic::from_value(json!({"tag": "library-bus:orders"})).expect("topic");
    registry.create_topic(topic).await.expect("create topic");
    let bus = polybus::Bus::open(registry).await.expect("a bus of the application's own");
    for n in 0..2 {
        bus.publish("dev", "library-bus:orders", polybus::Message::text(format!("{n}")))
            .await
            .expect("publish");
    }

    let (status, text) = api.call("GET", "/metrics", Some(&api.reader), None).await;
    assert_eq!(status, StatusCode::OK);
    let text = text.as_str().expect("text");
    let line = r#"polybus_published_total{system="embedded",env="dev",event="library-bus:orders"} 2"#;
    assert!(text.lines().any(|l| l == line), "missing `{line}` in:\n{text}");
    assert!(text.contains("# TYPE polybus_publish_seconds histogram"), "{text}");
}

#[tokio::test]
async fn jobs_are_created_listed_paused_resumed_and_deleted_with_a_write_key() {
    let api = TestApi::new().await;
    let event = api.embedded_topic("bus", "orders").await;
    let spec = json!({"env": "dev", "event": event, "payload": {"text": "tick"}, "schedule": {"cron": "0 2 * * *", "tz": "Africa/Lagos"}});
    let reader = Some(api.reader.as_str());
    let (status, answer) = api.call("POST", "/v1/jobs", reader, Some(spec.clone())).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");

    let job = api.ok("POST", "/v1/jobs", Some(spec), StatusCode::CREATED).await;
    let id = job["id"].as_str().expect("id").to_owned();
    let next = job["nextRun"].as_str().expect("next run");
    assert!(next.contains("T01:00:00"), "02:00 in Lagos is 01:00 UTC: {next}");
    let (status, listed) = api.call("GET", "/v1/jobs", reader, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed["jobs"][0]["id"], id.as_str());
    let paused = api.ok("POST", &format!("/v1/jobs/{id}/pause"), None, StatusCode::OK).await;
    assert_eq!(paused["paused"], true);
    let resumed = api.ok("POST", &format!("/v1/jobs/{id}/resume"), None, StatusCode::OK).await;
    assert_eq!(resumed["paused"], false);
    let runs = api.ok("GET", &format!("/v1/jobs/{id}/runs"), None, StatusCode::OK).await;
    assert_eq!(runs["runs"], json!([]));
    let (status, answer) =
        api.call("POST", &format!("/v1/jobs/{id}/runs/1/retry"), Some(&api.admin), None).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("RUN_NOT_FOUND")));

    let bad = json!({"env": "dev", "event": event, "schedule": {"every": "10ms"}});
    let (status, answer) = api.call("POST", "/v1/jobs", Some(&api.admin), Some(bad)).await;
    assert_eq!(
        (status, answer["error"]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("schedule.every"))
    );

    let (status, _) = api.call("DELETE", &format!("/v1/jobs/{id}"), Some(&api.admin), None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, answer) = api.call("GET", &format!("/v1/jobs/{id}"), Some(&api.admin), None).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("JOB_NOT_FOUND")));
}
