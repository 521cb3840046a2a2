//! What is spawned: the request of one run (command, files, limits), the
//! host-wide settings, the outcome and the errors of a run, and the
//! cancellation token.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;

use crate::capture::{Capped, OutputStream};
use crate::cgroup::{CgroupError, CgroupLimits, CgroupStats};
use crate::spec::{ExitStatus, RlimitSpec, RoMount, SandboxFile};
use crate::uids::TaskUids;

/// How to start the launcher: our own binary with [`crate::LAUNCHER_ARG`], normally.
#[derive(Debug, Clone)]
pub struct LauncherCommand {
    /// The executable.
    pub program: PathBuf,
}

impl LauncherCommand {
    /// The currently running executable (which must call
    /// [`crate::run_if_launcher`] first thing in `main`).
    pub fn current_exe() -> std::io::Result<Self> {
        Ok(Self {
            program: std::env::current_exe()?,
        })
    }

    /// The small `taskexec-launcher` binary installed beside the running
    /// executable, if there is one (it starts faster than the whole CLI),
    /// else the running executable itself.
    pub fn beside_current_exe() -> std::io::Result<Self> {
        let exe = std::env::current_exe()?;
        let small = exe.with_file_name("taskexec-launcher");
        if small.is_file() {
            return Ok(Self { program: small });
        }
        Ok(Self { program: exe })
    }
}

/// Host-wide sandbox settings.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// How to start the launcher.
    pub launcher: LauncherCommand,
    /// The host uids tasks run as (gid = uid), one of its own for each
    /// task running ([`crate::uids`]), unless a request names its user.
    pub task_uids: TaskUids,
    /// Host name inside the sandbox.
    pub hostname: String,
    /// Sandbox path of the work dir.
    pub work_dir: String,
    /// Sandbox path of the read-only support dir.
    pub support_dir: String,
}

impl SandboxConfig {
    /// Defaults: task uids [`TaskUids::DEFAULT`], host name "sandbox",
    /// /task, /opt/taskexec.
    pub fn new(launcher: LauncherCommand) -> Self {
        Self {
            launcher,
            task_uids: TaskUids::DEFAULT,
            hostname: "sandbox".into(),
            work_dir: "/task".into(),
            support_dir: "/opt/taskexec".into(),
        }
    }
}

/// Limits of one run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SandboxLimits {
    /// Memory limit (cgroup), including the work dir's tmpfs pages.
    pub memory_bytes: u64,
    /// Size of the tmpfs shared by the work dir and /tmp.
    pub disk_bytes: u64,
    /// Processes and threads (cgroup pids).
    pub pids: u32,
    /// CPU request, as a cgroup weight.
    pub cpu_request_millis: u32,
    /// Hard CPU quota, only if asked for.
    pub cpu_limit_millis: Option<u32>,
    /// Wall-clock limit, from the launcher's start.
    pub timeout: Duration,
    /// CPU time limit of the whole process tree.
    pub cpu_time: Option<Duration>,
    /// Cap of each of stdout and stderr, and of each file read back.
    pub output_bytes: u64,
    /// RLIMIT_NOFILE.
    pub nofile: u64,
}

/// `RLIMIT_CPU` for a CPU time budget: whole seconds, rounded up, plus one.
fn cpu_seconds(budget: Duration) -> u64 {
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a Duration is non-negative and the cast saturates"
    )]
    let secs = budget.as_secs_f64().ceil() as u64;
    secs.saturating_add(1)
}

impl SandboxLimits {
    /// The limits of the run's cgroup.
    pub(crate) fn cgroup_limits(&self) -> CgroupLimits {
        CgroupLimits {
            memory_bytes: self.memory_bytes,
            pids: self.pids,
            cpu_request_millis: self.cpu_request_millis,
            cpu_limit_millis: self.cpu_limit_millis,
        }
    }

    /// The task's rlimits: files and the work dir's size, and the CPU time
    /// of one process a second past the limit of the tree (the cgroup
    /// enforces the total).
    pub(crate) fn rlimits(&self) -> RlimitSpec {
        RlimitSpec {
            nofile: self.nofile,
            fsize: self.disk_bytes,
            cpu_seconds: self.cpu_time.map(cpu_seconds),
            stack: 8 << 20,
        }
    }

    /// Inodes of the work dir's tmpfs: one per 4 KiB of its size, within
    /// [1024, 2^20].
    pub(crate) fn disk_inodes(&self) -> u64 {
        (self.disk_bytes / 4096).clamp(1024, 1 << 20)
    }
}

/// One run's request.
#[derive(Debug, Clone)]
pub struct RunRequest {
    /// Command; argv[0] must be an absolute path inside the sandbox.
    pub argv: Vec<String>,
    /// The complete environment of the task.
    pub env: Vec<(String, String)>,
    /// Host paths bound read-only.
    pub ro_mounts: Vec<RoMount>,
    /// Files written into the work dir (owned by the task's uid).
    pub work_files: Vec<SandboxFile>,
    /// Files written into the read-only support dir.
    pub support_files: Vec<SandboxFile>,
    /// Sandbox path opened as stdin (else /dev/null semantics: no stdin).
    pub stdin_path: Option<String>,
    /// Sandbox paths (inside the work dir) read back after the run.
    pub read_back: Vec<String>,
    /// Directory (relative to the work dir) whose files are collected.
    pub collect_dir: Option<String>,
    /// Limits.
    pub limits: SandboxLimits,
    /// Run as this (uid, gid) instead of a uid of its own from
    /// [`SandboxConfig::task_uids`]; never 0.
    pub user: Option<(u32, u32)>,
    /// The request may run in a forked child of a pre-started interpreter
    /// of this kind (e.g. "python": see [`crate::fork_server`]) when a warm
    /// runner has one; a cold [`super::Sandbox`] ignores it.
    pub fork_server: Option<String>,
    /// Modules the fork server imports before it forks (the task's
    /// `definition.preload`): requests with different lists get different
    /// servers. A cold [`super::Sandbox`] ignores it (the wrapper imports them,
    /// told by the task's environment).
    pub preload: Vec<String>,
}

