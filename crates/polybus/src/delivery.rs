//! Subscriber and Delivery: the broker's delivery plus polybus's dead-letter policy.

use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use polybus_core::{Acker, Message, Result, Subscription, TopicSpec, Transport, wire};

use crate::batch::Batch;
use crate::consume::HandlerError;
use crate::metrics::ConsumerMetrics;

/// Where a group's given-up messages go.
pub(crate) struct DeadLetterTarget {
    pub transport: Arc<dyn Transport>,
    pub spec: TopicSpec,
    pub event: String,
    pub group: String,
    pub ensured: tokio::sync::OnceCell<()>,
}

impl DeadLetterTarget {
    /// Prepares the destination once.
    pub(crate) async fn ensure(&self) -> Result<()> {
        self.ensured.get_or_try_init(|| self.prepare()).await.map(|_| ())
    }

    /// Creates the destination and, on brokers that keep messages only for existing groups
    /// (RabbitMQ, SQS, Pub/Sub, MQTT: no `replay`), its standing group, so dead letters wait
    /// until someone reads them. Where a new group reads from the start anyway (Kafka, Redis,
    /// NATS, embedded), joining it would only cost a group membership: on Kafka a whole
    /// rebalance of one group shared by every dead-letter topic.
    async fn prepare(&self) -> Result<()> {
        self.transport.ensure_topic(&self.spec).await?;
        if self.transport.capabilities().replay {
            return Ok(());
        }
        let mut standing = self
            .transport
            .subscribe(&self.spec, &polybus_core::SubscribeOptions::new(crate::DEAD_LETTER_GROUP))
            .await?;
        standing.close().await
    }

    async fn send(&self, message: &Message, reason: &str) -> Result<()> {
        self.ensure().await?;
        let mut copy = message.clone();
        copy.attempt = 0;
        copy.delay = None;
        copy.headers.insert(wire::DEAD_LETTER_REASON.into(), reason.to_owned());
        copy.headers.insert(wire::DEAD_LETTER_ATTEMPTS.into(), message.attempt.to_string());
        copy.headers.insert(wire::DEAD_LETTER_EVENT.into(), self.event.clone());
        copy.headers.insert(wire::DEAD_LETTER_GROUP.into(), self.group.clone());
        copy.headers.insert(wire::DEAD_LETTERED_AT.into(), wire::format_time(chrono::Utc::now()));
        self.transport.publish(&self.spec, copy).await?;
        tracing::warn!(event = %self.event, group = %self.group, id = %message.id, attempts = message.attempt,
            reason, "message dead-lettered");
        Ok(())
    }
}

/// The one place that decides whether a message that was not processed is redelivered or
/// dead-lettered; every way of settling ([`Delivery`], the consume loop, the server's leases)
/// goes through it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SettlePolicy {
    /// The topic's `maxAttempts`.
    pub max_attempts: u32,
}

impl SettlePolicy {
    /// After attempt `attempt` failed: dead-letter when the failure is permanent or this was
    /// the last attempt, otherwise retry.
    pub fn after_failure(&self, attempt: u32, permanent: bool) -> Settled {
        if permanent || attempt >= self.max_attempts { Settled::DeadLettered } else { Settled::Retried }
    }

    /// Why a message received for attempt `attempt` must be dead-lettered before it is handed
    /// out (its consumers kept dying without settling it), if it must.
    pub fn on_receipt(&self, attempt: u32) -> Option<String> {
        (attempt > self.max_attempts)
            .then(|| format!("delivered {} times without being settled", attempt.saturating_sub(1)))
    }
}

/// How a failed message was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// It will be redelivered.
    Retried,
    /// It went to the dead-letter destination.
    DeadLettered,
}

/// A received message; settle it with [`ack`](Delivery::ack), [`nack`](Delivery::nack)
/// or [`dead_letter`](Delivery::dead_letter). Dropping it unsettled leaves it to be
/// redelivered after the ack deadline.
pub struct Delivery {
    message: Message,
    acker: Box<dyn Acker>,
    max_attempts: u32,
    dead_letter: Arc<DeadLetterTarget>,
    metrics: Arc<ConsumerMetrics>,
}

