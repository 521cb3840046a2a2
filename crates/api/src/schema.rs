//! OpenAPI schemas of the types other crates own (the model's task, the
//! store's record), which cannot derive [`utoipa::ToSchema`] here: mirrors
//! that exist only for the document. Their property names are checked
//! against the real types' JSON by this crate's tests; nested parts whose
//! shape is the model's business (resource requirements, retry policy,
//! results, attempt records) are documented as free-form objects.

#![allow(missing_docs)]

use std::collections::BTreeMap;

use serde::Serialize;
use utoipa::ToSchema;

/// The state of a task. Final: COMPLETED, FAILED, REJECTED, CANCELLED.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TaskStatus {
    Received,
    Preparing,
    Running,
    Completed,
    Failed,
    Rejected,
    Cancelled,
}

/// A task to execute (camelCase; unknown fields are refused).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TaskInstance {
    /// Task id, `[A-Za-z0-9._-]{1,256}`; empty or absent: assigned by the
    /// server.
    #[serde(default)]
    pub id: String,
    /// The workflow instance this task belongs to.
    pub workflow_instance_id: Option<String>,
    /// Deduplication key: a repeated submission with the same key returns
    /// the earlier task. The `Idempotency-Key` header sets it too.
    pub idempotency_key: Option<String>,
    /// Scheduling priority, -1000..=1000; higher runs first.
    #[schema(minimum = -1000, maximum = 1000)]
    #[serde(default)]
    pub priority: i32,
    /// What to run.
    pub definition: TaskDefinition,
    /// The task's input, handed to the code as JSON.
    #[serde(default)]
    pub input: serde_json::Value,
    /// How to run it.
    #[serde(default)]
    pub execution_config: ExecutionConfig,
    /// How to retry failures: `maxRetries`, `retryInterval` (ms),
    /// `backoffMultiplier`, `maxInterval`, `jitter`, `retryableErrors`.
    #[schema(value_type = Option<Object>)]
    pub retry_policy: Option<serde_json::Value>,
}

/// The code of a task and how to invoke it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TaskDefinition {
    /// Human-readable name; default `task`.
    #[schema(default = "task")]
    #[serde(default)]
    pub name: String,
    /// Runtime name (`python`, `node`, `java`, `bash`, ... see
    /// `GET /v1/runtimes`); `executionConfig.runtime` takes precedence.
    pub runtime: Option<String>,
    /// Inline source code; exclusive with `files`.
    pub code: Option<String>,
    /// Source files; exclusive with `code`.
    #[serde(default)]
    pub files: Vec<TaskFile>,
    /// With `files`: the file to run.
    pub entrypoint: Option<String>,
    /// `script` (default) or `handler`.
    #[serde(default)]
    pub mode: Mode,
    /// JSON Schema the input must satisfy.
    #[schema(value_type = Option<Object>)]
    pub input_schema: Option<serde_json::Value>,
    /// JSON Schema the output must satisfy.
    #[schema(value_type = Option<Object>)]
    pub output_schema: Option<serde_json::Value>,
    /// Modules to import before the handler's file is loaded (handler mode,
    /// python), by dotted name, at most 16; resolved against the
    /// interpreter's own library paths, never the task's files. A warm
    /// executor imports them once, in a fork server of their own.
    #[schema(max_items = 16)]
    #[serde(default)]
    pub preload: Vec<String>,
}

/// How the code is invoked.
#[derive(Debug, Clone, Copy, Default, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Script,
    Handler,
}

/// One source file of a task.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TaskFile {
    /// Relative path, e.g. `src/main.py`.
    pub name: String,
    /// File content.
    pub content: String,
}

/// How to run a task.
#[derive(Debug, Default, Serialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExecutionConfig {
    /// Runtime name; takes precedence over `definition.runtime`.
    pub runtime: Option<String>,
    /// Execution method.
    #[serde(default)]
    pub method: Method,
    /// Requested resources: `cpu`, `cpuLimit`, `memory`, `disk` (quantities
    /// such as `"500m"`, `"256Mi"`), `timeoutSeconds`, `cpuTimeSeconds`,
    /// `pids`, `outputBytes`.
    #[schema(value_type = Object)]
    #[serde(default)]
    pub resource_requirements: serde_json::Value,
    /// Security settings: `runAs`, `permissions`, `securityLevel`.
    #[schema(value_type = Object)]
    #[serde(default)]
    pub security_context: serde_json::Value,
    /// Extra environment variables.
    #[serde(default)]
    pub environment_variables: BTreeMap<String, String>,
}

