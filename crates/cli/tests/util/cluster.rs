//! Helpers of the scale-out tests: a scratch PostgreSQL database per test
//! (created and dropped with `psql`), `taskexec worker` processes on it
//! (killed when dropped), and readers of the node names and attempts a
//! task's record shows.
//!
//! The server is `postgres://postgres@127.0.0.1:5432/postgres`, or
//! `TASKEXEC_TEST_POSTGRES_URL` (a database the user may create databases
//! from), as for the store's PostgreSQL tests. Without a server the tests
//! fail, unless `TASKEXEC_SKIP_POSTGRES=1`, which skips them with a notice.
//!
//! Included by `scale_out.rs` only (`#[path]`), after `mod util;`.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use time::OffsetDateTime;

use crate::util::server::{Server, at, clear_env};
use crate::util::task_cgroups;

/// The server's default URL.
const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// How long a worker may take to start.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between two polls.
pub const POLL: Duration = Duration::from_millis(50);

/// The URL of the server's maintenance database.
fn admin_url() -> String {
    std::env::var("TASKEXEC_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned())
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

/// Runs `sql` on the maintenance database with `psql`: its stdout
/// (unaligned, tuples only), or its stderr as the error.
pub fn psql(sql: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d"])
        .arg(admin_url())
        .arg("-c")
        .arg(sql)
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run psql: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(format!(
            "psql ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Whether the PostgreSQL tests are to be skipped.
pub fn skipped() -> bool {
    std::env::var("TASKEXEC_SKIP_POSTGRES").is_ok_and(|v| v == "1")
}

/// Whether `psql` reaches the server, probed once per test binary: without
/// it, `postgresql_server_answers` fails with what to do, and every other
/// test of the suite is skipped instead of failing one by one.
pub fn server_answers() -> Result<(), String> {
    static PROBE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    PROBE
        .get_or_init(|| {
            psql("SELECT 1")
                .map(drop)
                .map_err(|e| format!("no PostgreSQL server answers at {}: {e}", admin_url()))
        })
        .clone()
}

/// A scratch database, dropped (`WITH (FORCE)`) with the value.
#[derive(Debug)]
pub struct PgDb {
    /// Its name.
    pub name: String,
    /// Its URL.
    pub url: String,
}

impl PgDb {
    /// A fresh, empty database; `None` (after a notice) when the PostgreSQL
    /// tests are skipped.
    pub fn new() -> Option<PgDb> {
        if skipped() {
            eprintln!("TASKEXEC_SKIP_POSTGRES=1: PostgreSQL test skipped");
            return None;
        }
        if let Err(e) = server_answers() {
            eprintln!("PostgreSQL test skipped ({e}); see postgresql_server_answers");
            return None;
        }
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(
            "taskexec_test_scale_{}_{nanos}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        if let Err(e) = psql(&format!("CREATE DATABASE \"{name}\"")) {
            panic!(
                "no PostgreSQL server answers at {}: {e}\n\
                 Start one (e.g. `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`), \
                 point TASKEXEC_TEST_POSTGRES_URL at one, or set TASKEXEC_SKIP_POSTGRES=1 to skip \
                 the PostgreSQL tests.",
                admin_url()
            );
        }
        let url = with_database(&admin_url(), &name);
        Some(PgDb { name, url })
    }

    /// Terminates every connection to the database (as a server restart
    /// would, without disturbing other databases); how many there were.
    pub fn terminate_backends(&self) -> usize {
        psql(&format!(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = '{}' AND pid <> pg_backend_pid()",
            self.name
        ))
        .expect("terminate the scratch database's connections")
        .parse()
        .expect("a count")
    }

    /// An outage of the database as a server restart makes it: new
    /// connections are refused and every open one is cut, for `down`; then
    /// connections are allowed again. Other databases of the server (other
    /// tests) are not disturbed. How many connections were cut.
    pub fn outage(&self, down: Duration) -> usize {
        psql(&format!(
            "ALTER DATABASE \"{}\" ALLOW_CONNECTIONS false",
            self.name
        ))
        .expect("refuse connections");
        let cut = self.terminate_backends();
        std::thread::sleep(down);
        psql(&format!(
            "ALTER DATABASE \"{}\" ALLOW_CONNECTIONS true",
            self.name
        ))
        .expect("allow connections again");
        cut
    }

    /// How many connections the database has.
    pub fn connections(&self) -> usize {
        psql(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}'",
            self.name
        ))
        .expect("count connections")
        .parse()
        .expect("a count")
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        if let Err(e) = psql(&format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            self.name
        )) {
            eprintln!("could not drop the scratch database {}: {e}", self.name);
        }
    }
}

/// A running `taskexec worker` (a node without HTTP); killed (SIGKILL,
/// after SIGCONT if it was stopped) and reaped when dropped.
#[derive(Debug)]
pub struct Worker {
    child: Child,
    /// Its pid.
    pub pid: u32,
    /// Its node id.
    pub node: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Worker {
    /// Starts `taskexec worker --database URL --node-id NODE` with 2 CPUs,
    /// 8Gi and the `flags` (e.g. `--workers 2`, `--lease 2s`), and waits
    /// for its "running" line.
    pub fn start(url: &str, node: &str, flags: &[(&str, &str)]) -> Worker {
        let dir = tempfile::Builder::new()
            .prefix("taskexec-worker-test-")
            .tempdir()
            .expect("temp dir");
        let log = dir.path().join("worker.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_taskexec"));
        cmd.arg("worker")
            .arg("--database")
            .arg(url)
            .arg("--node-id")
            .arg(node)
            .args(["--cpu-capacity", "2", "--memory-capacity", "8Gi"]);
        for (f, v) in flags {
            cmd.arg(f).arg(v);
        }
        clear_env(&mut cmd);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("create the worker log"))
            .spawn()
            .expect("spawn taskexec worker");
        let mut w = Worker {
            pid: child.id(),
            child,
            node: node.to_owned(),
            log,
            _dir: dir,
        };
        let ready = format!("worker {node} running");
        let deadline = Instant::now() + START_TIMEOUT;
        while !w.log().contains(&ready) {
            if let Ok(Some(status)) = w.child.try_wait() {
                panic!(
                    "taskexec worker {node} exited with {status}; log:\n{}",
                    w.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "taskexec worker {node} did not start in time; log:\n{}",
                w.log()
            );
            std::thread::sleep(POLL);
        }
        w
    }

    /// Its stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        self.child.kill().expect("kill the worker");
        self.child.wait().expect("reap the worker");
    }

    /// Sends `signal` (`STOP`, `CONT`, `TERM`) with `/bin/kill`.
    pub fn signal(&self, signal: &str) {
        let st = Command::new("/bin/kill")
            .arg(format!("-{signal}"))
            .arg(self.pid.to_string())
            .status()
            .expect("run /bin/kill");
        assert!(st.success(), "/bin/kill -{signal} {}", self.pid);
    }

    /// SIGTERM, then waits up to `within` for the exit.
    #[track_caller]
    pub fn terminate(&mut self, within: Duration) -> ExitStatus {
        self.signal("TERM");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "worker {} did not exit within {within:?} of SIGTERM; log:\n{}",
                self.node,
                self.log()
            );
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- log of worker {} ---\n{}", self.node, self.log());
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            // A stopped process dies of SIGKILL too; CONT lets it be reaped
            // at once whatever the kernel does first.
            let _ = Command::new("/bin/kill")
                .arg("-CONT")
                .arg(self.pid.to_string())
                .status();
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        remove_task_cgroups(self.pid);
    }
}

