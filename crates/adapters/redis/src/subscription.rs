//! A group member: a task that fetches (`XREADGROUP` on a connection of its own, and now and
//! then a claim of expired entries first) while the member holds fewer than `prefetch`
//! unsettled deliveries, and the ackers that settle them through the member's [`Settler`].

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use polybus_core::{Acker, Delivery, Error, Message, Op, Result, SubscribeOptions, Subscription, TopicSpec};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, RedisError, Value};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinHandle;

use crate::fields::{self, Fields};
use crate::scripts;
use crate::settle::{Settle, Settler};
use crate::transport::{CONNECT_TIMEOUT, GROUP_EXISTS, NO_GROUP, Shared, failed, reply_code, target};

/// Most entries fetched in one round.
const MAX_BATCH: usize = 256;
/// Most delayed publishes one fetch moves into the stream.
const MAX_MOVED: usize = 100;
/// Shortest wait of a blocking read (`BLOCK 0` would wait forever).
const MIN_BLOCK: Duration = Duration::from_millis(1);
/// Longest wait of a blocking read: it bounds how late a member notices entries that became
/// claimable (a dead member's, a nacked one) while it was waiting.
const MAX_BLOCK: Duration = Duration::from_secs(1);
/// Consecutive failed fetches before the subscriber is told (earlier ones are retried quietly).
const QUIET_FAILURES: u32 = 2;

/// One stream entry as fetched for this member.
struct Entry {
    id: String,
    fields: Fields,
    /// Times it has been delivered to this group, this delivery included.
    count: u32,
}

/// An entry on its way to the subscriber, with the prefetch slot it occupies.
struct Fetched {
    /// The entry's id.
    id: String,
    /// Times it has been delivered to this group, this delivery included.
    count: u32,
    /// The entry as a message (decoded by the fetch task, off the subscriber's task).
    message: Message,
    permit: OwnedSemaphorePermit,
    /// When it was fetched: its ack deadline runs from then.
    at: Instant,
}

/// Who this member is and where it reads.
pub(crate) struct Member {
    pub shared: Arc<Shared>,
    pub stream: String,
    delayed_key: String,
    pub retry_key: String,
    pub group: String,
    pub consumer: String,
    ack_deadline: Duration,
    pub ack_deadline_ms: u64,
    /// Longest wait of a blocking read, and longest time between two claims.
    max_block: Duration,
    /// What `claim_at` counts from.
    started: Instant,
    /// When the next fetch claims (ms after `started`): claiming is skipped until then, as
    /// nothing can have become claimable meanwhile that this member would have to notice
    /// sooner. Anyone may bring it forward; only a claim pushes it back.
    claim_at: AtomicU64,
}

impl Member {
    /// A transport error on this member's stream.
    pub fn error(&self, op: Op, e: impl std::fmt::Display) -> Error {
        Error::transport(op, target(&self.stream), e)
    }

    /// A transport error on this member's stream, keeping Redis's error.
    fn failed(&self, op: Op, e: RedisError) -> Error {
        failed(op, target(&self.stream), e)
    }

