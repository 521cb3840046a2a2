//! The handlers of API v1, each documented with `#[utoipa::path]`.
//!
//! Why one file of about 850 lines before its tests: one handler per route,
//! each with its OpenAPI annotation, which the `#[utoipa::path]` macros and
//! the router (`lib.rs`) reference by path; most of the length is the
//! routes' own documentation.

use std::collections::HashSet;
use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use taskexec_model::{TaskInstance, TaskStatus, TransitionRecord};
use taskexec_service::{Service, SubmitError, TaskEvent};
use taskexec_store::{
    CancelOutcome, ErrorClass, ListQuery, StoreError, Submitted, TaskProgress, TaskRecord,
};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use utoipa::{IntoParams, ToSchema};

use crate::AppState;
use crate::error::{ApiError, ErrorKind, ErrorResponse};
use crate::extract::{ApiJson, ApiQuery, TaskId};
use crate::schema;

/// The longest `wait` of `POST /v1/tasks`.
pub const MAX_WAIT: Duration = Duration::from_secs(300);
/// Page size of a listing when `limit` is not given.
pub const DEFAULT_LIMIT: u32 = 50;
/// The largest `limit` of a listing.
pub const MAX_LIMIT: u32 = 500;

const TAG_TASKS: &str = "tasks";
const TAG_SYSTEM: &str = "system";

/// A task and its status.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TaskRef {
    /// The task id.
    pub id: String,
    /// Its status.
    #[schema(value_type = schema::TaskStatus)]
    pub status: TaskStatus,
}

/// A task of a batch submission and its status.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct BatchItem {
    /// The task id.
    pub id: String,
    /// Its status.
    #[schema(value_type = schema::TaskStatus)]
    pub status: TaskStatus,
    /// The task's idempotency key was seen before: this is the earlier task.
    pub existing: bool,
}

/// A batch submission: all tasks are stored, or none.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// The tasks, 1 to the server's batch limit.
    #[schema(value_type = Vec<schema::TaskInstance>)]
    pub tasks: Vec<TaskInstance>,
}

/// The tasks of a batch, in submission order.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct BatchResponse {
    /// One per submitted task.
    pub tasks: Vec<BatchItem>,
}

/// The captured output of a task.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskLogs {
    /// The task id.
    pub id: String,
    /// Its status.
    #[schema(value_type = schema::TaskStatus)]
    pub status: TaskStatus,
    /// Captured stdout (empty while not final).
    pub stdout: String,
    /// Captured stderr (empty while not final).
    pub stderr: String,
    /// Stdout went past the capture limit.
    pub stdout_truncated: bool,
    /// Stderr went past the capture limit.
    pub stderr_truncated: bool,
}

/// `{"status": "ok"}`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct HealthStatus {
    /// Always `ok`.
    pub status: String,
}

impl HealthStatus {
    fn ok() -> Json<Self> {
        Json(Self {
            status: "ok".to_owned(),
        })
    }
}

/// Query parameters of `POST /v1/tasks`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct SubmitParams {
    /// Long-poll: wait up to this long (`30s`, `500ms`, `2m`, or plain
    /// seconds; at most 300 s) for the task to finish, and answer 200 with
    /// the whole record if it did.
    pub wait: Option<String>,
}

/// Query parameters of `GET /v1/tasks`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListParams {
    /// Only tasks in this status.
    #[param(value_type = Option<schema::TaskStatus>)]
    pub status: Option<String>,
    /// Only tasks of this runtime.
    pub runtime: Option<String>,
    /// Only tasks of this workflow instance.
    pub workflow_instance_id: Option<String>,
    /// Page size, 1..=500 (default 50).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 500)]
    pub limit: Option<String>,
    /// `nextCursor` of the previous page.
    pub cursor: Option<String>,
}

/// When a client should try again after the store was unreachable.
const STORE_RETRY_AFTER: Duration = Duration::from_secs(2);

/// The answer to a failure of the store: 503 with `Retry-After` while it
/// cannot be reached, 507 STORAGE_FULL when its disk is full, else 500.
fn store_error(what: &str, e: &StoreError) -> ApiError {
    match e.class() {
        ErrorClass::Unavailable => ApiError::store_unavailable(what, e, STORE_RETRY_AFTER),
        ErrorClass::Full => ApiError::storage_full(what, e),
        ErrorClass::Other => ApiError::internal(what, e),
    }
}

