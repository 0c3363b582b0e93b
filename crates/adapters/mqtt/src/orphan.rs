//! Sessions of members that are gone (*orphans*), and how a live member adopts one.
//!
//! Every member's session never expires and stays subscribed to its group's shared
//! subscriptions, so the broker keeps queueing a share of the group's messages for it after
//! its member is gone: that is how a group with no connected member keeps its messages. A
//! gone member's session is named by a retained *record* under the group's orphan level,
//! `polybus-orphans/<group>/<topic>/<incarnation>`, whose payload is the session's client id:
//! a member that closes publishes it itself; for a member that dies (SIGKILL, lost
//! connection) the broker publishes the member's will, which is that same record.
//!
//! Every member subscribes to its group's orphan level, so a live member sees a record as
//! soon as it is published, and a joining member sees all of them (they are retained). It
//! then adopts the session: connects with its client id, unsubscribes it from the group, and
//! passes everything queued in it on to the group's retry topic, acking each message once
//! the broker has its copy; a drain marker tells when the queue is empty. Then it deletes the
//! session and clears the record.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{LastWill, LastWillProperties, Packet, Publish, PublishProperties};
use rumqttc::v5::{AsyncClient, Event};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::codec;
use crate::config::Settings;
use crate::publisher::{Ack, Publisher, describe, lock};

/// First topic level of the records of gone members.
pub(crate) const ORPHAN_PREFIX: &str = "polybus-orphans";
/// First topic level of the markers an adopter drains a session with.
pub(crate) const DRAIN_PREFIX: &str = "polybus-drain";
/// A member's session expiry: never (MQTT 5's largest value), so a group keeps its messages
/// however long it has no member.
pub(crate) const NEVER_EXPIRES: u32 = u32::MAX;
/// User property of a record saying how its member ended.
const EXIT: &str = "polybus-exit";
/// Most messages in flight from an adopted session at once.
const WINDOW: u16 = 64;
/// How long an adoption may go without progress before it is given up (and tried again).
const STALL: Duration = Duration::from_secs(10);

/// Record topics being adopted in this process, so its members of one group adopt each
/// session once.
static ADOPTING: Mutex<Option<HashSet<String>>> = Mutex::new(None);

/// The topic level under which the records of `group`'s gone members of `topic` are retained.
pub(crate) fn orphan_level(group: &str, topic: &str) -> String {
    format!("{ORPHAN_PREFIX}/{group}/{topic}")
}

/// How a member ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exit {
    /// It closed after every delivery it handed out was settled: what is left in its session
    /// was never handed out, so a resend (`dup`) is no new attempt.
    Closed,
    /// It died or lost its connection: a resend may have been handed out already.
    Lost,
}

impl Exit {
    fn as_str(self) -> &'static str {
        match self {
            Exit::Closed => "closed",
            Exit::Lost => "lost",
        }
    }
}

/// A gone member's session, as its record names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    /// Where the record is retained.
    pub topic: String,
    /// The session's client id.
    pub client_id: String,
    pub exit: Exit,
}

/// What a publish on a group's orphan level says.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Seen {
    /// A member is gone; its session waits to be adopted.
    Orphan(Record),
    /// The record at this topic was cleared: its session has been adopted.
    Cleared(String),
}

/// Reads a publish under `level`; `None` when it is not a record of that level.
pub(crate) fn parse(level: &str, publish: &Publish) -> Option<Seen> {
    let topic = std::str::from_utf8(&publish.topic).ok()?;
    let incarnation = topic.strip_prefix(level)?.strip_prefix('/')?;
    if incarnation.is_empty() || incarnation.contains('/') {
        return None;
    }
    if publish.payload.is_empty() {
        return Some(Seen::Cleared(topic.to_owned()));
    }
    let client_id = std::str::from_utf8(&publish.payload).ok()?;
    // Only a member's own session: its client id ends with the incarnation the topic names.
    if !client_id.strip_suffix(incarnation).is_some_and(|rest| rest.ends_with('-')) {
        return None;
    }
    let closed = publish
        .properties
        .as_ref()
        .is_some_and(|p| p.user_properties.iter().any(|(n, v)| n == EXIT && v == Exit::Closed.as_str()));
    Some(Seen::Orphan(Record {
        topic: topic.to_owned(),
        client_id: client_id.to_owned(),
        exit: if closed { Exit::Closed } else { Exit::Lost },
    }))
}

/// The record a member publishes (retained) when it closes, or the broker when it dies.
pub(crate) fn record(client_id: &str, exit: Exit) -> (Bytes, PublishProperties) {
    let properties = PublishProperties {
        user_properties: vec![(EXIT.to_owned(), exit.as_str().to_owned())],
        ..PublishProperties::default()
    };
    (Bytes::copy_from_slice(client_id.as_bytes()), properties)
}

