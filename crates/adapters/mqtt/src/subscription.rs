//! One group member: its own MQTT 5 connection with a persistent session, a shared
//! subscription for its group, manual acks, and receive-maximum = prefetch.
//!
//! MQTT has no nack and never redelivers on a live connection, so a member redelivers by
//! publishing a copy (attempt + 1) to its group's retry topic, which only that group's
//! members subscribe to, and acks the original once the broker has the copy. That serves
//! `nack`, `nack` with a delay, an expired ack deadline, and the messages a leaving member
//! had received but not handed out.
//!
//! A shared subscription exists only while some session holds it, so when no member of the
//! group is left to take a copy, the copy is *parked*: published retained under the group's
//! parking topic (one topic per message). The next member to join receives the retained
//! copies, republishes them to the retry topic and clears them.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use polybus_core::{Acker, Delivery, Error, Message, Op, Result, SubscribeOptions, Subscription, wire};
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, Filter, Packet, Publish, PublishProperties, SubAck, SubscribeReasonCode,
};
use rumqttc::v5::{AsyncClient, Event, EventLoop};
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;

use crate::codec;
use crate::config::Settings;
use crate::publisher::{Ack, BACKOFF_MAX, BACKOFF_MIN, Publisher, describe, lock};

/// How long the broker keeps a member's session (subscription and unacked messages) after
/// its connection drops; a member reconnecting with the same name within it gets them back.
pub(crate) const SESSION_EXPIRY_SECS: u32 = 60;
/// How long subscribing, unsubscribing and draining on leave wait for the broker.
const BROKER_WAIT: Duration = Duration::from_secs(10);
/// Requests (acks, subscribes) queued towards the client's event loop, beyond prefetch.
const REQUEST_HEADROOM: usize = 16;
/// First topic level of each group's redeliveries.
pub(crate) const RETRY_PREFIX: &str = "polybus-retry";
/// First topic level of each group's parked messages.
pub(crate) const PARKED_PREFIX: &str = "polybus-parked";
/// First topic level of the markers a leaving member drains its session with.
pub(crate) const DRAIN_PREFIX: &str = "polybus-drain";

/// The topic a group's redeliveries of `topic` are published to.
pub(crate) fn retry_topic(group: &str, topic: &str) -> String {
    format!("{RETRY_PREFIX}/{group}/{topic}")
}

/// The topic level under which a group's parked messages of `topic` are retained.
pub(crate) fn parked_topic(group: &str, topic: &str) -> String {
    format!("{PARKED_PREFIX}/{group}/{topic}")
}

/// The shared-subscription filter of `group` on `topic`.
pub(crate) fn shared_filter(group: &str, topic: &str) -> String {
    format!("$share/{group}/{topic}")
}

/// The client id of member `consumer` of `group` on `topic`: the same on every reconnect,
/// so the broker resumes its session.
pub(crate) fn member_client_id(prefix: &str, group: &str, consumer: &str, topic: &str) -> String {
    format!("{prefix}-{group}-{consumer}-{:08x}", codec::stable_hash(topic) as u32)
}

/// Client ids of the members alive in this process. Two connections with one client id
/// would take the session from each other in turn, so a member whose name is taken here
/// gets the lowest free `-<n>` suffix: still the same id after a restart of the process.
static LIVE_CLIENT_IDS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// A client id reserved in [`LIVE_CLIENT_IDS`] until dropped.
struct ClientId(String);

impl ClientId {
    fn reserve(base: String) -> ClientId {
        let mut live = lock(&LIVE_CLIENT_IDS);
        let id = std::iter::once(base.clone())
            .chain((2..).map(|n| format!("{base}-{n}")))
            .find(|id| !live.contains(id))
            .unwrap_or(base);
        live.push(id.clone());
        ClientId(id)
    }
}

