//! API errors as `{ "error": { "code", "message", "field"?, "env"?, "kind"?, "retryable"? } }` with the right status,
//! and request extractors that turn every bad input into such an error, never a panic.

use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use polybus::Error;
use polybus::core::secret::SecretError;
use polybus::core::strict::Strict;
use serde::Serialize;
use serde::de::DeserializeOwned;
use utoipa::ToSchema;

use crate::state::AppState;

/// The JSON body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// What went wrong: a stable code, a message for people, and the offending field when known.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code, the same as the CLI's (`BROKER_NOT_FOUND`, `VALIDATION_FAILED`, …).
    pub code: String,
    /// One line for people.
    pub message: String,
    /// Dotted path of the offending field, for validation errors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The env the offending field is in, for validation errors inside an env.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    /// For broker failures: what kind (`UNAVAILABLE`, `TIMEOUT`, `AUTH_FAILED`, `NOT_FOUND`,
    /// `TOO_LARGE`, `INVALID`, `UNKNOWN`).
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "kind_code")]
    #[schema(value_type = Option<String>)]
    pub kind: Option<polybus::FailureKind>,
    /// For broker failures: whether sending the same request again later may succeed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retryable: Option<bool>,
}

/// A failure kind as its code.
fn kind_code<S: serde::Serializer>(kind: &Option<polybus::FailureKind>, out: S) -> Result<S::Ok, S::Error> {
    match kind {
        Some(kind) => out.serialize_str(kind.code()),
        None => out.serialize_none(),
    }
}

/// An error response.
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    detail: ErrorDetail,
}

/// Result of a handler.
pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    /// An error with this status, code and message.
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            detail: ErrorDetail {
                code: code.to_owned(),
                message: message.into(),
                field: None,
                env: None,
                kind: None,
                retryable: None,
            },
        }
    }

    /// A `400 VALIDATION_FAILED` naming `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        let field = field.into();
        let message = format!("field `{field}`: {}", message.into());
        let mut error = ApiError::new(StatusCode::BAD_REQUEST, "VALIDATION_FAILED", message);
        error.detail.field = Some(field);
        error
    }

    /// `413 PAYLOAD_TOO_LARGE` for a body over `limit` bytes.
    pub fn too_large(limit: usize) -> Self {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
            format!("the request body is larger than the server's limit of {limit} bytes"),
        )
    }

    /// `401 UNAUTHORIZED`.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", message)
    }

    /// `404 NOT_FOUND` for a path no route serves.
    pub fn no_route(path: &str) -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            format!("no such route `{path}`; the API is described at /v1/openapi.json"),
        )
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The code and message.
    pub fn detail(&self) -> &ErrorDetail {
        &self.detail
    }
}

/// The HTTP status of each polybus error code.
fn status_of(error: &Error) -> StatusCode {
    match error {
        Error::Validation(_) | Error::Unsupported { .. } => StatusCode::BAD_REQUEST,
        Error::BrokerNotFound(_) | Error::BrokerEnvNotFound { .. } | Error::TopicNotFound(_) => {
            StatusCode::NOT_FOUND
        }
        Error::AlreadyExists { .. }
        | Error::Conflict { .. }
        | Error::InUse { .. }
        | Error::LeaseLost(_)
        | Error::IdempotencyPending { .. } => StatusCode::CONFLICT,
        Error::NoAdapter(_) => StatusCode::NOT_IMPLEMENTED,
        Error::Transport { .. } => StatusCode::BAD_GATEWAY,
        Error::MissingSecret { .. } | Error::Storage(_) | Error::Closed(_) => StatusCode::SERVICE_UNAVAILABLE,
        Error::Secret(e) => match e {
            SecretError::NotAllowed { .. } => StatusCode::BAD_REQUEST,
            SecretError::NotFound(_) => StatusCode::NOT_FOUND,
            SecretError::Missing { .. }
            | SecretError::Unavailable { .. }
            | SecretError::StoreUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        },
    }
}

