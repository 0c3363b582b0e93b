//! Publishing: `POST /v1/envs/{env}/events/{event}/messages`, one message or a batch, and the
//! JSON form of a message both ways (payload as JSON, text or base64).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use base64::Engine;
use polybus::{Message, wire};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, ApiJson, ApiPath, ApiResult, ErrorBody, from_value};
use crate::leases::Granted;
use crate::metrics::TopicLabels;
use crate::state::AppState;

/// Most messages in one publish request.
pub const MAX_BATCH: usize = 1000;
/// Longest delivery delay accepted, for publishing and for nacks: 30 days.
pub const MAX_DELAY_MS: u64 = 30 * 24 * 3600 * 1000;
/// W3C trace context headers copied from the HTTP request into published messages.
const TRACE_HEADERS: [&str; 2] = ["traceparent", "tracestate"];

/// The publish route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(publish))
}

/// How a message's `payload` is written in JSON.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// `payload` is any JSON value; the message carries its JSON text (`application/json`).
    #[default]
    Json,
    /// `payload` is a string; the message carries its UTF-8 bytes (`text/plain`).
    Text,
    /// `payload` is a base64 string (standard alphabet, padding optional) of any bytes.
    Base64,
}

/// A message to publish.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MessageIn {
    /// Message id, for idempotent publishing (default: a new UUIDv7).
    #[serde(default)]
    id: Option<String>,
    /// The payload, written as `encoding` says.
    payload: Value,
    /// How `payload` is written (default `json`).
    #[serde(default)]
    encoding: Encoding,
    /// String headers.
    #[serde(default)]
    headers: BTreeMap<String, String>,
    /// Ordering / partition key.
    #[serde(default)]
    key: Option<String>,
    /// Content type (default from `encoding`: `application/json`, `text/plain`, none).
    #[serde(default)]
    content_type: Option<String>,
    /// Deliver no earlier than this many milliseconds after publishing (at most 30 days).
    #[serde(default)]
    delay_ms: Option<u64>,
    /// Publish at most once with this key (1 to 200 characters) within the topic's
    /// `idempotencyWindow`: a later publish with it is not sent and answers the first id.
    #[serde(default)]
    idempotency_key: Option<String>,
}

/// Several messages to publish, in order.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Batch {
    /// The messages (1 to 1000).
    messages: Vec<MessageIn>,
}

/// One message, or `{ "messages": [...] }` (described for the OpenAPI document; the handler
/// looks for `messages` itself, for errors that name the field).
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub enum PublishRequest {
    /// One message.
    One(MessageIn),
    /// A batch.
    Batch(Batch),
}

/// A parsed publish request.
enum Request {
    One(Message),
    Batch(Vec<Message>),
}

/// The ids of the published messages, in order, and which were duplicates not sent.
#[derive(Debug, Serialize, ToSchema)]
pub struct Published {
    /// Message ids; a duplicate's is the id of the first message published with its key.
    ids: Vec<String>,
    /// Per message: true when its idempotency key was published already, so it was not sent.
    duplicates: Vec<bool>,
    /// For a one-message request: whether it was a duplicate.
    #[serde(skip_serializing_if = "Option::is_none")]
    duplicate: Option<bool>,
}

/// A delivered message, with the lease to settle it by.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MessageOut {
    /// Ack or nack with this id before `leaseExpiresAt`, or the message is redelivered.
    pub lease_id: String,
    /// When the lease expires.
    pub lease_expires_at: String,
    /// Message id.
    pub id: String,
    /// The payload, written as `encoding` says.
    pub payload: Value,
    /// `json` when the content type is JSON and the payload parses, else `text` for UTF-8,
    /// else `base64`.
    pub encoding: Encoding,
    /// String headers.
    pub headers: BTreeMap<String, String>,
    /// Ordering / partition key.
    pub key: Option<String>,
    /// Content type.
    pub content_type: Option<String>,
    /// Delivery attempt, 1 on first delivery.
    pub attempt: u32,
    /// When it was published.
    pub published_at: String,
}

impl MessageOut {
    /// The JSON form of `message` under lease `lease`.
    pub fn new(message: &Message, lease: &Granted) -> Self {
        let (payload, encoding) = encode(message);
        MessageOut {
            lease_id: lease.id.clone(),
            lease_expires_at: wire::format_time(lease.expires_at),
            id: message.id.clone(),
            payload,
            encoding,
            headers: message.headers.clone(),
            key: message.key.clone(),
            content_type: message.content_type.clone(),
            attempt: message.attempt,
            published_at: wire::format_time(message.published_at),
        }
    }
}

