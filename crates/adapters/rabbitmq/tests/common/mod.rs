//! What the RabbitMQ test binaries share: where the broker is, a polybus bus on it, a plain
//! `lapin` connection, the stand-in for a broker restart, and clean-up.
//!
//! Each binary uses a part of it.
#![allow(dead_code)]

use std::future::Future;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Channel, Connection, ConnectionProperties};
use polybus::{Broker, Bus, Registry, SqliteStore, Topic};
use polybus_conformance::PrivateBroker;
use polybus_conformance::private::{Launch, find_program};
use polybus_rabbitmq::RabbitmqConnector;
use serde_json::json;

/// The env every test uses.
pub const ENV: &str = "test";

/// The RabbitMQ to test against: `POLYBUS_TEST_RABBITMQ_URL`, default the local guest account.
pub fn url() -> String {
    std::env::var("POLYBUS_TEST_RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// A name no other test run uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// A bus over a registry in `dir` with broker `tag` (exchange `exchange`) and topic `tag:topic`.
pub async fn bus(dir: &Path, tag: &str, exchange: &str, topic: &str) -> Bus {
    let store = SqliteStore::open(dir.join("registry.db")).await.expect("opening the registry");
    let registry = Registry::new(Arc::new(store));
    let broker = Broker::from_value(json!({
        "name": "RabbitMQ tests",
        "tag": tag,
        "envs": [{"slug": ENV, "type": "rabbitmq", "config": {"url": url(), "exchange": exchange}}],
    }))
    .expect("a valid broker");
    registry.create_broker(broker).await.expect("creating the broker");
    let topic = Topic::from_value(json!({"tag": format!("{tag}:{topic}")})).expect("a valid topic");
    registry.create_topic(topic).await.expect("creating the topic");
    Bus::builder(registry).connector(Arc::new(RabbitmqConnector)).build()
}

/// A plain AMQP channel, as any other RabbitMQ client would have.
pub async fn lapin_channel() -> (Connection, Channel) {
    let conn = Connection::connect(&url(), ConnectionProperties::default()).await.expect("lapin connect");
    let channel = conn.create_channel().await.expect("lapin channel");
    (conn, channel)
}

/// Deletes queues and exchanges a test created.
pub async fn delete(queues: &[String], exchanges: &[String]) {
    let (conn, channel) = lapin_channel().await;
    for queue in queues {
        if let Err(e) = channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await {
            eprintln!("clean-up: deleting queue {queue}: {e}");
        }
    }
    for exchange in exchanges {
        if let Err(e) =
            channel.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default()).await
        {
            eprintln!("clean-up: deleting exchange {exchange}: {e}");
        }
    }
    let _ = conn.close(200, "OK".into()).await;
}

/// Deletes the queues and exchanges it lists when dropped, also when a test fails.
#[derive(Default)]
pub struct Cleanup {
    /// Queues to delete.
    pub queues: Vec<String>,
    /// Exchanges to delete.
    pub exchanges: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (queues, exchanges) = (std::mem::take(&mut self.queues), std::mem::take(&mut self.exchanges));
        // A thread with a runtime of its own: this may run inside a runtime, or while unwinding.
        let deleting = std::thread::spawn(move || match tokio::runtime::Runtime::new() {
            Ok(runtime) => runtime.block_on(delete(&queues, &exchanges)),
            Err(e) => eprintln!("clean-up: no runtime: {e}"),
        });
        if deleting.join().is_err() {
            eprintln!("clean-up failed");
        }
    }
}

/// The names of the queues on the broker, from `rabbitmqctl`.
pub fn list_queues() -> Vec<String> {
    let output = std::process::Command::new("rabbitmqctl")
        .args(["list_queues", "--quiet", "--no-table-headers", "name"])
        .output()
        .expect("running rabbitmqctl list_queues");
    assert!(output.status.success(), "rabbitmqctl list_queues: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

/// Stands in for a broker restart: RabbitMQ closes every client connection, so every
/// connection of polybus breaks at once and must be re-established.
pub async fn close_all_connections() {
    let output = tokio::process::Command::new("rabbitmqctl")
        .args(["close_all_connections", "test"])
        .output()
        .await
        .expect("running rabbitmqctl close_all_connections");
    assert!(
        output.status.success(),
        "rabbitmqctl close_all_connections: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("closed every client connection: {}", String::from_utf8_lossy(&output.stdout).trim());
}

/// Awaits `fut`, failing when it takes longer than `limit`.
pub async fn within<F: Future>(limit: Duration, what: &str, fut: F) -> F::Output {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {limit:?} waiting for {what}"))
}

/// A RabbitMQ node of this test binary's own, beside the shared one: its own node name, AMQP
/// and distribution ports and data directory, loopback only, no plugins; `extra_conf` is added
/// to its `rabbitmq.conf`.
pub fn private_node(extra_conf: &'static str) -> PrivateBroker {
    PrivateBroker::new("RabbitMQ node", move |dir, port| {
        // The script itself: Debian's wrapper in /usr/sbin switches to the rabbitmq user and
        // its own data directory.
        let program = [Path::new("/usr/lib/rabbitmq/bin/rabbitmq-server")]
            .into_iter()
            .find(|p| p.is_file())
            .map(Path::to_path_buf)
            .or_else(|| find_program("rabbitmq-server"))
            .ok_or("no rabbitmq-server (Debian: rabbitmq-server)")?;
        let dist_port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("a free port for Erlang distribution: {e}"))?
            .port();
        let write = |name: &str, text: String| {
            std::fs::write(dir.join(name), text).map_err(|e| format!("writing {name}: {e}"))
        };
        write("rabbitmq.conf", format!("listeners.tcp.default = 127.0.0.1:{port}\n{extra_conf}"))?;
        write("enabled_plugins", "[].\n".to_owned())?;
        let path = |name: &str| dir.join(name).display().to_string();
        let launch = Launch::new(
            program,
            &[],
            serde_json::json!({
                "url": format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
                "exchange": "polybus.private",
            }),
        )
        // Not the machine's rabbitmq-env.conf: it names the shared node.
        .env("RABBITMQ_CONF_ENV_FILE", "/dev/null")
        .env("RABBITMQ_NODENAME", format!("polybus-{}-{port}@localhost", std::process::id()))
        .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
        .env("RABBITMQ_NODE_PORT", port.to_string())
        .env("RABBITMQ_DIST_PORT", dist_port.to_string())
        .env("RABBITMQ_MNESIA_BASE", path("mnesia"))
        .env("RABBITMQ_LOG_BASE", path("log"))
        .env("RABBITMQ_CONFIG_FILE", path("rabbitmq.conf"))
        .env("RABBITMQ_ENABLED_PLUGINS_FILE", path("enabled_plugins"))
        .env("RABBITMQ_PID_FILE", path("rabbitmq.pid"))
        .env("ERL_EPMD_ADDRESS", "127.0.0.1")
        .env("ERL_FLAGS", "-kernel inet_dist_use_interface {127,0,0,1}")
        // The Erlang cookie goes here, not into the shared node's home.
        .env("HOME", dir.display().to_string())
        .ready(speaks_amqp);
        Ok(launch)
    })
}

/// Whether the node answers an AMQP 0-9-1 protocol header with a method frame (Connection.Start).
fn speaks_amqp(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut frame_type = [0u8; 1];
    stream.write_all(b"AMQP\x00\x00\x09\x01").is_ok()
        && stream.read_exact(&mut frame_type).is_ok()
        && frame_type[0] == 1
}
