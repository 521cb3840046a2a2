//! Backend-independent conformance suite of [`TaskStore`].
//!
//! Each behaviour is one `pub async fn` taking a [`Harness`]: a fresh, empty
//! database that can be opened more than once (to simulate a crash or a
//! restart). A backend's test file implements [`Harness`] and expands
//! [`conformance_suite!`] to get one `#[tokio::test]` per behaviour:
//!
//! ```ignore
//! mod conformance;
//! conformance::conformance_suite!(MyHarness::new().await);
//! ```
//!
//! Tests use a fixed clock (`at(seconds)` after [`T0`]) and never sleep.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use taskexec_model::{
    AttemptRecord, ErrorType, TaskError, TaskInstance, TaskResult, TaskStatus, TransitionRecord,
};
use taskexec_store::{
    CancelOutcome, Capacity, ClaimRequest, ClaimedTask, ListQuery, NewTask, QueueStats, StoreError,
    Submitted, TaskProgress, TaskStore, Write,
};
use time::OffsetDateTime;
use time::macros::datetime;

use TaskStatus::{Cancelled, Completed, Failed, Preparing, Received, Running};

/// A fresh database for one test.
#[async_trait]
pub trait Harness: Send + Sync {
    /// Opens (and migrates) the harness's database: every call opens the
    /// same database again, as a restarted process would.
    async fn open(&self) -> Box<dyn TaskStore>;
}

/// Expands to one `#[tokio::test]` per conformance behaviour, each on the
/// harness that `$harness` (an expression, evaluated per test, may use
/// `.await`) builds.
macro_rules! conformance_suite {
    ($harness:expr) => {
        $crate::conformance::conformance_suite!(@tests $harness;
            submit_then_get_round_trips,
            idempotent_across_submissions,
            idempotent_within_a_batch,
            an_idempotency_key_with_another_request_conflicts,
            idempotency_keys_are_scoped,
            queue_full_is_atomic,
            claim_by_priority_then_fifo,
            submit_and_claim_claims_as_a_claim_after_the_submission_would,
            claim_respects_capacity,
            claim_respects_run_after,
            concurrent_claimers_never_share,
            apply_writes_are_visible,
            progress_follows_the_record,
            apply_fences_stale_attempts,
            final_tasks_never_change,
            final_transition_then_finish,
            list_filters_newest_first,
            list_pagination,
            cancel_queued,
            cancel_claimed,
            cancel_final_and_missing,
            claimed_by_after_crash,
            recovery_counts_each_attempt_once,
            take_over_expired_once,
            take_over_skips_live_leases,
            take_over_skips_queued_and_final,
            take_over_concurrently_never_shares,
            take_over_names_the_node_that_ran_the_attempt,
            lost_attempts_count_each_attempt_once,
            a_former_holder_writes_nothing,
            a_retried_batch_records_its_transitions_once,
            renew_and_ping,
            renew_answers_the_leases_still_held,
            a_cancel_that_won_ends_the_task_cancelled,
            a_requeue_after_a_cancel_request_is_ignored,
            cancel_and_completion_races_have_one_winner,
            stats_count_queued_and_running,
            reopen_keeps_everything,
        );
    };
    (@tests $harness:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let harness = $harness;
                $crate::conformance::$name(&harness).await;
            }
        )*
    };
}
pub(crate) use conformance_suite;

/// The fixed clock's origin.
pub const T0: OffsetDateTime = datetime!(2025-06-01 12:00 UTC);

/// A capacity every test task fits in, many times over.
pub const PLENTY: Capacity = Capacity {
    cpu_millis: 1 << 40,
    memory_bytes: 1 << 60,
};

/// The lease of test claims.
pub const LEASE: Duration = Duration::from_secs(30);

/// The migrations of `backend` (`sqlite` or `postgres`) that the store
/// embeds: the `.sql` files of its directory. Version numbers may have
/// gaps; the migrator applies each once, in version order.
pub fn migration_count(backend: &str) -> i64 {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("migrations")
        .join(backend);
    let files = std::fs::read_dir(&dir).expect("the migrations directory");
    let n = files
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "sql"))
        .count();
    i64::try_from(n).expect("a few migrations")
}

/// `T0 + secs` seconds.
pub fn at(secs: i64) -> OffsetDateTime {
    T0 + time::Duration::seconds(secs)
}

/// A task `id` (python, 100m CPU, 64 MiB) received at `T0`.
pub fn new_task(id: &str) -> NewTask {
    let task: TaskInstance = serde_json::from_value(json!({
        "id": id,
        "definition": {"runtime": "python", "code": "print('hi')"},
        "input": {"n": 1, "x": [1.5, "two", null]},
        "executionConfig": {"resourceRequirements": {"cpu": "100m", "memory": "64Mi", "timeoutSeconds": 2.5}},
    }))
    .expect("a valid task");
    NewTask {
        task,
        runtime: "python".to_owned(),
        cpu_millis: 100,
        memory_bytes: 64 << 20,
        received: TransitionRecord {
            from: None,
            to: Received,
            at: T0,
            attempt: 0,
            reason: "received".to_owned(),
        },
        idempotency_scope: String::new(),
        request_hash: None,
    }
}

/// [`new_task`] with a priority.
pub fn prio_task(id: &str, priority: i32) -> NewTask {
    let mut t = new_task(id);
    t.task.priority = priority;
    t
}

/// [`new_task`] with an idempotency key.
pub fn keyed_task(id: &str, key: &str) -> NewTask {
    let mut t = new_task(id);
    t.task.idempotency_key = Some(key.to_owned());
    t
}

/// [`keyed_task`] with a request digest and a key scope.
pub fn hashed_task(id: &str, key: &str, hash: &str, scope: &str) -> NewTask {
    let mut t = keyed_task(id, key);
    t.request_hash = Some(hash.to_owned());
    t.idempotency_scope = scope.to_owned();
    t
}

/// [`new_task`] with resource requests.
pub fn sized_task(id: &str, cpu_millis: u32, memory_bytes: u64) -> NewTask {
    let mut t = new_task(id);
    t.cpu_millis = cpu_millis;
    t.memory_bytes = memory_bytes;
    t
}

/// A transition record.
pub fn record(
    from: TaskStatus,
    to: TaskStatus,
    at: OffsetDateTime,
    attempt: u32,
) -> TransitionRecord {
    TransitionRecord {
        from: Some(from),
        to,
        at,
        attempt,
        reason: format!("{from} to {to}"),
    }
}

/// A [`Write::Transition`].
pub fn transition(
    id: &str,
    attempt: u32,
    from: TaskStatus,
    to: TaskStatus,
    when: OffsetDateTime,
) -> Write {
    Write::Transition {
        id: id.to_owned(),
        attempt,
        record: record(from, to, when, attempt),
    }
}

/// An attempt record.
pub fn attempt_record(attempt: u32, status: TaskStatus, end: OffsetDateTime) -> AttemptRecord {
    AttemptRecord {
        attempt,
        status,
        error: (status != Completed).then(|| TaskError::new(ErrorType::RuntimeError, "exit 1")),
        start_time: T0,
        end_time: end,
        duration_ms: 12.5,
        exit_code: Some(i32::from(status != Completed)),
        signal: None,
        stderr_tail: "boom".to_owned(),
        phases: Default::default(),
    }
}

/// A [`Write::AttemptDone`].
pub fn attempt_done(id: &str, attempt: u32, status: TaskStatus, end: OffsetDateTime) -> Write {
    Write::AttemptDone {
        id: id.to_owned(),
        record: attempt_record(attempt, status, end),
    }
}

/// A final result.
pub fn result(id: &str, status: TaskStatus, end: OffsetDateTime) -> TaskResult {
    let mut r = TaskResult::new(id, status);
    if status == Completed {
        r.output = json!({"answer": 42}).into();
    } else {
        r.error = Some(TaskError::new(ErrorType::RuntimeError, "exit 1"));
    }
    r.stdout = "hi\n".to_owned();
    r.execution_metadata.end_time = Some(end);
    r
}

/// A [`Write::Finish`].
pub fn finish(id: &str, attempt: u32, status: TaskStatus, end: OffsetDateTime) -> Write {
    Write::Finish {
        id: id.to_owned(),
        attempt,
        result: result(id, status, end),
    }
}

/// A [`Write::Requeue`].
pub fn requeue(id: &str, attempt: u32, run_after: OffsetDateTime) -> Write {
    Write::Requeue {
        id: id.to_owned(),
        attempt,
        run_after,
    }
}

/// Ids of claimed tasks, in order.
pub fn ids(claimed: &[ClaimedTask]) -> Vec<String> {
    claimed.iter().map(|c| c.record.task.id.clone()).collect()
}

/// Submits `tasks` with room for a thousand queued tasks.
pub async fn submit(store: &dyn TaskStore, tasks: Vec<NewTask>) -> Vec<Submitted> {
    store.submit(tasks, 1000).await.expect("submit")
}

/// Claims up to `limit` tasks for `node` at `now` with plenty of capacity.
pub async fn claim(
    store: &dyn TaskStore,
    node: &str,
    limit: usize,
    now: OffsetDateTime,
) -> Vec<ClaimedTask> {
    store
        .claim(node, PLENTY, limit, now, LEASE)
        .await
        .expect("claim")
}

/// Applies `writes`.
pub async fn apply(store: &dyn TaskStore, writes: Vec<Write>) {
    store.apply(writes).await.expect("apply");
}

/// The stored record of `id`, which must exist.
pub async fn get(store: &dyn TaskStore, id: &str) -> taskexec_store::TaskRecord {
    store
        .get(id)
        .await
        .expect("get")
        .unwrap_or_else(|| panic!("task {id} missing"))
}

/// Ids of a whole listing, following cursors with pages of `limit`.
pub async fn list_all(store: &dyn TaskStore, mut query: ListQuery) -> (Vec<String>, usize) {
    let mut out = Vec::new();
    let mut pages = 0;
    loop {
        let page = store.list(&query).await.expect("list");
        pages += 1;
        assert!(pages < 1000, "pagination does not end");
        out.extend(page.items.into_iter().map(|s| s.id));
        match page.next_cursor {
            Some(cursor) => query.cursor = Some(cursor),
            None => return (out, pages),
        }
    }
}