impl Deref for Delivery {
    type Target = Message;

    fn deref(&self) -> &Message {
        &self.message
    }
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery").field("message", &self.message).finish_non_exhaustive()
    }
}

impl Delivery {
    /// The message.
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// Acknowledges: this group will not see the message again.
    pub async fn ack(self) -> Result<()> {
        self.acker.ack().await?;
        self.metrics.acked.increment(1);
        Ok(())
    }

    /// Redelivers the message now, or dead-letters it when this was its last attempt.
    pub async fn nack(self) -> Result<()> {
        self.retry(None, "nacked on its last attempt").await.map(drop)
    }

    /// Redelivers the message after `delay`, or dead-letters it when this was its last attempt.
    pub async fn nack_after(self, delay: Duration) -> Result<()> {
        self.retry(Some(delay), "nacked on its last attempt").await.map(drop)
    }

    /// Redelivers (after `delay`) or, on the last attempt, dead-letters with `reason`.
    pub async fn retry(self, delay: Option<Duration>, reason: &str) -> Result<Settled> {
        self.settle_failure(delay, reason, false).await
    }

    /// Settles after processing failed with `error`: dead-letters at once when the failure
    /// is [permanent](HandlerError::permanent) or this was the last attempt, otherwise
    /// redelivers after `delay`.
    pub async fn fail(self, error: &HandlerError, delay: Option<Duration>) -> Result<Settled> {
        self.settle_failure(delay, &error.to_string(), error.is_permanent()).await
    }

    async fn settle_failure(self, delay: Option<Duration>, reason: &str, permanent: bool) -> Result<Settled> {
        match self.policy().after_failure(self.message.attempt, permanent) {
            Settled::DeadLettered => self.dead_letter(reason).await.map(|_| Settled::DeadLettered),
            Settled::Retried => {
                self.acker.nack(delay).await?;
                self.metrics.retried.increment(1);
                Ok(Settled::Retried)
            }
        }
    }

    /// The policy this delivery is settled by.
    pub fn policy(&self) -> SettlePolicy {
        SettlePolicy { max_attempts: self.max_attempts }
    }

    /// Sends the message to the topic's dead-letter destination with `reason`, then acks it.
    pub async fn dead_letter(self, reason: &str) -> Result<()> {
        self.dead_letter.send(&self.message, reason).await?;
        self.acker.ack().await?;
        self.metrics.dead_lettered.increment(1);
        Ok(())
    }

    /// The attempt limit after which the message is dead-lettered.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }
}

/// A member of a consumer group: yields deliveries until closed.
pub struct Subscriber {
    inner: Box<dyn Subscription>,
    max_attempts: u32,
    dead_letter: Arc<DeadLetterTarget>,
    metrics: Arc<ConsumerMetrics>,
}

impl Subscriber {
    pub(crate) fn new(
        inner: Box<dyn Subscription>,
        max_attempts: u32,
        dead_letter: Arc<DeadLetterTarget>,
        metrics: Arc<ConsumerMetrics>,
    ) -> Self {
        Subscriber { inner, max_attempts, dead_letter, metrics }
    }

    /// This member's metric series.
    pub(crate) fn metrics(&self) -> Arc<ConsumerMetrics> {
        self.metrics.clone()
    }

    /// The next delivery; waits for one. `None` once the subscription is closed.
    ///
    /// A message already delivered more than the topic's `maxAttempts` times (its consumers
    /// kept dying without settling it) is dead-lettered here instead of being handed out.
    pub async fn next(&mut self) -> Option<Result<Delivery>> {
        loop {
            let delivery = match self.inner.next().await? {
                Ok(d) => self.wrap(d),
                Err(e) => return Some(Err(e)),
            };
            if let Some(reason) = delivery.policy().on_receipt(delivery.message.attempt) {
                if let Err(e) = delivery.dead_letter(&reason).await {
                    return Some(Err(e));
                }
                continue;
            }
            return Some(Ok(delivery));
        }
    }

