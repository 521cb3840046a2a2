//! What the executor asks of the launcher, and what the launcher reports back.
//!
//! The executor serializes a [`LaunchSpec`] (plus file contents as frame blobs)
//! into the launcher's spec pipe, in two frames: its base
//! ([`LaunchSpec::base`], what shapes the sandbox), then, after the launcher
//! is ready, the whole spec with the work files; the launcher answers on its
//! report pipe with [`Report`] frames. Paths inside the sandbox are absolute sandbox paths;
//! paths of files to create are relative to their directory and were checked
//! by the caller (the model's `validate_static`) and again here.

use serde::{Deserialize, Serialize};

/// A host path bound read-only at the same path inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoMount {
    /// Absolute host path (file, directory, or symlink to replicate).
    pub path: String,
    /// Skip silently when the host path does not exist.
    pub optional: bool,
}

/// A file the launcher writes into the sandbox before the task starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxFile {
    /// Path relative to the directory it is written to (no `..`, not absolute).
    pub path: String,
    /// File contents.
    pub content: Vec<u8>,
    /// Mode 0755 instead of 0644.
    pub executable: bool,
}

/// Metadata of a [`SandboxFile`] as it travels in the spec header; the
/// contents follow as blobs in the same order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FileMeta {
    pub path: String,
    pub executable: bool,
}

/// Everything the launcher needs to build the sandbox and start the task.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct LaunchSpec {
    pub hostname: String,
    pub uid: u32,
    pub gid: u32,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub ro_mounts: Vec<RoMount>,
    /// Files under the work dir, writable by the task.
    pub work_files: Vec<FileMeta>,
    /// Files under the read-only support dir.
    pub support_files: Vec<FileMeta>,
    /// Extra files placed in the read-only `/etc` (passwd, group, hosts...).
    pub etc_files: Vec<FileMeta>,
    pub work_dir: String,
    pub support_dir: String,
    /// Size of the tmpfs holding the work dir and /tmp together.
    pub disk_bytes: u64,
    pub disk_inodes: u64,
    /// Sandbox path opened read-only as the task's stdin, if any.
    pub stdin_path: Option<String>,
    pub rlimits: RlimitSpec,
    /// Sandbox paths of files read back after the task (output, error report),
    /// each capped at `read_back_cap` bytes.
    pub read_back: Vec<String>,
    pub read_back_cap: u64,
    /// A directory (relative to the work dir) whose regular files are sent back
    /// after the task, e.g. compiled classes.
    pub collect_dir: Option<String>,
    pub collect_cap: u64,
    /// Keep the host network (never set by the engine today; reserved for the
    /// `network` permission). When false the task gets a fresh network
    /// namespace with only loopback.
    pub share_network: bool,
    /// Start a fork server ([`crate::fork_server`]) instead of a task: the
    /// process stays root, keeps the few capabilities it needs to build
    /// each child's isolation ([`crate::seccomp::FORK_SERVER_CAPS`]) and
    /// runs under the fork-server seccomp profile.
    #[serde(default)]
    pub fork_server: bool,
    /// When not empty, the task (a fork server) runs as root of a user
    /// namespace of its own whose uids and gids map as listed here (host
    /// ids the executor leased for it): the init writes the maps before
    /// the task runs a single instruction of its own program, so nothing
    /// it runs holds a privilege over the host's namespaces.
    #[serde(default)]
    pub userns: Vec<IdRange>,
    /// Cgroup files the launcher writes `0` into first thing, to move
    /// itself into its task cgroup (see
    /// [`crate::cgroup::TaskCgroup::self_join_files`]); empty when the
    /// executor moves it instead. Not part of the sandbox's shape.
    #[serde(default)]
    pub self_join: Vec<std::path::PathBuf>,
    /// The task leaf's `cgroup.procs` (see
    /// [`crate::cgroup::TaskCgroup::task_join_file`]): the launcher opens it
    /// before it builds the sandbox, and the task's first process writes `0`
    /// into it before its exec. Taken from the base spec; not part of the
    /// sandbox's shape.
    #[serde(default)]
    pub task_join: Option<std::path::PathBuf>,
}

