//! PostgreSQL backend of [`TaskStore`]: one database shared by every node
//! of a cluster (`taskexec serve --database postgres://…` on each).
//!
//! [`PgStore::open`] connects a bounded pool (16 connections unless
//! [`PgOptions`] says otherwise, with an acquire timeout), each connection
//! with `synchronous_commit` raised to `on` if the server's setting is
//! `off` (every commit is durable before it is answered), and runs the
//! migrations of `migrations/postgres/`, embedded at compile time. Several
//! nodes may start at once: sqlx's migrator takes a session advisory lock
//! (`pg_advisory_lock`, keyed by the database name) before it creates its
//! `_sqlx_migrations` table and holds it until every migration is applied,
//! so one node migrates and the others then find nothing to do (checked in
//! sqlx-core 0.9 `Migrator::run_direct`, which locks unless
//! `set_locking(false)`, and sqlx-postgres 0.9 `migrate.rs`,
//! `Migrate::lock` for `PgConnection`).
//!
//! The schema is the SQLite one in PostgreSQL types: times are unix
//! milliseconds (`BIGINT`), so they come back truncated to the millisecond
//! as with SQLite; JSON is stored as text, byte for byte. Every method has
//! the semantics of the SQLite backend (the conformance suite checks both;
//! the write rules are shared code), with PostgreSQL concurrency, all in
//! `READ COMMITTED` transactions:
//! - `claim` locks a bounded window of queued rows that each fit in `free`
//!   with `SELECT … ORDER BY priority DESC, seq FOR UPDATE SKIP LOCKED`,
//!   picks the greedy fit in Rust and updates the taken rows in one
//!   statement, in one transaction: concurrent claimers (on any node) skip
//!   each other's rows instead of waiting, and never take the same task.
//!   Under contention the order is "by priority then FIFO among the rows
//!   nobody else is claiming".
//! - `take_over_expired` does the same for claimed rows whose lease has
//!   expired, in one `UPDATE … WHERE id IN (SELECT … FOR UPDATE SKIP
//!   LOCKED)`.
//! - `submit` inserts its batch with `INSERT … ON CONFLICT (idempotency_key)
//!   DO NOTHING`, then reads the id of each task whose key another
//!   transaction stored first: concurrent submissions of one key store one
//!   task and all answer its id. Rows are inserted in key order (their
//!   sequence numbers taken beforehand in batch order, so FIFO follows the
//!   batch), so two batches sharing keys never deadlock. The queue bound
//!   is checked in the same transaction against the committed queue, so it
//!   is approximate under concurrency: batches submitted at the same moment
//!   may together exceed it by up to their own sizes.
//! - `apply` locks the rows it writes (`FOR UPDATE`, in id order, as
//!   `renew` does, so two batches never deadlock), applies the shared
//!   fencing rules in memory and stores the changed rows and new events in
//!   one statement each.
//! - After a submission or a requeue commits, PostgreSQL delivers a
//!   notification on [`QUEUE_CHANNEL`] (`pg_notify` in the same
//!   transaction); [`PgStore::listener`] subscribes to it. Notifications
//!   are lost while a listener is reconnecting, so waiting on one must stay
//!   bounded, with a claim poll as the fallback.
//! - Sequence numbers are taken before commit, so a task committed late may
//!   carry a smaller one than a task claimed or listed before it: FIFO and
//!   listing cursors are exact only between submissions that do not
//!   overlap in time.
//!
//! Why one file of about 1,100 lines before its tests: every method of the
//! trait is one transaction whose SQL is read beside the invariant it keeps
//! (above); the SQLite backend, whose statements run on threads of their
//! own, splits them into `sqlite/statements.rs`. Moving the row readers and
//! bulk statements into a module of their own is the next split.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{PgConnection, Postgres, QueryBuilder, Row};
use taskexec_model::TransitionRecord;
use time::OffsetDateTime;

use crate::common::{
    TaskRow, TaskState, apply_write, batch_leaders, cancelled_result, conflict, duration_ms,
    from_ms, greedy_fit, int_u32, int_u64, json_err, not_final, page_size, parse_cursor,
    parse_history, parse_status, state_columns, task_columns, to_ms, u64_int, write_target,
};
use crate::{
    CancelOutcome, Capacity, ClaimedTask, ListPage, ListQuery, NewTask, QueueStats, StoreError,
    Submitted, TaskProgress, TaskRecord, TaskStore, TaskSummary, Write,
};

/// The embedded migrations of the PostgreSQL schema.
static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

/// The channel notified when tasks become claimable (a submission or a
/// requeue committed); the payload is empty.
pub const QUEUE_CHANNEL: &str = "taskexec_queue";

/// The channel notified when a task's state changed (a transition was
/// recorded: started, retried, cancelled, final); the payload is the task's
/// id. A node's followers of that task (server-sent events, `?wait`) wake
/// on it instead of polling the store.
pub const TASK_CHANNEL: &str = "taskexec_task";