    fn millis_since_start(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Makes the fetch claim no later than `wait` from now.
    pub fn claim_within(&self, wait: Duration) {
        let wait = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        self.claim_at.fetch_min(self.millis_since_start().saturating_add(wait), Ordering::Relaxed);
    }

    /// Time until the next claim is due (zero when it is).
    fn until_claim(&self) -> Duration {
        let at = self.claim_at.load(Ordering::Relaxed);
        Duration::from_millis(at.saturating_sub(self.millis_since_start()))
    }

    /// `XGROUP CREATE <stream> <group> 0 MKSTREAM`: a new group reads from the beginning.
    async fn create_group(&self) -> Result<()> {
        let (stream, group) = (self.stream.as_str(), self.group.as_str());
        let created = self
            .shared
            .retrying(Op::Subscribe, stream, |mut conn| async move {
                redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(stream)
                    .arg(group)
                    .arg("0")
                    .arg("MKSTREAM")
                    .query_async::<Value>(&mut conn)
                    .await
            })
            .await;
        match created {
            Err(e) if reply_code(&e) == Some(GROUP_EXISTS) => Ok(()),
            other => other.map(|_| ()),
        }
    }

    /// One fetch round for up to `count` entries; blocks (interruptibly) only when nothing
    /// was claimable.
    async fn fetch(
        &self,
        reader: &mut Option<Reader>,
        cursor: &mut String,
        count: usize,
        stop: &mut Stop,
    ) -> Result<Vec<Entry>> {
        let mut entries = Vec::new();
        if self.until_claim().is_zero() {
            match self.claim(count, cursor).await {
                Ok(claimed) => entries = claimed,
                Err(e) if is_no_group(&e) => return self.recreate_group().await,
                Err(e) => return Err(e),
            }
        }
        if entries.len() >= count || stop.is_stopped() {
            return Ok(entries);
        }
        let block = entries.is_empty().then(|| self.until_claim().clamp(MIN_BLOCK, self.max_block));
        let mut open = match reader.take() {
            Some(open) => open,
            None => Reader::connect(&self.shared, self.max_block)
                .await
                .map_err(|e| self.failed(Op::Receive, e))?,
        };
        let client_id = open.client_id;
        let result = {
            let read = open.read(self, count - entries.len(), block);
            tokio::pin!(read);
            tokio::select! {
                result = &mut read => result,
                _ = stop.stopped() => {
                    // Wake the blocked read instead of dropping it, so entries it already took are
                    // handed back rather than lost until the ack deadline.
                    let mut conn = self.shared.manager.clone();
                    let unblocked =
                        redis::cmd("CLIENT").arg("UNBLOCK").arg(client_id).query_async::<i64>(&mut conn).await;
                    if let Err(e) = unblocked {
                        tracing::debug!(stream = %self.stream, error = %e, "unblocking a read");
                    }
                    tokio::time::timeout(self.max_block + CONNECT_TIMEOUT, &mut read)
                        .await
                        .unwrap_or_else(|_| Err(self.error(Op::Receive, "the blocking read did not end")))
                }
            }
        };
        match result {
            Ok(read) => {
                *reader = Some(open);
                entries.extend(read);
                Ok(entries)
            }
            Err(e) if entries.is_empty() && is_no_group(&e) => {
                *reader = Some(open);
                self.recreate_group().await
            }
            // The connection may be broken: the next round opens a new one. Entries already
            // claimed are still handed out.
            Err(e) if entries.is_empty() => Err(e),
            Err(_) => Ok(entries),
        }
    }

    /// The stream or group was deleted under us: starts again from its beginning.
    async fn recreate_group(&self) -> Result<Vec<Entry>> {
        self.claim_within(Duration::ZERO);
        self.create_group().await?;
        Ok(Vec::new())
    }

    /// Runs the fetch script: due delayed publishes join the stream, expired entries are
    /// claimed. Schedules the next claim: at once while the scan of the group's pending
    /// entries is not through, else when the next delayed message or nack is due, at the
    /// latest after `max_block`.
    async fn claim(&self, count: usize, cursor: &mut String) -> Result<Vec<Entry>> {
        // A release answered from here on brings the next claim forward again.
        self.claim_at.store(u64::MAX, Ordering::Relaxed);
        let claimed = self.run_claim(count, cursor).await;
        let next = match &claimed {
            Ok((next_cursor, _, _)) if next_cursor != "0-0" => Duration::ZERO,
            Ok((_, _, wake)) => wake.map_or(self.max_block, |w| w.min(self.max_block)),
            Err(_) => Duration::ZERO,
        };
        self.claim_within(next);
        let (next_cursor, entries, _) = claimed?;
        *cursor = next_cursor;
        Ok(entries)
    }

    async fn run_claim(&self, count: usize, cursor: &str) -> Result<(String, Vec<Entry>, Option<Duration>)> {
        let keys = [self.stream.as_str(), self.delayed_key.as_str(), self.retry_key.as_str()];
        let (reply, _) = self
            .shared
            .retrying(Op::Receive, &self.stream, |mut conn| async move {
                scripts::FETCH
                    .key(keys[0])
                    .key(keys[1])
                    .key(keys[2])
                    .arg(&self.group)
                    .arg(&self.consumer)
                    .arg(self.ack_deadline_ms)
                    .arg(count)
                    .arg(cursor)
                    .arg(self.shared.max_len.unwrap_or(0))
                    .arg(MAX_MOVED)
                    .invoke_async::<Value>(&mut conn)
                    .await
            })
            .await?;
        parse_claim(reply).ok_or_else(|| self.error(Op::Receive, "unexpected reply to the fetch script"))
    }
}

impl Settler {
    fn delivery(self: &Arc<Self>, fetched: Fetched) -> Delivery {
        let Fetched { id, count, message, permit, .. } = fetched;
        let acker =
            RedisAcker { settler: self.clone(), entry: id, count, message_id: message.id.clone(), permit };
        Delivery::new(message, Box::new(acker))
    }
}

/// The member's own connection for blocking reads, so they never hold up other commands.
struct Reader {
    conn: MultiplexedConnection,
    client_id: i64,
}

impl Reader {
    async fn connect(shared: &Shared, max_block: Duration) -> redis::RedisResult<Reader> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(max_block + CONNECT_TIMEOUT));
        let mut conn = shared.client.get_multiplexed_async_connection_with_config(&config).await?;
        let client_id = redis::cmd("CLIENT").arg("ID").query_async::<i64>(&mut conn).await?;
        Ok(Reader { conn, client_id })
    }

    /// `XREADGROUP … COUNT n [BLOCK ms] STREAMS <stream> >`: entries never delivered to the group.
    async fn read(&mut self, member: &Member, count: usize, block: Option<Duration>) -> Result<Vec<Entry>> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP").arg(&member.group).arg(&member.consumer).arg("COUNT").arg(count);
        if let Some(block) = block {
            cmd.arg("BLOCK").arg(u64::try_from(block.as_millis()).unwrap_or(u64::MAX).max(1));
        }
        cmd.arg("STREAMS").arg(&member.stream).arg(">");
        let reply =
            cmd.query_async::<Value>(&mut self.conn).await.map_err(|e| member.failed(Op::Receive, e))?;
        parse_read(reply).ok_or_else(|| member.error(Op::Receive, "unexpected reply to XREADGROUP"))
    }
}

