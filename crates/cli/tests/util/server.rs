//! Helpers of the service tests: start a real `taskexec serve` on a free
//! loopback port with its own SQLite database in a temp dir, drive it over
//! HTTP (ureq), and always kill it at the end ([`Server`]'s `Drop`).
//!
//! Nothing here sleeps a fixed amount to let something happen: every wait
//! polls a condition until a deadline.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// How long a server may take to start answering /healthz.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a test waits for a task to reach a state.
pub const TASK_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between two polls.
const POLL: Duration = Duration::from_millis(25);

/// How a server is started; cloned and started again, it restarts the same
/// node on the same database.
#[derive(Debug, Clone)]
pub struct Setup {
    dir: Arc<tempfile::TempDir>,
    node: String,
    flags: Vec<(String, String)>,
    token: Option<String>,
    starts: Arc<AtomicU32>,
    /// A database URL other than the temp dir's SQLite file.
    url: Option<String>,
}

impl Default for Setup {
    fn default() -> Self {
        Self::new()
    }
}

impl Setup {
    /// A new database in a new temp dir, a unique node id, 2 workers, 2 CPUs
    /// and 8Gi of memory to admit tasks against.
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("taskexec-service-test-")
            .tempdir()
            .expect("temp dir");
        Self {
            dir: Arc::new(dir),
            node: super::unique("node"),
            flags: vec![
                ("--workers".into(), "2".into()),
                ("--cpu-capacity".into(), "2".into()),
                ("--memory-capacity".into(), "8Gi".into()),
            ],
            token: None,
            starts: Arc::new(AtomicU32::new(0)),
            url: None,
        }
    }

    /// Sets `--FLAG VALUE` (replacing an earlier value of the same flag).
    #[must_use]
    pub fn flag(mut self, flag: &str, value: &str) -> Self {
        self.flags.retain(|(f, _)| f != flag);
        self.flags.push((flag.to_owned(), value.to_owned()));
        self
    }

    /// Requires `token` (`--auth-token`); the server's client sends it.
    #[must_use]
    pub fn token(mut self, token: &str) -> Self {
        self.token = Some(token.to_owned());
        self.flag("--auth-token", token)
    }

    /// Requires `token`, read from a file (`--auth-token-file`); the
    /// server's client sends it.
    #[must_use]
    pub fn token_file(mut self, token: &str) -> Self {
        let path = self.dir.path().join("token");
        std::fs::write(&path, format!("{token}\n")).expect("write the token file");
        self.token = Some(token.to_owned());
        self.flag("--auth-token-file", &path.to_string_lossy())
    }

    /// Uses this node id (default: a unique one).
    #[must_use]
    pub fn node(mut self, node: &str) -> Self {
        self.node = node.to_owned();
        self
    }

    /// Uses this database URL (e.g. a PostgreSQL one) instead of the temp
    /// dir's SQLite file.
    #[must_use]
    pub fn database_url(mut self, url: &str) -> Self {
        self.url = Some(url.to_owned());
        self
    }

    /// The database URL.
    pub fn database(&self) -> String {
        if let Some(url) = &self.url {
            return url.clone();
        }
        format!("sqlite://{}", self.dir.path().join("tasks.db").display())
    }

    /// The temp dir (database, token, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts `taskexec serve` and waits until it answers /healthz. A port
    /// taken between choosing it and binding it is retried with another.
    pub fn start(&self) -> Server {
        let mut last_log = String::new();
        for _ in 0..5 {
            let port = free_port();
            let n = self.starts.fetch_add(1, Ordering::Relaxed);
            let log = self.dir.path().join(format!("server-{n}.log"));
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_taskexec"));
            cmd.arg("serve")
                .arg("--listen")
                .arg(format!("127.0.0.1:{port}"))
                .arg("--database")
                .arg(self.database())
                .arg("--node-id")
                .arg(&self.node);
            for (f, v) in &self.flags {
                cmd.arg(f).arg(v);
            }
            clear_env(&mut cmd);
            let child = cmd
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).expect("create the server log"))
                .spawn()
                .expect("spawn taskexec serve");
            let mut server = Server {
                pid: child.id(),
                child,
                url: format!("http://127.0.0.1:{port}"),
                log,
                token: self.token.clone(),
                agent: agent(),
                _dir: Arc::clone(&self.dir),
            };
            match server.wait_started(port) {
                Ok(()) => return server,
                Err(log) if log.contains("os error 98") || log.contains("in use") => {
                    last_log = log;
                }
                Err(log) => panic!("taskexec serve did not start; its log:\n{log}"),
            }
        }
        panic!("taskexec serve found no free port; last log:\n{last_log}");
    }
}

