//! One group member: unary pulls on the group's subscription, made by a background puller
//! only while the member waits for a message and only for as many messages as it may still
//! hold (`prefetch`), and settled with Acknowledge / ModifyAckDeadline.
//!
//! Deadlines are Pub/Sub's own: a message handed out gets `ModifyAckDeadline(ack_deadline)`
//! (any whole number of seconds up to 600, so shorter than a subscription's 10 s minimum),
//! nack is a deadline of 0, and nack with a delay a deadline of that length. A member that
//! stops settling, or dies, loses its messages to the others when their deadline passes.
//!
//! A pull in flight is never cancelled (Pub/Sub would count its messages as delivered to
//! nobody until their deadline passed); when the member is closed, whatever it still brings
//! is nacked.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use gcloud_gax::grpc::{Code, Status};
use gcloud_pubsub::subscriber::ReceivedMessage;
use gcloud_pubsub::subscription::Subscription as PullSubscription;
use polybus_core::{Acker, Delivery, Error, Op, Result, SubscribeOptions, Subscription, TopicSpec};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;

use crate::acks::AckQueue;
use crate::codec::{self, Received};
use crate::fail;
use crate::names::topic_id;
use crate::transport::Shared;

/// Longest deadline ModifyAckDeadline accepts.
const MAX_DEADLINE: Duration = Duration::from_secs(600);
/// A message handed out within this long after its pull keeps the deadline the pull gave it.
const FRESH: Duration = Duration::from_millis(500);
/// Most messages one pull asks for.
const MAX_PULL: usize = 1000;
/// Longest pause between failed pulls.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How long `close` waits for the nacks of messages pulled but not handed out.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Whole seconds, rounded up, within what ModifyAckDeadline accepts.
fn deadline_seconds(d: Duration) -> i32 {
    let d = d.min(MAX_DEADLINE);
    let seconds = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    seconds.max(1) as i32
}

/// A message the puller brought, not yet handed out.
struct Pulled {
    message: ReceivedMessage,
    permit: OwnedSemaphorePermit,
    pulled_at: Instant,
}

/// A member of a group on one topic.
pub(crate) struct PubsubSubscription {
    target: String,
    /// The deadline a delivery gets when handed out, in seconds.
    deadline: i32,
    /// The deadline a pull gives (the subscription's), in seconds.
    pull_deadline: i32,
    mailbox: Arc<Mailbox>,
    /// Where this member's acks are batched.
    acks: AckQueue,
    /// A message being handed out, kept when `next` is cancelled halfway.
    pending: Option<Pulled>,
    stop: watch::Sender<bool>,
    closed: bool,
}

/// What the puller brought and the member has not taken yet, and whether the member waits.
#[derive(Default)]
struct Inbox {
    items: VecDeque<Result<Pulled>>,
    /// A `next` is waiting for the puller.
    waiting: bool,
    closed: bool,
}

/// The inbox, and the signals between the member and its puller.
#[derive(Default)]
struct Mailbox {
    inbox: Mutex<Inbox>,
    /// To the member: something arrived.
    arrived: Notify,
    /// To the puller: the member waits.
    wanted: Notify,
}

impl Mailbox {
    fn lock(&self) -> MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Marks the member as waiting until it takes something or stops waiting (a cancelled `next`).
struct Waiting<'a>(&'a Mailbox);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.lock().waiting = false;
    }
}

impl PubsubSubscription {
    /// Joins the group (its subscription exists) and starts the member's puller.
    pub(crate) async fn start(
        shared: Arc<Shared>,
        topic: TopicSpec,
        options: SubscribeOptions,
        pull_deadline: i32,
    ) -> Result<Self> {
        let target = format!("pubsub {}--{}", topic_id(&topic.native_name), options.group);
        let path = shared.names.subscription(&topic.native_name, &options.group);
        let subscription = shared.pull_client(&target).await?.subscription(topic_id(&path));
        let acks = AckQueue::start(subscription.clone());
        let mailbox = Arc::new(Mailbox::default());
        let (stop, stopped) = watch::channel(false);
        let puller = Puller {
            permits: Arc::new(Semaphore::new(options.prefetch.max(1))),
            batch: options.prefetch.clamp(1, MAX_PULL),
            shared,
            subscription,
            topic,
            options: options.clone(),
            target: target.clone(),
            mailbox: mailbox.clone(),
            stopped,
        };
        tokio::spawn(puller.run());
        Ok(PubsubSubscription {
            target,
            deadline: deadline_seconds(options.ack_deadline),
            pull_deadline,
            mailbox,
            acks,
            pending: None,
            stop,
            closed: false,
        })
    }

