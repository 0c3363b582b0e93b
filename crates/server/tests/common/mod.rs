//! A server router over a fresh SQLite registry and an embedded broker, driven in-process.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response, StatusCode, header};
use futures::StreamExt;
use polybus::Registry;
use polybus_server::{AppState, Options};
use serde_json::{Value, json};
use tower::ServiceExt;

/// The embedded broker's file of test brokers, relative to the data folder.
pub const BROKER_DB: &str = "broker.db";

/// The API served on a loopback port, until stopped.
pub struct Listening {
    /// Where it listens.
    pub address: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    serving: tokio::task::JoinHandle<Result<(), polybus_server::ServeError>>,
}

impl Listening {
    /// Stops serving and waits for the server to finish.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.serving.await.expect("server task").expect("server ran");
    }
}

/// A router with a read-write key and a read-only key.
pub struct TestApi {
    dir: tempfile::TempDir,
    /// The shared state.
    pub state: AppState,
    /// The application.
    pub router: Router,
    /// A read-write key.
    pub admin: String,
    /// A read-only key.
    pub reader: String,
}

impl TestApi {
    /// A fresh server with the default options.
    pub async fn new() -> Self {
        TestApi::with_options(Options::default()).await
    }

    /// A fresh server; its data folder is `polybus-data` beside the registry unless `options` names one.
    pub async fn with_options(mut options: Options) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        options.data_dir.get_or_insert_with(|| dir.path().join("polybus-data"));
        let url = dir.path().join("registry.db").display().to_string();
        let registry = Registry::open(&url).await.expect("registry");
        let state = AppState::open(registry, options).await.expect("state");
        let admin = state.keys().create("admin", false).await.expect("admin key").secret;
        let reader = state.keys().create("reader", true).await.expect("reader key").secret;
        let router = polybus_server::router(state.clone());
        TestApi { dir, state, router, admin, reader }
    }

    /// The temporary folder the registry is in.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// The server's data folder: `polybus-data` beside the registry.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("polybus-data")
    }

    /// The embedded broker's file, inside the data folder.
    pub fn broker_db(&self) -> PathBuf {
        self.data_dir().join(BROKER_DB)
    }

    /// Sends a request as it is.
    pub async fn send(&self, request: Request<Body>) -> Response<Body> {
        self.router.clone().oneshot(request).await.expect("the router never fails")
    }

    /// `METHOD PATH` with `key` as Bearer token and `body` as JSON; returns status and JSON body.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let body = body.map(|b| b.to_string().into_bytes());
        self.call_raw(method, path, key, body).await
    }

    /// Like [`TestApi::call`] with raw body bytes.
    pub async fn call_raw(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> (StatusCode, Value) {
        let mut request = Request::builder().method(method).uri(path);
        if let Some(key) = key {
            request = request.header(header::AUTHORIZATION, format!("Bearer {key}"));
        }
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        let request = request.body(body.map(Body::from).unwrap_or_else(Body::empty)).expect("request");
        let response = self.send(request).await;
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.expect("body");
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        (status, value)
    }

    /// As admin; asserts `expected` and returns the body.
    pub async fn ok(&self, method: &str, path: &str, body: Option<Value>, expected: StatusCode) -> Value {
        let (status, value) = self.call(method, path, Some(&self.admin), body).await;
        assert_eq!(status, expected, "{method} {path}: {value:#}");
        value
    }

    /// As admin; asserts the error status and code and returns the error detail.
    pub async fn fails(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        status: StatusCode,
        code: &str,
    ) -> Value {
        let (got, value) = self.call(method, path, Some(&self.admin), body).await;
        assert_eq!(
            (got, value["error"]["code"].as_str()),
            (status, Some(code)),
            "{method} {path}: {value:#}"
        );
        value["error"].clone()
    }

    /// Serves this API over HTTP on a free loopback port (for a browser).
    pub async fn listen(&self) -> Listening {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let server = polybus_server::Server::with_listener(listener, self.state.clone());
        let address = server.local_addr().expect("address");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        Listening { address, stop, serving }
    }

    /// Creates broker `tag` with one embedded env `dev`.
    pub async fn embedded_broker(&self, tag: &str) {
        let broker = json!({
            "name": format!("Broker {tag}"),
            "tag": tag,
            "envs": [{"slug": "dev", "type": "embedded", "config": {"path": BROKER_DB}}],
        });
        self.ok("POST", "/v1/brokers", Some(broker), StatusCode::CREATED).await;
    }

    /// Creates topic `broker:topic` (and the broker when missing); returns the event.
    pub async fn embedded_topic(&self, broker: &str, topic: &str) -> String {
        let (status, _) = self.call("GET", &format!("/v1/brokers/{broker}"), Some(&self.admin), None).await;
        if status == StatusCode::NOT_FOUND {
            self.embedded_broker(broker).await;
        }
        let event = format!("{broker}:{topic}");
        self.ok("POST", "/v1/topics", Some(json!({"tag": event})), StatusCode::CREATED).await;
        event
    }

    /// Publishes `body` to `event` in `dev`; returns the ids.
    pub async fn publish(&self, event: &str, body: Value) -> Vec<String> {
        let published = self
            .ok("POST", &format!("/v1/envs/dev/events/{event}/messages"), Some(body), StatusCode::OK)
            .await;
        published["ids"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|id| id.as_str().expect("id").to_owned())
            .collect()
    }

    /// Pulls from `group` on `event` in `dev`.
    pub async fn pull(&self, event: &str, group: &str, request: Value) -> Vec<Value> {
        let path = format!("/v1/envs/dev/events/{event}/subscriptions/{group}/pull");
        let pulled = self.ok("POST", &path, Some(request), StatusCode::OK).await;
        pulled["messages"].as_array().expect("messages").clone()
    }

    /// Settles leases; returns the answer.
    pub async fn ack(&self, event: &str, group: &str, request: Value) -> Value {
        let path = format!("/v1/envs/dev/events/{event}/subscriptions/{group}/ack");
        self.ok("POST", &path, Some(request), StatusCode::OK).await
    }
}

