//! The scheduler: finds due runs, claims each one once across every scheduler on the same
//! registry, and publishes it with retries.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::{DateTime, Utc};
use polybus_core::Result;

use super::model::{CatchUp, Job, Run, RunState, run_message_id, triggered_message_id};
use super::store::JobStore;
use crate::Bus;

/// Where the scheduler reads the time: the system clock, or one a test moves by hand.
pub trait Clock: Send + Sync {
    /// The current instant.
    fn now(&self) -> DateTime<Utc>;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that stands still until moved, for tests.
#[derive(Debug)]
pub struct ManualClock(Mutex<DateTime<Utc>>);

impl ManualClock {
    /// A clock showing `at`.
    pub fn new(at: DateTime<Utc>) -> Self {
        ManualClock(Mutex::new(at))
    }

    /// Moves the clock to `at`.
    pub fn set(&self, at: DateTime<Utc>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = at;
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let mut now = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *now += chrono::Duration::from_std(by).unwrap_or(chrono::Duration::MAX);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How a scheduler runs.
#[derive(Debug, Clone)]
pub struct SchedulerOptions {
    /// How often it looks for due runs.
    pub poll: Duration,
    /// How long a claimed run is held before another scheduler may take it over.
    pub lease: Duration,
    /// A run found due longer ago than this was missed (no scheduler ran): the job's
    /// catch-up policy decides what happens to it.
    pub missed_after: Duration,
    /// Shortest and longest wait between publish attempts (exponential, with jitter).
    pub backoff: (Duration, Duration),
}

impl Default for SchedulerOptions {
    fn default() -> Self {
        SchedulerOptions {
            poll: Duration::from_millis(200),
            lease: Duration::from_secs(30),
            missed_after: Duration::from_secs(30),
            backoff: (Duration::from_millis(200), Duration::from_secs(10)),
        }
    }
}

/// Fires the runs of every job in a bus's registry.
pub struct Scheduler {
    bus: Bus,
    jobs: JobStore,
    clock: Arc<dyn Clock>,
    options: SchedulerOptions,
    owner: String,
    last_lease_scan: Mutex<Option<DateTime<Utc>>>,
    /// The consumer of each running `on` job, by job id.
    triggers: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        for (_, consumer) in self.triggers.lock().unwrap_or_else(|p| p.into_inner()).drain() {
            consumer.abort();
        }
    }
}

fn to_chrono(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

impl Scheduler {
    /// A scheduler for the jobs in `bus`'s registry, on the system clock.
    pub fn new(bus: Bus) -> Self {
        let jobs = JobStore::new(bus.registry().store().clone());
        let owner = format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple());
        Scheduler {
            bus,
            jobs,
            clock: Arc::new(SystemClock),
            options: SchedulerOptions::default(),
            owner,
            last_lease_scan: Mutex::new(None),
            triggers: Mutex::new(HashMap::new()),
        }
    }

    /// This scheduler, reading the time from `clock`.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// This scheduler, with `options`.
    pub fn with_options(mut self, options: SchedulerOptions) -> Self {
        self.options = options;
        self
    }

    /// The name this scheduler claims runs under.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Polls until `shutdown` completes. Each fired run publishes in a task of its own, so a
    /// run that retries does not hold back the runs of other jobs.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        let scheduler = Arc::new(self);
        tokio::pin!(shutdown);
        tracing::info!(owner = %scheduler.owner, "job scheduler started");
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep(scheduler.options.poll) => match scheduler.due().await {
                    Ok(fired) => {
                        for (job, run) in fired {
                            let scheduler = scheduler.clone();
                            tokio::spawn(async move { scheduler.execute(job, run).await });
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "job scheduler: checking jobs failed; trying again"),
                },
            }
        }
        tracing::info!(owner = %scheduler.owner, "job scheduler stopped");
    }

    /// Fires every run due now (and takes over runs whose holder's lease expired), waiting
    /// for their publishes; returns how many runs this scheduler fired.
    pub async fn tick(&self) -> Result<usize> {
        let fired = self.due().await?;
        let count = fired.len();
        futures::future::join_all(fired.into_iter().map(|(job, run)| self.execute(job, run))).await;
        Ok(count)
    }

