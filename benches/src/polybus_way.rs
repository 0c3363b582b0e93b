//! The workload through polybus: `Bus::publish_batch` (`Bus::publish` one by one),
//! `Subscriber::next` and `Delivery::ack`, or `Subscriber::next_batch` and `Batch::ack_all`.

use std::future::Future;
use std::path::Path;
use std::task::{Context as TaskContext, Poll, Waker};

use anyhow::{Context, Result, bail};
use async_trait::async_trait;
use polybus::{Broker, Bus, Message, Registry, SubscribeOptions, Subscriber, Topic};
use serde_json::{Value, json};
use tokio::task::JoinSet;

use crate::way::{Way, Workload, unique};

/// The broker tag of the benchmark registry; one env per adapter, named after it.
pub const BROKER: &str = "bench";

/// Creates the registry with one broker env per adapter in `envs` (`(slug, type, config)`).
pub async fn registry(path: &Path, envs: &[(String, String, Value)]) -> Result<Registry> {
    let registry = Registry::open(&path.display().to_string()).await?;
    let envs: Vec<Value> = envs
        .iter()
        .map(|(slug, kind, config)| json!({"slug": slug, "type": kind, "config": config}))
        .collect();
    let broker = Broker::from_value(json!({"name": "Benchmarks", "tag": BROKER, "envs": envs}))?;
    registry.create_broker(broker).await?;
    Ok(registry)
}

/// Creates a fresh topic `bench:<unique>` and returns its event.
pub async fn fresh_topic(registry: &Registry) -> Result<String> {
    let event = format!("{BROKER}:{}", unique("t"));
    registry.create_topic(Topic::from_value(json!({"tag": event, "name": "benchmark"}))?).await?;
    Ok(event)
}

/// One polybus run on one env.
pub struct PolybusWay {
    bus: Bus,
    env: String,
    event: String,
    subscriber: Option<Subscriber>,
    /// Most deliveries taken at once; 1 takes them one by one, each acked on its own.
    consume_batch: usize,
}

impl PolybusWay {
    /// A run on `env` of the bench broker; the topic is made by `prepare`.
    pub fn new(bus: Bus, env: &str, consume_batch: usize) -> Self {
        PolybusWay { bus, env: env.to_owned(), event: String::new(), subscriber: None, consume_batch }
    }
}

#[async_trait]
impl Way for PolybusWay {
    async fn prepare(&mut self, work: &Workload) -> Result<()> {
        self.event = fresh_topic(self.bus.registry()).await?;
        if !work.cold {
            self.join(work).await?;
        }
        Ok(())
    }

    async fn publish_batch(&mut self, work: &Workload, n: usize) -> Result<()> {
        if n == 1 {
            // One by one, as an application without batches publishes.
            self.bus.publish(&self.env, &self.event, Message::new(work.payload.clone())).await?;
        } else {
            let batch = (0..n).map(|_| Message::new(work.payload.clone())).collect();
            self.bus.publish_batch(&self.env, &self.event, batch).await?;
        }
        Ok(())
    }

    async fn join(&mut self, work: &Workload) -> Result<()> {
        if self.subscriber.is_none() {
            let mut options = SubscribeOptions::new(unique("g"));
            options.prefetch = work.prefetch;
            self.subscriber = Some(self.bus.subscribe(&self.env, &self.event, options).await?);
        }
        Ok(())
    }

    async fn consume(&mut self, work: &Workload) -> Result<()> {
        let subscriber = self.subscriber.as_mut().context("not prepared")?;
        if self.consume_batch > 1 {
            consume_batches(subscriber, work.messages, self.consume_batch.min(work.prefetch)).await
        } else {
            consume(subscriber, work.messages, work.prefetch, |_| {}).await
        }
    }

    async fn cleanup(&mut self) -> Result<()> {
        if let Some(mut subscriber) = self.subscriber.take() {
            subscriber.close().await?;
        }
        if !self.event.is_empty() {
            self.bus.registry().delete_topic(&self.event).await?;
            drop_broker_side(&self.env, &self.event).await?;
        }
        Ok(())
    }
}

/// Deletes what polybus made at the broker for `event` where it would outlive the run on a
/// shared broker: on Redis, the stream and its side keys (polybus deletes a topic from the
/// registry only, and a run leaves up to a million entries).
pub async fn drop_broker_side(env: &str, event: &str) -> Result<()> {
    if env != "redis" {
        return Ok(());
    }
    let stream = event.split_once(':').map_or(event, |(_, name)| name);
    let mut conn = redis::Client::open(crate::REDIS_URL)?.get_multiplexed_async_connection().await?;
    let mut keys = vec![stream.to_owned()];
    {
        let mut side =
            redis::AsyncCommands::scan_match::<_, String>(&mut conn, format!("{stream}:*")).await?;
        while let Some(key) = futures::StreamExt::next(&mut side).await {
            keys.push(key?);
        }
    }
    redis::cmd("DEL").arg(&keys).query_async::<i64>(&mut conn).await?;
    Ok(())
}

/// Publishes `work.messages` copies of the payload in batches.
pub async fn publish(bus: &Bus, env: &str, event: &str, work: &Workload) -> Result<()> {
    let mut left = work.messages;
    while left > 0 {
        let n = left.min(work.batch);
        let batch = (0..n).map(|_| Message::new(work.payload.clone())).collect();
        bus.publish_batch(env, event, batch).await?;
        left -= n;
    }
    Ok(())
}

/// Receives `count` deliveries in batches of what is ready (at most `max`) and acks each batch
/// together while the next is taken, as an application consuming in batches would.
pub async fn consume_batches(subscriber: &mut Subscriber, count: usize, max: usize) -> Result<()> {
    let mut acks = JoinSet::new();
    let mut received = 0;
    while received < count {
        // Cancel-safe while it waits for a first delivery, which is all the race can interrupt.
        let batch = loop {
            tokio::select! {
                next = subscriber.next_batch(max.max(1)) => break next,
                Some(done) = acks.join_next(), if !acks.is_empty() => done??,
            }
        };
        let Some(batch) = batch else { bail!("the subscription ended") };
        let batch = batch?;
        received += batch.len();
        acks.spawn(batch.ack_all());
    }
    while let Some(done) = acks.join_next().await {
        done??;
    }
    Ok(())
}

/// Receives `count` deliveries, calls `seen` on each, and acks them with at most `in_flight`
/// acks outstanding, as an application using polybus would.
pub async fn consume(
    subscriber: &mut Subscriber,
    count: usize,
    in_flight: usize,
    mut seen: impl FnMut(&polybus::Delivery),
) -> Result<()> {
    let mut acks = JoinSet::new();
    for _ in 0..count {
        let delivery = loop {
            tokio::select! {
                next = subscriber.next() => break next,
                Some(done) = acks.join_next(), if !acks.is_empty() => done??,
            }
        };
        let Some(delivery) = delivery else { bail!("the subscription ended") };
        let delivery = delivery?;
        seen(&delivery);
        // An ack that is done at once (the broker is told later, as Kafka's offsets are) costs
        // what awaiting it in line costs; only one that waits for the broker is left running.
        let mut ack = Box::pin(delivery.ack());
        match ack.as_mut().poll(&mut TaskContext::from_waker(Waker::noop())) {
            Poll::Ready(done) => done?,
            Poll::Pending => drop(acks.spawn(ack)),
        }
        while acks.len() >= in_flight.max(1) {
            if let Some(done) = acks.join_next().await {
                done??;
            }
        }
    }
    while let Some(done) = acks.join_next().await {
        done??;
    }
    Ok(())
}
