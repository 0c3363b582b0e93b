//! How a [`Bus`](crate::Bus) resolves secret references, and the wrappers that keep resolved
//! values out of every error a connection reports.
//!
//! `${VAR}` reads an environment variable of this process; a [`SecretPolicy`] may allow only
//! names with given prefixes (a server must: otherwise anyone who can write a definition can
//! read the server's environment through connection errors). `$Secret{name}` reads a secret
//! from the registry's encrypted [`Secrets`]. Each connection keeps a [`Scrubber`] of the
//! values it resolved, and every error leaving the connection names the reference instead.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use polybus_core::secret::{self, Reference, Resolved, Scrubber, SecretError};
use polybus_core::{
    Acker, Broker, BrokerEnv, Capabilities, Delivery, Error, Message, Result, SubscribeOptions, Subscription,
    TopicSpec, Transport, ValidationError,
};
use polybus_registry::Secrets;
use serde_json::Value;

/// The prefix a server allows by default.
pub const DEFAULT_ENV_PREFIX: &str = "POLYBUS_BROKER_";

/// Every value a bus of this process resolved: client libraries log endpoints on their own
/// (reconnecting…), so a process's log writer scrubs its lines with [`scrub_log`].
static RESOLVED: LazyLock<RwLock<Scrubber>> = LazyLock::new(Default::default);

/// `line` with every value any bus of this process resolved replaced by its reference; for a
/// log writer.
pub fn scrub_log(line: &str) -> Cow<'_, str> {
    let resolved = RESOLVED.read().unwrap_or_else(|poisoned| poisoned.into_inner());
    if resolved.is_empty() { Cow::Borrowed(line) } else { Cow::Owned(resolved.scrub_str(line)) }
}

fn remember(scrubber: &Scrubber) {
    if !scrubber.is_empty() {
        RESOLVED.write().unwrap_or_else(|poisoned| poisoned.into_inner()).extend(scrubber);
    }
}

/// Which references resolve, and from where.
#[derive(Clone, Debug, Default)]
pub struct SecretPolicy {
    /// `None`: every variable; otherwise only names starting with one of these.
    env_prefixes: Option<Vec<String>>,
    store: Option<Secrets>,
}

impl SecretPolicy {
    /// Every `${VAR}` resolves (a process that owns its environment: the local CLI, a library
    /// user); `$Secret{..}` only once a store is added.
    pub fn any_env() -> Self {
        SecretPolicy::default()
    }

    /// Only `${VAR}` whose name starts with one of `prefixes` resolve; an empty prefix allows
    /// every variable.
    pub fn env_prefixes<I, S>(prefixes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let prefixes: Vec<String> = prefixes.into_iter().map(Into::into).collect();
        let env_prefixes = if prefixes.iter().any(String::is_empty) { None } else { Some(prefixes) };
        SecretPolicy { env_prefixes, store: None }
    }

    /// Resolves `$Secret{name}` from `secrets`.
    pub fn with_store(mut self, secrets: Secrets) -> Self {
        self.store = Some(secrets);
        self
    }

    /// The secret store, when there is one.
    pub fn store(&self) -> Option<&Secrets> {
        self.store.as_ref()
    }

    /// True when `${var}` may resolve.
    pub fn allows_env(&self, var: &str) -> bool {
        self.env_prefixes.as_ref().is_none_or(|prefixes| prefixes.iter().any(|p| var.starts_with(p.as_str())))
    }

    /// The allowed prefixes, for messages: `` `POLYBUS_BROKER_` `` or "any name".
    fn allowed(&self) -> String {
        match &self.env_prefixes {
            None => "any name".to_owned(),
            Some(prefixes) if prefixes.is_empty() => "no name (none allowed)".to_owned(),
            Some(prefixes) => prefixes.iter().map(|p| format!("`{p}`")).collect::<Vec<_>>().join(" or "),
        }
    }

    /// Checks every reference in `broker`'s envs as a server checks a definition it is sent:
    /// a `${VAR}` outside the prefixes, a malformed or missing `$Secret{name}` are
    /// `VALIDATION_FAILED` naming the env and the field.
    pub async fn check_broker(&self, broker: &Broker) -> Result<()> {
        self.check_envs(&broker.envs).await
    }

