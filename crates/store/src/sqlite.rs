//! SQLite backend of [`TaskStore`]: one database file (or a private
//! temporary one for tests), opened in WAL mode, a 5 s busy timeout and
//! foreign keys on. A transaction that acknowledges something to a client
//! (a submission, a cancel, a final result) commits with
//! `synchronous=FULL`, so it survives a power loss; the others (claims,
//! renewals, a task's start) with `synchronous=NORMAL`, which survives a
//! crash of the process (see [`Durability`]). Reads go through a small sqlx connection pool and run in parallel;
//! every transaction that writes runs whole on the writer's own connection
//! and thread ([`writer`]), in arrival order, starting with
//! `BEGIN IMMEDIATE`, so it takes SQLite's single write lock before it
//! reads what it is going to change (two claimers can never take the same
//! task, and no transaction fails on a lock upgrade).
//!
//! The schema is in `migrations/sqlite/`, embedded at compile time and run at
//! [`SqliteStore::open`]. Times are stored as unix milliseconds, so they
//! come back truncated to the millisecond (JSON columns keep full
//! precision). `take_over_expired` holds the write lock like a claim, so
//! two callers never take over the same task.
//!
//! The semantics beyond the trait docs are the crate's (see the crate
//! docs).

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite};
use taskexec_model::TransitionRecord;
use time::OffsetDateTime;

use crate::common::{
    from_ms, int_u32, int_u64, not_final, page_size, parse_cursor, parse_status, to_ms,
};
use crate::{
    CancelOutcome, Capacity, ClaimRequest, ClaimedTask, ListPage, ListQuery, NewTask, QueueStats,
    StoreError, Submitted, TaskProgress, TaskRecord, TaskStore, TaskSummary, Write,
};

/// The embedded migrations of the SQLite schema.
static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// Connections of the read pool.
const READ_CONNECTIONS: u32 = 4;
/// Reader threads of [`TaskStore::get`].
const READERS: usize = 2;
/// How long a statement waits for another connection's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Ids per statement of the `IN (...)` lists.
const IN_CHUNK: usize = 500;
/// The URL of a private temporary database.
const MEMORY_URL: &str = "sqlite::memory:";
/// The scheme of a file database URL.
const FILE_PREFIX: &str = "sqlite://";

/// How durable the SQLite store's commits are: the query of the database
/// URL, `sqlite://PATH?synchronous=…`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// The default (no query, or `synchronous=acknowledged`): commits that
    /// acknowledge something to a client (a submission, a cancel, a final
    /// result) sync the log (`FULL`) and survive a power loss; the others
    /// (`NORMAL`) survive a crash of the process, and are lost at a power
    /// loss only if no acknowledging commit followed them.
    Acknowledged,
    /// `synchronous=full`: every commit syncs the log.
    Full,
    /// `synchronous=normal`: no commit syncs the log; a power loss may
    /// take the last acknowledged commits (a task answered 2xx may vanish).
    Normal,
}

impl Durability {
    /// The level of every commit, and that of an acknowledging one.
    fn levels(self) -> (threads::Level, threads::Level) {
        use threads::Level::{Power, Process};
        match self {
            Durability::Acknowledged => (Process, Power),
            Durability::Full => (Power, Power),
            Durability::Normal => (Process, Process),
        }
    }
}

/// The SQLite task store. Clones share the connections.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// Runs every write transaction (declared first, with the readers:
    /// they close their connections before a temporary database's
    /// directory goes).
    writer: Arc<threads::ConnThreads>,
    /// Run the reads on the path of every task ([`TaskStore::get`] for a
    /// task waited for, the check of [`TaskStore::claim`] after every
    /// task) and [`TaskStore::claimed_by`].
    readers: Arc<threads::ConnThreads>,
    /// The other reads.
    pool: SqlitePool,
    /// The directory of a `sqlite::memory:` database, removed when the
    /// last clone is dropped.
    _temp: Option<Arc<tempfile::TempDir>>,
    /// The level of a commit that acknowledges something to a client.
    ack: threads::Level,
}

