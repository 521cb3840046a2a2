//! Durability of the service against its store: a node that loses (or may
//! have lost) a task's lease stops the task's sandbox instead of running
//! it beside the task's next holder; outages of the store make the node
//! not ready; a cancel that wins over a late completion is what the node
//! reports.

#[path = "../../engine/tests/common/mod.rs"]
mod common;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::{Scripted, Step};
use serde_json::json;
use taskexec_engine::{Engine, EngineConfig, ManualClock};
use taskexec_model::{ErrorType, TaskInstance, TaskStatus, TransitionRecord};
use taskexec_runtimes::Catalogue;
use taskexec_service::{Service, ServiceConfig};
use taskexec_store::{
    CancelOutcome, Capacity, ClaimedTask, ListPage, ListQuery, NewTask, QueueStats, SqliteStore,
    StoreError, Submitted, TaskRecord, TaskStore, Write,
};
use time::OffsetDateTime;

/// A store that fails every call while `down` is set, as an unreachable
/// database does.
struct Outage {
    inner: Arc<dyn TaskStore>,
    down: AtomicBool,
}

impl fmt::Debug for Outage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outage").finish_non_exhaustive()
    }
}

impl Outage {
    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            // Classed as unavailable, as a refused connection is.
            Err(StoreError::Closed)
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl TaskStore for Outage {
    async fn submit(&self, t: Vec<NewTask>, max: u64) -> Result<Vec<Submitted>, StoreError> {
        self.check()?;
        self.inner.submit(t, max).await
    }
    async fn get(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        self.check()?;
        self.inner.get(id).await
    }
    async fn progress(&self, id: &str) -> Result<Option<taskexec_store::TaskProgress>, StoreError> {
        self.check()?;
        self.inner.progress(id).await
    }
    async fn list(&self, q: &ListQuery) -> Result<ListPage, StoreError> {
        self.check()?;
        self.inner.list(q).await
    }
    async fn claim(
        &self,
        node: &str,
        free: Capacity,
        limit: usize,
        now: OffsetDateTime,
        lease: Duration,
    ) -> Result<Vec<ClaimedTask>, StoreError> {
        self.check()?;
        self.inner.claim(node, free, limit, now, lease).await
    }
    async fn apply(&self, w: Vec<Write>) -> Result<Vec<String>, StoreError> {
        self.check()?;
        self.inner.apply(w).await
    }
    async fn apply_as(&self, node: &str, w: Arc<[Write]>) -> Result<Vec<String>, StoreError> {
        self.check()?;
        self.inner.apply_as(node, w).await
    }
    async fn renew(
        &self,
        node: &str,
        ids: &[String],
        until: OffsetDateTime,
    ) -> Result<Vec<String>, StoreError> {
        self.check()?;
        self.inner.renew(node, ids, until).await
    }
    async fn request_cancel(
        &self,
        id: &str,
        record: TransitionRecord,
    ) -> Result<CancelOutcome, StoreError> {
        self.check()?;
        self.inner.request_cancel(id, record).await
    }
    async fn recover_claimed(&self, node: &str) -> Result<Vec<ClaimedTask>, StoreError> {
        self.check()?;
        self.inner.recover_claimed(node).await
    }
    async fn claimed_by(&self, node: &str) -> Result<Vec<ClaimedTask>, StoreError> {
        self.check()?;
        self.inner.claimed_by(node).await
    }
    async fn take_over_expired(
        &self,
        node: &str,
        now: OffsetDateTime,
        lease: Duration,
    ) -> Result<Vec<ClaimedTask>, StoreError> {
        self.check()?;
        self.inner.take_over_expired(node, now, lease).await
    }
    async fn cancel_requested(&self, ids: &[String]) -> Result<Vec<String>, StoreError> {
        self.check()?;
        self.inner.cancel_requested(ids).await
    }
    async fn stats(&self) -> Result<QueueStats, StoreError> {
        self.check()?;
        self.inner.stats().await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.check()?;
        self.inner.ping().await
    }
}

fn task() -> TaskInstance {
    serde_json::from_value(json!({
        "definition": {"name": "t", "code": "print(1)"},
        "executionConfig": {"runtime": "python", "resourceRequirements": {"cpu": "1", "memory": "64Mi"}},
        "retryPolicy": {"maxRetries": 2, "retryInterval": 10, "backoffMultiplier": 1.0, "retryableErrors": ["INTERNAL"]},
    }))
    .expect("valid task")
}

/// A node with a short lease (renewed every 200 ms) on `store`.
async fn node(runner: &Arc<Scripted>, store: Arc<dyn TaskStore>, lease: Duration) -> Arc<Service> {
    let engine = Arc::new(Engine::new(
        EngineConfig::default(),
        Catalogue::builtin(),
        Arc::clone(runner) as _,
        Arc::new(ManualClock::new(0.5)),
    ));
    let mut config = ServiceConfig::new(
        "node-a",
        Capacity {
            cpu_millis: 1000,
            memory_bytes: 1 << 30,
        },
    );
    config.workers = 1;
    config.lease = lease;
    config.poll_interval = Duration::from_millis(50);
    Service::start(engine, store, config).await.expect("start")
}

/// Waits (up to 10 s) until `done` holds.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn sqlite(dir: &tempfile::TempDir) -> Arc<dyn TaskStore> {
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    Arc::new(SqliteStore::open(&url).await.expect("open store"))
}

