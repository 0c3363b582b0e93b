//! The consume loop: bounded concurrency, retry with exponential backoff, dead-letter after
//! the topic's `maxAttempts`, and graceful shutdown.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use polybus_core::{Message, Result, SubscribeOptions};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::bus::Bus;
use crate::delivery::{Delivery, Settled, Subscriber};
use crate::metrics::ConsumerMetrics;
use crate::telemetry::{self, Destination};

/// What a handler returns when it could not process a message.
///
/// Any error converts into one (`?`, `.into()`) and is retried with backoff; a
/// [`permanent`](HandlerError::permanent) one (a message that can never be processed) is
/// dead-lettered at once.
#[derive(Debug)]
pub struct HandlerError {
    error: Box<dyn std::error::Error + Send + Sync>,
    permanent: bool,
}

impl HandlerError {
    /// A failure that retrying cannot fix: the message is dead-lettered at once.
    pub fn permanent(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        HandlerError { error: error.into(), permanent: true }
    }

    /// A failure worth retrying (what any error converts into).
    pub fn transient(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        HandlerError { error: error.into(), permanent: false }
    }

    /// True when the message should be dead-lettered without further attempts.
    pub fn is_permanent(&self) -> bool {
        self.permanent
    }

    /// The handler's error.
    pub fn get_ref(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.error
    }
}

impl<E: Into<Box<dyn std::error::Error + Send + Sync>>> From<E> for HandlerError {
    fn from(error: E) -> Self {
        HandlerError::transient(error)
    }
}

impl std::fmt::Display for HandlerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

/// What a batch handler returns when messages of its batch could not be processed: all of
/// them (any error converts into this, `?`), or only some, by their index in the batch.
/// Each failed message is retried or dead-lettered on its own, as a [`HandlerError`] would
/// have it in the single form; the others are acked.
#[derive(Debug)]
pub struct BatchError {
    failed: Failed,
}

#[derive(Debug)]
enum Failed {
    All(HandlerError),
    Only(Vec<(usize, HandlerError)>),
}

impl BatchError {
    /// Every message of the batch failed with `error`.
    pub fn all(error: impl Into<HandlerError>) -> Self {
        BatchError { failed: Failed::All(error.into()) }
    }

    /// Only the messages at these indexes of the batch failed; the others are acked.
    pub fn only(failed: impl IntoIterator<Item = (usize, HandlerError)>) -> Self {
        BatchError { failed: Failed::Only(failed.into_iter().collect()) }
    }

    /// The error of the message at `index`, if it failed.
    fn of(&self, index: usize) -> Option<&HandlerError> {
        match &self.failed {
            Failed::All(error) => Some(error),
            Failed::Only(failed) => failed.iter().find(|(i, _)| *i == index).map(|(_, e)| e),
        }
    }
}

impl<E: Into<Box<dyn std::error::Error + Send + Sync>>> From<E> for BatchError {
    fn from(error: E) -> Self {
        BatchError::all(HandlerError::transient(error))
    }
}

/// How a consume loop runs.
#[derive(Debug, Clone)]
pub struct ConsumeOptions {
    /// Group, member name, prefetch and ack deadline.
    pub subscribe: SubscribeOptions,
    /// Messages handled at the same time.
    pub concurrency: usize,
    /// Delay before the first retry; doubled for each later attempt.
    pub retry_base: Duration,
    /// Longest delay between retries.
    pub retry_max: Duration,
    /// Most messages per call of a batch handler ([`Bus::consume_batch`]).
    pub batch_max: usize,
    /// How long a batch waits for more messages after its first (zero: it takes what is ready).
    pub batch_wait: Duration,
}

impl ConsumeOptions {
    /// Defaults for `group`: 8 at a time, retries after 1 s, 2 s, 4 s … up to 5 min; batches
    /// of what is ready, up to the prefetch (32).
    pub fn new(group: impl Into<String>) -> Self {
        let subscribe = SubscribeOptions::new(group);
        ConsumeOptions {
            concurrency: 8,
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            batch_max: subscribe.prefetch,
            batch_wait: Duration::ZERO,
            subscribe,
        }
    }

