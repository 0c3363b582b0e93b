//! The shared store: one PostgreSQL table, so several server replicas see one registry.
//!
//! One `tokio_postgres` client per store (it pipelines concurrent queries), reopened when the
//! connection drops. A connection found closed before a query is sent is replaced first, so
//! reads and writes after a database restart just work. A connection lost while a query is in
//! flight is replaced and the query retried once when it is a read; a write is not resent,
//! because its outcome is unknown: resending an insert or a delete that did land would
//! report `AlreadyExists` or "not found" for a change that succeeded, and resending a
//! compare-and-swap would report a conflict for it. The write returns an error saying so instead.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use polybus_core::{Error, Result};
use serde_json::Value;
use tokio::sync::Mutex;
use tokio_postgres::config::Host;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Config, NoTls, Row, Statement};

use crate::idempotency::{PurgeClock, millis, record};
use crate::{IdempotencyKey, IdempotencyRecord, IdempotencyStore, Kind, Record, Store, pg_tls};

/// How long one statement may take before the store gives up on it.
const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long connecting may take, unless the URL sets `connect_timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Serialises concurrent table creation across processes (two `CREATE TABLE IF NOT EXISTS`
/// racing each other can fail on PostgreSQL's catalog).
const SCHEMA_LOCK: i64 = 0x0070_6f6c_7962_7573; // "polybus"

const CREATE_TABLE: &str = r#"
    CREATE TABLE IF NOT EXISTS polybus_records (
        kind TEXT NOT NULL,
        key TEXT COLLATE "C" NOT NULL,
        parent TEXT COLLATE "C",
        version BIGINT NOT NULL,
        doc JSONB NOT NULL,
        updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (kind, key)
    );
    CREATE INDEX IF NOT EXISTS polybus_records_parent ON polybus_records (kind, parent, key);
    CREATE TABLE IF NOT EXISTS polybus_idempotency (
        env TEXT COLLATE "C" NOT NULL,
        event TEXT COLLATE "C" NOT NULL,
        key TEXT COLLATE "C" NOT NULL,
        message_id TEXT NOT NULL,
        state TEXT NOT NULL,
        first_seen TIMESTAMPTZ NOT NULL,
        lease_until TIMESTAMPTZ,
        expires_at TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (env, event, key)
    );
    CREATE INDEX IF NOT EXISTS polybus_idempotency_expiry ON polybus_idempotency (expires_at);
"#;

/// Claims a key, or takes over a row whose window or pending lease ran out (the database's
/// clock decides, so replicas with skewed clocks agree).
const CLAIM: &str = "
    INSERT INTO polybus_idempotency AS k
        (env, event, key, message_id, state, first_seen, lease_until, expires_at)
    VALUES ($1, $2, $3, $4, 'pending', now(),
        now() + $5::float8 * interval '1 millisecond', now() + $6::float8 * interval '1 millisecond')
    ON CONFLICT (env, event, key) DO UPDATE SET
        message_id = EXCLUDED.message_id, state = 'pending', first_seen = EXCLUDED.first_seen,
        lease_until = EXCLUDED.lease_until, expires_at = EXCLUDED.expires_at
    WHERE k.expires_at <= now() OR (k.state = 'pending' AND k.lease_until <= now())";

/// An idempotency row, times in milliseconds since the epoch.
const GET_KEY: &str = "
    SELECT message_id, state, (extract(epoch FROM first_seen) * 1000)::int8,
        (extract(epoch FROM lease_until) * 1000)::int8, (extract(epoch FROM expires_at) * 1000)::int8
    FROM polybus_idempotency WHERE env = $1 AND event = $2 AND key = $3 AND expires_at > now()";

/// A registry store in a PostgreSQL database, shared by every process that opens it.
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    /// The TLS connector, unless `sslmode=disable`.
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    schema: Option<String>,
    shown: String,
    conn: Mutex<Option<Arc<Conn>>>,
    purge: PurgeClock,
}

/// A live connection with its prepared statements.
struct Conn {
    client: Client,
    get: Statement,
    list: Statement,
    insert: Statement,
    replace: Statement,
    delete: Statement,
    claim: Statement,
    get_key: Statement,
}

/// Whether an operation may be sent again after the connection was lost under it.
#[derive(Clone, Copy, PartialEq)]
enum Resend {
    Safe,
    Never,
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user@host:port/db?…`) and creates the table when missing.
    pub async fn open(url: &str) -> Result<Self> {
        Self::connect_with(url, None).await
    }

    /// Like [`PostgresStore::open`], but keeps the table in `schema`, created when missing.
    pub async fn open_in_schema(url: &str, schema: &str) -> Result<Self> {
        Self::connect_with(url, Some(schema)).await
    }

    async fn connect_with(url: &str, schema: Option<&str>) -> Result<Self> {
        let invalid = |why: String| {
            Error::Storage(format!("invalid PostgreSQL registry URL {}: {why}", shown_url(url)))
        };
        let (rest, tls) = pg_tls::split(url).map_err(invalid)?;
        let mut config: Config = rest.parse().map_err(|e| invalid(describe(&e)))?;
        config.ssl_mode(tls.ssl_mode());
        let tls = tls.connector().map_err(invalid)?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("polybus-registry");
        }
        let shown = shown_config(&config);
        let store = PostgresStore {
            inner: Arc::new(Inner {
                config,
                tls,
                schema: schema.map(str::to_owned),
                shown,
                conn: Mutex::new(None),
                purge: PurgeClock::default(),
            }),
        };
        store.conn().await?;
        Ok(store)
    }

    /// The database this store lives in, without credentials (`postgres://user@host:port/db`).
    pub fn location(&self) -> &str {
        &self.inner.shown
    }

    /// The current connection, opening a new one when there is none or it has closed.
    async fn conn(&self) -> Result<Arc<Conn>> {
        let mut slot = self.inner.conn.lock().await;
        if let Some(conn) = slot.as_ref().filter(|c| !c.client.is_closed()) {
            return Ok(conn.clone());
        }
        *slot = None;
        let conn = Arc::new(self.connect().await?);
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Drops `broken` unless another caller already replaced it; the next use connects anew.
    async fn forget(&self, broken: &Arc<Conn>) {
        let mut slot = self.inner.conn.lock().await;
        if slot.as_ref().is_some_and(|c| Arc::ptr_eq(c, broken)) {
            *slot = None;
        }
    }

    async fn connect(&self) -> Result<Conn> {
        let shown = &self.inner.shown;
        let failed = |e| {
            Error::Storage(format!("cannot connect to the PostgreSQL registry at {shown}: {}", describe(&e)))
        };
        let client = match &self.inner.tls {
            None => {
                let (client, connection) = self.inner.config.connect(NoTls).await.map_err(failed)?;
                drive(connection, shown.clone());
                client
            }
            Some(tls) => {
                let (client, connection) = self.inner.config.connect(tls.clone()).await.map_err(failed)?;
                drive(connection, shown.clone());
                client
            }
        };
        let setup = async {
            let mut script = format!("BEGIN;\nSELECT pg_advisory_xact_lock({SCHEMA_LOCK});\n");
            if let Some(schema) = &self.inner.schema {
                let schema = quote_ident(schema);
                script.push_str(&format!(
                    "CREATE SCHEMA IF NOT EXISTS {schema};\nSET search_path TO {schema};\n"
                ));
            }
            script.push_str(CREATE_TABLE);
            script.push_str("COMMIT;");
            client.batch_execute(&script).await?;
            let (get, list, insert, replace, delete) = tokio::try_join!(
                client.prepare("SELECT key, version, doc FROM polybus_records WHERE kind = $1 AND key = $2"),
                client.prepare(
                    "SELECT key, version, doc FROM polybus_records
                     WHERE kind = $1 AND ($2::text IS NULL OR parent = $2) ORDER BY key",
                ),
                client.prepare(
                    "INSERT INTO polybus_records (kind, key, parent, version, doc, updated_at)
                     VALUES ($1, $2, $3, 1, $4, now()) ON CONFLICT DO NOTHING",
                ),
                client.prepare(
                    "UPDATE polybus_records SET doc = $1, version = version + 1, updated_at = now()
                     WHERE kind = $2 AND key = $3 AND version = $4",
                ),
                client.prepare("DELETE FROM polybus_records WHERE kind = $1 AND key = $2"),
            )?;
            let (claim, get_key) = tokio::try_join!(client.prepare(CLAIM), client.prepare(GET_KEY))?;
            Ok::<_, tokio_postgres::Error>((get, list, insert, replace, delete, claim, get_key))
        };
        let (get, list, insert, replace, delete, claim, get_key) = tokio::time::timeout(QUERY_TIMEOUT, setup)
            .await
            .map_err(|_| {
                Error::Storage(format!(
                    "setting up the PostgreSQL registry at {shown} timed out after {}s",
                    QUERY_TIMEOUT.as_secs()
                ))
            })?
            .map_err(|e| {
                Error::Storage(format!("cannot set up the PostgreSQL registry at {shown}: {}", describe(&e)))
            })?;
        tracing::debug!(registry = %shown, "connected to the PostgreSQL registry");
        Ok(Conn { client, get, list, insert, replace, delete, claim, get_key })
    }

    /// Runs `op` on a connection with a time limit; a read is retried once on a fresh
    /// connection when the connection is lost under it.
    async fn run<T, F, Fut>(&self, what: &str, resend: Resend, op: F) -> Result<T>
    where
        F: Fn(Arc<Conn>) -> Fut,
        Fut: Future<Output = std::result::Result<T, tokio_postgres::Error>>,
    {
        let conn = self.conn().await?;
        let error = match self.attempt(what, op(conn.clone())).await? {
            Ok(value) => return Ok(value),
            Err(e) => e,
        };
        if !connection_lost(&error, &conn.client) {
            return Err(self.failed(what, &error));
        }
        self.forget(&conn).await;
        if resend == Resend::Never {
            return Err(Error::Storage(format!(
                "{what} in the PostgreSQL registry at {}: the connection was lost during the write \
                 ({}), so whether it was applied is unknown; fetch the record and retry",
                self.inner.shown,
                describe(&error)
            )));
        }
        tracing::info!(registry = %self.inner.shown, "PostgreSQL registry connection lost; reading again");
        match self.attempt(what, op(self.conn().await?)).await? {
            Ok(value) => Ok(value),
            Err(e) => Err(self.failed(what, &e)),
        }
    }

    async fn attempt<T>(
        &self,
        what: &str,
        fut: impl Future<Output = std::result::Result<T, tokio_postgres::Error>>,
    ) -> Result<std::result::Result<T, tokio_postgres::Error>> {
        tokio::time::timeout(QUERY_TIMEOUT, fut).await.map_err(|_| {
            Error::Storage(format!(
                "{what} in the PostgreSQL registry at {} timed out after {}s",
                self.inner.shown,
                QUERY_TIMEOUT.as_secs()
            ))
        })
    }

    fn failed(&self, what: &str, e: &tokio_postgres::Error) -> Error {
        Error::Storage(format!("{what} in the PostgreSQL registry at {}: {}", self.inner.shown, describe(e)))
    }
}

