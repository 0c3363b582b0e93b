//! Security: files. A definition sent through the API names files only inside the server's data
//! folder, never a file polybus did not create, and a key file's problems all read the same.

use std::path::Path;

use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::common::TestApi;

/// A broker `tag` with one embedded env `dev` whose config is `config`.
fn embedded(tag: &str, config: Value) -> Value {
    json!({"name": "Files", "tag": tag, "envs": [{"slug": "dev", "type": "embedded", "config": config}]})
}

/// Creating `broker` is refused with `VALIDATION_FAILED` on env `dev`'s `field`; returns the message.
async fn refused(api: &TestApi, broker: Value, field: &str) -> String {
    let error =
        api.fails("POST", "/v1/brokers", Some(broker), StatusCode::BAD_REQUEST, "VALIDATION_FAILED").await;
    assert_eq!((error["env"].as_str(), error["field"].as_str()), (Some("dev"), Some(field)), "{error:#}");
    error["message"].as_str().expect("message").to_owned()
}

/// Every file and folder under `dir`, relative to it.
fn tree(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(next) = stack.pop() {
        for entry in std::fs::read_dir(&next).expect("read dir").flatten() {
            let path = entry.path();
            found.push(path.strip_prefix(dir).expect("inside").display().to_string());
            if entry.file_type().expect("file type").is_dir() {
                stack.push(path);
            }
        }
    }
    found.sort();
    found
}

/// Creates `dir`, as the server does when it starts.
fn data_dir(api: &TestApi) -> std::path::PathBuf {
    let dir = api.data_dir();
    std::fs::create_dir_all(&dir).expect("data folder");
    dir
}

#[tokio::test]
async fn an_absolute_broker_path_is_refused_and_nothing_is_created() {
    let api = TestApi::new().await;
    let outside = api.dir().join("outside").join("deeper").join("broker.db");
    let message = refused(&api, embedded("abs", json!({"path": outside})), "config.path").await;
    assert!(message.contains("relative"), "{message}");
    assert!(!api.dir().join("outside").exists(), "no folder is created");

    // The same through an update.
    api.ok("POST", "/v1/brokers", Some(embedded("abs", json!({"path": "ok.db"}))), StatusCode::CREATED).await;
    let patch = json!({"envs": [{"slug": "dev", "type": "embedded", "config": {"path": outside}}]});
    let error = api
        .fails("PATCH", "/v1/brokers/abs", Some(patch), StatusCode::BAD_REQUEST, "VALIDATION_FAILED")
        .await;
    assert_eq!((error["env"].as_str(), error["field"].as_str()), (Some("dev"), Some("config.path")));
    let stored = api.ok("GET", "/v1/brokers/abs", None, StatusCode::OK).await;
    assert_eq!(stored["envs"][0]["config"]["path"], "ok.db");
    assert!(!api.dir().join("outside").exists());
}

#[tokio::test]
async fn a_path_climbing_out_of_the_data_folder_is_refused() {
    let api = TestApi::new().await;
    for path in ["../escape.db", "sub/../../escape.db", "./../escape.db"] {
        let message = refused(&api, embedded("climb", json!({"path": path})), "config.path").await;
        assert!(message.contains(".."), "{path}: {message}");
    }
    assert!(!api.dir().join("escape.db").exists());
}

#[tokio::test]
async fn a_symlink_leading_out_of_the_data_folder_is_refused() {
    let api = TestApi::new().await;
    let data = data_dir(&api);
    let outside = api.dir().join("outside");
    std::fs::create_dir_all(&outside).expect("outside folder");
    std::os::unix::fs::symlink(outside.join("target.db"), data.join("link.db")).expect("file link");
    std::os::unix::fs::symlink(&outside, data.join("linked")).expect("folder link");
    for path in ["link.db", "linked/broker.db"] {
        let message = refused(&api, embedded("links", json!({"path": path})), "config.path").await;
        assert!(message.contains("symlink") || message.contains("outside"), "{path}: {message}");
    }
    assert_eq!(tree(&outside), Vec::<String>::new(), "nothing is created outside");
}

#[tokio::test]
async fn an_existing_empty_file_is_not_turned_into_a_broker() {
    let api = TestApi::new().await;
    let empty = data_dir(&api).join("empty.db");
    std::fs::write(&empty, b"").expect("empty file");
    let message = refused(&api, embedded("empty", json!({"path": "empty.db"})), "config.path").await;
    assert!(message.contains("empty.db") && message.contains("did not create"), "{message}");
    assert_eq!(std::fs::metadata(&empty).expect("still there").len(), 0);
}