impl SqliteStore {
    /// Opens (creating it if missing) the database at `url` and migrates it.
    ///
    /// `url` is `sqlite://PATH` (a file, created if missing) or
    /// `sqlite::memory:` (a private database in a temporary directory, gone
    /// when the store is dropped: the writer and the readers need one file
    /// to share); anything else is [`StoreError::BadUrl`]. A file database
    /// runs in WAL mode with the [`Durability`] its query names
    /// (`?synchronous=acknowledged`, the default, `full` or `normal`); the
    /// temporary one with [`Durability::Normal`].
    pub async fn open(url: &str) -> Result<SqliteStore, StoreError> {
        let (path, durability, temp): (PathBuf, Durability, Option<tempfile::TempDir>) =
            if url == MEMORY_URL {
                let dir = tempfile::Builder::new()
                    .prefix("taskexec-store-")
                    .tempdir()
                    .map_err(|source| StoreError::Setup {
                        what: "creating the temporary database's directory",
                        source,
                    })?;
                (dir.path().join("tasks.db"), Durability::Normal, Some(dir))
            } else if let Some(rest) = url.strip_prefix(FILE_PREFIX)
                && let (path, query) = rest.split_once('?').unwrap_or((rest, ""))
                && !path.is_empty()
            {
                let durability = match query {
                    "" | "synchronous=acknowledged" => Durability::Acknowledged,
                    "synchronous=full" => Durability::Full,
                    "synchronous=normal" => Durability::Normal,
                    _ => return Err(StoreError::BadUrl(url.to_owned())),
                };
                (PathBuf::from(path), durability, None)
            } else {
                return Err(StoreError::BadUrl(url.to_owned()));
            };
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
            && !dir.is_dir()
        {
            return Err(StoreError::NoDirectory {
                dir: dir.to_path_buf(),
            });
        }
        let options = SqliteConnectOptions::new()
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT)
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(if durability == Durability::Normal {
                SqliteSynchronous::Normal
            } else {
                SqliteSynchronous::Full
            });
        // An in-process database needs no liveness check at each acquire
        // (a round trip to the connection's thread).
        let pool = SqlitePoolOptions::new()
            .max_connections(READ_CONNECTIONS)
            .test_before_acquire(false)
            .connect_with(options)
            .await?;
        MIGRATOR.run(&pool).await?;
        let (floor, ack) = durability.levels();
        let writer = threads::ConnThreads::open(&path, 1, "sqlite-writer", floor, BUSY_TIMEOUT)?;
        let readers =
            threads::ConnThreads::open(&path, READERS, "sqlite-reader", floor, BUSY_TIMEOUT)?;
        Ok(SqliteStore {
            writer: Arc::new(writer),
            readers: Arc::new(readers),
            pool,
            _temp: temp.map(Arc::new),
            ack,
        })
    }

    /// Folds the write-ahead log into the database file
    /// (`PRAGMA wal_checkpoint(TRUNCATE)`), so that the file alone holds
    /// every committed write: a copy of it needs no `-wal` file beside it.
    pub async fn checkpoint(&self) -> Result<(), StoreError> {
        self.writer
            .read(|conn| {
                conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
                Ok(())
            })
            .await
    }

    /// Closes every connection, waiting for those in use to be returned
    /// and for the writes queued so far.
    pub async fn close(&self) {
        self.pool.close().await;
        let (writer, readers) = (Arc::clone(&self.writer), Arc::clone(&self.readers));
        let _ = tokio::task::spawn_blocking(move || {
            readers.close();
            writer.close();
        })
        .await;
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

mod statements;
mod threads;

use threads::Level;

#[async_trait]
impl TaskStore for SqliteStore {
    async fn submit(
        &self,
        tasks: Vec<NewTask>,
        max_queued: u64,
    ) -> Result<Vec<Submitted>, StoreError> {
        self.writer
            .write(self.ack, move |tx| {
                statements::submit(tx, &tasks, max_queued)
            })
            .await
    }

    async fn submit_and_claim(
        &self,
        tasks: Vec<NewTask>,
        max_queued: u64,
        claim: ClaimRequest<'_>,
    ) -> Result<(Vec<Submitted>, Vec<ClaimedTask>), StoreError> {
        let claim = owned_claim(&claim);
        self.writer
            .write(self.ack, move |tx| {
                let submitted = statements::submit(tx, &tasks, max_queued)?;
                let claimed = statements::claim(tx, &claim)?;
                Ok((submitted, claimed))
            })
            .await
    }

    async fn get(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        let id = id.to_owned();
        self.readers
            .read(move |conn| statements::get(conn, &id))
            .await
    }

    async fn progress(&self, id: &str) -> Result<Option<TaskProgress>, StoreError> {
        let id = id.to_owned();
        self.readers
            .read(move |conn| statements::progress(conn, &id))
            .await
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
        if !self
            .readers
            .read(move |conn| statements::any_claimable(conn, now_ms, free))
            .await?
        {
            return Ok(Vec::new());
        }
        let claim = owned_claim(&ClaimRequest {
            node,
            free,
            limit,
            now,
            lease,
        });
        self.writer
            .write(Level::Process, move |tx| statements::claim(tx, &claim))
            .await
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
        let (node, ids) = (node.to_owned(), ids.to_vec());
        self.writer
            .write(Level::Process, move |tx| {
                statements::renew(tx, &node, &ids, until, IN_CHUNK)
            })
            .await
    }

    async fn request_cancel(
        &self,
        id: &str,
        record: TransitionRecord,
    ) -> Result<CancelOutcome, StoreError> {
        let id = id.to_owned();
        self.writer
            .write(self.ack, move |tx| {
                statements::request_cancel(tx, &id, record)
            })
            .await
    }

    async fn claimed_by(&self, node: &str) -> Result<Vec<ClaimedTask>, StoreError> {
        let node = node.to_owned();
        self.readers
            .read(move |conn| statements::claimed_by(conn, &node))
            .await
    }

    async fn recover_claimed(&self, node: &str) -> Result<Vec<ClaimedTask>, StoreError> {
        let node = node.to_owned();
        self.writer
            .write(Level::Process, move |tx| {
                statements::recover_claimed(tx, &node)
            })
            .await
    }

    async fn take_over_expired(
        &self,
        node: &str,
        now: OffsetDateTime,
        lease: Duration,
    ) -> Result<Vec<ClaimedTask>, StoreError> {
        // The write lock is held from the start: no other transaction can
        // take the same tasks over in between.
        let node = node.to_owned();
        self.writer
            .write(Level::Process, move |tx| {
                statements::take_over_expired(tx, &node, now, lease)
            })
            .await
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
        writes: Arc<[Write]>,
        holder: Option<&str>,
    ) -> Result<Vec<String>, StoreError> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let holder = holder.map(str::to_owned);
        let sync = apply_level(&writes, self.ack);
        self.writer
            .write(sync, move |tx| {
                statements::apply_writes(tx, &writes, holder.as_deref())
            })
            .await
    }
}

