//! Runs the real `polybus` binary against a registry in a fresh temporary directory.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use serde_json::Value;

/// A scratch directory with its own registry; every command runs inside it.
pub struct Sandbox {
    dir: tempfile::TempDir,
}

/// What one run of the binary did.
#[derive(Debug)]
pub struct Run {
    /// Exit code (`None` when killed by a signal).
    pub code: Option<i32>,
    /// Everything printed on stdout.
    pub stdout: String,
    /// Everything printed on stderr.
    pub stderr: String,
}

impl Run {
    /// Asserts success and returns stdout.
    pub fn ok(&self) -> &str {
        assert_eq!(self.code, Some(0), "expected success: {self:#?}");
        &self.stdout
    }

    /// Asserts a failure with `code` and exactly one stderr line; returns that line.
    pub fn failed(&self, code: i32) -> &str {
        assert_eq!(self.code, Some(code), "expected exit {code}: {self:#?}");
        assert_eq!(self.stderr.lines().count(), 1, "expected one line on stderr: {self:#?}");
        assert!(self.stderr.ends_with('\n'));
        self.stderr.trim_end()
    }

    /// Stdout parsed as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(self.ok()).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:#?}"))
    }
}

impl Sandbox {
    /// A fresh, empty sandbox.
    pub fn new() -> Self {
        Sandbox { dir: tempfile::tempdir().expect("temporary directory") }
    }

    /// The sandbox directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a file in the sandbox and returns its name (relative to the sandbox).
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> String {
        let path = self.dir.path().join(name);
        std::fs::write(&path, contents).expect("write file");
        name.to_owned()
    }

    /// The embedded broker file for tests' broker definitions.
    pub fn broker_db(&self) -> PathBuf {
        self.dir.path().join("broker.db")
    }

    /// A `polybus` command in the sandbox, with the sandbox's registry and a clean environment.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = self.command_without_registry(&["--registry", "registry.db"]);
        command.args(args);
        command
    }

    /// A `polybus` command in the sandbox with a clean environment and no registry chosen
    /// (for tests that pass their own, e.g. PostgreSQL).
    pub fn command_without_registry(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_polybus"));
        command
            .args(args)
            .current_dir(self.dir.path())
            .env_remove("POLYBUS_REGISTRY")
            .env_remove("POLYBUS_SERVER")
            .env_remove("POLYBUS_API_KEY")
            .env_remove("POLYBUS_SERVER_CA")
            .env_remove("POLYBUS_TLS_CERT")
            .env_remove("POLYBUS_TLS_KEY")
            .env_remove("POLYBUS_LOG_FORMAT")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("RUST_LOG")
            .env_remove("RUST_BACKTRACE");
        command
    }

    /// Runs `polybus ARGS` without `--registry`, so with the default `./polybus.db`.
    pub fn run_default_registry(&self, args: &[&str]) -> Run {
        let output = Command::new(env!("CARGO_BIN_EXE_polybus"))
            .args(args)
            .current_dir(self.dir.path())
            .env_remove("POLYBUS_REGISTRY")
            .env_remove("POLYBUS_SERVER")
            .env_remove("POLYBUS_API_KEY")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .output()
            .expect("run polybus");
        finish(output)
    }

    /// Runs `polybus ARGS` to completion.
    pub fn run(&self, args: &[&str]) -> Run {
        self.run_with_stdin(args, b"")
    }

    /// Runs `polybus ARGS` with `input` on stdin.
    pub fn run_with_stdin(&self, args: &[&str], input: &[u8]) -> Run {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn polybus");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(input).expect("write stdin");
        drop(stdin);
        finish(child.wait_with_output().expect("wait for polybus"))
    }

    /// Starts `polybus ARGS` with piped stdout and stderr.
    pub fn spawn(&self, args: &[&str]) -> Child {
        self.command(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn polybus")
    }

    /// Creates broker `bus` with one embedded env `dev`, and topic `bus:TOPIC`.
    pub fn embedded_topic(&self, topic: &str) -> String {
        let broker = format!(
            "name: Bus\ntag: bus\nenvs:\n  - slug: dev\n    type: embedded\n    config:\n      path: {}\n",
            self.broker_db().display()
        );
        if self.run(&["broker", "get", "bus"]).code != Some(0) {
            let file = self.write("bus.yaml", broker);
            self.run(&["broker", "create", "-f", &file]).ok();
        }
        let event = format!("bus:{topic}");
        let file = self.write("topic.yaml", format!("tag: {event}\n"));
        self.run(&["topic", "create", "-f", &file]).ok();
        event
    }
}

/// The PostgreSQL server of the replica tests: `POLYBUS_TEST_POSTGRES_URL`, else the one
/// `scripts/services postgres` starts.
pub fn postgres_url() -> String {
    std::env::var("POLYBUS_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// Collects a finished child's output.
pub fn finish(output: Output) -> Run {
    Run {
        code: output.status.code(),
        stdout: String::from_utf8(output.stdout).expect("stdout is UTF-8"),
        stderr: String::from_utf8(output.stderr).expect("stderr is UTF-8"),
    }
}
