//! A member's side of adopting the sessions of its group's gone members (see
//! [`crate::orphan`]).

use std::sync::{Arc, Weak};
use std::time::Duration;

use super::member::Member;
use crate::orphan::{self, Claim, Record, Seen};
use crate::publisher::lock;

/// Longest random pause before adopting a session, so that members seeing the same record
/// rarely adopt it at the same time.
const ADOPT_JITTER_MS: u64 = 250;
/// Pause before trying a failed adoption again.
const ADOPT_RETRY: Duration = Duration::from_secs(2);

impl Member {
    /// Adopts the session a record names (after a short random pause), unless it is this
    /// member's own or another member of this process adopts it.
    pub(super) fn on_record(self: &Arc<Self>, seen: Seen) {
        let record = match seen {
            Seen::Cleared(topic) => {
                lock(&self.state).orphans.remove(&topic);
                return;
            }
            Seen::Orphan(record) => record,
        };
        {
            let mut state = lock(&self.state);
            if record.client_id == state.incarnation.client_id {
                return;
            }
            state.orphans.insert(record.topic.clone());
            if !state.listening {
                return;
            }
        }
        if let Some(claim) = orphan::claim(&record.topic) {
            let adoption = tokio::spawn(adopt(Arc::downgrade(self), record, claim));
            let mut state = lock(&self.state);
            state.adoptions.retain(|a| !a.is_finished());
            state.adoptions.push(adoption);
        }
    }
}

/// Adopts the session `record` names for the group of `member`, trying again while the
/// member listens and the record is not cleared.
async fn adopt(member: Weak<Member>, record: Record, _claim: Claim) {
    let mut pause = Duration::from_millis(u64::from(uuid::Uuid::new_v4().as_u128() as u16) % ADOPT_JITTER_MS);
    loop {
        tokio::time::sleep(pause).await;
        let (adopter, label) = {
            let Some(member) = member.upgrade() else { return };
            let state = lock(&member.state);
            if !state.listening || !state.orphans.contains(&record.topic) {
                return;
            }
            (member.names.adopter(&member.publisher), member.label.clone())
        };
        match adopter.adopt(&record).await {
            Ok(passed_on) => {
                tracing::info!(topic = %label, client_id = %record.client_id, passed_on,
                    "adopted the session of a gone member");
                if let Some(member) = member.upgrade() {
                    lock(&member.state).orphans.remove(&record.topic);
                }
                return;
            }
            Err(e) => {
                tracing::warn!(topic = %label, client_id = %record.client_id, error = %e, retry_in = ?ADOPT_RETRY,
                    "adopting the session of a gone member");
                pause = ADOPT_RETRY;
            }
        }
    }
}