impl Drop for ClientId {
    fn drop(&mut self) {
        lock(&LIVE_CLIENT_IDS).retain(|id| id != &self.0);
    }
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
    let prefetch = options.prefetch.clamp(1, usize::from(u16::MAX));
    let client_id = ClientId::reserve(member_client_id(&settings.client_id, group, &options.consumer, topic));
    let mut mqtt = settings.options(client_id.0.clone());
    mqtt.set_clean_start(false)
        .set_session_expiry_interval(Some(SESSION_EXPIRY_SECS))
        .set_manual_acks(true)
        .set_receive_maximum(Some(prefetch as u16))
        .set_outgoing_inflight_upper_limit(16);
    let (client, eventloop) = AsyncClient::new(mqtt, prefetch + REQUEST_HEADROOM);
    let retry = retry_topic(group, topic);
    let parked = parked_topic(group, topic);
    let (tx, rx) = mpsc::unbounded_channel();
    let member = Arc::new(Member {
        label: label.clone(),
        _client_id: client_id,
        client,
        filters: vec![
            Filter::new(shared_filter(group, topic), QoS::AtLeastOnce),
            Filter::new(shared_filter(group, &retry), QoS::AtLeastOnce),
            Filter::new(format!("{parked}/+"), QoS::AtLeastOnce),
        ],
        retry_topic: retry,
        parked_topic: parked,
        publisher,
        ack_deadline: options.ack_deadline,
        state: Mutex::new(MemberState {
            session: 0,
            connacks: 0,
            next_key: 0,
            held: HashMap::new(),
            by_pkid: HashMap::new(),
            acked: HashMap::new(),
            unparking: HashSet::new(),
            subacks: VecDeque::new(),
            unsubacks: VecDeque::new(),
            drain: None,
            listening: true,
            deliveries: Some(tx),
        }),
    });
    // Asked before the connection starts, so a failed first connection answers it.
    let (reply, subscribed) = oneshot::channel();
    lock(&member.state).subacks.push_back(reply);
    member
        .client
        .try_subscribe_many(member.filters.clone())
        .map_err(|_| Error::transport(Op::Subscribe, &label, "the connection task ended"))?;
    tokio::spawn(drive(Arc::downgrade(&member), eventloop));
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
    /// The broker session it arrived in; an ack is meaningful only in the same one.
    session: u64,
    fingerprint: u64,
    stage: Stage,
}

struct MemberState {
    /// Bumped when the broker reports it has no session for us any more.
    session: u64,
    connacks: u64,
    /// Source of held keys and leases.
    next_key: u64,
    held: HashMap<u64, Held>,
    /// Packet ids of this session's held QoS 1 messages.
    by_pkid: HashMap<u16, u64>,
    /// Packet ids this session acked, with the message's fingerprint: a resend of one of
    /// them (our ack was lost with the connection) is acked again, not delivered again.
    acked: HashMap<u16, u64>,
    /// Packet ids of parked messages being taken back.
    unparking: HashSet<u16>,
    subacks: VecDeque<Reply>,
    unsubacks: VecDeque<Reply>,
    /// The marker a leaving member waits for, and who waits.
    drain: Option<(String, Reply)>,
    /// Subscribed (and resubscribing after a lost session) until the subscription closes.
    listening: bool,
    deliveries: Option<mpsc::UnboundedSender<u64>>,
}

struct Member {
    label: String,
    /// Released when the member is gone (and its connection with it).
    _client_id: ClientId,
    client: AsyncClient,
    /// The topic and the group's retry topic (shared), and the group's parked messages.
    filters: Vec<Filter>,
    retry_topic: String,
    parked_topic: String,
    publisher: Publisher,
    ack_deadline: Duration,
    state: Mutex<MemberState>,
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.client.try_disconnect();
    }
}

/// A PUBACK request for `pkid` (rumqttc builds it from a publish's QoS and packet id).
fn ack_for(pkid: u16) -> Publish {
    let mut publish = Publish::new("", QoS::AtLeastOnce, Bytes::new(), None);
    publish.pkid = pkid;
    publish
}

