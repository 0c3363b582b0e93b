//! A member whose librdkafka client logs at debug level still takes part in rebalances: a second
//! member joining gets its share of the partitions, and every message published reaches one of
//! the two promptly.
//!
//! Debug log lines, like commit results, are events of the consumer's main queue that are not
//! messages, and librdkafka puts them ahead of rebalances there. A member that served one such
//! event per turn of its thread fell ever further behind a consumer spinning on noida-db's empty
//! fetches (hundreds of log lines a second), so the rebalance the new member started was never
//! served and neither member received anything. It runs on noida-db, 127.0.0.1:9092
//! (`KAFKA_BROKERS` points it elsewhere); `RUST_LOG` prints the logs too.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{ENV, Setup};
use polybus::{Message, SubscribeOptions};
use serde_json::json;
use tokio::sync::{mpsc, watch};

mod common;

const ADDRESS: &str = "127.0.0.1:9092";
const MESSAGES: usize = 60;
/// How long every message may take to arrive once the second member has subscribed.
const DELIVERY_WAIT: Duration = Duration::from_secs(20);

/// librdkafka emits debug lines only when `tracing` (through `log`) would record them: this
/// records them, into nothing unless `RUST_LOG` is set.
fn record_librdkafka_debug_lines() {
    let printed = std::env::var_os("RUST_LOG").is_some();
    let filter = match std::env::var("RUST_LOG") {
        Ok(filter) => format!("{filter},librdkafka=debug"),
        Err(_) => "librdkafka=debug".to_owned(),
    };
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_thread_ids(true);
    let _ = if printed {
        subscriber.with_writer(std::io::stderr).try_init()
    } else {
        subscriber.with_writer(std::io::sink).try_init()
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_logging_at_debug_level_hands_partitions_to_a_new_member() {
    record_librdkafka_debug_lines();
    let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| ADDRESS.to_owned());
    // One partition for each member; `fetch` logs every fetch, which noida-db answers at once.
    let config = json!({"brokers": [&brokers], "partitions": 2, "properties": {"debug": "fetch,cgrp"}});
    let Setup { bus, event, topic, id, dir: _registry } = common::setup("logging", "jobs", config).await;
    let group = format!("workers-{id}");
    let options = SubscribeOptions::new(&group);
    let (stop, stopped) = watch::channel(false);

    // The first member consumes, so its fetches (and their log lines) are under way…
    let first = bus.subscribe(ENV, &event, options.clone()).await.expect("first member subscribes");
    let (first_tx, mut first_rx) = mpsc::unbounded_channel();
    let mut members = vec![tokio::spawn(common::member(first, first_tx, stopped.clone()))];
    let warm = bus.publish(ENV, &event, Message::text("warm-up")).await.expect("publishing");
    let first_got = tokio::time::timeout(DELIVERY_WAIT, first_rx.recv()).await;
    assert!(
        matches!(&first_got, Ok(Some(got)) if *got == warm),
        "the first member alone did not receive a message within {DELIVERY_WAIT:?}: {first_got:?}"
    );
    // …when the second joins, which takes a rebalance both must serve.
    let second = bus.subscribe(ENV, &event, options.clone()).await.expect("second member subscribes");
    let (second_tx, mut second_rx) = mpsc::unbounded_channel();
    members.push(tokio::spawn(common::member(second, second_tx, stopped.clone())));

    let batch: Vec<Message> =
        (0..MESSAGES).map(|i| Message::text(i.to_string()).key(format!("k{i}"))).collect();
    let ids = bus.publish_batch(ENV, &event, batch).await.expect("publishing");
    let started = Instant::now();
    let mut seen = HashSet::new();
    let mut per_member = [0usize; 2];
    let deadline = tokio::time::Instant::now() + DELIVERY_WAIT;
    while seen.len() < MESSAGES {
        let (index, id) = tokio::select! {
            Some(id) = first_rx.recv() => (0, id),
            Some(id) = second_rx.recv() => (1, id),
            _ = tokio::time::sleep_until(deadline) => break,
        };
        // A redelivery of the warm-up message (at-least-once across the rebalance) is not one of them.
        if ids.contains(&id) && seen.insert(id) {
            per_member[index] += 1;
        }
    }
    let missing = ids.iter().filter(|id| !seen.contains(*id)).count();
    println!(
        "{} of {MESSAGES} messages consumed in {:?}, {per_member:?} by each member",
        seen.len(),
        started.elapsed()
    );

    common::stop_members(members, stop, &bus, &brokers, &topic, &group).await;

    assert_eq!(missing, 0, "messages not consumed within {DELIVERY_WAIT:?} of publishing");
    // These keys hash to both partitions (36 and 24 of them).
    assert!(per_member.iter().all(|n| *n > 0), "a member got no partition: {per_member:?} messages each");
}
