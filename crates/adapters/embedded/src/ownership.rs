//! Whose file is this: the embedded broker opens only SQLite files it created, told by its own
//! `application_id` in the file's header, so that a mistyped `path` never turns another
//! program's database (or the registry) into a broker file.

use std::io::Read;
use std::path::Path;
use std::sync::OnceLock;

use rusqlite::Connection;

use crate::store::{DbError, DbResult, SCHEMA};

/// The SQLite `application_id` stamped into every broker file (`PBUS` in ASCII).
pub const APPLICATION_ID: i32 = 0x5042_5553;

/// What a SQLite file's header starts with.
const MAGIC: &[u8; 16] = b"SQLite format 3\0";
/// Where the header keeps the application id (4 bytes, big-endian).
const APPLICATION_ID_AT: usize = 68;
/// Length of a SQLite file's header.
const HEADER_LEN: usize = 100;

/// Who a file belongs to, as far as the broker can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ownership {
    /// Stamped with [`APPLICATION_ID`].
    Ours,
    /// Written by polybus before files were stamped: no application id, exactly the broker's tables.
    Unstamped,
    /// Empty (no tables, no schema version): nothing to protect, the broker may make it its own.
    New,
}

/// Looks at the header of `path` before SQLite opens it: a file that is not a SQLite database,
/// or carries another application's id, is refused without SQLite ever writing to it.
pub(crate) fn check_header(path: &Path) -> DbResult<()> {
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        // SQLite reports a missing or unreadable file itself, with its own hint.
        Err(_) => return Ok(()),
    };
    let mut header = Vec::with_capacity(HEADER_LEN);
    if file.by_ref().take(HEADER_LEN as u64).read_to_end(&mut header).is_err() {
        return Ok(());
    }
    if header.is_empty() {
        return Ok(());
    }
    if header.len() < HEADER_LEN || !header.starts_with(MAGIC) {
        return Err(DbError::Foreign("it is not a SQLite database".into()));
    }
    let id_bytes = [
        header[APPLICATION_ID_AT],
        header[APPLICATION_ID_AT + 1],
        header[APPLICATION_ID_AT + 2],
        header[APPLICATION_ID_AT + 3],
    ];
    foreign_id(i32::from_be_bytes(id_bytes))
}

/// Tells whose database `conn` is on, reading only.
pub(crate) fn identify(conn: &Connection) -> DbResult<Ownership> {
    let id: i32 = conn.pragma_query_value(None, "application_id", |row| row.get(0))?;
    if id == APPLICATION_ID {
        return Ok(Ownership::Ours);
    }
    foreign_id(id)?;
    let objects = objects(conn)?;
    let version: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if objects.is_empty() && version == 0 {
        return Ok(Ownership::New);
    }
    if objects == *broker_objects()? {
        return Ok(Ownership::Unstamped);
    }
    Err(DbError::Foreign("it is a SQLite database with tables of another program".into()))
}

/// Stamps the file as the broker's (inside the caller's write transaction).
pub(crate) fn stamp(conn: &Connection) -> DbResult<()> {
    conn.pragma_update(None, "application_id", APPLICATION_ID)?;
    Ok(())
}

fn foreign_id(id: i32) -> DbResult<()> {
    if id == 0 || id == APPLICATION_ID {
        return Ok(());
    }
    Err(DbError::Foreign(format!("it belongs to another application (SQLite application_id {id:#010x})")))
}

/// The schema objects of a database: `(type, name, table)`, sorted.
type Objects = Vec<(String, String, String)>;

fn objects(conn: &Connection) -> rusqlite::Result<Objects> {
    let mut statement =
        conn.prepare("SELECT type, name, tbl_name FROM sqlite_schema ORDER BY type, name, tbl_name")?;
    let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
    rows.collect()
}

/// The objects a broker file has: the schema, created once in memory.
fn broker_objects() -> DbResult<&'static Objects> {
    static OBJECTS: OnceLock<Objects> = OnceLock::new();
    if let Some(objects) = OBJECTS.get() {
        return Ok(objects);
    }
    let memory = Connection::open_in_memory()?;
    memory.execute_batch(SCHEMA)?;
    let computed = objects(&memory)?;
    Ok(OBJECTS.get_or_init(|| computed))
}