#[tokio::test]
async fn another_programs_sqlite_file_is_left_as_it_was() {
    let api = TestApi::new().await;
    let other = data_dir(&api).join("other.db");
    {
        let conn = rusqlite::Connection::open(&other).expect("sqlite");
        conn.execute_batch("CREATE TABLE notes (body TEXT); INSERT INTO notes VALUES ('private note');")
            .expect("other program's data");
    }
    let before = std::fs::read(&other).expect("read");
    let message = refused(&api, embedded("other", json!({"path": "other.db"})), "config.path").await;
    assert!(message.contains("other.db") && message.contains("not a polybus broker file"), "{message}");
    assert!(!message.contains("private note") && !message.contains("notes"), "{message}");
    assert_eq!(std::fs::read(&other).expect("read"), before, "not one byte changed");
    assert!(!data_dir(&api).join("other.db-wal").exists(), "not switched to WAL");
}

#[tokio::test]
async fn the_registry_file_cannot_be_used_as_a_broker() {
    let api = TestApi::new().await;
    let message = refused(&api, embedded("reg", json!({"path": "../registry.db"})), "config.path").await;
    assert!(message.contains(".."), "{message}");
}

#[tokio::test]
async fn the_registry_file_is_refused_even_inside_the_data_folder() {
    let dir = tempfile::tempdir().expect("temp dir");
    let registry = polybus::Registry::open(&dir.path().join("registry.db").display().to_string())
        .await
        .expect("registry");
    let options = polybus_server::Options { data_dir: Some(dir.path().to_path_buf()), ..Default::default() };
    let state = polybus_server::AppState::open(registry, options).await.expect("state");
    let admin = state.keys().create("admin", false).await.expect("key").secret;
    let router = polybus_server::router(state);
    let request = axum::http::Request::post("/v1/brokers")
        .header("authorization", format!("Bearer {admin}"))
        .header("content-type", "application/json")
        .body(axum::body::Body::from(embedded("reg", json!({"path": "registry.db"})).to_string()))
        .expect("request");
    let response = tower::ServiceExt::oneshot(router, request).await.expect("response");
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.expect("body");
    let error: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(error["error"]["field"], "config.path", "{error:#}");
    assert!(
        error["error"]["message"].as_str().unwrap_or("").contains("not a polybus broker file"),
        "{error:#}"
    );
}

#[tokio::test]
async fn a_definition_stored_without_the_api_cannot_escape_at_connect_time() {
    let api = TestApi::new().await;
    let outside = api.dir().join("elsewhere").join("broker.db");
    // As the local CLI would write it: straight into the registry.
    let broker = polybus::Broker::from_value(embedded("local", json!({"path": outside}))).expect("valid");
    api.state.registry().create_broker(broker).await.expect("stored");
    api.ok("POST", "/v1/topics", Some(json!({"tag": "local:orders"})), StatusCode::CREATED).await;

    let (status, body) = api.call("POST", "/v1/brokers/local/test?env=dev", Some(&api.reader), None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("VALIDATION_FAILED"))
    );
    assert_eq!(
        (body["error"]["env"].as_str(), body["error"]["field"].as_str()),
        (Some("dev"), Some("config.path"))
    );
    let error = api
        .fails(
            "POST",
            "/v1/envs/dev/events/local:orders/messages",
            Some(json!({"payload": "hi"})),
            StatusCode::BAD_REQUEST,
            "VALIDATION_FAILED",
        )
        .await;
    assert_eq!(error["field"], "config.path");
    assert!(!api.dir().join("elsewhere").exists(), "no folder, no file");
}

#[tokio::test]
async fn an_env_without_a_path_keeps_its_file_in_the_data_folder() {
    let api = TestApi::new().await;
    api.ok("POST", "/v1/brokers", Some(embedded("nopath", json!({}))), StatusCode::CREATED).await;
    api.ok("POST", "/v1/topics", Some(json!({"tag": "nopath:orders"})), StatusCode::CREATED).await;
    let cwd_file = std::env::current_dir().expect("cwd").join("polybus-broker.db");
    let existed = cwd_file.exists();
    api.publish("nopath:orders", json!({"payload": "kept"})).await;
    assert!(api.data_dir().join("polybus-broker.db").exists(), "{:?}", tree(api.dir()));
    assert_eq!(cwd_file.exists(), existed, "nothing in the working directory");
    let pulled = api.pull("nopath:orders", "g", json!({"max": 1, "waitMs": 2000})).await;
    assert_eq!(pulled[0]["payload"], "kept");
}

