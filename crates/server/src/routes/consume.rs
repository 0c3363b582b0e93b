//! Consuming over HTTP: a Server-Sent Events stream, or pull requests; both hand out
//! deliveries under lease ids that `…/ack` settles. An unsettled lease expires and its message
//! is redelivered, so a client that drops mid-stream loses nothing.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::{Extension, Json};
use futures::Stream;
use polybus::{Delivery, SubscribeOptions, Subscriber};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{
    ApiError, ApiJson, ApiJsonOrDefault, ApiPath, ApiQuery, ApiResult, ErrorBody, ErrorDetail,
};
use crate::keys::{Caller, KeyWatch};
use crate::leases::{self, Granted, Puller, Scope, Settle};
use crate::metrics::TopicLabels;
use crate::routes::messages::{MAX_DELAY_MS, MessageOut};
use crate::state::AppState;

/// Ack deadline when none is asked for.
const DEFAULT_ACK_DEADLINE_MS: u64 = 30_000;
/// Shortest and longest ack deadline.
const ACK_DEADLINE_MS: (u64, u64) = (100, 600_000);
/// Most messages in one pull.
const MAX_PULL: usize = 256;
/// Longest a pull waits for its first message.
const MAX_WAIT_MS: u64 = 30_000;
/// Once a pull has a message, how long it waits for more.
const GATHER: Duration = Duration::from_millis(20);
/// Unsettled deliveries a pull member holds.
const PULL_PREFETCH: usize = MAX_PULL;
/// Most unsettled deliveries of one stream.
const MAX_PREFETCH: usize = 1000;
/// Most leases in one ack request.
const MAX_ACK: usize = 1000;

/// The consume routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(stream)).routes(routes!(pull)).routes(routes!(ack))
}

/// The path of a subscription: env, event and group.
type SubscriptionPath = (String, String, String);

fn scope_of((env, event, group): SubscriptionPath) -> ApiResult<(Scope, TopicLabels)> {
    let parsed: polybus::EventRef = event.parse()?;
    polybus::core::tag::check_tag(&group).map_err(|e| ApiError::invalid("group", e))?;
    let labels = TopicLabels { broker: parsed.broker, env: env.clone(), topic: parsed.topic };
    Ok((Scope { env, event, group }, labels))
}

fn ack_deadline(ms: Option<u64>) -> ApiResult<Duration> {
    let ms = ms.unwrap_or(DEFAULT_ACK_DEADLINE_MS);
    let (least, most) = ACK_DEADLINE_MS;
    if !(least..=most).contains(&ms) {
        return Err(ApiError::invalid("ackDeadlineMs", format!("must be {least} to {most}, not {ms}")));
    }
    Ok(Duration::from_millis(ms))
}

/// The broker-side deadline: longer than the lease, so the server's expiry (a nack) comes first,
/// and a message that waited in a prefetch buffer still has a full lease left when handed out.
fn broker_deadline(lease: Duration) -> Duration {
    lease * 2 + Duration::from_secs(1)
}

fn options(scope: &Scope, prefetch: usize, lease: Duration) -> SubscribeOptions {
    let mut options = SubscribeOptions::new(scope.group.as_str());
    options.prefetch = prefetch;
    options.ack_deadline = broker_deadline(lease);
    options
}

async fn subscribe(
    state: &AppState,
    scope: &Scope,
    labels: &TopicLabels,
    options: SubscribeOptions,
) -> ApiResult<Subscriber> {
    let result = state.bus().subscribe(&scope.env, &scope.event, options).await;
    state.metrics().connection_outcome(&labels.broker, &scope.env, &result);
    Ok(result?)
}

/// Leases `delivery` to `caller` and returns its JSON form.
fn lease(
    state: &AppState,
    delivery: Delivery,
    (scope, labels): (&Scope, &TopicLabels),
    caller: &Caller,
    deadline: Duration,
) -> MessageOut {
    let granted = Granted::new(deadline);
    let out = MessageOut::new(&delivery, &granted);
    state.leases().hold(&granted, delivery, scope, labels, &caller.fingerprint);
    state.metrics().delivered(labels);
    out
}

/// Options of an event stream.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query, rename_all = "camelCase")]
struct StreamQuery {
    /// Milliseconds a client has to ack each message before it is redelivered (100 to 600000, default 30000).
    ack_deadline_ms: Option<u64>,
    /// Most unacked messages the stream holds out; it pauses until some are acked (1 to 1000, default 32).
    prefetch: Option<usize>,
}