/// The will of a member's connection: its record, saying it was lost.
pub(crate) fn will(record_topic: &str, client_id: &str) -> LastWill {
    let properties = LastWillProperties {
        delay_interval: None,
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: None,
        response_topic: None,
        correlation_data: None,
        user_properties: vec![(EXIT.to_owned(), Exit::Lost.as_str().to_owned())],
    };
    LastWill::new(record_topic, client_id.as_bytes().to_vec(), QoS::AtLeastOnce, true, Some(properties))
}

/// Claims `topic` for adoption in this process; `None` when a member here already adopts it.
pub(crate) fn claim(topic: &str) -> Option<Claim> {
    let mut adopting = lock(&ADOPTING);
    adopting.get_or_insert_with(HashSet::new).insert(topic.to_owned()).then(|| Claim(topic.to_owned()))
}

/// A record topic claimed for adoption until dropped.
pub(crate) struct Claim(String);

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some(adopting) = lock(&ADOPTING).as_mut() {
            adopting.remove(&self.0);
        }
    }
}

/// What adopting a session needs from the member that adopts it.
#[derive(Clone)]
pub(crate) struct Adopter {
    pub settings: Settings,
    pub publisher: Publisher,
    /// Where the adopted messages go: the group's retry topic.
    pub retry_topic: String,
    /// The group's filters, which the orphan's session holds too.
    pub filters: Vec<String>,
}

impl Adopter {
    /// Adopts the session `record` names; returns how many messages it passed on to the group.
    pub async fn adopt(&self, record: &Record) -> Result<usize, String> {
        let mut options = self.settings.options(record.client_id.clone());
        options
            .set_clean_start(false)
            .set_session_expiry_interval(Some(NEVER_EXPIRES))
            .set_manual_acks(true)
            .set_receive_maximum(Some(WINDOW));
        let mut session = Session::connect(options);
        let passed_on = match session.connack().await? {
            true => self.pass_on(record.exit, &mut session).await?,
            // Already adopted (and deleted) by another member.
            false => 0,
        };
        session.disconnect().await;
        self.delete(&record.client_id).await?;
        self.publisher.publish(&record.topic, true, Bytes::new(), PublishProperties::default()).await?;
        Ok(passed_on)
    }

    /// Unsubscribes the session from the group, then passes on everything queued in it
    /// until the drain marker arrives behind the last of them.
    async fn pass_on(&self, exit: Exit, session: &mut Session) -> Result<usize, String> {
        for filter in &self.filters {
            session.client.unsubscribe(filter.clone()).await.map_err(|_| "the connection task ended")?;
        }
        let mut unsubscribing = self.filters.len();
        let marker = format!("{DRAIN_PREFIX}/{}", uuid::Uuid::new_v4().simple());
        let mut drained = false;
        let mut passing = JoinSet::new();
        let mut passed_on = 0;
        let mut stall = Instant::now() + STALL;
        while !(drained && passing.is_empty()) {
            tokio::select! {
                event = session.events.recv() => {
                    match event {
                        Some(Ok(Event::Incoming(Packet::UnsubAck(_)))) => {
                            unsubscribing = unsubscribing.saturating_sub(1);
                            if unsubscribing == 0 {
                                session.client.subscribe(marker.clone(), QoS::AtLeastOnce).await
                                    .map_err(|_| "the connection task ended")?;
                            }
                        }
                        Some(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                            let publisher = self.publisher.clone();
                            let marker = marker.clone();
                            passing.spawn(async move {
                                publisher.publish(&marker, false, Bytes::new(), PublishProperties::default()).await.map(|_| false)
                            });
                        }
                        Some(Ok(Event::Incoming(Packet::Publish(publish)))) => {
                            if publish.topic.as_ref() == marker.as_bytes() {
                                drained = true;
                                let _ = session.client.ack(&publish).await;
                            } else if publish.qos != QoS::AtMostOnce {
                                passing.spawn(pass_one(self.publisher.clone(), self.retry_topic.clone(),
                                    session.client.clone(), publish, exit));
                            }
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return Err(format!("the adopted session's connection ended: {e}")),
                        None => return Err("the adopted session's connection ended".into()),
                    }
                }
                Some(done) = passing.join_next(), if !passing.is_empty() => {
                    match done {
                        Ok(Ok(message)) => passed_on += usize::from(message),
                        Ok(Err(e)) => return Err(e),
                        Err(e) => return Err(format!("passing a message on: {e}")),
                    }
                }
                () = tokio::time::sleep_until(stall) => {
                    return Err(format!("no progress for {STALL:?} while draining the session"));
                }
            }
            stall = Instant::now() + STALL;
        }
        Ok(passed_on)
    }

    /// Deletes the (drained, unsubscribed) session: a clean start that expires at once.
    async fn delete(&self, client_id: &str) -> Result<(), String> {
        let mut options = self.settings.options(client_id.to_owned());
        options.set_clean_start(true).set_session_expiry_interval(None);
        let mut session = Session::connect(options);
        session.connack().await?;
        session.disconnect().await;
        Ok(())
    }
}

/// Publishes a copy of one adopted message to the group, then acks the original; `true` once
/// done.
async fn pass_one(
    publisher: Publisher,
    retry_topic: String,
    client: AsyncClient,
    publish: Publish,
    exit: Exit,
) -> Result<bool, String> {
    let dup = publish.dup;
    let mut message = codec::decode(publish.clone());
    if exit == Exit::Closed {
        message.attempt = message.attempt.saturating_sub(u32::from(dup)).max(1);
    }
    let properties = codec::encode(&message, message.attempt);
    match publisher.publish(&retry_topic, false, message.payload, properties).await? {
        Ack::Routed => {}
        Ack::NoSubscribers => return Err("no session of the group subscribes to its retry topic".into()),
    }
    client.ack(&publish).await.map_err(|_| "the connection task ended".to_owned())?;
    Ok(true)
}

/// A connection of the adopter's, under another member's client id; never reconnects.
struct Session {
    client: AsyncClient,
    events: mpsc::UnboundedReceiver<Result<Event, String>>,
    poller: tokio::task::JoinHandle<()>,
}

impl Session {
    fn connect(options: rumqttc::v5::MqttOptions) -> Session {
        let (client, mut eventloop) = AsyncClient::new(options, usize::from(WINDOW) + 16);
        let (tx, events) = mpsc::unbounded_channel();
        let poller = tokio::spawn(async move {
            loop {
                let event = eventloop.poll().await;
                let last = matches!(event, Err(_) | Ok(Event::Outgoing(Outgoing::Disconnect)));
                if tx.send(event.map_err(|e| describe(&e))).is_err() || last {
                    return;
                }
            }
        });
        Session { client, events, poller }
    }