/// Submit, then get: the task, its RECEIVED event and the bookkeeping
/// fields come back as stored.
pub async fn submit_then_get_round_trips(h: &dyn Harness) {
    let store = h.open().await;
    let mut t = prio_task("t1", 7);
    t.task.workflow_instance_id = Some("wf".to_owned());
    t.task.idempotency_key = Some("k1".to_owned());
    t.runtime = "node".to_owned();
    t.received.at = datetime!(2025-06-01 12:00:00.123 UTC);
    let out = submit(&*store, vec![t.clone()]).await;
    assert_eq!(
        out,
        vec![Submitted::Created {
            id: "t1".to_owned()
        }]
    );
    assert_eq!(out[0].id(), "t1");

    let rec = get(&*store, "t1").await;
    assert_eq!(rec.task, t.task);
    assert_eq!(rec.status, Received);
    assert_eq!(rec.attempt, 0);
    assert_eq!(rec.runtime, "node");
    assert!(rec.queued);
    assert_eq!(rec.node, None);
    assert_eq!(rec.submitted_at, t.received.at);
    assert_eq!(rec.updated_at, t.received.at);
    assert!(!rec.cancel_requested);
    assert_eq!(rec.history, vec![t.received.clone()]);
    assert!(rec.attempts.is_empty());
    assert_eq!(rec.result, None);

    assert_eq!(store.get("nope").await.expect("get"), None);
    store.ping().await.expect("ping");
}

/// The same idempotency key twice: one task, the first id.
pub async fn idempotent_across_submissions(h: &dyn Harness) {
    let store = h.open().await;
    let first = submit(&*store, vec![keyed_task("a", "key")]).await;
    assert_eq!(first, vec![Submitted::Created { id: "a".to_owned() }]);
    let again = submit(&*store, vec![keyed_task("b", "key")]).await;
    assert_eq!(again, vec![Submitted::Existing { id: "a".to_owned() }]);
    assert_eq!(again[0].id(), "a");
    assert_eq!(store.get("b").await.expect("get"), None);
    // A different key, and no key at all, are new tasks.
    let other = submit(
        &*store,
        vec![keyed_task("c", "other"), new_task("d"), new_task("e")],
    )
    .await;
    assert_eq!(
        other,
        vec![
            Submitted::Created { id: "c".to_owned() },
            Submitted::Created { id: "d".to_owned() },
            Submitted::Created { id: "e".to_owned() },
        ]
    );
    let (all, _) = list_all(&*store, ListQuery::default()).await;
    assert_eq!(all, vec!["e", "d", "c", "a"]);
    // Still deduplicated once the first task is claimed and finished.
    claim(&*store, "n1", 10, T0).await;
    apply(&*store, vec![finish("a", 1, Completed, at(1))]).await;
    let late = submit(&*store, vec![keyed_task("f", "key")]).await;
    assert_eq!(late, vec![Submitted::Existing { id: "a".to_owned() }]);
    assert_eq!(store.get("f").await.expect("get"), None);
}

/// Within one batch, the second task with a key gets the first one's id.
pub async fn idempotent_within_a_batch(h: &dyn Harness) {
    let store = h.open().await;
    let out = submit(
        &*store,
        vec![
            keyed_task("a", "k"),
            keyed_task("b", "k"),
            new_task("c"),
            keyed_task("d", "k2"),
            keyed_task("e", "k2"),
        ],
    )
    .await;
    assert_eq!(
        out,
        vec![
            Submitted::Created { id: "a".to_owned() },
            Submitted::Existing { id: "a".to_owned() },
            Submitted::Created { id: "c".to_owned() },
            Submitted::Created { id: "d".to_owned() },
            Submitted::Existing { id: "d".to_owned() },
        ]
    );
    for missing in ["b", "e"] {
        assert_eq!(store.get(missing).await.expect("get"), None, "{missing}");
    }
    assert_eq!(store.stats().await.expect("stats").queued, 3);
}

/// The same key with the same request digest answers the first task; with
/// another digest the submission fails as a whole, naming the task and the
/// key's task; a task stored without a digest matches any.
pub async fn an_idempotency_key_with_another_request_conflicts(h: &dyn Harness) {
    let store = h.open().await;
    let first = submit(&*store, vec![hashed_task("a", "key", "h1", "")]).await;
    assert_eq!(first, vec![Submitted::Created { id: "a".to_owned() }]);
    let same = submit(&*store, vec![hashed_task("b", "key", "h1", "")]).await;
    assert_eq!(same, vec![Submitted::Existing { id: "a".to_owned() }]);
    let conflict = |r: Result<Vec<Submitted>, StoreError>| match r {
        Err(StoreError::IdempotencyConflict {
            index,
            key,
            existing,
        }) => (index, key, existing),
        other => panic!("expected an idempotency conflict, got {other:?}"),
    };
    let other = store
        .submit(vec![new_task("c"), hashed_task("d", "key", "h2", "")], 1000)
        .await;
    assert_eq!(conflict(other), (1, "key".to_owned(), "a".to_owned()));
    // Nothing of the refused submission is stored.
    assert_eq!(store.get("c").await.expect("get"), None);
    assert_eq!(store.get("d").await.expect("get"), None);
    // Within one batch too.
    let batch = store
        .submit(
            vec![
                hashed_task("e", "k2", "h1", ""),
                hashed_task("f", "k2", "h2", ""),
            ],
            1000,
        )
        .await;
    assert_eq!(conflict(batch), (1, "k2".to_owned(), "e".to_owned()));
    assert_eq!(store.get("e").await.expect("get"), None);
    // A task stored without a digest (as before digests existed) matches.
    submit(&*store, vec![keyed_task("g", "k3")]).await;
    let legacy = submit(&*store, vec![hashed_task("h", "k3", "h9", "")]).await;
    assert_eq!(legacy, vec![Submitted::Existing { id: "g".to_owned() }]);
    assert_eq!(store.stats().await.expect("stats").queued, 2);
}

/// A key is deduplicated only within its scope: the same key in another
/// scope is another task, and a conflict in one scope is none in another.
pub async fn idempotency_keys_are_scoped(h: &dyn Harness) {
    let store = h.open().await;
    let out = submit(
        &*store,
        vec![
            hashed_task("a", "key", "h1", ""),
            hashed_task("b", "key", "h2", "cred-1"),
            hashed_task("c", "key", "h3", "cred-2"),
            hashed_task("d", "key", "h2", "cred-1"),
        ],
    )
    .await;
    assert_eq!(
        out,
        vec![
            Submitted::Created { id: "a".to_owned() },
            Submitted::Created { id: "b".to_owned() },
            Submitted::Created { id: "c".to_owned() },
            Submitted::Existing { id: "b".to_owned() },
        ]
    );
    let again = submit(
        &*store,
        vec![
            hashed_task("x", "key", "h3", "cred-2"),
            hashed_task("y", "key", "h1", ""),
        ],
    )
    .await;
    assert_eq!(
        again,
        vec![
            Submitted::Existing { id: "c".to_owned() },
            Submitted::Existing { id: "a".to_owned() },
        ]
    );
    // The task keeps the key as the client sent it.
    assert_eq!(
        get(&*store, "b").await.task.idempotency_key.as_deref(),
        Some("key")
    );
}

/// A batch that would overflow the queue stores nothing and reports the
/// depth; claimed tasks and duplicates do not count.
pub async fn queue_full_is_atomic(h: &dyn Harness) {
    let store = h.open().await;
    store
        .submit(vec![keyed_task("a", "ka"), new_task("b")], 3)
        .await
        .expect("fits");
    let err = store
        .submit(vec![new_task("c"), keyed_task("d", "kd")], 3)
        .await
        .expect_err("full");
    assert!(
        matches!(err, StoreError::QueueFull { depth: 2, max: 3 }),
        "{err:?}"
    );
    for id in ["c", "d"] {
        assert_eq!(store.get(id).await.expect("get"), None, "{id}");
    }
    assert_eq!(store.stats().await.expect("stats").queued, 2);
    // The failed batch's key was not recorded.
    let out = store
        .submit(vec![keyed_task("d", "kd")], 3)
        .await
        .expect("fits");
    assert_eq!(out, vec![Submitted::Created { id: "d".to_owned() }]);
    // Full now; a batch of duplicates only adds nothing and is accepted.
    let dup = store
        .submit(vec![keyed_task("x", "ka")], 3)
        .await
        .expect("duplicate only");
    assert_eq!(dup, vec![Submitted::Existing { id: "a".to_owned() }]);
    assert!(matches!(
        store.submit(vec![new_task("e")], 3).await,
        Err(StoreError::QueueFull { depth: 3, max: 3 })
    ));
    // A claimed task leaves the queue.
    assert_eq!(claim(&*store, "n1", 1, T0).await.len(), 1);
    store
        .submit(vec![new_task("e")], 3)
        .await
        .expect("room again");
    assert!(matches!(
        store.submit(vec![new_task("f")], 0).await,
        Err(StoreError::QueueFull { depth: 3, max: 0 })
    ));
}

/// Claims go by priority (high first), then submission order.
pub async fn claim_by_priority_then_fifo(h: &dyn Harness) {
    let store = h.open().await;
    let mut tasks = vec![
        prio_task("a", 0),
        prio_task("b", 5),
        prio_task("c", 0),
        prio_task("d", 5),
        prio_task("e", -3),
        prio_task("f", 1000),
    ];
    tasks[0].received.at = at(1);
    submit(&*store, tasks).await;
    let first = claim(&*store, "n1", 2, at(10)).await;
    assert_eq!(ids(&first), vec!["f", "b"]);
    let c = &first[1];
    assert_eq!(c.attempt, 1);
    assert_eq!(c.record.attempt, 0);
    assert_eq!(c.record.status, Received);
    assert_eq!(c.record.node.as_deref(), Some("n1"));
    assert!(!c.record.queued);
    assert_eq!(c.record.history.len(), 1);
    assert_eq!(c.queued_since, T0);
    assert_eq!(c.cpu_millis, 100);
    assert_eq!(c.memory_bytes, 64 << 20);
    assert_eq!(c.record.task, new_task("b").task.clone().with_priority(5));

    assert_eq!(ids(&claim(&*store, "n1", 2, at(10)).await), vec!["d", "a"]);
    let rest = claim(&*store, "n2", 10, at(10)).await;
    assert_eq!(ids(&rest), vec!["c", "e"]);
    assert!(claim(&*store, "n2", 10, at(10)).await.is_empty());
    assert!(
        store
            .claim("n2", PLENTY, 0, at(10), LEASE)
            .await
            .expect("claim")
            .is_empty()
    );

    let a = get(&*store, "a").await;
    assert_eq!(a.attempt, 1);
    assert_eq!(a.node.as_deref(), Some("n1"));
    assert!(!a.queued);
    assert_eq!(a.status, Received);
    assert_eq!(a.updated_at, at(10));
    assert_eq!(a.submitted_at, at(1));
}