    /// The next pulled message (or pull error), waiting for the puller when none is buffered.
    async fn next_pulled(&self) -> Option<Result<Pulled>> {
        // Declared first, so it is dropped last (after any inbox guard).
        let mut waiting = None;
        loop {
            let arrived = self.mailbox.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            {
                let mut inbox = self.mailbox.lock();
                if let Some(item) = inbox.items.pop_front() {
                    // Taking and no longer waiting in one step: the puller must not see a member
                    // that waits with nothing in its inbox and pull for nobody.
                    inbox.waiting = false;
                    return Some(item);
                }
                if inbox.closed {
                    return None;
                }
                inbox.waiting = true;
            }
            waiting.get_or_insert(Waiting(&self.mailbox));
            self.mailbox.wanted.notify_one();
            arrived.await;
        }
    }

    /// Stops the puller and takes back what was pulled but not handed out.
    fn stop(&mut self) -> Vec<ReceivedMessage> {
        self.closed = true;
        let _ = self.stop.send(true);
        let mut leftovers: Vec<ReceivedMessage> =
            self.pending.take().map(|p| p.message).into_iter().collect();
        let mut inbox = self.mailbox.lock();
        inbox.closed = true;
        leftovers.extend(inbox.items.drain(..).filter_map(|item| item.ok().map(|p| p.message)));
        leftovers
    }
}

#[async_trait]
impl Subscription for PubsubSubscription {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        loop {
            if self.closed {
                return None;
            }
            if self.pending.is_none() {
                match self.next_pulled().await? {
                    Ok(pulled) => self.pending = Some(pulled),
                    Err(e) => return Some(Err(e)),
                }
            }
            let pulled = self.pending.as_ref()?;
            // The delivery's deadline starts now, unless the pull just gave it the same one.
            let fresh = self.deadline == self.pull_deadline && pulled.pulled_at.elapsed() <= FRESH;
            if !fresh && let Err(e) = pulled.message.modify_ack_deadline(self.deadline).await {
                // Its ack id no longer holds (e.g. its deadline passed): Pub/Sub redelivers it.
                tracing::debug!(target = %self.target, error = %e, "dropping a pulled message");
                self.pending = None;
                continue;
            }
            let Pulled { mut message, permit, .. } = self.pending.take()?;
            let attempt = message.delivery_attempt();
            let m = &mut message.message;
            let received = Received {
                data: Bytes::from(std::mem::take(&mut m.data)),
                attributes: std::mem::take(&mut m.attributes),
                message_id: std::mem::take(&mut m.message_id),
                publish_time: m.publish_time.take().map(|t| (t.seconds, t.nanos)),
                ordering_key: std::mem::take(&mut m.ordering_key),
            };
            let acker = PubsubAcker {
                message,
                _permit: permit,
                target: self.target.clone(),
                acks: self.acks.clone(),
            };
            return Some(Ok(Delivery::new(codec::decode(received, attempt), Box::new(acker))));
        }
    }

    async fn close(&mut self) -> Result<()> {
        let leftovers = self.stop();
        let _ = tokio::time::timeout(CLOSE_WAIT, nack_all(leftovers)).await;
        Ok(())
    }
}

impl Drop for PubsubSubscription {
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        let leftovers = self.stop();
        if !leftovers.is_empty()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(nack_all(leftovers));
        }
    }
}

/// A gRPC status as code and message (its metadata is left out, so the status is not kept
/// as the cause), of the kind its code says.
fn status_error(op: Op, target: &str, status: &Status) -> Error {
    let message = format!("{:?}: {}", status.code(), status.message());
    Error::transport(op, target, message).with_kind(fail::grpc_kind(status.code()))
}

/// Makes `messages` available again at once.
async fn nack_all(messages: Vec<ReceivedMessage>) {
    let nacks = messages.iter().map(|m| m.nack());
    for result in futures::future::join_all(nacks).await {
        if let Err(e) = result {
            tracing::debug!(error = %e, "nacking a message that was not handed out");
        }
    }
}

/// Pulls for one member, in the background.
struct Puller {
    shared: Arc<Shared>,
    subscription: PullSubscription,
    topic: TopicSpec,
    options: SubscribeOptions,
    target: String,
    /// One permit per message pulled and not yet settled.
    permits: Arc<Semaphore>,
    batch: usize,
    mailbox: Arc<Mailbox>,
    stopped: watch::Receiver<bool>,
}

