//! The broker file: one SQLite connection per store, shared by every transport of this
//! process that names the same file, and every call to it made off the async runtime.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::Duration;

use polybus_core::kit::coalesce::{Closed, Unanswered};
use polybus_core::{Error, FailureKind, Op, Result, ValidationError};
use rusqlite::{Connection, ErrorCode, TransactionBehavior};
use tokio::sync::Notify;

use crate::checkpoint;
use crate::log::{Settled, Settlement};
use crate::ownership::{self, Ownership};
use crate::settle;

/// Schema version written to `PRAGMA user_version`.
const SCHEMA_VERSION: i64 = 1;

/// How long a call waits for another process holding the file's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS topics (
    id   INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS messages (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    topic_id     INTEGER NOT NULL,
    id           TEXT NOT NULL,
    msg_key      TEXT,
    content_type TEXT,
    headers      TEXT NOT NULL,
    payload      BLOB NOT NULL,
    published_at INTEGER NOT NULL,
    visible_at   INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_topic ON messages (topic_id, seq);
CREATE TABLE IF NOT EXISTS consumer_groups (
    id       INTEGER PRIMARY KEY,
    topic_id INTEGER NOT NULL,
    name     TEXT NOT NULL,
    cursor   INTEGER NOT NULL,
    UNIQUE (topic_id, name)
);
CREATE TABLE IF NOT EXISTS pending (
    group_id     INTEGER NOT NULL,
    seq          INTEGER NOT NULL,
    msg_key      TEXT,
    head         INTEGER NOT NULL,
    available_at INTEGER NOT NULL,
    attempts     INTEGER NOT NULL,
    lease        INTEGER,
    PRIMARY KEY (group_id, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS pending_ready ON pending (group_id, head, available_at, seq);
CREATE INDEX IF NOT EXISTS pending_by_key ON pending (group_id, msg_key, seq) WHERE msg_key IS NOT NULL;
";

/// A failure inside a blocking store call, before it is given an operation and a target.
#[derive(Debug)]
pub(crate) enum DbError {
    /// SQLite refused or failed.
    Sql(rusqlite::Error),
    /// Headers could not be encoded or decoded.
    Json(serde_json::Error),
    /// The file holds something this version cannot read.
    Incompatible(String),
    /// The file is not one the broker created; says why, never what it holds.
    Foreign(String),
}

impl From<rusqlite::Error> for DbError {
    fn from(err: rusqlite::Error) -> Self {
        DbError::Sql(err)
    }
}

impl From<serde_json::Error> for DbError {
    fn from(err: serde_json::Error) -> Self {
        DbError::Json(err)
    }
}

impl fmt::Display for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DbError::Sql(err) => {
                let hint = match err.sqlite_error_code() {
                    Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
                        "; another process kept the broker file locked for more than 5 s, retry later"
                    }
                    Some(ErrorCode::NotADatabase) => {
                        "; the file is not a SQLite database, point `path` at another file"
                    }
                    Some(ErrorCode::CannotOpen | ErrorCode::ReadOnly | ErrorCode::PermissionDenied) => {
                        "; check that the file and its folder exist and are writable"
                    }
                    Some(ErrorCode::DiskFull) => "; the disk is full, free space or set a retention",
                    _ => "",
                };
                write!(f, "{err}{hint}")
            }
            DbError::Json(err) => write!(f, "headers are not valid JSON: {err}"),
            DbError::Incompatible(what) | DbError::Foreign(what) => f.write_str(what),
        }
    }
}

impl std::error::Error for DbError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DbError::Sql(err) => Some(err),
            DbError::Json(err) => Some(err),
            DbError::Incompatible(_) | DbError::Foreign(_) => None,
        }
    }
}

impl DbError {
    /// What kind of failure this is: a file locked by another process heals, a file that
    /// is not a database or cannot be written does not.
    fn kind(&self) -> FailureKind {
        match self {
            DbError::Sql(err) => match err.sqlite_error_code() {
                Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked | ErrorCode::DiskFull) => {
                    FailureKind::Unavailable
                }
                Some(
                    ErrorCode::NotADatabase
                    | ErrorCode::CannotOpen
                    | ErrorCode::ReadOnly
                    | ErrorCode::PermissionDenied,
                ) => FailureKind::Invalid,
                _ => FailureKind::Unknown,
            },
            DbError::Json(_) | DbError::Incompatible(_) | DbError::Foreign(_) => FailureKind::Invalid,
        }
    }

    /// The transport error of `op` on `target`, keeping this error as its cause.
    fn into_error(self, op: Op, target: impl Into<String>) -> Error {
        let kind = self.kind();
        Error::transport_from(op, target, kind, self)
    }
}

/// Result of a blocking store call.
pub(crate) type DbResult<T> = std::result::Result<T, DbError>;

/// A topic of the store, with what wakes its subscribers in this process.
pub(crate) struct TopicHandle {
    /// Row id in `topics`.
    pub id: i64,
    /// Native name.
    pub name: String,
    notify: Notify,
    changes: AtomicU64,
}

