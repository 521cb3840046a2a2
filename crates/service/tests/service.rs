//! The service over a real SQLite store with a scripted runner: the whole
//! path from submission to the stored result, persisted retries, admission,
//! the queue bound, idempotency, cancellation, crash recovery and shutdown.

#[path = "../../engine/tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Scripted, Step};
use serde_json::json;
use taskexec_engine::{Engine, EngineConfig, ManualClock};
use taskexec_model::{ErrorType, TaskInstance, TaskStatus, TransitionRecord};
use taskexec_runtimes::Catalogue;
use taskexec_service::limiter::ConcurrencyConfig;
use taskexec_service::{Service, ServiceConfig, SubmitError, TaskEvent};
use taskexec_store::{CancelOutcome, Capacity, NewTask, SqliteStore, Submitted, TaskStore};
use time::OffsetDateTime;

fn task(extra: serde_json::Value) -> TaskInstance {
    let mut v = json!({
        "definition": {"name": "t", "code": "print(1)"},
        "executionConfig": {"runtime": "python", "resourceRequirements": {"cpu": "1", "memory": "64Mi"}},
        "retryPolicy": {"maxRetries": 2, "retryInterval": 10, "backoffMultiplier": 1.0, "retryableErrors": ["ENVIRONMENT_SETUP", "INTERNAL"]},
    });
    if let (Some(obj), Some(extra)) = (v.as_object_mut(), extra.as_object()) {
        for (k, val) in extra {
            obj.insert(k.clone(), val.clone());
        }
    }
    serde_json::from_value(v).expect("valid task")
}

struct Fixture {
    _dir: tempfile::TempDir,
    url: String,
    runner: Arc<Scripted>,
}

impl Fixture {
    fn new(steps: impl IntoIterator<Item = Step>) -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        Self {
            _dir: dir,
            url,
            runner: Scripted::new(steps),
        }
    }

    async fn store(&self) -> Arc<dyn TaskStore> {
        Arc::new(SqliteStore::open(&self.url).await.expect("open store"))
    }

    async fn service(&self, cpu_millis: u64, workers: usize) -> Arc<Service> {
        self.service_with(cpu_millis, workers, |_| {}).await
    }

    async fn service_with(
        &self,
        cpu_millis: u64,
        workers: usize,
        tweak: impl FnOnce(&mut ServiceConfig),
    ) -> Arc<Service> {
        let engine = Arc::new(Engine::new(
            EngineConfig::default(),
            Catalogue::builtin(),
            Arc::clone(&self.runner) as _,
            Arc::new(ManualClock::new(0.5)),
        ));
        let mut config = ServiceConfig::new(
            "node-a",
            Capacity {
                cpu_millis,
                memory_bytes: 1 << 30,
            },
        );
        config.workers = workers;
        config.poll_interval = Duration::from_millis(50);
        tweak(&mut config);
        Service::start(engine, self.store().await, config)
            .await
            .expect("start")
    }
}

async fn wait(service: &Service, id: &str) -> taskexec_store::TaskRecord {
    service
        .wait_final(id, Duration::from_secs(20))
        .await
        .expect("store")
        .expect("task exists")
}

