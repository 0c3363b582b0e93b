//! The cases: each proves one behaviour of the transport contract (docs/ARCHITECTURE.md, "The transport
//! contract") through the public `polybus` API, and fails with what it saw.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use polybus::{
    BatchError, Capabilities, ConsumeOptions, ConsumeStats, Delivery, HandlerError, Message,
    SubscribeOptions, wire,
};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::fixture::{
    ACK_DEADLINE, Ctx, ENV, Members, OrFail, TIMER_SLACK, WAIT, expect_nothing, receive, within,
};
use crate::groups::{GROUPS_CASE, groups_show_lag_and_pending_until_the_group_catches_up};
use crate::harness::Need;
use crate::idempotency::{IDEMPOTENCY_CASE, a_key_published_twice_is_delivered_once};
use crate::load::{LOAD_CASE, load_lose_nothing};
use crate::operations::{DLQ_CASE, dead_letters_are_listed_redriven_and_purged};
use crate::private::Stop;
use crate::process;
use crate::replay::{
    MESSAGES_CASE, REPLAY_CASE, messages_are_queried_by_key_id_and_time_oldest_first,
    replay_redelivers_from_the_beginning_or_a_time,
};
use crate::restart::{CRASH_CASE, RESTART_CASE, RESTART_LIMIT, broker_restart_mid_publish_and_mid_consume};
use crate::telemetry::{a_batch_span_links_to_each_publisher, a_handler_span_continues_the_publishers_trace};

/// One behaviour to prove.
pub(crate) struct Case {
    /// Trial name: the behaviour, in words.
    pub name: &'static str,
    /// What the adapter must declare for the case to run.
    pub needs: &'static [Need],
    /// The topic's `maxAttempts` (default when `None`).
    pub max_attempts: Option<u32>,
    /// The whole case, set-up included, fails after this long.
    pub limit: Duration,
    /// The case itself; it fails by panicking.
    pub run: fn(Ctx, Capabilities) -> BoxFuture<'static, ()>,
}

const NORMAL: Duration = Duration::from_secs(30);
const LONG: Duration = Duration::from_secs(120);
/// Longest a group may take to receive a case's messages (it fails sooner if they stop coming).
const COLLECT: Duration = Duration::from_secs(25);
/// How long a member keeps listening after the expected messages arrived, to catch duplicates.
const LINGER: Duration = Duration::from_millis(300);

