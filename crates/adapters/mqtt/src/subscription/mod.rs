//! One group member: its own MQTT 5 connection with a session that never expires, a shared
//! subscription for its group, manual acks, and receive-maximum = prefetch.
//!
//! MQTT has no nack and never redelivers on a live connection, so a member redelivers by
//! publishing a copy (attempt + 1) to its group's retry topic, which only that group's
//! members subscribe to, and acks the original once the broker has the copy. That serves
//! `nack`, `nack` with a delay and an expired ack deadline.
//!
//! A member never unsubscribes: when it closes, dies or loses its connection, its session
//! stays subscribed and becomes an *orphan* that another member of the group adopts (see
//! [`crate::orphan`]). Each connection is one *incarnation* with a client id of its own; a
//! member whose connection drops goes on as a new incarnation and leaves the old session to
//! be adopted, so no client id is ever connected twice by its member.
//!
//! Submodules: [`naming`] (topics, filters, client ids), [`member`] (the member's state and
//! leaving), [`delivery`] (a delivery's lease, settling and redelivery), [`events`] (the
//! connection's packets), [`adoption`] (adopting orphans), [`driver`] (the connection task)
//! and [`acker`].

mod acker;
mod adoption;
mod delivery;
mod driver;
mod events;
mod member;
mod naming;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use polybus_core::{Delivery, Error, Op, Result, SubscribeOptions, Subscription};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::config::Settings;
use crate::orphan;
use crate::publisher::{Publisher, lock};

use delivery::expire_due;
use driver::drive;
use member::{Member, MemberState};
use naming::Names;
pub(crate) use naming::{RETRY_PREFIX, retry_topic};

/// How long subscribing and an ack round trip wait for the broker.
const BROKER_WAIT: Duration = Duration::from_secs(10);

type Answer = std::result::Result<(), String>;
type Reply = oneshot::Sender<Answer>;

/// Joins `options.group` on `topic` as member `options.consumer`.
pub(crate) async fn subscribe(
    settings: &Settings,
    publisher: Publisher,
    topic: &str,
    options: &SubscribeOptions,
) -> Result<MqttSubscription> {
    let label = format!("mqtt {topic}");
    let group = &options.group;
    if group.is_empty() || group.contains(['/', '+', '#', '\0']) {
        return Err(Error::transport(
            Op::Subscribe,
            &label,
            format!("group `{group}` cannot name an MQTT shared subscription (no `/`, `+` or `#`)"),
        ));
    }
    let retry = retry_topic(group, topic);
    let names = Names {
        settings: settings.clone(),
        topic: topic.to_owned(),
        group: group.clone(),
        consumer: options.consumer.clone(),
        prefetch: options.prefetch.clamp(1, usize::from(u16::MAX)),
        orphan_level: orphan::orphan_level(group, topic),
        retry_topic: retry,
    };
    let (incarnation, eventloop) = names.incarnation();
    let (tx, rx) = mpsc::unbounded_channel();
    let member = Arc::new(Member {
        label: label.clone(),
        names,
        publisher,
        ack_deadline: options.ack_deadline,
        changed: Notify::new(),
        expiry_wake: Arc::new(Notify::new()),
        ack_turn: tokio::sync::Mutex::new(()),
        state: Mutex::new(MemberState {
            session: 0,
            incarnation,
            driver: None,
            next_key: 0,
            held: HashMap::new(),
            expiring: BTreeMap::new(),
            expiry: None,
            subacks: VecDeque::new(),
            round_trips: VecDeque::new(),
            orphans: HashSet::new(),
            adoptions: Vec::new(),
            listening: true,
            retired: false,
            deliveries: Some(tx),
        }),
    });
    // Asked before the connection starts, so a failed first connection answers it.
    let (reply, subscribed) = oneshot::channel();
    let client = {
        let mut state = lock(&member.state);
        state.subacks.push_back(reply);
        state.incarnation.client.clone()
    };
    client
        .try_subscribe_many(member.names.filters())
        .map_err(|_| Error::transport(Op::Subscribe, &label, "the connection task ended"))?;
    let driver = tokio::spawn(drive(Arc::downgrade(&member), eventloop));
    let expiry = tokio::spawn(expire_due(Arc::downgrade(&member), member.expiry_wake.clone()));
    {
        let mut state = lock(&member.state);
        state.driver = Some(driver);
        state.expiry = Some(expiry);
    }
    wait(subscribed, "the subscription").await.map_err(|e| Error::transport(Op::Subscribe, &label, e))?;
    Ok(MqttSubscription { member, rx, closed: false })
}

/// Waits for the broker's answer to a request.
async fn wait(answer: oneshot::Receiver<Answer>, what: &str) -> Answer {
    match tokio::time::timeout(BROKER_WAIT, answer).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(_)) => Err(format!("the connection closed before the broker confirmed {what}")),
        Err(_) => Err(format!("the broker did not confirm {what} within {BROKER_WAIT:?}")),
    }
}

/// A group member's stream of deliveries.
pub(crate) struct MqttSubscription {
    member: Arc<Member>,
    rx: mpsc::UnboundedReceiver<u64>,
    closed: bool,
}

#[async_trait]
impl Subscription for MqttSubscription {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        loop {
            if self.closed {
                return None;
            }
            let key = self.rx.recv().await?;
            if let Some(delivery) = self.member.hand_out(key) {
                return Some(Ok(delivery));
            }
        }
    }

    async fn close(&mut self) -> Result<()> {
        if std::mem::replace(&mut self.closed, true) {
            return Ok(());
        }
        self.rx.close();
        self.member.clone().leave().await.map_err(|e| Error::transport(Op::Close, &self.member.label, e))
    }
}

impl Drop for MqttSubscription {
    fn drop(&mut self) {
        if !self.closed
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let member = self.member.clone();
            runtime.spawn(async move {
                if let Err(e) = member.clone().leave().await {
                    tracing::warn!(topic = %member.label, error = %e, "leaving the group");
                }
            });
        }
    }
}
