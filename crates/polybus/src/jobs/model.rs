//! What a job is: the message it publishes and when, validated, and the runs it made.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use base64::Engine;
use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds};
use polybus_core::{Error, Message, Result, ValidationError};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Shortest `every` interval accepted.
pub const MIN_EVERY: Duration = Duration::from_secs(1);

/// Publish attempts of a run when the job does not say.
pub const DEFAULT_RETRIES: u32 = 3;

/// What a job does with runs that fell due while no scheduler ran.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CatchUp {
    /// Missed runs are dropped; the job goes on from its next run after now.
    #[default]
    Skip,
    /// All missed runs together fire one run, then the job goes on from its next run after now.
    Once,
}

/// The payload a job publishes: exactly one of JSON, text or base64 bytes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobPayload {
    /// A JSON payload, published as `application/json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json: Option<Value>,
    /// A text payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Bytes, base64-encoded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base64: Option<String>,
}

/// When a job runs: exactly one of `at`, `every` or `cron`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Schedule {
    /// One run at this instant (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<DateTime<Utc>>,
    /// A run every this long (`1s`, `5m`, `1h 30m`; at least one second).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every: Option<String>,
    /// A cron expression of 5 fields, or 6 with seconds first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// The IANA time zone `cron` is read in (default `UTC`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tz: Option<String>,
    /// A run for every message on this event (`broker:topic`, in the job's env), read by a
    /// consumer group of the job's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on: Option<String>,
    /// With `on`: deliver each run's message this long after the source message arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<String>,
}

/// What a user asks for: a job before it is stored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JobSpec {
    /// A name to recognise the job by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The broker env to publish in.
    pub env: String,
    /// The event to publish (`broker:topic`).
    pub event: String,
    /// The payload of every run's message.
    #[serde(default)]
    pub payload: JobPayload,
    /// Headers of every run's message.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Ordering / partition key of every run's message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// When the job runs.
    pub schedule: Schedule,
    /// No run before this instant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_at: Option<DateTime<Utc>>,
    /// No run after this instant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_date: Option<DateTime<Utc>>,
    /// Number of runs, 0 for no limit.
    #[serde(default)]
    pub limit: u64,
    /// Publish attempts of one run before it is recorded as failed (default 3).
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// What to do with runs missed while no scheduler ran.
    #[serde(default)]
    pub catch_up: CatchUp,
    /// Created paused: no run until resumed.
    #[serde(default)]
    pub paused: bool,
    /// With `schedule.on`: publish the source message's payload, headers and key (the job's
    /// own headers and key added over them) instead of the job's payload.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forward: bool,
}

fn default_retries() -> u32 {
    DEFAULT_RETRIES
}

/// A stored job: its spec and where its schedule stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Job {
    /// The job's id.
    pub id: String,
    /// What was asked for.
    #[serde(flatten)]
    pub spec: JobSpec,
    /// When the job was created.
    pub created_at: DateTime<Utc>,
    /// The scheduled time of the next run; none when the job is done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_run: Option<DateTime<Utc>>,
    /// Runs claimed so far (the number of the last run).
    #[serde(default)]
    pub runs: u64,
    /// Storage version, bumped by every change.
    #[serde(default, skip_serializing)]
    pub version: u64,
}

/// Where a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// Claimed by a scheduler, publishing.
    Running,
    /// Published.
    Succeeded,
    /// Every attempt failed.
    Failed,
}

/// One run of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Run {
    /// The run's number within its job, from 1.
    pub id: u64,
    /// The job it belongs to.
    pub job_id: String,
    /// When it was due.
    pub scheduled_at: DateTime<Utc>,
    /// When its last publish attempt started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fired_at: Option<DateTime<Utc>>,
    /// Publish attempts made.
    pub attempts: u32,
    /// Where it stands.
    pub state: RunState,
    /// The last publish error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The id of the message it publishes (the same for every attempt and replica).
    pub message_id: String,
    /// The scheduler holding the run while it is running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Until when the owner holds it; another scheduler takes it over after this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_until: Option<DateTime<Utc>>,
    /// Storage version, bumped by every change.
    #[serde(default, skip_serializing)]
    pub version: u64,
}

