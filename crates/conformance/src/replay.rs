//! Replay and message query through `Bus`: a group moved back to the beginning or to a time
//! gets those messages again; a query reads them back by key, id and time, oldest first. A
//! broker that does not retain messages must refuse both with `UNSUPPORTED`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use polybus::{Capabilities, Message, MessageQuery, ReplayFrom, StoredMessage, Subscriber};

use crate::fixture::{Ctx, ENV, OrFail, WAIT, expect_nothing, receive, within};

/// The trial name of the replay case.
pub(crate) const REPLAY_CASE: &str = "replay_redelivers_from_the_beginning_or_a_time";
/// The trial name of the message query case.
pub(crate) const MESSAGES_CASE: &str = "messages_are_queried_by_key_id_and_time_oldest_first";

/// Keys of each batch, so that a key selects messages from both.
const KEYS: [&str; 3] = ["x", "y", "x"];
/// How long a replayed group is watched for messages from before the replay's start.
const QUIET: Duration = Duration::from_millis(500);

/// Publishes one message per key of [`KEYS`], `<batch>-<i>`; returns them in order.
async fn publish_batch(ctx: &Ctx, batch: &str) -> Vec<Message> {
    let mut sent = Vec::new();
    for (i, key) in KEYS.iter().enumerate() {
        let message = Message::text(format!("{batch}-{i}")).key(*key);
        ctx.publish(message.clone()).await;
        sent.push(message);
    }
    sent
}

/// A time after every message published so far and before any published next: the clock is
/// read, then waited past, so broker and client timestamps in milliseconds fall on either side.
async fn time_between_batches() -> DateTime<Utc> {
    let step = Duration::from_millis(5);
    tokio::time::sleep(step).await;
    let between = Utc::now();
    while Utc::now() <= between + step {
        tokio::time::sleep(step).await;
    }
    between
}

/// Receives `count` messages on `sub`, acks each, then checks nothing else comes; returns the
/// ids, sorted.
async fn receive_all(sub: &mut Subscriber, count: usize, what: &str) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..count {
        let delivery = receive(sub, format!("{what} ({i} of {count} so far)")).await;
        ids.push(delivery.id.clone());
        delivery.ack().await.or_fail(format!("acking {what}"));
    }
    expect_nothing(sub, QUIET, what).await;
    ids.sort();
    ids
}

fn sorted_ids(messages: &[Message]) -> Vec<String> {
    let mut ids: Vec<String> = messages.iter().map(|m| m.id.clone()).collect();
    ids.sort();
    ids
}

/// Checks that a broker without `replay` refuses both operations with `UNSUPPORTED`, saying
/// which broker; true when it did (the case ends there).
async fn refused_when_not_retaining(ctx: &Ctx, caps: &Capabilities) -> bool {
    if caps.replay {
        return false;
    }
    let group = ctx.group("replay");
    let replay = ctx.bus.replay(ENV, &ctx.event, &group, ReplayFrom::Beginning);
    let query = ctx.bus.messages(ENV, &ctx.event, MessageQuery::default());
    for (what, outcome) in [
        ("replay", within(WAIT, "replay", replay).await.map(|_| ())),
        ("message query", within(WAIT, "message query", query).await.map(|_| ())),
    ] {
        match outcome {
            Err(e) => {
                assert_eq!(e.code(), "UNSUPPORTED", "{what} on a broker without replay: {e}");
                let text = e.to_string();
                assert!(text.contains("retain"), "{what}: the refusal says why: {text}");
            }
            Ok(()) => panic!("{what} succeeded on a broker that declares replay false"),
        }
    }
    true
}