/// Default size of the pool.
const DEFAULT_MAX_CONNECTIONS: u32 = 16;
/// Default wait for a free connection.
const DEFAULT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);
/// URL schemes of PostgreSQL.
const URL_PREFIXES: [&str; 2] = ["postgres://", "postgresql://"];

/// The history of the `tasks` row in scope, oldest first, as a `TEXT[]`
/// column named `history`.
macro_rules! history_column {
    () => {
        "ARRAY(SELECT e.record_json FROM events e WHERE e.task_id = tasks.id ORDER BY e.n) \
         AS history"
    };
}

/// Settings of [`PgStore::open_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PgOptions {
    /// Most connections of the pool (at least 1; default 16). Each node
    /// holds up to this many connections, so the server's
    /// `max_connections` must cover the sum over all nodes.
    pub max_connections: u32,
    /// How long an operation waits for a free connection before failing
    /// (default 10 s).
    pub acquire_timeout: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            acquire_timeout: DEFAULT_ACQUIRE_TIMEOUT,
        }
    }
}

impl PgOptions {
    /// These options with at most `max` connections.
    #[must_use]
    pub fn max_connections(mut self, max: u32) -> Self {
        self.max_connections = max;
        self
    }

    /// These options with an acquire timeout of `timeout`.
    #[must_use]
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }
}

/// The PostgreSQL task store (cheap to clone: clones share the pool).
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    /// Whether `url` is a PostgreSQL URL (`postgres://…` or
    /// `postgresql://…`), which [`PgStore::open`] accepts.
    pub fn handles_url(url: &str) -> bool {
        URL_PREFIXES.iter().any(|p| url.starts_with(p))
    }

    /// Connects to the database at `url` with the default [`PgOptions`]
    /// and migrates it.
    ///
    /// `url` is `postgres://` or `postgresql://` followed by what libpq
    /// accepts (user, host, port, database, `?sslmode=…`); anything else is
    /// [`StoreError::BadUrl`]. The database must exist.
    pub async fn open(url: &str) -> Result<PgStore, StoreError> {
        Self::open_with(url, PgOptions::default()).await
    }

    /// [`PgStore::open`] with `options`.
    pub async fn open_with(url: &str, options: PgOptions) -> Result<PgStore, StoreError> {
        if !Self::handles_url(url) {
            return Err(StoreError::BadUrl(url.to_owned()));
        }
        let connect: PgConnectOptions = url.parse()?;
        let name = connect.get_database().unwrap_or_default().to_owned();
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .acquire_timeout(options.acquire_timeout)
            .after_connect(|conn, _| Box::pin(async move { durable_commits(conn).await }))
            .connect_with(connect.application_name("taskexec"))
            .await
            .map_err(|e| match &e {
                // invalid_catalog_name: the database does not exist.
                sqlx::Error::Database(d) if d.code().as_deref() == Some("3D000") => {
                    StoreError::NoDatabase { name }
                }
                _ => StoreError::from(e),
            })?;
        // The migrator serialises concurrent openers with a PostgreSQL
        // advisory lock (see the module docs). It does not release the lock
        // when a migration fails: closing the pool ends the session, and
        // with it the lock.
        if let Err(e) = MIGRATOR.run(&pool).await {
            pool.close().await;
            return Err(e.into());
        }
        Ok(PgStore { pool })
    }

    /// Closes every connection, waiting for those in use to be returned.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// A listener subscribed to [`QUEUE_CHANNEL`], on a connection of its
    /// own (outside the pool): it receives a notification after each
    /// submission or requeue commits, from any node, to wake a claim loop
    /// early.
    ///
    /// Notifications are not durable: those sent while the listener is
    /// reconnecting (it does so by itself after a lost connection) are
    /// lost, so use it to shorten a bounded wait, never instead of polling.
    pub async fn listener(&self) -> Result<PgListener, StoreError> {
        self.listener_on(&[QUEUE_CHANNEL]).await
    }

    /// A listener, as [`Self::listener`], subscribed to `channels`
    /// ([`QUEUE_CHANNEL`], [`TASK_CHANNEL`]).
    pub async fn listener_on(&self, channels: &[&str]) -> Result<PgListener, StoreError> {
        let options = PgConnectOptions::clone(&self.pool.connect_options());
        // A private pool of one: sqlx's listener reconnects through it.
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .max_lifetime(None)
            .idle_timeout(None)
            .connect_lazy_with(options);
        let mut listener = PgListener::connect_with(&pool).await?;
        // Nobody closes the private pool.
        listener.ignore_pool_close_event(true);
        listener.listen_all(channels.iter().copied()).await?;
        Ok(listener)
    }
}