fn decode(row: &Row) -> std::result::Result<Record, tokio_postgres::Error> {
    let version: i64 = row.try_get(1)?;
    Ok(Record { key: row.try_get(0)?, version: version.max(0) as u64, doc: row.try_get(2)? })
}

/// Runs a connection's driver until it ends, saying why when it fails.
fn drive<S, T>(connection: tokio_postgres::Connection<S, T>, shown: String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            let error = describe(&e);
            tracing::warn!(registry = %shown, %error, "PostgreSQL registry connection lost");
        }
    });
}

/// True when `e` means the connection is gone rather than that the statement failed.
fn connection_lost(e: &tokio_postgres::Error, client: &Client) -> bool {
    let shutdown = [SqlState::ADMIN_SHUTDOWN, SqlState::CRASH_SHUTDOWN, SqlState::CANNOT_CONNECT_NOW]
        .iter()
        .any(|code| e.code() == Some(code));
    let io = std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>());
    e.is_closed() || client.is_closed() || shutdown || io
}

/// The error with its cause on one line (tokio-postgres keeps the useful part in the cause).
fn describe(e: &tokio_postgres::Error) -> String {
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}").replace('\n', "; "),
        None => e.to_string(),
    }
}

/// `postgres://user@host:port/db`, built from the parsed config so no password can show.
fn shown_config(config: &Config) -> String {
    let user = config.get_user().map(|u| format!("{u}@")).unwrap_or_default();
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let name = match host {
                Host::Tcp(name) => name.clone(),
                #[cfg(unix)]
                Host::Unix(path) => path.display().to_string(),
            };
            match ports.get(i).or(ports.first()) {
                Some(port) => format!("{name}:{port}"),
                None => name,
            }
        })
        .collect();
    let db = config.get_dbname().map(|d| format!("/{d}")).unwrap_or_default();
    format!("postgres://{user}{}{db}", hosts.join(","))
}

