//! The workload through `omniqueue` 0.3, the Rust peer, on Redis Streams, RabbitMQ and SQS.
//!
//! omniqueue has no batched send on these backends (its `send_raw_batch` sends one by one), so a
//! batch is sent as concurrent `send_raw` calls: its best case.

use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use async_trait::async_trait;
use futures::future::try_join_all;
use omniqueue::Delivery;
use omniqueue::backends::rabbitmq::{
    BasicConsumeOptions, BasicProperties, BasicPublishOptions, ConnectionProperties, FieldTable,
};
use omniqueue::backends::{
    RabbitMqBackend, RabbitMqConfig, RabbitMqConsumer, RabbitMqProducer, RedisBackend, RedisConfig,
    SqsBackend, SqsConsumer, SqsProducer,
};
use omniqueue::{QueueConsumer, QueueProducer};

use crate::way::{Way, Workload, unique};

type RedisPair = (
    omniqueue::backends::RedisProducer<omniqueue::backends::redis::RedisConnectionManager>,
    omniqueue::backends::RedisConsumer<omniqueue::backends::redis::RedisConnectionManager>,
);

/// One omniqueue run on Redis Streams.
pub struct OmniRedis {
    url: String,
    stream: String,
    pair: Option<RedisPair>,
}

impl OmniRedis {
    /// A run against `url`.
    pub fn new(url: &str) -> Self {
        OmniRedis { url: url.to_owned(), stream: unique("omni"), pair: None }
    }
}

/// Sends one batch of `n` as concurrent `send_raw` calls (for backends whose batch send goes
/// one by one).
async fn send_each(
    producer: &impl QueueProducer<Payload = Vec<u8>>,
    work: &Workload,
    n: usize,
) -> Result<()> {
    let payload = work.payload.to_vec();
    let payload = &payload;
    try_join_all((0..n).map(|_| producer.send_raw(payload))).await.map(drop).map_err(|e| anyhow!("{e}"))
}

/// Receives and acks `messages` messages, at most `max` per `receive_all` waiting up to `wait`.
async fn receive_and_ack(
    consumer: &mut impl QueueConsumer,
    messages: usize,
    max: usize,
    wait: Duration,
) -> Result<()> {
    let mut received = 0;
    while received < messages {
        let deliveries =
            consumer.receive_all(max.min(messages - received), wait).await.map_err(|e| anyhow!("{e}"))?;
        received += deliveries.len();
        ack_all(deliveries).await?;
    }
    Ok(())
}

async fn ack_all(deliveries: Vec<Delivery>) -> Result<()> {
    try_join_all(
        deliveries.into_iter().map(|d| async move { d.ack().await.map_err(|(e, _)| anyhow!("{e}")) }),
    )
    .await?;
    Ok(())
}

#[async_trait]
impl Way for OmniRedis {
    async fn prepare(&mut self, _work: &Workload) -> Result<()> {
        let mut conn = redis::Client::open(self.url.as_str())?.get_multiplexed_async_connection().await?;
        redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.stream)
            .arg("g")
            .arg("0")
            .arg("MKSTREAM")
            .query_async::<()>(&mut conn)
            .await?;
        let config = RedisConfig {
            dsn: self.url.clone(),
            max_connections: 8,
            reinsert_on_nack: false,
            queue_key: self.stream.clone(),
            delayed_queue_key: format!("{}:delayed", self.stream),
            delayed_lock_key: format!("{}:delayed-lock", self.stream),
            consumer_group: "g".into(),
            consumer_name: "omni".into(),
            payload_key: "payload".into(),
            ack_deadline_ms: 30_000,
            dlq_config: None,
            sentinel_config: None,
        };
        self.pair = Some(RedisBackend::builder(config).build_pair().await.map_err(|e| anyhow!("{e}"))?);
        Ok(())
    }

    async fn publish_batch(&mut self, work: &Workload, n: usize) -> Result<()> {
        let Some((producer, _)) = self.pair.as_ref() else { bail!("not prepared") };
        send_each(producer, work, n).await
    }

    async fn consume(&mut self, work: &Workload) -> Result<()> {
        let Some((_, consumer)) = self.pair.as_mut() else { bail!("not prepared") };
        receive_and_ack(consumer, work.messages, work.prefetch, Duration::from_millis(100)).await
    }

    async fn cleanup(&mut self) -> Result<()> {
        self.pair = None;
        let mut conn = redis::Client::open(self.url.as_str())?.get_multiplexed_async_connection().await?;
        redis::cmd("DEL").arg(&self.stream).query_async::<()>(&mut conn).await?;
        Ok(())
    }
}

