//! A topic's dead letters: `GET …/dead-letters` (list), `GET …/dead-letters/{id}` (show),
//! `POST …/dead-letters/redrive` and `POST …/dead-letters/purge`, under
//! `/v1/envs/{env}/events/{event}`.

use std::collections::{BTreeMap, BTreeSet};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use polybus::{DeadLetter, DeadLetterFilter, DeadLetterOutcome, wire};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::messages::{Encoding, encode};
use crate::error::{ApiError, ApiJsonOrDefault, ApiPath, ApiQuery, ApiResult, ErrorBody};
use crate::state::AppState;

/// The dead-letter routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_dead_letters))
        .routes(routes!(show_dead_letter))
        .routes(routes!(redrive_dead_letters))
        .routes(routes!(purge_dead_letters))
}

/// Which dead letters to list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query, rename_all = "camelCase")]
struct ListQuery {
    /// Only those this consumer group gave up on.
    group: Option<String>,
    /// Only those whose reason contains this text.
    reason: Option<String>,
    /// Only these message ids, comma-separated.
    ids: Option<String>,
    /// List at most this many (1 to 1000, default 100).
    limit: Option<usize>,
}

/// Which dead letters to redrive or purge; nothing given selects all.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Selection {
    /// Only those this consumer group gave up on.
    #[serde(default)]
    group: Option<String>,
    /// Only those whose reason contains this text.
    #[serde(default)]
    reason: Option<String>,
    /// Only these message ids.
    #[serde(default)]
    ids: Option<Vec<String>>,
}

/// A dead letter: the message and why it failed.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterOut {
    /// Message id.
    id: String,
    /// The payload, written as `encoding` says.
    payload: Value,
    /// `json`, `text` or `base64`, as for deliveries.
    encoding: Encoding,
    /// The publisher's headers (polybus's own removed).
    headers: BTreeMap<String, String>,
    /// Ordering / partition key.
    key: Option<String>,
    /// Content type.
    content_type: Option<String>,
    /// When it was first published.
    published_at: String,
    /// Why it was dead-lettered.
    reason: Option<String>,
    /// How many deliveries it had.
    attempts: Option<u32>,
    /// The consumer group that gave up on it.
    group: Option<String>,
    /// When it was dead-lettered.
    dead_lettered_at: Option<String>,
}

impl From<&DeadLetter> for DeadLetterOut {
    fn from(letter: &DeadLetter) -> Self {
        let message = &letter.message;
        let (payload, encoding) = encode(message);
        DeadLetterOut {
            id: message.id.clone(),
            payload,
            encoding,
            headers: message.headers.clone(),
            key: message.key.clone(),
            content_type: message.content_type.clone(),
            published_at: wire::format_time(message.published_at),
            reason: letter.reason.clone(),
            attempts: letter.attempts,
            group: letter.group.clone(),
            dead_lettered_at: letter.dead_lettered_at.map(wire::format_time),
        }
    }
}

/// Dead letters listed.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeadLetters {
    /// The dead letters, in the order read.
    #[serde(rename = "deadLetters")]
    dead_letters: Vec<DeadLetterOut>,
}

/// What a redrive or purge did.
#[derive(Debug, Serialize, ToSchema)]
pub struct Outcome {
    /// Ids redriven (or purged).
    done: Vec<String>,
    /// Selected ids that could not be redriven, with why; they stay dead letters.
    failed: Vec<Failed>,
    /// Dead letters read that were not selected; they stay.
    kept: usize,
}

/// One dead letter that could not be redriven.
#[derive(Debug, Serialize, ToSchema)]
pub struct Failed {
    /// Message id.
    id: String,
    /// Why.
    error: String,
}

impl From<DeadLetterOutcome> for Outcome {
    fn from(o: DeadLetterOutcome) -> Self {
        Outcome {
            done: o.done,
            failed: o.failed.into_iter().map(|(id, error)| Failed { id, error }).collect(),
            kept: o.kept,
        }
    }
}

fn ids(list: impl IntoIterator<Item = String>) -> Option<BTreeSet<String>> {
    let set: BTreeSet<String> =
        list.into_iter().map(|id| id.trim().to_owned()).filter(|id| !id.is_empty()).collect();
    (!set.is_empty()).then_some(set)
}

#[utoipa::path(get, path = "/v1/envs/{env}/events/{event}/dead-letters", tag = "dead letters",
    params(
        ("env" = String, Path, description = "The env slug"),
        ("event" = String, Path, description = "The event, `broker-tag:topic-tag`"),
        ListQuery,
    ),
    responses(
        (status = 200, description = "The dead letters read (they stay where they are)", body = DeadLetters),
        (status = 400, description = "`VALIDATION_FAILED`", body = ErrorBody),
        (status = 404, description = "`TOPIC_NOT_FOUND`, `BROKER_NOT_FOUND` or `BROKER_ENV_NOT_FOUND`", body = ErrorBody),
        (status = 502, description = "`CONNECT_FAILED` or `CONSUME_FAILED`", body = ErrorBody),
    ))]
