//! API keys: created once and shown once, stored as a SHA-256 hash with a short prefix for
//! display, in the registry's store (so every server replica on one registry knows them).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use chrono::{DateTime, Utc};
use polybus::core::ValidationError;
use polybus::{Error, Registry, Result, Store};
use polybus_registry::Kind;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{Mutex, watch};
use utoipa::ToSchema;

/// Every key starts with this, so a leaked one is easy to recognise.
pub const KEY_PREFIX: &str = "pbk_";
/// Characters of a key kept for display (`pbk_` and 8 more).
const SHOWN: usize = 12;
/// Random bytes in a key.
const SECRET_BYTES: usize = 32;
/// How long the known keys are trusted before the store is read again (how late a revocation
/// made by another process takes effect).
const REFRESH_AFTER: Duration = Duration::from_secs(1);
/// Least time between two reads of the store caused by unknown keys.
const MISS_RELOAD_AFTER: Duration = Duration::from_millis(200);
/// While event streams are open, how often the store is read for revocations made by another
/// process (`polybus key revoke`): a revoked key's streams end within this and one sweep.
const WATCHED_RELOAD_AFTER: Duration = Duration::from_millis(250);

/// The key a request was made with: its name, and a fingerprint to recognise it by (the hash
/// the store keeps; never the key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The key's name.
    pub name: String,
    /// The key's SHA-256, hex.
    pub fingerprint: String,
}

/// Completes when a key is revoked.
pub struct KeyWatch {
    current: watch::Receiver<Option<Arc<HashMap<String, KeyInfo>>>>,
    fingerprint: String,
}

impl KeyWatch {
    /// Completes once the key is no longer a current key.
    pub async fn revoked(&mut self) {
        let fingerprint = &self.fingerprint;
        let gone =
            self.current.wait_for(|known| known.as_ref().is_some_and(|k| !k.contains_key(fingerprint)));
        if gone.await.is_err() {
            // The keys are gone with the server; its shutdown ends the streams.
            std::future::pending::<()>().await;
        }
    }
}

/// What is known about a key (never the key itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyInfo {
    /// Unique name, `[a-z0-9][a-z0-9-_]*`.
    pub name: String,
    /// The key's first characters, to recognise it.
    pub prefix: String,
    /// A read-only key cannot create, change, delete, publish, consume or ack.
    pub read_only: bool,
    /// When it was created.
    pub created_at: DateTime<Utc>,
}

/// A new key: the secret, shown once, and what is stored about it.
#[derive(Debug, Clone)]
pub struct NewKey {
    /// The key to send as `Authorization: Bearer <key>`; not stored anywhere.
    pub secret: String,
    /// What is stored about it.
    pub info: KeyInfo,
}

/// The stored record: the key's info and the hex SHA-256 of the key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredKey {
    #[serde(flatten)]
    info: KeyInfo,
    sha256: String,
}

#[derive(Default)]
struct Known {
    loaded: Option<Instant>,
    by_hash: Arc<HashMap<String, KeyInfo>>,
}

/// Creates, lists, revokes and verifies API keys.
pub struct ApiKeys {
    store: Arc<dyn Store>,
    known: Mutex<Known>,
    /// The current keys by hash, each time they are read from the store.
    current: watch::Sender<Option<Arc<HashMap<String, KeyInfo>>>>,
}

impl ApiKeys {
    /// The keys kept in `registry`'s store.
    pub fn new(registry: &Registry) -> Self {
        ApiKeys {
            store: registry.store().clone(),
            known: Mutex::new(Known::default()),
            current: watch::channel(None).0,
        }
    }

