//! A topic's groups over HTTP and as `/metrics` gauges, on the embedded broker.

mod common;

use axum::http::StatusCode;
use common::TestApi;
use serde_json::{Value, json};

async fn groups(api: &TestApi, event: &str) -> Value {
    let (status, body) =
        api.call("GET", &format!("/v1/envs/dev/events/{event}/groups"), Some(&api.reader), None).await;
    assert_eq!(status, StatusCode::OK, "a read-only key reads the groups: {body:#}");
    body
}

#[tokio::test]
async fn groups_show_the_backlog_until_it_is_acked_and_reach_the_metrics() {
    let api = TestApi::new().await;
    let event = api.embedded_topic("bus", "orders").await;
    assert_eq!(groups(&api, &event).await, json!({"groups": []}), "no group before one joins");

    api.publish(&event, json!({"messages": [{"payload": 1}, {"payload": 2}, {"payload": 3}]})).await;
    let first = api.pull(&event, "billing", json!({"max": 1})).await;
    let listed = groups(&api, &event).await;
    let billing = &listed["groups"][0];
    assert_eq!(billing["group"], "billing");
    let (lag, pending) =
        (billing["lag"].as_u64().expect("lag"), billing["pending"].as_u64().expect("pending"));
    assert_eq!(lag + pending, 3, "the backlog is lag or pending: {billing}");
    assert!(pending >= 1, "the pulled message is pending: {billing}");
    assert!(billing["oldestUnackedMs"].is_u64(), "{billing}");
    assert_eq!(billing["members"], Value::Null, "the embedded broker does not record members");

    let rest = api.pull(&event, "billing", json!({"max": 2, "waitMs": 5000})).await;
    let leases: Vec<&Value> = first.iter().chain(&rest).map(|m| &m["leaseId"]).collect();
    assert_eq!(leases.len(), 3);
    api.ack(&event, "billing", json!({"leaseIds": leases})).await;
    let billing = groups(&api, &event).await["groups"][0].clone();
    assert_eq!((billing["lag"].clone(), billing["pending"].clone()), (json!(0), json!(0)), "{billing}");
    assert_eq!(billing["oldestUnackedMs"], Value::Null);

    let (status, text) = api.call("GET", "/metrics", Some(&api.reader), None).await;
    assert_eq!(status, StatusCode::OK);
    let text = text.as_str().expect("text");
    let labels = r#"broker="bus",env="dev",topic="orders",group="billing""#;
    for line in [format!("polybus_group_lag{{{labels}}} 0"), format!("polybus_group_pending{{{labels}}} 0")] {
        assert!(text.lines().any(|l| l == line), "missing `{line}` in:\n{text}");
    }
    assert!(!text.contains(&format!("polybus_group_members{{{labels}}}")), "no gauge for what is unknown");
}

#[tokio::test]
async fn groups_of_an_unknown_topic_are_not_found() {
    let api = TestApi::new().await;
    api.embedded_broker("bus").await;
    api.fails(
        "GET",
        "/v1/envs/dev/events/bus:nothing/groups",
        None,
        StatusCode::NOT_FOUND,
        "TOPIC_NOT_FOUND",
    )
    .await;
}
