//! Admission: submissions validated, prepared and checked against this
//! node's capacity, stored (and claimed at once when there is room); the
//! free capacity and the adaptive concurrency limit the claims respect.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use metrics::{counter, gauge};
use taskexec_engine::Prepared;
use taskexec_model::{ErrorType, TaskError, TaskInstance, TaskStatus};
use taskexec_store::{Capacity, ClaimRequest, NewTask, StoreError, Submitted};
use tracing::debug;

use crate::limiter::Limiter;
use crate::metric;
use crate::{Service, lock, now, record};

/// Why a submission was refused. Nothing was stored.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// Task `index` of the submission is invalid or can never run here.
    #[error("task {index} rejected: {}", error.message)]
    Rejected {
        /// Position in the submission.
        index: usize,
        /// Why.
        error: TaskError,
    },
    /// The queue is full.
    #[error("the queue is full")]
    QueueFull {
        /// When to try again.
        retry_after: Duration,
    },
    /// The store failed.
    #[error("store")]
    Store(#[source] StoreError),
    /// The node is shutting down and takes no new tasks.
    #[error("shutting down")]
    Unavailable,
}

/// Tasks prepared at submission on this node, kept for their first claim
/// here (by task id), so that it does not validate and plan them again.
/// Bounded (a plan holds the task's files): past [`PREPARED_MAX`] entries
/// or [`PREPARED_MAX_BYTES`] of files, those older than [`PREPARED_TTL`]
/// (claimed by another node, or long queued) are dropped, and if that is
/// not enough nothing more is kept; a claim that finds no entry prepares
/// the task itself.
#[derive(Debug, Default)]
pub(crate) struct PreparedCache(Mutex<PreparedEntries>);

#[derive(Debug, Default)]
pub(crate) struct PreparedEntries {
    /// By task id: when it was kept, its size, the preparation.
    map: HashMap<String, (Instant, usize, Prepared)>,
    /// Sum of the sizes.
    bytes: usize,
}

/// Most entries of the [`PreparedCache`].
pub(crate) const PREPARED_MAX: usize = 1024;
/// Most bytes of files held by the [`PreparedCache`].
pub(crate) const PREPARED_MAX_BYTES: usize = 32 << 20;
/// Age past which a [`PreparedCache`] entry may be dropped when it is full.
pub(crate) const PREPARED_TTL: Duration = Duration::from_secs(30);

impl PreparedCache {
    pub(crate) fn put(&self, id: &str, prepared: Prepared) {
        let size = prepared
            .plan()
            .files
            .iter()
            .chain(&prepared.plan().support_files)
            .map(|f| f.content.len() + f.path.len())
            .sum::<usize>();
        let mut e = lock(&self.0);
        let full = |e: &PreparedEntries| {
            e.map.len() >= PREPARED_MAX || e.bytes + size > PREPARED_MAX_BYTES
        };
        if full(&e) {
            e.map.retain(|_, (at, _, _)| at.elapsed() < PREPARED_TTL);
            e.bytes = e.map.values().map(|(_, n, _)| n).sum();
            if full(&e) {
                return;
            }
        }
        e.bytes += size;
        if let Some((_, old, _)) = e
            .map
            .insert(id.to_string(), (Instant::now(), size, prepared))
        {
            e.bytes -= old;
        }
    }

    pub(crate) fn take(&self, id: &str) -> Option<Prepared> {
        let mut e = lock(&self.0);
        let (_, size, p) = e.map.remove(id)?;
        e.bytes -= size;
        Some(p)
    }
}

impl Service {
    /// Validates and enqueues tasks, all or nothing, each with the digest of
    /// the task as given ([`taskexec_store::request_hash`]), in the shared
    /// idempotency key space.
    pub async fn submit(&self, tasks: Vec<TaskInstance>) -> Result<Vec<Submitted>, SubmitError> {
        let tasks = tasks
            .into_iter()
            .map(|t| (Some(taskexec_store::request_hash(&t)), t))
            .collect();
        self.submit_hashed("", tasks).await
    }

