//! Settling deliveries: ackers queue their settles to one task per member, which sends
//! everything queued so far as one script call and answers each acker with its own outcome.
//!
//! There is no timer: before a call the task only lets the tasks that are already running
//! queue theirs (a subscriber acking what it just received), so a lone settle still goes at
//! once; the settles that queue while a call is in flight go together in the next one.

use std::sync::Arc;
use std::time::Duration;

use polybus_core::{Error, FailureKind, Op, Result};
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};

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

/// One queued settle and where its outcome goes.
struct Request {
    op: Op,
    entry: String,
    count: u32,
    how: Settle,
    /// The prefetch slot the delivery holds, freed with the others of its call.
    permit: Option<OwnedSemaphorePermit>,
    reply: oneshot::Sender<Result<bool>>,
}

/// A member's settle queue; its task ends once every handle is dropped.
pub(crate) struct Settler {
    member: Arc<Member>,
    queue: mpsc::UnboundedSender<Request>,
}

impl Settler {
    /// Starts the settling task of `member`.
    pub fn start(member: Arc<Member>) -> Arc<Settler> {
        let (queue, requests) = mpsc::unbounded_channel();
        tokio::spawn(flush_loop(member.clone(), requests));
        Arc::new(Settler { member, queue })
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
        permit: Option<OwnedSemaphorePermit>,
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
        permit: Option<OwnedSemaphorePermit>,
    ) -> Result<oneshot::Receiver<Result<bool>>> {
        let (reply, outcome) = oneshot::channel();
        self.queue
            .send(Request { op, entry, count, how, permit, reply })
            .map_err(|_| self.member.error(op, "the settling task has stopped; settle again later"))?;
        Ok(outcome)
    }

    async fn outcome(&self, op: Op, outcome: oneshot::Receiver<Result<bool>>) -> Result<bool> {
        outcome.await.map_err(|_| self.member.error(op, "the settling task stopped before answering"))?
    }
}

/// Sends whatever is queued, one call at a time, until every [`Settler`] handle is dropped.
async fn flush_loop(member: Arc<Member>, mut requests: mpsc::UnboundedReceiver<Request>) {
    let mut batch = Vec::with_capacity(MAX_SETTLES);
    while requests.recv_many(&mut batch, MAX_SETTLES).await > 0 {
        // Ackers running right now (a subscriber acking what it just received) join this
        // call: other tasks run until a round of them adds nothing. No timer, so a lone
        // settle goes at once.
        for _ in 0..MAX_YIELDS {
            tokio::task::yield_now().await;
            let before = batch.len();
            while batch.len() < MAX_SETTLES
                && let Ok(request) = requests.try_recv()
            {
                batch.push(request);
            }
            if batch.len() == before || batch.len() == MAX_SETTLES {
                break;
            }
        }
        settle_batch(&member, &mut batch).await;
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

/// Runs one settle script for all of `batch` and answers (and removes) each request.
async fn settle_batch(member: &Member, batch: &mut Vec<Request>) {
    // The script takes its sections in order; the sort is stable, so each keeps its order.
    batch.sort_by_key(|request| section(request.how, request.count));
    let firsts = batch.iter().take_while(|request| section(request.how, request.count) == 0).count();
    let acks = batch.iter().take_while(|request| matches!(request.how, Settle::Ack)).count();
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
    for request in batch.iter() {
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
    let mut freed: Option<OwnedSemaphorePermit> = None;
    for permit in batch.iter_mut().filter_map(|request| request.permit.take()) {
        match &mut freed {
            Some(freed) => freed.merge(permit),
            None => freed = Some(permit),
        }
    }
    drop(freed);
    let (failed, retried) = match sent {
        Ok(sent) => sent,
        Err(Error::Transport { message, kind, .. }) => return answer_failed(member, batch, &message, kind),
        Err(e) => return answer_failed(member, batch, &e.to_string(), FailureKind::Unknown),
    };
    let mut outcomes = vec![1; batch.len()];
    for pair in failed.chunks(2) {
        match (pair, usize::try_from(pair[0]).ok().and_then(|at| outcomes.get_mut(at))) {
            ([_, outcome], Some(slot)) => *slot = *outcome,
            _ => {
                return answer_failed(
                    member,
                    batch,
                    "unexpected reply to the settle script",
                    FailureKind::Invalid,
                );
            }
        }
    }
    for (request, outcome) in batch.drain(..).zip(outcomes) {
        // 0 is "no longer pending": after a lost connection, most likely because the first
        // attempt did settle it.
        let held = outcome == 1 || (outcome == 0 && retried && !matches!(request.how, Settle::Touch));
        if let (true, Settle::Release { delay_ms, .. }) = (held, request.how) {
            // The released entry is claimable after its delay: fetch no later.
            member.claim_within(Duration::from_millis(delay_ms));
        }
        // An acker that gave up waiting no longer needs its outcome.
        request.reply.send(Ok(held)).ok();
    }
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

/// Answers every request of `batch` with the same failure.
fn answer_failed(member: &Member, batch: &mut Vec<Request>, message: &str, kind: FailureKind) {
    for request in batch.drain(..) {
        let error = Error::transport(request.op, target(&member.stream), message).with_kind(kind);
        request.reply.send(Err(error)).ok();
    }
}
