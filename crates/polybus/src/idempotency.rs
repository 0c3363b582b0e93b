//! Idempotent publishing, the same on every broker: a message with an idempotency key is
//! published once per key, topic and env within the topic's `idempotencyWindow`; a later
//! publish with the key is not sent and answers the first message's id.
//!
//! The keys live in the registry's database (SQLite, or PostgreSQL shared by server
//! replicas), not in the broker: a publish claims its key (pending, with a [`CLAIM_LEASE`]),
//! publishes, then marks it published. A failed publish releases the claim, so a retry
//! publishes and nothing is lost. A publisher that dies between claiming and marking leaves a
//! pending claim that another publisher takes over once its lease ran out. Until then a
//! publish of that key waits up to [`PENDING_WAIT`] for the claim to resolve, then answers
//! `IDEMPOTENCY_PENDING` (retryable). A publisher that dies after the broker took its message
//! but before marking it published lets the key be published again after the lease: at least
//! once, never lost.

use std::collections::HashMap;
use std::time::Duration;

use polybus_core::{Error, EventRef, Message, Result};
use polybus_registry::{Claim, IdempotencyKey, IdempotencyRecord, IdempotencyState, IdempotencyStore};
use tokio::time::Instant;

use crate::Bus;
use crate::bus::{Resolved, in_batch, prepare};

/// How long a claim holds before another publisher may take it over.
pub const CLAIM_LEASE: Duration = Duration::from_secs(30);
/// How long a publish waits for another publisher's pending claim of its key.
pub const PENDING_WAIT: Duration = Duration::from_secs(5);
/// First pause between looks at a pending claim; it doubles up to [`POLL_MAX`].
const POLL_FIRST: Duration = Duration::from_millis(20);
const POLL_MAX: Duration = Duration::from_millis(250);

/// The outcome of one publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The message's id; for a duplicate, the id of the first message published with its key.
    pub id: String,
    /// True when the message was not sent because its idempotency key was published already.
    pub duplicate: bool,
}

/// What a claim with waiting came to.
enum Turn {
    /// Publish: the key is this message's.
    Publish,
    /// Do not: the key was published as this id.
    Duplicate(String),
}

impl Bus {
    /// Publishes one message to `event` in `env`, unless its idempotency key was published
    /// there within the topic's window; says which.
    pub async fn publish_outcome(&self, env: &str, event: &str, message: Message) -> Result<Published> {
        let route = self.resolve(env, event).await?;
        let message = prepare(message, &route)?;
        let id = message.id.clone();
        let Some(key) = message.idempotency_key.clone() else {
            route.send(event, message).await?;
            tracing::debug!(env, event, %id, "published");
            return Ok(Published { id, duplicate: false });
        };
        let store = self.registry().idempotency()?;
        let key = scope(env, event, key)?;
        if let Turn::Duplicate(first) = turn(store, &key, &id, &route).await? {
            tracing::debug!(env, event, key = %key.key, %first, "duplicate publish not sent");
            return Ok(Published { id: first, duplicate: true });
        }
        match route.send(event, message).await {
            Ok(()) => {
                settle(store, &[(key, id.clone())], &route).await;
                tracing::debug!(env, event, %id, "published");
                Ok(Published { id, duplicate: false })
            }
            Err(e) => {
                release(store, &[(key, id)]).await;
                Err(e)
            }
        }
    }

