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
pub(crate) type Ack = oneshot::Sender<Result<Committed, String>>;

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

/// Applies a batch, retrying with backoff while the database is unreachable
/// (a restart, a failover, a cut connection) for up to about two minutes,
/// so results are not dropped; the fences make a retried batch harmless.
pub(crate) async fn apply_with_retries(
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
