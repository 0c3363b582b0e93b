//! Deliveries handed to HTTP consumers, held in server memory under a lease id until the
//! consumer acks or nacks them; a lease not settled by its deadline is nacked, so the broker
//! redelivers the message. Also the group members kept open for the pull API.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use polybus::{Delivery, Subscriber};

use crate::metrics::{Metrics, TopicLabels};

/// A pull member not used for this long is closed; what it had fetched goes back to the broker.
pub const PULLER_IDLE: Duration = Duration::from_secs(30);

/// Which subscription a lease belongs to: a lease is settled only through its own path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Scope {
    /// Env slug.
    pub env: String,
    /// The event, `broker:topic`.
    pub event: String,
    /// Consumer group.
    pub group: String,
}

struct Lease {
    delivery: Delivery,
    scope: Scope,
    /// Fingerprint of the key that took the delivery: only that key settles it.
    owner: String,
    labels: TopicLabels,
    expires: Instant,
}

/// A delivery taken out of the table, to be settled.
pub struct Held {
    /// The delivery.
    pub delivery: Delivery,
    /// Its metric labels.
    pub labels: TopicLabels,
}

/// A lease: its id and deadline.
#[derive(Debug, Clone)]
pub struct Granted {
    /// The lease id to ack with.
    pub id: String,
    /// When the lease expires.
    pub expires_at: DateTime<Utc>,
    expires: Instant,
}

impl Granted {
    /// A new lease id, expiring after `deadline`.
    pub fn new(deadline: Duration) -> Self {
        Granted {
            id: uuid::Uuid::new_v4().simple().to_string(),
            expires_at: Utc::now() + chrono::Duration::from_std(deadline).unwrap_or(chrono::Duration::MAX),
            expires: Instant::now() + deadline,
        }
    }
}

/// How to settle a delivery.
#[derive(Debug, Clone)]
pub enum Settle {
    /// Done with it.
    Ack,
    /// Redeliver it (after `delay`), or dead-letter it with `reason` on its last attempt.
    Nack {
        /// Redelivery delay.
        delay: Option<Duration>,
        /// Dead-letter reason when this was the last attempt.
        reason: String,
    },
    /// Send it to the dead-letter destination now.
    DeadLetter {
        /// Why.
        reason: String,
    },
}

/// A group member kept open between pull requests.
pub struct Puller {
    /// The member; one pull request at a time takes from it.
    pub subscriber: tokio::sync::Mutex<Subscriber>,
    last_used: Mutex<Instant>,
}

impl Puller {
    /// Wraps a subscriber.
    pub fn new(subscriber: Subscriber) -> Self {
        Puller { subscriber: tokio::sync::Mutex::new(subscriber), last_used: Mutex::new(Instant::now()) }
    }

    /// Marks the member as used now.
    pub fn touch(&self) {
        *lock(&self.last_used) = Instant::now();
    }

    fn idle_for(&self) -> Duration {
        lock(&self.last_used).elapsed()
    }
}

/// Pull members are keyed by subscription and ack deadline (the broker-side deadline is fixed
/// when a member joins).
pub type PullerKey = (Scope, u64);

