//! Coalesces concurrent requests to one queue into SQS batch calls.
//!
//! Every request waits for its own answer. A batcher has a few calls under way at most;
//! whatever queued up meanwhile goes out together (up to 10 entries and 256 KiB per call), so
//! a lone request pays no delay and a busy queue makes a fraction of the calls.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

/// Entries SQS takes in one batch call.
pub const MAX_ENTRIES: usize = 10;

/// One request and where its answer goes.
pub struct Job<T, R> {
    /// What to do.
    pub item: T,
    /// Where the answer goes.
    pub done: oneshot::Sender<R>,
}

impl<T, R> Job<T, R> {
    /// Answers the request (its requester may have given up: that is fine).
    pub fn answer(self, result: R) {
        let _ = self.done.send(result);
    }
}

/// Sends requests through a task that batches them; cheap to clone, ends with the last clone.
pub struct Batcher<T, R> {
    tx: mpsc::UnboundedSender<Job<T, R>>,
}

impl<T, R> Clone for Batcher<T, R> {
    fn clone(&self) -> Self {
        Batcher { tx: self.tx.clone() }
    }
}

impl<T: Send + 'static, R: Send + 'static> Batcher<T, R> {
    /// Starts a batcher with at most `in_flight` calls under way: `flush` gets each batch (at
    /// most `max_weight` by `weight`, one request always fitting) and answers every job in it.
    pub fn spawn<W, F, Fut>(in_flight: usize, max_weight: usize, weight: W, flush: F) -> Self
    where
        W: Fn(&T) -> usize + Send + 'static,
        F: Fn(Vec<Job<T, R>>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(rx, in_flight, max_weight, weight, flush));
        Batcher { tx }
    }

    /// Submits `item`; `None` when the batcher's task is gone.
    pub async fn submit(&self, item: T) -> Option<R> {
        let (done, answer) = oneshot::channel();
        self.tx.send(Job { item, done }).ok()?;
        answer.await.ok()
    }
}

async fn run<T, R, W, F, Fut>(
    mut rx: mpsc::UnboundedReceiver<Job<T, R>>,
    in_flight: usize,
    max_weight: usize,
    weight: W,
    flush: F,
) where
    T: Send + 'static,
    R: Send + 'static,
    W: Fn(&T) -> usize,
    F: Fn(Vec<Job<T, R>>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let in_flight = Arc::new(Semaphore::new(in_flight.max(1)));
    let mut carried: Option<Job<T, R>> = None;
    loop {
        let first = match carried.take() {
            Some(job) => job,
            None => match rx.recv().await {
                Some(job) => job,
                None => return,
            },
        };
        let Ok(permit) = in_flight.clone().acquire_owned().await else { return };
        let mut total = weight(&first.item);
        let mut batch = vec![first];
        while batch.len() < MAX_ENTRIES {
            let Ok(job) = rx.try_recv() else { break };
            let w = weight(&job.item);
            if total + w > max_weight {
                carried = Some(job);
                break;
            }
            total += w;
            batch.push(job);
        }
        let call = flush(batch);
        tokio::spawn(async move {
            call.await;
            drop(permit);
        });
    }
}