fn submit_error(e: SubmitError, batch: bool) -> ApiError {
    match e {
        SubmitError::Rejected { index, error } => {
            let prefix = if batch {
                format!("tasks[{index}].")
            } else {
                String::new()
            };
            ApiError::rejected(&error, &prefix)
        }
        SubmitError::QueueFull { retry_after } => ApiError::queue_full(retry_after),
        SubmitError::Store(StoreError::IdempotencyConflict {
            index,
            key,
            existing,
        }) => {
            let field = if batch {
                format!("tasks[{index}].idempotencyKey")
            } else {
                "Idempotency-Key".to_owned()
            };
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorKind::InputValidation,
                format!(
                    "the idempotency key {key:?} was already used for a different request \
                     (task {existing}): use a new key for a different task"
                ),
            )
            .with_field(field)
        }
        SubmitError::Store(e) if is_unique_violation(&e) => {
            if batch {
                ApiError::conflict("a task of the batch reuses the id of an existing task")
            } else {
                ApiError::conflict("a task with this id already exists").with_field("id")
            }
        }
        SubmitError::Store(e) => store_error("submitting tasks failed", &e),
        SubmitError::Unavailable => {
            ApiError::unavailable("the node is shutting down and takes no new tasks")
        }
    }
}

fn is_unique_violation(e: &StoreError) -> bool {
    e.is_unique_violation()
}

/// Parses `wait`: a duration of at most [`MAX_WAIT`].
pub fn parse_wait(s: &str) -> Result<Duration, ApiError> {
    let d = taskexec_model::parse_duration(s).map_err(|e| {
        ApiError::bad_request(format!("invalid wait {s:?}: {e}")).with_field("wait")
    })?;
    if d > MAX_WAIT {
        return Err(ApiError::bad_request(format!(
            "wait {s:?} is too long: at most {} s",
            MAX_WAIT.as_secs()
        ))
        .with_field("wait"));
    }
    Ok(d)
}

fn task_ref(status: StatusCode, id: String, current: TaskStatus) -> Response {
    let location = HeaderValue::try_from(format!("/v1/tasks/{id}")).ok();
    let mut res = (
        status,
        Json(TaskRef {
            id,
            status: current,
        }),
    )
        .into_response();
    if let Some(loc) = location {
        res.headers_mut().insert(header::LOCATION, loc);
    }
    res
}

async fn current_status(service: &Service, id: &str) -> Result<TaskStatus, ApiError> {
    let rec = service
        .get(id)
        .await
        .map_err(|e| store_error("reading a task failed", &e))?;
    Ok(rec.map_or(TaskStatus::Received, |r| r.status))
}