async fn list_dead_letters(
    State(state): State<AppState>,
    ApiPath((env, event)): ApiPath<(String, String)>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> ApiResult<Json<DeadLetters>> {
    let limit = query.limit.unwrap_or(100);
    if !(1..=polybus::DEAD_LETTER_SCAN_MAX).contains(&limit) {
        return Err(ApiError::invalid("limit", format!("must be 1 to {}", polybus::DEAD_LETTER_SCAN_MAX)));
    }
    let filter = DeadLetterFilter {
        group: query.group,
        reason: query.reason,
        ids: query.ids.and_then(|list| ids(list.split(',').map(str::to_owned))),
    };
    let letters = state.bus().list_dead_letters(&env, &event, &filter, limit).await?;
    Ok(Json(DeadLetters { dead_letters: letters.iter().map(DeadLetterOut::from).collect() }))
}

#[utoipa::path(get, path = "/v1/envs/{env}/events/{event}/dead-letters/{id}", tag = "dead letters",
    params(
        ("env" = String, Path, description = "The env slug"),
        ("event" = String, Path, description = "The event, `broker-tag:topic-tag`"),
        ("id" = String, Path, description = "The message id"),
    ),
    responses(
        (status = 200, description = "The dead letter", body = DeadLetterOut),
        (status = 404, description = "`DEAD_LETTER_NOT_FOUND`, `TOPIC_NOT_FOUND`, …", body = ErrorBody),
        (status = 502, description = "`CONNECT_FAILED` or `CONSUME_FAILED`", body = ErrorBody),
    ))]
async fn show_dead_letter(
    State(state): State<AppState>,
    ApiPath((env, event, id)): ApiPath<(String, String, String)>,
) -> ApiResult<Json<DeadLetterOut>> {
    let filter = DeadLetterFilter { ids: Some(BTreeSet::from([id.clone()])), ..Default::default() };
    let letters = state.bus().list_dead_letters(&env, &event, &filter, polybus::DEAD_LETTER_SCAN_MAX).await?;
    match letters.first() {
        Some(letter) => Ok(Json(DeadLetterOut::from(letter))),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "DEAD_LETTER_NOT_FOUND",
            format!("no dead letter `{id}` of {event} in {env}"),
        )),
    }
}

fn selection(body: Selection) -> DeadLetterFilter {
    DeadLetterFilter { group: body.group, reason: body.reason, ids: body.ids.and_then(ids) }
}

#[utoipa::path(post, path = "/v1/envs/{env}/events/{event}/dead-letters/redrive", tag = "dead letters",
    params(
        ("env" = String, Path, description = "The env slug"),
        ("event" = String, Path, description = "The event, `broker-tag:topic-tag`"),
    ),
    request_body(content = Selection, description = "Which dead letters; an empty body selects all"),
    responses(
        (status = 200, description = "Each selected dead letter was published back to the topic, then removed (`failed` ones stay)", body = Outcome),
        (status = 400, description = "`VALIDATION_FAILED` or `INVALID_JSON`", body = ErrorBody),
        (status = 404, description = "`TOPIC_NOT_FOUND`, `BROKER_NOT_FOUND` or `BROKER_ENV_NOT_FOUND`", body = ErrorBody),
        (status = 502, description = "`CONNECT_FAILED`, `CONSUME_FAILED` or `ACK_FAILED`", body = ErrorBody),
    ))]
async fn redrive_dead_letters(
    State(state): State<AppState>,
    ApiPath((env, event)): ApiPath<(String, String)>,
    ApiJsonOrDefault(body): ApiJsonOrDefault<Selection>,
) -> ApiResult<Json<Outcome>> {
    let outcome = state.bus().redrive_dead_letters(&env, &event, &selection(body)).await?;
    Ok(Json(outcome.into()))
}

#[utoipa::path(post, path = "/v1/envs/{env}/events/{event}/dead-letters/purge", tag = "dead letters",
    params(
        ("env" = String, Path, description = "The env slug"),
        ("event" = String, Path, description = "The event, `broker-tag:topic-tag`"),
    ),
    request_body(content = Selection, description = "Which dead letters; an empty body selects all"),
    responses(
        (status = 200, description = "The selected dead letters were deleted", body = Outcome),
        (status = 400, description = "`VALIDATION_FAILED` or `INVALID_JSON`", body = ErrorBody),
        (status = 404, description = "`TOPIC_NOT_FOUND`, `BROKER_NOT_FOUND` or `BROKER_ENV_NOT_FOUND`", body = ErrorBody),
        (status = 502, description = "`CONNECT_FAILED`, `CONSUME_FAILED` or `ACK_FAILED`", body = ErrorBody),
    ))]
async fn purge_dead_letters(
    State(state): State<AppState>,
    ApiPath((env, event)): ApiPath<(String, String)>,
    ApiJsonOrDefault(body): ApiJsonOrDefault<Selection>,
) -> ApiResult<Json<Outcome>> {
    let outcome = state.bus().purge_dead_letters(&env, &event, &selection(body)).await?;
    Ok(Json(outcome.into()))
}
