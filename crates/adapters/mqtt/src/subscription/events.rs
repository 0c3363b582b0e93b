//! What a member does with its connection's packets and with the loss of its connection.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{ConnAck, Publish, SubAck, SubscribeReasonCode};

use super::driver::Next;
use super::member::{Held, Member, Stage};
use crate::codec;
use crate::orphan::{self, Exit, Record};
use crate::publisher::{Publisher, lock};

/// The group's own filters (topic and retry topic) lead a member's subscription.
const GROUP_FILTERS: usize = 2;
/// How long a lost incarnation's record is retried while the broker cannot be reached.
const RECORD_RETRY_FOR: Duration = Duration::from_secs(120);

impl Member {
    pub(super) fn on_connack(&self, connack: &ConnAck) {
        let mut state = lock(&self.state);
        state.incarnation.connected = true;
        if state.session == 0 {
            return;
        }
        tracing::info!(topic = %self.label, client_id = %state.incarnation.client_id,
            session_present = connack.session_present, "mqtt member reconnected as a new incarnation");
        if state.listening {
            let _ = state.incarnation.client.try_subscribe_many(self.names.filters());
        }
    }

    pub(super) fn on_publish(self: &Arc<Self>, publish: Publish) {
        if let Some(seen) = orphan::parse(&self.names.orphan_level, &publish) {
            self.on_record(seen);
            return;
        }
        let pkid = (publish.qos != QoS::AtMostOnce).then_some(publish.pkid);
        // Decoded before taking the lock the application's `next` and acks wait on.
        let message = codec::decode(publish);
        let mut state = lock(&self.state);
        let Some(deliveries) = state.deliveries.clone().filter(|_| state.listening && !state.retired) else {
            // Arrived while leaving: left unacked in the session, for the member adopting it.
            return;
        };
        let key = state.next_key;
        state.next_key += 1;
        let session = state.session;
        state.held.insert(key, Held { message, pkid, session, stage: Stage::Buffered });
        drop(state);
        let _ = deliveries.send(key);
    }

    pub(super) fn on_suback(&self, suback: &SubAck) {
        let detail = || {
            let reason = suback.properties.as_ref().and_then(|p| p.reason_string.clone());
            reason.map(|r| format!(" ({r})")).unwrap_or_default()
        };
        let refused = suback.return_codes.iter().enumerate().find_map(|(i, code)| match code {
            // The group's filters must be QoS 1: at QoS 0 a message is gone once sent.
            SubscribeReasonCode::Success(QoS::AtMostOnce) if i < GROUP_FILTERS => {
                Some("the broker granted only QoS 0".to_owned())
            }
            SubscribeReasonCode::Success(_) => None,
            code => Some(format!("the broker refused the subscription: {code:?}{}", detail())),
        });
        let answer = refused.map_or(Ok(()), Err);
        match lock(&self.state).subacks.pop_front() {
            Some(waiter) => {
                let _ = waiter.send(answer);
            }
            None => {
                if let Err(e) = answer {
                    tracing::warn!(topic = %self.label, error = %e, "subscribing a new incarnation");
                }
            }
        }
    }

    pub(super) fn on_puback(&self) {
        if let Some(waiter) = lock(&self.state).round_trips.pop_front() {
            let _ = waiter.send(Ok(()));
        }
    }

    /// Decides what the connection task does after a lost connection. A lost incarnation's
    /// session is an orphan now: its record is published (its will may say the same).
    pub(super) fn on_connection_lost(self: &Arc<Self>, reason: &str) -> Next {
        let mut state = lock(&self.state);
        let reason = if state.incarnation.connected || state.session > 0 {
            format!("the connection to the broker was lost: {reason}")
        } else {
            format!("could not connect: {reason}")
        };
        let state = &mut *state;
        for waiter in state.subacks.drain(..).chain(state.round_trips.drain(..)) {
            let _ = waiter.send(Err(reason.clone()));
        }
        if state.retired {
            return Next::Stop;
        }
        if !state.incarnation.connected {
            // The first connection failed (subscribing fails), or a new incarnation is
            // still trying to connect.
            return if state.session == 0 { Next::Stop } else { Next::Poll };
        }
        let lost = Record {
            topic: self.names.record_topic(&state.incarnation.id),
            client_id: state.incarnation.client_id.clone(),
            exit: Exit::Lost,
        };
        state.session += 1;
        self.changed.notify_waiters();
        tokio::spawn(publish_record(self.publisher.clone(), self.label.clone(), lost));
        if !state.listening {
            state.retired = true;
            return Next::Stop;
        }
        let (incarnation, eventloop) = self.names.incarnation();
        state.incarnation = incarnation;
        Next::Replace(Box::new(eventloop))
    }
}

/// Publishes a lost incarnation's record, trying again while the broker cannot be reached.
async fn publish_record(publisher: Publisher, label: String, record: Record) {
    let deadline = tokio::time::Instant::now() + RECORD_RETRY_FOR;
    let (payload, properties) = orphan::record(&record.client_id, record.exit);
    loop {
        match publisher.publish(&record.topic, true, payload.clone(), properties.clone()).await {
            Ok(_) => return,
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(topic = %label, error = %e, "publishing a lost incarnation's record; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => {
                tracing::warn!(topic = %label, client_id = %record.client_id, error = %e,
                    "could not publish a lost incarnation's record; its will, if the broker published it, names it");
                return;
            }
        }
    }
}
