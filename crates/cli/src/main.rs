//! The `polybus` command line: manage brokers and topics in a registry, publish and consume.

mod cli;
mod commands;
mod failure;
mod files;
mod output;
mod remote;
mod telemetry;

use std::process::ExitCode;

use clap::Parser;

use crate::failure::Failure;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let (format, otlp) = match &cli.command {
        cli::Command::Serve(args) => (args.log_format, args.otlp_endpoint.clone()),
        _ => (cli::LogFormat::Text, None),
    };
    let telemetry = match telemetry::init(cli.command.default_log_level(), format, otlp.as_deref()) {
        Ok(telemetry) => telemetry,
        Err(message) => return Failure::new("INVALID_ARGUMENT", message).report(),
    };
    // Several TLS clients are linked in, enabling both of rustls's crypto backends; rustls then
    // needs one chosen for the process before the first TLS connection.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            return Failure::new("RUNTIME_FAILED", format!("cannot start the async runtime: {e}")).report();
        }
    };
    let outcome = runtime.block_on(commands::run(cli));
    telemetry.shutdown();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => failure.report(),
    }
}
