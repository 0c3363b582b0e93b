//! `polybus quickstart`: a local broker and topic, ten messages through them, what to try next.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use polybus::{Broker, Bus, Error, Message, Registry, SubscribeOptions, Topic};
use serde_json::json;

use super::{Context, close};
use crate::cli::DEFAULT_REGISTRY;
use crate::failure::{CliResult, Failure};
use crate::output;

const BROKER: &str = "quickstart";
const ENV: &str = "local";
const EVENT: &str = "quickstart:greetings";
const GROUP: &str = "quickstart";
const MESSAGES: usize = 10;
/// The embedded broker's file, in the data folder.
const BROKER_FILE: &str = "polybus-broker.db";
/// How long the ten messages may take to come back.
const RECEIVE_WITHIN: Duration = Duration::from_secs(30);

/// Sets up (or reuses) the quickstart broker and topic, publishes and consumes ten messages.
pub async fn run(ctx: &Context) -> CliResult {
    let registry = ctx.registry().await?;
    let broker_file = broker_file(&ctx.data_dir)?;
    let broker = ensure_broker(&registry).await?;
    let topic = ensure_topic(&registry).await?;

    let bus = ctx.bus_over(registry);
    let exchanged = exchange(&bus).await;
    let closed = close(&bus).await;
    let (published, consumed) = exchanged?;
    closed?;

    if ctx.json() {
        return output::json(&json!({
            "registry": ctx.registry_url,
            "broker": { "tag": BROKER, "env": ENV, "type": "embedded", "path": broker_file, "created": broker },
            "topic": { "event": EVENT, "created": topic },
            "published": published,
            "consumed": consumed,
            "group": GROUP,
        }));
    }
    let state = |created: bool| if created { "created" } else { "already there, reused" };
    let mut registry_flag = if ctx.registry_url == DEFAULT_REGISTRY {
        String::new()
    } else {
        format!(" --registry {}", ctx.registry_url)
    };
    if ctx.data_dir_given {
        registry_flag.push_str(&format!(" --data-dir {}", ctx.data_dir.display()));
    }
    let rows = vec![
        vec!["registry".to_owned(), ctx.registry_url.clone()],
        vec![
            "broker".to_owned(),
            format!(
                "`{BROKER}` ({}): env `{ENV}` on the embedded broker in {}",
                state(broker),
                broker_file.display()
            ),
        ],
        vec!["topic".to_owned(), format!("`{EVENT}` ({})", state(topic))],
        vec![
            "published".to_owned(),
            format!("{} messages in one batch to `{EVENT}` in env `{ENV}`", published.len()),
        ],
        vec!["consumed".to_owned(), format!("{consumed} messages as group `{GROUP}`, each acked")],
    ];
    let next = [
        format!("polybus{registry_flag} broker get {BROKER}"),
        format!("polybus{registry_flag} topic get {EVENT}"),
        format!("polybus{registry_flag} publish --env {ENV} {EVENT} --data hi"),
        format!("polybus{registry_flag} consume --env {ENV} {EVENT} --group me --count 1"),
        format!("polybus{registry_flag} publish --env {ENV} {EVENT} --data hello --count 1000"),
    ];
    let next: Vec<String> = next.iter().map(|c| format!("  {c}")).collect();
    output::line(format!("{}\n\nNext, try:\n{}", output::columns(&rows), next.join("\n")))
}

/// Where the broker file is, for showing: in the data folder, which the env's relative `path`
/// resolves against for the CLI and a server alike.
fn broker_file(data_dir: &Path) -> CliResult<PathBuf> {
    let file = std::path::absolute(data_dir.join(BROKER_FILE))
        .map_err(|e| Failure::new("STORAGE_FAILED", format!("cannot resolve {}: {e}", data_dir.display())))?;
    Ok(clean(&file))
}

/// `/a/./b` → `/a/b`, for a path worth showing.
fn clean(path: &Path) -> PathBuf {
    path.components().filter(|c| !matches!(c, std::path::Component::CurDir)).collect()
}