/// `submit_and_claim` stores the tasks and claims what a claim right after
/// would: by priority then submission order, within the limit and the free
/// capacity; a full queue stores and claims nothing.
pub async fn submit_and_claim_claims_as_a_claim_after_the_submission_would(h: &dyn Harness) {
    let store = h.open().await;
    submit(&*store, vec![prio_task("a", 0), prio_task("b", 5)]).await;
    let request = |limit, free| ClaimRequest {
        node: "n1",
        free,
        limit,
        now: at(10),
        lease: LEASE,
    };
    let (submitted, claimed) = store
        .submit_and_claim(vec![prio_task("c", 0)], 1000, request(1, PLENTY))
        .await
        .expect("submit and claim");
    assert_eq!(submitted, vec![Submitted::Created { id: "c".into() }]);
    assert_eq!(ids(&claimed), vec!["b"], "older, higher priority first");
    assert_eq!(claimed[0].attempt, 1);
    assert_eq!(get(&*store, "b").await.node.as_deref(), Some("n1"));

    let (_, claimed) = store
        .submit_and_claim(vec![prio_task("d", 0)], 1000, request(2, PLENTY))
        .await
        .expect("submit and claim");
    assert_eq!(ids(&claimed), vec!["a", "c"]);
    assert!(get(&*store, "d").await.queued, "d stays queued");

    // No room: stored, not claimed.
    let none = Capacity {
        cpu_millis: 10,
        memory_bytes: 1 << 20,
    };
    let (submitted, claimed) = store
        .submit_and_claim(vec![prio_task("e", 9)], 1000, request(4, none))
        .await
        .expect("submit and claim");
    assert_eq!(submitted.len(), 1);
    assert!(claimed.is_empty());
    assert!(get(&*store, "e").await.queued);

    // A full queue: nothing stored, nothing claimed.
    let full = store
        .submit_and_claim(vec![prio_task("f", 0)], 2, request(4, PLENTY))
        .await;
    assert!(
        matches!(full, Err(StoreError::QueueFull { .. })),
        "{full:?}"
    );
    assert!(store.get("f").await.expect("get").is_none());
    assert!(get(&*store, "d").await.queued, "d still queued");
}

/// Small helper trait for building expected tasks.
trait WithPriority {
    /// The same task with `priority`.
    fn with_priority(self, priority: i32) -> Self;
}

impl WithPriority for TaskInstance {
    fn with_priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }
}

/// Claims skip tasks that do not fit in what is left of the free capacity.
pub async fn claim_respects_capacity(h: &dyn Harness) {
    let store = h.open().await;
    let gib = 1u64 << 30;
    submit(
        &*store,
        vec![
            sized_task("big-cpu", 4000, gib),
            sized_task("small-1", 400, gib / 4),
            sized_task("big-mem", 100, 8 * gib),
            sized_task("small-2", 400, gib / 4),
            sized_task("small-3", 400, gib / 4),
        ],
    )
    .await;
    let free = Capacity {
        cpu_millis: 1000,
        memory_bytes: gib,
    };
    // small-3 would exceed what is left after small-1 and small-2.
    let got = store.claim("n1", free, 10, T0, LEASE).await.expect("claim");
    assert_eq!(ids(&got), vec!["small-1", "small-2"]);
    // Nothing fits: nothing is claimed, nothing changes.
    let tight = Capacity {
        cpu_millis: 300,
        memory_bytes: gib,
    };
    assert!(
        store
            .claim("n1", tight, 10, T0, LEASE)
            .await
            .expect("claim")
            .is_empty()
    );
    let none = Capacity {
        cpu_millis: 0,
        memory_bytes: 0,
    };
    assert!(
        store
            .claim("n1", none, 10, T0, LEASE)
            .await
            .expect("claim")
            .is_empty()
    );
    assert_eq!(get(&*store, "small-3").await.attempt, 0);
    assert_eq!(
        store.stats().await.expect("stats"),
        QueueStats {
            queued: 3,
            running: 2
        }
    );
    // Memory counts too.
    let mem = Capacity {
        cpu_millis: 100_000,
        memory_bytes: gib / 2,
    };
    assert_eq!(
        ids(&store.claim("n1", mem, 10, T0, LEASE).await.expect("claim")),
        vec!["small-3"]
    );
    let rest = claim(&*store, "n2", 10, T0).await;
    assert_eq!(ids(&rest), vec!["big-cpu", "big-mem"]);
}

/// A requeued task is not claimable before its `run_after`, and is after.
pub async fn claim_respects_run_after(h: &dyn Harness) {
    let store = h.open().await;
    submit(&*store, vec![new_task("a")]).await;
    let got = claim(&*store, "n1", 1, at(1)).await;
    assert_eq!(got[0].attempt, 1);
    apply(
        &*store,
        vec![
            transition("a", 1, Received, Preparing, at(2)),
            transition("a", 1, Preparing, Running, at(3)),
            attempt_done("a", 1, Failed, at(4)),
            transition("a", 1, Running, Preparing, at(4)),
            requeue("a", 1, at(60)),
        ],
    )
    .await;
    let rec = get(&*store, "a").await;
    assert!(rec.queued);
    assert_eq!(rec.node, None);
    assert_eq!(rec.status, Preparing);
    assert_eq!(rec.attempt, 1);
    assert_eq!(
        store.stats().await.expect("stats"),
        QueueStats {
            queued: 1,
            running: 0
        }
    );
    assert!(claim(&*store, "n1", 1, at(59)).await.is_empty());
    let again = claim(&*store, "n2", 1, at(60)).await;
    assert_eq!(ids(&again), vec!["a"]);
    let c = &again[0];
    assert_eq!(c.attempt, 2);
    assert_eq!(c.record.attempt, 1);
    assert_eq!(c.queued_since, at(60));
    assert_eq!(c.record.status, Preparing);
    assert_eq!(c.record.attempts, vec![attempt_record(1, Failed, at(4))]);
    assert_eq!(c.record.history.len(), 4);
    assert_eq!(get(&*store, "a").await.node.as_deref(), Some("n2"));
}

