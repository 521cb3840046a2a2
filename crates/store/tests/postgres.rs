//! The conformance suite on PostgreSQL, each test on a scratch database of
//! its own, plus PostgreSQL-specific checks: several stores (nodes) on one
//! database, concurrent migrations, row locks, NOTIFY, and a claim
//! throughput measurement (`--ignored`).
//!
//! The server is `postgres://postgres@127.0.0.1:5432/postgres`, or
//! `TASKEXEC_TEST_POSTGRES_URL` (a URL of a database the user may create
//! databases from). A test creates `taskexec_test_<random>` there and drops
//! it (`WITH (FORCE)`, best effort) when done. Without a server the tests
//! fail, unless `TASKEXEC_SKIP_POSTGRES=1`, which skips them with a notice.

mod conformance;

use std::collections::HashSet;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sqlx::postgres::{PgConnection, PgListener, PgNotification, PgPool};
use sqlx::{AssertSqlSafe, Connection, Executor, Row};
use taskexec_model::TaskStatus;
use taskexec_store::postgres::{QUEUE_CHANNEL, TASK_CHANNEL};
use taskexec_store::{PgOptions, PgStore, StoreError, Submitted, TaskStore};

use conformance::{LEASE, PLENTY, T0, at, claim, finish, ids, keyed_task, new_task, submit};

/// The server's default URL.
const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// Connections of each test store's pool (many tests run at once).
const TEST_CONNECTIONS: u32 = 8;

/// The URL of the server's maintenance database.
fn admin_url() -> String {
    std::env::var("TASKEXEC_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned())
}

/// Whether the PostgreSQL tests are to be skipped.
fn skipped() -> bool {
    std::env::var("TASKEXEC_SKIP_POSTGRES").is_ok_and(|v| v == "1")
}

/// `url` with its database replaced by `database`.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let (scheme, rest) = base.split_once("://").expect("a URL with a scheme");
    let authority = rest
        .split_once('/')
        .map_or(rest, |(authority, _)| authority);
    let mut out = format!("{scheme}://{authority}/{database}");
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

/// A database name no other test (or test run) uses.
fn scratch_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    format!("taskexec_test_{:016x}", hasher.finish())
}

/// Connects to the maintenance database, or explains how to get a server.
async fn admin() -> PgConnection {
    let url = admin_url();
    match PgConnection::connect(&url).await {
        Ok(conn) => conn,
        Err(e) => panic!(
            "no PostgreSQL server answers at {url}: {e}\n\
             Start one (e.g. `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`), \
             point TASKEXEC_TEST_POSTGRES_URL at one, or set TASKEXEC_SKIP_POSTGRES=1 to skip \
             the PostgreSQL tests."
        ),
    }
}

/// A scratch database, dropped with the value.
struct PgDb {
    name: String,
    url: String,
}

impl PgDb {
    /// A fresh, empty database; `None` (after a notice) when the
    /// PostgreSQL tests are skipped.
    async fn new() -> Option<PgDb> {
        if skipped() {
            eprintln!("TASKEXEC_SKIP_POSTGRES=1: PostgreSQL test skipped");
            return None;
        }
        if let Err(e) = server_answers().await {
            eprintln!("PostgreSQL test skipped ({e}); see postgresql_server_answers");
            return None;
        }
        let mut admin = admin().await;
        let name = scratch_name();
        admin
            .execute(AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .await
            .expect("create the scratch database");
        admin.close().await.ok();
        let url = with_database(&admin_url(), &name);
        Some(PgDb { name, url })
    }

    /// A store (a node) on the database.
    async fn store(&self) -> PgStore {
        PgStore::open_with(
            &self.url,
            PgOptions::default().max_connections(TEST_CONNECTIONS),
        )
        .await
        .expect("open the store")
    }

    /// A plain pool on the database, to look under the hood.
    async fn raw(&self) -> PgPool {
        PgPool::connect(&self.url).await.expect("raw pool")
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        // Drop runs inside the test's runtime, where one cannot block on a
        // future: drop the database from a thread with a runtime of its own.
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async move {
                let mut admin = PgConnection::connect(&admin_url()).await?;
                admin
                    .execute(AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                    )))
                    .await?;
                admin.close().await
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop the scratch database {}", self.name);
        }
    }
}