    /// Up to `max` deliveries (at least one): waits for the first as [`next`](Self::next)
    /// does, then takes the others that are ready at once, without waiting for more.
    /// `None` once the subscription is closed. Settle them one by one or together
    /// ([`Batch::ack_all`]); at most the subscription's `prefetch` are ever unsettled, so a
    /// batch is never larger than that either.
    ///
    /// Cancel-safe while it waits for the first delivery (as `next`); once it has one, it
    /// returns without waiting.
    pub async fn next_batch(&mut self, max: usize) -> Option<Result<Batch>> {
        self.next_batch_within(max, Duration::ZERO).await
    }

    /// As [`next_batch`](Self::next_batch), but after the first delivery waits up to `wait`
    /// for more until `max` are taken: fuller batches for a little latency. Cancel-safe only
    /// while it waits for the first: a caller that drops it while it gathers (`select!`)
    /// drops the deliveries taken, and they come back after their ack deadline.
    pub async fn next_batch_within(&mut self, max: usize, wait: Duration) -> Option<Result<Batch>> {
        loop {
            let received = match self.inner.next_batch(max.max(1), wait).await? {
                Ok(received) => received,
                Err(e) => return Some(Err(e)),
            };
            match self.admit(received).await {
                (batch, Some(e)) if batch.is_empty() => return Some(Err(e)),
                (batch, _) if batch.is_empty() => continue,
                (batch, _) => return Some(Ok(batch)),
            }
        }
    }

    /// Up to `max` deliveries that are ready now or arrive within `wait`, without waiting for
    /// a first one: empty when none came (or the subscription is closed). Returns within
    /// `wait`, at once when it is zero; for polling, or to top up a batch.
    pub async fn next_ready(&mut self, max: usize, wait: Duration) -> Result<Batch> {
        let received = self.inner.next_ready(max, wait).await?;
        match self.admit(received).await {
            (batch, Some(e)) if batch.is_empty() => Err(e),
            (batch, _) => Ok(batch),
        }
    }

    /// Wraps received deliveries, dead-lettering those delivered too often (see
    /// [`next`](Self::next)); with the first error of that, if any.
    async fn admit(&mut self, received: Vec<polybus_core::Delivery>) -> (Batch, Option<polybus_core::Error>) {
        let mut batch = Vec::with_capacity(received.len());
        let mut failed = None;
        for delivery in received {
            let delivery = self.wrap(delivery);
            match delivery.policy().on_receipt(delivery.message.attempt) {
                None => batch.push(delivery),
                Some(reason) => {
                    if let Err(e) = delivery.dead_letter(&reason).await {
                        failed.get_or_insert(e);
                    }
                }
            }
        }
        if let (false, Some(e)) = (batch.is_empty(), &failed) {
            // The message stays unsettled and comes back after its ack deadline.
            tracing::warn!(error = %e, "dead-lettering an over-delivered message failed");
        }
        (Batch::from(batch), failed)
    }

    fn wrap(&self, delivery: polybus_core::Delivery) -> Delivery {
        let (message, acker) = delivery.into_parts();
        self.metrics.delivered.increment(1);
        Delivery {
            message,
            acker,
            max_attempts: self.max_attempts,
            dead_letter: self.dead_letter.clone(),
            metrics: self.metrics.clone(),
        }
    }

    /// Stops receiving before a [`close`](Self::close): deliveries nacked after this go back
    /// to the group, not to this member's open fetch (NATS JetStream). `next` then ends.
    pub async fn stop(&mut self) -> Result<()> {
        self.inner.stop().await
    }

    /// Stops fetching; deliveries already handed out can still be settled.
    pub async fn close(&mut self) -> Result<()> {
        self.inner.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_retry_until_the_last_attempt_unless_permanent() {
        let policy = SettlePolicy { max_attempts: 3 };
        let verdicts: Vec<Settled> = (1..=3).map(|attempt| policy.after_failure(attempt, false)).collect();
        assert_eq!(verdicts, [Settled::Retried, Settled::Retried, Settled::DeadLettered]);
        assert_eq!(policy.after_failure(1, true), Settled::DeadLettered, "a permanent failure");
        assert_eq!(policy.on_receipt(3), None);
        assert_eq!(policy.on_receipt(4).as_deref(), Some("delivered 3 times without being settled"));
    }
}
