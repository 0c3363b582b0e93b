//! polybus server: the registry and publish/consume over HTTP, with API keys, Prometheus
//! metrics, an OpenAPI document and a web dashboard.
//!
//! ```no_run
//! # async fn demo() -> Result<(), polybus_server::ServeError> {
//! let config = polybus_server::ServerConfig::new("127.0.0.1:8080".parse().unwrap(), "polybus.db");
//! polybus_server::serve(config).await
//! # }
//! ```
//!
//! Routes (all under `/v1` need `Authorization: Bearer <key>`; `/`, `/healthz`, `/readyz` do not):
//! brokers and topics (`/v1/brokers…`, `/v1/topics…`), publishing
//! (`POST /v1/envs/{env}/events/{event}/messages`), consuming
//! (`…/subscriptions/{group}/stream` as SSE, `…/pull`, `…/ack`), `/v1/stats`,
//! `/v1/openapi.json`, `/metrics`, and the dashboard at `/`.

mod auth;
mod dashboard;
mod error;
pub mod keys;
mod lag;
mod leases;
mod metrics;
mod routes;
mod schema;
mod state;
mod tls;

use std::future::Future;
use std::net::SocketAddr;

use polybus::Registry;
use tokio::net::TcpListener;

pub use error::{ApiError, ErrorBody, ErrorDetail};
pub use keys::{ApiKeys, Caller, KeyInfo, NewKey};
pub use metrics::{Metrics, Stats, install_library_recorder};
pub use routes::{openapi, router};
pub use state::{AppState, DEFAULT_BODY_LIMIT, Options};
pub use tls::{TlsFiles, TlsSetupError};

/// Where to listen and which registry to serve.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Registry URL: a SQLite path, `sqlite://PATH` or `postgres://…`.
    pub registry_url: String,
    /// The `$Secret{name}` key file; default `polybus-secrets.key` beside a SQLite registry,
    /// created when missing. A PostgreSQL registry has none unless given.
    pub secrets_key_file: Option<std::path::PathBuf>,
    /// Serve HTTPS with this certificate and key (plain HTTP without).
    pub tls: Option<TlsFiles>,
    /// Other settings.
    pub options: Options,
}

impl ServerConfig {
    /// Listens on `listen`, serving the registry at `registry_url`, with default options.
    pub fn new(listen: SocketAddr, registry_url: impl Into<String>) -> Self {
        ServerConfig {
            listen,
            registry_url: registry_url.into(),
            secrets_key_file: None,
            tls: None,
            options: Options::default(),
        }
    }
}

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The registry could not be opened.
    #[error("{0}")]
    Registry(#[from] polybus::Error),
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What the system said.
        source: std::io::Error,
    },
    /// Serving failed.
    #[error("serving HTTP failed: {0}")]
    Serve(std::io::Error),
    /// The TLS certificate or key cannot be used.
    #[error("{0}")]
    Tls(#[from] TlsSetupError),
    /// The data folder could not be created.
    #[error("cannot create the data folder {}: {source}", path.display())]
    DataDir {
        /// The folder.
        path: std::path::PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
}

impl ServeError {
    /// Stable code, as the CLI prints it.
    pub fn code(&self) -> &'static str {
        match self {
            ServeError::Registry(e) => e.code(),
            ServeError::Bind { .. } => "LISTEN_FAILED",
            ServeError::Serve(_) => "SERVE_FAILED",
            ServeError::DataDir { .. } => "DATA_DIR_FAILED",
            ServeError::Tls(_) => "TLS_FAILED",
        }
    }
}

/// A server bound to its address, ready to run.
pub struct Server {
    listener: TcpListener,
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    state: AppState,
    /// How the job scheduler runs, when it does.
    jobs: Option<polybus::jobs::SchedulerOptions>,
}