/// Every case, in the order of the contract.
pub(crate) static CASES: &[Case] = &[
    Case {
        name: "round_trip_keeps_payload_headers_and_key",
        needs: &[],
        max_attempts: None,
        limit: NORMAL,
        run: |ctx, caps| Box::pin(round_trip_keeps_payload_headers_and_key(ctx, caps)),
    },
    Case {
        name: "header_rules_give_the_same_answer_on_every_broker",
        needs: &[],
        max_attempts: None,
        limit: NORMAL,
        run: |ctx, _| Box::pin(header_rules_give_the_same_answer_on_every_broker(ctx)),
    },
    Case {
        name: "competing_consumers_each_message_goes_to_one_member",
        needs: &[],
        max_attempts: None,
        limit: NORMAL,
        run: |ctx, _| Box::pin(competing_consumers_each_message_goes_to_one_member(ctx)),
    },
    Case {
        name: "fan_out_every_group_gets_every_message",
        needs: &[Need::FanOut],
        max_attempts: None,
        limit: NORMAL,
        run: |ctx, _| Box::pin(fan_out_every_group_gets_every_message(ctx)),
    },
    Case {
        name: "nacked_message_is_redelivered",
        needs: &[Need::AtLeastOnce],
        max_attempts: None,
        limit: NORMAL,
        run: |ctx, caps| Box::pin(nacked_message_is_redelivered(ctx, caps)),
    },
    Case {
        name: "nack_with_delay_redelivers_no_sooner_than_the_delay",
        needs: &[Need::AtLeastOnce, Need::NackDelay],
        max_attempts: None,
        limit: NORMAL,
        run: |ctx, caps| Box::pin(nack_with_delay_redelivers_no_sooner_than_the_delay(ctx, caps)),
    },
    Case {
        name: "unacked_message_goes_to_another_member_after_the_ack_deadline",
        needs: &[Need::AtLeastOnce],
        max_attempts: None,
        limit: NORMAL,
        run: |ctx, caps| Box::pin(unacked_message_goes_to_another_member_after_the_ack_deadline(ctx, caps)),
    },
    Case {
        name: "dead_letter_after_max_attempts",
        needs: &[Need::AtLeastOnce, Need::CountsAttempts],
        max_attempts: Some(2),
        limit: NORMAL,
        run: |ctx, _| Box::pin(dead_letter_after_max_attempts(ctx)),
    },
    Case {
        name: "delayed_message_is_not_delivered_before_its_delay",
        needs: &[Need::DelayedDelivery],
        max_attempts: None,
        limit: NORMAL,
        run: |ctx, _| Box::pin(delayed_message_is_not_delivered_before_its_delay(ctx)),
    },
    Case {
        name: "messages_with_one_key_arrive_in_publish_order",
        needs: &[Need::OrderingPerKey],
        max_attempts: None,
        limit: NORMAL,
        run: |ctx, _| Box::pin(messages_with_one_key_arrive_in_publish_order(ctx)),
    },
    Case {
        name: "batch_publish_delivers_every_message",
        needs: &[],
        max_attempts: None,
        limit: NORMAL,
        run: |ctx, _| Box::pin(batch_publish_delivers_every_message(ctx)),
    },
    Case {
        name: "topics_are_isolated",
        needs: &[],
        max_attempts: None,
        limit: NORMAL,
        run: |ctx, _| Box::pin(topics_are_isolated(ctx)),
    },
    Case {
        name: "close_flushes_pending_publishes",
        needs: &[],
        max_attempts: None,
        limit: NORMAL,
        run: |ctx, _| Box::pin(close_flushes_pending_publishes(ctx)),
    },
    Case {
        name: "one_mib_message_round_trips_byte_for_byte",
        needs: &[Need::LargeMessages],
        max_attempts: None,
        limit: NORMAL,
        run: |ctx, _| Box::pin(one_mib_message_round_trips_byte_for_byte(ctx)),
    },
    Case {
        name: "many_concurrent_publishers_lose_nothing",
        needs: &[],
        max_attempts: None,
        limit: LONG,
        run: |ctx, _| Box::pin(many_concurrent_publishers_lose_nothing(ctx)),
    },
    Case {
        name: "reconnects_after_the_broker_restarts",
        needs: &[Need::Restart],
        max_attempts: None,
        limit: LONG,
        run: |ctx, _| Box::pin(reconnects_after_the_broker_restarts(ctx)),
    },
    Case {
        name: "prefetch_bounds_unacked_deliveries",
        needs: &[],
        max_attempts: None,
        limit: NORMAL,
        run: |ctx, caps| Box::pin(prefetch_bounds_unacked_deliveries(ctx, caps)),
    },
    Case {
        name: "next_batch_takes_ready_deliveries_up_to_max_and_settles_each",
        needs: &[Need::AtLeastOnce],
        max_attempts: None,
        limit: NORMAL,
        run: |ctx, caps| Box::pin(next_batch_takes_ready_deliveries_up_to_max_and_settles_each(ctx, caps)),
    },
    Case {
        name: "consume_retries_with_backoff_then_succeeds",
        needs: &[Need::AtLeastOnce, Need::CountsAttempts, Need::NackDelay],
        max_attempts: None,
        limit: NORMAL,
        run: |ctx, _| Box::pin(consume_retries_with_backoff_then_succeeds(ctx)),
    },
    Case {
        name: "consume_dead_letters_with_the_handler_error_as_reason",
        needs: &[Need::AtLeastOnce, Need::CountsAttempts],
        max_attempts: Some(2),
        limit: NORMAL,
        run: |ctx, _| Box::pin(consume_dead_letters_with_the_handler_error_as_reason(ctx)),
    },
    Case {
        name: "a_handler_span_continues_the_publishers_trace",
        needs: &[Need::AtLeastOnce, Need::CountsAttempts, Need::NackDelay],
        max_attempts: None,
        limit: NORMAL,
        run: |ctx, _| Box::pin(a_handler_span_continues_the_publishers_trace(ctx)),
    },
    Case {
        name: "a_batch_span_links_to_each_publisher",
        needs: &[Need::AtLeastOnce],
        max_attempts: None,
        limit: NORMAL,
        run: |ctx, _| Box::pin(a_batch_span_links_to_each_publisher(ctx)),
    },
    Case {
        name: DLQ_CASE,
        needs: &[Need::AtLeastOnce],
        max_attempts: None,
        limit: Duration::from_secs(150),
        run: |ctx, _| Box::pin(dead_letters_are_listed_redriven_and_purged(ctx)),
    },
    // No needs: a broker without replay must refuse both with UNSUPPORTED, which the cases check.
    Case {
        name: REPLAY_CASE,
        needs: &[],
        max_attempts: None,
        limit: Duration::from_secs(90),
        run: |ctx, caps| Box::pin(replay_redelivers_from_the_beginning_or_a_time(ctx, caps)),
    },
    Case {
        name: MESSAGES_CASE,
        needs: &[],
        max_attempts: None,
        limit: NORMAL,
        run: |ctx, caps| Box::pin(messages_are_queried_by_key_id_and_time_oldest_first(ctx, caps)),
    },
    Case {
        name: GROUPS_CASE,
        needs: &[],
        max_attempts: None,
        limit: Duration::from_secs(90),
        run: |ctx, _| Box::pin(groups_show_lag_and_pending_until_the_group_catches_up(ctx)),
    },
    Case {
        name: IDEMPOTENCY_CASE,
        needs: &[],
        max_attempts: None,
        limit: Duration::from_secs(60),
        run: |ctx, _| Box::pin(a_key_published_twice_is_delivered_once(ctx)),
    },
    Case {
        name: "consume_dead_letters_a_permanent_failure_at_once",
        needs: &[Need::AtLeastOnce],
        max_attempts: Some(5),
        limit: NORMAL,
        run: |ctx, caps| Box::pin(consume_dead_letters_a_permanent_failure_at_once(ctx, caps)),
    },
    Case {
        name: "consume_batch_dead_letters_only_the_failed_message_and_acks_the_rest",
        needs: &[Need::AtLeastOnce],
        max_attempts: Some(5),
        limit: NORMAL,
        run: |ctx, _| Box::pin(consume_batch_dead_letters_only_the_failed_message_and_acks_the_rest(ctx)),
    },
    Case {
        name: "graceful_shutdown_settles_in_flight_messages",
        needs: &[Need::AtLeastOnce],
        max_attempts: None,
        limit: NORMAL,
        run: |ctx, _| Box::pin(graceful_shutdown_settles_in_flight_messages(ctx)),
    },
    Case {
        name: RESTART_CASE,
        needs: &[Need::PrivateBroker],
        max_attempts: None,
        limit: RESTART_LIMIT,
        run: |ctx, _| Box::pin(broker_restart_mid_publish_and_mid_consume(ctx, Stop::Graceful)),
    },
    Case {
        name: CRASH_CASE,
        needs: &[Need::PrivateBroker, Need::CrashSafe],
        max_attempts: None,
        limit: RESTART_LIMIT,
        run: |ctx, _| Box::pin(broker_restart_mid_publish_and_mid_consume(ctx, Stop::Kill)),
    },
    Case {
        name: LOAD_CASE,
        needs: &[Need::Alone],
        max_attempts: None,
        limit: LONG,
        run: |ctx, _| Box::pin(load_lose_nothing(ctx, LONG)),
    },
    Case {
        name: process::KILL_CASE,
        needs: &[Need::AtLeastOnce, Need::ProcessFaults],
        max_attempts: None,
        limit: LONG,
        run: |ctx, _| Box::pin(process::consumer_process_killed_mid_stream_loses_nothing(ctx)),
    },
    Case {
        name: process::KILLED_GROUP_CASE,
        needs: &[Need::AtLeastOnce, Need::ProcessFaults],
        max_attempts: None,
        limit: LONG,
        run: |ctx, _| {
            Box::pin(process::group_replaced_after_its_member_processes_were_killed_loses_nothing(ctx))
        },
    },
    Case {
        name: process::CLOSED_GROUP_CASE,
        needs: &[Need::AtLeastOnce],
        max_attempts: None,
        limit: LONG,
        run: |ctx, _| Box::pin(process::group_replaced_after_its_members_closed_loses_nothing(ctx)),
    },
];

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// Checks the attempt number where the adapter declares it counts attempts.
#[track_caller]
fn assert_attempt(caps: &Capabilities, delivery: &Delivery, expected: u32, what: &str) {
    if caps.counts_attempts {
        assert_eq!(delivery.attempt, expected, "attempt number of {what}");
    }
}

