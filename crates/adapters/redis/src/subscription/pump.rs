//! The fetch task: fetches while the member has prefetch room and hands each round to the
//! subscription.

use std::sync::Arc;
use std::time::{Duration, Instant};

use polybus_core::Result;
use polybus_core::kit::gate::{Fetcher, Room};
use tokio::sync::{mpsc, watch};

use super::Fetched;
use crate::fields;
use crate::settle::Settler;

/// Most entries fetched in one round.
const MAX_BATCH: usize = 256;
/// Consecutive failed fetches before the subscriber is told (earlier ones are retried quietly).
const QUIET_FAILURES: u32 = 2;

/// Ends when the subscription or the whole transport is closed (or dropped).
pub(super) struct Stop {
    pub(super) subscription: watch::Receiver<bool>,
    pub(super) transport: watch::Receiver<bool>,
}

impl Stop {
    pub(super) async fn stopped(&mut self) {
        tokio::select! {
            _ = self.subscription.wait_for(|s| *s) => {}
            _ = self.transport.wait_for(|s| *s) => {}
        }
    }

    pub(super) fn is_stopped(&self) -> bool {
        *self.subscription.borrow() || *self.transport.borrow()
    }
}

/// Takes the prefetch slots for one fetch round: waits for one, then takes all that are free
/// (settles free theirs a batch at a time). `None` when stopped.
async fn take_room(fetcher: &Fetcher<Result<Vec<Fetched>>>, stop: &mut Stop) -> Option<Room> {
    tokio::select! {
        biased;
        _ = stop.stopped() => None,
        room = fetcher.room(MAX_BATCH) => room,
    }
}

/// Fetches while there is prefetch room, until stopped or nobody listens any more.
pub(super) async fn fetch_loop(
    settler: Arc<Settler>,
    deliveries: Fetcher<Result<Vec<Fetched>>>,
    mut stop: Stop,
) {
    let member = settler.member();
    let mut reader = None;
    let mut cursor = "0-0".to_owned();
    let mut failures = 0u32;
    while !stop.is_stopped() && !deliveries.is_closed() {
        let Some(mut room) = take_room(&deliveries, &mut stop).await else { break };
        match member.fetch(&mut reader, &mut cursor, room.len(), &mut stop).await {
            Ok(entries) => {
                failures = 0;
                let mut undelivered = Vec::new();
                let mut round = Vec::with_capacity(entries.len());
                let at = Instant::now();
                for entry in entries {
                    match room.take() {
                        Some(slot) => {
                            let message = fields::decode(&entry.id, entry.fields, entry.count);
                            round.push(Fetched { id: entry.id, count: entry.count, message, slot, at });
                        }
                        None => undelivered.push((entry.id, entry.count)),
                    }
                }
                if !round.is_empty()
                    && let Err(unsent) = deliveries.send(Ok(round)).await
                {
                    let unsent = unsent.into_iter().flatten();
                    undelivered.extend(unsent.map(|fetched| (fetched.id, fetched.count)));
                }
                if !undelivered.is_empty() {
                    settler.put_back(undelivered).await;
                }
            }
            Err(e) => {
                drop(room);
                failures += 1;
                reader = None;
                let wait = Duration::from_millis(100 << failures.min(5)).min(Duration::from_secs(2));
                tracing::debug!(stream = %member.stream, group = %member.group, error = %e, retry_in = ?wait,
                    "fetching failed");
                // Told without waiting: a subscriber with a full buffer has enough to do.
                if failures > QUIET_FAILURES
                    && let Err(mpsc::error::TrySendError::Closed(_)) = deliveries.try_send(Err(e))
                {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.stopped() => break,
                }
            }
        }
    }
}
