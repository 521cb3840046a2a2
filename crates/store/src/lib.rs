//! The durable store and queue of the taskexec service, behind one
//! [`TaskStore`] trait, with two backends: an embedded SQLite database for
//! one node ([`SqliteStore`], `sqlite://PATH`) and a PostgreSQL database
//! that many nodes share ([`PgStore`], `postgres://…`). Every method is one
//! transaction and nothing relies on a single writer; the backend-independent
//! conformance suite (`tests/conformance`) runs on both.
//!
//! The queue lives in the `tasks` table: a task is *queued* while it waits
//! to be claimed (first submission, or a retry whose backoff is persisted as
//! `run_after`). Claiming takes queued tasks by priority, then FIFO, that fit
//! in the claiming node's free CPU and memory, and starts their next attempt
//! under a lease that its node renews; a task whose lease expired (its node
//! is gone) is taken over by another node with
//! [`TaskStore::take_over_expired`]. Writes that change a task carry the
//! attempt number they belong to, and are ignored when the task has moved
//! on (fencing).
//!
//! Semantics beyond the trait docs (both backends; the write rules are one
//! shared implementation):
//! - A task is *closed* once its result is stored (by [`Write::Finish`], or
//!   by cancelling it while queued); every later write is ignored. A
//!   [`Write::Transition`] into a final status is applied, after which only
//!   [`Write::AttemptDone`] (for an attempt not yet recorded) and
//!   [`Write::Finish`] (with that same status) still apply, so an attempt's
//!   final transition, attempt record and result can be written in any order.
//! - A [`Write::Finish`] whose result status is not final is ignored (and
//!   logged): it would release the task without requeuing it.
//! - Cancel against completion is one compare-and-set on the task's row:
//!   [`TaskStore::request_cancel`] records a cancel only while the task is
//!   not final (else it answers [`CancelOutcome::AlreadyFinal`]), and once
//!   recorded, the task ends CANCELLED: a later transition into another
//!   final status, and a result with one, are stored as CANCELLED
//!   ([`cancel_won_transition`]; the output is discarded, the attempt's
//!   record kept), and a requeue is ignored (its node then finishes the
//!   task as cancelled). So a cancel answered `Requested` is never
//!   followed by another final status.
//! - `claim` returns each record as stored before the claim (status,
//!   attempt), but with `node` set, `queued` false and `updated_at = now`.
//! - `list` cursors are the last row's sequence number; a cursor that is not
//!   one fails with [`StoreError::BadCursor`].
//! - `submit` fails as a whole (storing nothing) if a new task reuses an
//!   existing id (a unique violation in [`StoreError::Database`]).
//! - Times are stored as unix milliseconds, so they come back truncated to
//!   the millisecond (JSON columns keep full precision).

mod common;
pub mod postgres;
pub mod sqlite;

#[cfg(test)]
mod class_tests;

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use taskexec_model::{AttemptRecord, TaskInstance, TaskResult, TaskStatus, TransitionRecord};
use time::OffsetDateTime;

