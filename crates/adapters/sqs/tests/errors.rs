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

/// A transport outlives the runtime it first published on (a `Bus` kept in a static, tests
/// sharing one): publishing from the next runtime works instead of failing "settling stopped".
#[test]
fn a_transport_publishes_after_the_runtime_that_first_used_it_ended() {
    let endpoint =
        std::env::var("POLYBUS_SQS_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:4566".to_owned());
    let config = json!({"region": "us-east-1", "accessKeyId": "test", "secretAccessKey": "test", "endpointUrl": &endpoint});
    let spec = polybus::TopicSpec::named(format!("outlives-{}", uuid::Uuid::new_v4().simple()));
    let runtime = || tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    let first = runtime();
    let transport = first.block_on(async {
        let transport =
            SqsConnector.connect(&target(polybus_sqs::BROKER_TYPE, config)).await.expect("a client");
        transport.ensure_topic(&spec).await.expect("the queue");
        // A group, so that publishes have a queue to go to.
        let mut group =
            transport.subscribe(&spec, &polybus::SubscribeOptions::new("g")).await.expect("subscribe");
        group.close().await.expect("close");
        transport.publish(&spec, polybus::Message::new("one")).await.expect("first publish");
        transport
    });
    drop(first);
    let second = runtime();
    second.block_on(async {
        let published = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            transport.publish(&spec, polybus::Message::new("two")),
        )
        .await
        .expect("answers within 20 s");
        // The queue is deleted whatever the outcome.
        let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new("us-east-1"))
            .endpoint_url(&endpoint)
            .credentials_provider(aws_sdk_sqs::config::Credentials::new("test", "test", None, None, "test"))
            .load()
            .await;
        let sqs = aws_sdk_sqs::Client::new(&sdk);
        let listed =
            sqs.list_queues().queue_name_prefix(&spec.native_name).send().await.expect("list queues");
        for url in listed.queue_urls() {
            sqs.delete_queue().queue_url(url).send().await.expect("delete a queue");
        }
        published.expect("publishing from a second runtime");
    });
}
