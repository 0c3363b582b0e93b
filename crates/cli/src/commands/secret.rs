//! `polybus secret set|list|delete`: secrets for `$Secret{name}` references, on the local
//! registry or through a server. A value goes in from stdin or a prompt, never from the command
//! line (other users can read a process's arguments), and never comes back out.

use std::io::{IsTerminal, Read};

use polybus::{Registry, SecretInfo, Secrets};
use serde_json::json;

use super::{Context, Source};
use crate::cli::SecretCommand;
use crate::failure::{CliResult, Failure};
use crate::output;

/// Runs a secret command.
pub async fn run(ctx: &Context, command: SecretCommand) -> CliResult {
    match command {
        SecretCommand::Set { name } => {
            polybus::core::secret::check_name(&name)
                .map_err(|rule| Failure::new("VALIDATION_FAILED", format!("secret name `{name}`: {rule}")))?;
            let value = read_value(&name)?;
            let info = match ctx.source() {
                Source::Local => {
                    let registry = ctx.registry().await?;
                    local_store(ctx, &registry, true)?.set(&name, &value).await?
                }
                Source::Remote(client) => client.set_secret(&name, &value).await?,
            };
            if ctx.json() {
                return output::json(&info);
            }
            output::line(format_args!("secret `{name}` set; refer to it as `$Secret{{{name}}}`"))
        }
        SecretCommand::List => {
            let list = match ctx.source() {
                Source::Local => {
                    let registry = ctx.registry().await?;
                    local_store(ctx, &registry, false)?.list().await?
                }
                Source::Remote(client) => client.secrets().await?,
            };
            if ctx.json() {
                return output::json(&list);
            }
            let rows: Vec<Vec<String>> = list.iter().map(row).collect();
            output::table(&["NAME", "CREATED", "UPDATED"], &rows)?;
            if list.is_empty() {
                eprintln!(
                    "no secrets yet: set one with `polybus secret set NAME` (the value is read from stdin)"
                );
            }
            Ok(())
        }
        SecretCommand::Delete { name } => {
            match ctx.source() {
                Source::Local => {
                    let registry = ctx.registry().await?;
                    local_store(ctx, &registry, false)?.delete(&name).await?
                }
                Source::Remote(client) => client.delete_secret(&name).await?,
            }
            if ctx.json() {
                output::json(&json!({ "deleted": name }))
            } else {
                output::line(format_args!("deleted secret `{name}`"))
            }
        }
    }
}

/// The secrets of the local registry, with its key when there is one (created when `create`).
pub fn local_store(ctx: &Context, registry: &Registry, create: bool) -> CliResult<Secrets> {
    let key = polybus::find_secrets_key(&ctx.registry_url, ctx.secrets_key_file.as_deref(), create)?;
    Ok(Secrets::with_key(registry.store().clone(), key))
}

/// The secrets a local bus resolves `$Secret{..}` from: a key file that cannot be read fails
/// only the connections that need a secret, not every command.
pub fn bus_store(ctx: &Context, registry: &Registry) -> Secrets {
    let key = polybus::find_secrets_key(&ctx.registry_url, ctx.secrets_key_file.as_deref(), false)
        .unwrap_or_else(|e| Err(e.to_string()));
    Secrets::with_key(registry.store().clone(), key)
}

fn row(info: &SecretInfo) -> Vec<String> {
    const TIME: &str = "%Y-%m-%d %H:%M:%S UTC";
    vec![
        info.name.clone(),
        info.created_at.format(TIME).to_string(),
        info.updated_at.format(TIME).to_string(),
    ]
}

/// The value: asked for without echo on a terminal, else all of stdin less one final newline.
fn read_value(name: &str) -> CliResult<String> {
    let value = if std::io::stdin().is_terminal() {
        rpassword::prompt_password(format!("value of secret `{name}` (not shown): "))
            .map_err(|e| Failure::new("INPUT_FAILED", format!("cannot read the value: {e}")))?
    } else {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| Failure::new("INPUT_FAILED", format!("cannot read the value from stdin: {e}")))?;
        let trimmed = text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(&text);
        trimmed.to_owned()
    };
    if value.is_empty() {
        return Err(Failure::new(
            "VALIDATION_FAILED",
            format!(
                "the value of secret `{name}` is empty: pipe it in, e.g. `printf %s \"$VALUE\" | polybus secret set {name}`"
            ),
        ));
    }
    Ok(value)
}
