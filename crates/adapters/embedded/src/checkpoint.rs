//! Checkpoints (copying the write-ahead log back into the file, with fsyncs) run on a thread
//! with a connection of its own, so that commits do not wait for the disk.
//!
//! The log only starts over once a checkpoint has caught up with it, which a thread running
//! beside the writers rarely manages under steady traffic. So once the log is large the
//! thread holds this process's connection for one short catching-up pass (the log written
//! since its previous pass), and the next commit starts the log over.

use std::path::Path;
use std::sync::{Arc, Mutex, Weak, mpsc};

use rusqlite::Connection;
use rusqlite::hooks::Wal;

use crate::store::{connect, lock};

/// Log size, in pages, past which checkpoints start (SQLite's automatic checkpoint threshold).
const START_PAGES: i32 = 1000;
/// Log growth, in pages, between two passes of the thread.
const STEP_PAGES: i32 = 256;
/// Log size, in pages (about 32 MiB), past which a pass holds the connection to catch up.
const CATCH_UP_PAGES: i32 = 8000;

/// Starts the checkpoint thread of `conn`, the connection of the broker file at `path`; it
/// ends when that connection is closed. On error, `conn` keeps checkpointing by itself.
pub(crate) fn start(conn: &Arc<Mutex<Connection>>, path: &Path) -> std::io::Result<()> {
    let own = connect(path).map_err(std::io::Error::other)?;
    let (wake, woken) = mpsc::sync_channel::<()>(1);
    let writer = Arc::downgrade(conn);
    let file = path.display().to_string();
    std::thread::Builder::new()
        .name("polybus-embedded-checkpoint".into())
        .spawn(move || run(&own, &writer, &woken, &file))?;
    // Replaces SQLite's automatic checkpoint, which runs inside the commit.
    let mut signalled_at = 0;
    lock(conn)
        .wal_hook(Some(move |wal: &mut Wal, pages: i32| {
            if pages < signalled_at {
                // The log started over.
                signalled_at = 0;
            }
            if pages >= START_PAGES && pages >= signalled_at.saturating_add(STEP_PAGES) {
                match wake.try_send(()) {
                    Ok(()) | Err(mpsc::TrySendError::Full(())) => signalled_at = pages,
                    // No thread: checkpoint here, as SQLite would.
                    Err(mpsc::TrySendError::Disconnected(())) => {
                        if let Err(err) = wal.checkpoint() {
                            tracing::debug!(error = %err, "embedded broker checkpoint failed");
                        }
                    }
                }
            }
            // An error here would fail a statement whose commit already happened.
            Ok(())
        }))
        .map_err(std::io::Error::other)
}

fn run(own: &Connection, writer: &Weak<Mutex<Connection>>, woken: &mpsc::Receiver<()>, file: &str) {
    while woken.recv().is_ok() {
        let Some(log) = pass(own, file) else { continue };
        if log < i64::from(CATCH_UP_PAGES) {
            continue;
        }
        let Some(writer) = writer.upgrade() else { return };
        // Nothing of this process commits meanwhile: this pass copies what came since the
        // last one and reaches the end of the log.
        let _writes = lock(&writer);
        pass(own, file);
    }
}

/// One passive checkpoint; returns the log's size in pages.
fn pass(own: &Connection, file: &str) -> Option<i64> {
    let done = own.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
        Ok((row.get::<_, i64>(1)?, row.get::<_, i64>(2)?))
    });
    match done {
        Ok((log, copied)) => {
            tracing::trace!(log, copied, path = %file, "embedded broker checkpointed");
            Some(log)
        }
        // Busy (another process checkpoints) or failed: the next pass tries again.
        Err(err) => {
            tracing::debug!(error = %err, path = %file, "embedded broker checkpoint failed");
            None
        }
    }
}
