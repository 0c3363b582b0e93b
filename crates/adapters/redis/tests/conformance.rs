//! The shared behaviour suite against the Redis on `POLYBUS_TEST_REDIS_URL`
//! (default `redis://127.0.0.1:6379`).
//!
//! The broker-restart cases run on a private `redis-server` this binary starts on a free port
//! when they need it, with `appendonly yes` and `appendfsync always` (every acknowledged write
//! is on disk, so a SIGKILL loses nothing either).

use std::process::ExitCode;
use std::sync::Arc;

use polybus_conformance::private::{Launch, find_program};
use polybus_conformance::{PrivateBroker, Target};
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
    let target = Target::new("redis", polybus_redis::BROKER_TYPE, serde_json::json!({ "url": url }))
        .connector(Arc::new(RedisConnector))
        .restart(move || Box::pin(kill_client_connections(url.clone())))
        .private(Arc::new(private_redis()));
    polybus_conformance::run(target)
}

/// A redis-server of this binary's own that writes every command to its append-only file
/// before answering.
fn private_redis() -> PrivateBroker {
    PrivateBroker::new("redis-server (appendonly, appendfsync always)", |dir, port| {
        let program = find_program("redis-server").ok_or("no redis-server binary (Debian: redis-server)")?;
        let (port, dir) = (port.to_string(), dir.display().to_string());
        let args = [
            "--bind",
            "127.0.0.1",
            "--port",
            &port,
            "--dir",
            &dir,
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
            "--daemonize",
            "no",
        ];
        Ok(Launch::new(program, &args, serde_json::json!({ "url": format!("redis://127.0.0.1:{port}") })))
    })
}
