//! Brokers and topics: `/v1/brokers…` and `/v1/topics…`, validated like the CLI's files.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use polybus::{Broker, BrokerPatch, BrokerType, Topic, TopicPatch};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery, ApiResult, ErrorBody};
use crate::schema;
use crate::state::AppState;

/// The registry routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_broker, list_brokers))
        .routes(routes!(get_broker, update_broker, delete_broker))
        .routes(routes!(test_broker))
        .routes(routes!(create_topic, list_topics))
        .routes(routes!(get_topic, update_topic, delete_topic))
}

/// What a delete answers.
#[derive(Debug, Serialize, ToSchema)]
pub struct Deleted {
    /// `broker` or `topic`.
    deleted: &'static str,
    /// The tag or event deleted.
    tag: String,
}

/// Creates a broker.
#[utoipa::path(post, path = "/v1/brokers", tag = "brokers",
    request_body(content = schema::Broker, description = "The broker definition, as in a `broker.yaml`"),
    responses(
        (status = 201, description = "Created (secrets redacted)", body = schema::Broker),
        (status = 400, description = "Invalid definition (`VALIDATION_FAILED` names the env and field; files only inside the data folder) or bad JSON", body = ErrorBody),
        (status = 409, description = "A broker with this tag exists (`ALREADY_EXISTS`)", body = ErrorBody),
    ))]
async fn create_broker(
    State(state): State<AppState>,
    ApiJson(doc): ApiJson<Value>,
) -> ApiResult<(StatusCode, Json<Broker>)> {
    let broker = Broker::from_value(doc)?;
    state.bus().secrets().check_broker(&broker).await?;
    state.bus().files().check_broker(&broker).await?;
    let created = state.registry().create_broker(broker).await?;
    Ok((StatusCode::CREATED, Json(created.redacted())))
}

/// Lists the brokers.
#[utoipa::path(get, path = "/v1/brokers", tag = "brokers",
    responses((status = 200, description = "Every broker, ordered by tag (secrets redacted)", body = Vec<schema::Broker>)))]
async fn list_brokers(State(state): State<AppState>) -> ApiResult<Json<Vec<Broker>>> {
    Ok(Json(state.registry().fetch_brokers().await?.iter().map(Broker::redacted).collect()))
}

/// Shows a broker.
#[utoipa::path(get, path = "/v1/brokers/{tag}", tag = "brokers",
    params(("tag" = String, Path, description = "The broker's tag")),
    responses(
        (status = 200, description = "The broker (secrets redacted)", body = schema::Broker),
        (status = 404, description = "`BROKER_NOT_FOUND`", body = ErrorBody),
    ))]
async fn get_broker(State(state): State<AppState>, ApiPath(tag): ApiPath<String>) -> ApiResult<Json<Broker>> {
    Ok(Json(state.registry().fetch_broker(&tag).await?.redacted()))
}

/// Updates a broker with a patch.
#[utoipa::path(patch, path = "/v1/brokers/{tag}", tag = "brokers",
    params(("tag" = String, Path, description = "The broker's tag")),
    request_body(content = schema::BrokerPatch),
    responses(
        (status = 200, description = "The updated broker (secrets redacted)", body = schema::Broker),
        (status = 400, description = "Invalid patch", body = ErrorBody),
        (status = 404, description = "`BROKER_NOT_FOUND`", body = ErrorBody),
        (status = 409, description = "`CONFLICT`: the patch's `version` is stale", body = ErrorBody),
    ))]
async fn update_broker(
    State(state): State<AppState>,
    ApiPath(tag): ApiPath<String>,
    ApiJson(doc): ApiJson<Value>,
) -> ApiResult<Json<Broker>> {
    let patch = BrokerPatch::from_value(doc)?;
    state.bus().secrets().check_envs(&patch.envs).await?;
    state.bus().files().check_envs(&patch.envs).await?;
    Ok(Json(state.registry().update_broker(&tag, patch).await?.redacted()))
}

/// Options of a broker delete.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct DeleteBroker {
    /// Also delete the broker's topics.
    #[serde(default)]
    force: bool,
}

/// Deletes a broker.
#[utoipa::path(delete, path = "/v1/brokers/{tag}", tag = "brokers",
    params(("tag" = String, Path, description = "The broker's tag"), DeleteBroker),
    responses(
        (status = 200, description = "Deleted", body = Deleted),
        (status = 404, description = "`BROKER_NOT_FOUND`", body = ErrorBody),
        (status = 409, description = "`IN_USE`: the broker has topics and `force` is not set", body = ErrorBody),
    ))]
async fn delete_broker(
    State(state): State<AppState>,
    ApiPath(tag): ApiPath<String>,
    ApiQuery(options): ApiQuery<DeleteBroker>,
) -> ApiResult<Json<Deleted>> {
    state.registry().delete_broker(&tag, options.force).await?;
    Ok(Json(Deleted { deleted: "broker", tag }))
}

/// Which env to test.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct TestEnv {
    /// The env slug.
    env: String,
}

/// The outcome of a connection test.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TestResult {
    /// Broker tag.
    broker: String,
    /// Env slug.
    env: String,
    /// Broker type of the env.
    #[serde(rename = "type")]
    #[schema(value_type = schema::BrokerType)]
    broker_type: BrokerType,
    /// Always true (a failed test is an error response).
    ok: bool,
    /// Time to connect and ping, in milliseconds.
    latency_ms: f64,
}

/// Connects to a broker env afresh and pings it.
#[utoipa::path(post, path = "/v1/brokers/{tag}/test", tag = "brokers",
    params(("tag" = String, Path, description = "The broker's tag"), TestEnv),
    responses(
        (status = 200, description = "The broker answered", body = TestResult),
        (status = 404, description = "`BROKER_NOT_FOUND` or `BROKER_ENV_NOT_FOUND`", body = ErrorBody),
        (status = 502, description = "`CONNECT_FAILED`: the broker did not answer", body = ErrorBody),
    ))]
