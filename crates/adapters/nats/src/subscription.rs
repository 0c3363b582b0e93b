//! [`NatsSubscription`]: one group member, pulling no more than it may hold.

use std::time::Duration;

use async_nats::Subject;
use async_nats::jetstream::consumer::{PullConsumer, pull};
use async_nats::jetstream::{self, AckKind};
use async_trait::async_trait;
use futures::FutureExt;
use polybus_core::kit::gate::{self, Fetcher, Gated, Slot};
use polybus_core::{Acker, Delivery, Error, Op, Result, Subscription};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::codec::{self, Delivered};
use crate::puller::{self, Puller};
use crate::transport::Shared;

/// How long after its pull request's expiry a closing member's messages are given back.
const EXPIRY_MARGIN: Duration = Duration::from_millis(250);

/// The shortest delay of a nak. A nak without a delay while no pull request of the group waits
/// makes nats-server 2.9 lose the message: it is not sent again (until the ack deadline), and a
/// later one of the same consumer is sent again as if new. A delayed nak is redelivered by the
/// server's timer, which does not.
const MIN_NAK_DELAY: Duration = Duration::from_millis(1);

/// Failures in a row before the subscriber is told (it keeps trying either way).
const REPORT_AFTER_FAILURES: u32 = 3;

/// A member of a group: a task pulls as many messages as the member has free prefetch
/// slots, so it never holds more than `prefetch` unsettled deliveries.
pub struct NatsSubscription {
    shared: Shared,
    deliveries: Gated<Result<Delivery>>,
    stop: watch::Sender<bool>,
    /// The pulling task; it ends with the pull request it left open, if any.
    task: Option<JoinHandle<Option<puller::Batch>>>,
    /// Set once the member has stopped receiving, until `close` gives back what it left.
    stopped: Option<Stopped>,
    closed: bool,
}

impl NatsSubscription {
    /// Starts pulling from `consumer` (made from `config` on `stream`).
    pub(crate) fn start(
        shared: Shared,
        stream: String,
        config: pull::Config,
        consumer: PullConsumer,
        prefetch: usize,
    ) -> Self {
        // One place more than the slots, for a failure report.
        let (fetcher, deliveries) = gate::gate(prefetch, prefetch + 1);
        let (stop, stopped) = watch::channel(false);
        let puller = Puller::new(shared.clone(), stream, config, Some(consumer));
        let task = tokio::spawn(run(shared.clone(), puller, fetcher, stopped));
        NatsSubscription { shared, deliveries, stop, task: Some(task), stopped: None, closed: false }
    }
}

impl Drop for NatsSubscription {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

#[async_trait]
impl Subscription for NatsSubscription {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        if self.closed || self.stopped.is_some() {
            return None;
        }
        self.deliveries.recv().await
    }

    async fn stop(&mut self) -> Result<()> {
        if self.closed || self.stopped.is_some() {
            return Ok(());
        }
        self.stop.send_replace(true);
        // The task stops at its next await; a panic in it has been reported already.
        let open = match self.task.take() {
            Some(task) => task.await.ok().flatten(),
            None => None,
        };
        // What the server sent to the open pull request before it heard of the stop sits in the
        // request's inbox; dropped unread, it would wait out the ack deadline. After a round trip
        // all of it has arrived: take it, and drop the request (its interest with it). Once the
        // server has seen that, nothing given back can be sent to this member again: only then
        // may this member, or its caller, give anything back.
        let mut stopped = Stopped::default();
        if let Some(mut batch) = open {
            stopped.hold = Some(batch.expires() + EXPIRY_MARGIN);
            if let Err(e) = self.shared.client.flush().await {
                tracing::debug!(error = %e, "flushing before closing a pull request");
            }
            while let Some(Some(Ok(message))) = batch.next().now_or_never() {
                stopped.arrived.push(message);
            }
            drop(batch);
            if let Err(e) = self.shared.client.flush().await {
                tracing::debug!(error = %e, "flushing after closing a pull request");
            }
        }
        self.stopped = Some(stopped);
        Ok(())
    }

    async fn close(&mut self) -> Result<()> {
        if self.closed {
            return Ok(());
        }
        self.stop().await?;
        self.closed = true;
        let Stopped { arrived, hold } = self.stopped.take().unwrap_or_default();
        // What is given back is also held (a delayed nak) until the request has expired on the
        // server, in case the server still sends to it.
        let delay = hold.map(|until| until.saturating_duration_since(Instant::now()));
        for message in arrived {
            give_back(&self.shared, message, delay).await;
        }
        // Fetched but never handed out: give them back to the group, not after the deadline.
        for received in self.deliveries.close() {
            if let Ok(delivery) = received
                && let Err(e) = delivery.nack(delay).await
            {
                tracing::debug!(error = %e, "returning an unhandled delivery");
            }
        }
        Ok(())
    }
}

