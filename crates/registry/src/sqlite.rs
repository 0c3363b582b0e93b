//! The default store: one SQLite file, zero set-up.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use polybus_core::{Error, Result};
use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;

use crate::idempotency::{PurgeClock, millis, record};
use crate::{IdempotencyKey, IdempotencyRecord, IdempotencyStore, Kind, Record, Store};

/// A registry store in one SQLite file.
#[derive(Clone)]
pub struct SqliteStore {
    path: PathBuf,
    conn: Arc<Mutex<Connection>>,
    purge: Arc<PurgeClock>,
}

impl SqliteStore {
    /// Opens (creating when needed) the store at `path`.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let shown = path.display().to_string();
        let conn = tokio::task::spawn_blocking({
            let path = path.clone();
            move || -> rusqlite::Result<Connection> {
                let conn = Connection::open(&path)?;
                conn.busy_timeout(std::time::Duration::from_secs(5))?;
                conn.pragma_update(None, "journal_mode", "WAL")?;
                conn.pragma_update(None, "synchronous", "NORMAL")?;
                conn.execute_batch(
                    "CREATE TABLE IF NOT EXISTS records (
                        kind TEXT NOT NULL,
                        key TEXT NOT NULL,
                        parent TEXT,
                        version INTEGER NOT NULL,
                        doc TEXT NOT NULL,
                        updated_at TEXT NOT NULL,
                        PRIMARY KEY (kind, key)
                    );
                    CREATE INDEX IF NOT EXISTS records_parent ON records(kind, parent, key);
                    CREATE TABLE IF NOT EXISTS idempotency_keys (
                        env TEXT NOT NULL,
                        event TEXT NOT NULL,
                        key TEXT NOT NULL,
                        message_id TEXT NOT NULL,
                        state TEXT NOT NULL,
                        first_seen_ms INTEGER NOT NULL,
                        lease_until_ms INTEGER,
                        expires_at_ms INTEGER NOT NULL,
                        PRIMARY KEY (env, event, key)
                    );
                    CREATE INDEX IF NOT EXISTS idempotency_keys_expiry ON idempotency_keys(expires_at_ms);",
                )?;
                Ok(conn)
            }
        })
        .await
        .map_err(|e| Error::Storage(format!("opening {shown}: {e}")))?
        .map_err(|e| Error::Storage(format!("cannot open registry file {shown}: {e}")))?;
        Ok(SqliteStore { path, conn: Arc::new(Mutex::new(conn)), purge: Arc::default() })
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn with<T, F>(&self, what: &'static str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let conn = self.conn.clone();
        let shown = self.path.display().to_string();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            f(&mut guard)
        })
        .await
        .map_err(|e| Error::Storage(format!("{what} in {shown}: {e}")))?
        .map_err(|e| Error::Storage(format!("{what} in {shown}: {e}")))
    }
}

fn decode(key: String, version: i64, doc: String) -> rusqlite::Result<Record> {
    let doc: Value = serde_json::from_str(&doc).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })?;
    Ok(Record { key, version: version.max(0) as u64, doc })
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339()
}

