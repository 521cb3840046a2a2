//! The store writer: writes sent by the workers, committed in batched
//! transactions, retried through an outage of the database; and the store's
//! health as those writes found it.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use metrics::{gauge, histogram};
use taskexec_store::{ErrorClass, StoreError, TaskStore, Write};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, warn};

use crate::metric;
use crate::{Service, lock};

/// What a committed batch of writes reports: the ids of the tasks whose
/// final write the store turned into CANCELLED (a cancel won).
pub(crate) type Committed = Arc<[String]>;

/// An acknowledgement of a committed write.
pub(crate) type Ack = oneshot::Sender<Result<Committed, WriteError>>;

/// How long the writer retries a batch that fails for a reason a retry
/// can fix (the database unreachable or busy, its disk full).
const RETRY_FOR: Duration = Duration::from_secs(120);

/// A batch of writes the writer gave up: nothing of it was stored.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{writes} store writes given up after {attempts} attempts")]
pub(crate) struct WriteError {
    /// The writes of the batch.
    writes: usize,
    /// How many times the batch was tried.
    attempts: u32,
    /// The last failure (shared by every acknowledgement of the batch).
    #[source]
    source: Arc<StoreError>,
}

/// How long a failure of the store keeps the node not ready
/// ([`Service::ready`]) after the last write that met it: the writer's
/// retries and new submissions renew it while the outage lasts, and once it
/// passed without one, traffic is let through to find out.
pub(crate) const STORE_FAILURE_HOLD: Duration = Duration::from_secs(5);

/// The store as this node's writes last found it: for readiness, and the
/// count of writes held in memory until committed.
#[derive(Debug, Default)]
pub(crate) struct StoreHealth {
    /// The class of the last failure (unreachable or full), and when, as
    /// long as no write succeeded since.
    failing: Mutex<Option<(ErrorClass, Instant)>>,
    /// Writes sent to the writer and not yet committed or given up.
    pending: AtomicUsize,
}

