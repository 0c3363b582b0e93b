//! Security: secrets.
//!
//! Finding 1 of issue 12: a key holder must not read the server's environment through secret
//! references. The variable used is `CARGO_PKG_NAME`, which cargo sets in the environment of
//! every test process, so its value is known and can be looked for in every answer.

use axum::http::StatusCode;
use polybus::{Broker, SecretsKey};
use polybus_server::Options;
use serde_json::{Value, json};

use crate::common::TestApi;

/// A server variable outside the default prefix, standing for any of the server's variables.
const SERVER_VAR: &str = "CARGO_PKG_NAME";

/// The value a hostile key holder is after.
fn server_value() -> String {
    std::env::var(SERVER_VAR).unwrap_or_else(|_| panic!("{SERVER_VAR} is set by cargo for every test"))
}

/// `broker` with one env `dev` of `broker_type` and `config`.
fn broker(tag: &str, broker_type: &str, config: Value) -> Value {
    json!({"name": "Leaky", "tag": tag, "envs": [{"slug": "dev", "type": broker_type, "config": config}]})
}

/// The three ways in of finding 1: a Redis host, a RabbitMQ vhost and a NATS URL.
fn leaky_envs() -> [(&'static str, &'static str, Value); 3] {
    let var = format!("${{{SERVER_VAR}}}");
    [
        ("leak-redis", "redis", json!({"host": var, "port": 6379})),
        (
            "leak-rabbitmq",
            "rabbitmq",
            json!({"host": "127.0.0.1", "username": "guest", "password": "guest", "vhost": var}),
        ),
        ("leak-nats", "nats", json!({"servers": [format!("nats://{var}:4222")]})),
    ]
}

#[tokio::test]
async fn references_outside_the_allowed_prefixes_are_refused_when_created_through_the_api() {
    let api = TestApi::new().await;
    for (tag, broker_type, config) in leaky_envs() {
        let error = api
            .fails(
                "POST",
                "/v1/brokers",
                Some(broker(tag, broker_type, config)),
                StatusCode::BAD_REQUEST,
                "VALIDATION_FAILED",
            )
            .await;
        assert_eq!(error["env"], "dev", "{broker_type}: {error:#}");
        let field = error["field"].as_str().unwrap_or_default();
        assert!(field.starts_with("config."), "{broker_type}: {error:#}");
        let message = error["message"].as_str().unwrap_or_default();
        assert!(message.contains(&format!("${{{SERVER_VAR}}}")), "{broker_type}: {message}");
        assert!(message.contains("POLYBUS_BROKER_"), "{broker_type}: {message}");
        api.fails("GET", &format!("/v1/brokers/{tag}"), None, StatusCode::NOT_FOUND, "BROKER_NOT_FOUND")
            .await;
    }
}

