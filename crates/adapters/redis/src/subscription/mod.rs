//! A group member: a task that fetches (`XREADGROUP` on a connection of its own, and now and
//! then a claim of expired entries first) while the member holds fewer than `prefetch`
//! unsettled deliveries, and the ackers that settle them through the member's [`Settler`].
//!
//! Submodules: [`member`] (who the member is, its group), [`fetch`] (one fetch round:
//! claiming, then reading), [`pump`] (the fetch task), [`reply`] (parsing Redis's replies)
//! and [`acker`].

mod acker;
mod fetch;
mod member;
mod pump;
mod reply;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use polybus_core::kit::gate::{self, Gated, Slot};
use polybus_core::{Delivery, Message, Op, Result, SubscribeOptions, Subscription, TopicSpec};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::scripts;
use crate::settle::{Settle, Settler};
use crate::transport::{CONNECT_TIMEOUT, Shared};

pub(crate) use member::Member;
use pump::{Stop, fetch_loop};
pub(crate) use reply::parse_range;

/// Longest wait of a blocking read: it bounds how late a member notices entries that became
/// claimable (a dead member's, a nacked one) while it was waiting.
const MAX_BLOCK: Duration = Duration::from_secs(1);

/// An entry on its way to the subscriber, with the prefetch slot it occupies.
struct Fetched {
    /// The entry's id.
    id: String,
    /// Times it has been delivered to this group, this delivery included.
    count: u32,
    /// The entry as a message (decoded by the fetch task, off the subscriber's task).
    message: Message,
    slot: Slot,
    /// When it was fetched: its ack deadline runs from then.
    at: Instant,
}

/// A member of a consumer group on one stream.
pub(crate) struct RedisSubscription {
    settler: Arc<Settler>,
    /// What each fetch round got, one message per round.
    deliveries: Gated<Result<Vec<Fetched>>>,
    /// The rest of the round being handed out.
    buffered: VecDeque<Fetched>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    closed: bool,
}

impl RedisSubscription {
    /// Joins (creating when needed) `options.group` on `topic` and starts fetching.
    pub async fn start(
        shared: Arc<Shared>,
        topic: &TopicSpec,
        options: &SubscribeOptions,
    ) -> Result<RedisSubscription> {
        let stream = topic.native_name.clone();
        let ack_deadline = options.ack_deadline.max(Duration::from_millis(1));
        let member = Arc::new(Member {
            delayed_key: scripts::delayed_key(&stream),
            retry_key: scripts::retry_key(&stream, &options.group),
            group: options.group.clone(),
            consumer: options.consumer.clone(),
            ack_deadline,
            ack_deadline_ms: u64::try_from(ack_deadline.as_millis()).unwrap_or(u64::MAX),
            max_block: (ack_deadline / 2).clamp(Duration::from_millis(100), MAX_BLOCK),
            started: Instant::now(),
            claim_at: AtomicU64::new(0),
            stream,
            shared,
        });
        member.create_group().await?;
        let settler = Settler::start(member.clone());
        let prefetch = options.prefetch.max(1);
        let (fetcher, deliveries) = gate::gate(prefetch, prefetch);
        let (stop, stop_rx) = watch::channel(false);
        let stop_rx = Stop { subscription: stop_rx, transport: member.shared.closed.subscribe() };
        let task = tokio::spawn(fetch_loop(settler.clone(), fetcher, stop_rx));
        Ok(RedisSubscription {
            settler,
            deliveries,
            buffered: VecDeque::new(),
            stop,
            task: Some(task),
            closed: false,
        })
    }
}

#[async_trait]
impl Subscription for RedisSubscription {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        if self.closed {
            return None;
        }
        let member = self.settler.member();
        loop {
            let fetched = match self.buffered.pop_front() {
                Some(fetched) => fetched,
                None => match self.deliveries.recv().await? {
                    Ok(round) => {
                        self.buffered = round.into();
                        continue;
                    }
                    Err(e) => return Some(Err(e)),
                },
            };
            // An entry that waited in the buffer for much of its ack deadline gets a fresh one,
            // unless another member took it over meanwhile: then it is not handed out.
            if fetched.at.elapsed() > member.ack_deadline / 2 {
                match self
                    .settler
                    .settle(Op::Receive, fetched.id.clone(), fetched.count, Settle::Touch, None)
                    .await
                {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::debug!(stream = %member.stream, entry = %fetched.id,
                            "a buffered entry was claimed by another member; skipped");
                        continue;
                    }
                    Err(e) => {
                        tracing::debug!(stream = %member.stream, error = %e, "refreshing a buffered entry");
                    }
                }
            }
            return Some(Ok(self.settler.delivery(fetched)));
        }
    }

    async fn close(&mut self) -> Result<()> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        self.stop.send_replace(true);
        // From here the fetch task cannot hand out more; it puts back what it still gets.
        let mut buffered: Vec<Fetched> = self.buffered.drain(..).collect();
        for round in self.deliveries.close() {
            buffered.extend(round.into_iter().flatten());
        }
        self.settler.put_back(buffered.into_iter().map(|fetched| (fetched.id, fetched.count))).await;
        let member = self.settler.member();
        if let Some(task) = self.task.take()
            && tokio::time::timeout(member.max_block + CONNECT_TIMEOUT * 2, task).await.is_err()
        {
            tracing::warn!(stream = %member.stream, "fetch task did not stop in time");
        }
        let forgotten = member
            .shared
            .retrying(Op::Close, &member.stream, |mut conn| async move {
                scripts::FORGET_CONSUMER
                    .key(&member.stream)
                    .arg(&member.group)
                    .arg(&member.consumer)
                    .invoke_async::<i64>(&mut conn)
                    .await
            })
            .await;
        if let Err(e) = forgotten {
            tracing::debug!(stream = %member.stream, error = %e, "removing an idle member from its group");
        }
        Ok(())
    }
}
