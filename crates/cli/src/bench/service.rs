//! The service measured from outside: a `taskexec serve` child on a free
//! loopback port with its own SQLite database in a temp dir, driven over
//! HTTP; and the drain of many queued tasks with the server's own peak
//! memory (VmHWM). Also `bench --server URL` against a running server.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use serde_json::{Value, json};

use super::local::clear_taskexec_env;
use super::measure::{Contender, Sample};
use super::progress::Progress;
use super::stats::{Kind, Samples};

/// How long the server may take to answer /healthz.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Tasks per batch submission (the API's maximum).
const BATCH: usize = 1000;

/// A blocking HTTP client that returns error statuses as responses.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(600)))
        .build()
        .new_agent()
}

/// A `taskexec serve` child; killed if still running when dropped.
#[derive(Debug)]
pub struct ServerChild {
    child: Child,
    /// Its base URL.
    pub url: String,
    /// Its flags after `serve`, for the report (the port and the temp
    /// dir as placeholders).
    pub flags: Vec<String>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl ServerChild {
    /// Starts `taskexec serve` with `extra` flags (and its SQLite database's
    /// `synchronous` mode, if given) and waits for /healthz.
    pub fn start(
        exe: &Path,
        globals: &[String],
        extra: &[String],
        synchronous: Option<&str>,
    ) -> anyhow::Result<Self> {
        let query = synchronous
            .map(|m| format!("?synchronous={m}"))
            .unwrap_or_default();
        let dir = tempfile::Builder::new()
            .prefix("taskexec-bench-serve-")
            .tempdir()
            .context("temp dir")?;
        let mut last = String::new();
        for attempt in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .context("finding a free port")?
                .port();
            let log = dir.path().join(format!("serve-{attempt}.log"));
            let mut flags = vec![
                "--listen".to_string(),
                format!("127.0.0.1:{port}"),
                "--database".to_string(),
                format!("sqlite://{}{query}", dir.path().join("bench.db").display()),
                "--node-id".to_string(),
                "bench".to_string(),
            ];
            flags.extend(extra.iter().cloned());
            let mut cmd = Command::new(exe);
            cmd.args(globals).arg("serve").args(&flags);
            clear_taskexec_env(&mut cmd);
            let mut child = cmd
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).context("creating the server log")?)
                .spawn()
                .context("starting taskexec serve")?;
            let url = format!("http://127.0.0.1:{port}");
            match wait_started(&mut child, &url, &log) {
                Ok(()) => {
                    let mut shown = vec![
                        "--listen".to_string(),
                        "127.0.0.1:PORT".to_string(),
                        "--database".to_string(),
                        format!("sqlite://TMPDIR/bench.db{query}"),
                    ];
                    shown.extend(flags.into_iter().skip(4));
                    return Ok(Self {
                        child,
                        url,
                        flags: shown,
                        log,
                        _dir: dir,
                    });
                }
                Err(e) => {
                    child.kill().ok();
                    child.wait().ok();
                    last = format!("{e:#}");
                    // Another process took the port: try another one.
                    if !(last.contains("os error 98") || last.contains("in use")) {
                        bail!(last);
                    }
                }
            }
        }
        bail!("taskexec serve found no free port: {last}")
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log)
    }

    /// The server's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A `VmXXX:` figure of /proc/<pid>/status, in MiB.
    pub fn vm(&self, field: &str) -> Option<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix(field))?
            .trim_start_matches(':')
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        Some(kib / 1024.0)
    }

    /// SIGTERM, then up to 20 s for a graceful exit, then SIGKILL.
    pub fn stop(mut self) -> anyhow::Result<()> {
        let _ = Command::new("/bin/kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        self.child.kill().ok();
        self.child.wait().ok();
        bail!("taskexec serve did not stop within 20 s of SIGTERM; killed")
    }
}

/// Waits until the child answers /healthz, or fails with its log.
fn wait_started(child: &mut Child, url: &str, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    let agent = agent();
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "taskexec serve exited ({status}); its log:\n{}",
                log_tail(log)
            );
        }
        if let Ok(r) = agent.get(format!("{url}/healthz")).call()
            && r.status() == 200
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "taskexec serve did not answer /healthz within {START_TIMEOUT:?}; its log:\n{}",
                log_tail(log)
            );
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The last 20 lines of a log file.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// One task through the service: `POST /v1/tasks?wait=300s` until the
/// final result is stored and returned. Its phases: `attempt`, the
/// attempt's own duration as the server recorded it (the sandboxed run,
/// from its start to its end), and `overhead`, the latency less that: what
/// the API, the store and the scheduler added.
pub fn service_contender<'a>(
    name: String,
    agent: &'a ureq::Agent,
    base: &'a str,
    token: Option<&'a str>,
    task: &'a Value,
) -> Contender<'a> {
    Contender {
        name,
        kind: Kind::Service,
        run: Box::new(move || {
            let t = Instant::now();
            let mut req = agent.post(format!("{base}/v1/tasks?wait=300s"));
            if let Some(tok) = token {
                req = req.header("Authorization", format!("Bearer {tok}"));
            }
            let mut r = req.send_json(task).context("POST /v1/tasks")?;
            let v: Value = r.body_mut().read_json().unwrap_or_default();
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            if v["status"] != "COMPLETED" {
                bail!(
                    "the service answered {}: status {}, error {}",
                    r.status(),
                    v["status"],
                    v["result"]["error"]
                );
            }
            let mut phases = std::collections::BTreeMap::new();
            if let Some(attempt) = v["result"]["executionMetadata"]["attempts"]
                .as_array()
                .and_then(|a| a.last())
                .and_then(|a| a["durationMs"].as_f64())
            {
                phases.insert("attempt".to_string(), attempt);
                phases.insert("overhead".to_string(), ms - attempt);
            }
            Ok(Sample { ms, phases })
        }),
    }
}

