//! What every case starts from: a registry, a broker env and a topic of its own, and small
//! helpers that turn a hang or an error into a failure with context.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Display;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::{StreamExt, stream};
use polybus::{
    Broker, Bus, Capabilities, Delivery, Message, Registry, SqliteStore, SubscribeOptions, Subscriber, Topic,
};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::{PrivateBroker, RestartHook, Target};

/// The env every case publishes to.
pub(crate) const ENV: &str = "test";
/// The broker tag every case registers.
pub(crate) const BROKER: &str = "conformance";
/// How long any single expected event may take before the case fails.
pub(crate) const WAIT: Duration = Duration::from_secs(10);
/// Ack deadline of subscriptions whose redelivery timing a case depends on.
pub(crate) const ACK_DEADLINE: Duration = Duration::from_secs(1);
/// The registry's file in each case's temporary directory.
const REGISTRY_FILE: &str = "registry.db";
/// Brokers and timers keep time in milliseconds; a lower bound may be missed by this much.
pub(crate) const TIMER_SLACK: Duration = Duration::from_millis(25);

/// Fails with `what` and the error.
pub(crate) trait OrFail<T> {
    /// The value, or a panic naming what was being done.
    fn or_fail(self, what: impl Display) -> T;
}

impl<T, E: Display> OrFail<T> for Result<T, E> {
    #[track_caller]
    fn or_fail(self, what: impl Display) -> T {
        match self {
            Ok(value) => value,
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

/// Awaits `fut`, failing when it takes longer than `limit`.
pub(crate) async fn within<F: Future>(limit: Duration, what: impl Display, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(output) => output,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// One case's world: its own registry (in a temporary directory), broker env and topic.
#[derive(Clone)]
pub(crate) struct Ctx {
    /// The bus every case starts with.
    pub bus: Bus,
    /// The registry the bus resolves through.
    pub registry: Registry,
    /// The case's topic, `conformance:t-<id>`.
    pub event: String,
    /// Unique to this case; prefixes topic and group names.
    pub id: String,
    /// Restarts the target's broker, when it can.
    pub restart: Option<RestartHook>,
    /// The target's private broker, when it has one.
    pub private: Option<Arc<PrivateBroker>>,
    /// The target's connectors, for a second bus.
    connectors: Vec<Arc<dyn polybus::Connector>>,
    _dir: Arc<tempfile::TempDir>,
}

impl Ctx {
    /// Creates the registry, the broker env and a topic with `max_attempts` (default when `None`).
    pub async fn new(target: &Target, max_attempts: Option<u32>) -> polybus::Result<Ctx> {
        let dir =
            tempfile::tempdir().map_err(|e| polybus::Error::Storage(format!("temporary directory: {e}")))?;
        let path: PathBuf = dir.path().join(REGISTRY_FILE);
        let registry = Registry::new(Arc::new(SqliteStore::open(&path).await?));
        // Definitions are validated by the connectors under test, as a server validates them.
        let registry = registry.clone().with_kinds(build_bus(&registry, &target.connectors).kinds().clone());
        registry
            .create_broker(Broker::from_value(json!({
                "name": "Conformance",
                "tag": BROKER,
                "description": format!("behaviour suite against {}", target.name),
                "envs": [{"slug": ENV, "type": target.broker_type.as_str(), "config": target.config}],
            }))?)
            .await?;
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let ctx = Ctx {
            bus: build_bus(&registry, &target.connectors),
            registry,
            event: format!("{BROKER}:t-{id}"),
            id,
            restart: target.restart.clone(),
            private: target.private.clone().ok(),
            connectors: target.connectors.clone(),
            _dir: Arc::new(dir),
        };
        ctx.add_topic(&ctx.event, max_attempts).await?;
        Ok(ctx)
    }

    /// Registers another topic, `conformance:t-<id>-<label>`, and returns its event.
    pub async fn another_topic(&self, label: &str) -> String {
        let event = format!("{}-{label}", self.event);
        self.add_topic(&event, None).await.or_fail(format!("creating topic {event}"));
        event
    }

    async fn add_topic(&self, event: &str, max_attempts: Option<u32>) -> polybus::Result<()> {
        let mut doc = json!({"tag": event});
        if let Some(n) = max_attempts {
            doc["maxAttempts"] = json!(n);
        }
        self.registry.create_topic(Topic::from_value(doc)?).await?;
        Ok(())
    }

    /// The registry's file, for a member process to open.
    pub fn registry_path(&self) -> PathBuf {
        self._dir.path().join(REGISTRY_FILE)
    }

    /// A second, independent bus over the same registry.
    pub fn new_bus(&self) -> Bus {
        build_bus(&self.registry, &self.connectors)
    }

    /// The adapter's capabilities, after connecting and pinging the broker.
    pub async fn probe(&self) -> polybus::Result<Capabilities> {
        let capabilities = self.bus.capabilities(ENV, &self.event).await?;
        self.bus.test_connection(BROKER, ENV).await?;
        Ok(capabilities)
    }

    /// A group name unique to this case.
    pub fn group(&self, label: &str) -> String {
        format!("g-{}-{label}", self.id)
    }

    /// Subscribe options for group `label`: default prefetch, a 1 s ack deadline.
    pub fn options(&self, label: &str) -> SubscribeOptions {
        SubscribeOptions { ack_deadline: ACK_DEADLINE, ..SubscribeOptions::new(self.group(label)) }
    }

    /// Joins group `label` on the case's topic.
    pub async fn subscribe(&self, label: &str) -> Subscriber {
        self.subscribe_with(&self.event, self.options(label)).await
    }

    /// Joins a group on `event` with `options`.
    pub async fn subscribe_with(&self, event: &str, options: SubscribeOptions) -> Subscriber {
        let what = format!("subscribing group {} to {event}", options.group);
        within(WAIT, &what, self.bus.subscribe(ENV, event, options)).await.or_fail(&what)
    }

    /// `count` members of one group on `event`, joining together as a deployment's replicas
    /// start. One at a time, each join would rebalance a Kafka group once more, and noida-db
    /// (the Kafka test broker) can leave such a group stalled for good (the Kafka README).
    pub async fn subscribe_together(
        &self,
        event: &str,
        options: &SubscribeOptions,
        count: usize,
    ) -> Vec<Subscriber> {
        futures::future::join_all((0..count).map(|_| self.subscribe_with(event, options.clone()))).await
    }

    /// Publishes to the case's topic; returns the id.
    pub async fn publish(&self, message: Message) -> String {
        self.publish_to(&self.event, message).await
    }

    /// Publishes to `event`; returns the id.
    pub async fn publish_to(&self, event: &str, message: Message) -> String {
        let what = format!("publishing message {} to {event}", message.id);
        within(WAIT, &what, self.bus.publish(ENV, event, message)).await.or_fail(&what)
    }

    /// Publishes `count` text messages `<prefix>-<i>`, a few at a time; returns their ids in order.
    pub async fn publish_numbered(&self, event: &str, prefix: &str, count: usize) -> Vec<String> {
        stream::iter(0..count)
            .map(|i| self.publish_to(event, Message::text(format!("{prefix}-{i}"))))
            .buffered(8)
            .collect()
            .await
    }
}

/// A bus over `registry` with the default connectors and `connectors`.
pub(crate) fn build_bus(registry: &Registry, connectors: &[Arc<dyn polybus::Connector>]) -> Bus {
    connectors.iter().fold(Bus::builder(registry.clone()), |b, c| b.connector(c.clone())).build()
}

/// The next delivery, failing on timeout, error or a closed subscription.
pub(crate) async fn receive(sub: &mut Subscriber, what: impl Display) -> Delivery {
    match within(WAIT, &what, sub.next()).await {
        Some(Ok(delivery)) => delivery,
        Some(Err(e)) => panic!("receiving {what}: {e}"),
        None => panic!("receiving {what}: the subscription closed"),
    }
}

/// Fails if anything is delivered to `sub` within `window`.
pub(crate) async fn expect_nothing(sub: &mut Subscriber, window: Duration, what: impl Display) {
    match tokio::time::timeout(window, sub.next()).await {
        Err(_) => {}
        Ok(Some(Ok(d))) => panic!(
            "{what}: expected no delivery within {window:?}, got message {} ({:?}) on attempt {}",
            d.id,
            d.payload_str().unwrap_or("<binary>"),
            d.attempt
        ),
        Ok(Some(Err(e))) => panic!("{what}: receiving failed: {e}"),
        Ok(None) => panic!("{what}: the subscription closed"),
    }
}

/// A message some group member received.
pub(crate) struct Received {
    /// Index of the member that received it.
    pub member: usize,
    /// The message as delivered.
    pub message: Message,
}

/// Members of one group, each acking whatever it receives and reporting it to the case.
pub(crate) struct Members {
    tasks: Vec<JoinHandle<()>>,
    rx: mpsc::UnboundedReceiver<Result<Received, String>>,
    ack_errors: Arc<AtomicU64>,
}

impl Members {
    /// Starts one member per subscriber.
    pub fn spawn(subscribers: Vec<Subscriber>) -> Members {
        let (tx, rx) = mpsc::unbounded_channel();
        let ack_errors = Arc::new(AtomicU64::new(0));
        let tasks = subscribers
            .into_iter()
            .enumerate()
            .map(|(member, sub)| tokio::spawn(member_loop(member, sub, tx.clone(), ack_errors.clone())))
            .collect();
        Members { tasks, rx, ack_errors }
    }

    /// Receives until `expected` distinct ids arrived, then keeps listening for `linger` to
    /// catch duplicates. Fails when nothing new arrives for [`WAIT`] or all takes over `limit`.
    pub async fn collect(&mut self, expected: usize, limit: Duration, linger: Duration) -> Tally {
        let mut tally = Tally::default();
        let deadline = tokio::time::Instant::now() + limit;
        while tally.by_id.len() < expected {
            let stalled = (tokio::time::Instant::now() + WAIT).min(deadline);
            match tokio::time::timeout_at(stalled, self.rx.recv()).await {
                Ok(Some(Ok(r))) => tally.add(r),
                Ok(Some(Err(e))) => panic!("{e}"),
                Ok(None) => panic!("every member stopped after {} of {expected} messages", tally.by_id.len()),
                Err(_) => panic!(
                    "received {} of {expected} distinct messages ({} deliveries), then {}",
                    tally.by_id.len(),
                    tally.arrivals.len(),
                    if stalled < deadline {
                        format!("nothing new for {WAIT:?}")
                    } else {
                        format!("ran out of the {limit:?} allowed")
                    }
                ),
            }
        }
        let linger_until = tokio::time::Instant::now() + linger;
        while let Ok(Some(next)) = tokio::time::timeout_at(linger_until, self.rx.recv()).await {
            match next {
                Ok(r) => tally.add(r),
                Err(e) => panic!("{e}"),
            }
        }
        tally
    }

    /// Stops every member (dropping its subscriber); returns how many acks failed.
    pub fn stop(self) -> u64 {
        for task in &self.tasks {
            task.abort();
        }
        self.ack_errors.load(Ordering::Relaxed)
    }
}

async fn member_loop(
    member: usize,
    mut sub: Subscriber,
    tx: mpsc::UnboundedSender<Result<Received, String>>,
    ack_errors: Arc<AtomicU64>,
) {
    while let Some(next) = sub.next().await {
        let delivery = match next {
            Ok(d) => d,
            Err(e) => {
                let _ = tx.send(Err(format!("member {member}: receiving failed: {e}")));
                return;
            }
        };
        let message = delivery.message().clone();
        if let Err(e) = delivery.ack().await {
            eprintln!("member {member}: ack of {} failed: {e}", message.id);
            ack_errors.fetch_add(1, Ordering::Relaxed);
        }
        if tx.send(Ok(Received { member, message })).is_err() {
            return;
        }
    }
    let _ = tx.send(Err(format!("member {member}: the subscription closed")));
}

/// Deliveries collected from group members: who received which message, how often.
#[derive(Default)]
pub(crate) struct Tally {
    /// Message id → members that received it, in arrival order.
    pub by_id: HashMap<String, Vec<usize>>,
    /// Every delivery, in arrival order.
    pub arrivals: Vec<Message>,
}

impl Tally {
    fn add(&mut self, r: Received) {
        self.by_id.entry(r.message.id.clone()).or_default().push(r.member);
        self.arrivals.push(r.message);
    }

    /// Deliveries beyond the first of each message.
    pub fn duplicates(&self) -> usize {
        self.arrivals.len() - self.by_id.len()
    }

    /// How many deliveries each member got.
    pub fn per_member(&self) -> BTreeMap<usize, usize> {
        let mut counts = BTreeMap::new();
        for members in self.by_id.values() {
            for m in members {
                *counts.entry(*m).or_default() += 1;
            }
        }
        counts
    }

    /// Fails unless exactly `ids` arrived (any order), listing what is missing or foreign.
    pub fn assert_ids(&self, ids: &[String], what: impl Display) {
        let missing: Vec<_> = ids.iter().filter(|id| !self.by_id.contains_key(*id)).collect();
        let expected: std::collections::HashSet<_> = ids.iter().collect();
        let foreign: Vec<_> = self.by_id.keys().filter(|id| !expected.contains(id)).collect();
        assert!(
            missing.is_empty() && foreign.is_empty(),
            "{what}: {} of {} messages missing (first: {:?}); {} unexpected (first: {:?})",
            missing.len(),
            ids.len(),
            missing.first(),
            foreign.len(),
            foreign.first()
        );
    }
}
