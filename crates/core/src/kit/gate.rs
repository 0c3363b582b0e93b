//! A prefetch gate: a member holds at most `prefetch` unsettled deliveries, its fetch task
//! fetches only into free slots, and what was fetched but never handed out comes back on close.
//!
//! [`gate`] makes the two ends. The fetch task's [`Fetcher`] waits for [`room`](Fetcher::room)
//! (one free slot, then as many more as are free, up to a maximum), asks the broker for that
//! many, [`takes`](Room::take) one [`Slot`] per message it got and [`sends`](Fetcher::send) the
//! items on; slots of the room left untaken are freed when it is dropped. Each delivery handed
//! out holds its [`Slot`] until settled: dropping it frees the slot and wakes the fetcher. The
//! subscription's [`Gated`] end receives the items and, on [`close`](Gated::close), returns
//! those still buffered so the adapter can put them back to the broker.

use std::sync::Arc;

use tokio::sync::mpsc::error::{SendError, TrySendError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

/// Makes a gate of `prefetch` slots (at least one) whose buffer holds up to `capacity` items
/// (at least one).
pub fn gate<T>(prefetch: usize, capacity: usize) -> (Fetcher<T>, Gated<T>) {
    let slots = Arc::new(Semaphore::new(prefetch.max(1)));
    let (tx, rx) = mpsc::channel(capacity.max(1));
    (Fetcher { slots: slots.clone(), tx }, Gated { slots, rx })
}

/// The fetch task's end: waits for free slots and sends fetched items on.
#[derive(Debug)]
pub struct Fetcher<T> {
    slots: Arc<Semaphore>,
    tx: mpsc::Sender<T>,
}

impl<T> Fetcher<T> {
    /// Waits for a free slot, then takes as many more as are free, `max` in all (at least one);
    /// `None` once the gate is closed.
    pub async fn room(&self, max: usize) -> Option<Room> {
        let mut permits = self.slots.clone().acquire_owned().await.ok()?;
        let more = self.slots.available_permits().min(max.saturating_sub(1));
        if more > 0
            && let Ok(extra) =
                self.slots.clone().try_acquire_many_owned(u32::try_from(more).unwrap_or(u32::MAX))
        {
            permits.merge(extra);
        }
        Some(Room { permits })
    }

    /// Slots free now.
    pub fn free(&self) -> usize {
        self.slots.available_permits()
    }

    /// Buffers `item` for the subscription, waiting while the buffer is full; gives it back
    /// once the subscription is closed or gone.
    pub async fn send(&self, item: T) -> Result<(), T> {
        self.tx.send(item).await.map_err(|SendError(item)| item)
    }

    /// Buffers `item` if there is space now (for reports a busy subscriber can miss).
    pub fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        self.tx.try_send(item)
    }

    /// Whether the subscription is closed or gone: nothing sent will be received.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// Slots taken for one fetch: handed out one at a time, the rest freed on drop.
#[derive(Debug)]
pub struct Room {
    permits: OwnedSemaphorePermit,
}

impl Room {
    /// Slots left to hand out.
    pub fn len(&self) -> usize {
        self.permits.num_permits()
    }

    /// Whether every slot was handed out.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One slot for one fetched message; `None` when the broker sent more than asked for.
    pub fn take(&mut self) -> Option<Slot> {
        self.permits.split(1).map(|permit| Slot { permit })
    }
}

/// The slot one delivery occupies until it is settled; freed when dropped.
#[derive(Debug)]
pub struct Slot {
    permit: OwnedSemaphorePermit,
}

impl Slot {
    /// Joins `other` into this one, so both are freed together (the fetcher then wakes once
    /// for all of them).
    pub fn merge(&mut self, other: Slot) {
        self.permit.merge(other.permit);
    }

    /// Frees the slot now.
    pub fn release(self) {}
}

/// The subscription's end: receives what was fetched and returns the rest on close.
#[derive(Debug)]
pub struct Gated<T> {
    slots: Arc<Semaphore>,
    rx: mpsc::Receiver<T>,
}

impl<T> Gated<T> {
    /// The next item fetched; `None` once closed, or once the fetcher is gone and the buffer empty.
    pub async fn recv(&mut self) -> Option<T> {
        self.rx.recv().await
    }

    /// Stops the fetcher (its `room` answers `None`, its sends fail) and returns the items
    /// buffered but not received, to put back to the broker. Their slots are freed as they drop.
    pub fn close(&mut self) -> Vec<T> {
        self.slots.close();
        self.rx.close();
        let mut buffered = Vec::new();
        while let Ok(item) = self.rx.try_recv() {
            buffered.push(item);
        }
        buffered
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const SOON: Duration = Duration::from_secs(2);

    #[tokio::test]
    async fn gate_slots_bound_what_is_outstanding() {
        let (fetcher, _gated) = gate::<u32>(3, 8);
        let mut room = fetcher.room(10).await.expect("open");
        assert_eq!(room.len(), 3);
        let held: Vec<Slot> = std::iter::from_fn(|| room.take()).collect();
        assert_eq!(held.len(), 3);
        assert!(room.take().is_none(), "more than prefetch handed out");
        assert_eq!(fetcher.free(), 0);
        assert!(tokio::time::timeout(Duration::from_millis(50), fetcher.room(1)).await.is_err());
    }

    #[tokio::test]
    async fn gate_room_takes_at_most_max() {
        let (fetcher, _gated) = gate::<u32>(5, 8);
        let room = fetcher.room(2).await.expect("open");
        assert_eq!(room.len(), 2);
        assert_eq!(fetcher.free(), 3);
        drop(room);
        assert_eq!(fetcher.free(), 5, "untaken slots of a room are freed on drop");
    }

    #[tokio::test]
    async fn gate_dropped_or_released_slot_is_freed() {
        let (fetcher, _gated) = gate::<u32>(2, 8);
        let mut room = fetcher.room(2).await.expect("open");
        let first = room.take().expect("slot");
        let second = room.take().expect("slot");
        drop(first);
        assert_eq!(fetcher.free(), 1);
        second.release();
        assert_eq!(fetcher.free(), 2);
    }

    #[tokio::test]
    async fn gate_merged_slots_free_together() {
        let (fetcher, _gated) = gate::<u32>(3, 8);
        let mut room = fetcher.room(3).await.expect("open");
        let mut first = room.take().expect("slot");
        first.merge(room.take().expect("slot"));
        assert_eq!(fetcher.free(), 0);
        drop(first);
        assert_eq!(fetcher.free(), 2);
    }

    #[tokio::test]
    async fn gate_fetcher_wakes_when_room_appears() {
        let (fetcher, _gated) = gate::<u32>(1, 8);
        let slot = fetcher.room(1).await.expect("open").take().expect("slot");
        let fetcher = Arc::new(fetcher);
        let waiting = tokio::spawn({
            let fetcher = fetcher.clone();
            async move { fetcher.room(4).await.map(|room| room.len()) }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(slot);
        let got = tokio::time::timeout(SOON, waiting).await.expect("woken").expect("task");
        assert_eq!(got, Some(1));
    }

    #[tokio::test]
    async fn gate_close_drains_the_buffer_and_stops_the_fetcher() {
        let (fetcher, mut gated) = gate::<u32>(4, 8);
        for n in 1..=3 {
            fetcher.send(n).await.expect("open");
        }
        assert_eq!(gated.recv().await, Some(1));
        assert_eq!(gated.close(), vec![2, 3]);
        assert_eq!(fetcher.send(4).await, Err(4));
        assert!(fetcher.is_closed());
        assert!(fetcher.room(1).await.is_none());
        assert_eq!(gated.recv().await, None);
    }

    #[tokio::test]
    async fn gate_close_wakes_a_waiting_fetcher() {
        let (fetcher, mut gated) = gate::<u32>(1, 8);
        let _slot = fetcher.room(1).await.expect("open").take().expect("slot");
        let waiting = tokio::spawn(async move { fetcher.room(1).await.is_none() });
        tokio::task::yield_now().await;
        assert!(gated.close().is_empty());
        assert!(tokio::time::timeout(SOON, waiting).await.expect("woken").expect("task"));
    }
}
