//! A broker restarted (or crashed) while messages are being published and consumed, on the
//! target's private broker: every publish that returned Ok is delivered after the restart; a
//! publish during the outage succeeds once the broker is back or fails with an error within
//! its deadline, never hangs and never vanishes. Duplicates are counted and reported.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use polybus::{Bus, Message, Subscriber};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use crate::fixture::{ACK_DEADLINE, Ctx, ENV};
use crate::private::Stop;
use crate::reliability::{FaultFigures, report_fault};

/// Group members consuming throughout.
const MEMBERS: usize = 2;
/// Publishing tasks, each one publish at a time.
const PUBLISHERS: usize = 4;
/// Publishes that must have returned Ok before the broker goes down.
const BEFORE: usize = 200;
/// Most publishes started while the broker is down; then the publishers wait for it.
const DURING: usize = 200;
/// Publishes that must return Ok after the broker serves again; then the publishers stop.
const AFTER: usize = 200;
/// Most publishes started in all: the case never floods a broker, however fast it answers.
const MAX_PUBLISHES: usize = 2_000;
/// Each publisher starts a publish at most this often (4 publishers: 160 a second), so the
/// publishes spread across the outage.
const PACE: Duration = Duration::from_millis(25);
/// How long the broker stays down.
const OUTAGE: Duration = Duration::from_secs(1);
/// Longest a single publish may take to succeed or fail: beyond Kafka's 30 s message timeout.
const PUBLISH_DEADLINE: Duration = Duration::from_secs(45);
/// Time a member spends on a message before acking it, so deliveries are in flight at the
/// restart and a backlog waits in the broker.
const HANDLING: Duration = Duration::from_millis(3);
/// How long a publisher waits after a failed publish, as an application would.
const BACKOFF: Duration = Duration::from_millis(200);
/// Longest the messages may take to arrive once publishing stopped.
const SETTLE: Duration = Duration::from_secs(60);
/// How long the case keeps listening after everything arrived, to count late duplicates.
const LINGER: Duration = Duration::from_millis(1500);
/// Longest an ack may take to succeed or fail, an outage included; one that never returns stops
/// its member for good.
const ACK_DEADLINE_WAIT: Duration = Duration::from_secs(30);
/// Kept from the case's limit for stopping, reporting and closing.
const MARGIN: Duration = Duration::from_secs(15);

/// What happened, in the order the case saw it.
pub(crate) enum Event {
    /// A publish returned.
    Published { id: String, result: Result<(), String> },
    /// A publish neither succeeded nor failed within [`PUBLISH_DEADLINE`].
    Hung { id: String },
    /// A publisher is done: [`AFTER`] of its group's publishes succeeded after the restart, or
    /// [`MAX_PUBLISHES`] were started.
    PublisherDone,
    /// A member received (and tried to ack) a message.
    Received { id: String },
    /// A member's ack neither succeeded nor failed within [`ACK_DEADLINE_WAIT`].
    AckHung { member: usize, id: String },
    /// A member's receive failed; it goes on.
    ReceiveFailed { member: usize, error: String },
    /// A member's subscription ended.
    Closed { member: usize },
    /// The broker is down.
    Stopped,
    /// The broker serves again.
    Ready,
    /// Stopping or starting the broker failed.
    RestartFailed(String),
}

