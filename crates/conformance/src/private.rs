//! A broker process of the suite's own: started on a free loopback port with a temporary data
//! directory, stopped (gracefully or with SIGKILL) and started again on the same port and data,
//! and killed with its whole process group when dropped or when the test binary dies.
//!
//! An adapter's test binary describes how to launch its broker ([`Launch`]); the suite starts
//! it the first time a case needs it, so a run that needs none never pays its start-up.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process_group, test_kill_process_group};

/// How long a broker may take to serve after it was started.
const START_LIMIT: Duration = Duration::from_secs(60);
/// How long a broker may take to exit after SIGTERM before it gets SIGKILL.
const STOP_LIMIT: Duration = Duration::from_secs(30);

/// How a broker is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM, as a service manager's restart does: the broker may save what it holds.
    Graceful,
    /// SIGKILL: a crash; only what the broker wrote to disk before it survives.
    Kill,
}

/// What it takes to run one broker process (built by [`PrivateBroker::new`]'s launcher).
pub struct Launch {
    /// The program to run.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Environment variables added to the test's own.
    pub env: Vec<(String, String)>,
    /// The env config (as stored in the registry) that reaches this broker.
    pub config: serde_json::Value,
    /// Whether the broker serves; by default, whether its port accepts a TCP connection.
    pub ready: Option<Box<dyn Fn(SocketAddr) -> bool + Send + Sync>>,
}

impl Launch {
    /// Runs `program` with `args`; `config` reaches it.
    pub fn new(program: impl Into<PathBuf>, args: &[&str], config: serde_json::Value) -> Launch {
        Launch {
            program: program.into(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            env: Vec::new(),
            config,
            ready: None,
        }
    }

    /// Adds an environment variable.
    pub fn env(mut self, key: &str, value: impl Into<String>) -> Launch {
        self.env.push((key.to_owned(), value.into()));
        self
    }

    /// Replaces the readiness check.
    pub fn ready(mut self, check: impl Fn(SocketAddr) -> bool + Send + Sync + 'static) -> Launch {
        self.ready = Some(Box::new(check));
        self
    }
}

/// Writes a broker's config files into its data directory and says how to run it there.
pub type Launcher = Box<dyn Fn(&Path, u16) -> Result<Launch, String> + Send + Sync>;

/// A private broker, started on first use (see the module docs).
pub struct PrivateBroker {
    name: String,
    launcher: Launcher,
    not_crash_safe: Option<String>,
    crash_settle: Option<(Duration, String)>,
    started: OnceLock<Result<Running, String>>,
}

struct Running {
    launch: Launch,
    addr: SocketAddr,
    child: Mutex<Option<Child>>,
    dir: tempfile::TempDir,
}

impl PrivateBroker {
    /// A broker called `name` (for messages), launched by `launcher` with its data directory
    /// and port when first needed.
    pub fn new(
        name: impl Into<String>,
        launcher: impl Fn(&Path, u16) -> Result<Launch, String> + Send + Sync + 'static,
    ) -> PrivateBroker {
        PrivateBroker {
            name: name.into(),
            launcher: Box::new(launcher),
            not_crash_safe: None,
            crash_settle: None,
            started: OnceLock::new(),
        }
    }

    /// Declares that a SIGKILL may lose acknowledged messages on this broker, and why.
    pub fn not_crash_safe(mut self, why: impl Into<String>) -> PrivateBroker {
        self.not_crash_safe = Some(why.into());
        self
    }

    /// Why a SIGKILL may lose acknowledged messages, when it may.
    pub fn crash_safety(&self) -> Option<&str> {
        self.not_crash_safe.as_deref()
    }

    /// Declares that what a case creates (queues, streams) survives a SIGKILL only once it is
    /// `after` old, and why: the crash case waits that long after subscribing.
    pub fn crash_safe_after(mut self, after: Duration, why: impl Into<String>) -> PrivateBroker {
        self.crash_settle = Some((after, why.into()));
        self
    }