#[async_trait]
impl conformance::Harness for PgDb {
    async fn open(&self) -> Box<dyn TaskStore> {
        Box::new(self.store().await)
    }
}

/// Whether the server answers, probed once per test binary: without one,
/// `postgresql_server_answers` fails with what to do, and every other test
/// of the suite is skipped instead of failing one by one.
async fn server_answers() -> Result<(), String> {
    static PROBE: tokio::sync::OnceCell<Result<(), String>> = tokio::sync::OnceCell::const_new();
    PROBE
        .get_or_init(|| async {
            let url = admin_url();
            match PgConnection::connect(&url).await {
                Ok(conn) => {
                    conn.close().await.ok();
                    Ok(())
                }
                Err(e) => Err(format!("no PostgreSQL server answers at {url}: {e}")),
            }
        })
        .await
        .clone()
}

#[tokio::test]
#[cfg_attr(
    taskexec_skip_postgres,
    ignore = "TASKEXEC_SKIP_POSTGRES=1: every test of the PostgreSQL store suite is skipped"
)]
async fn postgresql_server_answers() {
    if skipped() {
        eprintln!("TASKEXEC_SKIP_POSTGRES=1: the PostgreSQL store suite is skipped");
        return;
    }
    if let Err(e) = server_answers().await {
        panic!(
            "{e}\nEvery other test of the PostgreSQL store suite was skipped. Start a server \
             (`bash .ci/run` installs and starts one), point TASKEXEC_TEST_POSTGRES_URL at one, \
             or set TASKEXEC_SKIP_POSTGRES=1 to skip the PostgreSQL tests (see the README's Tests)."
        );
    }
}

/// A scratch database, or `return` from the test when skipping.
macro_rules! scratch {
    () => {
        match PgDb::new().await {
            Some(db) => db,
            None => return,
        }
    };
}

mod suite {
    super::conformance::conformance_suite!(match super::PgDb::new().await {
        Some(db) => db,
        None => return,
    });
}

#[tokio::test]
async fn unsupported_urls_are_refused() {
    for url in [
        "",
        "sqlite://store.db",
        "sqlite::memory:",
        "postgres:/x",
        "postgres:x",
        "mysql://localhost/db",
        "localhost:5432",
    ] {
        let err = PgStore::open(url).await.expect_err(url);
        assert!(
            matches!(err, StoreError::BadUrl(ref u) if u == url),
            "{url}: {err:?}"
        );
    }
}

#[test]
fn scratch_urls() {
    assert_eq!(
        with_database("postgres://postgres@127.0.0.1:5432/postgres", "x"),
        "postgres://postgres@127.0.0.1:5432/x"
    );
    assert_eq!(
        with_database("postgresql://u:p@h/db?sslmode=disable", "x"),
        "postgresql://u:p@h/x?sslmode=disable"
    );
    assert_eq!(with_database("postgres://h:1", "x"), "postgres://h:1/x");
    assert_ne!(scratch_name(), scratch_name());
}

#[tokio::test]
async fn a_missing_database_is_an_error() {
    let db = scratch!();
    let url = with_database(&db.url, &format!("{}_missing", db.name));
    let err = PgStore::open(&url).await.expect_err("no such database");
    let missing = format!("{}_missing", db.name);
    assert!(
        matches!(&err, StoreError::NoDatabase { name } if *name == missing),
        "{err:?}"
    );
    assert!(
        err.to_string().contains(&format!("`createdb {missing}`")),
        "{err}"
    );
}

#[tokio::test]
async fn migrated_once_with_the_claim_index() {
    let db = scratch!();
    let store = db.store().await;
    drop(store);
    let again = db.store().await;
    again.ping().await.expect("ping");
    let raw = db.raw().await;
    let migrations: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations")
        .fetch_one(&raw)
        .await
        .expect("migrations");
    assert_eq!(migrations, conformance::migration_count("postgres"));
    let claim_index: String =
        sqlx::query_scalar("SELECT indexdef FROM pg_indexes WHERE indexname = 'tasks_claim'")
            .fetch_one(&raw)
            .await
            .expect("the claim index");
    assert!(
        claim_index.contains("(priority DESC, seq) WHERE queued"),
        "{claim_index}"
    );
    again.close().await;
    raw.close().await;
}

