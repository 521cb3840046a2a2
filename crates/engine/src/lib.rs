//! The task lifecycle pipeline of taskexec: validate, prepare, run in the
//! sandbox, classify, validate output, retry with backoff, cancel; every
//! transition on the record.
//!
//! [`Engine::execute`] is the one entry point, used by `taskexec run` and by
//! the service. It never returns an `Err`: whatever happens becomes a
//! [`TaskResult`] with a final status and, unless completed, an error of the
//! seed's table.

pub mod classify;
pub mod clock;
pub mod limiter;
pub mod prepare;
pub mod pressure;
pub mod schema;
pub mod service;

use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use taskexec_model::{
    AttemptRecord, ErrorType, FieldError, Lifecycle, Limits, LimitsConfig, LimitsHit, Method,
    PhaseTimings, RetryLimits, RunAs, TaskError, TaskInstance, TaskOutput, TaskResult, TaskStatus,
    ValidRetryPolicy, format_bytes,
};
use taskexec_runtimes::{Catalogue, Plan, ResolvedRuntime, RuntimeError};
use taskexec_sandbox::{
    CancelToken, RunOutcome, RunRequest, Sandbox, SandboxError, Termination, WarmStats,
};
use tokio::sync::watch;
use tracing::{Instrument, debug, info, warn};

pub use classify::{Verdict, classify};
pub use clock::{Clock, ManualClock, SystemClock};
pub use schema::{PoolConfig, SchemaCache, SchemaLimits, ValidationPool, Violation, Violations};

use crate::prepare::CompileCache;

/// Runs one sandboxed process. The real implementation is [`Sandbox`]; tests
/// script failures (environment setup errors) that a real host cannot be
/// made to produce on demand.
pub trait AttemptRunner: Send + Sync + Debug {
    /// Runs `req` to its end (blocking).
    fn run(&self, req: &RunRequest, cancel: &CancelToken) -> Result<RunOutcome, SandboxError>;
    /// Describes the environment, e.g. "container (cgroup v1)".
    fn describe(&self) -> String;
    /// Stops what the runner keeps running between tasks (fork servers,
    /// pre-built sandboxes) and waits until it is gone.
    fn shutdown(&self) {}
    /// The warm runner's counters and gauges; `None` for a runner that
    /// keeps nothing warm. May block briefly (call it off the async
    /// executor's threads).
    fn warm_stats(&self) -> Option<WarmStats> {
        None
    }
}

impl AttemptRunner for Sandbox {
    fn run(&self, req: &RunRequest, cancel: &CancelToken) -> Result<RunOutcome, SandboxError> {
        Sandbox::run(self, req, Some(cancel))
    }

    fn describe(&self) -> String {
        format!("container ({})", self.cgroups().version())
    }
}

impl AttemptRunner for taskexec_sandbox::WarmSandbox {
    fn run(&self, req: &RunRequest, cancel: &CancelToken) -> Result<RunOutcome, SandboxError> {
        taskexec_sandbox::WarmSandbox::run(self, req, Some(cancel))
    }

    fn describe(&self) -> String {
        format!("container ({}, warm)", self.sandbox().cgroups().version())
    }

    fn shutdown(&self) {
        taskexec_sandbox::WarmSandbox::shutdown(self)
    }

    fn warm_stats(&self) -> Option<WarmStats> {
        Some(taskexec_sandbox::WarmSandbox::stats(self))
    }
}

/// Operator settings of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Resource defaults and maxima.
    pub limits: LimitsConfig,
    /// Retry policy maxima.
    pub retry_limits: RetryLimits,
    /// The uids a task may ask for with `securityContext.runAs` (gid = uid).
    /// The default, 60000 to 65534, keeps clear of the accounts
    /// distributions hand out to people and services.
    pub run_as: std::ops::RangeInclusive<u32>,
    /// Complexity limits of `inputSchema` and `outputSchema`.
    pub schema_limits: SchemaLimits,
    /// The threads, queue and time budget of schema validation.
    pub validation: PoolConfig,
    /// The largest output stored as a task's result, in bytes of compact
    /// JSON: a larger one fails the attempt (RESOURCE_EXHAUSTION) instead
    /// of being stored.
    pub max_result_bytes: u64,
}

/// The default of [`EngineConfig::max_result_bytes`]: 16 MiB.
pub const DEFAULT_MAX_RESULT_BYTES: u64 = 16 << 20;

/// Bytes of the executor's memory a value of a parsed output costs at most
/// (a `serde_json::Value` is 32 bytes, an array's spare capacity or an
/// object's entry and key as much again), for admission.
pub const TREE_VALUE_BYTES: u64 = 64;

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            limits: LimitsConfig::default(),
            retry_limits: RetryLimits::default(),
            run_as: 60000..=65534,
            schema_limits: SchemaLimits::default(),
            validation: PoolConfig::default(),
            max_result_bytes: DEFAULT_MAX_RESULT_BYTES,
        }
    }
}

/// A cancellation handle for one task: cancels the running sandbox at once
/// and wakes a task waiting out a backoff delay. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Cancellation {
    token: CancelToken,
    tx: Arc<watch::Sender<bool>>,
    /// Cancelled because its node no longer holds the task's lease
    /// ([`Cancellation::fence`]), not at anyone's request.
    fenced: Arc<std::sync::atomic::AtomicBool>,
}