/// Submit a task.
///
/// Answers 202 with the new task's id and status; an idempotent repeat (an
/// `idempotencyKey` seen before) answers 200 with the earlier task. With
/// `wait`, holds the request until the task is final or the wait is over,
/// and answers 200 with the whole record if it finished.
#[utoipa::path(
    post,
    path = "/v1/tasks",
    tag = TAG_TASKS,
    operation_id = "submitTask",
    params(
        SubmitParams,
        ("Idempotency-Key" = Option<String>, Header,
            description = "Sets the task's `idempotencyKey` (must equal it if the body sets it too)."),
    ),
    request_body(content = schema::TaskInstance, content_type = "application/json"),
    responses(
        (status = 200, description = "Finished within `wait` (the whole record), or an idempotent repeat (the earlier task)", body = schema::SubmitOk),
        (status = 202, description = "Accepted and queued", body = TaskRef,
            headers(("Location" = String, description = "The task's URL"))),
        (status = 400, description = "Malformed request", body = ErrorResponse),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorResponse),
        (status = 409, description = "A task with this id exists", body = ErrorResponse),
        (status = 413, description = "Body too large", body = ErrorResponse),
        (status = 415, description = "The body is not declared as JSON (Content-Type)", body = ErrorResponse),
        (status = 422, description = "The task does not validate, or its idempotency key was used for a different request", body = ErrorResponse),
        (status = 429, description = "The queue is full", body = ErrorResponse,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
        (status = 500, description = "Internal error", body = ErrorResponse),
    )
)]
pub(crate) async fn submit_task(
    State(state): State<AppState>,
    ApiQuery(params): ApiQuery<SubmitParams>,
    headers: HeaderMap,
    ApiJson(mut task): ApiJson<TaskInstance>,
) -> Result<Response, ApiError> {
    let wait = params.wait.as_deref().map(parse_wait).transpose()?;
    if let Some(value) = headers.get("idempotency-key") {
        let key = value
            .to_str()
            .map_err(|_| {
                ApiError::bad_request("the Idempotency-Key header is not visible ASCII")
                    .with_field("idempotencyKey")
            })?
            .to_owned();
        match &task.idempotency_key {
            Some(body_key) if *body_key != key => {
                return Err(ApiError::bad_request(
                    "the Idempotency-Key header and the body's idempotencyKey differ",
                )
                .with_field("idempotencyKey"));
            }
            _ => task.idempotency_key = Some(key),
        }
    }
    let service = &state.service;
    // With `wait`, the wait is registered before the task is stored, so
    // that a task that ends at once on this node cannot be missed and the
    // store is not read before it ends.
    // The digest of the request is of the task as sent (before an id is
    // assigned).
    let request_hash = taskexec_store::request_hash(&task);
    let watch = wait.map(|_| {
        Service::assign_id(&mut task);
        service.watch_final(&task.id)
    });
    let submitted = service
        .submit_hashed("", vec![(Some(request_hash), task)])
        .await
        .map_err(|e| submit_error(e, false))?;
    let Some(first) = submitted.into_iter().next() else {
        return Err(ApiError::internal(
            "submitting a task returned nothing",
            &std::io::Error::other("empty submission result"),
        ));
    };
    let existing = matches!(first, Submitted::Existing { .. });
    let id = first.id().to_owned();
    let ok_or_accepted = if existing {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    if let (Some(wait), Some(watch)) = (wait, watch) {
        let waited = if watch.id() == id {
            service.wait_watched(watch, wait, !existing).await
        } else {
            // An idempotent repeat: the earlier task.
            drop(watch);
            service.wait_final(&id, wait).await
        };
        let rec = waited.map_err(|e| store_error("waiting for a task failed", &e))?;
        return Ok(match rec {
            Some(rec) if rec.status.is_final() => (StatusCode::OK, Json(rec)).into_response(),
            Some(rec) => task_ref(ok_or_accepted, id, rec.status),
            None => task_ref(ok_or_accepted, id, TaskStatus::Received),
        });
    }
    let status = current_status(service, &id).await?;
    Ok(task_ref(ok_or_accepted, id, status))
}

/// Submit tasks in one batch, all or nothing.
///
/// A task that does not validate refuses the whole batch, naming
/// `tasks[i].<field>`. Tasks whose `idempotencyKey` was seen before are not
/// stored again: their item is the earlier task, with `existing: true`.
/// The `Idempotency-Key` header is not accepted here: set `idempotencyKey`
/// on each task.
#[utoipa::path(
    post,
    path = "/v1/tasks/batch",
    tag = TAG_TASKS,
    operation_id = "submitBatch",
    request_body(content = BatchRequest, content_type = "application/json"),
    responses(
        (status = 202, description = "All tasks accepted", body = BatchResponse),
        (status = 400, description = "Malformed request, or a batch size out of range", body = ErrorResponse),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorResponse),
        (status = 409, description = "A task id exists", body = ErrorResponse),
        (status = 413, description = "Body too large", body = ErrorResponse),
        (status = 415, description = "The body is not declared as JSON (Content-Type)", body = ErrorResponse),
        (status = 422, description = "A task does not validate, or reuses an idempotency key with a different request", body = ErrorResponse),
        (status = 429, description = "The queue is full", body = ErrorResponse,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
        (status = 500, description = "Internal error", body = ErrorResponse),
    )
)]
pub(crate) async fn submit_batch(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(batch): ApiJson<BatchRequest>,
) -> Result<Response, ApiError> {
    if headers.contains_key("idempotency-key") {
        return Err(ApiError::bad_request(
            "the Idempotency-Key header is not accepted on a batch: set idempotencyKey on each task",
        )
        .with_field("idempotencyKey"));
    }
    let service = &state.service;
    let max = service.max_batch();
    let n = batch.tasks.len();
    if n == 0 || n > max {
        return Err(
            ApiError::bad_request(format!("a batch holds 1 to {max} tasks, this one {n}"))
                .with_field("tasks"),
        );
    }
    let submitted = service
        .submit(batch.tasks)
        .await
        .map_err(|e| submit_error(e, true))?;
    let mut tasks = Vec::with_capacity(submitted.len());
    for s in submitted {
        let item = match s {
            // Just stored: RECEIVED (not read back, to keep a large batch
            // cheap).
            Submitted::Created { id } => BatchItem {
                id,
                status: TaskStatus::Received,
                existing: false,
            },
            Submitted::Existing { id } => {
                let status = current_status(service, &id).await?;
                BatchItem {
                    id,
                    status,
                    existing: true,
                }
            }
        };
        tasks.push(item);
    }
    Ok((StatusCode::ACCEPTED, Json(BatchResponse { tasks })).into_response())
}