    /// Like [`SecretPolicy::check_broker`] for the envs a patch adds or replaces.
    pub async fn check_envs(&self, envs: &[BrokerEnv]) -> Result<()> {
        for env in envs {
            for (field, reference) in secret::references(&env.config) {
                let problem = match &reference {
                    Reference::Env(var) if !self.allows_env(var) => Some(format!(
                        "`{reference}` is not allowed: this server resolves only environment variables \
                         starting with {} (`polybus serve --secret-env-prefix`); store the value with \
                         `polybus secret set NAME` and write `$Secret{{NAME}}` instead",
                        self.allowed()
                    )),
                    Reference::Env(_) => None,
                    Reference::Stored(name) => self.check_stored(name, &reference).await?,
                };
                if let Some(message) = problem {
                    return Err(ValidationError::in_env(&env.slug, field, message).into());
                }
            }
        }
        Ok(())
    }

    async fn check_stored(&self, name: &str, reference: &Reference) -> Result<Option<String>> {
        if let Err(rule) = secret::check_name(name) {
            return Ok(Some(format!("`{reference}`: {rule}")));
        }
        let Some(store) = &self.store else {
            return Ok(Some(format!("`{reference}`: this server keeps no secrets")));
        };
        if !store.has_key() {
            return Ok(Some(format!(
                "`{reference}`: secrets cannot be used on this server: {}",
                store.without_key_reason().unwrap_or_default()
            )));
        }
        if !store.exists(name).await? {
            return Ok(Some(format!(
                "`{reference}`: no secret named `{name}`; set it first with `polybus secret set {name}`"
            )));
        }
        Ok(None)
    }

    /// `config` with every reference resolved under this policy, and its scrubber. Errors
    /// name references, never values.
    pub async fn resolve(&self, config: &Value) -> Result<Resolved> {
        let mut stored: HashMap<String, zeroize::Zeroizing<String>> = HashMap::new();
        for (field, reference) in secret::references(config) {
            match &reference {
                Reference::Env(var) if !self.allows_env(var) => {
                    return Err(SecretError::NotAllowed {
                        reference: reference.to_string(),
                        field,
                        allowed: self.allowed(),
                    }
                    .into());
                }
                Reference::Env(_) => {}
                Reference::Stored(name) if !stored.contains_key(name) => {
                    let value = self.reveal(name, &reference, &field).await?;
                    stored.insert(name.clone(), value);
                }
                Reference::Stored(_) => {}
            }
        }
        let resolved = secret::resolve(config, &mut |reference, field| match reference {
            Reference::Env(_) => secret::env_lookup(reference, field),
            Reference::Stored(name) => stored.get(name).map(|v| v.to_string()).ok_or_else(|| {
                SecretError::Missing {
                    reference: reference.to_string(),
                    field: field.to_owned(),
                    name: name.clone(),
                }
                .into()
            }),
        })?;
        remember(&resolved.scrubber);
        Ok(resolved)
    }

    async fn reveal(
        &self,
        name: &str,
        reference: &Reference,
        field: &str,
    ) -> Result<zeroize::Zeroizing<String>> {
        let unavailable = |reason: String| -> Error {
            SecretError::Unavailable { reference: reference.to_string(), field: field.to_owned(), reason }
                .into()
        };
        secret::check_name(name).map_err(unavailable)?;
        let store = self.store.as_ref().ok_or_else(|| unavailable("no secret store is configured".into()))?;
        match store.reveal(name).await {
            Ok(Some(value)) => Ok(value),
            Ok(None) => Err(SecretError::Missing {
                reference: reference.to_string(),
                field: field.to_owned(),
                name: name.to_owned(),
            }
            .into()),
            Err(Error::Secret(SecretError::StoreUnavailable(reason))) => Err(unavailable(reason)),
            Err(e) => Err(e),
        }
    }
}

