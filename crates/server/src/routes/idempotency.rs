//! Idempotency keys: `GET /v1/envs/{env}/events/{event}/idempotency/{key}`, which message a
//! key was published as.

use axum::Json;
use axum::extract::State;
use polybus::{IdempotencyRecord, wire};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiPath, ApiResult, ErrorBody};
use crate::state::AppState;

/// The idempotency route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(check_idempotency))
}

/// What the registry holds for an idempotency key.
#[derive(Debug, Serialize, ToSchema)]
pub struct Checked {
    /// The key asked about.
    key: String,
    /// The key's record, or `null` when the key is free (a publish with it would be sent).
    record: Option<RecordOut>,
}

/// The first message published with a key.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecordOut {
    /// The first message's id.
    message_id: String,
    /// `pending` (being published) or `published`.
    state: String,
    /// When the key was claimed.
    first_seen: String,
    /// When the key stops holding (the end of the topic's `idempotencyWindow`).
    expires_at: String,
    /// While pending: when another publisher may take the claim over.
    #[serde(skip_serializing_if = "Option::is_none")]
    lease_expires_at: Option<String>,
}

impl From<IdempotencyRecord> for RecordOut {
    fn from(r: IdempotencyRecord) -> Self {
        RecordOut {
            message_id: r.message_id,
            state: r.state.as_str().to_owned(),
            first_seen: wire::format_time(r.first_seen),
            expires_at: wire::format_time(r.expires_at),
            lease_expires_at: r.lease_expires_at.map(wire::format_time),
        }
    }
}

#[utoipa::path(get, path = "/v1/envs/{env}/events/{event}/idempotency/{key}", tag = "messages",
    params(
        ("env" = String, Path, description = "The env slug"),
        ("event" = String, Path, description = "The event, `broker-tag:topic-tag`"),
        ("key" = String, Path, description = "The idempotency key"),
    ),
    responses(
        (status = 200, description = "The key's record, or `record: null` when it is free", body = Checked),
        (status = 400, description = "`VALIDATION_FAILED` (the key)", body = ErrorBody),
        (status = 404, description = "`TOPIC_NOT_FOUND`, `BROKER_NOT_FOUND` or `BROKER_ENV_NOT_FOUND`", body = ErrorBody),
        (status = 503, description = "`STORAGE_FAILED`: the registry's database did not answer", body = ErrorBody),
    ))]
async fn check_idempotency(
    State(state): State<AppState>,
    ApiPath((env, event, key)): ApiPath<(String, String, String)>,
) -> ApiResult<Json<Checked>> {
    let record = state.bus().check_idempotency(&env, &event, &key).await?;
    Ok(Json(Checked { key, record: record.map(RecordOut::from) }))
}
