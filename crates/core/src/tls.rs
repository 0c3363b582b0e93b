//! The TLS block every broker type and the registry share: `tls: true` (system roots), or
//! `tls: {caFile | ca, certFile | cert, keyFile | key, serverName, insecureSkipVerify}`.
//!
//! Certificates and keys are PEM, inline or in files; an inline `key` is a secret (written as
//! a `${VAR}` reference and redacted like a password). Errors name the field, never a key's
//! content. [`TlsBlock::load`] reads what the block names; [`TlsBlock::client_config`] turns
//! it into a rustls client config for the clients that take one (checking `serverName`, when
//! given, in its verifier). [`connect_error`] turns a failed handshake into a connect error
//! that says what is wrong with the certificates.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A config's `tls` field: a switch, or a block of settings (which turns TLS on).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Tls {
    /// `true`: TLS verified against the system's roots; `false`: plain TCP.
    Switch(bool),
    /// TLS with a private CA, a client certificate, a server name or no verification.
    Block(TlsBlock),
}

/// TLS settings: whom to trust, which certificate to present, which name to check.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsBlock {
    /// PEM file of the CA certificates to trust instead of the system's roots.
    pub ca_file: Option<String>,
    /// PEM of the CA certificates to trust instead of the system's roots.
    pub ca: Option<String>,
    /// PEM file of the client certificate chain to present.
    pub cert_file: Option<String>,
    /// PEM of the client certificate chain to present.
    pub cert: Option<String>,
    /// PEM file of the client certificate's private key.
    pub key_file: Option<String>,
    /// PEM of the client certificate's private key (a secret: write it as a `${VAR}` reference).
    pub key: Option<String>,
    /// Host name to verify the server's certificate against (default: the host connected to).
    pub server_name: Option<String>,
    /// Accept any server certificate (tests only: it gives up the protection TLS exists for).
    pub insecure_skip_verify: Option<bool>,
}

/// What a [`TlsBlock`] names, read: PEM text of the CA and the client identity.
#[derive(Clone, Default)]
pub struct TlsPem {
    /// The CA certificates to trust, when a private CA is given.
    pub ca: Option<String>,
    /// The client certificate chain and its key, when the client presents one.
    pub identity: Option<(String, String)>,
    /// Host name to verify instead of the host connected to.
    pub server_name: Option<String>,
    /// True when the server's certificate is not verified.
    pub insecure: bool,
}

impl std::fmt::Debug for TlsPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsPem")
            .field("ca", &self.ca.is_some())
            .field("identity", &self.identity.is_some())
            .field("server_name", &self.server_name)
            .field("insecure", &self.insecure)
            .finish()
    }
}

/// A TLS setting that cannot be used: the field (`tls.caFile`, …) and why, never a key's text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct TlsError {
    /// The field under the config, e.g. `tls.keyFile`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl TlsError {
    fn new(field: &str, reason: impl Into<String>) -> Self {
        TlsError { field: format!("tls.{field}"), reason: reason.into() }
    }

    /// As a config validation failure (`config.tls.…`), for `BrokerKind::validate_config`.
    pub fn into_field(self) -> crate::kind::FieldError {
        (format!("config.{}", self.field), self.reason)
    }

    /// As a validation error of env `env` (`VALIDATION_FAILED` naming env and field).
    pub fn in_env(self, env: &str) -> crate::ValidationError {
        crate::ValidationError::in_env(env, format!("config.{}", self.field), self.reason)
    }
}

impl Tls {
    /// Reads the `tls` field of a config, if any (`None` also when it is absent or `false`).
    pub fn from_config(config: &Value) -> Result<Option<TlsBlock>, TlsError> {
        match config.get("tls") {
            None | Some(Value::Null) => Ok(None),
            Some(value) => match serde_json::from_value::<Tls>(value.clone()) {
                Ok(tls) => Ok(tls.block()),
                Err(_) => Err(TlsError {
                    field: "tls".into(),
                    reason: "expected `true`, `false` or a block of caFile/ca, certFile/cert, keyFile/key, \
                             serverName, insecureSkipVerify"
                        .into(),
                }),
            },
        }
    }

    /// The settings to use when TLS is on (`true` gives the empty block: system roots).
    pub fn block(&self) -> Option<TlsBlock> {
        match self {
            Tls::Switch(true) => Some(TlsBlock::default()),
            Tls::Switch(false) => None,
            Tls::Block(block) => Some(block.clone()),
        }
    }

