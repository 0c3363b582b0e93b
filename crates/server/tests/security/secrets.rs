//! Security: secrets.
//!
//! Finding 1 of issue 12: a key holder must not read the server's environment through secret
//! references. The variable used is `CARGO_PKG_NAME`, which cargo sets in the environment of
//! every test process, so its value is known and can be looked for in every answer.

use axum::http::StatusCode;
use polybus::Broker;
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
