//! Where the local CLI keeps the files a definition names: a relative `path` (and the default
//! broker file) lands in the data folder beside the registry, whatever folder the command runs in.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

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
    let broker =
        format!("name: Bus\ntag: bus\nenvs:\n  - slug: dev\n    type: embedded\n    config: {config}\n");
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
            "--registry",
            &registry,
            "consume",
            "--env",
            "dev",
            "bus:orders",
            "--group",
            "g",
            "--count",
            "1",
            "--timeout",
            "10s",
            "--output",
            "json",
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

/// A `polybus serve` child, killed on drop.
struct Served(Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_server_and_the_local_cli_share_one_data_folder() {
    let sandbox = Sandbox::new();
    let app = sandbox.path().join("app");
    std::fs::create_dir_all(&app).expect("app folder");
    let mut child = Command::new(env!("CARGO_BIN_EXE_polybus"))
        .args([
            "--registry",
            "reg.db",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            "shared",
            "--output",
            "json",
        ])
        .current_dir(&app)
        .env_remove("POLYBUS_DATA_DIR")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn polybus serve");
    let stdout = child.stdout.take().expect("stdout");
    let served = Served(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("the server's first line");
    let started: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    let (url, key) =
        (started["url"].as_str().expect("url"), started["createdKey"]["key"].as_str().expect("key"));
    let shared = app.join("shared").canonicalize().expect("created at start");
    assert_eq!(started["dataDir"].as_str(), shared.to_str());

    let broker = "name: Bus\ntag: bus\nenvs:\n  - slug: dev\n    type: embedded\n    config: { path: dev-broker.db }\n";
    std::fs::write(sandbox.path().join("bus.yaml"), broker).expect("broker file");
    std::fs::write(sandbox.path().join("topic.yaml"), "tag: bus:orders\n").expect("topic file");
    let remote =
        |args: &[&str]| polybus(sandbox.path(), &[&["--server", url, "--api-key", key], args].concat());
    remote(&["broker", "create", "-f", "bus.yaml"]).ok();
    remote(&["topic", "create", "-f", "topic.yaml"]).ok();
    remote(&["publish", "--env", "dev", "bus:orders", "--data", "through the server"]).ok();
    assert!(shared.join("dev-broker.db").exists());
    drop(served);

    // The local CLI on the same registry and data folder reads the same file.
    let consumed = polybus(
        sandbox.path(),
        &[
            "--registry",
            "app/reg.db",
            "--data-dir",
            "app/shared",
            "consume",
            "--env",
            "dev",
            "bus:orders",
            "--group",
            "g",
            "--count",
            "1",
            "--timeout",
            "10s",
            "--output",
            "json",
        ],
    );
    let message: Value = serde_json::from_str(consumed.ok().trim_end()).expect("one JSON line");
    assert_eq!(message["payload"], "through the server");
}

#[test]
fn a_broker_file_left_in_the_working_directory_is_pointed_out() {
    let sandbox = Sandbox::new();
    let app = sandbox.path().join("app");
    define(&app, "{ path: dev-broker.db }");
    // Where an earlier polybus, run from `app`, kept it.
    std::fs::write(app.join("dev-broker.db"), b"").expect("old file");
    let published =
        polybus(&app, &["--registry", "reg.db", "publish", "--env", "dev", "bus:orders", "--data", "x"]);
    published.ok();
    assert!(published.stderr.contains("move the old file there"), "{published:?}");
    assert!(published.stderr.contains(&app.join("dev-broker.db").display().to_string()), "{published:?}");
}
