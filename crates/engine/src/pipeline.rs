//! [`Engine`], the one-task pipeline: validate and prepare a task, run its
//! attempts on its executor ([`crate::executor`]), check the output, decide
//! on retries, and keep the lifecycle on the record.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use taskexec_model::{
    AttemptRecord, ErrorType, FieldError, Lifecycle, LimitsHit, Method, TaskError, TaskInstance,
    TaskOutput, TaskResult, TaskStatus, format_bytes,
};
use taskexec_runtimes::{Catalogue, ResolvedRuntime, RuntimeError};
use taskexec_sandbox::{Termination, WarmStats};
use tracing::{Instrument, debug, info, warn};

use crate::sandbox_request::CompileCache;
use crate::{
    AttemptOutput, AttemptRunner, Cancellation, Clock, Decision, EngineConfig, Executor, Prepared,
    Rejection, SchemaCache, ValidationPool, Verdict, Violation, apply_attempt, cancelled_error,
    classify, resolve_run_as, schema,
};

/// The lifecycle pipeline.
#[derive(Debug)]
pub struct Engine {
    config: EngineConfig,
    catalogue: Catalogue,
    pub(crate) runner: Arc<dyn AttemptRunner>,
    clock: Arc<dyn Clock>,
    schemas: SchemaCache,
    validation: ValidationPool,
    pub(crate) compiled: CompileCache,
    /// Runtimes resolved on this host, by name: finding and canonicalizing
    /// interpreters and expanding mount patterns is start-up work, not
    /// per-task work.
    resolved: std::sync::Mutex<std::collections::HashMap<String, Arc<ResolvedRuntime>>>,
}

pub(crate) fn ms(d: Duration) -> f64 {
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
        let method = task.execution_config.method;
        let executor = Executor::for_method(method).ok_or_else(|| {
            Rejection::field(FieldError::new(
                "executionConfig.method",
                format!("{method:?} is not available on this executor; expected AUTO or CONTAINER"),
            ))
        })?;
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
            executor,
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
            let mut out = self.run_attempt(&task, &prepared, attempt, cancel).await;
            apply_attempt(&mut result, &mut out);
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
                delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
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
        if let Some(mut o) = outcome {
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
            out.stdout = classify::into_text(std::mem::take(&mut o.stdout));
            out.stderr = classify::into_text(std::mem::take(&mut o.stderr));
            out.stdout_truncated = o.stdout_truncated;
            out.stderr_truncated = o.stderr_truncated;
            out.cpu_time_ms = Some(u64::try_from(o.stats.cpu_time.as_millis()).unwrap_or(u64::MAX));
            out.peak_memory_bytes = o.stats.peak_memory_bytes;
            out.limits_hit = classify::limits_hit(&o, &p.limits);
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
