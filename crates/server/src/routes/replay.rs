//! Replay and message query on retaining brokers: `POST …/replay` moves a group back (or
//! forward) and `GET …/messages` reads stored messages, under `/v1/envs/{env}/events/{event}`.
//! A broker that does not retain messages answers `400 UNSUPPORTED`.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use polybus::{MessageQuery, ReplayFrom, StoredMessage, wire};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::messages::{Encoding, encode};
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery, ApiResult, ErrorBody};
use crate::state::AppState;

/// The replay and message query routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(replay)).routes(routes!(query_messages))
}

/// Which group to move, and where to.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReplayIn {
    /// The consumer group.
    group: String,
    /// `beginning`, or an RFC 3339 time: the group's next deliveries start there.
    from: String,
}

/// What a replay did.
#[derive(Debug, Serialize, ToSchema)]
pub struct Replayed {
    /// The group moved.
    group: String,
    /// Where it starts now, as given.
    from: String,
}

/// Which stored messages to read.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query, rename_all = "camelCase")]
struct MessagesQuery {
    /// Only the message with this id.
    id: Option<String>,
    /// Only messages with this key.
    key: Option<String>,
    /// Only messages published at or after this RFC 3339 time.
    since: Option<String>,
    /// Only messages published before this RFC 3339 time.
    until: Option<String>,
    /// At most this many, oldest first (1 to 1000, default 100).
    limit: Option<usize>,
}

/// A stored message.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StoredMessageOut {
    /// Message id.
    id: String,
    /// The payload, written as `encoding` says.
    payload: Value,
    /// `json`, `text` or `base64`, as for deliveries.
    encoding: Encoding,
    /// The publisher's headers.
    headers: BTreeMap<String, String>,
    /// Ordering / partition key.
    key: Option<String>,
    /// Content type.
    content_type: Option<String>,
    /// When it was published.
    published_at: String,
    /// The broker's position of it (offset, stream id, sequence).
    position: Option<String>,
}

impl From<&StoredMessage> for StoredMessageOut {
    fn from(stored: &StoredMessage) -> Self {
        let message = &stored.message;
        let (payload, encoding) = encode(message);
        StoredMessageOut {
            id: message.id.clone(),
            payload,
            encoding,
            headers: message.headers.clone(),
            key: message.key.clone(),
            content_type: message.content_type.clone(),
            published_at: wire::format_time(message.published_at),
            position: stored.position.clone(),
        }
    }
}

/// Stored messages read.
#[derive(Debug, Serialize, ToSchema)]
pub struct StoredMessages {
    /// Oldest first.
    messages: Vec<StoredMessageOut>,
}

#[utoipa::path(post, path = "/v1/envs/{env}/events/{event}/replay", tag = "replay",
    params(
        ("env" = String, Path, description = "The env slug"),
        ("event" = String, Path, description = "The event, `broker-tag:topic-tag`"),
    ),
    request_body(content = ReplayIn, description = "The group and where it starts again"),
    responses(
        (status = 200, description = "The group's next deliveries start at `from` (see the broker's README for members connected meanwhile)", body = Replayed),
        (status = 400, description = "`VALIDATION_FAILED`, `INVALID_JSON`, or `UNSUPPORTED` on a broker that does not retain messages", body = ErrorBody),
        (status = 404, description = "`TOPIC_NOT_FOUND`, `BROKER_NOT_FOUND` or `BROKER_ENV_NOT_FOUND`", body = ErrorBody),
        (status = 502, description = "`CONNECT_FAILED` or `SUBSCRIBE_FAILED` (on Kafka: while the group has members)", body = ErrorBody),
    ))]
async fn replay(
    State(state): State<AppState>,
    ApiPath((env, event)): ApiPath<(String, String)>,
    ApiJson(body): ApiJson<ReplayIn>,
) -> ApiResult<Json<Replayed>> {
    let from: ReplayFrom = body.from.parse().map_err(|e: String| ApiError::invalid("from", e))?;
    state.bus().replay(&env, &event, &body.group, from).await?;
    Ok(Json(Replayed { group: body.group, from: body.from }))
}

fn time(field: &str, value: Option<&str>) -> ApiResult<Option<polybus::core::message::Timestamp>> {
    value
        .map(|v| {
            wire::parse_time(v).ok_or_else(|| {
                ApiError::invalid(field, "must be an RFC 3339 time such as 2026-05-01T12:00:00Z")
            })
        })
        .transpose()
}

#[utoipa::path(get, path = "/v1/envs/{env}/events/{event}/messages", tag = "replay",
    params(
        ("env" = String, Path, description = "The env slug"),
        ("event" = String, Path, description = "The event, `broker-tag:topic-tag`"),
        MessagesQuery,
    ),
    responses(
        (status = 200, description = "The stored messages selected, oldest first (nothing is consumed)", body = StoredMessages),
        (status = 400, description = "`VALIDATION_FAILED`, or `UNSUPPORTED` on a broker that does not retain messages", body = ErrorBody),
        (status = 404, description = "`TOPIC_NOT_FOUND`, `BROKER_NOT_FOUND` or `BROKER_ENV_NOT_FOUND`", body = ErrorBody),
        (status = 502, description = "`CONNECT_FAILED` or `SUBSCRIBE_FAILED`", body = ErrorBody),
    ))]
async fn query_messages(
    State(state): State<AppState>,
    ApiPath((env, event)): ApiPath<(String, String)>,
    ApiQuery(query): ApiQuery<MessagesQuery>,
) -> ApiResult<Json<StoredMessages>> {
    if query.limit == Some(0) {
        return Err(ApiError::invalid(
            "limit",
            format!("must be 1 to {}", polybus::core::ops::QUERY_LIMIT_MAX),
        ));
    }
    let selected = MessageQuery {
        id: query.id.filter(|v| !v.is_empty()),
        key: query.key.filter(|v| !v.is_empty()),
        since: time("since", query.since.as_deref().filter(|v| !v.is_empty()))?,
        until: time("until", query.until.as_deref().filter(|v| !v.is_empty()))?,
        limit: query.limit.unwrap_or(0),
    };
    let found = state.bus().messages(&env, &event, selected).await?;
    Ok(Json(StoredMessages { messages: found.iter().map(StoredMessageOut::from).collect() }))
}