/// Reads a row selected with [`task_columns`] and [`history_column`].
fn read_row(row: &PgRow) -> Result<(TaskRow, Vec<TransitionRecord>), StoreError> {
    let id: String = row.try_get("id")?;
    let status: String = row.try_get("status")?;
    let status = parse_status(&id, &status)?;
    let history: Vec<String> = row.try_get("history")?;
    let history = parse_history(&id, history)?;
    let row = TaskRow {
        runtime: row.try_get("runtime")?,
        status,
        queued: row.try_get("queued")?,
        attempt: int_u32(row.try_get("attempt")?),
        node: row.try_get("node")?,
        submitted_at: row.try_get("submitted_at")?,
        updated_at: row.try_get("updated_at")?,
        cancel_requested: row.try_get("cancel_requested")?,
        task_json: row.try_get("task_json")?,
        attempts_json: row.try_get("attempts_json")?,
        result_json: row.try_get("result_json")?,
        queued_since: row.try_get("queued_since")?,
        cpu_millis: int_u32(row.try_get("cpu_millis")?),
        memory_bytes: int_u64(row.try_get("memory_bytes")?),
        id,
    };
    Ok((row, history))
}

/// Reads a row selected with [`state_columns`].
fn read_state(row: &PgRow) -> Result<(String, TaskState), StoreError> {
    let id: String = row.try_get("id")?;
    let status: String = row.try_get("status")?;
    let state = TaskState {
        status: parse_status(&id, &status)?,
        attempt: int_u32(row.try_get("attempt")?),
        queued: row.try_get("queued")?,
        run_after: row.try_get("run_after")?,
        queued_since: row.try_get("queued_since")?,
        node: row.try_get("node")?,
        lease_until: row.try_get("lease_until")?,
        updated_at: row.try_get("updated_at")?,
        attempts_json: row.try_get("attempts_json")?,
        result_json: row.try_get("result_json")?,
        cancel_requested: row.try_get("cancel_requested")?,
    };
    Ok((id, state))
}

/// Makes every commit of `conn` wait for its WAL to be flushed to disk
/// (`synchronous_commit` at least `on`), whatever the server, database or
/// role configure: a submission, cancel or result is answered only once
/// it survives a crash of the database server or a power loss. A setting
/// that already waits (`on`, `local`, `remote_write`, `remote_apply`) is
/// kept; only `off` is raised.
async fn durable_commits(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query(
        "SELECT set_config('synchronous_commit', 'on', false) \
         WHERE current_setting('synchronous_commit') = 'off'",
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Tells the listeners of [`QUEUE_CHANNEL`] that tasks became claimable,
/// once the transaction of `conn` commits (not at all if it rolls back).
async fn notify_queue(conn: &mut PgConnection) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(QUEUE_CHANNEL)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// The ids and request digests of the tasks stored with the (stored)
/// idempotency keys `keys`, by key.
async fn ids_by_key(
    conn: &mut PgConnection,
    keys: &[&str],
) -> Result<HashMap<String, (String, Option<String>)>, StoreError> {
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = sqlx::query(
        "SELECT idempotency_key, id, request_hash FROM tasks WHERE idempotency_key = ANY($1)",
    )
    .bind(keys)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|row| {
            Ok((
                row.try_get("idempotency_key")?,
                (row.try_get("id")?, row.try_get("request_hash")?),
            ))
        })
        .collect()
}

/// Inserts `fresh` (with their RECEIVED events) unless their idempotency
/// key is already stored; returns the ids of those inserted.
async fn insert_tasks(
    conn: &mut PgConnection,
    fresh: &[&NewTask],
) -> Result<HashSet<String>, StoreError> {
    // Sequence numbers in batch order (FIFO), while the rows go in in key
    // order (see the module docs).
    let mut seqs: Vec<i64> = sqlx::query_scalar(
        "SELECT nextval(pg_get_serial_sequence('tasks', 'seq')) FROM generate_series(1, $1)",
    )
    .bind(i64::try_from(fresh.len()).unwrap_or(i64::MAX))
    .fetch_all(&mut *conn)
    .await?;
    seqs.sort_unstable();
    let n = fresh.len();
    let (mut ids, mut keys, mut workflows, mut runtimes) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut priorities, mut cpus, mut mems, mut statuses, mut ats, mut task_jsons) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let mut hashes = Vec::with_capacity(n);
    for new in fresh {
        let id = new.task.id.as_str();
        ids.push(id);
        keys.push(new.stored_key());
        hashes.push(new.request_hash.as_deref());
        workflows.push(new.task.workflow_instance_id.as_deref());
        runtimes.push(new.runtime.as_str());
        priorities.push(new.task.priority);
        cpus.push(i64::from(new.cpu_millis));
        mems.push(u64_int(new.memory_bytes));
        statuses.push(new.received.to.as_str());
        ats.push(to_ms(new.received.at));
        task_jsons.push(serde_json::to_string(&new.task).map_err(json_err(id))?);
    }
    let inserted: Vec<String> = sqlx::query_scalar(
        "INSERT INTO tasks (seq, id, idempotency_key, workflow_instance_id, runtime, priority, \
         cpu_millis, memory_bytes, status, queued, run_after, attempt, cancel_requested, \
         submitted_at, updated_at, queued_since, task_json, attempts_json, request_hash) \
         SELECT u.seq, u.id, u.ikey, u.workflow, u.runtime, u.priority, u.cpu, u.mem, u.status, \
         true, u.at, 0, false, u.at, u.at, u.at, u.task_json, '[]', u.request_hash \
         FROM UNNEST($1::int8[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int4[], \
         $7::int8[], $8::int8[], $9::text[], $10::int8[], $11::text[], $12::text[]) \
         AS u(seq, id, ikey, workflow, runtime, priority, cpu, mem, status, at, task_json, \
         request_hash) \
         ORDER BY u.ikey NULLS LAST, u.id \
         ON CONFLICT (idempotency_key) DO NOTHING \
         RETURNING id",
    )
    .bind(&seqs)
    .bind(&ids)
    .bind(&keys)
    .bind(&workflows)
    .bind(&runtimes)
    .bind(&priorities)
    .bind(&cpus)
    .bind(&mems)
    .bind(&statuses)
    .bind(&ats)
    .bind(&task_jsons)
    .bind(&hashes)
    .fetch_all(&mut *conn)
    .await?;
    let inserted: HashSet<String> = inserted.into_iter().collect();
    let (mut event_ids, mut event_jsons) = (Vec::new(), Vec::new());
    for new in fresh {
        let id = new.task.id.as_str();
        if inserted.contains(id) {
            event_ids.push(id);
            event_jsons.push(serde_json::to_string(&new.received).map_err(json_err(id))?);
        }
    }
    if !event_ids.is_empty() {
        sqlx::query(
            "INSERT INTO events (task_id, n, record_json) \
             SELECT u.id, 0, u.record_json FROM UNNEST($1::text[], $2::text[]) AS u(id, record_json)",
        )
        .bind(&event_ids)
        .bind(&event_jsons)
        .execute(&mut *conn)
        .await?;
    }
    Ok(inserted)
}