#[async_trait]
impl Store for SqliteStore {
    async fn get(&self, kind: Kind, key: &str) -> Result<Option<Record>> {
        let key = key.to_owned();
        self.with("reading", move |c| {
            c.query_row(
                "SELECT key, version, doc FROM records WHERE kind = ?1 AND key = ?2",
                params![kind.as_str(), key],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?
            .map(|(k, v, d)| decode(k, v, d))
            .transpose()
        })
        .await
    }

    async fn list(&self, kind: Kind, parent: Option<&str>) -> Result<Vec<Record>> {
        let parent = parent.map(str::to_owned);
        self.with("listing", move |c| {
            let mut stmt = c.prepare(
                "SELECT key, version, doc FROM records
                 WHERE kind = ?1 AND (?2 IS NULL OR parent = ?2) ORDER BY key",
            )?;
            let rows =
                stmt.query_map(params![kind.as_str(), parent], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.map(|row| row.and_then(|(k, v, d)| decode(k, v, d))).collect()
        })
        .await
    }

    async fn insert(&self, kind: Kind, key: &str, parent: Option<&str>, doc: &Value) -> Result<()> {
        let (k, parent, doc) = (key.to_owned(), parent.map(str::to_owned), doc.to_string());
        let inserted = self
            .with("writing", move |c| {
                c.execute(
                    "INSERT OR IGNORE INTO records (kind, key, parent, version, doc, updated_at)
                     VALUES (?1, ?2, ?3, 1, ?4, ?5)",
                    params![kind.as_str(), k, parent, doc, now()],
                )
            })
            .await?;
        if inserted == 0 {
            return Err(Error::AlreadyExists { kind: kind.as_str(), tag: key.to_owned() });
        }
        Ok(())
    }

    async fn replace(&self, kind: Kind, key: &str, expected: u64, doc: &Value) -> Result<bool> {
        let (key, doc) = (key.to_owned(), doc.to_string());
        let changed = self
            .with("writing", move |c| {
                c.execute(
                    "UPDATE records SET doc = ?1, version = version + 1, updated_at = ?2
                     WHERE kind = ?3 AND key = ?4 AND version = ?5",
                    params![doc, now(), kind.as_str(), key, expected as i64],
                )
            })
            .await?;
        Ok(changed == 1)
    }

    async fn delete(&self, kind: Kind, key: &str) -> Result<bool> {
        let key = key.to_owned();
        let n = self
            .with("deleting", move |c| {
                c.execute("DELETE FROM records WHERE kind = ?1 AND key = ?2", params![kind.as_str(), key])
            })
            .await?;
        Ok(n == 1)
    }

    async fn ping(&self) -> Result<()> {
        self.with("checking", |c| c.query_row("SELECT 1", [], |_| Ok(()))).await
    }

    fn idempotency(&self) -> Option<&dyn IdempotencyStore> {
        Some(self)
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The owned columns that name a key, for a blocking closure.
fn key_params(key: &IdempotencyKey) -> (String, String, String) {
    (key.env.clone(), key.event.clone(), key.key.clone())
}

#[async_trait]
impl IdempotencyStore for SqliteStore {
    async fn try_claim(
        &self,
        key: &IdempotencyKey,
        message_id: &str,
        lease: Duration,
        window: Duration,
    ) -> Result<bool> {
        // Purging is housekeeping: its failure must not fail the publish.
        if self.purge.due() {
            match self.purge_expired().await {
                Ok(purged) => tracing::debug!(purged, "purged expired idempotency keys"),
                Err(e) => tracing::warn!(error = %e, "purging expired idempotency keys failed"),
            }
        }
        let (env, event, k) = key_params(key);
        let (id, lease, window) = (message_id.to_owned(), millis(lease), millis(window));
        let changed = self
            .with("claiming an idempotency key", move |c| {
                c.execute(
                    "INSERT INTO idempotency_keys
                        (env, event, key, message_id, state, first_seen_ms, lease_until_ms, expires_at_ms)
                     VALUES (?1, ?2, ?3, ?4, 'pending', ?5, ?5 + ?6, ?5 + ?7)
                     ON CONFLICT (env, event, key) DO UPDATE SET
                        message_id = excluded.message_id, state = 'pending',
                        first_seen_ms = excluded.first_seen_ms, lease_until_ms = excluded.lease_until_ms,
                        expires_at_ms = excluded.expires_at_ms
                     WHERE idempotency_keys.expires_at_ms <= ?5
                        OR (idempotency_keys.state = 'pending' AND idempotency_keys.lease_until_ms <= ?5)",
                    params![env, event, k, id, now_ms(), lease, window],
                )
            })
            .await?;
        Ok(changed == 1)
    }

    async fn complete(&self, key: &IdempotencyKey, message_id: &str, window: Duration) -> Result<bool> {
        let (env, event, k) = key_params(key);
        let (id, window) = (message_id.to_owned(), millis(window));
        let changed = self
            .with("marking an idempotency key published", move |c| {
                c.execute(
                    "UPDATE idempotency_keys
                     SET state = 'published', lease_until_ms = NULL, expires_at_ms = ?5 + ?6
                     WHERE env = ?1 AND event = ?2 AND key = ?3 AND message_id = ?4",
                    params![env, event, k, id, now_ms(), window],
                )
            })
            .await?;
        Ok(changed == 1)
    }

    async fn release(&self, key: &IdempotencyKey, message_id: &str) -> Result<bool> {
        let (env, event, k) = key_params(key);
        let id = message_id.to_owned();
        let deleted = self
            .with("releasing an idempotency key", move |c| {
                c.execute(
                    "DELETE FROM idempotency_keys
                     WHERE env = ?1 AND event = ?2 AND key = ?3 AND message_id = ?4 AND state = 'pending'",
                    params![env, event, k, id],
                )
            })
            .await?;
        Ok(deleted == 1)
    }

    async fn get(&self, key: &IdempotencyKey) -> Result<Option<IdempotencyRecord>> {
        let (env, event, k) = key_params(key);
        let row = self
            .with("reading an idempotency key", move |c| {
                c.query_row(
                    "SELECT message_id, state, first_seen_ms, lease_until_ms, expires_at_ms
                     FROM idempotency_keys
                     WHERE env = ?1 AND event = ?2 AND key = ?3 AND expires_at_ms > ?4",
                    params![env, event, k, now_ms()],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, i64>(2)?,
                            r.get::<_, Option<i64>>(3)?,
                            r.get::<_, i64>(4)?,
                        ))
                    },
                )
                .optional()
            })
            .await?;
        row.map(|(id, state, first, lease, expires)| record(id, &state, first, lease, expires)).transpose()
    }

    async fn purge_expired(&self) -> Result<u64> {
        let deleted = self
            .with("purging expired idempotency keys", |c| {
                c.execute("DELETE FROM idempotency_keys WHERE expires_at_ms <= ?1", params![now_ms()])
            })
            .await?;
        Ok(deleted as u64)
    }
}