/// The lease table and the pull members.
#[derive(Default)]
pub struct Leases {
    table: Mutex<HashMap<String, Lease>>,
    pullers: Mutex<HashMap<PullerKey, Arc<Puller>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Leases {
    /// Holds `delivery` under `lease` for the key `owner` until it is settled or `lease` expires.
    pub fn hold(
        &self,
        lease: &Granted,
        delivery: Delivery,
        scope: &Scope,
        labels: &TopicLabels,
        owner: &str,
    ) {
        let held = Lease {
            delivery,
            scope: scope.clone(),
            labels: labels.clone(),
            owner: owner.to_owned(),
            expires: lease.expires,
        };
        lock(&self.table).insert(lease.id.clone(), held);
    }

    /// Takes the lease `id` out of the table if it exists, belongs to `scope` and was taken by
    /// the key `owner`.
    pub fn take(&self, id: &str, scope: &Scope, owner: &str) -> Option<Held> {
        let mut table = lock(&self.table);
        if table.get(id).is_none_or(|lease| &lease.scope != scope || lease.owner != owner) {
            return None;
        }
        table.remove(id).map(|l| Held { delivery: l.delivery, labels: l.labels })
    }

    /// Takes every lease past its deadline out of the table.
    pub fn take_expired(&self) -> Vec<Held> {
        let now = Instant::now();
        let mut table = lock(&self.table);
        let expired: Vec<String> =
            table.iter().filter(|(_, lease)| lease.expires <= now).map(|(id, _)| id.clone()).collect();
        expired
            .iter()
            .filter_map(|id| table.remove(id))
            .map(|l| Held { delivery: l.delivery, labels: l.labels })
            .collect()
    }

    /// Takes every lease out of the table (shutting down).
    pub fn take_all(&self) -> Vec<Held> {
        lock(&self.table).drain().map(|(_, l)| Held { delivery: l.delivery, labels: l.labels }).collect()
    }

    /// How many leases are open.
    pub fn len(&self) -> usize {
        lock(&self.table).len()
    }

    /// True when no lease is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The pull member for `key`, if one is open.
    pub fn puller(&self, key: &PullerKey) -> Option<Arc<Puller>> {
        lock(&self.pullers).get(key).cloned()
    }

    /// Keeps `puller` for `key`, unless another request opened one first: returns the one kept
    /// and, when it is not `puller`, `puller` back to be closed.
    pub fn keep_puller(&self, key: PullerKey, puller: Arc<Puller>) -> (Arc<Puller>, Option<Arc<Puller>>) {
        let mut pullers = lock(&self.pullers);
        match pullers.get(&key) {
            Some(existing) => (existing.clone(), Some(puller)),
            None => {
                pullers.insert(key, puller.clone());
                (puller, None)
            }
        }
    }

    /// Forgets the pull member for `key` if it is `puller`.
    pub fn drop_puller(&self, key: &PullerKey, puller: &Arc<Puller>) {
        let mut pullers = lock(&self.pullers);
        if pullers.get(key).is_some_and(|p| Arc::ptr_eq(p, puller)) {
            pullers.remove(key);
        }
    }

    /// Takes out the pull members idle for longer than [`PULLER_IDLE`] (or all of them).
    pub fn take_idle_pullers(&self, all: bool) -> Vec<Arc<Puller>> {
        let mut pullers = lock(&self.pullers);
        let idle: Vec<PullerKey> = pullers
            .iter()
            .filter(|(_, p)| all || (p.idle_for() > PULLER_IDLE && p.subscriber.try_lock().is_ok()))
            .map(|(k, _)| k.clone())
            .collect();
        idle.iter().filter_map(|k| pullers.remove(k)).collect()
    }
}

/// Settles a delivery and counts it.
pub async fn settle(metrics: &Metrics, held: Held, how: Settle) -> polybus::Result<()> {
    let Held { delivery, labels } = held;
    match how {
        Settle::Ack => {
            delivery.ack().await?;
            metrics.acked(&labels);
        }
        Settle::Nack { delay, reason } => match delivery.retry(delay, &reason).await? {
            polybus::Settled::DeadLettered => metrics.dead_lettered(&labels),
            polybus::Settled::Retried => metrics.nacked(&labels),
        },
        Settle::DeadLetter { reason } => {
            delivery.dead_letter(&reason).await?;
            metrics.dead_lettered(&labels);
        }
    }
    Ok(())
}

/// Closes pull members.
pub async fn close_pullers(pullers: Vec<Arc<Puller>>) {
    for puller in pullers {
        if let Err(e) = puller.subscriber.lock().await.close().await {
            tracing::debug!(error = %e, "closing an idle pull member");
        }
    }
}
