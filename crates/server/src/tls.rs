//! HTTPS for `polybus serve --tls-cert F --tls-key F`: a listener that hands axum only
//! connections whose TLS handshake finished, so a slow or failed handshake holds up no one.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use polybus::core::tls::install_crypto_provider;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// How long a client may take over its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes under way at once; further connections wait to be accepted.
const MAX_HANDSHAKES: usize = 256;
/// Finished handshakes waiting for axum to take them.
const READY_QUEUE: usize = 64;

/// The certificate chain and key files the server presents.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM file of the server's certificate chain (leaf first).
    pub cert: PathBuf,
    /// PEM file of its private key.
    pub key: PathBuf,
}

/// Why the TLS certificate or key cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("--tls-{which} {}: {reason}", path.display())]
pub struct TlsSetupError {
    /// `cert` or `key`.
    pub which: &'static str,
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub reason: String,
}

impl TlsFiles {
    /// Reads the files into a rustls server config (HTTP/1.1).
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsSetupError> {
        install_crypto_provider();
        let fail =
            |which, path: &Path, reason: String| TlsSetupError { which, path: path.to_owned(), reason };
        let cert_pem = std::fs::read(&self.cert)
            .map_err(|e| fail("cert", &self.cert, format!("cannot be read ({e})")))?;
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| fail("cert", &self.cert, "is not valid PEM".into()))?;
        if chain.is_empty() {
            return Err(fail("cert", &self.cert, "holds no PEM certificate".into()));
        }
        let key_pem =
            std::fs::read(&self.key).map_err(|e| fail("key", &self.key, format!("cannot be read ({e})")))?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| {
            fail("key", &self.key, "holds no PEM private key (PKCS#8, PKCS#1 or SEC1)".into())
        })?;
        let mut config = ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| fail("key", &self.key, format!("does not fit the certificate ({e})")))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// A listener yielding TLS connections; handshakes run concurrently, each bounded in time.
pub(crate) struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    acceptor: JoinHandle<()>,
}

impl TlsListener {
    /// Starts accepting on `listener` with `config`.
    pub(crate) fn new(listener: TcpListener, config: Arc<ServerConfig>) -> io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let (ready_tx, ready) = mpsc::channel(READY_QUEUE);
        let acceptor = tokio::spawn(accept(listener, TlsAcceptor::from(config), ready_tx));
        Ok(TlsListener { ready, local, acceptor })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(connection) => connection,
            // The acceptor only ends when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

async fn accept(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    ready: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let Ok(permit) = handshakes.clone().acquire_owned().await else { return };
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: pause instead of spinning.
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, ready) = (acceptor.clone(), ready.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let _ = ready.send((stream, peer)).await;
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}
