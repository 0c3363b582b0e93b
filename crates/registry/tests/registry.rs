//! Registry behaviour, written against the `Registry` API; every case runs on every store
//! (`sqlite::…` and `postgres::…`).
//!
//! The PostgreSQL cases use `POLYBUS_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`), each in a schema of its own that is dropped at the
//! end. They fail, never skip, when PostgreSQL is unreachable: start it with `scripts/services postgres`.

use std::sync::Arc;
use std::time::Duration;

use polybus_core::{Broker, BrokerPatch, Topic, TopicPatch};
use polybus_registry::{
    Claim, IdempotencyKey, IdempotencyState, Kind, PostgresStore, Record, Registry, Secrets, SecretsKey,
    SqliteStore,
};
use serde_json::json;

/// A registry on a store of its own, and what it takes to open a second handle on that store.
struct Fixture {
    registry: Registry,
    storage: Storage,
}

enum Storage {
    Sqlite(tempfile::TempDir),
    Postgres(TestSchema),
}

impl Fixture {
    async fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("registry.db")).await.unwrap();
        Fixture {
            registry: Registry::new(Arc::new(store)).with_kinds(kinds()),
            storage: Storage::Sqlite(dir),
        }
    }

    async fn postgres() -> Self {
        let schema = TestSchema::new();
        let store = schema.open().await;
        Fixture {
            registry: Registry::new(Arc::new(store)).with_kinds(kinds()),
            storage: Storage::Postgres(schema),
        }
    }

    /// Another handle on the same storage, as a second process or server replica would have.
    async fn reopen(&self) -> Registry {
        match &self.storage {
            Storage::Sqlite(dir) => {
                let url = format!("sqlite://{}", dir.path().join("registry.db").display());
                Registry::open(&url).await.unwrap().with_kinds(kinds())
            }
            Storage::Postgres(schema) => Registry::new(Arc::new(schema.open().await)).with_kinds(kinds()),
        }
    }
}

/// The broker types the tests' definitions use.
fn kinds() -> polybus_core::Kinds {
    polybus_core::Kinds::new([
        Arc::new(polybus_embedded::EmbeddedConnector) as Arc<dyn polybus_core::BrokerKind>,
        Arc::new(polybus_kafka::KafkaConnector),
        Arc::new(polybus_rabbitmq::RabbitmqConnector),
        Arc::new(polybus_redis::RedisConnector),
    ])
}

fn postgres_url() -> String {
    std::env::var("POLYBUS_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// `url` with one more query parameter.
fn with_param(url: &str, param: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{param}")
}

/// A PostgreSQL schema for one test, dropped (with everything in it) when the test ends, passed or not.
struct TestSchema {
    name: String,
    /// The test URL, tagged with the schema name as `application_name` to find this test's connections.
    url: String,
}

impl TestSchema {
    fn new() -> Self {
        let name = format!("polybus_test_{}", uuid::Uuid::new_v4().simple());
        let url = with_param(&postgres_url(), &format!("application_name={name}"));
        TestSchema { name, url }
    }

    async fn open(&self) -> PostgresStore {
        PostgresStore::open_in_schema(&self.url, &self.name).await.unwrap_or_else(|e| {
            panic!(
                "PostgreSQL for the registry tests is unreachable ({e}); \
                 start it with scripts/services postgres or set POLYBUS_TEST_POSTGRES_URL"
            )
        })
    }

    /// A plain client on the test database, for what the store does not offer.
    async fn admin(url: &str) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        client
    }

    /// Ends every server connection this test's stores have open, as a database restart would.
    async fn kill_connections(&self) {
        let admin = Self::admin(&postgres_url()).await;
        let killed = admin
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
                &[&self.name],
            )
            .await
            .unwrap();
        assert!(!killed.is_empty(), "no connection of {} to end", self.name);
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        let (url, name) = (postgres_url(), self.name.clone());
        // Drop runs inside the test's runtime, which cannot be blocked on: use a thread of its own.
        let dropped = std::thread::spawn(move || -> Result<(), String> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async {
                let (client, connection) =
                    tokio_postgres::connect(&url, tokio_postgres::NoTls).await.map_err(|e| e.to_string())?;
                tokio::spawn(connection);
                client
                    .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE"))
                    .await
                    .map_err(|e| e.to_string())
            })
        })
        .join();
        let outcome = dropped.unwrap_or_else(|_| Err("the clean-up thread panicked".to_owned()));
        if let Err(e) = outcome
            && !std::thread::panicking()
        {
            panic!("cannot drop test schema {}: {e}", self.name);
        }
    }
}

