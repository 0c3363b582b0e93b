//! One group member: long-polls its queue for as many messages as it has free prefetch slots.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::Client;
use aws_sdk_sqs::operation::receive_message::ReceiveMessageOutput;
use aws_sdk_sqs::types::MessageSystemAttributeName;
use polybus_core::kit::gate::{self, Fetcher, Gated, Slot};
use polybus_core::{Acker, Delivery, Error, Message, Op, Result, Subscription};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::MAX_ENTRIES;
use crate::codec;
use crate::fail;
use crate::names::queue_name;
use crate::settle::{Settle, Settler};

/// Longest long poll SQS allows.
const LONG_POLL_SECONDS: i32 = 20;
/// Longest visibility timeout SQS allows (12 hours).
pub const MAX_VISIBILITY_SECONDS: u64 = 43_200;
/// Receive failures in a row before the subscriber is told (the subscription keeps trying).
const REPORT_AFTER_FAILURES: u32 = 3;
/// A buffered message this close to its visibility timeout is not handed out: SQS is about
/// to deliver it again anyway.
const EXPIRY_MARGIN: Duration = Duration::from_millis(100);

/// Whole seconds, rounded up, at most 12 hours.
pub fn visibility_seconds(duration: Duration) -> i32 {
    let seconds = duration.as_secs() + u64::from(duration.subsec_nanos() > 0);
    seconds.min(MAX_VISIBILITY_SECONDS) as i32
}

enum Item {
    Received { message: Message, receipt: String, at: Instant, slot: Slot },
    Failed(Error),
}

/// Where and how one member receives.
pub struct Receiving {
    /// The SQS client.
    pub client: Client,
    /// The queue's URL.
    pub url: String,
    /// Most unsettled deliveries at once.
    pub prefetch: usize,
    /// Visibility timeout of received messages: the ack deadline in whole seconds (at least 1).
    pub visibility: i32,
    /// Settles the queue's messages.
    pub settler: Settler,
    /// Turns true when the transport closes.
    pub stop: watch::Receiver<bool>,
}

/// Received messages not handed out yet; the receiver fetches more only once they are.
#[derive(Default)]
struct Buffered {
    count: AtomicUsize,
    drained: Notify,
}

impl Buffered {
    fn take(&self) {
        if self.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.drained.notify_one();
        }
    }

    async fn wait_drained(&self) {
        while self.count.load(Ordering::Acquire) > 0 {
            self.drained.notified().await;
        }
    }
}

/// A subscription on one SQS queue. Receiving starts with the first [`next`](Subscription::next),
/// so subscribing only to create the group takes no message.
pub struct SqsSubscription {
    pending: Option<Receiving>,
    rx: Option<Gated<Item>>,
    task: Option<JoinHandle<()>>,
    /// Turns true when this member closes or is dropped: its receive loop ends.
    leave: watch::Sender<bool>,
    buffered: Arc<Buffered>,
    settler: Settler,
    visibility: Duration,
    closed: bool,
}

impl SqsSubscription {
    /// A subscription that receives once asked for its first delivery.
    pub fn new(receiving: Receiving) -> Self {
        SqsSubscription {
            settler: receiving.settler.clone(),
            visibility: Duration::from_secs(receiving.visibility.max(1) as u64),
            pending: Some(receiving),
            rx: None,
            task: None,
            leave: watch::channel(false).0,
            buffered: Arc::default(),
            closed: false,
        }
    }

    fn receiver(&mut self) -> &mut Gated<Item> {
        if let Some(receiving) = self.pending.take() {
            // One place more than the slots, for a failure report.
            let (fetcher, rx) = gate::gate(receiving.prefetch, receiving.prefetch.max(1) + 1);
            let leave = self.leave.subscribe();
            self.task = Some(tokio::spawn(receive_loop(receiving, leave, self.buffered.clone(), fetcher)));
            self.rx = Some(rx);
        }
        // Closed before receiving: a gate whose fetcher is gone, so it ends at once.
        self.rx.get_or_insert_with(|| gate::gate(1, 1).1)
    }

    /// Gives a message that waited in the buffer a full ack deadline from now; `false` when
    /// it waited too long to be handed out (SQS is about to deliver it again).
    async fn still_held(&self, at: Instant, receipt: &str) -> bool {
        let waited = at.elapsed();
        if waited + EXPIRY_MARGIN >= self.visibility {
            return false;
        }
        if waited < self.visibility / 2 {
            return true;
        }
        let seconds = self.visibility.as_secs() as i32;
        match self.settler.settle(receipt.to_owned(), Settle::Release(seconds)).await {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(error = %e, "extending the visibility of a buffered message");
                false
            }
        }
    }
}

#[async_trait]
impl Subscription for SqsSubscription {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        if self.closed {
            return None;
        }
        loop {
            let item = self.receiver().recv().await?;
            match item {
                Item::Failed(e) => return Some(Err(e)),
                Item::Received { message, receipt, at, slot } => {
                    self.buffered.take();
                    if !self.still_held(at, &receipt).await {
                        continue;
                    }
                    let acker = SqsAcker { settler: self.settler.clone(), receipt, _slot: slot };
                    return Some(Ok(Delivery::new(message, Box::new(acker))));
                }
            }
        }
    }

    async fn close(&mut self) -> Result<()> {
        if std::mem::replace(&mut self.closed, true) {
            return Ok(());
        }
        self.pending = None;
        // The loop ends at once: a receive still open at SQS is left to a task that gives back
        // whatever it brings, and a message received but not buffered yet is given back.
        self.leave.send_replace(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        // What was received but never handed out goes back at once, not after the ack deadline.
        let buffered = self.rx.as_mut().map(Gated::close).unwrap_or_default();
        let receipts = buffered.into_iter().filter_map(|item| match item {
            Item::Received { receipt, .. } => Some(receipt),
            Item::Failed(_) => None,
        });
        give_back(receipts.collect(), self.settler.clone()).await;
        Ok(())
    }
}

