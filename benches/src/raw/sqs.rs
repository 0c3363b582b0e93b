//! Raw `aws-sdk-sqs`: one standard queue, `SendMessageBatch` of 10 with up to 4 calls in flight,
//! long-polled `ReceiveMessage` of 10 and one `DeleteMessageBatch` per receive, as polybus's
//! adapter does for a group's queue.

use anyhow::{Context, Result, bail};
use async_trait::async_trait;
use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, SendMessageBatchRequestEntry};
use tokio::task::JoinSet;

use crate::way::{Way, Workload, unique, wait_below};

/// Most entries of one SQS batch call.
const SQS_BATCH: usize = 10;
/// Send calls in flight at once: the adapter's.
const SEND_IN_FLIGHT: usize = 4;
/// Delete calls in flight at once: the adapter's.
const DELETE_IN_FLIGHT: usize = 2;

/// A client for the SQS endpoint at `endpoint` (moto here) with static test credentials.
pub async fn client(endpoint: &str) -> Client {
    let shared = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "polybus-bench"))
        .endpoint_url(endpoint)
        .load()
        .await;
    Client::new(&shared)
}

/// One raw SQS run.
pub struct RawSqs {
    endpoint: String,
    name: String,
    client: Option<Client>,
    url: Option<String>,
}

impl RawSqs {
    /// A run against the SQS endpoint `endpoint`.
    pub fn new(endpoint: &str) -> Self {
        RawSqs { endpoint: endpoint.to_owned(), name: unique("raw"), client: None, url: None }
    }

    fn parts(&self) -> Result<(&Client, &str)> {
        match (&self.client, &self.url) {
            (Some(client), Some(url)) => Ok((client, url)),
            _ => bail!("not prepared"),
        }
    }
}

#[async_trait]
impl Way for RawSqs {
    async fn prepare(&mut self, _work: &Workload) -> Result<()> {
        let client = client(&self.endpoint).await;
        let created = client.create_queue().queue_name(&self.name).send().await?;
        self.url = Some(created.queue_url().context("CreateQueue returned no URL")?.to_owned());
        self.client = Some(client);
        Ok(())
    }

    async fn publish_batch(&mut self, work: &Workload, n: usize) -> Result<()> {
        let (client, url) = self.parts()?;
        let body = String::from_utf8(work.payload.to_vec())?;
        let mut sends = JoinSet::new();
        for start in (0..n).step_by(SQS_BATCH) {
            let entries = (start..n.min(start + SQS_BATCH))
                .map(|i| {
                    SendMessageBatchRequestEntry::builder().id(i.to_string()).message_body(&body).build()
                })
                .collect::<Result<Vec<_>, _>>()?;
            let (client, url) = (client.clone(), url.to_owned());
            sends.spawn(async move {
                let sent =
                    client.send_message_batch().queue_url(url).set_entries(Some(entries)).send().await?;
                if !sent.failed().is_empty() {
                    bail!("{} messages of a batch were refused", sent.failed().len());
                }
                anyhow::Ok(())
            });
            wait_below(&mut sends, SEND_IN_FLIGHT - 1).await?;
        }
        // A batch counts once every message in it is confirmed, as for the other ways.
        wait_below(&mut sends, 0).await
    }

    async fn consume(&mut self, work: &Workload) -> Result<()> {
        let (client, url) = self.parts()?;
        let mut received = 0;
        let mut deletes = JoinSet::new();
        while received < work.messages {
            let got = client
                .receive_message()
                .queue_url(url)
                .max_number_of_messages(SQS_BATCH as i32)
                .wait_time_seconds(1)
                .send()
                .await?;
            let entries = got
                .messages()
                .iter()
                .enumerate()
                .filter_map(|(i, m)| {
                    let handle = m.receipt_handle()?;
                    DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(handle)
                        .build()
                        .ok()
                })
                .collect::<Vec<_>>();
            if entries.is_empty() {
                continue;
            }
            received += entries.len();
            let (client, url) = (client.clone(), url.to_owned());
            deletes.spawn(async move {
                let deleted =
                    client.delete_message_batch().queue_url(url).set_entries(Some(entries)).send().await?;
                if !deleted.failed().is_empty() {
                    bail!("{} deletes of a batch failed", deleted.failed().len());
                }
                anyhow::Ok(())
            });
            wait_below(&mut deletes, DELETE_IN_FLIGHT - 1).await?;
        }
        wait_below(&mut deletes, 0).await?;
        Ok(())
    }

    async fn cleanup(&mut self) -> Result<()> {
        if let (Some(client), Some(url)) = (self.client.take(), self.url.take()) {
            client.delete_queue().queue_url(url).send().await?;
        }
        Ok(())
    }
}
