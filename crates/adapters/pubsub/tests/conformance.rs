//! The shared behaviour suite against Google's Pub/Sub emulator.
//!
//! The emulator is the one `scripts/services pubsub` starts on 127.0.0.1:8085, or the one
//! `PUBSUB_EMULATOR_HOST` names. The suite's topics (`t-…`) and their subscriptions are deleted
//! when the run ends. The reconnect case is skipped: the emulator keeps everything in memory,
//! so restarting it loses topics, subscriptions and messages rather than testing a reconnect;
//! the broker-restart cases are skipped for the same reason.

use std::collections::HashSet;
use std::process::ExitCode;
use std::sync::Arc;

use google_cloud_auth::credentials::anonymous;
use google_cloud_pubsub::client::{SubscriptionAdmin, TopicAdmin};
use polybus_conformance::Target;
use polybus_pubsub::PubsubConnector;
use serde_json::json;

const PROJECT: &str = "polybus-test";

fn main() -> ExitCode {
    if let Some(code) = polybus_conformance::member_process(&[Arc::new(PubsubConnector)]) {
        return code;
    }
    let host = std::env::var("PUBSUB_EMULATOR_HOST").unwrap_or_else(|_| "127.0.0.1:8085".into());
    let endpoint = format!("http://{host}");
    let target = Target::new(
        "pubsub",
        polybus_pubsub::BROKER_TYPE,
        json!({ "projectId": PROJECT, "endpoint": endpoint }),
    )
    .connector(Arc::new(PubsubConnector))
    .no_private(
        "Google's Pub/Sub emulator keeps topics, subscriptions and messages in memory only: a restart \
         loses all of them, so there is no restart to survive",
    );

    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("conformance[pubsub]: starting a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let before = runtime.block_on(resource_names(&endpoint)).unwrap_or_default();
    let code = polybus_conformance::run(target);
    runtime.block_on(async {
        match resource_names(&endpoint).await {
            Ok(after) => delete_new(&endpoint, &before, &after).await,
            Err(e) => eprintln!("conformance[pubsub]: listing what the run left: {e}"),
        }
    });
    code
}

/// Topic and subscription paths in the test project.
#[derive(Default)]
struct Names {
    topics: HashSet<String>,
    subscriptions: HashSet<String>,
}

async fn clients(endpoint: &str) -> Result<(TopicAdmin, SubscriptionAdmin), String> {
    let topics = TopicAdmin::builder()
        .with_endpoint(endpoint)
        .with_credentials(anonymous::Builder::new().build())
        .build()
        .await
        .map_err(|e| e.to_string())?;
    let subscriptions = SubscriptionAdmin::builder()
        .with_endpoint(endpoint)
        .with_credentials(anonymous::Builder::new().build())
        .build()
        .await
        .map_err(|e| e.to_string())?;
    Ok((topics, subscriptions))
}

async fn resource_names(endpoint: &str) -> Result<Names, String> {
    let (topics, subscriptions) = clients(endpoint).await?;
    let project = format!("projects/{PROJECT}");
    let mut names = Names::default();
    let mut token = String::new();
    loop {
        let page = topics
            .list_topics()
            .set_project(&project)
            .set_page_size(1000)
            .set_page_token(token)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        names.topics.extend(page.topics.into_iter().map(|t| t.name));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let mut token = String::new();
    loop {
        let page = subscriptions
            .list_subscriptions()
            .set_project(&project)
            .set_page_size(1000)
            .set_page_token(token)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        names.subscriptions.extend(page.subscriptions.into_iter().map(|s| s.name));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    Ok(names)
}

/// Deletes the suite's topics (`t-…`) and subscriptions made during this run.
async fn delete_new(endpoint: &str, before: &Names, after: &Names) {
    let Ok((topics, subscriptions)) = clients(endpoint).await else { return };
    let ours = |path: &String| path.rsplit('/').next().is_some_and(|id| id.starts_with("t-"));
    for path in after.subscriptions.iter().filter(|p| ours(p) && !before.subscriptions.contains(*p)) {
        if let Err(e) = subscriptions.delete_subscription().set_subscription(path).send().await {
            eprintln!("conformance[pubsub]: deleting subscription {path}: {e}");
        }
    }
    for path in after.topics.iter().filter(|p| ours(p) && !before.topics.contains(*p)) {
        if let Err(e) = topics.delete_topic().set_topic(path).send().await {
            eprintln!("conformance[pubsub]: deleting topic {path}: {e}");
        }
    }
}
