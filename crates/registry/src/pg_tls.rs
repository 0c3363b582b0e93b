//! TLS for the PostgreSQL registry, from libpq's URL parameters: `sslmode` (`disable`,
//! `prefer` — the default —, `require`, `verify-ca`, `verify-full`), `sslrootcert`, `sslcert`
//! and `sslkey`, through rustls.
//!
//! As in libpq, `prefer` and `require` encrypt without checking the server's certificate
//! (unless `sslrootcert` is given: then `require` checks the chain, as `verify-ca` does);
//! `verify-ca` checks the chain, `verify-full` the chain and the host name. The roots are
//! `sslrootcert`'s certificates, or the system's (`sslrootcert=system`, or none given with a
//! `verify-*` mode).

use polybus_core::tls::{TlsBlock, chain_only_verifier};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

/// The URL parameters this module reads (tokio-postgres refuses all but `sslmode`'s first three values).
const PARAMETERS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// How the registry's connection is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Plain TCP.
    Disable,
    /// TLS when the server offers it, unverified.
    Prefer,
    /// TLS always, unverified unless a root certificate is given.
    Require,
    /// TLS, the server's chain checked.
    VerifyCa,
    /// TLS, chain and host name checked.
    VerifyFull,
}

/// The TLS settings of a registry URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PgTls {
    pub mode: Mode,
    root: Option<String>,
    cert: Option<String>,
    key: Option<String>,
}

/// Splits the TLS parameters out of `url`: what tokio-postgres parses, and the TLS settings.
pub(crate) fn split(url: &str) -> Result<(String, PgTls), String> {
    let mut tls = PgTls { mode: Mode::Prefer, root: None, cert: None, key: None };
    let rest = if url.contains("://") {
        let Some((base, query)) = url.split_once('?') else { return Ok((url.to_owned(), tls)) };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            if PARAMETERS.contains(&name) {
                let value = percent_encoding::percent_decode_str(value)
                    .decode_utf8()
                    .map_err(|_| format!("`{name}` is not UTF-8"))?;
                tls.set(name, &value)?;
            } else {
                kept.push(pair);
            }
        }
        if kept.is_empty() { base.to_owned() } else { format!("{base}?{}", kept.join("&")) }
    } else {
        // key=value settings, unquoted values only for the TLS parameters.
        let mut kept = Vec::new();
        for token in url.split_whitespace() {
            match token.split_once('=') {
                Some((name, value)) if PARAMETERS.contains(&name) => tls.set(name, value)?,
                _ => kept.push(token),
            }
        }
        kept.join(" ")
    };
    if tls.mode == Mode::Disable && (tls.root.is_some() || tls.cert.is_some()) {
        return Err("`sslmode=disable` with `sslrootcert`/`sslcert`: remove one or the other".into());
    }
    if tls.cert.is_some() != tls.key.is_some() {
        return Err("`sslcert` and `sslkey` go together".into());
    }
    Ok((rest, tls))
}

impl PgTls {
    fn set(&mut self, name: &str, value: &str) -> Result<(), String> {
        match name {
            "sslmode" => {
                self.mode = match value {
                    "disable" => Mode::Disable,
                    "prefer" | "allow" => Mode::Prefer,
                    "require" => Mode::Require,
                    "verify-ca" => Mode::VerifyCa,
                    "verify-full" => Mode::VerifyFull,
                    other => {
                        return Err(format!(
                            "`sslmode={other}` is not one of disable, prefer, require, verify-ca, verify-full"
                        ));
                    }
                }
            }
            "sslrootcert" => self.root = Some(value.to_owned()).filter(|v| v != "system"),
            "sslcert" => self.cert = Some(value.to_owned()),
            _ => self.key = Some(value.to_owned()),
        }
        Ok(())
    }

    /// The mode tokio-postgres negotiates with.
    pub(crate) fn ssl_mode(&self) -> SslMode {
        match self.mode {
            Mode::Disable => SslMode::Disable,
            Mode::Prefer => SslMode::Prefer,
            _ => SslMode::Require,
        }
    }

    /// The TLS connector, or `None` for `disable`.
    pub(crate) fn connector(&self) -> Result<Option<MakeRustlsConnect>, String> {
        let verify = match self.mode {
            Mode::Disable => return Ok(None),
            Mode::Prefer | Mode::Require if self.root.is_none() => None,
            Mode::Prefer | Mode::Require | Mode::VerifyCa => Some(false),
            Mode::VerifyFull => Some(true),
        };
        let block = TlsBlock {
            ca_file: self.root.clone(),
            cert_file: self.cert.clone(),
            key_file: self.key.clone(),
            insecure_skip_verify: Some(verify.is_none()),
            ..TlsBlock::default()
        };
        let rename = |e: polybus_core::tls::TlsError| {
            let field = match e.field.as_str() {
                "tls.caFile" | "tls.ca" => "sslrootcert",
                "tls.certFile" | "tls.cert" => "sslcert",
                "tls.keyFile" | "tls.key" => "sslkey",
                other => other,
            };
            format!("`{field}`: {}", e.reason)
        };
        let pem = block.load().map_err(rename)?;
        let mut config = pem.client_config().map_err(rename)?;
        if verify == Some(false) {
            let chain = chain_only_verifier(pem.roots().map_err(rename)?).map_err(rename)?;
            config.dangerous().set_certificate_verifier(chain);
        }
        Ok(Some(MakeRustlsConnect::new(config)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_are_taken_out_and_the_rest_kept() {
        let (rest, tls) =
            split("postgres://u:p@h/db?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca.pem")
                .unwrap();
        assert_eq!(rest, "postgres://u:p@h/db?application_name=x");
        assert_eq!((tls.mode, tls.root.as_deref()), (Mode::VerifyFull, Some("/etc/ca.pem")));
        let (rest, tls) = split("postgres://h/db").unwrap();
        assert_eq!((rest.as_str(), tls.mode), ("postgres://h/db", Mode::Prefer));
        let (rest, tls) = split("host=h dbname=d sslmode=disable").unwrap();
        assert_eq!((rest.as_str(), tls.mode), ("host=h dbname=d", Mode::Disable));
        assert_eq!(split("postgres://h/db?sslmode=require&sslrootcert=system").unwrap().1.root, None);
    }

    #[test]
    fn wrong_settings_say_what_to_write() {
        assert!(split("postgres://h/db?sslmode=strict").unwrap_err().contains("verify-full"));
        assert!(split("postgres://h/db?sslcert=c.pem").unwrap_err().contains("sslkey"));
        assert!(split("postgres://h/db?sslmode=disable&sslrootcert=ca.pem").unwrap_err().contains("disable"));
        let missing = split("postgres://h/db?sslmode=verify-full&sslrootcert=/nonexistent.pem").unwrap().1;
        let e = missing.connector().err().expect("a missing root file is refused");
        assert!(e.starts_with("`sslrootcert`"), "{e}");
    }
}
