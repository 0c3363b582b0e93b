//! `polybus broker create|update|get|list|delete|test`.

use polybus::{Broker, BrokerPatch, BrokerType};
use serde_json::json;

use super::{Context, Source};
use crate::cli::{BrokerCommand, FileArg};
use crate::failure::{CliResult, InFile};
use crate::files::read_document;
use crate::output;

/// Runs a broker command, on the local registry or through the server.
pub async fn run(ctx: &Context, command: BrokerCommand) -> CliResult {
    match command {
        BrokerCommand::Create(FileArg { file }) => {
            let doc = read_document(&file)?;
            let broker = Broker::from_value(doc.value.clone()).in_file(&doc.name)?;
            let created = match ctx.source() {
                Source::Local => ctx.registry().await?.create_broker(broker).await.in_file(&doc.name)?,
                Source::Remote(client) => client.create_broker(&doc.value).await.in_file(&doc.name)?,
            };
            written(ctx, "created", &created)
        }
        BrokerCommand::Update { tag, file: FileArg { file } } => {
            let doc = read_document(&file)?;
            let patch = BrokerPatch::from_value(doc.value.clone()).in_file(&doc.name)?;
            let updated = match ctx.source() {
                Source::Local => ctx.registry().await?.update_broker(&tag, patch).await.in_file(&doc.name)?,
                Source::Remote(client) => client.update_broker(&tag, &doc.value).await.in_file(&doc.name)?,
            };
            written(ctx, "updated", &updated)
        }
        BrokerCommand::Get { tag } => {
            let broker = match ctx.source() {
                Source::Local => ctx.registry().await?.fetch_broker(&tag).await?,
                Source::Remote(client) => client.broker(&tag).await?,
            }
            .redacted();
            if ctx.json() { output::json(&broker) } else { output::line(detail(&broker)?) }
        }
        BrokerCommand::List => {
            let brokers = match ctx.source() {
                Source::Local => ctx.registry().await?.fetch_brokers().await?,
                Source::Remote(client) => client.brokers().await?,
            };
            let brokers: Vec<Broker> = brokers.iter().map(Broker::redacted).collect();
            if ctx.json() {
                return output::json(&brokers);
            }
            let rows: Vec<Vec<String>> = brokers
                .iter()
                .map(|b| vec![b.tag.clone(), b.name.clone(), env_types(b), b.version.to_string()])
                .collect();
            output::table(&["TAG", "NAME", "ENVS", "VERSION"], &rows)?;
            if brokers.is_empty() {
                eprintln!("no brokers yet: create one with `polybus broker create -f broker.yaml`");
            }
            Ok(())
        }
        BrokerCommand::Delete { tag, force } => {
            match ctx.source() {
                Source::Local => ctx.registry().await?.delete_broker(&tag, force).await?,
                Source::Remote(client) => client.delete_broker(&tag, force).await?,
            }
            if ctx.json() {
                output::json(&json!({ "deleted": "broker", "tag": tag }))
            } else {
                output::line(format_args!("deleted broker `{tag}`"))
            }
        }
        BrokerCommand::Test { tag, env } => {
            let (broker_type, millis) = match ctx.source() {
                Source::Local => test_locally(ctx, &tag, &env).await?,
                Source::Remote(client) => {
                    let tested = client.test_broker(&tag, &env).await?;
                    (tested.broker_type, tested.latency_ms)
                }
            };
            if ctx.json() {
                output::json(&json!({
                    "broker": tag, "env": env, "type": broker_type, "ok": true,
                    "latencyMs": (millis * 1000.0).round() / 1000.0,
                }))
            } else {
                output::line(format_args!("broker `{tag}` env `{env}` ({broker_type}): ok in {millis:.1} ms"))
            }
        }
    }
}

/// Connects to the env from this process and pings it: its broker type and the latency in ms.
async fn test_locally(ctx: &Context, tag: &str, env: &str) -> CliResult<(BrokerType, f64)> {
    let bus = ctx.bus().await?;
    let broker = bus.registry().fetch_broker(tag).await?;
    let broker_type =
        broker.env(env).map(|e| e.broker_type.clone()).ok_or_else(|| polybus::Error::BrokerEnvNotFound {
            tag: tag.to_owned(),
            env: env.to_owned(),
            available: broker.env_slugs(),
        })?;
    let latency = bus.test_connection(tag, env).await;
    if let Err(e) = bus.close().await {
        tracing::debug!(error = %e, "closing the bus after a connection test");
    }
    Ok((broker_type, latency?.as_secs_f64() * 1000.0))
}

fn written(ctx: &Context, verb: &str, broker: &Broker) -> CliResult {
    let broker = broker.redacted();
    if ctx.json() {
        return output::json(&broker);
    }
    output::line(format_args!(
        "{verb} broker `{}` (version {}): envs {}",
        broker.tag,
        broker.version,
        env_types(&broker)
    ))
}

/// `prd (rabbitmq), dev (embedded)`.
fn env_types(broker: &Broker) -> String {
    broker.envs.iter().map(|e| format!("{} ({})", e.slug, e.broker_type)).collect::<Vec<_>>().join(", ")
}

/// The fields of a (redacted) broker, then its envs with their config as compact JSON.
fn detail(broker: &Broker) -> CliResult<String> {
    let fields = vec![
        vec!["tag:".to_owned(), broker.tag.clone()],
        vec!["name:".to_owned(), broker.name.clone()],
        vec!["description:".to_owned(), broker.description.clone().unwrap_or_default()],
        vec!["version:".to_owned(), broker.version.to_string()],
        vec!["envs:".to_owned(), String::new()],
    ];
    let mut envs = Vec::with_capacity(broker.envs.len());
    for env in &broker.envs {
        envs.push(vec![env.slug.clone(), env.broker_type.to_string(), output::compact(&env.config)?]);
    }
    let env_table = output::align(&["SLUG", "TYPE", "CONFIG"], &envs);
    let indented: Vec<String> = env_table.lines().map(|l| format!("  {l}")).collect();
    Ok(format!("{}\n{}", output::columns(&fields), indented.join("\n")))
}
