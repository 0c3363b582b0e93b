//! A group keeps its messages while it has no connected member: after its members closed,
//! after a member process was killed with SIGKILL, and after the whole group was replaced by
//! members with new consumer ids (issue 13). Runs against `MQTT_HOST:MQTT_PORT` (default
//! 127.0.0.1:1883).
//!
//! The killed member is this test binary run again as a child process (`MEMBER_ENV` set):
//! it joins the group, acks what it receives and prints each id once acked, until killed.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{ENV, WAIT, World, broker_address};
use libtest_mimic::{Arguments, Failed, Trial};
use polybus::{Broker, Bus, Message, Registry, SubscribeOptions, Subscriber, Topic};
use polybus_mqtt::MqttConnector;
use serde_json::json;

/// Set in a child process: `<topic> <group>`; the child is then a member, not the tests.
const MEMBER_ENV: &str = "POLYBUS_MQTT_TEST_MEMBER";
/// Printed by a child member once it has joined.
const JOINED: &str = "joined";

fn main() -> ExitCode {
    if let Ok(spec) = std::env::var(MEMBER_ENV) {
        return member_process(&spec);
    }
    let args = Arguments::from_args();
    let trials = vec![
        trial("a_group_keeps_what_is_published_after_its_last_member_closed", || {
            Box::pin(kept_after_last_member_closed())
        }),
        trial("a_killed_members_messages_go_to_the_next_member", || Box::pin(killed_member())),
        trial("a_group_whose_members_were_all_killed_keeps_every_message", || Box::pin(whole_group_killed())),
    ];
    libtest_mimic::run(&args, trials).exit_code()
}

type Case = fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

fn trial(name: &'static str, case: Case) -> Trial {
    Trial::test(name, move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| Failed::from(format!("runtime: {e}")))?;
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            runtime.block_on(async {
                tokio::time::timeout(Duration::from_secs(90), case()).await.expect("the case took over 90 s")
            })
        }));
        runtime.shutdown_timeout(Duration::from_secs(2));
        outcome.map_err(|panic| {
            Failed::from(
                panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "the case panicked".into()),
            )
        })
    })
}

/// A member with a consumer id of its own (every call: a new one).
async fn join(world: &World, group: &str) -> Subscriber {
    let options = SubscribeOptions { ack_deadline: Duration::from_secs(5), ..SubscribeOptions::new(group) };
    tokio::time::timeout(WAIT, world.bus.subscribe(ENV, &world.event, options))
        .await
        .expect("subscribing in time")
        .expect("subscribing")
}

async fn publish(world: &World, count: usize, label: &str) -> Vec<String> {
    let mut ids = Vec::with_capacity(count);
    for i in 0..count {
        ids.push(
            world
                .bus
                .publish(ENV, &world.event, Message::text(format!("{label} {i}")))
                .await
                .expect("publish"),
        );
    }
    ids
}

/// Receives and acks until every id of `expected` arrived; returns how many deliveries came
/// twice. Fails naming what is missing when nothing new arrives for [`WAIT`].
async fn receive_all(sub: &mut Subscriber, expected: &BTreeSet<String>, what: &str) -> usize {
    let mut seen = HashSet::new();
    let mut duplicates = 0;
    while !expected.iter().all(|id| seen.contains(id)) {
        match tokio::time::timeout(WAIT, sub.next()).await {
            Ok(Some(Ok(delivery))) => {
                if !seen.insert(delivery.id.clone()) {
                    duplicates += 1;
                }
                delivery.ack().await.expect("ack");
            }
            Ok(Some(Err(e))) => panic!("{what}: receiving failed: {e}"),
            Ok(None) => panic!("{what}: the subscription closed"),
            Err(_) => {
                let missing: Vec<_> = expected.iter().filter(|id| !seen.contains(*id)).collect();
                panic!(
                    "{what}: {} of {} messages never arrived within {WAIT:?} of the last one (first: {:?})",
                    missing.len(),
                    expected.len(),
                    missing.first()
                );
            }
        }
    }
    duplicates
}

/// `polybus consume --count 1` (creates the group, exits), `publish --count 5`, `consume
/// --count 5` with a new consumer id: all five arrive.
async fn kept_after_last_member_closed() {
    let world = World::new().await;
    let mut first = join(&world, "g").await;
    first.close().await.expect("closing the first member");
    drop(first);
    let ids: BTreeSet<String> = publish(&world, 5, "while nobody listens").await.into_iter().collect();
    let mut next = join(&world, "g").await;
    receive_all(&mut next, &ids, "the next member").await;
    next.close().await.expect("closing");
    world.bus.close().await.expect("closing the bus");
    world.forget_groups(&["g"]).await;
}

