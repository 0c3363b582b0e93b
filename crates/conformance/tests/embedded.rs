//! The behaviour suite against the embedded broker (a SQLite file, no service needed).

use std::process::ExitCode;
use std::sync::Arc;

use polybus_conformance::Target;
use polybus_embedded::EmbeddedConnector;

fn main() -> ExitCode {
    if let Some(code) = polybus_conformance::member_process(&[Arc::new(EmbeddedConnector)]) {
        return code;
    }
    let dir = tempfile::tempdir().expect("a temporary directory for the embedded broker's file");
    let path = dir.path().join("broker.db");
    // Acked messages are kept, so that the replay case finds them whenever compaction runs.
    let config = serde_json::json!({ "path": path.to_string_lossy(), "retention": {"keepAcked": true} });
    let target = Target::new("embedded", polybus_embedded::BROKER_TYPE, config)
        .connector(Arc::new(EmbeddedConnector))
        .no_private(
            "the embedded broker is a SQLite file inside the application, with no process of its own to \
             restart; the application's crash is the process-kill case",
        );
    polybus_conformance::run(target)
}
