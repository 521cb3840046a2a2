//! Black-box scale-out tests: several `taskexec` nodes (`taskexec worker`
//! processes and a `taskexec serve --workers 0` API node) on one scratch
//! PostgreSQL database, driven over HTTP. They share the work, survive a
//! node's death and a cut of every database connection, and a node that
//! lost its task to another one cannot overwrite the other's result.
//!
//! The tests of this file run one at a time (they measure throughput on a
//! small host and each starts several nodes, each with a connection pool).
//! See `util/cluster.rs` for the database (`TASKEXEC_TEST_POSTGRES_URL`,
//! `TASKEXEC_SKIP_POSTGRES=1`).

#[path = "util/cluster.rs"]
mod cluster;
mod util;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cluster::{
    PgDb, Worker, check_record, get_all, get_task, small_bash, starts, submit_batches,
    wait_all_final, wait_task,
};
use serde_json::Value;
use time::OffsetDateTime;
use util::server::{Server, Setup, at};
use util::unique;

/// Tasks of [`many_nodes_share_the_work`]: 2,000 run in 24 to 48 s on the
/// 2-core test host (depending on what else runs), about 30 to 55 s for the
/// whole test, within the minute it may take.
const MANY: usize = 2_000;
/// The API's largest batch (`ServiceConfig::max_batch`).
const MAX_BATCH: usize = 1_000;

/// Runs the tests of this file one at a time.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A `taskexec serve --workers 0` node on the database: the API only.
fn api_node(db: &PgDb) -> Server {
    Setup::new()
        .database_url(&db.url)
        .node(&unique("api"))
        .flag("--workers", "0")
        .start()
}

