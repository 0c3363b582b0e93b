//! MQTT over TLS with a private CA: a round trip with a password, one with a client
//! certificate as the identity, the wrong CA and a missing client certificate refused as
//! certificate problems, a wrong password refused without showing it.
//!
//! Needs the TLS Mosquitto of `scripts/services tls` (its env file gives the ports, user and
//! CA; the second port requires a client certificate).

use std::sync::Arc;
use std::time::Duration;

use polybus::FailureKind;
use polybus_conformance::tls::{TlsServers, refused, round_trip, unique};
use polybus_core::tls::TlsBlock;
use polybus_mqtt::{BROKER_TYPE, MqttConnector, orphan_topic};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use serde_json::{Value, json};

/// Longest wait for a packet of the cleanup client.
const WAIT: Duration = Duration::from_secs(10);

/// The TLS Mosquitto's password config, with `tls`.
fn config(servers: &TlsServers, tls: Value) -> Value {
    json!({
        "url": servers.get("POLYBUS_TLS_MQTT_URL"),
        "username": servers.get("POLYBUS_TLS_MQTT_USER"),
        "password": servers.get("POLYBUS_TLS_MQTT_PASSWORD"),
        "clientId": unique("mqtt"),
        "tls": tls,
    })
}

/// The listener that takes a client certificate (its common name is the user) instead of a
/// password.
fn mtls_config(servers: &TlsServers, tls: Value) -> Value {
    json!({
        "host": servers.get("POLYBUS_TLS_HOST"),
        "port": servers.get("POLYBUS_TLS_MQTT_MTLS_PORT").parse::<u16>().expect("a port"),
        "clientId": unique("mqtt-mtls"),
        "tls": tls,
    })
}

/// Which listener a cleanup client connects to: with the password, or the client certificate.
#[derive(Clone, Copy)]
enum Listener {
    Password,
    ClientCertificate,
}

/// Options of a plain client of `listener` with the private CA, starting a session that ends
/// with its connection.
fn native_options(servers: &TlsServers, listener: Listener, client_id: &str) -> MqttOptions {
    let host = servers.get("POLYBUS_TLS_HOST");
    let mut block = TlsBlock { ca_file: Some(servers.get("POLYBUS_TLS_CA")), ..Default::default() };
    let port = match listener {
        Listener::Password => servers.get("POLYBUS_TLS_MQTT_PORT"),
        Listener::ClientCertificate => {
            block.cert_file = Some(servers.get("POLYBUS_TLS_CLIENT_CERT"));
            block.key_file = Some(servers.get("POLYBUS_TLS_CLIENT_KEY"));
            servers.get("POLYBUS_TLS_MQTT_MTLS_PORT")
        }
    };
    let mut options = MqttOptions::new(client_id, host, port.parse::<u16>().expect("a port"));
    if let Listener::Password = listener {
        options
            .set_credentials(servers.get("POLYBUS_TLS_MQTT_USER"), servers.get("POLYBUS_TLS_MQTT_PASSWORD"));
    }
    let config = block.client_config().expect("a TLS config for the cleanup client");
    options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(Arc::new(config))));
    options
}

/// Polls `events` until `wanted` arrives.
async fn until(events: &mut EventLoop, what: &str, wanted: impl Fn(&Packet) -> bool) {
    let found = async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(packet)) if wanted(&packet) => return,
                Ok(_) => {}
                Err(e) => panic!("cleanup client, waiting for {what}: {e}"),
            }
        }
    };
    tokio::time::timeout(WAIT, found)
        .await
        .unwrap_or_else(|_| panic!("cleanup client: no {what} within {WAIT:?}"));
}

