//! The executor as a service: submission with admission checks, a queue in
//! the store, workers that claim tasks the node can admit (CPU and memory
//! bin-packing on declared requests, priority then FIFO, no more in flight
//! than the adaptive concurrency limit of [`crate::limiter`]), batched writes,
//! live lifecycle events, cancellation, lease renewal, crash recovery and
//! graceful shutdown.
//!
//! Retries are persisted: a retryable failure puts the task back in the
//! queue with a `run_after` time, so a backoff never holds a worker slot and
//! survives a restart.
//!
//! The modules follow the roles of the service: [`admission`] (submission,
//! capacity, the concurrency limit), [`scheduler`] (recovery and the claim
//! loop), [`worker`] (one claimed attempt to its decision), [`writer`] (the
//! store writer and result commits), [`leases`] (renewal, self-fencing,
//! take-over), [`waiters`] (events and waits for final results),
//! [`telemetry`] (memory pressure and the warm runner's metrics), with the
//! adaptive [`limiter`] and its [`pressure`] readings.

pub mod admission;
pub mod config;
pub mod leases;
pub mod limiter;
pub mod metric;
pub mod pressure;
pub mod scheduler;
pub mod telemetry;
pub mod waiters;
pub mod worker;
pub mod writer;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{counter, gauge};
use serde::Serialize;
use taskexec_engine::{Cancellation, Engine};
use taskexec_model::{TaskStatus, TransitionRecord};
use taskexec_store::{
    CancelOutcome, ErrorClass, ListPage, ListQuery, StoreError, TaskProgress, TaskRecord, TaskStore,
};
use time::OffsetDateTime;
use tokio::sync::{Notify, broadcast, mpsc};
use tracing::info;

pub use admission::SubmitError;
pub use config::{DEFAULT_QUARANTINE_AFTER, ServiceConfig, quarantined_error};
pub use waiters::{FinalWatch, TaskEvent};

use crate::admission::PreparedCache;
use crate::limiter::Limiter;
use crate::waiters::FinalWaiters;
use crate::writer::{Pending, StoreHealth, writer};

/// A runtime as the API lists it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeInfo {
    /// Runtime name.
    pub name: String,
    /// Found on this host.
    pub available: bool,
    /// Interpreter path.
    pub interpreter: Option<String>,
    /// Supports handler mode.
    pub handler_mode: bool,
    /// File extensions.
    pub extensions: Vec<String>,
    /// Why it is unavailable.
    pub error: Option<String>,
}

/// Why a node is not ready ([`Service::ready`]).
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    /// The service is shutting down.
    #[error("shutting down")]
    Stopping,
    /// The scheduler's loop ended.
    #[error("the scheduler is not running")]
    SchedulerStopped,
    /// Leases could not be renewed in time: tasks stopped, claiming paused.
    #[error("leases could not be renewed: tasks stopped, claiming paused")]
    Fenced,
    /// Writes lately failed because the store's disk is full.
    #[error("store: full (writes fail)")]
    StoreFull,
    /// Writes lately failed because the store could not be reached.
    #[error("store: unavailable (writes fail)")]
    StoreUnavailable,
    /// The store did not answer a ping.
    #[error("store")]
    Ping {
        /// The store's failure.
        #[source]
        source: StoreError,
    },
}

/// A task running on this node.
#[derive(Debug)]
struct Running {
    cancel: Cancellation,
    cpu_millis: u64,
    memory_bytes: u64,
    /// Its attempt ran; what is left is writing its outcome (nothing to
    /// stop).
    ran: bool,
}

