//! Operating dead letters: list them with why they failed, send some or all back to their
//! topic (redrive), or delete them (purge), on every broker.
//!
//! Each operation reads the dead-letter destination through its standing group
//! ([`DEAD_LETTER_GROUP`]), holding what it reads until the scan ends, so every dead letter is
//! seen once: the scan stops when nothing more arrives for a moment, or at its limit. What it
//! does not act on is given back (nacked) at the end and stays. A redrive publishes a copy to
//! the topic first and acks the dead letter only once the broker confirmed that publish, so a
//! dead letter is never lost: at worst (a crash between the two) it is redriven twice. The copy
//! has a new id and names the dead letter's in the `polybus-redriven-from` header.
//! Consumers of [`DEAD_LETTER_GROUP`] compete with an operation under way.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use polybus_core::{Error, Message, Result, SubscribeOptions, wire};

use crate::{Bus, DEAD_LETTER_GROUP, Delivery, Subscriber};

/// How long a scan waits for the first dead letter (a group join can take seconds on Kafka).
const FIRST_WAIT: Duration = Duration::from_secs(8);
/// How long a scan waits for the next one before deciding it has seen them all.
const QUIET: Duration = Duration::from_millis(1500);
/// Most dead letters one operation holds at once (the scan's prefetch).
pub const SCAN_MAX: usize = 1000;
/// How long a scan may hold what it read before the broker gives it out again.
const HOLD: Duration = Duration::from_secs(15);
/// Header name prefix polybus reserves; a redriven copy carries none of the dead letter's.
const RESERVED_PREFIX: &str = "polybus-";

/// Which dead letters an operation acts on; empty fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadLetterFilter {
    /// Only those the group of this name gave up on.
    pub group: Option<String>,
    /// Only those whose reason contains this text.
    pub reason: Option<String>,
    /// Only those with these message ids.
    pub ids: Option<BTreeSet<String>>,
}

impl DeadLetterFilter {
    /// True when `letter` is one this filter selects.
    pub fn matches(&self, letter: &DeadLetter) -> bool {
        self.group.as_ref().is_none_or(|g| letter.group.as_ref() == Some(g))
            && self
                .reason
                .as_ref()
                .is_none_or(|r| letter.reason.as_deref().is_some_and(|have| have.contains(r.as_str())))
            && self.ids.as_ref().is_none_or(|ids| ids.contains(&letter.message.id))
    }
}

/// A dead letter: the message as it was published, and why and where it failed.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// The message, with the headers its publisher set (polybus's own removed).
    pub message: Message,
    /// Why it was dead-lettered.
    pub reason: Option<String>,
    /// How many deliveries it had.
    pub attempts: Option<u32>,
    /// The consumer group that gave up on it.
    pub group: Option<String>,
    /// The event it came from.
    pub event: Option<String>,
    /// When it was dead-lettered (the last failure), where recorded.
    pub dead_lettered_at: Option<DateTime<Utc>>,
}

impl DeadLetter {
    /// Reads the dead-letter headers off a message from the dead-letter destination.
    pub fn from_message(mut message: Message) -> DeadLetter {
        let reason = message.headers.get(wire::DEAD_LETTER_REASON).cloned();
        let attempts = message.headers.get(wire::DEAD_LETTER_ATTEMPTS).and_then(|a| a.parse().ok());
        let group = message.headers.get(wire::DEAD_LETTER_GROUP).cloned();
        let event = message.headers.get(wire::DEAD_LETTER_EVENT).cloned();
        let dead_lettered_at = message.headers.get(wire::DEAD_LETTERED_AT).and_then(|t| wire::parse_time(t));
        message.headers.retain(|name, _| !name.starts_with(RESERVED_PREFIX));
        DeadLetter { message, reason, attempts, group, event, dead_lettered_at }
    }
}

/// What a redrive or purge did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadLetterOutcome {
    /// Ids of the dead letters redriven (or purged).
    pub done: Vec<String>,
    /// Ids that matched but could not be redriven, with why; they stay dead letters.
    pub failed: Vec<(String, String)>,
    /// Dead letters seen that did not match and stay.
    pub kept: usize,
}

/// What an operation does with each dead letter it selects.
enum Act {
    List,
    Redrive,
    Purge,
}

impl Bus {
    /// Up to `limit` dead letters of `event` in `env` that `filter` selects (at most
    /// [`SCAN_MAX`] are read); all of them stay where they are.
    pub async fn list_dead_letters(
        &self,
        env: &str,
        event: &str,
        filter: &DeadLetterFilter,
        limit: usize,
    ) -> Result<Vec<DeadLetter>> {
        let (listed, _) = self.scan_dead_letters(env, event, filter, limit, Act::List).await?;
        Ok(listed)
    }

    /// Publishes the dead letters `filter` selects back to `event` in `env` (the same payloads,
    /// keys and headers, a new id naming the old in `polybus-redriven-from`) and removes each
    /// once its copy is confirmed.
    pub async fn redrive_dead_letters(
        &self,
        env: &str,
        event: &str,
        filter: &DeadLetterFilter,
    ) -> Result<DeadLetterOutcome> {
        Ok(self.scan_dead_letters(env, event, filter, SCAN_MAX, Act::Redrive).await?.1)
    }

    /// Deletes the dead letters `filter` selects.
    pub async fn purge_dead_letters(
        &self,
        env: &str,
        event: &str,
        filter: &DeadLetterFilter,
    ) -> Result<DeadLetterOutcome> {
        Ok(self.scan_dead_letters(env, event, filter, SCAN_MAX, Act::Purge).await?.1)
    }