    /// [`Self::submit`] with the request digest of each task computed by the
    /// caller (before it assigned an id), its idempotency keys in key space
    /// `scope` (one per API credential; "" the shared one).
    pub async fn submit_hashed(
        &self,
        scope: &str,
        tasks: Vec<(Option<String>, TaskInstance)>,
    ) -> Result<Vec<Submitted>, SubmitError> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err(SubmitError::Unavailable);
        }
        let mut new = Vec::with_capacity(tasks.len());
        let mut preparations = Vec::with_capacity(tasks.len());
        for (index, (request_hash, mut task)) in tasks.into_iter().enumerate() {
            Self::assign_id(&mut task);
            let prepared = match self.engine.prepare(&task) {
                Ok(p) => self
                    .engine
                    .validate_input(&mut task, &p)
                    .await
                    .map(|()| p),
                Err(e) => Err(e),
            }
            .map_err(|error| {
                counter!(metric::TASKS_REJECTED_TOTAL.name, "error_type" => error.error_type.as_str()).increment(1);
                SubmitError::Rejected { index, error }
            })?;
            let limits = prepared.limits();
            let memory = prepared.admitted_memory_bytes();
            let cap = self.config.capacity;
            let too_big = if u64::from(limits.cpu_request_millis) > cap.cpu_millis {
                Some((
                    "cpu",
                    format!("{}m CPU", limits.cpu_request_millis),
                    format!("{}m", cap.cpu_millis),
                ))
            } else if limits.memory_bytes > cap.memory_bytes {
                Some((
                    "memory",
                    taskexec_model::format_bytes(limits.memory_bytes),
                    taskexec_model::format_bytes(cap.memory_bytes),
                ))
            } else if memory > cap.memory_bytes {
                Some((
                    "memory",
                    format!(
                        "{} with its compile step (the runtime's `compile.memory`) and the executor's memory for its output (from outputBytes)",
                        taskexec_model::format_bytes(memory)
                    ),
                    taskexec_model::format_bytes(cap.memory_bytes),
                ))
            } else {
                None
            };
            if let Some((field, asked, have)) = too_big {
                counter!(metric::TASKS_REJECTED_TOTAL.name, "error_type" => "INPUT_VALIDATION")
                    .increment(1);
                let error = TaskError::new(
                    ErrorType::InputValidation,
                    format!(
                        "the task requests {asked} but this node admits at most {have}: it can never run here"
                    ),
                )
                .with_details(serde_json::json!({"field": format!("executionConfig.resourceRequirements.{field}")}));
                return Err(SubmitError::Rejected { index, error });
            }
            new.push(NewTask {
                runtime: prepared.runtime_name().to_string(),
                cpu_millis: limits.cpu_request_millis,
                memory_bytes: memory,
                received: record(None, TaskStatus::Received, 0, "received"),
                task,
                idempotency_scope: scope.to_owned(),
                request_hash,
            });
            preparations.push(prepared);
        }
        let runtimes: Vec<String> = new.iter().map(|t| t.runtime.clone()).collect();
        // With room on this node, the submission claims in the same step
        // (what the scheduler's next claim would take, by priority): one
        // write transaction fewer per task on SQLite, though no latency
        // gain was measurable (docs/benchmarks.md); otherwise the
        // scheduler claims.
        let me = self
            .me
            .upgrade()
            .filter(|_| self.config.workers > 0 && self.scheduler_alive.load(Ordering::SeqCst));
        let _claiming = match &me {
            Some(_) => Some(self.claiming.lock().await),
            None => None,
        };
        let (free, slots) = self.free();
        let want = if me.is_some() && free.cpu_millis > 0 && free.memory_bytes > 0 {
            slots.min(64)
        } else {
            0
        };
        let stored = if want > 0 {
            let request = ClaimRequest {
                node: &self.config.node,
                free,
                limit: want,
                now: now(),
                lease: self.config.lease,
            };
            self.store
                .submit_and_claim(new, self.config.max_queued, request)
                .await
        } else {
            self.store
                .submit(new, self.config.max_queued)
                .await
                .map(|s| (s, Vec::new()))
        };
        self.health.record(&stored);
        let (submitted, claimed) = match stored {
            Ok(s) => s,
            Err(StoreError::QueueFull { .. }) => {
                counter!(metric::TASKS_REFUSED_QUEUE_FULL_TOTAL.name).increment(1);
                return Err(SubmitError::QueueFull {
                    retry_after: Duration::from_secs(1),
                });
            }
            Err(e) => return Err(SubmitError::Store(e)),
        };
        let keep = self.config.workers > 0;
        for ((s, rt), prepared) in submitted.iter().zip(runtimes).zip(preparations) {
            if let Submitted::Created { id } = s {
                counter!(metric::TASKS_SUBMITTED_TOTAL.name, "runtime" => rt).increment(1);
                if keep {
                    self.prepared.put(id, prepared);
                }
            }
        }
        if let Some(me) = &me {
            me.start_claimed(claimed);
        }
        drop(_claiming);
        self.wake.notify_one();
        Ok(submitted)
    }

    /// Gives `task` a new id (a UUID v4) if it has none, as [`Self::submit`]
    /// does: to know the id before submitting, e.g. to
    /// [`Self::watch_final`] it.
    pub fn assign_id(task: &mut TaskInstance) {
        if task.id.is_empty() {
            task.id = uuid::Uuid::new_v4().to_string();
        }
    }

    pub(crate) fn free(&self) -> (Capacity, usize) {
        let running = self.lock_running();
        let (cpu, mem) = running.values().fold((0u64, 0u64), |(c, m), r| {
            (c + r.cpu_millis, m + r.memory_bytes)
        });
        gauge!(metric::CPU_ADMITTED_MILLIS.name).set(cpu as f64);
        gauge!(metric::MEMORY_ADMITTED_BYTES.name).set(mem as f64);
        gauge!(metric::TASKS_RUNNING.name).set(running.len() as f64);
        let cap = self.config.capacity;
        (
            Capacity {
                cpu_millis: cap.cpu_millis.saturating_sub(cpu),
                memory_bytes: cap.memory_bytes.saturating_sub(mem),
            },
            self.concurrency_limit().saturating_sub(running.len()),
        )
    }

    /// How many tasks may run at once on this node now: the adaptive limit,
    /// or `workers` without one.
    pub fn concurrency_limit(&self) -> usize {
        match &self.limiter {
            Some(l) => lock(l).limit().min(self.config.workers),
            None => self.config.workers,
        }
    }

    /// Feeds the limiter (if on) at this instant, exports the limit, and
    /// wakes the scheduler when it rose.
    pub(crate) fn adjust_limit(&self, feed: impl FnOnce(&mut Limiter, Instant) -> usize) {
        let Some(l) = &self.limiter else { return };
        let (before, after, reason) = {
            let mut l = lock(l);
            let before = l.limit();
            let after = feed(&mut l, Instant::now());
            (before, after, l.last_reason())
        };
        gauge!(metric::CONCURRENCY_LIMIT.name).set(after as f64);
        if after != before {
            debug!(
                from = before,
                to = after,
                ?reason,
                "concurrency limit changed"
            );
        }
        if after > before {
            self.wake.notify_one();
        }
    }
}
