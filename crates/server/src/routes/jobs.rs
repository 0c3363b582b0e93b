//! Jobs: `POST /v1/jobs` (create), `GET /v1/jobs` (list), `GET|DELETE /v1/jobs/{id}`,
//! `POST /v1/jobs/{id}/pause|resume`, `GET /v1/jobs/{id}/runs` and
//! `POST /v1/jobs/{id}/runs/{run}/retry`. The document shapes are in docs/JOBS.md.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use polybus::Error;
use polybus::jobs::{Job, JobSpec, Run};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, ApiJson, ApiPath, ApiResult, ErrorBody};
use crate::state::AppState;

/// The job routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_job, list_jobs))
        .routes(routes!(get_job, delete_job))
        .routes(routes!(pause_job))
        .routes(routes!(resume_job))
        .routes(routes!(job_runs))
        .routes(routes!(retry_run))
}

/// Jobs listed.
#[derive(Debug, Serialize, ToSchema)]
pub struct Jobs {
    /// Every job, oldest first.
    #[schema(value_type = Vec<Object>)]
    jobs: Vec<Job>,
}

/// A job's runs.
#[derive(Debug, Serialize, ToSchema)]
pub struct Runs {
    /// The runs, oldest first.
    #[schema(value_type = Vec<Object>)]
    runs: Vec<Run>,
}

/// A job-id error as `404 JOB_NOT_FOUND`, a run one as `404 RUN_NOT_FOUND`; others unchanged.
fn not_found(error: Error) -> ApiError {
    match &error {
        Error::Validation(e) if e.field == "id" => {
            ApiError::new(StatusCode::NOT_FOUND, "JOB_NOT_FOUND", &e.message)
        }
        Error::Validation(e) if e.field == "run" && e.message.contains("has no run") => {
            ApiError::new(StatusCode::NOT_FOUND, "RUN_NOT_FOUND", &e.message)
        }
        _ => ApiError::from(error),
    }
}

/// Creates a job.
#[utoipa::path(post, path = "/v1/jobs", tag = "jobs",
    request_body(content = Object, description = "The job: env, event, payload {json|text|base64}, headers, key, schedule {at|every|cron, tz | on, delay}, startAt, endDate, limit, retries, catchUp, paused"),
    responses(
        (status = 201, description = "Created, with its id and next run", body = Object),
        (status = 400, description = "`VALIDATION_FAILED` naming the field", body = ErrorBody),
        (status = 404, description = "`TOPIC_NOT_FOUND`", body = ErrorBody),
    ))]
async fn create_job(
    State(state): State<AppState>,
    ApiJson(spec): ApiJson<JobSpec>,
) -> ApiResult<(StatusCode, Json<Job>)> {
    Ok((StatusCode::CREATED, Json(state.bus().create_job(spec).await?)))
}

/// Lists the jobs.
#[utoipa::path(get, path = "/v1/jobs", tag = "jobs",
    responses((status = 200, description = "Every job with its next run and run count", body = Jobs)))]
async fn list_jobs(State(state): State<AppState>) -> ApiResult<Json<Jobs>> {
    Ok(Json(Jobs { jobs: state.bus().list_jobs().await? }))
}

/// One job.
#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, description = "The job id")),
    responses(
        (status = 200, description = "The job", body = Object),
        (status = 404, description = "`JOB_NOT_FOUND`", body = ErrorBody),
    ))]
async fn get_job(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> ApiResult<Json<Job>> {
    Ok(Json(state.bus().get_job(&id).await.map_err(not_found)?))
}

/// Deletes a job and its runs.
#[utoipa::path(delete, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, description = "The job id")),
    responses(
        (status = 200, description = "Deleted", body = Object),
        (status = 404, description = "`JOB_NOT_FOUND`", body = ErrorBody),
    ))]
async fn delete_job(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<serde_json::Value>> {
    state.bus().delete_job(&id).await.map_err(not_found)?;
    Ok(Json(serde_json::json!({ "deleted": "job", "id": id })))
}

/// Pauses a job.
#[utoipa::path(post, path = "/v1/jobs/{id}/pause", tag = "jobs",
    params(("id" = String, Path, description = "The job id")),
    responses(
        (status = 200, description = "The paused job", body = Object),
        (status = 404, description = "`JOB_NOT_FOUND`", body = ErrorBody),
    ))]
async fn pause_job(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> ApiResult<Json<Job>> {
    Ok(Json(state.bus().pause_job(&id).await.map_err(not_found)?))
}

/// Resumes a paused job.
#[utoipa::path(post, path = "/v1/jobs/{id}/resume", tag = "jobs",
    params(("id" = String, Path, description = "The job id")),
    responses(
        (status = 200, description = "The resumed job", body = Object),
        (status = 404, description = "`JOB_NOT_FOUND`", body = ErrorBody),
    ))]
async fn resume_job(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> ApiResult<Json<Job>> {
    Ok(Json(state.bus().resume_job(&id).await.map_err(not_found)?))
}

/// A job's runs.
#[utoipa::path(get, path = "/v1/jobs/{id}/runs", tag = "jobs",
    params(("id" = String, Path, description = "The job id")),
    responses(
        (status = 200, description = "The runs, oldest first", body = Runs),
        (status = 404, description = "`JOB_NOT_FOUND`", body = ErrorBody),
    ))]
async fn job_runs(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> ApiResult<Json<Runs>> {
    Ok(Json(Runs { runs: state.bus().job_runs(&id).await.map_err(not_found)? }))
}

/// Queues a failed run to be published again.
#[utoipa::path(post, path = "/v1/jobs/{id}/runs/{run}/retry", tag = "jobs",
    params(
        ("id" = String, Path, description = "The job id"),
        ("run" = u64, Path, description = "The run number"),
    ),
    responses(
        (status = 200, description = "The run, queued", body = Object),
        (status = 400, description = "`VALIDATION_FAILED`: the run did not fail", body = ErrorBody),
        (status = 404, description = "`RUN_NOT_FOUND`", body = ErrorBody),
    ))]
async fn retry_run(
    State(state): State<AppState>,
    ApiPath((id, run)): ApiPath<(String, u64)>,
) -> ApiResult<Json<Run>> {
    Ok(Json(state.bus().retry_run(&id, run).await.map_err(not_found)?))
}