/// The service.
#[derive(Debug)]
pub struct Service {
    engine: Arc<Engine>,
    store: Arc<dyn TaskStore>,
    config: ServiceConfig,
    running: Mutex<HashMap<String, Running>>,
    wake: Notify,
    idle: Notify,
    events: broadcast::Sender<TaskEvent>,
    writes: mpsc::UnboundedSender<Pending>,
    stopping: AtomicBool,
    scheduler_alive: AtomicBool,
    /// Held from reading the free capacity to recording what was claimed
    /// with it, by the scheduler and by a submission that claims at once,
    /// so the two never hand out the same room.
    claiming: tokio::sync::Mutex<()>,
    /// This service, for the tasks a submission claims at once.
    me: std::sync::Weak<Service>,
    /// The adaptive concurrency limit (None: off, or no workers).
    limiter: Option<Mutex<Limiter>>,
    /// Waiters for final results.
    finals: Arc<FinalWaiters>,
    /// Preparations made at submission, for the first claim here.
    prepared: PreparedCache,
    /// What this node's writes found of the store.
    health: Arc<StoreHealth>,
    /// This node stopped its tasks because it could not renew their leases
    /// in time: it claims nothing until the store answers again.
    fenced: AtomicBool,
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

fn record(
    from: Option<TaskStatus>,
    to: TaskStatus,
    attempt: u32,
    reason: &str,
) -> TransitionRecord {
    TransitionRecord {
        from,
        to,
        at: now(),
        attempt,
        reason: reason.to_string(),
    }
}

impl Service {
    /// Recovers tasks this node left running when it last stopped, then
    /// starts the scheduler, the writer and the lease keeper.
    pub async fn start(
        engine: Arc<Engine>,
        store: Arc<dyn TaskStore>,
        config: ServiceConfig,
    ) -> Result<Arc<Self>, StoreError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (events, _) = broadcast::channel(4096);
        let cores = (config.capacity.cpu_millis / 1000).max(1) as usize;
        let limiter = config
            .concurrency
            .and_then(|c| c.limiter(config.workers, cores))
            .map(Mutex::new);
        let service = Arc::new_cyclic(|me| Self {
            claiming: tokio::sync::Mutex::new(()),
            me: me.clone(),
            engine,
            store,
            config,
            running: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            idle: Notify::new(),
            events,
            writes: tx,
            stopping: AtomicBool::new(false),
            scheduler_alive: AtomicBool::new(false),
            limiter,
            finals: Arc::default(),
            prepared: PreparedCache::default(),
            health: Arc::default(),
            fenced: AtomicBool::new(false),
        });
        tokio::spawn(writer(
            Arc::clone(&service.store),
            Arc::clone(&service.health),
            service.config.node.clone(),
            rx,
            service
                .config
                .batch_writes
                .then_some(service.config.write_linger),
        ));
        service.recover().await?;
        service.scheduler_alive.store(true, Ordering::SeqCst);
        tokio::spawn(Arc::clone(&service).schedule());
        tokio::spawn(Arc::clone(&service).keep_leases());
        if service.limiter.is_some() && service.config.concurrency.is_some_and(|c| c.memory_signal)
        {
            tokio::spawn(Arc::clone(&service).watch_memory());
        }
        tokio::spawn(Arc::clone(&service).publish_warm_stats());
        gauge!(metric::CONCURRENCY_LIMIT.name).set(service.concurrency_limit() as f64);
        gauge!(metric::CPU_CAPACITY_MILLIS.name).set(service.config.capacity.cpu_millis as f64);
        gauge!(metric::MEMORY_CAPACITY_BYTES.name).set(service.config.capacity.memory_bytes as f64);
        Ok(service)
    }

    /// Wakes the scheduler: new work may be waiting (called on a database
    /// notification from another node).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Wakes this node's followers of task `id` (`?wait` and event streams):
    /// its state changed, here or on another node (called on a database
    /// notification). They re-read its progress; a spurious wake costs one
    /// small read.
    pub fn task_changed(&self, id: &str) {
        self.finals.wake(id);
    }

    /// Most tasks accepted in one batch.
    pub fn max_batch(&self) -> usize {
        self.config.max_batch
    }

    /// The configuration.
    pub fn config(&self) -> &ServiceConfig {
        &self.config
    }

    /// One task.
    pub async fn get(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        self.store.get(id).await
    }

    /// One task's progress (its lifecycle without input or output).
    pub async fn progress(&self, id: &str) -> Result<Option<TaskProgress>, StoreError> {
        self.store.progress(id).await
    }

