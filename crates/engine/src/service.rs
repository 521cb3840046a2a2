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

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics::{counter, gauge, histogram};
use serde::Serialize;
use taskexec_model::{
    AttemptRecord, ErrorType, Lifecycle, TaskError, TaskInstance, TaskResult, TaskStatus,
    TransitionRecord,
};
use taskexec_sandbox::WarmStats;
use taskexec_store::{
    CancelOutcome, Capacity, ClaimRequest, ClaimedTask, ErrorClass, ListPage, ListQuery, NewTask,
    StoreError, Submitted, TaskProgress, TaskRecord, TaskStore, Write,
};
use time::OffsetDateTime;
use tokio::sync::{Notify, broadcast, mpsc, oneshot, watch};
use tracing::{Instrument, debug, error, info, warn};

use crate::limiter::{ConcurrencyConfig, Limiter};
use crate::{Cancellation, Decision, Engine, Prepared, Verdict, apply_attempt};

/// Service settings.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// This node's name in the store (claims and leases carry it).
    pub node: String,
    /// CPU and memory this node admits tasks against.
    pub capacity: Capacity,
    /// Tasks run at once at most.
    pub workers: usize,
    /// Queue bound; past it, submissions are refused.
    pub max_queued: u64,
    /// Most tasks in one batch submission.
    pub max_batch: usize,
    /// Lease of a claimed task, renewed while it runs.
    pub lease: Duration,
    /// Fallback poll of the queue when nothing wakes the scheduler.
    pub poll_interval: Duration,
    /// Group store writes into transactions (off: one transaction each).
    pub batch_writes: bool,
    /// With `batch_writes`, how long writes that nobody waits for (a
    /// task's PREPARING and RUNNING transitions) may wait for company
    /// before they are committed: a task that ends sooner has its start
    /// and its end committed in one transaction. Reads of the store may
    /// see such a status change this much later; the event stream and
    /// final results are never delayed. Zero: commit at once.
    pub write_linger: Duration,
    /// Adaptive concurrency ([`crate::limiter`]): how many of the `workers`
    /// slots may be in use at once, from sandbox start latency and memory
    /// pressure. `None`: every slot, as admission allows.
    pub concurrency: Option<ConcurrencyConfig>,
    /// Poison tasks: a task whose attempts were lost with their node this
    /// many times (the node died or was cut off, its lease expired and
    /// another node took the task over) ends FAILED, quarantined, instead
    /// of being retried onto the next node. At least 1.
    pub quarantine_after: u32,
}

/// Attempts lost with their node after which a task is quarantined
/// ([`ServiceConfig::quarantine_after`]).
pub const DEFAULT_QUARANTINE_AFTER: u32 = 3;

/// The error of a task quarantined after `lost` attempts were lost with
/// their node.
pub fn quarantined_error(lost: u32) -> TaskError {
    TaskError::new(
        ErrorType::Internal,
        format!("quarantined: {lost} attempts were lost with their node"),
    )
}

impl ServiceConfig {
    /// Defaults for a node with `capacity`: two workers per core (a
    /// sandbox spends part of its life waiting on the kernel — mounts,
    /// cgroups, namespace teardown — and a second task per core fills that;
    /// the adaptive limit, which starts at one per core, decides how many
    /// are used), 10,000 queued tasks, batches of 1,000, 30 s leases,
    /// 500 ms fallback poll, quarantine after 3 lost attempts.
    pub fn new(node: impl Into<String>, capacity: Capacity) -> Self {
        let cores = (capacity.cpu_millis / 1000).max(1) as usize;
        Self {
            node: node.into(),
            capacity,
            workers: 2 * cores,
            max_queued: 10_000,
            max_batch: 1_000,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_millis(500),
            batch_writes: true,
            write_linger: Duration::from_millis(20),
            concurrency: Some(ConcurrencyConfig::default()),
            quarantine_after: DEFAULT_QUARANTINE_AFTER,
        }
    }
}

/// A lifecycle event, broadcast to SSE streams and waiters.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskEvent {
    /// The task.
    pub id: String,
    /// Its status after the transition.
    pub status: TaskStatus,
    /// The transition.
    pub record: TransitionRecord,
    /// The status is final (and the result is stored).
    pub is_final: bool,
}

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