/// A node whose task another node took over (as after a pause of the
/// first past its lease) kills the task's sandbox at its next renewal,
/// instead of running it to the end beside the new holder, and records
/// nothing for that attempt: the task stays the new holder's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_task_was_taken_over_stops_it() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = sqlite(&dir).await;
    let runner = Scripted::new([Step::BlockUntilCancelled]);
    let s = node(&runner, Arc::clone(&store), Duration::from_millis(600)).await;
    let ids = s.submit(vec![task()]).await.expect("submit");
    let id = ids[0].id().to_owned();
    runner.started.notified().await;
    // node-b takes the task over as if node-a's lease had run out.
    let later = OffsetDateTime::now_utc() + Duration::from_secs(3600);
    let taken = store
        .take_over_expired("node-b", later, Duration::from_secs(3600))
        .await
        .expect("take over");
    assert_eq!(taken.len(), 1);
    until("the sandbox is killed", || {
        runner.running.load(Ordering::SeqCst) == 0
    })
    .await;
    s.flush().await;
    let rec = store.get(&id).await.expect("get").expect("task");
    assert_eq!(rec.node.as_deref(), Some("node-b"));
    assert!(!rec.status.is_final(), "{:?}", rec.status);
    assert!(rec.attempts.is_empty(), "node-a recorded nothing");
    assert_eq!(runner.calls.load(Ordering::SeqCst), 1);
}

/// A node that cannot reach the store to renew its leases stops its tasks
/// before the leases run out and claims nothing, is not ready meanwhile,
/// and once the store answers again the interrupted attempt is taken over
/// (here by the same node), recorded and retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_its_store_stops_its_tasks_before_their_leases_expire() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = Arc::new(Outage {
        inner: sqlite(&dir).await,
        down: AtomicBool::new(false),
    });
    let runner = Scripted::new([Step::BlockUntilCancelled, Step::Exit(0, "\"again\"")]);
    // The node stops its task once the leases would run out before its
    // next renewal could extend them: within the lease of the cut, with
    // room for a loaded machine's late timers.
    let lease = Duration::from_secs(4);
    let s = node(&runner, Arc::clone(&store) as _, lease).await;
    let ids = s.submit(vec![task()]).await.expect("submit");
    let id = ids[0].id().to_owned();
    runner.started.notified().await;
    s.ready().await.expect("ready");
    let cut = Instant::now();
    store.down.store(true, Ordering::SeqCst);
    until("the sandbox is killed", || {
        runner.running.load(Ordering::SeqCst) == 0
    })
    .await;
    assert!(
        cut.elapsed() < lease,
        "stopped {:?} after the cut, the lease is {lease:?}",
        cut.elapsed()
    );
    assert!(
        s.ready().await.is_err(),
        "not ready while the store is down"
    );
    store.down.store(false, Ordering::SeqCst);
    let rec = s
        .wait_final(&id, Duration::from_secs(20))
        .await
        .expect("wait")
        .expect("task");
    assert_eq!(rec.status, TaskStatus::Completed, "{:?}", rec.result);
    assert_eq!(rec.attempts.len(), 2, "{:?}", rec.attempts);
    let lost = rec.attempts[0].error.as_ref().expect("interrupted attempt");
    assert_eq!(lost.error_type, ErrorType::Internal);
    assert_eq!(runner.calls.load(Ordering::SeqCst), 2);
}

