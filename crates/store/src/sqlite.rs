//! SQLite backend of [`TaskStore`]: one database file (or a private
//! in-memory database for tests), opened in WAL mode with
//! `synchronous=NORMAL`, a 5 s busy timeout and foreign keys on, behind a
//! small connection pool. Reads run in parallel; every transaction that
//! writes starts with `BEGIN IMMEDIATE`, so it takes SQLite's single write
//! lock before it reads what it is going to change (two claimers can never
//! take the same task, and no transaction fails on a lock upgrade).
//!
//! The schema is in `migrations/sqlite/`, embedded at compile time and run at
//! [`SqliteStore::open`]. Times are stored as unix milliseconds, so they
//! come back truncated to the millisecond (JSON columns keep full
//! precision).
//!
//! Semantics beyond the trait docs:
//! - A task is *closed* once its result is stored (by [`Write::Finish`], or
//!   by cancelling it while queued); every later write is ignored. A
//!   [`Write::Transition`] into a final status is applied, after which only
//!   [`Write::AttemptDone`] (for an attempt not yet recorded) and
//!   [`Write::Finish`] (with that same status) still apply, so an attempt's
//!   final transition, attempt record and result can be written in any order.
//! - A [`Write::Finish`] whose result status is not final is ignored (and
//!   logged): it would release the task without requeuing it.
//! - `claim` returns each record as stored before the claim (status,
//!   attempt), but with `node` set, `queued` false and `updated_at = now`.
//! - `list` cursors are the last row's sequence number; a cursor that is not
//!   one fails with [`StoreError::BadCursor`].
//! - `submit` fails as a whole (storing nothing) if a new task reuses an
//!   existing id.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection};
use taskexec_model::{
    AttemptRecord, ErrorType, TaskError, TaskInstance, TaskResult, TaskStatus, TransitionRecord,
};
use time::OffsetDateTime;

use crate::{
    CancelOutcome, Capacity, ClaimedTask, ListPage, ListQuery, NewTask, QueueStats, StoreError,
    Submitted, TaskRecord, TaskStore, TaskSummary, Write,
};

/// The embedded migrations of the SQLite schema.
static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// Connections of a file database's pool.
const FILE_CONNECTIONS: u32 = 4;
/// How long a statement waits for another connection's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Default page size of `list`.
const DEFAULT_PAGE: u32 = 50;
/// Largest page size of `list`.
const MAX_PAGE: u32 = 500;
/// Ids per statement of the `IN (...)` lists.
const IN_CHUNK: usize = 500;
/// The URL of a private in-memory database.
const MEMORY_URL: &str = "sqlite::memory:";
/// The scheme of a file database URL.
const FILE_PREFIX: &str = "sqlite://";

/// SQL condition: the row's status is not final (keep in step with
/// `TaskStatus::is_final`; a unit test checks it).
macro_rules! not_final {
    () => {
        "status NOT IN ('COMPLETED', 'FAILED', 'REJECTED', 'CANCELLED')"
    };
}

/// The `tasks` columns read into a [`TaskRow`].
macro_rules! task_columns {
    () => {
        "id, runtime, status, queued, attempt, node, submitted_at, updated_at, \
         cancel_requested, task_json, attempts_json, result_json, queued_since, \
         cpu_millis, memory_bytes"
    };
}

/// The SQLite task store.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating it if missing) the database at `url` and migrates it.
    ///
    /// `url` is `sqlite://PATH` (a file, created if missing) or
    /// `sqlite::memory:` (a private in-memory database on one connection,
    /// gone when the store is dropped); anything else is
    /// [`StoreError::BadUrl`].
    pub async fn open(url: &str) -> Result<SqliteStore, StoreError> {
        let base = SqliteConnectOptions::new()
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = if url == MEMORY_URL {
            // Every connection to ":memory:" is its own database: keep
            // exactly one, forever.
            SqlitePoolOptions::new()
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
                .connect_with(base.filename(":memory:"))
                .await?
        } else if let Some(path) = url.strip_prefix(FILE_PREFIX)
            && !path.is_empty()
        {
            let options = base
                .filename(path)
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal);
            SqlitePoolOptions::new()
                .max_connections(FILE_CONNECTIONS)
                .connect_with(options)
                .await?
        } else {
            return Err(StoreError::BadUrl(url.to_owned()));
        };
        MIGRATOR.run(&pool).await?;
        Ok(SqliteStore { pool })
    }

    /// Closes every connection, waiting for those in use to be returned.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Starts a transaction that holds the write lock from its first
    /// statement.
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, Sqlite>, StoreError> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }
}