#[tokio::test]
async fn a_reader_testing_a_definition_written_earlier_never_sees_the_servers_variable() {
    let api = TestApi::new().await;
    let value = server_value();
    let mut problems = Vec::new();
    for (tag, broker_type, config) in leaky_envs() {
        // As the local CLI writes it, without the server's checks.
        let definition = Broker::from_value(broker(tag, broker_type, config)).expect("definition");
        api.state.registry().create_broker(definition).await.expect("stored");

        let path = format!("/v1/brokers/{tag}/test?env=dev");
        let (status, body) = api.call("POST", &path, Some(&api.reader), None).await;
        let message = body["error"]["message"].as_str().unwrap_or_default();
        if body.to_string().contains(&value) {
            problems.push(format!("{broker_type}: the answer holds the value: {body}"));
        } else if (status, body["error"]["code"].as_str())
            != (StatusCode::BAD_REQUEST, Some("SECRET_NOT_ALLOWED"))
            || !message.contains(&format!("${{{SERVER_VAR}}}"))
        {
            problems.push(format!(
                "{broker_type}: expected SECRET_NOT_ALLOWED naming the reference: {status} {body}"
            ));
        }
        let (_, stats) = api.call("GET", "/v1/stats", Some(&api.reader), None).await;
        if stats.to_string().contains(&value) {
            problems.push(format!("{broker_type}: /v1/stats holds the value: {stats}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// A server that resolves `${CARGO_PKG_…}` (so the value is resolved and must be scrubbed)
/// and keeps `$Secret{..}` under a key of its own.
async fn server_with_secrets() -> TestApi {
    TestApi::with_options(Options {
        secret_env_prefixes: vec!["CARGO_PKG_".to_owned()],
        secrets_key: Ok(SecretsKey::generate()),
        ..Options::default()
    })
    .await
}

/// Tests `tag`'s env `dev` as the reader; returns status, code and message.
async fn test_as_reader(api: &TestApi, tag: &str) -> (StatusCode, Value) {
    api.call("POST", &format!("/v1/brokers/{tag}/test?env=dev"), Some(&api.reader), None).await
}

#[tokio::test]
async fn allowed_variables_resolve_but_errors_and_stats_name_the_reference() {
    let api = server_with_secrets().await;
    let value = server_value();
    let reference = format!("${{{SERVER_VAR}}}");
    for (tag, broker_type, config) in leaky_envs() {
        api.ok("POST", "/v1/brokers", Some(broker(tag, broker_type, config)), StatusCode::CREATED).await;
        let (status, body) = test_as_reader(&api, tag).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (StatusCode::BAD_GATEWAY, Some("CONNECT_FAILED")),
            "{body}"
        );
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(&reference), "{broker_type}: {message}");
        assert!(!body.to_string().contains(&value), "{broker_type}: {body}");
        let (_, stats) = api.call("GET", "/v1/stats", Some(&api.reader), None).await;
        assert!(stats.to_string().contains(&reference), "{stats}");
        assert!(!stats.to_string().contains(&value), "{stats}");
    }
}

#[tokio::test]
async fn secrets_are_written_listed_by_name_and_never_read_back() {
    let api = server_with_secrets().await;
    let value = format!("vh-{}", uuid::Uuid::new_v4().simple());
    let created = api
        .ok("POST", "/v1/secrets", Some(json!({"name": "rabbit-vhost", "value": value})), StatusCode::CREATED)
        .await;
    assert_eq!(created["name"], "rabbit-vhost");
    assert!(created.get("value").is_none(), "{created}");
    let replaced = api
        .ok("POST", "/v1/secrets", Some(json!({"name": "rabbit-vhost", "value": value})), StatusCode::OK)
        .await;
    assert_eq!(replaced["createdAt"], created["createdAt"]);

    let (status, body) =
        api.call("POST", "/v1/secrets", Some(&api.reader), Some(json!({"name": "x", "value": "y"}))).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("FORBIDDEN")));
    let (status, listed) = api.call("GET", "/v1/secrets", Some(&api.reader), None).await;
    assert_eq!(status, StatusCode::OK);
    let names: Vec<_> = listed.as_array().expect("list").iter().map(|s| s["name"].clone()).collect();
    assert_eq!(names, vec![json!("rabbit-vhost")]);
    let fields: Vec<_> = listed[0].as_object().expect("entry").keys().cloned().collect();
    assert_eq!(fields, vec!["createdAt", "name", "updatedAt"]);

    for (name, why) in [("a b", "1 to 64"), ("", "1 to 64")] {
        let error = api
            .fails(
                "POST",
                "/v1/secrets",
                Some(json!({"name": name, "value": "v"})),
                StatusCode::BAD_REQUEST,
                "VALIDATION_FAILED",
            )
            .await;
        assert_eq!(error["field"], "name");
        assert!(error["message"].as_str().unwrap_or_default().contains(why), "{error}");
    }

    // Used inside a URL; its value never shows, neither in the definition nor in errors.
    let config = json!({"url": "amqp://guest:guest@127.0.0.1:5672/$Secret{rabbit-vhost}"});
    let shown =
        api.ok("POST", "/v1/brokers", Some(broker("vault", "rabbitmq", config)), StatusCode::CREATED).await;
    assert!(!shown.to_string().contains(&value));
    let (status, body) = test_as_reader(&api, "vault").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("$Secret{rabbit-vhost}"), "{message}");
    for path in ["/v1/brokers/vault", "/v1/brokers", "/v1/secrets", "/v1/stats", "/metrics"] {
        let (_, body) = api.call("GET", path, Some(&api.reader), None).await;
        assert!(!body.to_string().contains(&value), "{path}: {body}");
    }

    api.ok("DELETE", "/v1/secrets/rabbit-vhost", None, StatusCode::OK).await;
    api.fails("DELETE", "/v1/secrets/rabbit-vhost", None, StatusCode::NOT_FOUND, "SECRET_NOT_FOUND").await;
    let (status, body) = test_as_reader(&api, "vault").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("SECRET_MISSING")),
        "{body}"
    );
    assert!(
        body["error"]["message"].as_str().unwrap_or_default().contains("$Secret{rabbit-vhost}"),
        "{body}"
    );
}

