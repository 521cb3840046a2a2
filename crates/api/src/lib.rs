//! The HTTP API v1 of the taskexec service (`taskexec serve`), on axum.
//!
//! [`router`] serves the routes below over an `Arc<Service>`; [`openapi`]
//! is the OpenAPI 3 document generated from the same handlers (and served
//! at `/openapi.json`), so the document and the server cannot drift apart.
//!
//! | route | what |
//! | --- | --- |
//! | `POST /v1/tasks` | submit one task (`Idempotency-Key`, `?wait=30s`) |
//! | `POST /v1/tasks/batch` | submit up to `max_batch` tasks, all or nothing |
//! | `GET /v1/tasks` | list (`status`, `runtime`, `workflowInstanceId`, `limit`, `cursor`) |
//! | `GET /v1/tasks/{id}` | the whole task record |
//! | `GET /v1/tasks/{id}/logs` | captured stdout and stderr |
//! | `GET /v1/tasks/{id}/events` | lifecycle as server-sent events |
//! | `POST /v1/tasks/{id}/cancel` | cancel |
//! | `GET /v1/runtimes` | the runtimes of this server |
//! | `GET /healthz`, `GET /readyz` | liveness, readiness (no token needed) |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /openapi.json` | the OpenAPI document |
//!
//! With [`ApiConfig::auth_token`] set, every route but `/healthz` and
//! `/readyz` needs `Authorization: Bearer <token>`. Every error body is
//! `{"error": {"type", "message", "field"}}` ([`error::ErrorResponse`]).

#![warn(missing_docs)]

pub mod error;
pub mod extract;
pub mod handlers;
mod keepalive;
pub mod schema;
pub mod server;

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::PrometheusHandle;
use taskexec_service::Service;
use taskexec_service::metric;
use tower_http::trace::TraceLayer;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::ApiError;

/// Default [`ApiConfig::max_body_bytes`]: 8 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// Settings of the API.
#[derive(Clone)]
pub struct ApiConfig {
    /// The bearer token every route but `/healthz` and `/readyz` requires;
    /// `None`: no authentication. An empty token matches no request.
    pub auth_token: Option<String>,
    /// Largest accepted request body (413 past it).
    pub max_body_bytes: usize,
    /// Renders `/metrics`; `None`: `/metrics` answers 404.
    pub metrics: Option<PrometheusHandle>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            auth_token: None,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            metrics: None,
        }
    }
}

impl fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiConfig")
            .field(
                "auth_token",
                &self.auth_token.as_ref().map(|_| "<redacted>"),
            )
            .field("max_body_bytes", &self.max_body_bytes)
            .field("metrics", &self.metrics.is_some())
            .finish()
    }
}

/// What the handlers share.
#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) service: Arc<Service>,
    pub(crate) shared: Arc<Shared>,
}

pub(crate) struct Shared {
    auth_token: Option<String>,
    pub(crate) metrics: Option<PrometheusHandle>,
    pub(crate) openapi_json: Bytes,
}

impl fmt::Debug for AppState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppState").finish_non_exhaustive()
    }
}

/// The name of the bearer security scheme in the document.
pub const SECURITY_SCHEME: &str = "bearer";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "taskexec",
        description = "Executes sandboxed code tasks: submit, follow, cancel, and read results.\n\n\
            Every error body is `{\"error\": {\"type\", \"message\", \"field\"}}`.",
    ),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    tags(
        (name = "tasks", description = "Submit, follow and cancel tasks"),
        (name = "system", description = "Runtimes, health, metrics and this document"),
    ),
    components(schemas(error::ErrorKind, error::ErrorResponse, error::ErrorDetail)),
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            SECURITY_SCHEME,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "`Authorization: Bearer <token>`, when the server is configured with a token",
                    ))
                    .build(),
            ),
        );
    }
}

/// The routes: those behind the token, and the open ones.
fn routes() -> (OpenApiRouter<AppState>, OpenApiRouter<AppState>) {
    let protected = OpenApiRouter::new()
        .routes(routes!(handlers::submit_task, handlers::list_tasks))
        .routes(routes!(handlers::submit_batch))
        .routes(routes!(handlers::get_task))
        .routes(routes!(handlers::get_task_logs))
        .routes(routes!(handlers::stream_task_events))
        .routes(routes!(handlers::cancel_task))
        .routes(routes!(handlers::list_runtimes))
        .routes(routes!(handlers::metrics))
        .routes(routes!(handlers::openapi_json));
    let open = OpenApiRouter::new()
        .routes(routes!(handlers::healthz))
        .routes(routes!(handlers::readyz));
    (protected, open)
}

