//! The JSON error of the API: every 4xx and 5xx body is
//! `{"error": {"type", "message", "field", ...}}` ([`ErrorResponse`]).
//!
//! Handlers and extractors fail with an [`ApiError`]; anything else that
//! answers with an error status (axum's own rejections, the router's 404 and
//! 405) is rewritten into the same shape by [`json_errors`], so that no
//! error body of this API is ever plain text.

use std::error::Error as StdError;
use std::time::Duration;

use axum::Json;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use taskexec_model::{TaskError, TaskStatus};
use utoipa::ToSchema;

/// The category of an API error (`error.type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorKind {
    /// The request is malformed: bad JSON, a wrong type, an unknown field, a
    /// bad query parameter or path id, a method the path does not serve.
    BadRequest,
    /// A task of the submission does not validate (422).
    InputValidation,
    /// No such task or route (404).
    NotFound,
    /// The request conflicts with the task's state, e.g. cancelling a final
    /// task, or reusing a task id (409).
    Conflict,
    /// Missing or wrong bearer token (401).
    Unauthorized,
    /// The body is larger than the server accepts (413).
    PayloadTooLarge,
    /// The queue is full; retry after `Retry-After` seconds (429).
    QueueFull,
    /// The service is not ready (503 from `/readyz`), or its store cannot
    /// be reached now (503 with `Retry-After`): nothing was stored.
    Unavailable,
    /// The store's disk is full (507): nothing was stored, and nothing can
    /// be until an operator makes room.
    StorageFull,
    /// A fault of the server (5xx); details are in the server's log.
    Internal,
}

impl ErrorKind {
    /// The kind that a bare error status stands for.
    fn for_status(status: StatusCode) -> Self {
        match status {
            StatusCode::UNAUTHORIZED => Self::Unauthorized,
            StatusCode::NOT_FOUND => Self::NotFound,
            StatusCode::CONFLICT => Self::Conflict,
            StatusCode::PAYLOAD_TOO_LARGE => Self::PayloadTooLarge,
            StatusCode::TOO_MANY_REQUESTS => Self::QueueFull,
            StatusCode::SERVICE_UNAVAILABLE => Self::Unavailable,
            StatusCode::INSUFFICIENT_STORAGE => Self::StorageFull,
            s if s.is_server_error() => Self::Internal,
            _ => Self::BadRequest,
        }
    }
}

/// The body of every error response.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorResponse {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorDetail {
    /// The category.
    #[serde(rename = "type")]
    pub kind: ErrorKind,
    /// A human-readable description.
    pub message: String,
    /// The JSON path of the offending field or parameter (e.g.
    /// `definition.files[0].name`, `tasks[3].priority`, `status`), or null.
    #[schema(required = true)]
    pub field: Option<String>,
    /// Individual violations (e.g. of an input schema), when there are
    /// several.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub violations: Option<serde_json::Value>,
    /// The task's status, for a CONFLICT with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<crate::schema::TaskStatus>)]
    pub status: Option<TaskStatus>,
}

/// Marks a response whose body is already an [`ErrorResponse`].
#[derive(Debug, Clone, Copy)]
struct JsonErrorBody;

/// An error answered as an [`ErrorResponse`].
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    detail: ErrorDetail,
    retry_after: Option<u64>,
    www_authenticate: bool,
}