impl LaunchSpec {
    /// The spec without its task: what shapes the sandbox (mounts, /etc, the
    /// support files, the user, the scratch size, the seccomp profile) and
    /// nothing of one task (no argv, environment, work files, stdin or
    /// read-back). The launcher builds the sandbox from this, then waits for
    /// the whole spec (see [`LaunchSpec::same_sandbox`]).
    pub(crate) fn base(&self) -> LaunchSpec {
        LaunchSpec {
            argv: Vec::new(),
            env: Vec::new(),
            work_files: Vec::new(),
            stdin_path: None,
            read_back: Vec::new(),
            collect_dir: None,
            ..self.clone()
        }
    }

    /// Whether `task` asks for exactly the sandbox this (base) spec built:
    /// everything but the per-task parts must match, so a task never runs in
    /// a sandbox shaped for another (another user in `/etc/passwd`, other
    /// mounts, another scratch size or seccomp profile).
    pub(crate) fn same_sandbox(&self, task: &LaunchSpec) -> bool {
        let with_task_parts_of = |s: &LaunchSpec| LaunchSpec {
            argv: task.argv.clone(),
            env: task.env.clone(),
            work_files: task.work_files.clone(),
            stdin_path: task.stdin_path.clone(),
            rlimits: task.rlimits,
            read_back: task.read_back.clone(),
            read_back_cap: task.read_back_cap,
            collect_dir: task.collect_dir.clone(),
            collect_cap: task.collect_cap,
            self_join: Vec::new(),
            task_join: None,
            ..s.clone()
        };
        // Compared through JSON: every field, including ones added later,
        // takes part unless it is listed above as per-task.
        match (
            serde_json::to_value(with_task_parts_of(self)),
            serde_json::to_value(with_task_parts_of(task)),
        ) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        }
    }
}

/// One line of a user namespace's `uid_map` (and `gid_map`): `count` ids
/// from `inside` are the host's from `outside`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct IdRange {
    pub inside: u32,
    pub outside: u32,
    pub count: u32,
}

/// The text of a `uid_map`/`gid_map` for `ranges`.
pub(crate) fn id_map(ranges: &[IdRange]) -> String {
    ranges
        .iter()
        .map(|r| format!("{} {} {}\n", r.inside, r.outside, r.count))
        .collect()
}

/// Resource limits applied with setrlimit, a second layer under cgroups.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct RlimitSpec {
    /// RLIMIT_NOFILE.
    pub nofile: u64,
    /// RLIMIT_FSIZE in bytes.
    pub fsize: u64,
    /// RLIMIT_CPU in seconds (per process; the cgroup enforces the tree total).
    pub cpu_seconds: Option<u64>,
    /// RLIMIT_STACK in bytes.
    pub stack: u64,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ExitStatus {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal number.
    Signal(i32),
}

/// A message from the launcher (or the sandbox init process) to the executor.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "camelCase")]
pub(crate) enum Report {
    /// Namespaces and mounts are ready; waiting for the cgroup attach.
    Ready {
        mono_ns: u64,
        ns_done_ns: u64,
        mounts_done_ns: u64,
    },
    /// Sandbox construction failed at `stage` (an environment problem of ours).
    SetupFailed { stage: String, message: String },
    /// The task process has exec'd its program (`mono_ns`); the other
    /// stamps time the init's steps: start, /proc and host name done,
    /// loopback done, task forked.
    Started {
        mono_ns: u64,
        init_ns: u64,
        proc_ns: u64,
        net_ns: u64,
        fork_ns: u64,
    },
    /// The task's main process ended and every other process was reaped.
    /// `disk_full`: the work directory's file system was seen full while
    /// the task ran, or is full now.
    /// Blobs: one per `read_back` path that existed (see `read_back`), then
    /// collected files.
    Finished {
        mono_ns: u64,
        status: ExitStatus,
        disk_full: bool,
        read_back: Vec<ReadBack>,
        collected: Vec<String>,
        collect_error: Option<String>,
    },
}

/// Outcome of reading one file back out of the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum ReadBack {
    /// The file does not exist.
    Missing,
    /// Read; its contents are the next blob.
    Read {
        /// The file was larger than the cap and was cut.
        truncated: bool,
    },
    /// The file was refused (symlink, FIFO, directory...).
    Refused {
        /// Why.
        reason: String,
    },
}

/// The conventional name of a signal number ("SIGKILL"), or "signal N".
pub fn signal_name(sig: i32) -> String {
    nix::sys::signal::Signal::try_from(sig)
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|_| format!("signal {sig}"))
}
