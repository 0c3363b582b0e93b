//! `polybus topic …` through the real binary.

mod common;

use common::Sandbox;
use serde_json::json;

fn two_env_broker(sandbox: &Sandbox) {
    let broker = format!(
        "name: Message Bus\ntag: message-bus\nenvs:\n  - slug: prd\n    type: rabbitmq\n    config: {{ url: \"amqp://rabbit:5672\", exchange: events }}\n  - slug: dev\n    type: embedded\n    config: {{ path: {} }}\n",
        sandbox.broker_db().display()
    );
    let file = sandbox.write("broker.yaml", broker);
    sandbox.run(&["broker", "create", "-f", &file]).ok();
}

#[test]
fn topic_round_trips_and_shows_its_native_names_per_env() {
    let sandbox = Sandbox::new();
    two_env_broker(&sandbox);
    let file = sandbox.write(
        "topic.yaml",
        "tag: message-bus:orders\nname: Orders\ndescription: Placed orders\nenvs:\n  - slug: dev\n    nativeName: orders-v1\n",
    );
    assert_eq!(
        sandbox.run(&["topic", "create", "-f", &file]).ok(),
        "created topic `message-bus:orders` (version 1)\n"
    );

    assert_eq!(
        sandbox.run(&["topic", "get", "message-bus:orders"]).ok(),
        "event:          message-bus:orders\n\
         name:           Orders\n\
         description:    Placed orders\n\
         max attempts:   5\n\
         version:        1\n\
         on the broker:\n  \
           ENV  TYPE      NATIVE NAME  DEAD LETTER    NOTE\n  \
           prd  rabbitmq  orders       orders-dlq     exchange `events`, routing key `orders`; queue `orders--<group>` per group\n  \
           dev  embedded  orders-v1    orders-v1-dlq\n"
    );
    let fetched = sandbox.run(&["topic", "get", "message-bus:orders", "--output", "json"]).json();
    assert_eq!(
        fetched,
        json!({
            "tag": "message-bus:orders",
            "name": "Orders",
            "description": "Placed orders",
            "envs": [{"slug": "dev", "nativeName": "orders-v1"}],
            "version": 1,
            "nativeNames": [
                {"env": "prd", "type": "rabbitmq", "nativeName": "orders", "deadLetter": "orders-dlq",
                 "note": "exchange `events`, routing key `orders`; queue `orders--<group>` per group"},
                {"env": "dev", "type": "embedded", "nativeName": "orders-v1", "deadLetter": "orders-v1-dlq"},
            ],
        })
    );

    let other = sandbox.write("other.yaml", "tag: message-bus:invoices\n");
    sandbox.run(&["topic", "create", "-f", &other]).ok();
    assert_eq!(
        sandbox.run(&["topic", "list"]).ok(),
        "EVENT                 NAME      MAX-ATTEMPTS  VERSION\n\
         message-bus:invoices  invoices  5             1\n\
         message-bus:orders    Orders    5             1\n"
    );
    let listed = sandbox.run(&["topic", "list", "message-bus", "--output", "json"]).json();
    let events: Vec<&str> =
        listed.as_array().expect("array").iter().filter_map(|t| t["tag"].as_str()).collect();
    assert_eq!(events, ["message-bus:invoices", "message-bus:orders"]);

    let patch = sandbox.write("patch.yaml", "version: 1\nmaxAttempts: 3\ndeadLetter: orders-parking\n");
    assert_eq!(
        sandbox.run(&["topic", "update", "message-bus:orders", "-f", &patch]).ok(),
        "updated topic `message-bus:orders` (version 2)\n"
    );
    let fetched = sandbox.run(&["topic", "get", "message-bus:orders", "--output", "json"]).json();
    assert_eq!((fetched["maxAttempts"].clone(), fetched["version"].clone()), (json!(3), json!(2)));
    assert_eq!(fetched["nativeNames"][1]["deadLetter"], "orders-parking");
    let stale = sandbox.run(&["topic", "update", "message-bus:orders", "-f", &patch]);
    assert_eq!(
        stale.failed(1),
        "error: CONFLICT: topic `message-bus:orders` was changed meanwhile: update sent version 1, current is 2; \
         fetch it again and retry"
    );

    assert_eq!(
        sandbox.run(&["topic", "delete", "message-bus:orders"]).ok(),
        "deleted topic `message-bus:orders`\n"
    );
    let gone = sandbox.run(&["topic", "get", "message-bus:orders"]);
    assert_eq!(gone.failed(1), "error: TOPIC_NOT_FOUND: topic `message-bus:orders` not found");
    let listed = sandbox.run(&["topic", "list", "--output", "json"]).json();
    assert_eq!(listed.as_array().map(Vec::len), Some(1));
}

#[test]
fn bad_topics_are_refused_with_the_reason() {
    let sandbox = Sandbox::new();
    two_env_broker(&sandbox);
    let cases = [
        ("no-broker.yaml", "tag: billing:orders\n", "error: BROKER_NOT_FOUND: broker `billing` not found"),
        (
            "not-an-event.yaml",
            "tag: orders\n",
            "error: VALIDATION_FAILED: not-an-event.yaml: field `tag`: `orders` is not an event: expected `broker-tag:topic-tag`",
        ),
        (
            "unknown-env.yaml",
            "tag: message-bus:orders\nenvs:\n  - slug: stg\n",
            "error: VALIDATION_FAILED: unknown-env.yaml: field `envs[0].slug`: broker `message-bus` has no env `stg` (envs: prd, dev)",
        ),
    ];
    for (name, contents, expected) in cases {
        let file = sandbox.write(name, contents);
        assert_eq!(sandbox.run(&["topic", "create", "-f", &file]).failed(1), expected, "{name}");
    }
    assert_eq!(sandbox.run(&["topic", "list", "--output", "json"]).json(), json!([]));
    let unknown = sandbox.run(&["topic", "list", "billing"]);
    assert_eq!(unknown.failed(1), "error: BROKER_NOT_FOUND: broker `billing` not found");
}