/// Appends events `(task id, record JSON)`, in order, after each task's
/// stored history. The caller holds the tasks' row locks.
async fn append_events(
    conn: &mut PgConnection,
    events: &[(&str, String)],
) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    // k: the event's rank among this batch's events of its task (from 1);
    // the statement does not see its own rows, so MAX(n) is the stored one.
    let mut rank: HashMap<&str, i32> = HashMap::new();
    let (mut ids, mut ks, mut jsons) = (Vec::new(), Vec::new(), Vec::new());
    for (id, json) in events {
        let k = rank.entry(id).or_insert(0);
        *k += 1;
        ids.push(*id);
        ks.push(*k);
        jsons.push(json.as_str());
    }
    sqlx::query(
        "INSERT INTO events (task_id, n, record_json) \
         SELECT u.task_id, \
         COALESCE((SELECT MAX(e.n) FROM events e WHERE e.task_id = u.task_id), -1) + u.k, \
         u.record_json \
         FROM UNNEST($1::text[], $2::int4[], $3::text[]) AS u(task_id, k, record_json)",
    )
    .bind(&ids)
    .bind(&ks)
    .bind(&jsons)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Tells the listeners of [`TASK_CHANNEL`] that task `id` changed, once the
/// transaction of `conn` commits (ids are at most 256 bytes, within a
/// payload's 8,000). [`write_states`] notifies the tasks it writes itself.
async fn notify_task(conn: &mut PgConnection, id: &str) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(TASK_CHANNEL)
        .bind(id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Stores the `states` of tasks, by id, in one statement, which also tells
/// the listeners of [`TASK_CHANNEL`] that they changed once the transaction
/// commits (one notification per task, its id as the payload).
async fn write_states(
    conn: &mut PgConnection,
    states: &[(&str, &TaskState)],
) -> Result<(), StoreError> {
    if states.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = states.iter().map(|(id, _)| *id).collect();
    let statuses: Vec<&str> = states.iter().map(|(_, s)| s.status.as_str()).collect();
    let queued: Vec<bool> = states.iter().map(|(_, s)| s.queued).collect();
    let run_after: Vec<i64> = states.iter().map(|(_, s)| s.run_after).collect();
    let queued_since: Vec<i64> = states.iter().map(|(_, s)| s.queued_since).collect();
    let nodes: Vec<Option<&str>> = states.iter().map(|(_, s)| s.node.as_deref()).collect();
    let leases: Vec<Option<i64>> = states.iter().map(|(_, s)| s.lease_until).collect();
    let updated: Vec<i64> = states.iter().map(|(_, s)| s.updated_at).collect();
    let attempts: Vec<&str> = states
        .iter()
        .map(|(_, s)| s.attempts_json.as_str())
        .collect();
    let results: Vec<Option<&str>> = states
        .iter()
        .map(|(_, s)| s.result_json.as_deref())
        .collect();
    // The notification of each changed task rides on the same statement
    // (no round trip more per batch).
    sqlx::query(
        "WITH changed AS (UPDATE tasks SET status = u.status, queued = u.queued, \
         run_after = u.run_after, queued_since = u.queued_since, node = u.node, \
         lease_until = u.lease_until, updated_at = u.updated_at, \
         attempts_json = u.attempts_json, result_json = u.result_json \
         FROM UNNEST($1::text[], $2::text[], $3::bool[], $4::int8[], $5::int8[], $6::text[], \
         $7::int8[], $8::int8[], $9::text[], $10::text[]) \
         AS u(id, status, queued, run_after, queued_since, node, lease_until, updated_at, \
         attempts_json, result_json) \
         WHERE tasks.id = u.id RETURNING tasks.id) \
         SELECT pg_notify($11, id) FROM changed",
    )
    .bind(&ids)
    .bind(&statuses)
    .bind(&queued)
    .bind(&run_after)
    .bind(&queued_since)
    .bind(&nodes)
    .bind(&leases)
    .bind(&updated)
    .bind(&attempts)
    .bind(&results)
    .bind(TASK_CHANNEL)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Rows a claim locks to choose from: enough for the greedy fit to skip
/// some that no longer fit, few enough not to lock what other claimers
/// could take.
fn claim_window(limit: usize) -> i64 {
    i64::try_from(limit.saturating_mul(2).clamp(32, 1024)).unwrap_or(1024)
}

#[async_trait]
impl TaskStore for PgStore {
    async fn submit(
        &self,
        tasks: Vec<NewTask>,
        max_queued: u64,
    ) -> Result<Vec<Submitted>, StoreError> {
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        let leaders = batch_leaders(&tasks)?;
        let is_leader = |i: usize| leaders.get(i) == Some(&i);
        // Leaders whose key is already stored: the earlier task's id.
        let mut existing: HashMap<usize, String> = HashMap::new();
        let stored_keys: Vec<Option<String>> = tasks.iter().map(NewTask::stored_key).collect();
        let key_of = |i: usize| stored_keys.get(i).and_then(Option::as_deref);
        let mut tx = self.pool.begin().await?;
        let keyed: Vec<(usize, &str)> = (0..tasks.len())
            .filter(|i| is_leader(*i))
            .filter_map(|i| key_of(i).map(|k| (i, k)))
            .collect();
        let keys: Vec<&str> = keyed.iter().map(|(_, k)| *k).collect();
        let found = ids_by_key(&mut tx, &keys).await?;
        // The earlier task of leader `i`, unless it was sent with another
        // request (then the whole submission fails).
        let earlier = |i: usize, (id, hash): &(String, Option<String>)| {
            let new = tasks.get(i).ok_or(sqlx::Error::RowNotFound)?;
            if new.same_request(hash.as_deref()) {
                Ok(id.clone())
            } else {
                Err(conflict(i, new, id))
            }
        };
        for (i, key) in &keyed {
            if let Some(stored) = found.get(*key) {
                match earlier(*i, stored) {
                    Ok(id) => existing.insert(*i, id),
                    Err(e) => {
                        tx.rollback().await?;
                        return Err(e);
                    }
                };
            }
        }
        let fresh: Vec<usize> = (0..tasks.len())
            .filter(|i| is_leader(*i) && !existing.contains_key(i))
            .collect();
        if !fresh.is_empty() {
            let depth: i64 = sqlx::query_scalar(concat!(
                "SELECT COUNT(*) FROM tasks WHERE queued AND ",
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
            let new_tasks: Vec<&NewTask> = fresh.iter().filter_map(|i| tasks.get(*i)).collect();
            let inserted = insert_tasks(&mut tx, &new_tasks).await?;
            // Keys another transaction stored since the lookup above.
            let lost: Vec<(usize, &str)> = fresh
                .iter()
                .filter_map(|i| tasks.get(*i).map(|new| (*i, new)))
                .filter(|(_, new)| !inserted.contains(&new.task.id))
                .filter_map(|(i, _)| key_of(i).map(|k| (i, k)))
                .collect();
            if lost.len() + inserted.len() != fresh.len() {
                // A task without a key is always inserted (or the insert
                // fails).
                return Err(sqlx::Error::RowNotFound.into());
            }
            let keys: Vec<&str> = lost.iter().map(|(_, k)| *k).collect();
            let found = ids_by_key(&mut tx, &keys).await?;
            for (i, key) in lost {
                // Skipped on conflict means stored and committed: visible
                // to this later statement.
                let stored = found.get(key).ok_or(sqlx::Error::RowNotFound)?;
                match earlier(i, stored) {
                    Ok(id) => existing.insert(i, id),
                    Err(e) => {
                        tx.rollback().await?;
                        return Err(e);
                    }
                };
            }
            if !inserted.is_empty() {
                notify_queue(&mut tx).await?;
            }
        }
        tx.commit().await?;
        let outcome = |i: usize| -> Submitted {
            match existing.get(&i) {
                Some(id) => Submitted::Existing { id: id.clone() },
                None => Submitted::Created {
                    id: tasks.get(i).map(|t| t.task.id.clone()).unwrap_or_default(),
                },
            }
        };
        Ok(leaders
            .iter()
            .enumerate()
            .map(|(i, leader)| match outcome(*leader) {
                Submitted::Created { id } if i != *leader => Submitted::Existing { id },
                same => same,
            })
            .collect())
    }

    async fn get(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        // One statement: the row and its history from one snapshot.
        let row = sqlx::query(concat!(
            "SELECT ",
            task_columns!(),
            ", ",
            history_column!(),
            " FROM tasks WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => {
                let (row, history) = read_row(&row)?;
                Ok(Some(row.into_record(history)?))
            }
            None => Ok(None),
        }
    }

    async fn progress(&self, id: &str) -> Result<Option<TaskProgress>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT status, attempt, queued, node, submitted_at, updated_at, cancel_requested, ",
            history_column!(),
            " FROM tasks WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let status: String = row.try_get("status")?;
        let history: Vec<String> = row.try_get("history")?;
        Ok(Some(TaskProgress {
            status: parse_status(id, &status)?,
            attempt: int_u32(row.try_get("attempt")?),
            queued: row.try_get("queued")?,
            node: row.try_get("node")?,
            submitted_at: from_ms(row.try_get("submitted_at")?),
            updated_at: from_ms(row.try_get("updated_at")?),
            cancel_requested: row.try_get("cancel_requested")?,
            history: parse_history(id, history)?,
        }))
    }

    async fn list(&self, query: &ListQuery) -> Result<ListPage, StoreError> {
        let limit = page_size(query.limit);
        let mut qb = QueryBuilder::<Postgres>::new(
            "SELECT seq, id, status, runtime, workflow_instance_id, priority, attempt, \
             submitted_at, updated_at FROM tasks WHERE true",
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
                priority: row.try_get("priority")?,
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
        let mut tx = self.pool.begin().await?;
        // Candidates that fit in `free` on their own, in claim order, that
        // no other transaction holds; they stay locked until commit.
        let candidates = sqlx::query(concat!(
            "SELECT id, cpu_millis, memory_bytes FROM tasks \
             WHERE queued AND run_after <= $1 AND cpu_millis <= $2 AND memory_bytes <= $3 AND ",
            not_final!(),
            " ORDER BY priority DESC, seq LIMIT $4 FOR UPDATE SKIP LOCKED"
        ))
        .bind(now_ms)
        .bind(u64_int(free.cpu_millis))
        .bind(u64_int(free.memory_bytes))
        .bind(claim_window(limit))
        .fetch_all(&mut *tx)
        .await?;
        let candidates = candidates
            .iter()
            .map(|row| {
                Ok((
                    row.try_get::<String, _>("id")?,
                    int_u32(row.try_get("cpu_millis")?),
                    int_u64(row.try_get("memory_bytes")?),
                ))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let fit = greedy_fit(candidates.iter().map(|c| (c.1, c.2)), free, limit);
        if fit.is_empty() {
            tx.commit().await?;
            return Ok(Vec::new());
        }
        let taken: Vec<&str> = fit
            .iter()
            .filter_map(|i| candidates.get(*i).map(|c| c.0.as_str()))
            .collect();
        let rows = sqlx::query(concat!(
            "UPDATE tasks SET queued = false, attempt = attempt + 1, node = $1, attempt_node = $1, \
             lease_until = $2, updated_at = $3 WHERE id = ANY($4) RETURNING ",
            task_columns!(),
            ", ",
            history_column!()
        ))
        .bind(node)
        .bind(lease_until)
        .bind(now_ms)
        .bind(&taken)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        // RETURNING has no order: put the rows back in claim order.
        let order: HashMap<&str, usize> =
            taken.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let (mut row, history) = read_row(row)?;
            // RETURNING shows the new attempt; the record is as before.
            let attempt = row.attempt;
            row.attempt = attempt.saturating_sub(1);
            let rank = order.get(row.id.as_str()).copied().unwrap_or(usize::MAX);
            out.push((rank, row.into_claimed(attempt, history, None, 0)?));
        }
        out.sort_by_key(|(rank, _)| *rank);
        Ok(out.into_iter().map(|(_, c)| c).collect())
    }

    async fn apply(&self, writes: Vec<Write>) -> Result<Vec<String>, StoreError> {
        self.apply_writes(writes.into(), None).await
    }

    async fn apply_as(&self, node: &str, writes: Arc<[Write]>) -> Result<Vec<String>, StoreError> {
        self.apply_writes(writes, Some(node)).await
    }

    async fn renew(
        &self,
        node: &str,
        ids: &[String],
        until: OffsetDateTime,
    ) -> Result<Vec<String>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        // Locks in id order, as `apply` does. The conditions are checked
        // again on the locked rows (a row written meanwhile is re-read).
        let held: Vec<String> = sqlx::query_scalar(concat!(
            "UPDATE tasks SET lease_until = $1 WHERE id IN (SELECT id FROM tasks \
             WHERE id = ANY($2) AND node = $3 AND NOT queued AND ",
            not_final!(),
            " ORDER BY id FOR UPDATE) AND node = $3 AND NOT queued AND ",
            not_final!(),
            " RETURNING id"
        ))
        .bind(to_ms(until))
        .bind(ids)
        .bind(node)
        .fetch_all(&self.pool)
        .await?;
        Ok(held)
    }

    async fn request_cancel(
        &self,
        id: &str,
        record: TransitionRecord,
    ) -> Result<CancelOutcome, StoreError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(concat!(
            "SELECT ",
            task_columns!(),
            ", ",
            history_column!(),
            " FROM tasks WHERE id = $1 FOR UPDATE"
        ))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(CancelOutcome::NotFound);
        };
        let (row, mut history) = read_row(&row)?;
        if row.status.is_final() {
            return Ok(CancelOutcome::AlreadyFinal(row.status));
        }
        if !row.queued {
            sqlx::query("UPDATE tasks SET cancel_requested = true WHERE id = $1")
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
        let json = serde_json::to_string(&record).map_err(json_err(id))?;
        append_events(&mut tx, &[(id, json)]).await?;
        notify_task(&mut tx, id).await?;
        history.push(record.clone());
        let stored = row.into_record(history)?;
        let result = cancelled_result(id, stored.history, stored.attempts);
        let json = serde_json::to_string(&result).map_err(json_err(id))?;
        sqlx::query(
            "UPDATE tasks SET status = $1, queued = false, cancel_requested = true, \
             result_json = $2, node = NULL, lease_until = NULL, updated_at = $3 WHERE id = $4",
        )
        .bind(result.status.as_str())
        .bind(json)
        .bind(to_ms(record.at))
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(CancelOutcome::CancelledQueued)
    }

    async fn claimed_by(&self, node: &str) -> Result<Vec<ClaimedTask>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            task_columns!(),
            ", ",
            history_column!(),
            " FROM tasks WHERE node = $1 AND NOT queued AND ",
            not_final!(),
            " ORDER BY seq"
        ))
        .bind(node)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let (row, history) = read_row(row)?;
                let attempt = row.attempt;
                row.into_claimed(attempt, history, None, 0)
            })
            .collect()
    }

    async fn recover_claimed(&self, node: &str) -> Result<Vec<ClaimedTask>, StoreError> {
        // One statement: the attempt is counted once however often this
        // runs (`lost_through`), as a take-over counts it.
        let rows = sqlx::query(concat!(
            "UPDATE tasks SET lost_attempts = lost_attempts \
             + CASE WHEN lost_through < attempt THEN 1 ELSE 0 END, \
             lost_through = attempt WHERE node = $1 AND NOT queued AND ",
            not_final!(),
            " RETURNING lost_attempts AS lost_count, seq, ",
            task_columns!(),
            ", ",
            history_column!()
        ))
        .bind(node)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let seq: i64 = row.try_get("seq")?;
            let lost = int_u32(row.try_get("lost_count")?);
            let (row, history) = read_row(row)?;
            let attempt = row.attempt;
            out.push((seq, row.into_claimed(attempt, history, None, lost)?));
        }
        out.sort_by_key(|(seq, _)| *seq);
        Ok(out.into_iter().map(|(_, c)| c).collect())
    }

    async fn take_over_expired(
        &self,
        node: &str,
        now: OffsetDateTime,
        lease: Duration,
    ) -> Result<Vec<ClaimedTask>, StoreError> {
        let now_ms = to_ms(now);
        let lease_until = now_ms.saturating_add(duration_ms(lease));
        // One statement, one transaction: rows another caller is taking
        // over (or anyone is writing) are skipped, not waited for.
        let rows = sqlx::query(concat!(
            "WITH expired AS (SELECT id AS expired_id, node AS previous_node FROM tasks \
             WHERE node IS NOT NULL AND NOT queued AND lease_until < $3 AND ",
            not_final!(),
            " FOR UPDATE SKIP LOCKED) \
             UPDATE tasks SET node = $1, lease_until = $2, \
             lost_attempts = tasks.lost_attempts \
             + CASE WHEN tasks.lost_through < tasks.attempt THEN 1 ELSE 0 END, \
             lost_through = tasks.attempt FROM expired \
             WHERE tasks.id = expired.expired_id RETURNING \
             COALESCE(tasks.attempt_node, expired.previous_node) AS attempt_holder, \
             tasks.lost_attempts AS lost_count, seq, ",
            task_columns!(),
            ", ",
            history_column!()
        ))
        .bind(node)
        .bind(lease_until)
        .bind(now_ms)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let seq: i64 = row.try_get("seq")?;
            let holder: Option<String> = row.try_get("attempt_holder")?;
            let lost = int_u32(row.try_get("lost_count")?);
            let (row, history) = read_row(row)?;
            let attempt = row.attempt;
            out.push((seq, row.into_claimed(attempt, history, holder, lost)?));
        }
        out.sort_by_key(|(seq, _)| *seq);
        Ok(out.into_iter().map(|(_, c)| c).collect())
    }

    async fn cancel_requested(&self, ids: &[String]) -> Result<Vec<String>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let found: Vec<String> =
            sqlx::query_scalar("SELECT id FROM tasks WHERE cancel_requested AND id = ANY($1)")
                .bind(ids)
                .fetch_all(&self.pool)
                .await?;
        let found: HashSet<String> = found.into_iter().collect();
        Ok(ids
            .iter()
            .filter(|id| found.contains(*id))
            .cloned()
            .collect())
    }

    async fn stats(&self) -> Result<QueueStats, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT (SELECT COUNT(*) FROM tasks WHERE queued AND ",
            not_final!(),
            ") AS queued, (SELECT COUNT(*) FROM tasks WHERE NOT queued AND node IS NOT NULL AND ",
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

impl PgStore {
    /// Applies writes in one transaction; with a `holder`, only where that
    /// node holds the task's claim (see [`TaskStore::apply_as`]).
    async fn apply_writes(
        &self,
        writes: Arc<[Write]>,
        holder: Option<&str>,
    ) -> Result<Vec<String>, StoreError> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let mut ids: Vec<&str> = writes.iter().map(|w| write_target(w).0).collect();
        ids.sort_unstable();
        ids.dedup();
        let mut tx = self.pool.begin().await?;
        // Lock every row written, in id order (no deadlock between batches).
        let rows = sqlx::query(concat!(
            "SELECT ",
            state_columns!(),
            " FROM tasks WHERE id = ANY($1) ORDER BY id FOR UPDATE"
        ))
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        let mut states: HashMap<String, (TaskState, bool)> = HashMap::with_capacity(rows.len());
        for row in &rows {
            let (id, state) = read_state(row)?;
            states.insert(id, (state, false));
        }
        let mut events: Vec<(&str, String)> = Vec::new();
        let mut requeued = false;
        let mut cancelled = Vec::new();
        for write in writes.iter() {
            let (id, _) = write_target(write);
            let Some((state, changed)) = states.get_mut(id) else {
                tracing::debug!(task = id, "write for an unknown task skipped");
                continue;
            };
            let Some(applied) = apply_write(state, write, holder)? else {
                continue;
            };
            *changed = true;
            requeued |= applied.requeued;
            if applied.cancel_won {
                cancelled.push(id.to_owned());
            }
            if let Some(record) = applied.event {
                events.push((id, serde_json::to_string(&record).map_err(json_err(id))?));
            }
        }
        let changed: Vec<(&str, &TaskState)> = states
            .iter()
            .filter(|(_, (_, changed))| *changed)
            .map(|(id, (state, _))| (id.as_str(), state))
            .collect();
        write_states(&mut tx, &changed).await?;
        append_events(&mut tx, &events).await?;
        if requeued {
            notify_queue(&mut tx).await?;
        }
        tx.commit().await?;
        Ok(cancelled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        for ok in [
            "postgres://localhost/db",
            "postgresql://u@h:5432/d?sslmode=disable",
        ] {
            assert!(PgStore::handles_url(ok), "{ok}");
        }
        for bad in ["", "sqlite://x.db", "postgres:/x", "pg://x", "POSTGRES://x"] {
            assert!(!PgStore::handles_url(bad), "{bad}");
        }
    }

    #[test]
    fn claim_windows_are_bounded() {
        assert_eq!(claim_window(1), 32);
        assert_eq!(claim_window(64), 128);
        assert_eq!(claim_window(usize::MAX), 1024);
    }

    #[test]
    fn options() {
        let o = PgOptions::default()
            .max_connections(3)
            .acquire_timeout(Duration::from_secs(1));
        assert_eq!(o.max_connections, 3);
        assert_eq!(o.acquire_timeout, Duration::from_secs(1));
        assert_eq!(PgOptions::default().max_connections, 16);
    }
}