/// Removes every `TASKEXEC_*` variable from a command's environment, so the
/// caller's settings cannot leak into the test.
pub fn clear_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("TASKEXEC_") {
            cmd.env_remove(k);
        }
    }
}

/// A port that was free a moment ago (bind port 0, read it, drop).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// A blocking HTTP client that returns error statuses as responses.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(90)))
        .build()
        .new_agent()
}

/// Which bearer token a request carries.
#[derive(Debug, Clone, Copy)]
pub enum Auth<'a> {
    /// The server's own token, if it has one.
    Default,
    /// None.
    Without,
    /// This one.
    With(&'a str),
}

/// A response, read whole.
#[derive(Debug)]
pub struct Resp {
    /// HTTP status.
    pub status: u16,
    /// Headers.
    pub headers: ureq::http::HeaderMap,
    /// The body as text.
    pub text: String,
    /// The body as JSON (`Null` if it is not JSON).
    pub json: Value,
}

impl Resp {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts the status; returns self.
    #[track_caller]
    pub fn expect(&self, status: u16) -> &Self {
        assert_eq!(
            self.status, status,
            "unexpected status; body: {}",
            self.text
        );
        self
    }

    /// Asserts an error response: `status`, a JSON body
    /// `{error: {type, message, field}}` of `kind` whose field is `field`.
    #[track_caller]
    pub fn expect_error(&self, status: u16, kind: &str, field: Option<&str>) -> &Self {
        self.expect(status);
        let e = &self.json["error"];
        assert_eq!(e["type"], kind, "error type; body: {}", self.text);
        assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "error message; body: {}",
            self.text
        );
        let obj = e.as_object().expect("error is an object");
        assert!(obj.contains_key("field"), "no field key: {}", self.text);
        assert_eq!(
            e["field"].as_str(),
            field,
            "error field; body: {}",
            self.text
        );
        self
    }

    /// `json["id"]` as a string.
    #[track_caller]
    pub fn id(&self) -> String {
        self.json["id"]
            .as_str()
            .unwrap_or_else(|| panic!("no id in {}", self.text))
            .to_owned()
    }
}

/// A running `taskexec serve`; killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct Server {
    child: Child,
    /// Its pid.
    pub pid: u32,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    log: PathBuf,
    token: Option<String>,
    agent: ureq::Agent,
    /// Keeps the database and the logs until the server is gone.
    _dir: Arc<tempfile::TempDir>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- log of the server at {} ---\n{}", self.url, self.log());
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        remove_task_cgroups(self.pid);
    }
}