async fn record_of(state: &AppState, id: &str) -> Result<TaskRecord, ApiError> {
    state
        .service
        .get(id)
        .await
        .map_err(|e| store_error("reading a task failed", &e))?
        .ok_or_else(|| ApiError::no_task(id))
}

/// Get a task: its submission, status, history, attempts and result.
#[utoipa::path(
    get,
    path = "/v1/tasks/{id}",
    tag = TAG_TASKS,
    operation_id = "getTask",
    params(("id" = String, Path, description = "Task id", pattern = "^[A-Za-z0-9._-]{1,256}$")),
    responses(
        (status = 200, description = "The task", body = schema::TaskRecord),
        (status = 400, description = "Invalid id", body = ErrorResponse),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorResponse),
        (status = 404, description = "No such task", body = ErrorResponse),
        (status = 500, description = "Internal error", body = ErrorResponse),
    )
)]
pub(crate) async fn get_task(
    State(state): State<AppState>,
    TaskId(id): TaskId,
) -> Result<Json<TaskRecord>, ApiError> {
    record_of(&state, &id).await.map(Json)
}

/// List tasks, newest first, a page at a time.
#[utoipa::path(
    get,
    path = "/v1/tasks",
    tag = TAG_TASKS,
    operation_id = "listTasks",
    params(ListParams),
    responses(
        (status = 200, description = "A page of tasks", body = schema::ListPage),
        (status = 400, description = "Invalid parameter (named in `field`)", body = ErrorResponse),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorResponse),
        (status = 500, description = "Internal error", body = ErrorResponse),
    )
)]
pub(crate) async fn list_tasks(
    State(state): State<AppState>,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<Response, ApiError> {
    let query = list_query(params)?;
    match state.service.list(&query).await {
        Ok(page) => Ok(Json(page).into_response()),
        Err(StoreError::BadCursor(c)) => Err(ApiError::bad_request(format!(
            "invalid cursor {c:?}: pass the nextCursor of a previous page"
        ))
        .with_field("cursor")),
        Err(e) => Err(store_error("listing tasks failed", &e)),
    }
}

/// The store query of a listing's parameters (empty values are ignored).
pub fn list_query(params: ListParams) -> Result<ListQuery, ApiError> {
    let non_empty = |v: Option<String>| v.filter(|s| !s.trim().is_empty());
    let status = non_empty(params.status)
        .map(|s| {
            s.parse::<TaskStatus>()
                .map_err(|e| ApiError::bad_request(e.to_string()).with_field("status"))
        })
        .transpose()?;
    let limit = match non_empty(params.limit) {
        None => DEFAULT_LIMIT,
        Some(s) => match s.trim().parse::<u32>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "invalid limit {s:?}: expected an integer from 1 to {MAX_LIMIT}"
                ))
                .with_field("limit"));
            }
        },
    };
    Ok(ListQuery {
        status,
        runtime: non_empty(params.runtime),
        workflow_instance_id: non_empty(params.workflow_instance_id),
        limit,
        cursor: non_empty(params.cursor),
    })
}

