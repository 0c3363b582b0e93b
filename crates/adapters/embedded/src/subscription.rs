//! A group member's stream of deliveries, and the acker each delivery carries.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use polybus_core::{Acker, Delivery, Error, Op, Result, SubscribeOptions, Subscription};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinHandle;

use crate::log::{self, Fetched, Leased, Settle, Settled, Settlement};
use crate::store::{Store, TopicHandle, now_ms};
use crate::transport::Inner;

/// Longest wait before looking at the file again: other processes publish without waking us.
const POLL: Duration = Duration::from_millis(30);
/// Most messages leased by one fetch.
const FETCH_MAX: usize = 256;
/// A fetch ahead of need takes at least this share of `min(prefetch, FETCH_MAX)`.
const AHEAD_SHARE: usize = 4;

/// A fetch running in the background, kept across `next()` calls so that a cancelled
/// `next()` loses no leased message.
struct Inflight {
    handle: JoinHandle<Result<Fetched>>,
    permits: Vec<OwnedSemaphorePermit>,
    changes: u64,
}

/// One member of a group on one topic.
pub(crate) struct EmbeddedSubscription {
    transport: Arc<Inner>,
    topic: Arc<TopicHandle>,
    group_id: i64,
    deadline_ms: i64,
    /// One permit per unacked delivery held; at most `prefetch`.
    permits: Arc<Semaphore>,
    /// Free permits needed to fetch before `ready` is empty.
    ahead_min: usize,
    /// Leased, permit taken, not yet handed out.
    ready: VecDeque<(Leased, OwnedSemaphorePermit)>,
    inflight: Option<Inflight>,
    closed_rx: watch::Receiver<bool>,
    closed: bool,
}

impl EmbeddedSubscription {
    /// Joins `options.group` on topic `name`, creating topic and group when new.
    pub(crate) async fn join(transport: Arc<Inner>, name: &str, options: &SubscribeOptions) -> Result<Self> {
        let store = &transport.store;
        let topic = store.topic(Op::Subscribe, name).await?;
        let topic_id = topic.id;
        let group = options.group.clone();
        let group_id =
            store.run(Op::Subscribe, Some(name), move |conn| log::join_group(conn, topic_id, &group)).await?;
        let closed_rx = transport.closed();
        Ok(EmbeddedSubscription {
            topic,
            group_id,
            deadline_ms: i64::try_from(options.ack_deadline.as_millis()).unwrap_or(i64::MAX).max(1),
            permits: Arc::new(Semaphore::new(options.prefetch.max(1))),
            ahead_min: (options.prefetch.min(FETCH_MAX) / AHEAD_SHARE).max(1),
            ready: VecDeque::new(),
            inflight: None,
            closed_rx,
            closed: false,
            transport,
        })
    }

    fn is_closed(&self) -> bool {
        self.closed || *self.closed_rx.borrow() || self.closed_rx.has_changed().is_err()
    }

    fn deliver(&self, leased: Leased, permit: OwnedSemaphorePermit) -> Delivery {
        let acker = EmbeddedAcker {
            store: Arc::clone(&self.transport.store),
            topic: Arc::clone(&self.topic),
            group_id: self.group_id,
            seq: leased.seq,
            lease: leased.lease,
            message_id: leased.message.id.clone(),
            key: leased.message.key.clone(),
            _permit: permit,
        };
        Delivery::new(leased.message, Box::new(acker))
    }

    /// A fetched message waits in `ready` while earlier ones are handled: hand it out with at
    /// least half its ack deadline left. False when its lease was lost meanwhile.
    async fn renew_if_old(&self, leased: &Leased) -> Result<bool> {
        let age = i64::try_from(leased.leased_at.elapsed().as_millis()).unwrap_or(i64::MAX);
        if age.saturating_mul(2) <= self.deadline_ms {
            return Ok(true);
        }
        let (group_id, seq, lease, deadline_ms) = (self.group_id, leased.seq, leased.lease, self.deadline_ms);
        self.transport
            .store
            .run(Op::Receive, Some(&self.topic.name), move |conn| {
                log::extend(conn, group_id, seq, lease, deadline_ms)
            })
            .await
    }

    /// Starts a fetch for as many messages as there are free permits (at least one).
    async fn start_fetch(&mut self) -> bool {
        let first = tokio::select! {
            permit = Arc::clone(&self.permits).acquire_owned() => permit.ok(),
            _ = self.closed_rx.wait_for(|closed| *closed) => None,
        };
        let Some(first) = first else { return false };
        self.fetch_with(vec![first]);
        true
    }

    /// While fetched messages are being handed out, starts the next fetch once enough permits
    /// are free for it, so that the file is read while the user works.
    fn fetch_ahead(&mut self) {
        if self.inflight.is_none() && self.permits.available_permits() >= self.ahead_min {
            self.fetch_with(Vec::new());
        }
    }

    /// Starts a fetch for `permits` and whatever more permits are free, up to [`FETCH_MAX`].
    fn fetch_with(&mut self, mut permits: Vec<OwnedSemaphorePermit>) {
        while permits.len() < FETCH_MAX {
            match Arc::clone(&self.permits).try_acquire_owned() {
                Ok(permit) => permits.push(permit),
                Err(_) => break,
            }
        }
        if permits.is_empty() {
            return;
        }
        let changes = self.topic.changes();
        let store = Arc::clone(&self.transport.store);
        let (topic_id, group_id, want, deadline_ms) =
            (self.topic.id, self.group_id, permits.len(), self.deadline_ms);
        let name = self.topic.name.clone();
        let handle = tokio::spawn(async move {
            store
                .run(Op::Receive, Some(&name), move |conn| {
                    log::fetch(conn, topic_id, group_id, want, deadline_ms)
                })
                .await
        });
        self.inflight = Some(Inflight { handle, permits, changes });
    }