/// Result of reading one file back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadBackResult {
    /// Not there.
    Missing,
    /// Read (possibly cut at the cap).
    Read {
        /// Contents.
        data: Vec<u8>,
        /// Cut at the cap.
        truncated: bool,
    },
    /// Refused (symlink, FIFO...).
    Refused {
        /// Why.
        reason: String,
    },
}

/// How the run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Termination {
    /// The task's main process ended on its own (or was killed by the kernel,
    /// e.g. the OOM killer: see the stats).
    Exited(ExitStatus),
    /// Killed at the wall-clock limit.
    TimedOut,
    /// Killed at the CPU-time limit.
    CpuTimeExceeded,
    /// Killed on request.
    Cancelled,
    /// Killed when this stream went past `outputBytes`.
    OutputCapped(OutputStream),
}

/// Everything observed about one run.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// How it ended.
    pub termination: Termination,
    /// Captured stdout (capped).
    pub stdout: Vec<u8>,
    /// Stdout went past the cap.
    pub stdout_truncated: bool,
    /// Captured stderr (capped).
    pub stderr: Vec<u8>,
    /// Stderr went past the cap.
    pub stderr_truncated: bool,
    /// One entry per `read_back` path, in order.
    pub read_back: Vec<ReadBackResult>,
    /// Files collected from `collect_dir`.
    pub collected: Vec<(String, Vec<u8>)>,
    /// Why collecting failed, if it did.
    pub collect_error: Option<String>,
    /// The work dir's tmpfs was full at the end.
    pub disk_full: bool,
    /// cgroup accounting.
    pub stats: CgroupStats,
    /// Wall time from spawn to the end of cleanup.
    pub wall_time: Duration,
    /// Time the task ran (exec of the task to the exit of its main process).
    pub run_time: Duration,
    /// Time from the start of `run` to the task's exec: the sandbox's cost
    /// before the task's own code starts.
    pub setup_time: Duration,
    /// Per-phase breakdown, in order.
    pub phases: Vec<(&'static str, Duration)>,
}

impl RunOutcome {
    /// An outcome with the captured output and the times known when the
    /// watch ends; the rest is filled in by the caller.
    pub(crate) fn captured(
        termination: Termination,
        stdout: Capped,
        stderr: Capped,
        t0: Instant,
        setup_time: Duration,
    ) -> Self {
        let (stdout, stdout_truncated) = stdout.finish();
        let (stderr, stderr_truncated) = stderr.finish();
        RunOutcome {
            termination,
            stdout,
            stdout_truncated,
            stderr,
            stderr_truncated,
            read_back: Vec::new(),
            collected: Vec::new(),
            collect_error: None,
            disk_full: false,
            stats: CgroupStats::default(),
            wall_time: t0.elapsed(),
            run_time: Duration::ZERO,
            setup_time,
            phases: Vec::new(),
        }
    }
}

/// Failures of ours (never the task's): the engine reports them as
/// ENVIRONMENT_SETUP or INTERNAL.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The cgroup layer failed.
    #[error("cgroup")]
    Cgroup(#[from] CgroupError),
    /// Pipes, spawn or poll failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The launcher could not build the sandbox or start the task.
    #[error("sandbox setup failed at {stage}: {message}")]
    Setup {
        /// Which step.
        stage: String,
        /// The launcher's message.
        message: String,
    },
    /// The launcher's reports made no sense.
    #[error("launcher protocol: {0}")]
    Protocol(String),
}

pub(crate) fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> SandboxError {
    move |source| SandboxError::Io { what, source }
}

pub(crate) fn nix_io(what: &'static str) -> impl FnOnce(nix::errno::Errno) -> SandboxError {
    move |e| SandboxError::Io {
        what,
        source: e.into(),
    }
}

/// A handle that cancels a run from another thread. Cheap to clone.
#[derive(Debug, Clone)]
pub struct CancelToken {
    inner: Arc<CancelInner>,
}

#[derive(Debug)]
struct CancelInner {
    cancelled: AtomicBool,
    read: OwnedFd,
    write: OwnedFd,
}

impl CancelToken {
    /// A token that is not cancelled.
    pub fn new() -> std::io::Result<Self> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        Ok(Self {
            inner: Arc::new(CancelInner {
                cancelled: AtomicBool::new(false),
                read,
                write,
            }),
        })
    }

    /// Cancels: a run watching this token kills its sandbox at once.
    pub fn cancel(&self) {
        if !self.inner.cancelled.swap(true, Ordering::SeqCst) {
            let _ = nix::unistd::write(&self.inner.write, b"x");
        }
    }

    /// Whether `cancel` was called.
    pub fn is_cancelled(&self) -> bool {
        self.inner.cancelled.load(Ordering::SeqCst)
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.inner.read.as_fd()
    }
}
