//! `polybus broker test` against the real brokers running on loopback (started by scripts/services).

mod common;

use common::Sandbox;
use serde_json::json;

#[test]
fn broker_test_reaches_every_real_broker() {
    let sandbox = Sandbox::new();
    let file = sandbox.write(
        "broker.json",
        json!({
            "name": "Real", "tag": "real",
            "envs": [
                {"slug": "redis", "type": "redis", "config": {"host": "127.0.0.1", "port": 6379}},
                {"slug": "rabbitmq", "type": "rabbitmq", "config": {"host": "127.0.0.1", "username": "guest", "password": "guest"}},
                {"slug": "nats", "type": "nats", "config": {"servers": "nats://127.0.0.1:4222"}},
                {"slug": "mqtt", "type": "mqtt", "config": {"host": "127.0.0.1", "port": 1883}}
            ]
        })
        .to_string(),
    );
    sandbox.run(&["broker", "create", "-f", &file]).ok();
    for env in ["redis", "rabbitmq", "nats", "mqtt"] {
        let report = sandbox.run(&["broker", "test", "real", "--env", env, "--output", "json"]).json();
        assert_eq!(report["ok"], json!(true), "env `{env}`: {report}");
    }
}

#[test]
fn broker_test_of_an_unreachable_broker_fails_in_one_line() {
    let sandbox = Sandbox::new();
    let file = sandbox.write(
        "broker.json",
        json!({"name": "Down", "tag": "down", "envs": [
            {"slug": "prd", "type": "redis", "config": {"host": "127.0.0.1", "port": 1, "password": "hunter2"}}
        ]})
        .to_string(),
    );
    sandbox.run(&["broker", "create", "-f", &file]).ok();
    let run = sandbox.run(&["broker", "test", "down", "--env", "prd"]);
    let line = run.failed(1);
    assert!(line.starts_with("error: CONNECT_FAILED: "), "{line}");
    assert!(!line.contains("hunter2"), "{line}");
}
