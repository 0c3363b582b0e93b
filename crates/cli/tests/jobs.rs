//! `polybus job …` on a local registry and through `--server` (issue 16).

mod common;

use std::io::{BufRead, BufReader};

use common::Sandbox;
use serde_json::Value;

#[test]
fn jobs_are_created_listed_paused_and_deleted_locally_and_through_a_server() {
    let sandbox = Sandbox::new();
    let event = sandbox.embedded_topic("ticks");
    let create = [
        "--output",
        "json",
        "job",
        "create",
        "--env",
        "dev",
        &event,
        "--cron",
        "0 2 * * *",
        "--tz",
        "Africa/Lagos",
    ];
    let job = sandbox.run(&[&create[..], &["--name", "nightly", "--data", "due"]].concat()).json();
    let id = job["id"].as_str().expect("id").to_owned();
    assert_eq!(
        (job["name"].as_str(), job["schedule"]["tz"].as_str()),
        (Some("nightly"), Some("Africa/Lagos"))
    );
    assert!(job["nextRun"].as_str().expect("next run").contains("T01:00:00"), "{job}");

    let listed = sandbox.run(&["job", "list"]);
    let table = listed.ok();
    assert!(
        table.contains(&id) && table.contains("cron 0 2 * * * Africa/Lagos") && table.contains("active"),
        "{table}"
    );
    assert_eq!(sandbox.run(&["--output", "json", "job", "pause", &id]).json()["paused"], true);
    assert!(sandbox.run(&["job", "list"]).ok().contains("paused"));

    let missing = sandbox.run(&["job", "create", "--env", "dev", &event]);
    assert!(missing.failed(1).contains("--cron EXPR or --on SOURCE_EVENT"), "{missing:?}");
    let source = sandbox.embedded_topic("orders");
    let on = sandbox
        .run(&[
            "--output", "json", "job", "create", "--env", "dev", &event, "--on", &source, "--delay", "10m",
        ])
        .json();
    assert_eq!(
        (on["schedule"]["on"].as_str(), on["schedule"]["delay"].as_str()),
        (Some(source.as_str()), Some("10m"))
    );
    assert!(sandbox.run(&["job", "list"]).ok().contains(&format!("on {source} +10m")));
    sandbox.run(&["job", "delete", on["id"].as_str().expect("id")]).ok();
    let wrong =
        sandbox.run(&["job", "create", "--env", "dev", &event, "--cron", "0 2 * * *", "--tz", "Lagos"]);
    assert!(wrong.failed(1).contains("schedule.tz"), "{wrong:?}");

    // The same job through a server over the same registry.
    let mut server = sandbox.spawn(&["--output", "json", "serve", "--listen", "127.0.0.1:0"]);
    let mut line = String::new();
    BufReader::new(server.stdout.take().expect("stdout")).read_line(&mut line).expect("first line");
    let started: Value = serde_json::from_str(&line).expect("serve's first line");
    let (url, key) =
        (started["url"].as_str().expect("url"), started["createdKey"]["key"].as_str().expect("key"));
    let via = |args: &[&str]| {
        sandbox.run(&[&["--server", url, "--api-key", key, "--output", "json"], args].concat())
    };
    assert_eq!(via(&["job", "resume", &id]).json()["paused"], false);
    let jobs = via(&["job", "list"]).json();
    assert_eq!(jobs[0]["id"], id.as_str());
    assert_eq!(via(&["job", "runs", &id]).json(), serde_json::json!([]));
    via(&["job", "delete", &id]).ok();
    let gone = via(&["job", "get", &id]);
    assert!(gone.failed(1).contains("JOB_NOT_FOUND"), "{gone:?}");
    let _ = server.kill();
    let _ = server.wait();
}