/// Removes the (empty) task cgroups a killed worker `pid` left behind,
/// waiting a little for its sandboxes to die (best effort).
fn remove_task_cgroups(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut left = task_cgroups(pid);
        if left.is_empty() || Instant::now() > deadline {
            return;
        }
        left.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        for dir in left {
            let _ = std::fs::remove_dir(dir);
        }
        std::thread::sleep(POLL);
    }
}

/// A bash task with small declared requests (100m CPU, 32Mi), so that
/// admission is not what limits a node.
pub fn small_bash(code: &str, timeout_secs: u32) -> Value {
    serde_json::json!({
        "definition": {"code": code},
        "executionConfig": {
            "runtime": "bash",
            "resourceRequirements": {"cpu": "0.1", "memory": "32Mi", "timeoutSeconds": timeout_secs},
        },
    })
}

/// Submits `tasks` through `POST /v1/tasks/batch` in batches of `batch`;
/// their ids in submission order.
#[track_caller]
pub fn submit_batches(api: &Server, tasks: &[Value], batch: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(tasks.len());
    for chunk in tasks.chunks(batch) {
        let r = api.post("/v1/tasks/batch", &serde_json::json!({ "tasks": chunk }));
        r.expect(202);
        let items = r.json["tasks"].as_array().expect("tasks");
        assert_eq!(items.len(), chunk.len(), "{}", r.text);
        ids.extend(
            items
                .iter()
                .map(|t| t["id"].as_str().expect("id").to_owned()),
        );
    }
    ids
}

/// The status of every task, by id (listing pages of 500). `None` when the
/// API did not answer 200 (e.g. its database connections were just cut).
pub fn statuses(api: &Server) -> Option<HashMap<String, String>> {
    let mut out = HashMap::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = "/v1/tasks?limit=500".to_owned();
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let r = api
            .call("GET", &path, None, crate::util::server::Auth::Default)
            .ok()?;
        if r.status != 200 {
            return None;
        }
        for row in r.json["items"].as_array()? {
            out.insert(
                row["id"].as_str()?.to_owned(),
                row["status"].as_str()?.to_owned(),
            );
        }
        match r.json["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return Some(out),
        }
    }
}