    /// Sets the most messages per batch (at least 1; prefetch grows to match) and how long a
    /// batch waits for more after its first message.
    pub fn batch(mut self, max: usize, wait: Duration) -> Self {
        self.batch_max = max.max(1);
        self.batch_wait = wait;
        self.subscribe.prefetch = self.subscribe.prefetch.max(self.batch_max);
        self
    }

    /// Sets the concurrency (at least 1); prefetch grows to match.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self.subscribe.prefetch = self.subscribe.prefetch.max(self.concurrency);
        self
    }

    /// Sets the retry backoff.
    pub fn retry(mut self, base: Duration, max: Duration) -> Self {
        self.retry_base = base;
        self.retry_max = max.max(base);
        self
    }

    /// Sets the ack deadline.
    pub fn ack_deadline(mut self, deadline: Duration) -> Self {
        self.subscribe.ack_deadline = deadline;
        self
    }

    /// The delay before retrying a message that failed on `attempt`.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(20));
        self.retry_base.saturating_mul(factor).min(self.retry_max)
    }
}

/// Counters of a consume loop.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConsumeStats {
    /// Handled successfully and acked.
    pub acked: u64,
    /// Failed and scheduled for retry.
    pub retried: u64,
    /// Sent to the dead-letter destination.
    pub dead_lettered: u64,
    /// Settling with the broker failed (the message will come back).
    pub settle_errors: u64,
}

/// The consume loop's counters, shared with its handler tasks.
#[derive(Default)]
struct Counters {
    acked: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    settle_errors: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> ConsumeStats {
        ConsumeStats {
            acked: self.acked.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            settle_errors: self.settle_errors.load(Ordering::Relaxed),
        }
    }
}

/// A running consume loop; [`shutdown`](Consumer::shutdown) stops it gracefully.
pub struct Consumer {
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<()>>,
    counters: Arc<Counters>,
}

impl Consumer {
    /// Counters so far.
    pub fn stats(&self) -> ConsumeStats {
        self.counters.snapshot()
    }

    /// Stops taking messages, finishes and settles those in flight, closes the subscription.
    pub async fn shutdown(self) -> Result<ConsumeStats> {
        let _ = self.stop.send(true);
        self.join().await
    }

    /// Waits until the loop ends by itself (its subscription closed).
    pub async fn join(self) -> Result<ConsumeStats> {
        match self.task.await {
            Ok(result) => result.map(|_| self.counters.snapshot()),
            Err(e) => Err(polybus_core::Error::Closed(format!("consume loop ended abnormally: {e}"))),
        }
    }
}

