//! Ack deadlines: deliveries handed to the application, each settled at most once and only
//! before its deadline, and deliveries buffered while the application keeps asking for more.
//!
//! [`Leases`] holds what the application was given: a settlement [`takes`](Leases::take) its
//! entry (finding nothing means the deadline passed or the connection was lost, which adapters
//! report as [`Error::LeaseLost`](crate::Error::LeaseLost)), and a timer drains the
//! [`expired`](Leases::expired) ones to give them back to the broker.
//!
//! [`Buffer`] holds what the broker pushed and the application has not asked for yet; it gives
//! it back once the application stopped asking (no [`Polling`] guard alive) for a whole deadline.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One delivery handed out: what settles it, and until when.
#[derive(Debug)]
struct Lease<V> {
    value: V,
    deadline: Instant,
}

/// Outstanding deliveries keyed by a lease id, each with a deadline.
#[derive(Debug)]
pub struct Leases<K, V> {
    entries: HashMap<K, Lease<V>>,
    next_id: u64,
}

impl<K, V> Default for Leases<K, V> {
    fn default() -> Self {
        Leases { entries: HashMap::new(), next_id: 0 }
    }
}

impl<K: Eq + Hash + Clone, V> Leases<K, V> {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Hands out `value` under `key` until `deadline`, replacing what `key` held.
    pub fn insert(&mut self, key: K, value: V, deadline: Instant) {
        self.entries.insert(key, Lease { value, deadline });
    }

    /// Takes the delivery under `key` for settling; `None` once expired or forgotten.
    pub fn take(&mut self, key: &K) -> Option<V> {
        self.take_lease(key).map(|(value, _)| value)
    }

    /// Takes the delivery under `key` with its deadline (to put it back if settling fails).
    pub fn take_lease(&mut self, key: &K) -> Option<(V, Instant)> {
        self.entries.remove(key).map(|lease| (lease.value, lease.deadline))
    }

    /// Removes and returns every delivery whose deadline is at or before `now`.
    pub fn expired(&mut self, now: Instant) -> Vec<(K, V)> {
        let due: Vec<K> =
            self.entries.iter().filter(|(_, lease)| lease.deadline <= now).map(|(k, _)| k.clone()).collect();
        due.into_iter().filter_map(|k| self.entries.remove(&k).map(|lease| (k, lease.value))).collect()
    }

    /// The earliest deadline outstanding, for a timer.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.entries.values().map(|lease| lease.deadline).min()
    }

    /// Keeps only the deliveries `keep` accepts; returns how many were dropped.
    pub fn retain(&mut self, mut keep: impl FnMut(&K, &V) -> bool) -> usize {
        let before = self.entries.len();
        self.entries.retain(|k, lease| keep(k, &lease.value));
        before - self.entries.len()
    }

    /// Forgets every delivery (their connection is lost); returns how many there were.
    pub fn forget_all(&mut self) -> usize {
        let count = self.entries.len();
        self.entries.clear();
        count
    }

    /// How many deliveries are outstanding.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is outstanding.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl<V> Leases<u64, V> {
    /// Hands out `value` until `deadline` under a new lease id, which it returns.
    pub fn lease(&mut self, value: V, deadline: Instant) -> u64 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.entries.insert(id, Lease { value, deadline });
        id
    }
}

/// Deliveries received and not handed out yet, oldest first, with whether the application is
/// still asking for them.
#[derive(Debug)]
pub struct Buffer<T> {
    items: VecDeque<(T, Instant)>,
    polling: usize,
    idle_since: Instant,
}

impl<T> Buffer<T> {
    /// An empty buffer; the application counts as last asking at `now`.
    pub fn new(now: Instant) -> Self {
        Buffer { items: VecDeque::new(), polling: 0, idle_since: now }
    }

    /// Adds a delivery received at `now`.
    pub fn push(&mut self, item: T, now: Instant) {
        self.items.push_back((item, now));
    }

    /// The oldest delivery, to hand out.
    pub fn pop(&mut self) -> Option<T> {
        self.items.pop_front().map(|(item, _)| item)
    }

    /// Removes every delivery, oldest first.
    pub fn drain(&mut self) -> Vec<T> {
        self.items.drain(..).map(|(item, _)| item).collect()
    }

    /// Forgets every delivery (their connection is lost).
    pub fn clear(&mut self) {
        self.items.clear();
    }

    /// How many deliveries wait.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The application started asking at `now`.
    pub fn poll_started(&mut self, now: Instant) {
        self.polling += 1;
        self.idle_since = now;
    }

    /// The application stopped asking at `now`.
    pub fn poll_ended(&mut self, now: Instant) {
        self.polling = self.polling.saturating_sub(1);
        self.idle_since = now;
    }

    /// Removes the deliveries to give back: once nobody has asked for `patience`, those
    /// received at least `patience` ago.
    pub fn unclaimed(&mut self, now: Instant, patience: Duration) -> Vec<T> {
        let mut unclaimed = Vec::new();
        if self.polling > 0 || now.saturating_duration_since(self.idle_since) < patience {
            return unclaimed;
        }
        while self.items.front().is_some_and(|(_, at)| now.saturating_duration_since(*at) >= patience) {
            unclaimed.extend(self.items.pop_front().map(|(item, _)| item));
        }
        unclaimed
    }
}

/// Marks the application as asking for deliveries from a [`Buffer`] inside `S` while alive.
pub struct Polling<'a, S, T> {
    state: &'a Mutex<S>,
    buffer: fn(&mut S) -> &mut Buffer<T>,
}

