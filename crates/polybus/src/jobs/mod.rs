//! Jobs: messages published at a time, every interval or on a cron schedule, each run fired
//! exactly once by the schedulers sharing a registry (see docs/JOBS.md).

mod model;
mod scheduler;
mod store;

use chrono::Utc;
use polybus_core::{Error, Result, ValidationError};

pub use model::{
    CatchUp, DEFAULT_RETRIES, Job, JobPayload, JobSpec, MIN_EVERY, Run, RunState, Schedule, run_message_id,
    triggered_message_id,
};
pub use scheduler::{Clock, ManualClock, Scheduler, SchedulerOptions, SystemClock};
pub use store::JobStore;

use crate::Bus;

/// How many times a pause or resume retries when a scheduler changed the job first.
const CHANGE_RETRIES: usize = 8;

impl Bus {
    fn job_store(&self) -> JobStore {
        JobStore::new(self.registry().store().clone())
    }

    /// Validates and stores a job; its first run is the first scheduled time from now on.
    pub async fn create_job(&self, spec: JobSpec) -> Result<Job> {
        spec.validate()?;
        self.registry().fetch_topic(&spec.event).await?;
        if let Some(source) = &spec.schedule.on {
            self.registry().fetch_topic(source).await?;
        }
        let now = Utc::now();
        let mut job = Job {
            id: uuid::Uuid::now_v7().to_string(),
            spec,
            created_at: now,
            next_run: None,
            runs: 0,
            version: 1,
        };
        job.next_run = job.next_after(now, true)?;
        if job.next_run.is_none() && job.spec.schedule.on.is_none() {
            return Err(Error::Validation(ValidationError::field(
                "schedule",
                "the schedule has no run from now on (a past `at`, or `endDate` already passed)",
            )));
        }
        self.job_store().insert(&job).await?;
        tracing::info!(job = %job.id, event = %job.spec.event, next = ?job.next_run, "job created");
        Ok(job)
    }

    /// Every job.
    pub async fn list_jobs(&self) -> Result<Vec<Job>> {
        self.job_store().list().await
    }

    /// The job with this id.
    pub async fn get_job(&self, id: &str) -> Result<Job> {
        self.job_store().get(id).await
    }

    /// The runs of a job, oldest first.
    pub async fn job_runs(&self, id: &str) -> Result<Vec<Run>> {
        self.job_store().get(id).await?;
        self.job_store().runs(id).await
    }

    /// Stops a job's runs until it is resumed (runs falling due meanwhile follow its catch-up policy).
    pub async fn pause_job(&self, id: &str) -> Result<Job> {
        self.set_paused(id, true).await
    }

    /// Lets a paused job run again.
    pub async fn resume_job(&self, id: &str) -> Result<Job> {
        self.set_paused(id, false).await
    }

    async fn set_paused(&self, id: &str, paused: bool) -> Result<Job> {
        let jobs = self.job_store();
        for _ in 0..CHANGE_RETRIES {
            let mut job = jobs.get(id).await?;
            job.spec.paused = paused;
            if jobs.replace(&job).await? {
                job.version += 1;
                return Ok(job);
            }
        }
        Err(Error::Storage(format!("job `{id}` kept changing under concurrent updates; try again")))
    }

    /// Deletes a job and its runs.
    pub async fn delete_job(&self, id: &str) -> Result<()> {
        self.job_store().delete(id).await
    }

    /// Queues a failed run to be published again by the next scheduler that looks (with the
    /// same message id); refused unless the run failed.
    pub async fn retry_run(&self, id: &str, run: u64) -> Result<Run> {
        let jobs = self.job_store();
        let mut found = jobs.run(id, run).await?;
        if found.state != RunState::Failed {
            return Err(Error::Validation(ValidationError::field(
                "run",
                format!("run {run} of job `{id}` is {:?}, not failed", found.state).to_lowercase(),
            )));
        }
        found.state = RunState::Running;
        found.attempts = 0;
        found.owner = None;
        found.lease_until = None;
        if !jobs.update_run(&mut found).await? {
            return Err(Error::Storage(format!("run {run} of job `{id}` changed meanwhile; try again")));
        }
        Ok(found)
    }
}