    /// A page of tasks.
    pub async fn list(&self, q: &ListQuery) -> Result<ListPage, StoreError> {
        self.store.list(q).await
    }

    /// Cancels a task: a queued one at once, a running one by killing its
    /// sandbox (here, or on the node running it via the store).
    pub async fn cancel(&self, id: &str) -> Result<CancelOutcome, StoreError> {
        let outcome = self
            .store
            .request_cancel(
                id,
                record(None, TaskStatus::Cancelled, 0, "cancelled while queued"),
            )
            .await?;
        match &outcome {
            CancelOutcome::CancelledQueued => {
                if let Some(rec) = self.store.get(id).await?
                    && let Some(last) = rec.history.last()
                {
                    counter!(
                        metric::TASKS_FINISHED_TOTAL.name,
                        "runtime" => rec.runtime.clone(),
                        "status" => "CANCELLED",
                        "error_type" => "CANCELLED"
                    )
                    .increment(1);
                    let _ = self.events.send(TaskEvent {
                        id: id.to_string(),
                        status: TaskStatus::Cancelled,
                        record: last.clone(),
                        is_final: true,
                    });
                }
                self.finals.wake(id);
                drop(self.prepared.take(id));
            }
            CancelOutcome::Requested { .. } => {
                if let Some(r) = self.lock_running().get(id) {
                    r.cancel.cancel();
                }
            }
            CancelOutcome::NotFound | CancelOutcome::AlreadyFinal(_) => {}
        }
        Ok(outcome)
    }

    /// The runtime catalogue as found on this host.
    pub fn runtimes(&self) -> Vec<RuntimeInfo> {
        let cat = self.engine.catalogue();
        cat.names()
            .map(|name| match cat.resolve(name) {
                Ok(rt) => RuntimeInfo {
                    name: name.to_string(),
                    available: true,
                    interpreter: Some(rt.interpreter.display().to_string()),
                    handler_mode: rt.spec.handler.is_some(),
                    extensions: rt.spec.extensions.clone(),
                    error: None,
                },
                Err(e) => RuntimeInfo {
                    name: name.to_string(),
                    available: false,
                    interpreter: None,
                    handler_mode: false,
                    extensions: Vec::new(),
                    error: Some(e.to_string()),
                },
            })
            .collect()
    }

    /// Ready: the store answers and the scheduler runs.
    pub async fn ready(&self) -> Result<(), NotReady> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err(NotReady::Stopping);
        }
        if !self.scheduler_alive.load(Ordering::SeqCst) {
            return Err(NotReady::SchedulerStopped);
        }
        if self.fenced.load(Ordering::SeqCst) {
            return Err(NotReady::Fenced);
        }
        match self.health.problem() {
            Some(ErrorClass::Full) => return Err(NotReady::StoreFull),
            Some(_) => return Err(NotReady::StoreUnavailable),
            None => {}
        }
        self.store
            .ping()
            .await
            .map_err(|source| NotReady::Ping { source })
    }

    /// Stops claiming, lets running tasks finish for up to `grace`, then
    /// cancels the rest and waits for their results to be recorded.
    pub async fn shutdown(&self, grace: Duration) {
        self.stopping.store(true, Ordering::SeqCst);
        self.wake.notify_waiters();
        let deadline = tokio::time::Instant::now() + grace;
        while !self.lock_running().is_empty() {
            if tokio::time::timeout_at(deadline, self.idle.notified())
                .await
                .is_err()
            {
                break;
            }
        }
        let left: Vec<Cancellation> = self
            .lock_running()
            .values()
            .map(|r| r.cancel.clone())
            .collect();
        if !left.is_empty() {
            info!(
                tasks = left.len(),
                "grace period over: cancelling running tasks"
            );
            for c in &left {
                c.cancel();
            }
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while !self.lock_running().is_empty() {
                if tokio::time::timeout_at(deadline, self.idle.notified())
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }
        self.flush().await;
    }

    fn lock_running(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Locks a mutex whose data stays consistent even if a holder panicked.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