/// Reads Server-Sent Events from a response body.
pub struct EventStream {
    body: axum::body::BodyDataStream,
    buffer: String,
}

/// One Server-Sent Event.
#[derive(Debug, Clone)]
pub struct SseEvent {
    /// `event:` field.
    pub event: String,
    /// `id:` field.
    pub id: Option<String>,
    /// `data:` lines joined.
    pub data: String,
}

impl EventStream {
    /// Reads events from `response`.
    pub fn new(response: Response<Body>) -> Self {
        EventStream { body: response.into_body().into_data_stream(), buffer: String::new() }
    }

    /// The rest of the stream: what was read but not parsed yet, and the body still to come.
    pub fn into_parts(self) -> (String, axum::body::BodyDataStream) {
        (self.buffer, self.body)
    }

    /// The next event (comments skipped); panics after `within`.
    pub async fn next(&mut self, within: Duration) -> SseEvent {
        tokio::time::timeout(within, async {
            loop {
                if let Some(end) = self.buffer.find("\n\n") {
                    let block: String = self.buffer.drain(..end + 2).collect();
                    let mut event = SseEvent { event: "message".into(), id: None, data: String::new() };
                    let mut has_field = false;
                    for line in block.lines() {
                        if let Some(v) = line.strip_prefix("event:") {
                            event.event = v.trim().to_owned();
                            has_field = true;
                        } else if let Some(v) = line.strip_prefix("id:") {
                            event.id = Some(v.trim().to_owned());
                        } else if let Some(v) = line.strip_prefix("data:") {
                            if !event.data.is_empty() {
                                event.data.push('\n');
                            }
                            event.data.push_str(v.strip_prefix(' ').unwrap_or(v));
                            has_field = true;
                        }
                    }
                    if has_field {
                        return event;
                    }
                    continue;
                }
                let chunk = self.body.next().await.expect("stream ended").expect("stream failed");
                self.buffer.push_str(std::str::from_utf8(&chunk).expect("UTF-8 events"));
            }
        })
        .await
        .expect("an event in time")
    }
}
