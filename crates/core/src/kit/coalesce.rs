//! A settle coalescer: callers queue items (acks, nacks, publishes) one at a time, a driver
//! task hands whatever gathered to the adapter's [`Flush`] as one batch, and each caller gets
//! back its own item's result.
//!
//! A batch goes once a flush slot is free ([`Config::in_flight`] flushes run at once) and
//! holds what queued meanwhile, up to [`Config::max_batch`] items and [`Config::max_weight`]
//! by [`Flush::weight`] (one item always fits). [`Gather`] says how long a batch may wait for
//! more once a slot is free. When the last [`Coalescer`] handle is dropped, the driver flushes
//! everything still queued, waits for the flushes under way and ends.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot};

/// Sends a batch to the broker and answers each of its items.
pub trait Flush<T>: Send + Sync + 'static {
    /// The result one item's caller gets.
    type Output: Send + 'static;

    /// Sends `batch`; returns one result per item, in the batch's order (the items past the
    /// end of a shorter answer fail with [`Unanswered`]).
    fn flush(&self, batch: Vec<T>) -> impl Future<Output = Vec<Self::Output>> + Send;

    /// The weight `item` adds to a batch, measured against [`Config::max_weight`].
    fn weight(&self, _item: &T) -> usize {
        0
    }
}

impl<T, R, F, Fut> Flush<T> for F
where
    F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Vec<R>> + Send,
    R: Send + 'static,
{
    type Output = R;

    fn flush(&self, batch: Vec<T>) -> impl Future<Output = Vec<R>> + Send {
        self(batch)
    }
}

/// How long a batch waits for more items once a flush slot is free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gather {
    /// Not at all: the batch is what queued while the slots were busy, so a lone item goes at once.
    Queued,
    /// While other tasks keep adding items: up to this many rounds of letting them run, ending
    /// at the first round that adds none. No timer, so a lone item still goes at once.
    Yield(usize),
    /// Until the batch is full or this long has passed since the slot was free.
    Linger(Duration),
}

/// How a [`Coalescer`] batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    max_batch: usize,
    max_weight: usize,
    in_flight: usize,
    gather: Gather,
}

impl Config {
    /// Batches of at most `max_batch` items (at least one), one flush at a time, no waiting.
    pub const fn new(max_batch: usize) -> Config {
        Config {
            max_batch: if max_batch == 0 { 1 } else { max_batch },
            max_weight: usize::MAX,
            in_flight: 1,
            gather: Gather::Queued,
        }
    }

    /// Caps the summed [`Flush::weight`] of a batch's items; a heavier lone item still goes.
    pub const fn max_weight(mut self, max_weight: usize) -> Config {
        self.max_weight = max_weight;
        self
    }

    /// Lets up to `in_flight` flushes (at least one) run at once.
    pub const fn in_flight(mut self, in_flight: usize) -> Config {
        self.in_flight = if in_flight == 0 { 1 } else { in_flight };
        self
    }

    /// Sets how long a batch waits for more items.
    pub const fn gather(mut self, gather: Gather) -> Config {
        self.gather = gather;
        self
    }
}

/// The coalescer's driver has ended (its runtime shut down); the item is handed back.
#[derive(Debug, thiserror::Error)]
#[error("the coalescer has stopped")]
pub struct Closed<T>(pub T);

/// The flush carrying an item ended without answering it (it panicked, was cancelled, or
/// returned too few results).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the flush ended without answering")]
pub struct Unanswered;

/// One queued item and where its result goes.
struct Job<T, R> {
    item: T,
    reply: oneshot::Sender<R>,
}

/// Queues items for batched flushes; cheap to clone, the driver ends with the last clone.
pub struct Coalescer<T, R> {
    queue: mpsc::UnboundedSender<Job<T, R>>,
}

impl<T, R> Clone for Coalescer<T, R> {
    fn clone(&self) -> Self {
        Coalescer { queue: self.queue.clone() }
    }
}

impl<T, R> std::fmt::Debug for Coalescer<T, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalescer").field("closed", &self.queue.is_closed()).finish()
    }
}