/// One omniqueue run on RabbitMQ: the exchange and the quorum queue are declared with lapin
/// first (omniqueue declares nothing), as for polybus and the raw client.
pub struct OmniRabbitmq {
    url: String,
    raw: crate::raw::rabbitmq::RawRabbitmq,
    pair: Option<(RabbitMqProducer, RabbitMqConsumer)>,
}

impl OmniRabbitmq {
    /// A run against `url`.
    pub fn new(url: &str) -> Self {
        OmniRabbitmq { url: url.to_owned(), raw: crate::raw::rabbitmq::RawRabbitmq::new(url), pair: None }
    }
}

#[async_trait]
impl Way for OmniRabbitmq {
    async fn prepare(&mut self, work: &Workload) -> Result<()> {
        let (exchange, routing_key, queue) = self.raw.declare(work).await?;
        let config = RabbitMqConfig {
            uri: self.url.clone(),
            connection_properties: ConnectionProperties::default(),
            publish_exchange: exchange,
            publish_routing_key: routing_key,
            publish_options: BasicPublishOptions::default(),
            publish_properties: BasicProperties::default().with_delivery_mode(2),
            consume_queue: queue,
            consumer_tag: "omni".into(),
            consume_options: BasicConsumeOptions::default(),
            consume_arguments: FieldTable::default(),
            consume_prefetch_count: Some(work.prefetch.min(u16::MAX as usize) as u16),
            requeue_on_nack: true,
        };
        self.pair = Some(RabbitMqBackend::builder(config).build_pair().await.map_err(|e| anyhow!("{e}"))?);
        Ok(())
    }

    async fn publish_batch(&mut self, work: &Workload, n: usize) -> Result<()> {
        let Some((producer, _)) = self.pair.as_ref() else { bail!("not prepared") };
        send_each(producer, work, n).await
    }

    async fn consume(&mut self, work: &Workload) -> Result<()> {
        let Some((_, consumer)) = self.pair.as_mut() else { bail!("not prepared") };
        receive_and_ack(consumer, work.messages, work.prefetch, Duration::from_millis(100)).await
    }

    async fn cleanup(&mut self) -> Result<()> {
        self.pair = None;
        self.raw.cleanup().await
    }
}

/// One omniqueue run on SQS: the queue is made with `aws-sdk-sqs` first, and omniqueue is given
/// the same client config (endpoint, region, credentials).
pub struct OmniSqs {
    endpoint: String,
    name: String,
    url: Option<(aws_sdk_sqs::Client, String)>,
    pair: Option<(SqsProducer, SqsConsumer)>,
}

impl OmniSqs {
    /// A run against the SQS endpoint `endpoint`.
    pub fn new(endpoint: &str) -> Self {
        OmniSqs { endpoint: endpoint.to_owned(), name: unique("omni"), url: None, pair: None }
    }
}

#[async_trait]
impl Way for OmniSqs {
    async fn prepare(&mut self, _work: &Workload) -> Result<()> {
        let client = crate::raw::sqs::client(&self.endpoint).await;
        let created = client.create_queue().queue_name(&self.name).send().await?;
        let url = created.queue_url().ok_or_else(|| anyhow!("CreateQueue returned no URL"))?.to_owned();
        let builder = SqsBackend::builder(url.as_str()).sqs_config(client.config().clone());
        self.pair = Some(builder.build_pair().await.map_err(|e| anyhow!("{e}"))?);
        self.url = Some((client, url));
        Ok(())
    }

    async fn publish_batch(&mut self, work: &Workload, n: usize) -> Result<()> {
        let Some((producer, _)) = self.pair.as_ref() else { bail!("not prepared") };
        // omniqueue's batch takes items that are `AsRef<String>`: a shared body does.
        let body = std::sync::Arc::new(String::from_utf8(work.payload.to_vec())?);
        producer.send_raw_batch((0..n).map(|_| body.clone())).await.map_err(|e| anyhow!("{e}"))
    }

    async fn consume(&mut self, work: &Workload) -> Result<()> {
        let Some((_, consumer)) = self.pair.as_mut() else { bail!("not prepared") };
        // SQS returns at most 10 messages per receive.
        receive_and_ack(consumer, work.messages, 10, Duration::from_secs(1)).await
    }

    async fn cleanup(&mut self) -> Result<()> {
        self.pair = None;
        if let Some((client, url)) = self.url.take() {
            client.delete_queue().queue_url(url).send().await?;
        }
        Ok(())
    }
}