/// Four nodes starting at once on a fresh database: one migrates (under
/// the migrator's advisory lock), all open.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_migrations_succeed() {
    let db = Arc::new(scratch!());
    let mut opening = Vec::new();
    for _ in 0..4 {
        let db = Arc::clone(&db);
        opening.push(tokio::spawn(async move { db.store().await }));
    }
    let mut stores = Vec::new();
    for o in opening {
        stores.push(o.await.expect("opened"));
    }
    submit(&stores[0], vec![new_task("a")]).await;
    for store in &stores {
        assert_eq!(conformance::get(store, "a").await.task.id, "a");
    }
    let raw = db.raw().await;
    let migrations: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations")
        .fetch_one(&raw)
        .await
        .expect("migrations");
    assert_eq!(migrations, conformance::migration_count("postgres"));
    raw.close().await;
}

#[tokio::test]
async fn claims_and_renewals_set_leases() {
    let db = scratch!();
    let store = db.store().await;
    submit(&store, vec![new_task("a"), new_task("b"), new_task("c")]).await;
    claim(&store, "n1", 2, at(10)).await;
    claim(&store, "n2", 1, at(10)).await;
    let raw = db.raw().await;
    let leases = || async {
        let rows = sqlx::query("SELECT id, lease_until FROM tasks ORDER BY seq")
            .fetch_all(&raw)
            .await
            .expect("leases");
        rows.iter()
            .map(|r| r.get::<Option<i64>, _>("lease_until"))
            .collect::<Vec<_>>()
    };
    let ms = |s: i64| (T0.unix_timestamp() + s) * 1000;
    assert_eq!(leases().await, vec![Some(ms(40)); 3]);
    let all = ["a", "b", "c"].map(str::to_owned);
    store.renew("n1", &all, at(100)).await.expect("renew");
    assert_eq!(
        leases().await,
        vec![Some(ms(100)), Some(ms(100)), Some(ms(40))]
    );
    store
        .apply(vec![conformance::requeue("a", 1, at(50))])
        .await
        .expect("apply");
    store.renew("n1", &all, at(200)).await.expect("renew");
    assert_eq!(leases().await, vec![None, Some(ms(200)), Some(ms(40))]);
    let taken = store
        .take_over_expired("n3", at(41), LEASE)
        .await
        .expect("take over");
    assert_eq!(ids(&taken), vec!["c"]);
    assert_eq!(leases().await, vec![None, Some(ms(200)), Some(ms(71))]);
    raw.close().await;
}

/// A row another transaction holds is skipped by claims, not waited for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_skip_locked_rows_without_waiting() {
    let db = scratch!();
    let store = db.store().await;
    submit(&store, vec![new_task("a"), new_task("b")]).await;
    let raw = db.raw().await;
    let mut holder = raw.begin().await.expect("begin");
    sqlx::query("SELECT id FROM tasks WHERE id = 'a' FOR UPDATE")
        .execute(&mut *holder)
        .await
        .expect("lock a");
    let got = tokio::time::timeout(Duration::from_secs(5), claim(&store, "n1", 10, at(1)))
        .await
        .expect("the claim did not wait for the lock");
    assert_eq!(ids(&got), vec!["b"]);
    holder.rollback().await.expect("rollback");
    assert_eq!(ids(&claim(&store, "n1", 10, at(1)).await), vec!["a"]);
    raw.close().await;
}