/// Polls the listing until every one of `ids` is final, failing after
/// `within` with the counts by status. Returns the counts by status.
#[track_caller]
pub fn wait_all_final(api: &Server, ids: &[String], within: Duration) -> BTreeMap<String, usize> {
    let deadline = Instant::now() + within;
    let mut last = BTreeMap::new();
    loop {
        if let Some(all) = statuses(api) {
            let mut counts = BTreeMap::new();
            let mut done = true;
            for id in ids {
                let st = all.get(id).map_or("MISSING", String::as_str);
                *counts.entry(st.to_owned()).or_insert(0) += 1;
                done &= crate::util::server::is_final(st);
            }
            if done {
                return counts;
            }
            last = counts;
        }
        assert!(
            Instant::now() < deadline,
            "not every task is final within {within:?}: {last:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// GET a task, retrying on transport errors and non-200 answers for up to
/// 30 s (the API node may be reconnecting to the database).
#[track_caller]
pub fn get_task(api: &Server, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let path = format!("/v1/tasks/{id}");
        match api.call("GET", &path, None, crate::util::server::Auth::Default) {
            Ok(r) if r.status == 200 => return r.json,
            other => assert!(Instant::now() < deadline, "GET {path}: {other:?}"),
        }
        std::thread::sleep(POLL);
    }
}

/// Every record of `ids`, fetched by `threads` threads at once.
pub fn get_all(api: &Server, ids: &[String], threads: usize) -> Vec<Value> {
    let per = ids.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = ids
            .chunks(per)
            .map(|chunk| {
                s.spawn(move || chunk.iter().map(|id| get_task(api, id)).collect::<Vec<_>>())
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("a fetching thread"))
            .collect()
    })
}

/// Polls the task until `done(record)`, failing after `within`.
#[track_caller]
pub fn wait_task(
    api: &Server,
    id: &str,
    within: Duration,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let rec = get_task(api, id);
        if done(&rec) {
            return rec;
        }
        assert!(
            Instant::now() < deadline,
            "task {id} not {what} within {within:?}: {rec:#}"
        );
        std::thread::sleep(POLL);
    }
}

/// One attempt's start, from its RUNNING transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    /// Attempt number.
    pub attempt: u32,
    /// The node that ran it.
    pub node: String,
    /// When it started.
    pub at: OffsetDateTime,
}

/// The RUNNING transitions of a record's history, parsed from their reason
/// "attempt N started on NODE".
#[track_caller]
pub fn starts(rec: &Value) -> Vec<Start> {
    rec["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter(|h| h["to"] == "RUNNING")
        .map(|h| {
            let reason = h["reason"].as_str().expect("reason");
            let (n, node) = reason
                .strip_prefix("attempt ")
                .and_then(|r| r.split_once(" started on "))
                .unwrap_or_else(|| panic!("a RUNNING reason {reason:?}"));
            Start {
                attempt: n
                    .parse()
                    .unwrap_or_else(|_| panic!("attempt in {reason:?}")),
                node: node.to_owned(),
                at: at(&h["at"]),
            }
        })
        .collect()
}

/// Asserts a final record is consistent: one RUNNING transition per
/// attempt number, attempts numbered 1, 2... each ending before the next
/// starts, every started attempt recorded, and exactly one final
/// transition, the last one, matching the status. Returns the starts.
#[track_caller]
pub fn check_record(rec: &Value) -> Vec<Start> {
    let id = rec["task"]["id"].as_str().unwrap_or("?");
    let status = rec["status"].as_str().expect("status");
    let history = rec["history"].as_array().expect("history");
    let finals: Vec<&str> = history
        .iter()
        .filter_map(|h| h["to"].as_str())
        .filter(|s| crate::util::server::is_final(s))
        .collect();
    assert_eq!(finals, [status], "task {id}: one final transition: {rec:#}");
    assert_eq!(
        history.last().map(|h| &h["to"]),
        Some(&rec["status"]),
        "task {id}: {rec:#}"
    );
    let starts = starts(rec);
    let mut seen = std::collections::HashSet::new();
    for s in &starts {
        assert!(
            seen.insert(s.attempt),
            "task {id}: attempt {} started twice: {rec:#}",
            s.attempt
        );
    }
    let attempts = rec["attempts"].as_array().expect("attempts");
    let mut prev_end: Option<OffsetDateTime> = None;
    for (i, a) in attempts.iter().enumerate() {
        assert_eq!(
            a["attempt"],
            i + 1,
            "task {id}: attempts numbered in order: {rec:#}"
        );
        let (start, end) = (at(&a["startTime"]), at(&a["endTime"]));
        assert!(
            start <= end,
            "task {id}: attempt {} ends before it starts",
            i + 1
        );
        if let Some(p) = prev_end {
            assert!(
                p <= start,
                "task {id}: attempt {} overlaps the one before: {rec:#}",
                i + 1
            );
        }
        prev_end = Some(end);
    }
    for s in &starts {
        assert!(
            (s.attempt as usize) <= attempts.len(),
            "task {id}: attempt {} started but not recorded: {rec:#}",
            s.attempt
        );
    }
    assert_eq!(
        rec["result"]["status"], rec["status"],
        "task {id}: the result: {rec:#}"
    );
    starts
}
