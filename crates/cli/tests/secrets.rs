//! `polybus secret …` and secret references through the real binary: locally and through a real
//! `polybus serve` child whose environment holds a variable no key holder may read (issue 12).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use common::{Run, Sandbox, finish};
use serde_json::Value;

/// A value that must never be printed, whatever the command.
const HIDDEN: &str = "hidden-host-7f3a9c";

/// Writes a broker `tag` with one Redis env `dev` whose `host` is `host`, and creates it locally.
fn redis_broker(sandbox: &Sandbox, tag: &str, host: &str) {
    let file = sandbox.write(
        &format!("{tag}.yaml"),
        format!("name: R\ntag: {tag}\nenvs:\n  - slug: dev\n    type: redis\n    config: {{host: \"{host}\", port: 6379}}\n"),
    );
    sandbox.run(&["broker", "create", "-f", &file]).ok();
}

fn assert_hidden(run: &Run) {
    assert!(!run.stdout.contains(HIDDEN) && !run.stderr.contains(HIDDEN), "{run:#?}");
}

#[test]
fn local_secrets_are_set_from_stdin_listed_by_name_and_used_to_connect() {
    let sandbox = Sandbox::new();
    sandbox.run_with_stdin(&["secret", "set", "redis-host"], b"127.0.0.1\n").ok();
    let key = sandbox.path().join("polybus-secrets.key");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).expect("the key file beside the registry").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    sandbox.run_with_stdin(&["secret", "set", "hidden"], HIDDEN.as_bytes()).ok();

    let listed = sandbox.run(&["--output", "json", "secret", "list"]);
    assert_hidden(&listed);
    let names: Vec<Value> =
        listed.json().as_array().expect("list").iter().map(|s| s["name"].clone()).collect();
    assert_eq!(names, ["hidden", "redis-host"]);
    let table = sandbox.run(&["secret", "list"]);
    assert!(table.ok().starts_with("NAME"), "{table:#?}");
    assert_hidden(&table);

    redis_broker(&sandbox, "vault", "$Secret{redis-host}");
    let tested = sandbox.run(&["broker", "test", "vault", "--env", "dev"]);
    assert!(tested.ok().contains("ok in"), "{tested:#?}");

    // A value that does not connect is named by its reference, never shown.
    redis_broker(&sandbox, "leaky", "$Secret{hidden}");
    let failed = sandbox.run(&["broker", "test", "leaky", "--env", "dev"]);
    assert_hidden(&failed);
    assert!(failed.failed(1).contains("$Secret{hidden}"), "{failed:#?}");

    let bad = sandbox.run_with_stdin(&["secret", "set", "a b"], b"x");
    assert!(bad.failed(1).starts_with("error: VALIDATION_FAILED"), "{bad:#?}");
    let empty = sandbox.run_with_stdin(&["secret", "set", "empty"], b"");
    assert!(empty.failed(1).contains("is empty"), "{empty:#?}");
    sandbox.run(&["secret", "delete", "hidden"]).ok();
    let again = sandbox.run(&["secret", "delete", "hidden"]);
    assert!(again.failed(1).starts_with("error: SECRET_NOT_FOUND"), "{again:#?}");
}

#[test]
fn the_local_cli_resolves_any_variable_and_scrubs_it_from_errors() {
    let sandbox = Sandbox::new();
    redis_broker(&sandbox, "envhost", "${MY_REDIS_HOST}");
    let mut command = sandbox.command(&["broker", "test", "envhost", "--env", "dev"]);
    command.env("MY_REDIS_HOST", "127.0.0.1").stdin(Stdio::null());
    assert!(finish(command.output().expect("run")).ok().contains("ok in"));

    let mut command = sandbox.command(&["broker", "test", "envhost", "--env", "dev"]);
    command.env("MY_REDIS_HOST", HIDDEN).env("RUST_LOG", "debug").stdin(Stdio::null());
    let failed = finish(command.output().expect("run"));
    assert_hidden(&failed);
    assert!(failed.stderr.contains("${MY_REDIS_HOST}"), "{failed:#?}");
}

