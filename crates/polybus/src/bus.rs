//! The `Bus`: resolves `(env, "broker:topic")` through the registry to a connected transport.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use polybus_core::{
    BrokerKind, BrokerType, Capabilities, ConnectTarget, Connector, Error, Kinds, Message, Result,
    SubscribeOptions, TopicSpec, Transport, ValidationError,
};
use polybus_registry::Registry;
use tokio::sync::Mutex;
use tracing::Instrument;

use crate::delivery::{DeadLetterTarget, Subscriber};
use crate::files::FilePolicy;
use crate::metrics::{ConsumerMetrics, PublishMetrics};
use crate::secrets::{self, SecretPolicy};
use crate::telemetry;

/// How long a resolved topic or connection is trusted before the registry is asked again.
const REFRESH_AFTER: Duration = Duration::from_secs(1);

/// A consumer group, for [`Bus::subscribe`]: `Group("billing")`.
#[derive(Debug, Clone, Copy)]
pub struct Group<'a>(pub &'a str);

impl From<Group<'_>> for SubscribeOptions {
    fn from(group: Group<'_>) -> Self {
        SubscribeOptions::new(group.0)
    }
}

struct Connection {
    broker_version: u64,
    broker_type: BrokerType,
    transport: Arc<dyn Transport>,
    checked: Instant,
    ensured: std::collections::HashSet<String>,
}

#[derive(Clone)]
struct Route {
    spec: TopicSpec,
    topic_version: u64,
    checked: Instant,
    /// The publish series of this route, labelled with the broker type of `system`.
    metrics: PublishMetrics,
    system: BrokerType,
}

impl Route {
    /// The publish series for `broker_type`: this route's, unless its broker changed type.
    fn metrics(&self, broker_type: &BrokerType, env: &str) -> PublishMetrics {
        if &self.system == broker_type {
            self.metrics.clone()
        } else {
            PublishMetrics::new(broker_type.as_str(), env, &self.spec.event)
        }
    }
}

/// What a resolve already knows of the topic: its route (fresh) or its definition, just read.
enum Known {
    Route(Box<Route>),
    Topic(Box<polybus_core::Topic>),
}

/// What `(env, event)` resolves to.
#[derive(Clone)]
pub(crate) struct Resolved {
    pub transport: Arc<dyn Transport>,
    pub spec: TopicSpec,
    pub broker_type: BrokerType,
    pub metrics: PublishMetrics,
}

/// Builds a [`Bus`] with extra or replacement connectors.
pub struct BusBuilder {
    registry: Registry,
    connectors: HashMap<BrokerType, Arc<dyn Connector>>,
    secrets: SecretPolicy,
    files: FilePolicy,
}

impl BusBuilder {
    /// Adds (or replaces) the connector for its broker type.
    pub fn connector(mut self, connector: Arc<dyn Connector>) -> Self {
        self.connectors.insert(connector.broker_type(), connector);
        self
    }

    /// Sets which secret references resolve and from where (default: every `${VAR}`, no
    /// `$Secret{..}`).
    pub fn secrets(mut self, policy: SecretPolicy) -> Self {
        self.secrets = policy;
        self
    }

    /// Where the files definitions name may be (default: [`FilePolicy::default`]).
    pub fn files(mut self, policy: FilePolicy) -> Self {
        self.files = policy;
        self
    }

    /// Builds the bus; connections are made lazily, on first use of an env. A registry given
    /// without kinds ([`Registry::with_kinds`]) validates what is written through the bus's
    /// [`Bus::registry`] with the bus's connectors.
    pub fn build(self) -> Bus {
        let kinds = kinds_of(self.connectors.values());
        let registry = match self.registry.kinds().is_unchecked() {
            true => self.registry.with_kinds(kinds.clone()),
            false => self.registry,
        };
        Bus {
            inner: Arc::new(Inner {
                registry,
                kinds,
                connectors: self.connectors,
                secrets: self.secrets,
                files: self.files,
                connections: Mutex::new(HashMap::new()),
                connecting: Mutex::new(HashMap::new()),
                routes: Mutex::new(HashMap::new()),
            }),
        }
    }
}

