//! A group member: a task that fetches (claim expired entries, then `XREADGROUP` on a
//! connection of its own) while the member holds fewer than `prefetch` unsettled deliveries,
//! and the ackers that settle them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use polybus_core::{Acker, Delivery, Error, Op, Result, SubscribeOptions, Subscription, TopicSpec};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Value};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinHandle;

use crate::fields::{self, Fields};
use crate::scripts;
use crate::transport::{CONNECT_TIMEOUT, Shared, target};

/// Most entries fetched in one round.
const MAX_BATCH: usize = 64;
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
    entry: Entry,
    permit: OwnedSemaphorePermit,
    /// When it was fetched: its ack deadline runs from then.
    at: Instant,
}

/// How a delivery is settled.
#[derive(Clone, Copy)]
enum Settle {
    /// `XACK`.
    Ack,
    /// Claimable again after `delay_ms`, with `leave_count` as its delivery count.
    Release { delay_ms: u64, leave_count: u32 },
    /// Restart its ack deadline.
    Touch,
}

/// Who this member is and where it reads.
struct Member {
    shared: Arc<Shared>,
    stream: String,
    delayed_key: String,
    retry_key: String,
    group: String,
    consumer: String,
    ack_deadline: Duration,
    ack_deadline_ms: u64,
    max_block: Duration,
}

impl Member {
    fn error(&self, op: Op, e: impl std::fmt::Display) -> Error {
        Error::transport(op, target(&self.stream), e)
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
            Err(Error::Transport { message, .. }) if message.contains("BUSYGROUP") => Ok(()),
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
        let (next_cursor, mut entries, wake) = match self.claim(count, cursor).await {
            Ok(claimed) => claimed,
            Err(e) if e.to_string().contains("NOGROUP") => {
                // The stream or group was deleted under us: start again from its beginning.
                self.create_group().await?;
                return Ok(Vec::new());
            }
            Err(e) => return Err(e),
        };
        *cursor = next_cursor;
        if entries.len() >= count || stop.is_stopped() {
            return Ok(entries);
        }
        let block =
            entries.is_empty().then(|| wake.map_or(self.max_block, |w| w.clamp(MIN_BLOCK, self.max_block)));
        let mut open = match reader.take() {
            Some(open) => open,
            None => {
                Reader::connect(&self.shared, self.max_block).await.map_err(|e| self.error(Op::Receive, e))?
            }
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
            // The connection may be broken: the next round opens a new one. Entries already
            // claimed are still handed out.
            Err(e) if entries.is_empty() => Err(e),
            Err(_) => Ok(entries),
        }
    }

    /// Runs the fetch script: due delayed publishes join the stream, expired entries are claimed.
    async fn claim(&self, count: usize, cursor: &str) -> Result<(String, Vec<Entry>, Option<Duration>)> {
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

    /// Settles `entry` (delivered `count` times); `Ok(false)` when this delivery no longer
    /// holds it.
    async fn settle(&self, op: Op, entry: &str, count: u32, how: Settle) -> Result<bool> {
        let keys = [self.stream.as_str(), self.retry_key.as_str()];
        let (outcome, retried) = self
            .shared
            .retrying(op, &self.stream, |mut conn| async move {
                let mut invocation = match how {
                    Settle::Ack => scripts::ACK.prepare_invoke(),
                    Settle::Release { .. } => scripts::RELEASE.prepare_invoke(),
                    Settle::Touch => scripts::TOUCH.prepare_invoke(),
                };
                invocation
                    .key(keys[0])
                    .key(keys[1])
                    .arg(&self.group)
                    .arg(&self.consumer)
                    .arg(entry)
                    .arg(count);
                if let Settle::Release { delay_ms, leave_count } = how {
                    invocation.arg(delay_ms).arg(self.ack_deadline_ms).arg(leave_count);
                }
                invocation.invoke_async::<i64>(&mut conn).await
            })
            .await?;
        // 0 is "no longer pending": after a lost connection, most likely because the first
        // attempt did settle it.
        Ok(outcome == 1 || (outcome == 0 && retried && !matches!(how, Settle::Touch)))
    }

    /// Hands an entry that never reached the subscriber back to the group, uncounted.
    async fn put_back(&self, entry: &Entry) {
        let uncounted = entry.count.saturating_sub(1);
        let how = Settle::Release { delay_ms: 0, leave_count: uncounted };
        if let Err(e) = self.settle(Op::Nack, &entry.id, entry.count, how).await {
            tracing::warn!(stream = %self.stream, group = %self.group, entry = %entry.id, error = %e,
                "could not hand an undelivered entry back; it returns after the ack deadline");
        }
    }

    fn delivery(self: &Arc<Self>, fetched: Fetched) -> Delivery {
        let Fetched { entry, permit, .. } = fetched;
        let message = fields::decode(&entry.id, entry.fields, entry.count);
        let acker = RedisAcker {
            member: self.clone(),
            entry: entry.id,
            count: entry.count,
            message_id: message.id.clone(),
            _permit: permit,
        };
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
            cmd.query_async::<Value>(&mut self.conn).await.map_err(|e| member.error(Op::Receive, e))?;
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
    member: Arc<Member>,
    deliveries: mpsc::Receiver<Result<Fetched>>,
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
            stream,
            shared,
        });
        member.create_group().await?;
        let prefetch = options.prefetch.max(1);
        let (tx, deliveries) = mpsc::channel(prefetch);
        let (stop, stop_rx) = watch::channel(false);
        let stop_rx = Stop { subscription: stop_rx, transport: member.shared.closed.subscribe() };
        let task = tokio::spawn(fetch_loop(member.clone(), Arc::new(Semaphore::new(prefetch)), tx, stop_rx));
        Ok(RedisSubscription { member, deliveries, stop, task: Some(task), closed: false })
    }
}