/// The level of a commit of `writes`: that of an acknowledging commit
/// (`ack`) if one stores a final result (answered to clients once
/// committed), else a crash of the process is all it must survive.
fn apply_level(writes: &[Write], ack: Level) -> Level {
    if writes.iter().any(|w| matches!(w, Write::Finish { .. })) {
        ack
    } else {
        Level::Process
    }
}

/// `claim` with owned parts, to move into a writer job.
fn owned_claim(claim: &ClaimRequest<'_>) -> statements::Claim {
    statements::Claim {
        node: claim.node.to_owned(),
        free: claim.free,
        limit: claim.limit,
        now: claim.now,
        lease: claim.lease,
    }
}

#[cfg(test)]
mod tests {
    use taskexec_model::{TaskResult, TaskStatus};
    use time::OffsetDateTime;

    use super::*;

    #[test]
    fn acknowledging_commits_are_synced_by_default() {
        use Level::{Power, Process};
        assert_eq!(Durability::Acknowledged.levels(), (Process, Power));
        assert_eq!(Durability::Full.levels(), (Power, Power));
        assert_eq!(Durability::Normal.levels(), (Process, Process));
        let requeue = Write::Requeue {
            id: "a".to_owned(),
            attempt: 1,
            run_after: OffsetDateTime::UNIX_EPOCH,
        };
        let finish = Write::Finish {
            id: "a".to_owned(),
            attempt: 1,
            result: TaskResult::new("a", TaskStatus::Completed),
        };
        assert_eq!(apply_level(std::slice::from_ref(&requeue), Power), Process);
        assert_eq!(apply_level(&[requeue, finish], Power), Power);
    }
}
