//! Delivery semantics of the embedded broker: groups, leases, ack/nack, delay, order, prefetch.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use common::{PATIENCE, broker, next, nothing_within, options, text, topic};
use polybus_core::{Error, Message, Transport};

#[tokio::test]
async fn every_field_round_trips() {
    let (_dir, broker) = broker().await;
    let orders = topic("round-trip");
    let payload: Vec<u8> = (0..(1024 * 1024)).map(|i| (i % 251) as u8).collect();
    let published_at = Utc.timestamp_millis_opt(1_700_000_000_123).single().expect("valid time");
    let mut sent = Message::new(payload)
        .id("order-1")
        .key("customer-42")
        .content_type("application/octet-stream")
        .header("traceparent", "00-abc-def-01")
        .header("ünïcode", "välue");
    sent.published_at = published_at;
    let empty = Message::new(Vec::new()).id("empty");
    broker.publish_batch(&orders, vec![sent.clone(), empty]).await.expect("publish");

    let mut sub = broker.subscribe(&orders, &options("g", 8, 5_000)).await.expect("subscribe");
    let got = next(&mut sub).await;
    let mut expected = sent;
    expected.attempt = 1;
    assert_eq!(got.message, expected);
    got.ack().await.expect("ack");

    let got = next(&mut sub).await;
    assert_eq!((got.message.id.as_str(), got.message.payload.len()), ("empty", 0));
    assert_eq!((got.message.key.clone(), got.message.headers.clone()), (None, BTreeMap::new()));
    got.ack().await.expect("ack");
}

#[tokio::test]
async fn every_group_gets_every_message() {
    let (_dir, broker) = broker().await;
    let orders = topic("fan-out");
    let mut billing = broker.subscribe(&orders, &options("billing", 8, 5_000)).await.expect("subscribe");
    let mut shipping = broker.subscribe(&orders, &options("shipping", 8, 5_000)).await.expect("subscribe");
    for i in 0..5 {
        broker.publish(&orders, Message::text(format!("m{i}"))).await.expect("publish");
    }
    for sub in [&mut billing, &mut shipping] {
        let mut seen = Vec::new();
        for _ in 0..5 {
            let delivery = next(sub).await;
            seen.push(text(&delivery));
            delivery.ack().await.expect("ack");
        }
        assert_eq!(seen, ["m0", "m1", "m2", "m3", "m4"]);
        nothing_within(sub, 100).await;
    }
}

#[tokio::test]
async fn members_of_a_group_compete() {
    let (_dir, broker) = broker().await;
    let orders = topic("compete");
    let mut first = broker.subscribe(&orders, &options("billing", 3, 5_000)).await.expect("subscribe");
    let mut second = broker.subscribe(&orders, &options("billing", 3, 5_000)).await.expect("subscribe");
    broker
        .publish_batch(&orders, (0..6).map(|i| Message::text(format!("m{i}"))).collect())
        .await
        .expect("publish");

    let mut held = Vec::new();
    for sub in [&mut first, &mut second] {
        for _ in 0..3 {
            held.push(next(sub).await);
        }
        nothing_within(sub, 100).await;
    }
    let ids: HashSet<_> = held.iter().map(|d| d.message.id.clone()).collect();
    assert_eq!(ids.len(), 6, "each message went to exactly one member");
    assert!(held.iter().all(|d| d.message.attempt == 1));
}

#[tokio::test]
async fn new_group_reads_messages_published_before_it_existed() {
    let (_dir, broker) = broker().await;
    let orders = topic("replay");
    broker.publish(&orders, Message::text("early")).await.expect("publish");
    let mut sub = broker.subscribe(&orders, &options("late", 8, 5_000)).await.expect("subscribe");
    assert_eq!(text(&next(&mut sub).await), "early");
}

#[tokio::test]
async fn nacked_message_is_redelivered_with_the_next_attempt() {
    let (_dir, broker) = broker().await;
    let orders = topic("nack");
    let mut sub = broker.subscribe(&orders, &options("g", 8, 5_000)).await.expect("subscribe");
    broker.publish(&orders, Message::text("retry me")).await.expect("publish");

    let first = next(&mut sub).await;
    assert_eq!(first.message.attempt, 1);
    first.nack(None).await.expect("nack");
    let second = next(&mut sub).await;
    assert_eq!((text(&second), second.message.attempt), ("retry me".to_owned(), 2));

    let started = Instant::now();
    second.nack(Some(Duration::from_millis(400))).await.expect("nack with delay");
    let third = next(&mut sub).await;
    assert!(started.elapsed() >= Duration::from_millis(400), "redelivered after {:?}", started.elapsed());
    assert_eq!(third.message.attempt, 3);
    third.ack().await.expect("ack");
    nothing_within(&mut sub, 100).await;
}

