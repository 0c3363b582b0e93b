//! Faults of whole processes: a group member that is a process of its own, killed with SIGKILL
//! mid-stream, and a group whose members all stop (closed, or killed) and are replaced by new
//! members while messages keep coming.
//!
//! A member process is the test binary itself, run again with [`MEMBER_ENV`] set: it opens the
//! case's registry, joins the group, and for each delivery prints the message id on stdout,
//! then acks it. A printed id may not have been acked; an id never printed was never acked, so
//! the new members must receive it. Those are the cases' exact outcomes: lost (never-printed
//! ids that never arrive) must be 0; duplicates are counted and printed.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use polybus::{Connector, Registry, SqliteStore, SubscribeOptions, Subscriber};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::fixture::{ACK_DEADLINE, Ctx, ENV, OrFail, WAIT, build_bus, within};
use crate::reliability::{FaultFigures, report_fault};

/// The cases' names.
pub(crate) const KILL_CASE: &str = "consumer_process_killed_mid_stream_loses_nothing";
pub(crate) const KILLED_GROUP_CASE: &str =
    "group_replaced_after_its_member_processes_were_killed_loses_nothing";
pub(crate) const CLOSED_GROUP_CASE: &str = "group_replaced_after_its_members_closed_loses_nothing";

/// Set in a member process: what to join, as JSON.
pub(crate) const MEMBER_ENV: &str = "POLYBUS_CONFORMANCE_MEMBER";
/// A member process's first line once it has joined its group.
const JOINED: &str = "joined";
/// Messages each case publishes while its first members work.
const MESSAGES: usize = 300;
/// A member process's pause after each message, so that a kill lands mid-stream.
const PACE: Duration = Duration::from_millis(5);
/// How long new members may take to receive what the stopped ones left: the broker may wait
/// for an ack deadline, a session timeout or a rebalance first.
const RECOVER: Duration = Duration::from_secs(60);
/// How long new members keep listening once everything arrived, to count duplicates.
const LINGER: Duration = Duration::from_millis(1500);

/// Runs this process as a group member when the suite started it as one; `None` otherwise.
pub(crate) fn member_process(connectors: &[Arc<dyn Connector>]) -> Option<ExitCode> {
    let spec = std::env::var(MEMBER_ENV).ok()?;
    // A member outlives no test: it stops when the test binary that started it is gone.
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("member process: starting a runtime: {e}");
            return Some(ExitCode::FAILURE);
        }
    };
    Some(match runtime.block_on(member(&spec, connectors)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("member process: {e}");
            ExitCode::FAILURE
        }
    })
}

/// Joins the group `spec` names; prints each delivery's id, then acks it, until the end.
async fn member(spec: &str, connectors: &[Arc<dyn Connector>]) -> Result<(), String> {
    let spec: Value = serde_json::from_str(spec).map_err(|e| format!("{MEMBER_ENV}: {e}"))?;
    let field =
        |name: &str| spec[name].as_str().map(str::to_owned).ok_or(format!("{MEMBER_ENV}: no `{name}`"));
    let (registry, event, group) = (field("registry")?, field("event")?, field("group")?);
    let store = SqliteStore::open(&PathBuf::from(registry)).await.map_err(|e| e.to_string())?;
    let bus = build_bus(&Registry::new(Arc::new(store)), connectors);
    let options = SubscribeOptions { ack_deadline: ACK_DEADLINE, ..SubscribeOptions::new(group) };
    let mut sub = bus.subscribe(ENV, &event, options).await.map_err(|e| format!("subscribing: {e}"))?;
    let mut out = std::io::stdout().lock();
    let mut say = |line: &str| writeln!(out, "{line}").and_then(|()| out.flush()).map_err(|e| e.to_string());
    say(JOINED)?;
    while let Some(next) = sub.next().await {
        let delivery = next.map_err(|e| format!("receiving: {e}"))?;
        let id = delivery.id.clone();
        say(&id)?;
        delivery.ack().await.map_err(|e| format!("acking {id}: {e}"))?;
        tokio::time::sleep(PACE).await;
    }
    Err("the subscription ended".into())
}

