//! Operations: `/healthz`, `/readyz`, `/metrics`, `/v1/stats`, `/v1/openapi.json` and the JSON
//! Schemas of definitions, `/v1/schema/broker` and `/v1/schema/topic`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::{Extension, Json};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiResult, ErrorBody};
use crate::metrics::Stats;
use crate::state::AppState;

/// Routes that need an API key.
pub fn protected() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(metrics))
        .routes(routes!(stats))
        .routes(routes!(openapi))
        .routes(routes!(broker_schema))
        .routes(routes!(topic_schema))
}

/// Routes open to anyone: liveness and readiness.
pub fn public() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(healthz)).routes(routes!(readyz))
}

/// The OpenAPI document, rendered once when the router is built.
#[derive(Clone)]
pub struct OpenApiJson(pub Arc<String>);

/// A health answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok` or `ready`.
    status: &'static str,
}

/// Liveness: the process answers. Needs no key.
#[utoipa::path(get, path = "/healthz", tag = "operations", security(()),
    responses((status = 200, description = "The process is up", body = Health)))]
async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// Readiness: the registry answers. Needs no key.
#[utoipa::path(get, path = "/readyz", tag = "operations", security(()),
    responses(
        (status = 200, description = "The registry is reachable", body = Health),
        (status = 503, description = "`STORAGE_FAILED`: the registry is not reachable", body = ErrorBody),
    ))]
async fn readyz(State(state): State<AppState>) -> ApiResult<Json<Health>> {
    state.registry().ping().await?;
    Ok(Json(Health { status: "ready" }))
}

/// Prometheus metrics: per broker, env and topic counters of published, delivered, acked,
/// nacked and dead-lettered messages, publish latency, connection state, HTTP requests; per group
/// lag, pending, members and oldest unacked age of topics with recent traffic.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format 0.0.4", content_type = "text/plain", body = String)))]
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    state.metrics().set_leases(state.leases().len());
    state.metrics().refresh_groups(state.bus()).await;
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics().render())
}

/// The same counters as JSON, per topic and env (what the dashboard polls).
#[utoipa::path(get, path = "/v1/stats", tag = "operations",
    responses((status = 200, description = "Counters since the server started", body = Stats)))]
async fn stats(State(state): State<AppState>) -> Json<Stats> {
    state.metrics().set_leases(state.leases().len());
    Json(state.metrics().stats())
}

/// This API's OpenAPI document.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "operations",
    responses((status = 200, description = "OpenAPI 3 document", content_type = "application/json", body = Object)))]
async fn openapi(Extension(doc): Extension<OpenApiJson>) -> impl IntoResponse {
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], doc.0.as_str().to_owned())
}

/// The JSON Schema (draft 2020-12) of broker definitions: each env's `config` as the connector
/// of its type describes it, for the types this server has connectors for.
#[utoipa::path(get, path = "/v1/schema/broker", tag = "operations",
    responses((status = 200, description = "JSON Schema of a broker definition", body = Object)))]
async fn broker_schema(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(polybus::core::schema::broker(state.bus().kinds()))
}

/// The JSON Schema (draft 2020-12) of topic definitions.
#[utoipa::path(get, path = "/v1/schema/topic", tag = "operations",
    responses((status = 200, description = "JSON Schema of a topic definition", body = Object)))]
async fn topic_schema() -> Json<serde_json::Value> {
    Json(polybus::core::schema::topic())
}