    /// True when TLS is on.
    pub fn enabled(&self) -> bool {
        !matches!(self, Tls::Switch(false))
    }
}

impl TlsBlock {
    /// Checks the block's shape: one of each inline/file pair, a key with every certificate.
    pub fn validate(&self) -> Result<(), TlsError> {
        let pairs = [
            (self.ca.is_some(), self.ca_file.is_some(), "ca", "caFile"),
            (self.cert.is_some(), self.cert_file.is_some(), "cert", "certFile"),
            (self.key.is_some(), self.key_file.is_some(), "key", "keyFile"),
        ];
        for (inline, file, a, b) in pairs {
            if inline && file {
                return Err(TlsError::new(b, format!("give one of `{a}` or `{b}`, not both")));
            }
        }
        let cert = self.cert.is_some() || self.cert_file.is_some();
        let key = self.key.is_some() || self.key_file.is_some();
        match (cert, key) {
            (true, false) => {
                Err(TlsError::new("key", "a client certificate needs its key (`key` or `keyFile`)"))
            }
            (false, true) => {
                Err(TlsError::new("cert", "a client key needs its certificate (`cert` or `certFile`)"))
            }
            _ => Ok(()),
        }
    }

    /// True when the block only turns TLS on (system roots, no client certificate).
    pub fn is_plain(&self) -> bool {
        self == &TlsBlock::default()
    }

    /// Reads the files the block names and checks that every PEM parses.
    pub fn load(&self) -> Result<TlsPem, TlsError> {
        self.validate()?;
        let ca = read(&self.ca, &self.ca_file, "ca", "caFile")?;
        if let Some(pem) = &ca {
            certificates(pem, if self.ca.is_some() { "ca" } else { "caFile" })?;
        }
        let cert = read(&self.cert, &self.cert_file, "cert", "certFile")?;
        let key = read(&self.key, &self.key_file, "key", "keyFile")?;
        let identity = match (cert, key) {
            (Some(cert), Some(key)) => {
                certificates(&cert, if self.cert.is_some() { "cert" } else { "certFile" })?;
                private_key(&key, if self.key.is_some() { "key" } else { "keyFile" })?;
                Some((cert, key))
            }
            _ => None,
        };
        if let Some(name) = &self.server_name {
            ServerName::try_from(name.as_str()).map_err(|_| {
                TlsError::new("serverName", format!("`{name}` is not a host name or IP address"))
            })?;
        }
        Ok(TlsPem {
            ca,
            identity,
            server_name: self.server_name.clone(),
            insecure: self.insecure_skip_verify == Some(true),
        })
    }

    /// A rustls client config: the block's CA (else the system's roots), its client
    /// certificate, and no verification when `insecureSkipVerify`.
    pub fn client_config(&self) -> Result<ClientConfig, TlsError> {
        self.load()?.client_config()
    }
}

impl TlsPem {
    /// A rustls client config for what was read (see [`TlsBlock::client_config`]).
    pub fn client_config(&self) -> Result<ClientConfig, TlsError> {
        install_crypto_provider();
        let builder = if self.insecure {
            let provider = rustls::crypto::CryptoProvider::get_default()
                .cloned()
                .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
            ClientConfig::builder()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider)))
        } else if let Some(name) = &self.server_name {
            // Clients connect (and send SNI) with the host they were given; the name the
            // certificate is checked against is the verifier's to decide.
            let name = ServerName::try_from(name.clone()).map_err(|_| {
                TlsError::new("serverName", format!("`{name}` is not a host name or IP address"))
            })?;
            let inner = WebPkiServerVerifier::builder(Arc::new(self.roots()?))
                .build()
                .map_err(|e| TlsError::new("ca", format!("is not a usable CA ({e})")))?;
            ClientConfig::builder()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NameCheck { inner, name: Some(name) }))
        } else {
            ClientConfig::builder().with_root_certificates(self.roots()?)
        };
        match &self.identity {
            None => Ok(builder.with_no_client_auth()),
            Some((cert, key)) => {
                let chain = certificates(cert, "cert")?;
                let key = private_key(key, "key")?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| TlsError::new("key", format!("does not fit the client certificate ({e})")))
            }
        }
    }

    /// The roots to verify servers with: the private CA, else the system's.
    pub fn roots(&self) -> Result<RootCertStore, TlsError> {
        let mut roots = RootCertStore::empty();
        match &self.ca {
            Some(pem) => {
                for cert in certificates(pem, "ca")? {
                    roots.add(cert).map_err(|e| TlsError::new("ca", format!("is not a usable CA ({e})")))?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                for cert in found.certs {
                    // A system root rustls cannot use is skipped, as browsers do.
                    let _ = roots.add(cert);
                }
                if roots.is_empty() {
                    return Err(TlsError {
                        field: "tls".into(),
                        reason: "the system has no usable CA certificates; give `tls.ca` or `tls.caFile`"
                            .into(),
                    });
                }
            }
        }
        Ok(roots)
    }
}

