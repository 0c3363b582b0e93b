//! A broker restarted (or crashed) while messages are being published and consumed, on the
//! target's private broker: every publish that returned Ok is delivered after the restart; a
//! publish during the outage succeeds once the broker is back or fails with an error within
//! its deadline, never hangs and never vanishes. Duplicates are counted and reported.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use polybus::{Bus, Message, Subscriber};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::fixture::{ACK_DEADLINE, Ctx, ENV};
use crate::private::Stop;
use crate::reliability::{FaultFigures, report_fault};

/// Group members consuming throughout.
const MEMBERS: usize = 2;
/// Publishing tasks, each one publish at a time.
const PUBLISHERS: usize = 4;
/// Publishes that must have returned Ok before the broker goes down.
const BEFORE: usize = 200;
/// Publishes that must return Ok after the broker serves again.
const AFTER: usize = 200;
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

/// What happened, in the order the case saw it.
pub(crate) enum Event {
    /// A publish returned.
    Published { id: String, result: Result<(), String> },
    /// A publish neither succeeded nor failed within [`PUBLISH_DEADLINE`].
    Hung { id: String },
    /// A member received (and tried to ack) a message.
    Received { id: String },
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
                            if delivery.ack().await.is_err() {
                                ack_errors.fetch_add(1, Ordering::Relaxed);
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

/// Publishers of numbered messages `<prefix>-<n>` that go on until `stop` is set, each
/// reporting every publish as an [`Event`] and pausing for [`BACKOFF`] after a failure.
fn spawn_publishers(
    bus: &Bus,
    event: &str,
    prefix: &str,
    stop: Arc<AtomicBool>,
    events: mpsc::UnboundedSender<Event>,
) -> Vec<JoinHandle<()>> {
    let next = Arc::new(AtomicU64::new(0));
    (0..PUBLISHERS)
        .map(|_| {
            let (bus, event, prefix) = (bus.clone(), event.to_owned(), prefix.to_owned());
            let (stop, events, next) = (stop.clone(), events.clone(), next.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let id = format!("{prefix}-{}", next.fetch_add(1, Ordering::Relaxed));
                    let message = Message::text(format!("message {id}")).id(id.clone());
                    match tokio::time::timeout(PUBLISH_DEADLINE, bus.publish(ENV, &event, message)).await {
                        Ok(Ok(_)) => {
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
    /// A message published after the broker served again has arrived: consuming resumed.
    new_message_arrived: bool,
    first_ok_after_ready: Option<Instant>,
    first_delivery_after_ready: Option<Instant>,
}

impl Record {
    /// Takes one event in; panics on the ones that fail the case at once.
    fn take(&mut self, event: Event) {
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
                assert!(!error.trim().is_empty(), "publish of {id} failed with an empty error");
                self.failed.push((id, error));
            }
            Event::Hung { id } => {
                panic!("publish of {id} neither succeeded nor failed within {PUBLISH_DEADLINE:?}")
            }
            Event::Received { id } => {
                if let (Some(ready), Some(published)) = (self.ready_at, self.ok_at.get(&id)) {
                    self.new_message_arrived |= *published >= ready;
                }
                *self.deliveries.entry(id).or_default() += 1;
                if after_ready {
                    self.first_delivery_after_ready.get_or_insert(now);
                }
            }
            Event::ReceiveFailed { member, error } => self.receive_errors.push((member, error)),
            Event::Closed { member } => {
                panic!("member {member}'s subscription ended at the restart instead of reconnecting")
            }
            Event::Stopped => self.stopped_at = Some(now),
            Event::Ready => self.ready_at = Some(now),
            Event::RestartFailed(e) => panic!("restarting the private broker: {e}"),
        }
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
            Ok(Some(event)) => record.take(event),
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

/// The restart case, stopping the broker `how`.
pub(crate) async fn broker_restart_mid_publish_and_mid_consume(ctx: Ctx, how: Stop) {
    let broker = ctx.private.clone().expect("the harness runs this case only with a private broker");
    let (case, fault) = match how {
        Stop::Graceful => (RESTART_CASE, "broker restart"),
        Stop::Kill => (CRASH_CASE, "broker crash (SIGKILL)"),
    };
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let ack_errors = Arc::new(AtomicU64::new(0));
    let mut subs = Vec::with_capacity(MEMBERS);
    for _ in 0..MEMBERS {
        subs.push(ctx.subscribe("workers").await);
    }
    let members = spawn_members(subs, HANDLING, events_tx.clone(), ack_errors.clone());
    let stop_publishing = Arc::new(AtomicBool::new(false));
    let publishers =
        spawn_publishers(&ctx.bus, &ctx.event, &ctx.id, stop_publishing.clone(), events_tx.clone());

    let mut record = Record::default();
    // Mid-publish and mid-consume: publishes go on, deliveries have begun and some wait.
    until(&mut events, &mut record, Duration::from_secs(30), "the first messages to flow", |r| {
        r.ok.len() >= BEFORE && r.deliveries.len() >= 20
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let backlog = record.ok.len() - record.deliveries.len();
    let restarter = {
        let (broker, events) = (broker.clone(), events_tx.clone());
        tokio::task::spawn_blocking(move || {
            if let Err(e) = broker.stop(how) {
                let _ = events.send(Event::RestartFailed(format!("stopping: {e}")));
                return;
            }
            let _ = events.send(Event::Stopped);
            std::thread::sleep(OUTAGE);
            let _ = events.send(match broker.start() {
                Ok(()) => Event::Ready,
                Err(e) => Event::RestartFailed(format!("starting again: {e}")),
            });
        })
    };
    drop(events_tx);
    // Publishing goes on until consuming resumed too, so messages published before and after
    // the members are back are both checked.
    let what = "publishes to succeed, and one of them to arrive, after the restart";
    until(&mut events, &mut record, Duration::from_secs(120), what, |r| {
        r.ok_after_ready >= AFTER && r.new_message_arrived
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    stop_publishing.store(true, Ordering::Relaxed);
    let _ = restarter.await;
    let published = futures::future::join_all(publishers);
    tokio::pin!(published);
    // Publishers finish their last publish; events keep coming meanwhile.
    loop {
        tokio::select! {
            _ = &mut published => break,
            Some(event) = events.recv() => record.take(event),
        }
    }
    // Not failing yet: the figures are reported first, losses included.
    let settled = until(&mut events, &mut record, SETTLE, "every message published Ok to arrive", |r| {
        r.missing().is_empty()
    })
    .await;
    // Long enough for an unacked delivery to come back once more.
    let linger_until = Instant::now() + ACK_DEADLINE + LINGER;
    while let Ok(Some(event)) = tokio::time::timeout_at(linger_until, events.recv()).await {
        record.take(event);
    }
    for member in members {
        member.abort();
    }

    let ready_at = record.ready_at.expect("the broker served again");
    let recover = record
        .first_ok_after_ready
        .max(record.first_delivery_after_ready)
        .map(|flowing| flowing.saturating_duration_since(ready_at));
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
        "{fault} on the private {}: backlog of {backlog} at the stop; {} publishes failed ({arrived_anyway} of them \
         arrived anyway), errors: {:?}; {} receive errors (first: {:?}); {} failed acks",
        broker.name(),
        record.failed.len(),
        &errors[..errors.len().min(3)],
        record.receive_errors.len(),
        record.receive_errors.first(),
        ack_errors.load(Ordering::Relaxed),
    );
    report_fault(case, &figures);
    let strangers: Vec<_> = record
        .deliveries
        .keys()
        .filter(|id| !record.ok.contains(*id) && !record.failed.iter().any(|(f, _)| f == *id))
        .collect();
    assert!(strangers.is_empty(), "messages no one published arrived: {strangers:?}");
    if let Err(e) = settled {
        let [before, during, after] = record.missing_by_phase();
        panic!(
            "{e}; of the missing, {before} were published before the stop, {during} during the outage, {after} \
             after the broker served again (first missing: {:?})",
            record.missing().first()
        );
    }
}
