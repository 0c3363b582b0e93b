//! The `polybus` command line: manage brokers and topics in a registry, publish and consume.

mod cli;
mod commands;
mod failure;
mod files;
mod output;
mod remote;

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::failure::Failure;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    init_logging(cli.command.default_log_level());
    // Several TLS clients are linked in, enabling both of rustls's crypto backends; rustls then
    // needs one chosen for the process before the first TLS connection.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            return Failure::new("RUNTIME_FAILED", format!("cannot start the async runtime: {e}")).report();
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => failure.report(),
    }
}

/// Logs to stderr at `default` (`warn`, or `info` for the server) unless `RUST_LOG` says otherwise.
/// rumqttc's own warnings (reason codes of acks the MQTT adapter reads and handles) are left out.
fn init_logging(default: &str) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{default},rumqttc=error")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| ScrubbedStderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}

/// Stderr for log lines, with every secret value a bus resolved replaced by its reference
/// (client libraries log endpoints themselves, which may hold resolved values).
struct ScrubbedStderr;

impl Write for ScrubbedStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // The formatter writes each event in one call, so a value is never split across calls.
        let text = String::from_utf8_lossy(buf);
        std::io::stderr().write_all(polybus::scrub_log(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}