pub use common::{cancel_won_transition, request_hash};
pub use postgres::{PgOptions, PgStore};
pub use sqlite::{Durability, SqliteStore};

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("database")]
    Database(#[from] sqlx::Error),
    /// A connection of the SQLite store's own threads failed.
    #[error("database")]
    Sqlite(#[from] rusqlite::Error),
    /// The store was closed ([`SqliteStore::close`]) or its threads are
    /// gone.
    #[error("the store is closed")]
    Closed,
    /// Setting up the store failed outside the database: its temporary
    /// directory, its threads.
    #[error("{what}")]
    Setup {
        /// What was being done.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A migration failed.
    #[error("migration")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Stored JSON could not be read back.
    #[error("stored JSON of task {id}")]
    Json {
        /// The task.
        id: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The queue holds `depth` tasks, the most allowed is `max`.
    #[error("the queue is full ({depth} of {max} tasks waiting)")]
    QueueFull {
        /// Tasks waiting now.
        depth: u64,
        /// The bound.
        max: u64,
    },
    /// Task `index` of a submission reuses an idempotency key stored (or
    /// sent earlier in the same batch) with a different request.
    #[error(
        "the idempotency key {key:?} was already used for a different request (task {existing})"
    )]
    IdempotencyConflict {
        /// The task's index in the submitted batch.
        index: usize,
        /// The key, as the client sent it.
        key: String,
        /// The id of the task the key belongs to.
        existing: String,
    },
    /// A listing cursor that no listing returned.
    #[error("invalid listing cursor {0:?}")]
    BadCursor(String),
    /// The directory of a SQLite database file does not exist (the file
    /// is created when missing, its directory is not).
    #[error("the directory {} does not exist: create it with `mkdir -p {}`", .dir.display(), .dir.display())]
    NoDirectory {
        /// The missing directory.
        dir: std::path::PathBuf,
    },
    /// The PostgreSQL database named by the URL does not exist.
    #[error(
        "the database {name:?} does not exist: create it with `createdb {name}` (as a user who may)"
    )]
    NoDatabase {
        /// The database's name.
        name: String,
    },
    /// A database URL the store does not understand.
    #[error(
        "unsupported database URL {0:?}: expected sqlite://PATH, sqlite::memory: or postgres://..."
    )]
    BadUrl(String),
}

/// What a client or a caller can do about a [`StoreError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// The database cannot be reached or is busy now (connection refused
    /// or cut, server shutting down or starting, too many connections, pool
    /// timed out, lock contention): try again later.
    Unavailable,
    /// The database's storage is full: nothing can be written until an
    /// operator makes room.
    Full,
    /// Anything else: a fault of ours or of the data.
    Other,
}

/// SQLite's primary result code of a full disk (`SQLITE_FULL`).
const SQLITE_FULL: i32 = 13;

/// The class of SQLite's (extended) result code `code`.
fn sqlite_class(code: i32) -> ErrorClass {
    match code & 0xff {
        SQLITE_FULL => ErrorClass::Full,
        // SQLITE_BUSY, SQLITE_LOCKED, SQLITE_CANTOPEN.
        5 | 6 | 14 => ErrorClass::Unavailable,
        _ => ErrorClass::Other,
    }
}

/// The class of a PostgreSQL SQLSTATE.
fn postgres_class(state: &str) -> ErrorClass {
    match state {
        // disk_full (and out_of_memory, insufficient_resources' kin).
        "53100" => ErrorClass::Full,
        // too_many_connections, admin/crash shutdown, cannot_connect_now,
        // serialization failure, deadlock.
        "53300" | "57P01" | "57P02" | "57P03" | "40001" | "40P01" => ErrorClass::Unavailable,
        // object_not_in_prerequisite_state: what a new connection meets
        // while the database does not accept connections (`ALTER DATABASE
        // ... ALLOW_CONNECTIONS false`, as for maintenance); the statements
        // of the store raise it for nothing else.
        "55000" => ErrorClass::Unavailable,
        // connection_exception and its subclasses.
        s if s.starts_with("08") => ErrorClass::Unavailable,
        _ => ErrorClass::Other,
    }
}

impl StoreError {
    /// What can be done about this error (see [`ErrorClass`]), whichever
    /// backend answered.
    pub fn class(&self) -> ErrorClass {
        match self {
            StoreError::Database(sqlx::Error::Database(db)) => {
                let code = db.code();
                let code = code.as_deref().unwrap_or("");
                if db
                    .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                    .is_some()
                {
                    postgres_class(code)
                } else {
                    // SQLite (through sqlx) reports its result code.
                    code.parse().map_or(ErrorClass::Other, sqlite_class)
                }
            }
            StoreError::Database(
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed,
            ) => ErrorClass::Unavailable,
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => {
                sqlite_class(e.extended_code)
            }
            StoreError::Closed => ErrorClass::Unavailable,
            _ => ErrorClass::Other,
        }
    }