/// Fails unless `delivery` is `sent` (same id, payload, headers, key and content type).
#[track_caller]
fn assert_same_message(delivery: &Delivery, sent: &Message, what: &str) {
    assert_eq!(delivery.id, sent.id, "id of {what}");
    assert_eq!(delivery.payload, sent.payload, "payload of {what}");
    assert_eq!(delivery.headers, sent.headers, "headers of {what}");
    assert_eq!(delivery.key, sent.key, "key of {what}");
    assert_eq!(delivery.content_type, sent.content_type, "content type of {what}");
}

async fn round_trip_keeps_payload_headers_and_key(ctx: Ctx, caps: Capabilities) {
    let mut sub = ctx.subscribe("reader").await;
    // Every byte value, so no adapter can get away with a text encoding.
    let payload: Vec<u8> = (0..=255u8).chain(*b"\r\n\0end").collect();
    let sent = Message::new(payload)
        .key("customer-42")
        .content_type("application/octet-stream")
        .header("traceparent", TRACEPARENT)
        .header("x-tenant", "äöü ✓ with spaces: and colons");
    let before = polybus::core::message::now();
    let id = ctx.publish(sent.clone()).await;
    assert_eq!(id, sent.id, "publish returns the message's own id");

    let delivery = receive(&mut sub, "the published message").await;
    let after = polybus::core::message::now();
    assert_same_message(&delivery, &sent, "the delivered message");
    assert_attempt(&caps, &delivery, 1, "the first delivery");
    // Brokers that stamp their own publish time may differ from ours by clock skew and rounding.
    let slack = chrono::TimeDelta::milliseconds(1000);
    assert!(
        delivery.published_at >= before - slack && delivery.published_at <= after + slack,
        "published_at {} is not between {before} and {after} (±1 s)",
        delivery.published_at
    );
    delivery.ack().await.or_fail("acking");
}

async fn header_rules_give_the_same_answer_on_every_broker(ctx: Ctx) {
    let mut sub = ctx.subscribe("reader").await;
    // What one broker would refuse, drop, act on or choke on is refused by polybus on all of them.
    let refused = [
        ("a reserved polybus- name", Message::text("r").header(wire::ATTEMPT, "999")),
        ("a header name with NUL", Message::text("r").header("a\0b", "v")),
        ("an empty header name", Message::text("r").header("", "v")),
        ("a header name with a space", Message::text("r").header("a b", "v")),
        ("a value with CR LF", Message::text("r").header("h", "v\r\nInjected: 1")),
        ("a value with a tab", Message::text("r").header("h", "a\tb")),
        ("a value over 1024 bytes", Message::text("r").header("h", "v".repeat(1025))),
        ("a name NATS JetStream acts on", Message::text("r").header("Nats-Rollup", "all")),
        ("a name RabbitMQ routes on", Message::text("r").header("CC", "elsewhere")),
        ("a name RabbitMQ counts attempts in", Message::text("r").header("x-delivery-count", "999")),
        ("a name Pub/Sub refuses", Message::text("r").header("goog-x", "v")),
        ("a key with NUL", Message::text("r").key("k\0")),
    ];
    for (what, message) in refused {
        match within(WAIT, what, ctx.bus.publish(ENV, &ctx.event, message)).await {
            Err(polybus::Error::Validation(e)) => {
                assert!(e.field == "headers" || e.field == "key", "{what}: {e}")
            }
            other => panic!("{what}: expected a validation error, got {other:?}"),
        }
    }
    let batch = vec![Message::text("fine"), Message::text("bad").header("polybus-id", "forged")];
    match within(WAIT, "a batch with one bad message", ctx.bus.publish_batch(ENV, &ctx.event, batch)).await {
        Err(polybus::Error::Validation(e)) => assert_eq!(e.field, "messages[1].headers"),
        other => panic!("a batch with one bad message: expected a validation error, got {other:?}"),
    }

    // The connection is intact, and headers at every limit travel unchanged.
    let mut edge = Message::text("at the limits")
        .key("k".repeat(200))
        .header("x.a_b-c~1", "v".repeat(1024))
        .header("n".repeat(128), "a name at the limit")
        .header("x-unicode", "äöü ✓ 😀 with spaces: and colons");
    for i in 0..61 {
        edge = edge.header(format!("h{i:02}"), i.to_string());
    }
    assert_eq!(edge.headers.len(), 64);
    ctx.publish(edge.clone()).await;
    let delivery = receive(&mut sub, "the message with headers at the limits").await;
    assert_same_message(&delivery, &edge, "the message with headers at the limits");
    delivery.ack().await.or_fail("acking");
    expect_nothing(&mut sub, ACK_DEADLINE + LINGER, "the topic after the refused publishes").await;
}

async fn competing_consumers_each_message_goes_to_one_member(ctx: Ctx) {
    let subs = vec![ctx.subscribe("workers").await, ctx.subscribe("workers").await];
    let mut members = Members::spawn(subs);
    let ids = ctx.publish_numbered(&ctx.event, "work", 200).await;
    // Listening past the ack deadline also catches messages whose ack did not hold.
    let tally = members.collect(ids.len(), COLLECT, ACK_DEADLINE + LINGER).await;
    let ack_errors = members.stop();
    tally.assert_ids(&ids, "competing members");
    eprintln!("competing consumers: deliveries per member {:?}", tally.per_member());
    let shared: Vec<_> = tally.by_id.iter().filter(|(_, members)| members.len() > 1).collect();
    assert!(
        shared.is_empty(),
        "{} of 200 messages were delivered more than once (first: {:?})",
        shared.len(),
        shared.first()
    );
    assert_eq!(ack_errors, 0, "acks that failed");
}