/// Runs each case once per store, as `sqlite::CASE` and `postgres::CASE`.
macro_rules! every_store {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $case() {
                    let fixture = super::Fixture::sqlite().await;
                    super::$case(fixture.registry.clone(), fixture).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $case() {
                    let fixture = super::Fixture::postgres().await;
                    super::$case(fixture.registry.clone(), fixture).await;
                }
            )*
        }
    };
}

fn broker(tag: &str) -> Broker {
    Broker::from_value(json!({
        "name": "Message Bus", "tag": tag,
        "envs": [
            {"slug": "prd", "type": "rabbitmq", "config": {"url": "amqp://app:s3cret@127.0.0.1:5672/%2f"}},
            {"slug": "dev", "type": "embedded", "config": {"path": "dev.db"}}
        ]
    }))
    .unwrap()
}

fn broker_v1(tag: &str) -> Broker {
    let mut b = broker(tag);
    b.version = 1;
    b
}

every_store!(
    broker_round_trips_through_create_update_fetch_delete,
    stale_version_is_refused_and_nothing_changes,
    invalid_update_and_duplicate_create_store_nothing,
    concurrent_unversioned_updates_all_land,
    topics_belong_to_an_existing_broker_and_block_its_deletion,
    two_handles_see_each_other_and_a_stale_update_conflicts,
    any_kind_is_stored_by_key_with_compare_and_swap,
    secrets_are_encrypted_at_rest_listed_by_name_and_revealed_with_the_key_only,
    a_broker_update_cannot_turn_a_topic_name_into_a_wildcard,
    of_concurrent_claimers_of_an_idempotency_key_exactly_one_wins,
    a_released_claim_lets_a_retry_publish,
    a_pending_claim_whose_lease_ran_out_is_taken_over,
    an_idempotency_key_holds_for_its_window_then_is_purged,
);

/// A long lease and window, for the parts of a case that must not run out.
const LONG: Duration = Duration::from_secs(600);

fn idem_key(key: &str) -> IdempotencyKey {
    IdempotencyKey { env: "dev".into(), event: "bus:orders".into(), key: key.into() }
}