/// Installs rustls's `ring` provider as the process default unless one is installed already.
pub fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

fn read(
    inline: &Option<String>,
    file: &Option<String>,
    a: &str,
    b: &str,
) -> Result<Option<String>, TlsError> {
    match (inline, file) {
        (Some(pem), _) if pem.trim().is_empty() => Err(TlsError::new(a, "is empty")),
        (Some(pem), _) => Ok(Some(pem.clone())),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map(Some)
            .map_err(|e| TlsError::new(b, format!("`{path}` cannot be read ({})", e.kind()))),
        (None, None) => Ok(None),
    }
}

fn certificates(pem: &str, field: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| TlsError::new(field, "is not valid PEM"))?;
    if certs.is_empty() {
        return Err(TlsError::new(field, "holds no PEM certificate (`-----BEGIN CERTIFICATE-----`)"));
    }
    Ok(certs)
}

fn private_key(pem: &str, field: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|_| TlsError::new(field, "holds no PEM private key (PKCS#8, PKCS#1 or SEC1)"))
}

/// The verifier of `insecureSkipVerify`: any certificate, signatures still checked.
#[derive(Debug)]
struct AcceptAnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A chain verifier whose certificate-name check is set: against `serverName` (`Some`), or
/// none at all (`None`: PostgreSQL's `verify-ca`).
#[derive(Debug)]
struct NameCheck {
    inner: Arc<WebPkiServerVerifier>,
    name: Option<ServerName<'static>>,
}

/// A verifier of the server's chain against `roots` that does not check the name the
/// certificate is for (libpq's `verify-ca`).
pub fn chain_only_verifier(roots: RootCertStore) -> Result<Arc<dyn ServerCertVerifier>, TlsError> {
    let inner = WebPkiServerVerifier::builder(Arc::new(roots))
        .build()
        .map_err(|e| TlsError::new("ca", format!("is not a usable CA ({e})")))?;
    Ok(Arc::new(NameCheck { inner, name: None }))
}

