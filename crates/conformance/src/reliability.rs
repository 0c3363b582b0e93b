//! Figures of the fault cases for docs/RELIABILITY.md: each fault case reports what it sent,
//! what arrived and how long recovery took; with `POLYBUS_RELIABILITY_OUT` naming a file, each
//! report (and each skipped case, with its reason) is appended to it as one JSON line, which
//! `scripts/reliability` renders into the table.
//!
//! A line: `{"broker":..,"case":..,"fault":..,"sent":..,"delivered":..,"lost":..,
//! "duplicates":..,"recover_ms":..}` (`recover_ms` null where nothing had to recover), or
//! `{"broker":..,"case":..,"skipped":"reason"}`.

use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::json;

/// The environment variable naming the file the lines are appended to.
pub const OUT_ENV: &str = "POLYBUS_RELIABILITY_OUT";

/// The name of the target being run, set by the harness (a binary may run several targets in
/// turn): every line names its broker.
static BROKER: Mutex<String> = Mutex::new(String::new());

/// Records the name of the broker the cases about to run are run against.
pub(crate) fn set_broker(name: &str) {
    *BROKER.lock().unwrap_or_else(|e| e.into_inner()) = name.to_owned();
}

fn broker() -> String {
    let name = BROKER.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if name.is_empty() { "unknown".to_owned() } else { name }
}

/// What one fault case measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultFigures {
    /// The fault, as a column of the table: e.g. `broker restart`.
    pub fault: String,
    /// Messages whose publish returned Ok (each is owed a delivery).
    pub sent: u64,
    /// Of those, how many arrived at least once.
    pub delivered: u64,
    /// Of those, how many never arrived: `sent - delivered`.
    pub lost: u64,
    /// Deliveries beyond the first of a message.
    pub duplicates: u64,
    /// From the fault's end (the broker serving again, the new member started) until messages
    /// flowed again; `None` where nothing had to recover.
    pub recover: Option<Duration>,
}

/// Prints the figures of `case` and appends them as a JSON line to `$POLYBUS_RELIABILITY_OUT`.
pub fn report_fault(case: &str, figures: &FaultFigures) {
    let recover_ms = figures.recover.map(|d| d.as_millis() as u64);
    eprintln!(
        "reliability[{}] {case}: {}: sent {}, delivered {}, lost {}, duplicates {}, recovered in {}",
        broker(),
        figures.fault,
        figures.sent,
        figures.delivered,
        figures.lost,
        figures.duplicates,
        recover_ms.map_or("-".to_owned(), |ms| format!("{ms} ms")),
    );
    append(json!({
        "broker": broker(),
        "case": case,
        "fault": figures.fault,
        "sent": figures.sent,
        "delivered": figures.delivered,
        "lost": figures.lost,
        "duplicates": figures.duplicates,
        "recover_ms": recover_ms,
    }));
}

/// Appends a skipped case and its reason, so the table states what the broker cannot do.
pub(crate) fn report_skip(case: &str, reason: &str) {
    append(json!({"broker": broker(), "case": case, "skipped": reason}));
}

fn append(line: serde_json::Value) {
    let Some(path) = std::env::var_os(OUT_ENV) else { return };
    // One write of a whole line per report: lines of parallel cases and binaries never interleave.
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut file| file.write_all(format!("{line}\n").as_bytes()));
    if let Err(e) = written {
        eprintln!("reliability: cannot append to {} ({OUT_ENV}): {e}", path.to_string_lossy());
    }
}