async fn fan_out_every_group_gets_every_message(ctx: Ctx) {
    let mut billing = Members::spawn(vec![ctx.subscribe("billing").await]);
    let mut audit = Members::spawn(vec![ctx.subscribe("audit").await]);
    let ids = ctx.publish_numbered(&ctx.event, "fan", 50).await;
    for (group, members) in [("billing", &mut billing), ("audit", &mut audit)] {
        let tally = members.collect(ids.len(), COLLECT, LINGER).await;
        tally.assert_ids(&ids, format!("group {group}"));
        assert_eq!(tally.duplicates(), 0, "duplicate deliveries to group {group}");
    }
    assert_eq!(billing.stop() + audit.stop(), 0, "acks that failed");
}

async fn nacked_message_is_redelivered(ctx: Ctx, caps: Capabilities) {
    let mut sub = ctx.subscribe("reader").await;
    let sent = Message::text("nack me").key("k").header("traceparent", TRACEPARENT);
    ctx.publish(sent.clone()).await;

    let first = receive(&mut sub, "the first delivery").await;
    assert_same_message(&first, &sent, "the first delivery");
    assert_attempt(&caps, &first, 1, "the first delivery");
    first.nack().await.or_fail("nacking");

    let again = receive(&mut sub, "the redelivery after a nack").await;
    assert_same_message(&again, &sent, "the redelivery");
    assert_attempt(&caps, &again, 2, "the redelivery");
    again.ack().await.or_fail("acking the redelivery");
}

async fn nack_with_delay_redelivers_no_sooner_than_the_delay(ctx: Ctx, caps: Capabilities) {
    let delay = Duration::from_secs(1);
    let mut sub = ctx.subscribe("reader").await;
    let sent = Message::text("later, please");
    ctx.publish(sent.clone()).await;

    let first = receive(&mut sub, "the first delivery").await;
    let nacked_at = Instant::now();
    first.nack_after(delay).await.or_fail("nacking with a delay");

    let again = receive(&mut sub, "the redelivery after a delayed nack").await;
    let waited = nacked_at.elapsed();
    assert_same_message(&again, &sent, "the redelivery");
    assert_attempt(&caps, &again, 2, "the redelivery");
    assert!(
        waited + TIMER_SLACK >= delay,
        "redelivered after {waited:?}, before the nack delay of {delay:?}"
    );
    again.ack().await.or_fail("acking the redelivery");
}

async fn unacked_message_goes_to_another_member_after_the_ack_deadline(ctx: Ctx, caps: Capabilities) {
    // One delivery at a time: while it holds the message, the member asks the broker for no
    // more. A receive still open when a member leaves may take the message once more at the
    // broker (an SQS long poll outlives its sender), counting an attempt no handler saw.
    let options = SubscribeOptions { prefetch: 1, ..ctx.options("workers") };
    let mut doomed = ctx.subscribe_with(&ctx.event, options).await;
    let sent = Message::text("finish me");
    ctx.publish(sent.clone()).await;
    let taken = receive(&mut doomed, "the first delivery").await;
    assert_attempt(&caps, &taken, 1, "the first delivery");

    // The second member joins only now, so the first one is sure to have taken the message.
    // The first leaves still holding it, unsettled.
    let mut survivor = ctx.subscribe("workers").await;
    doomed.close().await.or_fail("closing the member that disappears");
    drop(taken);
    drop(doomed);

    let again = receive(&mut survivor, "the redelivery to the surviving member").await;
    assert_same_message(&again, &sent, "the redelivery");
    assert_attempt(&caps, &again, 2, "the redelivery");
    again.ack().await.or_fail("acking the redelivery");
}

async fn dead_letter_after_max_attempts(ctx: Ctx) {
    let mut main = ctx.subscribe("billing").await;
    let what = "subscribing to the dead letters";
    let mut dead = within(WAIT, what, ctx.bus.dead_letters(ENV, &ctx.event, ctx.options("dead-reader")))
        .await
        .or_fail(what);
    let sent = Message::text("poison")
        .key("k-1")
        .header("traceparent", TRACEPARENT)
        .header("x-origin", "conformance");
    ctx.publish(sent.clone()).await;

    for attempt in 1..=2 {
        let delivery = receive(&mut main, format!("delivery attempt {attempt}")).await;
        assert_eq!(delivery.id, sent.id, "id of attempt {attempt}");
        assert_eq!(delivery.attempt, attempt, "attempt number");
        delivery.nack().await.or_fail(format!("nacking attempt {attempt}"));
    }

    let dead_letter = receive(&mut dead, "the dead-lettered message").await;
    assert_eq!(dead_letter.id, sent.id, "id of the dead letter");
    assert_eq!(dead_letter.payload, sent.payload, "payload of the dead letter");
    assert_eq!(dead_letter.key, sent.key, "key of the dead letter");
    assert_eq!(dead_letter.content_type, sent.content_type, "content type of the dead letter");
    let reason = dead_letter.headers.get(wire::DEAD_LETTER_REASON).cloned().unwrap_or_default();
    assert!(
        !reason.is_empty(),
        "dead letter has no {} header: {:?}",
        wire::DEAD_LETTER_REASON,
        dead_letter.headers
    );
    let mut expected = sent.headers.clone();
    expected.insert(wire::DEAD_LETTER_REASON.into(), reason);
    expected.insert(wire::DEAD_LETTER_ATTEMPTS.into(), "2".into());
    expected.insert(wire::DEAD_LETTER_EVENT.into(), ctx.event.clone());
    expected.insert(wire::DEAD_LETTER_GROUP.into(), ctx.group("billing"));
    let at = dead_letter.headers.get(wire::DEAD_LETTERED_AT).cloned().unwrap_or_default();
    assert!(wire::parse_time(&at).is_some(), "{} is a time: {at:?}", wire::DEAD_LETTERED_AT);
    expected.insert(wire::DEAD_LETTERED_AT.into(), at);
    assert_eq!(dead_letter.headers, expected, "headers of the dead letter");
    dead_letter.ack().await.or_fail("acking the dead letter");

    // Long enough for a redelivery, had either message not been settled.
    tokio::join!(
        expect_nothing(&mut main, ACK_DEADLINE + LINGER, "the main topic after dead-lettering"),
        expect_nothing(&mut dead, ACK_DEADLINE + LINGER, "the dead letters after acking the one"),
    );
}