impl ServerCertVerifier for NameCheck {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let name = self.name.as_ref().unwrap_or(server_name);
        match self.inner.verify_server_cert(end_entity, intermediates, name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if self.name.is_none() => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A connect failure of `kind` on `target` (e.g. `redis host:port`) caused by `error`; when
/// `error` is a failed TLS handshake, a non-retryable one saying what is wrong with the
/// certificates and which `tls` field to look at.
pub fn connect_error(
    target: impl Into<String>,
    kind: crate::FailureKind,
    error: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> crate::Error {
    let error = error.into();
    match handshake_failure(&*error) {
        Some(why) => {
            let cause = crate::Cause::new(error);
            crate::Error::Transport {
                op: crate::Op::Connect,
                target: target.into(),
                message: format!("TLS handshake failed, a certificate problem: {why} ({cause})"),
                kind: crate::FailureKind::Invalid,
                source: Some(cause),
            }
        }
        None => crate::Error::transport_from(crate::Op::Connect, target, kind, error),
    }
}

/// When `error` or an error under it is a failed TLS handshake: what went wrong, in words.
pub fn handshake_failure(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(explain(tls));
        }
        // An I/O error may carry the TLS error it stands for, and a client may keep it in an
        // `Arc` (redis): their `source` skips it.
        let inner: Option<&(dyn std::error::Error + 'static)> =
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                io.get_ref().map(|inner| inner as _)
            } else {
                e.downcast_ref::<Arc<dyn std::error::Error + Send + Sync>>().map(|arc| &**arc as _)
            };
        if let Some(why) = inner.and_then(handshake_failure) {
            return Some(why);
        }
        next = e.source();
    }
    None
}

fn explain(e: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => {
            "the server's certificate is not signed by a CA this env trusts; set `tls.caFile` (or `tls.ca`) \
             to the CA that signed it"
                .into()
        }
        rustls::Error::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            "the server's certificate is not issued for the host connected to; connect by a name it holds \
             or set `tls.serverName`"
                .into()
        }
        rustls::Error::InvalidCertificate(
            C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. },
        ) => "the server's certificate is expired or not yet valid".into(),
        rustls::Error::InvalidCertificate(_) => "the server's certificate was refused".into(),
        rustls::Error::AlertReceived(alert) => format!(
            "the server ended the handshake ({alert:?}); it may require a client certificate \
             (`tls.certFile` and `tls.keyFile`) signed by a CA it trusts"
        ),
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            "the server did not answer in TLS; is this port serving TLS?".into()
        }
        _ => "the TLS session could not be set up".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn true_false_and_a_block_read_as_expected() {
        assert_eq!(Tls::from_config(&json!({})).unwrap(), None);
        assert_eq!(Tls::from_config(&json!({"tls": false})).unwrap(), None);
        assert_eq!(Tls::from_config(&json!({"tls": true})).unwrap(), Some(TlsBlock::default()));
        let block =
            Tls::from_config(&json!({"tls": {"caFile": "ca.pem", "serverName": "h"}})).unwrap().unwrap();
        assert_eq!((block.ca_file.as_deref(), block.server_name.as_deref()), (Some("ca.pem"), Some("h")));
    }

    #[test]
    fn a_misspelt_field_or_a_wrong_type_is_refused() {
        assert_eq!(Tls::from_config(&json!({"tls": {"caFiles": "x"}})).unwrap_err().field, "tls");
        assert_eq!(Tls::from_config(&json!({"tls": "yes"})).unwrap_err().field, "tls");
    }

    #[test]
    fn pairs_and_identities_are_checked() {
        let both = TlsBlock { ca: Some("x".into()), ca_file: Some("y".into()), ..Default::default() };
        assert_eq!(both.validate().unwrap_err().field, "tls.caFile");
        let no_key = TlsBlock { cert: Some("x".into()), ..Default::default() };
        assert_eq!(no_key.validate().unwrap_err().field, "tls.key");
        let no_cert = TlsBlock { key_file: Some("k".into()), ..Default::default() };
        assert_eq!(no_cert.validate().unwrap_err().field, "tls.cert");
    }

    #[test]
    fn bad_pem_names_the_field_but_not_the_key() {
        let block = TlsBlock {
            cert: Some("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into()),
            key: Some("hunter2-not-a-key".into()),
            ..Default::default()
        };
        let e = block.load().unwrap_err();
        assert!(e.field == "tls.cert" || e.field == "tls.key", "{e}");
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let missing = TlsBlock { ca_file: Some("/nonexistent/ca.pem".into()), ..Default::default() };
        let e = missing.load().unwrap_err();
        assert_eq!(e.field, "tls.caFile");
        assert!(e.reason.contains("cannot be read"), "{e}");
    }

    #[test]
    fn insecure_needs_no_roots() {
        let block = TlsBlock { insecure_skip_verify: Some(true), ..Default::default() };
        assert!(block.client_config().is_ok());
    }

    #[test]
    fn a_handshake_failure_under_an_io_error_is_explained() {
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        let e = connect_error("redis h:1", crate::FailureKind::Unavailable, io);
        assert_eq!(e.code(), "CONNECT_FAILED");
        assert_eq!(e.failure_kind(), Some(crate::FailureKind::Invalid));
        let text = e.to_string();
        assert!(text.starts_with("connect failed on redis h:1: TLS handshake failed"), "{text}");
        assert!(text.contains("tls.caFile"), "{text}");
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = connect_error("redis h:1", crate::FailureKind::Unavailable, refused);
        assert_eq!(e.failure_kind(), Some(crate::FailureKind::Unavailable));
    }

    #[test]
    fn a_server_name_must_be_a_host_name() {
        let block = TlsBlock { server_name: Some("not a name!".into()), ..Default::default() };
        assert_eq!(block.client_config().unwrap_err().field, "tls.serverName");
    }
}
