//! The behaviour suite against a real Mosquitto.
//!
//! By default the suite starts a Mosquitto of its own (the `mosquitto` binary that
//! `scripts/services mosquitto` installs) on a free loopback port with persistence in a
//! temporary directory. `MQTT_HOST` / `MQTT_PORT` point the suite at a running broker
//! instead (127.0.0.1:1883 when `mosquitto` is not installed); that one is shared, so it is
//! never restarted.
//!
//! The suite runs the reconnect case alone, so restarting the private broker is safe.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use polybus::BrokerType;
use polybus_conformance::Target;
use polybus_mqtt::MqttConnector;

fn main() -> ExitCode {
    if let Some(code) = polybus_conformance::member_process(&[Arc::new(MqttConnector)]) {
        return code;
    }
    let config =
        |host: &str, port: u16| serde_json::json!({ "host": host, "port": port, "clientId": "conformance" });
    let explicit = std::env::var("MQTT_HOST").is_ok() || std::env::var("MQTT_PORT").is_ok();
    let private = if explicit { None } else { PrivateBroker::start() };
    let target = match &private {
        Some(broker) => {
            let restart = broker.clone();
            Target::new("mqtt (private mosquitto)", BrokerType::Mqtt, config("127.0.0.1", broker.port))
                .restart(move || {
                    let broker = restart.clone();
                    Box::pin(async move {
                        tokio::task::spawn_blocking(move || broker.restart())
                            .await
                            .expect("restarting mosquitto");
                    })
                })
        }
        None => {
            let host = std::env::var("MQTT_HOST").unwrap_or_else(|_| "127.0.0.1".into());
            let port = std::env::var("MQTT_PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(1883);
            Target::new("mqtt (shared broker)", BrokerType::Mqtt, config(&host, port))
        }
    };
    let code = polybus_conformance::run(target.connector(Arc::new(MqttConnector)));
    if let Some(broker) = private {
        broker.stop();
    }
    code
}

/// A Mosquitto this test binary owns: its own port, config and persistence directory.
#[derive(Clone)]
struct PrivateBroker {
    port: u16,
    conf: PathBuf,
    child: Arc<Mutex<Option<Child>>>,
    _dir: Arc<tempfile::TempDir>,
}

impl PrivateBroker {
    /// Starts one, or `None` (with the reason printed) when `mosquitto` cannot run here.
    fn start() -> Option<PrivateBroker> {
        let dir = tempfile::tempdir().ok()?;
        // Mosquitto started as root drops to the `mosquitto` user, which must write here.
        set_mode(dir.path(), 0o777);
        let port = TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        let conf = dir.path().join("mosquitto.conf");
        let data = dir.path().display();
        let text = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n\
             persistence_location {data}/\nlog_dest file {data}/mosquitto.log\n"
        );
        std::fs::write(&conf, text).ok()?;
        let broker = PrivateBroker { port, conf, child: Arc::new(Mutex::new(None)), _dir: Arc::new(dir) };
        match broker.spawn() {
            Ok(()) => Some(broker),
            Err(e) => {
                eprintln!("not starting a private mosquitto ({e}); using a shared broker without restarts");
                None
            }
        }
    }

    fn spawn(&self) -> Result<(), String> {
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("mosquitto: {e}"))?;
        *self.child.lock().expect("broker process") = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if Instant::now() > deadline {
                return Err(format!("mosquitto did not listen on port {} within 10 s", self.port));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Stops the broker the way a service manager does (SIGTERM: it saves its sessions).
    fn stop(&self) {
        if let Some(mut child) = self.child.lock().expect("broker process").take() {
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while !matches!(child.try_wait(), Ok(Some(_))) {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    fn restart(&self) {
        self.stop();
        self.spawn().expect("starting mosquitto again");
    }
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode));
}
