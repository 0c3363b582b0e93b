//! Operating dead letters through `Bus`: list, redrive and purge, on every broker.

use std::collections::BTreeSet;
use std::time::Duration;

use tokio::time::Instant;

use polybus::{DeadLetterFilter, Message};

use crate::fixture::{Ctx, ENV, OrFail, WAIT, receive, within};

/// The trial name of the dead-letter operations case.
pub(crate) const DLQ_CASE: &str = "dead_letters_are_listed_redriven_and_purged";

fn ids(letters: &[polybus::DeadLetter]) -> BTreeSet<String> {
    letters.iter().map(|l| l.message.id.clone()).collect()
}

async fn list(ctx: &Ctx, filter: &DeadLetterFilter, what: &str) -> Vec<polybus::DeadLetter> {
    let listing = ctx.bus.list_dead_letters(ENV, &ctx.event, filter, 100);
    within(WAIT * 2, what, listing).await.or_fail(what)
}

pub(crate) async fn dead_letters_are_listed_redriven_and_purged(ctx: Ctx) {
    let mut main = ctx.subscribe("billing").await;
    let mut sent = Vec::new();
    for name in ["a", "b", "c"] {
        let message = Message::text(format!("poison-{name}")).key(name).header("x-origin", "conformance");
        sent.push(message.clone());
        ctx.publish(message).await;
    }
    for _ in 0..3 {
        let delivery = receive(&mut main, "a message to dead-letter").await;
        let reason = format!("bad {}", delivery.key.clone().unwrap_or_default());
        delivery.dead_letter(&reason).await.or_fail("dead-lettering");
    }
    let (a, b, c) = (sent[0].id.clone(), sent[1].id.clone(), sent[2].id.clone());

    let all = list(&ctx, &DeadLetterFilter::default(), "listing the dead letters").await;
    assert_eq!(ids(&all), BTreeSet::from([a.clone(), b.clone(), c.clone()]), "every dead letter, once");
    for letter in &all {
        let original = sent.iter().find(|m| m.id == letter.message.id).expect("a sent message");
        assert_eq!(letter.message.payload, original.payload, "payload");
        assert_eq!(letter.message.key, original.key, "key");
        assert_eq!(letter.message.headers, original.headers, "only the publisher's headers");
        assert_eq!(
            letter.reason.as_deref(),
            Some(format!("bad {}", original.key.clone().unwrap_or_default()).as_str())
        );
        assert_eq!(letter.group, Some(ctx.group("billing")), "the group that gave up");
        assert_eq!(letter.attempts, Some(1), "attempts");
        assert!(letter.dead_lettered_at.is_some(), "when");
    }
    let again = list_until(&ctx, &ids(&all), "listing a second time").await;
    assert_eq!(again, ids(&all), "listing removes nothing");

    let only_a = DeadLetterFilter { ids: Some(BTreeSet::from([a.clone()])), ..Default::default() };
    let redriven = act_until(&ctx, &only_a, &a, Act::Redrive).await;
    assert_eq!(redriven, std::slice::from_ref(&a), "only the selected one is redriven");
    let back = receive(&mut main, "the redriven message").await;
    assert_eq!(&back.payload, &sent[0].payload, "the same payload comes back");
    assert_ne!(back.id, a, "under a new id, which a broker's duplicate detection lets through");
    let mut headers = sent[0].headers.clone();
    headers.insert(polybus::wire::REDRIVEN_FROM.into(), a.clone());
    assert_eq!(back.headers, headers, "with its publisher's headers and the dead letter's id");
    back.ack().await.or_fail("acking the redriven message");

    let by_reason = DeadLetterFilter { reason: Some("bad b".into()), ..Default::default() };
    let purged = act_until(&ctx, &by_reason, &b, Act::Purge).await;
    assert_eq!(purged, std::slice::from_ref(&b), "only the one with that reason is purged");
    let left = list_until(&ctx, &BTreeSet::from([c.clone()]), "listing after redrive and purge").await;
    assert_eq!(left, BTreeSet::from([c.clone()]), "only c is left");

    let rest = act_until(&ctx, &DeadLetterFilter::default(), &c, Act::Purge).await;
    assert_eq!(rest, std::slice::from_ref(&c), "the rest is purged");
    let none = list(&ctx, &DeadLetterFilter::default(), "listing an empty queue").await;
    assert!(none.is_empty(), "nothing is left: {:?}", ids(&none));
}

/// How long a dead letter an operation gave back may stay out of sight: not at all.
const REAPPEAR: Duration = Duration::ZERO;

/// Lists until exactly `expected` is seen (or [`REAPPEAR`] passed); never more than `expected`.
async fn list_until(ctx: &Ctx, expected: &BTreeSet<String>, what: &str) -> BTreeSet<String> {
    let deadline = Instant::now() + REAPPEAR;
    loop {
        let seen = ids(&list(ctx, &DeadLetterFilter::default(), what).await);
        assert!(seen.is_subset(expected), "{what}: listed {seen:?}, expected only {expected:?}");
        if &seen == expected || Instant::now() >= deadline {
            return seen;
        }
    }
}

enum Act {
    Redrive,
    Purge,
}

/// Redrives or purges what `filter` selects until `target` is done (or [`REAPPEAR`] passed);
/// returns every id done, none failed.
async fn act_until(ctx: &Ctx, filter: &DeadLetterFilter, target: &str, act: Act) -> Vec<String> {
    let deadline = Instant::now() + REAPPEAR;
    let mut done = Vec::new();
    loop {
        let what = match act {
            Act::Redrive => "redriving dead letters",
            Act::Purge => "purging dead letters",
        };
        let outcome = match act {
            Act::Redrive => {
                within(WAIT * 2, what, ctx.bus.redrive_dead_letters(ENV, &ctx.event, filter)).await
            }
            Act::Purge => within(WAIT * 2, what, ctx.bus.purge_dead_letters(ENV, &ctx.event, filter)).await,
        }
        .or_fail(what);
        assert!(outcome.failed.is_empty(), "{what}: {outcome:?}");
        done.extend(outcome.done);
        if done.iter().any(|id| id == target) || Instant::now() >= deadline {
            return done;
        }
    }
}
