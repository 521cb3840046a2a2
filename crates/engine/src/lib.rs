//! The task lifecycle pipeline of taskexec: validate, prepare, run in the
//! sandbox, classify, validate output, retry with backoff, cancel; every
//! transition on the record.
//!
//! [`Engine::execute`] is the one entry point, used by `taskexec run` and by
//! the service. It never returns an `Err`: whatever happens becomes a
//! [`TaskResult`] with a final status and, unless completed, an error of the
//! seed's table.
//!
//! [`pipeline`] holds [`Engine`]; each attempt runs on the [`executor`] of
//! the task's execution method (the sandbox, through the requests
//! [`sandbox_request`] builds); [`mod@classify`] turns an outcome into a verdict
//! and [`schema`] checks inputs and outputs. The service around the engine
//! is the `taskexec-service` crate.

pub mod classify;
pub mod clock;
pub mod executor;
pub mod pipeline;
pub mod sandbox_request;
pub mod schema;

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use taskexec_model::{
    AttemptRecord, ErrorType, FieldError, Limits, LimitsConfig, LimitsHit, PhaseTimings,
    RetryLimits, RunAs, TaskError, TaskResult, TaskStatus, ValidRetryPolicy,
};
use taskexec_runtimes::{Plan, ResolvedRuntime};
use taskexec_sandbox::{CancelToken, RunOutcome, RunRequest, Sandbox, SandboxError, WarmStats};
use tokio::sync::watch;

pub use classify::{Verdict, classify};
pub use clock::{Clock, ManualClock, SystemClock};
pub use executor::Executor;
pub use pipeline::Engine;
pub use schema::{PoolConfig, SchemaCache, SchemaLimits, ValidationPool, Violation, Violations};

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
    /// What runs the task's attempts (from `executionConfig.method`).
    executor: Executor,
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

    /// The executor its attempts run on.
    pub fn executor(&self) -> Executor {
        self.executor
    }

    /// The validated retry policy.
    pub fn retry(&self) -> &ValidRetryPolicy {
        &self.retry
    }

    /// The runtime's name.
    pub fn runtime_name(&self) -> &str {
        &self.runtime.spec.name
    }

    /// The plan: the files written for the task and how it is run.
    pub fn plan(&self) -> &Plan {
        &self.plan
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
///
/// The attempt's stdout and stderr move into the result (they can be as
/// large as the task's `outputBytes`: no copy is made of them).
pub fn apply_attempt(result: &mut TaskResult, out: &mut AttemptOutput) {
    result.execution_metadata.attempts.push(out.record.clone());
    add_phases(&mut result.execution_metadata.phases, &out.record.phases);
    result.stdout = std::mem::take(&mut out.stdout);
    result.stderr = std::mem::take(&mut out.stderr);
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
