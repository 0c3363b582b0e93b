//! The client of a polybus server's HTTP API, for `--server URL`: typed calls that answer the
//! same types the local registry does, and the server's `{"error": {code, message}}` answers
//! turned into the same one-line failures.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use base64::Engine;
use polybus::{Broker, BrokerType, Message, SecretInfo, Topic, wire};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::failure::{CliResult, Failure};

/// Time allowed to connect to the server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for a request, beyond what a pull waits for messages.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a pull may wait for a first message (the server's limit).
pub const MAX_PULL_WAIT: Duration = Duration::from_secs(30);
/// No request body.
const NO_BODY: Option<&Value> = None;
/// A request body above this size may be refused by a server for its size.
const LARGE_BODY: usize = 1024 * 1024;
/// Most characters of a non-JSON error body quoted in a failure.
const QUOTED_BODY: usize = 200;

/// An API key; its `Debug` form hides it, so it cannot leak into logs.
#[derive(Clone)]
pub struct ApiKey(String);

impl FromStr for ApiKey {
    type Err = Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(ApiKey(s.trim().to_owned()))
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(****)")
    }
}

/// A polybus server at a base URL, with the key to use on it.
pub struct Client {
    http: reqwest::Client,
    base: Url,
    /// What to call the server in messages: its URL without credentials.
    shown: String,
    authorization: Option<HeaderValue>,
}

/// A message to publish, as the server takes it (payload always base64, so bytes are kept).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutgoingMessage {
    payload: String,
    encoding: &'static str,
    headers: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    delay_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    idempotency_key: Option<String>,
}

impl OutgoingMessage {
    /// The server form of a message to publish (its id is left to the server).
    pub fn from_message(message: &Message) -> Self {
        OutgoingMessage {
            payload: base64::engine::general_purpose::STANDARD.encode(&message.payload),
            encoding: "base64",
            headers: message.headers.clone(),
            key: message.key.clone(),
            content_type: message.content_type.clone(),
            delay_ms: message.delay.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            idempotency_key: message.idempotency_key.clone(),
        }
    }
}

/// A delivered message under a lease, as the server hands it out.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Leased {
    /// Ack with this id.
    pub lease_id: String,
    id: String,
    payload: Value,
    encoding: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    key: Option<String>,
    content_type: Option<String>,
    attempt: u32,
    published_at: String,
}

impl Leased {
    /// The message as the local broker would have delivered it.
    pub fn to_message(&self) -> CliResult<Message> {
        let payload = decode_payload(&self.id, &self.encoding, &self.payload)?;
        let mut message = Message::new(payload);
        message.id = self.id.clone();
        message.headers = self.headers.clone();
        message.key = self.key.clone();
        message.content_type = self.content_type.clone();
        message.attempt = self.attempt;
        message.published_at = wire::parse_time(&self.published_at).ok_or_else(|| {
            bad_response(format!("message `{}` has a bad publish time `{}`", self.id, self.published_at))
        })?;
        Ok(message)
    }
}

/// The bytes of a payload the server wrote as `encoding`.
fn decode_payload(id: &str, encoding: &str, payload: &Value) -> CliResult<Vec<u8>> {
    match (encoding, payload) {
        ("text", Value::String(text)) => Ok(text.clone().into_bytes()),
        ("base64", Value::String(text)) => base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|e| bad_response(format!("message `{id}` has a payload that is not base64: {e}"))),
        ("json", value) => serde_json::to_vec(value)
            .map_err(|e| bad_response(format!("message `{id}`: cannot encode its payload: {e}"))),
        (encoding, _) => {
            Err(bad_response(format!("message `{id}` has a payload in an unknown encoding `{encoding}`")))
        }
    }
}

/// A message as the server writes it in dead letters and stored messages.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MessageIn {
    id: String,
    payload: Value,
    encoding: String,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    key: Option<String>,
    content_type: Option<String>,
    published_at: String,
}

impl MessageIn {
    fn into_message(self) -> CliResult<Message> {
        let mut message = Message::new(decode_payload(&self.id, &self.encoding, &self.payload)?);
        message.published_at = wire::parse_time(&self.published_at).ok_or_else(|| {
            bad_response(format!("message `{}` has a bad publish time `{}`", self.id, self.published_at))
        })?;
        message.id = self.id;
        message.headers = self.headers;
        message.key = self.key;
        message.content_type = self.content_type;
        Ok(message)
    }
}

