//! `Authorization: Bearer <key>` on every API route. Read-only keys may read the registry,
//! test connections and read metrics; anything that changes state (create, update, delete,
//! publish, consume, ack) needs a read-write key.

use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;

use crate::error::ApiError;
use crate::keys::Caller;
use crate::state::AppState;

/// Whether a route changes state, and so needs a read-write key.
pub fn needs_write(method: &Method, route: &str) -> bool {
    match *method {
        // Consuming leases messages and counts delivery attempts.
        Method::GET | Method::HEAD => route.ends_with("/stream"),
        // A connection test changes nothing.
        Method::POST => route != "/v1/brokers/{tag}/test",
        _ => true,
    }
}

/// Checks the request's API key and that it may do what the route does.
pub async fn require_key(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let Some(value) = request.headers().get(header::AUTHORIZATION) else {
        return Err(ApiError::unauthorized(
            "missing API key: send `Authorization: Bearer <key>` (create a key with `polybus key create --name NAME`)",
        ));
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .ok_or_else(|| ApiError::unauthorized("the Authorization header must be `Bearer <key>`"))?;
    let key = state
        .keys()
        .verify(token)
        .await?
        .ok_or_else(|| ApiError::unauthorized("invalid API key (unknown or revoked)"))?;
    let route = request.extensions().get::<MatchedPath>().map_or("", MatchedPath::as_str);
    if key.read_only && needs_write(request.method(), route) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "FORBIDDEN",
            format!(
                "API key `{}` is read-only; {} {route} needs a read-write key",
                key.name,
                request.method()
            ),
        ));
    }
    tracing::Span::current().record("key", key.name.as_str());
    let fingerprint = crate::keys::ApiKeys::fingerprint(token);
    request.extensions_mut().insert(Caller { name: key.name, fingerprint });
    Ok(next.run(request).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_connection_tests_are_read_only_the_rest_writes() {
        assert!(!needs_write(&Method::GET, "/v1/brokers"));
        assert!(!needs_write(&Method::POST, "/v1/brokers/{tag}/test"));
        assert!(needs_write(&Method::POST, "/v1/brokers"));
        assert!(needs_write(&Method::PATCH, "/v1/topics/{event}"));
        assert!(needs_write(&Method::DELETE, "/v1/topics/{event}"));
        assert!(needs_write(&Method::GET, "/v1/envs/{env}/events/{event}/subscriptions/{group}/stream"));
        assert!(needs_write(&Method::POST, "/v1/envs/{env}/events/{event}/subscriptions/{group}/ack"));
    }
}