/// Four claimers racing over 200 tasks never get the same task and together
/// get all of them.
pub async fn concurrent_claimers_never_share(h: &dyn Harness) {
    let store: Arc<dyn TaskStore> = Arc::from(h.open().await);
    for batch in 0..4 {
        let tasks = (0..50)
            .map(|i| new_task(&format!("t{:03}", batch * 50 + i)))
            .collect();
        store.submit(tasks, 1000).await.expect("submit");
    }
    let mut workers = Vec::new();
    for w in 0..4 {
        let store = Arc::clone(&store);
        workers.push(tokio::spawn(async move {
            let node = format!("node-{w}");
            let mut got = Vec::new();
            loop {
                let claimed = store
                    .claim(&node, PLENTY, 3, T0, LEASE)
                    .await
                    .expect("claim");
                if claimed.is_empty() {
                    return got;
                }
                for c in claimed {
                    assert_eq!(c.attempt, 1);
                    assert_eq!(c.record.node.as_deref(), Some(node.as_str()));
                    got.push(c.record.task.id);
                }
                tokio::task::yield_now().await;
            }
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.expect("claimer"));
    }
    let unique: HashSet<&String> = all.iter().collect();
    assert_eq!(all.len(), 200, "some task was claimed twice or never");
    assert_eq!(unique.len(), 200);
    assert_eq!(
        store.stats().await.expect("stats"),
        QueueStats {
            queued: 0,
            running: 200
        }
    );
    let mut by_nodes = 0;
    for w in 0..4 {
        by_nodes += store
            .claimed_by(&format!("node-{w}"))
            .await
            .expect("claimed_by")
            .len();
    }
    assert_eq!(by_nodes, 200);
}

/// `progress` answers what `get` does for the fields it has, at every
/// step of a task's life (queued, claimed, running, cancel requested,
/// final), and `None` for a missing task.
pub async fn progress_follows_the_record(h: &dyn Harness) {
    let store = h.open().await;
    let matches = |rec: &taskexec_store::TaskRecord, p: &TaskProgress| {
        assert_eq!(p.status, rec.status);
        assert_eq!(p.attempt, rec.attempt);
        assert_eq!(p.queued, rec.queued);
        assert_eq!(p.node, rec.node);
        assert_eq!(p.submitted_at, rec.submitted_at);
        assert_eq!(p.updated_at, rec.updated_at);
        assert_eq!(p.cancel_requested, rec.cancel_requested);
        assert_eq!(p.history, rec.history);
    };
    let progress = |id: &'static str| {
        let store = &store;
        async move {
            store
                .progress(id)
                .await
                .expect("progress")
                .expect("the task exists")
        }
    };
    submit(&*store, vec![new_task("a")]).await;
    let p = progress("a").await;
    assert_eq!((p.status, p.attempt, p.queued), (Received, 0, true));
    matches(&get(&*store, "a").await, &p);

    claim(&*store, "n1", 1, at(1)).await;
    apply(
        &*store,
        vec![
            transition("a", 1, Received, Preparing, at(2)),
            transition("a", 1, Preparing, Running, at(3)),
        ],
    )
    .await;
    let p = progress("a").await;
    assert_eq!((p.status, p.attempt, p.queued), (Running, 1, false));
    assert_eq!(p.node.as_deref(), Some("n1"));
    assert_eq!(p.history.len(), 3);
    matches(&get(&*store, "a").await, &p);

    store
        .request_cancel("a", record(Running, Cancelled, at(4), 1))
        .await
        .expect("cancel");
    let p = progress("a").await;
    assert!(p.cancel_requested);
    matches(&get(&*store, "a").await, &p);

    apply(
        &*store,
        vec![
            transition("a", 1, Running, Cancelled, at(5)),
            finish("a", 1, Cancelled, at(5)),
        ],
    )
    .await;
    let p = progress("a").await;
    assert_eq!(p.status, Cancelled);
    assert_eq!(p.updated_at, at(5));
    matches(&get(&*store, "a").await, &p);

    assert_eq!(store.progress("nope").await.expect("progress"), None);
}

/// Transition, AttemptDone, Requeue and Finish are visible in `get`.
pub async fn apply_writes_are_visible(h: &dyn Harness) {
    let store = h.open().await;
    submit(&*store, vec![new_task("a"), new_task("b")]).await;
    claim(&*store, "n1", 1, at(1)).await;
    apply(
        &*store,
        vec![
            transition("a", 1, Received, Preparing, at(2)),
            transition("a", 1, Preparing, Running, at(3)),
        ],
    )
    .await;
    let rec = get(&*store, "a").await;
    assert_eq!(rec.status, Running);
    assert_eq!(rec.updated_at, at(3));
    assert_eq!(
        rec.history[1..],
        [
            record(Received, Preparing, at(2), 1),
            record(Preparing, Running, at(3), 1)
        ]
    );
    assert_eq!(rec.history[0], new_task("a").received);

    apply(&*store, vec![attempt_done("a", 1, Failed, at(4))]).await;
    // The same attempt twice is recorded once.
    apply(&*store, vec![attempt_done("a", 1, Failed, at(5))]).await;
    let rec = get(&*store, "a").await;
    assert_eq!(rec.attempts, vec![attempt_record(1, Failed, at(4))]);

    apply(
        &*store,
        vec![
            transition("a", 1, Running, Preparing, at(5)),
            requeue("a", 1, at(10)),
        ],
    )
    .await;
    let rec = get(&*store, "a").await;
    assert!(rec.queued);
    assert_eq!(rec.node, None);
    assert_eq!(store.claimed_by("n1").await.expect("claimed_by"), vec![]);

    let again = claim(&*store, "n2", 1, at(10)).await;
    assert_eq!(ids(&again), vec!["a"]);
    apply(
        &*store,
        vec![
            transition("a", 2, Preparing, Running, at(11)),
            transition("a", 2, Running, Completed, at(12)),
            attempt_done("a", 2, Completed, at(12)),
            finish("a", 2, Completed, at(12)),
        ],
    )
    .await;
    let rec = get(&*store, "a").await;
    assert_eq!(rec.status, Completed);
    assert_eq!(rec.attempt, 2);
    assert!(!rec.queued);
    assert_eq!(rec.node, None);
    assert_eq!(rec.updated_at, at(12));
    assert_eq!(rec.history.len(), 6);
    assert_eq!(rec.history[5], record(Running, Completed, at(12), 2));
    assert_eq!(
        rec.attempts,
        vec![
            attempt_record(1, Failed, at(4)),
            attempt_record(2, Completed, at(12))
        ]
    );
    assert_eq!(rec.result, Some(result("a", Completed, at(12))));
    assert_eq!(store.claimed_by("n2").await.expect("claimed_by"), vec![]);
    // The other task was untouched.
    let b = get(&*store, "b").await;
    assert_eq!(b.history.len(), 1);
    assert!(b.queued);
    // An empty batch, and writes for unknown tasks, are fine.
    apply(&*store, vec![]).await;
    apply(&*store, vec![finish("ghost", 1, Completed, at(13))]).await;
    assert_eq!(store.get("ghost").await.expect("get"), None);
}

/// Writes of an attempt other than the current one are ignored, also inside
/// a batch that applies others.
pub async fn apply_fences_stale_attempts(h: &dyn Harness) {
    let store = h.open().await;
    submit(&*store, vec![new_task("a")]).await;
    claim(&*store, "n1", 1, at(1)).await;
    apply(
        &*store,
        vec![
            transition("a", 1, Received, Preparing, at(2)),
            requeue("a", 1, at(3)),
        ],
    )
    .await;
    // n1 is presumed gone; n2 takes attempt 2.
    assert_eq!(claim(&*store, "n2", 1, at(3)).await[0].attempt, 2);
    let before = get(&*store, "a").await;
    apply(
        &*store,
        vec![
            finish("a", 1, Failed, at(4)),
            transition("a", 1, Preparing, Running, at(4)),
            attempt_done("a", 1, Failed, at(4)),
            requeue("a", 1, at(4)),
            // Ahead of the task is stale too.
            transition("a", 3, Preparing, Running, at(4)),
        ],
    )
    .await;
    assert_eq!(get(&*store, "a").await, before);
    // A batch mixing stale and current writes applies the current ones.
    apply(
        &*store,
        vec![
            transition("a", 1, Preparing, Failed, at(5)),
            transition("a", 2, Preparing, Running, at(5)),
            finish("a", 1, Failed, at(5)),
            attempt_done("a", 2, Completed, at(6)),
            finish("a", 2, Completed, at(6)),
        ],
    )
    .await;
    let rec = get(&*store, "a").await;
    assert_eq!(rec.status, Completed);
    assert_eq!(
        rec.history.last(),
        Some(&record(Preparing, Running, at(5), 2))
    );
    assert_eq!(rec.history.len(), before.history.len() + 1);
    assert_eq!(rec.attempts, vec![attempt_record(2, Completed, at(6))]);
    assert_eq!(rec.result, Some(result("a", Completed, at(6))));
}

/// Once a task has its result, nothing changes it.
pub async fn final_tasks_never_change(h: &dyn Harness) {
    let store = h.open().await;
    submit(&*store, vec![new_task("a")]).await;
    claim(&*store, "n1", 1, at(1)).await;
    apply(&*store, vec![finish("a", 1, Failed, at(2))]).await;
    let done = get(&*store, "a").await;
    assert_eq!(done.status, Failed);
    apply(
        &*store,
        vec![
            transition("a", 1, Failed, Running, at(3)),
            attempt_done("a", 1, Failed, at(3)),
            requeue("a", 1, at(3)),
            finish("a", 1, Completed, at(3)),
            finish("a", 1, Failed, at(9)),
        ],
    )
    .await;
    assert_eq!(get(&*store, "a").await, done);
    assert!(claim(&*store, "n1", 1, at(10)).await.is_empty());
    assert_eq!(store.stats().await.expect("stats"), QueueStats::default());
}

/// A transition into a final status may come before the attempt record and
/// the result (in one batch or several); it blocks other transitions and a
/// result with another status.
pub async fn final_transition_then_finish(h: &dyn Harness) {
    let store = h.open().await;
    submit(&*store, vec![new_task("a"), new_task("b")]).await;
    claim(&*store, "n1", 2, at(1)).await;
    apply(
        &*store,
        vec![
            transition("a", 1, Received, Preparing, at(2)),
            transition("a", 1, Preparing, Failed, at(3)),
        ],
    )
    .await;
    let failed = get(&*store, "a").await;
    assert_eq!(failed.status, Failed);
    assert_eq!(failed.result, None);
    apply(
        &*store,
        vec![
            transition("a", 1, Failed, Running, at(4)),
            requeue("a", 1, at(4)),
            finish("a", 1, Completed, at(4)),
        ],
    )
    .await;
    assert_eq!(get(&*store, "a").await, failed);
    apply(
        &*store,
        vec![
            attempt_done("a", 1, Failed, at(3)),
            finish("a", 1, Failed, at(3)),
        ],
    )
    .await;
    let rec = get(&*store, "a").await;
    assert_eq!(rec.status, Failed);
    assert_eq!(rec.history.len(), 3);
    assert_eq!(rec.attempts, vec![attempt_record(1, Failed, at(3))]);
    assert_eq!(rec.result, Some(result("a", Failed, at(3))));
    assert_eq!(rec.node, None);

    // All in one batch.
    apply(
        &*store,
        vec![
            transition("b", 1, Received, Preparing, at(2)),
            transition("b", 1, Preparing, Running, at(3)),
            transition("b", 1, Running, Completed, at(4)),
            attempt_done("b", 1, Completed, at(4)),
            finish("b", 1, Completed, at(4)),
        ],
    )
    .await;
    let rec = get(&*store, "b").await;
    assert_eq!(rec.status, Completed);
    assert_eq!(rec.history.len(), 4);
    assert_eq!(rec.attempts.len(), 1);
    assert_eq!(rec.result, Some(result("b", Completed, at(4))));
    assert_eq!(store.stats().await.expect("stats"), QueueStats::default());
}

/// Listing filters (AND-ed), newest first, summary fields.
pub async fn list_filters_newest_first(h: &dyn Harness) {
    let store = h.open().await;
    let spec = [
        ("p1", "python", Some("w1")),
        ("n1", "node", Some("w1")),
        ("p2", "python", None),
        ("n2", "node", Some("w2")),
        ("p3", "python", Some("w2")),
        ("n3", "node", Some("w1")),
    ];
    let tasks = spec
        .iter()
        .enumerate()
        .map(|(i, (id, runtime, wf))| {
            let mut t = prio_task(id, i32::try_from(i).expect("small") - 2);
            t.runtime = (*runtime).to_owned();
            t.task.workflow_instance_id = wf.map(str::to_owned);
            t.received.at = at(i64::try_from(i).expect("small"));
            t
        })
        .collect();
    submit(&*store, tasks).await;
    let cancel = record(Received, Cancelled, at(20), 0);
    assert_eq!(
        store.request_cancel("n2", cancel).await.expect("cancel"),
        CancelOutcome::CancelledQueued
    );

    let page = store.list(&ListQuery::default()).await.expect("list");
    let all: Vec<&str> = page.items.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(all, vec!["n3", "p3", "n2", "p2", "n1", "p1"]);
    assert_eq!(page.next_cursor, None);
    let n1 = &page.items[4];
    assert_eq!(n1.status, Received);
    assert_eq!(n1.runtime, "node");
    assert_eq!(n1.workflow_instance_id.as_deref(), Some("w1"));
    assert_eq!(n1.priority, -1);
    assert_eq!(n1.attempt, 0);
    assert_eq!(n1.submitted_at, at(1));
    assert_eq!(n1.updated_at, at(1));
    let n2 = &page.items[2];
    assert_eq!(n2.status, Cancelled);
    assert_eq!(n2.updated_at, at(20));
    assert_eq!(n2.workflow_instance_id.as_deref(), Some("w2"));
    assert_eq!(page.items[3].workflow_instance_id, None);

    let ids_of = |q: ListQuery| {
        let store = &store;
        async move {
            let (ids, _) = list_all(&**store, q).await;
            ids
        }
    };
    assert_eq!(
        ids_of(ListQuery {
            status: Some(Cancelled),
            ..ListQuery::default()
        })
        .await,
        vec!["n2"]
    );
    assert_eq!(
        ids_of(ListQuery {
            status: Some(Received),
            ..ListQuery::default()
        })
        .await,
        vec!["n3", "p3", "p2", "n1", "p1"]
    );
    assert_eq!(
        ids_of(ListQuery {
            status: Some(Running),
            ..ListQuery::default()
        })
        .await,
        Vec::<String>::new()
    );
    assert_eq!(
        ids_of(ListQuery {
            runtime: Some("node".to_owned()),
            ..ListQuery::default()
        })
        .await,
        vec!["n3", "n2", "n1"]
    );
    assert_eq!(
        ids_of(ListQuery {
            workflow_instance_id: Some("w1".to_owned()),
            ..ListQuery::default()
        })
        .await,
        vec!["n3", "n1", "p1"]
    );
    assert_eq!(
        ids_of(ListQuery {
            runtime: Some("python".to_owned()),
            workflow_instance_id: Some("w2".to_owned()),
            ..ListQuery::default()
        })
        .await,
        vec!["p3"]
    );
    assert_eq!(
        ids_of(ListQuery {
            status: Some(Received),
            runtime: Some("node".to_owned()),
            workflow_instance_id: Some("w2".to_owned()),
            ..ListQuery::default()
        })
        .await,
        Vec::<String>::new()
    );
}

/// Cursor pagination visits every task once, newest first, also with a
/// filter and while new tasks arrive; a bad cursor is an error.
pub async fn list_pagination(h: &dyn Harness) {
    let store = h.open().await;
    let all: Vec<String> = (0..23).map(|i| format!("t{i:02}")).collect();
    let tasks = all
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let mut t = new_task(id);
            if i.is_multiple_of(3) {
                t.runtime = "node".to_owned();
            }
            t
        })
        .collect();
    submit(&*store, tasks).await;
    let newest_first: Vec<String> = all.iter().rev().cloned().collect();

    for (limit, pages) in [
        (5, 5),
        (1, 23),
        (22, 2),
        (23, 1),
        (500, 1),
        (0, 1),
        (100_000, 1),
    ] {
        let (got, n) = list_all(
            &*store,
            ListQuery {
                limit,
                ..ListQuery::default()
            },
        )
        .await;
        assert_eq!(got, newest_first, "limit {limit}");
        assert_eq!(n, pages, "limit {limit}");
    }
    let page = store
        .list(&ListQuery {
            limit: 5,
            ..ListQuery::default()
        })
        .await
        .expect("list");
    assert_eq!(page.items.len(), 5);
    assert!(page.next_cursor.is_some());

    let (node, _) = list_all(
        &*store,
        ListQuery {
            runtime: Some("node".to_owned()),
            limit: 2,
            ..ListQuery::default()
        },
    )
    .await;
    let expected: Vec<String> = newest_first
        .iter()
        .filter(|id| {
            let n: usize = id[1..].parse().expect("number");
            n.is_multiple_of(3)
        })
        .cloned()
        .collect();
    assert_eq!(node, expected);

    // Tasks submitted mid-way do not shift the pages being read.
    let first = store
        .list(&ListQuery {
            limit: 10,
            ..ListQuery::default()
        })
        .await
        .expect("list");
    submit(&*store, vec![new_task("late-1"), new_task("late-2")]).await;
    let (rest, _) = list_all(
        &*store,
        ListQuery {
            limit: 10,
            cursor: first.next_cursor.clone(),
            ..ListQuery::default()
        },
    )
    .await;
    let mut seen: Vec<String> = first.items.into_iter().map(|s| s.id).collect();
    seen.extend(rest);
    assert_eq!(seen, newest_first);

    for bad in ["", "not a cursor", "-5"] {
        let err = store
            .list(&ListQuery {
                cursor: Some(bad.to_owned()),
                ..ListQuery::default()
            })
            .await
            .expect_err("bad cursor");
        assert!(
            matches!(err, StoreError::BadCursor(ref c) if c == bad),
            "{err:?}"
        );
    }
}

