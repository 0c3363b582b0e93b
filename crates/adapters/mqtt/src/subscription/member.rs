//! A member's state, and how it leaves its group: its session is left to the group once
//! every delivery handed out is settled.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use polybus_core::Message;
use rumqttc::v5::AsyncClient;
use rumqttc::v5::mqttbytes::QoS;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::naming::{Incarnation, Names};
use super::{Answer, BROKER_WAIT, Reply, wait};
use crate::orphan::{self, DRAIN_PREFIX, Exit};
use crate::publisher::{Publisher, lock};

/// Where a received message is in its life.
pub(super) enum Stage {
    /// Received, waiting in the channel for `next`.
    Buffered,
    /// Handed to the application under `lease`; expires at the ack deadline.
    HandedOut { lease: u64 },
    /// Being acked or redelivered.
    Settling,
    /// Left unacked in the member's session after a redelivery failed on a leaving member.
    InSession,
}

pub(super) struct Held {
    pub(super) message: Message,
    /// Packet id of a QoS 1 publish (QoS 0 needs no ack).
    pub(super) pkid: Option<u16>,
    /// The incarnation it arrived in; an ack is meaningful only in the same one.
    pub(super) session: u64,
    pub(super) stage: Stage,
}

pub(super) struct MemberState {
    /// Counts incarnations: bumped when a connected one is lost.
    pub(super) session: u64,
    pub(super) incarnation: Incarnation,
    /// The task polling the current incarnation's connection.
    pub(super) driver: Option<JoinHandle<()>>,
    /// Source of held keys and leases.
    pub(super) next_key: u64,
    pub(super) held: HashMap<u64, Held>,
    /// Handed-out deliveries by lease, with their ack deadline: leases are taken in time order
    /// under this lock, so the first entry is always the next to expire.
    pub(super) expiring: BTreeMap<u64, (u64, Instant)>,
    /// The member's one task expiring deliveries at their ack deadline.
    pub(super) expiry: Option<JoinHandle<()>>,
    pub(super) subacks: VecDeque<Reply>,
    /// Round trips awaiting the PUBACK of their publish.
    pub(super) round_trips: VecDeque<Reply>,
    /// Record topics of the group's orphans seen and not cleared yet.
    pub(super) orphans: HashSet<String>,
    /// Adoptions this member started; leaving waits for them.
    pub(super) adoptions: Vec<JoinHandle<()>>,
    /// Handing out messages and adopting orphans, until the subscription closes.
    pub(super) listening: bool,
    /// Its session is left to the group (record published, or connection gone).
    pub(super) retired: bool,
    pub(super) deliveries: Option<mpsc::UnboundedSender<u64>>,
}

impl MemberState {
    /// True while a delivery of the current incarnation is handed out and not settled.
    fn unsettled(&self) -> bool {
        self.held.values().any(|h| {
            h.session == self.session && matches!(h.stage, Stage::HandedOut { .. } | Stage::Settling)
        })
    }
}

pub(super) struct Member {
    pub(super) label: String,
    pub(super) names: Names,
    pub(super) publisher: Publisher,
    pub(super) ack_deadline: Duration,
    /// Notified when deliveries are settled.
    pub(super) changed: Notify,
    /// Wakes the expiry task when a delivery is handed out while none was.
    pub(super) expiry_wake: Arc<Notify>,
    /// Held by the one ack that waits for room in the connection's request queue.
    pub(super) ack_turn: tokio::sync::Mutex<()>,
    pub(super) state: Mutex<MemberState>,
}

impl Drop for Member {
    fn drop(&mut self) {
        // Without a DISCONNECT: unless the member retired, the broker publishes its will.
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(driver) = state.driver.take() {
            driver.abort();
        }
        if let Some(expiry) = state.expiry.take() {
            expiry.abort();
        }
    }
}

