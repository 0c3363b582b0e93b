//! The shared behaviour suite against the RabbitMQ on `POLYBUS_TEST_RABBITMQ_URL` (default
//! the local guest account), on an exchange of its own. Queues and exchanges the run creates
//! are deleted at the end.

mod common;

use std::collections::HashSet;
use std::process::ExitCode;
use std::sync::Arc;

use polybus::BrokerType;
use polybus_conformance::Target;
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
    .restart(|| Box::pin(common::close_all_connections()));
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
