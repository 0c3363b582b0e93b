//! Raw `async-nats` JetStream: publishes with a `Nats-Msg-Id` (deduplicated, as polybus's are)
//! awaiting their acks, a durable pull consumer whose acks are confirmed by the server.

use anyhow::{Result, bail};
use async_nats::jetstream::{self, consumer, stream};
use async_trait::async_trait;
use futures::StreamExt;
use tokio::task::JoinSet;

use crate::way::{Way, Workload, unique, wait_below};

/// One raw NATS JetStream run.
pub struct RawNats {
    url: String,
    stream: String,
    subject: String,
    js: Option<jetstream::Context>,
    consumer: Option<consumer::PullConsumer>,
}

impl RawNats {
    /// A run against `url` (`nats://host:port`).
    pub fn new(url: &str) -> Self {
        let stream = unique("raw");
        let subject = format!("bench.{stream}");
        RawNats { url: url.to_owned(), stream, subject, js: None, consumer: None }
    }
}

#[async_trait]
impl Way for RawNats {
    async fn prepare(&mut self, work: &Workload) -> Result<()> {
        let js = jetstream::new(async_nats::connect(self.url.as_str()).await?);
        let created = js
            .create_stream(stream::Config {
                name: self.stream.clone(),
                subjects: vec![self.subject.clone()],
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await?;
        let consumer = created
            .create_consumer(consumer::pull::Config {
                durable_name: Some("g".into()),
                ack_policy: consumer::AckPolicy::Explicit,
                max_ack_pending: work.prefetch as i64,
                ..Default::default()
            })
            .await?;
        self.js = Some(js);
        self.consumer = Some(consumer);
        Ok(())
    }

    async fn publish_batch(&mut self, work: &Workload, n: usize) -> Result<()> {
        let Some(js) = self.js.as_ref() else { bail!("not prepared") };
        let mut acks = Vec::with_capacity(n);
        for _ in 0..n {
            // A message id, as the adapter sends, so JetStream deduplicates the same way.
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", uuid::Uuid::new_v4().simple().to_string().as_str());
            acks.push(js.publish_with_headers(self.subject.clone(), headers, work.payload.clone()).await?);
        }
        for ack in acks {
            ack.await?;
        }
        Ok(())
    }

    async fn consume(&mut self, work: &Workload) -> Result<()> {
        let Some(consumer) = self.consumer.as_ref() else { bail!("not prepared") };
        let mut messages = consumer.stream().max_messages_per_batch(work.prefetch).messages().await?;
        let mut acks = JoinSet::new();
        for _ in 0..work.messages {
            let Some(message) = messages.next().await else { bail!("the consumer ended") };
            let message = message.map_err(|e| anyhow::anyhow!("{e}"))?;
            acks.spawn(async move { message.double_ack().await.map_err(|e| anyhow::anyhow!("{e}")) });
            wait_below(&mut acks, work.prefetch.saturating_sub(1)).await?;
        }
        wait_below(&mut acks, 0).await?;
        Ok(())
    }

    async fn cleanup(&mut self) -> Result<()> {
        self.consumer = None;
        if let Some(js) = self.js.take() {
            js.delete_stream(&self.stream).await?;
        }
        Ok(())
    }
}
