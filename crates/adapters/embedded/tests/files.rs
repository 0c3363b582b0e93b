//! The embedded broker opens only files it created: its own SQLite `application_id`, or a file
//! written before that stamp with exactly its schema. Anything else is left untouched.

mod common;

use std::path::Path;

use common::{next, options, text, topic};
use polybus_core::{ConnectTarget, Connector, Error, Message, Transport};
use polybus_embedded::EmbeddedConfig;
use polybus_embedded::{APPLICATION_ID, EmbeddedConnector, EmbeddedTransport};
use serde_json::json;

fn config_at(path: &Path) -> EmbeddedConfig {
    EmbeddedConfig { path: Some(path.to_string_lossy().into_owned()), retention: None }
}

/// The `application_id` in a SQLite file's header.
fn application_id(path: &Path) -> i32 {
    let conn = rusqlite::Connection::open(path).expect("sqlite");
    conn.pragma_query_value(None, "application_id", |row| row.get(0)).expect("application_id")
}

/// Opening `path` fails naming the file and the field, and changes nothing in it.
async fn refused(path: &Path) -> String {
    let before = std::fs::read(path).expect("read");
    let error = EmbeddedTransport::open(&config_at(path)).await.expect_err("refused");
    let Error::Validation(validation) = &error else { panic!("a validation error, got {error:?}") };
    assert_eq!(validation.field, "config.path");
    let message = error.to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("not a polybus broker file"), "{message}");
    assert_eq!(std::fs::read(path).expect("read"), before, "not one byte changed");
    let wal = format!("{}-wal", path.display());
    assert!(!Path::new(&wal).exists(), "not switched to write-ahead logging");
    message
}

#[tokio::test]
async fn a_new_file_is_stamped_with_the_brokers_application_id() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("new.db");
    let broker = EmbeddedTransport::open(&config_at(&path)).await.expect("open");
    broker.close().await.expect("close");
    assert_eq!(application_id(&path), APPLICATION_ID);
}

#[tokio::test]
async fn another_programs_database_is_refused_before_any_write() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("other.db");
    {
        let conn = rusqlite::Connection::open(&path).expect("sqlite");
        conn.execute_batch("CREATE TABLE notes (body TEXT); INSERT INTO notes VALUES ('private note');")
            .expect("other program's data");
    }
    let message = refused(&path).await;
    assert!(!message.contains("private note"), "{message}");
    let conn = rusqlite::Connection::open(&path).expect("sqlite");
    let mode: String = conn.pragma_query_value(None, "journal_mode", |row| row.get(0)).expect("mode");
    assert_eq!(mode, "delete");
}

#[tokio::test]
async fn a_database_of_another_application_is_refused_even_with_the_same_tables() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("theirs.db");
    let broker = EmbeddedTransport::open_separate(&config_at(&path)).await.expect("open");
    broker.close().await.expect("close");
    drop(broker);
    {
        let conn = rusqlite::Connection::open(&path).expect("sqlite");
        conn.pragma_update(None, "application_id", 0x1234_5678).expect("their stamp");
        conn.pragma_update(None, "journal_mode", "DELETE").expect("rollback journal");
    }
    let message = refused(&path).await;
    assert!(message.contains("application"), "{message}");
}

#[tokio::test]
async fn a_file_that_is_not_sqlite_is_refused_without_quoting_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("notes.txt");
    std::fs::write(&path, "s3cret line one\n".repeat(64)).expect("text file");
    let message = refused(&path).await;
    assert!(!message.contains("s3cret"), "{message}");
}

#[tokio::test]
async fn a_broker_file_written_before_the_stamp_opens_and_is_stamped() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("old.db");
    let orders = topic("upgrade");
    {
        let broker = EmbeddedTransport::open_separate(&config_at(&path)).await.expect("open");
        broker.publish(&orders, Message::text("from before")).await.expect("publish");
        broker.close().await.expect("close");
    }
    // What polybus wrote before files were stamped: the same schema, application_id 0.
    rusqlite::Connection::open(&path)
        .expect("sqlite")
        .pragma_update(None, "application_id", 0)
        .expect("unstamp");
    assert_eq!(application_id(&path), 0);

    let broker = EmbeddedTransport::open_separate(&config_at(&path)).await.expect("an old file opens");
    let mut sub = broker.subscribe(&orders, &options("g", 8, 5_000)).await.expect("subscribe");
    assert_eq!(text(&next(&mut sub).await), "from before");
    assert_eq!(application_id(&path), APPLICATION_ID, "stamped on open");
}

#[tokio::test]
async fn an_existing_empty_file_is_still_usable_by_a_local_user() {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    let broker = EmbeddedTransport::open(&config_at(file.path())).await.expect("an empty file is new");
    broker.ping().await.expect("ping");
    assert_eq!(application_id(file.path()), APPLICATION_ID);
}

#[tokio::test]
async fn the_connector_names_the_env_of_a_refused_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("other.db");
    rusqlite::Connection::open(&path).expect("sqlite").execute_batch("CREATE TABLE t (x);").expect("table");
    let target = ConnectTarget {
        broker: "bus".into(),
        env: "dev".into(),
        broker_type: polybus_embedded::BROKER_TYPE,
        config: json!({"path": path}),
    };
    let error = EmbeddedConnector.connect(&target).await.err().expect("refused");
    let Error::Validation(validation) = error else { panic!("a validation error, got {error:?}") };
    assert_eq!((validation.env.as_deref(), validation.field.as_str()), (Some("dev"), "config.path"));
}
