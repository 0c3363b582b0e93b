//! What the MQTT tests share: a registry with an `mqtt` env, a bus over it, and a native
//! MQTT 5 client (rumqttc) to check what travels on the wire.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use polybus::{Broker, Bus, Registry, Topic};
use polybus_mqtt::MqttConnector;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, Publish};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::json;
use tokio::sync::mpsc;

/// How long any expected event may take.
pub const WAIT: Duration = Duration::from_secs(10);
/// The env the tests use.
pub const ENV: &str = "dev";

/// The broker under test: `MQTT_HOST` / `MQTT_PORT`, default 127.0.0.1:1883.
pub fn broker_address() -> (String, u16) {
    let host = std::env::var("MQTT_HOST").unwrap_or_else(|_| "127.0.0.1".into());
    let port = std::env::var("MQTT_PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(1883);
    (host, port)
}

/// A registry in a temporary directory, a bus with the MQTT connector, and one topic.
pub struct World {
    pub bus: Bus,
    pub registry: Registry,
    /// `mqtt-test:<topic>`.
    pub event: String,
    /// The topic's native name: its MQTT topic.
    pub topic: String,
    _dir: tempfile::TempDir,
}

impl World {
    /// A fresh world with a topic no other test uses.
    pub async fn new() -> World {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("registry.db");
        let registry =
            Registry::open(path.to_str().expect("UTF-8 path")).await.expect("opening the registry");
        let (host, port) = broker_address();
        let broker = Broker::from_value(json!({
            "name": "MQTT tests",
            "tag": "mqtt-test",
            "envs": [{"slug": ENV, "type": "mqtt", "config": {"host": host, "port": port}}],
        }))
        .expect("broker definition");
        registry.create_broker(broker).await.expect("creating the broker");
        let topic = format!("polybus-test/{}", uuid::Uuid::new_v4().simple());
        let event = "mqtt-test:orders".to_owned();
        let definition =
            Topic::from_value(json!({"tag": event, "envs": [{"slug": ENV, "nativeName": topic}]}))
                .expect("topic definition");
        registry.create_topic(definition).await.expect("creating the topic");
        let bus = Bus::builder(registry).connector(Arc::new(MqttConnector)).build();
        // The bus's registry checks definitions through the MQTT connector's rules.
        let registry = bus.registry().clone();
        World { bus, registry, event, topic, _dir: dir }
    }
}

impl World {
    /// Deletes what `groups` left on the (shared) broker: the sessions of their gone members,
    /// which never expire, and the retained records naming them. Call it once every
    /// subscription of theirs is closed.
    pub async fn forget_groups(&self, groups: &[&str]) {
        let mut native = Native::connect().await;
        let filters = groups.iter().map(|group| {
            Filter::new(format!("{}/+", polybus_mqtt::orphan_topic(group, &self.topic)), QoS::AtLeastOnce)
        });
        // One SUBSCRIBE: every retained record comes after its SUBACK.
        native.client.subscribe_many(filters).await.expect("sending SUBSCRIBE");
        next_packet(&mut native.events, "the SUBACK", |p| matches!(p, Packet::SubAck(_))).await;
        let mut records = Vec::new();
        while let Ok(record) =
            tokio::time::timeout(Duration::from_millis(300), native.publish_received()).await
        {
            if !record.payload.is_empty() {
                records.push(record);
            }
        }
        for record in records {
            let client_id = String::from_utf8_lossy(&record.payload).into_owned();
            delete_session(&client_id).await;
            let topic = String::from_utf8_lossy(&record.topic).into_owned();
            native
                .client
                .publish(topic, QoS::AtLeastOnce, true, Vec::new())
                .await
                .expect("clearing a record");
            next_packet(&mut native.events, "the PUBACK of a cleared record", |p| {
                matches!(p, Packet::PubAck(_))
            })
            .await;
        }
    }
}

/// Deletes the session of `client_id`: a clean start whose session ends with the connection.
async fn delete_session(client_id: &str) {
    let (host, port) = broker_address();
    let (client, mut eventloop) = AsyncClient::new(MqttOptions::new(client_id, host, port), 8);
    let connected = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return,
                Ok(_) => {}
                Err(e) => panic!("connecting as {client_id} to delete its session: {e}"),
            }
        }
    };
    tokio::time::timeout(WAIT, connected).await.expect("connecting in time to delete a session");
    client.disconnect().await.expect("disconnecting");
    let _ = tokio::time::timeout(WAIT, async {
        while !matches!(eventloop.poll().await, Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_)) {
        }
    })
    .await;
}

/// A native MQTT 5 client and the publishes / acks it sees.
pub struct Native {
    pub client: AsyncClient,
    pub events: mpsc::UnboundedReceiver<Packet>,
}

impl Native {
    /// Connects a clean-session client that acks automatically.
    pub async fn connect() -> Native {
        let (host, port) = broker_address();
        let mut options = MqttOptions::new(
            format!("native-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
            host,
            port,
        );
        options.set_max_packet_size(Some(16 << 20));
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let (tx, mut events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(packet)) => {
                        if tx.send(packet).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Outgoing(_)) => {}
                    Err(e) => panic!("native client: {e}"),
                }
            }
        });
        let connack =
            next_packet(&mut events, "the native client's CONNACK", |p| matches!(p, Packet::ConnAck(_)))
                .await;
        drop(connack);
        Native { client, events }
    }

    /// Subscribes to `filter` at QoS 1 and waits for the SUBACK.
    pub async fn subscribe(&mut self, filter: &str) {
        self.client.subscribe(filter, QoS::AtLeastOnce).await.expect("sending SUBSCRIBE");
        next_packet(&mut self.events, "the SUBACK", |p| matches!(p, Packet::SubAck(_))).await;
    }

    /// The next publish received.
    pub async fn publish_received(&mut self) -> Publish {
        match next_packet(&mut self.events, "a publish", |p| matches!(p, Packet::Publish(_))).await {
            Packet::Publish(p) => p,
            _ => unreachable!("filtered to publishes"),
        }
    }
}

/// The next packet matching `wanted`, failing after [`WAIT`].
pub async fn next_packet(
    events: &mut mpsc::UnboundedReceiver<Packet>,
    what: &str,
    wanted: impl Fn(&Packet) -> bool,
) -> Packet {
    let found = async {
        loop {
            match events.recv().await {
                Some(p) if wanted(&p) => return p,
                Some(_) => {}
                None => panic!("the native client stopped while waiting for {what}"),
            }
        }
    };
    tokio::time::timeout(WAIT, found).await.unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// The value of user property `name`.
pub fn user_property<'a>(publish: &'a Publish, name: &str) -> Option<&'a str> {
    publish.properties.as_ref()?.user_properties.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}