impl StoreHealth {
    /// Notes the outcome of a write.
    pub(crate) fn record<T>(&self, outcome: &Result<T, StoreError>) {
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
    pub(crate) fn problem(&self) -> Option<ErrorClass> {
        lock(&self.failing)
            .filter(|(_, at)| at.elapsed() < STORE_FAILURE_HOLD)
            .map(|(class, _)| class)
    }

    /// `n` more writes (negative: fewer) wait for their commit.
    pub(crate) fn pending(&self, added: usize, removed: usize) {
        let now = if added > 0 {
            self.pending.fetch_add(added, Ordering::SeqCst) + added
        } else {
            self.pending.fetch_sub(removed, Ordering::SeqCst) - removed
        };
        gauge!(metric::STORE_PENDING_WRITES.name).set(now as f64);
    }
}

/// What the writer is asked to do.
#[derive(Debug)]
pub(crate) enum Pending {
    /// Commit writes (in one transaction, with whatever else is pending);
    /// acknowledge if asked.
    Write(Vec<Write>, Option<Ack>),
    /// Acknowledge once everything sent before is committed.
    Flush(Ack),
}

impl Service {
    /// Waits until every write sent so far is committed.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.writes.send(Pending::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Sends writes, to be committed in one transaction; when `ack`, waits
    /// for the commit and returns what it reports (`None` if it failed).
    pub(crate) async fn write(&self, writes: Vec<Write>, ack: bool) -> Option<Committed> {
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
                    Ok(Err(e)) => error!(error = %error_chain(&e), "store write failed"),
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
}

impl Pending {
    /// Someone waits for this one's commit.
    pub(crate) fn awaited(&self) -> bool {
        matches!(self, Pending::Write(_, Some(_)) | Pending::Flush(_))
    }
}

/// The store writer: takes writes as they come and commits what has piled
/// up in one transaction. With batching (`linger` set), a write someone
/// waits for goes at once, with everything that arrived while the previous
/// transaction committed; writes nobody waits for wait up to `linger` for
/// one that is (a short task's end, usually), so that a task's start and
/// end share a transaction.
pub(crate) async fn writer(
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
        histogram!(metric::STORE_BATCH_WRITES.name).record(writes.len() as f64);
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

/// Whether the writer tries a batch that failed with `e` again: when a
/// retry can fix it ([`StoreError::is_transient`]: a restart, a failover, a
/// cut connection, lock contention), and when the disk is full (an operator
/// may make room meanwhile; the node answers not ready until then).
pub(crate) fn worth_retrying(e: &StoreError) -> bool {
    e.is_transient() || e.class() == ErrorClass::Full
}

/// `e` and its causes, separated by `: `.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// Applies a batch, retrying with backoff what a retry can fix
/// ([`worth_retrying`]) for up to about two minutes, so results are not
/// dropped; the fences make a retried batch harmless. Any other failure (a
/// constraint the batch breaks, data that does not encode) gives the batch
/// up at once, as does the end of the two minutes: the failure is logged
/// with its causes, the tasks of the batch stay as the store last recorded
/// them, and once this node stops renewing their leases they are taken
/// over and retried per their policy.
pub(crate) async fn apply_with_retries(
    store: &dyn TaskStore,
    health: &StoreHealth,
    node: &str,
    writes: Vec<Write>,
) -> Result<Committed, WriteError> {
    let writes: Arc<[Write]> = writes.into();
    let mut delay = Duration::from_millis(50);
    let started = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let outcome = store.apply_as(node, Arc::clone(&writes)).await;
        health.record(&outcome);
        match outcome {
            Ok(cancelled) => return Ok(Arc::from(cancelled)),
            Err(e) => {
                let msg = error_chain(&e);
                let retry = worth_retrying(&e);
                if !retry || started.elapsed() > RETRY_FOR {
                    if retry {
                        error!(error = %msg, writes = writes.len(), attempts, "store write failed for two minutes; giving up");
                    } else {
                        error!(error = %msg, writes = writes.len(), "store write failed and no retry can fix it; giving up");
                    }
                    return Err(WriteError {
                        writes: writes.len(),
                        attempts,
                        source: Arc::new(e),
                    });
                }
                warn!(error = %msg, retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX), "store write failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::atomic::AtomicU32;

    use async_trait::async_trait;
    use taskexec_model::TransitionRecord;
    use taskexec_store::{
        CancelOutcome, Capacity, ClaimedTask, ListPage, ListQuery, NewTask, QueueStats, Submitted,
        TaskProgress, TaskRecord,
    };
    use time::OffsetDateTime;

    use super::*;

    /// A store whose writes fail with the given errors in turn, then
    /// succeed; the writer calls nothing else.
    #[derive(Debug, Default)]
    struct Scripted {
        failures: Mutex<VecDeque<StoreError>>,
        calls: AtomicU32,
    }

    impl Scripted {
        fn new(failures: impl IntoIterator<Item = StoreError>) -> Self {
            Self {
                failures: Mutex::new(failures.into_iter().collect()),
                calls: AtomicU32::new(0),
            }
        }
    }

    #[async_trait]
    impl TaskStore for Scripted {
        async fn submit(&self, _: Vec<NewTask>, _: u64) -> Result<Vec<Submitted>, StoreError> {
            unreachable!("the writer only applies writes")
        }
        async fn get(&self, _: &str) -> Result<Option<TaskRecord>, StoreError> {
            unreachable!("the writer only applies writes")
        }
        async fn progress(&self, _: &str) -> Result<Option<TaskProgress>, StoreError> {
            unreachable!("the writer only applies writes")
        }
        async fn list(&self, _: &ListQuery) -> Result<ListPage, StoreError> {
            unreachable!("the writer only applies writes")
        }
        async fn claim(
            &self,
            _: &str,
            _: Capacity,
            _: usize,
            _: OffsetDateTime,
            _: Duration,
        ) -> Result<Vec<ClaimedTask>, StoreError> {
            unreachable!("the writer only applies writes")
        }
        async fn apply(&self, w: Vec<Write>) -> Result<Vec<String>, StoreError> {
            self.apply_as("n", w.into()).await
        }
        async fn apply_as(&self, _: &str, _: Arc<[Write]>) -> Result<Vec<String>, StoreError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            match lock(&self.failures).pop_front() {
                Some(e) => Err(e),
                None => Ok(vec!["won".to_owned()]),
            }
        }
        async fn renew(
            &self,
            _: &str,
            _: &[String],
            _: OffsetDateTime,
        ) -> Result<Vec<String>, StoreError> {
            unreachable!("the writer only applies writes")
        }
        async fn request_cancel(
            &self,
            _: &str,
            _: TransitionRecord,
        ) -> Result<CancelOutcome, StoreError> {
            unreachable!("the writer only applies writes")
        }
        async fn claimed_by(&self, _: &str) -> Result<Vec<ClaimedTask>, StoreError> {
            unreachable!("the writer only applies writes")
        }
        async fn recover_claimed(&self, _: &str) -> Result<Vec<ClaimedTask>, StoreError> {
            unreachable!("the writer only applies writes")
        }
        async fn take_over_expired(
            &self,
            _: &str,
            _: OffsetDateTime,
            _: Duration,
        ) -> Result<Vec<ClaimedTask>, StoreError> {
            unreachable!("the writer only applies writes")
        }
        async fn cancel_requested(&self, _: &[String]) -> Result<Vec<String>, StoreError> {
            unreachable!("the writer only applies writes")
        }
        async fn stats(&self) -> Result<QueueStats, StoreError> {
            unreachable!("the writer only applies writes")
        }
        async fn ping(&self) -> Result<(), StoreError> {
            unreachable!("the writer only applies writes")
        }
    }

    fn sqlite(code: std::ffi::c_int) -> StoreError {
        StoreError::Sqlite(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(code),
            None,
        ))
    }

    fn batch() -> Vec<Write> {
        vec![Write::Requeue {
            id: "t".to_owned(),
            attempt: 1,
            run_after: OffsetDateTime::UNIX_EPOCH,
        }]
    }

    #[tokio::test]
    async fn a_permanent_failure_gives_the_batch_up_at_once() {
        let store = Scripted::new([sqlite(rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE)]);
        let health = StoreHealth::default();
        let e = apply_with_retries(&store, &health, "n", batch())
            .await
            .expect_err("a constraint violation is not retried");
        assert_eq!(store.calls.load(Ordering::SeqCst), 1);
        assert_eq!((e.writes, e.attempts), (1, 1));
        assert!(e.source.is_unique_violation(), "{e:?}");
        // The cause stays reachable for the log.
        assert!(
            error_chain(&e).contains("constraint failed"),
            "{}",
            error_chain(&e)
        );
        // Not a problem of the store's availability: the node stays ready.
        assert_eq!(health.problem(), None);
    }

    #[tokio::test]
    async fn transient_failures_and_a_full_disk_are_retried_until_the_commit() {
        let store = Scripted::new([
            StoreError::Closed,
            sqlite(rusqlite::ffi::SQLITE_BUSY),
            sqlite(rusqlite::ffi::SQLITE_CANTOPEN),
            sqlite(rusqlite::ffi::SQLITE_FULL),
        ]);
        let health = StoreHealth::default();
        let committed = apply_with_retries(&store, &health, "n", batch())
            .await
            .expect("committed on the fifth attempt");
        assert_eq!(store.calls.load(Ordering::SeqCst), 5);
        assert_eq!(&*committed, ["won".to_owned()]);
        assert_eq!(health.problem(), None, "the commit cleared the failure");
    }

    #[test]
    fn only_what_a_retry_or_an_operator_can_fix_is_retried() {
        assert!(worth_retrying(&StoreError::Closed));
        assert!(worth_retrying(&sqlite(rusqlite::ffi::SQLITE_LOCKED)));
        assert!(worth_retrying(&sqlite(rusqlite::ffi::SQLITE_FULL)));
        assert!(!worth_retrying(&sqlite(
            rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
        )));
        assert!(!worth_retrying(&StoreError::BadCursor("x".to_owned())));
        let json = serde_json::from_str::<u32>("x").expect_err("not JSON");
        assert!(!worth_retrying(&StoreError::Json {
            id: "t".to_owned(),
            source: json,
        }));
    }
}