/// Ends when the subscription or the whole transport is closed (or dropped).
struct Stop {
    subscription: watch::Receiver<bool>,
    transport: watch::Receiver<bool>,
}

impl Stop {
    async fn stopped(&mut self) {
        tokio::select! {
            _ = self.subscription.wait_for(|s| *s) => {}
            _ = self.transport.wait_for(|s| *s) => {}
        }
    }

    fn is_stopped(&self) -> bool {
        *self.subscription.borrow() || *self.transport.borrow()
    }
}

/// A member of a consumer group on one stream.
pub(crate) struct RedisSubscription {
    settler: Arc<Settler>,
    /// What each fetch round got, one message per round.
    deliveries: mpsc::Receiver<Result<Vec<Fetched>>>,
    /// The rest of the round being handed out.
    buffered: VecDeque<Fetched>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    closed: bool,
}

impl RedisSubscription {
    /// Joins (creating when needed) `options.group` on `topic` and starts fetching.
    pub async fn start(
        shared: Arc<Shared>,
        topic: &TopicSpec,
        options: &SubscribeOptions,
    ) -> Result<RedisSubscription> {
        let stream = topic.native_name.clone();
        let ack_deadline = options.ack_deadline.max(Duration::from_millis(1));
        let member = Arc::new(Member {
            delayed_key: scripts::delayed_key(&stream),
            retry_key: scripts::retry_key(&stream, &options.group),
            group: options.group.clone(),
            consumer: options.consumer.clone(),
            ack_deadline,
            ack_deadline_ms: u64::try_from(ack_deadline.as_millis()).unwrap_or(u64::MAX),
            max_block: (ack_deadline / 2).clamp(Duration::from_millis(100), MAX_BLOCK),
            started: Instant::now(),
            claim_at: AtomicU64::new(0),
            stream,
            shared,
        });
        member.create_group().await?;
        let settler = Settler::start(member.clone());
        let prefetch = options.prefetch.max(1);
        let (tx, deliveries) = mpsc::channel(prefetch);
        let (stop, stop_rx) = watch::channel(false);
        let stop_rx = Stop { subscription: stop_rx, transport: member.shared.closed.subscribe() };
        let room = Arc::new(Semaphore::new(prefetch));
        let task = tokio::spawn(fetch_loop(settler.clone(), room, tx, stop_rx));
        Ok(RedisSubscription {
            settler,
            deliveries,
            buffered: VecDeque::new(),
            stop,
            task: Some(task),
            closed: false,
        })
    }
}

