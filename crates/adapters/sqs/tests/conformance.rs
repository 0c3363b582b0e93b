//! The shared behaviour suite against SQS on moto, region `us-east-1`.
//!
//! By default the suite starts a moto of its own, through this crate's `moto_server.py` (the
//! launcher that fixes moto's SQS emulation for concurrent clients and large queues), on a free
//! loopback port, with the Python of the venv `scripts/services sqs` installs (`POLYBUS_VENV`,
//! default `~/.cache/polybus/venv`): the run gets the launcher of this checkout whatever the
//! shared moto was started from, and no one else's load. `POLYBUS_SQS_ENDPOINT` points the suite
//! at a running moto (or SQS) instead, as does a missing venv (`http://127.0.0.1:4566`, started
//! by `scripts/services sqs`); the queues this run made there (`t-…`) are deleted at the end.
//!
//! moto keeps its queues in memory, so restarting it loses the messages the reconnect case
//! needs: that case and the broker-restart cases are skipped.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use polybus_conformance::private::Launch;
use polybus_conformance::{PrivateBroker, Target};
use polybus_sqs::SqsConnector;
use serde_json::json;

const SHARED: &str = "http://127.0.0.1:4566";

fn config(endpoint: &str) -> serde_json::Value {
    json!({
        "region": "us-east-1",
        "endpointUrl": endpoint,
        "accessKeyId": "test",
        "secretAccessKey": "test",
    })
}

/// A moto of this binary's own, through the crate's launcher.
fn private_moto() -> PrivateBroker {
    PrivateBroker::new("moto", |_dir, port| {
        let venv = std::env::var_os("POLYBUS_VENV")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache/polybus/venv")));
        let python = venv
            .map(|venv| venv.join("bin/python3"))
            .filter(|python| python.is_file())
            .ok_or("no Python venv with moto (scripts/services sqs installs it; POLYBUS_VENV names it)")?;
        let launcher = Path::new(env!("CARGO_MANIFEST_DIR")).join("moto_server.py").display().to_string();
        let port = port.to_string();
        let endpoint = format!("http://127.0.0.1:{port}");
        Ok(Launch::new(python, &[&launcher, "-H", "127.0.0.1", "-p", &port], config(&endpoint)))
    })
}

fn main() -> ExitCode {
    if let Some(code) = polybus_conformance::member_process(&[Arc::new(SqsConnector)]) {
        return code;
    }
    // Kept until the suite is done; dropping it stops the server.
    let mut moto = None;
    let endpoint = match std::env::var("POLYBUS_SQS_ENDPOINT") {
        Ok(endpoint) => endpoint,
        Err(_) => {
            let broker = private_moto();
            match broker.addr() {
                Ok(addr) => {
                    moto = Some(broker);
                    format!("http://{addr}")
                }
                Err(e) => {
                    eprintln!("conformance[sqs]: no private moto ({e}); using the shared one on {SHARED}");
                    SHARED.to_owned()
                }
            }
        }
    };
    let config = config(&endpoint);
    let target =
        Target::new("sqs", polybus_sqs::BROKER_TYPE, config).connector(Arc::new(SqsConnector)).no_private(
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
    if moto.take().is_some() {
        // The private server and its queues are gone with it.
        return code;
    }
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
