//! Acks and nacks of one queue: `DeleteMessage` / `ChangeMessageVisibility`, batched when
//! they come faster than SQS answers (see [`crate::batcher`]).

use std::collections::HashMap;
use std::sync::Arc;

use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::{
    BatchResultErrorEntry, ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
};
use polybus_core::{Error, Op, Result};

use crate::batcher::{Batcher, Job};
use crate::fail;
use crate::names::queue_name;

/// What to do with a received message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Delete it (ack).
    Delete,
    /// Make it visible again after this many seconds (nack), or keep it hidden that long.
    Release(i32),
}

/// Settle calls under way at once per queue: acks arriving meanwhile wait and go out together.
const IN_FLIGHT: usize = 2;

type SettleJob = Job<(String, Settle), Result<()>>;

/// Settles messages received from one queue; cheap to clone, ends when the last clone is dropped.
#[derive(Clone)]
pub struct Settler {
    batcher: Batcher<(String, Settle), Result<()>>,
    queue: Arc<str>,
}

impl Settler {
    /// Starts the settler of the queue at `url`.
    pub fn spawn(client: Client, url: String) -> Settler {
        let queue: Arc<str> = queue_name(&url).into();
        let target = queue.clone();
        let batcher = Batcher::spawn(
            IN_FLIGHT,
            usize::MAX,
            |_| 0,
            move |jobs: Vec<SettleJob>| {
                let (client, url, queue) = (client.clone(), url.clone(), target.clone());
                async move {
                    let (deletes, releases): (Vec<_>, Vec<_>) =
                        jobs.into_iter().partition(|job| job.item.1 == Settle::Delete);
                    tokio::join!(
                        delete(&client, &url, &queue, deletes),
                        release(&client, &url, &queue, releases)
                    );
                }
            },
        );
        Settler { batcher, queue }
    }

    /// Deletes or releases the message with `receipt`; returns once SQS answered.
    pub async fn settle(&self, receipt: String, action: Settle) -> Result<()> {
        self.batcher
            .submit((receipt, action))
            .await
            .unwrap_or_else(|| Err(Error::Closed(format!("sqs {}: settling stopped", self.queue))))
    }
}

async fn delete(client: &Client, url: &str, queue: &str, mut jobs: Vec<SettleJob>) {
    if jobs.len() <= 1 {
        let Some(job) = jobs.pop() else { return };
        let result = client.delete_message().queue_url(url).receipt_handle(&job.item.0).send().await;
        job.answer(result.map(drop).map_err(|e| fail::sqs(Op::Ack, queue, e)));
        return;
    }
    let entries = jobs
        .iter()
        .enumerate()
        .map(|(i, job)| {
            DeleteMessageBatchRequestEntry::builder().id(i.to_string()).receipt_handle(&job.item.0).build()
        })
        .collect::<Result<Vec<_>, _>>();
    let answer = match entries {
        Ok(entries) => client
            .delete_message_batch()
            .queue_url(url)
            .set_entries(Some(entries))
            .send()
            .await
            .map(|out| refused(out.failed()))
            .map_err(fail::context),
        Err(e) => Err(fail::context(e)),
    };
    answer_all(jobs, answer, Op::Ack, queue);
}

async fn release(client: &Client, url: &str, queue: &str, mut jobs: Vec<SettleJob>) {
    let seconds = |job: &SettleJob| match job.item.1 {
        Settle::Release(s) => s,
        Settle::Delete => 0,
    };
    if jobs.len() <= 1 {
        let Some(job) = jobs.pop() else { return };
        let result = client
            .change_message_visibility()
            .queue_url(url)
            .receipt_handle(&job.item.0)
            .visibility_timeout(seconds(&job))
            .send()
            .await;
        job.answer(result.map(drop).map_err(|e| fail::sqs(Op::Nack, queue, e)));
        return;
    }
    let entries = jobs
        .iter()
        .enumerate()
        .map(|(i, job)| {
            ChangeMessageVisibilityBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(&job.item.0)
                .visibility_timeout(seconds(job))
                .build()
        })
        .collect::<Result<Vec<_>, _>>();
    let answer = match entries {
        Ok(entries) => client
            .change_message_visibility_batch()
            .queue_url(url)
            .set_entries(Some(entries))
            .send()
            .await
            .map(|out| refused(out.failed()))
            .map_err(fail::context),
        Err(e) => Err(fail::context(e)),
    };
    answer_all(jobs, answer, Op::Nack, queue);
}

/// Batch entry id → why SQS refused that entry.
pub fn refused(failed: &[BatchResultErrorEntry]) -> HashMap<String, String> {
    failed
        .iter()
        .map(|f| (f.id().to_owned(), format!("{}: {}", f.code(), f.message().unwrap_or_default())))
        .collect()
}

/// Tells every job of a batch its outcome: the call's error, or its own entry's.
fn answer_all(jobs: Vec<SettleJob>, answer: Result<HashMap<String, String>, String>, op: Op, queue: &str) {
    for (i, job) in jobs.into_iter().enumerate() {
        let why = match &answer {
            Ok(refused) => refused.get(&i.to_string()),
            Err(why) => Some(why),
        };
        job.answer(why.map_or(Ok(()), |why| Err(Error::transport(op, format!("sqs {queue}"), why))));
    }
}