/// Cancelling a queued task makes it CANCELLED with a result, at once.
pub async fn cancel_queued(h: &dyn Harness) {
    let store = h.open().await;
    submit(&*store, vec![new_task("a"), new_task("b")]).await;
    let rec = record(Received, Cancelled, at(5), 0);
    assert_eq!(
        store
            .request_cancel("a", rec.clone())
            .await
            .expect("cancel"),
        CancelOutcome::CancelledQueued
    );
    let a = get(&*store, "a").await;
    assert_eq!(a.status, Cancelled);
    assert!(!a.queued);
    assert!(a.cancel_requested);
    assert_eq!(a.node, None);
    assert_eq!(a.updated_at, at(5));
    assert_eq!(a.history, vec![new_task("a").received, rec.clone()]);
    let result = a.result.expect("a result");
    assert_eq!(result.task_id, "a");
    assert_eq!(result.status, Cancelled);
    assert_eq!(
        result.error.as_ref().map(|e| e.error_type),
        Some(ErrorType::Cancelled)
    );
    assert_eq!(result.history, a.history);
    // No longer claimable.
    assert_eq!(ids(&claim(&*store, "n1", 10, at(6)).await), vec!["b"]);
    assert_eq!(
        store.stats().await.expect("stats"),
        QueueStats {
            queued: 0,
            running: 1
        }
    );
    assert_eq!(
        store
            .cancel_requested(&["a".to_owned(), "b".to_owned()])
            .await
            .expect("cancel_requested"),
        vec!["a"]
    );
    assert_eq!(
        store.request_cancel("a", rec).await.expect("cancel"),
        CancelOutcome::AlreadyFinal(Cancelled)
    );

    // A retry waiting in the queue is cancelled the same way.
    apply(
        &*store,
        vec![
            transition("b", 1, Received, Preparing, at(7)),
            requeue("b", 1, at(100)),
        ],
    )
    .await;
    let rec_b = record(Preparing, Cancelled, at(8), 1);
    assert_eq!(
        store
            .request_cancel("b", rec_b.clone())
            .await
            .expect("cancel"),
        CancelOutcome::CancelledQueued
    );
    let b = get(&*store, "b").await;
    assert_eq!(b.status, Cancelled);
    assert_eq!(b.history.last(), Some(&rec_b));
    assert_eq!(b.result.map(|r| r.status), Some(Cancelled));
    assert!(claim(&*store, "n1", 10, at(100)).await.is_empty());
    // The late writes of the cancelled attempt are ignored.
    apply(&*store, vec![finish("b", 1, Failed, at(9))]).await;
    assert_eq!(get(&*store, "b").await.status, Cancelled);
}

/// Cancelling a claimed task records the request for its node to act on.
pub async fn cancel_claimed(h: &dyn Harness) {
    let store = h.open().await;
    submit(&*store, vec![new_task("a"), new_task("b")]).await;
    assert_eq!(ids(&claim(&*store, "n1", 1, at(1)).await), vec!["a"]);
    apply(
        &*store,
        vec![
            transition("a", 1, Received, Preparing, at(2)),
            transition("a", 1, Preparing, Running, at(3)),
        ],
    )
    .await;
    let rec = record(Running, Cancelled, at(4), 1);
    assert_eq!(
        store
            .request_cancel("a", rec.clone())
            .await
            .expect("cancel"),
        CancelOutcome::Requested {
            node: Some("n1".to_owned())
        }
    );
    let a = get(&*store, "a").await;
    assert!(a.cancel_requested);
    assert_eq!(a.status, Running);
    assert_eq!(a.history.len(), 3);
    assert_eq!(a.node.as_deref(), Some("n1"));
    let asked = ["a", "b", "missing"].map(str::to_owned);
    assert_eq!(
        store
            .cancel_requested(&asked)
            .await
            .expect("cancel_requested"),
        vec!["a"]
    );
    assert_eq!(
        store.cancel_requested(&[]).await.expect("cancel_requested"),
        Vec::<String>::new()
    );
    // Asking twice is fine.
    assert_eq!(
        store
            .request_cancel("a", rec.clone())
            .await
            .expect("cancel"),
        CancelOutcome::Requested {
            node: Some("n1".to_owned())
        }
    );
    // The node kills it and reports.
    apply(
        &*store,
        vec![
            Write::Transition {
                id: "a".to_owned(),
                attempt: 1,
                record: rec.clone(),
            },
            attempt_done("a", 1, Cancelled, at(5)),
            finish("a", 1, Cancelled, at(5)),
        ],
    )
    .await;
    let a = get(&*store, "a").await;
    assert_eq!(a.status, Cancelled);
    assert_eq!(a.node, None);
    assert_eq!(
        store.request_cancel("a", rec).await.expect("cancel"),
        CancelOutcome::AlreadyFinal(Cancelled)
    );
    assert_eq!(store.claimed_by("n1").await.expect("claimed_by"), vec![]);
}

/// Cancelling a final or unknown task does nothing.
pub async fn cancel_final_and_missing(h: &dyn Harness) {
    let store = h.open().await;
    submit(&*store, vec![new_task("a")]).await;
    claim(&*store, "n1", 1, at(1)).await;
    apply(&*store, vec![finish("a", 1, Completed, at(2))]).await;
    let before = get(&*store, "a").await;
    let rec = record(Completed, Cancelled, at(3), 1);
    assert_eq!(
        store
            .request_cancel("a", rec.clone())
            .await
            .expect("cancel"),
        CancelOutcome::AlreadyFinal(Completed)
    );
    assert_eq!(get(&*store, "a").await, before);
    assert!(
        store
            .cancel_requested(&["a".to_owned()])
            .await
            .expect("cancel_requested")
            .is_empty()
    );
    assert_eq!(
        store.request_cancel("missing", rec).await.expect("cancel"),
        CancelOutcome::NotFound
    );
    assert_eq!(store.get("missing").await.expect("get"), None);
}

/// After a crash of a node (the store dropped without a word), reopening
/// the database shows the tasks it had claimed, at the interrupted attempt.
/// Recovery after a restart counts each interrupted attempt as lost once,
/// however often it runs, and a later attempt lost again counts again.
pub async fn recovery_counts_each_attempt_once(h: &dyn Harness) {
    let store = h.open().await;
    submit(&*store, vec![new_task("a"), new_task("b")]).await;
    assert_eq!(ids(&claim(&*store, "n1", 1, at(1)).await), vec!["a"]);
    let lost = |c: &[ClaimedTask]| {
        c.iter()
            .map(|c| (c.record.task.id.clone(), c.attempt, c.lost_attempts))
            .collect::<Vec<_>>()
    };
    let first = store.recover_claimed("n1").await.expect("recover");
    assert_eq!(lost(&first), vec![("a".to_owned(), 1, 1)]);
    let again = store.recover_claimed("n1").await.expect("recover");
    assert_eq!(lost(&again), vec![("a".to_owned(), 1, 1)]);
    assert!(
        store
            .recover_claimed("n2")
            .await
            .expect("recover")
            .is_empty()
    );

    apply(&*store, vec![requeue("a", 1, at(2))]).await;
    assert!(
        store
            .recover_claimed("n1")
            .await
            .expect("recover")
            .is_empty()
    );
    assert_eq!(ids(&claim(&*store, "n1", 2, at(3)).await), vec!["a", "b"]);
    let second = store.recover_claimed("n1").await.expect("recover");
    assert_eq!(
        lost(&second),
        vec![("a".to_owned(), 2, 2), ("b".to_owned(), 1, 1)]
    );
}