/// What a committed batch of writes reports: the ids of the tasks whose
/// final write the store turned into CANCELLED (a cancel won).
type Committed = Arc<[String]>;

/// An acknowledgement of a committed write.
type Ack = oneshot::Sender<Result<Committed, String>>;

/// How long a failure of the store keeps the node not ready
/// ([`Service::ready`]) after the last write that met it: the writer's
/// retries and new submissions renew it while the outage lasts, and once it
/// passed without one, traffic is let through to find out.
const STORE_FAILURE_HOLD: Duration = Duration::from_secs(5);

/// The store as this node's writes last found it: for readiness, and the
/// count of writes held in memory until committed.
#[derive(Debug, Default)]
struct StoreHealth {
    /// The class of the last failure (unreachable or full), and when, as
    /// long as no write succeeded since.
    failing: Mutex<Option<(ErrorClass, Instant)>>,
    /// Writes sent to the writer and not yet committed or given up.
    pending: AtomicUsize,
}

impl StoreHealth {
    /// Notes the outcome of a write.
    fn record<T>(&self, outcome: &Result<T, StoreError>) {
        match outcome {
            Ok(_) => *lock(&self.failing) = None,
            Err(e) => match e.class() {
                class @ (ErrorClass::Unavailable | ErrorClass::Full) => {
                    *lock(&self.failing) = Some((class, Instant::now()));
                }
                ErrorClass::Other => {}
            },
        }
    }

    /// The store's problem, if a write met one lately.
    fn problem(&self) -> Option<ErrorClass> {
        lock(&self.failing)
            .filter(|(_, at)| at.elapsed() < STORE_FAILURE_HOLD)
            .map(|(class, _)| class)
    }

    /// `n` more writes (negative: fewer) wait for their commit.
    fn pending(&self, added: usize, removed: usize) {
        let now = if added > 0 {
            self.pending.fetch_add(added, Ordering::SeqCst) + added
        } else {
            self.pending.fetch_sub(removed, Ordering::SeqCst) - removed
        };
        gauge!("taskexec_store_pending_writes").set(now as f64);
    }
}

/// What the writer is asked to do.
#[derive(Debug)]
enum Pending {
    /// Commit writes (in one transaction, with whatever else is pending);
    /// acknowledge if asked.
    Write(Vec<Write>, Option<Ack>),
    /// Acknowledge once everything sent before is committed.
    Flush(Ack),
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

/// Tasks prepared at submission on this node, kept for their first claim
/// here (by task id), so that it does not validate and plan them again.
/// Bounded (a plan holds the task's files): past [`PREPARED_MAX`] entries
/// or [`PREPARED_MAX_BYTES`] of files, those older than [`PREPARED_TTL`]
/// (claimed by another node, or long queued) are dropped, and if that is
/// not enough nothing more is kept; a claim that finds no entry prepares
/// the task itself.
#[derive(Debug, Default)]
struct PreparedCache(Mutex<PreparedEntries>);

#[derive(Debug, Default)]
struct PreparedEntries {
    /// By task id: when it was kept, its size, the preparation.
    map: HashMap<String, (Instant, usize, Prepared)>,
    /// Sum of the sizes.
    bytes: usize,
}

/// Most entries of the [`PreparedCache`].
const PREPARED_MAX: usize = 1024;
/// Most bytes of files held by the [`PreparedCache`].
const PREPARED_MAX_BYTES: usize = 32 << 20;
/// Age past which a [`PreparedCache`] entry may be dropped when it is full.
const PREPARED_TTL: Duration = Duration::from_secs(30);

impl PreparedCache {
    fn put(&self, id: &str, prepared: Prepared) {
        let size = prepared
            .plan
            .files
            .iter()
            .chain(&prepared.plan.support_files)
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

    fn take(&self, id: &str) -> Option<Prepared> {
        let mut e = lock(&self.0);
        let (_, size, p) = e.map.remove(id)?;
        e.bytes -= size;
        Some(p)
    }
}

/// The waiters for final results on this node, by task id: the writer of
/// a final result wakes them once it is committed, without a store read
/// or a broadcast to every other waiter.
/// Each entry is numbered, so that a watch only ever removes its own.
#[derive(Debug, Default)]
struct FinalWaiters(Mutex<(u64, HashMap<String, Waiting>)>);

/// The number of an entry of [`FinalWaiters`] and the channel of its wake.
type Waiting = (u64, watch::Sender<bool>);

impl FinalWaiters {
    fn watch(self: &Arc<Self>, id: &str) -> FinalWatch {
        let mut guard = lock(&self.0);
        let (next, map) = &mut *guard;
        let (generation, tx) = map.entry(id.to_string()).or_insert_with(|| {
            *next += 1;
            (*next, watch::channel(false).0)
        });
        FinalWatch {
            waiters: Arc::clone(self),
            id: id.to_string(),
            generation: *generation,
            rx: tx.subscribe(),
        }
    }