/// `polybus ARGS` in `sandbox` with a clean environment and no default `--registry`.
fn bare(sandbox: &Sandbox, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_polybus"));
    command.args(args).current_dir(sandbox.path());
    for var in
        ["POLYBUS_REGISTRY", "POLYBUS_SERVER", "POLYBUS_API_KEY", "POLYBUS_SECRETS_KEY_FILE", "RUST_LOG"]
    {
        command.env_remove(var);
    }
    command
}

/// A `polybus serve` child on a free port with `HIDDEN` in its environment; killed on drop.
struct Server {
    sandbox: Sandbox,
    child: Child,
    url: String,
    key: String,
}

impl Server {
    fn start() -> Server {
        Server::start_with(Sandbox::new(), &["--registry", "registry.db"], None)
    }

    /// `polybus serve` in `sandbox` with `args` (before the command) and, when given, `key` as
    /// the API key (else the one it creates).
    fn start_with(sandbox: Sandbox, args: &[&str], key: Option<&str>) -> Server {
        let mut child =
            bare(&sandbox, &[args, &["serve", "--listen", "127.0.0.1:0", "--output", "json"]].concat())
                .env("SERVER_ONLY_HOST", HIDDEN)
                .env("POLYBUS_BROKER_HOST", HIDDEN)
                .env("RUST_LOG", "debug")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn polybus serve");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("the server's first line");
        let started: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        let url = started["url"].as_str().expect("url").to_owned();
        let key = key.or(started["createdKey"]["key"].as_str()).expect("a key").to_owned();
        Server { sandbox, child, url, key }
    }

    /// Runs `polybus --server URL ARGS` from another sandbox, with `input` on stdin.
    fn remote(&self, args: &[&str], input: &[u8]) -> Run {
        let client = Sandbox::new();
        let mut command = client.command(&["--server", &self.url]);
        command.args(args).env("POLYBUS_API_KEY", &self.key).stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut child = command.stderr(Stdio::piped()).spawn().expect("spawn polybus");
        std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), input).expect("write stdin");
        finish(child.wait_with_output().expect("wait"))
    }

    /// Stops the server and returns everything it logged.
    fn stop(mut self) -> String {
        let _ = self.child.kill();
        let output = self.child.wait_with_output().expect("wait for the server");
        String::from_utf8_lossy(&output.stderr).into_owned()
    }
}

#[test]
fn through_a_server_the_servers_variables_never_come_back() {
    let server = Server::start();
    // Written by the local CLI, which does not check prefixes.
    redis_broker(&server.sandbox, "outside", "${SERVER_ONLY_HOST}");
    let refused = server.remote(&["broker", "test", "outside", "--env", "dev"], b"");
    assert_hidden(&refused);
    assert!(refused.failed(1).starts_with("error: SECRET_NOT_ALLOWED"), "{refused:#?}");
    assert!(refused.stderr.contains("${SERVER_ONLY_HOST}"), "{refused:#?}");

    // Allowed and resolved: the connection error and the stats name the reference.
    redis_broker(&server.sandbox, "inside", "${POLYBUS_BROKER_HOST}");
    let failed = server.remote(&["broker", "test", "inside", "--env", "dev"], b"");
    assert_hidden(&failed);
    assert!(failed.failed(1).contains("${POLYBUS_BROKER_HOST}"), "{failed:#?}");

    // async-nats logs the server it dials at debug level: the log writer scrubs that too.
    let file = server.sandbox.write(
        "nats.yaml",
        "name: N\ntag: nats\nenvs:\n  - slug: dev\n    type: nats\n    config: {servers: [\"nats://${POLYBUS_BROKER_HOST}:4222\"]}\n",
    );
    server.sandbox.run(&["broker", "create", "-f", &file]).ok();
    let failed = server.remote(&["broker", "test", "nats", "--env", "dev"], b"");
    assert_hidden(&failed);
    assert!(failed.failed(1).contains("nats://${POLYBUS_BROKER_HOST}:4222"), "{failed:#?}");

    // Secrets through the server: set from stdin, listed by name, used to connect.
    server.remote(&["secret", "set", "redis-host"], b"127.0.0.1").ok();
    let listed = server.remote(&["--output", "json", "secret", "list"], b"");
    assert_eq!(listed.json()[0]["name"], "redis-host");
    let file = server.sandbox.write(
        "vault.yaml",
        "name: V\ntag: vault\nenvs:\n  - slug: dev\n    type: redis\n    config: {host: \"$Secret{redis-host}\"}\n",
    );
    let created = server.remote(
        &["broker", "create", "-f", "-"],
        &std::fs::read(server.sandbox.path().join(file)).expect("file"),
    );
    assert!(created.ok().contains("created broker `vault`"), "{created:#?}");
    assert!(server.remote(&["broker", "test", "vault", "--env", "dev"], b"").ok().contains("ok in"));
    server.remote(&["secret", "delete", "redis-host"], b"").ok();

    let logs = server.stop();
    assert!(logs.contains("attempting connection"), "no log of the NATS dial:\n{logs}");
    assert!(!logs.contains(HIDDEN), "the server logged the value:\n{logs}");
}

