//! A group formed by members joining one at a time, as the replicas of a rolling start do (each
//! `subscribe` awaited before the next): once all ten have joined, every message published reaches
//! one of them promptly.
//!
//! It runs on tansu, 127.0.0.1:9093 (`scripts/services tansu`; `KAFKA_TANSU_BROKERS` points it
//! elsewhere): noida-db, the usual test broker, loses the JoinGroup answer of members that are
//! waiting when a new member joins just after a rebalance completed, and never expires them, so a
//! group joined this way stalls there whatever the client (see the crate README).
//! `RUST_LOG=polybus_kafka=debug,librdkafka=debug` shows what the members log.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{ENV, Setup};
use polybus::{Message, SubscribeOptions};
use serde_json::json;
use tokio::sync::{mpsc, watch};

mod common;

/// tansu, unless `KAFKA_TANSU_BROKERS` says otherwise.
const TANSU_ADDRESS: &str = "127.0.0.1:9093";
const MEMBERS: usize = 10;
const MESSAGES: usize = 300;
/// How long one member may take to join (`subscribe` itself waits up to 8 s for partitions; a
/// rebalance on tansu takes about half the session timeout).
const JOIN_WAIT: Duration = Duration::from_secs(20);
/// How long every message may take to arrive once the last member has joined.
const DELIVERY_WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_joining_one_at_a_time_all_consume() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .with_thread_ids(true)
            .try_init();
    }
    let brokers = std::env::var("KAFKA_TANSU_BROKERS").unwrap_or_else(|_| TANSU_ADDRESS.to_owned());
    // tansu lets a member join after about half the session timeout: a short one keeps this quick.
    let config = json!({"brokers": [&brokers], "partitions": MEMBERS,
        "properties": {"session.timeout.ms": "6000"}});
    let Setup { bus, event, topic, id, dir: _registry } = common::setup("join", "jobs", config).await;

    let group = format!("workers-{id}");
    let options = SubscribeOptions::new(&group);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (stop, stopped) = watch::channel(false);
    let mut members = Vec::new();
    let joining = Instant::now();
    for index in 0..MEMBERS {
        let sub = tokio::time::timeout(JOIN_WAIT, bus.subscribe(ENV, &event, options.clone()))
            .await
            .unwrap_or_else(|_| panic!("member {index} did not subscribe within {JOIN_WAIT:?}"))
            .unwrap_or_else(|e| panic!("member {index}: subscribe failed: {e}"));
        members.push(tokio::spawn(common::member(sub, tx.clone(), stopped.clone())));
    }
    println!("group join: {MEMBERS} members joined one at a time in {:?}", joining.elapsed());

    let batch: Vec<Message> = (0..MESSAGES).map(|i| Message::text(i.to_string())).collect();
    let ids = bus.publish_batch(ENV, &event, batch).await.expect("publishing");
    let started = Instant::now();
    let mut seen = HashSet::new();
    let deadline = tokio::time::Instant::now() + DELIVERY_WAIT;
    while seen.len() < MESSAGES {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(id)) => {
                seen.insert(id);
            }
            Ok(None) | Err(_) => break,
        }
    }
    let missing = ids.iter().filter(|id| !seen.contains(*id)).count();
    println!("group join: {} of {MESSAGES} messages consumed in {:?}", seen.len(), started.elapsed());

    common::stop_members(members, stop, &bus, &brokers, &topic, &group).await;

    assert_eq!(missing, 0, "messages not consumed within {DELIVERY_WAIT:?} of publishing");
}
