//! Helpers of the end-to-end tests: run the real `taskexec` binary with
//! `--json`, parse its TaskResult, and check that the run left nothing on
//! the host (no task cgroup, no sandbox mount).

#![allow(dead_code)]

pub mod server;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// What one invocation of the binary produced.
#[derive(Debug)]
pub struct Run {
    /// Exit code of the binary.
    pub code: i32,
    /// Stdout parsed as JSON (`Null` when it is not JSON, e.g. empty).
    pub result: Value,
    /// Raw stdout.
    pub stdout: String,
    /// Raw stderr.
    pub stderr: String,
    /// Wall time of the whole invocation.
    pub elapsed: Duration,
    /// Pid of the executor process (names its task cgroups).
    pub pid: u32,
}

impl Run {
    /// `error.type`, or "" when there is no error.
    pub fn error_type(&self) -> &str {
        self.result["error"]["type"].as_str().unwrap_or("")
    }

    /// `error.message`, or "".
    pub fn message(&self) -> &str {
        self.result["error"]["message"].as_str().unwrap_or("")
    }

    /// `error.details`.
    pub fn details(&self) -> &Value {
        &self.result["error"]["details"]
    }

    /// The attempt records.
    pub fn attempts(&self) -> &[Value] {
        self.result["executionMetadata"]["attempts"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Asserts the exit code, status and error type (`None`: no error).
    pub fn expect(&self, code: i32, status: &str, error_type: Option<&str>) -> &Self {
        let ctx = || format!("stdout:\n{}\nstderr:\n{}", self.stdout, self.stderr);
        assert_eq!(self.result["status"], status, "status; {}", ctx());
        match error_type {
            Some(t) => assert_eq!(self.error_type(), t, "error type; {}", ctx()),
            None => assert!(self.result["error"].is_null(), "no error; {}", ctx()),
        }
        assert_eq!(self.code, code, "exit code; {}", ctx());
        self
    }

    /// Asserts RESOURCE_EXHAUSTION of `resource` (FAILED, exit 1).
    pub fn expect_exhausted(&self, resource: &str) -> &Self {
        self.expect(1, "FAILED", Some("RESOURCE_EXHAUSTION"));
        assert_eq!(self.details()["resource"], resource, "{}", self.stdout);
        self
    }

    /// Asserts FAILED TIMEOUT on `limit` ("timeoutSeconds", "cpuTimeSeconds").
    pub fn expect_timeout(&self, limit: &str) -> &Self {
        self.expect(1, "FAILED", Some("TIMEOUT"));
        assert_eq!(self.details()["limit"], limit, "{}", self.stdout);
        self
    }

    /// The task's output.
    pub fn output(&self) -> &Value {
        &self.result["output"]
    }
}

/// The workspace's `examples/` directory.
pub fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

/// An example file's path as an argument.
pub fn example(rel: &str) -> String {
    examples().join(rel).to_string_lossy().into_owned()
}

/// A string unique to this call (pid, time and a counter).
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs `taskexec ARGS` with extra environment `envs`, then checks that the
/// host is clean (see [`assert_host_clean`]).
pub fn taskexec(args: &[&str], envs: &[(&str, &str)]) -> Run {
    let mounts_before = sandbox_mounts();
    let start = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_taskexec"))
        .args(args)
        .env_remove("TASKEXEC_LOG")
        .env_remove("TASKEXEC_LOG_FORMAT")
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn taskexec");
    let pid = child.id();
    let out = child.wait_with_output().expect("wait for taskexec");
    let elapsed = start.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let run = Run {
        code: out.status.code().unwrap_or(-1),
        result: serde_json::from_str(&stdout).unwrap_or(Value::Null),
        stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed,
        pid,
    };
    assert_host_clean(pid, &mounts_before);
    run
}

/// The file name a task of `runtime` is written to.
fn file_name(runtime: &str) -> &'static str {
    match runtime {
        "python" => "main.py",
        "node" => "main.js",
        "java" => "Main.java",
        "bash" => "main.sh",
        _ => "main.txt",
    }
}

/// Writes `code` to a temp file and runs it with `--runtime RUNTIME --json`
/// and `extra` flags, with extra environment `envs` for the binary.
pub fn run_code(code: &str, runtime: &str, extra: &[&str], envs: &[(&str, &str)]) -> Run {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join(file_name(runtime));
    std::fs::write(&file, code).expect("write the task's code");
    let file = file.to_string_lossy().into_owned();
    let mut args = vec!["run", file.as_str(), "--runtime", runtime, "--json"];
    args.extend_from_slice(extra);
    taskexec(&args, envs)
}

/// `run_code` without extra environment, as (exit code, TaskResult).
pub fn run_task(code: &str, runtime: &str, extra: &[&str]) -> (i32, Value) {
    let run = run_code(code, runtime, extra, &[]);
    (run.code, run.result)
}

/// Runs a whole TaskInstance (`--task FILE --json`) with `extra` flags.
pub fn run_task_json(task: &Value, extra: &[&str]) -> Run {
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    serde_json::to_writer(&mut file, task).expect("write the task");
    let path = file.path().to_string_lossy().into_owned();
    let mut args = vec!["run", "--task", path.as_str(), "--json"];
    args.extend_from_slice(extra);
    taskexec(&args, &[])
}

/// Directories named `taskexec-<pid>-*` anywhere under /sys/fs/cgroup: the
/// task cgroups of the executor with that pid.
pub fn task_cgroups(pid: u32) -> Vec<PathBuf> {
    fn walk(dir: &Path, prefix: &str, depth: u32, found: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            // file_type() does not follow symlinks (cpu -> cpu,cpuacct).
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let path = e.path();
            if e.file_name().to_string_lossy().starts_with(prefix) {
                found.push(path.clone());
            }
            if depth > 0 {
                walk(&path, prefix, depth - 1, found);
            }
        }
    }
    let mut found = Vec::new();
    walk(
        Path::new("/sys/fs/cgroup"),
        &format!("taskexec-{pid}-"),
        12,
        &mut found,
    );
    found
}