impl Bus {
    /// Runs `handler` for every message of `event` in `env` for `options.subscribe.group`.
    ///
    /// A handler error (or panic) retries the message with exponential backoff; on the topic's
    /// last attempt, or at once when the error is [`HandlerError::permanent`], it is
    /// dead-lettered with the error as reason.
    pub async fn consume<H, F>(
        &self,
        env: &str,
        event: &str,
        options: ConsumeOptions,
        handler: H,
    ) -> Result<Consumer>
    where
        H: Fn(Message) -> F + Send + Sync + 'static,
        F: Future<Output = std::result::Result<(), HandlerError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        self.start(env, event, options, None, move |mut deliveries, options, context| {
            let handler = handler.clone();
            Box::pin(async move {
                if let Some(delivery) = deliveries.pop() {
                    handle(delivery, handler, &options, &context).await;
                }
            })
        })
        .await
    }

    /// Runs `handler` for batches of messages of `event` in `env`: each call gets up to
    /// `options.batch_max` messages, those ready at once (or within `options.batch_wait`).
    ///
    /// The policy is the single form's, per message: `Ok` acks the whole batch (together, see
    /// [`Batch::ack_all`](crate::Batch::ack_all)); a [`BatchError`] retries with backoff, or
    /// dead-letters, each failed message by its own attempt count and acks the rest. A panic
    /// fails the whole batch. `options.concurrency` batches are handled at the same time.
    pub async fn consume_batch<H, F>(
        &self,
        env: &str,
        event: &str,
        options: ConsumeOptions,
        handler: H,
    ) -> Result<Consumer>
    where
        H: Fn(Vec<Message>) -> F + Send + Sync + 'static,
        F: Future<Output = std::result::Result<(), BatchError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let batch = Some((options.batch_max.max(1), options.batch_wait));
        self.start(env, event, options, batch, move |deliveries, options, context| {
            let handler = handler.clone();
            Box::pin(async move { handle_batch(deliveries, handler, &options, &context).await })
        })
        .await
    }

    async fn start<D>(
        &self,
        env: &str,
        event: &str,
        options: ConsumeOptions,
        batch: Option<(usize, Duration)>,
        dispatch: D,
    ) -> Result<Consumer>
    where
        D: Fn(Vec<Delivery>, Arc<ConsumeOptions>, Context) -> BoxFuture<'static, ()> + Send + 'static,
    {
        let subscriber = self.subscribe(env, event, options.subscribe.clone()).await?;
        let (broker_type, _) = self.topic_spec(env, event).await?;
        let destination = Arc::new(Destination {
            system: broker_type.to_string(),
            event: event.to_owned(),
            group: options.subscribe.group.clone(),
        });
        let (stop, stopped) = watch::channel(false);
        let counters = Arc::new(Counters::default());
        let metrics = subscriber.metrics();
        let context = Context { counters: counters.clone(), destination, metrics };
        let task = tokio::spawn(run(subscriber, options, batch, dispatch, stopped, context));
        Ok(Consumer { stop, task, counters })
    }
}

/// What every handling of a consumer shares: its counters and where its deliveries come from.
#[derive(Clone)]
struct Context {
    counters: Arc<Counters>,
    destination: Arc<Destination>,
    metrics: Arc<ConsumerMetrics>,
}

