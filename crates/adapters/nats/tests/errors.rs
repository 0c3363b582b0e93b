//! Connection failures say whether trying again can help, and keep the client's own error.

use async_nats::{ConnectError, ConnectErrorKind};
use polybus::FailureKind;
use polybus_conformance::failures::{closed_port, connect_error};
use polybus_nats::NatsConnector;
use serde_json::json;

#[tokio::test]
async fn a_closed_port_is_retryable() {
    let config = json!({"servers": format!("nats://127.0.0.1:{}", closed_port()), "maxReconnectAttempts": 1});
    let error = connect_error(&NatsConnector, polybus_nats::BROKER_TYPE, config).await;
    assert_eq!(error.failure_kind(), Some(FailureKind::Unavailable), "{error}");
    assert!(error.is_retryable(), "{error}");
    assert_eq!(error.code(), "CONNECT_FAILED");
    let cause = error.cause().and_then(|c| c.downcast_ref::<ConnectError>()).expect("the client's error");
    assert_eq!(cause.kind(), ConnectErrorKind::Io, "{cause}");
}
