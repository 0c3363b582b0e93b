//! The transport's publishing connection: QoS 1, and every publish waits for its PUBACK.
//!
//! rumqttc reports a publish's packet id only as an `Outgoing::Publish(pkid)` event, in the
//! order requests leave its channel. So publishes are queued in that same order (one sender
//! at a time) and matched to packet ids as the events come, then to PUBACKs by packet id.
//! When the connection drops, every waiting publish fails (the caller sees an error, never
//! a silent drop) and a fresh client replaces the old one after a backoff, so nothing half
//! sent is replayed behind a caller's back.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use polybus_core::FailureKind;
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet, PubAck, PubAckReason, PublishProperties};
use rumqttc::v5::mqttbytes::{self, QoS};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, StateError};
use tokio::sync::{Notify, oneshot, watch};
use tokio::task::JoinHandle;

use crate::config::Settings;

/// How long a publish waits for a connection before failing.
const CONNECT_WAIT: Duration = Duration::from_secs(5);
/// How long a publish waits for its PUBACK once sent.
const PUBACK_WAIT: Duration = Duration::from_secs(30);
/// How long `close` waits for outstanding PUBACKs.
const CLOSE_WAIT: Duration = Duration::from_secs(10);
/// How long a ping waits for the broker's answer.
const PING_WAIT: Duration = Duration::from_secs(5);
/// A filter nobody subscribes to: unsubscribing from it is a harmless round trip.
const PING_FILTER: &str = "polybus/ping";
/// Requests queued towards the client's event loop.
const REQUEST_CAPACITY: usize = 64;
/// Most publishes awaiting a PUBACK at once (the broker's receive maximum may be lower).
const MAX_INFLIGHT: u16 = 256;
/// First and longest wait between reconnection attempts.
pub(crate) const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// How the broker took a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ack {
    /// Accepted and routed to at least one subscription.
    Routed,
    /// Accepted, but no subscription matched: nobody will receive it.
    NoSubscribers,
}

type Reply<T> = oneshot::Sender<Result<T, String>>;
/// The outcome of the first connection attempt.
type FirstReply = oneshot::Sender<Result<(), (String, FailureKind)>>;

/// The publishing connection; cheap to clone.
#[derive(Clone)]
pub(crate) struct Publisher {
    inner: Arc<Inner>,
}

struct Inner {
    settings: Settings,
    client_id: String,
    state: Mutex<State>,
    /// Held while a request enters the client's channel, so queue order is channel order.
    send: tokio::sync::Mutex<()>,
    connected: watch::Sender<bool>,
    closing: watch::Sender<bool>,
    idle: Notify,
    driver: Mutex<Option<JoinHandle<()>>>,
    /// When the connection was last re-established.
    reconnected_at: Mutex<Option<tokio::time::Instant>>,
}

struct State {
    client: AsyncClient,
    next_id: u64,
    /// Publishes in the client's channel, not yet given a packet id.
    queued: VecDeque<(u64, Reply<Ack>)>,
    /// Publishes sent, by packet id.
    inflight: HashMap<u16, Reply<Ack>>,
    /// A publish rumqttc holds back until the packet id it collided with is acked.
    collided: Option<(u16, Reply<Ack>)>,
    /// Pings awaiting the broker's UNSUBACK.
    pings: VecDeque<(u64, Reply<()>)>,
}

impl State {
    fn is_idle(&self) -> bool {
        self.queued.is_empty() && self.inflight.is_empty() && self.collided.is_none()
    }

    fn fail_all(&mut self, reason: &str) {
        let waiters = self
            .queued
            .drain(..)
            .map(|(_, w)| w)
            .chain(self.inflight.drain().map(|(_, w)| w))
            .chain(self.collided.take().map(|(_, w)| w));
        for waiter in waiters {
            let _ = waiter.send(Err(reason.to_owned()));
        }
        for (_, ping) in self.pings.drain(..) {
            let _ = ping.send(Err(reason.to_owned()));
        }
    }
}

/// A publish that has left for the broker; [`Pending::wait`] for its PUBACK.
pub(crate) struct Pending(oneshot::Receiver<Result<Ack, String>>);

impl Pending {
    /// The broker's answer.
    pub async fn wait(self) -> Result<Ack, String> {
        match tokio::time::timeout(PUBACK_WAIT, self.0).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err("the connection closed before the broker acknowledged".into()),
            Err(_) => Err(format!("the broker did not acknowledge within {PUBACK_WAIT:?}")),
        }
    }
}