impl Cancellation {
    /// A fresh, uncancelled handle.
    pub fn new() -> std::io::Result<Self> {
        let (tx, _rx) = watch::channel(false);
        Ok(Self {
            token: CancelToken::new()?,
            tx: Arc::new(tx),
            fenced: Arc::default(),
        })
    }

    /// Cancels the task.
    pub fn cancel(&self) {
        self.token.cancel();
        self.tx.send_replace(true);
    }

    /// Stops the task because its node lost (or may have lost) the task's
    /// lease: the sandbox is killed as by [`Cancellation::cancel`], and
    /// [`Cancellation::is_fenced`] tells the attempt's owner to record
    /// nothing (the task's new holder does). Returns whether this call
    /// fenced it (false if it already was).
    pub fn fence(&self) -> bool {
        let first = !self.fenced.swap(true, std::sync::atomic::Ordering::SeqCst);
        self.cancel();
        first
    }

    /// Whether the task was fenced ([`Cancellation::fence`]).
    pub fn is_fenced(&self) -> bool {
        self.fenced.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether the task was cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    async fn cancelled(&self) {
        let mut rx = self.tx.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }
}

/// A task refused before anything ran.
#[derive(Debug, Clone)]
struct Rejection {
    error: TaskError,
}

impl Rejection {
    fn field(e: FieldError) -> Self {
        let error = TaskError::new(ErrorType::InputValidation, e.to_string())
            .with_details(json!({"field": e.field}));
        Self { error }
    }
}

/// A task that passed every check, ready for attempts: resolved limits,
/// retry policy, runtime and plan, compiled output schema, user.
#[derive(Debug)]
pub struct Prepared {
    limits: Limits,
    retry: ValidRetryPolicy,
    runtime: Arc<ResolvedRuntime>,
    plan: Plan,
    input_schema: Option<Arc<jsonschema::Validator>>,
    output_schema: Option<Arc<jsonschema::Validator>>,
    /// `securityContext.runAs`, resolved to (uid, gid).
    user: Option<(u32, u32)>,
}

/// Resolves `securityContext.runAs`: a uid within the operator's `allowed`
/// range (gid = uid), or the names "nobody" / "sandbox", which ask for the
/// default: a task uid of the task's own, leased for the run (`None`), never
/// the host's shared `nobody`. Root is always refused.
fn resolve_run_as(
    run_as: Option<&RunAs>,
    allowed: &std::ops::RangeInclusive<u32>,
) -> Result<Option<(u32, u32)>, FieldError> {
    const FIELD: &str = "executionConfig.securityContext.runAs";
    match run_as {
        None => Ok(None),
        Some(RunAs::Name(n)) if n == "nobody" || n == "sandbox" => Ok(None),
        Some(RunAs::Name(n)) => Err(FieldError::new(
            FIELD,
            format!(
                "unknown user {n:?}; expected a numeric uid from 1 to 4294967294, or \"nobody\""
            ),
        )),
        Some(RunAs::Uid(uid)) => match u32::try_from(*uid) {
            Ok(0) => Err(FieldError::new(
                FIELD,
                "tasks never run as root (uid 0); expected a uid from 1 to 4294967294",
            )),
            Ok(u) if allowed.contains(&u) => Ok(Some((u, u))),
            Ok(u) => Err(FieldError::new(
                FIELD,
                format!(
                    "uid {u} is not allowed on this executor; expected a uid from {} to {}, or \"nobody\"",
                    allowed.start(),
                    allowed.end()
                ),
            )),
            _ => Err(FieldError::new(
                FIELD,
                format!("{uid} is out of range; expected a uid from 1 to 4294967294"),
            )),
        },
    }
}

impl Prepared {
    /// The resolved limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The validated retry policy.
    pub fn retry(&self) -> &ValidRetryPolicy {
        &self.retry
    }

    /// The runtime's name.
    pub fn runtime_name(&self) -> &str {
        &self.runtime.spec.name
    }

    /// The memory the task holds at its peak, for admission: its limit, or
    /// its compile step's (Java's javac, 512 MiB by default) when that is
    /// larger — the steps run one after the other, each under its own
    /// limit — plus what the executor may spend on its output
    /// ([`Self::output_memory_bytes`]). Counted even when the compiled
    /// classes will come from the cache: admission cannot know that ahead.
    pub fn admitted_memory_bytes(&self) -> u64 {
        let compile = self.plan.compile.as_ref().map_or(0, |c| c.memory_bytes);
        self.limits
            .memory_bytes
            .max(compile)
            .saturating_add(self.output_memory_bytes())
    }