/// The message id of the run of an `on` job for the source message `source`: the same on
/// every replica and redelivery.
pub fn triggered_message_id(job_id: &str, source: &str) -> String {
    format!("job-{job_id}-{source}")
}

/// The message id of a job's run scheduled at `at`: the same for every replica and attempt,
/// so a consumer can drop the duplicate of a run published again after a crash.
pub fn run_message_id(job_id: &str, at: DateTime<Utc>) -> String {
    format!("job-{job_id}-{}", at.timestamp_millis())
}

fn invalid(field: &str, message: impl Into<String>) -> Error {
    Error::Validation(ValidationError::field(field, message))
}

/// A parsed schedule, ready to compute run times.
enum Plan {
    At(DateTime<Utc>),
    Every(chrono::Duration),
    Cron(Box<Cron>, Tz),
    On,
}

impl JobSpec {
    /// Checks every field, naming the first wrong one.
    pub fn validate(&self) -> Result<()> {
        if self.env.trim().is_empty() {
            return Err(invalid("env", "a broker env slug is required"));
        }
        self.event.parse::<polybus_core::EventRef>().map_err(|e| invalid("event", e.to_string()))?;
        self.plan()?;
        self.message("check", Utc::now())?;
        if let (Some(start), Some(end)) = (self.start_at, self.end_date)
            && end < start
        {
            return Err(invalid("endDate", "must not be before startAt"));
        }
        if self.forward && self.schedule.on.is_none() {
            return Err(invalid("forward", "forwarding the source message applies to `schedule.on` only"));
        }
        if self.retries == 0 {
            return Err(invalid("retries", "at least 1 publish attempt is needed"));
        }
        Ok(())
    }

