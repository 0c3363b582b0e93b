//! RabbitMQ over TLS with a private CA and a non-guest user: a round trip, a client
//! certificate with a server name, the wrong CA refused, a wrong password refused without
//! showing it.
//!
//! Needs the TLS RabbitMQ node of `scripts/services tls` (its env file gives the port, user and
//! CA).

use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::tcp::OwnedTLSConfig;
use lapin::{Connection, ConnectionProperties};
use polybus::{FailureKind, TopicSpec};
use polybus_conformance::tls::{TlsServers, refused, round_trip, unique};
use polybus_rabbitmq::{BROKER_TYPE, RabbitmqConnector, queue_name};
use serde_json::{Value, json};

/// The TLS node's config with its own exchange and `tls`.
fn config(servers: &TlsServers, exchange: &str, tls: Value) -> Value {
    json!({
        "host": servers.get("POLYBUS_TLS_HOST"),
        "port": servers.get("POLYBUS_TLS_RABBITMQ_PORT").parse::<u16>().expect("a port"),
        "username": servers.get("POLYBUS_TLS_RABBITMQ_USER"),
        "password": servers.get("POLYBUS_TLS_RABBITMQ_PASSWORD"),
        "exchange": exchange,
        "tls": tls,
    })
}

/// Deletes the group's queue and the exchange a round trip declared.
async fn delete(servers: &TlsServers, native: &str, group: &str, exchange: &str) {
    let ca = std::fs::read_to_string(servers.get("POLYBUS_TLS_CA")).expect("the CA");
    let tls = OwnedTLSConfig { identity: None, cert_chain: Some(ca) };
    let runtime = lapin::runtime::default_runtime().expect("a runtime");
    let conn = Connection::connect_with_config(
        &servers.get("POLYBUS_TLS_RABBITMQ_URL"),
        ConnectionProperties::default(),
        tls,
        runtime,
    )
    .await
    .expect("a cleanup connection");
    let channel = conn.create_channel().await.expect("a channel");
    channel
        .queue_delete(
            queue_name(&TopicSpec::named(native), group).as_str().into(),
            QueueDeleteOptions::default(),
        )
        .await
        .expect("delete the queue");
    channel
        .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
        .await
        .expect("delete the exchange");
    let _ = conn.close(200, "done".into()).await;
}

#[tokio::test]
async fn a_round_trip_over_tls_with_the_private_ca() {
    let servers = TlsServers::load();
    let (native, exchange) = (unique("rabbitmq"), unique("rabbitmq-x"));
    let config = config(&servers, &exchange, json!({"caFile": servers.get("POLYBUS_TLS_CA")}));
    round_trip(&RabbitmqConnector, BROKER_TYPE, config, &native, "g").await;
    delete(&servers, &native, "g", &exchange).await;
}

#[tokio::test]
async fn an_amqps_url_a_client_certificate_and_a_server_name_are_used() {
    let servers = TlsServers::load();
    let (native, exchange) = (unique("rabbitmq-url"), unique("rabbitmq-x"));
    let ca = std::fs::read_to_string(servers.get("POLYBUS_TLS_CA")).expect("the CA");
    let config = json!({
        "url": servers.get("POLYBUS_TLS_RABBITMQ_URL"),
        "exchange": exchange,
        "tls": {
            "ca": ca,
            "certFile": servers.get("POLYBUS_TLS_CLIENT_CERT"),
            "keyFile": servers.get("POLYBUS_TLS_CLIENT_KEY"),
            "serverName": "localhost",
        },
    });
    round_trip(&RabbitmqConnector, BROKER_TYPE, config, &native, "g").await;
    delete(&servers, &native, "g", &exchange).await;
}

#[tokio::test]
async fn insecure_skip_verify_accepts_a_certificate_of_another_ca() {
    let servers = TlsServers::load();
    let (native, exchange) = (unique("rabbitmq-insecure"), unique("rabbitmq-x"));
    let tls = json!({"caFile": servers.get("POLYBUS_TLS_WRONG_CA"), "insecureSkipVerify": true});
    round_trip(&RabbitmqConnector, BROKER_TYPE, config(&servers, &exchange, tls), &native, "g").await;
    delete(&servers, &native, "g", &exchange).await;
}

#[tokio::test]
async fn the_wrong_ca_is_refused_as_a_certificate_problem() {
    let servers = TlsServers::load();
    let tls = json!({"caFile": servers.get("POLYBUS_TLS_WRONG_CA")});
    let error = refused(&RabbitmqConnector, BROKER_TYPE, config(&servers, "unused", tls)).await;
    assert_eq!(error.code(), "CONNECT_FAILED", "{error}");
    assert_eq!(error.failure_kind(), Some(FailureKind::Invalid), "{error}");
    let text = error.to_string();
    let port = servers.get("POLYBUS_TLS_RABBITMQ_PORT");
    assert!(text.contains(&format!("rabbitmq amqps://127.0.0.1:{port}")), "{text}");
    assert!(text.contains("TLS handshake failed, a certificate problem"), "{text}");
    assert!(text.contains("not signed by a CA this env trusts"), "{text}");
}

#[tokio::test]
async fn a_server_name_the_certificate_does_not_hold_is_refused() {
    let servers = TlsServers::load();
    let tls = json!({"caFile": servers.get("POLYBUS_TLS_CA"), "serverName": "rabbit.example.com"});
    let error = refused(&RabbitmqConnector, BROKER_TYPE, config(&servers, "unused", tls)).await;
    assert_eq!(error.code(), "CONNECT_FAILED", "{error}");
    assert!(error.to_string().contains("not issued for the host connected to"), "{error}");
}

#[tokio::test]
async fn a_wrong_password_is_refused_without_showing_it() {
    let servers = TlsServers::load();
    let mut config = config(&servers, "unused", json!({"caFile": servers.get("POLYBUS_TLS_CA")}));
    let wrong = format!("wrong-{}", uuid::Uuid::new_v4().simple());
    config["password"] = json!(wrong);
    let error = refused(&RabbitmqConnector, BROKER_TYPE, config).await;
    assert_eq!(error.code(), "CONNECT_FAILED", "{error}");
    assert_eq!(error.failure_kind(), Some(FailureKind::Auth), "{error}");
    let shown = format!("{error} {error:?}");
    assert!(shown.contains("rabbitmq amqps://127.0.0.1:"), "{shown}");
    assert!(!shown.contains(&wrong), "{shown}");
    assert!(!shown.contains(&servers.get("POLYBUS_TLS_RABBITMQ_PASSWORD")), "{shown}");
}