    /// Claims the runs due now and takes over those whose holder's lease expired: the runs this
    /// scheduler is to publish.
    async fn due(&self) -> Result<Vec<(Job, Run)>> {
        let now = self.clock.now();
        let scan = self.lease_scan_due(now);
        let mut fired = Vec::new();
        let jobs = self.jobs.list().await?;
        self.keep_triggers(&jobs);
        for job in jobs {
            if job.spec.paused {
                continue;
            }
            if scan {
                for mut run in self.jobs.expired(&job.id, now).await? {
                    run.owner = Some(self.owner.clone());
                    run.lease_until = Some(now + to_chrono(self.options.lease));
                    if self.jobs.update_run(&mut run).await? {
                        tracing::info!(job = %job.id, run = run.id, "job run taken over after its lease expired");
                        fired.push((job.clone(), run));
                    }
                }
            }
            if let Some(due) = job.next_run.filter(|t| *t <= now)
                && let Some(run) = self.claim(job.clone(), due, now).await?
            {
                fired.push((job, run));
            }
        }
        Ok(fired)
    }

    /// Starts a consumer for each active `on` job without one, stops those of jobs paused or gone.
    fn keep_triggers(&self, jobs: &[Job]) {
        let mut triggers = self.triggers.lock().unwrap_or_else(|p| p.into_inner());
        let active: HashMap<&str, &Job> = jobs
            .iter()
            .filter(|j| j.spec.schedule.on.is_some() && !j.spec.paused)
            .map(|j| (j.id.as_str(), j))
            .collect();
        triggers.retain(|id, consumer| {
            let keep = active.contains_key(id.as_str()) && !consumer.is_finished();
            if !keep {
                consumer.abort();
            }
            keep
        });
        for (id, job) in active {
            if !triggers.contains_key(id) {
                let consumer = trigger(self.bus.clone(), self.jobs.clone(), (*job).clone());
                triggers.insert(id.to_owned(), tokio::spawn(consumer));
            }
        }
    }

    fn lease_scan_due(&self, now: DateTime<Utc>) -> bool {
        let every = to_chrono(self.options.lease / 2).min(chrono::Duration::seconds(5));
        let mut last = self.last_lease_scan.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| now >= t && now - t < every) {
            return false;
        }
        *last = Some(now);
        true
    }

    /// Claims the run of `job` due at `due`, and advances the job past it; the run when this
    /// scheduler won it.
    async fn claim(&self, mut job: Job, due: DateTime<Utc>, now: DateTime<Utc>) -> Result<Option<Run>> {
        let missed = now - due > to_chrono(self.options.missed_after);
        if missed && job.spec.catch_up == CatchUp::Skip {
            job.next_run = job.next_after(now, false)?;
            if self.jobs.replace(&job).await? {
                tracing::info!(job = %job.id, missed = %due, next = ?job.next_run, "missed job runs skipped");
            }
            return Ok(None);
        }
        let run = Run {
            id: job.runs + 1,
            job_id: job.id.clone(),
            scheduled_at: due,
            fired_at: None,
            attempts: 0,
            state: RunState::Running,
            error: None,
            message_id: run_message_id(&job.id, due),
            owner: Some(self.owner.clone()),
            lease_until: Some(now + to_chrono(self.options.lease)),
            version: 1,
        };
        let won = self.jobs.claim(&run).await?;
        job.runs = run.id;
        job.next_run = job.next_after(if missed { now } else { due }, false)?;
        // Whoever wins or loses the claim advances the job: the run exists either way, so a
        // claimer that died before this step holds nothing back.
        self.jobs.replace(&job).await?;
        Ok(won.then_some(run))
    }

    /// Publishes a claimed run, retrying with backoff, and records the outcome.
    async fn execute(&self, job: Job, mut run: Run) {
        let message = match job.spec.message(&job.id, run.scheduled_at) {
            Ok(m) => m,
            Err(e) => return self.finish(&job, run, Err(e.to_string())).await,
        };
        let (min, max) = self.options.backoff;
        let mut waits = ExponentialBuilder::default()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_max_times(job.spec.retries.saturating_sub(1) as usize)
            .with_jitter()
            .build();
        loop {
            let now = self.clock.now();
            run.attempts += 1;
            run.fired_at = Some(now);
            run.lease_until = Some(now + to_chrono(self.options.lease));
            match self.jobs.update_run(&mut run).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(job = %job.id, run = run.id, "job run was taken over by another scheduler");
                    return;
                }
                Err(e) => {
                    tracing::warn!(job = %job.id, run = run.id, error = %e, "cannot record job run attempt");
                    return;
                }
            }
            if run.attempts == 1 {
                let lag = (now - run.scheduled_at).to_std().unwrap_or_default();
                metrics::histogram!(crate::metrics::names::JOB_LAG_SECONDS).record(lag.as_secs_f64());
            }
            let published = self.bus.publish(&job.spec.env, &job.spec.event, message.clone()).await;
            match published {
                Ok(_) => return self.finish(&job, run, Ok(())).await,
                Err(e) => match waits.next().filter(|_| e.is_retryable()) {
                    Some(wait) => {
                        tracing::info!(job = %job.id, run = run.id, error = %e, ?wait, "job publish failed; retrying");
                        run.error = Some(e.to_string());
                        tokio::time::sleep(wait).await;
                    }
                    None => return self.finish(&job, run, Err(e.to_string())).await,
                },
            }
        }
    }

    async fn finish(&self, job: &Job, mut run: Run, outcome: std::result::Result<(), String>) {
        let label = if outcome.is_ok() { "succeeded" } else { "failed" };
        metrics::counter!(crate::metrics::names::JOB_RUNS, "outcome" => label).increment(1);
        match outcome {
            Ok(()) => {
                run.state = RunState::Succeeded;
                run.error = None;
            }
            Err(e) => {
                tracing::warn!(job = %job.id, run = run.id, error = %e, "job run failed");
                run.state = RunState::Failed;
                run.error = Some(e);
            }
        }
        run.owner = None;
        run.lease_until = None;
        match self.jobs.update_run(&mut run).await {
            Ok(true) => tracing::debug!(job = %job.id, run = run.id, state = label, "job run finished"),
            Ok(false) => {
                tracing::warn!(job = %job.id, run = run.id, "job run was taken over before it was recorded")
            }
            Err(e) => tracing::warn!(job = %job.id, run = run.id, error = %e, "cannot record job run"),
        }
    }
}