pub(crate) async fn replay_redelivers_from_the_beginning_or_a_time(ctx: Ctx, caps: Capabilities) {
    if refused_when_not_retaining(&ctx, &caps).await {
        return;
    }
    let group = ctx.group("replay");
    let first = publish_batch(&ctx, "first").await;
    let mut sub = ctx.subscribe("replay").await;
    assert_eq!(receive_all(&mut sub, 3, "the first batch").await, sorted_ids(&first));
    sub.close().await.or_fail("closing the group's member");

    let replay = ctx.bus.replay(ENV, &ctx.event, &group, ReplayFrom::Beginning);
    within(WAIT * 2, "replaying from the beginning", replay).await.or_fail("replaying from the beginning");
    let mut sub = ctx.subscribe("replay").await;
    assert_eq!(
        receive_all(&mut sub, 3, "the first batch again").await,
        sorted_ids(&first),
        "a replay from the beginning redelivers every message"
    );

    let between = time_between_batches().await;
    let second = publish_batch(&ctx, "second").await;
    assert_eq!(receive_all(&mut sub, 3, "the second batch").await, sorted_ids(&second));
    sub.close().await.or_fail("closing the group's member");

    let replay = ctx.bus.replay(ENV, &ctx.event, &group, ReplayFrom::Time(between));
    within(WAIT * 2, "replaying from a time", replay).await.or_fail("replaying from a time");
    let mut sub = ctx.subscribe("replay").await;
    assert_eq!(
        receive_all(&mut sub, 3, "the second batch again").await,
        sorted_ids(&second),
        "a replay from a time redelivers only what was published from then on"
    );
    sub.close().await.or_fail("closing the group's member");
}

async fn query(ctx: &Ctx, query: MessageQuery, what: &str) -> Vec<String> {
    let found: Vec<StoredMessage> =
        within(WAIT * 2, what, ctx.bus.messages(ENV, &ctx.event, query)).await.or_fail(what);
    found.into_iter().map(|s| s.message.id).collect()
}

fn ids<'a>(messages: impl IntoIterator<Item = &'a Message>) -> Vec<String> {
    messages.into_iter().map(|m| m.id.clone()).collect()
}

pub(crate) async fn messages_are_queried_by_key_id_and_time_oldest_first(ctx: Ctx, caps: Capabilities) {
    if refused_when_not_retaining(&ctx, &caps).await {
        return;
    }
    let first = publish_batch(&ctx, "first").await;
    let between = time_between_batches().await;
    let second = publish_batch(&ctx, "second").await;
    let all: Vec<&Message> = first.iter().chain(&second).collect();

    let every = MessageQuery { limit: 100, ..MessageQuery::default() };
    let found: Vec<StoredMessage> =
        within(WAIT * 2, "every message", ctx.bus.messages(ENV, &ctx.event, every.clone()))
            .await
            .or_fail("querying every message");
    assert_eq!(
        found.iter().map(|s| s.message.id.clone()).collect::<Vec<_>>(),
        ids(all.clone()),
        "oldest first"
    );
    for (stored, sent) in found.iter().zip(&all) {
        assert_eq!(stored.message.payload, sent.payload, "payload of {}", sent.id);
        assert_eq!(stored.message.key, sent.key, "key of {}", sent.id);
        assert_eq!(stored.message.headers, sent.headers, "headers of {}", sent.id);
    }

    let by_key = MessageQuery { key: Some("x".into()), ..every.clone() };
    let expected = ids(all.iter().copied().filter(|m| m.key.as_deref() == Some("x")));
    assert_eq!(query(&ctx, by_key, "messages with key x").await, expected, "by key");

    let by_id = MessageQuery { id: Some(second[1].id.clone()), ..every.clone() };
    assert_eq!(query(&ctx, by_id, "one message by id").await, ids([&second[1]]), "by id");

    let since = MessageQuery { since: Some(between), ..every.clone() };
    assert_eq!(query(&ctx, since, "messages since a time").await, ids(&second), "since");
    let until = MessageQuery { until: Some(between), ..every.clone() };
    assert_eq!(query(&ctx, until, "messages until a time").await, ids(&first), "until");

    let limited = MessageQuery { limit: 2, ..every.clone() };
    assert_eq!(query(&ctx, limited, "the first two").await, ids(&first[..2]), "limit");
    let both = MessageQuery { key: Some("y".into()), since: Some(between), ..every };
    assert_eq!(query(&ctx, both, "key y since a time").await, ids([&second[1]]), "key and since");
}
