//! `polybus broker …` through the real binary.

mod common;

use common::{Run, Sandbox};
use serde_json::json;

const SECRET: &str = "hunter2";

fn broker_yaml(sandbox: &Sandbox) -> String {
    format!(
        r#"name: Message Bus
tag: message-bus
description: Message broker for the product
envs:
  - slug: prd
    type: RABBITMQ
    config:
      url: "amqp://app:{SECRET}@rabbit.internal:5672/vh"
      exchange: events
      password: {SECRET}
  - slug: dev
    type: embedded
    config:
      path: {}
"#,
        sandbox.broker_db().display()
    )
}

/// Every run of a test, so that none of their output can hide a secret.
#[derive(Default)]
struct Transcript(Vec<Run>);

impl Transcript {
    fn record(&mut self, run: Run) -> &Run {
        self.0.push(run);
        self.0.last().expect("just pushed")
    }

    fn assert_never_shows(&self, secret: &str) {
        for run in &self.0 {
            assert!(!run.stdout.contains(secret), "secret on stdout: {run:#?}");
            assert!(!run.stderr.contains(secret), "secret on stderr: {run:#?}");
        }
    }
}

#[test]
fn broker_round_trips_through_the_cli_without_showing_secrets() {
    let sandbox = Sandbox::new();
    let mut all = Transcript::default();
    let db = sandbox.broker_db().display().to_string();
    let file = sandbox.write("broker.yaml", broker_yaml(&sandbox));

    let created = all.record(sandbox.run(&["broker", "create", "-f", &file]));
    assert_eq!(
        created.ok(),
        "created broker `message-bus` (version 1): envs prd (rabbitmq), dev (embedded)\n"
    );
    assert_eq!(created.stderr, "");

    let fetched = all.record(sandbox.run(&["broker", "get", "message-bus", "--output", "json"])).json();
    let mut expected = json!({
        "name": "Message Bus",
        "tag": "message-bus",
        "description": "Message broker for the product",
        "envs": [
            {"slug": "prd", "type": "rabbitmq", "config": {
                "url": "amqp://app:****@rabbit.internal:5672/vh", "exchange": "events", "password": "****"}},
            {"slug": "dev", "type": "embedded", "config": {"path": db}},
        ],
        "version": 1,
    });
    assert_eq!(fetched, expected);

    let table = all.record(sandbox.run(&["broker", "get", "message-bus"]));
    let dev_config = serde_json::to_string(&json!({ "path": db })).expect("json");
    assert_eq!(
        table.ok(),
        format!(
            "tag:          message-bus\n\
             name:         Message Bus\n\
             description:  Message broker for the product\n\
             version:      1\n\
             envs:\n  \
               SLUG  TYPE      CONFIG\n  \
               prd   rabbitmq  {{\"exchange\":\"events\",\"password\":\"****\",\"url\":\"amqp://app:****@rabbit.internal:5672/vh\"}}\n  \
               dev   embedded  {dev_config}\n"
        )
    );

    let patch = sandbox.write(
        "patch.yaml",
        format!(
            "version: 1\nname: Message Bus v2\nenvs:\n  - slug: stg\n    type: redis\n    config: {{ url: \"redis://:{SECRET}@redis:6379\" }}\n"
        ),
    );
    let updated = all.record(sandbox.run(&["broker", "update", "message-bus", "-f", &patch]));
    assert_eq!(
        updated.ok(),
        "updated broker `message-bus` (version 2): envs prd (rabbitmq), dev (embedded), stg (redis)\n"
    );
    expected["name"] = json!("Message Bus v2");
    expected["version"] = json!(2);
    expected["envs"].as_array_mut().expect("envs").push(json!(
        {"slug": "stg", "type": "redis", "config": {"url": "redis://:****@redis:6379"}}
    ));
    let fetched = all.record(sandbox.run(&["broker", "get", "message-bus", "--output", "json"])).json();
    assert_eq!(fetched, expected);

    // The same patch again carries version 1, which is stale now: refused, nothing changes.
    let stale = all.record(sandbox.run(&["broker", "update", "message-bus", "-f", &patch]));
    assert_eq!(
        stale.failed(1),
        "error: CONFLICT: broker `message-bus` was changed meanwhile: update sent version 1, current is 2; \
         fetch it again and retry"
    );
    let fetched = all.record(sandbox.run(&["broker", "get", "message-bus", "--output", "json"])).json();
    assert_eq!(fetched, expected);

    let listed = all.record(sandbox.run(&["broker", "list", "--output", "json"])).json();
    assert_eq!(listed, json!([expected]));
    let table = all.record(sandbox.run(&["broker", "list"]));
    assert_eq!(
        table.ok(),
        "TAG          NAME            ENVS                                         VERSION\n\
         message-bus  Message Bus v2  prd (rabbitmq), dev (embedded), stg (redis)  2\n"
    );

    let deleted = all.record(sandbox.run(&["broker", "delete", "message-bus"]));
    assert_eq!(deleted.ok(), "deleted broker `message-bus`\n");
    let listed = all.record(sandbox.run(&["broker", "list", "--output", "json"])).json();
    assert_eq!(listed, json!([]));
    let gone = all.record(sandbox.run(&["broker", "get", "message-bus"]));
    assert_eq!(gone.failed(1), "error: BROKER_NOT_FOUND: broker `message-bus` not found");

    all.assert_never_shows(SECRET);
}