/// A dead letter as the server writes it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeadLetterIn {
    #[serde(flatten)]
    message: MessageIn,
    reason: Option<String>,
    attempts: Option<u32>,
    group: Option<String>,
    dead_lettered_at: Option<String>,
}

impl DeadLetterIn {
    fn into_dead_letter(self, event: &str) -> CliResult<polybus::DeadLetter> {
        Ok(polybus::DeadLetter {
            message: self.message.into_message()?,
            reason: self.reason,
            attempts: self.attempts,
            group: self.group,
            event: Some(event.to_owned()),
            dead_lettered_at: self.dead_lettered_at.as_deref().and_then(wire::parse_time),
        })
    }
}

/// A stored message as the server writes it.
#[derive(Debug, Deserialize)]
struct StoredIn {
    #[serde(flatten)]
    message: MessageIn,
    position: Option<String>,
}

#[derive(Deserialize)]
struct StoredMessagesIn {
    messages: Vec<StoredIn>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeadLettersIn {
    dead_letters: Vec<DeadLetterIn>,
}

#[derive(Deserialize)]
struct OutcomeIn {
    done: Vec<String>,
    #[serde(default)]
    failed: Vec<FailedIn>,
    kept: usize,
}

#[derive(Deserialize)]
struct FailedIn {
    id: String,
    error: String,
}

/// The outcome of a connection test made by the server.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Tested {
    /// Broker type of the env.
    #[serde(rename = "type")]
    pub broker_type: BrokerType,
    /// Time to connect and ping, in milliseconds.
    pub latency_ms: f64,
}

#[derive(Serialize)]
struct Batch<'a> {
    messages: &'a [OutgoingMessage],
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PullRequest {
    max: u64,
    wait_ms: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AckRequest<'a> {
    lease_ids: &'a [String],
}

#[derive(Deserialize)]
struct Ids {
    ids: Vec<String>,
    /// Per message, whether it was a duplicate of an idempotency key (absent: none was).
    #[serde(default)]
    duplicates: Vec<bool>,
}

#[derive(Deserialize)]
struct IdempotencyIn {
    record: Option<polybus::IdempotencyRecord>,
}

#[derive(Deserialize)]
struct Pulled {
    messages: Vec<Leased>,
}