/// Removes the (empty) task cgroups a killed executor `pid` left behind,
/// waiting a little for its sandboxes to die (best effort: never panics).
fn remove_task_cgroups(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut left = super::task_cgroups(pid);
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

impl Server {
    fn wait_started(&mut self, port: u16) -> Result<(), String> {
        let ready = format!("serving on http://127.0.0.1:{port}");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("exited with {status}\n{}", self.log()));
            }
            // The line is printed once the listener is bound by this very
            // process: /healthz then cannot be another test's server.
            if self.log().contains(&ready)
                && self
                    .call("GET", "/healthz", None, Auth::Without)
                    .is_ok_and(|r| r.status == 200)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                panic!("taskexec serve not healthy in time; log:\n{}", self.log());
            }
            std::thread::sleep(POLL);
        }
    }

    /// The server's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The token the server requires, if any.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// Sends a request; `body` is sent as `application/json` bytes.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        auth: Auth<'_>,
    ) -> Result<Resp, ureq::Error> {
        self.call_with(method, path, body, auth, &[])
    }

    /// [`Server::call`] with extra headers.
    pub fn call_with(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        auth: Auth<'_>,
        headers: &[(&str, &str)],
    ) -> Result<Resp, ureq::Error> {
        let url = format!("{}{path}", self.url);
        let token = match auth {
            Auth::Default => self.token.clone(),
            Auth::Without => None,
            Auth::With(t) => Some(t.to_owned()),
        };
        let mut all: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        if let Some(t) = token {
            all.push(("Authorization".into(), format!("Bearer {t}")));
        }
        let has_ct = all
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"));
        if body.is_some() && !has_ct {
            all.push(("Content-Type".into(), "application/json".into()));
        }
        let res = match method {
            "GET" | "DELETE" | "HEAD" => {
                let mut r = match method {
                    "GET" => self.agent.get(&url),
                    "DELETE" => self.agent.delete(&url),
                    _ => self.agent.head(&url),
                };
                for (k, v) in &all {
                    r = r.header(k.as_str(), v.as_str());
                }
                r.call()?
            }
            "POST" | "PUT" => {
                let mut r = if method == "POST" {
                    self.agent.post(&url)
                } else {
                    self.agent.put(&url)
                };
                for (k, v) in &all {
                    r = r.header(k.as_str(), v.as_str());
                }
                r.send(body.unwrap_or(&[]))?
            }
            other => panic!("unsupported method {other}"),
        };
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let text = res
            .into_body()
            .with_config()
            .limit(64 << 20)
            .read_to_string()?;
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Ok(Resp {
            status,
            headers,
            text,
            json,
        })
    }

    /// GET `path` with the server's token.
    #[track_caller]
    pub fn get(&self, path: &str) -> Resp {
        self.call("GET", path, None, Auth::Default)
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// POST `body` as JSON to `path` with the server's token.
    #[track_caller]
    pub fn post(&self, path: &str, body: &Value) -> Resp {
        self.post_with(path, body, &[])
    }

    /// [`Server::post`] with extra headers.
    #[track_caller]
    pub fn post_with(&self, path: &str, body: &Value, headers: &[(&str, &str)]) -> Resp {
        let bytes = serde_json::to_vec(body).expect("serialize");
        self.call_with("POST", path, Some(&bytes), Auth::Default, headers)
            .unwrap_or_else(|e| panic!("POST {path}: {e}"))
    }

    /// POST raw bytes as `application/json` to `path`.
    #[track_caller]
    pub fn post_raw(&self, path: &str, bytes: &[u8]) -> Resp {
        self.call("POST", path, Some(bytes), Auth::Default)
            .unwrap_or_else(|e| panic!("POST {path}: {e}"))
    }

    /// Submits a task; asserts 202 and returns its id.
    #[track_caller]
    pub fn submit(&self, task: &Value) -> String {
        let r = self.post("/v1/tasks", task);
        r.expect(202);
        r.id()
    }

    /// The task record.
    #[track_caller]
    pub fn task(&self, id: &str) -> Value {
        let r = self.get(&format!("/v1/tasks/{id}"));
        r.expect(200);
        r.json
    }

    /// Polls the task until `done(record)`, failing after [`TASK_TIMEOUT`].
    #[track_caller]
    pub fn wait_for(&self, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + TASK_TIMEOUT;
        loop {
            let rec = self.task(id);
            if done(&rec) {
                return rec;
            }
            assert!(
                Instant::now() < deadline,
                "task {id} not {what} in time: {rec:#}\nserver log:\n{}",
                self.log()
            );
            std::thread::sleep(POLL);
        }
    }

    /// Polls until the task has status `status`.
    #[track_caller]
    pub fn wait_status(&self, id: &str, status: &str) -> Value {
        self.wait_for(id, status, |r| r["status"] == status)
    }

    /// Polls until the task is final (its result is stored).
    #[track_caller]
    pub fn wait_final(&self, id: &str) -> Value {
        self.wait_for(id, "final", |r| {
            is_final(r["status"].as_str().unwrap_or(""))
        })
    }

    /// All tasks (following cursors), newest first, as listing rows.
    #[track_caller]
    pub fn list_all(&self, query: &str) -> Vec<Value> {
        let mut rows = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut path = format!("/v1/tasks?limit=100{query}");
            if let Some(c) = &cursor {
                path.push_str(&format!("&cursor={c}"));
            }
            let r = self.get(&path);
            r.expect(200);
            rows.extend(r.json["items"].as_array().cloned().unwrap_or_default());
            match r.json["nextCursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => return rows,
            }
        }
    }

    /// Reads `GET /v1/tasks/{id}/events` as a stream until it ends, calling
    /// `on_event` with each event's name and data as they arrive; returns
    /// the events.
    #[track_caller]
    pub fn events(&self, id: &str, mut on_event: impl FnMut(&str, &Value)) -> Vec<(String, Value)> {
        let url = format!("{}/v1/tasks/{id}/events", self.url);
        let mut r = self.agent.get(&url).header("Accept", "text/event-stream");
        if let Some(t) = &self.token {
            r = r.header("Authorization", format!("Bearer {t}"));
        }
        let res = r.call().unwrap_or_else(|e| panic!("GET {url}: {e}"));
        assert_eq!(res.status().as_u16(), 200, "events of {id}");
        let ct = res
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        assert!(ct.starts_with("text/event-stream"), "content type {ct:?}");
        let reader = BufReader::new(res.into_body().into_reader());
        let mut events = Vec::new();
        let (mut name, mut data) = (String::new(), String::new());
        for line in reader.lines() {
            let line = line.expect("read the event stream");
            if line.is_empty() {
                if !data.is_empty() || !name.is_empty() {
                    let value = serde_json::from_str(&data)
                        .unwrap_or_else(|e| panic!("event data {data:?}: {e}"));
                    let ev_name = if name.is_empty() {
                        "message".to_owned()
                    } else {
                        std::mem::take(&mut name)
                    };
                    on_event(&ev_name, &value);
                    events.push((ev_name, value));
                    data.clear();
                }
            } else if line.starts_with(':') {
                // A keep-alive comment.
            } else if let Some(v) = line.strip_prefix("event:") {
                name = v.trim().to_owned();
            } else if let Some(v) = line.strip_prefix("data:") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(v.strip_prefix(' ').unwrap_or(v));
            }
        }
        events
    }

    /// SIGKILL, then reap.
    pub fn kill_hard(&mut self) {
        self.child.kill().expect("kill the server");
        self.child.wait().expect("reap the server");
    }

    /// SIGTERM (with `/bin/kill`), then waits up to `within` for the exit.
    #[track_caller]
    pub fn terminate(&mut self, within: Duration) -> ExitStatus {
        let st = Command::new("/bin/kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status()
            .expect("run /bin/kill");
        assert!(st.success(), "/bin/kill -TERM {}", self.pid);
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the server did not exit within {within:?} of SIGTERM; log:\n{}",
                self.log()
            );
            std::thread::sleep(POLL);
        }
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends `head` then `body` over a raw connection, writing as much of
    /// the body as the server takes, and reads the response whatever
    /// happened to the write (a server may answer early and close). Returns
    /// the status and the response body.
    #[track_caller]
    pub fn raw_post(&self, path: &str, body: &[u8]) -> (u16, Value) {
        let addr = self.url.trim_start_matches("http://");
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_write_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut head = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n",
            body.len()
        );
        if let Some(t) = &self.token {
            head.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes())
            .expect("write the request head");
        for chunk in body.chunks(256 << 10) {
            if s.write_all(chunk).is_err() {
                break;
            }
        }
        let _ = s.flush();
        let mut raw = Vec::new();
        let mut buf = [0u8; 16 << 10];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
                Err(e) if raw.is_empty() => panic!("reading the response: {e}"),
                Err(_) => break,
            }
        }
        let text = String::from_utf8_lossy(&raw).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {text:?}"));
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b)
            .unwrap_or_default();
        (status, serde_json::from_str(body).unwrap_or(Value::Null))
    }
}

