//! Jobs (issue 16): runs fire on schedule, in a time zone, once each across schedulers
//! sharing a registry, and a run whose scheduler died is taken over; an `on` job runs once per
//! source message.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use polybus::jobs::{
    CatchUp, JobPayload, JobSpec, JobStore, ManualClock, Run, RunState, Schedule, Scheduler,
    SchedulerOptions, run_message_id, triggered_message_id,
};
use polybus::{Broker, Bus, Error, Group, Registry, Topic};
use polybus_registry::PostgresStore;
use serde_json::json;

/// Longest any awaited condition may take.
const DEADLINE: Duration = Duration::from_secs(20);

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..10])
}

/// A bus over `registry` with a broker of an embedded and a Redis env and one topic.
async fn bus_on(registry: Registry, dir: &std::path::Path) -> (Bus, String) {
    let tag = unique("jobs");
    let broker = Broker::from_value(json!({"name": "Jobs", "tag": tag, "envs": [
        {"slug": "local", "type": "embedded", "config": {"path": dir.join("broker.db")}},
        {"slug": "redis", "type": "redis", "config": {"host": "127.0.0.1", "port": 6379}}]}))
    .expect("broker");
    registry.create_broker(broker).await.expect("create broker");
    // Unique topic names: a Redis stream is named after the topic alone.
    let event = format!("{tag}:{}", unique("ticks"));
    registry
        .create_topic(Topic::from_value(json!({ "tag": event })).expect("topic"))
        .await
        .expect("create topic");
    let bus = Bus::builder(registry).connector(Arc::new(polybus_redis::RedisConnector)).build();
    (bus, event)
}

async fn sqlite_bus(dir: &std::path::Path) -> (Bus, String) {
    let registry = Registry::open(dir.join("registry.db").to_str().expect("utf-8")).await.expect("registry");
    bus_on(registry, dir).await
}

fn spec(env: &str, event: &str, schedule: Schedule) -> JobSpec {
    JobSpec {
        env: env.into(),
        event: event.into(),
        payload: JobPayload { text: Some("tick".into()), ..Default::default() },
        schedule,
        retries: 3,
        ..Default::default()
    }
}

fn every(d: &str) -> Schedule {
    Schedule { every: Some(d.into()), ..Default::default() }
}

fn instant(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).expect("instant").with_timezone(&Utc)
}

/// Receives `n` messages, acking each.
async fn receive(sub: &mut polybus::Subscriber, n: usize) -> Vec<polybus::Message> {
    let mut got = Vec::new();
    while got.len() < n {
        let delivery = tokio::time::timeout(DEADLINE, sub.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} messages arrived", got.len()))
            .expect("subscription open")
            .expect("delivery");
        got.push(delivery.message().clone());
        delivery.ack().await.expect("ack");
    }
    got
}