fn new_client(settings: &Settings, client_id: &str) -> (AsyncClient, EventLoop) {
    let mut options = settings.options(client_id.to_owned());
    options.set_clean_start(true).set_outgoing_inflight_upper_limit(MAX_INFLIGHT);
    AsyncClient::new(options, REQUEST_CAPACITY)
}

/// What kind of failure a connection error is: a refusal by return code, else whether the
/// network failed or the broker broke the protocol.
pub(crate) fn failure_kind(e: &ConnectionError) -> FailureKind {
    if tls_failure(e).is_some() {
        return FailureKind::Invalid;
    }
    match e {
        ConnectionError::ConnectionRefused(code) => match code {
            ConnectReturnCode::BadUserNamePassword
            | ConnectReturnCode::NotAuthorized
            | ConnectReturnCode::Banned
            | ConnectReturnCode::BadAuthenticationMethod => FailureKind::Auth,
            ConnectReturnCode::ServiceUnavailable
            | ConnectReturnCode::ServerUnavailable
            | ConnectReturnCode::ServerBusy
            | ConnectReturnCode::QuotaExceeded
            | ConnectReturnCode::UseAnotherServer
            | ConnectReturnCode::ServerMoved
            | ConnectReturnCode::ConnectionRateExceeded => FailureKind::Unavailable,
            ConnectReturnCode::PacketTooLarge => FailureKind::TooLarge,
            ConnectReturnCode::UnspecifiedError | ConnectReturnCode::ImplementationSpecificError => {
                FailureKind::Unknown
            }
            _ => FailureKind::Invalid,
        },
        ConnectionError::Timeout(_) => FailureKind::Timeout,
        ConnectionError::Io(_) | ConnectionError::RequestsDone => FailureKind::Unavailable,
        ConnectionError::Tls(_) => FailureKind::Invalid,
        _ => FailureKind::Unknown,
    }
}

/// What is wrong with the certificates when `e` is a failed TLS handshake. Under TLS 1.3 the
/// server refuses a client certificate after the handshake, at the first read, as an I/O
/// error the state error keeps without naming it as its source.
fn tls_failure(e: &ConnectionError) -> Option<String> {
    if let ConnectionError::MqttState(StateError::Deserialization(mqttbytes::Error::Io(io))) = e
        && let Some(why) = polybus_core::tls::handshake_failure(io)
    {
        return Some(why);
    }
    polybus_core::tls::handshake_failure(e)
}

/// Words for a connection error (rumqttc's never include credentials); a failed TLS handshake
/// says what is wrong with the certificates.
pub(crate) fn describe(e: &ConnectionError) -> String {
    if let Some(why) = tls_failure(e) {
        return format!("TLS handshake failed, a certificate problem: {why} ({e})");
    }
    match e {
        ConnectionError::ConnectionRefused(code) => format!("the broker refused the connection: {code:?}"),
        other => other.to_string(),
    }
}