#[derive(Deserialize)]
struct AckResult {
    #[serde(default)]
    failed: Vec<AckFailure>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AckFailure {
    lease_id: String,
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    code: String,
    message: String,
}

impl Client {
    /// A client of the server at `server` (`http://host:port`, a bare `host:port` means HTTP),
    /// sending `key` as `Authorization: Bearer`, trusting only the CAs in the PEM file `ca` when given.
    pub fn new(server: &str, key: Option<&ApiKey>, ca: Option<&std::path::Path>) -> CliResult<Client> {
        let server = server.trim();
        let with_scheme = if server.contains("://") { server.to_owned() } else { format!("http://{server}") };
        let base = Url::parse(&with_scheme)
            .map_err(|e| Failure::new("INVALID_SERVER", format!("`{server}` is not a server URL: {e}")))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(Failure::new(
                "INVALID_SERVER",
                format!("`{server}` is not an http:// or https:// server URL"),
            ));
        }
        let mut shown = base.clone();
        // Neither fails on an http(s) URL; credentials are only left out of messages.
        let _ = shown.set_password(None);
        let _ = shown.set_username("");
        let authorization = match key.filter(|k| !k.0.is_empty()) {
            None => None,
            Some(ApiKey(key)) => {
                let mut value = HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| {
                    Failure::new(
                        "INVALID_API_KEY",
                        "the API key holds characters an HTTP header cannot carry",
                    )
                })?;
                value.set_sensitive(true);
                Some(value)
            }
        };
        let mut builder = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("polybus-cli/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = ca {
            builder = builder.tls_certs_only(server_ca(ca)?);
        }
        let http = builder.build().map_err(|e| {
            Failure::new("CLIENT_FAILED", format!("cannot set up the HTTP client: {}", chain(&e)))
        })?;
        Ok(Client { http, base, shown: shown.as_str().trim_end_matches('/').to_owned(), authorization })
    }

    /// `base/v1/SEGMENTS…`, each segment percent-encoded.
    fn url(&self, segments: &[&str]) -> CliResult<Url> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| Failure::new("INVALID_SERVER", format!("`{}` cannot have a path", self.shown)))?
            .pop_if_empty()
            .push("v1")
            .extend(segments);
        Ok(url)
    }

    /// Sends a request and decodes the JSON answer, or turns the error answer into a failure.
    async fn call<T: DeserializeOwned, B: Serialize + ?Sized>(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, &str)],
        body: Option<&B>,
        timeout: Duration,
    ) -> CliResult<T> {
        let url = self.url(segments)?;
        let mut request = self.http.request(method, url).timeout(timeout);
        if !query.is_empty() {
            request = request.query(query);
        }
        if let Some(value) = &self.authorization {
            request = request.header(AUTHORIZATION, value.clone());
        }
        let mut sent = 0;
        if let Some(body) = body {
            let bytes = serde_json::to_vec(body)
                .map_err(|e| Failure::new("ENCODE_FAILED", format!("cannot encode the request: {e}")))?;
            sent = bytes.len();
            request = request.header(CONTENT_TYPE, "application/json").body(bytes);
        }
        let response = request.send().await.map_err(|e| self.unreachable(&e, sent))?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| self.unreachable(&e, 0))?;
        if !status.is_success() {
            return Err(self.refused(status, &bytes));
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| bad_response(format!("{} answered {status} with unexpected JSON: {e}", self.shown)))
    }

    /// The failure of a request that got no answer; `sent` is the size of its body.
    fn unreachable(&self, error: &reqwest::Error, sent: usize) -> Failure {
        let what = if error.is_timeout() { "no answer in time from" } else { "cannot reach" };
        let mut message = format!("{what} the server at {}: {}", self.shown, chain(error));
        // A server closes the connection on a body over its limit; it answers 413 when it can.
        if sent > LARGE_BODY && !error.is_connect() && !error.is_timeout() {
            message
                .push_str(&format!(" (while sending {sent} bytes: the server may refuse a body this large)"));
        }
        Failure::new("SERVER_UNREACHABLE", message)
    }

    /// The failure an error answer stands for: the server's own code and message when it sent
    /// them.
    fn refused(&self, status: StatusCode, body: &[u8]) -> Failure {
        match serde_json::from_slice::<ErrorBody>(body) {
            Ok(ErrorBody { error }) if status == StatusCode::UNAUTHORIZED && self.authorization.is_none() => {
                Failure::new(
                    error.code,
                    "no API key: set POLYBUS_API_KEY (or --api-key) to a key made with `polybus key create` on the server's registry",
                )
            }
            Ok(ErrorBody { error }) => Failure::new(error.code, error.message),
            Err(_) => {
                let text = String::from_utf8_lossy(body);
                let quoted: String = text.chars().take(QUOTED_BODY).collect();
                let quoted = quoted.split_whitespace().collect::<Vec<_>>().join(" ");
                Failure::new("SERVER_FAILED", format!("{} answered {status}: {quoted}", self.shown))
            }
        }
    }

    /// `POST /v1/brokers`.
    pub async fn create_broker(&self, definition: &Value) -> CliResult<Broker> {
        self.call(Method::POST, &["brokers"], &[], Some(definition), REQUEST_TIMEOUT).await
    }

    /// `PATCH /v1/brokers/{tag}`.
    pub async fn update_broker(&self, tag: &str, patch: &Value) -> CliResult<Broker> {
        self.call(Method::PATCH, &["brokers", tag], &[], Some(patch), REQUEST_TIMEOUT).await
    }

    /// `GET /v1/brokers/{tag}`: the broker, secrets redacted.
    pub async fn broker(&self, tag: &str) -> CliResult<Broker> {
        self.call(Method::GET, &["brokers", tag], &[], NO_BODY, REQUEST_TIMEOUT).await
    }

    /// `GET /v1/brokers`: every broker, secrets redacted.
    pub async fn brokers(&self) -> CliResult<Vec<Broker>> {
        self.call(Method::GET, &["brokers"], &[], NO_BODY, REQUEST_TIMEOUT).await
    }

    /// `DELETE /v1/brokers/{tag}?force=`.
    pub async fn delete_broker(&self, tag: &str, force: bool) -> CliResult {
        let force = if force { "true" } else { "false" };
        let _: Value = self
            .call(Method::DELETE, &["brokers", tag], &[("force", force)], NO_BODY, REQUEST_TIMEOUT)
            .await?;
        Ok(())
    }

    /// `POST /v1/brokers/{tag}/test?env=`: the server connects to the env and pings it.
    pub async fn test_broker(&self, tag: &str, env: &str) -> CliResult<Tested> {
        self.call(Method::POST, &["brokers", tag, "test"], &[("env", env)], NO_BODY, REQUEST_TIMEOUT).await
    }

    /// `POST /v1/topics`.
    pub async fn create_topic(&self, definition: &Value) -> CliResult<Topic> {
        self.call(Method::POST, &["topics"], &[], Some(definition), REQUEST_TIMEOUT).await
    }

    /// `PATCH /v1/topics/{event}`.
    pub async fn update_topic(&self, event: &str, patch: &Value) -> CliResult<Topic> {
        self.call(Method::PATCH, &["topics", event], &[], Some(patch), REQUEST_TIMEOUT).await
    }

    /// `GET /v1/topics/{event}`, without the server's `nativeNames` (the CLI works them out).
    pub async fn topic(&self, event: &str) -> CliResult<Topic> {
        let mut value: Value =
            self.call(Method::GET, &["topics", event], &[], NO_BODY, REQUEST_TIMEOUT).await?;
        if let Value::Object(map) = &mut value {
            map.remove("nativeNames");
        }
        serde_json::from_value(value)
            .map_err(|e| bad_response(format!("{} answered a topic the CLI cannot read: {e}", self.shown)))
    }

    /// `GET /v1/topics?broker=`.
    pub async fn topics(&self, broker: Option<&str>) -> CliResult<Vec<Topic>> {
        let query: Vec<(&str, &str)> = broker.map(|b| ("broker", b)).into_iter().collect();
        self.call(Method::GET, &["topics"], &query, NO_BODY, REQUEST_TIMEOUT).await
    }

    /// `DELETE /v1/topics/{event}`.
    pub async fn delete_topic(&self, event: &str) -> CliResult {
        let _: Value = self.call(Method::DELETE, &["topics", event], &[], NO_BODY, REQUEST_TIMEOUT).await?;
        Ok(())
    }

    /// `POST /v1/secrets`: sets a secret; the answer holds its name and times only.
    pub async fn set_secret(&self, name: &str, value: &str) -> CliResult<SecretInfo> {
        let body = serde_json::json!({ "name": name, "value": value });
        self.call(Method::POST, &["secrets"], &[], Some(&body), REQUEST_TIMEOUT).await
    }

    /// `GET /v1/secrets`: names and times.
    pub async fn secrets(&self) -> CliResult<Vec<SecretInfo>> {
        self.call(Method::GET, &["secrets"], &[], NO_BODY, REQUEST_TIMEOUT).await
    }

    /// `DELETE /v1/secrets/{name}`.
    pub async fn delete_secret(&self, name: &str) -> CliResult {
        let _: Value = self.call(Method::DELETE, &["secrets", name], &[], NO_BODY, REQUEST_TIMEOUT).await?;
        Ok(())
    }

    /// A request under `/v1/jobs`; the JSON answer.
    pub async fn jobs(&self, method: Method, path: &[&str], body: Option<&Value>) -> CliResult<Value> {
        let segments: Vec<&str> = std::iter::once("jobs").chain(path.iter().copied()).collect();
        self.call(method, &segments, &[], body, REQUEST_TIMEOUT).await
    }

    /// `POST /v1/envs/{env}/events/{event}/messages` with a batch; the ids, in order, and
    /// which were duplicates not sent.
    pub async fn publish(
        &self,
        env: &str,
        event: &str,
        messages: &[OutgoingMessage],
    ) -> CliResult<Vec<polybus::Published>> {
        let body = Batch { messages };
        let Ids { ids, duplicates } = self
            .call(
                Method::POST,
                &["envs", env, "events", event, "messages"],
                &[],
                Some(&body),
                REQUEST_TIMEOUT,
            )
            .await?;
        let duplicate = |i: usize| duplicates.get(i).copied().unwrap_or(false);
        Ok(ids
            .into_iter()
            .enumerate()
            .map(|(i, id)| polybus::Published { id, duplicate: duplicate(i) })
            .collect())
    }

    /// `GET …/idempotency/{key}`: what the server's registry holds for the key.
    pub async fn check_idempotency(
        &self,
        env: &str,
        event: &str,
        key: &str,
    ) -> CliResult<Option<polybus::IdempotencyRecord>> {
        let path = ["envs", env, "events", event, "idempotency", key];
        let IdempotencyIn { record } = self.call(Method::GET, &path, &[], NO_BODY, REQUEST_TIMEOUT).await?;
        Ok(record)
    }

    /// `POST …/subscriptions/{group}/pull`: up to `max` messages, waiting up to `wait` for the
    /// first.
    pub async fn pull(
        &self,
        env: &str,
        event: &str,
        group: &str,
        max: u64,
        wait: Duration,
    ) -> CliResult<Vec<Leased>> {
        let wait = wait.min(MAX_PULL_WAIT);
        let body = PullRequest { max, wait_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX) };
        let path = ["envs", env, "events", event, "subscriptions", group, "pull"];
        let Pulled { messages } =
            self.call(Method::POST, &path, &[], Some(&body), REQUEST_TIMEOUT + wait).await?;
        Ok(messages)
    }

    /// `POST …/subscriptions/{group}/ack`; returns how many leases could not be settled.
    pub async fn ack(&self, env: &str, event: &str, group: &str, lease_ids: &[String]) -> CliResult<usize> {
        let body = AckRequest { lease_ids };
        let path = ["envs", env, "events", event, "subscriptions", group, "ack"];
        let AckResult { failed } = self.call(Method::POST, &path, &[], Some(&body), REQUEST_TIMEOUT).await?;
        for failure in &failed {
            tracing::warn!(
                lease = failure.lease_id,
                code = failure.error.code,
                "ack failed ({}); the message will be redelivered",
                failure.error.message
            );
        }
        Ok(failed.len())
    }
}