/// Held while connecting to one broker env.
type Gate = Arc<Mutex<()>>;

struct Inner {
    registry: Registry,
    /// The connectors' broker types, to check native names with.
    kinds: Kinds,
    connectors: HashMap<BrokerType, Arc<dyn Connector>>,
    secrets: SecretPolicy,
    files: FilePolicy,
    connections: Mutex<HashMap<(String, String), Connection>>,
    /// One gate per broker env, so concurrent first uses make one connection, not one each.
    connecting: Mutex<HashMap<(String, String), Gate>>,
    routes: Mutex<HashMap<(String, String), Route>>,
}

/// Publish to and consume from any broker env named in the registry.
#[derive(Clone)]
pub struct Bus {
    inner: Arc<Inner>,
}

impl Bus {
    /// A bus over `registry` with the connectors compiled into this build.
    pub async fn open(registry: Registry) -> Result<Bus> {
        Ok(Bus::builder(registry).build())
    }

    /// A builder, to add connectors of your own.
    pub fn builder(registry: Registry) -> BusBuilder {
        let connectors = crate::default_connectors().into_iter().map(|c| (c.broker_type(), c)).collect();
        BusBuilder { registry, connectors, secrets: SecretPolicy::any_env(), files: FilePolicy::default() }
    }

    /// The broker types of this bus's connectors: give them to a registry to validate
    /// definitions the way this bus will use them.
    pub fn kinds(&self) -> &Kinds {
        &self.inner.kinds
    }

    /// The registry this bus resolves through.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// How this bus resolves secret references.
    pub fn secrets(&self) -> &SecretPolicy {
        &self.inner.secrets
    }

    /// Where the files definitions name may be.
    pub fn files(&self) -> &FilePolicy {
        &self.inner.files
    }

    /// Publishes one message to `event` in `env`; returns its id (with an idempotency key
    /// published already, the first message's id: see [`Bus::publish_outcome`]).
    pub async fn publish(&self, env: &str, event: &str, message: Message) -> Result<String> {
        Ok(self.publish_outcome(env, event, message).await?.id)
    }

    /// Publishes several messages to `event` in `env`, in order; returns their ids (see
    /// [`Bus::publish_batch_outcome`]).
    pub async fn publish_batch(&self, env: &str, event: &str, messages: Vec<Message>) -> Result<Vec<String>> {
        Ok(self.publish_batch_outcome(env, event, messages).await?.into_iter().map(|p| p.id).collect())
    }

    /// Joins a consumer group on `event` in `env`.
    pub async fn subscribe(
        &self,
        env: &str,
        event: &str,
        options: impl Into<SubscribeOptions>,
    ) -> Result<Subscriber> {
        let options = options.into();
        polybus_core::tag::check_tag(&options.group)
            .map_err(|e| polybus_core::ValidationError::field("group", e))?;
        let route = self.resolve(env, event).await?;
        self.check_group(&options.group, &route.broker_type, &route.spec)?;
        let inner = route.transport.subscribe(&route.spec, &options).await?;
        let dead_letter = DeadLetterTarget {
            transport: route.transport.clone(),
            spec: self.dead_letter_spec(&route)?,
            event: route.spec.event.clone(),
            group: options.group.clone(),
            ensured: tokio::sync::OnceCell::new(),
        };
        let metrics =
            ConsumerMetrics::new(route.broker_type.as_str(), env, &route.spec.event, &options.group);
        Ok(Subscriber::new(inner, route.spec.max_attempts, Arc::new(dead_letter), Arc::new(metrics)))
    }