/// What the drain measured.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Drain {
    /// Tasks submitted.
    pub tasks: usize,
    /// What each task was.
    pub task: String,
    /// The server's flags.
    pub serve_flags: Vec<String>,
    /// Time to submit them all (batches of 1,000), s.
    pub submit_seconds: f64,
    /// From the first submission until every task was final, s.
    pub drain_seconds: f64,
    /// Tasks per second over the drain.
    pub throughput_per_s: f64,
    /// Tasks that ended COMPLETED.
    pub completed: u64,
    /// Tasks that ended otherwise.
    pub not_completed: u64,
    /// The server's RSS once started, before any submission, MiB.
    pub idle_rss_mib: Option<f64>,
    /// The server's own peak RSS (VmHWM of /proc/PID/status) after the
    /// drain, MiB. Launchers and tasks are other processes.
    pub peak_rss_mib: Option<f64>,
    /// The server's RSS after the drain, MiB.
    pub final_rss_mib: Option<f64>,
}

/// Sum of `taskexec_tasks_finished_total` in a /metrics text, and the
/// COMPLETED part of it.
fn finished(metrics: &str) -> (u64, u64) {
    let mut all = 0.0;
    let mut ok = 0.0;
    for l in metrics.lines() {
        if let Some(rest) = l.strip_prefix(taskexec_service::metric::TASKS_FINISHED_TOTAL.name) {
            let v: f64 = rest
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            all += v;
            if rest.contains("status=\"COMPLETED\"") {
                ok += v;
            }
        }
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "counters: whole, non-negative, below 2^53"
    )]
    let counts = (all as u64, ok as u64);
    counts
}

/// Submits `n` copies of `task` in batches to a fresh server and waits
/// until all are final, watching the server's memory.
pub fn drain(
    server: &ServerChild,
    task: &Value,
    describe: String,
    n: usize,
    progress: &Progress,
) -> anyhow::Result<Drain> {
    let agent = agent();
    let idle = server.vm("VmRSS");
    let base = progress.done();
    let t0 = Instant::now();
    let mut left = n;
    while left > 0 {
        let k = left.min(BATCH);
        let body = json!({"tasks": vec![task; k]});
        let mut r = agent
            .post(format!("{}/v1/tasks/batch", server.url))
            .send_json(&body)
            .context("POST /v1/tasks/batch")?;
        if r.status() != 202 {
            let text = r.body_mut().read_to_string().unwrap_or_default();
            bail!("batch submission answered {}: {text}", r.status());
        }
        left -= k;
    }
    let submit = t0.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(3600);
    let (all, ok) = loop {
        let text = agent
            .get(format!("{}/metrics", server.url))
            .call()
            .context("GET /metrics")?
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_string()
            .context("reading /metrics")?;
        let (all, ok) = finished(&text);
        progress.set(base + all.min(n as u64));
        if all >= n as u64 {
            break (all, ok);
        }
        if Instant::now() > deadline {
            bail!("{all} of {n} tasks final after an hour; giving up");
        }
        if server.vm("VmRSS").is_none() {
            bail!("taskexec serve died; its log:\n{}", server.log_tail());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let drain = t0.elapsed().as_secs_f64();
    Ok(Drain {
        tasks: n,
        task: describe,
        serve_flags: server.flags.clone(),
        submit_seconds: round2(submit),
        drain_seconds: round2(drain),
        throughput_per_s: round2(n as f64 / drain),
        completed: ok,
        not_completed: all - ok,
        idle_rss_mib: idle.map(round2),
        peak_rss_mib: server.vm("VmHWM").map(round2),
        final_rss_mib: server.vm("VmRSS").map(round2),
    })
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// `taskexec bench --server URL`: end-to-end latency and throughput of a
/// running server from `concurrency` submitters.
pub fn external(
    url: &str,
    task: &Value,
    tasks: usize,
    concurrency: usize,
    token: Option<&str>,
) -> anyhow::Result<(Samples, usize)> {
    let agent = agent();
    let base = url.trim_end_matches('/').to_string();
    let k = service_contender(
        format!("service end to end, concurrency {concurrency}"),
        &agent,
        &base,
        token,
        task,
    );
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failures = std::sync::atomic::AtomicUsize::new(0);
    let latencies = std::sync::Mutex::new(Vec::with_capacity(tasks));
    let t0 = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..concurrency.max(1) {
            scope.spawn(|| {
                while next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < tasks {
                    match (k.run)() {
                        Ok(s) => latencies
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(s.ms),
                        Err(_) => {
                            failures.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                    }
                }
            });
        }
    });
    let mut s = Samples::new(k.name.clone(), Kind::Service);
    s.wall_s = t0.elapsed().as_secs_f64();
    s.ms = latencies.into_inner().unwrap_or_default();
    Ok((s, failures.into_inner()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finished_sums_every_label_combination() {
        let text = "# TYPE taskexec_tasks_finished_total counter\n\
            taskexec_tasks_finished_total{runtime=\"bash\",status=\"COMPLETED\",error_type=\"none\"} 9998\n\
            taskexec_tasks_finished_total{runtime=\"bash\",status=\"FAILED\",error_type=\"TIMEOUT\"} 2\n\
            taskexec_tasks_submitted_total{runtime=\"bash\"} 10000\n";
        assert_eq!(finished(text), (10000, 9998));
        assert_eq!(finished(""), (0, 0));
    }
}
