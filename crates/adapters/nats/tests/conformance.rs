//! The shared behaviour suite against NATS JetStream.
//!
//! By default the suite starts a nats-server of its own (the `nats-server` binary, JetStream
//! on, a free loopback port, a temporary store, `max_payload` 2 MiB so the 1 MiB case runs),
//! which lets the reconnect case really restart the broker; the server and its streams are
//! gone when the run ends. With `POLYBUS_NATS_URL` set, the suite runs against that server
//! instead, without the reconnect case, and deletes the streams it created.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use polybus::BrokerType;
use polybus_conformance::Target;
use polybus_nats::NatsConnector;
use serde_json::json;

fn main() -> ExitCode {
    if let Some(code) = polybus_conformance::member_process(&[Arc::new(NatsConnector)]) {
        return code;
    }
    let target = Target::new("nats", BrokerType::Nats, json!({})).connector(Arc::new(NatsConnector));
    match std::env::var("POLYBUS_NATS_URL") {
        Ok(url) => run_on_shared_server(target, &url),
        Err(_) => match PrivateServer::start() {
            Ok(server) => {
                let server = Arc::new(server);
                let restarting = server.clone();
                let target =
                    Target { config: json!({ "servers": server.url() }), ..target }.restart(move || {
                        let server = restarting.clone();
                        async move {
                            if let Err(e) = tokio::task::spawn_blocking(move || server.restart())
                                .await
                                .map_err(|e| e.to_string())
                                .and_then(|r| r)
                            {
                                panic!("restarting nats-server: {e}");
                            }
                        }
                        .boxed()
                    });
                polybus_conformance::run(target)
            }
            Err(e) => {
                eprintln!(
                    "conformance[nats]: {e}; running against nats://127.0.0.1:4222 without the reconnect case"
                );
                run_on_shared_server(target, "nats://127.0.0.1:4222")
            }
        },
    }
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

/// A nats-server of this run's own, restartable on the same port and store.
struct PrivateServer {
    binary: PathBuf,
    config: PathBuf,
    addr: SocketAddr,
    child: Mutex<Option<Child>>,
    _dir: tempfile::TempDir,
}

impl PrivateServer {
    fn start() -> Result<Self, String> {
        let binary =
            find_binary().ok_or("no nats-server binary found (set POLYBUS_NATS_SERVER to its path)")?;
        let dir = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("finding a free port: {e}"))?;
        let config = dir.path().join("nats.conf");
        let store = dir.path().join("jetstream");
        std::fs::write(
            &config,
            format!(
                "listen: {addr}\nmax_payload: 2MB\njetstream {{ store_dir: {:?} }}\n",
                store.display().to_string()
            ),
        )
        .map_err(|e| format!("writing {}: {e}", config.display()))?;
        let server = PrivateServer { binary, config, addr, child: Mutex::new(None), _dir: dir };
        server.spawn()?;
        eprintln!("conformance[nats]: started {} on {}", server.binary.display(), server.url());
        Ok(server)
    }

    fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    fn spawn(&self) -> Result<(), String> {
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.binary.display()))?;
        watch_over(child.id());
        *self.child.lock().map_err(|e| e.to_string())? = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_err() {
            if Instant::now() > deadline {
                return Err(format!("nats-server did not accept connections on {} within 20 s", self.addr));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn stop(&self) {
        if let Ok(mut child) = self.child.lock()
            && let Some(mut child) = child.take()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server and starts it again on the same port and store.
    fn restart(&self) -> Result<(), String> {
        self.stop();
        self.spawn()
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Kills the server `server` once this process is gone, however it ended (a test binary can
/// exit without running destructors); ends by itself when the server stops first.
fn watch_over(server: u32) {
    const WATCHDOG: &str = r#"while kill -0 "$1" 2>/dev/null; do kill -0 "$0" 2>/dev/null || { kill -9 "$1"; exit; }; sleep 1; done"#;
    let spawned = Command::new("sh")
        .args(["-c", WATCHDOG, &std::process::id().to_string(), &server.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    if let Err(e) = spawned {
        eprintln!("conformance[nats]: no watchdog for nats-server {server}: {e}");
    }
}

fn find_binary() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("POLYBUS_NATS_SERVER") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/bin", "/usr/bin"].map(PathBuf::from))
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| Path::is_file(candidate))
}