#[test]
fn bad_broker_files_fail_with_one_line_and_store_nothing() {
    let sandbox = Sandbox::new();
    let good = sandbox.write("broker.yaml", broker_yaml(&sandbox));
    sandbox.run(&["broker", "create", "-f", &good]).ok();
    let before = sandbox.run(&["broker", "list", "--output", "json"]).json();

    let cases: [(&str, String, &str); 7] = [
        (
            "missing-field.yaml",
            "name: Orders\ntag: orders\nenvs:\n  - slug: prd\n    type: rabbitmq\n    config: { exchange: events }\n".into(),
            "error: VALIDATION_FAILED: missing-field.yaml: env `prd`: field `config`: one of `url` or `host` is required",
        ),
        (
            "missing-name.yaml",
            "tag: orders\nenvs:\n  - slug: dev\n    type: embedded\n".into(),
            "error: VALIDATION_FAILED: missing-name.yaml: field `name`: missing field `name`",
        ),
        (
            "wrong-type.yaml",
            "name: Orders\ntag: orders\nenvs:\n  - slug: dev\n    type: redis\n    config: { host: h, port: six }\n".into(),
            "error: VALIDATION_FAILED: wrong-type.yaml: env `dev`: field `config.port`: invalid type: string \"six\", expected u16",
        ),
        (
            "unknown-type.yaml",
            "name: Orders\ntag: orders\nenvs:\n  - slug: dev\n    type: carrier-pigeon\n".into(),
            "error: VALIDATION_FAILED: unknown-type.yaml: env `dev`: field `type`: unknown broker type `carrier-pigeon`, \
             expected one of aws_sqs, embedded, google_pubsub, kafka, mqtt, nats, rabbitmq, redis",
        ),
        (
            "duplicate-slug.yaml",
            "name: Orders\ntag: orders\nenvs:\n  - slug: dev\n    type: embedded\n  - slug: dev\n    type: embedded\n".into(),
            "error: VALIDATION_FAILED: duplicate-slug.yaml: field `envs[1].slug`: env slug `dev` appears more than once",
        ),
        (
            "malformed.yaml",
            "name: Orders\ntag: orders\nenvs: [\n  slug: : dev\n".into(),
            "error: INVALID_DOCUMENT: malformed.yaml: line 4 column ",
        ),
        (
            "malformed.json",
            "{\n  \"name\": \"Orders\",\n  \"tag\": orders\n}\n".into(),
            "error: INVALID_DOCUMENT: malformed.json: line 3 column 10: expected value",
        ),
    ];
    for (name, contents, expected) in cases {
        let file = sandbox.write(name, contents);
        let run = sandbox.run(&["broker", "create", "-f", &file]);
        let line = run.failed(1);
        assert!(line.starts_with(expected), "{name}: got `{line}`, expected `{expected}`");
        assert_eq!(run.stdout, "", "{name}");
        assert_eq!(sandbox.run(&["broker", "list", "--output", "json"]).json(), before, "{name}");
    }

    let twice = sandbox.run(&["broker", "create", "-f", &good]);
    assert_eq!(twice.failed(1), "error: ALREADY_EXISTS: broker `message-bus` already exists");
    assert_eq!(sandbox.run(&["broker", "list", "--output", "json"]).json(), before);

    let missing = sandbox.run(&["broker", "create", "-f", "nowhere.yaml"]);
    assert!(missing.failed(1).starts_with("error: FILE_UNREADABLE: nowhere.yaml: "), "{missing:#?}");
}

