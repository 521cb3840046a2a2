//! The service's settings, and the quarantine of poison tasks.

use std::time::Duration;

use taskexec_model::{ErrorType, TaskError};
use taskexec_store::Capacity;

use crate::limiter::ConcurrencyConfig;

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
    /// How often a follower of a task (`?wait`, the event stream) re-reads
    /// it when nothing woke it. A change made on another node wakes it
    /// through a database notification ([`crate::Service::task_changed`]),
    /// so this bounds only the delay after a lost notification (the
    /// listener reconnecting).
    pub follow_fallback: Duration,
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
    /// 500 ms fallback poll, quarantine after 3 lost attempts, followers
    /// re-reading a task every second at most when nothing woke them.
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
            follow_fallback: Duration::from_secs(1),
        }
    }
}