pub async fn claimed_by_after_crash(h: &dyn Harness) {
    {
        let store = h.open().await;
        submit(
            &*store,
            vec![new_task("a"), new_task("b"), new_task("c"), new_task("d")],
        )
        .await;
        assert_eq!(ids(&claim(&*store, "n1", 2, at(1)).await), vec!["a", "b"]);
        assert_eq!(ids(&claim(&*store, "n2", 1, at(1)).await), vec!["c"]);
        apply(
            &*store,
            vec![
                transition("a", 1, Received, Preparing, at(2)),
                transition("a", 1, Preparing, Running, at(3)),
            ],
        )
        .await;
        drop(store);
    }
    let store = h.open().await;
    let claimed = store.claimed_by("n1").await.expect("claimed_by");
    assert_eq!(ids(&claimed), vec!["a", "b"]);
    let a = &claimed[0];
    assert_eq!(a.attempt, 1);
    assert_eq!(a.record.attempt, 1);
    assert_eq!(a.record.status, Running);
    assert_eq!(a.record.node.as_deref(), Some("n1"));
    assert_eq!(a.record.history.len(), 3);
    assert_eq!(a.queued_since, T0);
    assert_eq!(a.cpu_millis, 100);
    assert_eq!(a.memory_bytes, 64 << 20);
    assert_eq!(claimed[1].record.status, Received);
    assert_eq!(
        ids(&store.claimed_by("n2").await.expect("claimed_by")),
        vec!["c"]
    );
    assert!(store.claimed_by("n3").await.expect("claimed_by").is_empty());
    assert_eq!(
        store.stats().await.expect("stats"),
        QueueStats {
            queued: 1,
            running: 3
        }
    );

    // Recovery: a fails for good, b goes back to the queue.
    apply(
        &*store,
        vec![
            transition("a", 1, Running, Failed, at(10)),
            finish("a", 1, Failed, at(10)),
            requeue("b", 1, at(10)),
        ],
    )
    .await;
    assert!(store.claimed_by("n1").await.expect("claimed_by").is_empty());
    assert_eq!(
        store.stats().await.expect("stats"),
        QueueStats {
            queued: 2,
            running: 1
        }
    );
    assert_eq!(ids(&claim(&*store, "n1", 5, at(10)).await), vec!["b", "d"]);
}

/// Takes over the expired leases of any node for `node` at `now`.
pub async fn take_over(store: &dyn TaskStore, node: &str, now: OffsetDateTime) -> Vec<ClaimedTask> {
    store
        .take_over_expired(node, now, LEASE)
        .await
        .expect("take_over_expired")
}

/// A claimed task whose lease has expired is taken over once, at the
/// interrupted attempt, and is then leased to the new node; the former
/// node's renewals no longer count, its attempt's writes still do.
pub async fn take_over_expired_once(h: &dyn Harness) {
    let store = h.open().await;
    submit(
        &*store,
        vec![new_task("a"), new_task("b"), new_task("c"), new_task("d")],
    )
    .await;
    // Leases (30 s): a, b until 31; c until 50.
    assert_eq!(ids(&claim(&*store, "n1", 2, at(1)).await), vec!["a", "b"]);
    assert_eq!(ids(&claim(&*store, "n2", 1, at(20)).await), vec!["c"]);
    apply(
        &*store,
        vec![
            transition("a", 1, Received, Preparing, at(2)),
            transition("a", 1, Preparing, Running, at(3)),
        ],
    )
    .await;
    let before = get(&*store, "a").await;
    // A lease is live up to and including its end.
    assert!(take_over(&*store, "n3", at(31)).await.is_empty());

    let got = take_over(&*store, "n3", at(32)).await;
    assert_eq!(ids(&got), vec!["a", "b"]);
    let a = &got[0];
    assert_eq!(a.attempt, 1);
    assert_eq!(a.record.attempt, 1);
    assert_eq!(a.record.status, Running);
    assert_eq!(a.record.node.as_deref(), Some("n3"));
    assert_eq!(a.previous_node.as_deref(), Some("n1"));
    assert!(!a.record.queued);
    assert_eq!(a.record.history, before.history);
    assert_eq!(a.record.updated_at, at(3));
    assert_eq!(a.queued_since, T0);
    assert_eq!(a.cpu_millis, 100);
    assert_eq!(a.memory_bytes, 64 << 20);
    assert_eq!(
        a.record,
        taskexec_store::TaskRecord {
            node: Some("n3".to_owned()),
            ..before
        }
    );
    assert_eq!(got[1].attempt, 1);
    assert_eq!(got[1].record.status, Received);
    assert_eq!(got[1].record.updated_at, at(1));
    assert_eq!(get(&*store, "a").await, a.record);

    // Taken once: the new lease (until 62) is live.
    assert!(take_over(&*store, "n4", at(40)).await.is_empty());
    assert!(store.claimed_by("n1").await.expect("claimed_by").is_empty());
    let without_previous: Vec<_> = got
        .iter()
        .cloned()
        .map(|c| taskexec_store::ClaimedTask {
            previous_node: None,
            lost_attempts: 0,
            ..c
        })
        .collect();
    assert_eq!(
        store.claimed_by("n3").await.expect("claimed_by"),
        without_previous
    );
    assert_eq!(
        store.stats().await.expect("stats"),
        QueueStats {
            queued: 1,
            running: 3
        }
    );

    // n1's renewals no longer extend anything; n3's do.
    let both = ["a", "b"].map(str::to_owned);
    store.renew("n1", &both, at(1000)).await.expect("renew");
    store
        .renew("n3", &["b".to_owned()], at(100))
        .await
        .expect("renew");
    let again = take_over(&*store, "n4", at(63)).await;
    assert_eq!(ids(&again), vec!["a", "c"]);
    assert_eq!(again[1].record.node.as_deref(), Some("n4"));
    assert_eq!(again[1].attempt, 1);

    // The interrupted attempt is recovered like after a crash: its writes
    // still pass the fence, and a requeue starts attempt 2.
    apply(
        &*store,
        vec![
            transition("a", 1, Running, Preparing, at(64)),
            requeue("a", 1, at(70)),
        ],
    )
    .await;
    assert!(
        take_over(&*store, "n5", at(2000))
            .await
            .iter()
            .all(|c| c.record.task.id != "a")
    );
    let next = claim(&*store, "n5", 10, at(70)).await;
    assert_eq!(ids(&next), vec!["a", "d"]);
    assert_eq!(next[0].attempt, 2);
}

/// Live leases — fresh, renewed, or ending exactly now — are not taken
/// over; a node may take over its own expired tasks.
pub async fn take_over_skips_live_leases(h: &dyn Harness) {
    let store = h.open().await;
    assert!(take_over(&*store, "n3", at(0)).await.is_empty());
    submit(&*store, vec![new_task("a"), new_task("b")]).await;
    assert_eq!(ids(&claim(&*store, "n1", 1, at(0)).await), vec!["a"]);
    store
        .renew("n1", &["a".to_owned()], at(100))
        .await
        .expect("renew");
    assert_eq!(ids(&claim(&*store, "n2", 1, at(50)).await), vec!["b"]);
    // a until 100, b until 80.
    assert!(take_over(&*store, "n3", at(60)).await.is_empty());
    assert!(take_over(&*store, "n3", at(80)).await.is_empty());
    assert_eq!(ids(&take_over(&*store, "n3", at(81)).await), vec!["b"]);
    // b now until 111.
    assert!(take_over(&*store, "n3", at(100)).await.is_empty());
    let own = take_over(&*store, "n1", at(101)).await;
    assert_eq!(ids(&own), vec!["a"]);
    assert_eq!(own[0].record.node.as_deref(), Some("n1"));
    assert!(take_over(&*store, "n3", at(111)).await.is_empty());
    assert_eq!(ids(&take_over(&*store, "n1", at(112)).await), vec!["b"]);
    assert_eq!(
        ids(&store.claimed_by("n1").await.expect("claimed_by")),
        vec!["a", "b"]
    );
}

/// Queued, finished, final (transition only) and cancelled tasks are never
/// taken over, however old their lease.
pub async fn take_over_skips_queued_and_final(h: &dyn Harness) {
    let store = h.open().await;
    submit(
        &*store,
        vec![
            new_task("done"),
            new_task("failing"),
            new_task("retry"),
            new_task("live"),
            new_task("queued"),
            new_task("cancelled"),
        ],
    )
    .await;
    assert_eq!(claim(&*store, "n1", 4, at(1)).await.len(), 4);
    apply(
        &*store,
        vec![
            finish("done", 1, Completed, at(2)),
            transition("failing", 1, Received, Failed, at(2)),
            requeue("retry", 1, at(5)),
        ],
    )
    .await;
    assert_eq!(
        store
            .request_cancel("cancelled", record(Received, Cancelled, at(3), 0))
            .await
            .expect("cancel"),
        CancelOutcome::CancelledQueued
    );
    let snapshot = || async {
        let mut out = Vec::new();
        for id in ["done", "failing", "retry", "queued", "cancelled"] {
            out.push(get(&*store, id).await);
        }
        out
    };
    let before = snapshot().await;
    assert_eq!(
        ids(&take_over(&*store, "n2", at(10_000)).await),
        vec!["live"]
    );
    assert!(take_over(&*store, "n2", at(10_000)).await.is_empty());
    assert_eq!(snapshot().await, before);
    // The final-but-unfinished task can still get its result.
    apply(&*store, vec![finish("failing", 1, Failed, at(3))]).await;
    assert_eq!(
        get(&*store, "failing").await.result.map(|r| r.status),
        Some(Failed)
    );
}