#[tokio::test]
async fn missing_or_unkeyed_secrets_are_refused_when_the_definition_is_created() {
    let api = server_with_secrets().await;
    let config = json!({"host": "127.0.0.1", "password": "$Secret{nobody}"});
    let error = api
        .fails(
            "POST",
            "/v1/brokers",
            Some(broker("needs", "redis", config.clone())),
            StatusCode::BAD_REQUEST,
            "VALIDATION_FAILED",
        )
        .await;
    assert_eq!((error["env"].as_str(), error["field"].as_str()), (Some("dev"), Some("config.password")));
    assert!(error["message"].as_str().unwrap_or_default().contains("no secret named `nobody`"), "{error}");

    // A server without a key (a PostgreSQL registry without --secrets-key-file) says so.
    let keyless = TestApi::new().await;
    let error = keyless
        .fails(
            "POST",
            "/v1/secrets",
            Some(json!({"name": "pw", "value": "v"})),
            StatusCode::SERVICE_UNAVAILABLE,
            "SECRETS_UNAVAILABLE",
        )
        .await;
    assert!(error["message"].as_str().unwrap_or_default().contains("without a secrets key"), "{error}");
    let error = keyless
        .fails(
            "POST",
            "/v1/brokers",
            Some(broker("needs", "redis", config)),
            StatusCode::BAD_REQUEST,
            "VALIDATION_FAILED",
        )
        .await;
    assert!(error["message"].as_str().unwrap_or_default().contains("cannot be used"), "{error}");
}

#[tokio::test]
async fn a_secret_host_round_trips_to_a_real_redis() {
    let api = server_with_secrets().await;
    api.ok(
        "POST",
        "/v1/secrets",
        Some(json!({"name": "redis-host", "value": "127.0.0.1"})),
        StatusCode::CREATED,
    )
    .await;
    let tag = format!("sec{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let config = json!({"host": "$Secret{redis-host}", "port": 6379});
    api.ok("POST", "/v1/brokers", Some(broker(&tag, "redis", config)), StatusCode::CREATED).await;
    let event = format!("{tag}:orders");
    let topic = json!({"tag": event, "envs": [{"slug": "dev", "nativeName": tag}]});
    api.ok("POST", "/v1/topics", Some(topic), StatusCode::CREATED).await;
    let (status, tested) = test_as_reader(&api, &tag).await;
    assert_eq!(status, StatusCode::OK, "{tested}");

    // Pulling first makes the group, so the message published next is its.
    assert!(api.pull(&event, "billing", json!({"max": 1, "waitMs": 0})).await.is_empty());
    let ids = api.publish(&event, json!({"payload": "hello", "encoding": "text"})).await;
    let pulled = api.pull(&event, "billing", json!({"max": 1, "waitMs": 5000})).await;
    assert_eq!(pulled.len(), 1, "{pulled:?}");
    assert_eq!(
        (pulled[0]["id"].as_str(), pulled[0]["payload"].as_str()),
        (Some(ids[0].as_str()), Some("hello"))
    );
    let acked = api.ack(&event, "billing", json!({"leaseIds": [pulled[0]["leaseId"]]})).await;
    assert_eq!(
        (acked["settled"].as_array().map(Vec::len), &acked["failed"]),
        (Some(1), &json!([])),
        "{acked}"
    );

    api.state.close().await.expect("closed");
    delete_redis_keys(&tag);
}

/// Deletes every key of the shared Redis whose name starts with `prefix` (this test's stream).
fn delete_redis_keys(prefix: &str) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("redis-cli").args(args).output().expect("redis-cli runs");
        assert!(out.status.success(), "redis-cli {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let pattern = format!("{prefix}*");
    let keys = run(&["-h", "127.0.0.1", "-p", "6379", "--scan", "--pattern", &pattern]);
    let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
    assert!(!keys.is_empty(), "the test's stream was never created");
    let mut args = vec!["-h", "127.0.0.1", "-p", "6379", "DEL"];
    args.extend(keys);
    run(&args);
}