async fn delayed_message_is_not_delivered_before_its_delay(ctx: Ctx) {
    let delay = Duration::from_secs(1);
    let mut sub = ctx.subscribe("reader").await;
    let published_at = Instant::now();
    let id = ctx.publish(Message::text("in a second").delay(delay)).await;
    let delivery = receive(&mut sub, "the delayed message").await;
    let waited = published_at.elapsed();
    assert_eq!(delivery.id, id, "id of the delayed message");
    assert!(waited + TIMER_SLACK >= delay, "delivered after {waited:?}, before its delay of {delay:?}");
    delivery.ack().await.or_fail("acking");
}

async fn messages_with_one_key_arrive_in_publish_order(ctx: Ctx) {
    const KEYS: usize = 3;
    const PER_KEY: usize = 50;
    let mut sub = ctx.subscribe("reader").await;
    // One at a time: publish order is only defined for sequential publishes.
    for seq in 0..PER_KEY {
        for key in 0..KEYS {
            ctx.publish(Message::text(seq.to_string()).key(format!("key-{key}"))).await;
        }
    }
    let mut seen: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for n in 0..KEYS * PER_KEY {
        let delivery = receive(&mut sub, format!("message {n} of {}", KEYS * PER_KEY)).await;
        let key =
            delivery.key.clone().unwrap_or_else(|| panic!("message {} arrived without its key", delivery.id));
        let seq =
            delivery.payload_str().and_then(|s| s.parse().ok()).expect("payload is the sequence number");
        seen.entry(key).or_default().push(seq);
        delivery.ack().await.or_fail("acking");
    }
    let in_order: Vec<usize> = (0..PER_KEY).collect();
    for key in 0..KEYS {
        let key = format!("key-{key}");
        assert_eq!(seen.get(&key), Some(&in_order), "sequence received for {key}");
    }
}

async fn batch_publish_delivers_every_message(ctx: Ctx) {
    let mut members = Members::spawn(vec![ctx.subscribe("reader").await]);
    let batch: Vec<_> = (0..100).map(|i| Message::text(format!("batch-{i}"))).collect();
    let sent_ids: Vec<_> = batch.iter().map(|m| m.id.clone()).collect();
    let what = "publishing a batch of 100";
    let ids = within(WAIT, what, ctx.bus.publish_batch(ENV, &ctx.event, batch)).await.or_fail(what);
    assert_eq!(ids, sent_ids, "publish_batch returns the messages' ids in order");
    let tally = members.collect(ids.len(), COLLECT, LINGER).await;
    tally.assert_ids(&ids, "batch");
    assert_eq!(tally.duplicates(), 0, "duplicate deliveries");
    assert_eq!(members.stop(), 0, "acks that failed");
}

async fn topics_are_isolated(ctx: Ctx) {
    let other = ctx.another_topic("other").await;
    // The same group name on both topics: groups belong to their topic.
    let mut on_main = Members::spawn(vec![ctx.subscribe("reader").await]);
    let mut on_other = Members::spawn(vec![ctx.subscribe_with(&other, ctx.options("reader")).await]);
    let main_ids = ctx.publish_numbered(&ctx.event, "main", 20).await;
    let other_ids = ctx.publish_numbered(&other, "other", 20).await;
    let tally = on_main.collect(main_ids.len(), COLLECT, LINGER).await;
    tally.assert_ids(&main_ids, format!("subscriber of {}", ctx.event));
    let tally = on_other.collect(other_ids.len(), COLLECT, LINGER).await;
    tally.assert_ids(&other_ids, format!("subscriber of {other}"));
    assert_eq!(on_main.stop() + on_other.stop(), 0, "acks that failed");
}

async fn close_flushes_pending_publishes(ctx: Ctx) {
    // The reading bus joins first, so brokers that keep messages only for existing groups
    // (a RabbitMQ queue, a Pub/Sub subscription) have somewhere to keep them.
    let reader = ctx.new_bus();
    let what = "subscribing on the second bus";
    let sub =
        within(WAIT, what, reader.subscribe(ENV, &ctx.event, ctx.options("after-close"))).await.or_fail(what);

    let publishes: Vec<_> = (0..200)
        .map(|i| {
            let (bus, event) = (ctx.bus.clone(), ctx.event.clone());
            tokio::spawn(async move { bus.publish(ENV, &event, Message::text(format!("flush-{i}"))).await })
        })
        .collect();
    let mut ids = Vec::with_capacity(publishes.len());
    for (i, publish) in publishes.into_iter().enumerate() {
        let id = within(WAIT, format!("publish {i}"), publish).await.or_fail("publish task");
        ids.push(id.or_fail(format!("publish {i}")));
    }
    within(WAIT, "closing the publishing bus", ctx.bus.close()).await.or_fail("closing the publishing bus");

    let mut members = Members::spawn(vec![sub]);
    let tally = members.collect(ids.len(), COLLECT, LINGER).await;
    tally.assert_ids(&ids, "messages published before close");
    assert_eq!(members.stop(), 0, "acks that failed");
    within(WAIT, "closing the reading bus", reader.close()).await.or_fail("closing the reading bus");
}

async fn one_mib_message_round_trips_byte_for_byte(ctx: Ctx) {
    let mut sub = ctx.subscribe("reader").await;
    // A xorshift sequence: incompressible, every byte value, no runs a broker could mangle unseen.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let payload: Vec<u8> = (0..1 << 20)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let id = ctx.publish(Message::new(payload.clone()).content_type("application/octet-stream")).await;
    let delivery = receive(&mut sub, "the 1 MiB message").await;
    assert_eq!(delivery.id, id, "id of the 1 MiB message");
    if delivery.payload != payload {
        let first_difference = delivery.payload.iter().zip(&payload).position(|(a, b)| a != b);
        panic!(
            "1 MiB payload changed: received {} bytes for {} sent; first differing byte at {:?}",
            delivery.payload.len(),
            payload.len(),
            first_difference
        );
    }
    delivery.ack().await.or_fail("acking");
}