    /// Whether trying the same operation again later may succeed: the
    /// database could not be reached or was busy ([`ErrorClass::Unavailable`]:
    /// a connection refused or cut, an I/O or TLS failure on the way, the
    /// pool timed out or closed, the server shutting down or starting, too
    /// many connections, SQLite busy or locked, a serialization failure or a
    /// deadlock). Not transient: a full disk ([`ErrorClass::Full`], which
    /// only an operator who makes room fixes), constraint violations,
    /// stored data that does not decode, bad cursors or URLs, and the
    /// other faults of ours or of the data.
    pub fn is_transient(&self) -> bool {
        self.class() == ErrorClass::Unavailable
    }

    /// Whether a uniqueness constraint refused the write (a task id that
    /// exists already), whichever backend answered.
    pub fn is_unique_violation(&self) -> bool {
        match self {
            StoreError::Database(sqlx::Error::Database(db)) => db.is_unique_violation(),
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => matches!(
                e.extended_code,
                rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                    | rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
            ),
            _ => false,
        }
    }
}

/// A task to enqueue. The id is assigned by the caller.
#[derive(Debug, Clone)]
pub struct NewTask {
    /// The whole task (id set).
    pub task: TaskInstance,
    /// Runtime name (for listing and metrics).
    pub runtime: String,
    /// CPU request in millicores (admission).
    pub cpu_millis: u32,
    /// Memory request in bytes (admission).
    pub memory_bytes: u64,
    /// The RECEIVED transition.
    pub received: TransitionRecord,
    /// The key space of the task's `idempotencyKey`: a key is deduplicated
    /// only against tasks submitted with the same scope (one per API
    /// credential). Empty: the shared key space, the one of tasks stored
    /// before scopes existed.
    pub idempotency_scope: String,
    /// A digest of the request that submitted the task ([`request_hash`]),
    /// stored with its idempotency key: a later submission of the same key
    /// with another digest is refused ([`StoreError::IdempotencyConflict`]).
    /// `None` (and tasks stored before digests existed) matches any.
    pub request_hash: Option<String>,
}

impl NewTask {
    /// The deduplication key as stored: the task's `idempotencyKey`, after
    /// its scope and a unit separator when the scope is not empty (a key
    /// holds no control character, so two scopes never collide).
    pub fn stored_key(&self) -> Option<String> {
        let key = self.task.idempotency_key.as_deref()?;
        Some(if self.idempotency_scope.is_empty() {
            key.to_owned()
        } else {
            format!("{}\u{1f}{key}", self.idempotency_scope)
        })
    }

    /// Whether this task's request digest and a stored one (of an earlier
    /// task with the same key) allow the earlier task as the answer: equal,
    /// or either unknown.
    pub(crate) fn same_request(&self, stored: Option<&str>) -> bool {
        match (self.request_hash.as_deref(), stored) {
            (Some(mine), Some(theirs)) => mine == theirs,
            _ => true,
        }
    }
}

/// What `submit` did with one task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submitted {
    /// Stored and queued.
    Created {
        /// The task id.
        id: String,
    },
    /// The idempotency key was seen before: this is the earlier task.
    Existing {
        /// The earlier task's id.
        id: String,
    },
}

impl Submitted {
    /// The task id, new or earlier.
    pub fn id(&self) -> &str {
        match self {
            Self::Created { id } | Self::Existing { id } => id,
        }
    }
}

/// Everything stored about one task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskRecord {
    /// The task as submitted.
    pub task: TaskInstance,
    /// Current status.
    pub status: TaskStatus,
    /// Attempts started so far.
    pub attempt: u32,
    /// Runtime name.
    pub runtime: String,
    /// Waiting to be claimed.
    pub queued: bool,
    /// Node running it, if claimed.
    pub node: Option<String>,
    /// When it was submitted.
    #[serde(with = "time::serde::rfc3339")]
    pub submitted_at: OffsetDateTime,
    /// Last change.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    /// A cancel was requested.
    pub cancel_requested: bool,
    /// Every transition so far.
    pub history: Vec<TransitionRecord>,
    /// Every finished attempt so far.
    pub attempts: Vec<AttemptRecord>,
    /// The final result, once final.
    pub result: Option<TaskResult>,
}