/// Members of one group that report each delivery as an [`Event`], ack after `handling`, and
/// keep going after a failed receive (the adapter reconnects).
pub(crate) fn spawn_members(
    subscribers: Vec<Subscriber>,
    handling: Duration,
    events: mpsc::UnboundedSender<Event>,
    ack_errors: Arc<AtomicU64>,
) -> Vec<JoinHandle<()>> {
    subscribers
        .into_iter()
        .enumerate()
        .map(|(member, mut sub)| {
            let (events, ack_errors) = (events.clone(), ack_errors.clone());
            tokio::spawn(async move {
                while let Some(next) = sub.next().await {
                    match next {
                        Ok(delivery) => {
                            if !handling.is_zero() {
                                tokio::time::sleep(handling).await;
                            }
                            let id = delivery.id.clone();
                            // A failed ack brings the message back: a duplicate, not a loss.
                            match tokio::time::timeout(ACK_DEADLINE_WAIT, delivery.ack()).await {
                                Ok(Ok(())) => {}
                                Ok(Err(_)) => {
                                    ack_errors.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(_) => {
                                    let _ = events.send(Event::AckHung { member, id });
                                    return;
                                }
                            }
                            if events.send(Event::Received { id }).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            let _ = events.send(Event::ReceiveFailed { member, error: e.to_string() });
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
                let _ = events.send(Event::Closed { member });
            })
        })
        .collect()
}

/// Where the restart is, for the publishers: they publish freely before it, at most
/// [`DURING`] times while the broker is down, and until [`AFTER`] succeeded once it is back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Before,
    Down,
    Up,
}

/// Publishers of numbered messages `<prefix>-<n>`, paced by [`PACE`], each reporting every
/// publish as an [`Event`] and pausing for [`BACKOFF`] after a failure.
fn spawn_publishers(
    bus: &Bus,
    event: &str,
    prefix: &str,
    phase: watch::Receiver<Phase>,
    events: mpsc::UnboundedSender<Event>,
) -> Vec<JoinHandle<()>> {
    let started = Arc::new(AtomicUsize::new(0));
    let during = Arc::new(AtomicUsize::new(0));
    let ok_after = Arc::new(AtomicUsize::new(0));
    (0..PUBLISHERS)
        .map(|_| {
            let (bus, event, prefix) = (bus.clone(), event.to_owned(), prefix.to_owned());
            let (mut phase, events) = (phase.clone(), events.clone());
            let (started, during, ok_after) = (started.clone(), during.clone(), ok_after.clone());
            tokio::spawn(async move {
                let mut pace = tokio::time::interval(PACE);
                pace.set_missed_tick_behavior(MissedTickBehavior::Delay);
                loop {
                    pace.tick().await;
                    let now = *phase.borrow();
                    match now {
                        Phase::Before => {}
                        Phase::Down if during.fetch_add(1, Ordering::Relaxed) < DURING => {}
                        Phase::Down => {
                            // Enough publishes into the outage: wait for the broker.
                            let _ = phase.wait_for(|p| *p == Phase::Up).await;
                            continue;
                        }
                        Phase::Up if ok_after.load(Ordering::Relaxed) < AFTER => {}
                        Phase::Up => break,
                    }
                    let n = started.fetch_add(1, Ordering::Relaxed);
                    if n >= MAX_PUBLISHES {
                        break;
                    }
                    let id = format!("{prefix}-{n}");
                    let message = Message::text(format!("message {id}")).id(id.clone());
                    match tokio::time::timeout(PUBLISH_DEADLINE, bus.publish(ENV, &event, message)).await {
                        Ok(Ok(_)) => {
                            if now == Phase::Up {
                                ok_after.fetch_add(1, Ordering::Relaxed);
                            }
                            let _ = events.send(Event::Published { id, result: Ok(()) });
                        }
                        Ok(Err(e)) => {
                            let _ = events.send(Event::Published { id, result: Err(e.to_string()) });
                            tokio::time::sleep(BACKOFF).await;
                        }
                        Err(_) => {
                            let _ = events.send(Event::Hung { id });
                            return;
                        }
                    }
                }
                let _ = events.send(Event::PublisherDone);
            })
        })
        .collect()
}

/// What the case saw, tallied as the events come.
#[derive(Default)]
struct Record {
    ok: HashSet<String>,
    /// When each Ok publish returned.
    ok_at: HashMap<String, Instant>,
    stopped_at: Option<Instant>,
    failed: Vec<(String, String)>,
    deliveries: HashMap<String, u64>,
    receive_errors: Vec<(usize, String)>,
    ready_at: Option<Instant>,
    ok_after_ready: usize,
    first_ok_after_ready: Option<Instant>,
    first_delivery_after_ready: Option<Instant>,
    publishers_done: usize,
}

impl Record {
    /// Takes one event in; the error is an event that fails the case at once.
    fn take(&mut self, event: Event) -> Result<(), String> {
        let now = Instant::now();
        let after_ready = self.ready_at.is_some();
        match event {
            Event::Published { id, result: Ok(()) } => {
                self.ok_at.insert(id.clone(), now);
                self.ok.insert(id);
                if after_ready {
                    self.ok_after_ready += 1;
                    self.first_ok_after_ready.get_or_insert(now);
                }
            }
            Event::Published { id, result: Err(error) } => {
                if error.trim().is_empty() {
                    return Err(format!("publish of {id} failed with an empty error"));
                }
                self.failed.push((id, error));
            }
            Event::Hung { id } => {
                return Err(format!(
                    "publish of {id} neither succeeded nor failed within {PUBLISH_DEADLINE:?}"
                ));
            }
            Event::PublisherDone => self.publishers_done += 1,
            Event::Received { id } => {
                *self.deliveries.entry(id).or_default() += 1;
                if after_ready {
                    self.first_delivery_after_ready.get_or_insert(now);
                }
            }
            Event::AckHung { member, id } => {
                return Err(format!(
                    "member {member}'s ack of {id} neither succeeded nor failed within {ACK_DEADLINE_WAIT:?}"
                ));
            }
            Event::ReceiveFailed { member, error } => self.receive_errors.push((member, error)),
            Event::Closed { member } => {
                return Err(format!(
                    "member {member}'s subscription ended at the restart instead of reconnecting"
                ));
            }
            Event::Stopped => self.stopped_at = Some(now),
            Event::Ready => self.ready_at = Some(now),
            Event::RestartFailed(e) => return Err(format!("restarting the private broker: {e}")),
        }
        Ok(())
    }

    fn missing(&self) -> Vec<&String> {
        self.ok.iter().filter(|id| !self.deliveries.contains_key(*id)).collect()
    }

    /// Missing messages by when their publish returned: before the stop, during the outage,
    /// after the broker served again.
    fn missing_by_phase(&self) -> [usize; 3] {
        let mut phases = [0; 3];
        for id in self.missing() {
            let at = self.ok_at[id];
            let phase = match (self.stopped_at, self.ready_at) {
                (Some(stop), _) if at < stop => 0,
                (_, Some(ready)) if at >= ready => 2,
                _ => 1,
            };
            phases[phase] += 1;
        }
        phases
    }
}

/// Takes events into `record` until `done` holds; the error says what it was waiting for.
async fn until(
    events: &mut mpsc::UnboundedReceiver<Event>,
    record: &mut Record,
    limit: Duration,
    what: &str,
    done: impl Fn(&Record) -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    while !done(record) {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(event)) => record.take(event)?,
            Ok(None) => return Err(format!("every publisher and member stopped while waiting for {what}")),
            Err(_) => {
                return Err(format!(
                    "timed out after {limit:?} waiting for {what}: {} published ok, {} failed (last error: \
                     {:?}), {} distinct received, {} still missing; last receive error: {:?}",
                    record.ok.len(),
                    record.failed.len(),
                    record.failed.last().map(|(_, e)| e),
                    record.deliveries.len(),
                    record.missing().len(),
                    record.receive_errors.last(),
                ));
            }
        }
    }
    Ok(())
}

/// Longest a restart case may take, broker start-up included.
pub(crate) const RESTART_LIMIT: Duration = Duration::from_secs(180);
/// Name of the case that stops the broker gracefully.
pub(crate) const RESTART_CASE: &str = "broker_restart_mid_publish_and_mid_consume_loses_nothing";
/// Name of the case that kills the broker.
pub(crate) const CRASH_CASE: &str = "broker_crash_mid_publish_and_mid_consume_loses_nothing";

/// The restart case, stopping the broker `how`. Its figures are reported whatever happens.
pub(crate) async fn broker_restart_mid_publish_and_mid_consume(ctx: Ctx, how: Stop) {
    let deadline = Instant::now() + RESTART_LIMIT - MARGIN;
    let broker = ctx.private.clone().expect("the harness runs this case only with a private broker");
    let (case, fault) = match how {
        Stop::Graceful => (RESTART_CASE, "broker restart"),
        Stop::Kill => (CRASH_CASE, "broker crash (SIGKILL)"),
    };
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let ack_errors = Arc::new(AtomicU64::new(0));
    let subs = ctx.subscribe_together(&ctx.event, &ctx.options("workers"), MEMBERS).await;
    let members = spawn_members(subs, HANDLING, events_tx.clone(), ack_errors.clone());
    if let (Stop::Kill, Some((after, why))) = (how, broker.crash_settle()) {
        eprintln!("{fault}: waiting {after:?} after subscribing before the crash: {why}");
        tokio::time::sleep(after).await;
    }
    let (phase, phase_rx) = watch::channel(Phase::Before);
    let phase = Arc::new(phase);
    let publishers = spawn_publishers(&ctx.bus, &ctx.event, &ctx.id, phase_rx, events_tx.clone());

    let mut record = Record::default();
    let mut backlog = 0;
    let mut restarter = None;
    let outcome = async {
        // Mid-publish and mid-consume: publishes go on, deliveries have begun and some wait.
        let limit = Duration::from_secs(30).min(deadline.saturating_duration_since(Instant::now()));
        until(&mut events, &mut record, limit, "the first messages to flow", |r| {
            r.ok.len() >= BEFORE && r.deliveries.len() >= 20
        })
        .await?;
        backlog = record.ok.len() - record.deliveries.len();
        restarter = Some({
            let (broker, events, phase) = (broker.clone(), events_tx.clone(), phase.clone());
            tokio::task::spawn_blocking(move || {
                phase.send_replace(Phase::Down);
                if let Err(e) = broker.stop(how) {
                    let _ = events.send(Event::RestartFailed(format!("stopping: {e}")));
                    return;
                }
                let _ = events.send(Event::Stopped);
                std::thread::sleep(OUTAGE);
                match broker.start() {
                    Ok(()) => {
                        let _ = events.send(Event::Ready);
                        phase.send_replace(Phase::Up);
                    }
                    Err(e) => {
                        let _ = events.send(Event::RestartFailed(format!("starting again: {e}")));
                    }
                }
            })
        });
        // Publishing goes on after the broker is back, so messages published before, during
        // and after the outage are all checked.
        let what =
            format!("the publishers to finish ({AFTER} Ok after the restart, or {MAX_PUBLISHES} in all)");
        until(&mut events, &mut record, deadline.saturating_duration_since(Instant::now()), &what, |r| {
            r.publishers_done == PUBLISHERS
        })
        .await?;
        if record.ok_after_ready == 0 {
            return Err(format!(
                "no publish succeeded after the broker served again ({MAX_PUBLISHES} publishes in all)"
            ));
        }
        let limit = SETTLE.min(deadline.saturating_duration_since(Instant::now()));
        until(&mut events, &mut record, limit, "every message published Ok to arrive", |r| {
            r.missing().is_empty()
        })
        .await?;
        // Long enough for an unacked delivery to come back once more.
        let linger_until = (Instant::now() + ACK_DEADLINE + LINGER).min(deadline);
        while let Ok(Some(event)) = tokio::time::timeout_at(linger_until, events.recv()).await {
            record.take(event)?;
        }
        Ok(())
    }
    .await;
    for task in members.iter().chain(&publishers) {
        task.abort();
    }
    if let Some(restarter) = restarter {
        // The broker's stop and start are bounded by the private broker's own limits.
        let _ = restarter.await;
    }
    while let Ok(event) = events.try_recv() {
        let _ = record.take(event);
    }

    let recover = record.ready_at.and_then(|ready_at| {
        let flowing = record.first_ok_after_ready.max(record.first_delivery_after_ready)?;
        Some(flowing.saturating_duration_since(ready_at))
    });
    let distinct_ok = record.ok.iter().filter(|id| record.deliveries.contains_key(*id)).count();
    let deliveries: u64 = record.deliveries.values().sum();
    let figures = FaultFigures {
        fault: fault.to_owned(),
        sent: record.ok.len() as u64,
        delivered: distinct_ok as u64,
        lost: (record.ok.len() - distinct_ok) as u64,
        duplicates: deliveries - record.deliveries.len() as u64,
        recover,
    };
    let arrived_anyway = record.failed.iter().filter(|(id, _)| record.deliveries.contains_key(id)).count();
    let errors: Vec<&str> =
        record.failed.iter().map(|(_, e)| e.as_str()).collect::<BTreeSet<_>>().into_iter().collect();
    eprintln!(
        "{fault} on the private {}: backlog of {backlog} at the stop; {} publishes Ok, {} after the broker \
         served again; {} failed ({arrived_anyway} of them arrived anyway), errors: {:?}; {} receive errors \
         (first: {:?}); {} failed acks",
        broker.name(),
        record.ok.len(),
        record.ok_after_ready,
        record.failed.len(),
        &errors[..errors.len().min(3)],
        record.receive_errors.len(),
        record.receive_errors.first(),
        ack_errors.load(Ordering::Relaxed),
    );
    report_fault(case, &figures);
    if let Err(e) = outcome {
        let [before, during, after] = record.missing_by_phase();
        panic!(
            "{e}; of the {} missing, {before} were published before the stop, {during} during the outage, \
             {after} after the broker served again (first missing: {:?})",
            record.missing().len(),
            record.missing().first()
        );
    }
    let strangers: Vec<_> = record
        .deliveries
        .keys()
        .filter(|id| !record.ok.contains(*id) && !record.failed.iter().any(|(f, _)| f == *id))
        .collect();
    assert!(strangers.is_empty(), "messages no one published arrived: {strangers:?}");
}