    /// Joins a consumer group on the dead-letter destination of `event` in `env`.
    pub async fn dead_letters(
        &self,
        env: &str,
        event: &str,
        options: impl Into<SubscribeOptions>,
    ) -> Result<Subscriber> {
        let options = options.into();
        polybus_core::tag::check_tag(&options.group)
            .map_err(|e| polybus_core::ValidationError::field("group", e))?;
        let route = self.resolve(env, event).await?;
        let spec = self.dead_letter_spec(&route)?;
        self.check_group(&options.group, &route.broker_type, &spec)?;
        route.transport.ensure_topic(&spec).await?;
        let inner = route.transport.subscribe(&spec, &options).await?;
        let nowhere = DeadLetterTarget {
            transport: route.transport.clone(),
            spec: spec.clone(),
            event: spec.event.clone(),
            group: options.group.clone(),
            ensured: tokio::sync::OnceCell::new(),
        };
        let metrics = ConsumerMetrics::new(route.broker_type.as_str(), env, &spec.event, &options.group);
        Ok(Subscriber::new(inner, u32::MAX, Arc::new(nowhere), Arc::new(metrics)))
    }

    /// What the adapter serving `event` in `env` can do.
    pub async fn capabilities(&self, env: &str, event: &str) -> Result<Capabilities> {
        Ok(self.resolve(env, event).await?.transport.capabilities())
    }

    /// The native names and broker type `event` maps to in `env`.
    pub async fn topic_spec(&self, env: &str, event: &str) -> Result<(BrokerType, TopicSpec)> {
        let route = self.resolve(env, event).await?;
        Ok((route.broker_type, route.spec))
    }

    /// Connects to `broker`'s `env` afresh and pings it; returns how long that took.
    pub async fn test_connection(&self, broker: &str, env: &str) -> Result<Duration> {
        let started = Instant::now();
        let transport = self.connect(broker, env).await?;
        let result = transport.ping().await;
        if let Err(e) = transport.close().await {
            tracing::debug!(broker, env, error = %e, "closing test connection");
        }
        result.map(|_| started.elapsed())
    }