impl Server {
    /// Opens the registry, creates the data folder (by default `polybus-data` beside a SQLite
    /// registry) and binds the address.
    pub async fn bind(config: &ServerConfig) -> Result<Server, ServeError> {
        // First, so a wrong certificate is said before anything is opened or created.
        let tls = config.tls.as_ref().map(TlsFiles::server_config).transpose()?;
        let registry = Registry::open(&config.registry_url).await?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| ServeError::Bind { addr: config.listen, source })?;
        // After binding, so a server that cannot start leaves no key file behind.
        let mut options = config.options.clone();
        let data_dir =
            options.data_dir.get_or_insert_with(|| polybus::files::data_dir_beside(&config.registry_url));
        std::fs::create_dir_all(&*data_dir)
            .map_err(|source| ServeError::DataDir { path: data_dir.clone(), source })?;
        options.secrets_key =
            polybus_registry::find_key(&config.registry_url, config.secrets_key_file.as_deref(), true)?;
        if let Err(reason) = &options.secrets_key {
            tracing::warn!("`$Secret{{..}}` references cannot be used: {reason}");
        }
        let jobs = options.jobs.clone();
        let state = AppState::open(registry, options).await?;
        Ok(Server { listener, tls, state, jobs })
    }

    /// Serves `state` on an already bound listener (without the job scheduler).
    pub fn with_listener(listener: TcpListener, state: AppState) -> Server {
        Server { listener, tls: None, state, jobs: None }
    }

    /// True when the server speaks HTTPS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, ServeError> {
        self.listener.local_addr().map_err(ServeError::Serve)
    }

    /// The shared state (registry, keys, metrics).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` completes; then ends event streams, waits for open requests,
    /// nacks unsettled leases (so their messages are redelivered at once) and closes the bus.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), ServeError> {
        let Server { listener, tls, state, jobs } = self;
        let (stop_jobs, jobs_stopped) = tokio::sync::oneshot::channel::<()>();
        let scheduler = jobs.map(|options| {
            let scheduler = polybus::jobs::Scheduler::new(state.bus().clone()).with_options(options);
            tokio::spawn(scheduler.run(async {
                jobs_stopped.await.ok();
            }))
        });
        let app = router(state.clone());
        let stopping = state.clone();
        let shutdown = async move {
            shutdown.await;
            tracing::info!("shutting down");
            stopping.begin_shutdown();
        };
        let served = match tls {
            None => axum::serve(listener, app).with_graceful_shutdown(shutdown).await,
            Some(config) => {
                let listener = tls::TlsListener::new(listener, config).map_err(ServeError::Serve)?;
                axum::serve(listener, app).with_graceful_shutdown(shutdown).await
            }
        }
        .map_err(ServeError::Serve);
        stop_jobs.send(()).ok();
        if let Some(scheduler) = scheduler {
            scheduler.await.ok();
        }
        let closed = state.close().await;
        served?;
        closed.map_err(ServeError::from)
    }
}

/// Serves `config` until Ctrl-C or SIGTERM.
pub async fn serve(config: ServerConfig) -> Result<(), ServeError> {
    let server = Server::bind(&config).await?;
    tracing::info!(address = %server.local_addr()?, registry = %redact_url(&config.registry_url), "listening");
    server.run(shutdown_signal()).await
}

/// A registry URL safe to show: a password in it is replaced by `****` (by the same rule as
/// broker configs, so a password holding `/` or `@` is hidden whole).
pub fn redact_url(url: &str) -> String {
    polybus::core::secret::redact_url(url).unwrap_or_else(|| url.to_owned())
}

/// A future that completes on Ctrl-C or SIGTERM. The handlers are installed when this is
/// called (inside a Tokio runtime), so a signal that comes before the future is awaited is not
/// lost; without handlers it never completes.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut interrupt = signal(SignalKind::interrupt()).ok();
        let mut terminate = signal(SignalKind::terminate()).ok();
        async move {
            let interrupted = async {
                match interrupt.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            let terminated = async {
                match terminate.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = interrupted => {}
                _ = terminated => {}
            }
        }
    }
    #[cfg(not(unix))]
    async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_registry_urls_are_hidden() {
        assert_eq!(redact_url("postgres://bus:secret@db:5432/test"), "postgres://bus:****@db:5432/test");
        assert_eq!(redact_url("postgres://bus@db/test"), "postgres://bus@db/test");
        assert_eq!(redact_url("./polybus.db"), "./polybus.db");
        assert_eq!(redact_url("postgres://bus:se/cr@et@db:5432/test"), "postgres://bus:****@db:5432/test");
    }
}
