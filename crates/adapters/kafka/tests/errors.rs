//! Connection failures say whether trying again can help, and keep librdkafka's error.

use polybus_core::{BrokerType, ConnectTarget, Connector, FailureKind};
use polybus_kafka::KafkaConnector;
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
        broker_type: BrokerType::Kafka,
        config: json!({"brokers": [format!("127.0.0.1:{port}")]}),
    };
    let error = match KafkaConnector.connect(&target).await {
        Ok(_) => panic!("connected to a closed port"),
        Err(e) => e,
    };
    assert_eq!(error.failure_kind(), Some(FailureKind::Unavailable), "{error}");
    assert!(error.is_retryable(), "{error}");
    assert_eq!(error.code(), "CONNECT_FAILED");
    let cause = error.cause().and_then(|c| c.downcast_ref::<rdkafka::error::KafkaError>());
    let code = cause.and_then(|e| e.rdkafka_error_code());
    assert_eq!(code, Some(rdkafka::error::RDKafkaErrorCode::BrokerTransportFailure), "{cause:?}");
}
