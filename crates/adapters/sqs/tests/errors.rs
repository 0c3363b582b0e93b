//! Failures say whether trying again can help, and keep the SDK's own error.

use polybus::{Connector, FailureKind};
use polybus_conformance::failures::{closed_port, target};
use polybus_sqs::SqsConnector;
use serde_json::json;

#[tokio::test]
async fn a_closed_port_is_retryable() {
    let config = json!({
        "region": "us-east-1",
        "accessKeyId": "test",
        "secretAccessKey": "test",
        "endpointUrl": format!("http://127.0.0.1:{}", closed_port()),
    });
    let transport = SqsConnector.connect(&target(polybus_sqs::BROKER_TYPE, config)).await.expect("a client");
    let error = transport.ping().await.expect_err("nothing listens there");
    assert_eq!(error.failure_kind(), Some(FailureKind::Unavailable), "{error}");
    assert!(error.is_retryable(), "{error}");
    assert!(error.cause().is_some(), "keeps the SDK's error: {error:?}");
}