/// A member process killed mid-stream: the next member, with a new consumer id, gets what
/// the dead one had not acked and what was published after it died.
async fn killed_member() {
    let world = World::new().await;
    let group = "g";
    let mut child = Member::start(&world, group);
    let before: Vec<String> = publish(&world, 60, "before the kill").await;
    let acked = child.kill_after(20);
    let after = publish(&world, 20, "after the kill").await;
    let expected: BTreeSet<String> =
        before.into_iter().chain(after).filter(|id| !acked.contains(id)).collect();
    let mut next = join(&world, group).await;
    let duplicates = receive_all(&mut next, &expected, "the member after the kill").await;
    eprintln!(
        "killed member: {} acked by it, {} for the next member, {duplicates} duplicates",
        acked.len(),
        expected.len()
    );
    next.close().await.expect("closing");
    world.bus.close().await.expect("closing the bus");
    world.forget_groups(&["g"]).await;
}

/// Every member killed, messages published while none is left, then new members: every
/// message that no killed member acked arrives.
async fn whole_group_killed() {
    let world = World::new().await;
    let group = "g";
    let mut members = [Member::start(&world, group), Member::start(&world, group)];
    let before = publish(&world, 40, "before the kill").await;
    let mut acked = HashSet::new();
    for member in &mut members {
        acked.extend(member.kill_after(5));
    }
    let after = publish(&world, 20, "with no member").await;
    let expected: BTreeSet<String> =
        before.into_iter().chain(after).filter(|id| !acked.contains(id)).collect();
    let mut next = [join(&world, group).await, join(&world, group).await];
    let mut seen = HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !expected.iter().all(|id| seen.contains(id)) {
        let [a, b] = &mut next;
        let got = tokio::select! {
            d = a.next() => d,
            d = b.next() => d,
            () = tokio::time::sleep_until(deadline) => None,
        };
        match got {
            Some(Ok(delivery)) => {
                seen.insert(delivery.id.clone());
                delivery.ack().await.expect("ack");
            }
            other => {
                let missing = expected.iter().filter(|id| !seen.contains(*id)).count();
                panic!("{missing} of {} messages never reached the new members: {other:?}", expected.len());
            }
        }
    }
    for mut sub in next {
        sub.close().await.expect("closing");
    }
    world.bus.close().await.expect("closing the bus");
    world.forget_groups(&["g"]).await;
}

/// A child process that is a member of a group.
struct Member {
    child: Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Member {
    /// Starts the child and waits until it has joined.
    fn start(world: &World, group: &str) -> Member {
        let exe = std::env::current_exe().expect("the test binary");
        let mut child = Command::new(exe)
            .env(MEMBER_ENV, format!("{} {group}", world.topic))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting the member process");
        let stdout = child.stdout.take().expect("the child's stdout");
        let mut member = Member { child, lines: BufReader::new(stdout).lines() };
        match member.lines.next() {
            Some(Ok(line)) if line == JOINED => member,
            other => panic!("the member process did not join: {other:?}"),
        }
    }

    /// Reads `n` acked ids, then kills the process (SIGKILL); returns every id it printed.
    fn kill_after(&mut self, n: usize) -> HashSet<String> {
        let mut acked = HashSet::new();
        while acked.len() < n {
            match self.lines.next() {
                Some(Ok(id)) => {
                    acked.insert(id);
                }
                other => panic!("the member process stopped after {} ids: {other:?}", acked.len()),
            }
        }
        self.child.kill().expect("SIGKILL to the member process");
        self.child.wait().expect("reaping the member process");
        // Printed before the kill but not read yet.
        acked.extend(self.lines.by_ref().map_while(Result::ok));
        acked
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The child: joins the group with prefetch 8, acks, prints each acked id; runs until killed.
fn member_process(spec: &str) -> ExitCode {
    let Some((topic, group)) = spec.split_once(' ') else {
        eprintln!("{MEMBER_ENV} must be `<topic> <group>`");
        return ExitCode::FAILURE;
    };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let dir = tempfile::tempdir().expect("temporary directory");
        let registry =
            Registry::open(dir.path().join("r.db").to_str().expect("UTF-8 path")).await.expect("registry");
        let (host, port) = broker_address();
        let broker = json!({"name": "MQTT tests", "tag": "mqtt-test",
            "envs": [{"slug": ENV, "type": "mqtt", "config": {"host": host, "port": port}}]});
        registry
            .create_broker(Broker::from_value(broker).expect("broker"))
            .await
            .expect("creating the broker");
        let definition = json!({"tag": "mqtt-test:orders", "envs": [{"slug": ENV, "nativeName": topic}]});
        registry
            .create_topic(Topic::from_value(definition).expect("topic"))
            .await
            .expect("creating the topic");
        let bus = Bus::builder(registry).connector(Arc::new(MqttConnector)).build();
        let options = SubscribeOptions { prefetch: 8, ..SubscribeOptions::new(group) };
        let mut sub = bus.subscribe(ENV, "mqtt-test:orders", options).await.expect("subscribing");
        println!("{JOINED}");
        while let Some(Ok(delivery)) = sub.next().await {
            let id = delivery.id.clone();
            delivery.ack().await.expect("ack");
            println!("{id}");
            // Slow enough that the kill comes mid-stream.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    ExitCode::SUCCESS
}