/// Member processes of one group, their printed ids merged into one stream.
struct MemberProcesses {
    children: Vec<Child>,
    lines: mpsc::UnboundedReceiver<(usize, Option<String>)>,
}

impl MemberProcesses {
    /// Starts `count` member processes of group `label`; returns once all have joined.
    async fn start(ctx: &Ctx, label: &str, count: usize) -> MemberProcesses {
        let exe = std::env::current_exe().or_fail("finding the test binary to run a member process");
        let spec = json!({
            "registry": ctx.registry_path().to_string_lossy(),
            "event": ctx.event,
            "group": ctx.group(label),
        })
        .to_string();
        let (tx, lines) = mpsc::unbounded_channel();
        let mut children = Vec::with_capacity(count);
        for n in 0..count {
            let mut child = Command::new(&exe)
                .env(MEMBER_ENV, &spec)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .or_fail("starting a member process");
            let stdout = child.stdout.take().expect("a piped stdout");
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    let _ = tx.send((n, Some(line)));
                }
                let _ = tx.send((n, None));
            });
            children.push(child);
        }
        let mut members = MemberProcesses { children, lines };
        let mut joined = 0;
        while joined < count {
            match within(WAIT * 3, "member processes to join their group", members.lines.recv()).await {
                Some((_, Some(line))) if line == JOINED => joined += 1,
                Some((n, line)) => panic!("member process {n} said {line:?} before joining"),
                None => unreachable!("the test holds a sender"),
            }
        }
        members
    }

    /// Reads printed ids until `after` arrived, kills every member (SIGKILL), and returns every
    /// id they printed, the ones still in the pipes included.
    async fn kill_after(mut self, after: usize) -> HashSet<String> {
        let mut printed = HashSet::new();
        while printed.len() < after {
            let what = format!("{after} ids from the member processes (got {})", printed.len());
            match within(WAIT * 3, &what, self.lines.recv()).await {
                Some((_, Some(id))) => {
                    printed.insert(id);
                }
                Some((n, None)) => panic!("member process {n} ended before it was killed"),
                None => unreachable!("the test holds a sender"),
            }
        }
        for child in &mut self.children {
            child.kill().or_fail("SIGKILL to a member process");
        }
        let mut open = self.children.len();
        while open > 0 {
            match within(WAIT, "the killed member processes' output to end", self.lines.recv()).await {
                Some((_, Some(id))) => {
                    printed.insert(id);
                }
                Some((_, None)) => open -= 1,
                None => unreachable!("the test holds a sender"),
            }
        }
        printed
    }
}

impl Drop for MemberProcesses {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What new members received: deliveries per id.
#[derive(Default)]
struct Received(HashMap<String, usize>);

impl Received {
    fn deliveries(&self) -> usize {
        self.0.values().sum()
    }

    fn duplicates(&self) -> usize {
        self.deliveries() - self.0.len()
    }
}

/// Members that ack every delivery and report it, until they are stopped; then they close.
struct Acking {
    /// Each delivery's id and whether its ack succeeded, or why receiving failed.
    deliveries: mpsc::UnboundedReceiver<Result<(String, bool), String>>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<polybus::Result<()>>>,
}

impl Acking {
    fn spawn(subs: Vec<Subscriber>) -> Acking {
        let (tx, deliveries) = mpsc::unbounded_channel();
        let (stop, stopped) = watch::channel(false);
        let tasks = subs
            .into_iter()
            .map(|mut sub| {
                let (tx, mut stopped) = (tx.clone(), stopped.clone());
                tokio::spawn(async move {
                    loop {
                        let next = tokio::select! {
                            biased;
                            _ = stopped.wait_for(|s| *s) => break,
                            next = sub.next() => next,
                        };
                        match next {
                            Some(Ok(delivery)) => {
                                let id = delivery.id.clone();
                                let acked = delivery.ack().await;
                                if let Err(e) = &acked {
                                    eprintln!("ack of {id} failed (the message comes back): {e}");
                                }
                                let _ = tx.send(Ok((id, acked.is_ok())));
                            }
                            Some(Err(e)) => {
                                let _ = tx.send(Err(format!("receiving: {e}")));
                                break;
                            }
                            None => break,
                        }
                    }
                    within(WAIT, "closing a member", sub.close()).await
                })
            })
            .collect();
        Acking { deliveries, stop, tasks }
    }