#[async_trait]
impl Subscription for RedisSubscription {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        if self.closed {
            return None;
        }
        let member = self.settler.member();
        loop {
            let fetched = match self.buffered.pop_front() {
                Some(fetched) => fetched,
                None => match self.deliveries.recv().await? {
                    Ok(round) => {
                        self.buffered = round.into();
                        continue;
                    }
                    Err(e) => return Some(Err(e)),
                },
            };
            // An entry that waited in the buffer for much of its ack deadline gets a fresh one,
            // unless another member took it over meanwhile: then it is not handed out.
            if fetched.at.elapsed() > member.ack_deadline / 2 {
                match self
                    .settler
                    .settle(Op::Receive, fetched.id.clone(), fetched.count, Settle::Touch, None)
                    .await
                {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::debug!(stream = %member.stream, entry = %fetched.id,
                            "a buffered entry was claimed by another member; skipped");
                        continue;
                    }
                    Err(e) => {
                        tracing::debug!(stream = %member.stream, error = %e, "refreshing a buffered entry");
                    }
                }
            }
            return Some(Ok(self.settler.delivery(fetched)));
        }
    }

    async fn close(&mut self) -> Result<()> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        self.stop.send_replace(true);
        // From here the fetch task cannot hand out more; it puts back what it still gets.
        self.deliveries.close();
        let mut buffered: Vec<Fetched> = self.buffered.drain(..).collect();
        while let Ok(round) = self.deliveries.try_recv() {
            buffered.extend(round.into_iter().flatten());
        }
        self.settler.put_back(buffered.into_iter().map(|fetched| (fetched.id, fetched.count))).await;
        let member = self.settler.member();
        if let Some(task) = self.task.take()
            && tokio::time::timeout(member.max_block + CONNECT_TIMEOUT * 2, task).await.is_err()
        {
            tracing::warn!(stream = %member.stream, "fetch task did not stop in time");
        }
        let forgotten = member
            .shared
            .retrying(Op::Close, &member.stream, |mut conn| async move {
                scripts::FORGET_CONSUMER
                    .key(&member.stream)
                    .arg(&member.group)
                    .arg(&member.consumer)
                    .invoke_async::<i64>(&mut conn)
                    .await
            })
            .await;
        if let Err(e) = forgotten {
            tracing::debug!(stream = %member.stream, error = %e, "removing an idle member from its group");
        }
        Ok(())
    }
}

/// Takes the prefetch slots for one fetch round: waits for one, then takes all that are free
/// (settles free theirs a batch at a time). `None` when stopped.
async fn take_room(room: &Arc<Semaphore>, stop: &mut Stop) -> Option<OwnedSemaphorePermit> {
    let mut permits = tokio::select! {
        biased;
        _ = stop.stopped() => return None,
        permit = room.clone().acquire_owned() => permit.ok()?,
    };
    let more = room.available_permits().min(MAX_BATCH - 1);
    if more > 0
        && let Ok(extra) = room.clone().try_acquire_many_owned(u32::try_from(more).unwrap_or(u32::MAX))
    {
        permits.merge(extra);
    }
    Some(permits)
}

