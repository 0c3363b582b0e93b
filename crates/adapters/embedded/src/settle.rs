//! Acks and nacks go through one thread per store, which settles every request waiting at
//! the time in one write transaction: a commit per burst instead of one per message (the
//! batching is [`polybus_core::kit::coalesce`]'s).

use std::sync::{Arc, Mutex};

use polybus_core::kit::coalesce::{Coalescer, Config};
use rusqlite::Connection;

use crate::log::{self, Settled, Settlement};
use crate::store::{DbError, lock};

/// Most settlements in one transaction, so that a burst never holds the write lock for long.
const BATCH_MAX: usize = 1024;

/// The outcome of one request; a failed transaction fails every request in it alike.
pub(crate) type Outcome = std::result::Result<Settled, Arc<DbError>>;

/// The queue of a store's settle thread.
pub(crate) type Settler = Coalescer<Settlement, Outcome>;

/// Starts the thread settling on `conn`; it ends when every handle of the returned queue is
/// dropped and what was queued is settled.
pub(crate) fn start(conn: Arc<Mutex<Connection>>) -> std::io::Result<Settler> {
    // What arrives while a batch commits makes up the next batch: no waiting to fill one.
    let flush = move |settlements: Vec<Settlement>| {
        let conn = Arc::clone(&conn);
        // The thread is this store's alone: blocking it for the commit is the point.
        async move { settle_batch(&conn, &settlements) }
    };
    let (settler, driver) = Coalescer::new(Config::new(BATCH_MAX), flush);
    std::thread::Builder::new()
        .name("polybus-embedded-settle".into())
        // The thread runs its own runtime, so settling outlives whichever runtime asked first;
        // built inside the thread, so a failed spawn drops nothing inside the caller's runtime.
        .spawn(move || match tokio::runtime::Builder::new_current_thread().enable_time().build() {
            Ok(runtime) => runtime.block_on(driver),
            // The driver is dropped: waiting settlements fail and the store starts another thread.
            Err(e) => tracing::error!(error = %e, "cannot start the embedded broker's settle runtime"),
        })?;
    Ok(settler)
}

/// Applies `settlements` in one transaction; one outcome each.
fn settle_batch(conn: &Mutex<Connection>, settlements: &[Settlement]) -> Vec<Outcome> {
    match log::settle(&mut lock(conn), settlements) {
        Ok(settled) => settled.into_iter().map(Ok).collect(),
        Err(err) => {
            let err = Arc::new(err);
            settlements.iter().map(|_| Err(Arc::clone(&err))).collect()
        }
    }
}