    fn plan(&self) -> Result<Plan> {
        let s = &self.schedule;
        let set = [s.at.is_some(), s.every.is_some(), s.cron.is_some(), s.on.is_some()]
            .iter()
            .filter(|b| **b)
            .count();
        if set != 1 {
            return Err(invalid("schedule", "give exactly one of `at`, `every`, `cron` or `on`"));
        }
        if s.delay.is_some() && s.on.is_none() {
            return Err(invalid("schedule.delay", "a delay applies to `on` only"));
        }
        self.delay()?;
        if let Some(on) = &s.on {
            on.parse::<polybus_core::EventRef>().map_err(|e| invalid("schedule.on", e.to_string()))?;
            return Ok(Plan::On);
        }
        if s.tz.is_some() && s.cron.is_none() {
            return Err(invalid("schedule.tz", "a time zone applies to `cron` only"));
        }
        if let Some(at) = s.at {
            return Ok(Plan::At(at));
        }
        if let Some(every) = &s.every {
            let d = humantime::parse_duration(every).map_err(|e| {
                invalid("schedule.every", format!("`{every}` is not a duration like 30s or 5m: {e}"))
            })?;
            if d < MIN_EVERY {
                return Err(invalid("schedule.every", format!("`{every}` is shorter than 1s")));
            }
            let d = chrono::Duration::from_std(d)
                .map_err(|_| invalid("schedule.every", format!("`{every}` is too long")))?;
            return Ok(Plan::Every(d));
        }
        let expr = s.cron.as_deref().unwrap_or_default();
        let fields = expr.split_whitespace().count();
        if !(5..=6).contains(&fields) {
            return Err(invalid(
                "schedule.cron",
                format!("`{expr}` has {fields} fields; give 5, or 6 with seconds"),
            ));
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .build()
            .parse(expr)
            .map_err(|e| invalid("schedule.cron", format!("`{expr}`: {e}")))?;
        let tz = match s.tz.as_deref() {
            None => Tz::UTC,
            Some(name) => Tz::from_str(name).map_err(|_| {
                invalid("schedule.tz", format!("`{name}` is not an IANA time zone like Africa/Lagos"))
            })?,
        };
        Ok(Plan::Cron(Box::new(cron), tz))
    }

    /// With `on`: how long after its source message a run's message is delivered.
    pub fn delay(&self) -> Result<Option<Duration>> {
        self.schedule
            .delay
            .as_deref()
            .map(|d| {
                humantime::parse_duration(d)
                    .map_err(|e| invalid("schedule.delay", format!("`{d}` is not a duration like 10m: {e}")))
            })
            .transpose()
    }

    /// The message an `on` job publishes for the source message `source`.
    pub fn triggered_message(&self, job_id: &str, source: &Message) -> Result<Message> {
        let mut message = if self.forward {
            let mut message = Message::new(source.payload.clone());
            message.headers = source.headers.clone();
            message.key = source.key.clone();
            message.content_type = source.content_type.clone();
            for (name, value) in &self.headers {
                message = message.header(name, value);
            }
            if let Some(key) = &self.key {
                message = message.key(key);
            }
            message
        } else {
            self.message(job_id, source.published_at)?
        };
        message = message.id(triggered_message_id(job_id, &source.id));
        if let Some(delay) = self.delay()? {
            message = message.delay(delay);
        }
        Ok(message)
    }

    /// The message a run scheduled at `at` publishes.
    pub fn message(&self, job_id: &str, at: DateTime<Utc>) -> Result<Message> {
        let p = &self.payload;
        let given = [p.json.is_some(), p.text.is_some(), p.base64.is_some()].iter().filter(|b| **b).count();
        if given > 1 {
            return Err(invalid("payload", "give one of `json`, `text` or `base64`"));
        }
        let mut message = if let Some(json) = &p.json {
            Message::json(json).map_err(|e| invalid("payload.json", e.to_string()))?
        } else if let Some(b64) = &p.base64 {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| invalid("payload.base64", format!("not base64: {e}")))?;
            Message::new(bytes)
        } else {
            Message::text(p.text.clone().unwrap_or_default())
        };
        for (name, value) in &self.headers {
            message = message.header(name, value);
        }
        if let Some(key) = &self.key {
            message = message.key(key);
        }
        Ok(message.id(run_message_id(job_id, at)))
    }
}

impl Job {
    /// The first scheduled time at or after `from` (strictly after when `!inclusive`), within
    /// `startAt`, `endDate` and `limit`; none when the job has no more runs.
    pub fn next_after(&self, from: DateTime<Utc>, inclusive: bool) -> Result<Option<DateTime<Utc>>> {
        let spec = &self.spec;
        if spec.limit > 0 && self.runs >= spec.limit {
            return Ok(None);
        }
        let (from, inclusive) = match spec.start_at {
            Some(start) if start > from => (start, true),
            _ => (from, inclusive),
        };
        let next = match spec.plan()? {
            Plan::At(at) => (self.runs == 0 && (at > from || (inclusive && at == from))).then_some(at),
            Plan::Every(every) => {
                let anchor = spec.start_at.unwrap_or(self.created_at + every);
                if anchor > from || (inclusive && anchor == from) {
                    Some(anchor)
                } else {
                    let step = every.num_milliseconds().max(1);
                    let passed = (from - anchor).num_milliseconds();
                    let mut k = passed / step;
                    let mut at = anchor + chrono::Duration::milliseconds(k * step);
                    while at < from || (!inclusive && at == from) {
                        k += 1;
                        at = anchor + chrono::Duration::milliseconds(k * step);
                    }
                    Some(at)
                }
            }
            Plan::Cron(cron, tz) => {
                let local = tz.from_utc_datetime(&from.naive_utc());
                cron.find_next_occurrence(&local, inclusive).ok().map(|t| t.with_timezone(&Utc))
            }
            Plan::On => None,
        };
        Ok(next.filter(|t| spec.end_date.is_none_or(|end| *t <= end)))
    }
}