struct Streaming {
    state: AppState,
    subscriber: Subscriber,
    scope: Scope,
    labels: TopicLabels,
    deadline: Duration,
    caller: Caller,
    /// Ends the stream when the caller's key is revoked.
    key: KeyWatch,
}

/// Streams the group's messages as Server-Sent Events.
///
/// Each `message` event's data is a message with its `leaseId` (also the event's `id`); settle
/// it with `POST …/ack` before `leaseExpiresAt` or it is redelivered. A broker failure ends the
/// stream with an `error` event carrying `{ "error": {…} }`; reconnect to go on. Revoking the
/// key the stream was opened with ends it within a second, with an `UNAUTHORIZED` `error` event.
#[utoipa::path(get, path = "/v1/envs/{env}/events/{event}/subscriptions/{group}/stream", tag = "consume",
    params(
        ("env" = String, Path, description = "The env slug"),
        ("event" = String, Path, description = "The event, `broker-tag:topic-tag`"),
        ("group" = String, Path, description = "Consumer group; members of a group share its messages"),
        StreamQuery,
    ),
    responses(
        (status = 200, description = "`text/event-stream` of `message` events (data: a message with its lease)", content_type = "text/event-stream", body = MessageOut),
        (status = 400, description = "`VALIDATION_FAILED`", body = ErrorBody),
        (status = 404, description = "`TOPIC_NOT_FOUND`, `BROKER_NOT_FOUND` or `BROKER_ENV_NOT_FOUND`", body = ErrorBody),
        (status = 502, description = "`SUBSCRIBE_FAILED` or `CONNECT_FAILED`", body = ErrorBody),
    ))]
async fn stream(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(path): ApiPath<SubscriptionPath>,
    ApiQuery(query): ApiQuery<StreamQuery>,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let (scope, labels) = scope_of(path)?;
    let deadline = ack_deadline(query.ack_deadline_ms)?;
    let prefetch = query.prefetch.unwrap_or(32);
    if !(1..=MAX_PREFETCH).contains(&prefetch) {
        return Err(ApiError::invalid("prefetch", format!("must be 1 to {MAX_PREFETCH}, not {prefetch}")));
    }
    let subscriber = subscribe(&state, &scope, &labels, options(&scope, prefetch, deadline)).await?;
    tracing::debug!(env = scope.env, event = scope.event, group = scope.group, "event stream opened");
    let key = state.keys().watch(&caller.fingerprint);
    let streaming = Streaming { state, subscriber, scope, labels, deadline, caller, key };
    let events = futures::stream::unfold(Some(streaming), |streaming| async move {
        let mut s = streaming?;
        let next = tokio::select! {
            _ = s.state.shutting_down() => None,
            _ = s.key.revoked() => {
                tracing::info!(key = s.caller.name, event = s.scope.event, "API key revoked: event stream closed");
                close_quietly(&mut s.subscriber).await;
                let error = ApiError::unauthorized(format!("API key `{}` was revoked", s.caller.name));
                let event = Event::default().event("error").json_data(ErrorBody { error: error.detail().clone() });
                return Some((Ok(event.unwrap_or_else(|_| error_event("API key revoked"))), None));
            }
            next = s.subscriber.next() => next,
        };
        match next {
            Some(Ok(delivery)) => {
                let out = lease(&s.state, delivery, (&s.scope, &s.labels), &s.caller, s.deadline);
                let event = Event::default().event("message").id(out.lease_id.clone());
                let event = event
                    .json_data(&out)
                    .unwrap_or_else(|e| error_event(&format!("cannot encode message: {e}")));
                Some((Ok(event), Some(s)))
            }
            Some(Err(e)) => {
                s.state.metrics().connection_error(&s.labels.broker, &s.scope.env, &e);
                let detail = ApiError::from(e).detail().clone();
                let event = Event::default().event("error").json_data(ErrorBody { error: detail });
                Some((Ok(event.unwrap_or_else(|_| error_event("receive failed"))), None))
            }
            None => {
                close_quietly(&mut s.subscriber).await;
                None
            }
        }
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

async fn close_quietly(subscriber: &mut Subscriber) {
    if let Err(e) = subscriber.close().await {
        tracing::debug!(error = %e, "closing an event stream's subscription");
    }
}

fn error_event(message: &str) -> Event {
    Event::default().event("error").data(message.replace('\n', " "))
}

/// A pull request; every field is optional (an empty body takes the defaults).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PullRequest {
    /// Most messages to return (1 to 256, default 10).
    max: Option<usize>,
    /// Milliseconds to ack each message before it is redelivered (100 to 600000, default 30000).
    ack_deadline_ms: Option<u64>,
    /// Milliseconds to wait for a first message when none is ready (0 to 30000, default 1000).
    wait_ms: Option<u64>,
}

/// Pulled messages.
#[derive(Debug, Serialize, ToSchema)]
pub struct Pulled {
    /// The messages, each with its lease; empty when none came within `waitMs`.
    messages: Vec<MessageOut>,
}

/// Takes up to `max` messages for the group, each under a lease.
#[utoipa::path(post, path = "/v1/envs/{env}/events/{event}/subscriptions/{group}/pull", tag = "consume",
    params(
        ("env" = String, Path, description = "The env slug"),
        ("event" = String, Path, description = "The event, `broker-tag:topic-tag`"),
        ("group" = String, Path, description = "Consumer group"),
    ),
    request_body(content = PullRequest),
    responses(
        (status = 200, description = "Up to `max` messages with their leases", body = Pulled),
        (status = 400, description = "`VALIDATION_FAILED`", body = ErrorBody),
        (status = 404, description = "`TOPIC_NOT_FOUND`, `BROKER_NOT_FOUND` or `BROKER_ENV_NOT_FOUND`", body = ErrorBody),
        (status = 502, description = "`SUBSCRIBE_FAILED` or `CONNECT_FAILED`", body = ErrorBody),
    ))]