impl Publisher {
    /// Connects; fails when the first connection attempt does, saying why and what kind of
    /// failure that is.
    pub async fn connect(settings: Settings) -> Result<Publisher, (String, FailureKind)> {
        let client_id =
            format!("{}-pub-{}", settings.client_id, &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let (client, eventloop) = new_client(&settings, &client_id);
        let inner = Arc::new(Inner {
            settings,
            client_id,
            state: Mutex::new(State {
                client,
                next_id: 0,
                queued: VecDeque::new(),
                inflight: HashMap::new(),
                collided: None,
                pings: VecDeque::new(),
            }),
            send: tokio::sync::Mutex::new(()),
            connected: watch::Sender::new(false),
            closing: watch::Sender::new(false),
            idle: Notify::new(),
            driver: Mutex::new(None),
            reconnected_at: Mutex::new(None),
        });
        let (first_tx, first_rx) = oneshot::channel();
        let driver = tokio::spawn(drive(Arc::downgrade(&inner), eventloop, first_tx));
        *lock(&inner.driver) = Some(driver);
        match first_rx.await {
            Ok(Ok(())) => Ok(Publisher { inner }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(("the connection task ended".into(), FailureKind::Unknown)),
        }
    }

    /// Publishes at QoS 1 and waits for the PUBACK.
    pub async fn publish(
        &self,
        topic: &str,
        retain: bool,
        payload: Bytes,
        properties: PublishProperties,
    ) -> Result<Ack, String> {
        self.start(topic, retain, payload, properties).await?.wait().await
    }

    /// Hands a QoS 1 publish to the connection; the PUBACK comes through the returned [`Pending`].
    pub async fn start(
        &self,
        topic: &str,
        retain: bool,
        payload: Bytes,
        properties: PublishProperties,
    ) -> Result<Pending, String> {
        self.wait_connected(CONNECT_WAIT).await?;
        let (tx, rx) = oneshot::channel();
        let _order = self.inner.send.lock().await;
        let (id, client) = {
            let mut state = lock(&self.inner.state);
            let id = state.next_id;
            state.next_id += 1;
            state.queued.push_back((id, tx));
            (id, state.client.clone())
        };
        let mut unqueue = Unqueue { inner: &self.inner, id, ping: false, armed: true };
        client
            .publish_with_properties(topic, QoS::AtLeastOnce, retain, payload, properties)
            .await
            .map_err(|_| "the connection is being re-established".to_owned())?;
        unqueue.armed = false;
        Ok(Pending(rx))
    }

    /// Checks the broker answers on this connection (an UNSUBSCRIBE round trip).
    pub async fn ping(&self) -> Result<(), String> {
        self.wait_connected(PING_WAIT).await?;
        let (tx, rx) = oneshot::channel();
        {
            let _order = self.inner.send.lock().await;
            let (id, client) = {
                let mut state = lock(&self.inner.state);
                let id = state.next_id;
                state.next_id += 1;
                state.pings.push_back((id, tx));
                (id, state.client.clone())
            };
            let mut unqueue = Unqueue { inner: &self.inner, id, ping: true, armed: true };
            client
                .unsubscribe(PING_FILTER)
                .await
                .map_err(|_| "the connection is being re-established".to_owned())?;
            unqueue.armed = false;
        }
        match tokio::time::timeout(PING_WAIT, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err("the connection closed before the broker answered".into()),
            Err(_) => Err(format!("the broker did not answer within {PING_WAIT:?}")),
        }
    }

    /// True while group members share this connection for their redeliveries.
    pub fn shared(&self) -> bool {
        Arc::strong_count(&self.inner) > 1
    }

    /// Waits until no publish awaits its PUBACK, for a while.
    pub async fn flush(&self) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + CLOSE_WAIT;
        loop {
            let notified = self.inner.idle.notified();
            if lock(&self.inner.state).is_idle() {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(format!("publishes still unacknowledged after {CLOSE_WAIT:?}"));
            }
        }
    }

    /// Waits for outstanding PUBACKs, then disconnects. Later publishes fail.
    pub async fn close(&self) -> Result<(), String> {
        if self.inner.closing.send_replace(true) {
            return Ok(());
        }
        let flushed = self.flush().await;
        let client = lock(&self.inner.state).client.clone();
        let driver = lock(&self.inner.driver).take();
        if *self.inner.connected.borrow() {
            let _ = client.disconnect().await;
        }
        if let Some(mut driver) = driver
            && tokio::time::timeout(Duration::from_secs(2), &mut driver).await.is_err()
        {
            driver.abort();
        }
        self.inner.connected.send_replace(false);
        lock(&self.inner.state).fail_all("the transport is closed");
        flushed
    }

    /// True while the connection is down or was re-established less than `within` ago.
    pub fn reconnecting(&self, within: Duration) -> bool {
        !*self.inner.connected.borrow()
            || lock(&self.inner.reconnected_at).is_some_and(|at| at.elapsed() < within)
    }

    /// `host:port` of the broker.
    pub fn endpoint(&self) -> String {
        self.inner.settings.endpoint()
    }

    async fn wait_connected(&self, limit: Duration) -> Result<(), String> {
        if *self.inner.closing.borrow() {
            return Err("the transport is closed".into());
        }
        let mut connected = self.inner.connected.subscribe();
        match tokio::time::timeout(limit, connected.wait_for(|c| *c)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err("the transport is closed".into()),
            Err(_) => Err(format!("not connected to {} (reconnecting)", self.inner.settings.endpoint())),
        }
    }
}

/// Takes a request's waiter back out of the queue when its send did not complete (error or
/// cancellation); disarmed once the request is in the channel.
struct Unqueue<'a> {
    inner: &'a Inner,
    id: u64,
    ping: bool,
    armed: bool,
}

