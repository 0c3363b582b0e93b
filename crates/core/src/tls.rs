//! The TLS block every broker type and the registry share: `tls: true` (system roots), or
//! `tls: {caFile | ca, certFile | cert, keyFile | key, serverName, insecureSkipVerify}`.
//!
//! Certificates and keys are PEM, inline or in files; an inline `key` is a secret (written as
//! a `${VAR}` reference and redacted like a password). Errors name the field, never a key's
//! content. [`TlsBlock::load`] reads what the block names; [`TlsBlock::client_config`] turns
//! it into a rustls client config for the clients that take one.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
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
}
