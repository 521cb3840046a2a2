//! A worker: one claimed attempt run to its decision (completed, requeued
//! with a backoff, or final), its transitions and result written, its
//! waiters woken.

use std::sync::Arc;
use std::time::Instant;

use metrics::{counter, histogram};
use taskexec_engine::{Cancellation, Decision, Verdict, apply_attempt};
use taskexec_model::{AttemptRecord, ErrorType, Lifecycle, TaskError, TaskResult, TaskStatus};
use taskexec_store::{ClaimedTask, TaskRecord, Write};
use tracing::{info, warn};

use crate::metric;
use crate::{Service, TaskEvent, now, quarantined_error};

impl Service {
    /// Records a transition in the lifecycle and the event stream, and adds
    /// its store write to `batch` (for the caller to send).
    pub(crate) fn transition(
        &self,
        id: &str,
        lc: &mut Lifecycle,
        store_attempt: u32,
        to: TaskStatus,
        reason: &str,
        batch: &mut Vec<Write>,
    ) {
        if let Err(e) = lc.transition(to, now(), reason) {
            warn!(task_id = id, error = %e, "illegal lifecycle transition");
            return;
        }
        let rec = lc
            .history()
            .last()
            .cloned()
            .expect("a transition was just recorded");
        batch.push(Write::Transition {
            id: id.to_string(),
            attempt: store_attempt,
            record: rec.clone(),
        });
        if !to.is_final() {
            let _ = self.events.send(TaskEvent {
                id: id.to_string(),
                status: to,
                record: rec,
                is_final: false,
            });
        }
    }

    /// Ends a task: stores the result with the writes of `batch` in one
    /// transaction (waiting for the commit), then announces the final
    /// transition and wakes the waiters.
    pub(crate) async fn finish(
        &self,
        id: &str,
        runtime: &str,
        store_attempt: u32,
        result: TaskResult,
        mut batch: Vec<Write>,
    ) {
        let mut status = result.status;
        let mut error_type = result
            .error
            .as_ref()
            .map(|e| e.error_type.as_str())
            .unwrap_or("none");
        let mut last = result.history.last().cloned();
        batch.push(Write::Finish {
            id: id.to_string(),
            attempt: store_attempt,
            result,
        });
        let committed = self.write(batch, true).await;
        // A cancel recorded before this result won: the store keeps the
        // task CANCELLED, and so do the event and the count.
        if status != TaskStatus::Cancelled
            && committed.is_some_and(|c| c.iter().any(|won| won == id))
        {
            info!(task_id = id, from = %status, "a cancel requested before the attempt ended won");
            status = TaskStatus::Cancelled;
            error_type = ErrorType::Cancelled.as_str();
            last = last.map(|rec| taskexec_store::cancel_won_transition(&rec));
        }
        counter!(
            metric::TASKS_FINISHED_TOTAL.name,
            "runtime" => runtime.to_string(),
            "status" => status.as_str(),
            "error_type" => error_type
        )
        .increment(1);
        if let Some(rec) = last {
            let _ = self.events.send(TaskEvent {
                id: id.to_string(),
                status,
                record: rec,
                is_final: true,
            });
        }
        self.finals.wake(id);
    }

    /// An attempt that ended before it could run (interrupted, or the task no
    /// longer prepares): record it and retry or fail per the policy.
    pub(crate) async fn end_attempt_without_run(&self, c: ClaimedTask, error: TaskError) {
        let id = c.record.task.id.clone();
        let attempt = c.attempt;
        let mut lc =
            Lifecycle::resume(c.record.history.clone()).unwrap_or_else(|| Lifecycle::new(now()));
        let rec = AttemptRecord {
            attempt,
            status: TaskStatus::Failed,
            error: Some(error.clone()),
            start_time: c.record.updated_at,
            end_time: now(),
            duration_ms: 0.0,
            exit_code: None,
            signal: None,
            stderr_tail: String::new(),
            phases: Default::default(),
        };
        let batch = vec![Write::AttemptDone {
            id: id.clone(),
            record: rec.clone(),
        }];
        let mut attempts = c.record.attempts.clone();
        attempts.push(rec);
        let errors: Vec<TaskError> = attempts.iter().filter_map(|a| a.error.clone()).collect();
        // A cancel requested while the attempt was interrupted (e.g. through
        // another node while this one was down) ends the task: never retry it.
        let mut decision = match self.engine.prepare(&c.record.task) {
            Ok(p) => self
                .engine
                .decide(&p, &error, attempt, &errors, c.record.cancel_requested),
            Err(e) => Decision::Final {
                status: TaskStatus::Failed,
                error: e,
            },
        };
        // A poison task (it takes its node down on every attempt) is not
        // handed to one more node.
        if c.lost_attempts >= self.config.quarantine_after
            && matches!(decision, Decision::Retry { .. })
        {
            warn!(task_id = %id, attempt, lost = c.lost_attempts, "quarantining a task whose attempts were lost with their node");
            counter!(metric::TASKS_QUARANTINED_TOTAL.name).increment(1);
            decision = Decision::Final {
                status: TaskStatus::Failed,
                error: quarantined_error(c.lost_attempts),
            };
        }
        self.conclude(
            &id, &mut lc, attempt, &c.record, attempts, decision, None, batch,
        )
        .await;
    }