/// What [`NatsSubscription::stop`] left for `close` to give back.
#[derive(Default)]
struct Stopped {
    /// Messages that reached the dropped pull request's inbox.
    arrived: Vec<jetstream::Message>,
    /// Until when the dropped request may still be open on the server.
    hold: Option<Instant>,
}

async fn run(
    shared: Shared,
    mut puller: Puller,
    fetcher: Fetcher<Result<Delivery>>,
    mut stop: watch::Receiver<bool>,
) -> Option<puller::Batch> {
    let mut closed = shared.closed.clone();
    let stopped = async move {
        tokio::select! {
            () = puller::closed(&mut stop) => {}
            () = puller::closed(&mut closed) => {}
        }
    };
    let mut open = None;
    tokio::select! {
        () = stopped => {}
        () = pull_forever(&shared, &mut puller, &fetcher, &mut open) => {}
    }
    open
}

async fn pull_forever(
    shared: &Shared,
    puller: &mut Puller,
    fetcher: &Fetcher<Result<Delivery>>,
    open: &mut Option<puller::Batch>,
) {
    loop {
        let Some(mut room) = fetcher.room(usize::MAX).await else { return };
        let batch = match puller.batch(room.len()).await {
            Ok(batch) => open.insert(batch),
            Err(e) => {
                let pause = puller.failed();
                report(shared, puller, fetcher, e.message());
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        while let Some(item) = batch.next().await {
            let message = match item {
                Ok(message) => message,
                Err(e) => {
                    let pause = puller.failed();
                    report(shared, puller, fetcher, &e);
                    tokio::time::sleep(pause).await;
                    break;
                }
            };
            puller.succeeded();
            let Some(slot) = room.take() else {
                // More than asked for: not ours to hold.
                give_back(shared, message, None).await;
                continue;
            };
            let Some(delivery) = delivery(shared, puller.stream(), message, slot) else { continue };
            if fetcher.send(Ok(delivery)).await.is_err() {
                return;
            }
        }
        *open = None;
    }
}

/// Tells the subscriber once per run of failures, after a few; logs the rest.
fn report(shared: &Shared, puller: &Puller, fetcher: &Fetcher<Result<Delivery>>, error: &str) {
    tracing::warn!(
        stream = puller.stream(),
        failures = puller.failures(),
        error,
        "nats pull failed; retrying"
    );
    if puller.failures() == REPORT_AFTER_FAILURES {
        let error =
            Error::transport(Op::Receive, format!("nats {}", puller.stream()), shared.secrets.scrub(error));
        // A full channel has deliveries to hand out: the subscriber is not stuck.
        let _ = fetcher.try_send(Err(error));
    }
}

/// Returns `message` to the group, to be delivered again after `delay` (at once when `None`).
async fn give_back(shared: &Shared, message: jetstream::Message, delay: Option<Duration>) {
    if let Some(reply) = &message.reply
        && let Err(e) = puller::settle(shared, reply, nak(delay)).await
    {
        tracing::debug!(error = %e, "returning an extra delivery");
    }
}

/// A nak redelivering after `delay`, and never at once (see [`MIN_NAK_DELAY`]).
fn nak(delay: Option<Duration>) -> AckKind {
    AckKind::Nak(Some(delay.unwrap_or_default().max(MIN_NAK_DELAY)))
}

fn delivery(shared: &Shared, stream: &str, message: jetstream::Message, slot: Slot) -> Option<Delivery> {
    let (delivered, reply) = match (message.info(), &message.reply) {
        (Ok(info), Some(reply)) => (
            Delivered {
                stream,
                sequence: info.stream_sequence,
                stored_at: info.published,
                attempt: u32::try_from(info.delivered).unwrap_or(u32::MAX).max(1),
            },
            reply.clone(),
        ),
        _ => {
            tracing::warn!(stream, subject = %message.subject, "ignoring a message that is not a JetStream delivery");
            return None;
        }
    };
    let headers = message.headers.as_ref();
    let decoded = codec::decode(headers, message.payload.clone(), delivered);
    let acker = NatsAcker { shared: shared.clone(), stream: stream.to_owned(), reply, _slot: slot };
    Some(Delivery::new(decoded, Box::new(acker)))
}

/// Settles one delivery; holds its prefetch slot until then.
struct NatsAcker {
    shared: Shared,
    stream: String,
    reply: Subject,
    _slot: Slot,
}

impl NatsAcker {
    async fn settle(self, op: Op, kind: AckKind) -> Result<()> {
        puller::settle(&self.shared, &self.reply, kind)
            .await
            .map_err(|e| Error::transport(op, format!("nats {}", self.stream), e))
    }
}

#[async_trait]
impl Acker for NatsAcker {
    async fn ack(self: Box<Self>) -> Result<()> {
        self.settle(Op::Ack, AckKind::Ack).await
    }

    async fn nack(self: Box<Self>, delay: Option<Duration>) -> Result<()> {
        self.settle(Op::Nack, nak(delay)).await
    }
}
