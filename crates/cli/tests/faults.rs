//! Fault-injection tests: faults are injected at random instants while a
//! client submits tasks, every request is recorded with its answer (the
//! client's history), and invariants are checked afterwards:
//!
//! - no task acknowledged (2xx) is lost: each is stored and ends;
//! - each task has exactly one terminal state (one final transition, the
//!   last one, matching its status and its result's);
//! - the API's answers agree with the stored states (a task's record and
//!   the listing show the same status);
//! - during an outage the answer is 503 with `Retry-After` (store
//!   unreachable) or 507 `STORAGE_FULL` (store full), never a 500 and
//!   never a 2xx for something not committed;
//! - a node that lost its lease leaves no sandbox running.
//!
//! The faults: `kill -9` of a SQLite server (restarted on the same file), a
//! small tmpfs holding the SQLite store that fills up, a worker node
//! stopped (SIGSTOP) past its lease on PostgreSQL, connections to a
//! scratch PostgreSQL database cut during submissions, and a task lost
//! with its node (quarantine). Each test is bounded (the whole file runs in
//! well under a minute on a quiet host); see docs/operations.md. The
//! PostgreSQL tests are skipped with `TASKEXEC_SKIP_POSTGRES=1`.

#[path = "util/cluster.rs"]
#[allow(dead_code)]
mod cluster;
mod util;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cluster::{PgDb, Worker, check_record, get_task, small_bash, starts, wait_task};
use serde_json::Value;
use util::server::{Auth, Server, Setup, is_final};
use util::unique;

/// Runs the tests of this file one at a time (each loads the host, and
/// the timing of the faults matters).
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A small pseudo-random generator (xorshift), seeded from the clock; the
/// seed is printed so a failing run can be told apart.
struct Rng(u64);

impl Rng {
    fn new(test: &str) -> Rng {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos() % u128::from(u64::MAX)).unwrap_or(1))
            .unwrap_or(1)
            | 1;
        eprintln!("{test}: seed {seed}");
        Rng(seed)
    }

    /// A number in `lo..hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        lo + x % (hi - lo).max(1)
    }
}

/// One request of the client's history and what it got.
#[derive(Debug, Clone)]
struct Op {
    /// What was asked (e.g. "submit #12 round 2").
    what: String,
    /// The answer's status; `None`: no answer (connection refused or cut).
    status: Option<u16>,
    /// The answer's `Retry-After` header.
    retry_after: Option<String>,
    /// The answer's error type, if any.
    error: Option<String>,
    /// The acknowledged task's id (2xx).
    id: Option<String>,
}

impl Op {
    fn acked(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }
}

/// Submits `task` and records the answer.
fn submit(server: &Server, task: &Value, what: String) -> Op {
    let bytes = serde_json::to_vec(task).expect("serialize");
    match server.call("POST", "/v1/tasks", Some(&bytes), Auth::Default) {
        Ok(r) => Op {
            what,
            status: Some(r.status),
            retry_after: r.header("retry-after").map(str::to_owned),
            error: r.json["error"]["type"].as_str().map(str::to_owned),
            id: if (200..300).contains(&r.status) {
                Some(r.id())
            } else {
                None
            },
        },
        Err(_) => Op {
            what,
            status: None,
            retry_after: None,
            error: None,
            id: None,
        },
    }
}

/// The statuses the history holds, counted (`None` as "no answer").
fn summary(history: &[Op]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for op in history {
        let key = match (op.status, &op.error) {
            (Some(s), Some(e)) => format!("{s} {e}"),
            (Some(s), None) => s.to_string(),
            (None, _) => "no answer".to_owned(),
        };
        *out.entry(key).or_insert(0) += 1;
    }
    out
}

/// Every task's status in the listing (following cursors), retrying while
/// the API does not answer 200.
fn listing(api: &Server) -> HashMap<String, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(all) = cluster::statuses(api) {
            return all;
        }
        assert!(Instant::now() < deadline, "the listing never answered 200");
        std::thread::sleep(cluster::POLL);
    }
}