impl Client {
    /// `GET …/dead-letters`: up to `limit` dead letters `filter` selects.
    pub async fn list_dead_letters(
        &self,
        env: &str,
        event: &str,
        filter: &polybus::DeadLetterFilter,
        limit: usize,
    ) -> CliResult<Vec<polybus::DeadLetter>> {
        let limit = limit.to_string();
        let ids = filter.ids.as_ref().map(|ids| ids.iter().cloned().collect::<Vec<_>>().join(","));
        let mut query = vec![("limit", limit.as_str())];
        query.extend(filter.group.as_deref().map(|g| ("group", g)));
        query.extend(filter.reason.as_deref().map(|r| ("reason", r)));
        query.extend(ids.as_deref().map(|i| ("ids", i)));
        let path = ["envs", env, "events", event, "dead-letters"];
        let DeadLettersIn { dead_letters } =
            self.call(Method::GET, &path, &query, NO_BODY, REQUEST_TIMEOUT).await?;
        dead_letters.into_iter().map(|l| l.into_dead_letter(event)).collect()
    }

    /// `POST …/dead-letters/redrive` or `…/purge` for the dead letters `filter` selects.
    pub async fn act_on_dead_letters(
        &self,
        env: &str,
        event: &str,
        filter: &polybus::DeadLetterFilter,
        act: crate::commands::DlqAct,
    ) -> CliResult<polybus::DeadLetterOutcome> {
        let verb = match act {
            crate::commands::DlqAct::Redrive => "redrive",
            crate::commands::DlqAct::Purge => "purge",
        };
        let body = serde_json::json!({"group": filter.group, "reason": filter.reason, "ids": filter.ids});
        let path = ["envs", env, "events", event, "dead-letters", verb];
        let OutcomeIn { done, failed, kept } =
            self.call(Method::POST, &path, &[], Some(&body), REQUEST_TIMEOUT).await?;
        Ok(polybus::DeadLetterOutcome {
            done,
            failed: failed.into_iter().map(|f| (f.id, f.error)).collect(),
            kept,
        })
    }
}

