//! The shared behaviour suite against the RabbitMQ on `POLYBUS_TEST_RABBITMQ_URL` (default
//! the local guest account), on an exchange of its own. Queues and exchanges the run creates
//! are deleted at the end.
//!
//! The broker-restart cases run on a second RabbitMQ node of this binary's own, started when
//! they need it: its own node name, AMQP and distribution ports and data directory, loopback
//! only, no plugins (it serves ~4 s after it starts here). Its queues are durable quorum
//! queues and publishes wait for their confirm. The SIGKILL case waits [`CRASH_SETTLE`] after
//! declaring its queue before the crash: RabbitMQ 3.10 loses a quorum queue younger than ~3 s
//! (see [`CRASH_SETTLE_WHY`]).

mod common;

use std::collections::HashSet;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use polybus_conformance::Target;
use polybus_rabbitmq::{DELAY_EXCHANGE, RabbitmqConnector};

/// Seen here with RabbitMQ 3.10.8 (ra 2.2.0) on Erlang 25, with pika as well as polybus: a
/// quorum queue declared 0.3 or 1.5 s before a SIGKILL came back empty (100 confirmed messages
/// gone) or never elected a leader again ("leader not known", every publish unconfirmed); one
/// declared 3 or 4 s before kept every message. Ra's registry of its servers is a dets table,
/// whose writes dets holds in a cache for up to 3 s.
const CRASH_SETTLE_WHY: &str = "RabbitMQ 3.10 loses a quorum queue declared less than ~3 s before a SIGKILL \
     (ra's server registry is a dets file with a 3 s write cache): the queue comes back empty or without a leader";
/// How old the crash case's queue is before the crash.
const CRASH_SETTLE: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    if let Some(code) = polybus_conformance::member_process(&[Arc::new(RabbitmqConnector)]) {
        return code;
    }
    let exchange = common::unique("polybus.conformance");
    let before: HashSet<String> = common::list_queues().into_iter().collect();
    let target = Target::new(
        "rabbitmq",
        polybus_rabbitmq::BROKER_TYPE,
        serde_json::json!({ "url": common::url(), "exchange": exchange }),
    )
    .connector(Arc::new(RabbitmqConnector))
    .restart(|| Box::pin(common::close_all_connections()))
    .private(Arc::new(common::private_node("").crash_safe_after(CRASH_SETTLE, CRASH_SETTLE_WHY)));
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