/// Claims until `claim` succeeds, failing after 10 s.
async fn claim_eventually(reg: &Registry, key: &IdempotencyKey, id: &str, lease: Duration) {
    let store = reg.idempotency().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while store.claim(key, id, lease, LONG).await.unwrap() != Claim::Claimed {
        assert!(tokio::time::Instant::now() < deadline, "{id} never got {key:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn of_concurrent_claimers_of_an_idempotency_key_exactly_one_wins(a: Registry, fx: Fixture) {
    let b = fx.reopen().await;
    let key = idem_key("order-1");
    let claims = (0..8).map(|i| {
        let (registry, key) = (if i % 2 == 0 { a.clone() } else { b.clone() }, key.clone());
        tokio::spawn(async move {
            let claim = registry.idempotency().unwrap().claim(&key, &format!("m{i}"), LONG, LONG).await;
            (format!("m{i}"), claim.unwrap())
        })
    });
    let outcomes: Vec<_> = joined(claims).await;
    let winners: Vec<_> = outcomes.iter().filter(|(_, c)| *c == Claim::Claimed).map(|(id, _)| id).collect();
    assert_eq!(winners.len(), 1, "{outcomes:?}");
    let winner = winners[0].clone();
    for (_, claim) in &outcomes {
        if let Claim::Taken(record) = claim {
            assert_eq!(
                (record.message_id.as_str(), record.state),
                (winner.as_str(), IdempotencyState::Pending)
            );
        }
    }
    assert!(a.idempotency().unwrap().complete(&key, &winner, LONG).await.unwrap());
    let seen = b.idempotency().unwrap().get(&key).await.unwrap().expect("the record");
    assert_eq!((seen.message_id.as_str(), seen.state), (winner.as_str(), IdempotencyState::Published));
    assert!(seen.first_seen < seen.expires_at && seen.lease_expires_at.is_none(), "{seen:?}");
    match b.idempotency().unwrap().claim(&key, "late", LONG, LONG).await.unwrap() {
        Claim::Taken(record) => assert_eq!(record, seen),
        Claim::Claimed => panic!("a published key was claimed again"),
    }
    // Another env or event is another key.
    let other = IdempotencyKey { env: "prd".into(), ..key.clone() };
    assert_eq!(a.idempotency().unwrap().claim(&other, "m9", LONG, LONG).await.unwrap(), Claim::Claimed);
}

async fn joined<T: Send + 'static>(handles: impl Iterator<Item = tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for handle in handles.collect::<Vec<_>>() {
        out.push(handle.await.unwrap());
    }
    out
}

async fn a_released_claim_lets_a_retry_publish(reg: Registry, _fx: Fixture) {
    let store = reg.idempotency().unwrap();
    let key = idem_key("order-2");
    assert_eq!(store.claim(&key, "first", LONG, LONG).await.unwrap(), Claim::Claimed);
    // Claiming again with the same id (a claim resent after a lost connection) is still ours.
    assert_eq!(store.claim(&key, "first", LONG, LONG).await.unwrap(), Claim::Claimed);
    assert!(!store.release(&key, "someone-else").await.unwrap());
    assert!(store.release(&key, "first").await.unwrap());
    assert_eq!(store.get(&key).await.unwrap(), None);
    assert_eq!(store.claim(&key, "retry", LONG, LONG).await.unwrap(), Claim::Claimed);
    assert!(store.complete(&key, "retry", LONG).await.unwrap());
    assert!(!store.release(&key, "retry").await.unwrap(), "a published key is never released");
    assert_eq!(store.get(&key).await.unwrap().map(|r| r.message_id), Some("retry".to_owned()));
}

async fn a_pending_claim_whose_lease_ran_out_is_taken_over(reg: Registry, fx: Fixture) {
    let other = fx.reopen().await;
    let store = reg.idempotency().unwrap();
    let live = idem_key("live");
    assert_eq!(store.claim(&live, "holder", LONG, LONG).await.unwrap(), Claim::Claimed);
    let taken = other.idempotency().unwrap().claim(&live, "waiter", LONG, LONG).await.unwrap();
    assert!(matches!(&taken, Claim::Taken(r) if r.message_id == "holder" && r.lease_expires_at.is_some()));

    let dead = idem_key("dead");
    assert_eq!(store.claim(&dead, "died", Duration::from_millis(200), LONG).await.unwrap(), Claim::Claimed);
    claim_eventually(&other, &dead, "successor", LONG).await;
    assert!(!store.complete(&dead, "died", LONG).await.unwrap(), "the old claimant no longer holds it");
    assert!(other.idempotency().unwrap().complete(&dead, "successor", LONG).await.unwrap());
    let record = store.get(&dead).await.unwrap().expect("record");
    assert_eq!((record.message_id.as_str(), record.state), ("successor", IdempotencyState::Published));
}

