//! Idempotency keys: which message a key of a topic in an env was first published as, kept in
//! the registry's database so every process and server replica sharing that registry agrees.
//!
//! A key is claimed before its message is published: the claim is *pending*, with a short
//! lease, until the publisher marks it *published* (or releases it when the publish failed, so
//! a retry can publish). A claim whose lease ran out (its publisher died) may be taken over;
//! a row whose window ran out is as good as absent, and is purged now and then.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use polybus_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// How often a store deletes the rows whose window ran out, at most.
const PURGE_EVERY: Duration = Duration::from_secs(60);
/// How many times a claim tries again when the row it met vanished before it could be read.
const CLAIM_TRIES: usize = 4;

/// Where an idempotency key applies: a topic (`broker:topic`) in an env.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey {
    /// The env slug.
    pub env: String,
    /// The event, `broker-tag:topic-tag`, as the registry writes it.
    pub event: String,
    /// The key the publisher gave.
    pub key: String,
}

/// Where a claimed key stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdempotencyState {
    /// Claimed by a publisher that has not finished publishing.
    Pending,
    /// Published: later publishes with the key within the window are not delivered.
    Published,
}

impl IdempotencyState {
    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            IdempotencyState::Pending => "pending",
            IdempotencyState::Published => "published",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text {
            "pending" => Some(IdempotencyState::Pending),
            "published" => Some(IdempotencyState::Published),
            _ => None,
        }
    }
}

/// What the registry holds for an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdempotencyRecord {
    /// The id of the first message published with the key.
    pub message_id: String,
    /// Pending or published.
    pub state: IdempotencyState,
    /// When the key was claimed.
    pub first_seen: DateTime<Utc>,
    /// When the key stops holding (the window's end).
    pub expires_at: DateTime<Utc>,
    /// While pending: when another publisher may take the claim over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_expires_at: Option<DateTime<Utc>>,
}

/// The answer to a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The key is this publisher's: publish, then [`IdempotencyStore::complete`] (or
    /// [`IdempotencyStore::release`] when the publish failed).
    Claimed,
    /// Another publisher has the key, pending or published.
    Taken(IdempotencyRecord),
}

/// Storage of idempotency keys; every operation is atomic in the database.
#[async_trait]
pub trait IdempotencyStore: Send + Sync {
    /// Inserts a pending claim of `key` for `message_id` (lease `lease`, window `window`), or
    /// takes over a row whose window or pending lease ran out; true when the key is now
    /// `message_id`'s.
    async fn try_claim(
        &self,
        key: &IdempotencyKey,
        message_id: &str,
        lease: Duration,
        window: Duration,
    ) -> Result<bool>;

    /// Marks `message_id`'s claim of `key` published, its window starting now; false when the
    /// claim is no longer `message_id`'s (its lease ran out and another publisher took it).
    async fn complete(&self, key: &IdempotencyKey, message_id: &str, window: Duration) -> Result<bool>;

    /// Removes `message_id`'s pending claim of `key`, so a retry can publish; false when there
    /// was none.
    async fn release(&self, key: &IdempotencyKey, message_id: &str) -> Result<bool>;

    /// What the registry holds for `key`, unless its window ran out.
    async fn get(&self, key: &IdempotencyKey) -> Result<Option<IdempotencyRecord>>;

    /// Deletes every row whose window ran out; how many.
    async fn purge_expired(&self) -> Result<u64>;

    /// Claims `key` for `message_id`, or says who has it. A pending claim already held by
    /// `message_id` (a claim sent again after a lost connection) is this publisher's.
    async fn claim(
        &self,
        key: &IdempotencyKey,
        message_id: &str,
        lease: Duration,
        window: Duration,
    ) -> Result<Claim> {
        for _ in 0..CLAIM_TRIES {
            if self.try_claim(key, message_id, lease, window).await? {
                return Ok(Claim::Claimed);
            }
            // The row may vanish between the two (released, or its window ended): claim again.
            match self.get(key).await? {
                Some(record)
                    if record.message_id == message_id && record.state == IdempotencyState::Pending =>
                {
                    return Ok(Claim::Claimed);
                }
                Some(record) => return Ok(Claim::Taken(record)),
                None => continue,
            }
        }
        Err(Error::Storage(format!(
            "idempotency key `{}` of {} in {} kept changing under concurrent publishers; try again",
            key.key, key.event, key.env
        )))
    }
}

/// Says when a store's next purge of expired rows is due, at most once per [`PURGE_EVERY`].
#[derive(Debug, Default)]
pub(crate) struct PurgeClock {
    next_ms: AtomicI64,
}

impl PurgeClock {
    /// True once per period, for the caller that should purge.
    pub(crate) fn due(&self) -> bool {
        let now = Utc::now().timestamp_millis();
        let next = self.next_ms.load(Ordering::Relaxed);
        now >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now + PURGE_EVERY.as_millis() as i64,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }
}

/// A duration as whole milliseconds, for the database.
pub(crate) fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// A record from its stored columns (times in milliseconds since the epoch).
pub(crate) fn record(
    message_id: String,
    state: &str,
    first_seen_ms: i64,
    lease_ms: Option<i64>,
    expires_ms: i64,
) -> Result<IdempotencyRecord> {
    let state = IdempotencyState::parse(state).ok_or_else(|| {
        Error::Storage(format!("idempotency row of message {message_id} has state `{state}`"))
    })?;
    let time = |ms: i64| DateTime::<Utc>::from_timestamp_millis(ms).unwrap_or_default();
    Ok(IdempotencyRecord {
        message_id,
        state,
        first_seen: time(first_seen_ms),
        expires_at: time(expires_ms),
        lease_expires_at: lease_ms.filter(|_| state == IdempotencyState::Pending).map(time),
    })
}