impl From<Error> for ApiError {
    fn from(error: Error) -> Self {
        let status = status_of(&error);
        let (message, field, env) = match &error {
            Error::Validation(v) => (v.to_string(), Some(v.field.clone()), v.env.clone()),
            other => (other.to_string(), None, None),
        };
        let kind = error.failure_kind();
        ApiError {
            status,
            detail: ErrorDetail {
                code: error.code().to_owned(),
                message: one_line(&message),
                field,
                env,
                kind,
                retryable: match &error {
                    Error::IdempotencyPending { .. } => Some(true),
                    _ => kind.map(|_| error.is_retryable()),
                },
            },
        }
    }
}

impl From<polybus::core::ValidationError> for ApiError {
    fn from(error: polybus::core::ValidationError) -> Self {
        Error::from(error).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let unauthorized = self.status == StatusCode::UNAUTHORIZED;
        let mut response = (self.status, axum::Json(ErrorBody { error: self.detail })).into_response();
        if unauthorized {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Joins a multi-line message into one line.
fn one_line(message: &str) -> String {
    message.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ")
}

/// A JSON request body, size-limited; bad JSON is a 400 naming the problem and where it is.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| body_error(e, state.body_limit()))?;
        parse_json(&bytes).map(ApiJson)
    }
}

fn body_error(rejection: BytesRejection, limit: usize) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::too_large(limit)
    } else {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "INVALID_BODY",
            format!("cannot read the request body: {}", rejection.body_text()),
        )
    }
}

/// Parses a JSON body; syntax errors are `INVALID_JSON`, wrong shapes `VALIDATION_FAILED`.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> ApiResult<T> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "INVALID_JSON",
            "the request body is empty; expected a JSON object",
        ));
    }
    let value = serde_json::from_slice(bytes).map_err(|e| json_error(e, "body".to_owned()))?;
    from_value(value)
}

/// Deserializes a parsed body; a wrong shape (an array where an object is expected included) is
/// `VALIDATION_FAILED` naming the field.
pub fn from_value<T: DeserializeOwned>(value: serde_json::Value) -> ApiResult<T> {
    serde_path_to_error::deserialize(Strict(value)).map_err(|err| {
        let path = err.path().to_string();
        let reason = err.into_inner().to_string();
        ApiError::invalid(field_of(&path, &reason), reason)
    })
}

/// The field a deserialization error is about: its path, or for a missing field the path of
/// that field.
fn field_of(path: &str, reason: &str) -> String {
    let missing = reason.strip_prefix("missing field `").and_then(|rest| rest.split('`').next());
    match (path, missing) {
        // `""`: the body's own unknown field without a name.
        ("." | "", Some(field)) => field.to_owned(),
        ("." | "", None) => "body".to_owned(),
        (path, Some(field)) => format!("{path}.{field}"),
        (path, None) => path.to_owned(),
    }
}

fn json_error(error: serde_json::Error, field: String) -> ApiError {
    let reason = error.to_string();
    let reason = reason.split(" at line ").next().unwrap_or(&reason);
    if error.is_data() {
        ApiError::invalid(field, reason)
    } else {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "INVALID_JSON",
            format!(
                "the request body is not valid JSON: line {} column {}: {reason}",
                error.line(),
                error.column()
            ),
        )
    }
}

/// A JSON request body that may be left out: an empty body is `T::default()`.
pub struct ApiJsonOrDefault<T>(pub T);

impl<T: DeserializeOwned + Default> FromRequest<AppState> for ApiJsonOrDefault<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| body_error(e, state.body_limit()))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(ApiJsonOrDefault(T::default()));
        }
        parse_json(&bytes).map(ApiJsonOrDefault)
    }
}

