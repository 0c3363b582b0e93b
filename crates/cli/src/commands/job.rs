//! `polybus job create|list|get|runs|pause|resume|delete|retry`: scheduled and event-triggered
//! publishing, on the local registry (run by `polybus serve`) or through `--server`.

use std::path::PathBuf;

use base64::Engine;
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use polybus::jobs::{CatchUp, Job, JobPayload, JobSpec, Run, Schedule};
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{Context, Source};
use crate::failure::{CliResult, Failure};
use crate::files::read_payload;
use crate::output;

/// `polybus job …`
#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Create a job: publish to EVENT at a time, every interval or on a cron schedule.
    Create(Box<CreateArgs>),
    /// List the jobs with their next run.
    List,
    /// Show a job.
    Get {
        /// The job id.
        id: String,
    },
    /// List a job's runs.
    Runs {
        /// The job id.
        id: String,
    },
    /// Stop a job's runs until it is resumed.
    Pause {
        /// The job id.
        id: String,
    },
    /// Let a paused job run again.
    Resume {
        /// The job id.
        id: String,
    },
    /// Delete a job and its runs.
    Delete {
        /// The job id.
        id: String,
    },
    /// Publish a failed run again (same message id).
    Retry {
        /// The job id.
        id: String,
        /// The run number.
        run: u64,
    },
}

/// `polybus job create …`
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The env to publish in.
    #[arg(long)]
    pub env: String,
    /// The event, `broker-tag:topic-tag`.
    pub event: String,
    /// Run once at this instant (RFC 3339).
    #[arg(long, group = "when")]
    pub at: Option<DateTime<Utc>>,
    /// Run every this long (`1s`, `5m`, `1h`; at least 1s).
    #[arg(long, group = "when")]
    pub every: Option<String>,
    /// Run on this cron schedule (5 fields, or 6 with seconds first).
    #[arg(long, group = "when")]
    pub cron: Option<String>,
    /// The IANA time zone of `--cron` (default UTC).
    #[arg(long, requires = "cron")]
    pub tz: Option<String>,
    /// Run once per message on this event (`broker-tag:topic-tag`, in `--env`).
    #[arg(long, group = "when", value_name = "SOURCE_EVENT")]
    pub on: Option<String>,
    /// With `--on`: deliver each run's message this long after its source message (`10m`).
    #[arg(long, requires = "on")]
    pub delay: Option<String>,
    /// The payload as text.
    #[arg(long, conflicts_with = "file")]
    pub data: Option<String>,
    /// Read the payload from this file (sent as base64 unless it is UTF-8 text).
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Ordering / partition key.
    #[arg(long)]
    pub key: Option<String>,
    /// A header, `NAME=VALUE`; repeat for several.
    #[arg(long = "header", value_name = "NAME=VALUE", value_parser = crate::cli::parse_header)]
    pub headers: Vec<(String, String)>,
    /// Number of runs (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub limit: u64,
    /// No run before this instant (RFC 3339).
    #[arg(long)]
    pub start: Option<DateTime<Utc>>,
    /// No run after this instant (RFC 3339).
    #[arg(long)]
    pub until: Option<DateTime<Utc>>,
    /// A name to recognise the job by.
    #[arg(long)]
    pub name: Option<String>,
    /// Publish attempts of a run before it is recorded as failed.
    #[arg(long, default_value_t = polybus::jobs::DEFAULT_RETRIES)]
    pub retries: u32,
    /// Runs missed while no server ran: `skip` them, or fire `once` for all of them.
    #[arg(long, value_enum, default_value = "skip")]
    pub catch_up: CatchUpArg,
    /// Create the job paused.
    #[arg(long)]
    pub paused: bool,
    /// With `--on`: publish the source message's payload, headers and key instead of `--data`.
    #[arg(long, requires = "on", conflicts_with_all = ["data", "file"])]
    pub forward: bool,
}

/// `--catch-up`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum CatchUpArg {
    /// Drop missed runs.
    Skip,
    /// Fire one run for all missed runs.
    Once,
}

/// Runs a `polybus job` command.
pub async fn run(ctx: &Context, command: JobCommand) -> CliResult {
    match command {
        JobCommand::Create(args) => {
            let job: Job = call(ctx, Method::POST, &[], Some(spec(*args)?)).await?;
            output::json(&job)
        }
        JobCommand::List => {
            let jobs: Vec<Job> = call(ctx, Method::GET, &[], None).await?;
            print_jobs(ctx, &jobs)
        }
        JobCommand::Get { id } => output::json(&call::<Job>(ctx, Method::GET, &[&id], None).await?),
        JobCommand::Runs { id } => {
            let runs: Vec<Run> = call(ctx, Method::GET, &[&id, "runs"], None).await?;
            print_runs(ctx, &runs)
        }
        JobCommand::Pause { id } => {
            output::json(&call::<Job>(ctx, Method::POST, &[&id, "pause"], None).await?)
        }
        JobCommand::Resume { id } => {
            output::json(&call::<Job>(ctx, Method::POST, &[&id, "resume"], None).await?)
        }
        JobCommand::Delete { id } => {
            let _: Value = call(ctx, Method::DELETE, &[&id], None).await?;
            if ctx.json() {
                output::json(&serde_json::json!({ "deleted": "job", "id": id }))
            } else {
                output::line(format!("deleted job {id}"))
            }
        }
        JobCommand::Retry { id, run } => {
            let run = run.to_string();
            output::json(&call::<Run>(ctx, Method::POST, &[&id, "runs", &run, "retry"], None).await?)
        }
    }
}

