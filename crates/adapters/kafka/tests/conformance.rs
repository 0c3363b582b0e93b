//! The behaviour suite against a Kafka-protocol broker on 127.0.0.1:9092 (`scripts/services kafka`
//! starts noida-db there). `KAFKA_BROKERS` points it elsewhere. On noida-db, the cases that kill
//! member processes run against tansu on 127.0.0.1:9093 instead (`scripts/services tansu`):
//! noida-db never expires a member that died without leaving.
//!
//! The restart case runs when the broker is the noida-db server `scripts/services` started (it
//! leaves the server's pid and command line in /tmp): `noida-db restart kafka` stops the Kafka
//! service, dropping every connection, and starts it again from the data it saved.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use polybus_conformance::private::Launch;
use polybus_conformance::{PrivateBroker, ProcessFaults, Target};
use polybus_kafka::KafkaConnector;
use serde_json::json;

const PID_FILE: &str = "/tmp/polybus-kafka.pid";
const CMD_FILE: &str = "/tmp/polybus-kafka.cmd";
const ADDRESS: &str = "127.0.0.1:9092";
/// The second Kafka-protocol broker, tansu (`scripts/services tansu`); `KAFKA_TANSU_BROKERS` points elsewhere.
const TANSU_ADDRESS: &str = "127.0.0.1:9093";

fn main() -> ExitCode {
    if let Some(code) = polybus_conformance::member_process(&[Arc::new(KafkaConnector)]) {
        return code;
    }
    let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| ADDRESS.to_owned());
    let mut target = Target::new(
        "kafka",
        polybus_kafka::BROKER_TYPE,
        json!({"brokers": [brokers], "clientId": "conformance"}),
    )
    .connector(Arc::new(KafkaConnector))
    .private(Arc::new(private_noida()));
    if brokers == ADDRESS && started_by_services().is_some() {
        target = target.restart(|| {
            Box::pin(async {
                if let Err(e) =
                    tokio::task::spawn_blocking(restart).await.map_err(|e| e.to_string()).and_then(|r| r)
                {
                    panic!("restarting the Kafka broker: {e}");
                }
            })
        });
    }
    if brokers != ADDRESS {
        return polybus_conformance::run(target);
    }
    // noida-db never expires a member that died without leaving: its partitions stay assigned.
    let skip = "noida-db never expires a group member that died without leaving (SIGKILL), so its \
                partitions stay assigned to it; these cases run on tansu (`kafka (tansu)` below)";
    let tansu = std::env::var("KAFKA_TANSU_BROKERS").unwrap_or_else(|_| TANSU_ADDRESS.to_owned());
    let on_tansu = Target::new(
        "kafka (tansu)",
        polybus_kafka::BROKER_TYPE,
        // tansu takes about half the session timeout to let a member join.
        json!({"brokers": [tansu], "clientId": "conformance", "properties": {"session.timeout.ms": "6000"}}),
    )
    .connector(Arc::new(KafkaConnector))
    .process_faults(ProcessFaults::Only);
    polybus_conformance::run_all(vec![target.process_faults(ProcessFaults::Skip(skip.into())), on_tansu])
}

/// A noida-db of this binary's own, Kafka only, on a free port with its own data directory.
fn private_noida() -> PrivateBroker {
    PrivateBroker::new("noida-db (Kafka)", |dir, port| {
        let program = noida_binary().ok_or(
            "no noida-db binary (scripts/services kafka installs it; POLYBUS_NOIDA_DB names it elsewhere)",
        )?;
        let (port, data) = (port.to_string(), dir.join("data").display().to_string());
        let args =
            ["start", "--only", "kafka", "--kafka-port", &port, "--host", "127.0.0.1", "--data-dir", &data];
        Ok(Launch::new(
            program,
            &args,
            json!({"brokers": [format!("127.0.0.1:{port}")], "clientId": "conformance"}),
        ))
    })
    .not_crash_safe(
        "noida-db acknowledges records (acks=all) before they are on disk: after a SIGKILL the last few \
         acknowledged ones are gone (seen: 4 of 400, and the idempotent producer's next batch refused with \
         OutOfOrderSequenceNumber, which says the broker forgot sequences it had acked)",
    )
}

/// The noida-db server binary: `POLYBUS_NOIDA_DB`, the one scripts/services ran, or the one in
/// its Python venv.
fn noida_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("POLYBUS_NOIDA_DB") {
        return Some(PathBuf::from(path));
    }
    let from_services =
        std::fs::read_to_string(CMD_FILE).ok().and_then(|c| c.lines().next().map(PathBuf::from));
    let venv = std::env::var_os("POLYBUS_VENV")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache/polybus/venv")))?;
    let in_venv = std::fs::read_dir(venv.join("lib"))
        .ok()?
        .flatten()
        .map(|python| python.path().join("site-packages/noida_db/noida-db"));
    from_services.into_iter().chain(in_venv).find(|p| p.is_file())
}

/// The pid and command line of the noida-db server `scripts/services` started, if it runs.
fn started_by_services() -> Option<(u32, Vec<String>)> {
    let pid: u32 = std::fs::read_to_string(PID_FILE).ok()?.trim().parse().ok()?;
    let command: Vec<String> = std::fs::read_to_string(CMD_FILE).ok()?.lines().map(str::to_owned).collect();
    let running = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let program = command.first()?;
    running.starts_with(program.as_bytes()).then_some((pid, command))
}

/// Restarts the Kafka service of the running server: connections drop, the data stays. (The
/// server keeps its listening socket; a new process could not bind the port again while the
/// connections the old one closed linger in TIME_WAIT.)
fn restart() -> Result<(), String> {
    let (_, command) =
        started_by_services().ok_or("the broker started by scripts/services is not running")?;
    let data_dir =
        command.iter().skip_while(|a| *a != "--data-dir").nth(1).ok_or("no --data-dir in the command")?;
    let output = Command::new(&command[0])
        .args(["restart", "kafka", "--data-dir", data_dir])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {} restart kafka: {e}", command[0]))?;
    if !output.status.success() {
        return Err(format!("noida-db restart kafka failed: {}", String::from_utf8_lossy(&output.stderr)));
    }
    wait_until(Duration::from_secs(20), || std::net::TcpStream::connect(ADDRESS).is_ok())
        .map_err(|_| format!("noida-db did not listen on {ADDRESS} again"))
}

fn wait_until(limit: Duration, mut ready: impl FnMut() -> bool) -> Result<(), ()> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if ready() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(())
}
