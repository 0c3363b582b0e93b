//! `polybus topic create|get|list|update|delete`.

use polybus::{BrokerEnv, BrokerType, Kinds, Topic, TopicPatch};
use serde::Serialize;
use serde_json::{Value, json};

use super::{Context, Source};
use crate::cli::{FileArg, TopicCommand};
use crate::failure::{CliResult, InFile};
use crate::files::read_document;
use crate::output;

/// Runs a topic command, on the local registry or through the server.
pub async fn run(ctx: &Context, command: TopicCommand) -> CliResult {
    match command {
        TopicCommand::Create(FileArg { file }) => {
            let doc = read_document(&file)?;
            let topic = Topic::from_value(doc.value.clone()).in_file(&doc.name)?;
            let created = match ctx.source() {
                Source::Local => ctx.registry().await?.create_topic(topic).await.in_file(&doc.name)?,
                Source::Remote(client) => client.create_topic(&doc.value).await.in_file(&doc.name)?,
            };
            written(ctx, "created", &created)
        }
        TopicCommand::Update { event, file: FileArg { file } } => {
            let doc = read_document(&file)?;
            let patch = TopicPatch::from_value(doc.value.clone()).in_file(&doc.name)?;
            let updated = match ctx.source() {
                Source::Local => {
                    ctx.registry().await?.update_topic(&event, patch).await.in_file(&doc.name)?
                }
                Source::Remote(client) => client.update_topic(&event, &doc.value).await.in_file(&doc.name)?,
            };
            written(ctx, "updated", &updated)
        }
        TopicCommand::Get { event } => {
            let (topic, broker) = match ctx.source() {
                Source::Local => {
                    let registry = ctx.registry().await?;
                    let topic = registry.fetch_topic(&event).await?;
                    let broker = registry.fetch_broker(&topic.event()?.broker).await?;
                    (topic, broker)
                }
                Source::Remote(client) => {
                    let topic = client.topic(&event).await?;
                    let broker = client.broker(&topic.event()?.broker).await?;
                    (topic, broker)
                }
            };
            let kinds = polybus::default_kinds();
            let mappings = broker
                .envs
                .iter()
                .map(|env| Mapping::of(&topic, env, &kinds))
                .collect::<Result<Vec<_>, _>>()
                .map_err(polybus::Error::from)?;
            if ctx.json() {
                output::json(&with_mappings(&topic, &mappings)?)
            } else {
                output::line(detail(&topic, &mappings))
            }
        }
        TopicCommand::List { broker } => {
            let topics = match ctx.source() {
                Source::Local => ctx.registry().await?.fetch_topics(broker.as_deref()).await?,
                Source::Remote(client) => client.topics(broker.as_deref()).await?,
            };
            if ctx.json() {
                return output::json(&topics);
            }
            let rows: Vec<Vec<String>> = topics
                .iter()
                .map(|t| {
                    vec![
                        t.tag.clone(),
                        t.name.clone(),
                        t.max_attempts.unwrap_or(polybus::core::topic::DEFAULT_MAX_ATTEMPTS).to_string(),
                        t.version.to_string(),
                    ]
                })
                .collect();
            output::table(&["EVENT", "NAME", "MAX-ATTEMPTS", "VERSION"], &rows)?;
            if topics.is_empty() {
                eprintln!("no topics yet: create one with `polybus topic create -f topic.yaml`");
            }
            Ok(())
        }
        TopicCommand::Delete { event } => {
            match ctx.source() {
                Source::Local => ctx.registry().await?.delete_topic(&event).await?,
                Source::Remote(client) => client.delete_topic(&event).await?,
            }
            if ctx.json() {
                output::json(&json!({ "deleted": "topic", "tag": event }))
            } else {
                output::line(format_args!("deleted topic `{event}`"))
            }
        }
    }
}

/// Where a topic lives on the broker of one env.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Mapping {
    env: String,
    #[serde(rename = "type")]
    broker_type: BrokerType,
    native_name: String,
    dead_letter: String,
    /// How the broker's own tools reach it, where there is more to know than the name.
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<String>,
}

impl Mapping {
    fn of(topic: &Topic, env: &BrokerEnv, kinds: &Kinds) -> Result<Mapping, polybus::core::ValidationError> {
        let spec = topic.spec(&env.slug)?;
        let kind = kinds.get(&env.broker_type).ok().flatten();
        let note = kind.and_then(|k| k.describe(&env.config, &spec));
        let native = &spec.native_name;
        Ok(Mapping {
            env: env.slug.clone(),
            broker_type: env.broker_type.clone(),
            native_name: native.clone(),
            dead_letter: spec.dead_letter,
            note,
        })
    }
}

/// The topic's JSON with a `nativeNames` list, one entry per env of its broker.
fn with_mappings(topic: &Topic, mappings: &[Mapping]) -> CliResult<Value> {
    let mut value = output::value(topic)?;
    if let Value::Object(map) = &mut value {
        map.insert("nativeNames".into(), output::value(mappings)?);
    }
    Ok(value)
}

fn detail(topic: &Topic, mappings: &[Mapping]) -> String {
    let max_attempts = topic.max_attempts.unwrap_or(polybus::core::topic::DEFAULT_MAX_ATTEMPTS);
    let fields = vec![
        vec!["event:".to_owned(), topic.tag.clone()],
        vec!["name:".to_owned(), topic.name.clone()],
        vec!["description:".to_owned(), topic.description.clone().unwrap_or_default()],
        vec!["max attempts:".to_owned(), max_attempts.to_string()],
        vec!["version:".to_owned(), topic.version.to_string()],
        vec!["on the broker:".to_owned(), String::new()],
    ];
    let rows: Vec<Vec<String>> = mappings
        .iter()
        .map(|m| {
            vec![
                m.env.clone(),
                m.broker_type.to_string(),
                m.native_name.clone(),
                m.dead_letter.clone(),
                m.note.clone().unwrap_or_default(),
            ]
        })
        .collect();
    let table = output::align(&["ENV", "TYPE", "NATIVE NAME", "DEAD LETTER", "NOTE"], &rows);
    let indented: Vec<String> = table.lines().map(|l| format!("  {l}")).collect();
    format!("{}\n{}", output::columns(&fields), indented.join("\n"))
}

fn written(ctx: &Context, verb: &str, topic: &Topic) -> CliResult {
    if ctx.json() {
        return output::json(topic);
    }
    output::line(format_args!("{verb} topic `{}` (version {})", topic.tag, topic.version))
}