#[test]
fn postgres_replicas_share_secrets_through_one_key_file_and_refuse_without_it() {
    let registry = std::env::var("POLYBUS_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..10];
    let (name, tag) = (format!("host-{suffix}"), format!("sec-{suffix}"));
    let admin = Sandbox::new();
    let on_registry = |args: &[&str], input: &[u8]| {
        let mut child = bare(&admin, &[&["--registry", registry.as_str()], args].concat())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn polybus");
        std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), input).expect("write stdin");
        finish(child.wait_with_output().expect("wait"))
    };
    let api_key = on_registry(&["key", "create", "--name", &tag], b"").ok().trim().to_owned();

    // Without a key file nothing can be set, locally or through a server; names still list.
    let local = on_registry(&["secret", "set", &name], b"127.0.0.1");
    assert!(local.failed(1).contains("--secrets-key-file"), "{local:#?}");
    let keyless = Server::start_with(Sandbox::new(), &["--registry", &registry], Some(&api_key));
    let refused = keyless.remote(&["secret", "set", &name], b"127.0.0.1");
    assert!(refused.failed(1).starts_with("error: SECRETS_UNAVAILABLE"), "{refused:#?}");
    on_registry(&["secret", "list"], b"").ok();

    // Two replicas given one key file: set through one, used through the other.
    let shared = admin.write("shared.key", uuid::Uuid::new_v4().as_bytes().repeat(2));
    let shared = admin.path().join(shared).display().to_string();
    let with_key = ["--registry", registry.as_str(), "--secrets-key-file", shared.as_str()];
    let a = Server::start_with(Sandbox::new(), &with_key, Some(&api_key));
    let b = Server::start_with(Sandbox::new(), &with_key, Some(&api_key));
    a.remote(&["secret", "set", &name], b"127.0.0.1").ok();
    let definition = format!(
        "name: S\ntag: {tag}\nenvs:\n  - slug: dev\n    type: redis\n    config: {{host: \"$Secret{{{name}}}\"}}\n"
    );
    a.remote(&["broker", "create", "-f", "-"], definition.as_bytes()).ok();
    assert!(b.remote(&["broker", "test", &tag, "--env", "dev"], b"").ok().contains("ok in"));

    // A replica with another key refuses to decrypt rather than use garbage.
    let other = admin.write("other.key", uuid::Uuid::new_v4().as_bytes().repeat(2));
    let other = admin.path().join(other).display().to_string();
    let stray = Server::start_with(
        Sandbox::new(),
        &["--registry", &registry, "--secrets-key-file", &other],
        Some(&api_key),
    );
    let wrong = stray.remote(&["broker", "test", &tag, "--env", "dev"], b"");
    assert!(wrong.failed(1).contains("another key"), "{wrong:#?}");

    a.remote(&["broker", "delete", &tag], b"").ok();
    a.remote(&["secret", "delete", &name], b"").ok();
    on_registry(&["key", "revoke", &tag], b"").ok();
}