/// Fetches while there is prefetch room, until stopped or nobody listens any more.
async fn fetch_loop(
    settler: Arc<Settler>,
    room: Arc<Semaphore>,
    deliveries: mpsc::Sender<Result<Vec<Fetched>>>,
    mut stop: Stop,
) {
    let member = settler.member();
    let mut reader = None;
    let mut cursor = "0-0".to_owned();
    let mut failures = 0u32;
    while !stop.is_stopped() && !deliveries.is_closed() {
        let Some(mut permits) = take_room(&room, &mut stop).await else { break };
        match member.fetch(&mut reader, &mut cursor, permits.num_permits(), &mut stop).await {
            Ok(entries) => {
                failures = 0;
                let mut undelivered = Vec::new();
                let mut round = Vec::with_capacity(entries.len());
                let at = Instant::now();
                for entry in entries {
                    match permits.split(1) {
                        Some(permit) => {
                            let message = fields::decode(&entry.id, entry.fields, entry.count);
                            round.push(Fetched { id: entry.id, count: entry.count, message, permit, at });
                        }
                        None => undelivered.push((entry.id, entry.count)),
                    }
                }
                if !round.is_empty()
                    && let Err(mpsc::error::SendError(unsent)) = deliveries.send(Ok(round)).await
                {
                    let unsent = unsent.into_iter().flatten();
                    undelivered.extend(unsent.map(|fetched| (fetched.id, fetched.count)));
                }
                if !undelivered.is_empty() {
                    settler.put_back(undelivered).await;
                }
            }
            Err(e) => {
                drop(permits);
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

/// Settles one delivery; holds its prefetch slot until that is answered.
struct RedisAcker {
    settler: Arc<Settler>,
    entry: String,
    count: u32,
    message_id: String,
    permit: OwnedSemaphorePermit,
}

#[async_trait]
impl Acker for RedisAcker {
    async fn ack(self: Box<Self>) -> Result<()> {
        (*self).settle(Op::Ack, Settle::Ack).await
    }

    async fn nack(self: Box<Self>, delay: Option<Duration>) -> Result<()> {
        let delay_ms = delay.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let how = Settle::Release { delay_ms, leave_count: self.count };
        (*self).settle(Op::Nack, how).await
    }
}

impl RedisAcker {
    /// Settles through the member's queue; the prefetch slot is freed once it is answered.
    async fn settle(self, op: Op, how: Settle) -> Result<()> {
        let RedisAcker { settler, entry, count, message_id, permit } = self;
        if settler.settle(op, entry, count, how, Some(permit)).await? {
            Ok(())
        } else {
            Err(Error::LeaseLost(message_id))
        }
    }
}

/// True when `e` says the stream or the group no longer exists.
fn is_no_group(e: &Error) -> bool {
    reply_code(e) == Some(NO_GROUP)
}

fn text(value: Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes).ok(),
        Value::SimpleString(s) => Some(s),
        Value::VerbatimString { text, .. } => Some(text),
        _ => None,
    }
}

fn bytes(value: Value) -> Option<Vec<u8>> {
    match value {
        Value::BulkString(bytes) => Some(bytes),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::VerbatimString { text, .. } => Some(text.into_bytes()),
        Value::Int(n) => Some(n.to_string().into_bytes()),
        _ => None,
    }
}

/// `[f1, v1, f2, v2, …]` (or a map, in RESP3).
fn parse_fields(value: Value) -> Option<Fields> {
    match value {
        Value::Array(items) => {
            let mut fields = Vec::with_capacity(items.len() / 2);
            let mut items = items.into_iter();
            while let (Some(name), Some(value)) = (items.next(), items.next()) {
                fields.push((bytes(name)?, bytes(value)?));
            }
            Some(fields)
        }
        Value::Map(pairs) => pairs.into_iter().map(|(k, v)| Some((bytes(k)?, bytes(v)?))).collect(),
        _ => None,
    }
}

/// An entry `[id, fields]` (with the delivery count appended by the fetch script).
fn parse_entry(value: Value, count: Option<u32>) -> Option<Entry> {
    let Value::Array(items) = value else { return None };
    let mut items = items.into_iter();
    let id = text(items.next()?)?;
    let fields = parse_fields(items.next()?)?;
    let count = match count {
        Some(count) => count,
        None => match items.next()? {
            Value::Int(n) => u32::try_from(n).ok()?,
            _ => return None,
        },
    };
    Some(Entry { id, fields, count })
}

/// The fetch script's `{cursor, entries, wake in ms or -1}`.
fn parse_claim(value: Value) -> Option<(String, Vec<Entry>, Option<Duration>)> {
    let Value::Array(items) = value else { return None };
    let mut items = items.into_iter();
    let cursor = text(items.next()?)?;
    let Value::Array(claimed) = items.next()? else { return None };
    let entries = claimed.into_iter().map(|v| parse_entry(v, None)).collect::<Option<Vec<_>>>()?;
    let wake = match items.next()? {
        Value::Int(ms) if ms >= 0 => Some(Duration::from_millis(ms.unsigned_abs())),
        Value::Int(_) => None,
        _ => return None,
    };
    Some((cursor, entries, wake))
}

/// An `XREADGROUP` reply for one stream: nil, `[[name, entries]]`, or a RESP3 map.
fn parse_read(value: Value) -> Option<Vec<Entry>> {
    let entries = match value {
        Value::Nil => return Some(Vec::new()),
        Value::Array(streams) => {
            let Value::Array(stream) = streams.into_iter().next()? else { return None };
            stream.into_iter().nth(1)?
        }
        Value::Map(streams) => streams.into_iter().next()?.1,
        _ => return None,
    };
    let Value::Array(entries) = entries else { return None };
    entries.into_iter().map(|v| parse_entry(v, Some(1))).collect()
}