/// Unix milliseconds of `t`.
fn to_ms(t: OffsetDateTime) -> i64 {
    let ms = t.unix_timestamp_nanos() / 1_000_000;
    i64::try_from(ms).unwrap_or(if ms < 0 { i64::MIN } else { i64::MAX })
}

/// The time of unix milliseconds `ms` (the epoch if out of range, which
/// [`to_ms`] never produces).
fn from_ms(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// Milliseconds of `d`, saturating.
fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A stored non-negative integer as `u32` (saturating, 0 if negative).
fn int_u32(v: i64) -> u32 {
    u32::try_from(v.max(0)).unwrap_or(u32::MAX)
}

/// A stored non-negative integer as `u64` (0 if negative).
fn int_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// `v` as a stored integer (saturating).
fn u64_int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A JSON error about task `id`.
fn json_err(id: &str) -> impl FnOnce(serde_json::Error) -> StoreError + '_ {
    move |source| StoreError::Json {
        id: id.to_owned(),
        source,
    }
}

/// Parses a stored status wire name.
fn parse_status(id: &str, s: &str) -> Result<TaskStatus, StoreError> {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).map_err(json_err(id))
}

/// One `tasks` row, as read by [`task_columns`].
struct TaskRow {
    id: String,
    runtime: String,
    status: TaskStatus,
    queued: bool,
    attempt: u32,
    node: Option<String>,
    submitted_at: i64,
    updated_at: i64,
    cancel_requested: bool,
    task_json: String,
    attempts_json: String,
    result_json: Option<String>,
    queued_since: i64,
    cpu_millis: u32,
    memory_bytes: u64,
}

impl TaskRow {
    /// Reads a row selected with [`task_columns`].
    fn read(row: &SqliteRow) -> Result<TaskRow, StoreError> {
        let id: String = row.try_get("id")?;
        let status: String = row.try_get("status")?;
        let status = parse_status(&id, &status)?;
        Ok(TaskRow {
            runtime: row.try_get("runtime")?,
            status,
            queued: row.try_get::<i64, _>("queued")? != 0,
            attempt: int_u32(row.try_get("attempt")?),
            node: row.try_get("node")?,
            submitted_at: row.try_get("submitted_at")?,
            updated_at: row.try_get("updated_at")?,
            cancel_requested: row.try_get::<i64, _>("cancel_requested")? != 0,
            task_json: row.try_get("task_json")?,
            attempts_json: row.try_get("attempts_json")?,
            result_json: row.try_get("result_json")?,
            queued_since: row.try_get("queued_since")?,
            cpu_millis: int_u32(row.try_get("cpu_millis")?),
            memory_bytes: int_u64(row.try_get("memory_bytes")?),
            id,
        })
    }

    /// The whole record, with the history read from `conn`.
    async fn into_record(self, conn: &mut SqliteConnection) -> Result<TaskRecord, StoreError> {
        let history = load_history(conn, &self.id).await?;
        let task: TaskInstance =
            serde_json::from_str(&self.task_json).map_err(json_err(&self.id))?;
        let attempts: Vec<AttemptRecord> =
            serde_json::from_str(&self.attempts_json).map_err(json_err(&self.id))?;
        let result: Option<TaskResult> = self
            .result_json
            .as_deref()
            .map(serde_json::from_str)
            .transpose()
            .map_err(json_err(&self.id))?;
        Ok(TaskRecord {
            task,
            status: self.status,
            attempt: self.attempt,
            runtime: self.runtime,
            queued: self.queued,
            node: self.node,
            submitted_at: from_ms(self.submitted_at),
            updated_at: from_ms(self.updated_at),
            cancel_requested: self.cancel_requested,
            history,
            attempts,
            result,
        })
    }
}

