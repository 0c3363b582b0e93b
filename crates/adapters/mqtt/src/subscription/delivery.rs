//! A delivery's life: handed out under a lease with an ack deadline, then acked or
//! redelivered to the group through its retry topic.

use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use polybus_core::Delivery;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Publish;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::Answer;
use super::acker::MqttAcker;
use super::member::{Held, Member, MemberState, Stage};
use crate::codec;
use crate::publisher::{Ack, lock};

/// Stands in for an ack deadline too far away for `Instant`.
const FAR: Duration = Duration::from_secs(365 * 24 * 3600);

/// A PUBACK request for `pkid` (rumqttc builds it from a publish's QoS and packet id).
fn ack_for(pkid: u16) -> Publish {
    let mut publish = Publish::new("", QoS::AtLeastOnce, Bytes::new(), None);
    publish.pkid = pkid;
    publish
}

impl Member {
    /// Hands a buffered message to the application, starting its ack deadline.
    pub(super) fn hand_out(self: &Arc<Self>, key: u64) -> Option<Delivery> {
        let mut state = lock(&self.state);
        let held = state.held.get_mut(&key)?;
        if !matches!(held.stage, Stage::Buffered) {
            return None;
        }
        let message = held.message.clone();
        let lease = self.start_lease(&mut state, key);
        let acker =
            MqttAcker { member: self.clone(), key, lease, id: message.id.clone(), attempt: message.attempt };
        Some(Delivery::new(message, Box::new(acker)))
    }

    /// Marks `key` handed out under a new lease whose ack deadline starts now.
    fn start_lease(&self, state: &mut MemberState, key: u64) -> u64 {
        let lease = state.next_key;
        state.next_key += 1;
        if let Some(held) = state.held.get_mut(&key) {
            held.stage = Stage::HandedOut { lease };
        }
        if state.expiring.is_empty() {
            // A stored permit when the task is busy: it finds this entry on its next turn.
            self.expiry_wake.notify_one();
        }
        // A deadline beyond what `Instant` holds never comes: a year stands in for it.
        let now = Instant::now();
        let at = now.checked_add(self.ack_deadline).unwrap_or_else(|| now + FAR);
        state.expiring.insert(lease, (key, at));
        lease
    }

    /// Takes a handed-out message for settling, when `lease` is still its current one.
    pub(super) fn claim(&self, key: u64, lease: u64) -> bool {
        let mut state = lock(&self.state);
        match state.held.get_mut(&key) {
            Some(held) if matches!(&held.stage, Stage::HandedOut { lease: l } if *l == lease) => {
                held.stage = Stage::Settling;
                state.expiring.remove(&lease);
                true
            }
            _ => false,
        }
    }

    /// Acks the original of a settled message and forgets it.
    pub(super) async fn settle(&self, key: u64) -> Answer {
        let ack = {
            let mut state = lock(&self.state);
            let held = state.held.remove(&key);
            self.changed.notify_waiters();
            match held {
                Some(Held { pkid: Some(pkid), session, .. }) if session == state.session => {
                    Some((pkid, state.incarnation.client.clone()))
                }
                // QoS 0, or a lost incarnation's session (its adopter passes the message on).
                _ => None,
            }
        };
        let Some((pkid, client)) = ack else { return Ok(()) };
        let ack = ack_for(pkid);
        if client.try_ack(&ack).is_ok() {
            return Ok(());
        }
        // The connection's request queue is full (or gone). Acks wait for room one at a time:
        // each sender leaving flume's queue of waiting senders scans that whole queue, so a
        // batch of acks all waiting there costs the square of its size.
        let _turn = self.ack_turn.lock().await;
        client.ack(&ack).await.map_err(|_| "the connection task ended".to_owned())
    }

    /// Publishes a copy for the group with `attempt`, then acks the original.
    pub(super) async fn redeliver(&self, key: u64, attempt: u32) -> Answer {
        let message = match lock(&self.state).held.get(&key) {
            Some(held) => held.message.clone(),
            None => return Ok(()),
        };
        let properties = codec::encode(&message, attempt);
        match self.publisher.publish(&self.names.retry_topic, false, message.payload, properties).await? {
            Ack::Routed => self.settle(key).await,
            Ack::NoSubscribers => Err("no session of the group subscribes to its retry topic".into()),
        }
    }

    /// After a failed redelivery: retry at the next ack deadline while listening, else leave
    /// the message unacked in the session.
    pub(super) fn recover(self: &Arc<Self>, key: u64) {
        let mut state = lock(&self.state);
        if state.held.contains_key(&key) {
            if state.listening {
                self.start_lease(&mut state, key);
            } else if let Some(held) = state.held.get_mut(&key) {
                held.stage = Stage::InSession;
            }
        }
        self.changed.notify_waiters();
    }

    /// At the ack deadline: redeliver to the group with the next attempt.
    async fn expire(self: Arc<Self>, key: u64, lease: u64) {
        if !self.claim(key, lease) {
            return;
        }
        let attempt = match lock(&self.state).held.get(&key) {
            Some(held) => held.message.attempt.saturating_add(1),
            None => return,
        };
        if let Err(e) = self.redeliver(key, attempt).await {
            tracing::warn!(topic = %self.label, error = %e, "redelivering a message past its ack deadline");
            self.recover(key);
        }
    }
}

/// Expires a member's handed-out deliveries at their ack deadlines, oldest first. While
/// deliveries are out it holds the member until the first deadline it sleeps for (so at most
/// one ack deadline past the last ack); with none out, only a weak reference.
pub(super) async fn expire_due(member: Weak<Member>, wake: Arc<Notify>) {
    loop {
        let next = {
            let Some(member) = member.upgrade() else { return };
            let now = Instant::now();
            let mut due = Vec::new();
            let next = {
                let mut state = lock(&member.state);
                while let Some(first) = state.expiring.first_entry()
                    && first.get().1 <= now
                {
                    let (lease, (key, _)) = first.remove_entry();
                    due.push((key, lease));
                }
                state.expiring.first_key_value().map(|(_, (_, at))| *at)
            };
            for (key, lease) in due {
                tokio::spawn(member.clone().expire(key, lease));
            }
            next.map(|at| (member, at))
        };
        match next {
            // Entries added meanwhile expire later than this one.
            Some((_member, at)) => tokio::time::sleep_until(at).await,
            None => wake.notified().await,
        }
    }
}
