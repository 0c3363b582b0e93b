//! A group of two members; one dies (dropped without acking what it holds) in the middle of
//! 10,000 keyed messages. Every message is processed, first deliveries keep per-key order,
//! and the duplicates the failover costs are counted and printed.
//! Needs a Kafka-protocol broker on 127.0.0.1:9092 (`scripts/services kafka`), or `KAFKA_BROKERS`.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use common::{ENV, Setup};
use polybus::{Message, SubscribeOptions, Subscriber};
use serde_json::json;
use tokio::sync::mpsc;

mod common;

const TOTAL: usize = 10_000;
const KEYS: usize = 100;
/// The doomed member dies after this many deliveries…
const DIE_AFTER: usize = 2_000;
/// …holding this many more, never acked.
const HELD_AT_DEATH: usize = 5;
const LIMIT: Duration = Duration::from_secs(180);
/// How long to keep listening for duplicates once everything arrived.
const LINGER: Duration = Duration::from_secs(2);

/// One delivery, as a member saw it.
struct Seen {
    member: usize,
    id: String,
    key: String,
    seq: usize,
    attempt: u32,
}

/// Takes deliveries until the subscription ends; member 0 dies after [`DIE_AFTER`].
async fn member(index: usize, mut sub: Subscriber, seen: mpsc::UnboundedSender<Seen>) {
    let mut count = 0;
    let mut held = Vec::new();
    while let Some(next) = sub.next().await {
        let delivery = next.unwrap_or_else(|e| panic!("member {index}: receiving failed: {e}"));
        let key = delivery.key.clone().expect("every message has a key");
        let seq =
            delivery.payload_str().and_then(|p| p.parse().ok()).expect("payload is the sequence number");
        let _ =
            seen.send(Seen { member: index, id: delivery.id.clone(), key, seq, attempt: delivery.attempt });
        count += 1;
        if index == 0 && count > DIE_AFTER {
            held.push(delivery);
            if held.len() == HELD_AT_DEATH {
                // Dies: the subscription and what it holds are dropped, nothing is acked or closed.
                return;
            }
            continue;
        }
        delivery.ack().await.unwrap_or_else(|e| panic!("member {index}: ack failed: {e}"));
    }
}

/// What the members saw.
#[derive(Default)]
struct Tally {
    /// Ids of the messages seen.
    first: HashSet<String>,
    /// Key → sequence numbers of its first deliveries, in arrival order.
    first_order: BTreeMap<String, Vec<usize>>,
    per_member: [usize; 2],
    /// Attempt number → deliveries.
    attempts: BTreeMap<u32, usize>,
    deliveries: usize,
}

impl Tally {
    fn add(&mut self, seen: Seen) {
        self.deliveries += 1;
        self.per_member[seen.member] += 1;
        *self.attempts.entry(seen.attempt).or_default() += 1;
        if self.first.insert(seen.id) {
            self.first_order.entry(seen.key).or_default().push(seen.seq);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_loses_nothing_when_one_of_two_members_dies_mid_stream() {
    let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned());
    let Setup { bus, event, topic, id, dir: _registry } =
        common::setup("failover", "orders", json!({"brokers": [&brokers], "partitions": 4})).await;

    let group = format!("billing-{id}");
    let options = SubscribeOptions { ack_deadline: Duration::from_secs(5), ..SubscribeOptions::new(&group) };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut members = Vec::new();
    for index in 0..2 {
        let sub = tokio::time::timeout(Duration::from_secs(20), bus.subscribe(ENV, &event, options.clone()))
            .await
            .expect("subscribe in time")
            .expect("subscribe");
        members.push(tokio::spawn(member(index, sub, tx.clone())));
    }

    let started = Instant::now();
    let publisher = {
        let (bus, event) = (bus.clone(), event.clone());
        tokio::spawn(async move {
            let mut ids = Vec::with_capacity(TOTAL);
            let all: Vec<Message> = (0..TOTAL)
                .map(|i| Message::text((i / KEYS).to_string()).key(format!("key-{}", i % KEYS)))
                .collect();
            for chunk in all.chunks(500) {
                ids.extend(bus.publish_batch(ENV, &event, chunk.to_vec()).await.expect("publishing a batch"));
            }
            ids
        })
    };

    let mut tally = Tally::default();
    let deadline = tokio::time::Instant::now() + LIMIT;
    while tally.first.len() < TOTAL {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(seen)) => tally.add(seen),
            Ok(None) => panic!("both members stopped after {} of {TOTAL} messages", tally.first.len()),
            Err(_) => panic!("after {LIMIT:?}, {} of {TOTAL} messages processed", tally.first.len()),
        }
    }
    let processed_in = started.elapsed();
    let linger_until = tokio::time::Instant::now() + LINGER;
    while let Ok(Some(seen)) = tokio::time::timeout_at(linger_until, rx.recv()).await {
        tally.add(seen);
    }
    let ids = publisher.await.expect("publisher");

    let Tally { first, first_order, per_member, attempts, deliveries } = tally;
    let duplicates = deliveries - first.len();
    println!(
        "group failover: {TOTAL} keyed messages processed in {processed_in:?}; {deliveries} deliveries, \
         {duplicates} duplicates; per member {per_member:?}; deliveries per attempt {attempts:?}"
    );
    assert!(members[0].is_finished(), "member 0 died");
    let missing = ids.iter().filter(|id| !first.contains(*id)).count();
    assert_eq!(missing, 0, "messages never processed");
    assert_eq!(first.len(), TOTAL, "distinct messages processed");
    assert_eq!(first_order.len(), KEYS, "keys seen");
    for (key, seqs) in &first_order {
        let expected: Vec<usize> = (0..TOTAL / KEYS).collect();
        assert_eq!(seqs, &expected, "first deliveries of {key}, in arrival order");
    }
    assert!(per_member[0] > DIE_AFTER && per_member[1] > 0, "both members took part: {per_member:?}");

    for m in members {
        m.abort();
    }
    bus.close().await.expect("closing the bus");
    common::delete_topics(&brokers, &topic, &group).await;
}