    /// Waits for the broker to accept the connection; returns whether the session existed.
    async fn connack(&mut self) -> Result<bool, String> {
        let deadline = Instant::now() + STALL;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(Ok(Event::Incoming(Packet::ConnAck(connack))))) => return Ok(connack.session_present),
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => return Err(format!("connecting: {e}")),
                Ok(None) => return Err("connecting: the connection task ended".into()),
                Err(_) => return Err(format!("connecting: no answer within {STALL:?}")),
            }
        }
    }

    /// Sends DISCONNECT and waits (briefly) until it has left.
    async fn disconnect(mut self) {
        if self.client.disconnect().await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while let Some(Ok(_)) = self.events.recv().await {}
            })
            .await;
        }
        self.poller.abort();
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.poller.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(topic: &str, payload: &str, exit: Option<Exit>) -> Publish {
        let properties = exit.map(|exit| record(payload, exit).1);
        Publish::new(topic, QoS::AtMostOnce, payload.as_bytes().to_vec(), properties)
    }

    #[test]
    fn records_name_a_session_of_their_own_level_only() {
        let level = orphan_level("g", "plant/1");
        let topic = format!("{level}/abc123");
        let seen = parse(&level, &publish(&topic, "polybus-g-c1-0000-abc123", Some(Exit::Closed)));
        assert_eq!(
            seen,
            Some(Seen::Orphan(Record {
                topic: topic.clone(),
                client_id: "polybus-g-c1-0000-abc123".into(),
                exit: Exit::Closed
            }))
        );
        // A will carries `lost`; a record without the property counts as lost too.
        let lost = parse(&level, &publish(&topic, "x-abc123", None));
        assert!(matches!(lost, Some(Seen::Orphan(Record { exit: Exit::Lost, .. }))));
        assert_eq!(parse(&level, &publish(&topic, "", None)), Some(Seen::Cleared(topic.clone())));
        // Another session's client id, a deeper topic, another group's level: not ours.
        assert_eq!(parse(&level, &publish(&topic, "some-other-client", None)), None);
        assert_eq!(parse(&level, &publish(&format!("{level}/x/abc123"), "c-abc123", None)), None);
        assert_eq!(parse(&orphan_level("h", "plant/1"), &publish(&topic, "c-abc123", None)), None);
    }

    #[test]
    fn a_topic_is_claimed_once_at_a_time() {
        let first = claim("polybus-orphans/g/t/1");
        assert!(first.is_some());
        assert!(claim("polybus-orphans/g/t/1").is_none());
        drop(first);
        assert!(claim("polybus-orphans/g/t/1").is_some());
    }
}