    /// Creates a key named `name`; `Error::AlreadyExists` when the name is taken.
    pub async fn create(&self, name: &str, read_only: bool) -> Result<NewKey> {
        polybus::core::tag::check_tag(name).map_err(|e| ValidationError::field("name", e))?;
        let mut bytes = [0u8; SECRET_BYTES];
        rand::rng().fill_bytes(&mut bytes);
        let secret =
            format!("{KEY_PREFIX}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes));
        let info = KeyInfo {
            name: name.to_owned(),
            prefix: secret.chars().take(SHOWN).collect(),
            read_only,
            created_at: Utc::now(),
        };
        let stored = StoredKey { info: info.clone(), sha256: hash(&secret) };
        let doc = serde_json::to_value(&stored)
            .map_err(|e| Error::Storage(format!("cannot encode API key record: {e}")))?;
        self.store.insert(Kind::ApiKey, name, None, &doc).await?;
        self.forget().await;
        tracing::info!(key = name, read_only, "API key created");
        Ok(NewKey { secret, info })
    }

    /// Every key, ordered by name.
    pub async fn list(&self) -> Result<Vec<KeyInfo>> {
        Ok(self.load().await?.into_iter().map(|k| k.info).collect())
    }

    /// Revokes the key named `name`; false when there is none.
    pub async fn revoke(&self, name: &str) -> Result<bool> {
        let revoked = self.store.delete(Kind::ApiKey, name).await?;
        self.forget().await;
        // Streams of the revoked key end now rather than at the next periodic read.
        self.reload(&mut *self.known.lock().await).await?;
        if revoked {
            tracing::info!(key = name, "API key revoked");
        }
        Ok(revoked)
    }

    /// The key `secret` is, if it is a current key.
    pub async fn verify(&self, secret: &str) -> Result<Option<KeyInfo>> {
        if !secret.starts_with(KEY_PREFIX) || secret.len() > 128 {
            return Ok(None);
        }
        let digest = hash(secret);
        let mut known = self.known.lock().await;
        let fresh = known.loaded.is_some_and(|at| at.elapsed() < REFRESH_AFTER);
        if fresh && let Some(info) = known.by_hash.get(&digest) {
            return Ok(Some(info.clone()));
        }
        // A key created or revoked by another process shows up at the next read of the store.
        let may_reload = known.loaded.is_none_or(|at| at.elapsed() >= MISS_RELOAD_AFTER);
        if !fresh || may_reload {
            self.reload(&mut known).await?;
        }
        Ok(known.by_hash.get(&digest).cloned())
    }

    /// The fingerprint of a key, as [`Caller::fingerprint`].
    pub fn fingerprint(secret: &str) -> String {
        hash(secret)
    }

    /// Watches the key with this fingerprint for its revocation.
    pub fn watch(&self, fingerprint: &str) -> KeyWatch {
        KeyWatch { current: self.current.subscribe(), fingerprint: fingerprint.to_owned() }
    }

    /// Reads the store again when someone watches for revocations and the last read is older
    /// than a quarter second; called by the server's sweep.
    pub async fn refresh_watched(&self) -> Result<()> {
        if self.current.receiver_count() == 0 {
            return Ok(());
        }
        let mut known = self.known.lock().await;
        if known.loaded.is_none_or(|at| at.elapsed() >= WATCHED_RELOAD_AFTER) {
            self.reload(&mut known).await?;
        }
        Ok(())
    }

    async fn reload(&self, known: &mut Known) -> Result<()> {
        let keys = self.load().await?;
        known.by_hash = Arc::new(keys.into_iter().map(|k| (k.sha256, k.info)).collect());
        known.loaded = Some(Instant::now());
        self.current.send_replace(Some(known.by_hash.clone()));
        Ok(())
    }

    async fn load(&self) -> Result<Vec<StoredKey>> {
        let records = self.store.list(Kind::ApiKey, None).await?;
        records
            .into_iter()
            .map(|record| {
                serde_json::from_value(record.doc).map_err(|e| {
                    Error::Storage(format!("stored API key `{}` is unreadable: {e}", record.key))
                })
            })
            .collect()
    }

    async fn forget(&self) {
        *self.known.lock().await = Known::default();
    }
}

/// Hex SHA-256 of a key.
fn hash(secret: &str) -> String {
    Sha256::digest(secret.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn keys() -> (tempfile::TempDir, ApiKeys) {
        let dir = tempfile::tempdir().expect("tempdir");
        let registry =
            Registry::open(&dir.path().join("r.db").display().to_string()).await.expect("registry");
        (dir, ApiKeys::new(&registry))
    }

    #[tokio::test]
    async fn created_key_verifies_until_revoked_and_only_its_hash_is_stored() {
        let (_dir, keys) = keys().await;
        let new = keys.create("ci", true).await.expect("create");
        assert!(new.secret.starts_with(KEY_PREFIX) && new.secret.len() > 40, "{}", new.secret);
        assert!(new.secret.starts_with(&new.info.prefix));
        let record = keys.store.get(Kind::ApiKey, "ci").await.expect("get").expect("stored");
        assert!(!record.doc.to_string().contains(&new.secret));
        assert_eq!(keys.verify(&new.secret).await.expect("verify"), Some(new.info.clone()));
        assert_eq!(keys.verify("pbk_wrong").await.expect("verify"), None);
        assert!(keys.revoke("ci").await.expect("revoke"));
        assert_eq!(keys.verify(&new.secret).await.expect("verify"), None);
        assert!(!keys.revoke("ci").await.expect("revoke again"));
    }

    #[tokio::test]
    async fn names_are_unique_and_tag_shaped() {
        let (_dir, keys) = keys().await;
        keys.create("admin", false).await.expect("create");
        assert!(matches!(keys.create("admin", true).await, Err(Error::AlreadyExists { .. })));
        assert!(matches!(keys.create("Not A Tag", true).await, Err(Error::Validation(_))));
        let listed = keys.list().await.expect("list");
        assert_eq!(listed.len(), 1);
        assert!(!listed[0].read_only);
    }
}