impl Member {
    /// Stops handing out messages. What was received but not handed out stays unacked in the
    /// session; once every handed-out delivery is settled (or expired), the member retires.
    pub(super) async fn leave(self: Arc<Self>) -> Answer {
        let adoptions = {
            let mut state = lock(&self.state);
            if !state.listening {
                return Ok(());
            }
            state.listening = false;
            state.deliveries = None;
            state.held.retain(|_, h| !matches!(h.stage, Stage::Buffered));
            std::mem::take(&mut state.adoptions)
        };
        // An adoption cut short (the process exiting after close) would pass messages on twice.
        let finished = join_all(adoptions);
        if tokio::time::timeout(BROKER_WAIT, finished).await.is_err() {
            tracing::warn!(topic = %self.label, "adoptions still under way after {BROKER_WAIT:?}; leaving anyway");
        }
        let unsettled = lock(&self.state).unsettled();
        if unsettled {
            // Deliveries handed out can still be settled; retiring waits for them.
            let member = self.clone();
            tokio::spawn(async move {
                if let Err(e) = member.clone().retire().await {
                    tracing::warn!(topic = %member.label, error = %e, "leaving the group");
                }
            });
            Ok(())
        } else {
            self.retire().await
        }
    }

    /// Leaves the session to the group: once the broker has every ack, publishes the
    /// member's record and disconnects (which discards the will).
    async fn retire(self: Arc<Self>) -> Answer {
        let settled = tokio::time::timeout(self.ack_deadline + BROKER_WAIT, self.settled()).await.is_ok();
        let (client, client_id, record_topic, in_session) = {
            let mut state = lock(&self.state);
            if state.retired {
                return Ok(());
            }
            if !state.incarnation.connected {
                // A new incarnation still connecting: nothing of it to leave; the session of
                // the lost one has its record.
                state.retired = true;
                if let Some(driver) = state.driver.take() {
                    driver.abort();
                }
                return Ok(());
            }
            let in_session = state.held.values().any(|h| matches!(h.stage, Stage::InSession));
            let incarnation = &state.incarnation;
            (
                incarnation.client.clone(),
                incarnation.client_id.clone(),
                self.names.record_topic(&incarnation.id),
                in_session,
            )
        };
        let flushed = self.round_trip(&client).await;
        let exit = if settled && flushed.is_ok() && !in_session { Exit::Closed } else { Exit::Lost };
        let driver = {
            let mut state = lock(&self.state);
            state.retired = true;
            state.driver.take()
        };
        let (payload, properties) = orphan::record(&client_id, exit);
        match self.publisher.publish(&record_topic, true, payload, properties).await {
            Ok(_) => {
                let _ = client.disconnect().await;
                if let Some(mut driver) = driver
                    && tokio::time::timeout(Duration::from_secs(2), &mut driver).await.is_err()
                {
                    driver.abort();
                }
                Ok(())
            }
            Err(e) => {
                // Dropping the connection without a DISCONNECT has the broker publish the will.
                if let Some(driver) = driver {
                    driver.abort();
                }
                Err(format!("publishing the member's record ({e}); the broker publishes its will instead"))
            }
        }
    }

    /// Resolves once no delivery of the current incarnation is handed out and unsettled.
    async fn settled(&self) {
        loop {
            let notified = self.changed.notified();
            if !lock(&self.state).unsettled() {
                return;
            }
            notified.await;
        }
    }

    /// A round trip (an empty QoS 1 publish nobody subscribes to): once it is answered, the
    /// broker has processed every ack sent before it.
    async fn round_trip(&self, client: &AsyncClient) -> Answer {
        let (reply, answered) = oneshot::channel();
        lock(&self.state).round_trips.push_back(reply);
        let nobody = format!("{DRAIN_PREFIX}/{}", uuid::Uuid::new_v4().simple());
        client
            .publish(nobody, QoS::AtLeastOnce, false, Bytes::new())
            .await
            .map_err(|_| "the connection task ended".to_owned())?;
        wait(answered, "the acks").await
    }
}

/// Waits for every task of `tasks` to end.
async fn join_all(tasks: Vec<JoinHandle<()>>) {
    for task in tasks {
        let _ = task.await;
    }
}
