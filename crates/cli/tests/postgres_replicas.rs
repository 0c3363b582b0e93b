//! Two `polybus serve` processes on one PostgreSQL registry act as replicas: each sees the
//! other's changes, and optimistic concurrency holds across them.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};

use common::{Run, Sandbox, finish, postgres_url};
use serde_json::{Value, json};

fn polybus(sandbox: &Sandbox, args: &[&str]) -> Command {
    let mut command = sandbox.command_without_registry(args);
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    command
}

fn run(sandbox: &Sandbox, args: &[&str]) -> Run {
    let output: Output = polybus(sandbox, args).output().expect("run polybus");
    finish(output)
}

/// A replica: `polybus serve` on the PostgreSQL registry, stopped when dropped.
struct Replica {
    child: Child,
    url: String,
}

impl Replica {
    fn start(sandbox: &Sandbox, registry: &str) -> Replica {
        let mut child = polybus(
            sandbox,
            &["--registry", registry, "--output", "json", "serve", "--listen", "127.0.0.1:0"],
        )
        .spawn()
        .expect("start polybus serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("first line");
        let started: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("serve did not start on {registry} ({e}): {line:?} — is PostgreSQL up? run scripts/services postgres"));
        let url = started["url"].as_str().expect("url").to_owned();
        Replica { child, url }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn two_servers_on_one_postgres_registry_see_each_others_changes() {
    let sandbox = Sandbox::new();
    let registry = postgres_url();
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..10];
    let (tag, key_name) = (format!("replicas-{suffix}"), format!("replicas-{suffix}"));
    let created = run(&sandbox, &["--registry", &registry, "key", "create", "--name", &key_name]);
    let key = created.ok().trim().to_owned();

    let (a, b) = (Replica::start(&sandbox, &registry), Replica::start(&sandbox, &registry));
    let via = |replica: &Replica, args: &[&str]| {
        let mut all = vec!["--server", replica.url.as_str(), "--api-key", key.as_str(), "--output", "json"];
        all.extend_from_slice(args);
        run(&sandbox, &all)
    };

    let file = sandbox.write(
        "broker.json",
        json!({"name": "Replicas", "tag": tag, "envs": [{"slug": "dev", "type": "embedded", "config": {}}]})
            .to_string(),
    );
    via(&a, &["broker", "create", "-f", &file]).ok();
    let fetched = via(&b, &["broker", "get", &tag]).json();
    assert_eq!((fetched["tag"].as_str(), fetched["version"].as_u64()), (Some(tag.as_str()), Some(1)));

    let patch = sandbox.write("patch.json", json!({"name": "Renamed", "version": 1}).to_string());
    assert_eq!(via(&b, &["broker", "update", &tag, "-f", &patch]).json()["version"], 2);
    let stale = via(&a, &["broker", "update", &tag, "-f", &patch]);
    assert!(stale.failed(1).starts_with("error: CONFLICT: "), "{stale:?}");
    assert_eq!(via(&a, &["broker", "get", &tag]).json()["name"], "Renamed");

    // An idempotency key holds across replicas: the registry's database keeps it. A short
    // window (ten minutes) lets the rows this test leaves in the shared database expire and be purged.
    let event = format!("{tag}:payments");
    let topic = sandbox.write("topic.json", json!({"tag": event, "idempotencyWindow": "10m"}).to_string());
    via(&a, &["topic", "create", "-f", &topic]).ok();
    let publish = ["publish", "--env", "dev", &event, "--data", "charge", "--idempotency-key", "pay-1"];
    let first = via(&a, &publish).json();
    let second = via(&b, &publish).json();
    assert_eq!((first["duplicate"].clone(), second["duplicate"].clone()), (json!(false), json!(true)));
    assert_eq!(second["id"], first["id"], "the replica answers the first message's id");
    let checked = via(&b, &["idempotency", "check", "--env", "dev", &event, "pay-1"]).json();
    assert_eq!(
        (checked["message_id"].clone(), checked["state"].clone()),
        (first["id"].clone(), json!("published"))
    );
    via(&a, &["topic", "delete", &event]).ok();

    via(&a, &["broker", "delete", &tag]).ok();
    let gone = via(&b, &["broker", "get", &tag]);
    assert!(gone.failed(1).starts_with("error: BROKER_NOT_FOUND: "), "{gone:?}");
    drop((a, b));
    run(&sandbox, &["--registry", &registry, "key", "revoke", &key_name]).ok();
}
