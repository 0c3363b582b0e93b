//! Groups and lag through `Bus::groups`, on every broker: what a broker declares (a field that
//! is `Some`) must add up to the backlog, and fall to zero once everything is acked.

use std::collections::HashSet;
use std::fmt::Display;
use std::time::Duration;

use polybus::{GroupInfo, SubscribeOptions};
use tokio::time::{Instant, MissedTickBehavior};

use crate::fixture::{Ctx, ENV, OrFail, WAIT, receive, within};

/// The trial name of the groups case.
pub(crate) const GROUPS_CASE: &str = "groups_show_lag_and_pending_until_the_group_catches_up";

/// Messages published before the group consumes.
const BACKLOG: u64 = 6;
/// Unacked deliveries the member may hold: what a broker that counts only undelivered
/// messages (RabbitMQ's ready messages) may leave out of the backlog.
const PREFETCH: u64 = 2;
/// How often the groups are read while waiting for a change.
const POLL: Duration = Duration::from_millis(200);

pub(crate) async fn groups_show_lag_and_pending_until_the_group_catches_up(ctx: Ctx) {
    let started = Instant::now();
    let options = SubscribeOptions {
        prefetch: PREFETCH as usize,
        ack_deadline: Duration::from_secs(30),
        ..SubscribeOptions::new(ctx.group("lag"))
    };
    let group = options.group.clone();
    let mut sub = ctx.subscribe_with(&ctx.event, options).await;

    // Listed once joined; a member may only count once it has read (Redis).
    until(&ctx, &group, "the group to be listed", |_| true).await;

    let ids: HashSet<String> =
        ctx.publish_numbered(&ctx.event, "lag", BACKLOG as usize).await.into_iter().collect();
    let backlog = until(&ctx, &group, "lag and pending to count the backlog", |g| match (g.lag, g.pending) {
        (Some(lag), Some(pending)) => lag + pending == BACKLOG,
        (Some(lag), None) => (BACKLOG - PREFETCH..=BACKLOG).contains(&lag),
        (None, Some(pending)) => (1..=BACKLOG).contains(&pending),
        (None, None) => true,
    })
    .await;
    assert_age(&backlog, started);

    let first = receive(&mut sub, "the first message of the backlog").await;
    let held = until(&ctx, &group, "the reading member and its held message to count", |g| {
        g.members.is_none_or(|members| members >= 1) && g.pending.is_none_or(|pending| pending >= 1)
    })
    .await;
    assert_age(&held, started);

    let mut seen = HashSet::from([first.id.clone()]);
    first.ack().await.or_fail("acking the first message");
    while seen.len() < BACKLOG as usize {
        let delivery = receive(&mut sub, format!("message {} of {BACKLOG}", seen.len() + 1)).await;
        seen.insert(delivery.id.clone());
        delivery.ack().await.or_fail("acking a message of the backlog");
    }
    assert_eq!(seen, ids, "the backlog, each once");

    let caught_up = until(&ctx, &group, "lag and pending to fall to 0", |g| {
        g.lag.is_none_or(|lag| lag == 0) && g.pending.is_none_or(|pending| pending == 0)
    })
    .await;
    assert_eq!(caught_up.oldest_unacked, None, "nothing is unacked: {caught_up:?}");
    drop(sub);
}

/// An oldest-unacked age, when told, is no older than the case.
fn assert_age(info: &GroupInfo, started: Instant) {
    if let Some(age) = info.oldest_unacked {
        assert!(
            age <= started.elapsed() + Duration::from_secs(1),
            "oldest unacked {age:?} is older than the case: {info:?}"
        );
    }
}

/// Reads the topic's groups until `group` is listed (once) and `done` holds for it.
async fn until(ctx: &Ctx, group: &str, what: impl Display, done: impl Fn(&GroupInfo) -> bool) -> GroupInfo {
    let deadline = Instant::now() + WAIT * 2;
    let mut ticks = tokio::time::interval(POLL);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last = None;
    loop {
        ticks.tick().await;
        let listing = format!("listing the groups while waiting for {what}");
        let groups = within(WAIT, &listing, ctx.bus.groups(ENV, &ctx.event)).await.or_fail(&listing);
        let ours: Vec<GroupInfo> = groups.into_iter().filter(|g| g.group == group).collect();
        assert!(ours.len() <= 1, "group {group} is listed more than once: {ours:?}");
        if let Some(info) = ours.into_iter().next() {
            if done(&info) {
                return info;
            }
            last = Some(info);
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {:?} waiting for {what}; last seen: {last:?}",
            WAIT * 2
        );
    }
}