impl Client {
    /// `GET …/groups`: the topic's consumer groups.
    pub async fn groups(&self, env: &str, event: &str) -> CliResult<Vec<polybus::GroupInfo>> {
        #[derive(serde::Deserialize)]
        struct GroupsIn {
            groups: Vec<polybus::GroupInfo>,
        }
        let path = ["envs", env, "events", event, "groups"];
        let GroupsIn { groups } = self.call(Method::GET, &path, &[], NO_BODY, REQUEST_TIMEOUT).await?;
        Ok(groups)
    }

    /// `POST …/replay`: moves `group` so its next deliveries start at `from`.
    pub async fn replay(&self, env: &str, event: &str, group: &str, from: &str) -> CliResult<()> {
        let body = serde_json::json!({"group": group, "from": from});
        let path = ["envs", env, "events", event, "replay"];
        let _: Value = self.call(Method::POST, &path, &[], Some(&body), REQUEST_TIMEOUT).await?;
        Ok(())
    }

    /// `GET …/messages`: the stored messages `query` selects, oldest first.
    pub async fn messages(
        &self,
        env: &str,
        event: &str,
        query: &polybus::MessageQuery,
    ) -> CliResult<Vec<polybus::StoredMessage>> {
        let (since, until) = (query.since.map(wire::format_time), query.until.map(wire::format_time));
        let limit = query.limit.to_string();
        let mut pairs = vec![("limit", limit.as_str())];
        pairs.extend(query.id.as_deref().map(|v| ("id", v)));
        pairs.extend(query.key.as_deref().map(|v| ("key", v)));
        pairs.extend(since.as_deref().map(|v| ("since", v)));
        pairs.extend(until.as_deref().map(|v| ("until", v)));
        let path = ["envs", env, "events", event, "messages"];
        let StoredMessagesIn { messages } =
            self.call(Method::GET, &path, &pairs, NO_BODY, REQUEST_TIMEOUT).await?;
        messages
            .into_iter()
            .map(|m| Ok(polybus::StoredMessage { message: m.message.into_message()?, position: m.position }))
            .collect()
    }
}