/// The errors (`type: message`) of a record's attempts.
fn attempt_errors(rec: &Value) -> Vec<String> {
    rec["attempts"]
        .as_array()
        .expect("attempts")
        .iter()
        .filter(|a| !a["error"].is_null())
        .map(|a| {
            format!(
                "{}: {}",
                a["error"]["type"].as_str().unwrap_or("?"),
                a["error"]["message"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

#[test]
#[cfg_attr(
    taskexec_skip_postgres,
    ignore = "TASKEXEC_SKIP_POSTGRES=1: every test of the scale-out suite is skipped"
)]
fn postgresql_server_answers() {
    if cluster::skipped() {
        eprintln!("TASKEXEC_SKIP_POSTGRES=1: the scale-out suite is skipped");
        return;
    }
    if let Err(e) = cluster::server_answers() {
        panic!(
            "{e}\nEvery other test of the scale-out suite was skipped. Start a server and \
             install psql (`bash .ci/run` does both), point TASKEXEC_TEST_POSTGRES_URL at one, \
             or set TASKEXEC_SKIP_POSTGRES=1 to skip the PostgreSQL tests (see the README's Tests)."
        );
    }
}

#[test]
fn many_nodes_share_the_work() {
    let _serial = serial();
    let Some(db) = PgDb::new() else { return };
    let workers: Vec<Worker> = (1..=3)
        .map(|i| Worker::start(&db.url, &unique(&format!("w{i}")), &[("--workers", "2")]))
        .collect();
    let api = api_node(&db);

    let tasks: Vec<Value> = (0..MANY).map(|_| small_bash("echo ok", 30)).collect();
    let t0 = Instant::now();
    let ids = submit_batches(&api, &tasks, MAX_BATCH);
    let submitted = t0.elapsed();
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        MANY,
        "distinct ids"
    );
    let counts = wait_all_final(&api, &ids, Duration::from_secs(120));
    let ran = t0.elapsed();
    assert_eq!(counts, BTreeMap::from([("COMPLETED".to_owned(), MANY)]));

    let t1 = Instant::now();
    let records = get_all(&api, &ids, 4);
    let fetched = t1.elapsed();
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for rec in &records {
        let s = check_record(rec);
        let id = rec["task"]["id"].as_str().unwrap_or("?");
        assert_eq!(rec["status"], "COMPLETED", "{rec:#}");
        assert_eq!(s.len(), 1, "task {id} ran once: {rec:#}");
        assert_eq!(rec["attempts"].as_array().map(Vec::len), Some(1), "{rec:#}");
        assert_eq!(rec["result"]["stdout"], "ok\n", "{rec:#}");
        *per_node.entry(s[0].node.clone()).or_insert(0) += 1;
    }
    eprintln!(
        "many_nodes_share_the_work: {MANY} tasks submitted in {submitted:.2?}, all COMPLETED after \
         {ran:.2?} ({:.0} tasks/s), records read in {fetched:.2?}; per node: {per_node:?}",
        MANY as f64 / ran.as_secs_f64()
    );
    for w in &workers {
        assert!(
            per_node.get(&w.node).copied().unwrap_or(0) > 0,
            "worker {} ran nothing: {per_node:?}",
            w.node
        );
    }
    assert_eq!(
        per_node.keys().collect::<HashSet<_>>(),
        workers.iter().map(|w| &w.node).collect::<HashSet<_>>(),
        "only the workers ran tasks (not the API node)"
    );
}

#[test]
fn a_killed_worker_s_tasks_are_finished_by_another_node() {
    let _serial = serial();
    let Some(db) = PgDb::new() else { return };
    let flags = [("--workers", "2"), ("--lease", "2s")];
    let mut a = Worker::start(&db.url, &unique("a"), &flags);
    let b = Worker::start(&db.url, &unique("b"), &flags);
    let api = api_node(&db);

    let tasks: Vec<Value> = (0..6)
        .map(|_| small_bash("sleep 3\necho slept", 30))
        .collect();
    let ids = submit_batches(&api, &tasks, MAX_BATCH);

    // Wait until A runs something, then kill it.
    let deadline = Instant::now() + Duration::from_secs(30);
    'running: loop {
        for id in &ids {
            let rec = get_task(&api, id);
            if rec["status"] == "RUNNING" && starts(&rec).last().is_some_and(|s| s.node == a.node) {
                break 'running;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no task ran on {} in time",
            a.node
        );
        std::thread::sleep(cluster::POLL);
    }
    let killed_at = OffsetDateTime::now_utc();
    let t0 = Instant::now();
    a.kill();
    // The tasks A held when it died (claimed by it, not final), and those
    // already final then (none, unless this host is very slow).
    let (mut held, mut done_before) = (Vec::new(), Vec::new());
    for id in &ids {
        let rec = get_task(&api, id);
        if util::server::is_final(rec["status"].as_str().unwrap_or("")) {
            done_before.push(id.clone());
        } else if rec["node"] == a.node.as_str() {
            held.push(id.clone());
        }
    }
    assert!(!held.is_empty(), "A held no task when it died");

    let counts = wait_all_final(&api, &ids, Duration::from_secs(60));
    let recovered = t0.elapsed();
    assert_eq!(
        counts,
        BTreeMap::from([("COMPLETED".to_owned(), ids.len())])
    );
    let lost = format!("node {} lost", a.node);
    let mut takeover_delays = Vec::new();
    for id in &ids {
        let rec = get_task(&api, id);
        let s = check_record(&rec);
        assert_eq!(rec["status"], "COMPLETED", "{rec:#}");
        assert_eq!(rec["result"]["stdout"], "slept\n", "{rec:#}");
        let last = s.last().expect("a start");
        if !done_before.contains(id) {
            assert_eq!(last.node, b.node, "task {id} completed on B: {rec:#}");
        }
        let attempts = rec["attempts"].as_array().expect("attempts");
        // Only A's loss is an error; every other attempt completed.
        for e in attempt_errors(&rec) {
            assert_eq!(e, format!("INTERNAL: {lost}"), "task {id}: {rec:#}");
        }
        if held.contains(id) {
            let lost_attempt = attempts
                .iter()
                .find(|x| {
                    x["error"]["type"] == "INTERNAL" && x["error"]["message"] == lost.as_str()
                })
                .unwrap_or_else(|| panic!("task {id}: no attempt lost with {}: {rec:#}", a.node));
            let taken_over = at(&lost_attempt["endTime"]);
            assert!(
                taken_over >= killed_at,
                "task {id}: taken over before A died: {rec:#}"
            );
            assert!(
                last.at >= taken_over,
                "task {id}: B ran it before taking it over: {rec:#}"
            );
            assert_eq!(
                last.attempt,
                u32::try_from(lost_attempt["attempt"].as_u64().expect("attempt"))
                    .expect("an attempt fits u32")
                    + 1,
                "task {id}: B's attempt follows the lost one: {rec:#}"
            );
            takeover_delays.push(format!("{:.2}s", (taken_over - killed_at).as_seconds_f64()));
        } else {
            assert!(
                attempt_errors(&rec).is_empty(),
                "task {id} was not A's, yet lost an attempt: {rec:#}"
            );
        }
    }
    eprintln!(
        "a_killed_worker_s_tasks_are_finished_by_another_node: {} of {} tasks held by A at its \
         death, taken over {takeover_delays:?} after it, all COMPLETED on B {recovered:.2?} after it",
        held.len(),
        ids.len()
    );
}

#[test]
fn postgres_restart_mid_run_loses_nothing() {
    let _serial = serial();
    let Some(db) = PgDb::new() else { return };
    let worker = Worker::start(
        &db.url,
        &unique("w"),
        &[("--workers", "2"), ("--lease", "3s")],
    );
    let api = api_node(&db);

    let n = 120;
    let tasks: Vec<Value> = (0..n)
        .map(|_| small_bash("sleep 0.2\necho ok", 30))
        .collect();
    let t0 = Instant::now();
    let ids = submit_batches(&api, &tasks, MAX_BATCH);

    // Three outages while tasks run, each after a few more tasks completed;
    // the last one outlasts the lease (3 s), so the worker's leases expire
    // while it cannot reach the database.
    let mut cuts = Vec::new();
    for (round, down) in [(1, 1), (2, 2), (3, 4)] {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let done = cluster::statuses(&api)
                .map(|all| {
                    ids.iter()
                        .filter(|id| all.get(*id).is_some_and(|s| s == "COMPLETED"))
                        .count()
                })
                .unwrap_or(0);
            if done >= round * 10 {
                break;
            }
            assert!(Instant::now() < deadline, "only {done} tasks completed");
            std::thread::sleep(Duration::from_millis(100));
        }
        let killed = db.outage(Duration::from_secs(down));
        assert!(killed > 0, "no connection to cut");
        cuts.push(killed);
    }
    let counts = wait_all_final(&api, &ids, Duration::from_secs(90));
    let took = t0.elapsed();
    let records = get_all(&api, &ids, 2);
    let mut reruns = Vec::new();
    for rec in &records {
        check_record(rec);
        if rec["attempts"].as_array().map_or(0, Vec::len) > 1 {
            reruns.push(attempt_errors(rec));
        }
    }
    let errors = |log: &str| {
        log.lines()
            .filter(|l| l.contains("ERROR") || l.contains("WARN"))
            .count()
    };
    eprintln!(
        "postgres_restart_mid_run_loses_nothing: {n} tasks, connections cut {cuts:?}, final: \
         {counts:?} after {took:.2?}; tasks run more than once: {} {reruns:?}; {} connections now; \
         error/warning lines in the logs: worker {}, API {}",
        reruns.len(),
        db.connections(),
        errors(&worker.log()),
        errors(&api.log()),
    );
    if std::env::var_os("SCALE_OUT_LOGS").is_some() {
        eprintln!(
            "--- worker log ---\n{}\n--- API log ---\n{}",
            worker.log(),
            api.log()
        );
    }
    assert_eq!(
        counts,
        BTreeMap::from([("COMPLETED".to_owned(), n)]),
        "worker log:\n{}",
        worker.log()
    );
    for rec in &records {
        assert_eq!(rec["result"]["stdout"], "ok\n", "{rec:#}");
    }
    // The nodes are still in service.
    let id = api.submit(&small_bash("echo after", 30));
    let rec = wait_task(&api, &id, Duration::from_secs(30), "final", |r| {
        util::server::is_final(r["status"].as_str().unwrap_or(""))
    });
    assert_eq!(rec["status"], "COMPLETED", "{rec:#}");
}

#[test]
fn a_stale_node_s_late_result_is_refused() {
    let _serial = serial();
    let Some(db) = PgDb::new() else { return };
    let flags = [("--workers", "1"), ("--lease", "2s")];
    let mut a = Worker::start(&db.url, &unique("a"), &flags);
    let api = api_node(&db);
    let id = api.submit(&small_bash("echo \"attempt=$TASK_ATTEMPT\"\nsleep 3\n", 30));
    let running = wait_task(&api, &id, Duration::from_secs(30), "running on A", |r| {
        r["status"] == "RUNNING" && starts(r).last().is_some_and(|s| s.node == a.node)
    });
    assert_eq!(starts(&running).len(), 1, "{running:#}");

    // A freezes mid-run (its sandbox is up: the task's cgroup exists); B
    // takes the task over once A's lease expired.
    let deadline = Instant::now() + Duration::from_secs(10);
    while util::task_cgroups(a.pid).is_empty() {
        assert!(Instant::now() < deadline, "A started no sandbox");
        std::thread::sleep(cluster::POLL);
    }
    let b = Worker::start(&db.url, &unique("b"), &flags);
    a.signal("STOP");
    let stopped_at = OffsetDateTime::now_utc();
    let t0 = Instant::now();
    let done = wait_task(&api, &id, Duration::from_secs(60), "final", |r| {
        util::server::is_final(r["status"].as_str().unwrap_or(""))
    });
    let by_b = t0.elapsed();
    let lost = format!("node {} lost", a.node);
    let (a_node, b_node) = (a.node.clone(), b.node.clone());
    let check = |rec: &Value| {
        let s = check_record(rec);
        assert_eq!(rec["status"], "COMPLETED", "{rec:#}");
        assert_eq!(
            s.iter()
                .map(|s| (s.attempt, s.node.as_str()))
                .collect::<Vec<_>>(),
            [(1, a_node.as_str()), (2, b_node.as_str())],
            "{rec:#}"
        );
        let attempts = rec["attempts"].as_array().expect("attempts");
        assert_eq!(attempts.len(), 2, "{rec:#}");
        assert_eq!(attempts[0]["status"], "FAILED", "{rec:#}");
        assert_eq!(attempts[0]["error"]["type"], "INTERNAL", "{rec:#}");
        assert_eq!(attempts[0]["error"]["message"], lost.as_str(), "{rec:#}");
        assert!(at(&attempts[0]["endTime"]) >= stopped_at, "{rec:#}");
        assert_eq!(attempts[1]["status"], "COMPLETED", "{rec:#}");
        assert!(attempts[1]["error"].is_null(), "{rec:#}");
        assert_eq!(
            rec["result"]["stdout"], "attempt=2\n",
            "B's output: {rec:#}"
        );
        assert_eq!(
            rec["result"]["executionMetadata"]["attempts"], rec["attempts"],
            "{rec:#}"
        );
    };
    check(&done);

    // A wakes up and finishes its own run (its sandbox ended meanwhile);
    // on SIGTERM it waits for that run and commits all its writes before
    // it exits. None of them may change the record.
    a.signal("CONT");
    let status = a.terminate(Duration::from_secs(40));
    assert!(status.success(), "A's exit: {status}; log:\n{}", a.log());
    let after = get_task(&api, &id);
    check(&after);
    assert_eq!(after, done, "A's late writes changed the record");
    eprintln!(
        "a_stale_node_s_late_result_is_refused: B completed the task {by_b:.2?} after A froze; \
         A's late result was ignored"
    );
}

/// Followers on an API node learn of a task run by another node only from
/// the database's notifications: with the fallback re-read pushed out to an
/// hour, a `?wait` and an event stream that end with the task prove the
/// notification path end to end (a break in it would leave both waiting
/// for the hour: the wait would answer 202 after its minute).
#[test]
fn followers_on_an_api_node_are_woken_by_another_node_s_notifications() {
    let _serial = serial();
    let Some(db) = PgDb::new() else { return };
    let _worker = Worker::start(&db.url, &unique("w"), &[("--workers", "1")]);
    let api = Setup::new()
        .database_url(&db.url)
        .node(&unique("api"))
        .flag("--workers", "0")
        .flag("--follow-fallback", "1h")
        .start();

    // `?wait`: held on the API node until the worker's result arrives.
    let t0 = Instant::now();
    let r = api.post(
        "/v1/tasks?wait=60s",
        &small_bash("sleep 1\necho waited", 60),
    );
    let waited = t0.elapsed();
    r.expect(200);
    assert_eq!(r.json["status"], "COMPLETED", "{:#}", r.json);
    assert_eq!(r.json["result"]["stdout"], "waited\n", "{:#}", r.json);

    // The event stream: each transition is a notification; the stream ends
    // with the final one.
    let id = api.submit(&small_bash("sleep 1\necho streamed", 60));
    let t1 = Instant::now();
    let events = api.events(&id, |_, _| {});
    let streamed = t1.elapsed();
    let last = events.last().expect("at least one event");
    assert_eq!(last.1["to"], "COMPLETED", "{events:?}");
    eprintln!(
        "followers_on_an_api_node_are_woken_by_another_node_s_notifications: ?wait answered \
         after {waited:.2?}, the event stream ended after {streamed:.2?} (fallback re-read: 1h)"
    );
}