#[test]
fn broker_definitions_can_come_from_stdin_as_json() {
    let sandbox = Sandbox::new();
    let definition = json!({"name": "Piped", "tag": "piped", "envs": [{"slug": "dev", "type": "embedded"}]});
    let run = sandbox.run_with_stdin(&["broker", "create", "-f", "-"], definition.to_string().as_bytes());
    assert_eq!(run.ok(), "created broker `piped` (version 1): envs dev (embedded)\n");
    let bad = sandbox.run_with_stdin(&["broker", "update", "piped", "-f", "-"], b"envs: [\n");
    assert!(bad.failed(1).starts_with("error: INVALID_DOCUMENT: <stdin>: line "), "{bad:#?}");
}

#[test]
fn broker_with_topics_is_deleted_only_with_force() {
    let sandbox = Sandbox::new();
    let event = sandbox.embedded_topic("orders");
    let refused = sandbox.run(&["broker", "delete", "bus"]);
    assert_eq!(
        refused.failed(1),
        format!(
            "error: IN_USE: broker `bus` still has topics ({event}); delete them first or delete with force"
        )
    );
    assert_eq!(sandbox.run(&["broker", "delete", "bus", "--force"]).ok(), "deleted broker `bus`\n");
    assert_eq!(sandbox.run(&["topic", "list", "--output", "json"]).json(), json!([]));
}

#[test]
fn broker_test_pings_the_env() {
    let sandbox = Sandbox::new();
    sandbox.embedded_topic("orders");
    let run = sandbox.run(&["broker", "test", "bus", "--env", "dev", "--output", "json"]);
    let report = run.json();
    assert_eq!(
        (report["broker"].as_str(), report["env"].as_str(), report["ok"].as_bool()),
        (Some("bus"), Some("dev"), Some(true))
    );
    assert!(report["latencyMs"].as_f64().is_some_and(|ms| ms >= 0.0), "{report}");
    let table = sandbox.run(&["broker", "test", "bus", "--env", "dev"]);
    assert!(table.ok().starts_with("broker `bus` env `dev` (embedded): ok in "), "{table:#?}");
    let unknown = sandbox.run(&["broker", "test", "bus", "--env", "prd"]);
    assert_eq!(unknown.failed(1), "error: BROKER_ENV_NOT_FOUND: broker `bus` has no env `prd` (envs: dev)");
}

#[test]
fn usage_errors_keep_clap_exit_code() {
    let sandbox = Sandbox::new();
    let run = sandbox.run(&["broker", "create"]);
    assert_eq!(run.code, Some(2), "{run:#?}");
    let run = sandbox.run(&["publish", "--env", "dev", "bus:orders", "--header", "novalue", "--data", "x"]);
    assert_eq!(run.code, Some(2), "{run:#?}");
}

