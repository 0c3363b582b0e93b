//! `polybus serve [--listen ADDR] [--data-dir DIR] [--tls-cert F --tls-key F]`: the HTTP(S)
//! server over the registry, keeping every file a definition names inside the data folder.
//!
//! When the registry has no API key yet, a read-write key named `admin` is created and printed
//! once, so the first `polybus serve` can be used at once; later starts create nothing.

use polybus::Error;
use polybus_server::{ApiKeys, NewKey, ServeError, Server, ServerConfig};
use serde_json::json;

use super::Context;
use crate::cli::ServeArgs;
use crate::failure::{CliResult, Failure};
use crate::output;

/// Name of the key created when the registry has none.
const FIRST_KEY: &str = "admin";

/// Binds, prints where the server is (and a first key when there was none), serves until
/// Ctrl-C or SIGTERM.
pub async fn run(ctx: &Context, args: ServeArgs) -> CliResult {
    // Before anything is printed, so a signal sent as soon as the banner shows is not lost.
    let shutdown = polybus_server::shutdown_signal();
    let mut config = ServerConfig::new(args.listen, ctx.registry_url.clone());
    config.secrets_key_file = ctx.secrets_key_file.clone();
    config.options.secret_env_prefixes = args.secret_env_prefixes;
    config.options.data_dir = Some(ctx.data_dir.clone());
    config.options.jobs =
        Some(polybus::jobs::SchedulerOptions { lease: args.job_lease, ..Default::default() });
    if let (Some(cert), Some(key)) = (args.tls_cert, args.tls_key) {
        config.tls = Some(polybus_server::TlsFiles { cert, key });
    }
    let server = Server::bind(&config).await.map_err(failure)?;
    let address = server.local_addr().map_err(failure)?;
    let first = first_key(server.state().keys()).await?;
    let scheme = if server.is_tls() { "https" } else { "http" };
    let url = format!("{scheme}://{address}");
    let registry = polybus_server::redact_url(&ctx.registry_url);
    let data_dir = std::path::absolute(&ctx.data_dir).unwrap_or_else(|_| ctx.data_dir.clone());
    let data_dir = data_dir.display().to_string();
    if ctx.json() {
        let key = first.as_ref().map(|k| {
            json!({ "name": k.info.name, "key": k.secret, "prefix": k.info.prefix, "readOnly": k.info.read_only })
        });
        let started = json!({ "url": url, "registry": registry, "dataDir": data_dir, "createdKey": key });
        output::line(output::compact(&started)?)?;
    } else {
        output::line(banner(&url, &registry, &data_dir, first.as_ref()))?;
    }
    server.run(shutdown).await.map_err(failure)
}

/// Creates the first key when the registry has none; `None` when keys exist (or another server
/// created the first one meanwhile).
async fn first_key(keys: &ApiKeys) -> CliResult<Option<NewKey>> {
    if !keys.list().await?.is_empty() {
        return Ok(None);
    }
    match keys.create(FIRST_KEY, false).await {
        Ok(key) => Ok(Some(key)),
        Err(Error::AlreadyExists { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn banner(url: &str, registry: &str, data_dir: &str, first: Option<&NewKey>) -> String {
    let rows = vec![
        vec!["dashboard".to_owned(), format!("{url}/")],
        vec!["API".to_owned(), format!("{url}/v1  (described at {url}/v1/openapi.json)")],
        vec!["metrics".to_owned(), format!("{url}/metrics")],
        vec!["health".to_owned(), format!("{url}/healthz, {url}/readyz")],
        vec!["registry".to_owned(), registry.to_owned()],
        vec!["data folder".to_owned(), format!("{data_dir}  (every file a definition names stays in it)")],
    ];
    let mut text = format!("polybus server listening on {url}\n{}", indent(&output::columns(&rows)));
    match first {
        Some(key) => {
            let secret = &key.secret;
            text.push_str(&format!(
                "\n\nThe registry had no API key, so `{}` (read-write) was created. It is shown only this once:\n  {secret}\n\
                 Try:\n  curl -H \"Authorization: Bearer {secret}\" {url}/v1/brokers\n  open {url}/?key={secret}",
                key.info.name
            ));
        }
        None => text.push_str(&format!(
            "\n\nEvery route but /, /healthz and /readyz needs `Authorization: Bearer <key>`; \
             create a key with `polybus key create --name NAME [--read-only]`.\nOpen the dashboard at {url}/?key=KEY"
        )),
    }
    text.push_str("\nStop with Ctrl-C.");
    text
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}")).collect::<Vec<_>>().join("\n")
}

fn failure(error: ServeError) -> Failure {
    Failure::new(error.code(), error.to_string())
}
