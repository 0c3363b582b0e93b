//! Secrets for `$Secret{name}` references: kept in the registry's store, encrypted at rest
//! with XChaCha20-Poly1305 under a 32-byte key that lives in a file, never in the store.
//!
//! The value is never handed out by listing: [`Secrets::list`] gives names and times, and only
//! [`Secrets::reveal`] decrypts, for the process that connects to a broker.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use chrono::{DateTime, Utc};
use polybus_core::secret::{SecretError, check_name};
use polybus_core::{Error, Result, ValidationError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::{Kind, Store};

/// Bytes in a key.
pub const KEY_BYTES: usize = 32;
/// Largest secret value, in bytes (an inline service-account JSON fits easily).
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
/// Name of the key file created beside a SQLite registry.
pub const DEFAULT_KEY_FILE: &str = "polybus-secrets.key";
/// How many times a write retries when another writer changed the same secret meanwhile.
const WRITE_RETRIES: usize = 8;
/// The only algorithm written so far, stored with each secret so it can change later.
const ALGORITHM: &str = "xchacha20poly1305";

/// The key secrets are encrypted with; zeroed when dropped, never printed.
#[derive(Clone)]
pub struct SecretsKey(Arc<Zeroizing<[u8; KEY_BYTES]>>);

impl std::fmt::Debug for SecretsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretsKey(id {})", self.id())
    }
}

impl SecretsKey {
    /// A new random key.
    pub fn generate() -> Self {
        let key = XChaCha20Poly1305::generate_key(&mut OsRng);
        let mut bytes = Zeroizing::new([0u8; KEY_BYTES]);
        bytes.copy_from_slice(&key);
        SecretsKey(Arc::new(bytes))
    }

    /// Reads a key file: 32 raw bytes, or 64 hexadecimal characters.
    pub fn load(path: &Path) -> Result<Self> {
        let shown = path.display();
        let content = Zeroizing::new(std::fs::read(path).map_err(|e| {
            unavailable(format!("cannot read the secrets key file {shown}: {}", io_reason(&e)))
        })?);
        let mut bytes = Zeroizing::new([0u8; KEY_BYTES]);
        let text = std::str::from_utf8(&content).map(str::trim).unwrap_or_default();
        if content.len() == KEY_BYTES {
            bytes.copy_from_slice(&content);
        } else if text.len() == 2 * KEY_BYTES && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            for (i, byte) in bytes.iter_mut().enumerate() {
                *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).unwrap_or_default();
            }
        } else {
            return Err(unavailable(format!(
                "the secrets key file {shown} holds neither {KEY_BYTES} bytes nor {} hexadecimal characters",
                2 * KEY_BYTES
            )));
        }
        warn_if_readable_by_others(path);
        Ok(SecretsKey(Arc::new(bytes)))
    }

    /// Reads the key file at `path`, creating it with a new random key (mode 0600) when missing.
    pub fn load_or_create(path: &Path) -> Result<Self> {
        let key = SecretsKey::generate();
        match create_private(path) {
            Ok(mut file) => {
                file.write_all(&key.0[..]).and_then(|()| file.sync_all()).map_err(|e| {
                    unavailable(format!(
                        "cannot write the secrets key file {}: {}",
                        path.display(),
                        io_reason(&e)
                    ))
                })?;
                tracing::info!(path = %path.display(), id = %key.id(), "created a secrets key file");
                Ok(key)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => SecretsKey::load(path),
            Err(e) => Err(unavailable(format!(
                "cannot create the secrets key file {}: {}",
                path.display(),
                io_reason(&e)
            ))),
        }
    }

    /// A short fingerprint of the key, stored with each secret to tell "another key" from damage.
    pub fn id(&self) -> String {
        let digest =
            Sha256::new().chain_update(b"polybus secrets key id\0").chain_update(&self.0[..]).finalize();
        digest[..6].iter().map(|b| format!("{b:02x}")).collect()
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new((&self.0[..]).into())
    }
}

