//! `polybus dlq list|show|redrive|purge --env SLUG EVENT …`: a topic's dead letters, locally
//! or through `--server`.

use std::collections::BTreeSet;

use polybus::{DeadLetter, DeadLetterFilter, DeadLetterOutcome, wire};
use serde_json::{Value, json};

use super::consume::as_json;
use super::{Context, Source};
use crate::cli::{DlqCommand, DlqTarget};
use crate::failure::{CliResult, Failure};
use crate::output;

/// Characters of a payload shown in the list.
const PREVIEW: usize = 48;

/// Runs a `polybus dlq` command.
pub async fn run(ctx: &Context, command: DlqCommand) -> CliResult {
    match command {
        DlqCommand::List { target, limit } => {
            let filter = filter(&target, Vec::new());
            let letters = list(ctx, &target.env, &target.event, &filter, limit as usize).await?;
            print_list(ctx, &letters)
        }
        DlqCommand::Show { env, event, id } => {
            let filter = DeadLetterFilter { ids: Some(BTreeSet::from([id.clone()])), ..Default::default() };
            let letters = list(ctx, &env, &event, &filter, polybus::DEAD_LETTER_SCAN_MAX).await?;
            let Some(letter) = letters.into_iter().next() else {
                return Err(Failure::new(
                    "DEAD_LETTER_NOT_FOUND",
                    format!(
                        "no dead letter `{id}` of {event} in {env} (see `polybus dlq list --env {env} {event}`)"
                    ),
                ));
            };
            output::json(&as_dead_letter_json(&letter))
        }
        DlqCommand::Redrive { target, ids } => {
            let outcome = act(ctx, &target, ids, Act::Redrive).await?;
            report(ctx, &outcome, "redrove", "REDRIVE_INCOMPLETE")
        }
        DlqCommand::Purge { target, ids } => {
            let outcome = act(ctx, &target, ids, Act::Purge).await?;
            report(ctx, &outcome, "purged", "PURGE_INCOMPLETE")
        }
    }
}

/// What `act` does.
#[derive(Clone, Copy)]
pub enum Act {
    /// Publish back to the topic.
    Redrive,
    /// Delete.
    Purge,
}

fn filter(target: &DlqTarget, ids: Vec<String>) -> DeadLetterFilter {
    let ids: BTreeSet<String> = ids.into_iter().filter(|id| !id.trim().is_empty()).collect();
    DeadLetterFilter {
        group: target.group.clone(),
        reason: target.reason.clone(),
        ids: (!ids.is_empty()).then_some(ids),
    }
}

async fn list(
    ctx: &Context,
    env: &str,
    event: &str,
    filter: &DeadLetterFilter,
    limit: usize,
) -> CliResult<Vec<DeadLetter>> {
    match ctx.source() {
        Source::Remote(client) => client.list_dead_letters(env, event, filter, limit).await,
        Source::Local => {
            let bus = ctx.bus().await?;
            let listed = bus.list_dead_letters(env, event, filter, limit).await;
            let _ = bus.close().await;
            Ok(listed?)
        }
    }
}

async fn act(ctx: &Context, target: &DlqTarget, ids: Vec<String>, act: Act) -> CliResult<DeadLetterOutcome> {
    let filter = filter(target, ids);
    let (env, event) = (&target.env, &target.event);
    match ctx.source() {
        Source::Remote(client) => client.act_on_dead_letters(env, event, &filter, act).await,
        Source::Local => {
            let bus = ctx.bus().await?;
            let outcome = match act {
                Act::Redrive => bus.redrive_dead_letters(env, event, &filter).await,
                Act::Purge => bus.purge_dead_letters(env, event, &filter).await,
            };
            let _ = bus.close().await;
            Ok(outcome?)
        }
    }
}

/// One dead letter as JSON: the message (as `polybus consume` prints it) and why it failed.
pub(crate) fn as_dead_letter_json(letter: &DeadLetter) -> Value {
    let mut value = as_json(&letter.message);
    if let Value::Object(object) = &mut value {
        object.remove("attempt");
        object.insert("reason".into(), json!(letter.reason));
        object.insert("attempts".into(), json!(letter.attempts));
        object.insert("group".into(), json!(letter.group));
        object.insert("event".into(), json!(letter.event));
        object.insert("dead_lettered_at".into(), json!(letter.dead_lettered_at.map(wire::format_time)));
    }
    value
}

fn print_list(ctx: &Context, letters: &[DeadLetter]) -> CliResult {
    if ctx.json() {
        for letter in letters {
            output::line(output::compact(&as_dead_letter_json(letter))?)?;
        }
        return Ok(());
    }
    let rows: Vec<Vec<String>> = letters
        .iter()
        .map(|l| {
            vec![
                l.message.id.clone(),
                l.dead_lettered_at.map(wire::format_time).unwrap_or_else(|| "-".into()),
                l.attempts.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
                l.group.clone().unwrap_or_else(|| "-".into()),
                l.reason.clone().unwrap_or_else(|| "-".into()),
                preview(&l.message),
            ]
        })
        .collect();
    output::table(&["ID", "DEAD-LETTERED", "ATTEMPTS", "GROUP", "REASON", "PAYLOAD"], &rows)
}

/// The payload's first characters, on one line, or its size when it is binary.
pub(super) fn preview(message: &polybus::Message) -> String {
    match message.payload_str() {
        Some(text) => {
            let flat: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
            match flat.char_indices().nth(PREVIEW) {
                Some((at, _)) => format!("{}…", &flat[..at]),
                None => flat,
            }
        }
        None => format!("({} bytes, binary)", message.payload.len()),
    }
}

fn report(ctx: &Context, outcome: &DeadLetterOutcome, verb: &str, incomplete: &'static str) -> CliResult {
    if ctx.json() {
        let failed: Vec<Value> =
            outcome.failed.iter().map(|(id, error)| json!({"id": id, "error": error})).collect();
        output::line(output::compact(
            &json!({"done": outcome.done, "failed": failed, "kept": outcome.kept}),
        )?)?;
    } else {
        let count = outcome.done.len();
        let noun = if count == 1 { "dead letter" } else { "dead letters" };
        output::line(format!("{verb} {count} {noun}; {} not selected stay", outcome.kept))?;
        for (id, error) in &outcome.failed {
            output::line(format!("failed {id}: {error}"))?;
        }
    }
    match outcome.failed.len() {
        0 => Ok(()),
        n => Err(Failure::new(
            incomplete,
            format!("{n} selected dead letters could not be handled; they stay"),
        )),
    }
}