    fn wake(&self, id: &str) {
        if let Some((_, tx)) = lock(&self.0).1.remove(id) {
            tx.send_replace(true);
        }
    }
}

/// A registered wait for the final result of one task
/// ([`Service::watch_final`]); registering before the task is submitted
/// means its end cannot be missed.
#[derive(Debug)]
pub struct FinalWatch {
    waiters: Arc<FinalWaiters>,
    id: String,
    generation: u64,
    rx: watch::Receiver<bool>,
}

impl FinalWatch {
    /// The task watched.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl Drop for FinalWatch {
    fn drop(&mut self) {
        let map = &mut lock(&self.waiters.0).1;
        // Ours is still counted: drop the entry if no one else waits.
        if map
            .get(&self.id)
            .is_some_and(|(g, tx)| *g == self.generation && tx.receiver_count() <= 1)
        {
            map.remove(&self.id);
        }
    }
}

/// How often a waiter re-reads a task that sent no event here (it may run
/// on another node sharing the database).
const WAIT_POLL: Duration = Duration::from_millis(100);

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
        gauge!("taskexec_concurrency_limit").set(service.concurrency_limit() as f64);
        gauge!("taskexec_cpu_capacity_millis").set(service.config.capacity.cpu_millis as f64);
        gauge!("taskexec_memory_capacity_bytes").set(service.config.capacity.memory_bytes as f64);
        Ok(service)
    }

    /// Wakes the scheduler: new work may be waiting (called on a database
    /// notification from another node).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Most tasks accepted in one batch.
    pub fn max_batch(&self) -> usize {
        self.config.max_batch
    }