#[tokio::test]
async fn expired_lease_goes_to_another_member_and_the_late_ack_fails() {
    let (_dir, broker) = broker().await;
    let orders = topic("lease");
    let mut crashed = broker.subscribe(&orders, &options("g", 8, 300)).await.expect("subscribe");
    let mut survivor = broker.subscribe(&orders, &options("g", 8, 5_000)).await.expect("subscribe");
    broker.publish(&orders, Message::text("work")).await.expect("publish");

    let stale = next(&mut crashed).await;
    let started = Instant::now();
    let redelivered = next(&mut survivor).await;
    assert!(started.elapsed() >= Duration::from_millis(250), "redelivered after {:?}", started.elapsed());
    assert_eq!((redelivered.message.id.clone(), redelivered.message.attempt), (stale.message.id.clone(), 2));

    let err = stale.ack().await.expect_err("lease was lost");
    assert!(matches!(err, Error::LeaseLost(ref id) if *id == redelivered.message.id), "{err}");
    redelivered.ack().await.expect("ack by the current holder");
    nothing_within(&mut crashed, 400).await;
}

#[tokio::test]
async fn delayed_message_is_not_delivered_early() {
    let (_dir, broker) = broker().await;
    let orders = topic("delay");
    let mut sub = broker.subscribe(&orders, &options("g", 8, 5_000)).await.expect("subscribe");
    let started = Instant::now();
    broker.publish(&orders, Message::text("later").delay(Duration::from_millis(500))).await.expect("publish");
    broker.publish(&orders, Message::text("now")).await.expect("publish");

    assert_eq!(text(&next(&mut sub).await), "now");
    let later = next(&mut sub).await;
    assert_eq!(text(&later), "later");
    assert!(started.elapsed() >= Duration::from_millis(500), "delivered after {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_millis(1_500), "delivered after {:?}", started.elapsed());
}

#[tokio::test]
async fn messages_with_one_key_are_delivered_in_order() {
    let (_dir, broker) = broker().await;
    let orders = topic("order");
    let mut messages = Vec::new();
    for i in 0..4 {
        messages.push(Message::text(format!("a{i}")).key("a"));
        messages.push(Message::text(format!("b{i}")).key("b"));
    }
    messages.push(Message::text("free"));
    broker.publish_batch(&orders, messages).await.expect("publish");

    let mut first = broker.subscribe(&orders, &options("g", 16, 5_000)).await.expect("subscribe");
    let mut second = broker.subscribe(&orders, &options("g", 16, 5_000)).await.expect("subscribe");
    // Only the first message of each key is deliverable while it is unacked.
    let mut held = vec![next(&mut first).await, next(&mut first).await, next(&mut first).await];
    let mut names: Vec<_> = held.iter().map(text).collect();
    names.sort();
    assert_eq!(names, ["a0", "b0", "free"]);
    nothing_within(&mut first, 150).await;
    nothing_within(&mut second, 150).await;

    // A nacked message keeps its place ahead of the rest of its key.
    let a0 = held.remove(names.iter().position(|n| n == "a0").expect("a0 held"));
    a0.nack(None).await.expect("nack");
    let again = next(&mut second).await;
    assert_eq!((text(&again), again.message.attempt), ("a0".to_owned(), 2));
    held.push(again);

    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    while seen.values().map(Vec::len).sum::<usize>() < 8 {
        let delivery = match held.pop() {
            Some(delivery) => delivery,
            None => tokio::select! {
                d = first.next() => d.expect("open").expect("delivery"),
                d = second.next() => d.expect("open").expect("delivery"),
                _ = tokio::time::sleep(PATIENCE) => panic!("stalled after {seen:?}"),
            },
        };
        if let Some(key) = delivery.message.key.clone() {
            seen.entry(key).or_default().push(text(&delivery));
        }
        delivery.ack().await.expect("ack");
    }
    assert_eq!(seen["a"], ["a0", "a1", "a2", "a3"]);
    assert_eq!(seen["b"], ["b0", "b1", "b2", "b3"]);
}

#[tokio::test]
async fn a_member_holds_at_most_prefetch_unacked_deliveries() {
    let (_dir, broker) = broker().await;
    let orders = topic("prefetch");
    broker
        .publish_batch(&orders, (0..10).map(|i| Message::text(format!("m{i}"))).collect())
        .await
        .expect("publish");
    let mut sub = broker.subscribe(&orders, &options("g", 3, 5_000)).await.expect("subscribe");

    let mut held = vec![next(&mut sub).await, next(&mut sub).await, next(&mut sub).await];
    nothing_within(&mut sub, 200).await;
    held.pop().expect("held").ack().await.expect("ack");
    held.push(next(&mut sub).await);
    nothing_within(&mut sub, 100).await;
    // Dropping a delivery without settling frees its slot too (the message waits for its deadline).
    drop(held.pop());
    held.push(next(&mut sub).await);
    assert_eq!(held.len(), 3);
}

#[tokio::test]
async fn fetched_ahead_messages_keep_their_lease_until_handed_out() {
    let (_dir, broker) = broker().await;
    let orders = topic("fetched-ahead");
    broker
        .publish_batch(&orders, (0..4).map(|i| Message::text(format!("m{i}"))).collect())
        .await
        .expect("publish");
    let mut slow = broker.subscribe(&orders, &options("g", 4, 600)).await.expect("subscribe");
    let mut other = broker.subscribe(&orders, &options("g", 4, 600)).await.expect("subscribe");

    next(&mut slow).await.ack().await.expect("ack");
    // The other three were leased by the same fetch; handling the first took most of their deadline.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let rest = vec![next(&mut slow).await, next(&mut slow).await, next(&mut slow).await];
    nothing_within(&mut other, 400).await;
    for delivery in rest {
        assert_eq!(delivery.message.attempt, 1);
        delivery.ack().await.expect("still held");
    }
}

#[tokio::test]
async fn topics_never_see_each_other() {
    let (_dir, broker) = broker().await;
    let (orders, invoices) = (topic("orders"), topic("invoices"));
    let mut sub = broker.subscribe(&invoices, &options("g", 8, 5_000)).await.expect("subscribe");
    broker.publish(&orders, Message::text("order")).await.expect("publish");
    nothing_within(&mut sub, 200).await;
    broker.publish(&invoices, Message::text("invoice")).await.expect("publish");
    assert_eq!(text(&next(&mut sub).await), "invoice");
}

#[tokio::test]
async fn close_ends_subscriptions_and_refuses_publishes() {
    let (_dir, broker) = broker().await;
    let orders = topic("close");
    let mut sub = broker.subscribe(&orders, &options("g", 8, 5_000)).await.expect("subscribe");
    let waiting = tokio::spawn(async move { sub.next().await.is_none() });
    tokio::time::sleep(Duration::from_millis(50)).await;
    broker.close().await.expect("close");
    assert!(tokio::time::timeout(PATIENCE, waiting).await.expect("next returns").expect("task"));
    let err = broker.publish(&orders, Message::text("late")).await.expect_err("closed");
    assert!(matches!(err, Error::Closed(_)), "{err}");
}

#[tokio::test]
async fn closing_a_subscription_gives_back_what_it_had_not_handed_out() {
    let (_dir, broker) = broker().await;
    let orders = topic("give-back");
    broker
        .publish_batch(&orders, (0..4).map(|i| Message::text(format!("m{i}"))).collect())
        .await
        .expect("publish");
    let mut leaving = broker.subscribe(&orders, &options("g", 8, 30_000)).await.expect("subscribe");
    let handed = next(&mut leaving).await;
    leaving.close().await.expect("close");
    assert!(leaving.next().await.is_none());

    let mut staying = broker.subscribe(&orders, &options("g", 8, 30_000)).await.expect("subscribe");
    for expected in ["m1", "m2", "m3"] {
        let delivery = next(&mut staying).await;
        assert_eq!((text(&delivery), delivery.message.attempt), (expected.to_owned(), 1));
    }
    handed.ack().await.expect("a delivery handed out can be settled after close");
}