/// Get a task's captured stdout and stderr (empty until it is final).
#[utoipa::path(
    get,
    path = "/v1/tasks/{id}/logs",
    tag = TAG_TASKS,
    operation_id = "getTaskLogs",
    params(("id" = String, Path, description = "Task id", pattern = "^[A-Za-z0-9._-]{1,256}$")),
    responses(
        (status = 200, description = "The task's output", body = TaskLogs),
        (status = 400, description = "Invalid id", body = ErrorResponse),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorResponse),
        (status = 404, description = "No such task", body = ErrorResponse),
        (status = 500, description = "Internal error", body = ErrorResponse),
    )
)]
pub(crate) async fn get_task_logs(
    State(state): State<AppState>,
    TaskId(id): TaskId,
) -> Result<Json<TaskLogs>, ApiError> {
    let rec = record_of(&state, &id).await?;
    let logs = match rec.result {
        Some(r) => TaskLogs {
            id,
            status: rec.status,
            stdout: r.stdout,
            stderr: r.stderr,
            stdout_truncated: r.stdout_truncated,
            stderr_truncated: r.stderr_truncated,
        },
        None => TaskLogs {
            id,
            status: rec.status,
            stdout: String::new(),
            stderr: String::new(),
            stdout_truncated: false,
            stderr_truncated: false,
        },
    };
    Ok(Json(logs))
}

