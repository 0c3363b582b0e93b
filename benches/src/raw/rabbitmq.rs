//! Raw `lapin`: persistent publishes with publisher confirms, a quorum queue, manual acks.

use anyhow::{Result, bail};
use async_trait::async_trait;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};

use crate::way::{Way, Workload, unique};

const EXCHANGE: &str = "polybus-bench-raw";

/// One raw RabbitMQ run.
pub struct RawRabbitmq {
    url: String,
    routing_key: String,
    queue: String,
    connection: Option<Connection>,
    publisher: Option<Channel>,
    consumer: Option<(Channel, Option<Consumer>)>,
}

impl RawRabbitmq {
    /// A run against `url` (`amqp://user:pass@host:port/vhost`).
    pub fn new(url: &str) -> Self {
        let routing_key = unique("raw");
        let queue = format!("{routing_key}--g");
        RawRabbitmq {
            url: url.to_owned(),
            routing_key,
            queue,
            connection: None,
            publisher: None,
            consumer: None,
        }
    }
}

impl RawRabbitmq {
    /// Connects, declares the exchange and this run's quorum queue bound to it; returns
    /// (exchange, routing key, queue).
    pub async fn declare(&mut self, _work: &Workload) -> Result<(String, String, String)> {
        let connection = Connection::connect(&self.url, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
        channel
            .exchange_declare(EXCHANGE.into(), ExchangeKind::Topic, durable, FieldTable::default())
            .await?;
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        let durable = QueueDeclareOptions { durable: true, ..Default::default() };
        channel.queue_declare(self.queue.as_str().into(), durable, args).await?;
        channel
            .queue_bind(
                self.queue.as_str().into(),
                EXCHANGE.into(),
                self.routing_key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        self.connection = Some(connection);
        self.consumer = Some((channel, None));
        Ok((EXCHANGE.to_owned(), self.routing_key.clone(), self.queue.clone()))
    }
}

#[async_trait]
impl Way for RawRabbitmq {
    async fn prepare(&mut self, work: &Workload) -> Result<()> {
        self.declare(work).await?;
        let Some(connection) = self.connection.as_ref() else { bail!("not connected") };
        let publisher = connection.create_channel().await?;
        publisher.confirm_select(ConfirmSelectOptions::default()).await?;
        let Some((channel, _)) = self.consumer.take() else { bail!("not declared") };
        channel.basic_qos(work.prefetch.min(u16::MAX as usize) as u16, BasicQosOptions::default()).await?;
        let consumer = channel
            .basic_consume(
                self.queue.as_str().into(),
                "raw".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        self.publisher = Some(publisher);
        self.consumer = Some((channel, Some(consumer)));
        Ok(())
    }

    async fn publish_batch(&mut self, work: &Workload, n: usize) -> Result<()> {
        let Some(channel) = self.publisher.as_ref() else { bail!("not prepared") };
        let properties = BasicProperties::default().with_delivery_mode(2);
        let mut confirms = Vec::with_capacity(n);
        for _ in 0..n {
            confirms.push(
                channel
                    .basic_publish(
                        EXCHANGE.into(),
                        self.routing_key.as_str().into(),
                        BasicPublishOptions::default(),
                        &work.payload,
                        properties.clone(),
                    )
                    .await?,
            );
        }
        for confirm in confirms {
            if confirm.await?.is_nack() {
                bail!("the broker refused a message");
            }
        }
        Ok(())
    }

    async fn consume(&mut self, work: &Workload) -> Result<()> {
        let Some((_, Some(consumer))) = self.consumer.as_mut() else { bail!("not prepared") };
        for _ in 0..work.messages {
            let Some(delivery) = consumer.next().await else { bail!("the consumer ended") };
            delivery?.ack(BasicAckOptions::default()).await?;
        }
        Ok(())
    }

    async fn cleanup(&mut self) -> Result<()> {
        if let Some((channel, _)) = self.consumer.take() {
            channel.queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default()).await?;
        }
        if let Some(connection) = self.connection.take() {
            connection.close(200, "done".into()).await?;
        }
        Ok(())
    }
}