/// Execution method.
#[derive(Debug, Clone, Copy, Default, Serialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Method {
    #[default]
    Auto,
    Container,
    InProcess,
    Faas,
}

/// One lifecycle transition.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TransitionRecord {
    /// The previous state; null for the first (RECEIVED) record.
    pub from: Option<TaskStatus>,
    /// The new state.
    pub to: TaskStatus,
    /// When (RFC 3339).
    #[schema(format = DateTime)]
    pub at: String,
    /// The attempt number after the transition (0 before the first).
    pub attempt: u32,
    /// Why.
    pub reason: String,
}

/// The data of a `transition` server-sent event: a transition of task
/// `taskId`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TransitionEvent {
    /// The task.
    pub task_id: String,
    /// The previous state; null for the first (RECEIVED) record.
    pub from: Option<TaskStatus>,
    /// The new state.
    pub to: TaskStatus,
    /// When (RFC 3339).
    #[schema(format = DateTime)]
    pub at: String,
    /// The attempt number after the transition.
    pub attempt: u32,
    /// Why.
    pub reason: String,
}

/// Everything stored about a task.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskRecord {
    /// The task as submitted (id assigned).
    pub task: TaskInstance,
    /// Current status.
    pub status: TaskStatus,
    /// Attempts started so far.
    pub attempt: u32,
    /// Runtime name.
    pub runtime: String,
    /// Waiting in the queue.
    pub queued: bool,
    /// The node running it, once claimed.
    pub node: Option<String>,
    /// Submission time (RFC 3339).
    #[schema(format = DateTime)]
    pub submitted_at: String,
    /// Last change (RFC 3339).
    #[schema(format = DateTime)]
    pub updated_at: String,
    /// A cancel was requested.
    pub cancel_requested: bool,
    /// Every transition so far, oldest first.
    pub history: Vec<TransitionRecord>,
    /// Every finished attempt: `attempt`, `status`, `error`, `startTime`,
    /// `endTime`, `durationMs`, `exitCode`, `signal`, `stderrTail`, `phases`.
    #[schema(value_type = Vec<Object>)]
    pub attempts: Vec<serde_json::Value>,
    /// The final result once final: `taskId`, `status`, `output`, `error`,
    /// `stdout`, `stderr`, `stdoutTruncated`, `stderrTruncated`, `exitCode`,
    /// `signal`, `executionMetadata`, `history`.
    #[schema(value_type = Option<Object>)]
    pub result: Option<serde_json::Value>,
}

/// A row of a task listing.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskSummary {
    pub id: String,
    pub status: TaskStatus,
    pub runtime: String,
    pub workflow_instance_id: Option<String>,
    pub priority: i32,
    /// Attempts started.
    pub attempt: u32,
    #[schema(format = DateTime)]
    pub submitted_at: String,
    #[schema(format = DateTime)]
    pub updated_at: String,
}

/// One page of a task listing, newest first.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ListPage {
    pub items: Vec<TaskSummary>,
    /// Pass as `cursor` to get the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// A runtime of this server.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeInfo {
    /// Runtime name, as used in `definition.runtime`.
    pub name: String,
    /// Its interpreter was found on this host.
    pub available: bool,
    /// Interpreter path.
    pub interpreter: Option<String>,
    /// Supports `mode: handler`.
    pub handler_mode: bool,
    /// File extensions of its sources.
    pub extensions: Vec<String>,
    /// Why it is unavailable.
    pub error: Option<String>,
}

/// The answer of `POST /v1/tasks` with status 200: the whole record when
/// `wait` saw the task finish, else (an idempotent repeat) its reference.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum SubmitOk {
    Finished(Box<TaskRecord>),
    Existing(crate::handlers::TaskRef),
}
