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

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use polybus_core::{Acker, Delivery, Error, Message, Op, Result, SubscribeOptions, Subscription};
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{ConnAck, Filter, Packet, Publish, SubAck, SubscribeReasonCode};
use rumqttc::v5::{AsyncClient, Event, EventLoop};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::{AbortHandle, JoinHandle};

use crate::codec;
use crate::config::Settings;
use crate::orphan::{self, Adopter, Claim, DRAIN_PREFIX, Exit, NEVER_EXPIRES, Record, Seen};
use crate::publisher::{Ack, BACKOFF_MAX, BACKOFF_MIN, Publisher, describe, lock};

/// How long subscribing and an ack round trip wait for the broker.
const BROKER_WAIT: Duration = Duration::from_secs(10);
/// Requests (acks, subscribes) queued towards the client's event loop, beyond prefetch.
const REQUEST_HEADROOM: usize = 16;
/// The group's own filters (topic and retry topic) lead a member's subscription.
const GROUP_FILTERS: usize = 2;
/// First topic level of each group's redeliveries.
pub(crate) const RETRY_PREFIX: &str = "polybus-retry";
/// Longest random pause before adopting a session, so that members seeing the same record
/// rarely adopt it at the same time.
const ADOPT_JITTER_MS: u64 = 250;
/// Pause before trying a failed adoption again.
const ADOPT_RETRY: Duration = Duration::from_secs(2);
/// How long a lost incarnation's record is retried while the broker cannot be reached.
const RECORD_RETRY_FOR: Duration = Duration::from_secs(120);

/// The topic a group's redeliveries of `topic` are published to.
pub(crate) fn retry_topic(group: &str, topic: &str) -> String {
    format!("{RETRY_PREFIX}/{group}/{topic}")
}

/// The shared-subscription filter of `group` on `topic`.
pub(crate) fn shared_filter(group: &str, topic: &str) -> String {
    format!("$share/{group}/{topic}")
}

