//! Turns the cases into libtest trials: probes the adapter's capabilities once, marks the cases
//! it does not declare as ignored (with the reason, printed), and runs each case in a runtime
//! and registry of its own.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use libtest_mimic::{Arguments, Completion, Failed, Trial};
use polybus::{Capabilities, Support};

use crate::cases::{CASES, Case};
use crate::fixture::{Ctx, OrFail, within};
use crate::{ProcessFaults, Target, process};

/// How long connecting and reading the capabilities may take.
const PROBE_LIMIT: Duration = Duration::from_secs(30);
/// 1 MiB of payload plus room for headers.
const LARGE_MESSAGE: usize = (1 << 20) + 4096;

/// What a case needs the adapter (or the target) to declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Need {
    /// Unacked messages come back.
    AtLeastOnce,
    /// Deliveries carry an accurate attempt number.
    CountsAttempts,
    /// Every group gets every message.
    FanOut,
    /// Nack with a redelivery delay.
    NackDelay,
    /// Publish with a delay.
    DelayedDelivery,
    /// Per-key publish order within a group.
    OrderingPerKey,
    /// Payloads of 1 MiB.
    LargeMessages,
    /// The target can restart its broker.
    Restart,
    /// The target has a private broker the case may stop and start; the case runs on it.
    PrivateBroker,
    /// The private broker keeps what it acknowledged through a SIGKILL.
    CrashSafe,
    /// Runs with no other case at once (a load that would starve them, or be starved).
    Alone,
    /// Member processes may be killed: the target does not declare these cases skipped.
    ProcessFaults,
}

impl Need {
    /// Why the case cannot run, or `None` when it can.
    fn unmet(self, caps: &Capabilities, target: &Target) -> Option<String> {
        let undeclared = |what: &str| Some(format!("adapter does not declare {what}"));
        let unsupported = |support: Support, what: &str| {
            (support == Support::Unsupported).then(|| format!("adapter declares {what} unsupported"))
        };
        match self {
            Need::AtLeastOnce if !caps.at_least_once => undeclared("at_least_once"),
            Need::CountsAttempts if !caps.counts_attempts => undeclared("counts_attempts"),
            Need::OrderingPerKey if !caps.ordering_per_key => undeclared("ordering_per_key"),
            Need::FanOut => unsupported(caps.fan_out, "fan_out"),
            Need::NackDelay => unsupported(caps.nack_delay, "nack_delay"),
            Need::DelayedDelivery => unsupported(caps.delayed_delivery, "delayed_delivery"),
            Need::LargeMessages => caps
                .max_payload_bytes
                .filter(|max| *max < LARGE_MESSAGE)
                .map(|max| format!("adapter accepts payloads of at most {max} bytes")),
            Need::Restart if target.restart.is_none() => Some("no restart hook for this target".into()),
            Need::PrivateBroker => target.private.as_ref().err().cloned(),
            Need::CrashSafe => target.private.as_ref().ok().and_then(|b| b.crash_safety()).map(str::to_owned),
            Need::ProcessFaults => match &target.process_faults {
                ProcessFaults::Skip(reason) => Some(reason.clone()),
                ProcessFaults::Run | ProcessFaults::Only => None,
            },
            _ => None,
        }
    }
}

/// Runs the behaviour suite against `target` with libtest's command line and output
/// (filters, `--skip`, `--exact`, `--list`); returns the exit code for `main`. In a member
/// process a process-fault case started, runs that member instead (see [`member_process`]).
pub fn run(target: Target) -> ExitCode {
    run_all(vec![target])
}

/// [`run`] for several targets in turn (e.g. one broker for most cases and another for the
/// process faults); fails when any run fails.
pub fn run_all(targets: Vec<Target>) -> ExitCode {
    if let Some(target) = targets.first()
        && let Some(code) = process::member_process(&target.connectors)
    {
        return code;
    }
    // `RUST_LOG=polybus_kafka=debug` (say) shows what the adapters log while the cases run;
    // polybus's spans are kept in memory for the trace cases.
    crate::telemetry::install();
    let args = Arguments::from_args();
    // Every target runs, whatever the ones before it did.
    let failed: Vec<bool> = targets.into_iter().map(|target| run_one(&args, target)).collect();
    if failed.contains(&true) { ExitCode::from(101) } else { ExitCode::SUCCESS }
}

/// When this process is a group member that a process-fault case started (by running its test
/// binary again), runs it until it is killed and returns its exit code; `None` otherwise.
/// Call it first in `main`, before starting anything a run of the suite needs.
pub fn member_process(connectors: &[Arc<dyn polybus::Connector>]) -> Option<ExitCode> {
    process::member_process(connectors)
}

/// Runs the cases `target` takes; returns whether any failed.
fn run_one(args: &Arguments, target: Target) -> bool {
    crate::reliability::set_broker(&target.name);
    let target = Arc::new(target);
    let cases: Vec<&'static Case> = CASES
        .iter()
        .filter(|case| {
            target.process_faults != ProcessFaults::Only || case.needs.contains(&Need::ProcessFaults)
        })
        .collect();
    let wanted = |case: &Case| !args.is_filtered_out(&named(case));
    // Listing, or running nothing, needs only the names: no broker.
    if args.list || !cases.iter().any(|case| wanted(case)) {
        return libtest_mimic::run(args, cases.into_iter().map(named).collect()).has_failed();
    }
    let trials = match probe(&target) {
        Ok(caps) => {
            let plan: Vec<_> =
                cases.into_iter().map(|case| (case, skip_reason(case, &caps, &target))).collect();
            print_plan(&target.name, &caps, &plan, wanted);
            plan.into_iter().map(|(case, skip)| trial(case, skip, target.clone(), caps.clone())).collect()
        }
        Err(e) => {
            let message = format!("conformance[{}]: cannot set up or reach the broker: {e}", target.name);
            eprintln!("{message}");
            cases.into_iter().map(|case| failing(case, message.clone())).collect()
        }
    };
    libtest_mimic::run(args, trials).has_failed()
}

