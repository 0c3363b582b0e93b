//! Idempotent publishing through `Bus`, on every broker: a key published twice is delivered once.

use polybus::{IdempotencyState, Message};

use crate::fixture::{Ctx, ENV, Members, OrFail, WAIT, within};

/// The trial name of the idempotent publish case.
pub(crate) const IDEMPOTENCY_CASE: &str = "a_key_published_twice_is_delivered_once";

pub(crate) async fn a_key_published_twice_is_delivered_once(ctx: Ctx) {
    let mut members = Members::spawn(vec![ctx.subscribe("billing").await]);
    let key = format!("order-{}", ctx.id);

    let first = Message::text("first").idempotency_key(&key);
    let first_id = first.id.clone();
    let outcome = within(WAIT, "the first publish", ctx.bus.publish_outcome(ENV, &ctx.event, first))
        .await
        .or_fail("the first publish");
    assert_eq!((outcome.id.as_str(), outcome.duplicate), (first_id.as_str(), false));

    let again = within(
        WAIT,
        "the second publish",
        ctx.bus.publish(ENV, &ctx.event, Message::text("again").idempotency_key(&key)),
    )
    .await
    .or_fail("the second publish");
    assert_eq!(again, first_id, "the second publish answers the first message's id");

    // Two buses (as two processes) publishing one more key at once: one message goes out.
    let other_key = format!("{key}-raced");
    let other_bus = ctx.new_bus();
    let (a, b) = tokio::join!(
        ctx.bus.publish_outcome(ENV, &ctx.event, Message::text("raced-a").idempotency_key(&other_key)),
        other_bus.publish_outcome(ENV, &ctx.event, Message::text("raced-b").idempotency_key(&other_key)),
    );
    let (a, b) = (a.or_fail("publishing raced-a"), b.or_fail("publishing raced-b"));
    assert_eq!(a.id, b.id, "both racers answer the id of the one message sent");
    assert!(a.duplicate ^ b.duplicate, "exactly one racer published: {a:?} {b:?}");

    // In a batch: a published key and a key repeated in the batch are left out.
    let batch = vec![
        Message::text("batch-dup").idempotency_key(&key),
        Message::text("batch-new").idempotency_key(format!("{key}-batch")),
        Message::text("batch-new-again").idempotency_key(format!("{key}-batch")),
        Message::text("batch-plain"),
    ];
    let (new_id, plain_id) = (batch[1].id.clone(), batch[3].id.clone());
    let outcomes = within(WAIT, "the batch", ctx.bus.publish_batch_outcome(ENV, &ctx.event, batch))
        .await
        .or_fail("publishing the batch");
    let seen: Vec<(&str, bool)> = outcomes.iter().map(|o| (o.id.as_str(), o.duplicate)).collect();
    assert_eq!(
        seen,
        [
            (first_id.as_str(), true),
            (new_id.as_str(), false),
            (new_id.as_str(), true),
            (plain_id.as_str(), false)
        ]
    );

    let expected = [first_id.clone(), a.id.clone(), new_id, plain_id];
    let tally = members.collect(expected.len(), WAIT * 3, std::time::Duration::from_millis(500)).await;
    tally.assert_ids(&expected, "one delivery per key");
    assert_eq!(tally.duplicates(), 0, "nothing was delivered twice");
    let payloads: Vec<_> = tally.arrivals.iter().filter_map(|m| m.payload_str()).collect();
    assert!(!payloads.contains(&"again") && !payloads.contains(&"batch-dup"), "{payloads:?}");
    members.stop();

    let record = ctx.bus.check_idempotency(ENV, &ctx.event, &key).await.or_fail("checking the key");
    let record = record.expect("the key is held");
    assert_eq!((record.message_id.as_str(), record.state), (first_id.as_str(), IdempotencyState::Published));
    let free = ctx.bus.check_idempotency(ENV, &ctx.event, "never-used").await.or_fail("checking a free key");
    assert_eq!(free, None);
}