fn bad_response(message: String) -> Failure {
    Failure::new("BAD_RESPONSE", message)
}

/// An error and its sources, `: `-separated, on one line.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let said = cause.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = cause.source();
    }
    text
}

/// The CA certificates of `--server-ca`.
fn server_ca(path: &std::path::Path) -> CliResult<Vec<reqwest::Certificate>> {
    let shown = path.display();
    let pem = std::fs::read(path)
        .map_err(|e| Failure::new("INVALID_SERVER_CA", format!("--server-ca {shown} cannot be read: {e}")))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| Failure::new("INVALID_SERVER_CA", format!("--server-ca {shown} is not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(Failure::new(
            "INVALID_SERVER_CA",
            format!("--server-ca {shown} holds no PEM certificate"),
        ));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_get_v1_and_encoded_segments() {
        let client = Client::new("127.0.0.1:8080", None, None).expect("client");
        let url = client.url(&["topics", "bus:orders"]).expect("url");
        assert_eq!(url.as_str(), "http://127.0.0.1:8080/v1/topics/bus:orders");
        let client = Client::new("https://user:pw@bus.example/api/", None, None).expect("client");
        assert_eq!(
            client.url(&["brokers", "a b"]).expect("url").as_str(),
            "https://user:pw@bus.example/api/v1/brokers/a%20b"
        );
        assert_eq!(client.shown, "https://bus.example/api");
        assert!(Client::new("ftp://x", None, None).is_err());
    }

    #[test]
    fn keys_are_hidden_from_debug() {
        let key: ApiKey = "pbk_secret".parse().expect("key");
        assert_eq!(format!("{key:?}"), "ApiKey(****)");
    }

    #[test]
    fn error_answers_keep_the_server_code() {
        let key: ApiKey = "pbk_x".parse().expect("key");
        let client = Client::new("http://h", Some(&key), None).expect("client");
        let failure = client
            .refused(StatusCode::CONFLICT, br#"{"error":{"code":"CONFLICT","message":"stale version 1"}}"#);
        assert_eq!(failure.to_string(), "CONFLICT: stale version 1");
        let failure = client.refused(StatusCode::BAD_GATEWAY, b"<html>\n bad gateway\n</html>");
        assert_eq!(
            failure.to_string(),
            "SERVER_FAILED: http://h answered 502 Bad Gateway: <html> bad gateway </html>"
        );
    }

    #[test]
    fn leased_messages_come_back_byte_for_byte() {
        let leased: Leased = serde_json::from_value(serde_json::json!({
            "leaseId": "l1", "leaseExpiresAt": "2026-01-01T00:00:00Z", "id": "m1",
            "payload": "/wA=", "encoding": "base64", "headers": {"h": "v"}, "key": "k",
            "contentType": null, "attempt": 2, "publishedAt": "2026-01-01T00:00:00.123Z"
        }))
        .expect("leased");
        let message = leased.to_message().expect("message");
        assert_eq!(message.payload.as_ref(), &[0xff, 0]);
        assert_eq!((message.id.as_str(), message.attempt, message.key.as_deref()), ("m1", 2, Some("k")));
        assert_eq!(wire::format_time(message.published_at), "2026-01-01T00:00:00.123Z");
    }
}