/// Stream a task's lifecycle as server-sent events.
///
/// Every event is named `transition`; its data is a transition record with
/// `taskId`. The stream starts with the transitions so far, then follows
/// the task live, and ends after its final transition (at once for a task
/// that is already final).
#[utoipa::path(
    get,
    path = "/v1/tasks/{id}/events",
    tag = TAG_TASKS,
    operation_id = "streamTaskEvents",
    params(("id" = String, Path, description = "Task id", pattern = "^[A-Za-z0-9._-]{1,256}$")),
    responses(
        (status = 200, description = "`transition` events; the data of each is a TransitionEvent", content_type = "text/event-stream", body = schema::TransitionEvent),
        (status = 400, description = "Invalid id", body = ErrorResponse),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorResponse),
        (status = 404, description = "No such task", body = ErrorResponse),
        (status = 500, description = "Internal error", body = ErrorResponse),
    )
)]
pub(crate) async fn stream_task_events(
    State(state): State<AppState>,
    TaskId(id): TaskId,
) -> Result<Response, ApiError> {
    // Subscribe first: an event sent while the history is read is not lost
    // (it is skipped later if the history already had it).
    let events = state.service.subscribe();
    let rec = state
        .service
        .progress(&id)
        .await
        .map_err(|e| store_error("reading a task failed", &e))?
        .ok_or_else(|| ApiError::no_task(&id))?;
    let (tx, rx) = mpsc::channel::<Event>(64);
    let service = std::sync::Arc::clone(&state.service);
    tokio::spawn(follow(service, id, rec, events, tx));
    let stream = ReceiverStream::new(rx).map(Ok::<_, Infallible>);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// Identifies a transition across the stored history and live events
/// (times compared to the millisecond, the store's precision).
type TransitionKey = (TaskStatus, u32, i128);

fn key(r: &TransitionRecord) -> TransitionKey {
    (r.to, r.attempt, r.at.unix_timestamp_nanos() / 1_000_000)
}

fn transition_event(id: &str, r: &TransitionRecord) -> Event {
    let mut data = serde_json::to_value(r).unwrap_or(serde_json::Value::Null);
    if let Some(obj) = data.as_object_mut() {
        obj.insert(
            "taskId".to_owned(),
            serde_json::Value::String(id.to_owned()),
        );
    }
    Event::default().event("transition").data(data.to_string())
}

/// Sends the stored history not yet sent; true if the task is final.
async fn send_history(
    id: &str,
    rec: &TaskProgress,
    seen: &mut HashSet<TransitionKey>,
    tx: &mpsc::Sender<Event>,
) -> Result<bool, ()> {
    for r in &rec.history {
        if seen.insert(key(r)) {
            tx.send(transition_event(id, r)).await.map_err(drop)?;
        }
    }
    Ok(rec.status.is_final())
}

/// Re-reads the progress of task `id` and sends the history not yet sent;
/// None when the stream is over (the task is final or gone, the client
/// left, or the store failed).
async fn reread(
    service: &Service,
    id: &str,
    seen: &mut HashSet<TransitionKey>,
    tx: &mpsc::Sender<Event>,
) -> Option<()> {
    match service.progress(id).await {
        Ok(Some(rec)) => match send_history(id, &rec, seen, tx).await {
            Ok(false) => Some(()),
            Ok(true) | Err(()) => None,
        },
        Ok(None) => None,
        Err(e) => {
            tracing::error!(task_id = %id, error = %crate::error::error_chain(&e), "re-reading a task for its event stream failed");
            None
        }
    }
}

/// Feeds one SSE stream: the history, then live events of task `id` until
/// its final one (or the client leaves).
async fn follow(
    service: std::sync::Arc<Service>,
    id: String,
    rec: TaskProgress,
    mut events: broadcast::Receiver<TaskEvent>,
    tx: mpsc::Sender<Event>,
) {
    let mut seen = HashSet::new();
    match send_history(&id, &rec, &mut seen, &tx).await {
        Ok(false) => {}
        Ok(true) | Err(()) => return,
    }
    // Events come from this node's workers. A task running on another node
    // (several nodes on one database) wakes the watch through the
    // database's notification of its change; its progress (not its input
    // or output) is then re-read. The fallback re-read bounds the delay
    // after a lost notification.
    let mut watch = service.watch_final(&id);
    let mut poll = tokio::time::interval(service.follow_fallback());
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    poll.reset();
    loop {
        let received = tokio::select! {
            () = tx.closed() => return,
            r = events.recv() => r,
            () = watch.woken() => {
                // A wake is used once: watch anew before reading.
                watch = service.watch_final(&id);
                match reread(&service, &id, &mut seen, &tx).await {
                    Some(()) => continue,
                    None => return,
                }
            }
            _ = poll.tick() => {
                match reread(&service, &id, &mut seen, &tx).await {
                    Some(()) => continue,
                    None => return,
                }
            }
        };
        match received {
            Ok(ev) if ev.id == id => {
                if seen.insert(key(&ev.record))
                    && tx.send(transition_event(&id, &ev.record)).await.is_err()
                {
                    return;
                }
                if ev.is_final || ev.status.is_final() {
                    return;
                }
            }
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                // Events were dropped: catch up from the store.
                tracing::debug!(task_id = %id, missed, "event stream lagged; re-reading the history");
                if reread(&service, &id, &mut seen, &tx).await.is_none() {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Cancel a task.
///
/// A queued task is cancelled at once; a running one is killed by the node
/// running it. Answers 202 with the status after the request; 409 if the
/// task is already final.
#[utoipa::path(
    post,
    path = "/v1/tasks/{id}/cancel",
    tag = TAG_TASKS,
    operation_id = "cancelTask",
    params(("id" = String, Path, description = "Task id", pattern = "^[A-Za-z0-9._-]{1,256}$")),
    responses(
        (status = 202, description = "Cancelled (queued) or cancel requested (running)", body = TaskRef),
        (status = 400, description = "Invalid id", body = ErrorResponse),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorResponse),
        (status = 404, description = "No such task", body = ErrorResponse),
        (status = 409, description = "The task is already final (CONFLICT, with its `status`)", body = ErrorResponse),
        (status = 500, description = "Internal error", body = ErrorResponse),
    )
)]
pub(crate) async fn cancel_task(
    State(state): State<AppState>,
    TaskId(id): TaskId,
) -> Result<Response, ApiError> {
    let outcome = state
        .service
        .cancel(&id)
        .await
        .map_err(|e| store_error("cancelling a task failed", &e))?;
    match outcome {
        CancelOutcome::NotFound => Err(ApiError::no_task(&id)),
        CancelOutcome::AlreadyFinal(status) => Err(ApiError::conflict(format!(
            "task {id:?} is already final ({status})"
        ))
        .with_status(status)),
        CancelOutcome::CancelledQueued => {
            Ok(task_ref(StatusCode::ACCEPTED, id, TaskStatus::Cancelled))
        }
        CancelOutcome::Requested { .. } => {
            let status = current_status(&state.service, &id).await?;
            Ok(task_ref(StatusCode::ACCEPTED, id, status))
        }
    }
}

/// List the runtimes of this server and whether each is available.
#[utoipa::path(
    get,
    path = "/v1/runtimes",
    tag = TAG_SYSTEM,
    operation_id = "listRuntimes",
    responses(
        (status = 200, description = "The runtimes", body = Vec<schema::RuntimeInfo>),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorResponse),
    )
)]
pub(crate) async fn list_runtimes(State(state): State<AppState>) -> Response {
    Json(state.service.runtimes()).into_response()
}