/// Checks the invariants over the acknowledged tasks of `history` once
/// they are all final (waiting up to `within`): each is stored, has one
/// terminal state, and its record agrees with the listing. Returns the
/// final records by id.
#[track_caller]
fn check_acknowledged(api: &Server, history: &[Op], within: Duration) -> HashMap<String, Value> {
    let acked: Vec<String> = history.iter().filter_map(|op| op.id.clone()).collect();
    let unique_ids: HashSet<&String> = acked.iter().collect();
    assert_eq!(
        unique_ids.len(),
        acked.len(),
        "an id was acknowledged twice"
    );
    let deadline = Instant::now() + within;
    let all = loop {
        let all = listing(api);
        let missing: Vec<&String> = acked.iter().filter(|id| !all.contains_key(*id)).collect();
        assert!(
            missing.is_empty(),
            "acknowledged tasks lost: {missing:?}\nhistory: {:?}",
            summary(history)
        );
        if acked.iter().all(|id| is_final(&all[id])) {
            break all;
        }
        assert!(
            Instant::now() < deadline,
            "acknowledged tasks not final within {within:?}: {:?}",
            acked
                .iter()
                .filter(|id| !is_final(&all[*id]))
                .map(|id| (id, &all[id]))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut records = HashMap::new();
    for id in &acked {
        let rec = get_task(api, id);
        assert_eq!(
            rec["status"].as_str(),
            Some(all[id].as_str()),
            "task {id}: its record and the listing disagree: {rec:#}"
        );
        check_record(&rec);
        records.insert(id.clone(), rec);
    }
    records
}

/// A short task whose output names its attempt. Its retries outnumber the
/// kills of any test, so a task interrupted by every kill still has an
/// attempt left: one that does not complete is a fault of ours.
fn short_task() -> Value {
    let mut task = small_bash("echo \"attempt=$TASK_ATTEMPT\"\n", 30);
    task["retryPolicy"] = serde_json::json!({"maxRetries": 8, "retryInterval": 200});
    task
}

#[test]
fn kill_9_of_a_sqlite_server_loses_no_acknowledged_task() {
    let _serial = serial();
    const ROUNDS: usize = 5;
    let mut rng = Rng::new("kill_9_of_a_sqlite_server_loses_no_acknowledged_task");
    // Quarantine past the number of kills: every task must complete.
    let setup = Setup::new()
        .flag("--lease", "2s")
        .flag("--quarantine-after", "10");
    let mut history = Vec::new();
    for round in 0..ROUNDS {
        let server = setup.start();
        let stop = AtomicBool::new(false);
        let ops = std::thread::scope(|s| {
            let client = s.spawn(|| {
                let mut ops = Vec::new();
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let op = submit(&server, &short_task(), format!("submit #{n} round {round}"));
                    let answered = op.status.is_some();
                    ops.push(op);
                    if !answered {
                        break;
                    }
                    // A pace the 2 workers keep up with, so that the kill
                    // also meets claims and result writes.
                    std::thread::sleep(Duration::from_millis(15));
                }
                ops
            });
            // Let the client and the workers get going, then kill -9 at a
            // random instant: in a submission, a claim, or a result's write.
            std::thread::sleep(Duration::from_millis(rng.range(300, 1500)));
            let st = Command::new("/bin/kill")
                .arg("-KILL")
                .arg(server.pid.to_string())
                .status()
                .expect("run /bin/kill");
            assert!(st.success(), "kill -9 {}", server.pid);
            stop.store(true, Ordering::SeqCst);
            client.join().expect("the client thread")
        });
        // While it ran, the server answered 202, or at worst 503 with
        // Retry-After (a store too busy to take the write); never 500.
        for op in &ops {
            if let Some(status) = op.status {
                let fine = status == 202
                    || (status == 503
                        && op
                            .retry_after
                            .as_deref()
                            .is_some_and(|v| v.parse::<u64>().is_ok_and(|s| s >= 1)));
                assert!(
                    fine,
                    "{}: answered {status} ({op:?}) while the server ran; answers: {:?}; \
                     log:\n{}",
                    op.what,
                    summary(&ops),
                    server.log()
                );
            }
        }
        let pid = server.pid;
        drop(server);
        // Its sandboxes died with it: their cgroups are empty (and removed).
        let left = util::task_cgroups(pid);
        assert!(
            left.is_empty(),
            "sandboxes of the killed server left running: {left:?}"
        );
        history.extend(ops);
    }
    let acked = history.iter().filter(|op| op.acked()).count();
    assert!(
        acked > 0,
        "nothing was acknowledged: {:?}",
        summary(&history)
    );

    // Restarted on the same file, the node recovers what it was running.
    let server = setup.start();
    let records = check_acknowledged(&server, &history, Duration::from_secs(60));
    for (id, rec) in &records {
        assert_eq!(rec["status"], "COMPLETED", "task {id}: {rec:#}");
        let attempt = rec["attempts"].as_array().map_or(0, Vec::len);
        assert_eq!(
            rec["result"]["stdout"],
            format!("attempt={attempt}\n"),
            "task {id}: the output is its last attempt's: {rec:#}"
        );
    }
    let retried = records
        .values()
        .filter(|r| r["attempts"].as_array().map_or(0, Vec::len) > 1)
        .count();
    eprintln!(
        "kill_9_of_a_sqlite_server_loses_no_acknowledged_task: {ROUNDS} kills, {} requests \
         ({:?}); {acked} acknowledged, all COMPLETED once, {retried} after an interrupted attempt",
        history.len(),
        summary(&history)
    );
}

/// A tmpfs mounted on a new temp dir, unmounted (lazily, whatever still
/// holds it) when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::Builder::new()
            .prefix("taskexec-faults-tmpfs-")
            .tempdir()
            .expect("temp dir");
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(st.success(), "mount a tmpfs on {}", dir.path().display());
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let st = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
        if !st.is_ok_and(|s| s.success()) {
            eprintln!(
                "could not unmount the tmpfs at {}",
                self.dir.path().display()
            );
        }
    }
}