    /// Applies a decision after a failed attempt: requeue with backoff, or
    /// store the final result; with the writes of `batch`, in one
    /// transaction.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn conclude(
        &self,
        id: &str,
        lc: &mut Lifecycle,
        attempt: u32,
        stored: &TaskRecord,
        attempts: Vec<AttemptRecord>,
        decision: Decision,
        last: Option<&mut taskexec_engine::AttemptOutput>,
        mut batch: Vec<Write>,
    ) {
        // An attempt interrupted before its first transition was stored
        // (a crash right after the claim) resumes from RECEIVED.
        if lc.state() == TaskStatus::Received {
            self.transition(
                id,
                lc,
                attempt,
                TaskStatus::Preparing,
                "preparing",
                &mut batch,
            );
        }
        match decision {
            Decision::Retry { delay } => {
                counter!(metric::RETRIES_TOTAL.name).increment(1);
                let reason = format!("retry (backoff {} ms)", delay.as_millis());
                self.transition(id, lc, attempt, TaskStatus::Preparing, &reason, &mut batch);
                let run_after = now() + delay;
                batch.push(Write::Requeue {
                    id: id.to_string(),
                    attempt,
                    run_after,
                });
                self.write(batch, true).await;
                // A cancel recorded before the requeue committed made the
                // store ignore it (the cancel won): the task ends here.
                let cancelled = self
                    .store
                    .cancel_requested(&[id.to_string()])
                    .await
                    .is_ok_and(|c| !c.is_empty());
                if cancelled {
                    let mut batch = Vec::new();
                    let error = taskexec_engine::cancelled_error();
                    self.transition(
                        id,
                        lc,
                        attempt,
                        TaskStatus::Cancelled,
                        &error.message,
                        &mut batch,
                    );
                    let mut result = base_result(stored, attempts, last);
                    result.status = TaskStatus::Cancelled;
                    result.error = Some(error);
                    result.history = lc.history().to_vec();
                    self.finish(id, &stored.runtime, attempt, result, batch)
                        .await;
                }
                self.wake.notify_one();
            }
            Decision::Final { status, error } => {
                self.transition(id, lc, attempt, status, &error.message, &mut batch);
                let mut result = base_result(stored, attempts, last);
                result.status = status;
                result.error = Some(error);
                result.history = lc.history().to_vec();
                self.finish(id, &stored.runtime, attempt, result, batch)
                    .await;
            }
        }
    }

    /// Runs one claimed attempt to its decision.
    pub(crate) async fn work(self: Arc<Self>, c: ClaimedTask, cancel: Cancellation) {
        let id = c.record.task.id.clone();
        let attempt = c.attempt;
        let queue_wait = (now() - c.queued_since).max(time::Duration::ZERO);
        histogram!(metric::TASK_PHASE_SECONDS.name, "phase" => "queue_wait")
            .record(queue_wait.as_seconds_f64());
        let mut lc =
            Lifecycle::resume(c.record.history.clone()).unwrap_or_else(|| Lifecycle::new(now()));
        // The transitions up to RUNNING are stored in one transaction, sent
        // without waiting for it (the attempt runs meanwhile).
        let mut batch = Vec::new();
        if lc.state() == TaskStatus::Received {
            self.transition(
                &id,
                &mut lc,
                attempt,
                TaskStatus::Preparing,
                "claimed",
                &mut batch,
            );
        }
        let t0 = Instant::now();
        // A task submitted on this node was prepared then, with the same
        // engine: its first claim here uses that; any other claim prepares.
        let prepared = match self.prepared.take(&id) {
            Some(p) if attempt == 1 => Ok(p),
            _ => self.engine.prepare(&c.record.task),
        };
        match prepared {
            Err(error) => {
                self.transition(
                    &id,
                    &mut lc,
                    attempt,
                    TaskStatus::Rejected,
                    &error.message,
                    &mut batch,
                );
                let mut result = base_result(&c.record, c.record.attempts.clone(), None);
                result.status = TaskStatus::Rejected;
                result.error = Some(error);
                result.history = lc.history().to_vec();
                self.finish(&id, &c.record.runtime, attempt, result, batch)
                    .await;
            }
            Ok(prepared) => {
                self.transition(
                    &id,
                    &mut lc,
                    attempt,
                    TaskStatus::Running,
                    &format!("attempt {attempt} started on {}", self.config.node),
                    &mut batch,
                );
                self.write(batch, false).await;
                let mut out = self
                    .engine
                    .run_attempt(&c.record.task, &prepared, attempt, &cancel)
                    .await;
                if cancel.is_fenced() {
                    // The lease is (or may be) another node's: it records
                    // this attempt as interrupted, not us.
                    warn!(task_id = %id, attempt, "attempt stopped: this node lost its lease");
                    self.lock_running().remove(&id);
                    self.idle.notify_waiters();
                    self.wake.notify_one();
                    return;
                }
                if let Some(r) = self.lock_running().get_mut(&id) {
                    r.ran = true;
                }
                if let Some(latency) = out.sandbox_start {
                    let in_flight = self.lock_running().len();
                    self.adjust_limit(|l, now| l.on_start(now, latency, in_flight));
                }
                out.record.phases.queue_wait_ms = queue_wait.as_seconds_f64() * 1000.0;
                for (phase, v) in [
                    ("prepare", out.record.phases.prepare_ms),
                    ("run", out.record.phases.run_ms),
                    ("cleanup", out.record.phases.cleanup_ms),
                ] {
                    histogram!(metric::TASK_PHASE_SECONDS.name, "phase" => phase)
                        .record(v / 1000.0);
                }
                if let Some(e) = &out.record.error
                    && e.error_type == ErrorType::EnvironmentSetup
                {
                    counter!(metric::SANDBOX_SETUP_FAILURES_TOTAL.name).increment(1);
                }
                // The attempt's record, its final transition (or requeue)
                // and the result: one transaction.
                let mut batch = vec![Write::AttemptDone {
                    id: id.clone(),
                    record: out.record.clone(),
                }];
                let mut attempts = c.record.attempts.clone();
                attempts.push(out.record.clone());
                // Moved out, not copied: the output can be as large as the
                // result cap (the rest of the attempt's output never reads it).
                let verdict = std::mem::replace(
                    &mut out.verdict,
                    Verdict::Completed {
                        output: taskexec_model::TaskOutput::null(),
                    },
                );
                match verdict {
                    Verdict::Completed { output } => {
                        self.transition(
                            &id,
                            &mut lc,
                            attempt,
                            TaskStatus::Completed,
                            &format!("attempt {attempt} completed"),
                            &mut batch,
                        );
                        let mut result = base_result(&c.record, attempts, Some(&mut out));
                        result.status = TaskStatus::Completed;
                        result.output = output;
                        result.history = lc.history().to_vec();
                        self.finish(&id, &c.record.runtime, attempt, result, batch)
                            .await;
                    }
                    Verdict::Failed(error) => {
                        let errors: Vec<TaskError> =
                            attempts.iter().filter_map(|a| a.error.clone()).collect();
                        // A cancel made through another node's API reaches us
                        // by the store: check it before deciding on a retry.
                        let cancelled = cancel.is_cancelled()
                            || self
                                .store
                                .cancel_requested(std::slice::from_ref(&id))
                                .await
                                .map(|c| !c.is_empty())
                                .unwrap_or(false);
                        let decision = self
                            .engine
                            .decide(&prepared, &error, attempt, &errors, cancelled);
                        self.conclude(
                            &id,
                            &mut lc,
                            attempt,
                            &c.record,
                            attempts,
                            decision,
                            Some(&mut out),
                            batch,
                        )
                        .await;
                    }
                }
                histogram!(metric::TASK_PHASE_SECONDS.name, "phase" => "total")
                    .record(t0.elapsed().as_secs_f64() + queue_wait.as_seconds_f64());
            }
        }
        self.lock_running().remove(&id);
        self.idle.notify_waiters();
        self.wake.notify_one();
    }
}

/// A result carrying every attempt so far (last attempt's output wins).
pub(crate) fn base_result(
    stored: &TaskRecord,
    attempts: Vec<AttemptRecord>,
    last: Option<&mut taskexec_engine::AttemptOutput>,
) -> TaskResult {
    let mut result = TaskResult::new(stored.task.id.clone(), TaskStatus::Failed);
    let meta = &mut result.execution_metadata;
    meta.method = taskexec_model::Method::Container;
    meta.start_time = attempts.first().map(|a| a.start_time);
    meta.end_time = Some(now());
    meta.duration = attempts.iter().map(|a| a.duration_ms).sum();
    for a in &attempts {
        taskexec_engine::add_phases(&mut meta.phases, &a.phases);
        meta.phases.queue_wait_ms += a.phases.queue_wait_ms;
    }
    meta.attempts = attempts;
    if let Some(out) = last {
        let kept = std::mem::take(&mut result.execution_metadata.attempts);
        let phases = result.execution_metadata.phases.clone();
        apply_attempt(&mut result, out);
        result.execution_metadata.attempts = kept;
        result.execution_metadata.phases = phases;
    }
    result.execution_metadata.execution_environment = format!("container/{}", stored.runtime);
    result
}