    async fn scan_dead_letters(
        &self,
        env: &str,
        event: &str,
        filter: &DeadLetterFilter,
        limit: usize,
        act: Act,
    ) -> Result<(Vec<DeadLetter>, DeadLetterOutcome)> {
        let limit = limit.clamp(1, SCAN_MAX);
        let mut options = SubscribeOptions::new(DEAD_LETTER_GROUP);
        options.prefetch = SCAN_MAX;
        options.ack_deadline = HOLD;
        let mut subscriber = self.dead_letters(env, event, options).await?;
        let mut held: Vec<Delivery> = Vec::new();
        let mut listed = Vec::new();
        let mut outcome = DeadLetterOutcome::default();
        let mut seen = BTreeSet::new();
        let scanned = async {
            while held.len() < SCAN_MAX && listed.len() < limit {
                let wait = if seen.is_empty() { FIRST_WAIT } else { QUIET };
                let Some(delivery) = next_within(&mut subscriber, wait).await? else { break };
                // A dead letter seen twice (redelivered meanwhile) is acted on once.
                if !seen.insert((delivery.id.clone(), delivery.published_at)) {
                    held.push(delivery);
                    continue;
                }
                let letter = DeadLetter::from_message(delivery.message().clone());
                if !filter.matches(&letter) {
                    outcome.kept += 1;
                    held.push(delivery);
                    continue;
                }
                match act {
                    Act::List => {
                        listed.push(letter);
                        held.push(delivery);
                    }
                    Act::Purge => {
                        let id = letter.message.id.clone();
                        delivery.ack().await?;
                        outcome.done.push(id);
                    }
                    Act::Redrive => {
                        let id = letter.message.id.clone();
                        match self.redrive_one(env, event, letter).await {
                            Ok(()) => {
                                delivery.ack().await?;
                                outcome.done.push(id);
                            }
                            Err(e) => {
                                tracing::warn!(env, event, %id, error = %e, "redriving a dead letter failed; it stays");
                                outcome.failed.push((id, e.to_string()));
                                held.push(delivery);
                            }
                        }
                    }
                }
            }
            Ok::<_, Error>(())
        }
        .await;
        // Whatever happened, what was read and not acted on goes back, before closing: with
        // nothing unsettled, closing waits for the member to leave its group (Kafka commits
        // then), so the next operation reads from where this one left. The member stops
        // receiving first, so nothing given back is sent to its open fetch (NATS: it would wait
        // out HOLD there); what it received meanwhile is given back by its close.
        if let Err(e) = subscriber.stop().await {
            tracing::debug!(error = %e, "stopping a dead-letter scan");
        }
        let give_back = held.into_iter().map(|d| async move {
            if let Err(e) = d.nack().await {
                tracing::debug!(error = %e, "giving back a dead letter after a scan");
            }
        });
        futures::future::join_all(give_back).await;
        let closed = subscriber.close().await;
        scanned?;
        closed?;
        Ok((listed, outcome))
    }

    /// Publishes a copy of `letter` under a new id, naming the dead letter's id in
    /// [`wire::REDRIVEN_FROM`]: brokers that drop a second message with an id they saw lately
    /// (NATS JetStream's duplicate window, SQS FIFO deduplication) would discard the same id,
    /// and the dead letter would be gone.
    async fn redrive_one(&self, env: &str, event: &str, letter: DeadLetter) -> Result<()> {
        let route = self.resolve(env, event).await?;
        let mut copy = letter.message;
        copy.headers.insert(wire::REDRIVEN_FROM.into(), copy.id.clone());
        copy.id = uuid::Uuid::now_v7().to_string();
        copy.attempt = 0;
        copy.delay = None;
        copy.published_at = Utc::now();
        route.transport.publish(&route.spec, copy).await
    }
}

async fn next_within(subscriber: &mut Subscriber, wait: Duration) -> Result<Option<Delivery>> {
    match tokio::time::timeout(wait, subscriber.next()).await {
        Err(_) | Ok(None) => Ok(None),
        Ok(Some(delivery)) => delivery.map(Some),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(group: &str, reason: &str) -> DeadLetter {
        let mut message = Message::new("x");
        message.headers.insert(wire::DEAD_LETTER_GROUP.into(), group.into());
        message.headers.insert(wire::DEAD_LETTER_REASON.into(), reason.into());
        message.headers.insert(wire::DEAD_LETTER_ATTEMPTS.into(), "5".into());
        message.headers.insert("tenant".into(), "acme".into());
        DeadLetter::from_message(message)
    }

    #[test]
    fn the_dead_letter_headers_are_read_and_removed() {
        let l = letter("billing", "timeout");
        assert_eq!(
            (l.group.as_deref(), l.reason.as_deref(), l.attempts),
            (Some("billing"), Some("timeout"), Some(5))
        );
        assert_eq!(l.message.headers.keys().collect::<Vec<_>>(), ["tenant"]);
    }

    #[test]
    fn filters_match_on_group_reason_and_ids() {
        let l = letter("billing", "handler: timeout after 5 s");
        assert!(DeadLetterFilter::default().matches(&l));
        assert!(DeadLetterFilter { group: Some("billing".into()), ..Default::default() }.matches(&l));
        assert!(!DeadLetterFilter { group: Some("mail".into()), ..Default::default() }.matches(&l));
        assert!(DeadLetterFilter { reason: Some("timeout".into()), ..Default::default() }.matches(&l));
        let ids = DeadLetterFilter { ids: Some([l.message.id.clone()].into()), ..Default::default() };
        assert!(ids.matches(&l));
        assert!(!DeadLetterFilter { ids: Some(["other".into()].into()), ..Default::default() }.matches(&l));
    }
}