/// The JSON form of `message`'s payload and how it is written.
pub(crate) fn encode(message: &Message) -> (Value, Encoding) {
    let is_json = message
        .content_type
        .as_deref()
        .map(|c| c.split(';').next().unwrap_or_default().trim().to_ascii_lowercase())
        .is_some_and(|c| c == "application/json" || c.ends_with("+json"));
    if is_json && let Ok(value) = serde_json::from_slice::<Value>(&message.payload) {
        return (value, Encoding::Json);
    }
    match message.payload_str() {
        Some(text) => (Value::String(text.to_owned()), Encoding::Text),
        None => (
            Value::String(base64::engine::general_purpose::STANDARD.encode(&message.payload)),
            Encoding::Base64,
        ),
    }
}

impl MessageIn {
    /// The message to publish; `at` is this message's field path for errors.
    fn into_message(self, at: &str, trace: &[(String, String)]) -> ApiResult<Message> {
        let field = |name: &str| if at.is_empty() { name.to_owned() } else { format!("{at}.{name}") };
        let (payload, default_type) = match self.encoding {
            Encoding::Json => {
                (serde_json::to_vec(&self.payload).unwrap_or_default(), Some("application/json"))
            }
            Encoding::Text => match self.payload {
                Value::String(text) => (text.into_bytes(), Some("text/plain")),
                _ => {
                    return Err(ApiError::invalid(field("payload"), "must be a string with encoding `text`"));
                }
            },
            Encoding::Base64 => match &self.payload {
                Value::String(text) => {
                    (decode_base64(text).map_err(|e| ApiError::invalid(field("payload"), e))?, None)
                }
                _ => {
                    return Err(ApiError::invalid(
                        field("payload"),
                        "must be a base64 string with encoding `base64`",
                    ));
                }
            },
        };
        let mut message = Message::new(payload);
        if let Some(id) = self.id {
            if id.trim().is_empty() || id.len() > 255 {
                return Err(ApiError::invalid(field("id"), "must be 1 to 255 characters"));
            }
            message.id = id;
        }
        // Header rules are the library's, the same for every face (`polybus::core::headers`).
        message.headers = self.headers;
        for (name, value) in trace {
            message.headers.entry(name.clone()).or_insert_with(|| value.clone());
        }
        message.key = self.key;
        message.idempotency_key = self.idempotency_key;
        message.content_type = self.content_type.or(default_type.map(str::to_owned));
        if let Some(ms) = self.delay_ms {
            if ms > MAX_DELAY_MS {
                return Err(ApiError::invalid(
                    field("delayMs"),
                    format!("must be at most {MAX_DELAY_MS} (30 days)"),
                ));
            }
            message = message.delay(Duration::from_millis(ms));
        }
        Ok(message)
    }
}

fn decode_base64(text: &str) -> Result<Vec<u8>, String> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
    let trimmed = text.trim();
    STANDARD
        .decode(trimmed)
        .or_else(|_| STANDARD_NO_PAD.decode(trimmed))
        .map_err(|e| format!("is not base64: {e}"))
}

/// The trace context of the request, when its `traceparent` is well formed.
fn trace_context(headers: &HeaderMap) -> Vec<(String, String)> {
    let parent = headers.get("traceparent").and_then(|v| v.to_str().ok()).map(str::trim);
    if !parent.is_some_and(valid_traceparent) {
        return Vec::new();
    }
    TRACE_HEADERS
        .iter()
        .filter_map(|name| {
            let value = headers.get(*name)?.to_str().ok()?.trim();
            Some(((*name).to_owned(), value.to_owned()))
        })
        .collect()
}

/// `version-traceid-parentid-flags`, lower-case hex, per W3C Trace Context.
fn valid_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    parts.len() >= 4
        && hex(parts[0], 2)
        && parts[0] != "ff"
        && hex(parts[1], 32)
        && parts[1].bytes().any(|b| b != b'0')
        && hex(parts[2], 16)
        && parts[2].bytes().any(|b| b != b'0')
        && hex(parts[3], 2)
}

/// Publishes one message, or a batch in order; returns their ids.
///
/// A W3C `traceparent` (and `tracestate`) header on the request is copied into each message's
/// headers unless the message sets its own. A message with an `idempotencyKey` published
/// already within the topic's window is not sent again: its id is the first message's and
/// `duplicates` says so.
#[utoipa::path(post, path = "/v1/envs/{env}/events/{event}/messages", tag = "messages",
    params(
        ("env" = String, Path, description = "The env slug"),
        ("event" = String, Path, description = "The event, `broker-tag:topic-tag`"),
    ),
    request_body(content = PublishRequest, description = "One message, or `{\"messages\": [...]}`"),
    responses(
        (status = 200, description = "Published", body = Published),
        (status = 400, description = "`VALIDATION_FAILED` (names the field), `INVALID_JSON` or `UNSUPPORTED` (delay on a broker without delayed delivery)", body = ErrorBody),
        (status = 404, description = "`TOPIC_NOT_FOUND`, `BROKER_NOT_FOUND` or `BROKER_ENV_NOT_FOUND`", body = ErrorBody),
        (status = 409, description = "`IDEMPOTENCY_PENDING`: another publisher is publishing a message with this idempotency key; retry shortly", body = ErrorBody),
        (status = 413, description = "`PAYLOAD_TOO_LARGE`", body = ErrorBody),
        (status = 502, description = "`PUBLISH_FAILED` or `CONNECT_FAILED`: the broker refused or is unreachable", body = ErrorBody),
    ))]
