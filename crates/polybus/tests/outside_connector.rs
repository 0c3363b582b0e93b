//! A connector from outside the workspace declares its own broker type and rules, and is used
//! through `BusBuilder` like the built-in ones (issue 18).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use polybus::core::kind::FieldError;
use polybus::{Broker, BrokerKind, BrokerType, Bus, Connector, Group, Message, Registry, SqliteStore, Topic};
use serde_json::{Value, json};

/// A broker type the workspace does not know: the embedded broker under another name, with
/// a required `path` and a rule of its own for native names.
struct Vault;

impl BrokerKind for Vault {
    fn broker_type(&self) -> BrokerType {
        BrokerType::from_static("vault")
    }

    fn validate_config(&self, config: &Value) -> Result<(), FieldError> {
        match config.get("path") {
            Some(Value::String(_)) => Ok(()),
            _ => Err(("config.path".into(), "a vault needs the `path` of its file".into())),
        }
    }

    fn check_native(&self, name: &str) -> Result<(), String> {
        match name.starts_with("vault-") {
            true => Err(format!("`{name}` starts with `vault-`, which vaults keep for themselves")),
            false => Ok(()),
        }
    }
}

#[async_trait]
impl Connector for Vault {
    async fn connect(
        &self,
        target: &polybus::core::ConnectTarget,
    ) -> polybus::Result<Arc<dyn polybus::Transport>> {
        polybus_embedded::EmbeddedConnector.connect(target).await
    }
}

fn broker(config: Value) -> Broker {
    Broker::from_value(json!({"name": "Vault", "tag": "vault", "envs": [{"slug": "dev", "type": "vault", "config": config}]}))
        .expect("the envelope is valid")
}

#[tokio::test]
async fn a_connector_outside_the_workspace_validates_and_carries_messages() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = SqliteStore::open(dir.path().join("registry.db")).await.expect("registry");
    let bus = Bus::builder(Registry::new(Arc::new(store))).connector(Arc::new(Vault)).build();
    let registry = bus.registry();

    let err = registry.create_broker(broker(json!({}))).await.expect_err("no path");
    assert_eq!(err.code(), "VALIDATION_FAILED");
    assert!(err.to_string().contains("env `dev`: field `config.path`"), "{err}");
    let path = dir.path().join("vault.db").display().to_string();
    registry.create_broker(broker(json!({"path": path}))).await.expect("a vault broker");

    let bad = json!({"tag": "vault:orders", "envs": [{"slug": "dev", "nativeName": "vault-orders"}]});
    let err = registry.create_topic(Topic::from_value(bad).expect("envelope")).await.expect_err("reserved");
    assert!(err.to_string().contains("not a valid vault name"), "{err}");
    registry
        .create_topic(Topic::from_value(json!({"tag": "vault:orders"})).expect("topic"))
        .await
        .expect("topic");

    let mut sub = bus.subscribe("dev", "vault:orders", Group("billing")).await.expect("subscribe");
    bus.publish("dev", "vault:orders", Message::text("kept")).await.expect("publish");
    let delivery = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("a delivery in time")
        .expect("open")
        .expect("a delivery");
    assert_eq!(delivery.payload_str(), Some("kept"));
    delivery.ack().await.expect("ack");

    // A registry that validates through the built-in connectors only does not know it.
    let err = broker(json!({"path": "x.db"})).validate(&polybus::default_kinds()).expect_err("unknown");
    assert_eq!((err.env.as_deref(), err.field.as_str()), (Some("dev"), "type"));
    assert!(err.message.contains("unknown broker type `vault`"), "{err}");
}
