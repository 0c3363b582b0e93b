//! The shared behaviour suite against SQS: moto's server at `POLYBUS_SQS_ENDPOINT` (default
//! `http://127.0.0.1:4566`, started by `scripts/services sqs`), region `us-east-1`.
//!
//! moto keeps its queues in memory, so restarting it loses the messages the reconnect case
//! needs: that case and the broker-restart cases are skipped. The queues this run made (`t-…`) are deleted at the end.

use std::process::ExitCode;
use std::sync::Arc;

use polybus::BrokerType;
use polybus_conformance::Target;
use polybus_sqs::SqsConnector;
use serde_json::json;

fn endpoint() -> String {
    std::env::var("POLYBUS_SQS_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:4566".to_owned())
}

fn main() -> ExitCode {
    if let Some(code) = polybus_conformance::member_process(&[Arc::new(SqsConnector)]) {
        return code;
    }
    let endpoint = endpoint();
    let config = json!({
        "region": "us-east-1",
        "endpointUrl": endpoint,
        "accessKeyId": "test",
        "secretAccessKey": "test",
    });
    let target = Target::new("sqs", BrokerType::AwsSqs, config).connector(Arc::new(SqsConnector)).no_private(
        "moto keeps its queues and messages in memory only: a restart loses all of them, so there is no \
         restart to survive",
    );
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("conformance[sqs]: starting a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let client = runtime.block_on(client(&endpoint));
    let before = runtime.block_on(queue_urls(&client)).unwrap_or_default();
    let code = polybus_conformance::run(target);
    runtime.block_on(async {
        let after = match queue_urls(&client).await {
            Ok(after) => after,
            Err(e) => return eprintln!("conformance[sqs]: listing queues to clean up: {e}"),
        };
        // The suite's topics are `conformance:t-<id>…`: their queues start with `t-`.
        for url in after.iter().filter(|u| !before.contains(u)) {
            let name = url.rsplit('/').next().unwrap_or_default();
            if name.starts_with("t-")
                && let Err(e) = client.delete_queue().queue_url(url).send().await
            {
                eprintln!("conformance[sqs]: deleting queue {name}: {e}");
            }
        }
    });
    code
}

async fn client(endpoint: &str) -> aws_sdk_sqs::Client {
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_sqs::config::Credentials::new("test", "test", None, None, "test"))
        .load()
        .await;
    aws_sdk_sqs::Client::new(&config)
}

async fn queue_urls(client: &aws_sdk_sqs::Client) -> Result<Vec<String>, String> {
    client
        .list_queues()
        .max_results(1000)
        .into_paginator()
        .items()
        .send()
        .try_collect()
        .await
        .map_err(|e| aws_sdk_sqs::error::DisplayErrorContext(e).to_string())
}
