//! The task polling a member's connection.

use std::sync::Weak;

use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{Event, EventLoop};

use super::member::Member;
use crate::publisher::{BACKOFF_MAX, BACKOFF_MIN, describe};

/// What the connection task does after a lost connection.
pub(super) enum Next {
    Stop,
    /// Poll the same client again: it reconnects.
    Poll,
    /// Poll a new incarnation's client.
    Replace(Box<EventLoop>),
}

/// Polls the member's connection, reconnecting with backoff (as a new incarnation once a
/// connected one is lost); ends once the member is gone or retired.
pub(super) async fn drive(member: Weak<Member>, mut eventloop: EventLoop) {
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
