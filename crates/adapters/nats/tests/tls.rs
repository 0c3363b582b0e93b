//! NATS JetStream over TLS with a private CA and a user/password: a round trip, a server name,
//! the wrong CA refused, a wrong password refused without showing it.
//!
//! Needs the TLS NATS server of `scripts/services tls` (its env file gives the port, user and
//! CA).

use polybus::FailureKind;
use polybus_conformance::tls::{TlsServers, refused, round_trip, unique};
use polybus_nats::names::TopicNames;
use polybus_nats::{BROKER_TYPE, NatsConnector};
use serde_json::{Value, json};

/// The TLS NATS server's config with user, password and `tls`; at most one connect attempt.
fn config(servers: &TlsServers, tls: Value) -> Value {
    json!({
        "servers": servers.get("POLYBUS_TLS_NATS_URL"),
        "user": servers.get("POLYBUS_TLS_NATS_USER"),
        "pass": servers.get("POLYBUS_TLS_NATS_PASSWORD"),
        "maxReconnectAttempts": 1,
        "tls": tls,
    })
}

/// Deletes the streams a round trip made (and its consumers with them).
async fn delete_streams(servers: &TlsServers, native: &str) {
    let client = async_nats::ConnectOptions::new()
        .user_and_password(servers.get("POLYBUS_TLS_NATS_USER"), servers.get("POLYBUS_TLS_NATS_PASSWORD"))
        .add_root_certificates(servers.get("POLYBUS_TLS_CA").into())
        .require_tls(true)
        .connect(servers.get("POLYBUS_TLS_NATS_URL"))
        .await
        .expect("a cleanup connection");
    let js = async_nats::jetstream::new(client);
    let names = TopicNames::of(native);
    for stream in [names.stream, names.delayed_stream] {
        // The delayed stream exists only once a delayed message was published.
        let _ = js.delete_stream(&stream).await;
    }
}

#[tokio::test]
async fn a_round_trip_over_tls_with_the_private_ca() {
    let servers = TlsServers::load();
    let native = unique("nats");
    let config = config(&servers, json!({"caFile": servers.get("POLYBUS_TLS_CA")}));
    round_trip(&NatsConnector, BROKER_TYPE, config, &native, "g").await;
    delete_streams(&servers, &native).await;
}

#[tokio::test]
async fn a_server_name_and_a_client_certificate_are_used() {
    let servers = TlsServers::load();
    let native = unique("nats-name");
    let ca = std::fs::read_to_string(servers.get("POLYBUS_TLS_CA")).expect("the CA");
    let tls = json!({
        "ca": ca,
        "certFile": servers.get("POLYBUS_TLS_CLIENT_CERT"),
        "keyFile": servers.get("POLYBUS_TLS_CLIENT_KEY"),
        "serverName": "localhost",
    });
    round_trip(&NatsConnector, BROKER_TYPE, config(&servers, tls), &native, "g").await;
    delete_streams(&servers, &native).await;
}

#[tokio::test]
async fn a_server_name_the_certificate_does_not_hold_is_refused() {
    let servers = TlsServers::load();
    let tls = json!({"caFile": servers.get("POLYBUS_TLS_CA"), "serverName": "nats.example.com"});
    let error = refused(&NatsConnector, BROKER_TYPE, config(&servers, tls)).await;
    assert_eq!(error.code(), "CONNECT_FAILED", "{error}");
    let text = error.to_string();
    assert!(text.contains("not issued for the host connected to"), "{text}");
}

#[tokio::test]
async fn the_wrong_ca_is_refused_as_a_certificate_problem() {
    let servers = TlsServers::load();
    let config = config(&servers, json!({"caFile": servers.get("POLYBUS_TLS_WRONG_CA")}));
    let error = refused(&NatsConnector, BROKER_TYPE, config).await;
    assert_eq!(error.code(), "CONNECT_FAILED", "{error}");
    assert_eq!(error.failure_kind(), Some(FailureKind::Invalid), "{error}");
    let text = error.to_string();
    let port = servers.get("POLYBUS_TLS_NATS_PORT");
    assert!(text.contains(&format!("nats tls://127.0.0.1:{port}")), "{text}");
    assert!(text.contains("TLS handshake failed, a certificate problem"), "{text}");
    assert!(text.contains("not signed by a CA this env trusts"), "{text}");
}

#[tokio::test]
async fn a_wrong_password_is_refused_without_showing_it() {
    let servers = TlsServers::load();
    let mut config = config(&servers, json!({"caFile": servers.get("POLYBUS_TLS_CA")}));
    let wrong = format!("wrong-{}", uuid::Uuid::new_v4().simple());
    config["pass"] = json!(wrong);
    let error = refused(&NatsConnector, BROKER_TYPE, config).await;
    assert_eq!(error.code(), "CONNECT_FAILED", "{error}");
    assert_eq!(error.failure_kind(), Some(FailureKind::Auth), "{error}");
    let shown = format!("{error} {error:?}");
    assert!(shown.contains("nats tls://127.0.0.1:"), "{shown}");
    assert!(!shown.contains(&wrong), "{shown}");
    assert!(!shown.contains(&servers.get("POLYBUS_TLS_NATS_PASSWORD")), "{shown}");
}