impl<T: Send + 'static, R: Send + 'static> Coalescer<T, R> {
    /// Starts a coalescer whose driver runs on the current tokio runtime.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn start<F: Flush<T, Output = R>>(config: Config, flush: F) -> Coalescer<T, R> {
        let (coalescer, driver) = Coalescer::new(config, flush);
        tokio::spawn(driver);
        coalescer
    }

    /// A coalescer and its driver, for the caller to run (on a thread of its own, say); the
    /// driver spawns each flush as a tokio task and returns once every handle is dropped and
    /// every flush has answered.
    pub fn new<F: Flush<T, Output = R>>(
        config: Config,
        flush: F,
    ) -> (Coalescer<T, R>, impl Future<Output = ()> + Send + 'static) {
        let (queue, jobs) = mpsc::unbounded_channel();
        (Coalescer { queue }, drive(config, Arc::new(flush), jobs))
    }

    /// True once the driver has ended (its runtime shut down, say): every call fails, so an
    /// owner that outlives runtimes starts a new coalescer instead.
    pub fn is_closed(&self) -> bool {
        self.queue.is_closed()
    }

    /// Queues `item` without waiting; the returned [`Pending`] resolves to its result.
    pub fn submit(&self, item: T) -> Result<Pending<R>, Closed<T>> {
        let (reply, result) = oneshot::channel();
        self.queue.send(Job { item, reply }).map_err(|mpsc::error::SendError(job)| Closed(job.item))?;
        Ok(Pending { result })
    }

    /// Queues `item` and waits for its result.
    pub async fn call(&self, item: T) -> Result<R, CallError> {
        match self.submit(item) {
            Ok(pending) => Ok(pending.await?),
            Err(Closed(_)) => Err(CallError::Closed),
        }
    }
}

/// Why [`Coalescer::call`] got no result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The driver had ended before the item was queued.
    #[error("the coalescer has stopped")]
    Closed,
    /// The item was queued but its flush never answered it.
    #[error(transparent)]
    Unanswered(#[from] Unanswered),
}

/// The result of a queued item, once its batch is flushed.
#[derive(Debug)]
#[must_use = "the result comes only when awaited"]
pub struct Pending<R> {
    result: oneshot::Receiver<R>,
}

impl<R> Future for Pending<R> {
    type Output = Result<R, Unanswered>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.result).poll(cx).map(|result| result.map_err(|_| Unanswered))
    }
}

/// Gathers batches from `jobs` and flushes them until every handle is dropped.
async fn drive<T, R, F>(config: Config, flush: Arc<F>, mut jobs: mpsc::UnboundedReceiver<Job<T, R>>)
where
    T: Send + 'static,
    R: Send + 'static,
    F: Flush<T, Output = R>,
{
    let slots = Arc::new(Semaphore::new(config.in_flight));
    let mut carried: Option<Job<T, R>> = None;
    loop {
        let first = match carried.take() {
            Some(job) => job,
            None => match jobs.recv().await {
                Some(job) => job,
                None => break,
            },
        };
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else { break };
        let mut batch = Batch { weight: flush.weight(&first.item), jobs: vec![first] };
        batch.take_queued(&config, &*flush, &mut jobs, &mut carried);
        match config.gather {
            Gather::Queued => {}
            Gather::Yield(rounds) => {
                for _ in 0..rounds {
                    if batch.is_full(&config, &carried) {
                        break;
                    }
                    tokio::task::yield_now().await;
                    let before = batch.jobs.len();
                    batch.take_queued(&config, &*flush, &mut jobs, &mut carried);
                    if batch.jobs.len() == before {
                        break;
                    }
                }
            }
            Gather::Linger(linger) => {
                let until = tokio::time::Instant::now() + linger;
                while !batch.is_full(&config, &carried) {
                    match tokio::time::timeout_at(until, jobs.recv()).await {
                        Ok(Some(job)) => batch.add(job, &config, &*flush, &mut carried),
                        Ok(None) | Err(_) => break,
                    }
                }
            }
        }
        let flush = Arc::clone(&flush);
        tokio::spawn(async move {
            let (items, replies): (Vec<T>, Vec<_>) =
                batch.jobs.into_iter().map(|j| (j.item, j.reply)).unzip();
            let results = flush.flush(items).await;
            // Every slot is free before anyone hears back, so an answered caller's next item
            // can go in the next batch at once.
            drop(slot);
            for (reply, result) in replies.into_iter().zip(results) {
                // A caller that stopped waiting needs no answer.
                let _ = reply.send(result);
            }
        });
    }
    // Closed: wait for the flushes under way, so a driver run on its own runtime returns
    // only once they have answered.
    let _ = slots.acquire_many(u32::try_from(config.in_flight).unwrap_or(u32::MAX)).await;
}