    /// Waits until something may be deliverable: a wake from this process, the next due
    /// time, the poll interval, or close.
    async fn idle(&mut self, changes: u64, next_due: Option<i64>) {
        let topic = Arc::clone(&self.topic);
        let notified = topic.notify().notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if topic.changes() != changes {
            return;
        }
        let wait = match next_due {
            Some(due) => POLL.min(Duration::from_millis(u64::try_from(due - now_ms()).unwrap_or(0).max(1))),
            None => POLL,
        };
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep(wait) => {}
            _ = self.closed_rx.wait_for(|closed| *closed) => {}
        }
    }

    /// Gives back every lease fetched but not handed out.
    async fn release_held(&mut self) {
        let mut held: Vec<Leased> = self.ready.drain(..).map(|(leased, _)| leased).collect();
        if let Some(inflight) = self.inflight.take()
            && let Ok(Ok(fetched)) = inflight.handle.await
        {
            held.extend(fetched.leased);
        }
        give_back(Arc::clone(&self.transport.store), Arc::clone(&self.topic), self.group_id, held).await;
    }
}

async fn give_back(store: Arc<Store>, topic: Arc<TopicHandle>, group_id: i64, held: Vec<Leased>) {
    if held.is_empty() {
        return;
    }
    let leases: Vec<_> = held.iter().map(|l| (l.seq, l.lease, l.available_before)).collect();
    match store.run(Op::Close, Some(&topic.name), move |conn| log::release(conn, group_id, &leases)).await {
        Ok(()) => topic.wake(),
        Err(err) => {
            tracing::warn!(error = %err, "unused leases were not given back; they expire at their ack deadline")
        }
    }
}

#[async_trait]
impl Subscription for EmbeddedSubscription {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        loop {
            if self.is_closed() {
                self.release_held().await;
                return None;
            }
            if let Some((leased, permit)) = self.ready.pop_front() {
                self.fetch_ahead();
                match self.renew_if_old(&leased).await {
                    Ok(true) => return Some(Ok(self.deliver(leased, permit))),
                    Ok(false) => continue,
                    Err(err) => return Some(Err(err)),
                }
            }
            let Some(inflight) = self.inflight.as_mut() else {
                self.start_fetch().await;
                continue;
            };
            let joined = (&mut inflight.handle).await;
            let Some(Inflight { permits, changes, .. }) = self.inflight.take() else { continue };
            let fetched = match joined {
                Ok(Ok(fetched)) => fetched,
                Ok(Err(err)) => return Some(Err(err)),
                Err(err) => {
                    let target = self.transport.store.target(Some(&self.topic.name));
                    return Some(Err(Error::transport(
                        Op::Receive,
                        target,
                        format!("fetch task failed: {err}"),
                    )));
                }
            };
            let Fetched { leased, more, next_due } = fetched;
            if leased.is_empty() && !more {
                drop(permits);
                self.idle(changes, next_due).await;
                continue;
            }
            // Fetches never lease more than they hold permits for; unused permits go back.
            self.ready.extend(leased.into_iter().zip(permits));
        }
    }

    async fn close(&mut self) -> Result<()> {
        self.closed = true;
        self.release_held().await;
        Ok(())
    }
}

impl Drop for EmbeddedSubscription {
    fn drop(&mut self) {
        let mut held: Vec<Leased> = self.ready.drain(..).map(|(leased, _)| leased).collect();
        let inflight = self.inflight.take();
        if held.is_empty() && inflight.is_none() {
            return;
        }
        // Best effort: without a runtime the leases simply expire at their deadline.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (store, topic, group_id) =
                (Arc::clone(&self.transport.store), Arc::clone(&self.topic), self.group_id);
            runtime.spawn(async move {
                if let Some(inflight) = inflight
                    && let Ok(Ok(fetched)) = inflight.handle.await
                {
                    held.extend(fetched.leased);
                }
                give_back(store, topic, group_id, held).await;
            });
        }
    }
}

/// Settles one delivery: its lease token proves it is still this member's.
struct EmbeddedAcker {
    store: Arc<Store>,
    topic: Arc<TopicHandle>,
    group_id: i64,
    seq: i64,
    lease: i64,
    message_id: String,
    key: Option<String>,
    /// Frees a prefetch slot of the subscription when the delivery is settled or dropped.
    _permit: OwnedSemaphorePermit,
}

impl EmbeddedAcker {
    fn settlement(&self, settle: Settle) -> Settlement {
        Settlement { group_id: self.group_id, seq: self.seq, lease: self.lease, settle }
    }

    fn settled(&self, outcome: Settled) -> Result<()> {
        match outcome {
            Settled::Done(wake) => {
                if wake {
                    self.topic.wake();
                }
                Ok(())
            }
            Settled::LeaseLost => Err(Error::LeaseLost(self.message_id.clone())),
        }
    }
}

#[async_trait]
impl Acker for EmbeddedAcker {
    async fn ack(self: Box<Self>) -> Result<()> {
        let key = self.key.clone();
        let outcome =
            self.store.settle(Op::Ack, &self.topic.name, self.settlement(Settle::Ack { key })).await?;
        self.settled(outcome)
    }

    async fn nack(self: Box<Self>, delay: Option<Duration>) -> Result<()> {
        let delay_ms = delay.map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let outcome =
            self.store.settle(Op::Nack, &self.topic.name, self.settlement(Settle::Nack { delay_ms })).await?;
        self.settled(outcome)
    }
}
