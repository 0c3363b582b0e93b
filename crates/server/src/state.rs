//! What every request handler shares: registry, bus, keys, metrics, leases.

use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

use polybus::{Bus, FilePolicy, Registry, SecretPolicy, Secrets, SecretsKey};
use tokio::sync::watch;

use crate::keys::ApiKeys;
use crate::leases::{self, Leases, Settle};
use crate::metrics::Metrics;

/// Largest request body by default: a 2 MiB payload, base64-encoded, in a JSON envelope.
pub const DEFAULT_BODY_LIMIT: usize = 3 * 1024 * 1024;
/// How often expired leases and idle pull members are looked for.
const SWEEP_EVERY: Duration = Duration::from_millis(100);

/// Server settings beyond the registry.
#[derive(Debug, Clone)]
pub struct Options {
    /// Largest request body in bytes; larger ones get `413 PAYLOAD_TOO_LARGE`.
    pub body_limit: usize,
    /// Only `${VAR}` references whose name starts with one of these resolve (an empty prefix
    /// allows every variable of the server).
    pub secret_env_prefixes: Vec<String>,
    /// The key of the `$Secret{name}` store, or why there is none.
    pub secrets_key: Result<SecretsKey, String>,
    /// The data folder: every file the server creates or reads for a definition is inside it.
    /// `None`: `polybus-data` beside a SQLite registry ([`crate::Server::bind`]), else `./polybus-data`.
    pub data_dir: Option<PathBuf>,
    /// How the job scheduler runs; `None`: this server fires no job runs.
    pub jobs: Option<polybus::jobs::SchedulerOptions>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            body_limit: DEFAULT_BODY_LIMIT,
            secret_env_prefixes: vec![polybus::DEFAULT_ENV_PREFIX.to_owned()],
            secrets_key: Err("this server was started without a secrets key".to_owned()),
            data_dir: None,
            jobs: Some(polybus::jobs::SchedulerOptions::default()),
        }
    }
}

impl Options {
    /// The secret policy these options describe, over `registry`'s store.
    pub fn secret_policy(&self, registry: &Registry) -> SecretPolicy {
        let secrets = Secrets::with_key(registry.store().clone(), self.secrets_key.clone());
        SecretPolicy::env_prefixes(self.secret_env_prefixes.clone()).with_store(secrets)
    }

    /// The file policy of a server: definitions confined to the data folder.
    pub fn files(&self) -> FilePolicy {
        let beside_working_directory = || PathBuf::from(".").join(polybus::files::DATA_DIR_NAME);
        FilePolicy::confined(self.data_dir.clone().unwrap_or_else(beside_working_directory))
    }
}

struct Inner {
    bus: Bus,
    keys: ApiKeys,
    metrics: Metrics,
    leases: Leases,
    options: Options,
    shutdown: watch::Sender<bool>,
}

/// The server's shared state; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

impl AppState {
    /// State over `bus` (and the registry it resolves through). Starts the task that nacks
    /// expired leases, so it must be called inside a Tokio runtime.
    pub fn new(bus: Bus, options: Options) -> Self {
        let keys = ApiKeys::new(bus.registry());
        let (shutdown, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            bus,
            keys,
            metrics: Metrics::default(),
            leases: Leases::default(),
            options,
            shutdown,
        });
        tokio::spawn(sweep(Arc::downgrade(&inner)));
        AppState { inner }
    }

    /// State over a bus on `registry` with the connectors compiled into this build, definitions
    /// confined to the data folder of `options`.
    pub async fn open(registry: Registry, options: Options) -> polybus::Result<Self> {
        crate::metrics::install_library_recorder();
        let policy = options.secret_policy(&registry);
        let bus = Bus::builder(registry).secrets(policy).files(options.files()).build();
        Ok(AppState::new(bus, options))
    }

    /// The registry.
    pub fn registry(&self) -> &Registry {
        self.inner.bus.registry()
    }

    /// The bus.
    pub fn bus(&self) -> &Bus {
        &self.inner.bus
    }

    /// The API keys.
    pub fn keys(&self) -> &ApiKeys {
        &self.inner.keys
    }

    /// The counters.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The lease table.
    pub fn leases(&self) -> &Leases {
        &self.inner.leases
    }

    /// Largest request body in bytes.
    pub fn body_limit(&self) -> usize {
        self.inner.options.body_limit
    }

    /// Completes once shutdown has begun (event streams end then).
    pub async fn shutting_down(&self) {
        let mut rx = self.inner.shutdown.subscribe();
        let _ = rx.wait_for(|down| *down).await;
    }

    /// Begins shutdown: event streams end, so connections can close.
    pub fn begin_shutdown(&self) {
        self.inner.shutdown.send_replace(true);
    }

    /// Nacks every open lease (so the broker redelivers at once), closes the pull members
    /// and the bus's connections.
    pub async fn close(&self) -> polybus::Result<()> {
        self.begin_shutdown();
        for held in self.inner.leases.take_all() {
            let how = Settle::Nack { delay: None, reason: "server shut down on its last attempt".into() };
            if let Err(e) = leases::settle(&self.inner.metrics, held, how).await {
                tracing::warn!(error = %e, "nacking an open lease at shutdown");
            }
        }
        leases::close_pullers(self.inner.leases.take_idle_pullers(true)).await;
        self.inner.bus.close().await
    }
}

/// Nacks expired leases and closes idle pull members until the state is dropped.
async fn sweep(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        for held in inner.leases.take_expired() {
            let inner = inner.clone();
            tokio::spawn(async move {
                let how = Settle::Nack { delay: None, reason: "lease expired on its last attempt".into() };
                if let Err(e) = leases::settle(&inner.metrics, held, how).await {
                    tracing::debug!(error = %e, "nacking an expired lease; the broker redelivers it at its own deadline");
                }
            });
        }
        inner.metrics.set_leases(inner.leases.len());
        if let Err(e) = inner.keys.refresh_watched().await {
            tracing::warn!(error = %e, "reading the API keys for revocations");
        }
        let idle = inner.leases.take_idle_pullers(false);
        if !idle.is_empty() {
            leases::close_pullers(idle).await;
        }
    }
}