/// What a follower of a running task reads ([`TaskStore::progress`]): the
/// task's lifecycle without its input, output or attempt records, so that
/// reading it costs the same whatever the size of the task.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskProgress {
    /// Current status.
    pub status: TaskStatus,
    /// Attempts started so far.
    pub attempt: u32,
    /// Waiting to be claimed.
    pub queued: bool,
    /// Node running it, if claimed.
    pub node: Option<String>,
    /// When it was submitted.
    pub submitted_at: OffsetDateTime,
    /// Last change.
    pub updated_at: OffsetDateTime,
    /// A cancel was requested.
    pub cancel_requested: bool,
    /// Every transition so far (as in [`TaskRecord::history`]).
    pub history: Vec<TransitionRecord>,
}

/// A row of a listing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskSummary {
    /// Task id.
    pub id: String,
    /// Current status.
    pub status: TaskStatus,
    /// Runtime.
    pub runtime: String,
    /// Workflow, if any.
    pub workflow_instance_id: Option<String>,
    /// Priority.
    pub priority: i32,
    /// Attempts started.
    pub attempt: u32,
    /// Submission time.
    #[serde(with = "time::serde::rfc3339")]
    pub submitted_at: OffsetDateTime,
    /// Last change.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

/// Filters of a listing; newest first, cursor-paginated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListQuery {
    /// Only this status.
    pub status: Option<TaskStatus>,
    /// Only this runtime.
    pub runtime: Option<String>,
    /// Only this workflow.
    pub workflow_instance_id: Option<String>,
    /// Page size (1..=500).
    pub limit: u32,
    /// Opaque cursor from the previous page.
    pub cursor: Option<String>,
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListPage {
    /// The rows.
    pub items: Vec<TaskSummary>,
    /// Cursor of the next page, if there is one.
    pub next_cursor: Option<String>,
}

/// Free resources of a claiming node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// Free CPU in millicores.
    pub cpu_millis: u64,
    /// Free memory in bytes.
    pub memory_bytes: u64,
}

/// The claim half of [`TaskStore::submit_and_claim`]: what
/// [`TaskStore::claim`] takes.
#[derive(Debug, Clone, Copy)]
pub struct ClaimRequest<'a> {
    /// The claiming node.
    pub node: &'a str,
    /// What is free on it.
    pub free: Capacity,
    /// Tasks at most.
    pub limit: usize,
    /// The store's "now" (run_after, lease start).
    pub now: OffsetDateTime,
    /// Lease length.
    pub lease: Duration,
}

/// A task claimed for its next attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimedTask {
    /// The stored task (status as before the claim).
    pub record: TaskRecord,
    /// The attempt number this claim starts (record.attempt + 1).
    pub attempt: u32,
    /// When the task became claimable (submission or retry time), for queue wait.
    pub queued_since: OffsetDateTime,
    /// CPU request.
    pub cpu_millis: u32,
    /// Memory request.
    pub memory_bytes: u64,
    /// The node that held the interrupted attempt: the node that claimed
    /// it, as stored with the attempt number that fences its writes, not
    /// whichever node held the lease last (a node that took the task over
    /// and lost it before it could record the attempt ran nothing).
    /// `take_over_expired` only; `None` for a claim from the queue and for
    /// `claimed_by`.
    pub previous_node: Option<String>,
    /// Attempts of this task lost with their node so far, the interrupted
    /// one included: each attempt whose lease expired counts once, however
    /// many nodes took it over (`take_over_expired` only; 0 otherwise).
    pub lost_attempts: u32,
}