/// Settings that did not parse, shown without a password or the query (which may hold one).
fn shown_url(url: &str) -> String {
    if !url.contains("://") {
        return "(key=value settings, not shown)".to_owned();
    }
    let clean = polybus_core::secret::redact_url(url).unwrap_or_else(|| url.to_owned());
    clean.split('?').next().unwrap_or_default().to_owned()
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[async_trait]
impl Store for PostgresStore {
    async fn get(&self, kind: Kind, key: &str) -> Result<Option<Record>> {
        let what = format!("reading {} `{key}`", kind.as_str());
        self.run(&what, Resend::Safe, |c| async move {
            c.client.query_opt(&c.get, &[&kind.as_str(), &key]).await?.as_ref().map(decode).transpose()
        })
        .await
    }

    async fn list(&self, kind: Kind, parent: Option<&str>) -> Result<Vec<Record>> {
        let what = format!("listing {}s", kind.as_str());
        self.run(&what, Resend::Safe, |c| async move {
            c.client.query(&c.list, &[&kind.as_str(), &parent]).await?.iter().map(decode).collect()
        })
        .await
    }

    async fn insert(&self, kind: Kind, key: &str, parent: Option<&str>, doc: &Value) -> Result<()> {
        let what = format!("creating {} `{key}`", kind.as_str());
        let inserted = self
            .run(&what, Resend::Never, |c| async move {
                c.client.execute(&c.insert, &[&kind.as_str(), &key, &parent, doc]).await
            })
            .await?;
        if inserted == 0 {
            return Err(Error::AlreadyExists { kind: kind.as_str(), tag: key.to_owned() });
        }
        Ok(())
    }

    async fn replace(&self, kind: Kind, key: &str, expected: u64, doc: &Value) -> Result<bool> {
        let what = format!("updating {} `{key}`", kind.as_str());
        let expected = i64::try_from(expected)
            .map_err(|_| Error::Storage(format!("{what}: version {expected} is out of range")))?;
        let changed = self
            .run(&what, Resend::Never, |c| async move {
                c.client.execute(&c.replace, &[doc, &kind.as_str(), &key, &expected]).await
            })
            .await?;
        Ok(changed == 1)
    }

    async fn delete(&self, kind: Kind, key: &str) -> Result<bool> {
        let what = format!("deleting {} `{key}`", kind.as_str());
        let deleted = self
            .run(&what, Resend::Never, |c| async move {
                c.client.execute(&c.delete, &[&kind.as_str(), &key]).await
            })
            .await?;
        Ok(deleted == 1)
    }

    async fn ping(&self) -> Result<()> {
        self.run(
            "checking",
            Resend::Safe,
            |c| async move { c.client.simple_query("SELECT 1").await.map(drop) },
        )
        .await
    }

    fn idempotency(&self) -> Option<&dyn IdempotencyStore> {
        Some(self)
    }
}

// Every idempotency operation may be sent again after a lost connection: a claim found held by
// the same message id is that publisher's, completing twice marks it published twice, and a
// release or purge that already landed finds nothing more to delete.
#[async_trait]
impl IdempotencyStore for PostgresStore {
    async fn try_claim(
        &self,
        key: &IdempotencyKey,
        message_id: &str,
        lease: Duration,
        window: Duration,
    ) -> Result<bool> {
        // Purging is housekeeping: its failure must not fail the publish.
        if self.inner.purge.due() {
            match self.purge_expired().await {
                Ok(purged) => tracing::debug!(purged, "purged expired idempotency keys"),
                Err(e) => tracing::warn!(error = %e, "purging expired idempotency keys failed"),
            }
        }
        let what = format!("claiming idempotency key `{}`", key.key);
        let (lease, window) = (millis(lease) as f64, millis(window) as f64);
        let changed = self
            .run(&what, Resend::Safe, |c| async move {
                c.client
                    .execute(&c.claim, &[&key.env, &key.event, &key.key, &message_id, &lease, &window])
                    .await
            })
            .await?;
        Ok(changed == 1)
    }

    async fn complete(&self, key: &IdempotencyKey, message_id: &str, window: Duration) -> Result<bool> {
        let what = format!("marking idempotency key `{}` published", key.key);
        let window = millis(window) as f64;
        let changed = self
            .run(&what, Resend::Safe, |c| async move {
                c.client
                    .execute(
                        "UPDATE polybus_idempotency SET state = 'published', lease_until = NULL,
                            expires_at = now() + $5::float8 * interval '1 millisecond'
                         WHERE env = $1 AND event = $2 AND key = $3 AND message_id = $4",
                        &[&key.env, &key.event, &key.key, &message_id, &window],
                    )
                    .await
            })
            .await?;
        Ok(changed == 1)
    }

    async fn release(&self, key: &IdempotencyKey, message_id: &str) -> Result<bool> {
        let what = format!("releasing idempotency key `{}`", key.key);
        let deleted = self
            .run(&what, Resend::Safe, |c| async move {
                c.client
                    .execute(
                        "DELETE FROM polybus_idempotency
                         WHERE env = $1 AND event = $2 AND key = $3 AND message_id = $4 AND state = 'pending'",
                        &[&key.env, &key.event, &key.key, &message_id],
                    )
                    .await
            })
            .await?;
        Ok(deleted == 1)
    }

    async fn get(&self, key: &IdempotencyKey) -> Result<Option<IdempotencyRecord>> {
        let what = format!("reading idempotency key `{}`", key.key);
        let row = self
            .run(&what, Resend::Safe, |c| async move {
                let row = c.client.query_opt(&c.get_key, &[&key.env, &key.event, &key.key]).await?;
                row.map(|r| {
                    Ok::<_, tokio_postgres::Error>((
                        r.try_get::<_, String>(0)?,
                        r.try_get::<_, String>(1)?,
                        r.try_get::<_, i64>(2)?,
                        r.try_get::<_, Option<i64>>(3)?,
                        r.try_get::<_, i64>(4)?,
                    ))
                })
                .transpose()
            })
            .await?;
        row.map(|(id, state, first, lease, expires)| record(id, &state, first, lease, expires)).transpose()
    }

    async fn purge_expired(&self) -> Result<u64> {
        self.run("purging expired idempotency keys", Resend::Safe, |c| async move {
            c.client.execute("DELETE FROM polybus_idempotency WHERE expires_at <= now()", &[]).await
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn shown_location_never_holds_a_password() {
        let config: Config =
            "postgres://app:s3cret@db.internal:6543/registry?password=other".parse().unwrap();
        assert_eq!(shown_config(&config), "postgres://app@db.internal:6543/registry");
        assert_eq!(shown_url("postgres://app:s3cret@db/x?password=other&bad=1"), "postgres://app:****@db/x");
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident(r#"odd"name"#), r#""odd""name""#);
    }

    /// A statement that ends its own connection, the first time only.
    async fn dies_once(c: Arc<Conn>, calls: &AtomicUsize) -> std::result::Result<i32, tokio_postgres::Error> {
        let sql = match calls.fetch_add(1, Ordering::SeqCst) {
            0 => "SELECT 1 FROM pg_terminate_backend(pg_backend_pid())",
            _ => "SELECT 2",
        };
        c.client.query_one(sql, &[]).await?.try_get(0)
    }

    #[tokio::test]
    async fn a_lost_read_is_retried_and_a_lost_write_is_reported() {
        let url = std::env::var("POLYBUS_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        let schema = format!("polybus_test_{}", uuid::Uuid::new_v4().simple());
        let store = PostgresStore::open_in_schema(&url, &schema)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL for the registry tests is unreachable ({e})"));

        let calls = AtomicUsize::new(0);
        let read = store.run("reading", Resend::Safe, |c| dies_once(c, &calls)).await;
        let read_calls = calls.swap(0, Ordering::SeqCst);
        let write = store.run("writing", Resend::Never, |c| dies_once(c, &calls)).await;
        let write_calls = calls.load(Ordering::SeqCst);
        let after = store.ping().await;

        let conn = store.conn().await.unwrap();
        conn.client.batch_execute(&format!("DROP SCHEMA {} CASCADE", quote_ident(&schema))).await.unwrap();

        assert_eq!((read.unwrap(), read_calls), (2, 2));
        let err = write.unwrap_err().to_string();
        assert!(err.contains("whether it was applied is unknown"), "{err}");
        assert_eq!(write_calls, 1);
        after.unwrap();
    }
}