/// Creates the quickstart broker, or reuses it; true when created.
async fn ensure_broker(registry: &Registry) -> CliResult<bool> {
    let local = json!({ "slug": ENV, "type": "embedded", "config": { "path": BROKER_FILE } });
    match registry.fetch_broker(BROKER).await {
        Ok(existing) if existing.env(ENV).is_some() => Ok(false),
        Ok(_) => {
            let patch = polybus::BrokerPatch::from_value(json!({ "envs": [local] }))?;
            registry.update_broker(BROKER, patch).await?;
            Ok(false)
        }
        Err(Error::BrokerNotFound(_)) => {
            let broker = Broker::from_value(json!({
                "name": "Quickstart",
                "tag": BROKER,
                "description": "Created by `polybus quickstart`",
                "envs": [local],
            }))?;
            match registry.create_broker(broker).await {
                Ok(_) => Ok(true),
                Err(Error::AlreadyExists { .. }) => Ok(false),
                Err(e) => Err(e.into()),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// Creates the quickstart topic, or reuses it; true when created.
async fn ensure_topic(registry: &Registry) -> CliResult<bool> {
    match registry.fetch_topic(EVENT).await {
        Ok(_) => Ok(false),
        Err(Error::TopicNotFound(_)) => {
            let topic = Topic::from_value(json!({
                "tag": EVENT,
                "name": "Greetings",
                "description": "Created by `polybus quickstart`",
            }))?;
            match registry.create_topic(topic).await {
                Ok(_) => Ok(true),
                Err(Error::AlreadyExists { .. }) => Ok(false),
                Err(e) => Err(e.into()),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// Joins the group, publishes ten messages, and receives and acks them; returns their ids and
/// how many messages were acked (leftovers of an earlier, interrupted run included).
async fn exchange(bus: &Bus) -> CliResult<(Vec<String>, usize)> {
    // Joined before publishing, so the group is there whatever a broker does for new groups.
    let mut options = SubscribeOptions::new(GROUP);
    options.prefetch = MESSAGES;
    let mut subscriber = bus.subscribe(ENV, EVENT, options).await?;
    let messages = (1..=MESSAGES)
        .map(|i| {
            Message::text(format!("hello #{i}"))
                .key(format!("greeter-{}", i % 2))
                .header("source", "polybus quickstart")
        })
        .collect();
    let ids = bus.publish_batch(ENV, EVENT, messages).await?;
    let mut waiting: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let mut acked = 0;
    let received = tokio::time::timeout(RECEIVE_WITHIN, async {
        while !waiting.is_empty() {
            let Some(delivery) = subscriber.next().await else {
                return Err(Failure::new("CLOSED", "the subscription ended before the messages arrived"));
            };
            let delivery = delivery?;
            waiting.remove(delivery.id.as_str());
            delivery.ack().await?;
            acked += 1;
        }
        Ok(())
    })
    .await;
    if let Err(e) = subscriber.close().await {
        tracing::warn!(error = %e, "closing the subscription");
    }
    match received {
        Ok(result) => result?,
        Err(_) => {
            return Err(Failure::new(
                "TIMEOUT",
                format!(
                    "{} of {MESSAGES} messages came back within {}s",
                    MESSAGES - waiting.len(),
                    RECEIVE_WITHIN.as_secs()
                ),
            )
            .with_exit(crate::failure::EXIT_TIMEOUT));
        }
    }
    Ok((ids, acked))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_file_sits_in_the_data_folder() {
        let file = broker_file(Path::new("/tmp/x/polybus-data")).expect("path");
        assert_eq!(file, PathBuf::from("/tmp/x/polybus-data/polybus-broker.db"));
        let file = broker_file(Path::new("./polybus-data")).expect("path");
        let expected = std::env::current_dir().expect("cwd").join("polybus-data/polybus-broker.db");
        assert_eq!(file, clean(&expected));
    }
}
