//! Redis over TLS with a private CA and an ACL user: a round trip, a client certificate, the
//! wrong CA refused, a wrong password refused without showing it.
//!
//! Needs the TLS Redis of `scripts/services tls` (its env file gives the port, user and CA).

use polybus::FailureKind;
use polybus_conformance::tls::{TlsServers, refused, round_trip, unique};
use polybus_redis::{BROKER_TYPE, RedisConnector};
use serde_json::{Value, json};

/// The TLS Redis's host/port/user/password config, with `tls`.
fn config(servers: &TlsServers, tls: Value) -> Value {
    json!({
        "host": servers.get("POLYBUS_TLS_HOST"),
        "port": servers.get("POLYBUS_TLS_REDIS_PORT").parse::<u16>().expect("a port"),
        "username": servers.get("POLYBUS_TLS_REDIS_USER"),
        "password": servers.get("POLYBUS_TLS_REDIS_PASSWORD"),
        "tls": tls,
    })
}

/// Deletes the stream a round trip made (and its group with it).
async fn delete_stream(servers: &TlsServers, stream: &str) {
    let url = servers.get("POLYBUS_TLS_REDIS_URL");
    let ca = std::fs::read(servers.get("POLYBUS_TLS_CA")).expect("the CA");
    let certificates = redis::TlsCertificates { client_tls: None, root_cert: Some(ca) };
    let client = redis::Client::build_with_tls(url.as_str(), certificates).expect("a client");
    let mut conn = client.get_multiplexed_async_connection().await.expect("a connection");
    let _: () = redis::cmd("DEL").arg(stream).query_async(&mut conn).await.expect("DEL");
}

#[tokio::test]
async fn a_round_trip_over_tls_with_the_private_ca() {
    let servers = TlsServers::load();
    let stream = unique("redis");
    let config = config(&servers, json!({"caFile": servers.get("POLYBUS_TLS_CA")}));
    round_trip(&RedisConnector, BROKER_TYPE, config, &stream, "g").await;
    delete_stream(&servers, &stream).await;
}

#[tokio::test]
async fn a_client_certificate_is_accepted() {
    let servers = TlsServers::load();
    let stream = unique("redis-mtls");
    let tls = json!({
        "caFile": servers.get("POLYBUS_TLS_CA"),
        "certFile": servers.get("POLYBUS_TLS_CLIENT_CERT"),
        "keyFile": servers.get("POLYBUS_TLS_CLIENT_KEY"),
    });
    round_trip(&RedisConnector, BROKER_TYPE, config(&servers, tls), &stream, "g").await;
    delete_stream(&servers, &stream).await;
}

#[tokio::test]
async fn a_rediss_url_and_an_inline_ca_work_too() {
    let servers = TlsServers::load();
    let stream = unique("redis-url");
    let ca = std::fs::read_to_string(servers.get("POLYBUS_TLS_CA")).expect("the CA");
    let config = json!({"url": servers.get("POLYBUS_TLS_REDIS_URL"), "tls": {"ca": ca}});
    round_trip(&RedisConnector, BROKER_TYPE, config, &stream, "g").await;
    delete_stream(&servers, &stream).await;
}

#[tokio::test]
async fn insecure_skip_verify_accepts_a_certificate_of_another_ca() {
    let servers = TlsServers::load();
    let stream = unique("redis-insecure");
    let tls = json!({"caFile": servers.get("POLYBUS_TLS_WRONG_CA"), "insecureSkipVerify": true});
    round_trip(&RedisConnector, BROKER_TYPE, config(&servers, tls), &stream, "g").await;
    delete_stream(&servers, &stream).await;
}

#[tokio::test]
async fn the_wrong_ca_is_refused_as_a_certificate_problem() {
    let servers = TlsServers::load();
    let config = config(&servers, json!({"caFile": servers.get("POLYBUS_TLS_WRONG_CA")}));
    let error = refused(&RedisConnector, BROKER_TYPE, config).await;
    assert_eq!(error.code(), "CONNECT_FAILED", "{error}");
    assert_eq!(error.failure_kind(), Some(FailureKind::Invalid), "{error}");
    let text = error.to_string();
    let port = servers.get("POLYBUS_TLS_REDIS_PORT");
    assert!(text.contains(&format!("redis 127.0.0.1:{port}")), "{text}");
    assert!(text.contains("TLS handshake failed, a certificate problem"), "{text}");
    assert!(text.contains("not signed by a CA this env trusts"), "{text}");
}

#[tokio::test]
async fn a_wrong_password_is_refused_without_showing_it() {
    let servers = TlsServers::load();
    let mut config = config(&servers, json!({"caFile": servers.get("POLYBUS_TLS_CA")}));
    let wrong = format!("wrong-{}", uuid::Uuid::new_v4().simple());
    config["password"] = json!(wrong);
    let error = refused(&RedisConnector, BROKER_TYPE, config).await;
    assert_eq!(error.code(), "CONNECT_FAILED", "{error}");
    assert_eq!(error.failure_kind(), Some(FailureKind::Auth), "{error}");
    let shown = format!("{error} {error:?}");
    assert!(shown.contains("redis 127.0.0.1:"), "{shown}");
    assert!(!shown.contains(&wrong), "{shown}");
    assert!(!shown.contains(&servers.get("POLYBUS_TLS_REDIS_PASSWORD")), "{shown}");
}