async fn many_concurrent_publishers_lose_nothing(ctx: Ctx) {
    const PUBLISHERS: usize = 20;
    const EACH: usize = 250;
    const MEMBERS: usize = 5;
    // A roomy deadline: this case is about losing nothing, not about redelivery timing.
    let options = SubscribeOptions { ack_deadline: Duration::from_secs(10), ..ctx.options("workers") };
    let subs = ctx.subscribe_together(&ctx.event, &options, MEMBERS).await;
    let mut members = Members::spawn(subs);
    let started = Instant::now();
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let (bus, event) = (ctx.bus.clone(), ctx.event.clone());
            tokio::spawn(async move {
                let mut ids = Vec::with_capacity(EACH);
                for i in 0..EACH {
                    let message = Message::text(format!("publisher {p} message {i}"));
                    let what = format!("publisher {p}, message {i}");
                    ids.push(within(WAIT, &what, bus.publish(ENV, &event, message)).await.or_fail(&what));
                }
                ids
            })
        })
        .collect();
    let mut ids = Vec::with_capacity(PUBLISHERS * EACH);
    for (p, publisher) in publishers.into_iter().enumerate() {
        ids.extend(within(LONG, format!("publisher {p}"), publisher).await.or_fail("publisher task"));
    }
    let published = started.elapsed();
    let tally = members.collect(ids.len(), Duration::from_secs(90), LINGER).await;
    let ack_errors = members.stop();
    eprintln!(
        "many publishers: {} messages published in {published:?}, consumed in {:?}; {} duplicate deliveries, \
         {ack_errors} failed acks; per member {:?}",
        ids.len(),
        started.elapsed(),
        tally.duplicates(),
        tally.per_member()
    );
    tally.assert_ids(&ids, "messages from concurrent publishers");
}