/// A change to a stored task. `attempt` fences: a write for an attempt other
/// than the task's current one is ignored.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// Append a lifecycle transition and set the status.
    Transition {
        /// Task id.
        id: String,
        /// The attempt the write belongs to.
        attempt: u32,
        /// The transition.
        record: TransitionRecord,
    },
    /// An attempt ended.
    AttemptDone {
        /// Task id.
        id: String,
        /// Its record.
        record: AttemptRecord,
    },
    /// Put the task back in the queue for its next attempt at `run_after`.
    Requeue {
        /// Task id.
        id: String,
        /// The attempt that just ended.
        attempt: u32,
        /// Not claimable before.
        run_after: OffsetDateTime,
    },
    /// The task is final: store its result, release it.
    Finish {
        /// Task id.
        id: String,
        /// The attempt the result belongs to.
        attempt: u32,
        /// The result (status final).
        result: TaskResult,
    },
}

/// What a cancel request found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelOutcome {
    /// No such task.
    NotFound,
    /// Already final: nothing to do.
    AlreadyFinal(TaskStatus),
    /// Was queued: now CANCELLED in the store (transition recorded).
    CancelledQueued,
    /// Is running on `node`: the request is recorded, the node must kill it.
    Requested {
        /// The node running it.
        node: Option<String>,
    },
}

/// Counts by status, for metrics and readiness.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Tasks waiting to be claimed.
    pub queued: u64,
    /// Tasks claimed and not final.
    pub running: u64,
}

