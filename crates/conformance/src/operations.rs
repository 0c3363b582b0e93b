//! Operating dead letters through `Bus`: list, redrive and purge, on every broker.

use std::collections::BTreeSet;

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
    let again = list(&ctx, &DeadLetterFilter::default(), "listing a second time").await;
    assert_eq!(ids(&again), ids(&all), "listing removes nothing");

    let only_a = DeadLetterFilter { ids: Some(BTreeSet::from([a.clone()])), ..Default::default() };
    let what = "redriving one dead letter";
    let redriven =
        within(WAIT * 2, what, ctx.bus.redrive_dead_letters(ENV, &ctx.event, &only_a)).await.or_fail(what);
    assert_eq!(redriven.done, std::slice::from_ref(&a), "{redriven:?}");
    assert!(redriven.failed.is_empty(), "{redriven:?}");
    let back = receive(&mut main, "the redriven message").await;
    assert_eq!(&back.payload, &sent[0].payload, "the same payload comes back");
    assert_ne!(back.id, a, "under a new id, which a broker's duplicate detection lets through");
    let mut headers = sent[0].headers.clone();
    headers.insert(polybus::wire::REDRIVEN_FROM.into(), a.clone());
    assert_eq!(back.headers, headers, "with its publisher's headers and the dead letter's id");
    back.ack().await.or_fail("acking the redriven message");

    let by_reason = DeadLetterFilter { reason: Some("bad b".into()), ..Default::default() };
    let what = "purging by reason";
    let purged =
        within(WAIT * 2, what, ctx.bus.purge_dead_letters(ENV, &ctx.event, &by_reason)).await.or_fail(what);
    assert_eq!((purged.done.as_slice(), purged.kept), ([b.clone()].as_slice(), 1), "{purged:?}");
    let left = list(&ctx, &DeadLetterFilter::default(), "listing after redrive and purge").await;
    assert_eq!(ids(&left), BTreeSet::from([c.clone()]), "only c is left");

    let what = "purging the rest";
    let rest =
        within(WAIT * 2, what, ctx.bus.purge_dead_letters(ENV, &ctx.event, &DeadLetterFilter::default()))
            .await
            .or_fail(what);
    assert_eq!(rest.done, std::slice::from_ref(&c), "{rest:?}");
    let none = list(&ctx, &DeadLetterFilter::default(), "listing an empty queue").await;
    assert!(none.is_empty(), "nothing is left: {:?}", ids(&none));
}