/// A Pub/Sub broker `tag` whose env `dev` reads its key from `key_filename`.
fn pubsub(tag: &str, key_filename: &str) -> Value {
    json!({"name": "Keys", "tag": tag, "envs": [{"slug": "dev", "type": "google_pubsub", "config":
        {"projectId": "polybus-test", "endpoint": "http://127.0.0.1:9", "keyFilename": key_filename}}]})
}

#[tokio::test]
async fn a_key_file_outside_the_data_folder_is_refused() {
    let api = TestApi::new().await;
    for name in ["/etc/hostname", "../registry.db"] {
        refused(&api, pubsub("keys", name), "config.keyFilename").await;
    }
}

#[tokio::test]
async fn key_file_problems_read_the_same_whether_or_not_the_file_exists() {
    let api = TestApi::new().await;
    let data = data_dir(&api);
    std::fs::create_dir(data.join("folder.json")).expect("folder");
    std::fs::write(data.join("text.json"), "s3cret-text, not JSON").expect("text");
    std::fs::write(data.join("string.json"), "\"s3cret-string\"").expect("string");
    std::fs::write(data.join("object.json"), r#"{"type": "s3cret-object"}"#).expect("object");
    let mut messages = Vec::new();
    for (i, name) in
        ["missing.json", "folder.json", "text.json", "string.json", "object.json"].iter().enumerate()
    {
        let tag = format!("keys{i}");
        api.ok("POST", "/v1/brokers", Some(pubsub(&tag, name)), StatusCode::CREATED).await;
        let (status, body) =
            api.call("POST", &format!("/v1/brokers/{tag}/test?env=dev"), Some(&api.reader), None).await;
        let error = &body["error"];
        assert_eq!(status, StatusCode::BAD_REQUEST, "{name}: {body:#}");
        assert_eq!(
            (error["code"].as_str(), error["field"].as_str()),
            (Some("VALIDATION_FAILED"), Some("config.keyFilename"))
        );
        let message = error["message"].as_str().expect("message");
        assert!(!message.contains("s3cret"), "{name}: {message}");
        messages.push(message.replace(name, "NAME"));
    }
    messages.dedup();
    assert_eq!(messages.len(), 1, "one answer for every case: {messages:#?}");

    // A key-shaped file in the data folder is read: the test gets as far as the (closed) endpoint.
    let key = json!({"type": "service_account", "project_id": "polybus-test", "private_key_id": "k1",
        "private_key": "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n",
        "client_email": "polybus@polybus-test.iam.gserviceaccount.com"});
    std::fs::write(data.join("key.json"), key.to_string()).expect("key");
    api.ok("POST", "/v1/brokers", Some(pubsub("keyed", "key.json")), StatusCode::CREATED).await;
    let (_, body) = api.call("POST", "/v1/brokers/keyed/test?env=dev", Some(&api.reader), None).await;
    assert_eq!(body["error"]["code"], "CONNECT_FAILED", "{body:#}");
}

#[tokio::test]
async fn kafka_properties_cannot_name_files_libraries_or_commands() {
    let api = TestApi::new().await;
    for (name, value) in [
        ("ssl.ca.location", "/etc/ssl/private/server.pem"),
        ("ssl.key.location", "key.pem"),
        ("sasl.kerberos.keytab", "/etc/krb5.keytab"),
        ("sasl.kerberos.kinit.cmd", "touch /tmp/polybus-pwned"),
        ("plugin.library.paths", "/tmp/evil.so"),
        ("SSL_ENGINE_LOCATION", "/tmp/engine.so"),
    ] {
        let broker = json!({"name": "Kafka", "tag": "kafka", "envs": [{"slug": "dev", "type": "kafka",
            "config": {"brokers": ["127.0.0.1:9092"], "properties": {name: value}}}]});
        let message = refused(&api, broker, &format!("config.properties.{name}")).await;
        assert!(message.contains("server"), "{name}: {message}");
    }
    // Certificates inline are fine.
    let broker = json!({"name": "Kafka", "tag": "kafka", "envs": [{"slug": "dev", "type": "kafka",
        "config": {"brokers": ["127.0.0.1:9092"], "properties": {"ssl.ca.pem": "-----BEGIN CERTIFICATE-----"}}}]});
    api.ok("POST", "/v1/brokers", Some(broker), StatusCode::CREATED).await;
}