/// Where a registry keeps its secrets key by default: [`DEFAULT_KEY_FILE`] in the folder of a
/// SQLite registry; `None` for PostgreSQL (replicas must be given one shared file).
pub fn default_key_path(registry_url: &str) -> Option<PathBuf> {
    if crate::is_postgres_url(registry_url) {
        return None;
    }
    let path = Path::new(registry_url.strip_prefix("sqlite://").unwrap_or(registry_url));
    let folder = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    Some(folder.join(DEFAULT_KEY_FILE))
}

/// The key for the registry at `registry_url`: `file` when given, else the default file
/// beside a SQLite registry. With `create`, a missing file is created (never for a file given
/// to a PostgreSQL registry, which every replica must share). `Ok(Err(reason))`: there is no
/// key, and why.
pub fn find_key(
    registry_url: &str,
    file: Option<&Path>,
    create: bool,
) -> Result<std::result::Result<SecretsKey, String>> {
    let postgres = crate::is_postgres_url(registry_url);
    let path = match (file, default_key_path(registry_url)) {
        (Some(file), _) => file.to_path_buf(),
        (None, Some(default)) => default,
        (None, None) => {
            return Ok(Err("the registry is PostgreSQL and no secrets key file was given: start every \
                           server replica with the same `--secrets-key-file` (32 random bytes, mode 0600)"
                .to_owned()));
        }
    };
    if create && !(postgres && file.is_some()) {
        return SecretsKey::load_or_create(&path).map(Ok);
    }
    if file.is_none() && !path.exists() {
        return Ok(Err(format!(
            "no secrets key file at {} yet (`polybus secret set` creates it)",
            path.display()
        )));
    }
    SecretsKey::load(&path).map(Ok)
}

#[cfg(unix)]
fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)
}

#[cfg(not(unix))]
fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new().write(true).create_new(true).open(path)
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(path = %path.display(), "the secrets key file can be read by other users: chmod 600 it");
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_path: &Path) {}

fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".to_owned(),
        std::io::ErrorKind::PermissionDenied => "permission denied".to_owned(),
        _ => e.to_string(),
    }
}

fn unavailable(reason: String) -> Error {
    SecretError::StoreUnavailable(reason).into()
}

/// What is known about a secret without revealing it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretInfo {
    /// The name `$Secret{name}` refers to.
    pub name: String,
    /// When it was first set.
    pub created_at: DateTime<Utc>,
    /// When it was last set.
    pub updated_at: DateTime<Utc>,
}

/// The stored record: the info, and the value encrypted.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Sealed {
    #[serde(flatten)]
    info: SecretInfo,
    algorithm: String,
    key_id: String,
    nonce: String,
    ciphertext: String,
}

/// The secrets of a registry: set, list, delete, and reveal for connecting.
#[derive(Clone)]
pub struct Secrets {
    store: Arc<dyn Store>,
    key: std::result::Result<SecretsKey, String>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets").field("key", &self.key).finish_non_exhaustive()
    }
}

impl Secrets {
    /// The secrets in `store`, encrypted with `key`.
    pub fn new(store: Arc<dyn Store>, key: SecretsKey) -> Self {
        Secrets { store, key: Ok(key) }
    }

    /// The secrets in `store` without a key: they can be listed and deleted, not set or revealed;
    /// `reason` says why there is no key and what to do.
    pub fn without_key(store: Arc<dyn Store>, reason: impl Into<String>) -> Self {
        Secrets { store, key: Err(reason.into()) }
    }

    /// [`Secrets::new`] or [`Secrets::without_key`], as `key` says.
    pub fn with_key(store: Arc<dyn Store>, key: std::result::Result<SecretsKey, String>) -> Self {
        Secrets { store, key }
    }

    /// True when values can be set and revealed.
    pub fn has_key(&self) -> bool {
        self.key.is_ok()
    }