/// Wraps `transport` so every error it reports is scrubbed; returns it as is when there is
/// nothing to scrub.
pub(crate) fn scrubbed(transport: Arc<dyn Transport>, scrubber: Scrubber) -> Arc<dyn Transport> {
    if scrubber.is_empty() {
        return transport;
    }
    Arc::new(ScrubbedTransport { inner: transport, scrubber: Arc::new(scrubber) })
}

/// A transport whose errors name references instead of resolved values.
struct ScrubbedTransport {
    inner: Arc<dyn Transport>,
    scrubber: Arc<Scrubber>,
}

#[async_trait]
impl Transport for ScrubbedTransport {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn ensure_topic(&self, topic: &TopicSpec) -> Result<()> {
        self.inner.ensure_topic(topic).await.map_err(|e| self.scrubber.scrub(e))
    }

    async fn publish(&self, topic: &TopicSpec, message: Message) -> Result<()> {
        self.inner.publish(topic, message).await.map_err(|e| self.scrubber.scrub(e))
    }

    async fn publish_batch(&self, topic: &TopicSpec, messages: Vec<Message>) -> Result<()> {
        self.inner.publish_batch(topic, messages).await.map_err(|e| self.scrubber.scrub(e))
    }

    async fn subscribe(
        &self,
        topic: &TopicSpec,
        options: &SubscribeOptions,
    ) -> Result<Box<dyn Subscription>> {
        let inner = self.inner.subscribe(topic, options).await.map_err(|e| self.scrubber.scrub(e))?;
        Ok(Box::new(ScrubbedSubscription { inner, scrubber: self.scrubber.clone() }))
    }

    async fn ping(&self) -> Result<()> {
        self.inner.ping().await.map_err(|e| self.scrubber.scrub(e))
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await.map_err(|e| self.scrubber.scrub(e))
    }
}

/// A subscription whose errors, and those of its deliveries' acks, are scrubbed.
struct ScrubbedSubscription {
    inner: Box<dyn Subscription>,
    scrubber: Arc<Scrubber>,
}

#[async_trait]
impl Subscription for ScrubbedSubscription {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        let next = self.inner.next().await?;
        Some(next.map(|delivery| self.wrap(delivery)).map_err(|e| self.scrubber.scrub(e)))
    }

    // Forwarded, so that the adapter's own batching is kept.
    async fn next_ready(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        let ready = self.inner.next_ready(max, wait).await.map_err(|e| self.scrubber.scrub(e))?;
        Ok(ready.into_iter().map(|delivery| self.wrap(delivery)).collect())
    }

    async fn stop(&mut self) -> Result<()> {
        self.inner.stop().await.map_err(|e| self.scrubber.scrub(e))
    }

    async fn close(&mut self) -> Result<()> {
        self.inner.close().await.map_err(|e| self.scrubber.scrub(e))
    }
}

impl ScrubbedSubscription {
    fn wrap(&self, delivery: Delivery) -> Delivery {
        let (message, acker) = delivery.into_parts();
        Delivery::new(message, Box::new(ScrubbedAcker { inner: acker, scrubber: self.scrubber.clone() }))
    }
}

struct ScrubbedAcker {
    inner: Box<dyn Acker>,
    scrubber: Arc<Scrubber>,
}

#[async_trait]
impl Acker for ScrubbedAcker {
    async fn ack(self: Box<Self>) -> Result<()> {
        let ScrubbedAcker { inner, scrubber } = *self;
        inner.ack().await.map_err(|e| scrubber.scrub(e))
    }