async fn every_second_limit_three_publishes_three_messages(env: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (bus, event) = sqlite_bus(dir.path()).await;
    let mut sub = bus.subscribe(env, &event, Group("jobs-test")).await.expect("subscribe");
    let job =
        bus.create_job(JobSpec { limit: 3, ..spec(env, &event, every("1s")) }).await.expect("create job");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let scheduler = tokio::spawn(Scheduler::new(bus.clone()).run(async {
        stopped.await.ok();
    }));

    let got = receive(&mut sub, 3).await;
    let runs = tokio::time::timeout(DEADLINE, async {
        loop {
            let runs = bus.job_runs(&job.id).await.expect("runs");
            if runs.len() == 3 && runs.iter().all(|r| r.state == RunState::Succeeded) {
                return runs;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("three runs recorded as succeeded");
    stop.send(()).ok();
    scheduler.await.expect("scheduler stops");

    let done = bus.get_job(&job.id).await.expect("job");
    assert_eq!((done.runs, done.next_run), (3, None), "the job is done after its limit");
    let ids: Vec<_> = got.iter().map(|m| m.id.clone()).collect();
    let expected: Vec<_> = runs.iter().map(|r| r.message_id.clone()).collect();
    assert_eq!(ids, expected, "one message per run, in order, with the run's id");
    for pair in runs.windows(2) {
        assert_eq!(pair[1].scheduled_at - pair[0].scheduled_at, chrono::Duration::seconds(1));
    }
    for (message, run) in got.iter().zip(&runs) {
        assert_eq!(message.payload_str(), Some("tick"));
        assert!(message.published_at >= run.scheduled_at, "run {} published before it was due", run.id);
    }
    bus.delete_job(&job.id).await.expect("delete job");
    bus.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_second_limit_three_publishes_three_messages_on_the_embedded_broker() {
    every_second_limit_three_publishes_three_messages("local").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_second_limit_three_publishes_three_messages_on_redis() {
    every_second_limit_three_publishes_three_messages("redis").await;
}

async fn an_event_triggered_job_publishes_once_per_source_message(env: &str, forward: bool) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (bus, event) = sqlite_bus(dir.path()).await;
    let source = format!("{}:{}", event.split(':').next().expect("broker tag"), unique("orders"));
    bus.registry()
        .create_topic(Topic::from_value(json!({ "tag": source })).expect("topic"))
        .await
        .expect("topic");
    let mut sub = bus.subscribe(env, &event, Group("jobs-test")).await.expect("subscribe");
    let schedule = Schedule { on: Some(source.clone()), ..Default::default() };
    let job = bus.create_job(JobSpec { forward, ..spec(env, &event, schedule) }).await.expect("create job");
    assert_eq!(job.next_run, None, "an `on` job has no scheduled time");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let scheduler = tokio::spawn(Scheduler::new(bus.clone()).run(async {
        stopped.await.ok();
    }));

    let mut sources = Vec::new();
    for n in 0..3 {
        sources.push(
            bus.publish(env, &source, polybus::Message::text(format!("order {n}"))).await.expect("publish"),
        );
    }
    let got = receive(&mut sub, 3).await;
    let ids: BTreeSet<String> = got.iter().map(|m| m.id.clone()).collect();
    let expected: BTreeSet<String> = sources.iter().map(|s| triggered_message_id(&job.id, s)).collect();
    assert_eq!(ids, expected, "one message per source message, with an id derived from it");
    let mut payloads: Vec<_> = got.iter().map(|m| m.payload_str().expect("text").to_owned()).collect();
    payloads.sort();
    let expected: Vec<String> =
        if forward { (0..3).map(|n| format!("order {n}")).collect() } else { vec!["tick".into(); 3] };
    assert_eq!(payloads, expected, "the job's payload, or with `forward` the source's");
    let runs = tokio::time::timeout(DEADLINE, async {
        loop {
            let runs = bus.job_runs(&job.id).await.expect("runs");
            if runs.len() == 3 {
                return runs;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("three runs recorded");
    assert!(runs.iter().all(|r| r.state == RunState::Succeeded));
    stop.send(()).ok();
    scheduler.await.expect("scheduler stops");
    bus.delete_job(&job.id).await.expect("delete job");
    bus.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_triggered_job_publishes_once_per_source_message_on_the_embedded_broker() {
    an_event_triggered_job_publishes_once_per_source_message("local", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_triggered_job_publishes_once_per_source_message_on_redis() {
    // Forwarding the source message's payload.
    an_event_triggered_job_publishes_once_per_source_message("redis", true).await;
}

#[tokio::test]
async fn a_cron_job_fires_at_new_york_wall_clock_times_across_the_dst_change() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (bus, event) = sqlite_bus(dir.path()).await;
    let schedule = Schedule {
        cron: Some("0 9 * * *".into()),
        tz: Some("America/New_York".into()),
        ..Default::default()
    };
    let job = bus
        .create_job(JobSpec {
            start_at: Some(instant("2027-03-12T00:00:00Z")),
            ..spec("local", &event, schedule)
        })
        .await
        .expect("create job");
    // 09:00 in New York: EST (UTC-5) until 14 March 2027, EDT (UTC-4) from then on.
    let expected =
        ["2027-03-12T14:00:00Z", "2027-03-13T14:00:00Z", "2027-03-14T13:00:00Z", "2027-03-15T13:00:00Z"];
    assert_eq!(job.next_run, Some(instant(expected[0])));
    let clock = Arc::new(ManualClock::new(instant("2027-03-11T00:00:00Z")));
    let scheduler = Scheduler::new(bus.clone()).with_clock(clock.clone());
    for at in expected.map(instant) {
        clock.set(at - chrono::Duration::seconds(1));
        assert_eq!(scheduler.tick().await.expect("tick"), 0, "nothing fires a second before {at}");
        clock.set(at);
        assert_eq!(scheduler.tick().await.expect("tick"), 1, "a run fires at {at}");
    }
    let runs = bus.job_runs(&job.id).await.expect("runs");
    let scheduled: Vec<_> = runs.iter().map(|r| r.scheduled_at).collect();
    assert_eq!(scheduled, expected.map(instant));
    assert!(runs.iter().all(|r| r.state == RunState::Succeeded && r.fired_at == Some(r.scheduled_at)));
    bus.close().await.expect("close");
}

#[tokio::test]
async fn a_cron_time_skipped_by_the_spring_forward_fires_right_after_the_gap() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (bus, event) = sqlite_bus(dir.path()).await;
    let schedule = Schedule {
        cron: Some("30 2 * * *".into()),
        tz: Some("America/New_York".into()),
        ..Default::default()
    };
    let start = Some(instant("2027-03-14T00:00:00Z"));
    let job =
        bus.create_job(JobSpec { start_at: start, ..spec("local", &event, schedule) }).await.expect("job");
    // 02:30 does not exist on 14 March 2027 in New York: the run is at 03:00 EDT.
    assert_eq!(job.next_run, Some(instant("2027-03-14T07:00:00Z")));
    bus.close().await.expect("close");
}

#[tokio::test]
async fn missed_runs_are_skipped_or_fired_once_as_the_job_says() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (bus, event) = sqlite_bus(dir.path()).await;
    let start = instant("2027-01-01T00:00:00Z");
    let skip = bus
        .create_job(JobSpec { start_at: Some(start), ..spec("local", &event, every("1m")) })
        .await
        .expect("job");
    let once = bus
        .create_job(JobSpec {
            start_at: Some(start),
            catch_up: CatchUp::Once,
            ..spec("local", &event, every("1m"))
        })
        .await
        .expect("job");
    // The scheduler comes back an hour after the first run was due.
    let clock =
        Arc::new(ManualClock::new(start + chrono::Duration::minutes(60) + chrono::Duration::seconds(30)));
    let scheduler = Scheduler::new(bus.clone()).with_clock(clock.clone());
    assert_eq!(scheduler.tick().await.expect("tick"), 1, "only the `once` job fires");
    assert!(bus.job_runs(&skip.id).await.expect("runs").is_empty());
    let runs = bus.job_runs(&once.id).await.expect("runs");
    assert_eq!(runs.iter().map(|r| (r.id, r.scheduled_at)).collect::<Vec<_>>(), [(1, start)]);
    for job in [&skip, &once] {
        let next = bus.get_job(&job.id).await.expect("job").next_run;
        assert_eq!(
            next,
            Some(start + chrono::Duration::minutes(61)),
            "both go on from the next run after now"
        );
    }
    bus.close().await.expect("close");
}

#[tokio::test]
async fn a_failed_run_is_recorded_and_can_be_retried_by_hand() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (bus, event) = sqlite_bus(dir.path()).await;
    let at = Utc::now() + chrono::Duration::hours(1);
    let schedule = Schedule { at: Some(at), ..Default::default() };
    // No env `gone` in the broker: every publish fails, and not retryably.
    let job = bus.create_job(spec("gone", &event, schedule)).await.expect("job");
    let clock = Arc::new(ManualClock::new(at));
    let scheduler = Scheduler::new(bus.clone()).with_clock(clock.clone());
    assert_eq!(scheduler.tick().await.expect("tick"), 1);
    let run = &bus.job_runs(&job.id).await.expect("runs")[0];
    assert_eq!((run.state, run.attempts), (RunState::Failed, 1), "a permanent error is not retried");
    assert!(run.error.as_deref().is_some_and(|e| e.contains("gone")), "{:?}", run.error);
    assert!(bus.retry_run(&job.id, 2).await.is_err(), "no run 2");

    let queued = bus.retry_run(&job.id, 1).await.expect("retry");
    assert_eq!(queued.state, RunState::Running);
    // Schedulers look for runs to take over (or retried by hand) every few seconds.
    clock.advance(Duration::from_secs(5));
    assert_eq!(scheduler.tick().await.expect("tick"), 1, "the retried run fires again");
    let again = &bus.job_runs(&job.id).await.expect("runs")[0];
    assert_eq!((again.state, again.message_id.as_str()), (RunState::Failed, run.message_id.as_str()));
    assert!(bus.retry_run(&job.id, 1).await.is_ok(), "a failed run can be retried again");
    assert!(bus.retry_run(&job.id, 1).await.is_err(), "a queued run cannot be retried");
    bus.close().await.expect("close");
}

#[tokio::test]
async fn runs_are_counted_by_outcome_with_their_lag() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    // This thread's recorder: the test's runtime runs every task on it.
    let _recorder = metrics::set_default_local_recorder(&recorder);
    let dir = tempfile::tempdir().expect("temp dir");
    let (bus, event) = sqlite_bus(dir.path()).await;
    let at = Utc::now() + chrono::Duration::hours(1);
    let schedule = Schedule { at: Some(at), ..Default::default() };
    bus.create_job(spec("local", &event, schedule.clone())).await.expect("job");
    bus.create_job(spec("gone", &event, schedule)).await.expect("job");
    let clock = Arc::new(ManualClock::new(at + chrono::Duration::seconds(2)));
    let scheduler = Scheduler::new(bus.clone()).with_clock(clock);
    assert_eq!(scheduler.tick().await.expect("tick"), 2);
    let text = handle.render();
    for outcome in ["succeeded", "failed"] {
        let series = format!("polybus_job_runs_total{{outcome=\"{outcome}\"}} 1");
        assert!(text.lines().any(|l| l == series), "{series} in {text}");
    }
    assert!(text.lines().any(|l| l == "polybus_job_schedule_lag_seconds_sum 4"), "two runs 2 s late: {text}");
    bus.close().await.expect("close");
}

#[tokio::test]
async fn invalid_jobs_are_refused_naming_the_field() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (bus, event) = sqlite_bus(dir.path()).await;
    let cases = [
        (Schedule::default(), "schedule"),
        (every("500ms"), "schedule.every"),
        (every("soon"), "schedule.every"),
        (Schedule { cron: Some("0 9 * *".into()), ..Default::default() }, "schedule.cron"),
        (Schedule { cron: Some("0 99 * * *".into()), ..Default::default() }, "schedule.cron"),
        (
            Schedule {
                cron: Some("0 9 * * *".into()),
                tz: Some("Mars/Olympus".into()),
                ..Default::default()
            },
            "schedule.tz",
        ),
        (Schedule { at: Some(instant("2020-01-01T00:00:00Z")), ..Default::default() }, "schedule"),
        (Schedule { on: Some("no-colon".into()), ..Default::default() }, "schedule.on"),
        (
            Schedule { every: Some("1m".into()), delay: Some("1m".into()), ..Default::default() },
            "schedule.delay",
        ),
        (
            Schedule { on: Some(event.clone()), delay: Some("later".into()), ..Default::default() },
            "schedule.delay",
        ),
    ];
    for (schedule, field) in cases {
        let shown = format!("{schedule:?}");
        match bus.create_job(spec("local", &event, schedule)).await {
            Err(Error::Validation(e)) => assert_eq!(e.field, field, "{shown}: {e}"),
            other => panic!("{shown}: expected a validation error on `{field}`, got {other:?}"),
        }
    }
    match bus.create_job(JobSpec { forward: true, ..spec("local", &event, every("1s")) }).await {
        Err(Error::Validation(e)) => assert_eq!(e.field, "forward"),
        other => panic!("expected a validation error on `forward`, got {other:?}"),
    }
    let two = JobPayload { text: Some("a".into()), base64: Some("Yg==".into()), ..Default::default() };
    match bus.create_job(JobSpec { payload: two, ..spec("local", &event, every("1s")) }).await {
        Err(Error::Validation(e)) => assert_eq!(e.field, "payload"),
        other => panic!("expected a validation error on `payload`, got {other:?}"),
    }
    bus.close().await.expect("close");
}

fn postgres_url() -> String {
    std::env::var("POLYBUS_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A PostgreSQL schema of this test's own, dropped at the end.
struct PgSchema(String);

impl PgSchema {
    async fn open(&self) -> Registry {
        let store = PostgresStore::open_in_schema(&postgres_url(), &self.0).await.unwrap_or_else(|e| {
            panic!("PostgreSQL is unreachable ({e}); start it with scripts/services postgres")
        });
        Registry::new(Arc::new(store))
    }

    async fn drop_schema(self) {
        let (client, connection) =
            tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls).await.expect("admin connection");
        tokio::spawn(connection);
        client.batch_execute(&format!("DROP SCHEMA \"{}\" CASCADE", self.0)).await.expect("drop schema");
    }
}

/// Two schedulers, each with a registry connection of its own, racing for every run.
async fn two_schedulers(dir: &std::path::Path) -> (PgSchema, Bus, Bus, String) {
    let schema = PgSchema(format!("polybus_jobs_{}", uuid::Uuid::new_v4().simple()));
    let (a, event) = bus_on(schema.open().await, dir).await;
    let b = Bus::builder(schema.open().await).connector(Arc::new(polybus_redis::RedisConnector)).build();
    (schema, a, b, event)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_schedulers_on_one_postgres_registry_fire_each_of_20_runs_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (schema, a, b, event) = two_schedulers(dir.path()).await;
    let mut sub = a.subscribe("local", &event, Group("check")).await.expect("subscribe");
    let start = Utc::now() + chrono::Duration::hours(1);
    let job = a
        .create_job(JobSpec { start_at: Some(start), limit: 20, ..spec("local", &event, every("1s")) })
        .await
        .expect("job");
    let clock = Arc::new(ManualClock::new(start));
    let first = Scheduler::new(a.clone()).with_clock(clock.clone());
    let second = Scheduler::new(b.clone()).with_clock(clock.clone());
    let mut fired = 0;
    for _ in 0..20 {
        let (x, y) = tokio::join!(first.tick(), second.tick());
        let (x, y) = (x.expect("tick"), y.expect("tick"));
        assert!(x + y <= 1, "one run is due, {} fired", x + y);
        fired += x + y;
        clock.advance(Duration::from_secs(1));
    }
    assert_eq!(fired, 20);
    let runs = a.job_runs(&job.id).await.expect("runs");
    assert_eq!(runs.iter().map(|r| r.id).collect::<Vec<_>>(), (1..=20).collect::<Vec<_>>());
    assert!(runs.iter().all(|r| r.state == RunState::Succeeded && r.attempts == 1));
    assert_eq!(a.get_job(&job.id).await.expect("job").next_run, None);
    let ids: Vec<_> = receive(&mut sub, 20).await.into_iter().map(|m| m.id).collect();
    let expected: Vec<_> = runs.iter().map(|r| r.message_id.clone()).collect();
    assert_eq!(ids, expected, "each run published once");
    a.close().await.expect("close");
    b.close().await.expect("close");
    schema.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_scheduler_died_is_taken_over_after_its_lease() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (schema, a, b, event) = two_schedulers(dir.path()).await;
    let start = Utc::now() + chrono::Duration::hours(1);
    let job = a
        .create_job(JobSpec { start_at: Some(start), limit: 1, ..spec("local", &event, every("1s")) })
        .await
        .expect("job");
    // A scheduler that claimed the run and died before publishing or advancing the job.
    let dead = Run {
        id: 1,
        job_id: job.id.clone(),
        scheduled_at: start,
        fired_at: Some(start),
        attempts: 1,
        state: RunState::Running,
        error: None,
        message_id: run_message_id(&job.id, start),
        owner: Some("dead".into()),
        lease_until: Some(start + chrono::Duration::seconds(30)),
        version: 1,
    };
    assert!(JobStore::new(a.registry().store().clone()).claim(&dead).await.expect("claim"));
    let clock = Arc::new(ManualClock::new(start));
    let options = SchedulerOptions { lease: Duration::from_secs(30), ..Default::default() };
    let survivor = Scheduler::new(b.clone()).with_clock(clock.clone()).with_options(options);
    assert_eq!(survivor.tick().await.expect("tick"), 0, "the run is held while its lease lasts");
    assert_eq!(a.get_job(&job.id).await.expect("job").next_run, None, "the job moved past the claimed run");
    clock.advance(Duration::from_secs(31));
    assert_eq!(survivor.tick().await.expect("tick"), 1, "the run is taken over once its lease expired");
    let runs = a.job_runs(&job.id).await.expect("runs");
    assert_eq!(runs.len(), 1);
    assert_eq!((runs[0].state, runs[0].attempts), (RunState::Succeeded, 2));
    a.close().await.expect("close");
    b.close().await.expect("close");
    schema.drop_schema().await;
}