    /// The executor's own memory for the task's output at most, outside the
    /// task's cgroup: stdout, stderr, the output file and the error file
    /// read back (`outputBytes` each), stdout and stderr decoded into the
    /// result (twice more), the output as compact text (once more); and,
    /// with an `outputSchema`, the tree the schema is checked on, at most
    /// [`taskexec_model::max_tree_values`] values of [`TREE_VALUE_BYTES`].
    pub fn output_memory_bytes(&self) -> u64 {
        let bytes = self.limits.output_bytes;
        let tree = if self.output_schema.is_some() {
            taskexec_model::max_tree_values(bytes).saturating_mul(TREE_VALUE_BYTES)
        } else {
            0
        };
        bytes.saturating_mul(7).saturating_add(tree)
    }
}

/// Everything one attempt produced.
#[derive(Debug, Clone)]
pub struct AttemptOutput {
    /// The verdict, after output validation.
    pub verdict: Verdict,
    /// The attempt's record (status, error, timings, stderr tail).
    pub record: AttemptRecord,
    /// Captured stdout (capped).
    pub stdout: String,
    /// Captured stderr (capped).
    pub stderr: String,
    /// Stdout went past its cap.
    pub stdout_truncated: bool,
    /// Stderr went past its cap.
    pub stderr_truncated: bool,
    /// CPU time of the attempt.
    pub cpu_time_ms: Option<u64>,
    /// Peak memory of the attempt.
    pub peak_memory_bytes: Option<u64>,
    /// The limits the attempt reached (see [`classify::limits_hit`]).
    pub limits_hit: LimitsHit,
    /// Time from the start of the sandbox run to the exec of the task's
    /// code, when it got that far: the start latency the service's
    /// concurrency limiter watches.
    pub sandbox_start: Option<Duration>,
}

/// What follows a failed attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Try again after `delay`.
    Retry {
        /// The backoff delay (jitter applied).
        delay: Duration,
    },
    /// Stop: the task ends with this status and error.
    Final {
        /// FAILED or CANCELLED.
        status: TaskStatus,
        /// The error to report.
        error: TaskError,
    },
}

/// Folds one attempt into the task's result (last attempt's output wins).
pub fn apply_attempt(result: &mut TaskResult, out: &AttemptOutput) {
    result.execution_metadata.attempts.push(out.record.clone());
    add_phases(&mut result.execution_metadata.phases, &out.record.phases);
    result.stdout = out.stdout.clone();
    result.stderr = out.stderr.clone();
    result.stdout_truncated = out.stdout_truncated;
    result.stderr_truncated = out.stderr_truncated;
    result.exit_code = out.record.exit_code;
    result.signal = out.record.signal.clone();
    if out.cpu_time_ms.is_some() {
        result.execution_metadata.cpu_time_ms = out.cpu_time_ms;
        result.execution_metadata.peak_memory_bytes = out.peak_memory_bytes;
        result.execution_metadata.limits_hit = out.limits_hit;
    }
}

/// The error of a cancelled task.
pub fn cancelled_error() -> TaskError {
    TaskError::new(ErrorType::Cancelled, "the task was cancelled")
}

