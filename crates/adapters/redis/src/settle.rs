//! Settling deliveries: ackers queue their settles to one task per member, which sends
//! everything queued so far as one script call and answers each acker with its own outcome.
//!
//! There is no timer: before a call the task only lets the tasks that are already running
//! queue theirs (a subscriber acking what it just received), so a lone settle still goes at
//! once; the settles that queue while a call is in flight go together in the next one (the
//! batching is [`polybus_core::kit::coalesce`]'s, with [`Gather::Yield`]).

use std::sync::Arc;
use std::time::Duration;

use polybus_core::kit::coalesce::{Coalescer, Config, Gather, Pending};
use polybus_core::kit::gate::Slot;
use polybus_core::{Error, FailureKind, Op, Result};

use crate::scripts;
use crate::subscription::Member;
use crate::transport::target;

/// Most settles in one script call (Lua's `unpack` of the acked ids has a limit near 8,000).
const MAX_SETTLES: usize = 1024;
/// Most times the task lets other tasks run to gather more settles before it sends them.
const MAX_YIELDS: usize = 16;

/// How a delivery is settled.
#[derive(Clone, Copy)]
pub(crate) enum Settle {
    /// `XACK`.
    Ack,
    /// Claimable again after `delay_ms`, with `leave_count` as its delivery count.
    Release { delay_ms: u64, leave_count: u32 },
    /// Restart its ack deadline.
    Touch,
}

/// One queued settle.
struct Request {
    op: Op,
    entry: String,
    count: u32,
    how: Settle,
    /// The prefetch slot the delivery holds, freed with the others of its call.
    permit: Option<Slot>,
}

/// A member's settle queue; its task ends once every handle is dropped.
pub(crate) struct Settler {
    member: Arc<Member>,
    queue: Coalescer<Request, Result<bool>>,
}

impl Settler {
    /// Starts the settling task of `member`.
    pub fn start(member: Arc<Member>) -> Arc<Settler> {
        let flushed = member.clone();
        let flush = move |batch: Vec<Request>| {
            let member = flushed.clone();
            async move { settle_batch(&member, batch).await }
        };
        let config = Config::new(MAX_SETTLES).gather(Gather::Yield(MAX_YIELDS));
        Arc::new(Settler { member, queue: Coalescer::start(config, flush) })
    }

    /// The member whose deliveries this settles.
    pub fn member(&self) -> &Arc<Member> {
        &self.member
    }

    /// Settles `entry` (delivered `count` times), freeing `permit` once Redis has answered;
    /// `Ok(false)` when this delivery no longer holds the entry.
    pub async fn settle(
        &self,
        op: Op,
        entry: String,
        count: u32,
        how: Settle,
        permit: Option<Slot>,
    ) -> Result<bool> {
        let outcome = self.enqueue(op, entry, count, how, permit)?;
        self.outcome(op, outcome).await
    }

    /// Hands entries that never reached the subscriber back to the group, uncounted.
    pub async fn put_back(&self, entries: impl IntoIterator<Item = (String, u32)>) {
        let mut queued = Vec::new();
        for (entry, count) in entries {
            let how = Settle::Release { delay_ms: 0, leave_count: count.saturating_sub(1) };
            queued.push((entry.clone(), self.enqueue(Op::Nack, entry, count, how, None)));
        }
        for (entry, outcome) in queued {
            let outcome = match outcome {
                Ok(outcome) => self.outcome(Op::Nack, outcome).await,
                Err(e) => Err(e),
            };
            if let Err(e) = outcome {
                tracing::warn!(stream = %self.member.stream, group = %self.member.group, %entry, error = %e,
                    "could not hand an undelivered entry back; it returns after the ack deadline");
            }
        }
    }

    fn enqueue(
        &self,
        op: Op,
        entry: String,
        count: u32,
        how: Settle,
        permit: Option<Slot>,
    ) -> Result<Pending<Result<bool>>> {
        self.queue
            .submit(Request { op, entry, count, how, permit })
            .map_err(|_| self.member.error(op, "the settling task has stopped; settle again later"))
    }

    async fn outcome(&self, op: Op, outcome: Pending<Result<bool>>) -> Result<bool> {
        outcome.await.map_err(|_| self.member.error(op, "the settling task stopped before answering"))?
    }
}

/// Where a settle goes in the script's arguments: acks of first deliveries, other acks, the rest.
fn section(how: Settle, count: u32) -> u8 {
    match how {
        Settle::Ack if count == 1 => 0,
        Settle::Ack => 1,
        Settle::Release { .. } | Settle::Touch => 2,
    }
}