/// Liveness: the process answers. Needs no token.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = TAG_SYSTEM,
    operation_id = "healthz",
    security(()),
    responses((status = 200, description = "Alive", body = HealthStatus))
)]
pub(crate) async fn healthz() -> Json<HealthStatus> {
    HealthStatus::ok()
}

/// Readiness: the store answers and the workers run. Needs no token.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = TAG_SYSTEM,
    operation_id = "readyz",
    security(()),
    responses(
        (status = 200, description = "Ready", body = HealthStatus),
        (status = 503, description = "Not ready (UNAVAILABLE, with the reason)", body = ErrorResponse),
    )
)]
pub(crate) async fn readyz(State(state): State<AppState>) -> Result<Json<HealthStatus>, ApiError> {
    match state.service.ready().await {
        Ok(()) => Ok(HealthStatus::ok()),
        Err(reason) => Err(ApiError::unavailable(crate::error::error_chain(&reason))),
    }
}

/// The Prometheus text exposition format.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// Metrics in the Prometheus text format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = TAG_SYSTEM,
    operation_id = "metrics",
    responses(
        (status = 200, description = "Prometheus text exposition format 0.0.4", content_type = "text/plain; version=0.0.4", body = String),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorResponse),
        (status = 404, description = "Metrics are not enabled on this server", body = ErrorResponse),
    )
)]
pub(crate) async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let Some(handle) = &state.shared.metrics else {
        return Err(ApiError::not_found(
            "metrics are not enabled on this server",
        ));
    };
    Ok((
        [(header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)],
        handle.render(),
    )
        .into_response())
}

/// This document: the OpenAPI description of the API.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = TAG_SYSTEM,
    operation_id = "openapi",
    responses(
        (status = 200, description = "The OpenAPI 3 document", content_type = "application/json", body = Object),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorResponse),
    )
)]
pub(crate) async fn openapi_json(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        state.shared.openapi_json.clone(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits() {
        assert_eq!(parse_wait("30s").expect("ok"), Duration::from_secs(30));
        assert_eq!(parse_wait("500ms").expect("ok"), Duration::from_millis(500));
        assert_eq!(parse_wait("2m").expect("ok"), Duration::from_secs(120));
        assert_eq!(parse_wait("12").expect("ok"), Duration::from_secs(12));
        assert_eq!(parse_wait("300").expect("ok"), MAX_WAIT);
        for bad in ["301s", "6m", "soon", "-1s", ""] {
            let e = parse_wait(bad).expect_err(bad);
            assert_eq!(e.detail().field.as_deref(), Some("wait"), "{bad}");
        }
    }

    #[test]
    fn list_queries() {
        let q = list_query(ListParams {
            status: Some("failed".into()),
            limit: Some("10".into()),
            runtime: Some(String::new()),
            ..ListParams::default()
        })
        .expect("valid");
        assert_eq!(q.status, Some(TaskStatus::Failed));
        assert_eq!(q.limit, 10);
        assert_eq!(q.runtime, None);
        assert_eq!(
            list_query(ListParams::default()).expect("valid").limit,
            DEFAULT_LIMIT
        );
        let e = list_query(ListParams {
            status: Some("DONE".into()),
            ..ListParams::default()
        })
        .expect_err("bad status");
        assert_eq!(e.detail().field.as_deref(), Some("status"));
        assert!(
            e.detail().message.contains("COMPLETED"),
            "{}",
            e.detail().message
        );
        for bad in ["0", "501", "x", "-1"] {
            let e = list_query(ListParams {
                limit: Some(bad.into()),
                ..ListParams::default()
            })
            .expect_err(bad);
            assert_eq!(e.detail().field.as_deref(), Some("limit"));
        }
    }
}