impl TopicHandle {
    /// Tells waiting subscribers of this process that something may be deliverable.
    pub fn wake(&self) {
        self.changes.fetch_add(1, Ordering::AcqRel);
        self.notify.notify_waiters();
    }

    /// A counter that moves on every [`TopicHandle::wake`]; read it before looking for work.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }

    /// The notifier behind [`TopicHandle::wake`].
    pub fn notify(&self) -> &Notify {
        &self.notify
    }
}

/// One open broker file.
pub(crate) struct Store {
    path: PathBuf,
    conn: Arc<Mutex<Connection>>,
    topics: Mutex<HashMap<String, Arc<TopicHandle>>>,
    /// The queue of the thread that settles acks and nacks, started on the first one.
    settler: Mutex<Option<settle::Settler>>,
}

fn open_stores() -> &'static Mutex<HashMap<PathBuf, Weak<Store>>> {
    static STORES: OnceLock<Mutex<HashMap<PathBuf, Weak<Store>>>> = OnceLock::new();
    STORES.get_or_init(Default::default)
}

/// Locks `mutex`, also after a panic of another holder.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock leaves the data usable: an open SQLite transaction is
    // rolled back when its guard drops during unwinding.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn connect_error(path: &Path, message: impl fmt::Display) -> Error {
    Error::transport(Op::Connect, format!("embedded {}", path.display()), message)
}

/// An error opening `path`: a file that is not the broker's is the config's fault (`config.path`).
fn open_error(path: &Path, err: DbError) -> Error {
    match err {
        DbError::Foreign(why) => ValidationError::field(
            "config.path",
            format!("`{}` is not a polybus broker file: {why}; point `path` at a new file", path.display()),
        )
        .into(),
        other => other.into_error(Op::Connect, format!("embedded {}", path.display())),
    }
}

/// Checks, without writing to it, that the broker may open `path`: a missing or empty file, or
/// one the broker created. Blocks; the error names the file and why, never its content.
pub fn check_file(path: &Path) -> Result<()> {
    let inspect = || -> DbResult<()> {
        ownership::check_header(path)?;
        if !path.exists() {
            return Ok(());
        }
        let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        ownership::identify(&conn).map(|_| ())
    };
    inspect().map_err(|err| open_error(path, err))
}

/// The file's absolute path, created folders included, so that two spellings of one file
/// share one store.
fn canonical(path: &Path) -> Result<PathBuf> {
    let absolute = std::path::absolute(path)
        .map_err(|err| connect_error(path, format!("cannot resolve the path: {err}")))?;
    let (Some(dir), Some(file)) = (absolute.parent(), absolute.file_name()) else {
        return Err(connect_error(path, "the path must name a file, e.g. `polybus-broker.db`")
            .with_kind(FailureKind::Invalid));
    };
    std::fs::create_dir_all(dir)
        .map_err(|err| connect_error(path, format!("cannot create folder {}: {err}", dir.display())))?;
    let dir = dir
        .canonicalize()
        .map_err(|err| connect_error(path, format!("cannot resolve folder {}: {err}", dir.display())))?;
    Ok(dir.join(file))
}

impl Store {
    /// Opens `path`, reusing the store another transport of this process has open on it.
    pub async fn open_shared(path: PathBuf) -> Result<Arc<Store>> {
        let joined = tokio::task::spawn_blocking(move || {
            let path = canonical(&path)?;
            let mut stores = lock(open_stores());
            if let Some(store) = stores.get(&path).and_then(Weak::upgrade) {
                return Ok(store);
            }
            let store = Arc::new(Store::open_blocking(path.clone())?);
            stores.retain(|_, weak| weak.strong_count() > 0);
            stores.insert(path, Arc::downgrade(&store));
            Ok(store)
        })
        .await;
        joined.map_err(|err| {
            Error::transport(Op::Connect, "embedded", format!("worker thread failed: {err}"))
        })?
    }

    /// Opens its own connection to `path`, as another process would.
    pub async fn open_separate(path: PathBuf) -> Result<Arc<Store>> {
        let joined =
            tokio::task::spawn_blocking(move || Store::open_blocking(canonical(&path)?).map(Arc::new)).await;
        joined.map_err(|err| {
            Error::transport(Op::Connect, "embedded", format!("worker thread failed: {err}"))
        })?
    }

    fn open_blocking(path: PathBuf) -> Result<Store> {
        ownership::check_header(&path).map_err(|err| open_error(&path, err))?;
        let conn = connect(&path).map_err(|err| {
            DbError::Sql(err).into_error(Op::Connect, format!("embedded {}", path.display()))
        })?;
        prepare(&conn).map_err(|err| open_error(&path, err))?;
        let conn = Arc::new(Mutex::new(conn));
        if let Err(err) = checkpoint::start(&conn, &path) {
            tracing::warn!(error = %err, path = %path.display(),
                "no checkpoint thread for the embedded broker; commits checkpoint themselves");
        }
        Ok(Store { path, conn, topics: Mutex::new(HashMap::new()), settler: Mutex::new(None) })
    }

