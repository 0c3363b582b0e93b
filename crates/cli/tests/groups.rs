//! `polybus groups` on the embedded broker, through the real binary.

mod common;

use common::Sandbox;
use serde_json::{Value, json};

fn billing(sandbox: &Sandbox, event: &str) -> Value {
    let listed = sandbox.run(&["groups", "--env", "dev", event, "--output", "json"]);
    let lines: Vec<Value> =
        listed.ok().lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    assert_eq!(lines.len(), 1, "one group: {lines:?}");
    assert_eq!(lines[0]["group"], "billing");
    lines[0].clone()
}

#[test]
fn groups_show_the_lag_falling_as_the_group_consumes() {
    let sandbox = Sandbox::new();
    let event = sandbox.embedded_topic("orders");
    assert_eq!(sandbox.run(&["groups", "--env", "dev", &event, "--output", "json"]).ok(), "", "no group yet");
    for n in 1..=3 {
        sandbox.run(&["publish", "--env", "dev", &event, "--data", &format!("{{\"n\": {n}}}")]).ok();
    }
    sandbox.run(&["consume", "--env", "dev", &event, "--group", "billing", "--count", "1"]).ok();
    let group = billing(&sandbox, &event);
    let outstanding = group["lag"].as_u64().expect("lag") + group["pending"].as_u64().expect("pending");
    assert_eq!(outstanding, 2, "two messages left: {group}");
    assert_eq!(group["members"], Value::Null, "the embedded broker does not record members");

    let table = sandbox.run(&["groups", "--env", "dev", &event]);
    let header = table.ok().lines().next().expect("a header");
    assert_eq!(
        header.split_whitespace().collect::<Vec<_>>(),
        ["GROUP", "MEMBERS", "PENDING", "LAG", "OLDEST-UNACKED"]
    );
    assert!(table.ok().lines().nth(1).is_some_and(|row| row.starts_with("billing")), "{}", table.ok());

    sandbox.run(&["consume", "--env", "dev", &event, "--group", "billing", "--count", "2"]).ok();
    let group = billing(&sandbox, &event);
    assert_eq!((group["lag"].clone(), group["pending"].clone()), (json!(0), json!(0)), "{group}");

    let missing = sandbox.run(&["groups", "--env", "dev", "bus:nothing"]);
    assert_eq!(missing.failed(1), "error: TOPIC_NOT_FOUND: topic `bus:nothing` not found");
}
