//! Connection failures say whether trying again can help, and keep librdkafka's error.

use polybus::FailureKind;
use polybus_conformance::failures::{closed_port, connect_error};
use polybus_kafka::KafkaConnector;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use serde_json::json;

#[tokio::test]
async fn a_closed_port_is_retryable() {
    let config = json!({"brokers": [format!("127.0.0.1:{}", closed_port())]});
    let error = connect_error(&KafkaConnector, polybus_kafka::BROKER_TYPE, config).await;
    assert_eq!(error.failure_kind(), Some(FailureKind::Unavailable), "{error}");
    assert!(error.is_retryable(), "{error}");
    assert_eq!(error.code(), "CONNECT_FAILED");
    let cause = error.cause().and_then(|c| c.downcast_ref::<KafkaError>());
    let code = cause.and_then(KafkaError::rdkafka_error_code);
    assert_eq!(code, Some(RDKafkaErrorCode::BrokerTransportFailure), "{cause:?}");
}