    /// How old what a case created must be to survive a SIGKILL, and why, when it must.
    pub fn crash_settle(&self) -> Option<(Duration, &str)> {
        self.crash_settle.as_ref().map(|(after, why)| (*after, why.as_str()))
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Starts it unless it runs already; the error says why it cannot run here.
    pub fn ensure_started(&self) -> Result<(), String> {
        self.running().map(|_| ())
    }

    /// The env config that reaches it (starting it first).
    pub fn config(&self) -> Result<serde_json::Value, String> {
        Ok(self.running()?.launch.config.clone())
    }

    /// The address it listens on (starting it first).
    pub fn addr(&self) -> Result<SocketAddr, String> {
        Ok(self.running()?.addr)
    }

    /// Stops it `how` and waits until every process of it is gone.
    pub fn stop(&self, how: Stop) -> Result<(), String> {
        self.running()?.stop(how, &self.name)
    }

    /// Starts it again on the same port and data; returns once it serves.
    pub fn start(&self) -> Result<(), String> {
        self.running()?.spawn(&self.name)
    }

    /// Stops it `how` and starts it again.
    pub fn restart(&self, how: Stop) -> Result<(), String> {
        self.stop(how)?;
        self.start()
    }

    fn running(&self) -> Result<&Running, String> {
        self.started
            .get_or_init(|| {
                let dir = tempfile::Builder::new()
                    .prefix("polybus-private-")
                    .tempdir()
                    .map_err(|e| format!("a data directory for the private {}: {e}", self.name))?;
                // Brokers that drop root privileges (Mosquitto) must write here too.
                set_mode(dir.path(), 0o777);
                let addr = free_port().map_err(|e| format!("finding a free port: {e}"))?;
                let launch = (self.launcher)(dir.path(), addr.port())?;
                let running = Running { launch, addr, child: Mutex::new(None), dir };
                running.spawn(&self.name)?;
                eprintln!(
                    "private {}: {} serving on {addr}, data in {}",
                    self.name,
                    running.launch.program.display(),
                    running.dir.path().display()
                );
                Ok(running)
            })
            .as_ref()
            .map_err(Clone::clone)
    }
}

/// Set to keep a private broker's data directory (and its log) after the run, for debugging.
pub const KEEP_ENV: &str = "POLYBUS_KEEP_PRIVATE";

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        if let Some(Ok(running)) = self.started.take() {
            let _ = running.stop(Stop::Kill, &self.name);
            if std::env::var_os(KEEP_ENV).is_some() {
                eprintln!("private {}: kept {} ({KEEP_ENV} is set)", self.name, running.dir.keep().display());
            }
        }
    }
}

impl Running {
    fn spawn(&self, name: &str) -> Result<(), String> {
        let mut child = self.child.lock().map_err(|_| format!("the private {name}'s state is poisoned"))?;
        if child.is_some() {
            return Err(format!("the private {name} runs already"));
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("broker.log"))
            .map_err(|e| format!("opening the private {name}'s log: {e}"))?;
        let err_log = log.try_clone().map_err(|e| format!("opening the private {name}'s log: {e}"))?;
        let spawned = Command::new(&self.launch.program)
            .args(&self.launch.args)
            .envs(self.launch.env.iter().map(|(k, v)| (k, v)))
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err_log)
            // A group of its own, so stopping it reaches the processes it starts too.
            .process_group(0)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.launch.program.display()))?;
        watch_over(spawned.id());
        *child = Some(spawned);
        drop(child);
        let started = Instant::now();
        loop {
            let ready = match &self.launch.ready {
                Some(check) => check(self.addr),
                None => TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok(),
            };
            if ready {
                return Ok(());
            }
            if let Some(status) = self.exited() {
                return Err(format!(
                    "the private {name} exited ({status}) before serving; see {}",
                    self.dir.path().join("broker.log").display()
                ));
            }
            if started.elapsed() > START_LIMIT {
                return Err(format!(
                    "the private {name} did not serve on {} within {START_LIMIT:?}",
                    self.addr
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The exit status of the main process, when it exited.
    fn exited(&self) -> Option<String> {
        let mut child = self.child.lock().ok()?;
        let status = child.as_mut()?.try_wait().ok()??;
        Some(status.to_string())
    }

    fn stop(&self, how: Stop, name: &str) -> Result<(), String> {
        let Some(mut child) =
            self.child.lock().map_err(|_| format!("the private {name}'s state is poisoned"))?.take()
        else {
            return Ok(());
        };
        let group = Pid::from_raw(child.id() as i32).ok_or("a process id of 0")?;
        let signal = match how {
            Stop::Graceful => Signal::TERM,
            Stop::Kill => Signal::KILL,
        };
        let _ = kill_process_group(group, signal);
        let started = Instant::now();
        // The whole group, not only the main process: RabbitMQ's script exits before its VM.
        loop {
            let _ = child.try_wait();
            if test_kill_process_group(group).is_err() {
                let _ = child.wait();
                return Ok(());
            }
            if started.elapsed() > STOP_LIMIT {
                let _ = kill_process_group(group, Signal::KILL);
            }
            if started.elapsed() > STOP_LIMIT * 2 {
                return Err(format!("the private {name} did not exit within {:?}", STOP_LIMIT * 2));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A loopback address no one listens on right now.
fn free_port() -> std::io::Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")?.local_addr()
}

/// Kills process group `group` once this process is gone, however it ended (a test binary can
/// exit without running destructors); ends by itself when the group is gone first.
fn watch_over(group: u32) {
    const WATCHDOG: &str = r#"while kill -0 -"$1" 2>/dev/null; do kill -0 "$0" 2>/dev/null || { kill -9 -"$1"; exit; }; sleep 1; done"#;
    let spawned = Command::new("sh")
        .args(["-c", WATCHDOG, &std::process::id().to_string(), &group.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    if let Err(e) = spawned {
        eprintln!("no watchdog for private broker process group {group}: {e}");
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode));
}

/// Finds `program` in `$PATH` or the usual system directories.
pub fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/bin", "/usr/bin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}