#[async_trait]
impl Subscription for RedisSubscription {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        if self.closed {
            return None;
        }
        loop {
            let fetched = match self.deliveries.recv().await? {
                Ok(fetched) => fetched,
                Err(e) => return Some(Err(e)),
            };
            // An entry that waited in the buffer for much of its ack deadline gets a fresh one,
            // unless another member took it over meanwhile: then it is not handed out.
            if fetched.at.elapsed() > self.member.ack_deadline / 2 {
                let entry = &fetched.entry;
                match self.member.settle(Op::Receive, &entry.id, entry.count, Settle::Touch).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::debug!(stream = %self.member.stream, entry = %entry.id,
                            "a buffered entry was claimed by another member; skipped");
                        continue;
                    }
                    Err(e) => {
                        tracing::debug!(stream = %self.member.stream, error = %e, "refreshing a buffered entry");
                    }
                }
            }
            return Some(Ok(self.member.delivery(fetched)));
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
        while let Ok(fetched) = self.deliveries.try_recv() {
            if let Ok(fetched) = fetched {
                self.member.put_back(&fetched.entry).await;
            }
        }
        if let Some(task) = self.task.take()
            && tokio::time::timeout(self.member.max_block + CONNECT_TIMEOUT * 2, task).await.is_err()
        {
            tracing::warn!(stream = %self.member.stream, "fetch task did not stop in time");
        }
        let member = &self.member;
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

/// Fetches while there is prefetch room, until stopped or nobody listens any more.
async fn fetch_loop(
    member: Arc<Member>,
    room: Arc<Semaphore>,
    deliveries: mpsc::Sender<Result<Fetched>>,
    mut stop: Stop,
) {
    let mut reader = None;
    let mut cursor = "0-0".to_owned();
    let mut failures = 0u32;
    while !stop.is_stopped() && !deliveries.is_closed() {
        let first = tokio::select! {
            biased;
            _ = stop.stopped() => break,
            permit = room.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let mut permits = vec![first];
        while permits.len() < MAX_BATCH {
            match room.clone().try_acquire_owned() {
                Ok(permit) => permits.push(permit),
                Err(_) => break,
            }
        }
        match member.fetch(&mut reader, &mut cursor, permits.len(), &mut stop).await {
            Ok(entries) => {
                failures = 0;
                for entry in entries {
                    let Some(permit) = permits.pop() else {
                        member.put_back(&entry).await;
                        continue;
                    };
                    let fetched = Fetched { entry, permit, at: Instant::now() };
                    if let Err(mpsc::error::SendError(unsent)) = deliveries.send(Ok(fetched)).await
                        && let Ok(fetched) = unsent
                    {
                        member.put_back(&fetched.entry).await;
                    }
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

/// Settles one delivery; holds its prefetch slot until then.
struct RedisAcker {
    member: Arc<Member>,
    entry: String,
    count: u32,
    message_id: String,
    _permit: OwnedSemaphorePermit,
}

#[async_trait]
impl Acker for RedisAcker {
    async fn ack(self: Box<Self>) -> Result<()> {
        if self.member.settle(Op::Ack, &self.entry, self.count, Settle::Ack).await? {
            Ok(())
        } else {
            Err(Error::LeaseLost(self.message_id))
        }
    }

    async fn nack(self: Box<Self>, delay: Option<Duration>) -> Result<()> {
        let delay_ms = delay.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let how = Settle::Release { delay_ms, leave_count: self.count };
        if self.member.settle(Op::Nack, &self.entry, self.count, how).await? {
            Ok(())
        } else {
            Err(Error::LeaseLost(self.message_id))
        }
    }
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