    /// The next delivery reported before `until`, if any.
    async fn next_before(&mut self, until: Instant) -> Option<(String, bool)> {
        match tokio::time::timeout_at(until, self.deliveries.recv()).await {
            Ok(Some(Ok(delivery))) => Some(delivery),
            Ok(Some(Err(e))) => panic!("a member: {e}"),
            Ok(None) => panic!("every member stopped"),
            Err(_) => None,
        }
    }

    /// Stops and closes every member; returns what they reported meanwhile.
    async fn stop(mut self) -> Vec<(String, bool)> {
        self.stop.send_replace(true);
        for task in join_all(self.tasks).await {
            task.or_fail("a member task").or_fail("closing a member");
        }
        let mut late = Vec::new();
        while let Ok(Ok(delivery)) = self.deliveries.try_recv() {
            late.push(delivery);
        }
        late
    }
}

/// Receives with `subs` (acking each) until every id of `expected` arrived, then lingers to
/// count duplicates; gives up after [`RECOVER`]. Also returns how long after `since` the last
/// expected id arrived, when all did.
async fn receive_all(
    subs: Vec<Subscriber>,
    expected: &HashSet<String>,
    since: Instant,
) -> (Received, Option<Duration>) {
    let mut members = Acking::spawn(subs);
    let mut received = Received::default();
    let deadline = Instant::now() + RECOVER;
    let mut recovered = None;
    while !expected.iter().all(|id| received.0.contains_key(id)) {
        let Some((id, _)) = members.next_before(deadline).await else { break };
        *received.0.entry(id).or_default() += 1;
    }
    if expected.iter().all(|id| received.0.contains_key(id)) {
        recovered = Some(since.elapsed());
        let linger = Instant::now() + LINGER;
        while let Some((id, _)) = members.next_before(linger).await {
            *received.0.entry(id).or_default() += 1;
        }
    }
    for (id, _) in members.stop().await {
        *received.0.entry(id).or_default() += 1;
    }
    (received, recovered)
}

/// Publishes `count` messages; returns their ids.
async fn publish(ctx: &Ctx, prefix: &str, count: usize) -> Vec<String> {
    ctx.publish_numbered(&ctx.event, prefix, count).await
}

/// Reports what new members received against what stopped members printed (the figures
/// for docs/RELIABILITY.md), then fails on any loss.
fn conclude(
    case: &str,
    fault: &str,
    published: &[String],
    acked: &HashSet<String>,
    outcome: (Received, Option<Duration>),
) {
    let (received, recover) = outcome;
    let all: HashSet<&String> = published.iter().collect();
    let foreign: Vec<_> = received.0.keys().filter(|id| !all.contains(id)).collect();
    let expected: Vec<_> = published.iter().filter(|id| !acked.contains(*id)).collect();
    let lost = expected.iter().filter(|id| !received.0.contains_key(**id)).count();
    let again = received.0.keys().filter(|id| acked.contains(*id)).count();
    eprintln!(
        "{case}: published {}, printed by the stopped members {}, expected by the new ones {}, delivered \
         to them {} ({} distinct); duplicates {} ({again} printed before the stop, {} delivered twice to \
         the new members); lost {lost}",
        published.len(),
        acked.len(),
        expected.len(),
        received.deliveries(),
        received.0.len(),
        again + received.duplicates(),
        received.duplicates(),
    );
    let figures = FaultFigures {
        fault: fault.to_owned(),
        sent: published.len() as u64,
        delivered: (published.len() - lost) as u64,
        lost: lost as u64,
        duplicates: (again + received.duplicates()) as u64,
        recover,
    };
    report_fault(case, &figures);
    assert!(
        foreign.is_empty(),
        "{case}: {} deliveries of messages never published: {foreign:?}",
        foreign.len()
    );
    assert_eq!(
        lost,
        0,
        "{case}: {lost} of {} messages the stopped members never acked did not reach the new members within {RECOVER:?}",
        expected.len()
    );
}

/// A member process killed (SIGKILL) after about a third of the messages: a new member, with
/// a new consumer id, receives every message the killed one had not acked.
pub(crate) async fn consumer_process_killed_mid_stream_loses_nothing(ctx: Ctx) {
    let first = MemberProcesses::start(&ctx, "workers", 1).await;
    let published = publish(&ctx, "kill", MESSAGES).await;
    let acked = first.kill_after(MESSAGES / 3).await;
    let killed = Instant::now();
    let expected: HashSet<String> = published.iter().filter(|id| !acked.contains(*id)).cloned().collect();
    let second = ctx.subscribe("workers").await;
    let outcome = receive_all(vec![second], &expected, killed).await;
    conclude(KILL_CASE, "consumer process SIGKILL", &published, &acked, outcome);
}

/// Every member of the group killed (SIGKILL) mid-stream, messages published while it has
/// none, then new members with new consumer ids: every message no killed member acked arrives.
pub(crate) async fn group_replaced_after_its_member_processes_were_killed_loses_nothing(ctx: Ctx) {
    let old = MemberProcesses::start(&ctx, "workers", 2).await;
    let mut published = publish(&ctx, "before", MESSAGES * 2 / 3).await;
    let acked = old.kill_after(MESSAGES / 3).await;
    let killed = Instant::now();
    published.extend(publish(&ctx, "between", MESSAGES / 3).await);
    let expected: HashSet<String> = published.iter().filter(|id| !acked.contains(*id)).cloned().collect();
    let new = vec![ctx.subscribe("workers").await, ctx.subscribe("workers").await];
    let outcome = receive_all(new, &expected, killed).await;
    conclude(KILLED_GROUP_CASE, "whole group replaced (members killed)", &published, &acked, outcome);
}

/// Every member of the group closed mid-stream, messages published while it has none, then new
/// members with new consumer ids: every message the closed members did not ack arrives.
pub(crate) async fn group_replaced_after_its_members_closed_loses_nothing(ctx: Ctx) {
    let old = vec![ctx.subscribe("workers").await, ctx.subscribe("workers").await];
    let mut published = publish(&ctx, "before", MESSAGES * 2 / 3).await;
    let acked = ack_then_close(old, MESSAGES / 3).await;
    let closed = Instant::now();
    published.extend(publish(&ctx, "between", MESSAGES / 3).await);
    let expected: HashSet<String> = published.iter().filter(|id| !acked.contains(*id)).cloned().collect();
    let new = vec![ctx.subscribe("workers").await, ctx.subscribe("workers").await];
    let outcome = receive_all(new, &expected, closed).await;
    conclude(CLOSED_GROUP_CASE, "whole group replaced (members closed)", &published, &acked, outcome);
}

/// Members ack what they receive until `after` messages were acked between them, then all
/// close; returns the ids acked.
async fn ack_then_close(subs: Vec<Subscriber>, after: usize) -> HashSet<String> {
    let mut members = Acking::spawn(subs);
    let mut acked = HashSet::new();
    while acked.len() < after {
        match members.next_before(Instant::now() + WAIT * 3).await {
            Some((id, true)) => {
                acked.insert(id);
            }
            Some((_, false)) => {}
            None => panic!("{after} acks before the close: got {} in {:?}", acked.len(), WAIT * 3),
        }
    }
    acked.extend(members.stop().await.into_iter().filter(|(_, ok)| *ok).map(|(id, _)| id));
    acked
}
