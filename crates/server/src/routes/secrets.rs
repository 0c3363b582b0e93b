//! Secrets for `$Secret{name}` references: `/v1/secrets…`. Values go in and never come out:
//! every answer holds names and times only.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use polybus::{SecretInfo, Secrets};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiJson, ApiPath, ApiResult, ErrorBody};
use crate::state::AppState;

/// The secret routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(set_secret, list_secrets)).routes(routes!(delete_secret))
}

/// A secret to store.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSecret {
    /// The name `$Secret{name}` refers to: 1 to 64 of `A-Z a-z 0-9 _ -`.
    name: String,
    /// The value; stored encrypted, never returned.
    value: String,
}

/// What is known about a secret: never its value.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretEntry {
    /// The name.
    name: String,
    /// When it was first set.
    created_at: DateTime<Utc>,
    /// When it was last set.
    updated_at: DateTime<Utc>,
}

impl From<SecretInfo> for SecretEntry {
    fn from(info: SecretInfo) -> Self {
        SecretEntry { name: info.name, created_at: info.created_at, updated_at: info.updated_at }
    }
}

/// What a delete answers.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeletedSecret {
    /// The name deleted.
    deleted: String,
}

fn secrets(state: &AppState) -> ApiResult<&Secrets> {
    state.bus().secrets().store().ok_or_else(|| {
        polybus::Error::from(polybus::core::secret::SecretError::StoreUnavailable(
            "this server keeps no secrets".into(),
        ))
        .into()
    })
}

/// Sets a secret (creating or replacing it); the value is encrypted at rest and never returned.
#[utoipa::path(post, path = "/v1/secrets", tag = "secrets",
    request_body(content = NewSecret, description = "The name and the value"),
    responses(
        (status = 201, description = "Created (name and times only)", body = SecretEntry),
        (status = 200, description = "Replaced (name and times only)", body = SecretEntry),
        (status = 400, description = "`VALIDATION_FAILED`: bad name or empty value", body = ErrorBody),
        (status = 503, description = "`SECRETS_UNAVAILABLE`: the server has no secrets key", body = ErrorBody),
    ))]
async fn set_secret(
    State(state): State<AppState>,
    ApiJson(secret): ApiJson<NewSecret>,
) -> ApiResult<(StatusCode, Json<SecretEntry>)> {
    let info = secrets(&state)?.set(&secret.name, &secret.value).await?;
    let status = if info.created_at == info.updated_at { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(info.into())))
}

/// Lists the secrets: names and times, never values.
#[utoipa::path(get, path = "/v1/secrets", tag = "secrets",
    responses((status = 200, description = "Every secret, ordered by name", body = Vec<SecretEntry>)))]
async fn list_secrets(State(state): State<AppState>) -> ApiResult<Json<Vec<SecretEntry>>> {
    Ok(Json(secrets(&state)?.list().await?.into_iter().map(SecretEntry::from).collect()))
}

/// Deletes a secret; definitions that refer to it fail to connect from then on.
#[utoipa::path(delete, path = "/v1/secrets/{name}", tag = "secrets",
    params(("name" = String, Path, description = "The secret's name")),
    responses(
        (status = 200, description = "Deleted", body = DeletedSecret),
        (status = 404, description = "`SECRET_NOT_FOUND`", body = ErrorBody),
    ))]
async fn delete_secret(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<Json<DeletedSecret>> {
    secrets(&state)?.delete(&name).await?;
    Ok(Json(DeletedSecret { deleted: name }))
}