async fn publish(
    State(state): State<AppState>,
    ApiPath((env, event)): ApiPath<(String, String)>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Value>,
) -> ApiResult<Json<Published>> {
    let parsed: polybus::EventRef = event.parse()?;
    let labels = TopicLabels { broker: parsed.broker, env: env.clone(), topic: parsed.topic };
    let trace = trace_context(&headers);
    let request = if body.as_object().is_some_and(|o| o.contains_key("messages")) {
        let Batch { messages } = from_value(body)?;
        if messages.is_empty() || messages.len() > MAX_BATCH {
            return Err(ApiError::invalid(
                "messages",
                format!("must hold 1 to {MAX_BATCH} messages, not {}", messages.len()),
            ));
        }
        let messages = messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| m.into_message(&format!("messages[{i}]"), &trace))
            .collect::<ApiResult<Vec<_>>>()?;
        Request::Batch(messages)
    } else {
        Request::One(from_value::<MessageIn>(body)?.into_message("", &trace)?)
    };
    let started = Instant::now();
    let (one, result) = match request {
        Request::One(message) => {
            (true, state.bus().publish_outcome(&env, &event, message).await.map(|p| vec![p]))
        }
        Request::Batch(messages) => (false, state.bus().publish_batch_outcome(&env, &event, messages).await),
    };
    state.metrics().connection_outcome(&labels.broker, &env, &result);
    match result {
        Ok(outcomes) => {
            let n = outcomes.iter().filter(|p| !p.duplicate).count();
            state.metrics().published(&labels, n, started.elapsed());
            tracing::debug!(env, event, n, "published");
            let duplicates: Vec<bool> = outcomes.iter().map(|p| p.duplicate).collect();
            let duplicate = one.then(|| duplicates.first().copied().unwrap_or(false));
            Ok(Json(Published { ids: outcomes.into_iter().map(|p| p.id).collect(), duplicates, duplicate }))
        }
        Err(e) => {
            // Only failures of an existing topic are counted: labels stay those of real topics.
            if matches!(
                e,
                polybus::Error::Transport { .. }
                    | polybus::Error::MissingSecret { .. }
                    | polybus::Error::NoAdapter(_)
                    | polybus::Error::Closed(_)
            ) {
                state.metrics().publish_failed(&labels);
            }
            Err(e.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_payload_numbers_come_back_unchanged() {
        // Found by fuzzing: serde_json's default float parsing may be one unit in the last place
        // off, so 2.3209090866391642e+148 was delivered as 2.320909086639164e+148.
        let body: Value = crate::error::parse_json(br#"{"payload": 2.3209090866391642e+148}"#).expect("json");
        let message = from_value::<MessageIn>(body).expect("message").into_message("", &[]).expect("valid");
        assert_eq!(message.payload.as_ref(), b"2.3209090866391642e+148");
    }

    #[test]
    fn traceparent_must_be_well_formed() {
        assert!(valid_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        assert!(!valid_traceparent("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"));
        assert!(!valid_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01"));
        assert!(!valid_traceparent("00-abc-01"));
    }

    #[test]
    fn payloads_come_back_in_the_encoding_they_need() {
        let json = Message::json(&serde_json::json!({"a": 1})).expect("json");
        assert_eq!(encode(&json), (serde_json::json!({"a": 1}), Encoding::Json));
        assert_eq!(encode(&Message::text("hi")), (Value::String("hi".into()), Encoding::Text));
        assert_eq!(encode(&Message::new(vec![0xff, 0])), (Value::String("/wA=".into()), Encoding::Base64));
    }

    #[test]
    fn text_encoding_needs_a_string_and_base64_valid_base64() {
        let message: MessageIn =
            serde_json::from_value(serde_json::json!({"payload": 3, "encoding": "text"})).expect("in");
        let error = message.into_message("messages[1]", &[]).expect_err("not a string");
        assert_eq!(error.detail().field.as_deref(), Some("messages[1].payload"));
        let message: MessageIn =
            serde_json::from_value(serde_json::json!({"payload": "@@", "encoding": "base64"})).expect("in");
        assert!(message.into_message("", &[]).is_err());
        let message: MessageIn =
            serde_json::from_value(serde_json::json!({"payload": "/wA", "encoding": "base64"})).expect("in");
        assert_eq!(message.into_message("", &[]).expect("message").payload.as_ref(), &[0xff, 0]);
    }
}