    /// Why there is no key, when there is none.
    pub fn without_key_reason(&self) -> Option<&str> {
        self.key.as_ref().err().map(String::as_str)
    }

    fn key(&self) -> Result<&SecretsKey> {
        self.key.as_ref().map_err(|reason| unavailable(reason.clone()))
    }

    /// Stores `value` under `name`, replacing the value it had.
    pub async fn set(&self, name: &str, value: &str) -> Result<SecretInfo> {
        check_name(name).map_err(|m| ValidationError::field("name", m))?;
        if value.is_empty() {
            return Err(ValidationError::field("value", "a secret value is not empty").into());
        }
        if value.len() > MAX_VALUE_BYTES {
            return Err(ValidationError::field("value", format!("at most {MAX_VALUE_BYTES} bytes")).into());
        }
        let key = self.key()?;
        for _ in 0..WRITE_RETRIES {
            let now = Utc::now();
            let current = self.store.get(Kind::Secret, name).await?;
            let created_at = match &current {
                Some(record) => read_sealed(&record.key, record.doc.clone())?.info.created_at,
                None => now,
            };
            let info = SecretInfo { name: name.to_owned(), created_at, updated_at: now };
            let doc = seal(key, info.clone(), value)?;
            let written = match current {
                Some(record) => self.store.replace(Kind::Secret, name, record.version, &doc).await?,
                None => match self.store.insert(Kind::Secret, name, None, &doc).await {
                    Ok(()) => true,
                    Err(Error::AlreadyExists { .. }) => false,
                    Err(e) => return Err(e),
                },
            };
            if written {
                tracing::info!(secret = %name, "secret set");
                return Ok(info);
            }
        }
        Err(Error::Storage(format!("secret `{name}` kept changing under concurrent writes; try again")))
    }

    /// Every secret's name and times, ordered by name; never a value.
    pub async fn list(&self) -> Result<Vec<SecretInfo>> {
        let records = self.store.list(Kind::Secret, None).await?;
        records.into_iter().map(|r| read_sealed(&r.key, r.doc).map(|s| s.info)).collect()
    }

    /// True when a secret with this name exists.
    pub async fn exists(&self, name: &str) -> Result<bool> {
        Ok(self.store.get(Kind::Secret, name).await?.is_some())
    }

    /// Deletes a secret; `SECRET_NOT_FOUND` when there is none with this name.
    pub async fn delete(&self, name: &str) -> Result<()> {
        if !self.store.delete(Kind::Secret, name).await? {
            return Err(SecretError::NotFound(name.to_owned()).into());
        }
        tracing::info!(secret = %name, "secret deleted");
        Ok(())
    }

    /// The value of a secret, decrypted; `None` when there is no such secret. For connecting
    /// only: never return it to a caller.
    pub async fn reveal(&self, name: &str) -> Result<Option<Zeroizing<String>>> {
        let Some(record) = self.store.get(Kind::Secret, name).await? else { return Ok(None) };
        let sealed = read_sealed(name, record.doc)?;
        let key = self.key()?;
        if sealed.key_id != key.id() {
            return Err(unavailable(format!(
                "secret `{name}` was encrypted with another key (id {}) than this process has (id {}): \
                 every process using this registry needs the same secrets key file",
                sealed.key_id,
                key.id()
            )));
        }
        let damaged =
            || unavailable(format!("secret `{name}` is damaged in the registry and cannot be decrypted"));
        let nonce = BASE64.decode(&sealed.nonce).map_err(|_| damaged())?;
        let ciphertext = BASE64.decode(&sealed.ciphertext).map_err(|_| damaged())?;
        if nonce.len() != 24 || sealed.algorithm != ALGORITHM {
            return Err(damaged());
        }
        let plain = key
            .cipher()
            .decrypt(XNonce::from_slice(&nonce), Payload { msg: &ciphertext, aad: &aad(name) })
            .map_err(|_| damaged())?;
        let plain = Zeroizing::new(plain);
        let text = String::from_utf8(plain.to_vec()).map_err(|_| damaged())?;
        Ok(Some(Zeroizing::new(text)))
    }
}