async fn test_broker(
    State(state): State<AppState>,
    ApiPath(tag): ApiPath<String>,
    ApiQuery(TestEnv { env }): ApiQuery<TestEnv>,
) -> ApiResult<Json<TestResult>> {
    let broker = state.registry().fetch_broker(&tag).await?;
    let broker_type =
        broker.env(&env).map(|e| e.broker_type.clone()).ok_or_else(|| polybus::Error::BrokerEnvNotFound {
            tag: tag.clone(),
            env: env.clone(),
            available: broker.env_slugs(),
        })?;
    let result = state.bus().test_connection(&tag, &env).await;
    state.metrics().connection(&tag, &env, result.as_ref().map(|_| ()));
    let latency: Duration = result?;
    let millis = latency.as_secs_f64() * 1000.0;
    Ok(Json(TestResult {
        broker: tag,
        env,
        broker_type,
        ok: true,
        latency_ms: (millis * 1000.0).round() / 1000.0,
    }))
}

/// Creates a topic.
#[utoipa::path(post, path = "/v1/topics", tag = "topics",
    request_body(content = schema::Topic, description = "The topic definition, as in a `topic.yaml`"),
    responses(
        (status = 201, description = "Created", body = schema::Topic),
        (status = 400, description = "Invalid definition or bad JSON", body = ErrorBody),
        (status = 404, description = "`BROKER_NOT_FOUND`: the event's broker does not exist", body = ErrorBody),
        (status = 409, description = "`ALREADY_EXISTS`", body = ErrorBody),
    ))]
async fn create_topic(
    State(state): State<AppState>,
    ApiJson(doc): ApiJson<Value>,
) -> ApiResult<(StatusCode, Json<Topic>)> {
    let topic = Topic::from_value(doc)?;
    Ok((StatusCode::CREATED, Json(state.registry().create_topic(topic).await?)))
}

/// Which topics to list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ListTopics {
    /// Only the topics of this broker.
    broker: Option<String>,
}

/// Lists the topics, of every broker or of one.
#[utoipa::path(get, path = "/v1/topics", tag = "topics", params(ListTopics),
    responses(
        (status = 200, description = "The topics, ordered by event", body = Vec<schema::Topic>),
        (status = 404, description = "`BROKER_NOT_FOUND`", body = ErrorBody),
    ))]
async fn list_topics(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<ListTopics>,
) -> ApiResult<Json<Vec<Topic>>> {
    Ok(Json(state.registry().fetch_topics(query.broker.as_deref()).await?))
}

/// Shows a topic and the native names it maps to in each env.
#[utoipa::path(get, path = "/v1/topics/{event}", tag = "topics",
    params(("event" = String, Path, description = "The event, `broker-tag:topic-tag`")),
    responses(
        (status = 200, description = "The topic with `nativeNames`", body = schema::TopicDetail),
        (status = 400, description = "`VALIDATION_FAILED`: not an event", body = ErrorBody),
        (status = 404, description = "`TOPIC_NOT_FOUND`", body = ErrorBody),
    ))]
async fn get_topic(State(state): State<AppState>, ApiPath(event): ApiPath<String>) -> ApiResult<Json<Value>> {
    let topic = state.registry().fetch_topic(&event).await?;
    let broker = state.registry().fetch_broker(&topic.event()?.broker).await?;
    let mut names = Vec::with_capacity(broker.envs.len());
    for env in &broker.envs {
        let spec = topic.spec(&env.slug)?;
        names.push(json!({
            "env": env.slug,
            "type": env.broker_type,
            "nativeName": spec.native_name,
            "deadLetter": spec.dead_letter,
        }));
    }
    let mut value = serde_json::to_value(&topic)
        .map_err(|e| ApiError::from(polybus::Error::Storage(format!("cannot encode topic: {e}"))))?;
    if let Value::Object(map) = &mut value {
        map.insert("nativeNames".into(), Value::Array(names));
    }
    Ok(Json(value))
}

/// Updates a topic with a patch.
#[utoipa::path(patch, path = "/v1/topics/{event}", tag = "topics",
    params(("event" = String, Path, description = "The event, `broker-tag:topic-tag`")),
    request_body(content = schema::TopicPatch),
    responses(
        (status = 200, description = "The updated topic", body = schema::Topic),
        (status = 400, description = "Invalid patch", body = ErrorBody),
        (status = 404, description = "`TOPIC_NOT_FOUND`", body = ErrorBody),
        (status = 409, description = "`CONFLICT`: the patch's `version` is stale", body = ErrorBody),
    ))]
async fn update_topic(
    State(state): State<AppState>,
    ApiPath(event): ApiPath<String>,
    ApiJson(doc): ApiJson<Value>,
) -> ApiResult<Json<Topic>> {
    let patch = TopicPatch::from_value(doc)?;
    Ok(Json(state.registry().update_topic(&event, patch).await?))
}

/// Deletes a topic.
#[utoipa::path(delete, path = "/v1/topics/{event}", tag = "topics",
    params(("event" = String, Path, description = "The event, `broker-tag:topic-tag`")),
    responses(
        (status = 200, description = "Deleted", body = Deleted),
        (status = 404, description = "`TOPIC_NOT_FOUND`", body = ErrorBody),
    ))]
async fn delete_topic(
    State(state): State<AppState>,
    ApiPath(event): ApiPath<String>,
) -> ApiResult<Json<Deleted>> {
    state.registry().delete_topic(&event).await?;
    Ok(Json(Deleted { deleted: "topic", tag: event }))
}
