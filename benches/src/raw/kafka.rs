//! Raw `rdkafka`: an idempotent producer (acks=all, linger 0, Nagle off) awaiting every delivery, and a
//! consumer in a group with manual offset store and commits, as polybus's adapter is set up.

use std::time::Duration;

use anyhow::{Result, bail};
use async_trait::async_trait;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, Message};

use crate::way::{Way, Workload, unique};

/// Partitions of the benchmark topic: the polybus adapter's default.
const PARTITIONS: i32 = 3;
/// Offsets are committed every this many acks, and at the end.
const COMMIT_EVERY: usize = 256;

/// One raw Kafka run.
pub struct RawKafka {
    brokers: String,
    topic: String,
    producer: Option<FutureProducer>,
    consumer: Option<StreamConsumer>,
    /// Messages received while joining (before the consume clock started).
    early: usize,
}

impl RawKafka {
    /// A run against `brokers` (`host:port,…`).
    pub fn new(brokers: &str) -> Self {
        RawKafka {
            brokers: brokers.to_owned(),
            topic: unique("raw"),
            producer: None,
            consumer: None,
            early: 0,
        }
    }

    fn config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        config
    }
}

#[async_trait]
impl Way for RawKafka {
    async fn prepare(&mut self, work: &Workload) -> Result<()> {
        let admin: AdminClient<DefaultClientContext> = self.config().create()?;
        let topic = NewTopic::new(&self.topic, PARTITIONS, TopicReplication::Fixed(1));
        for result in admin.create_topics([&topic], &AdminOptions::new()).await? {
            if let Err((name, code)) = result {
                bail!("creating topic {name}: {code}");
            }
        }
        let producer: FutureProducer = self
            .config()
            .set("acks", "all")
            .set("enable.idempotence", "true")
            // polybus's producer settings, so the ratio compares the same guarantees and timers.
            .set("linger.ms", "0")
            .set("socket.nagle.disable", "true")
            .set("message.timeout.ms", "30000")
            .create()?;
        // Connected and knowing the topic before the clock starts, as polybus's long-lived
        // producer is (a fresh producer's first send waits for both: ~0.5 s).
        let warm = producer.clone();
        let topic = self.topic.clone();
        tokio::task::spawn_blocking(move || {
            warm.client().fetch_metadata(Some(&topic), Duration::from_secs(10))
        })
        .await??;
        self.producer = Some(producer);
        if !work.cold {
            self.join(work).await?;
        }
        Ok(())
    }

    async fn join(&mut self, _work: &Workload) -> Result<()> {
        if self.consumer.is_some() {
            return Ok(());
        }
        let consumer: StreamConsumer = self
            .config()
            .set("group.id", "g")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "500")
            .set("fetch.queue.backoff.ms", "50")
            .create()?;
        consumer.subscribe(&[&self.topic])?;
        // Joined before the clock starts, as polybus's subscribe is. A message received while
        // waiting (a cold run's backlog) counts as consumed.
        let joined = tokio::time::Instant::now() + Duration::from_secs(30);
        while consumer.assignment()?.count() == 0 {
            if tokio::time::Instant::now() > joined {
                bail!("no partitions assigned within 30 s");
            }
            if let Ok(received) = tokio::time::timeout(Duration::from_millis(100), consumer.recv()).await {
                let message = received?;
                consumer.store_offset(message.topic(), message.partition(), message.offset())?;
                self.early += 1;
            }
        }
        self.consumer = Some(consumer);
        Ok(())
    }

    async fn publish_batch(&mut self, work: &Workload, n: usize) -> Result<()> {
        let Some(producer) = self.producer.as_ref() else { bail!("not prepared") };
        let mut deliveries = Vec::with_capacity(n);
        for _ in 0..n {
            let record = FutureRecord::<(), [u8]>::to(&self.topic).payload(&work.payload[..]);
            match producer.send_result(record) {
                Ok(delivery) => deliveries.push(delivery),
                Err((e, _)) => bail!("enqueueing: {e}"),
            }
        }
        for delivery in deliveries {
            if let Err((e, _)) = delivery.await? {
                bail!("delivery: {e}");
            }
        }
        Ok(())
    }

    async fn consume(&mut self, work: &Workload) -> Result<()> {
        let Some(consumer) = self.consumer.as_ref() else { bail!("not prepared") };
        for i in (1 + self.early)..=work.messages {
            let message = consumer.recv().await?;
            consumer.store_offset(message.topic(), message.partition(), message.offset())?;
            if i % COMMIT_EVERY == 0 {
                consumer.commit_consumer_state(CommitMode::Async)?;
            }
        }
        match consumer.commit_consumer_state(CommitMode::Sync) {
            // Every stored offset is committed already (by the last asynchronous commit).
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => Ok(()),
            other => Ok(other?),
        }
    }

    async fn cleanup(&mut self) -> Result<()> {
        self.producer = None;
        // Dropping a consumer blocks while it leaves its group: off the runtime.
        if let Some(consumer) = self.consumer.take() {
            tokio::task::spawn_blocking(move || drop(consumer)).await?;
        }
        let admin: AdminClient<DefaultClientContext> = self.config().create()?;
        let options = AdminOptions::new().operation_timeout(Some(Timeout::After(Duration::from_secs(10))));
        admin.delete_topics(&[&self.topic], &options).await?;
        Ok(())
    }
}
