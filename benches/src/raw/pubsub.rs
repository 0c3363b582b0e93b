//! Raw `gcloud-pubsub` (the client polybus's adapter pulls with): its batching publisher, every
//! message's publish awaited, and unary pulls of up to 1,000 with one acknowledge per pull, on
//! a subscription made for the run the way the adapter makes a group's.

use anyhow::{Result, anyhow, bail};
use async_trait::async_trait;
use gcloud_gax::conn::Environment;
use gcloud_googleapis::pubsub::v1::{DeadLetterPolicy, PubsubMessage};
use gcloud_pubsub::client::{Client, ClientConfig};
use gcloud_pubsub::publisher::{Publisher, PublisherConfig};
use gcloud_pubsub::subscription::{Subscription, SubscriptionConfig};
use tokio::task::JoinSet;

use crate::way::{Way, Workload, unique, wait_below};

/// Most messages one pull asks for: the adapter's.
const MAX_PULL: usize = 1000;

/// One raw Pub/Sub run against the emulator.
pub struct RawPubsub {
    emulator: String,
    project: String,
    name: String,
    client: Option<Client>,
    publisher: Option<Publisher>,
    subscription: Option<Subscription>,
}

impl RawPubsub {
    /// A run against the emulator at `emulator` (`host:port`) in `project`.
    pub fn new(emulator: &str, project: &str) -> Self {
        RawPubsub {
            emulator: emulator.to_owned(),
            project: project.to_owned(),
            name: unique("raw"),
            client: None,
            publisher: None,
            subscription: None,
        }
    }
}

#[async_trait]
impl Way for RawPubsub {
    async fn prepare(&mut self, work: &Workload) -> Result<()> {
        let config = ClientConfig {
            project_id: Some(self.project.clone()),
            environment: Environment::Emulator(self.emulator.clone()),
            ..ClientConfig::default()
        };
        let client = Client::new(config).await?;
        let topic = client.create_topic(&self.name, None, None).await?;
        client.create_topic(&format!("{}-dlq", self.name), None, None).await?;
        // As the adapter makes a group's subscription: ordered, and with a dead-letter policy set
        // high only so Pub/Sub counts delivery attempts.
        let config = SubscriptionConfig {
            ack_deadline_seconds: 30,
            enable_message_ordering: true,
            dead_letter_policy: Some(DeadLetterPolicy {
                dead_letter_topic: client.fully_qualified_topic_name(&format!("{}-dlq", self.name)),
                max_delivery_attempts: 100,
            }),
            ..SubscriptionConfig::default()
        };
        let subscription =
            client.create_subscription(&format!("{}--g", self.name), &self.name, config, None).await?;
        // One by one, the publisher sends each message at once instead of waiting out its 100 ms
        // bundling timer (the adapter's publisher is flushed after every publish for the same reason).
        let config =
            (work.batch == 1).then(|| PublisherConfig { bundle_size: 1, ..PublisherConfig::default() });
        self.publisher = Some(topic.new_publisher(config));
        self.subscription = Some(subscription);
        self.client = Some(client);
        Ok(())
    }

    async fn publish_batch(&mut self, work: &Workload, n: usize) -> Result<()> {
        let Some(publisher) = self.publisher.as_ref() else { bail!("not prepared") };
        let messages = (0..n)
            .map(|_| PubsubMessage { data: work.payload.to_vec(), ..PubsubMessage::default() })
            .collect();
        for awaiter in publisher.publish_bulk(messages).await {
            awaiter.get().await?;
        }
        Ok(())
    }

    async fn consume(&mut self, work: &Workload) -> Result<()> {
        let Some(subscription) = self.subscription.as_ref() else { bail!("not prepared") };
        let mut received = 0;
        let mut acks = JoinSet::new();
        while received < work.messages {
            let want = (work.messages - received).min(work.prefetch).min(MAX_PULL);
            let pulled = subscription.pull(want as i32, None).await?;
            received += pulled.len();
            let ids: Vec<String> = pulled.iter().map(|m| m.ack_id().to_owned()).collect();
            if ids.is_empty() {
                continue;
            }
            let subscription = subscription.clone();
            acks.spawn(async move { subscription.ack(ids).await.map_err(|e| anyhow!("acknowledge: {e}")) });
            wait_below(&mut acks, 1).await?;
        }
        wait_below(&mut acks, 0).await?;
        Ok(())
    }

    async fn cleanup(&mut self) -> Result<()> {
        if let Some(mut publisher) = self.publisher.take() {
            publisher.shutdown().await;
        }
        if let Some(subscription) = self.subscription.take() {
            subscription.delete(None).await?;
        }
        if let Some(client) = self.client.take() {
            client.topic(&self.name).delete(None).await?;
            client.topic(&format!("{}-dlq", self.name)).delete(None).await?;
        }
        Ok(())
    }
}
