//! The shared behaviour suite against the RabbitMQ on `POLYBUS_TEST_RABBITMQ_URL` (default
//! the local guest account), on an exchange of its own. Queues and exchanges the run creates
//! are deleted at the end.
//!
//! The broker-restart cases run on a second RabbitMQ node of this binary's own, started when
//! they need it: its own node name, AMQP and distribution ports and data directory, loopback
//! only, no plugins (it serves ~4 s after it starts here). Its queues are durable quorum
//! queues and publishes wait for their confirm. The SIGKILL case is skipped: RabbitMQ 3.10
//! does not bring back a quorum queue declared seconds before the crash (see
//! [`NOT_CRASH_SAFE`]).

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use polybus::BrokerType;
use polybus_conformance::private::{Launch, find_program};
use polybus_conformance::{PrivateBroker, Target};
use polybus_rabbitmq::{DELAY_EXCHANGE, RabbitmqConnector};

fn main() -> ExitCode {
    if let Some(code) = polybus_conformance::member_process(&[Arc::new(RabbitmqConnector)]) {
        return code;
    }
    let exchange = common::unique("polybus.conformance");
    let before: HashSet<String> = common::list_queues().into_iter().collect();
    let target = Target::new(
        "rabbitmq",
        BrokerType::Rabbitmq,
        serde_json::json!({ "url": common::url(), "exchange": exchange }),
    )
    .connector(Arc::new(RabbitmqConnector))
    .restart(|| Box::pin(common::close_all_connections()))
    .private(Arc::new(private_node()));
    let code = polybus_conformance::run(target);

    // The suite's topics are `t-<id>`; its groups' queues `t-<id>…--g-<id>-<label>`; and the
    // delay queues this run needed (all unused by anyone else when they did not exist before).
    let created: Vec<String> = common::list_queues()
        .into_iter()
        .filter(|q| !before.contains(q))
        .filter(|q| (q.starts_with("t-") && q.contains("--g-")) || q.starts_with("polybus.delay."))
        .collect();
    let runtime = tokio::runtime::Runtime::new().expect("a runtime for clean-up");
    // The delay exchange too: were anyone else using it, their next delayed publish declares it again.
    runtime.block_on(common::delete(&created, &[exchange, DELAY_EXCHANGE.to_owned()]));
    code
}

/// Seen here with RabbitMQ 3.10.8 on Erlang 25: after a SIGKILL a few seconds after the case's
/// queue was declared, the restarted node registered the queue's Raft server anew, answered
/// every command for it with "leader not known" for over a minute, and publishes routed to it
/// got no confirm (the adapter retries each for 30 s). A queue's Raft registry is a dets file
/// saved every few minutes, so only a queue that old survives a crash.
const NOT_CRASH_SAFE: &str = "RabbitMQ 3.10 does not bring back a quorum queue declared seconds before a SIGKILL \
     (its Raft server registry is saved every few minutes): the restarted node answers 'leader not known' \
     and confirms nothing for it";

/// A RabbitMQ node of this binary's own, beside the shared one.
fn private_node() -> PrivateBroker {
    PrivateBroker::new("RabbitMQ node", |dir, port| {
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
        write("rabbitmq.conf", format!("listeners.tcp.default = 127.0.0.1:{port}\n"))?;
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
    .not_crash_safe(NOT_CRASH_SAFE)
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