impl Member {
    /// Stops taking messages: unsubscribes and gives back what was received but not handed
    /// out; what the broker still had queued for this session is drained in the background.
    /// Deliveries handed out can still be settled; the connection lasts until they are.
    async fn leave(self: Arc<Self>) -> Answer {
        let mut answers = Vec::new();
        let buffered: Vec<u64> = {
            let mut state = lock(&self.state);
            state.listening = false;
            state.deliveries = None;
            for _ in &self.filters {
                let (tx, rx) = oneshot::channel();
                state.unsubacks.push_back(tx);
                answers.push(rx);
            }
            state.held.iter().filter(|(_, h)| matches!(h.stage, Stage::Buffered)).map(|(k, _)| *k).collect()
        };
        for filter in &self.filters {
            self.client
                .unsubscribe(filter.path.clone())
                .await
                .map_err(|_| "the connection task ended".to_owned())?;
        }
        let mut outcome = Ok(());
        for answer in answers {
            let result = wait(answer, "the unsubscribe").await;
            outcome = outcome.and(result);
        }
        for key in buffered {
            self.clone().give_back(key).await;
        }
        let member = self.clone();
        tokio::spawn(async move {
            if let Err(e) = member.drain().await {
                tracing::warn!(topic = %member.label, error = %e,
                    "draining a leaving member; what the broker still queued for it stays in its session");
            }
        });
        outcome
    }

    /// Waits until everything the broker queued for this session before now has arrived
    /// (and been given back): a marker published to a topic only this session subscribes
    /// to comes after them, as a session's queue is first in, first out. The marker may
    /// wait for handed-out deliveries to free their prefetch slots, at most an ack deadline.
    async fn drain(&self) -> Answer {
        let marker = format!("{DRAIN_PREFIX}/{}", uuid::Uuid::new_v4().simple());
        let (reply, subscribed) = oneshot::channel();
        let (drained_tx, drained) = oneshot::channel();
        {
            let mut state = lock(&self.state);
            state.subacks.push_back(reply);
            state.drain = Some((marker.clone(), drained_tx));
        }
        self.client
            .subscribe(marker.clone(), QoS::AtLeastOnce)
            .await
            .map_err(|_| "the connection task ended".to_owned())?;
        wait(subscribed, "the drain marker's subscription").await?;
        self.publisher.publish(&marker, false, Bytes::new(), PublishProperties::default()).await?;
        let outcome = match tokio::time::timeout(self.ack_deadline + BROKER_WAIT, drained).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err("the connection closed before the drain marker arrived".into()),
            Err(_) => {
                Err(format!("the drain marker did not arrive within {:?}", self.ack_deadline + BROKER_WAIT))
            }
        };
        let _ = self.client.unsubscribe(marker).await;
        outcome
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

    /// Takes a handed-out message for settling, when `lease` is still its current one.
    fn claim(&self, key: u64, lease: u64) -> bool {
        let mut state = lock(&self.state);
        match state.held.get_mut(&key) {
            Some(held) if matches!(&held.stage, Stage::HandedOut { lease: l, .. } if *l == lease) => {
                if let Stage::HandedOut { timer, .. } = std::mem::replace(&mut held.stage, Stage::Settling) {
                    timer.abort();
                }
                true
            }
            _ => false,
        }
    }

    /// Acks the original of a settled message and forgets it.
    async fn settle(&self, key: u64) -> Answer {
        let pkid = {
            let mut state = lock(&self.state);
            let Some(held) = state.held.remove(&key) else { return Ok(()) };
            match held.pkid {
                Some(pkid) if held.session == state.session => {
                    state.by_pkid.remove(&pkid);
                    state.acked.insert(pkid, held.fingerprint);
                    pkid
                }
                // QoS 0, or a session the broker has forgotten: nothing to ack.
                _ => return Ok(()),
            }
        };
        self.client.ack(&ack_for(pkid)).await.map_err(|_| "the connection task ended".to_owned())
    }

    /// Publishes a copy for the group with `attempt` (parked when no member is left to take
    /// it), then acks the original.
    async fn redeliver(&self, key: u64, attempt: u32) -> Answer {
        let message = match lock(&self.state).held.get(&key) {
            Some(held) => held.message.clone(),
            None => return Ok(()),
        };
        let properties = codec::encode(&message, attempt);
        let ack = self
            .publisher
            .publish(&self.retry_topic, false, message.payload.clone(), properties.clone())
            .await?;
        if ack == Ack::NoSubscribers {
            let parked = format!("{}/{}", self.parked_topic, uuid::Uuid::new_v4().simple());
            self.publisher.publish(&parked, true, message.payload.clone(), properties).await?;
            tracing::info!(topic = %self.label, id = %message.id, parked_as = %parked,
                "no member of the group is listening; message parked for the next one");
        }
        self.settle(key).await
    }

