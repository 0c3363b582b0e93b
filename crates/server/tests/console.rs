//! The operations console in headless Chromium, driven by clicking over WebDriver
//! (chromedriver): a dead letter is listed with its reason, redriven by pressing its button and
//! then consumed; a read-only key sees the same page with no redrive or purge buttons.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`scripts/services chromium` installs them);
//! without them this test fails. With `POLYBUS_SCREENSHOTS=1` the screenshots are written to
//! docs/console/ (that is how the ones there were made); otherwise to a temporary folder.

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::TestApi;
use fantoccini::{Client, ClientBuilder, Locator};
use polybus::Group;
use serde_json::json;
use tokio::process::{Child, Command};

const DEADLINE: Duration = Duration::from_secs(30);

/// A chromedriver on a free port, killed when dropped.
struct Driver {
    _child: Child,
    url: String,
}

async fn chromedriver() -> Driver {
    let binary = std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".to_owned());
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        probe.local_addr().expect("port").port()
    };
    let child = Command::new(&binary)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run {binary}: {e}; run `scripts/services chromium` (it installs chromium-driver)")
        });
    let url = format!("http://127.0.0.1:{port}");
    let started = tokio::time::Instant::now();
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Driver { _child: child, url };
        }
        assert!(started.elapsed() < DEADLINE, "chromedriver did not listen on {port} within {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn browser(driver: &Driver, profile: &std::path::Path) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned()),
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--window-size=1500,1100",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    // fantoccini's rustls needs a process-wide provider; ring, as everywhere in polybus.
    let _ = rustls::crypto::ring::default_provider().install_default();
    ClientBuilder::rustls()
        .expect("TLS roots for the WebDriver client")
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("a Chromium session through chromedriver")
}

/// Where screenshots go: docs/console/ when asked for, else a temporary folder.
fn screenshot_dir(temp: &std::path::Path) -> PathBuf {
    if std::env::var("POLYBUS_SCREENSHOTS").is_ok_and(|v| v == "1") {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/console");
        std::fs::create_dir_all(&dir).expect("docs/console");
        dir
    } else {
        temp.to_path_buf()
    }
}

async fn screenshot(client: &Client, dir: &std::path::Path, name: &str) {
    let png = client.screenshot().await.expect("a screenshot");
    assert!(png.starts_with(b"\x89PNG"), "the screenshot is a PNG");
    std::fs::write(dir.join(name), png).expect("screenshot written");
}

