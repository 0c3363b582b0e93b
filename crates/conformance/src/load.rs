//! Load: many publishers and competing consumers at once lose nothing; duplicates are counted
//! and reported.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use polybus::{Message, SubscribeOptions, Topic};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::fixture::{BROKER, Ctx, ENV, OrFail, WAIT};
use crate::reliability::{FaultFigures, report_fault};
use crate::restart::{Event, spawn_members};

/// Name of the load case.
pub(crate) const LOAD_CASE: &str = "load_50_publishers_10_consumers_10000_messages_lose_nothing";

const PUBLISHERS: usize = 50;
const CONSUMERS: usize = 10;
const MESSAGES: usize = 10_000;
/// How long the case keeps listening after everything arrived, to count late duplicates.
const LINGER: Duration = Duration::from_millis(500);

pub(crate) async fn load_lose_nothing(ctx: Ctx, limit: Duration) {
    let started = Instant::now();
    // A partition per consumer where the broker type takes a `partitions` option (Kafka), as a
    // deployment of ten competing consumers would have: more members than partitions leaves
    // some idle.
    let event = format!("{}-load", ctx.event);
    let mut options = serde_json::Map::new();
    options.insert("partitions".into(), CONSUMERS.into());
    let broker = ctx.registry.fetch_broker(BROKER).await.or_fail("the suite's broker");
    let kind = broker.env(ENV).and_then(|env| ctx.registry.kinds().get(&env.broker_type).ok().flatten());
    if kind.is_none_or(|kind| kind.validate_options(&options).is_err()) {
        options.clear();
    }
    let topic = serde_json::json!({"tag": event, "envs": [{"slug": ENV, "options": options}]});
    ctx.registry
        .create_topic(Topic::from_value(topic).or_fail("the load topic's definition"))
        .await
        .or_fail(format!("creating topic {event}"));
    // A roomy deadline: this case is about losing nothing under load, not redelivery timing.
    let options = SubscribeOptions { ack_deadline: Duration::from_secs(30), ..ctx.options("workers") };
    let subs = ctx.subscribe_together(&event, &options, CONSUMERS).await;
    eprintln!("load: {CONSUMERS} consumers joined in {:?}", started.elapsed());
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let ack_errors = Arc::new(AtomicU64::new(0));
    let members = spawn_members(subs, Duration::ZERO, events_tx, ack_errors.clone());

    let each = MESSAGES / PUBLISHERS;
    let publishing = Instant::now();
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let (bus, event) = (ctx.bus.clone(), event.clone());
            tokio::spawn(async move {
                let mut ids = Vec::with_capacity(each);
                for i in 0..each {
                    let message = Message::text(format!("publisher {p} message {i}"));
                    match tokio::time::timeout(WAIT, bus.publish(ENV, &event, message)).await {
                        Ok(Ok(id)) => ids.push(id),
                        Ok(Err(e)) => return (ids, Some(format!("publisher {p}, message {i}: {e}"))),
                        Err(_) => {
                            return (
                                ids,
                                Some(format!("publisher {p}, message {i}: no answer within {WAIT:?}")),
                            );
                        }
                    }
                }
                (ids, None)
            })
        })
        .collect();
    // Not failing yet: the figures are reported first, whatever went wrong.
    let deadline = started + limit - Duration::from_secs(5);
    let mut failure = None;
    let mut sent = Vec::with_capacity(MESSAGES);
    for (p, publisher) in publishers.into_iter().enumerate() {
        match tokio::time::timeout_at(deadline, publisher).await {
            Ok(Ok((ids, error))) => {
                sent.extend(ids);
                failure = failure.or(error);
            }
            Ok(Err(e)) => failure = failure.or(Some(format!("publisher {p}: {e}"))),
            Err(_) => {
                failure = failure.or(Some(format!("publisher {p} was not done when the case's time ran out")))
            }
        }
    }
    let published_in = publishing.elapsed();
    eprintln!("load: {} messages published in {published_in:?}", sent.len());

    // Received ids, with how often each came; a stall (nothing new for WAIT) ends the wait.
    let mut deliveries: HashMap<String, u64> = HashMap::new();
    while failure.is_none() && deliveries.len() < sent.len() {
        let until = (Instant::now() + WAIT).min(deadline);
        match tokio::time::timeout_at(until, events.recv()).await {
            Ok(Some(Event::Received { id })) => *deliveries.entry(id).or_default() += 1,
            Ok(Some(Event::ReceiveFailed { member, error })) => {
                failure = Some(format!("member {member}: receiving failed: {error}"));
            }
            Ok(Some(Event::Closed { member })) => {
                failure = Some(format!("member {member}'s subscription ended"))
            }
            Ok(Some(Event::AckHung { member, id })) => {
                failure = Some(format!("member {member}'s ack of {id} never returned"))
            }
            Ok(Some(_)) => {}
            Ok(None) => failure = Some("every member stopped".to_owned()),
            Err(_) => {
                let delivered = sent.iter().filter(|id| deliveries.contains_key(*id)).count();
                let missing = sent.iter().find(|id| !deliveries.contains_key(*id));
                let why = if until < deadline {
                    format!("nothing new for {WAIT:?}")
                } else {
                    "the case's time ran out".to_owned()
                };
                failure = Some(format!(
                    "received {delivered} of {} messages, then {why} (first missing: {missing:?})",
                    sent.len()
                ));
            }
        }
    }
    let consumed_in = publishing.elapsed();
    let linger_until = Instant::now() + LINGER;
    while let Ok(Some(event)) = tokio::time::timeout_at(linger_until, events.recv()).await {
        if let Event::Received { id } = event {
            *deliveries.entry(id).or_default() += 1;
        }
    }
    for member in members {
        member.abort();
    }

    let delivered = sent.iter().filter(|id| deliveries.contains_key(*id)).count();
    let figures = FaultFigures {
        fault: format!("load ({PUBLISHERS} publishers, {CONSUMERS} consumers)"),
        sent: sent.len() as u64,
        delivered: delivered as u64,
        lost: (sent.len() - delivered) as u64,
        duplicates: deliveries.values().sum::<u64>() - deliveries.len() as u64,
        recover: None,
    };
    eprintln!(
        "load: {} messages published by {PUBLISHERS} publishers in {published_in:?}, {delivered} consumed by \
         {CONSUMERS} consumers {consumed_in:?} after the first publish; {} failed acks",
        sent.len(),
        ack_errors.load(Ordering::Relaxed),
    );
    report_fault(LOAD_CASE, &figures);
    if let Some(failure) = failure {
        panic!("{failure}");
    }
    let foreign = deliveries.len() - delivered;
    assert_eq!(foreign, 0, "deliveries of messages this case never published");
}