/// Whether a status is final.
pub fn is_final(status: &str) -> bool {
    matches!(status, "COMPLETED" | "FAILED" | "REJECTED" | "CANCELLED")
}

/// A bash task.
pub fn bash(code: &str) -> Value {
    json!({"definition": {"code": code}, "executionConfig": {"runtime": "bash"}})
}

/// A python task.
pub fn python(code: &str) -> Value {
    json!({"definition": {"code": code}, "executionConfig": {"runtime": "python"}})
}

/// A bash task that sleeps `secs` in a process named `marker` (visible in
/// the host's /proc, see [`super::processes_with`]).
pub fn marked_sleeper(marker: &str, secs: u32) -> Value {
    bash(&format!(
        "echo \"attempt=$TASK_ATTEMPT\"\nexec -a {marker} sleep {secs}\n"
    ))
}

/// A bash task that sleeps `secs`.
pub fn sleeper(secs: u32) -> Value {
    bash(&format!("sleep {secs}\necho slept\n"))
}

/// The `to` of each transition of a record's history.
pub fn history_tos(rec: &Value) -> Vec<String> {
    rec["history"]
        .as_array()
        .expect("history")
        .iter()
        .map(|h| h["to"].as_str().expect("to").to_owned())
        .collect()
}

/// Parses an RFC 3339 time.
#[track_caller]
pub fn at(v: &Value) -> OffsetDateTime {
    let s = v.as_str().unwrap_or_else(|| panic!("not a time: {v}"));
    OffsetDateTime::parse(s, &Rfc3339).unwrap_or_else(|e| panic!("time {s:?}: {e}"))
}

/// Polls until no host process has `marker` in its command line.
#[track_caller]
pub fn wait_no_process(marker: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let left = super::processes_with(marker);
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "processes {left:?} with {marker:?} still run"
        );
        std::thread::sleep(POLL);
    }
}

/// Polls until some host process has `marker` in its command line.
#[track_caller]
pub fn wait_process(marker: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while super::processes_with(marker).is_empty() {
        assert!(Instant::now() < deadline, "no process with {marker:?}");
        std::thread::sleep(POLL);
    }
}

/// Runs the `taskexec` binary with `args` (no `TASKEXEC_*` environment):
/// (exit code, stdout, stderr).
pub fn cli(args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_taskexec"));
    cmd.args(args);
    clear_env(&mut cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .expect("run the taskexec client");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
