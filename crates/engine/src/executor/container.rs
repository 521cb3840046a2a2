//! The CONTAINER executor: an attempt in the Linux sandbox through the
//! engine's [`crate::AttemptRunner`], the Java compile step (cached) first
//! when the runtime has one, the outcome classified off the async threads.

use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use taskexec_model::{ErrorType, Limits, PhaseTimings, TaskError, TaskInstance};
use taskexec_sandbox::{RunOutcome, RunRequest, SandboxError};

use crate::pipeline::ms;
use crate::sandbox_request::{self, CompileCache};
use crate::{Cancellation, Engine, Prepared, Verdict, classify};

impl Engine {
    /// One attempt in the sandbox: compile when needed (cached), then run,
    /// then classify.
    pub(super) async fn container_attempt(
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
                    let req = sandbox_request::compile_request(
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
        let req = sandbox_request::run_request(
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

    /// Runs `req` in the sandbox on a blocking thread.
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