/// The lifecycle history of task `id`, oldest first.
async fn load_history(
    conn: &mut SqliteConnection,
    id: &str,
) -> Result<Vec<TransitionRecord>, StoreError> {
    let rows = sqlx::query("SELECT record_json FROM events WHERE task_id = ? ORDER BY n")
        .bind(id)
        .fetch_all(&mut *conn)
        .await?;
    rows.iter()
        .map(|row| {
            let json: String = row.try_get("record_json")?;
            serde_json::from_str(&json).map_err(json_err(id))
        })
        .collect()
}

/// Appends `record` to the history of task `id`.
async fn append_event(
    conn: &mut SqliteConnection,
    id: &str,
    record: &TransitionRecord,
) -> Result<(), StoreError> {
    let json = serde_json::to_string(record).map_err(json_err(id))?;
    sqlx::query(
        "INSERT INTO events (task_id, n, record_json) \
         SELECT ?, COALESCE(MAX(n) + 1, 0), ? FROM events WHERE task_id = ?",
    )
    .bind(id)
    .bind(json)
    .bind(id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Reads `rows` (selected with [`task_columns`]) as claimed tasks at their
/// current attempt.
async fn claimed_rows(
    conn: &mut SqliteConnection,
    rows: Vec<SqliteRow>,
) -> Result<Vec<ClaimedTask>, StoreError> {
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        let row = TaskRow::read(row)?;
        let (attempt, queued_since) = (row.attempt, from_ms(row.queued_since));
        let (cpu_millis, memory_bytes) = (row.cpu_millis, row.memory_bytes);
        out.push(ClaimedTask {
            record: row.into_record(conn).await?,
            attempt,
            queued_since,
            cpu_millis,
            memory_bytes,
        });
    }
    Ok(out)
}

/// Inserts one new task and its RECEIVED event.
async fn insert_task(conn: &mut SqliteConnection, new: &NewTask) -> Result<(), StoreError> {
    let id = new.task.id.as_str();
    let task_json = serde_json::to_string(&new.task).map_err(json_err(id))?;
    let at = to_ms(new.received.at);
    sqlx::query(
        "INSERT INTO tasks (id, idempotency_key, workflow_instance_id, runtime, priority, \
         cpu_millis, memory_bytes, status, queued, run_after, attempt, cancel_requested, \
         submitted_at, updated_at, queued_since, task_json, attempts_json) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?, 0, 0, ?, ?, ?, ?, '[]')",
    )
    .bind(id)
    .bind(new.task.idempotency_key.as_deref())
    .bind(new.task.workflow_instance_id.as_deref())
    .bind(new.runtime.as_str())
    .bind(i64::from(new.task.priority))
    .bind(i64::from(new.cpu_millis))
    .bind(u64_int(new.memory_bytes))
    .bind(new.received.to.as_str())
    .bind(at)
    .bind(at)
    .bind(at)
    .bind(at)
    .bind(task_json)
    .execute(&mut *conn)
    .await?;
    append_event(conn, id, &new.received).await
}

/// The part of a `tasks` row that decides whether a write applies.
struct Fence {
    status: TaskStatus,
    attempt: u32,
    closed: bool,
    attempts_json: String,
}

/// Reads the [`Fence`] of task `id`, if it exists.
async fn read_fence(conn: &mut SqliteConnection, id: &str) -> Result<Option<Fence>, StoreError> {
    let Some(row) = sqlx::query(
        "SELECT status, attempt, result_json IS NOT NULL AS closed, attempts_json \
         FROM tasks WHERE id = ?",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(None);
    };
    let status: String = row.try_get("status")?;
    Ok(Some(Fence {
        status: parse_status(id, &status)?,
        attempt: int_u32(row.try_get("attempt")?),
        closed: row.try_get::<i64, _>("closed")? != 0,
        attempts_json: row.try_get("attempts_json")?,
    }))
}

/// The task id and attempt a write belongs to.
fn write_target(write: &Write) -> (&str, u32) {
    match write {
        Write::Transition { id, attempt, .. }
        | Write::Requeue { id, attempt, .. }
        | Write::Finish { id, attempt, .. } => (id, *attempt),
        Write::AttemptDone { id, record } => (id, record.attempt),
    }
}

/// Applies one write if its fence allows it.
async fn apply_one(conn: &mut SqliteConnection, write: &Write) -> Result<(), StoreError> {
    let (id, attempt) = write_target(write);
    let Some(fence) = read_fence(conn, id).await? else {
        tracing::debug!(task = id, "write for an unknown task skipped");
        return Ok(());
    };
    if fence.attempt != attempt {
        tracing::debug!(
            task = id,
            attempt,
            current = fence.attempt,
            "write of a stale attempt skipped"
        );
        return Ok(());
    }
    if fence.closed {
        tracing::debug!(task = id, "write for a finished task skipped");
        return Ok(());
    }
    let is_final = fence.status.is_final();
    match write {
        Write::Transition { record, .. } => {
            if is_final {
                tracing::debug!(task = id, status = %fence.status, "transition of a final task skipped");
                return Ok(());
            }
            append_event(conn, id, record).await?;
            sqlx::query("UPDATE tasks SET status = ?, updated_at = ? WHERE id = ?")
                .bind(record.to.as_str())
                .bind(to_ms(record.at))
                .bind(id)
                .execute(&mut *conn)
                .await?;
        }
        Write::AttemptDone { record, .. } => {
            let mut attempts: Vec<AttemptRecord> =
                serde_json::from_str(&fence.attempts_json).map_err(json_err(id))?;
            if attempts.iter().any(|a| a.attempt == record.attempt) {
                tracing::debug!(task = id, attempt, "attempt already recorded");
                return Ok(());
            }
            attempts.push(record.clone());
            let json = serde_json::to_string(&attempts).map_err(json_err(id))?;
            sqlx::query("UPDATE tasks SET attempts_json = ? WHERE id = ?")
                .bind(json)
                .bind(id)
                .execute(&mut *conn)
                .await?;
        }
        Write::Requeue { run_after, .. } => {
            if is_final {
                tracing::debug!(task = id, status = %fence.status, "requeue of a final task skipped");
                return Ok(());
            }
            let at = to_ms(*run_after);
            sqlx::query(
                "UPDATE tasks SET queued = 1, run_after = ?, queued_since = ?, node = NULL, \
                 lease_until = NULL WHERE id = ?",
            )
            .bind(at)
            .bind(at)
            .bind(id)
            .execute(&mut *conn)
            .await?;
        }
        Write::Finish { result, .. } => {
            if !result.status.is_final() {
                tracing::warn!(task = id, status = %result.status, "finish with a non-final status skipped");
                return Ok(());
            }
            if is_final && fence.status != result.status {
                tracing::debug!(
                    task = id,
                    status = %fence.status,
                    result = %result.status,
                    "finish with another final status skipped"
                );
                return Ok(());
            }
            let json = serde_json::to_string(result).map_err(json_err(id))?;
            let at = result
                .execution_metadata
                .end_time
                .or_else(|| result.history.last().map(|r| r.at))
                .map(to_ms);
            sqlx::query(
                "UPDATE tasks SET status = ?, result_json = ?, queued = 0, node = NULL, \
                 lease_until = NULL, updated_at = COALESCE(?, updated_at) WHERE id = ?",
            )
            .bind(result.status.as_str())
            .bind(json)
            .bind(at)
            .bind(id)
            .execute(&mut *conn)
            .await?;
        }
    }
    Ok(())
}

/// Parses a listing cursor (a positive sequence number).
fn parse_cursor(cursor: &str) -> Result<i64, StoreError> {
    cursor
        .parse::<i64>()
        .ok()
        .filter(|seq| *seq > 0)
        .ok_or_else(|| StoreError::BadCursor(cursor.to_owned()))
}

#[async_trait]
impl TaskStore for SqliteStore {
    async fn submit(
        &self,
        tasks: Vec<NewTask>,
        max_queued: u64,
    ) -> Result<Vec<Submitted>, StoreError> {
        let mut tx = self.begin_write().await?;
        let mut out = Vec::with_capacity(tasks.len());
        let mut fresh: Vec<&NewTask> = Vec::with_capacity(tasks.len());
        let mut batch_keys: HashMap<&str, &str> = HashMap::new();
        for new in &tasks {
            if let Some(key) = new.task.idempotency_key.as_deref() {
                if let Some(id) = batch_keys.get(key) {
                    out.push(Submitted::Existing {
                        id: (*id).to_owned(),
                    });
                    continue;
                }
                let earlier: Option<String> =
                    sqlx::query_scalar("SELECT id FROM tasks WHERE idempotency_key = ?")
                        .bind(key)
                        .fetch_optional(&mut *tx)
                        .await?;
                if let Some(id) = earlier {
                    out.push(Submitted::Existing { id });
                    continue;
                }
                batch_keys.insert(key, &new.task.id);
            }
            out.push(Submitted::Created {
                id: new.task.id.clone(),
            });
            fresh.push(new);
        }
        if !fresh.is_empty() {
            let depth: i64 = sqlx::query_scalar(concat!(
                "SELECT COUNT(*) FROM tasks WHERE queued = 1 AND ",
                not_final!()
            ))
            .fetch_one(&mut *tx)
            .await?;
            let depth = int_u64(depth);
            let adding = u64::try_from(fresh.len()).unwrap_or(u64::MAX);
            if depth.saturating_add(adding) > max_queued {
                tx.rollback().await?;
                return Err(StoreError::QueueFull {
                    depth,
                    max: max_queued,
                });
            }
            for new in fresh {
                insert_task(&mut tx, new).await?;
            }
        }
        tx.commit().await?;
        Ok(out)
    }

    async fn get(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        // A read transaction: the row and its events from one snapshot.
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks WHERE id = ?"
        ))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let record = match row {
            Some(row) => Some(TaskRow::read(&row)?.into_record(&mut tx).await?),
            None => None,
        };
        tx.commit().await?;
        Ok(record)
    }

    async fn list(&self, query: &ListQuery) -> Result<ListPage, StoreError> {
        let limit = match query.limit {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let mut qb = QueryBuilder::<Sqlite>::new(
            "SELECT seq, id, status, runtime, workflow_instance_id, priority, attempt, \
             submitted_at, updated_at FROM tasks WHERE 1 = 1",
        );
        if let Some(status) = query.status {
            qb.push(" AND status = ").push_bind(status.as_str());
        }
        if let Some(runtime) = &query.runtime {
            qb.push(" AND runtime = ").push_bind(runtime.clone());
        }
        if let Some(workflow) = &query.workflow_instance_id {
            qb.push(" AND workflow_instance_id = ")
                .push_bind(workflow.clone());
        }
        if let Some(cursor) = &query.cursor {
            qb.push(" AND seq < ").push_bind(parse_cursor(cursor)?);
        }
        qb.push(" ORDER BY seq DESC LIMIT ")
            .push_bind(i64::from(limit) + 1);
        let rows = qb.build().fetch_all(&self.pool).await?;
        let mut items = Vec::with_capacity(rows.len());
        let mut last_seq = 0i64;
        for row in rows
            .iter()
            .take(usize::try_from(limit).unwrap_or(usize::MAX))
        {
            let id: String = row.try_get("id")?;
            let status: String = row.try_get("status")?;
            last_seq = row.try_get("seq")?;
            items.push(TaskSummary {
                status: parse_status(&id, &status)?,
                runtime: row.try_get("runtime")?,
                workflow_instance_id: row.try_get("workflow_instance_id")?,
                priority: i32::try_from(row.try_get::<i64, _>("priority")?).unwrap_or(0),
                attempt: int_u32(row.try_get("attempt")?),
                submitted_at: from_ms(row.try_get("submitted_at")?),
                updated_at: from_ms(row.try_get("updated_at")?),
                id,
            });
        }
        let next_cursor = (rows.len() > items.len()).then(|| last_seq.to_string());
        Ok(ListPage { items, next_cursor })
    }

    async fn claim(
        &self,
        node: &str,
        free: Capacity,
        limit: usize,
        now: OffsetDateTime,
        lease: Duration,
    ) -> Result<Vec<ClaimedTask>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let now_ms = to_ms(now);
        let lease_until = now_ms.saturating_add(duration_ms(lease));
        // Candidates that fit in `free` on their own, in claim order; the
        // window is bounded, the greedy fit below picks from it.
        let window = i64::try_from(limit.saturating_mul(8).clamp(64, 1024)).unwrap_or(1024);
        let mut tx = self.begin_write().await?;
        let rows = sqlx::query(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks WHERE queued = 1 AND run_after <= ? AND cpu_millis <= ? \
             AND memory_bytes <= ? AND ",
            not_final!(),
            " ORDER BY priority DESC, seq ASC LIMIT ?"
        ))
        .bind(now_ms)
        .bind(u64_int(free.cpu_millis))
        .bind(u64_int(free.memory_bytes))
        .bind(window)
        .fetch_all(&mut *tx)
        .await?;
        let (mut cpu_left, mut mem_left) = (free.cpu_millis, free.memory_bytes);
        let mut taken = Vec::new();
        for row in &rows {
            let row = TaskRow::read(row)?;
            let cpu = u64::from(row.cpu_millis);
            if cpu > cpu_left || row.memory_bytes > mem_left {
                continue;
            }
            cpu_left -= cpu;
            mem_left -= row.memory_bytes;
            taken.push(row);
            if taken.len() == limit {
                break;
            }
        }
        let mut out = Vec::with_capacity(taken.len());
        for row in taken {
            sqlx::query(
                "UPDATE tasks SET queued = 0, attempt = attempt + 1, node = ?, lease_until = ?, \
                 updated_at = ? WHERE id = ?",
            )
            .bind(node)
            .bind(lease_until)
            .bind(now_ms)
            .bind(&row.id)
            .execute(&mut *tx)
            .await?;
            let attempt = row.attempt.saturating_add(1);
            let (queued_since, cpu_millis, memory_bytes) =
                (from_ms(row.queued_since), row.cpu_millis, row.memory_bytes);
            let mut record = row.into_record(&mut tx).await?;
            record.node = Some(node.to_owned());
            record.queued = false;
            record.updated_at = from_ms(now_ms);
            out.push(ClaimedTask {
                record,
                attempt,
                queued_since,
                cpu_millis,
                memory_bytes,
            });
        }
        tx.commit().await?;
        Ok(out)
    }

    async fn apply(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        if writes.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_write().await?;
        for write in &writes {
            apply_one(&mut tx, write).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn renew(
        &self,
        node: &str,
        ids: &[String],
        until: OffsetDateTime,
    ) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_write().await?;
        for chunk in ids.chunks(IN_CHUNK) {
            let mut qb = QueryBuilder::<Sqlite>::new("UPDATE tasks SET lease_until = ");
            qb.push_bind(to_ms(until))
                .push(" WHERE node = ")
                .push_bind(node.to_owned())
                .push(concat!(
                    " AND queued = 0 AND ",
                    not_final!(),
                    " AND id IN ("
                ));
            let mut list = qb.separated(", ");
            for id in chunk {
                list.push_bind(id.clone());
            }
            qb.push(")");
            qb.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn request_cancel(
        &self,
        id: &str,
        record: TransitionRecord,
    ) -> Result<CancelOutcome, StoreError> {
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks WHERE id = ?"
        ))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(CancelOutcome::NotFound);
        };
        let row = TaskRow::read(&row)?;
        if row.status.is_final() {
            return Ok(CancelOutcome::AlreadyFinal(row.status));
        }
        if !row.queued {
            sqlx::query("UPDATE tasks SET cancel_requested = 1 WHERE id = ?")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            return Ok(CancelOutcome::Requested { node: row.node });
        }
        append_event(&mut tx, id, &record).await?;
        let stored = row.into_record(&mut tx).await?;
        let mut result = TaskResult::new(id, TaskStatus::Cancelled);
        result.error = Some(TaskError::new(
            ErrorType::Cancelled,
            "the task was cancelled",
        ));
        result.history = stored.history;
        result.execution_metadata.attempts = stored.attempts;
        let json = serde_json::to_string(&result).map_err(json_err(id))?;
        sqlx::query(
            "UPDATE tasks SET status = ?, queued = 0, cancel_requested = 1, result_json = ?, \
             node = NULL, lease_until = NULL, updated_at = ? WHERE id = ?",
        )
        .bind(TaskStatus::Cancelled.as_str())
        .bind(json)
        .bind(to_ms(record.at))
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(CancelOutcome::CancelledQueued)
    }

    async fn claimed_by(&self, node: &str) -> Result<Vec<ClaimedTask>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks WHERE node = ? AND queued = 0 AND ",
            not_final!(),
            " ORDER BY seq"
        ))
        .bind(node)
        .fetch_all(&mut *tx)
        .await?;
        let out = claimed_rows(&mut tx, rows).await?;
        tx.commit().await?;
        Ok(out)
    }

    async fn cancel_requested(&self, ids: &[String]) -> Result<Vec<String>, StoreError> {
        let mut found = HashSet::new();
        for chunk in ids.chunks(IN_CHUNK) {
            let mut qb = QueryBuilder::<Sqlite>::new(
                "SELECT id FROM tasks WHERE cancel_requested = 1 AND id IN (",
            );
            let mut list = qb.separated(", ");
            for id in chunk {
                list.push_bind(id.clone());
            }
            qb.push(")");
            let rows = qb.build().fetch_all(&self.pool).await?;
            for row in rows {
                found.insert(row.try_get::<String, _>("id")?);
            }
        }
        Ok(ids
            .iter()
            .filter(|id| found.contains(*id))
            .cloned()
            .collect())
    }

    async fn stats(&self) -> Result<QueueStats, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT (SELECT COUNT(*) FROM tasks WHERE queued = 1 AND ",
            not_final!(),
            ") AS queued, (SELECT COUNT(*) FROM tasks WHERE queued = 0 AND node IS NOT NULL AND ",
            not_final!(),
            ") AS running"
        ))
        .fetch_one(&self.pool)
        .await?;
        Ok(QueueStats {
            queued: int_u64(row.try_get("queued")?),
            running: int_u64(row.try_get("running")?),
        })
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_final_lists_exactly_the_final_statuses() {
        for status in TaskStatus::ALL {
            let quoted = format!("'{}'", status.as_str());
            assert_eq!(
                not_final!().contains(&quoted),
                status.is_final(),
                "{status}"
            );
        }
    }

    #[test]
    fn milliseconds_round_trip() {
        let t = time::macros::datetime!(2025-06-01 12:00:00.123 UTC);
        assert_eq!(from_ms(to_ms(t)), t);
        assert_eq!(to_ms(OffsetDateTime::UNIX_EPOCH), 0);
        let before = time::macros::datetime!(1969-12-31 23:59:59.5 UTC);
        assert_eq!(from_ms(to_ms(before)), before);
    }

    #[test]
    fn cursors() {
        assert_eq!(parse_cursor("42").expect("valid"), 42);
        for bad in ["", "x", "-1", "0", "1.5"] {
            assert!(
                matches!(parse_cursor(bad), Err(StoreError::BadCursor(_))),
                "{bad}"
            );
        }
    }
}
