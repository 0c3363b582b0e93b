//! For the adapters' error tests: a port nothing listens on, and the error a connect returns.

use polybus::core::ConnectTarget;
use polybus::{BrokerType, Connector, Error};

/// A loopback port nothing listens on (bound, then released).
pub fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("its address").port()
}

/// The env `dev` of broker `errors`, of `broker_type` with `config`.
pub fn target(broker_type: BrokerType, config: serde_json::Value) -> ConnectTarget {
    ConnectTarget { broker: "errors".into(), env: "dev".into(), broker_type, config }
}

/// The error `connector` returns when connecting to a `broker_type` env with `config`.
///
/// # Panics
/// When it connects.
pub async fn connect_error(
    connector: &dyn Connector,
    broker_type: BrokerType,
    config: serde_json::Value,
) -> Error {
    let target = target(broker_type, config);
    match connector.connect(&target).await {
        Ok(_) => panic!("connecting to {target:?} succeeded"),
        Err(e) => e,
    }
}
