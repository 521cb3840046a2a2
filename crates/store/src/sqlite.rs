//! SQLite backend of [`TaskStore`]: one database file (or a private
//! in-memory database for tests), opened in WAL mode with
//! `synchronous=NORMAL` (`FULL` with `?synchronous=full`), a 5 s busy
//! timeout and foreign keys on, behind a small connection pool; this
//! process's write transactions queue on an async mutex before they take
//! SQLite's write lock. Reads run in parallel; every transaction that
//! writes starts with `BEGIN IMMEDIATE`, so it takes SQLite's single write
//! lock before it reads what it is going to change (two claimers can never
//! take the same task, and no transaction fails on a lock upgrade).
//!
//! The schema is in `migrations/sqlite/`, embedded at compile time and run at
//! [`SqliteStore::open`]. Times are stored as unix milliseconds, so they
//! come back truncated to the millisecond (JSON columns keep full
//! precision). `take_over_expired` holds the write lock like a claim, so
//! two callers never take over the same task.
//!
//! The semantics beyond the trait docs are the crate's (see the crate
//! docs).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection};
use taskexec_model::{TaskStatus, TransitionRecord};
use time::OffsetDateTime;

use crate::common::{
    TaskRow, TaskState, apply_write, cancelled_result, duration_ms, from_ms, greedy_fit, int_u32,
    int_u64, json_err, not_final, page_size, parse_cursor, parse_history, parse_status,
    state_columns, task_columns, to_ms, u64_int, write_target,
};
use crate::{
    CancelOutcome, Capacity, ClaimRequest, ClaimedTask, ListPage, ListQuery, NewTask, QueueStats,
    StoreError, Submitted, TaskRecord, TaskStore, TaskSummary, Write,
};

/// The embedded migrations of the SQLite schema.
static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// Connections of a file database's pool.
const FILE_CONNECTIONS: u32 = 4;
/// How long a statement waits for another connection's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Ids per statement of the `IN (...)` lists.
const IN_CHUNK: usize = 500;
/// The URL of a private in-memory database.
const MEMORY_URL: &str = "sqlite::memory:";
/// The scheme of a file database URL.
const FILE_PREFIX: &str = "sqlite://";

/// The SQLite task store.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// Taken by every transaction that writes, before its `BEGIN
    /// IMMEDIATE`: this process's writers queue here, in order, instead of
    /// colliding on SQLite's write lock, whose busy handler sleeps 1 ms
    /// and more per collision. Other processes on the same file still meet
    /// the busy timeout.
    write_lock: Arc<tokio::sync::Mutex<()>>,
}

/// A write transaction and this process's write turn, held until both are
/// dropped (the transaction first: declare the guard first).
type WriteTx = (
    tokio::sync::OwnedMutexGuard<()>,
    sqlx::Transaction<'static, Sqlite>,
);

