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

/// Threads that each own a connection to one database file and take jobs
/// from one queue.
#[derive(Debug)]
pub(super) struct ConnThreads {
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

fn closed() -> StoreError {
    StoreError::Closed
}

impl ConnThreads {
    /// Opens `count` connections to the database file at `path` (its
    /// schema already migrated), each on a thread named `name`.
    pub(super) fn open(
        path: &Path,
        count: usize,
        name: &str,
        full_sync: bool,
        busy_timeout: Duration,
    ) -> Result<ConnThreads, StoreError> {
        let (send, receive) = mpsc::channel::<Job>();
        let receive = Arc::new(Mutex::new(receive));
        let mut threads = Vec::with_capacity(count);
        for _ in 0..count {
            let conn = Connection::open(path)?;
            conn.busy_timeout(busy_timeout)?;
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(
                None,
                "synchronous",
                if full_sync { "FULL" } else { "NORMAL" },
            )?;
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
    /// it returns `Ok`, rolled back otherwise.
    pub(super) async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        self.run(move |conn| {
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