/// Ties a ciphertext to its name, so a stored value cannot be moved to another name.
fn aad(name: &str) -> Vec<u8> {
    format!("polybus secret {name}").into_bytes()
}

fn seal(key: &SecretsKey, info: SecretInfo, value: &str) -> Result<serde_json::Value> {
    let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
    let ciphertext = key
        .cipher()
        .encrypt(&nonce, Payload { msg: value.as_bytes(), aad: &aad(&info.name) })
        .map_err(|_| unavailable("encrypting the secret failed".into()))?;
    let sealed = Sealed {
        info,
        algorithm: ALGORITHM.to_owned(),
        key_id: key.id(),
        nonce: BASE64.encode(nonce),
        ciphertext: BASE64.encode(ciphertext),
    };
    serde_json::to_value(sealed).map_err(|e| Error::Storage(format!("cannot encode a secret: {e}")))
}

fn read_sealed(name: &str, doc: serde_json::Value) -> Result<Sealed> {
    serde_json::from_value(doc)
        .map_err(|e| Error::Storage(format!("stored secret `{name}` is unreadable: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_are_created_private_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DEFAULT_KEY_FILE);
        let created = SecretsKey::load_or_create(&path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap().len(), KEY_BYTES);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        assert_eq!(SecretsKey::load_or_create(&path).unwrap().id(), created.id());
        let hex: String = std::fs::read(&path).unwrap().iter().map(|b| format!("{b:02x}")).collect();
        let hex_path = dir.path().join("hex.key");
        std::fs::write(&hex_path, format!("{hex}\n")).unwrap();
        assert_eq!(SecretsKey::load(&hex_path).unwrap().id(), created.id());
        assert!(!format!("{created:?}").contains(&hex[..8]));

        std::fs::write(&hex_path, "short").unwrap();
        let err = SecretsKey::load(&hex_path).unwrap_err();
        assert_eq!(err.code(), "SECRETS_UNAVAILABLE");
        let err = SecretsKey::load(&dir.path().join("missing.key")).unwrap_err();
        assert!(err.to_string().contains("no such file"), "{err}");
    }

    #[test]
    fn the_key_lives_beside_a_sqlite_registry_and_must_be_given_for_postgres() {
        assert_eq!(default_key_path("polybus.db"), Some(PathBuf::from("./polybus-secrets.key")));
        assert_eq!(default_key_path("sqlite://app/reg.db"), Some(PathBuf::from("app/polybus-secrets.key")));
        assert_eq!(default_key_path("postgres://u@h/db"), None);

        let dir = tempfile::tempdir().unwrap();
        let registry = dir.path().join("reg.db").display().to_string();
        let reason = find_key(&registry, None, false).unwrap().unwrap_err();
        assert!(reason.contains("no secrets key file"), "{reason}");
        let created = find_key(&registry, None, true).unwrap().unwrap();
        assert!(dir.path().join(DEFAULT_KEY_FILE).exists());
        assert_eq!(find_key(&registry, None, false).unwrap().unwrap().id(), created.id());

        let postgres = "postgres://u@127.0.0.1/db";
        let reason = find_key(postgres, None, true).unwrap().unwrap_err();
        assert!(reason.contains("--secrets-key-file"), "{reason}");
        let missing = dir.path().join("shared.key");
        let err = find_key(postgres, Some(&missing), true).unwrap_err();
        assert!(err.to_string().contains("no such file"), "{err}");
        assert!(!missing.exists());
        let given = dir.path().join(DEFAULT_KEY_FILE);
        assert_eq!(find_key(postgres, Some(&given), true).unwrap().unwrap().id(), created.id());
    }
}
