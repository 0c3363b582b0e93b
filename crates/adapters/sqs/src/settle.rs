//! Acks and nacks of one queue: `DeleteMessage` / `ChangeMessageVisibility`, batched when
//! they come faster than SQS answers (see [`polybus_core::kit::coalesce`]).

use std::collections::HashMap;
use std::sync::Arc;

use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::{
    BatchResultErrorEntry, ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
};
use polybus_core::kit::coalesce::{Coalescer, Config};
use polybus_core::{Error, Op, Result};

use crate::MAX_ENTRIES;
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

/// Settles messages received from one queue; cheap to clone, ends when the last clone is dropped.
#[derive(Clone)]
pub struct Settler {
    settles: Coalescer<(String, Settle), Result<()>>,
    queue: Arc<str>,
}

impl Settler {
    /// Starts the settler of the queue at `url`.
    pub fn spawn(client: Client, url: String) -> Settler {
        let queue: Arc<str> = queue_name(&url).into();
        let target = queue.clone();
        let flush = move |batch: Vec<(String, Settle)>| {
            let (client, url, queue) = (client.clone(), url.clone(), target.clone());
            async move {
                let count = batch.len();
                let (deletes, releases): (Vec<_>, Vec<_>) =
                    batch.into_iter().enumerate().partition(|(_, (_, how))| *how == Settle::Delete);
                let (deleted, released) = tokio::join!(
                    delete(&client, &url, &queue, deletes),
                    release(&client, &url, &queue, releases)
                );
                // Back into the batch's order.
                let mut results: Vec<Option<Result<()>>> = (0..count).map(|_| None).collect();
                for (at, result) in deleted.into_iter().chain(released) {
                    results[at] = Some(result);
                }
                results.into_iter().map_while(|result| result).collect::<Vec<_>>()
            }
        };
        let settles = Coalescer::start(Config::new(MAX_ENTRIES).in_flight(IN_FLIGHT), flush);
        Settler { settles, queue }
    }

    /// Deletes or releases the message with `receipt`; returns once SQS answered.
    pub async fn settle(&self, receipt: String, action: Settle) -> Result<()> {
        self.settles
            .call((receipt, action))
            .await
            .unwrap_or_else(|_| Err(Error::Closed(format!("sqs {}: settling stopped", self.queue))))
    }
}

/// Settles of one batch with their place in it.
type Placed = Vec<(usize, (String, Settle))>;

async fn delete(client: &Client, url: &str, queue: &str, jobs: Placed) -> Vec<(usize, Result<()>)> {
    if let [(at, (receipt, _))] = jobs.as_slice() {
        let result = client.delete_message().queue_url(url).receipt_handle(receipt).send().await;
        return vec![(*at, result.map(drop).map_err(|e| fail::sqs(Op::Ack, queue, e)))];
    }
    if jobs.is_empty() {
        return Vec::new();
    }
    let entries = jobs
        .iter()
        .enumerate()
        .map(|(i, (_, (receipt, _)))| {
            DeleteMessageBatchRequestEntry::builder().id(i.to_string()).receipt_handle(receipt).build()
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
    answer_all(&jobs, answer, Op::Ack, queue)
}

async fn release(client: &Client, url: &str, queue: &str, jobs: Placed) -> Vec<(usize, Result<()>)> {
    let seconds = |how: &Settle| match how {
        Settle::Release(s) => *s,
        Settle::Delete => 0,
    };
    if let [(at, (receipt, how))] = jobs.as_slice() {
        let result = client
            .change_message_visibility()
            .queue_url(url)
            .receipt_handle(receipt)
            .visibility_timeout(seconds(how))
            .send()
            .await;
        return vec![(*at, result.map(drop).map_err(|e| fail::sqs(Op::Nack, queue, e)))];
    }
    if jobs.is_empty() {
        return Vec::new();
    }
    let entries = jobs
        .iter()
        .enumerate()
        .map(|(i, (_, (receipt, how)))| {
            ChangeMessageVisibilityBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(receipt)
                .visibility_timeout(seconds(how))
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
    answer_all(&jobs, answer, Op::Nack, queue)
}

/// Batch entry id → why SQS refused that entry.
pub fn refused(failed: &[BatchResultErrorEntry]) -> HashMap<String, String> {
    failed
        .iter()
        .map(|f| (f.id().to_owned(), format!("{}: {}", f.code(), f.message().unwrap_or_default())))
        .collect()
}

/// Each settle's outcome, at its place in the batch: the call's error, or its own entry's.
fn answer_all(
    jobs: &Placed,
    answer: Result<HashMap<String, String>, String>,
    op: Op,
    queue: &str,
) -> Vec<(usize, Result<()>)> {
    jobs.iter()
        .enumerate()
        .map(|(i, (at, _))| {
            let why = match &answer {
                Ok(refused) => refused.get(&i.to_string()),
                Err(why) => Some(why),
            };
            (*at, why.map_or(Ok(()), |why| Err(Error::transport(op, format!("sqs {queue}"), why))))
        })
        .collect()
}
