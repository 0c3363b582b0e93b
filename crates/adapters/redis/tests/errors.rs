//! Connection failures say whether trying again can help, and keep Redis's own error.
//!
//! Needs the Redis on `POLYBUS_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`).

use polybus::FailureKind;
use polybus_conformance::failures::{closed_port, connect_error};
use polybus_redis::RedisConnector;
use serde_json::json;

fn redis_url() -> String {
    std::env::var("POLYBUS_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

#[tokio::test]
async fn a_closed_port_is_retryable() {
    let config = json!({"url": format!("redis://127.0.0.1:{}", closed_port())});
    let error = connect_error(&RedisConnector, polybus_redis::BROKER_TYPE, config).await;
    assert_eq!(error.failure_kind(), Some(FailureKind::Unavailable), "{error}");
    assert!(error.is_retryable(), "{error}");
    assert_eq!(error.code(), "CONNECT_FAILED");
    let cause = error.cause().and_then(|c| c.downcast_ref::<redis::RedisError>()).expect("redis's error");
    assert!(cause.is_connection_refusal(), "{cause:?}");
}

#[tokio::test]
async fn a_wrong_password_is_not_retryable() {
    let url = redis_url().replacen("redis://", "redis://polybus-nobody:hunter2@", 1);
    let error = connect_error(&RedisConnector, polybus_redis::BROKER_TYPE, json!({ "url": url })).await;
    assert_eq!(error.failure_kind(), Some(FailureKind::Auth), "{error}");
    assert!(!error.is_retryable(), "{error}");
    let shown = format!("{error} {error:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
}