async fn wait_for(client: &Client, css: &str) -> fantoccini::elements::Element {
    client
        .wait()
        .at_most(DEADLINE)
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("`{css}` did not appear within {DEADLINE:?}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_is_redriven_by_clicking_and_then_consumed() {
    let api = TestApi::new().await;
    // An embedded broker that keeps acked messages, so the message browser has them to show.
    let broker = json!({"name": "Console", "tag": "console-bus", "envs": [{"slug": "dev", "type": "embedded",
        "config": {"path": "console.db", "retention": {"keepAcked": true}}}]});
    api.ok("POST", "/v1/brokers", Some(broker), axum::http::StatusCode::CREATED).await;
    let event = api.embedded_topic("console-bus", "orders").await;
    let bus = api.state.bus().clone();

    let mut billing = bus.subscribe("dev", &event, Group("billing")).await.expect("subscribe billing");
    // Through the API, so the console's counters and chart show it.
    let ids = api.publish(&event, json!({"payload": "order 42", "encoding": "text", "key": "42"})).await;
    let id = ids[0].clone();
    let first = tokio::time::timeout(DEADLINE, billing.next())
        .await
        .expect("the order arrives")
        .expect("subscription open")
        .expect("a delivery");
    assert_eq!(first.message().id, id);
    first.dead_letter("card declined: insufficient funds").await.expect("dead-lettered");

    // A nightly job in Lagos time: listed with its next run and no runs yet.
    let job = json!({"name": "nightly-invoices", "env": "dev", "event": event, "payload": {"text": "invoice"},
        "schedule": {"cron": "0 2 * * *", "tz": "Africa/Lagos"}});
    api.ok("POST", "/v1/jobs", Some(job), axum::http::StatusCode::CREATED).await;
    let listening = api.listen().await;
    let address = listening.address;

    let driver = chromedriver().await;
    let temp = tempfile::tempdir().expect("temporary folder");
    let shots = screenshot_dir(temp.path());
    let client = browser(&driver, &temp.path().join("profile")).await;

    // A writer opens the topic, sees the dead letter with its reason, and redrives it.
    client.goto(&format!("http://{address}/?key={}", api.admin)).await.expect("open the console");
    let schedule = wait_for(&client, "#jobs tr.job td.schedule").await;
    assert_eq!(schedule.text().await.expect("schedule"), "cron 0 2 * * * (Africa/Lagos)");
    let next = client.find(Locator::Css("#jobs tr.job td.next")).await.expect("next run");
    assert!(next.text().await.expect("next").ends_with("T01:00:00Z"), "02:00 in Lagos is 01:00 UTC");
    let topic_row = format!("tr.topic[data-event=\"{event}\"][data-env=\"dev\"]");
    wait_for(&client, &format!("{topic_row} button.open")).await.click().await.expect("press Operate");
    // The group that dead-lettered it is listed with its numbers.
    let lag = wait_for(&client, "#groups tr.group[data-group=\"billing\"] td.lag").await;
    assert_eq!(lag.text().await.expect("lag text"), "0", "billing has read everything");
    let letter_row = format!("#dead-letters tr.dead-letter[data-id=\"{id}\"]");
    let reason = wait_for(&client, &format!("{letter_row} td.reason")).await;
    assert_eq!(reason.text().await.expect("reason text"), "card declined: insufficient funds");
    let group = client.find(Locator::Css(&format!("{letter_row} td.group"))).await.expect("group cell");
    assert_eq!(group.text().await.expect("group text"), "billing");
    screenshot(&client, &shots, "dead-letters.png").await;

    client
        .find(Locator::Css(&format!("{letter_row} button.redrive")))
        .await
        .expect("a redrive button for a write key")
        .click()
        .await
        .expect("press Redrive");
    wait_for(&client, &format!("#dead-letters tr.dead-letter.redriven[data-id=\"{id}\"]")).await;
    let note = client.find(Locator::Id("dlq-note")).await.expect("note").text().await.expect("note text");
    assert!(note.starts_with("1 redriven"), "the page says what the redrive did: {note}");

    let again = tokio::time::timeout(DEADLINE, billing.next())
        .await
        .expect("the redriven order arrives")
        .expect("subscription open")
        .expect("a delivery");
    assert_eq!(again.message().payload_str(), Some("order 42"));
    assert_eq!(again.message().key.as_deref(), Some("42"));
    again.ack().await.expect("ack the redriven order");
    // The message browser finds both copies of the order by its key, oldest first.
    let key = client.find(Locator::Css("#messages-form input[name=key]")).await.expect("key field");
    key.send_keys("42").await.expect("type the key");
    client
        .find(Locator::Css("#messages-form button[type=submit]"))
        .await
        .expect("Browse")
        .click()
        .await
        .expect("browse");
    wait_for(&client, "#messages tr.message:nth-child(2)").await;
    let ids = client.find_all(Locator::Css("#messages tr.message td.id")).await.expect("message rows");
    assert_eq!(ids.len(), 2, "the order and its redriven copy");
    assert_eq!(ids[0].text().await.expect("first id"), id, "oldest first");
    screenshot(&client, &shots, "redriven.png").await;

    // A reader sees the same page, without the buttons that act.
    client.goto(&format!("http://{address}/?signout=1")).await.expect("sign out");
    client.goto(&format!("http://{address}/?key={}", api.reader)).await.expect("open as a reader");
    wait_for(&client, &format!("{topic_row} button.open")).await.click().await.expect("press Operate");
    let note = client.wait().at_most(DEADLINE).for_element(Locator::Css("#dlq-note"));
    note.await.expect("the dead-letter note");
    let read_only_note = async {
        loop {
            let text = client.find(Locator::Id("dlq-note")).await.expect("note").text().await.expect("text");
            if !text.starts_with("Reading") && !text.is_empty() {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let text = tokio::time::timeout(DEADLINE, read_only_note).await.expect("the listing finished");
    assert_eq!(text, "No dead letters.", "the redriven dead letter is gone");
    let buttons = client.find_all(Locator::Css("button.redrive, button.purge")).await.expect("query");
    assert!(buttons.is_empty(), "a read-only key is offered no redrive or purge");
    let redrive_all = client.find(Locator::Id("dlq-redrive-all")).await.expect("redrive-all button");
    assert!(!redrive_all.is_displayed().await.expect("displayed?"), "Redrive all is hidden for a reader");

    client.close().await.expect("close the browser");
    billing.close().await.expect("close billing");
    listening.stop().await;
}