/// Query parameters; a bad one is a 400 naming it.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state).await.map(|q| ApiQuery(q.0)).map_err(
            |e: QueryRejection| {
                ApiError::new(StatusCode::BAD_REQUEST, "INVALID_QUERY", one_line(&e.body_text()))
            },
        )
    }
}

/// Path parameters; a segment that is not UTF-8 is a 400.
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state).await.map(|p| ApiPath(p.0)).map_err(
            |e: PathRejection| {
                ApiError::new(StatusCode::BAD_REQUEST, "INVALID_PATH", one_line(&e.body_text()))
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Shape {
        max: u32,
    }

    #[test]
    fn broker_failures_say_their_kind_and_whether_to_retry() {
        let refused = Error::transport(polybus::core::Op::Connect, "redis h:6379", "password refused")
            .with_kind(polybus::FailureKind::Auth);
        let body = serde_json::to_value(ApiError::from(refused).detail().clone()).expect("json");
        assert_eq!(body["code"], "CONNECT_FAILED");
        assert_eq!(body["kind"], "AUTH_FAILED");
        assert_eq!(body["retryable"], false);
        let lost = Error::transport(polybus::core::Op::Publish, "redis s", "connection reset");
        let body = serde_json::to_value(ApiError::from(lost).detail().clone()).expect("json");
        assert_eq!(
            (&body["kind"], &body["retryable"]),
            (&serde_json::json!("UNKNOWN"), &serde_json::json!(true))
        );
        let body = serde_json::to_value(ApiError::from(Error::TopicNotFound("t".into())).detail().clone())
            .expect("json");
        assert!(body.get("kind").is_none() && body.get("retryable").is_none(), "{body}");
    }

    #[test]
    fn syntax_errors_and_wrong_shapes_are_told_apart() {
        let error = parse_json::<Shape>(b"{\"max\": ").expect_err("truncated");
        assert_eq!((error.status(), error.detail().code.as_str()), (StatusCode::BAD_REQUEST, "INVALID_JSON"));
        let error = parse_json::<Shape>(b"{\"max\": \"ten\"}").expect_err("wrong type");
        assert_eq!(error.detail().code, "VALIDATION_FAILED");
        assert_eq!(error.detail().field.as_deref(), Some("max"));
        let error = parse_json::<Shape>(b"{\"max\": 1} trailing").expect_err("trailing");
        assert_eq!(error.detail().code, "INVALID_JSON");
        let error = parse_json::<Shape>(b"  ").expect_err("empty");
        assert_eq!(error.detail().code, "INVALID_JSON");
        let error = parse_json::<Shape>(b"[10]").expect_err("fields by position");
        assert_eq!(error.detail().code, "VALIDATION_FAILED");
        assert_eq!(error.detail().field.as_deref(), Some("body"));
    }

    #[test]
    fn a_nameless_unknown_field_is_named_by_the_body() {
        // Found by fuzzing: `{"": null}` gave `"field": ""`.
        let error = parse_json::<Shape>(br#"{"": null}"#).expect_err("unknown field");
        assert_eq!(error.detail().field.as_deref(), Some("body"));
        let error = from_value::<Shape>(serde_json::json!({"": 1})).expect_err("unknown field");
        assert_eq!(error.detail().field.as_deref(), Some("body"));
    }

    #[test]
    fn polybus_errors_keep_their_code_and_get_a_status() {
        let error = ApiError::from(Error::TopicNotFound("a:b".into()));
        assert_eq!(
            (error.status(), error.detail().code.as_str()),
            (StatusCode::NOT_FOUND, "TOPIC_NOT_FOUND")
        );
        let error = ApiError::from(polybus::core::ValidationError::in_env(
            "dev",
            "config.port",
            "expected\n a number",
        ));
        assert_eq!(error.detail().field.as_deref(), Some("config.port"));
        assert_eq!(error.detail().env.as_deref(), Some("dev"));
        assert!(!error.detail().message.contains('\n'));
    }
}