    /// The configuration.
    pub fn config(&self) -> &ServiceConfig {
        &self.config
    }

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
                counter!("taskexec_tasks_rejected_total", "error_type" => error.error_type.as_str()).increment(1);
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
                counter!("taskexec_tasks_rejected_total", "error_type" => "INPUT_VALIDATION")
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
                counter!("taskexec_tasks_refused_queue_full_total").increment(1);
                return Err(SubmitError::QueueFull {
                    retry_after: Duration::from_secs(1),
                });
            }
            Err(e) => return Err(SubmitError::Store(e)),
        };
        let keep = self.config.workers > 0;
        for ((s, rt), prepared) in submitted.iter().zip(runtimes).zip(preparations) {
            if let Submitted::Created { id } = s {
                counter!("taskexec_tasks_submitted_total", "runtime" => rt).increment(1);
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

    /// Lifecycle events of every task, from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<TaskEvent> {
        self.events.subscribe()
    }

    /// Registers a wait for the final result of task `id`, to pass to
    /// [`Self::wait_watched`]: registered before the task is submitted, it
    /// cannot miss the task's end.
    pub fn watch_final(&self, id: &str) -> FinalWatch {
        self.finals.watch(id)
    }

    /// Waits until task `id` is final or `timeout` passes; the record then
    /// (None if there is no such task).
    pub async fn wait_final(
        &self,
        id: &str,
        timeout: Duration,
    ) -> Result<Option<TaskRecord>, StoreError> {
        self.wait_watched(self.watch_final(id), timeout, false)
            .await
    }

    /// Waits until the task of `watch` is final or `timeout` passes; the
    /// record then (None if there is no such task). `fresh`: the task was
    /// just submitted (and created) by the caller after the watch was
    /// registered, so the store is not read before something happens.
    ///
    /// A task that ends on this node wakes the wait when its result is
    /// committed; one running on another node (several nodes on one
    /// database) sends nothing here, so the store is also read every
    /// 100 ms.
    pub async fn wait_watched(
        &self,
        mut watch: FinalWatch,
        timeout: Duration,
        fresh: bool,
    ) -> Result<Option<TaskRecord>, StoreError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut read = !fresh;
        loop {
            if read {
                // A wake is used once (its entry is gone): watch anew
                // before reading, so that nothing is missed in between.
                if *watch.rx.borrow() || watch.rx.has_changed().is_err() {
                    let id = watch.id.clone();
                    watch = self.finals.watch(&id);
                }
                // The progress while not final (cheap whatever the task's
                // size), the whole record once.
                let Some(progress) = self.store.progress(&watch.id).await? else {
                    return Ok(None);
                };
                if progress.status.is_final() {
                    return self.store.get(&watch.id).await;
                }
            }
            read = true;
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return self.store.get(&watch.id).await;
            }
            let step = (now + WAIT_POLL).min(deadline);
            // Woken, or the poll is due: re-read. (A channel closed without
            // a wake cannot happen, but would wait for the poll.)
            if tokio::time::timeout_at(step, watch.rx.wait_for(|done| *done))
                .await
                .is_ok_and(|r| r.is_err())
            {
                tokio::time::sleep_until(step).await;
            }
        }
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
                        "taskexec_tasks_finished_total",
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
    pub async fn ready(&self) -> Result<(), String> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err("shutting down".into());
        }
        if !self.scheduler_alive.load(Ordering::SeqCst) {
            return Err("the scheduler is not running".into());
        }
        if self.fenced.load(Ordering::SeqCst) {
            return Err("leases could not be renewed: tasks stopped, claiming paused".into());
        }
        match self.health.problem() {
            Some(ErrorClass::Full) => return Err("store: full (writes fail)".into()),
            Some(_) => return Err("store: unavailable (writes fail)".into()),
            None => {}
        }
        self.store.ping().await.map_err(|e| format!("store: {e}"))
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

    /// Waits until every write sent so far is committed.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.writes.send(Pending::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    fn lock_running(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn free(&self) -> (Capacity, usize) {
        let running = self.lock_running();
        let (cpu, mem) = running.values().fold((0u64, 0u64), |(c, m), r| {
            (c + r.cpu_millis, m + r.memory_bytes)
        });
        gauge!("taskexec_cpu_admitted_millis").set(cpu as f64);
        gauge!("taskexec_memory_admitted_bytes").set(mem as f64);
        gauge!("taskexec_tasks_running").set(running.len() as f64);
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
    fn adjust_limit(&self, feed: impl FnOnce(&mut Limiter, Instant) -> usize) {
        let Some(l) = &self.limiter else { return };
        let (before, after, reason) = {
            let mut l = lock(l);
            let before = l.limit();
            let after = feed(&mut l, Instant::now());
            (before, after, l.last_reason())
        };
        gauge!("taskexec_concurrency_limit").set(after as f64);
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

    /// Reads the host's memory pressure every second for the limiter.
    async fn watch_memory(self: Arc<Self>) {
        loop {
            if self.stopping.load(Ordering::SeqCst) {
                break;
            }
            let reading = crate::pressure::read_host();
            if let Some(s) = reading.stall_percent {
                gauge!("taskexec_memory_stall_ratio").set(s / 100.0);
            }
            if let Some(a) = reading.available_ratio {
                gauge!("taskexec_memory_available_ratio").set(a);
            }
            self.adjust_limit(|l, now| l.on_memory(now, &reading));
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Publishes the warm runner's counters and gauges at start and every
    /// [`WARM_STATS_EVERY`] until the service stops; at once returns for a
    /// runner that keeps nothing warm. They are read on a blocking thread:
    /// reading waits while a fork server starts.
    async fn publish_warm_stats(self: Arc<Self>) {
        loop {
            let engine = Arc::clone(&self.engine);
            let Ok(Some(stats)) = tokio::task::spawn_blocking(move || engine.warm_stats()).await
            else {
                return;
            };
            record_warm_stats(&stats);
            tokio::time::sleep(WARM_STATS_EVERY).await;
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
        }
    }

    /// Sends writes, to be committed in one transaction; when `ack`, waits
    /// for the commit and returns what it reports (`None` if it failed).
    async fn write(&self, writes: Vec<Write>, ack: bool) -> Option<Committed> {
        if writes.is_empty() {
            return Some(Arc::from([]));
        }
        let n = writes.len();
        self.health.pending(n, 0);
        if ack {
            let (tx, rx) = oneshot::channel();
            if self.writes.send(Pending::Write(writes, Some(tx))).is_ok() {
                match rx.await {
                    Ok(Ok(committed)) => return Some(committed),
                    Ok(Err(e)) => error!(error = %e, "store write failed"),
                    Err(_) => error!("store writer stopped"),
                }
            } else {
                self.health.pending(0, n);
            }
            None
        } else {
            if self.writes.send(Pending::Write(writes, None)).is_err() {
                self.health.pending(0, n);
            }
            None
        }
    }

    /// Records a transition in the lifecycle and the event stream, and adds
    /// its store write to `batch` (for the caller to send).
    fn transition(
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
    async fn finish(
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
            "taskexec_tasks_finished_total",
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

    /// Recovery at start: attempts this node was running when it died are
    /// recorded as interrupted (INTERNAL, "executor restarted") and retried
    /// or failed per the task's policy.
    async fn recover(&self) -> Result<(), StoreError> {
        let orphans = self.store.claimed_by(&self.config.node).await?;
        for c in orphans {
            let id = c.record.task.id.clone();
            warn!(task_id = %id, attempt = c.attempt, "recovering a task interrupted by a restart");
            let error = TaskError::new(ErrorType::Internal, "executor restarted");
            self.end_attempt_without_run(c, error).await;
        }
        self.flush().await;
        Ok(())
    }

    /// An attempt that ended before it could run (interrupted, or the task no
    /// longer prepares): record it and retry or fail per the policy.
    async fn end_attempt_without_run(&self, c: ClaimedTask, error: TaskError) {
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
            counter!("taskexec_tasks_quarantined_total").increment(1);
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
    async fn conclude(
        &self,
        id: &str,
        lc: &mut Lifecycle,
        attempt: u32,
        stored: &TaskRecord,
        attempts: Vec<AttemptRecord>,
        decision: Decision,
        last: Option<&crate::AttemptOutput>,
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
                counter!("taskexec_retries_total").increment(1);
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
                    let error = crate::cancelled_error();
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

    /// The scheduler: claims what this node can admit, runs it.
    async fn schedule(self: Arc<Self>) {
        loop {
            if self.stopping.load(Ordering::SeqCst) {
                break;
            }
            let claiming = self.claiming.lock().await;
            let (free, slots) = self.free();
            let want = slots.min(64);
            let mut claimed = Vec::new();
            let fenced = self.fenced.load(Ordering::SeqCst);
            if !fenced && slots > 0 && free.cpu_millis > 0 && free.memory_bytes > 0 {
                match self
                    .store
                    .claim(&self.config.node, free, want, now(), self.config.lease)
                    .await
                {
                    Ok(c) => claimed = c,
                    Err(e) => {
                        error!(error = %e, "claiming tasks failed");
                        tokio::time::sleep(self.config.poll_interval).await;
                    }
                }
            }
            let got = claimed.len();
            self.start_claimed(claimed);
            drop(claiming);
            // Fewer than asked: nothing more fits now; a submission, a
            // requeue or a task's end wakes the loop (a wake during the
            // claim is kept). All slots taken: so is a task's end.
            if got < want || got >= slots {
                tokio::select! {
                    () = self.wake.notified() => {}
                    () = tokio::time::sleep(self.config.poll_interval) => {}
                }
            }
        }
        self.scheduler_alive.store(false, Ordering::SeqCst);
    }

    /// Records claimed tasks as running here and starts their attempts.
    fn start_claimed(self: &Arc<Self>, claimed: Vec<ClaimedTask>) {
        for c in claimed {
            let cancel = match Cancellation::new() {
                Ok(c) => c,
                Err(e) => {
                    error!(error = %e, "cannot create a cancellation handle");
                    continue;
                }
            };
            self.lock_running().insert(
                c.record.task.id.clone(),
                Running {
                    cancel: cancel.clone(),
                    cpu_millis: c.cpu_millis.into(),
                    memory_bytes: c.memory_bytes,
                    ran: false,
                },
            );
            let me = Arc::clone(self);
            let span = tracing::info_span!("task", task_id = %c.record.task.id);
            tokio::spawn(async move { me.work(c, cancel).await }.instrument(span));
        }
    }

    /// Runs one claimed attempt to its decision.
    async fn work(self: Arc<Self>, c: ClaimedTask, cancel: Cancellation) {
        let id = c.record.task.id.clone();
        let attempt = c.attempt;
        let queue_wait = (now() - c.queued_since).max(time::Duration::ZERO);
        histogram!("taskexec_task_phase_seconds", "phase" => "queue_wait")
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
                    histogram!("taskexec_task_phase_seconds", "phase" => phase).record(v / 1000.0);
                }
                if let Some(e) = &out.record.error
                    && e.error_type == ErrorType::EnvironmentSetup
                {
                    counter!("taskexec_sandbox_setup_failures_total").increment(1);
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
                        let mut result = base_result(&c.record, attempts, Some(&out));
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
                            Some(&out),
                            batch,
                        )
                        .await;
                    }
                }
                histogram!("taskexec_task_phase_seconds", "phase" => "total")
                    .record(t0.elapsed().as_secs_f64() + queue_wait.as_seconds_f64());
            }
        }
        self.lock_running().remove(&id);
        self.idle.notify_waiters();
        self.wake.notify_one();
    }

    /// Stops the running tasks `ids` (killing their sandboxes) because this
    /// node does not hold their leases any more, or may not: their attempts
    /// record nothing here, the task's next holder takes them over.
    fn fence(&self, ids: &[&String], why: &str) {
        let running = self.lock_running();
        for id in ids {
            if let Some(r) = running.get(*id)
                && !r.ran
                && r.cancel.fence()
            {
                warn!(task_id = %id, reason = why, "self-fencing: stopping a task");
                counter!("taskexec_tasks_self_fenced_total").increment(1);
            }
        }
    }

    /// Renews the leases of running tasks, picks up cancel requests made
    /// through the store (from another node's API), and takes over tasks
    /// whose node stopped renewing its lease (it died, or lost the database):
    /// their interrupted attempt is recorded and they are retried or failed
    /// per their policy.
    async fn keep_leases(self: Arc<Self>) {
        let every =
            (self.config.lease / 3).clamp(Duration::from_millis(200), Duration::from_secs(10));
        let tick = Duration::from_millis(500).min(every);
        let mut last_renew = Instant::now();
        // When the last renewal that went through was sent: the leases it
        // extended last until then plus a lease.
        let mut renewed = Instant::now();
        let mut last_takeover = Instant::now();
        loop {
            tokio::time::sleep(tick).await;
            if self.stopping.load(Ordering::SeqCst) {
                break;
            }
            // Off the claim path: counting the queue scans the table.
            if let Ok(stats) = self.store.stats().await {
                gauge!("taskexec_queue_depth").set(stats.queued as f64);
                if self.fenced.swap(false, Ordering::SeqCst) {
                    info!("the store answers again: claiming resumes");
                    self.wake.notify_one();
                }
            }
            let ids: Vec<String> = self.lock_running().keys().cloned().collect();
            if !ids.is_empty() {
                if let Ok(cancelled) = self.store.cancel_requested(&ids).await {
                    let running = self.lock_running();
                    for id in cancelled {
                        if let Some(r) = running.get(&id) {
                            r.cancel.cancel();
                        }
                    }
                }
                if last_renew.elapsed() >= every {
                    let sent = Instant::now();
                    last_renew = sent;
                    let until = now() + self.config.lease;
                    match self.store.renew(&self.config.node, &ids, until).await {
                        Ok(held) => {
                            renewed = sent;
                            // Taken over (this node was paused or cut off
                            // past its lease), or ended meanwhile.
                            let held: HashSet<String> = held.into_iter().collect();
                            let lost: Vec<&String> =
                                ids.iter().filter(|id| !held.contains(*id)).collect();
                            self.fence(&lost, "its lease is another node's now");
                        }
                        Err(e) => {
                            warn!(error = %e, "renewing leases failed");
                            // The leases run out before the next renewal
                            // could extend them: stop the tasks now, so
                            // they never run beside their next holder's.
                            if renewed.elapsed() + every >= self.config.lease {
                                let all: Vec<&String> = ids.iter().collect();
                                self.fence(&all, "its lease could not be renewed in time");
                                if !self.fenced.swap(true, Ordering::SeqCst) {
                                    warn!(
                                        "leases expire unrenewed: running tasks stopped, claiming paused"
                                    );
                                }
                            }
                        }
                    }
                }
            }
            if self.config.workers > 0 && last_takeover.elapsed() >= every {
                last_takeover = Instant::now();
                match self
                    .store
                    .take_over_expired(&self.config.node, now(), self.config.lease)
                    .await
                {
                    Ok(lost) => {
                        for c in lost {
                            // Our own tasks are never taken over from ourselves
                            // while they run: we renew them.
                            if self.lock_running().contains_key(&c.record.task.id) {
                                continue;
                            }
                            let from = c.previous_node.clone().unwrap_or_else(|| "unknown".into());
                            warn!(task_id = %c.record.task.id, attempt = c.attempt, lost_node = %from, "taking over a task whose lease expired");
                            counter!("taskexec_tasks_taken_over_total").increment(1);
                            let error =
                                TaskError::new(ErrorType::Internal, format!("node {from} lost"));
                            self.end_attempt_without_run(c, error).await;
                        }
                    }
                    Err(e) => warn!(error = %e, "looking for expired leases failed"),
                }
            }
        }
    }
}

/// How often the warm runner's metrics are refreshed.
const WARM_STATS_EVERY: Duration = Duration::from_secs(2);

/// Sets the warm runner's metrics (see docs/metrics.md). Its counters are
/// kept by the runner and exported as they stand.
fn record_warm_stats(s: &WarmStats) {
    let p = &s.pool;
    gauge!("taskexec_warm_pool_ready").set(p.warm as f64);
    gauge!("taskexec_warm_pool_target").set(p.target as f64);
    gauge!("taskexec_warm_pool_keys").set(p.keys as f64);
    counter!("taskexec_warm_pool_hits_total").absolute(p.hits);
    counter!("taskexec_warm_pool_misses_total").absolute(p.misses);
    counter!("taskexec_warm_pool_created_total").absolute(p.created);
    counter!("taskexec_warm_pool_discarded_total").absolute(p.discarded);
    counter!("taskexec_warm_pool_retired_total").absolute(p.retired);
    counter!("taskexec_warm_pool_build_failures_total").absolute(p.failed);
    gauge!("taskexec_fork_servers").set(s.fork_servers as f64);
    gauge!("taskexec_fork_server_spares").set(s.fork_server_spares as f64);
    counter!("taskexec_fork_server_runs_total").absolute(s.fork_server_runs);
    for (reason, n) in s.fallback_reasons.labelled() {
        counter!("taskexec_fork_server_fallbacks_total", "reason" => reason).absolute(n);
    }
    counter!("taskexec_fork_server_start_failures_total").absolute(s.fork_server_start_failures);
    for (outcome, n) in [
        ("started", s.fork_server_starts),
        ("refused", s.fork_server_starts_refused),
        ("failed", s.fork_server_start_failures),
    ] {
        counter!("taskexec_fork_server_starts_total", "outcome" => outcome).absolute(n);
    }
    // A gauge that only grows: the metrics library's counters are integers.
    gauge!("taskexec_fork_server_start_cpu_seconds_total")
        .set(s.fork_server_start_cpu.as_secs_f64());
    counter!("taskexec_fork_servers_recycled_total").absolute(s.fork_servers_recycled);
}

/// Locks a mutex whose data stays consistent even if a holder panicked.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A result carrying every attempt so far (last attempt's output wins).
fn base_result(
    stored: &TaskRecord,
    attempts: Vec<AttemptRecord>,
    last: Option<&crate::AttemptOutput>,
) -> TaskResult {
    let mut result = TaskResult::new(stored.task.id.clone(), TaskStatus::Failed);
    let meta = &mut result.execution_metadata;
    meta.method = taskexec_model::Method::Container;
    meta.start_time = attempts.first().map(|a| a.start_time);
    meta.end_time = Some(now());
    meta.duration = attempts.iter().map(|a| a.duration_ms).sum();
    for a in &attempts {
        crate::add_phases(&mut meta.phases, &a.phases);
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

impl Pending {
    /// Someone waits for this one's commit.
    fn awaited(&self) -> bool {
        matches!(self, Pending::Write(_, Some(_)) | Pending::Flush(_))
    }
}

/// The store writer: takes writes as they come and commits what has piled
/// up in one transaction. With batching (`linger` set), a write someone
/// waits for goes at once, with everything that arrived while the previous
/// transaction committed; writes nobody waits for wait up to `linger` for
/// one that is (a short task's end, usually), so that a task's start and
/// end share a transaction.
async fn writer(
    store: Arc<dyn TaskStore>,
    health: Arc<StoreHealth>,
    node: String,
    mut rx: mpsc::UnboundedReceiver<Pending>,
    linger: Option<Duration>,
) {
    const MAX_BATCH: usize = 512;
    while let Some(first) = rx.recv().await {
        let mut pending = vec![first];
        if let Some(linger) = linger {
            let until = tokio::time::Instant::now() + linger;
            loop {
                while pending.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(p) => pending.push(p),
                        Err(_) => break,
                    }
                }
                if pending.len() >= MAX_BATCH || pending.iter().any(Pending::awaited) {
                    break;
                }
                match tokio::time::timeout_at(until, rx.recv()).await {
                    Ok(Some(p)) => pending.push(p),
                    Ok(None) | Err(_) => break,
                }
            }
        }
        let mut writes = Vec::with_capacity(pending.len());
        let mut acks = Vec::new();
        for p in pending {
            match p {
                Pending::Write(w, ack) => {
                    writes.extend(w);
                    acks.extend(ack);
                }
                Pending::Flush(ack) => acks.push(ack),
            }
        }
        histogram!("taskexec_store_batch_writes").record(writes.len() as f64);
        let n = writes.len();
        let result = if writes.is_empty() {
            Ok(Arc::from([]))
        } else {
            apply_with_retries(&*store, &health, &node, writes).await
        };
        health.pending(0, n);
        for ack in acks {
            let _ = ack.send(result.clone());
        }
    }
}

/// Applies a batch, retrying with backoff while the database is unreachable
/// (a restart, a failover, a cut connection) for up to about two minutes,
/// so results are not dropped; the fences make a retried batch harmless.
async fn apply_with_retries(
    store: &dyn TaskStore,
    health: &StoreHealth,
    node: &str,
    writes: Vec<Write>,
) -> Result<Committed, String> {
    let mut delay = Duration::from_millis(50);
    let started = Instant::now();
    loop {
        let outcome = store.apply_as(node, writes.clone()).await;
        health.record(&outcome);
        match outcome {
            Ok(cancelled) => return Ok(Arc::from(cancelled)),
            Err(e) => {
                let mut msg = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    msg.push_str(": ");
                    msg.push_str(&s.to_string());
                    src = s.source();
                }
                if started.elapsed() > Duration::from_secs(120) {
                    error!(error = %msg, writes = writes.len(), "store write failed; giving up");
                    return Err(msg);
                }
                warn!(error = %msg, retry_in_ms = delay.as_millis() as u64, "store write failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}
