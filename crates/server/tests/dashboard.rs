//! The dashboard in headless Chromium: after a broker and topic are created and messages
//! published, the page shows the broker, its env type, the topic and the published count.
//!
//! Needs Debian's `chromium` (`scripts/services` installs it); without it this test fails.

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use common::TestApi;
use serde_json::json;

/// The Chromium binary, from `$CHROMIUM` or the `PATH`.
fn chromium() -> String {
    if let Ok(path) = std::env::var("CHROMIUM") {
        return path;
    }
    for name in ["chromium", "chromium-browser"] {
        let found = std::process::Command::new("sh")
            .args(["-c", &format!("command -v {name}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if found {
            return name.to_owned();
        }
    }
    panic!(
        "Chromium is not installed: run `scripts/services chromium` (it installs Debian's `chromium`), or set CHROMIUM"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_brokers_envs_topics_and_throughput_in_chromium() {
    let chromium = chromium();
    let api = TestApi::new().await;
    let event = api.embedded_topic("dash-bus", "orders").await;
    let messages: Vec<_> = (0..5).map(|i| json!({"payload": {"n": i}})).collect();
    api.publish(&event, json!({"messages": messages})).await;
    api.publish(&event, json!({"payload": "one more", "encoding": "text"})).await;
    api.ok("GET", "/v1/stats", None, StatusCode::OK).await;

    let listening = api.listen().await;
    let address = listening.address;

    let profile = tempfile::tempdir().expect("profile directory");
    let url = format!("http://{address}/?key={}", api.reader);
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(&chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(["--dump-dom", "--virtual-time-budget=5000", &url])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("Chromium finished within 2 minutes")
    .unwrap_or_else(|e| panic!("cannot run {chromium}: {e}; run `scripts/services chromium`"));
    listening.stop().await;

    let dom = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "chromium failed: {}\n{dom}", String::from_utf8_lossy(&output.stderr));
    assert!(dom.contains("<td class=\"broker-tag\">dash-bus</td>"), "broker tag missing:\n{dom}");
    assert!(dom.contains("<td class=\"env-type\">embedded</td>"), "env type missing:\n{dom}");
    assert!(dom.contains("<td class=\"event\">dash-bus:orders</td>"), "topic missing:\n{dom}");
    assert!(dom.contains("<td class=\"published\">6</td>"), "published count missing:\n{dom}");
    assert!(dom.contains("class=\"health ok\""), "the connection test did not run or failed:\n{dom}");
    assert!(dom.contains("open leases"), "the stats poll did not run:\n{dom}");
}
