//! Connections on threads of their own (rusqlite), which run each
//! transaction whole, as one job: the SQLite store's writer, and the
//! readers of its hottest read.
//!
//! Why: sqlx runs each statement of a connection on that connection's
//! thread, so a transaction of ten statements hands off between threads
//! twenty times, and on a small VM each hand-off may wake an idle core
//! (tens of microseconds each). Here a transaction costs one hand-off
//! there and one back, whatever its length.
//!
//! The writer is one thread: jobs run one at a time, in the order they
//! arrive, so this process's writers queue here instead of colliding on
//! SQLite's write lock. Each write job starts with `BEGIN IMMEDIATE`, so it
//! holds the write lock before it reads what it is going to change (two
//! claimers can never take the same task; other processes on the same file
//! meet the busy timeout). Readers share one queue; in WAL mode they never
//! wait for the writer.
//!
//! Durability is chosen per transaction ([`Level`]): the writer's connection
//! switches `PRAGMA synchronous` between `NORMAL` and `FULL` before a
//! transaction when it needs the other level (the pragma cannot change
//! inside one). In WAL mode a `FULL` commit syncs the log, and with it
//! every commit written before it, so a power loss can only lose a suffix
//! of `NORMAL` commits made after the last `FULL` one.

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{Connection, Transaction, TransactionBehavior};

use crate::StoreError;

/// Statements kept prepared on each connection.
const STATEMENT_CACHE: usize = 32;

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// How durable a commit must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Level {
    /// Survives a crash of the process (`synchronous=NORMAL` in WAL mode).
    Process,
    /// Survives a power loss too (`synchronous=FULL`: the log is synced at
    /// commit).
    Power,
}

impl Level {
    fn pragma(self) -> &'static str {
        match self {
            Level::Process => "NORMAL",
            Level::Power => "FULL",
        }
    }
}

thread_local! {
    /// The `synchronous` level of this thread's connection (each thread
    /// owns one), as last set.
    static SYNC: std::cell::Cell<Option<Level>> = const { std::cell::Cell::new(None) };
}

/// Sets `synchronous` on `conn`, this thread's connection, to `want`
/// unless it is there already.
fn set_sync(conn: &Connection, want: Level) -> Result<(), StoreError> {
    if SYNC.get() != Some(want) {
        // Unknown until the pragma succeeds.
        SYNC.set(None);
        conn.pragma_update(None, "synchronous", want.pragma())?;
        SYNC.set(Some(want));
    }
    Ok(())
}

/// Threads that each own a connection to one database file and take jobs
/// from one queue.
#[derive(Debug)]
pub(super) struct ConnThreads {
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// The level of each connection's `synchronous` now (the writer's
    /// changes per transaction; `floor` is the lowest it goes).
    floor: Level,
}

fn closed() -> StoreError {
    StoreError::Closed
}

impl ConnThreads {
    /// Opens `count` connections to the database file at `path` (its
    /// schema already migrated), each on a thread named `name`, committing
    /// at `floor` unless a transaction asks for more.
    pub(super) fn open(
        path: &Path,
        count: usize,
        name: &str,
        floor: Level,
        busy_timeout: Duration,
    ) -> Result<ConnThreads, StoreError> {
        let (send, receive) = mpsc::channel::<Job>();
        let receive = Arc::new(Mutex::new(receive));
        let mut threads = Vec::with_capacity(count);
        for _ in 0..count {
            let conn = Connection::open(path)?;
            conn.busy_timeout(busy_timeout)?;
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", floor.pragma())?;
            conn.pragma_update(None, "foreign_keys", true)?;
            conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
            let receive = Arc::clone(&receive);
            let thread = std::thread::Builder::new()
                .name(name.to_owned())
                .spawn(move || {
                    let mut conn = conn;
                    loop {
                        let job = receive.lock().unwrap_or_else(|p| p.into_inner()).recv();
                        let Ok(job) = job else { break };
                        // A job that panics loses its answer (its caller
                        // sees a closed store), not the thread.
                        let _ = std::panic::catch_unwind(AssertUnwindSafe(|| job(&mut conn)));
                    }
                })
                .map_err(|source| StoreError::Setup {
                    what: "starting the store's connection threads",
                    source,
                })?;
            threads.push(thread);
        }
        Ok(ConnThreads {
            jobs: Mutex::new(Some(send)),
            threads: Mutex::new(threads),
            floor,
        })
    }

    /// Runs `f` on a connection of ours and returns its answer.
    async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |conn: &mut Connection| {
            let _ = answer.send(f(conn));
        });
        {
            let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
            let Some(jobs) = jobs.as_ref() else {
                return Err(closed());
            };
            jobs.send(job).map_err(|_| closed())?;
        }
        answered.await.map_err(|_| closed())?
    }

    /// Runs `f` in one write transaction (`BEGIN IMMEDIATE`), committed if
    /// it returns `Ok`, rolled back otherwise; the commit is at least as
    /// durable as `sync` (see the module docs).
    pub(super) async fn write<T, F>(&self, sync: Level, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        let want = if self.floor == Level::Power {
            Level::Power
        } else {
            sync
        };
        self.run(move |conn| {
            set_sync(conn, want)?;
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let value = f(&tx)?;
            tx.commit()?;
            Ok(value)
        })
        .await
    }

    /// Runs `f`, a read, on a connection of ours.
    pub(super) async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.run(move |conn| f(conn)).await
    }

    /// Stops taking jobs, lets those queued finish and closes the
    /// connections.
    pub(super) fn close(&self) {
        drop(self.jobs.lock().unwrap_or_else(|p| p.into_inner()).take());
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for thread in threads {
            let _ = thread.join();
        }
    }
}

impl Drop for ConnThreads {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `synchronous` level a transaction of `threads` at `level` runs
    /// with (0 OFF, 1 NORMAL, 2 FULL).
    async fn level_in(threads: &ConnThreads, level: Level) -> i64 {
        threads
            .write(level, |tx| {
                Ok(tx.pragma_query_value(None, "synchronous", |r| r.get(0))?)
            })
            .await
            .expect("write")
    }

    #[tokio::test]
    async fn each_transaction_commits_at_its_level() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("t.db");
        let normal =
            ConnThreads::open(&path, 1, "t", Level::Process, Duration::from_secs(1)).expect("open");
        assert_eq!(level_in(&normal, Level::Power).await, 2);
        assert_eq!(level_in(&normal, Level::Process).await, 1);
        assert_eq!(level_in(&normal, Level::Process).await, 1);
        assert_eq!(level_in(&normal, Level::Power).await, 2);
        let full =
            ConnThreads::open(&path, 1, "t", Level::Power, Duration::from_secs(1)).expect("open");
        assert_eq!(level_in(&full, Level::Process).await, 2);
    }
}
