//! The shared behaviour suite against NATS JetStream.
//!
//! By default the suite starts a nats-server of its own (the `nats-server` binary, JetStream
//! on, a free loopback port, a temporary store, `max_payload` 2 MiB so the 1 MiB case runs),
//! which lets the reconnect case (SIGKILL) and the broker-restart cases really restart the
//! broker; the server and its streams are gone when the run ends. With `POLYBUS_NATS_URL` set,
//! the suite runs against that server instead, without those cases, and deletes the streams it
//! created.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use futures::{FutureExt, StreamExt};
use polybus_conformance::private::{Launch, Stop, find_program};
use polybus_conformance::{PrivateBroker, Target};
use polybus_nats::NatsConnector;
use serde_json::json;

fn main() -> ExitCode {
    if let Some(code) = polybus_conformance::member_process(&[Arc::new(NatsConnector)]) {
        return code;
    }
    let target = Target::new("nats", polybus_nats::BROKER_TYPE, json!({})).connector(Arc::new(NatsConnector));
    if let Ok(url) = std::env::var("POLYBUS_NATS_URL") {
        return run_on_shared_server(target.no_private("POLYBUS_NATS_URL names a shared server"), &url);
    }
    let server = Arc::new(private_server());
    let config = match server.config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!(
                "conformance[nats]: {e}; running against nats://127.0.0.1:4222 without the reconnect and restart cases"
            );
            let target = target.no_private(format!("no private nats-server: {e}"));
            return run_on_shared_server(target, "nats://127.0.0.1:4222");
        }
    };
    let restarting = server.clone();
    let target = Target { config, ..target }
        .restart(move || {
            let server = restarting.clone();
            async move {
                if let Err(e) = tokio::task::spawn_blocking(move || server.restart(Stop::Kill))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r)
                {
                    panic!("restarting nats-server: {e}");
                }
            }
            .boxed()
        })
        .private(server);
    polybus_conformance::run(target)
}

/// A nats-server of this run's own: JetStream on, a free loopback port, a temporary store,
/// `max_payload` 2 MiB so the 1 MiB case runs. JetStream writes a message to its file store
/// before acknowledging it (syncing to disk later), so a SIGKILL of the process, unlike a
/// power cut, loses nothing acknowledged.
fn private_server() -> PrivateBroker {
    PrivateBroker::new("nats-server", |dir, port| {
        let program = std::env::var_os("POLYBUS_NATS_SERVER")
            .map(PathBuf::from)
            .or_else(|| find_program("nats-server"))
            .ok_or("no nats-server binary found (set POLYBUS_NATS_SERVER to its path)")?;
        let config = dir.join("nats.conf");
        let store = dir.join("jetstream").display().to_string();
        std::fs::write(
            &config,
            format!("listen: 127.0.0.1:{port}\nmax_payload: 2MB\njetstream {{ store_dir: {store:?} }}\n"),
        )
        .map_err(|e| format!("writing {}: {e}", config.display()))?;
        let config = config.display().to_string();
        Ok(Launch::new(program, &["-c", &config], json!({ "servers": format!("nats://127.0.0.1:{port}") })))
    })
}

/// Runs the suite on a server others use too: only the streams of this run's topics are deleted.
fn run_on_shared_server(target: Target, url: &str) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("conformance[nats]: starting a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let before = runtime.block_on(stream_names(url)).unwrap_or_default();
    let code = polybus_conformance::run(Target { config: json!({ "servers": url }), ..target });
    runtime.block_on(async {
        let Ok(after) = stream_names(url).await else { return };
        let Ok(client) = async_nats::connect(url).await else { return };
        let js = async_nats::jetstream::new(client);
        // The suite's topics are `conformance:t-<id>…`: their streams start with `t-`.
        for name in after.iter().filter(|n| n.starts_with("t-") && !before.contains(n)) {
            if let Err(e) = js.delete_stream(name).await {
                eprintln!("conformance[nats]: deleting stream {name}: {e}");
            }
        }
    });
    code
}

async fn stream_names(url: &str) -> Result<Vec<String>, async_nats::Error> {
    let js = async_nats::jetstream::new(async_nats::connect(url).await?);
    let names: Vec<_> = js.stream_names().collect().await;
    Ok(names.into_iter().collect::<Result<_, _>>()?)
}
