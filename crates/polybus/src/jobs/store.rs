//! Jobs and runs as registry records: a job's schedule advances by compare-and-swap on its
//! version, and a run is claimed by inserting its record, whose key (job, run number) is
//! unique in SQLite and PostgreSQL alike, so only one scheduler wins each run.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use polybus_core::{Error, Result, ValidationError};
use polybus_registry::{Kind, Record, Store};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::model::{Job, Run};

/// Reads and writes jobs and their runs in a registry store.
#[derive(Clone)]
pub struct JobStore {
    store: Arc<dyn Store>,
}

/// The registry key of run `number` of `job`: zero-padded so keys list in run order.
fn run_key(job: &str, number: u64) -> String {
    format!("{job}/{number:012}")
}

fn not_found(id: &str) -> Error {
    Error::Validation(ValidationError::field("id", format!("no job `{id}`")))
}

fn encode<T: Serialize>(value: &T) -> Result<serde_json::Value> {
    serde_json::to_value(value).map_err(|e| Error::Storage(format!("cannot encode job record: {e}")))
}

fn decode<T: DeserializeOwned>(record: Record) -> Result<(T, u64)> {
    let value = serde_json::from_value(record.doc)
        .map_err(|e| Error::Storage(format!("stored job record `{}` is unreadable: {e}", record.key)))?;
    Ok((value, record.version))
}

fn job_of(record: Record) -> Result<Job> {
    let (mut job, version): (Job, u64) = decode(record)?;
    job.version = version;
    Ok(job)
}

fn run_of(record: Record) -> Result<Run> {
    let (mut run, version): (Run, u64) = decode(record)?;
    run.version = version;
    Ok(run)
}

impl JobStore {
    /// Jobs in `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        JobStore { store }
    }

    /// Stores a new job.
    pub async fn insert(&self, job: &Job) -> Result<()> {
        self.store.insert(Kind::Job, &job.id, None, &encode(job)?).await
    }

    /// The job with this id.
    pub async fn get(&self, id: &str) -> Result<Job> {
        job_of(self.store.get(Kind::Job, id).await?.ok_or_else(|| not_found(id))?)
    }

    /// Every job, ordered by id (creation order).
    pub async fn list(&self) -> Result<Vec<Job>> {
        self.store.list(Kind::Job, None).await?.into_iter().map(job_of).collect()
    }

    /// Replaces `job` if it is still at its version; false when another writer got in first.
    pub async fn replace(&self, job: &Job) -> Result<bool> {
        self.store.replace(Kind::Job, &job.id, job.version, &encode(job)?).await
    }

    /// Deletes a job and its runs.
    pub async fn delete(&self, id: &str) -> Result<()> {
        if !self.store.delete(Kind::Job, id).await? {
            return Err(not_found(id));
        }
        for run in self.store.list(Kind::JobRun, Some(id)).await? {
            self.store.delete(Kind::JobRun, &run.key).await?;
        }
        Ok(())
    }

    /// The runs of a job, oldest first.
    pub async fn runs(&self, job: &str) -> Result<Vec<Run>> {
        self.store.list(Kind::JobRun, Some(job)).await?.into_iter().map(run_of).collect()
    }

    /// One run of a job.
    pub async fn run(&self, job: &str, number: u64) -> Result<Run> {
        let record = self.store.get(Kind::JobRun, &run_key(job, number)).await?.ok_or_else(|| {
            Error::Validation(ValidationError::field("run", format!("job `{job}` has no run {number}")))
        })?;
        run_of(record)
    }

    /// Claims `run` by inserting it: false when another scheduler already did.
    pub async fn claim(&self, run: &Run) -> Result<bool> {
        match self
            .store
            .insert(Kind::JobRun, &run_key(&run.job_id, run.id), Some(&run.job_id), &encode(run)?)
            .await
        {
            Ok(()) => Ok(true),
            Err(Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Takes the next run number of a job (compare-and-swap on the job's run count).
    pub async fn next_number(&self, id: &str) -> Result<u64> {
        for _ in 0..32 {
            let mut job = self.get(id).await?;
            job.runs += 1;
            if self.replace(&job).await? {
                return Ok(job.runs);
            }
        }
        Err(Error::Storage(format!("job `{id}` kept changing under concurrent updates; try again")))
    }

    /// Writes `run` if it is still at its version (bumping it); false when another scheduler
    /// changed it first (took it over after its lease expired).
    pub async fn update_run(&self, run: &mut Run) -> Result<bool> {
        let written = self
            .store
            .replace(Kind::JobRun, &run_key(&run.job_id, run.id), run.version, &encode(run)?)
            .await?;
        if written {
            run.version += 1;
        }
        Ok(written)
    }

    /// Runs of `job` still marked running whose lease ended before `now`.
    pub async fn expired(&self, job: &str, now: DateTime<Utc>) -> Result<Vec<Run>> {
        Ok(self
            .runs(job)
            .await?
            .into_iter()
            .filter(|r| r.state == super::model::RunState::Running && r.lease_until.is_none_or(|t| t <= now))
            .collect())
    }
}