/// Takes deliveries (one, or a batch of up to `batch.0` gathering for `batch.1`) while a
/// concurrency slot is free, and hands each take to `dispatch` on a task of its own.
async fn run<D>(
    mut subscriber: Subscriber,
    options: ConsumeOptions,
    batch: Option<(usize, Duration)>,
    dispatch: D,
    mut stopped: watch::Receiver<bool>,
    context: Context,
) -> Result<()>
where
    D: Fn(Vec<Delivery>, Arc<ConsumeOptions>, Context) -> BoxFuture<'static, ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(options.concurrency));
    let options = Arc::new(options);
    let mut receive_failures = 0u32;
    loop {
        let permit = tokio::select! {
            _ = stopped.wait_for(|s| *s) => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        // Only the wait for a first delivery is raced against the stop (`next` is cancel-safe);
        // the gathering of a batch after it is not, so that nothing taken is dropped.
        let next = tokio::select! {
            _ = stopped.wait_for(|s| *s) => break,
            next = subscriber.next() => next,
        };
        let deliveries = match next {
            None => break,
            Some(Ok(first)) => {
                receive_failures = 0;
                let mut deliveries = vec![first];
                if let Some((max, wait)) = batch.filter(|(max, _)| *max > 1) {
                    match subscriber.next_ready(max - 1, wait).await {
                        Ok(more) => deliveries.extend(more),
                        Err(e) => tracing::warn!(error = %e, "receiving the rest of a batch failed"),
                    }
                }
                deliveries
            }
            Some(Err(e)) => {
                receive_failures += 1;
                let wait = Duration::from_millis(50u64 << receive_failures.min(7));
                tracing::warn!(error = %e, retry_in = ?wait, "receiving failed");
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        let work = dispatch(deliveries, options.clone(), context.clone());
        tokio::spawn(async move {
            work.await;
            drop(permit);
        });
    }
    // Wait for every in-flight handler to finish and settle.
    let _all = slots.acquire_many(options.concurrency as u32).await;
    subscriber.close().await
}

async fn handle<H, F>(delivery: Delivery, handler: Arc<H>, options: &ConsumeOptions, context: &Context)
where
    H: Fn(Message) -> F + Send + Sync + 'static,
    F: Future<Output = std::result::Result<(), HandlerError>> + Send + 'static,
{
    let message = delivery.message().clone();
    let span = telemetry::process_span(&context.destination, &message);
    let timer = HandlerTimer::start(&context.metrics);
    let outcome = match tokio::spawn(handler(message).instrument(span.clone())).await {
        Ok(result) => result,
        Err(e) => Err(format!("handler panicked: {e}").into()),
    };
    drop(timer);
    telemetry::outcome(&span, &outcome);
    settle(delivery, outcome.as_ref().err(), options, &context.counters).instrument(span).await;
}

async fn handle_batch<H, F>(
    deliveries: Vec<Delivery>,
    handler: Arc<H>,
    options: &ConsumeOptions,
    context: &Context,
) where
    H: Fn(Vec<Message>) -> F + Send + Sync + 'static,
    F: Future<Output = std::result::Result<(), BatchError>> + Send + 'static,
{
    let messages: Vec<Message> = deliveries.iter().map(|d| d.message().clone()).collect();
    let span = telemetry::process_batch_span(&context.destination, &messages);
    let timer = HandlerTimer::start(&context.metrics);
    let outcome = match tokio::spawn(handler(messages).instrument(span.clone())).await {
        Ok(result) => result,
        Err(e) => Err(BatchError::all(format!("handler panicked: {e}"))),
    };
    drop(timer);
    let failed = outcome.as_ref().err();
    if failed.is_some() {
        span.record("otel.status_code", "ERROR");
    }
    // Settled together, so that adapters coalescing settlements send few broker calls.
    let counters = &context.counters;
    let settling = deliveries
        .into_iter()
        .enumerate()
        .map(|(i, delivery)| settle(delivery, failed.and_then(|f| f.of(i)), options, counters));
    futures::future::join_all(settling).instrument(span).await;
}

/// Counts a handler call in flight while it lives, and records its time when dropped.
struct HandlerTimer<'a> {
    metrics: &'a ConsumerMetrics,
    started: std::time::Instant,
}

impl<'a> HandlerTimer<'a> {
    fn start(metrics: &'a ConsumerMetrics) -> Self {
        metrics.in_flight.increment(1.0);
        HandlerTimer { metrics, started: std::time::Instant::now() }
    }
}

impl Drop for HandlerTimer<'_> {
    fn drop(&mut self) {
        self.metrics.in_flight.decrement(1.0);
        self.metrics.handler_seconds.record(self.started.elapsed().as_secs_f64());
    }
}

/// Acks a processed message, or retries or dead-letters one that failed with `failed`.
async fn settle(
    delivery: Delivery,
    failed: Option<&HandlerError>,
    options: &ConsumeOptions,
    counters: &Counters,
) {
    let (id, attempt) = (delivery.id.clone(), delivery.attempt);
    let settled = match failed {
        None => delivery.ack().await.map(|_| &counters.acked),
        Some(e) => {
            let delay = options.backoff(attempt);
            match delivery.fail(e, Some(delay)).await {
                Ok(Settled::Retried) => {
                    tracing::info!(%id, attempt, retry_in = ?delay, error = %e, "handler failed; will retry");
                    Ok(&counters.retried)
                }
                Ok(Settled::DeadLettered) => {
                    tracing::info!(%id, attempt, error = %e, "handler failed; dead-lettered");
                    Ok(&counters.dead_lettered)
                }
                Err(e) => Err(e),
            }
        }
    };
    match settled {
        Ok(counter) => {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            counters.settle_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%id, error = %e, "settling a delivery failed; it will be redelivered");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let o = ConsumeOptions::new("g").retry(Duration::from_millis(100), Duration::from_millis(500));
        let delays: Vec<_> = (1..=5).map(|a| o.backoff(a).as_millis()).collect();
        assert_eq!(delays, vec![100, 200, 400, 500, 500]);
    }
}