/// The OpenAPI 3 document of the API, as served at `/openapi.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let (protected, open) = routes();
    OpenApiRouter::<AppState>::with_openapi(ApiDoc::openapi())
        .merge(protected)
        .merge(open)
        .into_openapi()
}

/// The API over `service`.
pub fn router(service: Arc<Service>, config: ApiConfig) -> Router {
    let doc = openapi();
    let openapi_json = match serde_json::to_vec(&doc) {
        Ok(v) => Bytes::from(v),
        Err(e) => {
            tracing::error!(error = %e, "serializing the OpenAPI document failed");
            Bytes::from_static(b"{}")
        }
    };
    let state = AppState {
        service,
        shared: Arc::new(Shared {
            auth_token: config.auth_token,
            metrics: config.metrics,
            openapi_json,
        }),
    };
    let (protected, open) = routes();
    let protected = protected.route_layer(middleware::from_fn_with_state(
        state.clone(),
        require_bearer,
    ));
    let (router, _) = OpenApiRouter::new()
        .merge(protected)
        .merge(open)
        .split_for_parts();
    router
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .layer(middleware::from_fn(error::json_errors))
        .layer(middleware::from_fn(count_requests))
        .layer(middleware::from_fn(keepalive::close_unread))
        .with_state(state)
        .layer(TraceLayer::new_for_http())
}

async fn no_route() -> ApiError {
    ApiError::not_found("no such route")
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        error::ErrorKind::BadRequest,
        format!("method {} is not allowed on this route", req.method()),
    )
}

/// Requires `Authorization: Bearer <token>` when a token is configured.
async fn require_bearer(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(expected) = state.shared.auth_token.as_deref() else {
        return next.run(req).await;
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token);
    match given {
        Some(token) if constant_time_eq(token.as_bytes(), expected.as_bytes()) => {
            next.run(req).await
        }
        Some(_) => ApiError::unauthorized("invalid bearer token").into_response(),
        None => ApiError::unauthorized("missing bearer token: send Authorization: Bearer <token>")
            .into_response(),
    }
}

/// The token of an `Authorization: Bearer <token>` value (scheme
/// case-insensitive).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Compares `given` with `expected` in time that depends only on the length
/// of `given`. An empty `expected` matches nothing.
fn constant_time_eq(given: &[u8], expected: &[u8]) -> bool {
    if expected.is_empty() {
        return false;
    }
    let mut diff = u8::from(given.len() != expected.len());
    for (i, g) in given.iter().enumerate() {
        diff |= g ^ expected[i % expected.len()];
    }
    std::hint::black_box(diff) == 0
}

/// Counts requests in `taskexec_http_requests_total{method, route, status}`
/// (route: the matched path template, `unmatched` for none) and times them
/// in `taskexec_http_request_duration_seconds{method, route}`.
async fn count_requests(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let method = req.method().as_str().to_owned();
    let start = Instant::now();
    let res = next.run(req).await;
    let status = res.status().as_u16().to_string();
    metrics::counter!(
        metric::HTTP_REQUESTS_TOTAL.name,
        "method" => method.clone(),
        "route" => route.clone(),
        "status" => status,
    )
    .increment(1);
    metrics::histogram!(
        metric::HTTP_REQUEST_DURATION_SECONDS.name,
        "method" => method,
        "route" => route,
    )
    .record(start.elapsed().as_secs_f64());
    res
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn constant_time_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secreT", b"secret"));
        assert!(!constant_time_eq(b"secret-and-more", b"secret"));
        assert!(!constant_time_eq(b"secretsecret", b"secret"));
        assert!(!constant_time_eq(b"sec", b"secret"));
        assert!(!constant_time_eq(b"", b"secret"));
        assert!(!constant_time_eq(b"", b""));
    }

    #[test]
    fn bearer_values() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer"), None);
        assert_eq!(bearer_token("Bearer "), None);
    }
}
