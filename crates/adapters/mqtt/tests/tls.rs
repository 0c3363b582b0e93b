//! MQTT over TLS with a private CA: a round trip with a password, one with a client
//! certificate as the identity, the wrong CA and a missing client certificate refused as
//! certificate problems, a wrong password refused without showing it.
//!
//! Needs the TLS Mosquitto of `scripts/services tls` (its env file gives the ports, user and
//! CA; the second port requires a client certificate).

use polybus::FailureKind;
use polybus_conformance::tls::{TlsServers, refused, round_trip, unique};
use polybus_mqtt::{BROKER_TYPE, MqttConnector};
use serde_json::{Value, json};

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

#[tokio::test]
async fn a_round_trip_over_tls_with_the_private_ca() {
    let servers = TlsServers::load();
    let config = config(&servers, json!({"caFile": servers.get("POLYBUS_TLS_CA")}));
    round_trip(&MqttConnector, BROKER_TYPE, config, &unique("mqtt"), "g").await;
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
    round_trip(&MqttConnector, BROKER_TYPE, mtls_config(&servers, tls), &unique("mqtt-mtls"), "g").await;
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