/// Fills the file system of `path` until a write fails with ENOSPC.
fn fill(path: &Path) -> u64 {
    use std::io::Write as _;
    let mut f = std::fs::File::create(path).expect("create the filler");
    let chunk = vec![0x5au8; 64 << 10];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    let _ = f.sync_all();
    written
}

/// The value of an unlabelled metric in a Prometheus text page.
fn metric(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// `/readyz`'s status.
fn readyz(server: &Server) -> u16 {
    server
        .call("GET", "/readyz", None, Auth::Without)
        .map_or(0, |r| r.status)
}

/// A task carrying `kib` KiB of comment, to take room in the store.
fn bulky_task(kib: usize) -> Value {
    let pad = "#".repeat(1023);
    let mut code = String::with_capacity(kib * 1024 + 64);
    for _ in 0..kib {
        code.push_str(&pad);
        code.push('\n');
    }
    code.push_str("echo bulky\n");
    small_bash(&code, 30)
}

#[test]
fn a_full_store_answers_507_and_recovers_once_space_is_freed() {
    let _serial = serial();
    // Declared first, dropped last: the server is gone before the unmount.
    let tmpfs = Tmpfs::mount("16m");
    let db = tmpfs.path().join("tasks.db");
    let setup = Setup::new().database_url(&format!("sqlite://{}", db.display()));
    let server = setup.start();
    let mut history = Vec::new();
    // The store works.
    for n in 0..3 {
        let op = submit(&server, &bulky_task(64), format!("before #{n}"));
        assert_eq!(op.status, Some(202), "{op:?}");
        history.push(op);
    }
    assert_eq!(readyz(&server), 200);

    // The disk fills up.
    let filler: PathBuf = tmpfs.path().join("filler");
    let filled = fill(&filler);
    let mut full = 0;
    for n in 0..40 {
        let op = submit(&server, &bulky_task(64), format!("full #{n}"));
        let status = op
            .status
            .expect("the server answers while its disk is full");
        assert!(
            status == 202 || status == 507,
            "{}: answered {status} ({:?}) with a full disk; log:\n{}",
            op.what,
            op.error,
            server.log()
        );
        if status == 507 {
            assert_eq!(op.error.as_deref(), Some("STORAGE_FULL"), "{op:?}");
            full += 1;
        }
        history.push(op);
        if full >= 5 {
            break;
        }
    }
    assert!(
        full >= 5,
        "no 507 with a full disk ({filled} bytes of filler): {:?}",
        summary(&history)
    );
    assert_eq!(readyz(&server), 503, "/readyz while the store is full");
    // What the node holds in memory meanwhile (the writes of the tasks it
    // runs, waiting for their commit) is bounded by the tasks in flight
    // and shown: 2 workers, each with its start and its end to write.
    let page = server.get("/metrics").text;
    let pending = metric(&page, "taskexec_store_pending_writes")
        .unwrap_or_else(|| panic!("no taskexec_store_pending_writes in\n{page}"));
    assert!(
        pending <= 16.0,
        "{pending} writes held in memory by a node running 2 tasks at most"
    );

    // Space is freed: submissions are taken again and the node is ready.
    std::fs::remove_file(&filler).expect("remove the filler");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut n = 0;
    loop {
        n += 1;
        let op = submit(&server, &bulky_task(16), format!("after #{n}"));
        let status = op.status.expect("the server answers");
        assert!(status == 202 || status == 507, "{op:?}");
        let ok = status == 202;
        history.push(op);
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "no 202 after space was freed");
        std::thread::sleep(Duration::from_millis(100));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while readyz(&server) != 200 {
        assert!(
            Instant::now() < deadline,
            "/readyz not ready after space was freed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let records = check_acknowledged(&server, &history, Duration::from_secs(60));
    for (id, rec) in &records {
        assert_eq!(rec["status"], "COMPLETED", "task {id}: {rec:#}");
    }
    eprintln!(
        "a_full_store_answers_507_and_recovers_once_space_is_freed: {:?}; {} acknowledged, all \
         COMPLETED",
        summary(&history),
        records.len()
    );
    drop(server);
    drop(tmpfs);
}

#[test]
#[cfg_attr(
    taskexec_skip_postgres,
    ignore = "TASKEXEC_SKIP_POSTGRES=1: the PostgreSQL fault tests are skipped"
)]
fn a_node_stopped_past_its_lease_kills_its_sandbox_on_waking() {
    let _serial = serial();
    let Some(db) = PgDb::new() else { return };
    let flags = [("--workers", "1"), ("--lease", "2s")];
    let mut a = Worker::start(&db.url, &unique("a"), &flags);
    let api = Setup::new()
        .database_url(&db.url)
        .node(&unique("api"))
        .flag("--workers", "0")
        .start();
    // Each attempt sleeps in a process named after it (visible in the
    // host's /proc), long enough for B's attempt to outlast A's wake-up by
    // several seconds.
    let marker = unique("fence");
    let id = api.submit(&small_bash(
        &format!(
            "echo \"attempt=$TASK_ATTEMPT\"\n(exec -a {marker}-attempt-$TASK_ATTEMPT sleep 8)\necho done\n"
        ),
        60,
    ));
    let (on_a, on_b) = (format!("{marker}-attempt-1"), format!("{marker}-attempt-2"));
    wait_task(&api, &id, Duration::from_secs(30), "running on A", |r| {
        r["status"] == "RUNNING" && starts(r).last().is_some_and(|s| s.node == a.node)
    });
    util::server::wait_process(&on_a, Duration::from_secs(10));

    // A freezes with its sandbox up; B takes the task over once A's lease
    // expired.
    let b = Worker::start(&db.url, &unique("b"), &flags);
    a.signal("STOP");
    let b_node = b.node.clone();
    wait_task(&api, &id, Duration::from_secs(30), "taken over by B", |r| {
        starts(r).last().is_some_and(|s| s.node == b_node)
    });
    util::server::wait_process(&on_b, Duration::from_secs(10));
    assert!(
        !util::processes_with(&on_a).is_empty(),
        "A's attempt is still there while A is stopped"
    );

    // A wakes up: it cannot have renewed its lease, so it kills its
    // sandbox at once instead of running the task to its end.
    a.signal("CONT");
    let woke = Instant::now();
    util::server::wait_no_process(&on_a, Duration::from_secs(5));
    let fenced_in = woke.elapsed();
    assert!(
        !util::processes_with(&on_b).is_empty(),
        "B's attempt still runs when A's is gone"
    );
    let mid = get_task(&api, &id);
    assert_eq!(mid["status"], "RUNNING", "{mid:#}");
    assert!(
        a.log().contains("self-fencing"),
        "A logged no self-fencing; log:\n{}",
        a.log()
    );

    let done = wait_task(&api, &id, Duration::from_secs(60), "final", |r| {
        is_final(r["status"].as_str().unwrap_or(""))
    });
    let check = |rec: &Value| {
        let s = check_record(rec);
        assert_eq!(rec["status"], "COMPLETED", "{rec:#}");
        assert_eq!(
            s.iter()
                .map(|s| (s.attempt, s.node.as_str()))
                .collect::<Vec<_>>(),
            [(1, a.node.as_str()), (2, b.node.as_str())],
            "{rec:#}"
        );
        let attempts = rec["attempts"].as_array().expect("attempts");
        assert_eq!(attempts.len(), 2, "{rec:#}");
        assert_eq!(attempts[0]["status"], "FAILED", "{rec:#}");
        assert_eq!(
            attempts[0]["error"]["message"],
            format!("node {} lost", a.node),
            "{rec:#}"
        );
        assert_eq!(attempts[1]["status"], "COMPLETED", "{rec:#}");
        assert_eq!(rec["result"]["stdout"], "attempt=2\ndone\n", "{rec:#}");
    };
    check(&done);
    // A stops cleanly and writes nothing more about the task.
    let status = a.terminate(Duration::from_secs(30));
    assert!(status.success(), "A's exit: {status}; log:\n{}", a.log());
    let after = get_task(&api, &id);
    assert_eq!(after, done, "A changed the record after it was final");
    eprintln!(
        "a_node_stopped_past_its_lease_kills_its_sandbox_on_waking: A's sandbox gone \
         {fenced_in:.2?} after it woke; B completed the task"
    );
}

#[test]
#[cfg_attr(
    taskexec_skip_postgres,
    ignore = "TASKEXEC_SKIP_POSTGRES=1: the PostgreSQL fault tests are skipped"
)]
fn cut_database_connections_answer_503_and_lose_no_acknowledged_task() {
    let _serial = serial();
    let Some(db) = PgDb::new() else { return };
    let mut rng = Rng::new("cut_database_connections_answer_503_and_lose_no_acknowledged_task");
    let _worker = Worker::start(
        &db.url,
        &unique("w"),
        &[("--workers", "2"), ("--lease", "3s")],
    );
    let api = Setup::new()
        .database_url(&db.url)
        .node(&unique("api"))
        .flag("--workers", "0")
        .start();
    let stop = AtomicBool::new(false);
    let (history, cuts) = std::thread::scope(|s| {
        let clients: Vec<_> = (0..2)
            .map(|c| {
                let (api, stop) = (&api, &stop);
                s.spawn(move || {
                    let mut ops = Vec::new();
                    let mut n = 0;
                    while !stop.load(Ordering::SeqCst) {
                        n += 1;
                        ops.push(submit(api, &short_task(), format!("client {c} #{n}")));
                    }
                    ops
                })
            })
            .collect();
        // Connections cut at random instants, and two short outages.
        let mut cuts = 0;
        for round in 0..6 {
            std::thread::sleep(Duration::from_millis(rng.range(200, 700)));
            if round % 3 == 2 {
                cuts += db.outage(Duration::from_millis(rng.range(500, 1500)));
            } else {
                cuts += db.terminate_backends();
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::SeqCst);
        let history: Vec<Op> = clients
            .into_iter()
            .flat_map(|c| c.join().expect("a client thread"))
            .collect();
        (history, cuts)
    });
    for op in &history {
        match op.status {
            Some(202) => {}
            Some(503) => assert!(
                op.retry_after
                    .as_deref()
                    .is_some_and(|v| v.parse::<u64>().is_ok_and(|s| s >= 1)),
                "{}: 503 without Retry-After: {op:?}",
                op.what
            ),
            other => panic!(
                "{}: answered {other:?} ({:?}) during connection cuts; history {:?}; log:\n{}",
                op.what,
                op.error,
                summary(&history),
                api.log()
            ),
        }
    }
    let acked = history.iter().filter(|op| op.acked()).count();
    assert!(acked > 0, "nothing acknowledged: {:?}", summary(&history));
    let records = check_acknowledged(&api, &history, Duration::from_secs(90));
    for (id, rec) in &records {
        assert_eq!(rec["status"], "COMPLETED", "task {id}: {rec:#}");
    }
    eprintln!(
        "cut_database_connections_answer_503_and_lose_no_acknowledged_task: {cuts} connections \
         cut; {:?}; {acked} acknowledged, all COMPLETED once",
        summary(&history)
    );
}

#[test]
#[cfg_attr(
    taskexec_skip_postgres,
    ignore = "TASKEXEC_SKIP_POSTGRES=1: the PostgreSQL fault tests are skipped"
)]
fn a_task_lost_with_its_node_is_quarantined_at_the_set_count() {
    let _serial = serial();
    let Some(db) = PgDb::new() else { return };
    let mut a = Worker::start(
        &db.url,
        &unique("a"),
        &[("--workers", "1"), ("--lease", "2s")],
    );
    let api = Setup::new()
        .database_url(&db.url)
        .node(&unique("api"))
        .flag("--workers", "0")
        .start();
    let id = api.submit(&small_bash("sleep 30\n", 60));
    wait_task(&api, &id, Duration::from_secs(30), "running on A", |r| {
        r["status"] == "RUNNING" && starts(r).last().is_some_and(|s| s.node == a.node)
    });
    // A dies with the task; B, quarantining at the first lost attempt,
    // takes it over once A's lease expired and ends it instead of running
    // it again.
    a.kill();
    let _b = Worker::start(
        &db.url,
        &unique("b"),
        &[
            ("--workers", "1"),
            ("--lease", "2s"),
            ("--quarantine-after", "1"),
        ],
    );
    let rec = wait_task(&api, &id, Duration::from_secs(30), "final", |r| {
        is_final(r["status"].as_str().unwrap_or(""))
    });
    let s = check_record(&rec);
    assert_eq!(rec["status"], "FAILED", "{rec:#}");
    assert_eq!(
        rec["result"]["error"]["message"], "quarantined: 1 attempts were lost with their node",
        "{rec:#}"
    );
    assert_eq!(s.len(), 1, "not run again after the loss: {rec:#}");
}