    /// Publishes several messages to `event` in `env`, in order, leaving out each whose
    /// idempotency key was published already (or earlier in the batch); says which, in order.
    pub async fn publish_batch_outcome(
        &self,
        env: &str,
        event: &str,
        messages: Vec<Message>,
    ) -> Result<Vec<Published>> {
        let route = self.resolve(env, event).await?;
        let messages = messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| prepare(m, &route).map_err(|e| in_batch(e, i)))
            .collect::<Result<Vec<_>>>()?;
        if messages.iter().all(|m| m.idempotency_key.is_none()) {
            let outcomes =
                messages.iter().map(|m| Published { id: m.id.clone(), duplicate: false }).collect();
            route.send_batch(event, messages).await?;
            return Ok(outcomes);
        }
        let store = self.registry().idempotency()?;
        let mut outcomes = Vec::with_capacity(messages.len());
        let mut sending = Vec::with_capacity(messages.len());
        let mut claimed: Vec<(IdempotencyKey, String)> = Vec::new();
        let mut first_of_key: HashMap<String, String> = HashMap::new();
        for message in messages {
            let id = message.id.clone();
            let Some(key) = message.idempotency_key.clone() else {
                outcomes.push(Published { id, duplicate: false });
                sending.push(message);
                continue;
            };
            if let Some(first) = first_of_key.get(&key) {
                outcomes.push(Published { id: first.clone(), duplicate: true });
                continue;
            }
            let scoped = scope(env, event, key.clone())?;
            let outcome = match turn(store, &scoped, &id, &route).await {
                Ok(Turn::Publish) => {
                    claimed.push((scoped, id.clone()));
                    sending.push(message);
                    Published { id, duplicate: false }
                }
                Ok(Turn::Duplicate(first)) => Published { id: first, duplicate: true },
                Err(e) => {
                    release(store, &claimed).await;
                    return Err(e);
                }
            };
            first_of_key.insert(key, outcome.id.clone());
            outcomes.push(outcome);
        }
        if !sending.is_empty()
            && let Err(e) = route.send_batch(event, sending).await
        {
            release(store, &claimed).await;
            return Err(e);
        }
        settle(store, &claimed, &route).await;
        Ok(outcomes)
    }

    /// What the registry holds for idempotency `key` of `event` in `env`: the first message's
    /// id, pending or published, since and until when; `None` when the key is free.
    pub async fn check_idempotency(
        &self,
        env: &str,
        event: &str,
        key: &str,
    ) -> Result<Option<IdempotencyRecord>> {
        polybus_core::message::check_idempotency_key(key)?;
        let event_ref: EventRef = event.parse()?;
        self.registry().fetch_topic(&event_ref.to_string()).await?;
        let broker = self.registry().fetch_broker(&event_ref.broker).await?;
        if broker.env(env).is_none() {
            return Err(Error::BrokerEnvNotFound {
                tag: broker.tag.clone(),
                env: env.to_owned(),
                available: broker.env_slugs(),
            });
        }
        let scoped = scope(env, event, key.to_owned())?;
        self.registry().idempotency()?.get(&scoped).await
    }
}

/// The key of `event` in `env`, the event written as the registry writes it.
fn scope(env: &str, event: &str, key: String) -> Result<IdempotencyKey> {
    let event: EventRef = event.parse()?;
    Ok(IdempotencyKey { env: env.to_owned(), event: event.to_string(), key })
}

/// Claims `key` for message `id`, waiting a little for another publisher's pending claim.
async fn turn(
    store: &dyn IdempotencyStore,
    key: &IdempotencyKey,
    id: &str,
    route: &Resolved,
) -> Result<Turn> {
    let deadline = Instant::now() + PENDING_WAIT;
    let mut pause = POLL_FIRST;
    loop {
        match store.claim(key, id, CLAIM_LEASE, route.spec.idempotency_window).await? {
            Claim::Claimed => return Ok(Turn::Publish),
            Claim::Taken(record) if record.state == IdempotencyState::Published => {
                return Ok(Turn::Duplicate(record.message_id));
            }
            Claim::Taken(record) => {
                if Instant::now() + pause > deadline {
                    return Err(Error::IdempotencyPending {
                        event: key.event.clone(),
                        key: key.key.clone(),
                        message_id: record.message_id,
                    });
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(POLL_MAX);
            }
        }
    }
}

/// Marks published claims published. The messages are on the broker whatever happens here:
/// a claim left pending lets its key be published again once its lease runs out.
async fn settle(store: &dyn IdempotencyStore, claimed: &[(IdempotencyKey, String)], route: &Resolved) {
    for (key, id) in claimed {
        match store.complete(key, id, route.spec.idempotency_window).await {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                event = %key.event, env = %key.env, key = %key.key, %id,
                "published after the idempotency claim's lease ran out; another publisher may have published the key too"
            ),
            Err(e) => tracing::warn!(
                event = %key.event, env = %key.env, key = %key.key, %id, error = %e,
                "published, but the idempotency key could not be marked; it can be published again once its claim's lease runs out"
            ),
        }
    }
}

/// Gives back the claims of a publish that failed, so a retry can publish.
async fn release(store: &dyn IdempotencyStore, claimed: &[(IdempotencyKey, String)]) {
    for (key, id) in claimed {
        if let Err(e) = store.release(key, id).await {
            tracing::warn!(
                event = %key.event, env = %key.env, key = %key.key, %id, error = %e,
                "the publish failed and its idempotency claim could not be released; a retry can publish once the claim's lease runs out"
            );
        }
    }
}