/// Asserts that a submission was refused for its task `index`, which "can
/// never run here", naming `field`; returns the message.
fn assert_never_fits(
    submitted: Result<Vec<Submitted>, SubmitError>,
    index: usize,
    field: &str,
) -> String {
    match submitted {
        Err(SubmitError::Rejected { index: i, error }) => {
            assert_eq!(i, index);
            assert!(
                error.message.contains("can never run here"),
                "{}",
                error.message
            );
            assert_eq!(error.details.expect("details")["field"], field);
            error.message
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
}

fn states(rec: &taskexec_store::TaskRecord) -> Vec<TaskStatus> {
    rec.history.iter().map(|h| h.to).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submitted_task_runs_and_its_result_and_history_are_stored() {
    let f = Fixture::new([Step::Exit(0, r#"{"ok":1}"#)]);
    let s = f.service(2000, 2).await;
    let ids = s.submit(vec![task(json!({}))]).await.expect("submit");
    let rec = wait(&s, ids[0].id()).await;
    assert_eq!(rec.status, TaskStatus::Completed);
    use TaskStatus::*;
    assert_eq!(states(&rec), vec![Received, Preparing, Running, Completed]);
    let result = rec.result.expect("result");
    assert_eq!(result.output, json!({"ok": 1}));
    assert_eq!(result.execution_metadata.attempts.len(), 1);
    assert!(result.execution_metadata.phases.queue_wait_ms >= 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_registered_before_submission_gets_the_stored_result() {
    let f = Fixture::new([Step::Exit(0, "1"), Step::Exit(0, "2")]);
    let s = f.service(2000, 2).await;
    for expected in [1, 2] {
        let mut t = task(json!({}));
        Service::assign_id(&mut t);
        let watch = s.watch_final(&t.id);
        let ids = s.submit(vec![t]).await.expect("submit");
        assert_eq!(watch.id(), ids[0].id());
        let rec = s
            .wait_watched(watch, Duration::from_secs(20), true)
            .await
            .expect("store")
            .expect("task exists");
        assert_eq!(rec.status, TaskStatus::Completed);
        // What the waiter got is what is stored.
        let stored = s.get(ids[0].id()).await.expect("get").expect("stored");
        assert_eq!(rec, stored);
        assert_eq!(rec.result.expect("result").output, json!(expected));
    }
    // A wait for a task already final answers from the store.
    let done = s.list(&Default::default()).await.expect("list").items;
    let rec = wait(&s, &done[0].id).await;
    assert_eq!(rec.status, TaskStatus::Completed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retryable_failure_is_requeued_and_retried() {
    let f = Fixture::new([Step::SetupFails, Step::Exit(0, "7")]);
    let s = f.service(2000, 2).await;
    let ids = s.submit(vec![task(json!({}))]).await.expect("submit");
    let rec = wait(&s, ids[0].id()).await;
    assert_eq!(rec.status, TaskStatus::Completed, "{:?}", rec.result);
    assert_eq!(rec.attempts.len(), 2);
    assert_eq!(
        rec.attempts[0].error.as_ref().map(|e| e.error_type),
        Some(ErrorType::EnvironmentSetup)
    );
    use TaskStatus::*;
    assert_eq!(
        states(&rec),
        vec![Received, Preparing, Running, Preparing, Running, Completed]
    );
    assert_eq!(f.runner.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_are_admitted_only_within_the_node_cpu() {
    let f = Fixture::new([Step::Sleep(50), Step::Sleep(50), Step::Sleep(50)]);
    // 1 CPU of capacity, tasks of 1 CPU each, 4 worker slots: one at a time.
    let s = f.service(1000, 4).await;
    let ids = s
        .submit(vec![task(json!({})), task(json!({})), task(json!({}))])
        .await
        .expect("submit");
    for id in &ids {
        assert_eq!(wait(&s, id.id()).await.status, TaskStatus::Completed);
    }
    assert_eq!(f.runner.max_running.load(Ordering::SeqCst), 1);
}

/// A Java task holds its compile step's memory (512 MiB by default) at
/// admission, not only its own limit: a node with less memory capacity
/// refuses it as never fitting, naming the compile step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compile_step_larger_than_the_node_is_rejected_at_submission() {
    let f = Fixture::new([Step::Exit(0, "1")]);
    let s = f
        .service_with(2000, 2, |c| c.capacity.memory_bytes = 256 << 20)
        .await;
    let java = task(json!({
        "definition": {"name": "j", "code": "public class Main { public static void main(String[] a) {} }"},
        "executionConfig": {"runtime": "java", "resourceRequirements": {"cpu": "1", "memory": "64Mi"}},
    }));
    let message = assert_never_fits(
        s.submit(vec![java]).await,
        0,
        "executionConfig.resourceRequirements.memory",
    );
    assert!(message.contains("compile step"), "{message}");
    // A python task of the same size fits, and runs.
    let ids = s
        .submit(vec![task(json!({}))])
        .await
        .expect("a python task fits");
    assert_eq!(wait(&s, ids[0].id()).await.status, TaskStatus::Completed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_can_never_fit_is_rejected_and_nothing_is_stored() {
    let f = Fixture::new([]);
    let s = f.service(1000, 2).await;
    let big = task(
        json!({"executionConfig": {"runtime": "python", "resourceRequirements": {"cpu": "2"}}}),
    );
    assert_never_fits(
        s.submit(vec![task(json!({})), big]).await,
        1,
        "executionConfig.resourceRequirements.cpu",
    );
    let page = s
        .list(&taskexec_store::ListQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("list");
    assert!(page.items.is_empty(), "the batch is all or nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_submissions() {
    let f = Fixture::new([Step::BlockUntilCancelled]);
    let engine = Arc::new(Engine::new(
        EngineConfig::default(),
        Catalogue::builtin(),
        Arc::clone(&f.runner) as _,
        Arc::new(ManualClock::new(0.5)),
    ));
    let mut config = ServiceConfig::new(
        "node-a",
        Capacity {
            cpu_millis: 1000,
            memory_bytes: 1 << 30,
        },
    );
    config.max_queued = 2;
    config.workers = 1;
    let s = Service::start(engine, f.store().await, config)
        .await
        .expect("start");
    let first = s.submit(vec![task(json!({}))]).await.expect("first");
    f.runner.started.notified().await;
    s.submit(vec![task(json!({})), task(json!({}))])
        .await
        .expect("two queued fit");
    match s.submit(vec![task(json!({}))]).await {
        Err(SubmitError::QueueFull { retry_after }) => assert!(retry_after > Duration::ZERO),
        other => panic!("expected QueueFull, got {other:?}"),
    }
    s.cancel(first[0].id()).await.expect("cancel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_idempotency_key_returns_the_same_task_and_runs_once() {
    let f = Fixture::new([Step::Exit(0, "1"), Step::Exit(0, "2")]);
    let s = f.service(2000, 2).await;
    let a = s
        .submit(vec![task(json!({"idempotencyKey": "k-1"}))])
        .await
        .expect("a");
    let b = s
        .submit(vec![task(json!({"idempotencyKey": "k-1"}))])
        .await
        .expect("b");
    assert_eq!(a[0].id(), b[0].id());
    assert!(matches!(b[0], Submitted::Existing { .. }));
    wait(&s, a[0].id()).await;
    s.flush().await;
    assert_eq!(f.runner.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_works_on_queued_and_running_tasks() {
    let f = Fixture::new([Step::BlockUntilCancelled]);
    let s = f.service(1000, 1).await;
    let ids = s
        .submit(vec![task(json!({})), task(json!({}))])
        .await
        .expect("submit");
    f.runner.started.notified().await;
    // The second waits for the single worker: cancelled while queued.
    assert_eq!(
        s.cancel(ids[1].id()).await.expect("cancel"),
        CancelOutcome::CancelledQueued
    );
    let queued = wait(&s, ids[1].id()).await;
    assert_eq!(queued.status, TaskStatus::Cancelled);
    assert!(queued.attempts.is_empty(), "it never ran");
    // The first is running: its sandbox is killed.
    assert!(matches!(
        s.cancel(ids[0].id()).await.expect("cancel"),
        CancelOutcome::Requested { .. }
    ));
    let running = wait(&s, ids[0].id()).await;
    assert_eq!(running.status, TaskStatus::Cancelled);
    assert_eq!(
        running
            .result
            .expect("result")
            .error
            .expect("error")
            .error_type,
        ErrorType::Cancelled
    );
    assert_eq!(
        s.cancel(ids[0].id()).await.expect("cancel"),
        CancelOutcome::AlreadyFinal(TaskStatus::Cancelled)
    );
    assert_eq!(f.runner.calls.load(Ordering::SeqCst), 1);
}

/// A previous life of node-a claimed task `id` and died while running it.
async fn left_running(f: &Fixture, id: &str) {
    let store = f.store().await;
    let t = {
        let mut t = task(json!({}));
        t.id = id.into();
        t
    };
    let received = TransitionRecord {
        from: None,
        to: TaskStatus::Received,
        at: OffsetDateTime::now_utc(),
        attempt: 0,
        reason: "received".into(),
    };
    store
        .submit(
            vec![NewTask {
                task: t,
                runtime: "python".into(),
                cpu_millis: 1000,
                memory_bytes: 64 << 20,
                received,
                idempotency_scope: String::new(),
                request_hash: None,
            }],
            100,
        )
        .await
        .expect("submit");
    let claimed = store
        .claim(
            "node-a",
            Capacity {
                cpu_millis: 1000,
                memory_bytes: 1 << 30,
            },
            1,
            OffsetDateTime::now_utc(),
            Duration::from_secs(30),
        )
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_recovers_tasks_left_running_and_retries_them() {
    let f = Fixture::new([Step::Exit(0, "\"after restart\"")]);
    left_running(&f, "crashed-1").await;

    let s = f.service(2000, 2).await;
    let rec = wait(&s, "crashed-1").await;
    assert_eq!(rec.status, TaskStatus::Completed, "{:?}", rec.result);
    assert_eq!(rec.attempts.len(), 2);
    let lost = rec.attempts[0]
        .error
        .as_ref()
        .expect("the interrupted attempt is recorded");
    assert_eq!(
        (lost.error_type, lost.message.as_str()),
        (ErrorType::Internal, "executor restarted")
    );
    assert_eq!(
        f.runner.calls.load(Ordering::SeqCst),
        1,
        "ran once, after the restart"
    );
}

/// An attempt interrupted by the restart of its only node counts as lost
/// with it: a task that kills its executor every time is quarantined on one
/// node as across several, instead of a crash loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_whose_attempts_die_with_their_node_is_quarantined_at_restart() {
    let f = Fixture::new([Step::Exit(0, "\"never runs\"")]);
    left_running(&f, "poison-1").await;

    let s = f.service_with(2000, 2, |c| c.quarantine_after = 1).await;
    let rec = wait(&s, "poison-1").await;
    assert_eq!(rec.status, TaskStatus::Failed, "{:?}", rec.result);
    let error = rec
        .result
        .as_ref()
        .and_then(|r| r.error.as_ref())
        .expect("error");
    assert_eq!(
        error.message,
        taskexec_service::quarantined_error(1).message,
        "{error:?}"
    );
    assert_eq!(f.runner.calls.load(Ordering::SeqCst), 0, "never run again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_cancels_what_outlives_the_grace_period() {
    let f = Fixture::new([Step::BlockUntilCancelled]);
    let s = f.service(1000, 1).await;
    let ids = s.submit(vec![task(json!({}))]).await.expect("submit");
    f.runner.started.notified().await;
    s.shutdown(Duration::from_millis(100)).await;
    let rec = s.get(ids[0].id()).await.expect("get").expect("exists");
    assert_eq!(rec.status, TaskStatus::Cancelled);
    assert!(s.ready().await.is_err(), "a stopping service is not ready");
}

/// Adaptive concurrency up to `max`, judged on windows of 4 starts with no
/// minimum duration and without the host's memory: the limit then depends
/// only on the start latencies the scripted runner reports, not on time.
fn latency_only(max: Option<usize>) -> impl FnOnce(&mut ServiceConfig) {
    move |c| {
        c.concurrency = Some(ConcurrencyConfig {
            max,
            memory_signal: false,
            window_samples: 4,
            window_min: Duration::ZERO,
            ..ConcurrencyConfig::default()
        })
    }
}

/// Submits `n` tasks and waits until every one has completed.
async fn run_all(s: &Service, n: usize) {
    let ids = s
        .submit((0..n).map(|_| task(json!({}))).collect())
        .await
        .expect("submit");
    for id in &ids {
        assert_eq!(wait(s, id.id()).await.status, TaskStatus::Completed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_in_flight_never_exceed_the_concurrency_limit() {
    let f = Fixture::new((0..12).map(|_| Step::Sleep(20)));
    // Eight worker slots and CPU for eight tasks, but a limit of at most 2.
    let s = f.service_with(8000, 8, latency_only(Some(2))).await;
    assert_eq!(s.concurrency_limit(), 2);
    run_all(&s, 12).await;
    assert!(f.runner.max_running.load(Ordering::SeqCst) <= 2);
    assert_eq!(s.concurrency_limit(), 2, "never above its maximum");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_sandbox_starts_lower_the_concurrency_limit_and_fast_ones_raise_it() {
    let reported_setup_ms = [10; 8].into_iter().chain([100; 16]).chain([10; 8]);
    let f = Fixture::new(reported_setup_ms.map(Step::StartTook));
    let s = f.service_with(4000, 4, latency_only(None)).await;
    let max_running = || f.runner.max_running.swap(0, Ordering::SeqCst) as usize;
    assert_eq!(s.concurrency_limit(), 4, "one per core, and 4 workers");
    // Starts of 10 ms: the baseline.
    run_all(&s, 8).await;
    assert_eq!(s.concurrency_limit(), 4);
    max_running();
    // Starts ten times slower: the limit drops, and no more tasks run at
    // once than it allows.
    run_all(&s, 8).await;
    let lowered = s.concurrency_limit();
    assert!(lowered < 4, "limit {lowered}");
    max_running();
    run_all(&s, 8).await;
    let lowest = s.concurrency_limit();
    assert!(lowest <= lowered, "{lowest} <= {lowered}");
    assert!(max_running() <= lowered);
    // Fast starts again: the limit grows back, one per window.
    run_all(&s, 8).await;
    let recovered = s.concurrency_limit();
    assert!(recovered > lowest, "{recovered} > {lowest}");
    assert!(max_running() <= lowest + 1);
}

/// Waits for the in-process event saying task `id` runs.
async fn running_event(events: &mut tokio::sync::broadcast::Receiver<TaskEvent>, id: &str) {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let e = events.recv().await.expect("event stream");
            if e.id == id && e.status == TaskStatus::Running {
                return;
            }
        }
    })
    .await
    .expect("the task started");
}

/// Transitions nobody waits for linger (`write_linger`): while a task
/// shorter than the linger runs, the store does not show its start, which
/// is stored with its end; without a linger the start is stored while it
/// runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_transitions_linger_until_a_short_task_ends() {
    use TaskStatus::*;
    let f = Fixture::new([Step::Sleep(3_000)]);
    let s = f
        .service_with(2000, 2, |c| c.write_linger = Duration::from_secs(60))
        .await;
    let mut events = s.subscribe();
    let ids = s.submit(vec![task(json!({}))]).await.expect("submit");
    let id = ids[0].id().to_owned();
    running_event(&mut events, &id).await;
    // For a second of its run (time enough for an unlingering write), the
    // store still shows the task as received.
    let until = tokio::time::Instant::now() + Duration::from_secs(1);
    while tokio::time::Instant::now() < until {
        let rec = s.get(&id).await.expect("get").expect("task");
        if rec.status.is_final() {
            break;
        }
        assert_eq!(rec.status, Received, "{:?}", states(&rec));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rec = wait(&s, &id).await;
    assert_eq!(states(&rec), vec![Received, Preparing, Running, Completed]);

    let f = Fixture::new([Step::Sleep(10_000)]);
    let s = f
        .service_with(2000, 2, |c| c.write_linger = Duration::ZERO)
        .await;
    let mut events = s.subscribe();
    let ids = s.submit(vec![task(json!({}))]).await.expect("submit");
    let id = ids[0].id().to_owned();
    running_event(&mut events, &id).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    loop {
        let rec = s.get(&id).await.expect("get").expect("task");
        assert!(!rec.status.is_final(), "ended before its start was stored");
        if rec.status == Running {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the start was not stored while the task ran: {:?}",
            states(&rec)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.cancel(&id).await.expect("cancel");
}

/// Admission holds, besides a task's memory limit, what the executor may
/// spend on its output (seven times outputBytes, with no schema): two
/// tasks whose limits fit the node together but whose outputs do not run
/// one at a time, and one whose output alone could not fit is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_executor_memory_for_large_outputs_is_admitted_against_the_node() {
    let f = Fixture::new([Step::Sleep(50), Step::Sleep(50)]);
    // 64Mi + 7 x 32Mi = 288Mi each: one fits in 400Mi, two do not.
    let s = f
        .service_with(4000, 4, |c| c.capacity.memory_bytes = 400 << 20)
        .await;
    let big = || {
        task(json!({"executionConfig": {"runtime": "python",
            "resourceRequirements": {"cpu": "1", "memory": "64Mi", "outputBytes": "32Mi"}}}))
    };
    let ids = s.submit(vec![big(), big()]).await.expect("submit");
    for id in &ids {
        assert_eq!(wait(&s, id.id()).await.status, TaskStatus::Completed);
    }
    assert_eq!(f.runner.max_running.load(Ordering::SeqCst), 1);
    let huge = task(json!({"executionConfig": {"runtime": "python",
        "resourceRequirements": {"cpu": "1", "memory": "64Mi", "outputBytes": "64Mi"}}}));
    let message = assert_never_fits(
        s.submit(vec![huge]).await,
        0,
        "executionConfig.resourceRequirements.memory",
    );
    assert!(message.contains("memory for its output"), "{message}");
}
