//! The polybus behaviour suite: one set of cases that proves the transport contract, run
//! against any broker by building a [`Target`] and handing it to [`run`] from a test binary
//! with `harness = false`.
//!
//! ```no_run
//! use polybus_conformance::Target;
//! fn main() -> std::process::ExitCode {
//!     let target = Target::new("embedded", polybus_embedded::BROKER_TYPE, serde_json::json!({"path": "/tmp/b.db"}));
//!     polybus_conformance::run(target)
//! }
//! ```
//!
//! Every case gets its own runtime, registry, topic and groups, so cases run in parallel and
//! never see each other's messages. A case whose capability the adapter does not declare is
//! reported as ignored with its reason, never as passed.

mod cases;
pub mod failures;
mod fixture;
mod groups;
mod harness;
mod idempotency;
mod load;
mod operations;
pub mod private;
mod process;
pub mod reliability;
mod replay;
mod restart;
mod telemetry;
pub mod tls;

use std::sync::Arc;

use futures::future::BoxFuture;
use polybus::{BrokerType, Connector};

pub use harness::{member_process, run, run_all};
pub use private::PrivateBroker;

/// Restarts the real broker behind a target and returns once it accepts connections again.
pub type RestartHook = Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;

/// A broker to run the suite against.
#[derive(Clone)]
pub struct Target {
    /// Short name shown in the output, e.g. `redis`.
    pub name: String,
    /// Broker type of the env the suite creates.
    pub broker_type: BrokerType,
    /// The env's config, as it would be stored in the registry.
    pub config: serde_json::Value,
    /// Connectors added to (or replacing those of) the default build.
    pub connectors: Vec<Arc<dyn Connector>>,
    /// Restarts the broker; `None` skips the reconnect case.
    pub restart: Option<RestartHook>,
    /// Whether the cases that kill member processes run against this target.
    pub process_faults: ProcessFaults,
    /// A broker instance of the suite's own that the restart cases stop and start, or why
    /// there is none (the reason those cases are skipped with).
    pub private: Result<Arc<PrivateBroker>, String>,
    /// Cases skipped on this target for a defect of its adapter, with the defect (printed).
    pub known_defects: Vec<(&'static str, String)>,
}

/// Which of the process-fault cases (a member process killed with SIGKILL, a whole group
/// replaced) a target takes. They run the test binary again as member processes, so its
/// `main` must call [`member_process`] first (or leave starting brokers to the suite).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ProcessFaults {
    /// With every other case.
    #[default]
    Run,
    /// Skipped, for the reason given (printed with the plan).
    Skip(String),
    /// Only these cases (another target takes the rest).
    Only,
}

impl Target {
    /// A target with no extra connectors and no restart hook.
    pub fn new(name: impl Into<String>, broker_type: BrokerType, config: serde_json::Value) -> Self {
        Target {
            name: name.into(),
            broker_type,
            config,
            connectors: Vec::new(),
            restart: None,
            process_faults: ProcessFaults::Run,
            private: Err("no private broker for this target".into()),
            known_defects: Vec::new(),
        }
    }

    /// Adds a connector (for an adapter that is not a feature of the `polybus` crate).
    pub fn connector(mut self, connector: Arc<dyn Connector>) -> Self {
        self.connectors.push(connector);
        self
    }

    /// Sets which process-fault cases run against this target.
    pub fn process_faults(mut self, process_faults: ProcessFaults) -> Self {
        self.process_faults = process_faults;
        self
    }

    /// Sets the hook that restarts the broker.
    pub fn restart<F>(mut self, hook: F) -> Self
    where
        F: Fn() -> BoxFuture<'static, ()> + Send + Sync + 'static,
    {
        self.restart = Some(Arc::new(hook));
        self
    }

    /// Sets the private broker the restart cases stop and start.
    pub fn private(mut self, broker: Arc<PrivateBroker>) -> Self {
        self.private = Ok(broker);
        self
    }

    /// Says why this target has no private broker (the restart cases are skipped with it).
    pub fn no_private(mut self, reason: impl Into<String>) -> Self {
        self.private = Err(reason.into());
        self
    }

    /// Skips `case` on this target, visibly, for a known defect of its adapter.
    pub fn known_defect(mut self, case: &'static str, defect: impl Into<String>) -> Self {
        self.known_defects.push((case, defect.into()));
        self
    }
}