async fn pull(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(path): ApiPath<SubscriptionPath>,
    ApiJsonOrDefault(request): ApiJsonOrDefault<PullRequest>,
) -> ApiResult<Json<Pulled>> {
    let (scope, labels) = scope_of(path)?;
    let deadline = ack_deadline(request.ack_deadline_ms)?;
    let max = request.max.unwrap_or(10);
    if !(1..=MAX_PULL).contains(&max) {
        return Err(ApiError::invalid("max", format!("must be 1 to {MAX_PULL}, not {max}")));
    }
    let wait_ms = request.wait_ms.unwrap_or(1000);
    if wait_ms > MAX_WAIT_MS {
        return Err(ApiError::invalid("waitMs", format!("must be 0 to {MAX_WAIT_MS}, not {wait_ms}")));
    }
    let until = Instant::now() + Duration::from_millis(wait_ms);
    let key = (scope.clone(), deadline.as_millis() as u64);
    let puller = match state.leases().puller(&key) {
        Some(puller) => puller,
        None => {
            let subscriber =
                subscribe(&state, &scope, &labels, options(&scope, PULL_PREFETCH, deadline)).await?;
            let (kept, spare) = state.leases().keep_puller(key.clone(), Arc::new(Puller::new(subscriber)));
            if let Some(spare) = spare {
                leases::close_pullers(vec![spare]).await;
            }
            kept
        }
    };
    puller.touch();
    let mut messages = Vec::new();
    let Ok(mut subscriber) = tokio::time::timeout_at(until, puller.subscriber.lock()).await else {
        return Ok(Json(Pulled { messages }));
    };
    // The first message is awaited until `until` (`next` is cancel-safe), the rest taken
    // together: what is ready, and what comes within GATHER.
    let first = match tokio::time::timeout_at(until, subscriber.next()).await {
        Err(_) => None,
        Ok(None) => {
            state.leases().drop_puller(&key, &puller);
            None
        }
        Ok(Some(Err(e))) => {
            state.leases().drop_puller(&key, &puller);
            state.metrics().connection_error(&labels.broker, &scope.env, &e);
            return Err(e.into());
        }
        Ok(Some(Ok(delivery))) => Some(delivery),
    };
    if let Some(first) = first {
        messages.push(lease(&state, first, (&scope, &labels), &caller, deadline));
        match subscriber.next_ready(max - 1, GATHER).await {
            Ok(more) => messages
                .extend(more.into_iter().map(|d| lease(&state, d, (&scope, &labels), &caller, deadline))),
            Err(e) => {
                state.leases().drop_puller(&key, &puller);
                state.metrics().connection_error(&labels.broker, &scope.env, &e);
                tracing::warn!(error = %e, "pull member failed after handing out messages");
            }
        }
    }
    drop(subscriber);
    puller.touch();
    Ok(Json(Pulled { messages }))
}