fn spec(args: CreateArgs) -> CliResult<JobSpec> {
    let payload = match (args.data, args.file) {
        (Some(text), _) => JobPayload { text: Some(text), ..Default::default() },
        (None, Some(path)) => match String::from_utf8(read_payload(&path)?) {
            Ok(text) => JobPayload { text: Some(text), ..Default::default() },
            Err(bytes) => JobPayload {
                base64: Some(base64::engine::general_purpose::STANDARD.encode(bytes.into_bytes())),
                ..Default::default()
            },
        },
        (None, None) => JobPayload::default(),
    };
    if args.at.is_none() && args.every.is_none() && args.cron.is_none() && args.on.is_none() {
        return Err(Failure::new(
            "VALIDATION_FAILED",
            "say when the job runs: --at TIME, --every DURATION, --cron EXPR or --on SOURCE_EVENT",
        ));
    }
    Ok(JobSpec {
        name: args.name,
        env: args.env,
        event: args.event,
        payload,
        headers: args.headers.into_iter().collect(),
        key: args.key,
        schedule: Schedule {
            at: args.at,
            every: args.every,
            cron: args.cron,
            tz: args.tz,
            on: args.on,
            delay: args.delay,
        },
        start_at: args.start,
        end_date: args.until,
        limit: args.limit,
        retries: args.retries,
        catch_up: match args.catch_up {
            CatchUpArg::Skip => CatchUp::Skip,
            CatchUpArg::Once => CatchUp::Once,
        },
        paused: args.paused,
        forward: args.forward,
    })
}

/// One job request, on the local registry or through the server (`/v1/jobs/…`).
async fn call<T: DeserializeOwned>(
    ctx: &Context,
    method: Method,
    path: &[&str],
    spec: Option<JobSpec>,
) -> CliResult<T> {
    let answer = match ctx.source() {
        Source::Remote(client) => {
            let body = spec.as_ref().map(output::value).transpose()?;
            let answer = client.jobs(method.clone(), path, body.as_ref()).await?;
            // The lists come wrapped in an object.
            match path {
                [] if method == Method::GET => answer["jobs"].clone(),
                [_, "runs"] => answer["runs"].clone(),
                _ => answer,
            }
        }
        Source::Local => {
            let bus = ctx.bus().await?;
            let answer = local(&bus, method, path, spec).await;
            let _ = bus.close().await;
            answer?
        }
    };
    serde_json::from_value(answer)
        .map_err(|e| Failure::new("BAD_RESPONSE", format!("unexpected job answer: {e}")))
}

async fn local(bus: &polybus::Bus, method: Method, path: &[&str], spec: Option<JobSpec>) -> CliResult<Value> {
    let value = match (method.as_str(), path, spec) {
        ("POST", [], Some(spec)) => output::value(&bus.create_job(spec).await?)?,
        ("GET", [], _) => output::value(&bus.list_jobs().await?)?,
        ("GET", [id], _) => output::value(&bus.get_job(id).await?)?,
        ("DELETE", [id], _) => {
            bus.delete_job(id).await?;
            Value::Null
        }
        ("GET", [id, "runs"], _) => output::value(&bus.job_runs(id).await?)?,
        ("POST", [id, "pause"], _) => output::value(&bus.pause_job(id).await?)?,
        ("POST", [id, "resume"], _) => output::value(&bus.resume_job(id).await?)?,
        ("POST", [id, "runs", run, "retry"], _) => {
            let run = run
                .parse()
                .map_err(|_| Failure::new("VALIDATION_FAILED", format!("`{run}` is not a run number")))?;
            output::value(&bus.retry_run(id, run).await?)?
        }
        _ => return Err(Failure::new("INTERNAL", format!("no job operation {method} {}", path.join("/")))),
    };
    Ok(value)
}

fn time(t: Option<DateTime<Utc>>) -> String {
    t.map_or_else(|| "-".to_owned(), polybus::wire::format_time)
}

fn print_jobs(ctx: &Context, jobs: &[Job]) -> CliResult {
    if ctx.json() {
        return output::json(jobs);
    }
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            let s = &j.spec.schedule;
            let when = match (&s.at, &s.every, &s.cron) {
                (Some(at), _, _) => format!("at {}", polybus::wire::format_time(*at)),
                (_, Some(every), _) => format!("every {every}"),
                (_, _, Some(cron)) => format!("cron {cron} {}", s.tz.as_deref().unwrap_or("UTC")),
                _ => match (&s.on, &s.delay) {
                    (Some(on), Some(delay)) => format!("on {on} +{delay}"),
                    (Some(on), None) => format!("on {on}"),
                    _ => "-".to_owned(),
                },
            };
            let state = if j.spec.paused {
                "paused"
            } else if j.next_run.is_none() && s.on.is_none() {
                "done"
            } else {
                "active"
            };
            vec![
                j.id.clone(),
                j.spec.name.clone().unwrap_or_default(),
                j.spec.event.clone(),
                when,
                time(j.next_run),
                j.runs.to_string(),
                state.to_owned(),
            ]
        })
        .collect();
    output::table(&["ID", "NAME", "EVENT", "SCHEDULE", "NEXT RUN", "RUNS", "STATE"], &rows)
}

fn print_runs(ctx: &Context, runs: &[Run]) -> CliResult {
    if ctx.json() {
        return output::json(runs);
    }
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            vec![
                r.id.to_string(),
                polybus::wire::format_time(r.scheduled_at),
                time(r.fired_at),
                r.attempts.to_string(),
                format!("{:?}", r.state).to_lowercase(),
                r.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    output::table(&["RUN", "SCHEDULED", "FIRED", "ATTEMPTS", "STATE", "ERROR"], &rows)
}