/// A trial that only carries the case's name, for listing and filtering.
fn named(case: &Case) -> Trial {
    Trial::test(case.name, || Ok(()))
}

fn skip_reason(case: &Case, caps: &Capabilities, target: &Target) -> Option<String> {
    if let Some((_, defect)) = target.known_defects.iter().find(|(name, _)| *name == case.name) {
        return Some(format!("known defect of this adapter: {defect}"));
    }
    case.needs.iter().find_map(|need| need.unmet(caps, target))
}

fn failing(case: &Case, message: String) -> Trial {
    Trial::test(case.name, move || Err(Failed::from(message)))
}

fn trial(case: &'static Case, skip: Option<String>, target: Arc<Target>, caps: Capabilities) -> Trial {
    match skip {
        // Ignored at run time, so the reason shows on the trial's own line.
        Some(reason) => Trial::ignorable_test(case.name, move || {
            crate::reliability::report_skip(case.name, &reason);
            Ok(Completion::ignored_with(reason))
        }),
        None => Trial::test(case.name, move || run_case(case, &target, caps)),
    }
}

/// Connects once, in a runtime of its own, to read what the adapter declares.
fn probe(target: &Target) -> Result<Capabilities, String> {
    let runtime = runtime().map_err(|e| format!("starting a runtime: {e}"))?;
    let result = runtime.block_on(async {
        let attempt = async {
            let ctx = Ctx::new(target, None).await?;
            let caps = ctx.probe().await;
            let _ = ctx.bus.close().await;
            caps
        };
        match tokio::time::timeout(PROBE_LIMIT, attempt).await {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {PROBE_LIMIT:?}")),
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(2));
    result
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()
}

fn print_plan(
    name: &str,
    caps: &Capabilities,
    plan: &[(&Case, Option<String>)],
    wanted: impl Fn(&Case) -> bool,
) {
    let support = |s: Support| format!("{s:?}").to_lowercase();
    eprintln!(
        "conformance[{name}]: capabilities: at_least_once={} ordering_per_key={} delayed_delivery={} \
         nack_delay={} fan_out={} replay={} counts_attempts={} max_payload_bytes={}",
        caps.at_least_once,
        caps.ordering_per_key,
        support(caps.delayed_delivery),
        support(caps.nack_delay),
        support(caps.fan_out),
        caps.replay,
        caps.counts_attempts,
        caps.max_payload_bytes.map_or("none".into(), |n| n.to_string()),
    );
    if !caps.counts_attempts {
        eprintln!(
            "conformance[{name}]: note: attempt numbers are not checked: adapter does not declare counts_attempts"
        );
    }
    let selected: Vec<_> = plan.iter().filter(|(case, _)| wanted(case)).collect();
    let skipped = selected.iter().filter(|(_, skip)| skip.is_some()).count();
    eprintln!("conformance[{name}]: {:>5} {:>4} {:>8}", "cases", "run", "skipped");
    eprintln!("conformance[{name}]: {:>5} {:>4} {:>8}", selected.len(), selected.len() - skipped, skipped);
    for (case, skip) in selected {
        if let Some(reason) = skip {
            eprintln!("conformance[{name}]: skip {}: {reason}", case.name);
        }
    }
}

/// Cases share the broker; a case that restarts a broker runs alone (write), the others
/// together (read).
static BROKER: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// Runs one case in its own runtime, with its own registry and topic; a panic is the failure.
fn run_case(case: &'static Case, target: &Target, caps: Capabilities) -> Result<(), Failed> {
    let restarts =
        case.needs.iter().any(|need| matches!(need, Need::Restart | Need::PrivateBroker | Need::Alone));
    let (_shared, _alone) = if restarts {
        (None, Some(BROKER.write().unwrap_or_else(|poisoned| poisoned.into_inner())))
    } else {
        (Some(BROKER.read().unwrap_or_else(|poisoned| poisoned.into_inner())), None)
    };
    let on_private;
    let target = if case.needs.contains(&Need::PrivateBroker) {
        let broker = target.private.as_ref().map_err(|reason| Failed::from(reason.clone()))?;
        let config =
            broker.config().map_err(|e| Failed::from(format!("starting the private broker: {e}")))?;
        on_private = Target { config, ..target.clone() };
        &on_private
    } else {
        target
    };
    let runtime = runtime().map_err(|e| Failed::from(format!("starting a runtime: {e}")))?;
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        runtime.block_on(within(case.limit, format_args!("case {} to finish", case.name), async {
            let ctx =
                Ctx::new(target, case.max_attempts).await.or_fail("setting up the case's registry and topic");
            (case.run)(ctx.clone(), caps).await;
            within(Duration::from_secs(10), "closing the bus", ctx.bus.close())
                .await
                .or_fail("closing the bus");
        }))
    }));
    // Blocking work left behind by a failed case must not hold the whole run.
    runtime.shutdown_timeout(Duration::from_secs(2));
    outcome.map_err(|panic| Failed::from(panic_message(panic.as_ref())))
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "the case panicked".to_owned()
    }
}