/// Settles leased messages.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AckRequest {
    /// The leases to settle (1 to 1000).
    lease_ids: Vec<String>,
    /// Nack instead of ack: redeliver (after `delayMs`), or dead-letter on the last attempt.
    #[serde(default)]
    nack: bool,
    /// With `nack`: redeliver no earlier than this many milliseconds from now (at most 30 days).
    delay_ms: Option<u64>,
    /// Send the messages to the topic's dead-letter destination now.
    #[serde(default)]
    dead_letter: bool,
    /// With `deadLetter`: why (kept in the dead letter's headers).
    reason: Option<String>,
}

/// A lease that could not be settled.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AckFailure {
    /// The lease.
    lease_id: String,
    /// Why: `LEASE_NOT_FOUND` (settled already, expired and redelivered, or granted by another
    /// server, or to another key: a lease is settled only by the key that took it), `LEASE_LOST`,
    /// or a broker failure.
    error: ErrorDetail,
}

/// What an ack request did.
#[derive(Debug, Serialize, ToSchema)]
pub struct AckResult {
    /// Leases settled.
    settled: Vec<String>,
    /// Leases not settled; their messages are redelivered.
    failed: Vec<AckFailure>,
}

/// Acks, nacks or dead-letters leased messages.
#[utoipa::path(post, path = "/v1/envs/{env}/events/{event}/subscriptions/{group}/ack", tag = "consume",
    params(
        ("env" = String, Path, description = "The env slug"),
        ("event" = String, Path, description = "The event, `broker-tag:topic-tag`"),
        ("group" = String, Path, description = "Consumer group"),
    ),
    request_body(content = AckRequest),
    responses(
        (status = 200, description = "Which leases were settled and which not", body = AckResult),
        (status = 400, description = "`VALIDATION_FAILED`", body = ErrorBody),
    ))]
async fn ack(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(path): ApiPath<SubscriptionPath>,
    ApiJson(request): ApiJson<AckRequest>,
) -> ApiResult<Json<AckResult>> {
    let (scope, _) = scope_of(path)?;
    if request.lease_ids.is_empty() || request.lease_ids.len() > MAX_ACK {
        return Err(ApiError::invalid(
            "leaseIds",
            format!("must hold 1 to {MAX_ACK} lease ids, not {}", request.lease_ids.len()),
        ));
    }
    if request.nack && request.dead_letter {
        return Err(ApiError::invalid("deadLetter", "cannot be set together with `nack`"));
    }
    if request.delay_ms.is_some() && !request.nack {
        return Err(ApiError::invalid("delayMs", "is only for `nack`"));
    }
    if let Some(ms) = request.delay_ms.filter(|ms| *ms > MAX_DELAY_MS) {
        return Err(ApiError::invalid(
            "delayMs",
            format!("must be at most {MAX_DELAY_MS} (30 days), not {ms}"),
        ));
    }
    let how = if request.dead_letter {
        Settle::DeadLetter {
            reason: request.reason.unwrap_or_else(|| "dead-lettered by the consumer".into()),
        }
    } else if request.nack {
        Settle::Nack {
            delay: request.delay_ms.map(Duration::from_millis).filter(|d| !d.is_zero()),
            reason: "nacked on its last attempt".into(),
        }
    } else {
        Settle::Ack
    };
    let settling = request.lease_ids.into_iter().map(|id| {
        let held = state.leases().take(&id, &scope, &caller.fingerprint);
        let (state, how) = (state.clone(), how.clone());
        async move {
            let Some(held) = held else {
                let error = ApiError::new(
                    axum::http::StatusCode::NOT_FOUND,
                    "LEASE_NOT_FOUND",
                    format!(
                        "lease `{id}` is not open on this server for this subscription and key: already settled, expired (its message is redelivered), granted to another key, or by another server"
                    ),
                );
                return Err(AckFailure { lease_id: id, error: error.detail().clone() });
            };
            leases::settle(state.metrics(), held, how)
                .await
                .map(|()| id.clone())
                .map_err(|e| AckFailure { lease_id: id, error: ApiError::from(e).detail().clone() })
        }
    });
    let mut result = AckResult { settled: Vec::new(), failed: Vec::new() };
    for outcome in futures::future::join_all(settling).await {
        match outcome {
            Ok(id) => result.settled.push(id),
            Err(failure) => result.failed.push(failure),
        }
    }
    Ok(Json(result))
}