async fn reconnects_after_the_broker_restarts(ctx: Ctx) {
    let restart = ctx.restart.clone().expect("the harness runs this case only with a restart hook");
    let mut sub = ctx.subscribe("reader").await;
    let before = ctx.publish(Message::text("before the restart")).await;
    within(Duration::from_secs(60), "the broker to restart", restart()).await;

    // The first publish may see the dropped connection; it must then fail, not vanish.
    let message = Message::text("after the restart");
    let deadline = Instant::now() + Duration::from_secs(30);
    let after = loop {
        match tokio::time::timeout(WAIT, ctx.bus.publish(ENV, &ctx.event, message.clone())).await {
            Ok(Ok(id)) => break id,
            Ok(Err(e)) if Instant::now() < deadline => {
                eprintln!("publish after restart failed, retrying: {e}")
            }
            Ok(Err(e)) => panic!("publishing after the restart kept failing for 30 s: {e}"),
            Err(_) => panic!("publishing after the restart hung for {WAIT:?}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    let mut missing: HashSet<String> = [before, after].into_iter().collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !missing.is_empty() {
        match tokio::time::timeout_at(deadline, sub.next()).await {
            Ok(Some(Ok(delivery))) => {
                missing.remove(&delivery.id);
                if let Err(e) = delivery.ack().await {
                    eprintln!("ack after restart failed (the message will come back): {e}");
                }
            }
            Ok(Some(Err(e))) => {
                eprintln!("receiving after restart failed, retrying: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(None) => panic!("the subscription closed at the restart instead of reconnecting"),
            Err(_) => panic!("30 s after the restart, still missing {missing:?}"),
        }
    }
}

async fn prefetch_bounds_unacked_deliveries(ctx: Ctx, caps: Capabilities) {
    const PREFETCH: usize = 5;
    // Long enough that none of the held deliveries expires while the case looks.
    let options = SubscribeOptions {
        prefetch: PREFETCH,
        ack_deadline: Duration::from_secs(10),
        ..ctx.options("reader")
    };
    let mut sub = ctx.subscribe_with(&ctx.event, options).await;
    ctx.publish_numbered(&ctx.event, "held", 2 * PREFETCH).await;
    let mut held = Vec::with_capacity(PREFETCH);
    for n in 1..=PREFETCH {
        held.push(receive(&mut sub, format!("delivery {n} of the first {PREFETCH}")).await);
    }
    let held_ids: HashSet<String> = held.iter().map(|d| d.id.clone()).collect();
    assert_eq!(held_ids.len(), PREFETCH, "the first {PREFETCH} deliveries are distinct messages");

    let mut sixth = tokio::spawn(async move {
        let next = sub.next().await;
        (sub, next)
    });
    if let Ok(early) = tokio::time::timeout(Duration::from_millis(500), &mut sixth).await {
        let (_, next) = early.or_fail("receiving task");
        panic!(
            "with {PREFETCH} unacked deliveries and prefetch {PREFETCH}, another was handed out: {next:?}"
        );
    }
    held.pop().expect("held deliveries").ack().await.or_fail("acking one held delivery");
    let (mut sub, next) =
        within(WAIT, "a delivery after one ack", &mut sixth).await.or_fail("receiving task");
    let delivery = match next {
        Some(Ok(d)) => d,
        Some(Err(e)) => panic!("receiving after one ack: {e}"),
        None => panic!("the subscription closed"),
    };
    assert!(
        !held_ids.contains(&delivery.id),
        "after one ack, a held message ({}) was handed out again",
        delivery.id
    );
    assert_attempt(&caps, &delivery, 1, "the sixth delivery");
    delivery.ack().await.or_fail("acking");
    for d in held {
        d.ack().await.or_fail("acking a held delivery");
    }
    sub.close().await.or_fail("closing");
}

async fn next_batch_takes_ready_deliveries_up_to_max_and_settles_each(ctx: Ctx, caps: Capabilities) {
    const SENT: usize = 8;
    const MAX: usize = 5;
    let options = SubscribeOptions { prefetch: 2 * SENT, ..ctx.options("batches") };
    let mut sub = ctx.subscribe_with(&ctx.event, options).await;
    let batch: Vec<_> = (0..SENT).map(|i| Message::text(format!("batch-{i}"))).collect();
    let what = "publishing a batch";
    let ids = within(WAIT, what, ctx.bus.publish_batch(ENV, &ctx.event, batch)).await.or_fail(what);

    // Gathering for up to WAIT: all SENT are ready well before, so the first batch is full.
    let what = "the first batch";
    let first = match within(WAIT * 2, what, sub.next_batch_within(MAX, WAIT)).await {
        Some(Ok(batch)) => batch,
        other => panic!("receiving {what}: {other:?}"),
    };
    assert_eq!(first.len(), MAX, "a batch of at most {MAX} with {SENT} ready");
    // The rest without waiting: batches of what is ready, never more than asked.
    let mut rest = Vec::new();
    while rest.len() < SENT - MAX {
        let what = "the rest of the messages";
        match within(WAIT, what, sub.next_batch(SENT)).await {
            Some(Ok(batch)) => {
                assert!(
                    batch.len() <= SENT - MAX - rest.len(),
                    "a batch of {} with {} left",
                    batch.len(),
                    SENT - MAX - rest.len()
                );
                rest.extend(batch);
            }
            other => panic!("receiving {what}: {other:?}"),
        }
    }
    let mut got: Vec<String> = first.iter().chain(&rest).map(|d| d.id.clone()).collect();
    got.sort();
    let mut sent = ids.clone();
    sent.sort();
    assert_eq!(got, sent, "the batches hold every message once");

    // One of the first batch is nacked, all others acked together.
    let mut first = first.into_deliveries();
    let nacked = first.remove(1);
    let nacked_id = nacked.id.clone();
    nacked.nack().await.or_fail("nacking one of a batch");
    polybus::Batch::from(first).ack_all().await.or_fail("acking the first batch");
    polybus::Batch::from(rest).ack_all().await.or_fail("acking the rest");

    let again = receive(&mut sub, "the redelivery of the nacked message").await;
    assert_eq!(again.id, nacked_id, "only the nacked message comes back");
    assert_attempt(&caps, &again, 2, "the redelivery");
    again.ack().await.or_fail("acking the redelivery");
    expect_nothing(&mut sub, ACK_DEADLINE + LINGER, "the topic after the batches were settled").await;
}

async fn consume_retries_with_backoff_then_succeeds(ctx: Ctx) {
    let base = Duration::from_millis(100);
    let (tx, mut calls) = mpsc::unbounded_channel();
    let count = Arc::new(AtomicU32::new(0));
    let handler = move |message: Message| {
        let (tx, count) = (tx.clone(), count.clone());
        async move {
            let call = count.fetch_add(1, Ordering::SeqCst) + 1;
            let _ = tx.send((message.attempt, Instant::now()));
            if call <= 2 {
                Err::<(), HandlerError>(format!("transient failure {call}").into())
            } else {
                Ok(())
            }
        }
    };
    let options = ConsumeOptions::new(ctx.group("workers"))
        .concurrency(1)
        .retry(base, Duration::from_secs(1))
        .ack_deadline(ACK_DEADLINE);
    let what = "starting the consume loop";
    let consumer = within(WAIT, what, ctx.bus.consume(ENV, &ctx.event, options, handler)).await.or_fail(what);
    ctx.publish(Message::text("third time lucky")).await;

    let mut seen = Vec::new();
    for n in 1..=3 {
        seen.push(within(WAIT, format!("handler call {n}"), calls.recv()).await.expect("handler calls"));
    }
    let stats = within(WAIT, "shutting down", consumer.shutdown()).await.or_fail("shutting down");
    let attempts: Vec<u32> = seen.iter().map(|(attempt, _)| *attempt).collect();
    assert_eq!(attempts, [1, 2, 3], "attempt numbers the handler saw");
    for (n, pair) in seen.windows(2).enumerate() {
        let (gap, backoff) = (pair[1].1 - pair[0].1, base * 2u32.pow(n as u32));
        assert!(
            gap + TIMER_SLACK >= backoff,
            "retry {} came after {gap:?}, before its backoff of {backoff:?}",
            n + 1
        );
    }
    assert_eq!(
        stats,
        ConsumeStats { acked: 1, retried: 2, dead_lettered: 0, settle_errors: 0 },
        "consume stats"
    );
    assert!(calls.try_recv().is_err(), "the handler ran again after succeeding");
}

async fn consume_dead_letters_with_the_handler_error_as_reason(ctx: Ctx) {
    const ERROR: &str = "card declined by the payment service";
    let failed = consume_one_failing(&ctx, "payments", || ERROR.into()).await;
    failed.assert_dead_lettered(ERROR, Some(2));
    assert_eq!(failed.calls, 2, "handler calls");
    assert_eq!(
        failed.stats,
        ConsumeStats { acked: 0, retried: 1, dead_lettered: 1, settle_errors: 0 },
        "consume stats"
    );
}

async fn consume_dead_letters_a_permanent_failure_at_once(ctx: Ctx, caps: Capabilities) {
    const ERROR: &str = "order 17 references a product that does not exist";
    let failed = consume_one_failing(&ctx, "orders", || HandlerError::permanent(ERROR)).await;
    failed.assert_dead_lettered(ERROR, caps.counts_attempts.then_some(1));
    assert_eq!(failed.calls, 1, "handler calls");
    assert_eq!(
        failed.stats,
        ConsumeStats { acked: 0, retried: 0, dead_lettered: 1, settle_errors: 0 },
        "consume stats"
    );
}

/// What became of one message whose handler always failed.
struct FailedOne {
    id: String,
    dead_letter: Message,
    calls: u32,
    stats: ConsumeStats,
}

impl FailedOne {
    /// The dead letter is the message, with `reason` and (when given) `attempts`.
    fn assert_dead_lettered(&self, reason: &str, attempts: Option<u32>) {
        let header = |name: &str| self.dead_letter.headers.get(name).map(String::as_str);
        assert_eq!(self.dead_letter.id, self.id, "id of the dead letter");
        assert_eq!(header(wire::DEAD_LETTER_REASON), Some(reason), "reason");
        if let Some(attempts) = attempts {
            assert_eq!(header(wire::DEAD_LETTER_ATTEMPTS), Some(attempts.to_string().as_str()), "attempts");
        }
    }
}

/// Consumes one message in `group` with a handler failing with `error()` until it is
/// dead-lettered (retrying every 50 ms); acks the dead letter.
async fn consume_one_failing(ctx: &Ctx, group: &str, error: fn() -> HandlerError) -> FailedOne {
    let what = "subscribing to the dead letters";
    let mut dead = within(WAIT, what, ctx.bus.dead_letters(ENV, &ctx.event, ctx.options("dead-reader")))
        .await
        .or_fail(what);
    let calls = Arc::new(AtomicU32::new(0));
    let counted = calls.clone();
    let handler = move |_: Message| {
        counted.fetch_add(1, Ordering::SeqCst);
        async move { Err::<(), HandlerError>(error()) }
    };
    let options = ConsumeOptions::new(ctx.group(group))
        .retry(Duration::from_millis(50), Duration::from_millis(50))
        .ack_deadline(ACK_DEADLINE);
    let what = "starting the consume loop";
    let consumer = within(WAIT, what, ctx.bus.consume(ENV, &ctx.event, options, handler)).await.or_fail(what);
    let id = ctx.publish(Message::text("failing work")).await;

    let dead_letter = receive(&mut dead, "the dead-lettered message").await;
    let stats = within(WAIT, "shutting down", consumer.shutdown()).await.or_fail("shutting down");
    let message = dead_letter.message().clone();
    dead_letter.ack().await.or_fail("acking the dead letter");
    FailedOne { id, dead_letter: message, calls: calls.load(Ordering::SeqCst), stats }
}

async fn consume_batch_dead_letters_only_the_failed_message_and_acks_the_rest(ctx: Ctx) {
    const ERROR: &str = "row 3 violates a constraint";
    let what = "subscribing to the dead letters";
    let mut dead = within(WAIT, what, ctx.bus.dead_letters(ENV, &ctx.event, ctx.options("dead-reader")))
        .await
        .or_fail(what);
    let handler = |batch: Vec<Message>| {
        let poison = batch.iter().position(|m| m.payload_str() == Some("poison"));
        async move {
            match poison {
                Some(i) => Err(BatchError::only([(i, HandlerError::permanent(ERROR))])),
                None => Ok(()),
            }
        }
    };
    let options = ConsumeOptions::new(ctx.group("loader"))
        .batch(8, Duration::from_millis(200))
        .ack_deadline(ACK_DEADLINE);
    let what = "starting the batch consume loop";
    let consumer =
        within(WAIT, what, ctx.bus.consume_batch(ENV, &ctx.event, options, handler)).await.or_fail(what);
    let batch: Vec<_> = ["a", "b", "c", "poison", "d", "e"].into_iter().map(Message::text).collect();
    let poison_id = batch[3].id.clone();
    let what = "publishing a batch";
    within(WAIT, what, ctx.bus.publish_batch(ENV, &ctx.event, batch)).await.or_fail(what);

    let dead_letter = receive(&mut dead, "the dead-lettered message").await;
    assert_eq!(dead_letter.id, poison_id, "only the failed message is dead-lettered");
    let reason = dead_letter.headers.get(wire::DEAD_LETTER_REASON).map(String::as_str);
    assert_eq!(reason, Some(ERROR), "reason");
    dead_letter.ack().await.or_fail("acking the dead letter");
    within(WAIT, "the other five acked", async {
        while consumer.stats().acked < 5 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // Long enough for a redelivery, had an ack not held: it would be handled and counted again.
    tokio::time::sleep(ACK_DEADLINE + LINGER).await;
    let stats = within(WAIT, "shutting down", consumer.shutdown()).await.or_fail("shutting down");
    assert_eq!(
        stats,
        ConsumeStats { acked: 5, retried: 0, dead_lettered: 1, settle_errors: 0 },
        "consume stats"
    );
    expect_nothing(&mut dead, LINGER, "the dead letters after the one").await;
}

async fn graceful_shutdown_settles_in_flight_messages(ctx: Ctx) {
    const TOTAL: usize = 20;
    const CONCURRENCY: usize = 4;
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let handled = Arc::new(Mutex::new(HashSet::new()));
    let done = handled.clone();
    let handler = move |message: Message| {
        let (started_tx, done) = (started_tx.clone(), done.clone());
        async move {
            let _ = started_tx.send(message.id.clone());
            // The handler's work.
            tokio::time::sleep(Duration::from_millis(200)).await;
            done.lock().expect("handled set").insert(message.id);
            Ok(())
        }
    };
    let options =
        ConsumeOptions::new(ctx.group("workers")).concurrency(CONCURRENCY).ack_deadline(ACK_DEADLINE);
    let what = "starting the consume loop";
    let consumer = within(WAIT, what, ctx.bus.consume(ENV, &ctx.event, options, handler)).await.or_fail(what);
    let ids = ctx.publish_numbered(&ctx.event, "work", TOTAL).await;

    let mut in_flight = HashSet::new();
    for n in 1..=CONCURRENCY {
        in_flight.insert(
            within(WAIT, format!("handler start {n}"), started.recv()).await.expect("handler starts"),
        );
    }
    let stats = within(WAIT, "shutting down", consumer.shutdown()).await.or_fail("shutting down");
    while let Ok(id) = started.try_recv() {
        in_flight.insert(id);
    }
    let handled = handled.lock().expect("handled set").clone();
    assert_eq!(handled, in_flight, "every started handler finished before shutdown returned");
    assert_eq!(
        stats,
        ConsumeStats { acked: handled.len() as u64, retried: 0, dead_lettered: 0, settle_errors: 0 },
        "consume stats"
    );

    // A new member gets exactly what was never handled: the in-flight ones were acked.
    let remaining: Vec<String> = ids.iter().filter(|id| !handled.contains(*id)).cloned().collect();
    let mut members = Members::spawn(vec![ctx.subscribe("workers").await]);
    let tally = members.collect(remaining.len(), COLLECT, ACK_DEADLINE + LINGER).await;
    members.stop();
    let redelivered: Vec<_> = tally.by_id.keys().filter(|id| handled.contains(*id)).collect();
    assert!(
        redelivered.is_empty(),
        "{} acked in-flight messages came back after shutdown: {redelivered:?}",
        redelivered.len()
    );
    tally.assert_ids(&remaining, "messages left after shutdown");
}