impl Puller {
    async fn run(mut self) {
        let mut failures = 0u32;
        loop {
            // Pull only for a member that waits with an empty inbox: a pulled message's
            // deadline is running.
            loop {
                let wanted = self.mailbox.wanted.notified();
                tokio::pin!(wanted);
                wanted.as_mut().enable();
                {
                    let inbox = self.mailbox.lock();
                    if inbox.closed {
                        return;
                    }
                    if inbox.waiting && inbox.items.is_empty() {
                        break;
                    }
                }
                tokio::select! {
                    _ = wanted => {}
                    _ = self.stopped.wait_for(|s| *s) => return,
                }
            }
            let mut permits = tokio::select! {
                permit = self.permits.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => return,
                },
                _ = self.stopped.wait_for(|s| *s) => return,
            };
            let more = self.permits.available_permits().min(self.batch - 1);
            if more > 0
                && let Ok(extra) = self.permits.clone().try_acquire_many_owned(more as u32)
            {
                permits.merge(extra);
            }
            let max = i32::try_from(permits.num_permits()).unwrap_or(i32::MAX);
            // Not raced against the stop signal: see the module docs.
            let asked = Instant::now();
            match self.subscription.pull(max, None).await {
                Ok(messages) => {
                    tracing::trace!(target = %self.target, max, got = messages.len(), took = ?asked.elapsed(), "pulled");
                    failures = 0;
                    let pulled_at = Instant::now();
                    let mut returned = Vec::new();
                    {
                        let mut inbox = self.mailbox.lock();
                        for message in messages {
                            match permits.split(1) {
                                Some(permit) if !inbox.closed => {
                                    inbox.items.push_back(Ok(Pulled { message, permit, pulled_at }))
                                }
                                _ => returned.push(message),
                            }
                        }
                    }
                    self.mailbox.arrived.notify_one();
                    if !returned.is_empty() {
                        nack_all(returned).await;
                    }
                    if *self.stopped.borrow() {
                        return;
                    }
                }
                Err(status) => {
                    drop(permits);
                    failures += 1;
                    if status.code() == Code::NotFound {
                        // The subscription (or its topic) disappeared, e.g. with an emulator restart.
                        if let Err(e) = self.shared.ensure_subscription(&self.topic, &self.options).await {
                            tracing::debug!(target = %self.target, error = %e, "making the subscription again");
                        }
                    }
                    let error = status_error(Op::Receive, &self.target, &status);
                    {
                        let mut inbox = self.mailbox.lock();
                        if inbox.closed {
                            return;
                        }
                        inbox.items.push_back(Err(error));
                    }
                    self.mailbox.arrived.notify_one();
                    let backoff = Duration::from_millis(100u64 << failures.min(10)).min(MAX_BACKOFF);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = self.stopped.wait_for(|s| *s) => return,
                    }
                }
            }
        }
    }
}

/// Settles one delivery with Acknowledge or ModifyAckDeadline; frees its prefetch slot after.
struct PubsubAcker {
    message: ReceivedMessage,
    _permit: OwnedSemaphorePermit,
    target: String,
    acks: AckQueue,
}

#[async_trait]
impl Acker for PubsubAcker {
    async fn ack(self: Box<Self>) -> Result<()> {
        let ack_id = self.message.ack_id().to_owned();
        self.acks.ack(ack_id).await.map_err(|e| status_error(Op::Ack, &self.target, &e))
    }

    async fn nack(self: Box<Self>, delay: Option<Duration>) -> Result<()> {
        let fail = |e: Status| status_error(Op::Nack, &self.target, &e);
        let Some(delay) = delay.filter(|d| !d.is_zero()) else {
            return self.message.nack().await.map_err(fail);
        };
        let due = Instant::now() + delay;
        self.message.modify_ack_deadline(deadline_seconds(delay)).await.map_err(fail)?;
        if delay > MAX_DEADLINE {
            // Longer than one deadline can be: extend it until the delay is over.
            let message = self.message.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(MAX_DEADLINE - Duration::from_secs(60)).await;
                    let left = due.saturating_duration_since(Instant::now());
                    if let Err(e) = message.modify_ack_deadline(deadline_seconds(left)).await {
                        tracing::debug!(error = %e, "extending a delayed nack");
                        return;
                    }
                    if left <= MAX_DEADLINE {
                        return;
                    }
                }
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_round_up_to_whole_seconds_within_pubsub_bounds() {
        assert_eq!(deadline_seconds(Duration::from_millis(1)), 1);
        assert_eq!(deadline_seconds(Duration::from_secs(1)), 1);
        assert_eq!(deadline_seconds(Duration::from_millis(1500)), 2);
        assert_eq!(deadline_seconds(Duration::from_secs(3600)), 600);
        assert_eq!(deadline_seconds(Duration::ZERO), 1);
    }
}