/// Two nodes (two stores, two pools) claiming 500 tasks at once never
/// share one and together get all.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_claim_concurrently_without_sharing() {
    let db = scratch!();
    let nodes = [Arc::new(db.store().await), Arc::new(db.store().await)];
    for batch in 0..5 {
        let tasks = (0..100)
            .map(|i| new_task(&format!("t{:03}", batch * 100 + i)))
            .collect();
        nodes[batch % 2].submit(tasks, 1000).await.expect("submit");
    }
    let mut workers = Vec::new();
    for w in 0..6 {
        let store = Arc::clone(&nodes[w % 2]);
        workers.push(tokio::spawn(async move {
            let node = format!("node-{}", w % 2);
            let mut got = Vec::new();
            loop {
                let claimed = store
                    .claim(&node, PLENTY, 1 + w % 4, at(1), LEASE)
                    .await
                    .expect("claim");
                if claimed.is_empty() {
                    return got;
                }
                for c in claimed {
                    assert_eq!(c.attempt, 1);
                    got.push(c.record.task.id);
                }
            }
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.expect("claimer"));
    }
    assert_eq!(all.len(), 500, "some task was claimed twice or never");
    assert_eq!(all.iter().collect::<HashSet<_>>().len(), 500);
    let mut by_nodes = 0;
    for (n, store) in nodes.iter().enumerate() {
        by_nodes += store
            .claimed_by(&format!("node-{n}"))
            .await
            .expect("claimed_by")
            .len();
    }
    assert_eq!(by_nodes, 500);
}

/// Nodes submitting the same idempotency keys at once store each key once,
/// and every submission answers the stored task's id.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_idempotent_submissions_store_one_task() {
    let db = scratch!();
    let nodes = [Arc::new(db.store().await), Arc::new(db.store().await)];
    let mut submitters = Vec::new();
    for s in 0..8 {
        let store = Arc::clone(&nodes[s % 2]);
        submitters.push(tokio::spawn(async move {
            // The same keys in different orders (a deadlock, if the rows
            // went in in batch order).
            let mut batch: Vec<_> = (0..20)
                .map(|k| keyed_task(&format!("s{s}-k{k}"), &format!("key-{k}")))
                .collect();
            if s % 2 == 1 {
                batch.reverse();
            }
            let out = store.submit(batch, 10_000).await.expect("submit");
            let mut by_key: Vec<(usize, Submitted)> = out
                .into_iter()
                .enumerate()
                .map(|(i, o)| (if s % 2 == 1 { 19 - i } else { i }, o))
                .collect();
            by_key.sort_by_key(|(k, _)| *k);
            by_key
        }));
    }
    let mut results = Vec::new();
    for s in submitters {
        results.push(s.await.expect("submitter"));
    }
    for k in 0..20 {
        let outcomes: Vec<&Submitted> = results.iter().map(|r| &r[k].1).collect();
        let created = outcomes
            .iter()
            .filter(|o| matches!(o, Submitted::Created { .. }))
            .count();
        assert_eq!(created, 1, "key-{k}: {outcomes:?}");
        let ids: HashSet<&str> = outcomes.iter().map(|o| o.id()).collect();
        assert_eq!(ids.len(), 1, "key-{k}: {outcomes:?}");
    }
    assert_eq!(nodes[0].stats().await.expect("stats").queued, 20);
}

/// The next notification of `listener`, within 5 s.
async fn next_notification(listener: &mut PgListener) -> PgNotification {
    tokio::time::timeout(Duration::from_secs(5), listener.recv())
        .await
        .expect("a notification in time")
        .expect("a notification")
}

/// A submission and a requeue notify the queue channel once committed; a
/// refused submission does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_reaches_a_listener() {
    let db = scratch!();
    let store = db.store().await;
    let other_node = db.store().await;
    let mut listener = other_node.listener().await.expect("listener");
    submit(&store, vec![new_task("a")]).await;
    let n = next_notification(&mut listener).await;
    assert_eq!(n.channel(), QUEUE_CHANNEL);
    assert_eq!(n.payload(), "");

    // Nothing for a refused batch (rolled back), a claim or a finish.
    assert!(matches!(
        store.submit(vec![new_task("b")], 1).await,
        Err(StoreError::QueueFull { .. })
    ));
    claim(&store, "n1", 1, at(1)).await;
    store
        .apply(vec![finish("a", 1, TaskStatus::Failed, at(2))])
        .await
        .expect("apply");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), listener.recv())
            .await
            .is_err(),
        "unexpected notification"
    );

    submit(&store, vec![new_task("c")]).await;
    next_notification(&mut listener).await;
    claim(&store, "n1", 1, at(3)).await;
    store
        .apply(vec![conformance::requeue("c", 1, at(4))])
        .await
        .expect("apply");
    next_notification(&mut listener).await;
}

