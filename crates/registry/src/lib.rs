//! polybus registry: what exists — broker definitions and topics — with validation,
//! patches and optimistic concurrency, over a pluggable [`Store`] (SQLite by default,
//! PostgreSQL for several replicas).

mod idempotency;
mod pg_tls;
mod postgres;
mod secrets;
mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use polybus_core::{Broker, BrokerPatch, Error, EventRef, Kinds, Result, Topic, TopicPatch};
use serde_json::Value;

pub use idempotency::{Claim, IdempotencyKey, IdempotencyRecord, IdempotencyState, IdempotencyStore};
pub use postgres::PostgresStore;
pub use secrets::{
    DEFAULT_KEY_FILE, KEY_BYTES, MAX_VALUE_BYTES, SecretInfo, Secrets, SecretsKey, default_key_path, find_key,
};
pub use sqlite::SqliteStore;

/// How many times an unversioned update retries when another writer got in first.
const UNVERSIONED_RETRIES: usize = 8;

/// What a record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A broker definition, keyed by tag.
    Broker,
    /// A topic, keyed by event, with its broker tag as parent.
    Topic,
    /// A server API key, stored hashed.
    ApiKey,
    /// A `$Secret{name}` value, stored encrypted.
    Secret,
    /// A scheduled job, keyed by id.
    Job,
    /// One run of a job, keyed by `JOB/NUMBER`, with its job id as parent.
    JobRun,
}

impl Kind {
    /// Name used in storage and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Broker => "broker",
            Kind::Topic => "topic",
            Kind::ApiKey => "api_key",
            Kind::Secret => "secret",
            Kind::Job => "job",
            Kind::JobRun => "job_run",
        }
    }
}

/// One stored document with its version.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Tag, event or API key id.
    pub key: String,
    /// Version, 1 after creation, +1 per update.
    pub version: u64,
    /// The definition as JSON (secrets as written, unresolved).
    pub doc: Value,
}

/// Storage under the registry: plain documents with compare-and-swap on the version.
#[async_trait]
pub trait Store: Send + Sync {
    /// The record, if present.
    async fn get(&self, kind: Kind, key: &str) -> Result<Option<Record>>;
    /// All records of a kind, optionally only those whose parent is `parent`, ordered by key.
    async fn list(&self, kind: Kind, parent: Option<&str>) -> Result<Vec<Record>>;
    /// Inserts at version 1; `Error::AlreadyExists` when the key is taken.
    async fn insert(&self, kind: Kind, key: &str, parent: Option<&str>, doc: &Value) -> Result<()>;
    /// Replaces the record if it is still at `expected`, bumping the version; false otherwise.
    async fn replace(&self, kind: Kind, key: &str, expected: u64, doc: &Value) -> Result<bool>;
    /// Deletes the record; false when it did not exist.
    async fn delete(&self, kind: Kind, key: &str) -> Result<bool>;
    /// Checks the store answers.
    async fn ping(&self) -> Result<()>;
    /// The store of idempotency keys in the same database, when this store keeps them.
    fn idempotency(&self) -> Option<&dyn IdempotencyStore> {
        None
    }
}

/// Opens the store a registry URL names: `postgres://…` / `postgresql://…`, or a file path or
/// `sqlite://PATH`.
pub async fn open_store(url: &str) -> Result<Arc<dyn Store>> {
    if is_postgres_url(url) {
        return Ok(Arc::new(PostgresStore::open(url).await?));
    }
    let path = url.strip_prefix("sqlite://").unwrap_or(url);
    Ok(Arc::new(SqliteStore::open(path).await?))
}

/// True when a registry URL names a PostgreSQL registry.
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// The registry: create, update, fetch and delete brokers and topics, validated.
#[derive(Clone)]
pub struct Registry {
    store: Arc<dyn Store>,
    kinds: Kinds,
}

