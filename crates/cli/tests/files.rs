//! Where the local CLI keeps the files a definition names: a relative `path` (and the default
//! broker file) lands in the data folder beside the registry, whatever folder the command runs in.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::{Run, Sandbox, finish};
use serde_json::Value;

/// Runs `polybus ARGS` in `cwd` with a clean environment.
fn polybus(cwd: &Path, args: &[&str]) -> Run {
    let output = Command::new(env!("CARGO_BIN_EXE_polybus"))
        .args(args)
        .current_dir(cwd)
        .env_remove("POLYBUS_REGISTRY")
        .env_remove("POLYBUS_SERVER")
        .env_remove("POLYBUS_API_KEY")
        .env_remove("POLYBUS_DATA_DIR")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run polybus");
    finish(output)
}

/// Creates broker `bus` (env `dev` on the embedded broker with `config`) and topic `bus:orders`
/// in the registry `app/reg.db`, working inside `app`.
fn define(app: &Path, config: &str) {
    std::fs::create_dir_all(app).expect("app folder");
    let broker = format!("name: Bus\ntag: bus\nenvs:\n  - slug: dev\n    type: embedded\n    config: {config}\n");
    std::fs::write(app.join("bus.yaml"), broker).expect("broker file");
    std::fs::write(app.join("topic.yaml"), "tag: bus:orders\n").expect("topic file");
    polybus(app, &["--registry", "reg.db", "broker", "create", "-f", "bus.yaml"]).ok();
    polybus(app, &["--registry", "reg.db", "topic", "create", "-f", "topic.yaml"]).ok();
}

/// Publishes from inside `app`, then consumes from its parent folder; returns the payload consumed.
fn publish_here_consume_there(app: &Path, elsewhere: &Path) -> String {
    polybus(app, &["--registry", "reg.db", "publish", "--env", "dev", "bus:orders", "--data", "hello"]).ok();
    let registry = app.join("reg.db").display().to_string();
    let consumed = polybus(
        elsewhere,
        &[
            "--registry", &registry, "consume", "--env", "dev", "bus:orders", "--group", "g", "--count", "1",
            "--timeout", "10s", "--output", "json",
        ],
    );
    let message: Value = serde_json::from_str(consumed.ok().trim_end()).expect("one JSON line");
    message["payload"].as_str().expect("text payload").to_owned()
}

#[test]
fn a_relative_broker_path_does_not_depend_on_the_working_directory() {
    let sandbox = Sandbox::new();
    let app = sandbox.path().join("app");
    let elsewhere = sandbox.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).expect("folder");
    define(&app, "{ path: dev-broker.db }");

    assert_eq!(publish_here_consume_there(&app, &elsewhere), "hello");
    assert!(app.join("polybus-data").join("dev-broker.db").exists());
    assert!(!elsewhere.join("dev-broker.db").exists(), "no new, empty file where the command ran");
    assert!(!app.join("dev-broker.db").exists());
}

#[test]
fn the_default_broker_file_sits_in_the_data_folder() {
    let sandbox = Sandbox::new();
    let app = sandbox.path().join("app");
    define(&app, "{}");

    assert_eq!(publish_here_consume_there(&app, sandbox.path()), "hello");
    assert!(app.join("polybus-data").join("polybus-broker.db").exists());
    assert!(!sandbox.path().join("polybus-broker.db").exists());
}

#[test]
fn the_data_folder_can_be_named() {
    let sandbox = Sandbox::new();
    let app = sandbox.path().join("app");
    define(&app, "{ path: dev-broker.db }");
    let data = sandbox.path().join("data");
    let data_arg = data.display().to_string();
    let publish = ["--data-dir", &data_arg, "--registry", "reg.db", "publish", "--env", "dev", "bus:orders"];
    polybus(&app, &[&publish[..], &["--data", "x"]].concat()).ok();
    assert!(data.join("dev-broker.db").exists());
}