impl Drop for Unqueue<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut state = lock(&self.inner.state);
        if self.ping {
            state.pings.retain(|(id, _)| *id != self.id);
        } else {
            state.queued.retain(|(id, _)| *id != self.id);
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = state.client.try_disconnect();
    }
}

impl Inner {
    fn on_event(&self, event: Event, first: &mut Option<FirstReply>, backoff: &mut Duration) -> bool {
        match event {
            Event::Incoming(Packet::ConnAck(_)) => {
                *backoff = BACKOFF_MIN;
                self.connected.send_replace(true);
                if let Some(first) = first.take() {
                    let _ = first.send(Ok(()));
                } else {
                    *lock(&self.reconnected_at) = Some(tokio::time::Instant::now());
                    tracing::info!(client_id = %self.client_id, endpoint = %self.settings.endpoint(), "mqtt reconnected");
                }
            }
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                let mut state = lock(&self.state);
                let waiter = match state.collided.take() {
                    Some((collided, waiter)) if collided == pkid => Some(waiter),
                    other => {
                        state.collided = other;
                        state.queued.pop_front().map(|(_, w)| w)
                    }
                };
                if let Some(waiter) = waiter {
                    state.inflight.insert(pkid, waiter);
                }
            }
            Event::Outgoing(Outgoing::AwaitAck(pkid)) => {
                let mut state = lock(&self.state);
                if let Some((_, waiter)) = state.queued.pop_front() {
                    state.collided = Some((pkid, waiter));
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                let mut state = lock(&self.state);
                if let Some(waiter) = state.inflight.remove(&ack.pkid) {
                    let _ = waiter.send(answer(&ack));
                }
                if state.is_idle() {
                    self.idle.notify_waiters();
                }
            }
            Event::Incoming(Packet::UnsubAck(_)) => {
                if let Some((_, ping)) = lock(&self.state).pings.pop_front() {
                    let _ = ping.send(Ok(()));
                }
            }
            Event::Outgoing(Outgoing::Disconnect) => return *self.closing.borrow(),
            _ => {}
        }
        false
    }

    /// Fails everything waiting and swaps in a fresh client; the old channel dies with its loop.
    fn replace_client(&self, client: AsyncClient) {
        let mut state = lock(&self.state);
        state.fail_all("the connection to the broker was lost");
        state.client = client;
        self.idle.notify_waiters();
    }
}

fn answer(ack: &PubAck) -> Result<Ack, String> {
    match ack.reason {
        PubAckReason::Success => Ok(Ack::Routed),
        PubAckReason::NoMatchingSubscribers => Ok(Ack::NoSubscribers),
        reason => {
            let detail = ack.properties.as_ref().and_then(|p| p.reason_string.clone());
            Err(match detail {
                Some(detail) => format!("the broker refused the message: {reason:?} ({detail})"),
                None => format!("the broker refused the message: {reason:?}"),
            })
        }
    }
}

/// Polls the event loop; on a lost connection fails the waiting publishes, backs off and
/// starts a fresh client. Ends when the publisher is dropped or closed.
async fn drive(inner: Weak<Inner>, mut eventloop: EventLoop, first: FirstReply) {
    let mut first = Some(first);
    let mut backoff = BACKOFF_MIN;
    loop {
        let event = eventloop.poll().await;
        let Some(strong) = inner.upgrade() else { return };
        match event {
            Ok(event) => {
                if strong.on_event(event, &mut first, &mut backoff) {
                    return;
                }
            }
            Err(e) => {
                let reason = describe(&e);
                strong.connected.send_replace(false);
                {
                    let mut state = lock(&strong.state);
                    state.fail_all(&format!("the connection to the broker was lost: {reason}"));
                }
                strong.idle.notify_waiters();
                if let Some(first) = first.take() {
                    let _ = first.send(Err((reason, failure_kind(&e))));
                    return;
                }
                if *strong.closing.borrow() {
                    return;
                }
                tracing::warn!(client_id = %strong.client_id, endpoint = %strong.settings.endpoint(),
                    error = %reason, retry_in = ?backoff, "mqtt connection lost; reconnecting");
                let mut closing = strong.closing.subscribe();
                drop(strong);
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = closing.wait_for(|c| *c) => return,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                let Some(strong) = inner.upgrade() else { return };
                let (client, fresh) = new_client(&strong.settings, &strong.client_id);
                strong.replace_client(client);
                eventloop = fresh;
            }
        }
    }
}

/// Locks a std mutex, recovering from poisoning (no invariant spans a panic here).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
