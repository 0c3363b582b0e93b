//! Connection failures say whether trying again can help, and keep Redis's own error.
//!
//! Needs the Redis on `POLYBUS_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`).

use polybus_core::{BrokerType, ConnectTarget, Connector, Error, FailureKind};
use polybus_redis::RedisConnector;
use serde_json::{Value, json};

fn redis_url() -> String {
    std::env::var("POLYBUS_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

async fn connect(config: Value) -> Error {
    let target =
        ConnectTarget { broker: "errors".into(), env: "dev".into(), broker_type: BrokerType::Redis, config };
    match RedisConnector.connect(&target).await {
        Ok(_) => panic!("connecting with {config:?} succeeded", config = target.config),
        Err(e) => e,
    }
}

#[tokio::test]
async fn a_closed_port_is_retryable() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        listener.local_addr().expect("its address").port()
    };
    let error = connect(json!({"url": format!("redis://127.0.0.1:{port}")})).await;
    assert_eq!(error.failure_kind(), Some(FailureKind::Unavailable), "{error}");
    assert!(error.is_retryable(), "{error}");
    assert_eq!(error.code(), "CONNECT_FAILED");
    let cause = error.cause().and_then(|c| c.downcast_ref::<redis::RedisError>()).expect("redis's error");
    assert!(cause.is_connection_refusal(), "{cause:?}");
}

#[tokio::test]
async fn a_wrong_password_is_not_retryable() {
    let url = redis_url().replacen("redis://", "redis://polybus-nobody:hunter2@", 1);
    let error = connect(json!({ "url": url })).await;
    assert_eq!(error.failure_kind(), Some(FailureKind::Auth), "{error}");
    assert!(!error.is_retryable(), "{error}");
    assert!(!error.to_string().contains("hunter2"), "{error}");
    assert!(!format!("{error:?}").contains("hunter2"), "{error:?}");
}
