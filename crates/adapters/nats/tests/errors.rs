//! Connection failures say whether trying again can help, and keep the client's own error.

use polybus_core::{BrokerType, ConnectTarget, Connector, FailureKind};
use polybus_nats::NatsConnector;
use serde_json::json;

#[tokio::test]
async fn a_closed_port_is_retryable() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        listener.local_addr().expect("its address").port()
    };
    let target = ConnectTarget {
        broker: "errors".into(),
        env: "dev".into(),
        broker_type: BrokerType::Nats,
        config: json!({"servers": format!("nats://127.0.0.1:{port}"), "maxReconnectAttempts": 1}),
    };
    let error = match NatsConnector.connect(&target).await {
        Ok(_) => panic!("connected to a closed port"),
        Err(e) => e,
    };
    assert_eq!(error.failure_kind(), Some(FailureKind::Unavailable), "{error}");
    assert!(error.is_retryable(), "{error}");
    assert_eq!(error.code(), "CONNECT_FAILED");
    let cause =
        error.cause().and_then(|c| c.downcast_ref::<async_nats::ConnectError>()).expect("the client's error");
    assert_eq!(cause.kind(), async_nats::ConnectErrorKind::Io, "{cause}");
}