/// The lifecycle pipeline.
#[derive(Debug)]
pub struct Engine {
    config: EngineConfig,
    catalogue: Catalogue,
    runner: Arc<dyn AttemptRunner>,
    clock: Arc<dyn Clock>,
    schemas: SchemaCache,
    validation: ValidationPool,
    compiled: CompileCache,
    /// Runtimes resolved on this host, by name: finding and canonicalizing
    /// interpreters and expanding mount patterns is start-up work, not
    /// per-task work.
    resolved: std::sync::Mutex<std::collections::HashMap<String, Arc<ResolvedRuntime>>>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Engine {
    /// An engine running tasks through `runner`.
    pub fn new(
        config: EngineConfig,
        catalogue: Catalogue,
        runner: Arc<dyn AttemptRunner>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            schemas: SchemaCache::new(config.schema_limits),
            validation: ValidationPool::new(config.validation),
            config,
            catalogue,
            runner,
            clock,
            compiled: CompileCache::default(),
            resolved: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Stops the runner's fork servers and pre-built sandboxes (see
    /// [`AttemptRunner::shutdown`]); tasks still run afterwards, cold.
    pub fn shutdown(&self) {
        self.runner.shutdown();
    }

    /// The warm runner's counters and gauges (see
    /// [`AttemptRunner::warm_stats`]); blocking.
    pub fn warm_stats(&self) -> Option<WarmStats> {
        self.runner.warm_stats()
    }

    /// The runtime catalogue.
    pub fn catalogue(&self) -> &Catalogue {
        &self.catalogue
    }

    /// The compiled-schema cache.
    pub fn schemas(&self) -> &SchemaCache {
        &self.schemas
    }

    /// Checks a task without running it: `Err` is the REJECTED result's error.
    pub async fn check(&self, task: &mut TaskInstance) -> Result<(), TaskError> {
        let prepared = self.prepare(task)?;
        self.validate_input(task, &prepared).await
    }

    /// Validates the task's input against `definition.inputSchema` on the
    /// validation pool, within its time budget: `Err` is the REJECTED
    /// result's error (INPUT_VALIDATION). The input is moved to the pool
    /// and back; it is `null` after a validation that ran out of budget
    /// (the task is rejected then).
    pub async fn validate_input(
        &self,
        task: &mut TaskInstance,
        p: &Prepared,
    ) -> Result<(), TaskError> {
        let Some(schema) = &p.input_schema else {
            return Ok(());
        };
        let input = std::mem::take(&mut task.input);
        let (input, violations) = self
            .validation
            .validate(Arc::clone(schema), input)
            .await
            .map_err(|e| {
                TaskError::new(
                    ErrorType::InputValidation,
                    format!("the input could not be checked against definition.inputSchema: {e}"),
                )
                .with_details(json!({"field": "definition.inputSchema"}))
            })?;
        task.input = input;
        if violations.is_empty() {
            return Ok(());
        }
        let n = violations.len();
        Err(TaskError::new(
            ErrorType::InputValidation,
            format!(
                "the input does not match definition.inputSchema ({n} violation{})",
                if n == 1 { "" } else { "s" }
            ),
        )
        .with_details(json!({"field": "input", "violations": capped(violations)})))
    }

    /// The runtime `name` as found on this host, resolved once and cached
    /// (failures are not cached: an interpreter installed later is found).
    fn resolve(&self, name: &str) -> Result<Arc<ResolvedRuntime>, RuntimeError> {
        let mut cache = self.resolved.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rt) = cache.get(name) {
            return Ok(Arc::clone(rt));
        }
        let rt = Arc::new(self.catalogue.resolve(name)?);
        cache.insert(name.to_string(), Arc::clone(&rt));
        Ok(rt)
    }

    /// Validates and plans a task, compiling its schemas; `Err` is the
    /// error of a REJECTED task. The input is checked against its schema
    /// separately, by [`Self::validate_input`] (on the validation pool).
    pub fn prepare(&self, task: &TaskInstance) -> Result<Prepared, TaskError> {
        self.prepare_inner(task).map_err(|r| r.error)
    }

    fn prepare_inner(&self, task: &TaskInstance) -> Result<Prepared, Rejection> {
        let validated = task
            .validate(&self.config.limits, &self.config.retry_limits)
            .map_err(Rejection::field)?;
        match task.execution_config.method {
            Method::Auto | Method::Container => {}
            other => {
                return Err(Rejection::field(FieldError::new(
                    "executionConfig.method",
                    format!(
                        "{other:?} is not available on this executor; expected AUTO or CONTAINER"
                    ),
                )));
            }
        }
        let security = &task.execution_config.security_context;
        let user = resolve_run_as(security.run_as.as_ref(), &self.config.run_as)
            .map_err(Rejection::field)?;
        if let Some(p) = security
            .permissions
            .iter()
            .find(|p| p.as_str() == "network")
        {
            return Err(Rejection::field(FieldError::new(
                "executionConfig.securityContext.permissions",
                format!(
                    "permission {p:?} is not available on this executor yet: tasks get a private network namespace with loopback only; expected no permissions"
                ),
            )));
        }
        let names = || self.catalogue.names().collect::<Vec<_>>().join(", ");
        let name = task.runtime().ok_or_else(|| {
            Rejection::field(FieldError::new(
                "executionConfig.runtime",
                format!("no runtime given; expected one of: {}", names()),
            ))
        })?;
        let runtime = self.resolve(name).map_err(|e| match e {
            RuntimeError::Unknown { .. } => Rejection::field(FieldError::new(
                "executionConfig.runtime",
                format!("unknown runtime {name:?}; expected one of: {}", names()),
            )),
            other => Rejection {
                error: TaskError::new(ErrorType::EnvironmentSetup, other.to_string())
                    .with_details(json!({"field": "executionConfig.runtime"})),
            },
        })?;
        let compile = |field: &str, schema: &Value| {
            self.schemas
                .compile(schema)
                .map_err(|e| Rejection::field(FieldError::new(field, format!("{e}"))))
        };
        let input_schema = task
            .definition
            .input_schema
            .as_ref()
            .map(|s| compile("definition.inputSchema", s))
            .transpose()?;
        let output_schema = task
            .definition
            .output_schema
            .as_ref()
            .map(|s| compile("definition.outputSchema", s))
            .transpose()?;
        let plan =
            taskexec_runtimes::plan(&runtime, &task.definition, validated.limits.memory_bytes)
                .map_err(|e| Rejection::field(FieldError::new(e.field(), e.to_string())))?;
        Ok(Prepared {
            limits: validated.limits,
            retry: validated.retry,
            runtime,
            plan,
            input_schema,
            output_schema,
            user,
        })
    }

    /// Runs a task through its whole lifecycle. Logs carry the task id
    /// (span `task`) and, per attempt, the attempt number and phase timings.
    pub async fn execute(&self, mut task: TaskInstance, cancel: &Cancellation) -> TaskResult {
        if task.id.is_empty() {
            task.id = uuid::Uuid::new_v4().to_string();
        }
        let span = tracing::info_span!("task", task_id = %task.id);
        self.execute_inner(task, cancel).instrument(span).await
    }

    async fn execute_inner(&self, mut task: TaskInstance, cancel: &Cancellation) -> TaskResult {
        let clock = &self.clock;
        let start = clock.now();
        let t_start = Instant::now();
        let mut lc = Lifecycle::new(start);
        let mut result = TaskResult::new(task.id.clone(), TaskStatus::Received);
        result.execution_metadata.method = Method::Container;
        result.execution_metadata.execution_environment = self.runner.describe();
        result.execution_metadata.start_time = Some(start);
        self.step(&mut lc, TaskStatus::Preparing, "validating the task");

        let t_prep = Instant::now();
        let prepared = match self.prepare(&task) {
            Ok(p) => match self.validate_input(&mut task, &p).await {
                Ok(()) => Ok(p),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        let prepared = match prepared {
            Ok(p) => p,
            Err(error) => {
                info!(error = %error.message, "task rejected");
                self.step(&mut lc, TaskStatus::Rejected, &error.message);
                result.status = TaskStatus::Rejected;
                result.error = Some(error);
                result.execution_metadata.phases.prepare_ms = ms(t_prep.elapsed());
                return self.finish(result, lc, t_start);
            }
        };
        result.execution_metadata.execution_environment = self.environment_of(&prepared);
        result.execution_metadata.phases.prepare_ms = ms(t_prep.elapsed());

        let mut attempt_errors: Vec<TaskError> = Vec::new();
        loop {
            let attempt = lc.attempt();
            self.step(
                &mut lc,
                TaskStatus::Running,
                &format!("attempt {attempt} started"),
            );
            let out = self.run_attempt(&task, &prepared, attempt, cancel).await;
            apply_attempt(&mut result, &out);
            match out.verdict {
                Verdict::Completed { output } => {
                    self.step(
                        &mut lc,
                        TaskStatus::Completed,
                        &format!("attempt {attempt} completed"),
                    );
                    result.status = TaskStatus::Completed;
                    result.output = output;
                    result.error = None;
                    break;
                }
                Verdict::Failed(error) => {
                    attempt_errors.push(error.clone());
                    match self.decide(
                        &prepared,
                        &error,
                        attempt,
                        &attempt_errors,
                        cancel.is_cancelled(),
                    ) {
                        Decision::Retry { delay } => {
                            self.step(
                                &mut lc,
                                TaskStatus::Preparing,
                                &format!(
                                    "retry after {} (backoff {} ms)",
                                    error.error_type,
                                    delay.as_millis()
                                ),
                            );
                            let cancelled = tokio::select! {
                                () = clock.sleep(delay) => false,
                                () = cancel.cancelled() => true,
                            };
                            if cancelled {
                                self.step(
                                    &mut lc,
                                    TaskStatus::Cancelled,
                                    "cancelled during the backoff wait",
                                );
                                result.status = TaskStatus::Cancelled;
                                result.error = Some(cancelled_error());
                                break;
                            }
                        }
                        Decision::Final { status, error } => {
                            self.step(&mut lc, status, &error.message);
                            result.status = status;
                            result.error = Some(error);
                            break;
                        }
                    }
                }
            }
        }
        self.finish(result, lc, t_start)
    }

    fn step(&self, lc: &mut Lifecycle, to: TaskStatus, reason: &str) {
        if let Err(e) = lc.transition(to, self.clock.now(), reason) {
            // The pipeline only makes legal moves; a bug if not.
            warn!(error = %e, "illegal lifecycle transition");
        }
    }

    /// The `executionEnvironment` string of a prepared task.
    pub fn environment_of(&self, p: &Prepared) -> String {
        format!("{}/{}", self.runner.describe(), p.runtime.spec.name)
    }

    /// What to do after a failed attempt: retry after a delay (per the
    /// policy and the error table), or end with a final status and error
    /// (MAX_RETRIES_EXCEEDED wraps the last error once retries ran out).
    /// Logs a warning for each retry.
    pub fn decide(
        &self,
        p: &Prepared,
        error: &TaskError,
        attempt: u32,
        attempt_errors: &[TaskError],
        cancelled: bool,
    ) -> Decision {
        if error.error_type == ErrorType::Cancelled || cancelled {
            return Decision::Final {
                status: TaskStatus::Cancelled,
                error: cancelled_error(),
            };
        }
        if p.retry.should_retry(error.error_type, attempt) {
            let delay = p
                .retry
                .delay(attempt.saturating_sub(1), self.clock.random_unit());
            warn!(
                attempt,
                error_type = %error.error_type,
                delay_ms = delay.as_millis() as u64,
                "retrying task (attempt {}) after {}: {}",
                attempt,
                error.error_type,
                error.message
            );
            return Decision::Retry { delay };
        }
        // Retries ran out only if this error was one the policy retries.
        let error = if attempt > 1 && p.retry.should_retry(error.error_type, 0) {
            max_retries_exceeded(error, attempt_errors)
        } else {
            error.clone()
        };
        Decision::Final {
            status: TaskStatus::Failed,
            error,
        }
    }

    /// One attempt, start to verdict: compile when needed (cached), run in
    /// the sandbox, classify, validate the output against the schema.
    pub async fn run_attempt(
        &self,
        task: &TaskInstance,
        p: &Prepared,
        attempt: u32,
        cancel: &Cancellation,
    ) -> AttemptOutput {
        let a_start = self.clock.now();
        let t_attempt = Instant::now();
        let (verdict, outcome, mut phases) = self
            .attempt(task, p, attempt, cancel)
            .instrument(tracing::info_span!("attempt", attempt))
            .await;
        let verdict = match verdict {
            Verdict::Completed { output } => {
                let t_val = Instant::now();
                let checked = check_output(
                    output,
                    p.limits.output_bytes,
                    self.config.max_result_bytes,
                    p.output_schema.is_some(),
                )
                .await;
                let v = match (checked, &p.output_schema) {
                    (Err(e), _) => Verdict::Failed(e),
                    (Ok((output, Some(tree))), Some(schema)) => {
                        match self.validation.validate(Arc::clone(schema), tree).await {
                            Ok((tree, violations)) if violations.is_empty() => {
                                drop_off_thread(tree);
                                Verdict::Completed { output }
                            }
                            // The output is not repeated in the error: it
                            // can be as large as outputBytes, and the error
                            // is stored with the attempt and the result.
                            Ok((tree, violations)) => {
                                drop_off_thread(tree);
                                Verdict::Failed(
                                TaskError::new(
                                    ErrorType::OutputValidation,
                                    format!(
                                        "the output does not match definition.outputSchema ({} violations)",
                                        violations.len()
                                    ),
                                )
                                .with_details(json!({"violations": capped(violations)})),
                            )
                            }
                            Err(e) => Verdict::Failed(
                                TaskError::new(
                                    ErrorType::OutputValidation,
                                    format!(
                                        "the output could not be checked against definition.outputSchema: {e}"
                                    ),
                                )
                                .with_details(json!({"field": "definition.outputSchema"})),
                            ),
                        }
                    }
                    (Ok((output, _)), _) => Verdict::Completed { output },
                };
                phases.output_validation_ms = ms(t_val.elapsed());
                v
            }
            failed => failed,
        };
        let status = match &verdict {
            Verdict::Completed { .. } => TaskStatus::Completed,
            Verdict::Failed(e) if e.error_type == ErrorType::Cancelled => TaskStatus::Cancelled,
            Verdict::Failed(_) => TaskStatus::Failed,
        };
        let mut record = AttemptRecord {
            attempt,
            status,
            error: match &verdict {
                Verdict::Failed(e) => Some(e.clone()),
                Verdict::Completed { .. } => None,
            },
            start_time: a_start,
            end_time: self.clock.now(),
            duration_ms: ms(t_attempt.elapsed()),
            exit_code: None,
            signal: None,
            stderr_tail: String::new(),
            phases: phases.clone(),
        };
        let mut out = AttemptOutput {
            verdict,
            record: record.clone(),
            stdout: String::new(),
            stderr: String::new(),
            stdout_truncated: false,
            stderr_truncated: false,
            cpu_time_ms: None,
            peak_memory_bytes: None,
            limits_hit: LimitsHit::default(),
            sandbox_start: None,
        };
        if let Some(o) = &outcome {
            // Zero when the task's code never started.
            out.sandbox_start = Some(o.setup_time).filter(|d| !d.is_zero());
            if let Termination::Exited(status) = o.termination {
                match status {
                    taskexec_sandbox::ExitStatus::Code(c) => record.exit_code = Some(c),
                    taskexec_sandbox::ExitStatus::Signal(s) => {
                        record.signal = Some(taskexec_sandbox::signal_name(s))
                    }
                }
            }
            record.stderr_tail = classify::tail(&o.stderr, 1024);
            out.stdout = String::from_utf8_lossy(&o.stdout).into_owned();
            out.stderr = String::from_utf8_lossy(&o.stderr).into_owned();
            out.stdout_truncated = o.stdout_truncated;
            out.stderr_truncated = o.stderr_truncated;
            out.cpu_time_ms = Some(o.stats.cpu_time.as_millis() as u64);
            out.peak_memory_bytes = o.stats.peak_memory_bytes;
            out.limits_hit = classify::limits_hit(o, &p.limits);
        }
        debug!(
            attempt,
            status = %status,
            prepare_ms = phases.prepare_ms,
            compile_ms = phases.compile_ms,
            run_ms = phases.run_ms,
            output_validation_ms = phases.output_validation_ms,
            cleanup_ms = phases.cleanup_ms,
            "attempt finished"
        );
        out.record = record;
        out
    }

    fn finish(&self, mut result: TaskResult, lc: Lifecycle, t_start: Instant) -> TaskResult {
        result.execution_metadata.end_time = Some(self.clock.now());
        result.execution_metadata.duration = ms(t_start.elapsed());
        result.history = lc.into_history();
        info!(
            task_id = %result.task_id,
            status = %result.status,
            error_type = result.error.as_ref().map(|e| e.error_type.as_str()).unwrap_or(""),
            duration_ms = result.execution_metadata.duration,
            "task finished"
        );
        result
    }

    /// One attempt: compile when needed (cached), then run, then classify.
    async fn attempt(
        &self,
        task: &TaskInstance,
        p: &Prepared,
        attempt: u32,
        cancel: &Cancellation,
    ) -> (Verdict, Option<RunOutcome>, PhaseTimings) {
        let mut phases = PhaseTimings::default();
        let mut classes = None;
        if let Some(step) = &p.plan.compile {
            let t = Instant::now();
            let key = CompileCache::key(step, &p.plan, p.runtime.compiler.as_deref());
            let artifacts = match self.compiled.get(&key) {
                Some(a) => a,
                None => {
                    let req = prepare::compile_request(
                        task, p.user, &p.runtime, &p.plan, step, &p.limits,
                    );
                    let outcome = match self.run_blocking(req, cancel).await {
                        Ok(o) => o,
                        Err(e) => return (Verdict::Failed(setup_error(&e)), None, phases),
                    };
                    phases.compile_ms = ms(t.elapsed());
                    let compile_limits = Limits {
                        memory_bytes: step.memory_bytes,
                        timeout: step.timeout,
                        pids: step.pids,
                        cpu_time: None,
                        ..p.limits
                    };
                    match compile_verdict(&outcome, &compile_limits) {
                        Some(err) => return (Verdict::Failed(err), Some(outcome), phases),
                        None => {
                            let a = Arc::new(outcome.collected);
                            self.compiled.put(key, Arc::clone(&a));
                            a
                        }
                    }
                }
            };
            phases.compile_ms = ms(t.elapsed());
            classes = Some((step.output_dir.clone(), artifacts));
        }
        let t = Instant::now();
        let req = prepare::run_request(
            task,
            p.user,
            &p.runtime,
            &p.plan,
            &p.limits,
            attempt,
            classes
                .as_ref()
                .map(|(dir, files)| (relative(dir), files.as_ref())),
        );
        phases.prepare_ms = ms(t.elapsed());
        match self.run_blocking(req, cancel).await {
            Ok(outcome) => {
                for (name, d) in &outcome.phases {
                    phases.sandbox.insert((*name).to_string(), ms(*d));
                }
                let sandbox_ms = |k: &str| phases.sandbox.get(k).copied().unwrap_or(0.0);
                phases.prepare_ms += ms(outcome.setup_time);
                phases.run_ms = ms(outcome.run_time);
                phases.cleanup_ms = sandbox_ms("teardown") + sandbox_ms("cleanup");
                let (verdict, outcome) = classify_off_thread(outcome, p.limits).await;
                (verdict, outcome, phases)
            }
            Err(e) => (Verdict::Failed(setup_error(&e)), None, phases),
        }
    }

    async fn run_blocking(
        &self,
        req: RunRequest,
        cancel: &Cancellation,
    ) -> Result<RunOutcome, SandboxError> {
        let runner = Arc::clone(&self.runner);
        let token = cancel.token.clone();
        match tokio::task::spawn_blocking(move || runner.run(&req, &token)).await {
            Ok(r) => r,
            Err(e) => Err(SandboxError::Protocol(format!(
                "sandbox thread failed: {e}"
            ))),
        }
    }
}

/// [`classify`] on a blocking thread (it parses the output, CPU work
/// proportional to its size). The output file's bytes are dropped from the
/// returned outcome once classified (the verdict holds the output; its
/// `truncated` flag stays for [`classify::limits_hit`]).
async fn classify_off_thread(
    mut outcome: RunOutcome,
    limits: Limits,
) -> (Verdict, Option<RunOutcome>) {
    let job = tokio::task::spawn_blocking(move || {
        let verdict = classify(&outcome, &limits);
        if let Some(taskexec_sandbox::ReadBackResult::Read { data, .. }) =
            outcome.read_back.first_mut()
        {
            *data = Vec::new();
        }
        (verdict, outcome)
    });
    match job.await {
        Ok((verdict, outcome)) => (verdict, Some(outcome)),
        Err(e) => (
            Verdict::Failed(TaskError::new(
                ErrorType::Internal,
                format!("classifying the attempt failed: {e}"),
            )),
            None,
        ),
    }
}

/// The checks of a task's output before it is kept, on a blocking thread:
/// not over `max_result_bytes` (the stored result's cap); and, when a
/// schema is to check it (`tree`), no more values than a tree may hold
/// for the task's `outputBytes` ([`taskexec_model::max_tree_values`],
/// counted without building the tree), then the tree. Failures are
/// RESOURCE_EXHAUSTION of the output.
async fn check_output(
    output: TaskOutput,
    output_bytes: u64,
    max_result_bytes: u64,
    tree: bool,
) -> Result<(TaskOutput, Option<Value>), TaskError> {
    let job = tokio::task::spawn_blocking(move || {
        let size = output.len() as u64;
        if size > max_result_bytes {
            return Err(TaskError::new(
                ErrorType::ResourceExhaustion,
                format!(
                    "the output is {size} bytes of JSON, over this executor's limit of {} on a stored result (--max-result-bytes)",
                    format_bytes(max_result_bytes)
                ),
            )
            .with_details(json!({"resource": "output", "limit": max_result_bytes, "bytes": size, "setting": "max-result-bytes"})));
        }
        if !tree {
            return Ok((output, None));
        }
        let values = taskexec_model::count_values(output.get().as_bytes());
        let max = taskexec_model::max_tree_values(output_bytes);
        if values > max {
            return Err(TaskError::new(
                ErrorType::ResourceExhaustion,
                format!(
                    "the output holds {values} JSON values, more than the {max} that can be checked against definition.outputSchema with outputBytes {} (one value per {} bytes of outputBytes, at least {}); raise outputBytes or drop the schema",
                    format_bytes(output_bytes),
                    taskexec_model::output::OUTPUT_BYTES_PER_TREE_VALUE,
                    taskexec_model::output::MIN_TREE_VALUES,
                ),
            )
            .with_details(json!({"resource": "output", "limit": max, "values": values})));
        }
        let value = output.to_value().map_err(|e| {
            TaskError::new(
                ErrorType::Internal,
                format!("the output could not be parsed again: {e}"),
            )
        })?;
        Ok((output, Some(value)))
    });
    job.await.unwrap_or_else(|e| {
        Err(TaskError::new(
            ErrorType::Internal,
            format!("checking the output failed: {e}"),
        ))
    })
}

/// Drops a parsed output on a blocking thread (freeing a large tree is
/// work proportional to its size).
fn drop_off_thread(value: Value) {
    if !matches!(value, Value::Array(_) | Value::Object(_)) {
        return;
    }
    drop(tokio::task::spawn_blocking(move || drop(value)));
}

/// The violations reported in an error: the first
/// [`schema::MAX_VIOLATIONS`] (the count is in the message).
fn capped(v: schema::Violations) -> Vec<Violation> {
    v.first
}

fn relative(dir: &str) -> &str {
    dir.trim_start_matches(taskexec_model::protocol::WORK_DIR)
        .trim_start_matches('/')
}

/// Our own failures: setting up the sandbox is ENVIRONMENT_SETUP (retried
/// with backoff); a confused launcher is INTERNAL.
fn setup_error(e: &SandboxError) -> TaskError {
    let kind = match e {
        SandboxError::Protocol(_) => ErrorType::Internal,
        _ => ErrorType::EnvironmentSetup,
    };
    let mut chain = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        chain.push_str(": ");
        chain.push_str(&s.to_string());
        source = s.source();
    }
    TaskError::new(kind, chain)
}

/// A compile run's failure, if it failed: a non-zero compiler exit is
/// COMPILATION_ERROR with the compiler's output; limits hit keep their type.
fn compile_verdict(outcome: &RunOutcome, limits: &Limits) -> Option<TaskError> {
    match classify(outcome, limits) {
        Verdict::Completed { .. } if outcome.collect_error.is_none() => None,
        Verdict::Completed { .. } => Some(TaskError::new(
            ErrorType::CompilationError,
            format!(
                "the compiler's output could not be collected: {}",
                outcome.collect_error.clone().unwrap_or_default()
            ),
        )),
        Verdict::Failed(e) if e.error_type == ErrorType::RuntimeError => {
            let mut out = String::from_utf8_lossy(&outcome.stdout).into_owned();
            out.push_str(&String::from_utf8_lossy(&outcome.stderr));
            let first = out
                .lines()
                .find(|l| l.contains("error"))
                .unwrap_or("compilation failed")
                .to_string();
            Some(
                TaskError::new(ErrorType::CompilationError, first.trim().to_string())
                    .with_details(json!({"compilerOutput": out, "exitCode": e.details.as_ref().and_then(|d| d.get("exitCode")).cloned()})),
            )
        }
        Verdict::Failed(mut e) => {
            e.message = format!("while compiling: {}", e.message);
            Some(e)
        }
    }
}

fn max_retries_exceeded(last: &TaskError, all: &[TaskError]) -> TaskError {
    TaskError::new(
        ErrorType::MaxRetriesExceeded,
        format!(
            "gave up after {} attempts; last error {}: {}",
            all.len(),
            last.error_type,
            last.message
        ),
    )
    .with_details(json!({
        "lastError": last,
        "attemptErrors": all,
    }))
}

/// Adds one attempt's phase timings to a running total.
pub fn add_phases(total: &mut PhaseTimings, p: &PhaseTimings) {
    total.compile_ms += p.compile_ms;
    total.run_ms += p.run_ms;
    total.output_validation_ms += p.output_validation_ms;
    total.cleanup_ms += p.cleanup_ms;
    total.prepare_ms += p.prepare_ms;
    for (k, v) in &p.sandbox {
        *total.sandbox.entry(k.clone()).or_insert(0.0) += v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALLOWED: std::ops::RangeInclusive<u32> = 60000..=65534;

    #[test]
    fn the_default_account_names_get_a_task_uid_of_their_own() {
        for name in ["nobody", "sandbox"] {
            let run_as = RunAs::Name(name.into());
            assert_eq!(
                resolve_run_as(Some(&run_as), &ALLOWED).expect("accepted"),
                None,
                "{name}: the leased uid, not the host's nobody"
            );
        }
        assert_eq!(resolve_run_as(None, &ALLOWED).expect("accepted"), None);
    }

    #[test]
    fn a_named_uid_is_checked_against_the_allowed_range() {
        assert_eq!(
            resolve_run_as(Some(&RunAs::Uid(60001)), &ALLOWED).expect("accepted"),
            Some((60001, 60001))
        );
        for refused in [RunAs::Uid(0), RunAs::Uid(1000), RunAs::Name("root".into())] {
            let e = resolve_run_as(Some(&refused), &ALLOWED).expect_err("refused");
            assert_eq!(e.field, "executionConfig.securityContext.runAs", "{e:?}");
        }
    }
}
