//! The CLI with `--server URL`: every registry, publish and consume command through a real
//! `polybus serve`, with the same output and errors as on a local registry.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};

use common::{Run, Sandbox, finish};
use serde_json::{Value, json};

const SECRET: &str = "hunter2";

/// A `polybus serve` child on a free port, over the registry of its own sandbox; killed on drop.
struct Server {
    sandbox: Sandbox,
    child: Child,
    url: String,
    key: String,
}

impl Server {
    fn start() -> Server {
        let sandbox = Sandbox::new();
        let mut child = sandbox.spawn(&["serve", "--listen", "127.0.0.1:0", "--output", "json"]);
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("the server's first line");
        let started: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        let url = started["url"].as_str().expect("url").to_owned();
        let key = started["createdKey"]["key"].as_str().expect("a first key").to_owned();
        Server { sandbox, child, url, key }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `polybus --server URL ARGS` from `client` (a sandbox with its own, empty registry, so
/// nothing can come from a local registry), with `POLYBUS_API_KEY` set to `key` when given.
fn remote(client: &Sandbox, server: &Server, key: Option<&str>, args: &[&str]) -> Run {
    let mut command = client.command(&["--server", &server.url]);
    command.args(args).env_remove("POLYBUS_API_KEY").env_remove("POLYBUS_SERVER").stdin(Stdio::null());
    if let Some(key) = key {
        command.env("POLYBUS_API_KEY", key);
    }
    finish(command.output().expect("run polybus"))
}

/// Creates, through `server`, broker `bus` with one embedded env `dev` keeping its file at `path`
/// (relative: in the server's data folder) with `retention` YAML lines when given, and topic
/// `bus:orders`.
fn orders_topic(client: &Sandbox, server: &Server, path: &str, retention: Option<&str>) {
    let key = Some(server.key.as_str());
    let retention = retention.map(|r| format!("      retention:\n        {r}\n")).unwrap_or_default();
    let broker = client.write(
        "b.yaml",
        format!("name: Bus\ntag: bus\nenvs:\n  - slug: dev\n    type: embedded\n    config:\n      path: {path}\n{retention}"),
    );
    remote(client, server, key, &["broker", "create", "-f", &broker]).ok();
    let topic = client.write("t.yaml", "tag: bus:orders\n");
    remote(client, server, key, &["topic", "create", "-f", &topic]).ok();
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect()
}

#[test]
fn registry_publish_and_consume_work_through_the_server() {
    let server = Server::start();
    let client = Sandbox::new();
    let key = Some(server.key.as_str());
    let run = |args: &[&str]| remote(&client, &server, key, args);
    // Relative: a server keeps the files a definition names in its data folder.
    let db = "broker.db";
    let mut all = Vec::new();

    // Broker create, then get: secrets redacted, the same text as on the local registry.
    let broker = client.write(
        "broker.yaml",
        format!(
            "name: Bus\ntag: bus\nenvs:\n  - slug: dev\n    type: embedded\n    config:\n      path: {db}\n  \
             - slug: prd\n    type: rabbitmq\n    config:\n      url: \"amqp://app:{SECRET}@rabbit:5672/\"\n"
        ),
    );
    let created = run(&["broker", "create", "-f", &broker]);
    assert_eq!(created.ok(), "created broker `bus` (version 1): envs dev (embedded), prd (rabbitmq)\n");
    all.push(created);
    let got = run(&["broker", "get", "bus", "--output", "json"]);
    let got_json = got.json();
    assert_eq!(got_json["envs"][1]["config"]["url"], "amqp://app:****@rabbit:5672/");
    assert_eq!(got_json["version"], 1);
    all.push(got);
    let table = run(&["broker", "get", "bus"]);
    let local = server.sandbox.run(&["broker", "get", "bus"]);
    assert_eq!(table.ok(), local.ok(), "the same text as on the local registry");
    all.push(table);

    // Update, then the same patch again: its version is stale.
    let patch = client.write("patch.yaml", "version: 1\nname: Bus v2\n");
    let updated = run(&["broker", "update", "bus", "-f", &patch]);
    assert_eq!(updated.ok(), "updated broker `bus` (version 2): envs dev (embedded), prd (rabbitmq)\n");
    let stale = run(&["broker", "update", "bus", "-f", &patch]);
    assert!(stale.failed(1).starts_with("error: CONFLICT: broker `bus` was changed meanwhile"), "{stale:?}");
    let invalid = client.write("bad.yaml", "name: X\ntag: Not A Tag\nenvs: []\n");
    let refused = run(&["broker", "create", "-f", &invalid]);
    assert!(refused.failed(1).starts_with("error: VALIDATION_FAILED: bad.yaml: "), "{refused:?}");

    let listed = run(&["broker", "list"]);
    assert!(listed.ok().contains("bus  Bus v2  dev (embedded), prd (rabbitmq)  2\n"), "{listed:?}");
    assert_eq!(listed.ok(), server.sandbox.run(&["broker", "list"]).ok());
    let listed = run(&["broker", "list", "--output", "json"]).json();
    assert_eq!(listed.as_array().map(Vec::len), Some(1));
    let missing = run(&["broker", "get", "nope"]);
    assert_eq!(missing.failed(1), "error: BROKER_NOT_FOUND: broker `nope` not found");
    let tested = run(&["broker", "test", "bus", "--env", "dev", "--output", "json"]).json();
    assert_eq!((tested["type"].as_str(), tested["ok"].as_bool()), (Some("embedded"), Some(true)));
    let no_env = run(&["broker", "test", "bus", "--env", "stg"]);
    assert!(no_env.failed(1).starts_with("error: BROKER_ENV_NOT_FOUND: "), "{no_env:?}");

    // Topics.
    let topic = client.write("topic.yaml", "tag: bus:orders\nmaxAttempts: 3\n");
    assert_eq!(run(&["topic", "create", "-f", &topic]).ok(), "created topic `bus:orders` (version 1)\n");
    let shown = run(&["topic", "get", "bus:orders", "--output", "json"]).json();
    assert_eq!(shown["nativeNames"][0]["nativeName"], "orders");
    assert_eq!(shown["nativeNames"][1]["type"], "rabbitmq");
    let text = run(&["topic", "get", "bus:orders"]);
    assert_eq!(text.ok(), server.sandbox.run(&["topic", "get", "bus:orders"]).ok());
    let topics = run(&["topic", "list", "bus", "--output", "json"]).json();
    assert_eq!(topics[0]["tag"], "bus:orders");
    let topic_patch = client.write("topic-patch.yaml", "version: 1\nmaxAttempts: 5\n");
    assert_eq!(
        run(&["topic", "update", "bus:orders", "-f", &topic_patch]).ok(),
        "updated topic `bus:orders` (version 2)\n"
    );

    // Publish three messages with a key and headers; consume exactly them.
    let mut ids = Vec::new();
    for n in 1..=3 {
        let published = run(&[
            "publish",
            "--env",
            "dev",
            "bus:orders",
            "--data",
            &format!(r#"{{"order":{n}}}"#),
            "--key",
            "customer-42",
            "--header",
            "source=cli=yes",
            "--output",
            "json",
        ]);
        ids.push(published.json()["id"].as_str().expect("id").to_owned());
    }
    let consumed = run(&[
        "consume",
        "--env",
        "dev",
        "bus:orders",
        "--group",
        "billing",
        "--count",
        "3",
        "--output",
        "json",
    ]);
    let messages = json_lines(consumed.ok());
    assert_eq!(consumed.stderr, "");
    assert_eq!(messages.len(), 3, "{consumed:?}");
    for (n, message) in messages.iter().enumerate() {
        assert_eq!(message["id"], json!(ids[n]));
        assert_eq!(message["payload"], json!(format!(r#"{{"order":{}}}"#, n + 1)));
        assert_eq!(message["key"], "customer-42");
        assert_eq!(message["headers"], json!({"source": "cli=yes"}));
        assert_eq!(message["attempt"], 1);
        assert!(message["published_at"].as_str().is_some_and(|t| t.ends_with('Z')), "{message}");
    }

    // Acked once printed: nothing left for the group, so the timeout ends it with exit 3.
    let again = run(&[
        "consume",
        "--env",
        "dev",
        "bus:orders",
        "--group",
        "billing",
        "--count",
        "1",
        "--timeout",
        "500ms",
    ]);
    assert_eq!(again.failed(3), "error: TIMEOUT: received 0 of 1 messages within 500ms");

    // Several copies in one go, then read back as table lines.
    let copies = run(&["publish", "--env", "dev", "bus:orders", "--data", "hi", "--count", "3"]);
    assert_eq!(copies.ok().lines().count(), 3);
    let lines = run(&["consume", "--env", "dev", "bus:orders", "--group", "billing", "--count", "3"]);
    assert!(lines.ok().lines().all(|l| l.ends_with("attempt 1  hi")), "{lines:?}");

    // An idempotency key through the server: the second publish is a duplicate, checked alike.
    let keyed = ["publish", "--env", "dev", "bus:orders", "--data", "once", "--idempotency-key", "k-1"];
    let first = run(&[&keyed[..], &["--output", "json"]].concat()).json();
    let second = run(&[&keyed[..], &["--output", "json"]].concat()).json();
    assert_eq!((first["duplicate"].clone(), second["duplicate"].clone()), (json!(false), json!(true)));
    assert_eq!(second["id"], first["id"]);
    let checked =
        run(&["idempotency", "check", "--env", "dev", "bus:orders", "k-1", "--output", "json"]).json();
    assert_eq!(
        (checked["message_id"].clone(), checked["state"].clone()),
        (first["id"].clone(), json!("published"))
    );
    let local = server.sandbox.run(&[
        "idempotency",
        "check",
        "--env",
        "dev",
        "bus:orders",
        "k-1",
        "--output",
        "json",
    ]);
    assert_eq!(local.json(), checked, "the same answer as on the server's registry");
    let once = run(&[
        "consume",
        "--env",
        "dev",
        "bus:orders",
        "--group",
        "billing",
        "--count",
        "1",
        "--output",
        "json",
    ]);
    assert_eq!(json_lines(once.ok())[0]["id"], first["id"]);

    // Deletes.
    let in_use = run(&["broker", "delete", "bus"]);
    assert!(in_use.failed(1).starts_with("error: IN_USE: "), "{in_use:?}");
    assert_eq!(run(&["topic", "delete", "bus:orders"]).ok(), "deleted topic `bus:orders`\n");
    assert_eq!(
        run(&["broker", "delete", "bus", "--output", "json"]).json(),
        json!({"deleted": "broker", "tag": "bus"})
    );
    assert_eq!(run(&["broker", "list", "--output", "json"]).json(), json!([]));
    let gone = run(&["topic", "get", "bus:orders"]);
    assert_eq!(gone.failed(1), "error: TOPIC_NOT_FOUND: topic `bus:orders` not found");

    for run in &all {
        assert!(!run.stdout.contains(SECRET) && !run.stderr.contains(SECRET), "secret shown: {run:#?}");
    }
    // Nothing went to the client's own registry.
    assert!(!client.path().join("registry.db").exists());
    assert!(server.sandbox.path().join("polybus-data").join(db).exists(), "in the server's data folder");
}

#[test]
fn a_wrong_or_missing_key_is_one_unauthorized_line() {
    let server = Server::start();
    let client = Sandbox::new();
    let wrong = remote(&client, &server, Some("pbk_wrong"), &["broker", "list"]);
    assert_eq!(wrong.failed(1), "error: UNAUTHORIZED: invalid API key (unknown or revoked)");
    let missing = remote(&client, &server, None, &["topic", "list"]);
    assert!(
        missing.failed(1).starts_with("error: UNAUTHORIZED: no API key: set POLYBUS_API_KEY"),
        "{missing:?}"
    );
    let consume = remote(
        &client,
        &server,
        Some("pbk_wrong"),
        &["consume", "--env", "dev", "bus:orders", "--group", "g", "--count", "1"],
    );
    assert_eq!(consume.failed(1), "error: UNAUTHORIZED: invalid API key (unknown or revoked)");
    // The key given as an option works too, and is never echoed.
    let mut command = client.command(&["--server", &server.url, "--api-key", &server.key, "broker", "list"]);
    command.env_remove("POLYBUS_API_KEY").stdin(Stdio::null());
    let listed = finish(command.output().expect("run polybus"));
    assert!(listed.ok().starts_with("TAG"), "{listed:?}");
    assert!(!listed.stdout.contains(&server.key) && !listed.stderr.contains(&server.key));
}

#[test]
fn local_only_commands_and_unreachable_servers_fail_in_one_line() {
    let client = Sandbox::new();
    for args in [&["serve"][..], &["key", "list"], &["quickstart"], &["bench", "--env", "dev", "bus:orders"]]
    {
        let mut command = client.command(&["--server", "http://127.0.0.1:9"]);
        command.args(args).stdin(Stdio::null());
        let run = finish(command.output().expect("run polybus"));
        assert!(run.failed(1).starts_with("error: REMOTE_UNSUPPORTED: `polybus "), "{args:?}: {run:?}");
    }
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = closed.local_addr().expect("address");
    drop(closed);
    let mut command = client.command(&["--server", &format!("http://{address}"), "broker", "list"]);
    command.env("POLYBUS_API_KEY", "pbk_secret_key").stdin(Stdio::null());
    let run = finish(command.output().expect("run polybus"));
    let line = run.failed(1);
    assert!(
        line.starts_with(&format!("error: SERVER_UNREACHABLE: cannot reach the server at http://{address}")),
        "{line}"
    );
    assert!(!line.contains("pbk_secret_key"));
}

#[test]
fn a_body_over_the_server_limit_is_reported_as_the_server_answered_it() {
    let server = Server::start();
    let client = Sandbox::new();
    let key = Some(server.key.as_str());
    orders_topic(&client, &server, "broker.db", None);
    // 16 MiB, base64-encoded in the request: far over the server's default limit of 3 MiB.
    let big = client.write("big.bin", vec![b'x'; 16 << 20]);
    let run = remote(&client, &server, key, &["publish", "--env", "dev", "bus:orders", "--file", &big]);
    let line = run.failed(1);
    assert!(
        line.starts_with("error: PAYLOAD_TOO_LARGE: the request body is larger than the server's limit of"),
        "{line}"
    );
}

/// `POST path` with a JSON body and the server's key over plain HTTP/1.1; the answer's JSON.
fn post(server: &Server, path: &str, body: &Value) -> Value {
    use std::io::{Read, Write};
    let address = server.url.strip_prefix("http://").expect("an http URL");
    let mut stream = std::net::TcpStream::connect(address).expect("connect to the server");
    stream.set_read_timeout(Some(std::time::Duration::from_secs(30))).expect("timeout");
    let body = body.to_string();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        server.key,
        body.len()
    )
    .expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}\n{body}");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[test]
fn dead_letters_are_listed_shown_redriven_and_purged_through_the_server() {
    let server = Server::start();
    let client = Sandbox::new();
    let key = Some(server.key.as_str());
    let run = |args: &[&str]| remote(&client, &server, key, args);
    orders_topic(&client, &server, "dlq.db", None);
    for n in 1..=3 {
        run(&[
            "publish",
            "--env",
            "dev",
            "bus:orders",
            "--data",
            &format!("{{\"n\": {n}}}"),
            "--header",
            "tenant=acme",
        ])
        .ok();
    }
    // The billing group gives up on all three.
    let pulled = post(
        &server,
        "/v1/envs/dev/events/bus:orders/subscriptions/billing/pull",
        &json!({"max": 3, "waitMs": 5000}),
    );
    let messages = pulled["messages"].as_array().expect("messages").clone();
    assert_eq!(messages.len(), 3, "{pulled}");
    let leases: Vec<Value> = messages.iter().map(|m| m["leaseId"].clone()).collect();
    let ids: Vec<String> = messages.iter().map(|m| m["id"].as_str().expect("id").to_owned()).collect();
    let settled = post(
        &server,
        "/v1/envs/dev/events/bus:orders/subscriptions/billing/ack",
        &json!({"leaseIds": leases, "deadLetter": true, "reason": "schema mismatch"}),
    );
    assert_eq!(settled["settled"].as_array().map(Vec::len), Some(3), "{settled}");

    let listed = json_lines(run(&["dlq", "list", "--env", "dev", "bus:orders", "--output", "json"]).ok());
    let mut listed_ids: Vec<String> =
        listed.iter().map(|l| l["id"].as_str().expect("id").to_owned()).collect();
    listed_ids.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(listed_ids, expected, "{listed:?}");
    for letter in &listed {
        assert_eq!(letter["reason"], "schema mismatch", "{letter}");
        assert_eq!(letter["group"], "billing", "{letter}");
        assert_eq!(letter["attempts"], 1, "{letter}");
        assert_eq!(letter["headers"], json!({"tenant": "acme"}), "only the publisher's headers: {letter}");
        assert!(letter["dead_lettered_at"].is_string(), "{letter}");
    }
    let table = run(&["dlq", "list", "--env", "dev", "bus:orders", "--group", "billing"]);
    assert!(table.ok().starts_with("ID"), "{table:?}");
    assert!(table.ok().contains("schema mismatch"), "{table:?}");
    let shown = run(&["dlq", "show", "--env", "dev", "bus:orders", &ids[0]]).json();
    assert_eq!(shown["id"], ids[0].as_str());
    let missing = run(&["dlq", "show", "--env", "dev", "bus:orders", "no-such-id"]);
    assert!(missing.failed(1).contains("DEAD_LETTER_NOT_FOUND"), "{missing:?}");

    let redriven =
        run(&["dlq", "redrive", "--env", "dev", "bus:orders", "--ids", &ids[0], "--output", "json"]).json();
    assert_eq!(
        (redriven["done"].clone(), redriven["kept"].clone()),
        (json!([ids[0]]), json!(2)),
        "{redriven}"
    );
    let consumed = json_lines(
        run(&[
            "consume",
            "--env",
            "dev",
            "bus:orders",
            "--group",
            "billing",
            "--count",
            "1",
            "--timeout",
            "20s",
            "--output",
            "json",
        ])
        .ok(),
    );
    assert_eq!(
        consumed[0]["headers"]["polybus-redriven-from"],
        ids[0].as_str(),
        "the redriven copy is delivered"
    );

    let other_group =
        run(&["dlq", "purge", "--env", "dev", "bus:orders", "--group", "mail", "--output", "json"]).json();
    assert_eq!(other_group["done"], json!([]), "{other_group}");
    let purged = run(&["dlq", "purge", "--env", "dev", "bus:orders"]);
    assert_eq!(purged.ok(), "purged 2 dead letters; 0 not selected stay\n");
    assert!(run(&["dlq", "list", "--env", "dev", "bus:orders", "--output", "json"]).ok().is_empty());
}

#[test]
fn groups_are_listed_through_the_server_as_locally() {
    let server = Server::start();
    let client = Sandbox::new();
    let run = |args: &[&str]| remote(&client, &server, Some(server.key.as_str()), args);
    orders_topic(&client, &server, "groups.db", None);
    run(&["publish", "--env", "dev", "bus:orders", "--data", "1"]).ok();
    run(&["publish", "--env", "dev", "bus:orders", "--data", "2"]).ok();
    run(&["consume", "--env", "dev", "bus:orders", "--group", "billing", "--count", "2"]).ok();

    let listed = json_lines(run(&["groups", "--env", "dev", "bus:orders", "--output", "json"]).ok());
    assert_eq!(
        listed,
        [json!({"group": "billing", "members": null, "pending": 0, "lag": 0, "oldestUnackedMs": null})]
    );
    let table = run(&["groups", "--env", "dev", "bus:orders"]);
    assert!(table.ok().lines().nth(1).is_some_and(|row| row.starts_with("billing")), "{}", table.ok());
    let gone = run(&["groups", "--env", "dev", "bus:nothing"]);
    assert_eq!(gone.failed(1), "error: TOPIC_NOT_FOUND: topic `bus:nothing` not found");
}

#[test]
fn replay_and_messages_work_through_the_server() {
    let server = Server::start();
    let client = Sandbox::new();
    let key = Some(server.key.as_str());
    let run = |args: &[&str]| remote(&client, &server, key, args);
    orders_topic(&client, &server, "replay.db", Some("keepAcked: true"));
    let mut ids = Vec::new();
    for key in ["a", "b"] {
        let published =
            run(&["publish", "--env", "dev", "bus:orders", "--data", "\u{1}binary", "--key", key]);
        ids.push(published.ok().trim_end().to_owned());
    }
    let consume =
        ["consume", "--env", "dev", "bus:orders", "--group", "billing", "--count", "2", "--output", "json"];
    let first: Vec<Value> = json_lines(run(&consume).ok());
    assert_eq!(first.len(), 2);

    let replayed = run(&[
        "replay",
        "--env",
        "dev",
        "bus:orders",
        "--group",
        "billing",
        "--from",
        "beginning",
        "--output",
        "json",
    ]);
    assert_eq!(replayed.json(), json!({"group": "billing", "from": "beginning"}));
    let again: Vec<String> =
        json_lines(run(&consume).ok()).iter().map(|m| m["id"].as_str().expect("id").to_owned()).collect();
    assert_eq!(again, ids, "both again, in order");

    let stored =
        json_lines(run(&["messages", "--env", "dev", "bus:orders", "--key", "b", "--output", "json"]).ok());
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0]["id"], ids[1].as_str());
    assert_eq!(stored[0]["payload"], "\u{1}binary", "{}", stored[0]);
    assert!(stored[0]["position"].is_string(), "{}", stored[0]);
    let since = run(&[
        "messages",
        "--env",
        "dev",
        "bus:orders",
        "--since",
        "2999-01-01T00:00:00Z",
        "--output",
        "json",
    ]);
    assert_eq!(since.ok(), "");
    let bad = run(&["replay", "--env", "dev", "bus:missing", "--group", "billing", "--from", "beginning"]);
    assert!(bad.failed(1).contains("TOPIC_NOT_FOUND"), "{bad:?}");
}