/// Runs one settle script for all of `batch`; the outcome of each request, in order.
async fn settle_batch(member: &Member, mut batch: Vec<Request>) -> Vec<Result<bool>> {
    // The script takes its sections in order; the sort is stable, so each keeps its order.
    let mut order: Vec<usize> = (0..batch.len()).collect();
    order.sort_by_key(|&at| section(batch[at].how, batch[at].count));
    let sorted = || order.iter().map(|&at| &batch[at]);
    let firsts = sorted().take_while(|request| section(request.how, request.count) == 0).count();
    let acks = sorted().take_while(|request| matches!(request.how, Settle::Ack)).count();
    let (lowest, highest) = id_range(batch.iter().map(|request| request.entry.as_str()));
    let mut cmd = scripts::evalsha(&scripts::SETTLE, 2);
    cmd.arg(&member.stream)
        .arg(&member.retry_key)
        .arg(&member.group)
        .arg(&member.consumer)
        .arg(member.ack_deadline_ms)
        .arg(firsts)
        .arg(acks)
        .arg(lowest)
        .arg(highest);
    for request in sorted() {
        match request.how {
            Settle::Ack if request.count == 1 => cmd.arg(&request.entry),
            Settle::Ack => cmd.arg(&request.entry).arg(request.count),
            Settle::Release { delay_ms, leave_count } => {
                cmd.arg("r").arg(&request.entry).arg(request.count).arg(delay_ms).arg(leave_count)
            }
            Settle::Touch => cmd.arg("t").arg(&request.entry).arg(request.count).arg(0).arg(0),
        };
    }
    let cmd = &cmd;
    let sent = member
        .shared
        .retrying(Op::Ack, &member.stream, |mut conn| async move {
            scripts::run::<Vec<i64>>(&scripts::SETTLE, cmd, &mut conn).await
        })
        .await;
    // Every slot of the call is freed at once, so the next fetch asks for them all.
    let mut freed: Option<Slot> = None;
    for permit in batch.iter_mut().filter_map(|request| request.permit.take()) {
        match &mut freed {
            Some(freed) => freed.merge(permit),
            None => freed = Some(permit),
        }
    }
    drop(freed);
    let (failed, retried) = match sent {
        Ok(sent) => sent,
        Err(Error::Transport { message, kind, .. }) => return answer_failed(member, &batch, &message, kind),
        Err(e) => return answer_failed(member, &batch, &e.to_string(), FailureKind::Unknown),
    };
    // The script's outcomes are by place in the sorted arguments.
    let mut outcomes = vec![1; batch.len()];
    for pair in failed.chunks(2) {
        match (pair, usize::try_from(pair[0]).ok().and_then(|at| outcomes.get_mut(at))) {
            ([_, outcome], Some(slot)) => *slot = *outcome,
            _ => {
                return answer_failed(
                    member,
                    &batch,
                    "unexpected reply to the settle script",
                    FailureKind::Invalid,
                );
            }
        }
    }
    let mut held_at = vec![false; batch.len()];
    for (&at, outcome) in order.iter().zip(outcomes) {
        let request = &batch[at];
        // 0 is "no longer pending": after a lost connection, most likely because the first
        // attempt did settle it.
        let held = outcome == 1 || (outcome == 0 && retried && !matches!(request.how, Settle::Touch));
        if let (true, Settle::Release { delay_ms, .. }) = (held, request.how) {
            // The released entry is claimable after its delay: fetch no later.
            member.claim_within(Duration::from_millis(delay_ms));
        }
        held_at[at] = held;
    }
    held_at.into_iter().map(Ok).collect()
}

/// The lowest and highest of stream entry ids (`<ms>-<seq>`); the whole stream when one
/// does not parse.
fn id_range<'a>(ids: impl Iterator<Item = &'a str>) -> (String, String) {
    let mut range: Option<((u64, u64), (u64, u64))> = None;
    for id in ids {
        let Some(key) = id.split_once('-').and_then(|(ms, seq)| Some((ms.parse().ok()?, seq.parse().ok()?)))
        else {
            return ("-".to_owned(), "+".to_owned());
        };
        range = Some(match range {
            Some((low, high)) => (low.min(key), high.max(key)),
            None => (key, key),
        });
    }
    match range {
        Some(((lms, lseq), (hms, hseq))) => (format!("{lms}-{lseq}"), format!("{hms}-{hseq}")),
        None => ("-".to_owned(), "+".to_owned()),
    }
}

/// The same failure for every request of `batch`.
fn answer_failed(member: &Member, batch: &[Request], message: &str, kind: FailureKind) -> Vec<Result<bool>> {
    batch
        .iter()
        .map(|request| Err(Error::transport(request.op, target(&member.stream), message).with_kind(kind)))
        .collect()
}
