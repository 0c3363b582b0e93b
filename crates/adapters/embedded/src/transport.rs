//! [`EmbeddedTransport`]: the [`Transport`] over one broker file, with compaction.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::kind::{EmbeddedConfig, RetentionConfig};
use async_trait::async_trait;
use polybus_core::{
    Capabilities, Error, GroupInfo, Message, MessageQuery, Op, ReplayFrom, Result, StoredMessage,
    SubscribeOptions, Subscription, Support, TopicSpec, Transport,
};
use rusqlite::Connection;
use tokio::sync::watch;

use crate::log;
use crate::store::{DbResult, Store, now_ms};
use crate::subscription::EmbeddedSubscription;

/// Where the broker file is when the config names none.
pub const DEFAULT_PATH: &str = "polybus-broker.db";

/// Compaction runs after this many messages published through one transport…
const COMPACT_AFTER_PUBLISHES: u64 = 10_000;
/// …and at least this often.
const COMPACT_EVERY: Duration = Duration::from_secs(30);

/// A connection to an embedded broker: a durable log per topic in one local SQLite file.
#[derive(Clone)]
pub struct EmbeddedTransport {
    pub(crate) inner: Arc<Inner>,
}

/// State shared by a transport and its subscriptions.
pub(crate) struct Inner {
    pub(crate) store: Arc<Store>,
    retention: RetentionConfig,
    closed: watch::Sender<bool>,
    published: AtomicU64,
    compacting: tokio::sync::Mutex<()>,
}

impl EmbeddedTransport {
    /// Opens the broker file `config.path`, sharing its connection with every other transport
    /// of this process on the same file.
    pub async fn open(config: &EmbeddedConfig) -> Result<Self> {
        let store = Store::open_shared(config_path(config)).await?;
        Ok(Self::with_store(store, config))
    }

    /// Opens the broker file with a connection of its own, as another process would.
    pub async fn open_separate(config: &EmbeddedConfig) -> Result<Self> {
        let store = Store::open_separate(config_path(config)).await?;
        Ok(Self::with_store(store, config))
    }

    fn with_store(store: Arc<Store>, config: &EmbeddedConfig) -> Self {
        let (closed, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            store,
            retention: config.retention.clone().unwrap_or_default(),
            closed,
            published: AtomicU64::new(0),
            compacting: tokio::sync::Mutex::new(()),
        });
        tokio::spawn(compact_periodically(Arc::downgrade(&inner), inner.closed.subscribe()));
        EmbeddedTransport { inner }
    }

    /// The broker file's absolute path.
    pub fn path(&self) -> &Path {
        self.inner.store.path()
    }

    /// Removes messages every group has acked and applies the retention; returns how many
    /// messages left the log. Also runs by itself every 30 s and every 10,000 publishes.
    pub async fn compact(&self) -> Result<u64> {
        self.inner.compact().await
    }

    fn check_open(&self, op: Op) -> Result<()> {
        if *self.inner.closed.borrow() {
            return Err(Error::Closed(format!(
                "{} was closed; {op} needs a new connection",
                self.inner.store.target(None)
            )));
        }
        Ok(())
    }

    async fn append(&self, topic: &TopicSpec, messages: Vec<Message>) -> Result<()> {
        self.check_open(Op::Publish)?;
        if messages.is_empty() {
            return Ok(());
        }
        let handle = self.inner.store.topic(Op::Publish, &topic.native_name).await?;
        let count = messages.len() as u64;
        let topic_id = handle.id;
        self.inner
            .store
            .run(Op::Publish, Some(&topic.native_name), move |conn| log::publish(conn, topic_id, &messages))
            .await?;
        handle.wake();
        let before = self.inner.published.fetch_add(count, Ordering::AcqRel);
        if before / COMPACT_AFTER_PUBLISHES != (before + count) / COMPACT_AFTER_PUBLISHES {
            let inner = Arc::clone(&self.inner);
            tokio::spawn(async move { inner.compact_in_background().await });
        }
        Ok(())
    }
}

fn config_path(config: &EmbeddedConfig) -> PathBuf {
    PathBuf::from(config.path.as_deref().filter(|p| !p.trim().is_empty()).unwrap_or(DEFAULT_PATH))
}

impl Inner {
    /// A receiver that turns true when the transport is closed.
    pub(crate) fn closed(&self) -> watch::Receiver<bool> {
        self.closed.subscribe()
    }

    async fn compact(&self) -> Result<u64> {
        let _running = self.compacting.lock().await;
        self.compact_locked().await
    }

    async fn compact_in_background(&self) {
        // One compaction at a time is enough; a busy one already covers this request.
        let Ok(_running) = self.compacting.try_lock() else { return };
        match self.compact_locked().await {
            Ok(_) => {}
            // The process is ending; the next run compacts.
            Err(err @ polybus_core::Error::Closed(_)) => tracing::debug!(error = %err, "compaction stopped"),
            Err(err) => tracing::warn!(error = %err, "embedded broker compaction failed; it will be retried"),
        }
    }