/// The client id of one incarnation of member `consumer` of `group` on `topic`.
pub(crate) fn member_client_id(
    prefix: &str,
    group: &str,
    consumer: &str,
    topic: &str,
    incarnation: &str,
) -> String {
    format!("{prefix}-{group}-{consumer}-{:08x}-{incarnation}", codec::stable_hash(topic) as u32)
}

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
        state: Mutex::new(MemberState {
            session: 0,
            incarnation,
            driver: None,
            next_key: 0,
            held: HashMap::new(),
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
    lock(&member.state).driver = Some(driver);
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

/// Where a received message is in its life.
enum Stage {
    /// Received, waiting in the channel for `next`.
    Buffered,
    /// Handed to the application; expires at the ack deadline.
    HandedOut { lease: u64, timer: AbortHandle },
    /// Being acked or redelivered.
    Settling,
    /// Left unacked in the member's session after a redelivery failed on a leaving member.
    InSession,
}

struct Held {
    message: Message,
    /// Packet id of a QoS 1 publish (QoS 0 needs no ack).
    pkid: Option<u16>,
    /// The incarnation it arrived in; an ack is meaningful only in the same one.
    session: u64,
    stage: Stage,
}

/// One connection of a member, under a client id of its own.
struct Incarnation {
    /// The last part of the client id and of the member's record topic.
    id: String,
    client_id: String,
    client: AsyncClient,
    connected: bool,
}

/// What names a member and its group on the broker.
struct Names {
    settings: Settings,
    topic: String,
    group: String,
    consumer: String,
    prefetch: usize,
    orphan_level: String,
    retry_topic: String,
}

impl Names {
    /// The topic and the group's retry topic (shared), and the group's orphan records.
    fn filters(&self) -> Vec<Filter> {
        let mut filters: Vec<Filter> =
            self.shared_filters().into_iter().map(|f| Filter::new(f, QoS::AtLeastOnce)).collect();
        // QoS 0: records are retained, so a session that missed one gets it when it subscribes.
        filters.push(Filter::new(format!("{}/+", self.orphan_level), QoS::AtMostOnce));
        filters
    }

    fn shared_filters(&self) -> Vec<String> {
        vec![shared_filter(&self.group, &self.topic), shared_filter(&self.group, &self.retry_topic)]
    }

    fn record_topic(&self, incarnation: &str) -> String {
        format!("{}/{incarnation}", self.orphan_level)
    }

    /// A new client id, with its will, and the client to connect it.
    fn incarnation(&self) -> (Incarnation, EventLoop) {
        let id = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
        let client_id =
            member_client_id(&self.settings.client_id, &self.group, &self.consumer, &self.topic, &id);
        let mut mqtt = self.settings.options(client_id.clone());
        mqtt.set_clean_start(true)
            .set_session_expiry_interval(Some(NEVER_EXPIRES))
            .set_manual_acks(true)
            .set_receive_maximum(Some(self.prefetch as u16))
            .set_outgoing_inflight_upper_limit(16)
            .set_last_will(orphan::will(&self.record_topic(&id), &client_id));
        let (client, eventloop) = AsyncClient::new(mqtt, self.prefetch + REQUEST_HEADROOM);
        (Incarnation { id, client_id, client, connected: false }, eventloop)
    }

    fn adopter(&self, publisher: &Publisher) -> Adopter {
        let mut filters = self.shared_filters();
        filters.push(format!("{}/+", self.orphan_level));
        Adopter {
            settings: self.settings.clone(),
            publisher: publisher.clone(),
            retry_topic: self.retry_topic.clone(),
            filters,
        }
    }
}

struct MemberState {
    /// Counts incarnations: bumped when a connected one is lost.
    session: u64,
    incarnation: Incarnation,
    /// The task polling the current incarnation's connection.
    driver: Option<JoinHandle<()>>,
    /// Source of held keys and leases.
    next_key: u64,
    held: HashMap<u64, Held>,
    subacks: VecDeque<Reply>,
    /// Round trips awaiting the PUBACK of their publish.
    round_trips: VecDeque<Reply>,
    /// Record topics of the group's orphans seen and not cleared yet.
    orphans: HashSet<String>,
    /// Adoptions this member started; leaving waits for them.
    adoptions: Vec<JoinHandle<()>>,
    /// Handing out messages and adopting orphans, until the subscription closes.
    listening: bool,
    /// Its session is left to the group (record published, or connection gone).
    retired: bool,
    deliveries: Option<mpsc::UnboundedSender<u64>>,
}

impl MemberState {
    /// True while a delivery of the current incarnation is handed out and not settled.
    fn unsettled(&self) -> bool {
        self.held.values().any(|h| {
            h.session == self.session && matches!(h.stage, Stage::HandedOut { .. } | Stage::Settling)
        })
    }
}

struct Member {
    label: String,
    names: Names,
    publisher: Publisher,
    ack_deadline: Duration,
    /// Notified when deliveries are settled.
    changed: Notify,
    state: Mutex<MemberState>,
}

impl Drop for Member {
    fn drop(&mut self) {
        // Without a DISCONNECT: unless the member retired, the broker publishes its will.
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(driver) = state.driver.take() {
            driver.abort();
        }
    }
}

/// A PUBACK request for `pkid` (rumqttc builds it from a publish's QoS and packet id).
fn ack_for(pkid: u16) -> Publish {
    let mut publish = Publish::new("", QoS::AtLeastOnce, Bytes::new(), None);
    publish.pkid = pkid;
    publish
}

/// What the connection task does after a lost connection.
enum Next {
    Stop,
    /// Poll the same client again: it reconnects.
    Poll,
    /// Poll a new incarnation's client.
    Replace(Box<EventLoop>),
}

impl Member {
    /// Stops handing out messages. What was received but not handed out stays unacked in the
    /// session; once every handed-out delivery is settled (or expired), the member retires.
    async fn leave(self: Arc<Self>) -> Answer {
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

    /// Hands a buffered message to the application, starting its ack deadline.
    fn hand_out(self: &Arc<Self>, key: u64) -> Option<Delivery> {
        let mut state = lock(&self.state);
        let lease = state.next_key;
        state.next_key += 1;
        let held = state.held.get_mut(&key)?;
        if !matches!(held.stage, Stage::Buffered) {
            return None;
        }
        let timer = tokio::spawn(self.clone().expire(key, lease)).abort_handle();
        held.stage = Stage::HandedOut { lease, timer };
        let message = held.message.clone();
        let acker =
            MqttAcker { member: self.clone(), key, lease, id: message.id.clone(), attempt: message.attempt };
        Some(Delivery::new(message, Box::new(acker)))
    }

    /// Takes a handed-out message for settling, when `lease` is still its current one, and
    /// stops its ack-deadline timer unless the timer itself settles it (aborting a running
    /// task cancels it at its next await: the redelivery would stop half done).
    fn claim(&self, key: u64, lease: u64, by_timer: bool) -> bool {
        let mut state = lock(&self.state);
        match state.held.get_mut(&key) {
            Some(held) if matches!(&held.stage, Stage::HandedOut { lease: l, .. } if *l == lease) => {
                if let Stage::HandedOut { timer, .. } = std::mem::replace(&mut held.stage, Stage::Settling)
                    && !by_timer
                {
                    timer.abort();
                }
                true
            }
            _ => false,
        }
    }

    /// Acks the original of a settled message and forgets it.
    async fn settle(&self, key: u64) -> Answer {
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
        match ack {
            Some((pkid, client)) => {
                client.ack(&ack_for(pkid)).await.map_err(|_| "the connection task ended".to_owned())
            }
            None => Ok(()),
        }
    }

    /// Publishes a copy for the group with `attempt`, then acks the original.
    async fn redeliver(&self, key: u64, attempt: u32) -> Answer {
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
    fn recover(self: &Arc<Self>, key: u64) {
        let mut state = lock(&self.state);
        let lease = state.next_key;
        state.next_key += 1;
        let listening = state.listening;
        if let Some(held) = state.held.get_mut(&key) {
            held.stage = if listening {
                Stage::HandedOut {
                    lease,
                    timer: tokio::spawn(self.clone().expire(key, lease)).abort_handle(),
                }
            } else {
                Stage::InSession
            };
        }
        self.changed.notify_waiters();
    }

    /// At the ack deadline: redeliver to the group with the next attempt.
    async fn expire(self: Arc<Self>, key: u64, lease: u64) {
        tokio::time::sleep(self.ack_deadline).await;
        if !self.claim(key, lease, true) {
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

    fn on_connack(&self, connack: &ConnAck) {
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

    fn on_publish(self: &Arc<Self>, publish: Publish) {
        if let Some(seen) = orphan::parse(&self.names.orphan_level, &publish) {
            self.on_record(seen);
            return;
        }
        let qos1 = publish.qos != QoS::AtMostOnce;
        let mut state = lock(&self.state);
        let Some(deliveries) = state.deliveries.clone().filter(|_| state.listening && !state.retired) else {
            // Arrived while leaving: left unacked in the session, for the member adopting it.
            return;
        };
        let key = state.next_key;
        state.next_key += 1;
        let session = state.session;
        state.held.insert(
            key,
            Held {
                message: codec::decode(&publish),
                pkid: qos1.then_some(publish.pkid),
                session,
                stage: Stage::Buffered,
            },
        );
        drop(state);
        let _ = deliveries.send(key);
    }

    /// Adopts the session a record names (after a short random pause), unless it is this
    /// member's own or another member of this process adopts it.
    fn on_record(self: &Arc<Self>, seen: Seen) {
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

    fn on_suback(&self, suback: &SubAck) {
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

    fn on_puback(&self) {
        if let Some(waiter) = lock(&self.state).round_trips.pop_front() {
            let _ = waiter.send(Ok(()));
        }
    }

    /// Decides what the connection task does after a lost connection. A lost incarnation's
    /// session is an orphan now: its record is published (its will may say the same).
    fn on_connection_lost(self: &Arc<Self>, reason: &str) -> Next {
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

/// Waits for every task of `tasks` to end.
async fn join_all(tasks: Vec<JoinHandle<()>>) {
    for task in tasks {
        let _ = task.await;
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

/// Polls the member's connection, reconnecting with backoff (as a new incarnation once a
/// connected one is lost); ends once the member is gone or retired.
async fn drive(member: Weak<Member>, mut eventloop: EventLoop) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let event = eventloop.poll().await;
        let Some(strong) = member.upgrade() else { return };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(connack))) => {
                backoff = BACKOFF_MIN;
                strong.on_connack(&connack);
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => strong.on_publish(publish),
            Ok(Event::Incoming(Packet::SubAck(suback))) => strong.on_suback(&suback),
            Ok(Event::Incoming(Packet::PubAck(_))) => strong.on_puback(),
            Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
            Ok(_) => {}
            Err(e) => {
                let reason = describe(&e);
                match strong.on_connection_lost(&reason) {
                    Next::Stop => return,
                    Next::Poll => {}
                    Next::Replace(fresh) => eventloop = *fresh,
                }
                tracing::warn!(topic = %strong.label, error = %reason, retry_in = ?backoff,
                    "mqtt member connection lost; reconnecting");
                drop(strong);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Settles one delivery of a member.
struct MqttAcker {
    member: Arc<Member>,
    key: u64,
    lease: u64,
    id: String,
    attempt: u32,
}

#[async_trait]
impl Acker for MqttAcker {
    async fn ack(self: Box<Self>) -> Result<()> {
        if !self.member.claim(self.key, self.lease, false) {
            return Err(Error::LeaseLost(self.id));
        }
        self.member.settle(self.key).await.map_err(|e| Error::transport(Op::Ack, &self.member.label, e))
    }

    async fn nack(self: Box<Self>, delay: Option<Duration>) -> Result<()> {
        if !self.member.claim(self.key, self.lease, false) {
            return Err(Error::LeaseLost(self.id));
        }
        let MqttAcker { member, key, attempt, .. } = *self;
        let attempt = attempt.saturating_add(1);
        match delay {
            None => member.redeliver(key, attempt).await.map_err(|e| {
                member.recover(key);
                Error::transport(Op::Nack, &member.label, e)
            }),
            Some(delay) => {
                // The original stays unacked (and in the session) until the copy is published.
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    if let Err(e) = member.redeliver(key, attempt).await {
                        tracing::warn!(topic = %member.label, error = %e, "redelivering a nacked message");
                        member.recover(key);
                    }
                });
                Ok(())
            }
        }
    }
}