/// Deletes what a round trip's group left on the broker: the session its closed member keeps
/// (which never expires) and the retained record naming it.
async fn forget_group(servers: &TlsServers, listener: Listener, group: &str, topic: &str) {
    let (client, mut events) = AsyncClient::new(native_options(servers, listener, &unique("cleanup")), 16);
    let filter = format!("{}/+", orphan_topic(group, topic));
    client.subscribe(filter, QoS::AtLeastOnce).await.expect("sending SUBSCRIBE");
    until(&mut events, "SUBACK", |p| matches!(p, Packet::SubAck(_))).await;
    let mut records = Vec::new();
    // Retained records come right after the SUBACK.
    while let Ok(event) = tokio::time::timeout(Duration::from_millis(500), events.poll()).await {
        match event {
            Ok(Event::Incoming(Packet::Publish(p))) if !p.payload.is_empty() => records.push(p),
            Ok(_) => {}
            Err(e) => panic!("cleanup client: {e}"),
        }
    }
    assert!(!records.is_empty(), "the closed member left no record of its session under {topic}");
    for record in records {
        let session = String::from_utf8_lossy(&record.payload).into_owned();
        let (ender, mut ender_events) = AsyncClient::new(native_options(servers, listener, &session), 8);
        until(&mut ender_events, "CONNACK", |p| matches!(p, Packet::ConnAck(_))).await;
        ender.disconnect().await.expect("ending the session");
        let _ = tokio::time::timeout(WAIT, async { while ender_events.poll().await.is_ok() {} }).await;
        let topic = String::from_utf8_lossy(&record.topic).into_owned();
        client.publish(topic, QoS::AtLeastOnce, true, Vec::new()).await.expect("clearing the record");
        until(&mut events, "PUBACK", |p| matches!(p, Packet::PubAck(_))).await;
    }
    client.disconnect().await.expect("disconnecting the cleanup client");
}

#[tokio::test]
async fn a_round_trip_over_tls_with_the_private_ca() {
    let servers = TlsServers::load();
    let config = config(&servers, json!({"caFile": servers.get("POLYBUS_TLS_CA")}));
    let topic = unique("mqtt");
    round_trip(&MqttConnector, BROKER_TYPE, config, &topic, "g").await;
    forget_group(&servers, Listener::Password, "g", &topic).await;
}

#[tokio::test]
async fn a_client_certificate_is_the_identity_where_the_broker_requires_one() {
    let servers = TlsServers::load();
    let tls = json!({
        "caFile": servers.get("POLYBUS_TLS_CA"),
        "certFile": servers.get("POLYBUS_TLS_CLIENT_CERT"),
        "keyFile": servers.get("POLYBUS_TLS_CLIENT_KEY"),
        "serverName": "localhost",
    });
    let topic = unique("mqtt-mtls");
    round_trip(&MqttConnector, BROKER_TYPE, mtls_config(&servers, tls), &topic, "g").await;
    forget_group(&servers, Listener::ClientCertificate, "g", &topic).await;
}

#[tokio::test]
async fn without_the_client_certificate_the_handshake_is_refused() {
    let servers = TlsServers::load();
    let config = mtls_config(&servers, json!({"caFile": servers.get("POLYBUS_TLS_CA")}));
    let error = refused(&MqttConnector, BROKER_TYPE, config).await;
    assert_eq!(error.code(), "CONNECT_FAILED", "{error}");
    assert!(!error.is_retryable(), "{error}");
    let text = error.to_string();
    assert!(text.contains("TLS handshake failed, a certificate problem"), "{text}");
    assert!(text.contains("may require a client certificate"), "{text}");
}

#[tokio::test]
async fn the_wrong_ca_is_refused_as_a_certificate_problem() {
    let servers = TlsServers::load();
    let config = config(&servers, json!({"caFile": servers.get("POLYBUS_TLS_WRONG_CA")}));
    let error = refused(&MqttConnector, BROKER_TYPE, config).await;
    assert_eq!(error.code(), "CONNECT_FAILED", "{error}");
    assert_eq!(error.failure_kind(), Some(FailureKind::Invalid), "{error}");
    let text = error.to_string();
    let port = servers.get("POLYBUS_TLS_MQTT_PORT");
    assert!(text.contains(&format!("mqtt 127.0.0.1:{port}")), "{text}");
    assert!(text.contains("TLS handshake failed, a certificate problem"), "{text}");
    assert!(text.contains("not signed by a CA this env trusts"), "{text}");
}

#[tokio::test]
async fn a_wrong_password_is_refused_without_showing_it() {
    let servers = TlsServers::load();
    let mut config = config(&servers, json!({"caFile": servers.get("POLYBUS_TLS_CA")}));
    let wrong = format!("wrong-{}", uuid::Uuid::new_v4().simple());
    config["password"] = json!(wrong);
    let error = refused(&MqttConnector, BROKER_TYPE, config).await;
    assert_eq!(error.code(), "CONNECT_FAILED", "{error}");
    assert_eq!(error.failure_kind(), Some(FailureKind::Auth), "{error}");
    let shown = format!("{error} {error:?}");
    assert!(shown.contains("mqtt 127.0.0.1:"), "{shown}");
    assert!(!shown.contains(&wrong), "{shown}");
    assert!(!shown.contains(&servers.get("POLYBUS_TLS_MQTT_PASSWORD")), "{shown}");
}