    /// Closes every connection this bus opened, flushing pending publishes.
    pub async fn close(&self) -> Result<()> {
        let connections: Vec<_> = self.inner.connections.lock().await.drain().collect();
        self.inner.routes.lock().await.clear();
        let mut first_error = None;
        for ((broker, env), conn) in connections {
            if let Err(e) = conn.transport.close().await {
                tracing::warn!(broker, env, error = %e, "closing connection");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// One resolve step: `(env, event)` to a route (topic spec and connection). A warm route
    /// reads nothing; a cold or stale one reads each definition it needs once, and
    /// [`Bus::route_connection`] alone decides whether to (re)connect.
    pub(crate) async fn resolve(&self, env: &str, event: &str) -> Result<Resolved> {
        let event_ref: polybus_core::EventRef = event.parse()?;
        let route_key = (env.to_owned(), event_ref.to_string());
        let conn_key = (event_ref.broker.clone(), env.to_owned());
        let cached = self.inner.routes.lock().await.get(&route_key).cloned();
        let fresh_route = cached.as_ref().filter(|r| r.checked.elapsed() < REFRESH_AFTER);
        if let Some(route) = fresh_route
            && let Some((transport, broker_type)) =
                self.cached_connection(&conn_key, &route.spec, None).await?
        {
            let metrics = route.metrics(&broker_type, env);
            return Ok(Resolved { transport, spec: route.spec.clone(), broker_type, metrics });
        }
        // Something is stale: read what is, once (the topic first: an unknown event is
        // TOPIC_NOT_FOUND whether or not its broker exists).
        let known = match fresh_route {
            Some(route) => Known::Route(Box::new(route.clone())),
            None => Known::Topic(Box::new(self.inner.registry.fetch_topic(&route_key.1).await?)),
        };
        let broker = self.inner.registry.fetch_broker(&event_ref.broker).await?;
        let Some(broker_env) = broker.env(env) else {
            return Err(Error::BrokerEnvNotFound {
                tag: broker.tag.clone(),
                env: env.to_owned(),
                available: broker.env_slugs(),
            });
        };
        let route = match known {
            Known::Route(route) => *route,
            Known::Topic(topic) => {
                if !self.inner.connectors.contains_key(&broker_env.broker_type) {
                    return Err(Error::NoAdapter(broker_env.broker_type.to_string()));
                }
                // Topics stored before their names were checked, or whose broker changed type.
                topic.check_native_names(env, &broker_env.broker_type, &self.inner.kinds)?;
                let spec = topic.spec(env)?;
                if let Some(previous) = &cached
                    && previous.topic_version != topic.version
                {
                    tracing::info!(env, event, version = topic.version, "topic definition changed");
                }
                let system = broker_env.broker_type.clone();
                let metrics = PublishMetrics::new(system.as_str(), env, &spec.event);
                let route =
                    Route { spec, topic_version: topic.version, checked: Instant::now(), metrics, system };
                self.inner.routes.lock().await.insert(route_key, route.clone());
                route
            }
        };
        let (transport, broker_type) = self.route_connection(&broker, broker_env, &route.spec).await?;
        let metrics = route.metrics(&broker_type, env);
        Ok(Resolved { transport, spec: route.spec, broker_type, metrics })
    }

    /// The cached connection of `key`: one checked against the registry lately (`version`
    /// `None`), or one made from definition `version` (then marked checked). Ensures `spec`'s
    /// topic on it the first time.
    async fn cached_connection(
        &self,
        key: &(String, String),
        spec: &TopicSpec,
        version: Option<u64>,
    ) -> Result<Option<(Arc<dyn Transport>, BrokerType)>> {
        let (transport, broker_type, ensure) = {
            let mut connections = self.inner.connections.lock().await;
            let usable = |c: &&mut Connection| match version {
                None => c.checked.elapsed() < REFRESH_AFTER,
                Some(v) => c.broker_version == v,
            };
            let Some(conn) = connections.get_mut(key).filter(usable) else {
                return Ok(None);
            };
            if version.is_some() {
                conn.checked = Instant::now();
            }
            (conn.transport.clone(), conn.broker_type.clone(), conn.ensured.insert(spec.native_name.clone()))
        };
        if ensure {
            self.ensure(&key.0, &key.1, &transport, spec).await?;
        }
        Ok(Some((transport, broker_type)))
    }

    /// The one place that decides to connect: no connection yet for `broker`'s env, or the
    /// definition it was made from is not the current one. Says why when it does.
    async fn route_connection(
        &self,
        broker: &polybus_core::Broker,
        broker_env: &polybus_core::BrokerEnv,
        spec: &TopicSpec,
    ) -> Result<(Arc<dyn Transport>, BrokerType)> {
        let key = (broker.tag.clone(), broker_env.slug.clone());
        let gate = self.inner.connecting.lock().await.entry(key.clone()).or_default().clone();
        let _connecting = gate.lock().await;
        if let Some(found) = self.cached_connection(&key, spec, Some(broker.version)).await? {
            return Ok(found);
        }
        let previous = self.inner.connections.lock().await.get(&key).map(|c| c.broker_version);
        // A connection from another version: `broker` was read before the gate and may be the
        // older of the two, so the current definition decides (never going back to an old one).
        let current;
        let (broker, broker_env) = match previous {
            None => (broker, broker_env),
            Some(_) => {
                current = self.inner.registry.fetch_broker(&key.0).await?;
                if let Some(found) = self.cached_connection(&key, spec, Some(current.version)).await? {
                    return Ok(found);
                }
                let env = current.env(&key.1).ok_or_else(|| Error::BrokerEnvNotFound {
                    tag: key.0.clone(),
                    env: key.1.clone(),
                    available: current.env_slugs(),
                })?;
                (&current, env)
            }
        };
        let reason = match previous {
            Some(version) => format!("broker definition changed (version {version} to {})", broker.version),
            None => "first use of this env".to_owned(),
        };
        tracing::info!(broker = %key.0, env = %key.1, version = broker.version, %reason, "connecting");
        let transport = self.connect_env(broker, broker_env).await?;
        self.ensure(&key.0, &key.1, &transport, spec).await?;
        let replaced = self.inner.connections.lock().await.insert(
            key,
            Connection {
                broker_version: broker.version,
                broker_type: broker_env.broker_type.clone(),
                transport: transport.clone(),
                checked: Instant::now(),
                ensured: [spec.native_name.clone()].into_iter().collect(),
            },
        );
        if let Some(old) = replaced {
            tokio::spawn(async move {
                if let Err(e) = old.transport.close().await {
                    tracing::warn!(error = %e, "closing replaced connection");
                }
            });
        }
        Ok((transport, broker_env.broker_type.clone()))
    }

    async fn ensure(
        &self,
        broker: &str,
        env: &str,
        transport: &Arc<dyn Transport>,
        spec: &TopicSpec,
    ) -> Result<()> {
        if let Err(e) = transport.ensure_topic(spec).await {
            if let Some(conn) =
                self.inner.connections.lock().await.get_mut(&(broker.to_owned(), env.to_owned()))
            {
                conn.ensured.remove(&spec.native_name);
            }
            return Err(e);
        }
        Ok(())
    }

    async fn connect(&self, broker: &str, env: &str) -> Result<Arc<dyn Transport>> {
        let definition = self.inner.registry.fetch_broker(broker).await?;
        let broker_env = definition.env(env).ok_or_else(|| Error::BrokerEnvNotFound {
            tag: broker.to_owned(),
            env: env.to_owned(),
            available: definition.env_slugs(),
        })?;
        self.connect_env(&definition, broker_env).await
    }

    /// A new connection to `broker_env` of `broker`, its secrets resolved and files checked.
    async fn connect_env(
        &self,
        broker: &polybus_core::Broker,
        broker_env: &polybus_core::BrokerEnv,
    ) -> Result<Arc<dyn Transport>> {
        let connector = self
            .inner
            .connectors
            .get(&broker_env.broker_type)
            .ok_or_else(|| Error::NoAdapter(broker_env.broker_type.to_string()))?;
        let resolved = self.inner.secrets.resolve(&broker_env.config).await?;
        let target = ConnectTarget {
            broker: broker.tag.clone(),
            env: broker_env.slug.clone(),
            broker_type: broker_env.broker_type.clone(),
            config: self.inner.files.connect_config(broker_env, resolved.config).await?,
        };
        // Every error of this connection, from here on, names references instead of values.
        let transport = connector
            .connect(&target)
            .await
            .map_err(|e| self.inner.files.conceal(broker_env, resolved.scrubber.scrub(e)))?;
        Ok(secrets::scrubbed(transport, resolved.scrubber))
    }
}

impl Resolved {
    /// Publishes prepared `message` to this route's topic in a producer span whose trace
    /// context it carries, counting it in the route's metrics.
    pub(crate) async fn send(&self, event: &str, mut message: Message) -> Result<()> {
        let span = telemetry::publish_span(self.broker_type.as_str(), event, 1);
        telemetry::inject(&span, &mut message);
        span.record("messaging.message.id", message.id.as_str());
        let started = Instant::now();
        let published = self.transport.publish(&self.spec, message).instrument(span.clone()).await;
        telemetry::outcome(&span, &published);
        self.metrics.observe(&published, 1, started);
        published
    }

    /// [`send`](Self::send) for several messages, in order, in one producer span.
    pub(crate) async fn send_batch(&self, event: &str, mut messages: Vec<Message>) -> Result<()> {
        let span = telemetry::publish_span(self.broker_type.as_str(), event, messages.len());
        for message in &mut messages {
            telemetry::inject(&span, message);
        }
        let count = messages.len();
        let started = Instant::now();
        let published = self.transport.publish_batch(&self.spec, messages).instrument(span.clone()).await;
        telemetry::outcome(&span, &published);
        self.metrics.observe(&published, count, started);
        published
    }
}

pub(crate) fn prepare(mut message: Message, route: &Resolved) -> Result<Message> {
    if message.id.is_empty() {
        message.id = uuid::Uuid::now_v7().to_string();
    }
    polybus_core::headers::check(&message)?;
    message.published_at = chrono_now();
    message.attempt = 0;
    if message.delay.is_some() && !route.transport.capabilities().delayed_delivery.available() {
        return Err(Error::Unsupported {
            broker_type: route.broker_type.to_string(),
            what: "delayed delivery".into(),
        });
    }
    Ok(message)
}

/// Names the message of a batch a validation error is about: `messages[3].headers`.
pub(crate) fn in_batch(error: Error, index: usize) -> Error {
    match error {
        Error::Validation(mut v) => {
            v.field = format!("messages[{index}].{}", v.field);
            Error::Validation(v)
        }
        other => other,
    }
}

impl Bus {
    /// The spec of the dead-letter destination of `route`'s topic, with the options its
    /// connector carries over.
    fn dead_letter_spec(&self, route: &Resolved) -> Result<TopicSpec> {
        let Some(connector) = self.inner.connectors.get(&route.broker_type) else {
            return Err(Error::NoAdapter(route.broker_type.to_string()));
        };
        Ok(route.spec.dead_letter_spec(connector.dead_letter_options(&route.spec.options)))
    }

    /// Checks that the names a group derives on `spec`'s broker are legal there.
    fn check_group(&self, group: &str, broker_type: &BrokerType, spec: &TopicSpec) -> Result<()> {
        let Some(connector) = self.inner.connectors.get(broker_type) else {
            return Err(Error::NoAdapter(broker_type.to_string()));
        };
        connector
            .check_group(&spec.native_name, group)
            .map_err(|e| ValidationError::field("group", format!("not a valid {broker_type} name: {e}")))?;
        Ok(())
    }
}

/// The broker types of `connectors`.
pub(crate) fn kinds_of<'a>(connectors: impl IntoIterator<Item = &'a Arc<dyn Connector>>) -> Kinds {
    Kinds::new(connectors.into_iter().map(|c| c.clone() as Arc<dyn BrokerKind>))
}

fn chrono_now() -> polybus_core::message::Timestamp {
    polybus_core::message::now()
}

#[cfg(test)]
mod tests {
    use super::*;
    use polybus_core::{Broker, BrokerPatch, Topic};
    use serde_json::json;

    /// A resolver that read the broker before an update must not bring the old definition back.
    #[tokio::test]
    async fn a_stale_definition_never_replaces_a_newer_connection() {
        let dir = tempfile::tempdir().expect("temp dir");
        let registry =
            Registry::open(&dir.path().join("registry.db").display().to_string()).await.expect("registry");
        let broker = json!({"name": "Race", "tag": "race", "envs": [
            {"slug": "dev", "type": "embedded", "config": {"path": dir.path().join("v1.db")}}]});
        registry.create_broker(Broker::from_value(broker).expect("broker")).await.expect("create broker");
        registry
            .create_topic(Topic::from_value(json!({"tag": "race:orders"})).expect("topic"))
            .await
            .expect("topic");
        let bus = Bus::open(registry).await.expect("bus");
        bus.publish("dev", "race:orders", Message::text("v1")).await.expect("publish on v1");
        let stale = bus.registry().fetch_broker("race").await.expect("v1");
        let patch = BrokerPatch::from_value(json!({"envs": [
            {"slug": "dev", "type": "embedded", "config": {"path": dir.path().join("v2.db")}}]}))
        .expect("patch");
        let current = bus.registry().update_broker("race", patch).await.expect("update");
        let spec = bus.topic_spec("dev", "race:orders").await.expect("spec").1;
        let env = |b: &Broker| b.env("dev").cloned().expect("env dev");
        let (newer, _) = bus.route_connection(&current, &env(&current), &spec).await.expect("v2 connection");
        let (got, _) = bus.route_connection(&stale, &env(&stale), &spec).await.expect("resolve with v1");
        assert!(Arc::ptr_eq(&newer, &got), "the stale definition replaced the newer connection");
        let key = ("race".to_owned(), "dev".to_owned());
        let version = bus.inner.connections.lock().await.get(&key).map(|c| c.broker_version);
        assert_eq!(version, Some(current.version));
        bus.close().await.expect("close");
    }
}