/// The durable store and queue.
#[async_trait]
pub trait TaskStore: Send + Sync + Debug {
    /// Stores and queues tasks in one transaction. A task whose
    /// `idempotencyKey` was seen before is not stored again: its earlier id
    /// is returned. Fails with `QueueFull` (storing nothing) when the queue
    /// would exceed `max_queued`.
    async fn submit(
        &self,
        tasks: Vec<NewTask>,
        max_queued: u64,
    ) -> Result<Vec<Submitted>, StoreError>;
    /// [`TaskStore::submit`], then [`TaskStore::claim`] for a node with room,
    /// as one step: what the claim takes is exactly what a claim right after
    /// the submission would take (by priority, then submission order; the
    /// new tasks or older ones alike). A backend may do both in one
    /// transaction (SQLite does); the default runs them in turn, and a claim
    /// that fails there leaves the tasks queued (the submission stands).
    async fn submit_and_claim(
        &self,
        tasks: Vec<NewTask>,
        max_queued: u64,
        claim: ClaimRequest<'_>,
    ) -> Result<(Vec<Submitted>, Vec<ClaimedTask>), StoreError> {
        let submitted = self.submit(tasks, max_queued).await?;
        let claimed = self
            .claim(claim.node, claim.free, claim.limit, claim.now, claim.lease)
            .await
            .unwrap_or_default();
        Ok((submitted, claimed))
    }
    /// One task, whole.
    async fn get(&self, id: &str) -> Result<Option<TaskRecord>, StoreError>;
    /// One task's progress: the fields of [`TaskRecord`] that change while
    /// it runs, from one snapshot, without reading its submitted task,
    /// attempt records or result.
    async fn progress(&self, id: &str) -> Result<Option<TaskProgress>, StoreError>;
    /// A page of tasks, newest first.
    async fn list(&self, query: &ListQuery) -> Result<ListPage, StoreError>;
    /// Claims up to `limit` queued tasks whose `run_after` has passed, by
    /// priority (high first) then submission order, skipping those that do
    /// not fit in what is left of `free`; each starts its next attempt and is
    /// leased to `node` until `now + lease`.
    async fn claim(
        &self,
        node: &str,
        free: Capacity,
        limit: usize,
        now: OffsetDateTime,
        lease: Duration,
    ) -> Result<Vec<ClaimedTask>, StoreError>;
    /// Applies writes in one transaction (batched status updates and results).
    /// Fenced by attempt only: for administration and tests; nodes use
    /// [`TaskStore::apply_as`]. Returns the ids of the tasks whose result
    /// was stored as CANCELLED instead of the one written, because a
    /// cancel was requested before it (see the crate docs).
    async fn apply(&self, writes: Vec<Write>) -> Result<Vec<String>, StoreError>;
    /// Applies writes of node `node` in one transaction, each only if `node`
    /// still holds the task's claim (and the attempt fence passes): once a
    /// task was taken over after its lease expired, or requeued, the former
    /// holder's late writes are ignored, so a node that comes back never
    /// writes over a newer attempt. Returns what [`TaskStore::apply`] does.
    /// The batch is shared, not owned: a writer that retries it after a
    /// transient failure passes the same batch again without copying it
    /// (a result may hold megabytes of output).
    async fn apply_as(&self, node: &str, writes: Arc<[Write]>) -> Result<Vec<String>, StoreError>;
    /// Extends the lease of `node` on `ids` until `until`; returns the ids
    /// whose lease it extended, in no particular order: those `node` still
    /// holds (claimed, not final, not taken over). A running task missing
    /// from the answer was taken over, finished or requeued meanwhile: its
    /// node must stop running it (self-fencing).
    async fn renew(
        &self,
        node: &str,
        ids: &[String],
        until: OffsetDateTime,
    ) -> Result<Vec<String>, StoreError>;
    /// Records a cancel request (and cancels a queued task at once, with the
    /// transition `record`, whose `from` and `attempt` the store sets to the
    /// task's current status and attempt).
    async fn request_cancel(
        &self,
        id: &str,
        record: TransitionRecord,
    ) -> Result<CancelOutcome, StoreError>;
    /// Tasks claimed by `node` and not final: after a crash of that node,
    /// the attempts they were in were interrupted.
    async fn claimed_by(&self, node: &str) -> Result<Vec<ClaimedTask>, StoreError>;
    /// Recovery of `node` after its restart: the tasks it holds a claim on
    /// and that are not final, as [`Self::claimed_by`], each one's current
    /// attempt counted as lost with its node (once per attempt, as a
    /// take-over counts it) and the task's count of lost attempts in
    /// [`ClaimedTask::lost_attempts`]. A task that kills its node on every
    /// attempt is then quarantined on a single node as across several.
    async fn recover_claimed(&self, node: &str) -> Result<Vec<ClaimedTask>, StoreError>;
    /// Takes over the tasks whose lease has expired (`lease_until < now`):
    /// claimed (not queued), not final, by any node, `node` included. Each
    /// is leased to `node` until `now + lease` in the same transaction, so
    /// two callers never take over the same task; its status, attempt and
    /// `updated_at` do not change. Returned in submission order, each at
    /// the attempt that was interrupted (`attempt == record.attempt`), with
    /// `record.node` the new node, for the caller to recover (requeue or
    /// fail) as after a crash. `previous_node` names the node that ran the
    /// interrupted attempt (its claimer, even when another node had taken
    /// the task over since and lost it in turn), and `lost_attempts` counts
    /// the task's attempts lost this way, each once.
    ///
    /// The former node's late writes for that attempt still pass the
    /// attempt fence, but its renewals no longer extend the lease.
    async fn take_over_expired(
        &self,
        node: &str,
        now: OffsetDateTime,
        lease: Duration,
    ) -> Result<Vec<ClaimedTask>, StoreError>;
    /// Ids among `ids` whose cancel was requested.
    async fn cancel_requested(&self, ids: &[String]) -> Result<Vec<String>, StoreError>;
    /// Queued and running counts.
    async fn stats(&self) -> Result<QueueStats, StoreError>;
    /// Whether the database answers.
    async fn ping(&self) -> Result<(), StoreError>;
}

#[cfg(test)]
mod tests {
    use super::{ErrorClass, postgres_class};

    #[test]
    fn postgres_states_are_classified() {
        assert_eq!(postgres_class("53100"), ErrorClass::Full);
        // Refused connections, cut ones, a database closed to connections.
        for state in ["57P01", "08006", "53300", "55000"] {
            assert_eq!(postgres_class(state), ErrorClass::Unavailable, "{state}");
        }
        assert_eq!(postgres_class("23505"), ErrorClass::Other);
    }
}