/// A recorded transition (a finish, a cancel of a queued task) notifies
/// the task channel with the task's id once committed, one notification
/// per task and commit; a submission and a claim record none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_s_transitions_notify_its_id() {
    let db = scratch!();
    let store = db.store().await;
    let other_node = db.store().await;
    let mut listener = other_node
        .listener_on(&[TASK_CHANNEL])
        .await
        .expect("listener");
    submit(&store, vec![new_task("a"), new_task("b")]).await;
    claim(&store, "n1", 1, at(1)).await;
    store
        .apply(vec![finish("a", 1, TaskStatus::Failed, at(2))])
        .await
        .expect("apply");
    let n = next_notification(&mut listener).await;
    assert_eq!((n.channel(), n.payload()), (TASK_CHANNEL, "a"));

    store
        .request_cancel(
            "b",
            conformance::record(TaskStatus::Received, TaskStatus::Cancelled, at(3), 0),
        )
        .await
        .expect("cancel");
    let n = next_notification(&mut listener).await;
    assert_eq!((n.channel(), n.payload()), (TASK_CHANNEL, "b"));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), listener.recv())
            .await
            .is_err(),
        "a notification too many"
    );
}

/// Claim throughput with no-op tasks: 20,000 tasks submitted in batches of
/// 1,000, then claimed and finished in batches of 64 by 4 workers (each a
/// node with its own pool). Prints, asserts nothing beyond correctness.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a measurement: cargo test -p taskexec-store --release --test postgres -- --ignored --nocapture bench_claim_throughput"]
async fn bench_claim_throughput() {
    const TASKS: usize = 20_000;
    const SUBMIT_BATCH: usize = 1_000;
    const CLAIM_BATCH: usize = 64;
    const WORKERS: usize = 4;
    let db = scratch!();
    let submitter = db.store().await;
    let started = Instant::now();
    for b in 0..TASKS / SUBMIT_BATCH {
        let tasks = (0..SUBMIT_BATCH)
            .map(|i| new_task(&format!("t{:06}", b * SUBMIT_BATCH + i)))
            .collect();
        submitter.submit(tasks, u64::MAX).await.expect("submit");
    }
    let submit_secs = started.elapsed().as_secs_f64();
    let mut stores = Vec::new();
    for _ in 0..WORKERS {
        stores.push(db.store().await);
    }
    let started = Instant::now();
    let mut workers = Vec::new();
    for (w, store) in stores.into_iter().enumerate() {
        workers.push(tokio::spawn(async move {
            let node = format!("node-{w}");
            let mut done = 0usize;
            loop {
                let claimed = store
                    .claim(&node, PLENTY, CLAIM_BATCH, at(1), LEASE)
                    .await
                    .expect("claim");
                if claimed.is_empty() {
                    return done;
                }
                let writes = claimed
                    .iter()
                    .map(|c| finish(&c.record.task.id, c.attempt, TaskStatus::Completed, at(2)))
                    .collect();
                store.apply(writes).await.expect("finish");
                done += claimed.len();
            }
        }));
    }
    let mut total = 0;
    for w in workers {
        total += w.await.expect("worker");
    }
    let claim_secs = started.elapsed().as_secs_f64();
    assert_eq!(total, TASKS);
    assert_eq!(
        submitter.stats().await.expect("stats"),
        taskexec_store::QueueStats::default()
    );
    println!(
        "submit: {TASKS} tasks in batches of {SUBMIT_BATCH} in {submit_secs:.2} s = {:.0} tasks/s",
        TASKS as f64 / submit_secs
    );
    println!(
        "claim+finish: {TASKS} tasks in batches of {CLAIM_BATCH} by {WORKERS} workers in \
         {claim_secs:.2} s = {:.0} tasks/s",
        TASKS as f64 / claim_secs
    );
}