impl Registry {
    /// A registry over `store` that checks the envelope of definitions only; give it the
    /// broker types it serves with [`Registry::with_kinds`] to check each env's config too.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Registry { store, kinds: Kinds::unchecked() }
    }

    /// This registry, validating definitions through `kinds` (usually those of the connectors
    /// the program was built with): an env of another type is refused.
    pub fn with_kinds(mut self, kinds: Kinds) -> Self {
        self.kinds = kinds;
        self
    }

    /// The broker types definitions are validated through.
    pub fn kinds(&self) -> &Kinds {
        &self.kinds
    }

    /// Opens the registry a URL names (see [`open_store`]).
    pub async fn open(url: &str) -> Result<Self> {
        Ok(Registry::new(open_store(url).await?))
    }

    /// The underlying store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Validates and stores a new broker; returns it at version 1.
    pub async fn create_broker(&self, mut broker: Broker) -> Result<Broker> {
        broker.validate(&self.kinds)?;
        broker.version = 1;
        self.store.insert(Kind::Broker, &broker.tag, None, &to_doc(&broker)?).await?;
        tracing::info!(broker = %broker.tag, envs = %broker.env_slugs(), "broker created");
        Ok(broker)
    }

    /// Applies a patch; with `patch.version` set, a stale version fails with `Error::Conflict`.
    pub async fn update_broker(&self, tag: &str, patch: BrokerPatch) -> Result<Broker> {
        for _ in 0..UNVERSIONED_RETRIES {
            let current = self.fetch_broker(tag).await?;
            check_version("broker", tag, patch.version, current.version)?;
            let mut next = patch.apply(&current, &self.kinds)?;
            self.check_topics_against(&next).await?;
            next.version = current.version + 1;
            if self.store.replace(Kind::Broker, tag, current.version, &to_doc(&next)?).await? {
                tracing::info!(broker = %tag, version = next.version, "broker updated");
                return Ok(next);
            }
            if let Some(sent) = patch.version {
                let now = self.fetch_broker(tag).await?.version;
                return Err(Error::Conflict { kind: "broker", tag: tag.into(), sent, current: now });
            }
        }
        Err(Error::Storage(format!("broker `{tag}` kept changing under concurrent updates; try again")))
    }

    /// Checks the broker's topics against a changed definition: a new env or a new broker type
    /// must not turn a topic's native name into a wildcard.
    async fn check_topics_against(&self, broker: &Broker) -> Result<()> {
        for record in self.store.list(Kind::Topic, Some(&broker.tag)).await? {
            let key = record.key.clone();
            let topic: Topic = from_record(record)?;
            for env in &broker.envs {
                topic.check_native_names(&env.slug, &env.broker_type, &self.kinds).map_err(|mut e| {
                    e.message = format!("topic `{key}` would break: {}", e.message);
                    e
                })?;
            }
        }
        Ok(())
    }

    /// The broker with this tag.
    pub async fn fetch_broker(&self, tag: &str) -> Result<Broker> {
        let record =
            self.store.get(Kind::Broker, tag).await?.ok_or_else(|| Error::BrokerNotFound(tag.into()))?;
        from_record(record)
    }

    /// Every broker, ordered by tag.
    pub async fn fetch_brokers(&self) -> Result<Vec<Broker>> {
        self.store.list(Kind::Broker, None).await?.into_iter().map(from_record).collect()
    }

    /// Deletes a broker; refused while it has topics unless `force`, which deletes them too.
    pub async fn delete_broker(&self, tag: &str, force: bool) -> Result<()> {
        self.fetch_broker(tag).await?;
        let topics = self.store.list(Kind::Topic, Some(tag)).await?;
        if !topics.is_empty() && !force {
            let names: Vec<_> = topics.iter().map(|t| t.key.as_str()).collect();
            return Err(Error::InUse { tag: tag.into(), topics: names.join(", ") });
        }
        for topic in topics {
            self.store.delete(Kind::Topic, &topic.key).await?;
        }
        if !self.store.delete(Kind::Broker, tag).await? {
            return Err(Error::BrokerNotFound(tag.into()));
        }
        tracing::info!(broker = %tag, "broker deleted");
        Ok(())
    }

    /// Validates a topic against its broker and stores it at version 1.
    pub async fn create_topic(&self, mut topic: Topic) -> Result<Topic> {
        let event = topic.event()?;
        let broker = self.fetch_broker(&event.broker).await?;
        topic.validate(&broker, &self.kinds)?;
        topic.version = 1;
        self.store.insert(Kind::Topic, &topic.tag, Some(&event.broker), &to_doc(&topic)?).await?;
        tracing::info!(event = %topic.tag, "topic created");
        Ok(topic)
    }

    /// Applies a patch to a topic; a stale `patch.version` fails with `Error::Conflict`.
    pub async fn update_topic(&self, event: &str, patch: TopicPatch) -> Result<Topic> {
        for _ in 0..UNVERSIONED_RETRIES {
            let current = self.fetch_topic(event).await?;
            check_version("topic", event, patch.version, current.version)?;
            let broker = self.fetch_broker(&current.event()?.broker).await?;
            let mut next = patch.apply(&current, &broker, &self.kinds)?;
            next.version = current.version + 1;
            if self.store.replace(Kind::Topic, event, current.version, &to_doc(&next)?).await? {
                return Ok(next);
            }
            if let Some(sent) = patch.version {
                let now = self.fetch_topic(event).await?.version;
                return Err(Error::Conflict { kind: "topic", tag: event.into(), sent, current: now });
            }
        }
        Err(Error::Storage(format!("topic `{event}` kept changing under concurrent updates; try again")))
    }

    /// The topic with this event name.
    pub async fn fetch_topic(&self, event: &str) -> Result<Topic> {
        let parsed: EventRef = event.parse()?;
        let key = parsed.to_string();
        let record = self.store.get(Kind::Topic, &key).await?.ok_or(Error::TopicNotFound(key))?;
        from_record(record)
    }

    /// Every topic, or those of one broker, ordered by event.
    pub async fn fetch_topics(&self, broker: Option<&str>) -> Result<Vec<Topic>> {
        if let Some(tag) = broker {
            self.fetch_broker(tag).await?;
        }
        self.store.list(Kind::Topic, broker).await?.into_iter().map(from_record).collect()
    }

    /// Deletes a topic.
    pub async fn delete_topic(&self, event: &str) -> Result<()> {
        let parsed: EventRef = event.parse()?;
        if !self.store.delete(Kind::Topic, &parsed.to_string()).await? {
            return Err(Error::TopicNotFound(parsed.to_string()));
        }
        Ok(())
    }

    /// Checks the store answers.
    pub async fn ping(&self) -> Result<()> {
        self.store.ping().await
    }

    /// The idempotency keys kept in this registry's database.
    pub fn idempotency(&self) -> Result<&dyn IdempotencyStore> {
        self.store.idempotency().ok_or_else(|| Error::Unsupported {
            broker_type: "this registry's store".into(),
            what: "idempotency keys (use a SQLite or PostgreSQL registry)".into(),
        })
    }
}

fn check_version(kind: &'static str, tag: &str, sent: Option<u64>, current: u64) -> Result<()> {
    match sent {
        Some(sent) if sent != current => Err(Error::Conflict { kind, tag: tag.into(), sent, current }),
        _ => Ok(()),
    }
}

fn to_doc<T: serde::Serialize>(value: &T) -> Result<Value> {
    serde_json::to_value(value).map_err(|e| Error::Storage(format!("cannot encode definition: {e}")))
}

fn from_record<T: serde::de::DeserializeOwned + Versioned>(record: Record) -> Result<T> {
    let mut value: T = serde_json::from_value(record.doc)
        .map_err(|e| Error::Storage(format!("stored definition `{}` is unreadable: {e}", record.key)))?;
    value.set_version(record.version);
    Ok(value)
}

trait Versioned {
    fn set_version(&mut self, version: u64);
}

impl Versioned for Broker {
    fn set_version(&mut self, version: u64) {
        self.version = version;
    }
}

impl Versioned for Topic {
    fn set_version(&mut self, version: u64) {
        self.version = version;
    }
}