    async fn nack(self: Box<Self>, delay: Option<Duration>) -> Result<()> {
        let ScrubbedAcker { inner, scrubber } = *self;
        inner.nack(delay).await.map_err(|e| scrubber.scrub(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use polybus_core::Op;
    use serde_json::json;

    const VALUE: &str = "db.internal";

    /// Every operation fails with the value in its message; subscriptions deliver one message
    /// whose ack and nack fail the same way, then one error.
    struct Leaky;

    fn leak(op: Op) -> Error {
        Error::transport(op, format!("redis {VALUE}:6379"), format!("lookup {VALUE} failed"))
    }

    struct LeakyAcker;

    #[async_trait]
    impl Acker for LeakyAcker {
        async fn ack(self: Box<Self>) -> Result<()> {
            Err(leak(Op::Ack))
        }
        async fn nack(self: Box<Self>, _: Option<Duration>) -> Result<()> {
            Err(leak(Op::Nack))
        }
    }

    struct LeakySubscription(u8);

    #[async_trait]
    impl Subscription for LeakySubscription {
        async fn next(&mut self) -> Option<Result<Delivery>> {
            self.0 += 1;
            match self.0 {
                1 | 2 => Some(Ok(Delivery::new(Message::text("m"), Box::new(LeakyAcker)))),
                3 => Some(Err(leak(Op::Receive))),
                _ => None,
            }
        }
        async fn close(&mut self) -> Result<()> {
            Err(leak(Op::Close))
        }
    }

    #[async_trait]
    impl Transport for Leaky {
        fn capabilities(&self) -> Capabilities {
            unreachable!("not asked")
        }
        async fn ensure_topic(&self, _: &TopicSpec) -> Result<()> {
            Err(leak(Op::EnsureTopic))
        }
        async fn publish(&self, _: &TopicSpec, _: Message) -> Result<()> {
            Err(leak(Op::Publish))
        }
        async fn subscribe(&self, _: &TopicSpec, _: &SubscribeOptions) -> Result<Box<dyn Subscription>> {
            Ok(Box::new(LeakySubscription(0)))
        }
        async fn ping(&self) -> Result<()> {
            Err(leak(Op::Ping))
        }
        async fn close(&self) -> Result<()> {
            Err(leak(Op::Close))
        }
    }

    fn clean(result: Result<()>) -> String {
        let text = result.expect_err("fails").to_string();
        assert!(!text.contains(VALUE) && text.contains("${POLYBUS_BROKER_HOST}"), "{text}");
        text
    }

    #[tokio::test]
    async fn every_error_of_a_wrapped_connection_names_the_reference() {
        let mut scrubber = Scrubber::default();
        scrubber.add(VALUE, "${POLYBUS_BROKER_HOST}");
        let transport = scrubbed(Arc::new(Leaky), scrubber);
        let spec = TopicSpec::named("orders");
        clean(transport.ping().await);
        clean(transport.ensure_topic(&spec).await);
        clean(transport.publish(&spec, Message::text("x")).await);
        clean(transport.publish_batch(&spec, vec![Message::text("x")]).await);
        let mut sub = transport.subscribe(&spec, &SubscribeOptions::new("g")).await.expect("subscribed");
        clean(sub.next().await.expect("first").expect("a delivery").ack().await);
        clean(sub.next().await.expect("second").expect("a delivery").nack(None).await);
        clean(sub.next().await.expect("third").map(drop));
        clean(sub.close().await);
        clean(transport.close().await);
    }

    #[tokio::test]
    async fn prefixes_decide_which_variables_resolve() {
        let server = SecretPolicy::env_prefixes([DEFAULT_ENV_PREFIX]);
        assert!(server.allows_env("POLYBUS_BROKER_HOST") && !server.allows_env("HOME"));
        assert!(SecretPolicy::env_prefixes(["A_", ""]).allows_env("HOME"));
        assert!(!SecretPolicy::env_prefixes(Vec::<String>::new()).allows_env("HOME"));
        assert!(SecretPolicy::any_env().allows_env("HOME"));

        let error = server.resolve(&json!({"host": "${HOME}"})).await.expect_err("refused");
        assert_eq!(error.code(), "SECRET_NOT_ALLOWED");
        let text = error.to_string();
        assert!(text.contains("`${HOME}` in config.host") && text.contains("`POLYBUS_BROKER_`"), "{text}");
        let home = std::env::var("HOME").unwrap_or_default();
        assert!(home.is_empty() || !text.contains(&home), "{text}");

        let error = server.resolve(&json!({"password": "$Secret{pw}"})).await.expect_err("no store");
        assert_eq!(error.code(), "SECRETS_UNAVAILABLE");
        assert!(error.to_string().contains("$Secret{pw}"), "{error}");
    }
}
