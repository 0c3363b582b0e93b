//! The shared behaviour suite against the Redis on `POLYBUS_TEST_REDIS_URL`
//! (default `redis://127.0.0.1:6379`).

use std::process::ExitCode;
use std::sync::Arc;

use polybus::BrokerType;
use polybus_conformance::Target;
use polybus_redis::RedisConnector;

fn redis_url() -> String {
    std::env::var("POLYBUS_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// Stands in for a broker restart: Redis drops every client connection (but its own), so
/// every connection of polybus breaks at once and must be re-established.
async fn kill_client_connections(url: String) {
    let client = redis::Client::open(url.as_str()).expect("a valid redis url");
    let mut conn = client.get_multiplexed_async_connection().await.expect("connecting to kill clients");
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .arg("SKIPME")
        .arg("yes")
        .query_async(&mut conn)
        .await
        .expect("CLIENT KILL");
    eprintln!("restart hook: killed {killed} client connections");
}

fn main() -> ExitCode {
    if let Some(code) = polybus_conformance::member_process(&[Arc::new(RedisConnector)]) {
        return code;
    }
    let url = redis_url();
    let target = Target::new("redis", BrokerType::Redis, serde_json::json!({ "url": url }))
        .connector(Arc::new(RedisConnector))
        .restart(move || Box::pin(kill_client_connections(url.clone())));
    polybus_conformance::run(target)
}