impl SqliteStore {
    /// Opens (creating it if missing) the database at `url` and migrates it.
    ///
    /// `url` is `sqlite://PATH` (a file, created if missing) or
    /// `sqlite::memory:` (a private in-memory database on one connection,
    /// gone when the store is dropped); anything else is
    /// [`StoreError::BadUrl`]. A file database runs in WAL mode with
    /// `synchronous=NORMAL` (a commit survives a crash of the process, not
    /// necessarily a power loss); `sqlite://PATH?synchronous=full` syncs
    /// the log at every commit instead (survives a power loss, costs an
    /// fsync per transaction).
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
        } else if let Some(rest) = url.strip_prefix(FILE_PREFIX)
            && let (path, query) = rest.split_once('?').unwrap_or((rest, ""))
            && !path.is_empty()
        {
            let synchronous = match query {
                "" | "synchronous=normal" => SqliteSynchronous::Normal,
                "synchronous=full" => SqliteSynchronous::Full,
                _ => return Err(StoreError::BadUrl(url.to_owned())),
            };
            let options = base
                .filename(path)
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(synchronous);
            // An in-process database needs no liveness check at each
            // acquire (a round trip to the connection's thread).
            SqlitePoolOptions::new()
                .max_connections(FILE_CONNECTIONS)
                .test_before_acquire(false)
                .connect_with(options)
                .await?
        } else {
            return Err(StoreError::BadUrl(url.to_owned()));
        };
        MIGRATOR.run(&pool).await?;
        Ok(SqliteStore {
            pool,
            write_lock: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// Closes every connection, waiting for those in use to be returned.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Starts a transaction that holds the write lock from its first
    /// statement, after this process's earlier writers (see `write_lock`).
    async fn begin_write(&self) -> Result<WriteTx, StoreError> {
        let turn = Arc::clone(&self.write_lock).lock_owned().await;
        Ok((turn, self.pool.begin_with("BEGIN IMMEDIATE").await?))
    }
}

/// A column with the task's whole history as one JSON array (its events'
/// JSON joined in order), so that a row and its history come from one
/// statement, hence one snapshot.
macro_rules! history_column {
    () => {
        "'[' || COALESCE((SELECT group_concat(record_json, ',' ORDER BY n) FROM events \
         WHERE task_id = tasks.id), '') || ']' AS history_json"
    };
}

/// The history of a row selected with [`history_column`].
fn read_history(row: &SqliteRow, id: &str) -> Result<Vec<TransitionRecord>, StoreError> {
    let json: String = row.try_get("history_json")?;
    serde_json::from_str(&json).map_err(json_err(id))
}

/// Reads a row selected with [`task_columns`].
fn read_row(row: &SqliteRow) -> Result<TaskRow, StoreError> {
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

/// The whole record of `row`, with the history read from `conn`.
async fn into_record(row: TaskRow, conn: &mut SqliteConnection) -> Result<TaskRecord, StoreError> {
    let history = load_history(conn, &row.id).await?;
    row.into_record(history)
}

/// The lifecycle history of task `id`, oldest first.
async fn load_history(
    conn: &mut SqliteConnection,
    id: &str,
) -> Result<Vec<TransitionRecord>, StoreError> {
    let rows: Vec<String> =
        sqlx::query_scalar("SELECT record_json FROM events WHERE task_id = ? ORDER BY n")
            .bind(id)
            .fetch_all(&mut *conn)
            .await?;
    parse_history(id, rows)
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
/// current attempt, with `node` as their node.
async fn claimed_rows(
    conn: &mut SqliteConnection,
    rows: Vec<SqliteRow>,
    node: Option<&str>,
) -> Result<Vec<ClaimedTask>, StoreError> {
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        let mut row = read_row(row)?;
        let mut previous = None;
        if let Some(node) = node {
            previous = row.node.replace(node.to_owned());
        }
        let history = load_history(conn, &row.id).await?;
        let attempt = row.attempt;
        out.push(row.into_claimed(attempt, history, previous)?);
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

/// Reads the [`TaskState`] of task `id`, if it exists.
async fn read_state(
    conn: &mut SqliteConnection,
    id: &str,
) -> Result<Option<TaskState>, StoreError> {
    let Some(row) = sqlx::query(concat!(
        "SELECT ",
        state_columns!(),
        " FROM tasks WHERE id = ?"
    ))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(None);
    };
    let status: String = row.try_get("status")?;
    Ok(Some(TaskState {
        status: parse_status(id, &status)?,
        attempt: int_u32(row.try_get("attempt")?),
        queued: row.try_get::<i64, _>("queued")? != 0,
        run_after: row.try_get("run_after")?,
        queued_since: row.try_get("queued_since")?,
        node: row.try_get("node")?,
        lease_until: row.try_get("lease_until")?,
        updated_at: row.try_get("updated_at")?,
        attempts_json: row.try_get("attempts_json")?,
        result_json: row.try_get("result_json")?,
    }))
}

/// Stores `state` as the state of task `id`.
async fn write_state(
    conn: &mut SqliteConnection,
    id: &str,
    state: &TaskState,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE tasks SET status = ?, queued = ?, run_after = ?, queued_since = ?, node = ?, \
         lease_until = ?, updated_at = ?, attempts_json = ?, result_json = ? WHERE id = ?",
    )
    .bind(state.status.as_str())
    .bind(i64::from(state.queued))
    .bind(state.run_after)
    .bind(state.queued_since)
    .bind(state.node.as_deref())
    .bind(state.lease_until)
    .bind(state.updated_at)
    .bind(state.attempts_json.as_str())
    .bind(state.result_json.as_deref())
    .bind(id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The submission's statements, in the caller's write transaction (dropped
/// uncommitted, and so rolled back, on an error).
async fn submit_in(
    tx: &mut SqliteConnection,
    tasks: &[NewTask],
    max_queued: u64,
) -> Result<Vec<Submitted>, StoreError> {
    let mut out = Vec::with_capacity(tasks.len());
    let mut fresh: Vec<&NewTask> = Vec::with_capacity(tasks.len());
    let mut batch_keys: HashMap<&str, &str> = HashMap::new();
    for new in tasks {
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
            return Err(StoreError::QueueFull {
                depth,
                max: max_queued,
            });
        }
        for new in fresh {
            insert_task(&mut *tx, new).await?;
        }
    }
    Ok(out)
}

/// The claim's statements, in the caller's write transaction.
async fn claim_in(
    tx: &mut SqliteConnection,
    claim: &ClaimRequest<'_>,
) -> Result<Vec<ClaimedTask>, StoreError> {
    let ClaimRequest {
        node,
        free,
        limit,
        now,
        lease,
    } = *claim;
    let now_ms = to_ms(now);
    let lease_until = now_ms.saturating_add(duration_ms(lease));
    // Candidates that fit in `free` on their own, in claim order; the
    // window is bounded, the greedy fit below picks from it.
    let window = i64::try_from(limit.saturating_mul(8).clamp(64, 1024)).unwrap_or(1024);
    let rows = sqlx::query(concat!(
        "SELECT ",
        task_columns!(),
        ", ",
        history_column!(),
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
    let rows = rows
        .iter()
        .map(|r| {
            let row = read_row(r)?;
            let history = read_history(r, &row.id)?;
            Ok((row, history))
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    let fit = greedy_fit(
        rows.iter().map(|(r, _)| (r.cpu_millis, r.memory_bytes)),
        free,
        limit,
    );
    let mut rows: Vec<Option<(TaskRow, Vec<TransitionRecord>)>> =
        rows.into_iter().map(Some).collect();
    let mut out = Vec::with_capacity(fit.len());
    for i in fit {
        let Some((mut row, history)) = rows.get_mut(i).and_then(Option::take) else {
            continue;
        };
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
        row.node = Some(node.to_owned());
        row.queued = false;
        row.updated_at = now_ms;
        let attempt = row.attempt.saturating_add(1);
        out.push(row.into_claimed(attempt, history, None)?);
    }
    Ok(out)
}

#[async_trait]
impl TaskStore for SqliteStore {
    async fn submit(
        &self,
        tasks: Vec<NewTask>,
        max_queued: u64,
    ) -> Result<Vec<Submitted>, StoreError> {
        let (_turn, mut tx) = self.begin_write().await?;
        let out = submit_in(&mut tx, &tasks, max_queued).await?;
        tx.commit().await?;
        Ok(out)
    }

    async fn submit_and_claim(
        &self,
        tasks: Vec<NewTask>,
        max_queued: u64,
        claim: ClaimRequest<'_>,
    ) -> Result<(Vec<Submitted>, Vec<ClaimedTask>), StoreError> {
        let (_turn, mut tx) = self.begin_write().await?;
        let submitted = submit_in(&mut tx, &tasks, max_queued).await?;
        let claimed = if claim.limit == 0 {
            Vec::new()
        } else {
            claim_in(&mut tx, &claim).await?
        };
        tx.commit().await?;
        Ok((submitted, claimed))
    }

    async fn get(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        // One statement: the row and its events from one snapshot.
        let row = sqlx::query(concat!(
            "SELECT ",
            task_columns!(),
            ", ",
            history_column!(),
            " FROM tasks WHERE id = ?"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => {
                let history = read_history(&row, id)?;
                Ok(Some(read_row(&row)?.into_record(history)?))
            }
            None => Ok(None),
        }
    }

    async fn list(&self, query: &ListQuery) -> Result<ListPage, StoreError> {
        let limit = page_size(query.limit);
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
        // Most claims of an idle or keeping-up node find nothing: answer
        // those from a read, without waiting for the write lock. A task
        // committed just after this read is found by the next claim (its
        // submission wakes the claimer).
        let any: Option<i64> = sqlx::query_scalar(concat!(
            "SELECT 1 FROM tasks WHERE queued = 1 AND run_after <= ? AND cpu_millis <= ? \
             AND memory_bytes <= ? AND ",
            not_final!(),
            " LIMIT 1"
        ))
        .bind(now_ms)
        .bind(u64_int(free.cpu_millis))
        .bind(u64_int(free.memory_bytes))
        .fetch_optional(&self.pool)
        .await?;
        if any.is_none() {
            return Ok(Vec::new());
        }
        let (_turn, mut tx) = self.begin_write().await?;
        let out = claim_in(
            &mut tx,
            &ClaimRequest {
                node,
                free,
                limit,
                now,
                lease,
            },
        )
        .await?;
        tx.commit().await?;
        Ok(out)
    }

    async fn apply(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        self.apply_writes(writes, None).await
    }

    async fn apply_as(&self, node: &str, writes: Vec<Write>) -> Result<(), StoreError> {
        self.apply_writes(writes, Some(node)).await
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
        let (_turn, mut tx) = self.begin_write().await?;
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
        let (_turn, mut tx) = self.begin_write().await?;
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
        let row = read_row(&row)?;
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
        // The cancelling transition starts from where the task stands.
        let record = TransitionRecord {
            from: Some(row.status),
            attempt: row.attempt,
            ..record
        };
        append_event(&mut tx, id, &record).await?;
        let stored = into_record(row, &mut tx).await?;
        let result = cancelled_result(id, stored.history, stored.attempts);
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
        let out = claimed_rows(&mut tx, rows, None).await?;
        tx.commit().await?;
        Ok(out)
    }

    async fn take_over_expired(
        &self,
        node: &str,
        now: OffsetDateTime,
        lease: Duration,
    ) -> Result<Vec<ClaimedTask>, StoreError> {
        let now_ms = to_ms(now);
        let lease_until = now_ms.saturating_add(duration_ms(lease));
        // The write lock is held from the start: no other transaction can
        // take the same tasks over in between.
        let (_turn, mut tx) = self.begin_write().await?;
        let rows = sqlx::query(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks WHERE node IS NOT NULL AND queued = 0 AND lease_until < ? AND ",
            not_final!(),
            " ORDER BY seq"
        ))
        .bind(now_ms)
        .fetch_all(&mut *tx)
        .await?;
        for row in &rows {
            let id: String = row.try_get("id")?;
            sqlx::query("UPDATE tasks SET node = ?, lease_until = ? WHERE id = ?")
                .bind(node)
                .bind(lease_until)
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        let out = claimed_rows(&mut tx, rows, Some(node)).await?;
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

impl SqliteStore {
    /// Applies writes in one transaction; with a `holder`, only where that
    /// node holds the task's claim (see [`TaskStore::apply_as`]).
    async fn apply_writes(
        &self,
        writes: Vec<Write>,
        holder: Option<&str>,
    ) -> Result<(), StoreError> {
        if writes.is_empty() {
            return Ok(());
        }
        let (_turn, mut tx) = self.begin_write().await?;
        // The state of each task written (and whether it changed), read
        // once and changed in memory; events are appended as they come, the
        // changed rows stored at the end.
        let mut states: HashMap<&str, Option<(TaskState, bool)>> = HashMap::new();
        for write in &writes {
            let (id, _) = write_target(write);
            if !states.contains_key(id) {
                let state = read_state(&mut tx, id).await?;
                states.insert(id, state.map(|s| (s, false)));
            }
            let Some(Some((state, changed))) = states.get_mut(id) else {
                tracing::debug!(task = id, "write for an unknown task skipped");
                continue;
            };
            let Some(applied) = apply_write(state, write, holder)? else {
                continue;
            };
            *changed = true;
            if let Some(record) = applied.event {
                append_event(&mut tx, id, record).await?;
            }
        }
        for (id, state) in &states {
            if let Some((state, true)) = state {
                write_state(&mut tx, id, state).await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }
}