/// Consumes an `on` job's source event in the job's own group and publishes the job's message
/// once per source message; a failed publish is nacked, so the broker delivers the source again.
/// The group gives each source message to one replica, and the run's message id is derived
/// from the source message's, so a redelivery after a crash publishes a copy with the same id.
async fn trigger(bus: Bus, jobs: JobStore, job: Job) {
    let Some(source) = job.spec.schedule.on.clone() else { return };
    let group = format!("polybus-job-{}", job.id);
    let mut subscriber = match bus.subscribe(&job.spec.env, &source, crate::Group(&group)).await {
        Ok(s) => s,
        Err(e) => {
            // The scheduler starts a new consumer at its next tick.
            tracing::warn!(job = %job.id, %source, error = %e, "cannot consume the job's source event");
            return;
        }
    };
    tracing::info!(job = %job.id, %source, %group, "job consumes its source event");
    while let Some(delivery) = subscriber.next().await {
        let delivery = match delivery {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(job = %job.id, %source, error = %e, "job source delivery failed");
                continue;
            }
        };
        let arrived = delivery.message().published_at;
        let id = triggered_message_id(&job.id, &delivery.message().id);
        let published = async {
            let message = job.spec.triggered_message(&job.id, delivery.message())?;
            bus.publish(&job.spec.env, &job.spec.event, message).await
        }
        .await;
        let settled = match published {
            Ok(_) => {
                record_triggered(&jobs, &job, arrived, &id).await;
                metrics::counter!(crate::metrics::names::JOB_RUNS, "outcome" => "succeeded").increment(1);
                delivery.ack().await
            }
            Err(e) => {
                tracing::warn!(job = %job.id, error = %e, "job publish failed; the source message will come again");
                metrics::counter!(crate::metrics::names::JOB_RUNS, "outcome" => "failed").increment(1);
                delivery.nack().await
            }
        };
        if let Err(e) = settled {
            tracing::warn!(job = %job.id, error = %e, "cannot settle the job's source message");
        }
    }
}

/// Records a published run of an `on` job.
async fn record_triggered(jobs: &JobStore, job: &Job, arrived: DateTime<Utc>, message_id: &str) {
    let recorded = async {
        let now = Utc::now();
        let run = Run {
            id: jobs.next_number(&job.id).await?,
            job_id: job.id.clone(),
            scheduled_at: arrived,
            fired_at: Some(now),
            attempts: 1,
            state: RunState::Succeeded,
            error: None,
            message_id: message_id.to_owned(),
            owner: None,
            lease_until: None,
            version: 1,
        };
        jobs.claim(&run).await
    };
    if let Err(e) = recorded.await {
        tracing::warn!(job = %job.id, error = %e, "cannot record the job's run");
    }
}
