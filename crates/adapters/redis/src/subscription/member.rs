//! Who a member is and where it reads, when it claims next, and its consumer group.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use polybus_core::{Error, Op, Result};
use redis::{RedisError, Value};

use crate::transport::{GROUP_EXISTS, Shared, failed, reply_code, target};

/// Who this member is and where it reads.
pub(crate) struct Member {
    pub shared: Arc<Shared>,
    pub stream: String,
    pub(super) delayed_key: String,
    pub retry_key: String,
    pub group: String,
    pub consumer: String,
    pub(super) ack_deadline: Duration,
    pub ack_deadline_ms: u64,
    /// Longest wait of a blocking read, and longest time between two claims.
    pub(super) max_block: Duration,
    /// What `claim_at` counts from.
    pub(super) started: Instant,
    /// When the next fetch claims (ms after `started`): claiming is skipped until then, as
    /// nothing can have become claimable meanwhile that this member would have to notice
    /// sooner. Anyone may bring it forward; only a claim pushes it back.
    pub(super) claim_at: AtomicU64,
}

impl Member {
    /// A transport error on this member's stream.
    pub fn error(&self, op: Op, e: impl std::fmt::Display) -> Error {
        Error::transport(op, target(&self.stream), e)
    }

    /// A transport error on this member's stream, keeping Redis's error.
    pub(super) fn failed(&self, op: Op, e: RedisError) -> Error {
        failed(op, target(&self.stream), e)
    }

    fn millis_since_start(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Makes the fetch claim no later than `wait` from now.
    pub fn claim_within(&self, wait: Duration) {
        let wait = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        self.claim_at.fetch_min(self.millis_since_start().saturating_add(wait), Ordering::Relaxed);
    }

    /// Time until the next claim is due (zero when it is).
    pub(super) fn until_claim(&self) -> Duration {
        let at = self.claim_at.load(Ordering::Relaxed);
        Duration::from_millis(at.saturating_sub(self.millis_since_start()))
    }

    /// `XGROUP CREATE <stream> <group> 0 MKSTREAM`: a new group reads from the beginning.
    pub(super) async fn create_group(&self) -> Result<()> {
        let (stream, group) = (self.stream.as_str(), self.group.as_str());
        let created = self
            .shared
            .retrying(Op::Subscribe, stream, |mut conn| async move {
                redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(stream)
                    .arg(group)
                    .arg("0")
                    .arg("MKSTREAM")
                    .query_async::<Value>(&mut conn)
                    .await
            })
            .await;
        match created {
            Err(e) if reply_code(&e) == Some(GROUP_EXISTS) => Ok(()),
            other => other.map(|_| ()),
        }
    }
}
