//! The routes, assembled with their OpenAPI document, auth, limits, metrics and tracing.

pub mod consume;
pub mod deadletters;
pub mod groups;
pub mod idempotency;
pub mod jobs;
pub mod messages;
pub mod ops;
pub mod registry;
pub mod replay;
pub mod secrets;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Router};
use futures::StreamExt;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;

use crate::error::ApiError;
use crate::state::AppState;
use crate::{auth, dashboard};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "polybus",
        description = "One interface for every message broker, chosen per environment: the registry of brokers and \
            topics, publishing, and consuming over Server-Sent Events or pull requests with leases. Every route \
            but `/`, `/healthz` and `/readyz` needs `Authorization: Bearer <key>` (`polybus key create`); read-only \
            keys cannot create, change, delete, publish, consume or ack. Errors are `{\"error\": {\"code\", \
            \"message\", \"field\"?, \"env\"?}}` with the CLI's codes."
    ),
    modifiers(&BearerAuth),
    security(("apiKey" = [])),
    tags(
        (name = "brokers", description = "Broker definitions"),
        (name = "topics", description = "Topics, addressed as events `broker-tag:topic-tag`"),
        (name = "secrets", description = "Secrets for `$Secret{name}` references: written, listed by name, never read back"),
        (name = "messages", description = "Publishing"),
        (name = "consume", description = "Consuming with leases: SSE stream or pull, then ack"),
        (name = "groups", description = "Consumer groups with members, pending, lag and oldest unacked age"),
        (name = "replay", description = "Replay a group and read stored messages, on brokers that retain them"),
        (name = "jobs", description = "Scheduled publishing: at a time, every interval, on a cron schedule or per message of another event"),
        (name = "operations", description = "Health, readiness, metrics, this document"),
        (name = "dashboard", description = "The web dashboard"),
    )
)]
struct ApiDoc;

/// Declares the `Authorization: Bearer <key>` scheme.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme("apiKey", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
    }
}

/// The routes with their OpenAPI description, before auth and layers.
fn routes(state: &AppState) -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(registry::router())
        .merge(secrets::router())
        .merge(messages::router())
        .merge(consume::router())
        .merge(deadletters::router())
        .merge(groups::router())
        .merge(idempotency::router())
        .merge(replay::router())
        .merge(jobs::router())
        .merge(ops::protected())
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require_key))
        .merge(ops::public())
        .merge(dashboard::router())
}

/// The OpenAPI document of every route.
pub fn openapi(state: &AppState) -> serde_json::Value {
    with_definition_schemas(routes(state).into_openapi(), state)
}

/// `doc` as JSON, the schemas of broker and topic documents derived from the definition types
/// and the connectors of `state`'s bus (the route annotations name them, [`crate::schema`]).
fn with_definition_schemas(doc: utoipa::openapi::OpenApi, state: &AppState) -> serde_json::Value {
    let mut doc = serde_json::to_value(doc).unwrap_or_default();
    if let Some(serde_json::Value::Object(schemas)) = doc.pointer_mut("/components/schemas") {
        schemas.extend(polybus::core::schema::openapi_components(state.bus().kinds()));
    }
    doc
}

/// The whole application.
pub fn router(state: AppState) -> Router {
    let (router, doc) = routes(&state).split_for_parts();
    let doc = serde_json::to_string_pretty(&with_definition_schemas(doc, &state))
        .unwrap_or_else(|e| format!("{{\"error\": \"cannot render the document: {e}\"}}"));
    router
        .layer(Extension(ops::OpenApiJson(Arc::new(doc))))
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.body_limit()))
        .layer(middleware::from_fn_with_state(state.clone(), refuse_oversized))
        .layer(middleware::from_fn_with_state(state.clone(), count_requests))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|request: &Request| {
                    // The path only: a dashboard URL may carry a key in its query.
                    let span = tracing::info_span!("request", otel.kind = "server", method = %request.method(), path = %request.uri().path(), key = tracing::field::Empty);
                    // A caller's W3C trace context makes this request (and what it publishes) part of its trace.
                    let header = |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok());
                    polybus::telemetry::continue_trace(&span, header("traceparent"), header("tracestate"));
                    span
                })
                .on_response(DefaultOnResponse::new().level(tracing::Level::INFO)),
        )
        .layer(CatchPanicLayer::custom(|_: Box<dyn std::any::Any + Send>| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", "the server failed on this request; it is logged")
                .into_response()
        }))
        .with_state(state)
}

/// Most bytes of an oversized body read (and dropped) before answering 413.
const MAX_DRAINED: u64 = 64 * 1024 * 1024;
/// Longest an oversized body is read before answering 413.
const DRAIN_FOR: Duration = Duration::from_secs(10);

/// Answers `413 PAYLOAD_TOO_LARGE` to a body whose declared length is over the limit, after
/// reading what the client sends (up to [`MAX_DRAINED`]): a client still writing when the
/// server closes the connection sees only a broken pipe, never the answer.
async fn refuse_oversized(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let limit = state.body_limit();
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let Some(declared) = declared.filter(|n| *n > limit as u64) else {
        return next.run(request).await;
    };
    if declared <= MAX_DRAINED {
        let mut body = request.into_body().into_data_stream();
        let drained = tokio::time::timeout(DRAIN_FOR, async { while let Some(Ok(_)) = body.next().await {} });
        if drained.await.is_err() {
            tracing::debug!(declared, "an oversized request body kept coming; answering 413 now");
        }
    }
    ApiError::too_large(limit).into_response()
}

async fn no_route(request: Request) -> ApiError {
    ApiError::no_route(request.uri().path())
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "METHOD_NOT_ALLOWED",
        format!("{} is not allowed on `{}`; see /v1/openapi.json", request.method(), request.uri().path()),
    )
}

/// Counts each answered request by method, route and status.
async fn count_requests(State(state): State<AppState>, request: Request, next: Next) -> Response {
    // Methods outside the standard ones are counted together: label values stay few.
    let method = match *request.method() {
        Method::GET
        | Method::HEAD
        | Method::POST
        | Method::PUT
        | Method::PATCH
        | Method::DELETE
        | Method::OPTIONS => request.method().to_string(),
        _ => "OTHER".to_owned(),
    };
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", MatchedPath::as_str).to_owned();
    let response = next.run(request).await;
    state.metrics().http_request(&method, &route, response.status().as_u16());
    response
}
