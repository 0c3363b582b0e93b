//! Connections killed mid-stream: nothing published successfully is lost, and every publish
//! either succeeds or says it failed.
//!
//! Needs the Redis on `POLYBUS_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`); it kills
//! every normal client connection of that Redis twice while it runs.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use polybus::{Broker, Bus, Message, Registry, SubscribeOptions, Topic};
use polybus_redis::RedisConnector;
use serde_json::json;
use tokio::time::Instant;

const ENV: &str = "dev";
const MESSAGES: usize = 2000;
const PUBLISHERS: usize = 4;
const MEMBERS: usize = 2;

fn redis_url() -> String {
    std::env::var("POLYBUS_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

async fn kill_client_connections(native: &mut redis::aio::MultiplexedConnection) -> i64 {
    redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .arg("SKIPME")
        .arg("yes")
        .query_async(native)
        .await
        .expect("CLIENT KILL")
}

/// Waits until `condition` holds, checking every 10 ms, failing after `limit`.
async fn wait_until(limit: Duration, what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_connections_lose_no_published_message() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let registry =
        Registry::open(dir.path().join("registry.db").to_str().expect("utf-8 path")).await.expect("registry");
    registry
        .create_broker(
            Broker::from_value(json!({
                "name": "Faults", "tag": "faults",
                "envs": [{"slug": ENV, "type": "redis", "config": {"url": redis_url()}}],
            }))
            .expect("broker definition"),
        )
        .await
        .expect("creating the broker");
    let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let stream = format!("polybus-faults-{id}");
    let event = format!("faults:t-{id}");
    registry
        .create_topic(
            Topic::from_value(json!({"tag": event, "envs": [{"slug": ENV, "nativeName": stream}]}))
                .expect("topic definition"),
        )
        .await
        .expect("creating the topic");
    let bus = Bus::builder(registry).connector(Arc::new(RedisConnector)).build();
    let client = redis::Client::open(redis_url()).expect("redis url");
    let mut native = client.get_multiplexed_async_connection().await.expect("native connection");

    // Members of one group record every delivery and ack it.
    let received: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let ack_errors = Arc::new(AtomicUsize::new(0));
    let receive_errors = Arc::new(AtomicUsize::new(0));
    let mut members = Vec::new();
    for _ in 0..MEMBERS {
        let options = SubscribeOptions {
            ack_deadline: Duration::from_secs(1),
            ..SubscribeOptions::new(format!("faults-{id}"))
        };
        let mut sub = bus.subscribe(ENV, &event, options).await.expect("subscribing");
        let (received, ack_errors, receive_errors) =
            (received.clone(), ack_errors.clone(), receive_errors.clone());
        members.push(tokio::spawn(async move {
            while let Some(next) = sub.next().await {
                match next {
                    Ok(delivery) => {
                        *received.lock().expect("tally").entry(delivery.id.clone()).or_default() += 1;
                        if delivery.ack().await.is_err() {
                            ack_errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(_) => {
                        receive_errors.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }));
    }

    // Publishers share the numbers 0..MESSAGES and record which publishes returned Ok.
    let next_number = Arc::new(AtomicUsize::new(0));
    let published_ok: Arc<Mutex<HashSet<String>>> = Arc::default();
    let publish_errors = Arc::new(AtomicUsize::new(0));
    let mut publishers = Vec::new();
    for _ in 0..PUBLISHERS {
        let (bus, event) = (bus.clone(), event.clone());
        let (next_number, published_ok, publish_errors) =
            (next_number.clone(), published_ok.clone(), publish_errors.clone());
        publishers.push(tokio::spawn(async move {
            loop {
                let n = next_number.fetch_add(1, Ordering::Relaxed);
                if n >= MESSAGES {
                    break;
                }
                let id = format!("m-{n}");
                let message = Message::text(format!("message {n}")).id(id.clone());
                match bus.publish(ENV, &event, message).await {
                    Ok(_) => {
                        published_ok.lock().expect("published").insert(id);
                    }
                    Err(_) => {
                        publish_errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }

    let mut killed = 0;
    for at in [MESSAGES / 4, MESSAGES * 3 / 5] {
        let received = received.clone();
        wait_until(Duration::from_secs(60), "messages to flow", move || {
            received.lock().expect("tally").len() >= at
        })
        .await;
        killed += kill_client_connections(&mut native).await;
    }
    for publisher in publishers {
        publisher.await.expect("publisher task");
    }
    let expected = published_ok.lock().expect("published").clone();
    {
        let (received, expected) = (received.clone(), expected.clone());
        wait_until(Duration::from_secs(60), "every successfully published message", move || {
            let received = received.lock().expect("tally");
            expected.iter().all(|id| received.contains_key(id))
        })
        .await;
    }
    // Linger briefly so late duplicates are counted too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for member in &members {
        member.abort();
    }

    let received = received.lock().expect("tally").clone();
    let duplicates: u32 = received.values().map(|n| n - 1).sum();
    let errors = publish_errors.load(Ordering::Relaxed);
    eprintln!(
        "faults: killed {killed} connections; {} published ok, {errors} publish errors, {} distinct received, \
         {duplicates} duplicate deliveries, {} ack errors, {} receive errors",
        expected.len(),
        received.len(),
        ack_errors.load(Ordering::Relaxed),
        receive_errors.load(Ordering::Relaxed),
    );
    assert!(killed > 0, "the kills hit polybus's connections");
    assert_eq!(expected.len() + errors, MESSAGES, "every publish returned Ok or an error");
    let strangers: Vec<_> = received.keys().filter(|id| !id.starts_with("m-")).collect();
    assert!(strangers.is_empty(), "only published messages arrive: {strangers:?}");

    let _: i64 = redis::cmd("DEL").arg(&stream).query_async(&mut native).await.expect("DEL");
    bus.close().await.expect("closing the bus");
}