/// A batch being gathered.
struct Batch<T, R> {
    jobs: Vec<Job<T, R>>,
    weight: usize,
}

impl<T, R> Batch<T, R> {
    /// Full by count, or an item that did not fit is waiting for the next batch.
    fn is_full(&self, config: &Config, carried: &Option<Job<T, R>>) -> bool {
        self.jobs.len() >= config.max_batch || carried.is_some()
    }

    /// Adds `job`, or keeps it for the next batch when it would exceed the weight cap.
    fn add<F: Flush<T>>(
        &mut self,
        job: Job<T, R>,
        config: &Config,
        flush: &F,
        carried: &mut Option<Job<T, R>>,
    ) {
        let weight = flush.weight(&job.item);
        match self.weight.checked_add(weight) {
            Some(total) if total <= config.max_weight => {
                self.weight = total;
                self.jobs.push(job);
            }
            _ => *carried = Some(job),
        }
    }

    /// Adds what is queued right now, until the batch is full.
    fn take_queued<F: Flush<T>>(
        &mut self,
        config: &Config,
        flush: &F,
        jobs: &mut mpsc::UnboundedReceiver<Job<T, R>>,
        carried: &mut Option<Job<T, R>>,
    ) {
        while !self.is_full(config, carried) {
            let Ok(job) = jobs.try_recv() else { break };
            self.add(job, config, flush, carried);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Records each batch it gets and answers every item with itself doubled, or an error
    /// for the odd ones when `fail_odd`.
    #[derive(Clone, Default)]
    struct Recorder {
        batches: Arc<Mutex<Vec<Vec<u32>>>>,
        fail_odd: bool,
        gate: Option<Arc<Semaphore>>,
    }

    impl Recorder {
        fn batches(&self) -> Vec<Vec<u32>> {
            self.batches.lock().unwrap_or_else(|e| e.into_inner()).clone()
        }
    }

    impl Flush<u32> for Recorder {
        type Output = Result<u32, String>;

        async fn flush(&self, batch: Vec<u32>) -> Vec<Result<u32, String>> {
            self.batches.lock().unwrap_or_else(|e| e.into_inner()).push(batch.clone());
            if let Some(gate) = &self.gate {
                let _ = gate.acquire().await.map(|p| p.forget());
            }
            batch
                .into_iter()
                .map(|n| if self.fail_odd && n % 2 == 1 { Err(format!("refused {n}")) } else { Ok(n * 2) })
                .collect()
        }

        fn weight(&self, item: &u32) -> usize {
            *item as usize
        }
    }

    #[tokio::test]
    async fn coalesce_lone_item_goes_at_once() {
        let recorder = Recorder::default();
        let coalescer = Coalescer::start(Config::new(8), recorder.clone());
        assert_eq!(coalescer.call(7).await, Ok(Ok(14)));
        assert_eq!(recorder.batches(), vec![vec![7]]);
    }

    #[tokio::test]
    async fn coalesce_batches_what_queued_while_busy_up_to_max() {
        let gate = Arc::new(Semaphore::new(0));
        let recorder = Recorder { gate: Some(Arc::clone(&gate)), ..Recorder::default() };
        let coalescer = Coalescer::start(Config::new(3), recorder.clone());
        let first = coalescer.submit(0).map_err(|_| "closed").expect("queued");
        // Wait until the first batch is in its flush, so the rest queue behind it.
        while recorder.batches().is_empty() {
            tokio::task::yield_now().await;
        }
        let rest: Vec<_> =
            (1..=5).map(|n| coalescer.submit(n * 10).map_err(|_| "closed").expect("queued")).collect();
        gate.add_permits(3);
        assert_eq!(first.await, Ok(Ok(0)));
        let mut results = Vec::new();
        for pending in rest {
            results.push(pending.await);
        }
        assert_eq!(results, [10, 20, 30, 40, 50].map(|n| Ok(Ok(n * 2))));
        assert_eq!(recorder.batches(), vec![vec![0], vec![10, 20, 30], vec![40, 50]]);
    }

    #[tokio::test]
    async fn coalesce_errors_reach_their_own_caller() {
        let recorder = Recorder { fail_odd: true, ..Recorder::default() };
        let coalescer = Coalescer::start(Config::new(16).gather(Gather::Yield(4)), recorder.clone());
        let calls: Vec<_> = (0..6u32)
            .map(|n| {
                let coalescer = coalescer.clone();
                tokio::spawn(async move { (n, coalescer.call(n).await) })
            })
            .collect();
        for call in calls {
            let (n, result) = call.await.expect("call task");
            let expected = if n % 2 == 1 { Err(format!("refused {n}")) } else { Ok(n * 2) };
            assert_eq!(result, Ok(expected));
        }
        assert_eq!(recorder.batches().concat().len(), 6);
    }

    #[tokio::test]
    async fn coalesce_yield_gathers_items_of_running_tasks() {
        let recorder = Recorder::default();
        let coalescer = Coalescer::start(Config::new(16).gather(Gather::Yield(8)), recorder.clone());
        // On a current-thread runtime these all queue during the driver's first yield.
        let calls: Vec<_> = (1..=5u32)
            .map(|n| {
                let coalescer = coalescer.clone();
                tokio::spawn(async move { coalescer.call(n).await })
            })
            .collect();
        for call in calls {
            assert!(matches!(call.await, Ok(Ok(Ok(_)))));
        }
        assert_eq!(recorder.batches().len(), 1, "batches: {:?}", recorder.batches());
    }

    #[tokio::test(start_paused = true)]
    async fn coalesce_linger_waits_for_more_then_flushes_by_time() {
        let recorder = Recorder::default();
        let linger = Duration::from_millis(50);
        let coalescer = Coalescer::start(Config::new(4).gather(Gather::Linger(linger)), recorder.clone());
        let started = tokio::time::Instant::now();
        let first = coalescer.submit(1).map_err(|_| "closed").expect("queued");
        tokio::time::sleep(Duration::from_millis(10)).await;
        let second = coalescer.submit(2).map_err(|_| "closed").expect("queued");
        assert_eq!(first.await, Ok(Ok(2)));
        assert_eq!(second.await, Ok(Ok(4)));
        assert!(started.elapsed() >= linger);
        assert_eq!(recorder.batches(), vec![vec![1, 2]]);
    }

    #[tokio::test(start_paused = true)]
    async fn coalesce_linger_flushes_a_full_batch_early() {
        let recorder = Recorder::default();
        let coalescer = Coalescer::start(
            Config::new(2).gather(Gather::Linger(Duration::from_secs(60))),
            recorder.clone(),
        );
        let started = tokio::time::Instant::now();
        let (a, b) = tokio::join!(coalescer.call(3), coalescer.call(4));
        assert_eq!((a, b), (Ok(Ok(6)), Ok(Ok(8))));
        assert!(started.elapsed() < Duration::from_secs(60));
    }

    #[tokio::test]
    async fn coalesce_weight_caps_a_batch_and_carries_the_rest() {
        let gate = Arc::new(Semaphore::new(0));
        let recorder = Recorder { gate: Some(Arc::clone(&gate)), ..Recorder::default() };
        let coalescer = Coalescer::start(Config::new(10).max_weight(10), recorder.clone());
        let first = coalescer.submit(1).map_err(|_| "closed").expect("queued");
        while recorder.batches().is_empty() {
            tokio::task::yield_now().await;
        }
        // 4 + 5 fit under 10; 6 starts the next batch; 12 is too heavy for any but goes alone.
        let rest: Vec<_> = [4, 5, 6, 12, 2]
            .into_iter()
            .map(|n| coalescer.submit(n).map_err(|_| "closed").expect("queued"))
            .collect();
        gate.add_permits(5);
        assert_eq!(first.await, Ok(Ok(2)));
        for pending in rest {
            assert!(matches!(pending.await, Ok(Ok(_))));
        }
        assert_eq!(recorder.batches(), vec![vec![1], vec![4, 5], vec![6], vec![12], vec![2]]);
    }

    #[tokio::test]
    async fn coalesce_runs_up_to_in_flight_flushes_at_once() {
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Semaphore::new(0));
        let (r, m, g) = (Arc::clone(&running), Arc::clone(&most), Arc::clone(&gate));
        let flush = move |batch: Vec<u32>| {
            let (r, m, g) = (Arc::clone(&r), Arc::clone(&m), Arc::clone(&g));
            async move {
                let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(now, Ordering::SeqCst);
                let _ = g.acquire().await.map(|p| p.forget());
                r.fetch_sub(1, Ordering::SeqCst);
                batch
            }
        };
        let coalescer = Coalescer::start(Config::new(1).in_flight(2), flush);
        let pending: Vec<_> =
            (0..4u32).map(|n| coalescer.submit(n).map_err(|_| "closed").expect("queued")).collect();
        while running.load(Ordering::SeqCst) < 2 {
            tokio::task::yield_now().await;
        }
        gate.add_permits(4);
        for (n, p) in pending.into_iter().enumerate() {
            assert_eq!(p.await, Ok(n as u32));
        }
        assert_eq!(most.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn coalesce_dropping_every_handle_flushes_what_is_queued() {
        let recorder = Recorder::default();
        let (coalescer, driver) = Coalescer::new(Config::new(2), recorder.clone());
        let pending: Vec<_> =
            (1..=3u32).map(|n| coalescer.submit(n).map_err(|_| "closed").expect("queued")).collect();
        drop(coalescer);
        // The driver returns only once every queued item has been flushed and answered.
        driver.await;
        for (n, p) in (1..=3u32).zip(pending) {
            assert_eq!(p.await, Ok(Ok(n * 2)));
        }
        assert_eq!(recorder.batches(), vec![vec![1, 2], vec![3]]);
    }

    #[tokio::test]
    async fn coalesce_short_or_panicking_flush_fails_only_the_unanswered() {
        let flush = |batch: Vec<u32>| async move {
            assert!(!batch.contains(&99), "boom");
            batch.into_iter().take(1).collect::<Vec<_>>()
        };
        let (coalescer, driver) = Coalescer::new(Config::new(2), flush);
        let driver = tokio::spawn(driver);
        let (a, b) = (coalescer.submit(1), coalescer.submit(2));
        let (a, b) = (a.map_err(|_| "closed").expect("queued"), b.map_err(|_| "closed").expect("queued"));
        assert_eq!(a.await, Ok(1));
        assert_eq!(b.await, Err(Unanswered));
        assert_eq!(coalescer.call(99).await, Err(CallError::Unanswered(Unanswered)));
        // The driver outlives a panicking flush.
        assert_eq!(coalescer.call(5).await, Ok(5));
        drop(coalescer);
        driver.await.expect("driver");
    }

    #[tokio::test]
    async fn coalesce_submit_after_the_driver_ended_hands_the_item_back() {
        let (coalescer, driver) = Coalescer::new(Config::new(1), |batch: Vec<u32>| async move { batch });
        drop(driver);
        assert!(matches!(coalescer.submit(4), Err(Closed(4))));
        assert_eq!(coalescer.call(4).await, Err(CallError::Closed));
    }
}
