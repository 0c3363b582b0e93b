//! `polybus idempotency check --env SLUG EVENT KEY`: which message an idempotency key was
//! published as, locally or through `--server`.

use polybus::{IdempotencyRecord, wire};
use serde_json::json;

use super::{Context, Source};
use crate::cli::IdempotencyCommand;
use crate::failure::CliResult;
use crate::output;

/// Runs a `polybus idempotency` command.
pub async fn run(ctx: &Context, command: IdempotencyCommand) -> CliResult {
    let IdempotencyCommand::Check { env, event, key } = command;
    let record = match ctx.source() {
        Source::Remote(client) => client.check_idempotency(&env, &event, &key).await?,
        Source::Local => {
            let bus = ctx.bus().await?;
            let checked = bus.check_idempotency(&env, &event, &key).await;
            let _ = bus.close().await;
            checked?
        }
    };
    print(ctx, &key, record.as_ref())
}

fn print(ctx: &Context, key: &str, record: Option<&IdempotencyRecord>) -> CliResult {
    if ctx.json() {
        let value = match record {
            None => json!({"key": key, "state": "free"}),
            Some(r) => json!({
                "key": key,
                "state": r.state.as_str(),
                "message_id": r.message_id,
                "first_seen": wire::format_time(r.first_seen),
                "expires_at": wire::format_time(r.expires_at),
                "lease_expires_at": r.lease_expires_at.map(wire::format_time),
            }),
        };
        return output::line(output::compact(&value)?);
    }
    let Some(r) = record else {
        return output::line(format!("key `{key}` is free: a publish with it would be sent"));
    };
    let row = vec![
        key.to_owned(),
        r.state.as_str().to_owned(),
        r.message_id.clone(),
        wire::format_time(r.first_seen),
        wire::format_time(r.expires_at),
    ];
    output::table(&["KEY", "STATE", "MESSAGE", "FIRST-SEEN", "EXPIRES"], &[row])
}