#[test]
fn huge_and_hostile_names_are_refused_and_old_ones_are_listed_escaped_without_a_panic() {
    let sandbox = Sandbox::new();
    let huge = sandbox.write(
        "huge.yaml",
        format!("name: {}\ntag: huge\nenvs:\n  - slug: dev\n    type: embedded\n", "n".repeat(65_536)),
    );
    let refused = sandbox.run(&["broker", "create", "-f", &huge]);
    assert!(
        refused
            .failed(1)
            .starts_with("error: VALIDATION_FAILED: huge.yaml: field `name`: is 65536 characters long"),
        "{refused:?}"
    );
    let hostile = sandbox.write("hostile.json", r#"{"name": "evil\u001b]0;owned\u0007", "tag": "evil", "envs": [{"slug": "dev", "type": "embedded"}]}"#);
    let refused = sandbox.run(&["broker", "create", "-f", &hostile]);
    assert!(!refused.failed(1).contains('\u{1b}'), "{refused:?}");

    // Definitions stored before the limits (or by an older server) are still listed, safely.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let url = sandbox.path().join("registry.db").display().to_string();
        let store = polybus_registry::open_store(&url).await.expect("registry");
        for (tag, name) in [("huge", "n".repeat(65_536)), ("evil", "evil\u{1b}]0;owned\u{7}\u{1b}[2J".to_owned())] {
            let doc = json!({"name": name, "tag": tag, "envs": [{"slug": "dev", "type": "embedded"}], "version": 1});
            store.insert(polybus_registry::Kind::Broker, tag, None, &doc).await.expect("stored as-is");
        }
    });
    let listed = sandbox.run(&["broker", "list"]);
    let text = listed.ok();
    assert!(!text.chars().any(|c| c.is_control() && c != '\n'), "{text:?}");
    assert!(text.contains("evil\\u{1b}]0;owned\\u{7}"), "{text:?}");
    assert!(text.lines().all(|l| l.chars().count() < 200), "{text:?}");
    assert!(text.contains('…'), "{text:?}");
    let shown = sandbox.run(&["broker", "get", "evil"]);
    assert!(!shown.ok().contains('\u{1b}'), "{shown:?}");
}

#[test]
fn broker_get_hides_kafka_properties_and_url_passwords_holding_slashes() {
    let sandbox = Sandbox::new();
    let file = sandbox.write(
        "kafka.yaml",
        "name: K\ntag: k\nenvs:\n  - slug: prd\n    type: kafka\n    config:\n      brokers: [\"k:9092\"]\n      \
         properties:\n        sasl.password: pw-sasl\n        ssl.key.password: pw-key\n        \
         sasl.jaas.config: 'PlainLoginModule required password=\"pw-jaas\";'\n  - slug: q\n    type: rabbitmq\n    \
         config:\n      url: \"amqp://app:pw/slash@rabbit:5672/\"\n",
    );
    sandbox.run(&["broker", "create", "-f", &file]).ok();
    for args in
        [&["broker", "get", "k"][..], &["broker", "get", "k", "--output", "json"], &["broker", "list"]]
    {
        let run = sandbox.run(args);
        let out = run.ok();
        assert!(!out.contains("pw-") && !out.contains("pw/slash"), "{args:?}: {out}");
    }
    let json = sandbox.run(&["broker", "get", "k", "--output", "json"]).json();
    assert_eq!(json["envs"][0]["config"]["properties"]["sasl.password"], "****");
    assert_eq!(json["envs"][1]["config"]["url"], "amqp://app:****@rabbit:5672/");
}

#[test]
fn schema_broker_names_every_type_and_its_config() {
    let sandbox = Sandbox::new();
    let run = sandbox.run(&["schema", "broker"]);
    let schema: serde_json::Value = serde_json::from_str(run.ok()).expect("JSON");
    let types = &schema["$defs"]["BrokerEnv"]["properties"]["type"]["enum"];
    assert_eq!(
        types,
        &json!(["aws_sqs", "embedded", "google_pubsub", "kafka", "mqtt", "nats", "rabbitmq", "redis"])
    );
    assert_eq!(schema["$defs"]["KafkaConfig"]["required"], json!(["brokers"]));
    let run = sandbox.run(&["schema", "topic"]);
    let schema: serde_json::Value = serde_json::from_str(run.ok()).expect("JSON");
    assert_eq!(schema["title"], "Topic");
}