    async fn compact_locked(&self) -> Result<u64> {
        let topics = self.store.run(Op::Close, None, log::topic_ids).await?;
        let mut removed = 0;
        for topic_id in topics {
            removed += self.compact_topic(topic_id).await?;
        }
        if removed > 0 {
            tracing::debug!(removed, path = %self.store.path().display(), "embedded broker compacted");
        }
        Ok(removed)
    }

    /// Applies the retention to one topic, then removes what every group has acked; returns
    /// the number of log messages removed.
    async fn compact_topic(&self, topic_id: i64) -> Result<u64> {
        let mut expired = 0;
        if let Some(keep) = self.retention.max_messages {
            let beyond =
                self.store.run(Op::Close, None, move |conn| log::beyond_newest(conn, topic_id, keep)).await?;
            if let Some(upto) = beyond {
                expired += self.delete_chunks(move |conn| log::delete_upto(conn, topic_id, upto)).await?;
            }
        }
        if let Some(age) = self.retention.max_age_seconds {
            let age_ms = i64::try_from(age).unwrap_or(i64::MAX).saturating_mul(1000);
            let before = now_ms().saturating_sub(age_ms);
            expired +=
                self.delete_chunks(move |conn| log::delete_published_before(conn, topic_id, before)).await?;
        }
        if expired > 0 {
            self.store.run(Op::Close, None, move |conn| log::forget_removed(conn, topic_id)).await?;
        }
        if self.retention.keep_acked == Some(true) {
            return Ok(expired);
        }
        let acked = self.delete_chunks(move |conn| log::delete_acked(conn, topic_id)).await?;
        Ok(expired + acked)
    }

    /// Calls `chunk` until it removes less than a full chunk; returns the total removed.
    async fn delete_chunks<F>(&self, chunk: F) -> Result<u64>
    where
        F: Fn(&mut Connection) -> DbResult<u64> + Clone + Send + 'static,
    {
        let mut total = 0;
        loop {
            // One call per chunk, so that publishers and consumers get the connection in between.
            let deleted = self.store.run(Op::Close, None, chunk.clone()).await?;
            total += deleted;
            if deleted < log::DELETE_CHUNK {
                return Ok(total);
            }
        }
    }
}

async fn compact_periodically(inner: Weak<Inner>, mut closed: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(COMPACT_EVERY) => {}
            _ = closed.wait_for(|closed| *closed) => return,
        }
        let Some(inner) = inner.upgrade() else { return };
        inner.compact_in_background().await;
    }
}

#[async_trait]
impl Transport for EmbeddedTransport {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            at_least_once: true,
            ordering_per_key: true,
            delayed_delivery: Support::Native,
            nack_delay: Support::Native,
            fan_out: Support::Native,
            replay: true,
            counts_attempts: true,
            max_payload_bytes: None,
        }
    }

    async fn ensure_topic(&self, topic: &TopicSpec) -> Result<()> {
        self.check_open(Op::EnsureTopic)?;
        self.inner.store.topic(Op::EnsureTopic, &topic.native_name).await?;
        Ok(())
    }

    async fn publish(&self, topic: &TopicSpec, message: Message) -> Result<()> {
        self.append(topic, vec![message]).await
    }

    async fn publish_batch(&self, topic: &TopicSpec, messages: Vec<Message>) -> Result<()> {
        self.append(topic, messages).await
    }

    async fn subscribe(
        &self,
        topic: &TopicSpec,
        options: &SubscribeOptions,
    ) -> Result<Box<dyn Subscription>> {
        self.check_open(Op::Subscribe)?;
        let subscription =
            EmbeddedSubscription::join(Arc::clone(&self.inner), &topic.native_name, options).await?;
        Ok(Box::new(subscription))
    }

    async fn groups(&self, topic: &TopicSpec) -> Result<Vec<GroupInfo>> {
        self.check_open(Op::Receive)?;
        crate::groups::of_topic(&self.inner.store, &topic.native_name).await
    }

    async fn ping(&self) -> Result<()> {
        self.check_open(Op::Ping)?;
        self.inner.store.run(Op::Ping, None, |conn| Ok(conn.query_row("SELECT 1", [], |_| Ok(()))?)).await
    }

    async fn close(&self) -> Result<()> {
        // Publishes are committed before they return: nothing is left to flush.
        self.inner.closed.send_replace(true);
        Ok(())
    }

    async fn replay(&self, topic: &TopicSpec, group: &str, from: ReplayFrom) -> Result<()> {
        self.replay_group(topic, group, from).await
    }

    async fn messages(&self, topic: &TopicSpec, query: &MessageQuery) -> Result<Vec<StoredMessage>> {
        self.stored_messages(topic, query).await
    }
}

impl std::fmt::Debug for EmbeddedTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedTransport").field("path", &self.path()).finish_non_exhaustive()
    }
}