impl Drop for SqsSubscription {
    fn drop(&mut self) {
        self.leave.send_replace(true);
    }
}

/// Settles one delivery; holds its prefetch slot until then.
struct SqsAcker {
    settler: Settler,
    receipt: String,
    _slot: Slot,
}

#[async_trait]
impl Acker for SqsAcker {
    async fn ack(self: Box<Self>) -> Result<()> {
        self.settler.settle(self.receipt.clone(), Settle::Delete).await
    }

    async fn nack(self: Box<Self>, delay: Option<Duration>) -> Result<()> {
        let seconds = delay.map_or(0, visibility_seconds);
        self.settler.settle(self.receipt.clone(), Settle::Release(seconds)).await
    }
}

/// Receives while the member has free prefetch slots, one batch at a time: the next
/// `ReceiveMessage` goes out once the previous batch has been handed out, so received
/// messages do not sit in a buffer while their visibility timeout runs.
async fn receive_loop(
    receiving: Receiving,
    leave: watch::Receiver<bool>,
    buffered: Arc<Buffered>,
    fetcher: Fetcher<Item>,
) {
    let Receiving { client, url, visibility, stop, settler, .. } = receiving;
    let mut halt = Halt { stop, leave };
    let queue = queue_name(&url).to_owned();
    let mut failures = 0u32;
    loop {
        let mut room = tokio::select! {
            room = async {
                buffered.wait_drained().await;
                fetcher.room(MAX_ENTRIES).await
            } => match room {
                Some(room) => room,
                None => return,
            },
            _ = halt.wait() => return,
        };
        let mut request = Box::pin(
            client
                .receive_message()
                .queue_url(&url)
                .max_number_of_messages(room.len() as i32)
                .wait_time_seconds(LONG_POLL_SECONDS)
                .visibility_timeout(visibility)
                .message_attribute_names("All")
                .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
                .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
                .message_system_attribute_names(MessageSystemAttributeName::MessageGroupId)
                .send(),
        );
        let result = tokio::select! {
            result = &mut request => result,
            _ = halt.wait() => {
                // SQS answers a long poll whether or not its sender still listens, and what it
                // hands that answer stays invisible for a whole ack deadline: listen on.
                tokio::spawn(give_back_when_answered(request, settler));
                return;
            }
        };
        match result {
            Ok(out) => {
                failures = 0;
                let at = Instant::now();
                let mut received = out.messages().iter().filter_map(|m| Some((m, m.receipt_handle()?)));
                while let Some((message, receipt)) = received.next() {
                    let Some(slot) = room.take() else { break };
                    let item = Item::Received {
                        message: codec::decode(message),
                        receipt: receipt.to_owned(),
                        at,
                        slot,
                    };
                    buffered.count.fetch_add(1, Ordering::AcqRel);
                    if fetcher.send(item).await.is_err() {
                        // Closed meanwhile: this message and the rest of the answer go back.
                        let rest = std::iter::once(receipt).chain(received.map(|(_, r)| r));
                        tokio::spawn(give_back(rest.map(str::to_owned).collect(), settler));
                        return;
                    }
                }
            }
            Err(e) => {
                failures += 1;
                let error = fail::sqs(Op::Receive, &queue, e);
                tracing::debug!(%error, failures, "receive failed");
                if failures == REPORT_AFTER_FAILURES && fetcher.send(Item::Failed(error)).await.is_err() {
                    return;
                }
                drop(room);
                let backoff = Duration::from_millis(100 << failures.min(6));
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = halt.wait() => return,
                }
            }
        }
    }
}

/// What ends a receive loop: the transport closing, or the member leaving.
struct Halt {
    stop: watch::Receiver<bool>,
    leave: watch::Receiver<bool>,
}

impl Halt {
    /// Resolves once either turned true.
    async fn wait(&mut self) {
        tokio::select! {
            _ = stopped(&mut self.stop) => {}
            _ = stopped(&mut self.leave) => {}
        }
    }
}

/// Waits for the answer to a receive its member no longer listens for, and gives back what it
/// holds.
async fn give_back_when_answered<F, E>(request: F, settler: Settler)
where
    F: Future<Output = std::result::Result<ReceiveMessageOutput, E>>,
{
    if let Ok(out) = request.await {
        let receipts = out.messages().iter().filter_map(|m| m.receipt_handle()).map(str::to_owned).collect();
        give_back(receipts, settler).await;
    }
}

/// Makes received messages visible again at once.
async fn give_back(receipts: Vec<String>, settler: Settler) {
    let releases = receipts.into_iter().map(|receipt| settler.settle(receipt, Settle::Release(0)));
    for result in futures::future::join_all(releases).await {
        if let Err(e) = result {
            tracing::debug!(error = %e, "giving back a message its member will not hand out");
        }
    }
}

/// Resolves once the flag turns true (never, when its sender is gone without turning it).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|closed| *closed).await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visibility_rounds_up_to_whole_seconds_within_12_hours() {
        assert_eq!(visibility_seconds(Duration::from_millis(1)), 1);
        assert_eq!(visibility_seconds(Duration::from_millis(1500)), 2);
        assert_eq!(visibility_seconds(Duration::from_secs(3)), 3);
        assert_eq!(visibility_seconds(Duration::ZERO), 0);
        assert_eq!(visibility_seconds(Duration::from_secs(100_000)), 43_200);
    }
}
