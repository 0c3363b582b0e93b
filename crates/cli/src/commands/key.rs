//! `polybus key create|list|revoke`: the server's API keys, kept hashed in the registry.

use polybus::Error;
use polybus_server::ApiKeys;
use serde_json::json;

use super::Context;
use crate::cli::KeyCommand;
use crate::failure::{CliResult, Failure};
use crate::output;

/// Runs a key command.
pub async fn run(ctx: &Context, command: KeyCommand) -> CliResult {
    let keys = ApiKeys::new(&ctx.registry().await?);
    match command {
        KeyCommand::Create { name, read_only } => {
            let key = keys.create(&name, read_only).await.map_err(|e| match e {
                Error::AlreadyExists { .. } => Failure::new(
                    "ALREADY_EXISTS",
                    format!(
                        "an API key named `{name}` exists already: revoke it first, or choose another name"
                    ),
                ),
                other => other.into(),
            })?;
            if ctx.json() {
                return output::json(&json!({
                    "name": key.info.name,
                    "key": key.secret,
                    "prefix": key.info.prefix,
                    "readOnly": key.info.read_only,
                    "createdAt": key.info.created_at,
                }));
            }
            // The key alone on stdout, for `KEY=$(polybus key create --name ci)`.
            output::line(&key.secret)?;
            eprintln!("created API key `{name}` ({}); it is shown only this once", access(read_only));
            Ok(())
        }
        KeyCommand::List => {
            let list = keys.list().await?;
            if ctx.json() {
                return output::json(&list);
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|k| {
                    vec![
                        k.name.clone(),
                        format!("{}…", k.prefix),
                        access(k.read_only).to_owned(),
                        k.created_at.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
                    ]
                })
                .collect();
            output::table(&["NAME", "PREFIX", "ACCESS", "CREATED"], &rows)?;
            if list.is_empty() {
                eprintln!("no API keys yet: create one with `polybus key create --name NAME [--read-only]`");
            }
            Ok(())
        }
        KeyCommand::Revoke { name } => {
            if !keys.revoke(&name).await? {
                return Err(Failure::new(
                    "KEY_NOT_FOUND",
                    format!("no API key named `{name}` (see `polybus key list`)"),
                ));
            }
            if ctx.json() {
                output::json(&json!({ "revoked": name }))
            } else {
                output::line(format_args!("revoked API key `{name}`"))
            }
        }
    }
}

fn access(read_only: bool) -> &'static str {
    if read_only { "read-only" } else { "read-write" }
}