/// Mounts of the host's namespaces that look like a sandbox's (a leaked
/// staging root at /tmp, a work dir, the support dir, a scratch tmpfs...),
/// counted by "mount point fstype".
pub fn sandbox_mounts() -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for file in ["/proc/1/mountinfo", "/proc/self/mountinfo"] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for line in text.lines() {
            let Some((pre, post)) = line.split_once(" - ") else {
                continue;
            };
            let point = pre.split(' ').nth(4).unwrap_or("");
            let fstype = post.split(' ').next().unwrap_or("");
            let suspicious = point.contains("taskexec")
                || point.contains(".scratch")
                || (matches!(fstype, "tmpfs" | "proc")
                    && matches!(point, "/" | "/tmp" | "/task" | "/dev" | "/proc" | "/opt"));
            if suspicious {
                *seen.entry(format!("{file}: {point} {fstype}")).or_insert(0) += 1;
            }
        }
    }
    seen
}

/// Asserts that the executor `pid` left no task cgroup and no new
/// sandbox-like mount behind (`before`: [`sandbox_mounts`] before the run).
/// A cgroup v1/v2 directory cannot be removed while a process is in it, so
/// no cgroup left also means no sandbox process left.
pub fn assert_host_clean(pid: u32, before: &BTreeMap<String, usize>) {
    let left = task_cgroups(pid);
    assert!(left.is_empty(), "task cgroups left behind: {left:?}");
    let after = sandbox_mounts();
    for (mount, n) in &after {
        assert!(
            *n <= before.get(mount).copied().unwrap_or(0),
            "a sandbox mount appeared on the host: {mount} (before: {before:?})"
        );
    }
}

/// Pids of host processes whose command line contains `marker`.
pub fn processes_with(marker: &str) -> Vec<u32> {
    let me = std::process::id();
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(marker) {
            pids.push(pid);
        }
    }
    pids
}