impl ApiError {
    /// An error of `kind` answered with `status`.
    pub fn new(status: StatusCode, kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            status,
            detail: ErrorDetail {
                kind,
                message: message.into(),
                field: None,
                violations: None,
                status: None,
            },
            retry_after: None,
            www_authenticate: false,
        }
    }

    /// 400 BAD_REQUEST.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorKind::BadRequest, message)
    }

    /// 404 NOT_FOUND.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, ErrorKind::NotFound, message)
    }

    /// 404 for a task id that names no task.
    pub fn no_task(id: &str) -> Self {
        Self::not_found(format!("no task with id {id:?}"))
    }

    /// 409 CONFLICT.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, ErrorKind::Conflict, message)
    }

    /// 401 UNAUTHORIZED, with `WWW-Authenticate: Bearer`.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::UNAUTHORIZED, ErrorKind::Unauthorized, message);
        e.www_authenticate = true;
        e
    }

    /// 413 PAYLOAD_TOO_LARGE.
    pub fn payload_too_large(limit: Option<usize>) -> Self {
        let message = match limit {
            Some(n) => format!("the request body is larger than {n} bytes"),
            None => "the request body is too large".to_owned(),
        };
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::PayloadTooLarge,
            message,
        )
    }

    /// 429 QUEUE_FULL with `Retry-After` (whole seconds, at least 1).
    pub fn queue_full(retry_after: Duration) -> Self {
        let mut secs = retry_after.as_secs();
        if retry_after.subsec_nanos() > 0 || secs == 0 {
            secs = secs.saturating_add(1);
        }
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::QueueFull,
            format!("the task queue is full; retry in {secs} s"),
        );
        e.retry_after = Some(secs);
        e
    }

    /// 503 UNAVAILABLE.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Unavailable,
            message,
        )
    }

    /// 503 UNAVAILABLE with `Retry-After` (whole seconds, at least 1): the
    /// store cannot be reached now; the whole error chain of `err` is
    /// logged.
    pub fn store_unavailable(
        what: &str,
        err: &(dyn StdError + 'static),
        retry_after: Duration,
    ) -> Self {
        tracing::warn!(error = %error_chain(err), "{what}: the store is unavailable");
        let secs = retry_after.as_secs().max(1);
        let mut e = Self::unavailable(format!(
            "the task store is unavailable; nothing was stored; retry in {secs} s"
        ));
        e.retry_after = Some(secs);
        e
    }

    /// 507 STORAGE_FULL: the store's disk is full; the whole error chain of
    /// `err` is logged.
    pub fn storage_full(what: &str, err: &(dyn StdError + 'static)) -> Self {
        tracing::error!(error = %error_chain(err), "{what}: the store is full");
        Self::new(
            StatusCode::INSUFFICIENT_STORAGE,
            ErrorKind::StorageFull,
            "the task store is full; nothing was stored",
        )
    }

    /// The same error with `Retry-After` (whole seconds, at least 1).
    pub fn with_retry_after(mut self, after: Duration) -> Self {
        let mut secs = after.as_secs();
        if after.subsec_nanos() > 0 || secs == 0 {
            secs = secs.saturating_add(1);
        }
        self.retry_after = Some(secs);
        self
    }

    /// 500 INTERNAL with a generic public message; the whole error chain of
    /// `err` is logged.
    pub fn internal(what: &str, err: &(dyn StdError + 'static)) -> Self {
        tracing::error!(error = %error_chain(err), "{what}");
        Self::internal_public()
    }

    fn internal_public() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorKind::Internal,
            "internal error; see the server log",
        )
    }

    /// A rejected task of a submission (422 INPUT_VALIDATION): the field
    /// comes from `error.details.field`, prefixed with `prefix` (e.g.
    /// `tasks[2].` in a batch); violations are passed on.
    pub fn rejected(error: &TaskError, prefix: &str) -> Self {
        let details = error.details.as_ref();
        let field = details
            .and_then(|d| d.get("field"))
            .and_then(serde_json::Value::as_str)
            .map(|f| format!("{prefix}{f}"))
            .or_else(|| (!prefix.is_empty()).then(|| prefix.trim_end_matches('.').to_owned()));
        let violations = details.and_then(|d| d.get("violations")).cloned();
        let mut e = Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorKind::InputValidation,
            error.message.clone(),
        );
        e.detail.field = field;
        e.detail.violations = violations;
        e
    }

    /// The same error naming `field`.
    #[must_use]
    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.detail.field = Some(field.into());
        self
    }

    /// The same error carrying the task's status.
    #[must_use]
    pub fn with_status(mut self, status: TaskStatus) -> Self {
        self.detail.status = Some(status);
        self
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The body.
    pub fn detail(&self) -> &ErrorDetail {
        &self.detail
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {:?}: {}",
            self.status.as_u16(),
            self.detail.kind,
            self.detail.message
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut res = (self.status, Json(ErrorResponse { error: self.detail })).into_response();
        if let Some(secs) = self.retry_after {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.www_authenticate {
            res.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        res.extensions_mut().insert(JsonErrorBody);
        res
    }
}

/// `err` and its sources, joined with `": "`.
pub fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// Longest plain-text error body kept as a message when rewriting.
const MAX_REWRITTEN_BODY: usize = 16 * 1024;

/// Middleware: rewrites every error response that is not already an
/// [`ErrorResponse`] (axum's rejections, the router's own 404/405, a
/// layer's 413) into one, keeping the status and headers (`Allow`, ...).
pub(crate) async fn json_errors(req: Request, next: Next) -> Response {
    let res = next.run(req).await;
    let status = res.status();
    if !(status.is_client_error() || status.is_server_error())
        || res.extensions().get::<JsonErrorBody>().is_some()
    {
        return res;
    }
    let (mut parts, body) = res.into_parts();
    let text = match axum::body::to_bytes(body, MAX_REWRITTEN_BODY).await {
        Ok(b) => String::from_utf8_lossy(&b).trim().to_owned(),
        Err(_) => String::new(),
    };
    let kind = ErrorKind::for_status(status);
    let error = if kind == ErrorKind::Internal {
        tracing::error!(status = status.as_u16(), body = %text, "error response");
        ApiError::internal_public()
    } else {
        let message = if text.is_empty() {
            status.canonical_reason().unwrap_or("error").to_owned()
        } else {
            text
        };
        ApiError::new(status, kind, message)
    };
    parts.headers.remove(header::CONTENT_TYPE);
    parts.headers.remove(header::CONTENT_LENGTH);
    let mut rewritten = error.into_response();
    for (name, value) in &parts.headers {
        rewritten.headers_mut().insert(name.clone(), value.clone());
    }
    rewritten
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(ApiError::queue_full(Duration::ZERO).retry_after, Some(1));
        assert_eq!(
            ApiError::queue_full(Duration::from_millis(1500)).retry_after,
            Some(2)
        );
        assert_eq!(
            ApiError::queue_full(Duration::from_secs(3)).retry_after,
            Some(3)
        );
    }

    #[test]
    fn store_outages_answer_503_with_retry_after_and_507() {
        let cause = std::io::Error::other("connection refused");
        let e = ApiError::store_unavailable("submitting", &cause, Duration::ZERO);
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.detail().kind, ErrorKind::Unavailable);
        assert_eq!(e.retry_after, Some(1));
        let res = e.into_response();
        assert_eq!(res.headers()[header::RETRY_AFTER], "1");
        let e = ApiError::storage_full("submitting", &cause);
        assert_eq!(e.status(), StatusCode::INSUFFICIENT_STORAGE);
        assert_eq!(e.detail().kind, ErrorKind::StorageFull);
        assert_eq!(
            ErrorKind::for_status(StatusCode::INSUFFICIENT_STORAGE),
            ErrorKind::StorageFull
        );
    }

    #[test]
    fn rejected_prefixes_the_field_and_keeps_violations() {
        let te = TaskError::new(taskexec_model::ErrorType::InputValidation, "bad")
            .with_details(serde_json::json!({"field": "input", "violations": [{"path": "/a"}]}));
        let e = ApiError::rejected(&te, "tasks[2].");
        assert_eq!(e.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(e.detail().field.as_deref(), Some("tasks[2].input"));
        assert!(e.detail().violations.is_some());
        let bare = TaskError::new(taskexec_model::ErrorType::InputValidation, "bad");
        assert_eq!(
            ApiError::rejected(&bare, "tasks[0].")
                .detail()
                .field
                .as_deref(),
            Some("tasks[0]")
        );
        assert_eq!(ApiError::rejected(&bare, "").detail().field, None);
    }

    #[test]
    fn error_json_shape() {
        let e = ApiError::bad_request("nope").with_field("status");
        let v = serde_json::to_value(ErrorResponse {
            error: e.detail().clone(),
        })
        .expect("ser");
        assert_eq!(
            v,
            serde_json::json!({"error": {"type": "BAD_REQUEST", "message": "nope", "field": "status"}})
        );
    }
}
