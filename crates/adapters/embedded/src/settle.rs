//! Acks and nacks go through one thread per store, which settles every request waiting at
//! the time in one write transaction: a commit per burst instead of one per message.

use std::sync::{Arc, Mutex, mpsc};

use rusqlite::Connection;
use tokio::sync::oneshot;

use crate::log::{self, Settled, Settlement};
use crate::store::{DbError, lock};

/// Most settlements in one transaction, so that a burst never holds the write lock for long.
const BATCH_MAX: usize = 1024;

/// A settlement the thread applies and answers.
pub(crate) struct Request {
    /// What to settle.
    pub settlement: Settlement,
    /// Where this request's own outcome goes.
    pub reply: oneshot::Sender<Outcome>,
}

/// The outcome of one request; a failed transaction fails every request in it alike.
pub(crate) type Outcome = std::result::Result<Settled, Arc<DbError>>;

/// Starts the thread settling on `conn`; it ends when the returned queue is dropped.
pub(crate) fn start(conn: Arc<Mutex<Connection>>) -> std::io::Result<mpsc::Sender<Request>> {
    let (queue, requests) = mpsc::channel::<Request>();
    std::thread::Builder::new()
        .name("polybus-embedded-settle".into())
        .spawn(move || settle_all(&conn, &requests))?;
    Ok(queue)
}

fn settle_all(conn: &Mutex<Connection>, requests: &mpsc::Receiver<Request>) {
    // What arrives while a batch commits makes up the next batch: no waiting to fill one.
    while let Ok(first) = requests.recv() {
        let (settlements, replies): (Vec<_>, Vec<_>) = std::iter::once(first)
            .chain(requests.try_iter().take(BATCH_MAX - 1))
            .map(|request| (request.settlement, request.reply))
            .unzip();
        let outcome = log::settle(&mut lock(conn), &settlements);
        match outcome {
            Ok(settled) => {
                for (reply, settled) in replies.into_iter().zip(settled) {
                    // A member that stopped waiting is settled all the same.
                    let _ = reply.send(Ok(settled));
                }
            }
            Err(err) => {
                let err = Arc::new(err);
                for reply in replies {
                    let _ = reply.send(Err(Arc::clone(&err)));
                }
            }
        }
    }
}