/// Four nodes taking over 100 expired tasks at once never take the same
/// task and together take all of them.
pub async fn take_over_concurrently_never_shares(h: &dyn Harness) {
    let store: Arc<dyn TaskStore> = Arc::from(h.open().await);
    let tasks = (0..100).map(|i| new_task(&format!("t{i:03}"))).collect();
    store.submit(tasks, 1000).await.expect("submit");
    let mut claimed = 0;
    while claimed < 100 {
        let got = claim(&*store, "gone", 7, at(1)).await;
        assert!(!got.is_empty());
        claimed += got.len();
    }
    let mut workers = Vec::new();
    for w in 0..4 {
        let store = Arc::clone(&store);
        workers.push(tokio::spawn(async move {
            let node = format!("node-{w}");
            let mut got = Vec::new();
            // Each node scans a few times, as a recovery loop would.
            for _ in 0..3 {
                for c in take_over(&*store, &node, at(100)).await {
                    assert_eq!(c.attempt, 1);
                    assert_eq!(c.record.node.as_deref(), Some(node.as_str()));
                    got.push(c.record.task.id);
                }
                tokio::task::yield_now().await;
            }
            got
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.expect("taker"));
    }
    let unique: HashSet<&String> = all.iter().collect();
    assert_eq!(all.len(), 100, "some task was taken over twice or never");
    assert_eq!(unique.len(), 100);
    assert!(
        store
            .claimed_by("gone")
            .await
            .expect("claimed_by")
            .is_empty()
    );
}

/// `renew` changes nothing visible (and ignores other nodes' tasks); `ping`
/// answers.
pub async fn renew_and_ping(h: &dyn Harness) {
    let store = h.open().await;
    submit(&*store, vec![new_task("a"), new_task("b")]).await;
    claim(&*store, "n1", 1, at(1)).await;
    let before = (get(&*store, "a").await, get(&*store, "b").await);
    let ids = ["a", "b", "missing"].map(str::to_owned);
    store.renew("n1", &ids, at(100)).await.expect("renew");
    store.renew("n2", &ids, at(100)).await.expect("renew");
    store.renew("n1", &[], at(100)).await.expect("renew");
    assert_eq!((get(&*store, "a").await, get(&*store, "b").await), before);
    store.ping().await.expect("ping");
}

/// Queued and running counts through a task's life.
pub async fn stats_count_queued_and_running(h: &dyn Harness) {
    let store = h.open().await;
    let stats = || async { store.stats().await.expect("stats") };
    assert_eq!(
        stats().await,
        QueueStats {
            queued: 0,
            running: 0
        }
    );
    submit(&*store, vec![new_task("a"), new_task("b"), new_task("c")]).await;
    assert_eq!(
        stats().await,
        QueueStats {
            queued: 3,
            running: 0
        }
    );
    claim(&*store, "n1", 2, at(1)).await;
    assert_eq!(
        stats().await,
        QueueStats {
            queued: 1,
            running: 2
        }
    );
    apply(&*store, vec![requeue("a", 1, at(5))]).await;
    assert_eq!(
        stats().await,
        QueueStats {
            queued: 2,
            running: 1
        }
    );
    apply(&*store, vec![finish("b", 1, Completed, at(2))]).await;
    assert_eq!(
        stats().await,
        QueueStats {
            queued: 2,
            running: 0
        }
    );
    store
        .request_cancel("c", record(Received, Cancelled, at(3), 0))
        .await
        .expect("cancel");
    assert_eq!(
        stats().await,
        QueueStats {
            queued: 1,
            running: 0
        }
    );
}

/// Closing and reopening the database keeps every task, its history, the
/// queue and the idempotency keys; migrations run again harmlessly.
pub async fn reopen_keeps_everything(h: &dyn Harness) {
    let ids_all = ["a", "b", "c", "d"];
    let before = {
        let store = h.open().await;
        let mut tasks = vec![
            keyed_task("a", "ka"),
            prio_task("b", 3),
            new_task("c"),
            new_task("d"),
        ];
        tasks[2].runtime = "bash".to_owned();
        submit(&*store, tasks).await;
        claim(&*store, "n1", 2, at(1)).await;
        apply(
            &*store,
            vec![
                transition("b", 1, Received, Preparing, at(2)),
                transition("b", 1, Preparing, Running, at(2)),
                transition("b", 1, Running, Completed, at(3)),
                attempt_done("b", 1, Completed, at(3)),
                finish("b", 1, Completed, at(3)),
                transition("a", 1, Received, Preparing, at(2)),
            ],
        )
        .await;
        store
            .request_cancel("d", record(Received, Cancelled, at(4), 0))
            .await
            .expect("cancel");
        let mut records = Vec::new();
        for id in ids_all {
            records.push(get(&*store, id).await);
        }
        let list = store.list(&ListQuery::default()).await.expect("list");
        let stats = store.stats().await.expect("stats");
        (records, list, stats)
    };
    for round in 0..2 {
        let store = h.open().await;
        let mut records = Vec::new();
        for id in ids_all {
            records.push(get(&*store, id).await);
        }
        assert_eq!(records, before.0, "round {round}");
        assert_eq!(
            store.list(&ListQuery::default()).await.expect("list"),
            before.1
        );
        assert_eq!(store.stats().await.expect("stats"), before.2);
        assert_eq!(
            ids(&store.claimed_by("n1").await.expect("claimed_by")),
            vec!["a"]
        );
    }
    let store = h.open().await;
    assert_eq!(
        submit(&*store, vec![keyed_task("z", "ka")]).await,
        vec![Submitted::Existing { id: "a".to_owned() }]
    );
    submit(&*store, vec![new_task("e")]).await;
    let (all, _) = list_all(&*store, ListQuery::default()).await;
    assert_eq!(all, vec!["e", "d", "c", "b", "a"]);
    assert_eq!(ids(&claim(&*store, "n2", 5, at(5)).await), vec!["c", "e"]);
}

/// A node whose lease was taken over (or whose task was requeued) writes
/// nothing any more through `apply_as`, even for the attempt it ran: the
/// node that took over decides the task's fate alone.
pub async fn a_former_holder_writes_nothing(h: &dyn Harness) {
    let store = h.open().await;
    submit(&*store, vec![new_task("a")]).await;
    assert_eq!(ids(&claim(&*store, "n1", 1, at(1)).await), vec!["a"]);
    store
        .apply_as(
            "n1",
            vec![transition("a", 1, Received, Preparing, at(2))].into(),
        )
        .await
        .expect("the holder writes");
    assert_eq!(get(&*store, "a").await.status, Preparing);
    let got = take_over(&*store, "n2", at(40)).await;
    assert_eq!(ids(&got), vec!["a"]);
    assert_eq!(got[0].previous_node.as_deref(), Some("n1"));
    // n1 comes back and reports its attempt as finished: refused.
    store
        .apply_as(
            "n1",
            vec![transition("a", 1, Preparing, Running, at(41))].into(),
        )
        .await
        .expect("apply");
    assert_eq!(
        get(&*store, "a").await.status,
        Preparing,
        "the former holder's write was ignored"
    );
    // The new holder's writes go through.
    store
        .apply_as(
            "n2",
            vec![transition("a", 1, Preparing, Running, at(42))].into(),
        )
        .await
        .expect("apply");
    assert_eq!(get(&*store, "a").await.status, Running);
    // After a requeue nobody holds the task: n2's late writes are ignored too.
    store
        .apply_as("n2", vec![requeue("a", 1, at(50))].into())
        .await
        .expect("apply");
    store
        .apply_as(
            "n2",
            vec![transition("a", 1, Running, Failed, at(51))].into(),
        )
        .await
        .expect("apply");
    let a = get(&*store, "a").await;
    assert!(a.queued);
    assert_eq!(a.status, Running);
}

/// A batch retried after a commit whose answer was lost applies once: its
/// transitions no longer start from the current status.
pub async fn a_retried_batch_records_its_transitions_once(h: &dyn Harness) {
    let store = h.open().await;
    submit(&*store, vec![new_task("a")]).await;
    assert_eq!(ids(&claim(&*store, "n1", 1, at(1)).await), vec!["a"]);
    let batch = vec![
        transition("a", 1, Received, Preparing, at(2)),
        transition("a", 1, Preparing, Running, at(3)),
    ];
    store
        .apply_as("n1", batch.clone().into())
        .await
        .expect("apply");
    store
        .apply_as("n1", batch.into())
        .await
        .expect("apply again");
    let a = get(&*store, "a").await;
    let to: Vec<TaskStatus> = a.history.iter().map(|h| h.to).collect();
    assert_eq!(to, vec![Received, Preparing, Running]);
}

/// Renewing answers which leases were extended: a task taken over, finished
/// or never held is not among them (its former node must stop it).
pub async fn renew_answers_the_leases_still_held(h: &dyn Harness) {
    let store = h.open().await;
    submit(&*store, vec![new_task("a"), new_task("b"), new_task("c")]).await;
    assert_eq!(
        ids(&claim(&*store, "n1", 3, at(1)).await),
        vec!["a", "b", "c"]
    );
    // a is taken over by n2 (n1's lease ran out), c finishes.
    store
        .renew("n1", &["b".to_owned(), "c".to_owned()], at(100))
        .await
        .expect("renew");
    assert_eq!(ids(&take_over(&*store, "n2", at(40)).await), vec!["a"]);
    store
        .apply_as("n1", vec![finish("c", 1, Completed, at(41))].into())
        .await
        .expect("apply");
    let all = ["a", "b", "c", "missing"].map(str::to_owned);
    let mut held = store.renew("n1", &all, at(200)).await.expect("renew");
    held.sort();
    assert_eq!(held, vec!["b"]);
    assert_eq!(
        store.renew("n2", &all, at(200)).await.expect("renew"),
        vec!["a"]
    );
    assert!(
        store
            .renew("n1", &[], at(200))
            .await
            .expect("renew")
            .is_empty()
    );
}

/// A running attempt that ends (here COMPLETED) after a cancel was recorded
/// stores the task as CANCELLED: the transition, the result (output
/// discarded, error CANCELLED) and its history agree; the attempt's record
/// stays as it was.
pub async fn a_cancel_that_won_ends_the_task_cancelled(h: &dyn Harness) {
    let store = h.open().await;
    submit(&*store, vec![new_task("a")]).await;
    claim(&*store, "n1", 1, at(1)).await;
    apply(
        &*store,
        vec![
            transition("a", 1, Received, Preparing, at(2)),
            transition("a", 1, Preparing, Running, at(3)),
        ],
    )
    .await;
    assert_eq!(
        store
            .request_cancel("a", record(Running, Cancelled, at(4), 0))
            .await
            .expect("cancel"),
        CancelOutcome::Requested {
            node: Some("n1".to_owned())
        }
    );
    // The attempt completed before the kill reached it.
    let completed = record(Running, Completed, at(5), 1);
    let mut late = result("a", Completed, at(5));
    late.history = vec![completed.clone()];
    let won = store
        .apply_as(
            "n1",
            vec![
                attempt_done("a", 1, Completed, at(5)),
                Write::Transition {
                    id: "a".to_owned(),
                    attempt: 1,
                    record: completed.clone(),
                },
                Write::Finish {
                    id: "a".to_owned(),
                    attempt: 1,
                    result: late,
                },
            ]
            .into(),
        )
        .await
        .expect("apply");
    assert_eq!(won, vec!["a"], "the store says the cancel won");
    let a = get(&*store, "a").await;
    assert_eq!(a.status, Cancelled);
    assert_eq!(a.node, None);
    let last = a.history.last().expect("history");
    assert_eq!(
        (last.from, last.to, last.at, last.attempt),
        (Some(Running), Cancelled, at(5), 1)
    );
    let stored = a.result.expect("result");
    assert_eq!(stored.status, Cancelled);
    assert_eq!(stored.output, serde_json::Value::Null);
    assert_eq!(
        stored.error.map(|e| e.error_type),
        Some(ErrorType::Cancelled)
    );
    assert_eq!(stored.history, vec![last.clone()]);
    assert_eq!(a.attempts.len(), 1);
    assert_eq!(a.attempts[0].status, Completed);
    assert_eq!(
        store
            .request_cancel("a", record(Running, Cancelled, at(6), 0))
            .await
            .expect("cancel"),
        CancelOutcome::AlreadyFinal(Cancelled)
    );
}

/// A retry decided while a cancel was being recorded is not queued: the
/// task stays with its node, which then finishes it as cancelled.
pub async fn a_requeue_after_a_cancel_request_is_ignored(h: &dyn Harness) {
    let store = h.open().await;
    submit(&*store, vec![new_task("a")]).await;
    claim(&*store, "n1", 1, at(1)).await;
    apply(
        &*store,
        vec![transition("a", 1, Received, Preparing, at(2))],
    )
    .await;
    store
        .request_cancel("a", record(Preparing, Cancelled, at(3), 0))
        .await
        .expect("cancel");
    store
        .apply_as(
            "n1",
            vec![attempt_done("a", 1, Failed, at(4)), requeue("a", 1, at(10))].into(),
        )
        .await
        .expect("apply");
    let a = get(&*store, "a").await;
    assert!(!a.queued);
    assert_eq!(a.node.as_deref(), Some("n1"));
    assert!(claim(&*store, "n2", 1, at(20)).await.is_empty());
    store
        .apply_as(
            "n1",
            vec![
                Write::Transition {
                    id: "a".to_owned(),
                    attempt: 1,
                    record: record(Preparing, Cancelled, at(5), 1),
                },
                finish("a", 1, Cancelled, at(5)),
            ]
            .into(),
        )
        .await
        .expect("apply");
    assert_eq!(get(&*store, "a").await.status, Cancelled);
}

/// Cancels and completions of the same tasks, at once from many tasks:
/// each cancel's answer agrees with the stored outcome. `Requested` (202)
/// means the task ends CANCELLED; `AlreadyFinal(COMPLETED)` (409) means
/// the completion committed first.
pub async fn cancel_and_completion_races_have_one_winner(h: &dyn Harness) {
    const TASKS: usize = 40;
    let store: Arc<dyn TaskStore> = Arc::from(h.open().await);
    let names: Vec<String> = (0..TASKS).map(|i| format!("t{i:02}")).collect();
    submit(&*store, names.iter().map(|n| new_task(n)).collect()).await;
    assert_eq!(claim(&*store, "n1", TASKS, at(1)).await.len(), TASKS);
    let starts = names
        .iter()
        .flat_map(|n| {
            [
                transition(n, 1, Received, Preparing, at(2)),
                transition(n, 1, Preparing, Running, at(3)),
            ]
        })
        .collect();
    apply(&*store, starts).await;
    let mut joins = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let (store, name) = (Arc::clone(&store), name.clone());
        // Both start together; one of them gives way a little (the
        // completion for even tasks, the cancel for odd ones), so both
        // orders happen.
        let start = Arc::new(tokio::sync::Barrier::new(2));
        let give_way = |late: bool| async move {
            if late {
                for _ in 0..20 {
                    tokio::task::yield_now().await;
                }
            }
        };
        let completing = tokio::spawn({
            let (store, name, start) = (Arc::clone(&store), name.clone(), Arc::clone(&start));
            async move {
                start.wait().await;
                give_way(i % 2 == 0).await;
                let done = record(Running, Completed, at(5), 1);
                let mut r = result(&name, Completed, at(5));
                r.history = vec![done.clone()];
                store
                    .apply_as(
                        "n1",
                        vec![
                            attempt_done(&name, 1, Completed, at(5)),
                            Write::Transition {
                                id: name.clone(),
                                attempt: 1,
                                record: done,
                            },
                            Write::Finish {
                                id: name.clone(),
                                attempt: 1,
                                result: r,
                            },
                        ]
                        .into(),
                    )
                    .await
                    .expect("apply");
            }
        });
        let cancelling = tokio::spawn({
            let name = name.clone();
            async move {
                start.wait().await;
                give_way(i % 2 == 1).await;
                store
                    .request_cancel(&name, record(Running, Cancelled, at(4), 0))
                    .await
                    .expect("cancel")
            }
        });
        joins.push((name, completing, cancelling));
    }
    let (mut won, mut lost) = (0, 0);
    for (name, completing, cancelling) in joins {
        completing.await.expect("completion");
        let answer = cancelling.await.expect("cancel");
        let stored = get(&*store, &name).await;
        let result = stored.result.as_ref().expect("a result");
        assert_eq!(result.status, stored.status, "{name}");
        match answer {
            CancelOutcome::Requested { .. } => {
                won += 1;
                assert_eq!(stored.status, Cancelled, "{name}: 202, then {stored:?}");
                assert_eq!(result.output, serde_json::Value::Null, "{name}");
            }
            CancelOutcome::AlreadyFinal(status) => {
                lost += 1;
                assert_eq!(status, Completed, "{name}");
                assert_eq!(stored.status, Completed, "{name}");
                assert!(!stored.cancel_requested, "{name}");
            }
            other => panic!("{name}: {other:?}"),
        }
    }
    assert_eq!(won + lost, TASKS);
}

/// Two take-overs in a row of one attempt (the first taker lost its lease
/// before it could record the attempt, after an outage) name the node that
/// ran the attempt, not the node that took it over first; a later attempt
/// names its own holder.
pub async fn take_over_names_the_node_that_ran_the_attempt(h: &dyn Harness) {
    let store = h.open().await;
    submit(&*store, vec![new_task("a")]).await;
    assert_eq!(ids(&claim(&*store, "n1", 1, at(1)).await), vec!["a"]);
    let got = take_over(&*store, "n2", at(40)).await;
    assert_eq!(ids(&got), vec!["a"]);
    assert_eq!(got[0].previous_node.as_deref(), Some("n1"));
    assert_eq!(got[0].record.node.as_deref(), Some("n2"));
    // n2 never records the attempt (the store was unreachable for it) and
    // its take-over lease runs out: n3 takes the same attempt over.
    let got = take_over(&*store, "n3", at(80)).await;
    assert_eq!(ids(&got), vec!["a"]);
    assert_eq!(got[0].attempt, 1);
    assert_eq!(
        got[0].previous_node.as_deref(),
        Some("n1"),
        "attempt 1 ran on n1, not on n2 which only took it over"
    );
    // n3 requeues; n2 claims and runs attempt 2, and dies with it.
    store
        .apply_as("n3", vec![requeue("a", 1, at(81))].into())
        .await
        .expect("requeue");
    assert_eq!(ids(&claim(&*store, "n2", 1, at(82)).await), vec!["a"]);
    let got = take_over(&*store, "n4", at(120)).await;
    assert_eq!(got[0].attempt, 2);
    assert_eq!(got[0].previous_node.as_deref(), Some("n2"));
    let got = take_over(&*store, "n1", at(160)).await;
    assert_eq!(got[0].attempt, 2);
    assert_eq!(got[0].previous_node.as_deref(), Some("n2"));
}

/// Each attempt whose lease expired counts once in `lost_attempts`,
/// however many nodes take it over; the count survives requeues.
pub async fn lost_attempts_count_each_attempt_once(h: &dyn Harness) {
    let store = h.open().await;
    submit(&*store, vec![new_task("a"), new_task("b")]).await;
    assert_eq!(ids(&claim(&*store, "n1", 2, at(1)).await), vec!["a", "b"]);
    let got = take_over(&*store, "n2", at(40)).await;
    assert_eq!(
        got.iter().map(|c| c.lost_attempts).collect::<Vec<_>>(),
        vec![1, 1]
    );
    // The same attempt taken over again: still one lost attempt.
    let got = take_over(&*store, "n3", at(80)).await;
    assert_eq!(
        got.iter().map(|c| c.lost_attempts).collect::<Vec<_>>(),
        vec![1, 1]
    );
    // a is retried twice more and lost each time; b finishes normally.
    for (n, t) in [(2u32, 100i64), (3, 200)] {
        store
            .apply_as("n3", vec![requeue("a", n - 1, at(t))].into())
            .await
            .expect("requeue");
        // n3 stops taking things over for a moment: the requeue released
        // a, which it then claims again from the queue.
        let c = claim(&*store, "n1", 1, at(t + 1)).await;
        assert_eq!(ids(&c), vec!["a"]);
        assert_eq!(c[0].attempt, n);
        assert_eq!(c[0].lost_attempts, 0, "only a take-over reports the count");
        let got = take_over(&*store, "n2", at(t + 50)).await;
        let a: Vec<_> = got.iter().filter(|c| c.record.task.id == "a").collect();
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].attempt, n);
        assert_eq!(a[0].lost_attempts, n, "attempt {n}");
        // b (held by n3, then n2) is taken over again: still counted once.
        if let Some(b) = got.iter().find(|c| c.record.task.id == "b") {
            assert_eq!(b.lost_attempts, 1);
            assert_eq!(b.previous_node.as_deref(), Some("n1"));
        }
        // n3 gets a back for the next round.
        let back = take_over(&*store, "n3", at(t + 90)).await;
        assert!(
            back.iter()
                .any(|c| c.record.task.id == "a" && c.lost_attempts == n)
        );
    }
}