    /// The broker file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The error target naming this file, and the topic when there is one.
    pub fn target(&self, topic: Option<&str>) -> String {
        match topic {
            Some(topic) => format!("embedded {} (topic `{topic}`)", self.path.display()),
            None => format!("embedded {}", self.path.display()),
        }
    }

    /// Runs `work` on the connection in a blocking thread; errors become `op` errors on this file.
    pub async fn run<T, F>(self: &Arc<Self>, op: Op, topic: Option<&str>, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> DbResult<T> + Send + 'static,
    {
        let store = Arc::clone(self);
        let joined = tokio::task::spawn_blocking(move || {
            let mut conn = lock(&store.conn);
            work(&mut conn)
        })
        .await;
        match joined {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => Err(err.into_error(op, self.target(topic))),
            Err(err) if err.is_cancelled() => {
                Err(Error::Closed(format!("{}: the runtime is shutting down", self.target(topic))))
            }
            Err(err) => Err(Error::transport(op, self.target(topic), format!("worker thread failed: {err}"))),
        }
    }

    /// Applies `settlement` when its lease still holds, in one transaction with the other
    /// settlements waiting at the same time.
    pub async fn settle(&self, op: Op, topic: &str, settlement: Settlement) -> Result<Settled> {
        let mut settlement = settlement;
        let mut pending = None;
        {
            let mut settler = lock(&self.settler);
            // A worker that died is replaced once.
            for _ in 0..2 {
                let sender = match settler.as_ref() {
                    Some(sender) => sender,
                    None => settler.insert(settle::start(Arc::clone(&self.conn)).map_err(|err| {
                        Error::transport(
                            op,
                            self.target(Some(topic)),
                            format!("cannot start the settle thread: {err}"),
                        )
                    })?),
                };
                match sender.submit(settlement) {
                    Ok(queued) => {
                        pending = Some(queued);
                        break;
                    }
                    Err(Closed(back)) => {
                        settlement = back;
                        *settler = None;
                    }
                }
            }
        }
        let outcome = match pending {
            Some(pending) => pending.await,
            None => Err(Unanswered),
        };
        match outcome {
            Ok(Ok(settled)) => Ok(settled),
            // One failure answers every settlement of the batch: the text and kind, not the cause.
            Ok(Err(err)) => Err(Error::transport(op, self.target(Some(topic)), &err).with_kind(err.kind())),
            Err(_) => Err(Error::transport(op, self.target(Some(topic)), "the settle thread stopped; retry")),
        }
    }

    /// The topic named `name`, created in the file when it is new.
    pub async fn topic(self: &Arc<Self>, op: Op, name: &str) -> Result<Arc<TopicHandle>> {
        if let Some(handle) = lock(&self.topics).get(name) {
            return Ok(Arc::clone(handle));
        }
        let owned = name.to_owned();
        let id = self
            .run(op, Some(name), move |conn| {
                conn.prepare_cached("INSERT INTO topics (name) VALUES (?1) ON CONFLICT (name) DO NOTHING")?
                    .execute([&owned])?;
                Ok(conn
                    .prepare_cached("SELECT id FROM topics WHERE name = ?1")?
                    .query_row([&owned], |row| row.get(0))?)
            })
            .await?;
        let mut topics = lock(&self.topics);
        let handle = topics.entry(name.to_owned()).or_insert_with(|| {
            Arc::new(TopicHandle {
                id,
                name: name.to_owned(),
                notify: Notify::new(),
                changes: AtomicU64::new(0),
            })
        });
        Ok(Arc::clone(handle))
    }
}

/// A connection to the broker file that waits for other processes' locks.
pub(crate) fn connect(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    Ok(conn)
}

/// Makes sure the file is the broker's (stamping a new or unstamped one) before anything else
/// writes to it, then sets the connection up and creates or checks the schema.
fn prepare(conn: &Connection) -> DbResult<()> {
    if ownership::identify(conn)? != Ownership::Ours {
        let tx = rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
        // Another process may have stamped the file meanwhile; look again under the write lock.
        if ownership::identify(&tx)? == Ownership::New {
            tx.execute_batch(SCHEMA)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        }
        ownership::stamp(&tx)?;
        tx.commit()?;
    }
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(DbError::Incompatible(format!(
            "the file cannot use write-ahead logging (journal mode stays `{mode}`); put it on a local disk"
        )));
    }
    // WAL with NORMAL survives a crash of the process; only a power loss may lose the last commits.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "cache_size", -16_384)?;
    conn.set_prepared_statement_cache_capacity(64);
    let version: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(DbError::Incompatible(format!(
            "the file was written by a newer polybus (schema {version}, this build reads {SCHEMA_VERSION}); upgrade polybus"
        )));
    }
    if version < SCHEMA_VERSION {
        let tx = rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
        tx.execute_batch(SCHEMA)?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        tx.commit()?;
    }
    Ok(())
}

/// Milliseconds since the Unix epoch, now.
pub(crate) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