/// A task `id` that may be retried five times after an INTERNAL error,
/// stored (not claimed) as received an hour ago.
async fn stored_task(store: &dyn TaskStore, id: &str) -> OffsetDateTime {
    let task: TaskInstance = serde_json::from_value(json!({
        "id": id,
        "definition": {"name": "t", "code": "print(1)"},
        "executionConfig": {"runtime": "python", "resourceRequirements": {"cpu": "1", "memory": "64Mi"}},
        "retryPolicy": {"maxRetries": 5, "retryInterval": 10, "backoffMultiplier": 1.0, "retryableErrors": ["INTERNAL"]},
    }))
    .expect("valid task");
    let base = OffsetDateTime::now_utc() - Duration::from_secs(3600);
    let new = NewTask {
        task,
        runtime: "python".to_owned(),
        cpu_millis: 1000,
        memory_bytes: 64 << 20,
        received: TransitionRecord {
            from: None,
            to: TaskStatus::Received,
            at: base,
            attempt: 0,
            reason: "received".to_owned(),
        },
        idempotency_scope: String::new(),
        request_hash: None,
    };
    store.submit(vec![new], 100).await.expect("submit");
    base
}

/// Attempts 1..=`lost` of task `id` (stored at `base`) run on nodes
/// `ghost-1`, `ghost-2`, … that die with them: each attempt's lease
/// expires, `rescuer` takes it over and requeues it (recording nothing);
/// the last one is left expired for the node under test to take over.
async fn lose_attempts(store: &dyn TaskStore, id: &str, base: OffsetDateTime, lost: u32) {
    let lease = Duration::from_secs(1);
    for n in 1..=lost {
        let t = base + Duration::from_secs(u64::from(n) * 60);
        let claimed = store
            .claim(
                &format!("ghost-{n}"),
                Capacity {
                    cpu_millis: 1000,
                    memory_bytes: 1 << 30,
                },
                1,
                t,
                lease,
            )
            .await
            .expect("claim");
        assert_eq!(claimed.len(), 1);
        if n == lost {
            break;
        }
        let taken = store
            .take_over_expired("rescuer", t + Duration::from_secs(10), lease)
            .await
            .expect("take over");
        assert_eq!(taken.len(), 1);
        store
            .apply_as(
                "rescuer",
                vec![Write::Requeue {
                    id: id.to_owned(),
                    attempt: n,
                    run_after: t + Duration::from_secs(20),
                }]
                .into(),
            )
            .await
            .expect("requeue");
    }
}

/// A task whose every attempt takes its node down (the lease expires, the
/// next node takes it over, dies too…) is quarantined after three lost
/// attempts: it ends FAILED with a reason naming it, and never runs here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_lost_with_its_node_three_times_is_quarantined() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = sqlite(&dir).await;
    let base = stored_task(&*store, "poison").await;
    lose_attempts(&*store, "poison", base, 3).await;
    let runner = Scripted::new([Step::Exit(0, "1")]);
    let s = node(&runner, Arc::clone(&store), Duration::from_millis(600)).await;
    let rec = s
        .wait_final("poison", Duration::from_secs(20))
        .await
        .expect("wait")
        .expect("task");
    assert_eq!(rec.status, TaskStatus::Failed, "{:?}", rec.result);
    let error = rec.result.and_then(|r| r.error).expect("an error");
    assert_eq!(
        error.message,
        "quarantined: 3 attempts were lost with their node"
    );
    assert_eq!(runner.calls.load(Ordering::SeqCst), 0, "never run again");
}

/// Below the quarantine threshold a lost attempt is retried, and the
/// attempt is recorded as lost by the node that ran it (`ghost-2`), not
/// by the node that took it over first and lost it in turn before it
/// could record it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_attempt_names_its_node_and_is_retried_below_the_threshold() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = sqlite(&dir).await;
    let base = stored_task(&*store, "t").await;
    lose_attempts(&*store, "t", base, 2).await;
    // An outage: a node takes attempt 2 over and never gets to record it.
    let taken = store
        .take_over_expired(
            "cut-off",
            base + Duration::from_secs(600),
            Duration::from_secs(1),
        )
        .await
        .expect("take over");
    assert_eq!(taken.len(), 1);
    let runner = Scripted::new([Step::Exit(0, "1")]);
    let s = node(&runner, Arc::clone(&store), Duration::from_millis(600)).await;
    let rec = s
        .wait_final("t", Duration::from_secs(20))
        .await
        .expect("wait")
        .expect("task");
    assert_eq!(rec.status, TaskStatus::Completed, "{:?}", rec.result);
    let messages: Vec<String> = rec
        .attempts
        .iter()
        .map(|a| {
            a.error
                .as_ref()
                .map(|e| e.message.clone())
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(messages, ["node ghost-2 lost", ""], "{:?}", rec.attempts);
}