impl<S, T> std::fmt::Debug for Polling<'_, S, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Polling").finish_non_exhaustive()
    }
}

impl<'a, S, T> Polling<'a, S, T> {
    /// Starts asking on the buffer `buffer` finds in `state`.
    pub fn start(state: &'a Mutex<S>, buffer: fn(&mut S) -> &mut Buffer<T>) -> Self {
        let mut guard = state.lock().unwrap_or_else(|p| p.into_inner());
        buffer(&mut guard).poll_started(Instant::now());
        drop(guard);
        Polling { state, buffer }
    }
}

impl<S, T> Drop for Polling<'_, S, T> {
    fn drop(&mut self) {
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (self.buffer)(&mut guard).poll_ended(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn leases_take_once_before_the_deadline() {
        let now = Instant::now();
        let mut leases = Leases::new();
        let id = leases.lease("a", now + SECOND);
        assert_eq!(leases.len(), 1);
        assert_eq!(leases.take(&id), Some("a"));
        assert_eq!(leases.take(&id), None);
        assert!(leases.is_empty());
    }

    #[test]
    fn leases_get_distinct_ids() {
        let now = Instant::now();
        let mut leases = Leases::new();
        let (a, b) = (leases.lease(1, now), leases.lease(2, now));
        assert_ne!(a, b);
        assert_eq!((leases.take(&b), leases.take(&a)), (Some(2), Some(1)));
    }

    #[test]
    fn leases_expired_drains_only_past_deadlines() {
        let now = Instant::now();
        let mut leases = Leases::new();
        leases.insert("early", 1, now);
        leases.insert("late", 2, now + SECOND);
        assert_eq!(leases.next_deadline(), Some(now));
        assert_eq!(leases.expired(now), vec![("early", 1)]);
        assert!(leases.expired(now).is_empty());
        assert_eq!(leases.take(&"early"), None, "an expired lease cannot be settled");
        assert_eq!(leases.next_deadline(), Some(now + SECOND));
        assert_eq!(leases.expired(now + SECOND), vec![("late", 2)]);
        assert_eq!(leases.next_deadline(), None);
    }

    #[test]
    fn leases_take_lease_keeps_the_deadline_for_putting_back() {
        let now = Instant::now();
        let mut leases = Leases::new();
        leases.insert(7, "m", now + SECOND);
        let (value, deadline) = leases.take_lease(&7).expect("outstanding");
        assert_eq!((value, deadline), ("m", now + SECOND));
        leases.insert(7, value, deadline);
        assert_eq!(leases.next_deadline(), Some(now + SECOND));
    }

    #[test]
    fn leases_forget_all_and_retain_count_what_went() {
        let now = Instant::now();
        let mut leases = Leases::new();
        for n in 0..4 {
            leases.insert(n, n * 10, now);
        }
        assert_eq!(leases.retain(|k, _| k % 2 == 0), 2);
        assert_eq!(leases.take(&1), None);
        assert_eq!(leases.forget_all(), 2);
        assert!(leases.expired(now + SECOND).is_empty());
        assert_eq!(leases.take(&0), None);
    }

    #[test]
    fn buffer_hands_out_oldest_first() {
        let now = Instant::now();
        let mut buffer = Buffer::new(now);
        buffer.push(1, now);
        buffer.push(2, now);
        assert_eq!(buffer.len(), 2);
        assert_eq!(buffer.pop(), Some(1));
        assert_eq!(buffer.drain(), vec![2]);
        assert!(buffer.is_empty());
    }

    #[test]
    fn buffer_keeps_deliveries_while_polled() {
        let now = Instant::now();
        let mut buffer = Buffer::new(now);
        buffer.push("a", now);
        buffer.poll_started(now);
        assert!(buffer.unclaimed(now + 10 * SECOND, SECOND).is_empty());
        buffer.poll_ended(now + 10 * SECOND);
        assert!(buffer.unclaimed(now + 10 * SECOND, SECOND).is_empty(), "idle only just now");
        assert_eq!(buffer.unclaimed(now + 11 * SECOND, SECOND), vec!["a"]);
    }

    #[test]
    fn buffer_gives_back_only_deliveries_older_than_patience() {
        let now = Instant::now();
        let mut buffer = Buffer::new(now);
        buffer.push("old", now);
        buffer.push("new", now + SECOND);
        assert!(buffer.unclaimed(now + SECOND / 2, SECOND).is_empty(), "created just now");
        assert_eq!(buffer.unclaimed(now + SECOND, SECOND), vec!["old"]);
        assert_eq!(buffer.pop(), Some("new"));
    }

    #[test]
    fn polling_guard_marks_the_buffer_while_alive() {
        struct State {
            buffer: Buffer<u8>,
        }
        let start = Instant::now();
        let state = Mutex::new(State { buffer: Buffer::new(start) });
        state.lock().expect("not poisoned").buffer.push(1, start);
        let later = start + 10 * SECOND;
        {
            let _polling = Polling::start(&state, |s| &mut s.buffer);
            assert!(state.lock().expect("not poisoned").buffer.unclaimed(later, SECOND).is_empty());
        }
        let mut guard = state.lock().expect("not poisoned");
        // Dropping the guard marked the application idle from then: nothing given back yet.
        assert!(guard.buffer.unclaimed(Instant::now(), SECOND).is_empty());
        assert_eq!(guard.buffer.unclaimed(later, SECOND), vec![1]);
    }
}
