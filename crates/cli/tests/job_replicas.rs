//! Jobs through the CLI (issue 16): two `polybus serve` replicas on one PostgreSQL registry fire
//! each of 20 runs once, also when one of them is SIGKILLed mid-way.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Run, Sandbox, finish, postgres_url};
use serde_json::{Value, json};

/// Longest the job may take: 20 runs a second apart, plus a lease taken over.
const DEADLINE: Duration = Duration::from_secs(60);

/// A PostgreSQL schema of this test's own (so other tests' servers never see its job), dropped at the end.
struct Schema {
    name: String,
    runtime: tokio::runtime::Runtime,
}

impl Schema {
    fn new() -> Schema {
        let name = format!("polybus_jobs_{}", uuid::Uuid::new_v4().simple());
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        runtime
            .block_on(polybus_registry::PostgresStore::open_in_schema(&postgres_url(), &name))
            .unwrap_or_else(|e| {
                panic!("PostgreSQL is unreachable ({e}); start it with scripts/services postgres")
            });
        Schema { name, runtime }
    }

    /// The registry URL whose connections use this schema.
    fn registry(&self) -> String {
        let sep = if postgres_url().contains('?') { '&' } else { '?' };
        format!("{}{sep}options=-csearch_path%3D{}", postgres_url(), self.name)
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let name = self.name.clone();
        self.runtime.block_on(async move {
            if let Ok((client, connection)) =
                tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls).await
            {
                tokio::spawn(connection);
                let _ = client.batch_execute(&format!("DROP SCHEMA \"{name}\" CASCADE")).await;
            }
        });
    }
}

fn polybus(sandbox: &Sandbox, registry: &str, args: &[&str]) -> Command {
    let mut command = sandbox.command_without_registry(&["--registry", registry, "--output", "json"]);
    command.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    command
}

fn run(sandbox: &Sandbox, registry: &str, args: &[&str]) -> Run {
    finish(polybus(sandbox, registry, args).output().expect("run polybus"))
}

/// `polybus serve` with a short job lease, killed when dropped.
struct Replica(Child);

impl Replica {
    fn start(sandbox: &Sandbox, registry: &str) -> Replica {
        let mut child =
            polybus(sandbox, registry, &["serve", "--listen", "127.0.0.1:0", "--job-lease", "2s"])
                .spawn()
                .expect("start polybus serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("first line");
        assert!(line.contains("\"url\""), "serve did not start: {line:?}");
        Replica(child)
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn two_serve_replicas_fire_each_of_20_runs_once_when_one_is_killed_mid_way() {
    let sandbox = Sandbox::new();
    let schema = Schema::new();
    let registry = schema.registry();
    let broker = json!({"name": "Jobs", "tag": "jobs", "envs": [
        {"slug": "dev", "type": "embedded", "config": {"path": "broker.db"}}]});
    let file = sandbox.write("broker.json", broker.to_string());
    run(&sandbox, &registry, &["broker", "create", "-f", &file]).ok();
    let file = sandbox.write("topic.json", json!({"tag": "jobs:ticks"}).to_string());
    run(&sandbox, &registry, &["topic", "create", "-f", &file]).ok();

    let (first, second) = (Replica::start(&sandbox, &registry), Replica::start(&sandbox, &registry));
    let create =
        ["job", "create", "--env", "dev", "jobs:ticks", "--every", "1s", "--limit", "20", "--data", "tick"];
    let job = run(&sandbox, &registry, &create).json();
    let id = job["id"].as_str().expect("job id").to_owned();

    let runs = |sandbox: &Sandbox| -> Vec<Value> {
        let listed = run(sandbox, &registry, &["job", "runs", &id]).json();
        listed.as_array().expect("runs").clone()
    };
    let started = Instant::now();
    while runs(&sandbox).len() < 5 {
        assert!(started.elapsed() < DEADLINE, "5 runs did not fire in time");
    }
    drop(first); // SIGKILL, whatever it holds
    let finished = loop {
        let now = runs(&sandbox);
        assert!(now.iter().all(|r| r["state"] != "failed"), "a run failed: {now:?}");
        if now.len() == 20 && now.iter().all(|r| r["state"] == "succeeded") {
            break now;
        }
        assert!(started.elapsed() < DEADLINE, "the 20 runs did not all succeed in time: {now:?}");
    };
    drop(second);
    let numbers: Vec<u64> = finished.iter().map(|r| r["id"].as_u64().expect("run id")).collect();
    assert_eq!(numbers, (1..=20).collect::<Vec<_>>(), "each run recorded once");
    let done = run(&sandbox, &registry, &["job", "get", &id]).json();
    assert_eq!((done["runs"].as_u64(), done.get("nextRun")), (Some(20), None));

    // What reached the broker: every run's message; a run published again after its holder
    // died between publishing and recording keeps its id, so at most one extra copy.
    let consumed = run(
        &sandbox,
        &registry,
        &["consume", "--env", "dev", "jobs:ticks", "--group", "check", "--count", "20", "--timeout", "10s"],
    );
    let ids: Vec<String> = consumed
        .ok()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).expect("a message line")["id"].as_str().expect("id").to_owned()
        })
        .collect();
    let distinct: BTreeSet<&String> = ids.iter().collect();
    let expected: BTreeSet<String> =
        finished.iter().map(|r| r["messageId"].as_str().expect("message id").to_owned()).collect();
    assert_eq!(distinct, expected.iter().collect(), "one message id per run");
}