async fn an_idempotency_key_holds_for_its_window_then_is_purged(reg: Registry, _fx: Fixture) {
    let store = reg.idempotency().unwrap();
    let key = idem_key("short");
    assert_eq!(store.claim(&key, "first", LONG, LONG).await.unwrap(), Claim::Claimed);
    assert!(store.complete(&key, "first", Duration::from_millis(300)).await.unwrap());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while store.get(&key).await.unwrap().is_some() {
        assert!(tokio::time::Instant::now() < deadline, "the window never ended");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(store.purge_expired().await.unwrap(), 1, "the expired row is purged");
    assert_eq!(store.purge_expired().await.unwrap(), 0);
    assert_eq!(store.claim(&key, "next", LONG, LONG).await.unwrap(), Claim::Claimed, "a new window");
}

async fn a_broker_update_cannot_turn_a_topic_name_into_a_wildcard(reg: Registry, _fx: Fixture) {
    reg.create_broker(broker("bus")).await.unwrap();
    // `*` is a plain character on the embedded broker...
    let t =
        Topic::from_value(json!({"tag": "bus:orders", "envs": [{"slug": "dev", "nativeName": "orders.*"}]}))
            .unwrap();
    reg.create_topic(t).await.unwrap();
    // ...and a wildcard once `dev` becomes a RabbitMQ env: the update is refused, nothing changes.
    let patch = BrokerPatch::from_value(
        json!({"envs": [{"slug": "dev", "type": "rabbitmq", "config": {"url": "amqp://127.0.0.1"}}]}),
    )
    .unwrap();
    let err = reg.update_broker("bus", patch).await.unwrap_err();
    assert_eq!(err.code(), "VALIDATION_FAILED");
    assert!(err.to_string().contains("topic `bus:orders` would break"), "{err}");
    assert!(err.to_string().contains("wildcard in RabbitMQ"), "{err}");
    assert_eq!(reg.fetch_broker("bus").await.unwrap().version, 1);
}

async fn broker_round_trips_through_create_update_fetch_delete(reg: Registry, _fx: Fixture) {
    let created = reg.create_broker(broker("message-bus")).await.unwrap();
    assert_eq!(created.version, 1);
    let fetched = reg.fetch_broker("message-bus").await.unwrap();
    assert_eq!(fetched, created);
    assert_eq!(fetched.redacted().envs[0].config["url"], "amqp://app:****@127.0.0.1:5672/%2f");

    let patch = BrokerPatch::from_value(json!({"version": 1,
        "envs": [{"slug": "prd", "type": "KAFKA", "config": {"brokers": ["127.0.0.1:9092"]}}]}))
    .unwrap();
    let updated = reg.update_broker("message-bus", patch).await.unwrap();
    assert_eq!(updated.version, 2);
    assert_eq!(updated.envs[0].broker_type.as_str(), "kafka");
    assert_eq!(updated.envs.len(), 2);

    reg.create_broker(broker("audit")).await.unwrap();
    let all: Vec<_> = reg.fetch_brokers().await.unwrap().into_iter().map(|b| (b.tag, b.version)).collect();
    assert_eq!(all, vec![("audit".to_owned(), 1), ("message-bus".to_owned(), 2)]);

    reg.delete_broker("message-bus", false).await.unwrap();
    assert_eq!(reg.fetch_broker("message-bus").await.unwrap_err().code(), "BROKER_NOT_FOUND");
}

async fn stale_version_is_refused_and_nothing_changes(reg: Registry, _fx: Fixture) {
    reg.create_broker(broker("bus")).await.unwrap();
    reg.update_broker("bus", BrokerPatch { name: Some("A".into()), version: Some(1), ..Default::default() })
        .await
        .unwrap();
    let err = reg
        .update_broker("bus", BrokerPatch { name: Some("B".into()), version: Some(1), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), "CONFLICT");
    assert!(err.to_string().contains("current is 2"), "{err}");
    let now = reg.fetch_broker("bus").await.unwrap();
    assert_eq!((now.name.as_str(), now.version), ("A", 2));
}

async fn invalid_update_and_duplicate_create_store_nothing(reg: Registry, _fx: Fixture) {
    reg.create_broker(broker("bus")).await.unwrap();
    let err = reg.create_broker(broker("bus")).await.unwrap_err();
    assert_eq!(err.code(), "ALREADY_EXISTS");
    let bad =
        BrokerPatch::from_value(json!({"envs": [{"slug": "dev", "type": "redis", "config": {"port": 1}}]}))
            .unwrap();
    let err = reg.update_broker("bus", bad).await.unwrap_err();
    assert_eq!(err.code(), "VALIDATION_FAILED");
    assert!(err.to_string().contains("env `dev`"), "{err}");
    assert_eq!(reg.fetch_broker("bus").await.unwrap(), broker_v1("bus"));
}

async fn concurrent_unversioned_updates_all_land(reg: Registry, _fx: Fixture) {
    reg.create_broker(broker("bus")).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let reg = reg.clone();
        tasks.push(tokio::spawn(async move {
            let patch = BrokerPatch::from_value(
                json!({"envs": [{"slug": format!("e{i}"), "type": "embedded", "config": {}}]}),
            )
            .unwrap();
            reg.update_broker("bus", patch).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let b = reg.fetch_broker("bus").await.unwrap();
    assert_eq!(b.envs.len(), 10);
    assert_eq!(b.version, 9);
}

async fn topics_belong_to_an_existing_broker_and_block_its_deletion(reg: Registry, _fx: Fixture) {
    let orphan = Topic::from_value(json!({"tag": "nobody:orders"})).unwrap();
    assert_eq!(reg.create_topic(orphan).await.unwrap_err().code(), "BROKER_NOT_FOUND");

    reg.create_broker(broker("bus")).await.unwrap();
    let t =
        Topic::from_value(json!({"tag": "bus:orders", "envs": [{"slug": "prd", "nativeName": "orders.v1"}]}))
            .unwrap();
    let t = reg.create_topic(t).await.unwrap();
    assert_eq!(t.spec("prd").unwrap().native_name, "orders.v1");
    reg.create_topic(Topic::from_value(json!({"tag": "bus:refunds"})).unwrap()).await.unwrap();

    let patch = TopicPatch { max_attempts: Some(3), version: Some(1), ..Default::default() };
    assert_eq!(reg.update_topic("bus:orders", patch.clone()).await.unwrap().version, 2);
    assert_eq!(reg.update_topic("bus:orders", patch).await.unwrap_err().code(), "CONFLICT");

    let listed: Vec<_> = reg.fetch_topics(Some("bus")).await.unwrap().into_iter().map(|t| t.tag).collect();
    assert_eq!(listed, vec!["bus:orders", "bus:refunds"]);

    let err = reg.delete_broker("bus", false).await.unwrap_err();
    assert_eq!(err.code(), "IN_USE");
    reg.delete_topic("bus:refunds").await.unwrap();
    assert_eq!(reg.fetch_topic("bus:refunds").await.unwrap_err().code(), "TOPIC_NOT_FOUND");
    reg.delete_broker("bus", true).await.unwrap();
    assert!(reg.fetch_topics(None).await.unwrap().is_empty());
}

async fn two_handles_see_each_other_and_a_stale_update_conflicts(a: Registry, fx: Fixture) {
    let b = fx.reopen().await;
    a.create_broker(broker("bus")).await.unwrap();
    assert_eq!(b.fetch_broker("bus").await.unwrap(), broker_v1("bus"));

    let renamed = b
        .update_broker("bus", BrokerPatch { name: Some("B".into()), version: Some(1), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(renamed.version, 2);
    let seen = a.fetch_broker("bus").await.unwrap();
    assert_eq!((seen.name.as_str(), seen.version), ("B", 2));

    let err = a
        .update_broker("bus", BrokerPatch { name: Some("A".into()), version: Some(1), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), "CONFLICT");
    assert!(err.to_string().contains("current is 2"), "{err}");
    assert_eq!(b.fetch_broker("bus").await.unwrap().name, "B");

    b.delete_broker("bus", false).await.unwrap();
    assert_eq!(a.fetch_broker("bus").await.unwrap_err().code(), "BROKER_NOT_FOUND");
}

async fn any_kind_is_stored_by_key_with_compare_and_swap(reg: Registry, _fx: Fixture) {
    let store = reg.store();
    let doc = json!({"name": "ci", "hash": "sha256:0f1e", "readOnly": true, "scopes": ["read"]});
    store.insert(Kind::ApiKey, "ab", None, &doc).await.unwrap();
    let err = store.insert(Kind::ApiKey, "ab", None, &doc).await.unwrap_err();
    assert_eq!((err.code(), err.to_string()), ("ALREADY_EXISTS", "api_key `ab` already exists".to_owned()));
    assert_eq!(store.get(Kind::Broker, "ab").await.unwrap(), None);
    assert_eq!(
        store.get(Kind::ApiKey, "ab").await.unwrap(),
        Some(Record { key: "ab".into(), version: 1, doc: doc.clone() })
    );

    let revoked = json!({"name": "ci", "hash": "sha256:0f1e", "revoked": true});
    assert!(store.replace(Kind::ApiKey, "ab", 1, &revoked).await.unwrap());
    assert!(!store.replace(Kind::ApiKey, "ab", 1, &doc).await.unwrap());
    assert!(!store.replace(Kind::ApiKey, "nobody", 1, &doc).await.unwrap());

    // Keys list in byte order on every store: '-' < '_' < letters.
    store.insert(Kind::ApiKey, "a_d", None, &doc).await.unwrap();
    store.insert(Kind::ApiKey, "a-c", Some("owner"), &doc).await.unwrap();
    let listed: Vec<_> =
        store.list(Kind::ApiKey, None).await.unwrap().into_iter().map(|r| (r.key, r.version)).collect();
    assert_eq!(listed, vec![("a-c".into(), 1), ("a_d".into(), 1), ("ab".into(), 2)]);
    let owned: Vec<_> =
        store.list(Kind::ApiKey, Some("owner")).await.unwrap().into_iter().map(|r| r.key).collect();
    assert_eq!(owned, vec!["a-c"]);
    assert_eq!(store.get(Kind::ApiKey, "ab").await.unwrap().map(|r| r.doc), Some(revoked));

    for key in ["ab", "a_d", "a-c"] {
        assert!(store.delete(Kind::ApiKey, key).await.unwrap());
    }
    assert!(!store.delete(Kind::ApiKey, "ab").await.unwrap());
    assert!(store.list(Kind::ApiKey, None).await.unwrap().is_empty());
    store.ping().await.unwrap();
}

async fn secrets_are_encrypted_at_rest_listed_by_name_and_revealed_with_the_key_only(
    reg: Registry,
    fx: Fixture,
) {
    let key = SecretsKey::generate();
    let secrets = Secrets::new(reg.store().clone(), key.clone());
    let value = format!("s3cret-{}", uuid::Uuid::new_v4().simple());
    let first = secrets.set("rabbit-pw", &value).await.unwrap();
    assert_eq!(first.created_at, first.updated_at);
    secrets.set("a_token", "other").await.unwrap();

    // At rest: neither the value nor anything that decodes to it.
    let stored = reg.store().get(Kind::Secret, "rabbit-pw").await.unwrap().expect("stored");
    assert!(!stored.doc.to_string().contains(&value), "{}", stored.doc);
    assert!(!stored.doc.to_string().contains("s3cret"), "{}", stored.doc);

    // Another handle with the same key reads it; listing gives names and times only.
    let replica = Secrets::new(fx.reopen().await.store().clone(), key.clone());
    assert_eq!(
        replica.reveal("rabbit-pw").await.unwrap().as_deref().map(String::as_str),
        Some(value.as_str())
    );
    let listed: Vec<_> = replica.list().await.unwrap().into_iter().map(|i| i.name).collect();
    assert_eq!(listed, vec!["a_token", "rabbit-pw"]);
    assert_eq!(replica.reveal("nobody").await.unwrap(), None);

    // Setting again replaces the value and keeps the creation time.
    let second = secrets.set("rabbit-pw", "changed").await.unwrap();
    assert_eq!(second.created_at, first.created_at);
    assert!(second.updated_at >= first.updated_at);
    assert_eq!(secrets.reveal("rabbit-pw").await.unwrap().as_deref().map(String::as_str), Some("changed"));

    // A different key, no key, a value moved to another name: refused, never garbage.
    let other = Secrets::new(reg.store().clone(), SecretsKey::generate());
    let err = other.reveal("rabbit-pw").await.unwrap_err();
    assert_eq!(err.code(), "SECRETS_UNAVAILABLE");
    assert!(err.to_string().contains("another key"), "{err}");
    let keyless = Secrets::without_key(reg.store().clone(), "no key here");
    assert_eq!(keyless.list().await.unwrap().len(), 2);
    let err = keyless.set("x", "y").await.unwrap_err();
    assert_eq!(
        (err.code(), err.to_string()),
        ("SECRETS_UNAVAILABLE", "secrets unavailable: no key here".to_owned())
    );
    let moved = reg.store().get(Kind::Secret, "rabbit-pw").await.unwrap().expect("stored").doc;
    let mut moved_to = moved.clone();
    moved_to["name"] = json!("a_token");
    let current = reg.store().get(Kind::Secret, "a_token").await.unwrap().expect("stored").version;
    assert!(reg.store().replace(Kind::Secret, "a_token", current, &moved_to).await.unwrap());
    let err = secrets.reveal("a_token").await.unwrap_err();
    assert!(err.to_string().contains("damaged"), "{err}");

    // Names are checked; values are bounded; deleting twice says so.
    for bad in ["", "a b", "x/../y"] {
        assert_eq!(secrets.set(bad, "v").await.unwrap_err().code(), "VALIDATION_FAILED", "{bad}");
    }
    assert_eq!(
        secrets.set("big", &"x".repeat(polybus_registry::MAX_VALUE_BYTES + 1)).await.unwrap_err().code(),
        "VALIDATION_FAILED"
    );
    assert_eq!(secrets.set("empty", "").await.unwrap_err().code(), "VALIDATION_FAILED");
    secrets.delete("rabbit-pw").await.unwrap();
    assert_eq!(secrets.delete("rabbit-pw").await.unwrap_err().code(), "SECRET_NOT_FOUND");
    assert!(!secrets.exists("rabbit-pw").await.unwrap());
    assert!(secrets.exists("a_token").await.unwrap());
}

#[tokio::test]
async fn postgres_url_opens_a_postgres_registry() {
    let fx = Fixture::postgres().await;
    let Storage::Postgres(schema) = &fx.storage else { unreachable!() };
    fx.registry.create_broker(broker("bus")).await.unwrap();

    let url = with_param(&schema.url, &format!("options=-csearch_path%3D{}", schema.name));
    let replica = Registry::open(&url).await.unwrap();
    assert_eq!(replica.fetch_broker("bus").await.unwrap(), broker_v1("bus"));
    let url = url.replacen("postgres://", "postgresql://", 1);
    Registry::open(&url).await.unwrap().ping().await.unwrap();
}

#[tokio::test]
async fn postgres_store_reconnects_after_its_connection_is_ended() {
    let fx = Fixture::postgres().await;
    let Storage::Postgres(schema) = &fx.storage else { unreachable!() };
    let reg = &fx.registry;
    reg.create_broker(broker("bus")).await.unwrap();

    // A read right after the server ends the connection is retried on a new one.
    schema.kill_connections().await;
    assert_eq!(reg.fetch_broker("bus").await.unwrap(), broker_v1("bus"));

    // A write after the loss was noticed goes to a new connection.
    schema.kill_connections().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let patch = BrokerPatch { name: Some("after".into()), version: Some(1), ..Default::default() };
    assert_eq!(reg.update_broker("bus", patch).await.unwrap().version, 2);
    reg.ping().await.unwrap();
}

#[tokio::test]
async fn unreachable_postgres_is_a_storage_error_without_the_password() {
    let err =
        PostgresStore::open("postgres://app:s3cret@127.0.0.1:1/test?connect_timeout=2").await.err().unwrap();
    let text = err.to_string();
    assert_eq!(err.code(), "STORAGE_FAILED", "{text}");
    assert!(text.contains("postgres://app@127.0.0.1:1/test"), "{text}");
    assert!(!text.contains("s3cret"), "{text}");
}

#[tokio::test]
async fn two_sqlite_paths_to_one_file_are_one_registry() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    let a = Registry::open(path.to_str().unwrap()).await.unwrap();
    let b = Registry::open(&format!("sqlite://{}", path.display())).await.unwrap();
    a.create_broker(broker("bus")).await.unwrap();
    assert_eq!(b.fetch_broker("bus").await.unwrap().version, 1);
}

/// The TLS test servers' settings (`scripts/services tls` writes them).
fn tls_env() -> std::collections::HashMap<String, String> {
    let dir = std::env::var("POLYBUS_TLS_DIR")
        .unwrap_or_else(|_| format!("{}/.cache/polybus/tls", std::env::var("HOME").unwrap_or_default()));
    let text = std::fs::read_to_string(format!("{dir}/env")).unwrap_or_else(|e| {
        panic!("{dir}/env ({e}): start the TLS test servers with `scripts/services tls`")
    });
    text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
}

#[tokio::test]
async fn postgres_registry_over_tls_verifies_the_server_and_hides_the_password() {
    let env = tls_env();
    let url = &env["POLYBUS_TLS_POSTGRES_URL"];
    let (ca, wrong_ca, password) =
        (&env["POLYBUS_TLS_CA"], &env["POLYBUS_TLS_WRONG_CA"], &env["POLYBUS_TLS_PASSWORD"]);
    let schema = format!("tls_{}", uuid::Uuid::new_v4().simple());

    let verified = with_param(url, &format!("sslrootcert={ca}"));
    let store =
        PostgresStore::open_in_schema(&verified, &schema).await.expect("verify-full with the test CA");
    let registry = Registry::new(Arc::new(store)).with_kinds(kinds());
    registry.create_broker(broker("tls")).await.expect("a write over TLS");
    assert_eq!(registry.fetch_broker("tls").await.expect("a read over TLS"), broker_v1("tls"));
    registry.ping().await.expect("ping");

    let untrusted = with_param(url, &format!("sslrootcert={wrong_ca}"));
    let e = PostgresStore::open(&untrusted).await.err().expect("another CA is not trusted");
    assert_eq!(e.code(), "STORAGE_FAILED");
    assert!(e.to_string().to_lowercase().contains("certificate"), "says why: {e}");

    let plain = url.replace("sslmode=verify-full", "sslmode=disable");
    let e = PostgresStore::open(&plain).await.err().expect("the server takes TLS only");
    assert!(!e.to_string().contains(password.as_str()), "{e}");

    let wrong = url.replace(password.as_str(), "not-the-password");
    let e = PostgresStore::open(&with_param(&wrong, &format!("sslrootcert={ca}")))
        .await
        .err()
        .expect("wrong password");
    assert!(e.to_string().contains("password authentication failed"), "{e}");
    assert!(!e.to_string().contains("not-the-password"), "{e}");

    // Unverified (`require`, libpq's meaning) still encrypts; the server refuses plaintext.
    let required = url.replace("sslmode=verify-full", "sslmode=require");
    PostgresStore::open_in_schema(&required, &schema).await.expect("require without a root");

    let dropped = std::process::Command::new("psql")
        .arg(&verified)
        .args(["-q", "-c", &format!("DROP SCHEMA {schema} CASCADE")])
        .output()
        .expect("run psql");
    assert!(dropped.status.success(), "drop the test schema: {}", String::from_utf8_lossy(&dropped.stderr));
}