    /// After a failed redelivery: retry at the next ack deadline while subscribed, else
    /// leave the message unacked in the session.
    fn recover(self: &Arc<Self>, key: u64) {
        let mut state = lock(&self.state);
        let lease = state.next_key;
        state.next_key += 1;
        let listening = state.listening;
        let Some(held) = state.held.get_mut(&key) else { return };
        held.stage = if listening {
            Stage::HandedOut { lease, timer: tokio::spawn(self.clone().expire(key, lease)).abort_handle() }
        } else {
            Stage::InSession
        };
    }

    /// At the ack deadline: redeliver to the group with the next attempt.
    async fn expire(self: Arc<Self>, key: u64, lease: u64) {
        tokio::time::sleep(self.ack_deadline).await;
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

    /// Returns a message that was received but never handed out, with its attempt unchanged.
    async fn give_back(self: Arc<Self>, key: u64) {
        let attempt = {
            let mut state = lock(&self.state);
            let Some(held) = state.held.get_mut(&key) else { return };
            if !matches!(held.stage, Stage::Buffered) {
                return;
            }
            held.stage = Stage::Settling;
            held.message.attempt
        };
        if let Err(e) = self.redeliver(key, attempt).await {
            tracing::warn!(topic = %self.label, error = %e,
                "giving back a message; it stays in the member's session until a member with its name reconnects");
            self.recover(key);
        }
    }

    /// Takes a parked message back: republishes it to the group, then clears the retained copy.
    async fn unpark(self: Arc<Self>, publish: Publish) {
        let topic = String::from_utf8_lossy(&publish.topic).into_owned();
        let message = codec::decode(&publish);
        let properties = codec::encode(&message, message.attempt);
        let outcome = async {
            if !lock(&self.state).listening {
                return Ok(());
            }
            match self
                .publisher
                .publish(&self.retry_topic, false, message.payload.clone(), properties)
                .await?
            {
                Ack::Routed => self
                    .publisher
                    .publish(&topic, true, Bytes::new(), PublishProperties::default())
                    .await
                    .map(|_| ()),
                // Leaving meanwhile: the parked copy stays for the next member.
                Ack::NoSubscribers => Ok(()),
            }
        }
        .await;
        if let Err(e) = outcome {
            tracing::warn!(topic = %self.label, parked = %topic, error = %e, "taking back a parked message");
        }
        lock(&self.state).unparking.remove(&publish.pkid);
        let _ = self.client.ack(&ack_for(publish.pkid)).await;
    }

    fn on_connack(&self, connack: &ConnAck) {
        let mut state = lock(&self.state);
        state.connacks += 1;
        if state.connacks == 1 {
            return;
        }
        tracing::info!(topic = %self.label, session_present = connack.session_present, "mqtt member reconnected");
        if !connack.session_present {
            // The broker forgot us (session expired, or it restarted without persistence):
            // packet ids we hold mean nothing now.
            state.session += 1;
            state.by_pkid.clear();
            state.acked.clear();
            state.unparking.clear();
        }
        // Subscribing again even to a resumed session: Mosquitto 2.0 does not restore shared
        // subscriptions from its persistence file after a restart.
        if state.listening {
            let _ = self.client.try_subscribe_many(self.filters.clone());
        }
    }

    fn on_publish(self: &Arc<Self>, publish: Publish) {
        let qos1 = publish.qos != QoS::AtMostOnce;
        let topic = publish.topic.as_ref();
        let mut state = lock(&self.state);
        if let Some((marker, _)) = &state.drain
            && topic == marker.as_bytes()
        {
            if let Some((_, drained)) = state.drain.take() {
                let _ = drained.send(Ok(()));
            }
            drop(state);
            let _ = self.client.try_ack(&ack_for(publish.pkid));
            return;
        }
        if topic.strip_prefix(self.parked_topic.as_bytes()).is_some_and(|rest| rest.starts_with(b"/")) {
            let is_copy = publish
                .properties
                .as_ref()
                .is_some_and(|p| p.user_properties.iter().any(|(name, _)| name == wire::ID));
            // A clear (empty, no properties) or a resend of one being taken back: just ack.
            if !is_copy || !state.unparking.insert(publish.pkid) {
                drop(state);
                let _ = self.client.try_ack(&ack_for(publish.pkid));
                return;
            }
            drop(state);
            tokio::spawn(self.clone().unpark(publish));
            return;
        }
        let fingerprint = codec::fingerprint(&publish);
        if qos1 {
            if state.by_pkid.contains_key(&publish.pkid) {
                // The broker resending a message we still hold (after a reconnect).
                return;
            }
            if publish.dup && state.acked.get(&publish.pkid) == Some(&fingerprint) {
                drop(state);
                let _ = self.client.try_ack(&ack_for(publish.pkid));
                return;
            }
            state.acked.remove(&publish.pkid);
        }
        let key = state.next_key;
        state.next_key += 1;
        let session = state.session;
        state.held.insert(
            key,
            Held {
                message: codec::decode(&publish),
                pkid: qos1.then_some(publish.pkid),
                session,
                fingerprint,
                stage: Stage::Buffered,
            },
        );
        if qos1 {
            state.by_pkid.insert(publish.pkid, key);
        }
        let queued = state.deliveries.as_ref().is_some_and(|tx| tx.send(key).is_ok());
        drop(state);
        if !queued {
            // Arrived while leaving.
            tokio::spawn(self.clone().give_back(key));
        }
    }

    fn on_suback(&self, suback: &SubAck) {
        let refused = suback
            .return_codes
            .iter()
            .find(|code| !matches!(code, SubscribeReasonCode::Success(QoS::AtLeastOnce | QoS::ExactlyOnce)));
        let answer = match refused {
            None => Ok(()),
            Some(SubscribeReasonCode::Success(_)) => Err("the broker granted only QoS 0".to_owned()),
            Some(code) => {
                let detail = suback.properties.as_ref().and_then(|p| p.reason_string.clone());
                Err(format!(
                    "the broker refused the subscription: {code:?}{}",
                    detail.map(|d| format!(" ({d})")).unwrap_or_default()
                ))
            }
        };
        match lock(&self.state).subacks.pop_front() {
            Some(waiter) => {
                let _ = waiter.send(answer);
            }
            None => {
                if let Err(e) = answer {
                    tracing::warn!(topic = %self.label, error = %e, "resubscribing after a lost session");
                }
            }
        }
    }

    fn on_unsuback(&self) {
        if let Some(waiter) = lock(&self.state).unsubacks.pop_front() {
            let _ = waiter.send(Ok(()));
        }
    }

    fn on_connection_lost(&self, reason: &str) {
        let mut state = lock(&self.state);
        let reason = if state.connacks == 0 {
            format!("could not connect: {reason}")
        } else {
            format!("the connection to the broker was lost: {reason}")
        };
        let state = &mut *state;
        for waiter in state.subacks.drain(..).chain(state.unsubacks.drain(..)) {
            let _ = waiter.send(Err(reason.clone()));
        }
    }
}

/// Polls the member's event loop, reconnecting with backoff (the session resumes); ends
/// once the member is gone.
async fn drive(member: Weak<Member>, mut eventloop: EventLoop) {
    let mut backoff = BACKOFF_MIN;
    loop {
        if member.strong_count() == 0 {
            return;
        }
        let event = eventloop.poll().await;
        let Some(strong) = member.upgrade() else { return };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(connack))) => {
                backoff = BACKOFF_MIN;
                strong.on_connack(&connack);
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => strong.on_publish(publish),
            Ok(Event::Incoming(Packet::SubAck(suback))) => strong.on_suback(&suback),
            Ok(Event::Incoming(Packet::UnsubAck(_))) => strong.on_unsuback(),
            Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
            Ok(_) => {}
            Err(e) => {
                let reason = describe(&e);
                strong.on_connection_lost(&reason);
                if lock(&strong.state).connacks == 0 {
                    // Never connected: the subscribe call has failed, nobody is waiting.
                    return;
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
        if !self.member.claim(self.key, self.lease) {
            return Err(Error::LeaseLost(self.id));
        }
        self.member.settle(self.key).await.map_err(|e| Error::transport(Op::Ack, &self.member.label, e))
    }

    async fn nack(self: Box<Self>, delay: Option<Duration>) -> Result<()> {
        if !self.member.claim(self.key, self.lease) {
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
