//! The executor's side of a sandbox run: create the task cgroup, spawn the
//! launcher, attach it, hand it the spec, then watch the run in one poll loop
//! (launcher exit via pidfd, stdout, stderr, reports, cancellation, wall-clock
//! deadline, cgroup CPU time) and clean up whatever happens.

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::capture::{Capped, OutputStream, drain_capped, over_cap};
use crate::cgroup::{CgroupDriver, CgroupError, CgroupLimits, CgroupStats, TaskCgroup};
use crate::frame::write_frame;
use crate::launcher::{LAUNCHER_ARG, TASK_FOLLOWS, mono_ns};
use crate::spec::{
    ExitStatus, FileMeta, LaunchSpec, ReadBack, Report, RlimitSpec, RoMount, SandboxFile,
};
use crate::uids::{TaskUids, UidLease, UidPool};

/// How to start the launcher: our own binary with [`LAUNCHER_ARG`], normally.
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
    /// of this kind (e.g. "python": see [`crate::zygote`]) when a warm
    /// runner has one; a cold [`Sandbox`] ignores it.
    pub fork_server: Option<String>,
    /// Modules the fork server imports before it forks (the task's
    /// `definition.preload`): requests with different lists get different
    /// servers. A cold [`Sandbox`] ignores it (the wrapper imports them,
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

/// Synthetic /etc files: the task sees only itself and root, never the
/// host's accounts.
pub(crate) fn etc_files(uid: u32, gid: u32, hostname: &str) -> Vec<SandboxFile> {
    let f = |path: &str, content: String| SandboxFile {
        path: path.into(),
        content: content.into_bytes(),
        executable: false,
    };
    vec![
        f(
            "passwd",
            format!(
                "root:x:0:0:root:/root:/bin/false\nsandbox:x:{uid}:{gid}:sandbox:/task:/bin/false\n"
            ),
        ),
        f("group", format!("root:x:0:\nsandbox:x:{gid}:\n")),
        f(
            "hosts",
            format!("127.0.0.1 localhost {hostname}\n::1 localhost\n"),
        ),
        f(
            "nsswitch.conf",
            "passwd: files\ngroup: files\nhosts: files\n".into(),
        ),
    ]
}

/// The sandbox: spawns one launcher per run.
#[derive(Debug)]
pub struct Sandbox {
    pub(crate) config: SandboxConfig,
    pub(crate) cgroups: Box<dyn CgroupDriver>,
    /// The node's one allocator of task uids (cold runs, pre-built
    /// sandboxes and fork servers alike).
    pub(crate) uids: UidPool,
}

/// Numbers task cgroups uniquely within this process (names carry the pid,
/// so they are unique on the host), whatever the number of `Sandbox`es.
static RUN_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh task cgroup name: `taskexec-<pid>-<n>` (the stale-cgroup sweep
/// relies on that shape).
pub(crate) fn cgroup_name() -> String {
    format!(
        "taskexec-{}-{}",
        std::process::id(),
        RUN_COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A spawned launcher process, killed if dropped while running.
struct Launcher {
    child: std::process::Child,
    pidfd: OwnedFd,
    exited: bool,
}

impl Drop for Launcher {
    fn drop(&mut self) {
        if !self.exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub(crate) fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor
    // or -1; the descriptor is owned by the OwnedFd below.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor returned by the kernel.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Reads what is available from a nonblocking fd; false at EOF.
pub(crate) fn drain(fd: &OwnedFd, mut sink: impl FnMut(&[u8])) -> bool {
    drain_while(fd, |d| {
        sink(d);
        true
    })
}

/// Reads what is available from a nonblocking fd until `sink` returns
/// false; false at EOF.
pub(crate) fn drain_while(fd: &OwnedFd, mut sink: impl FnMut(&[u8]) -> bool) -> bool {
    let mut buf = [0u8; 65536];
    loop {
        match nix::unistd::read(fd, &mut buf) {
            Ok(0) => return false,
            Ok(n) => {
                if !sink(&buf[..n]) {
                    return true;
                }
            }
            Err(nix::errno::Errno::EAGAIN) => return true,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return false,
        }
    }
}

impl Sandbox {
    /// A sandbox using `cgroups` for limits.
    pub fn new(config: SandboxConfig, cgroups: Box<dyn CgroupDriver>) -> Self {
        Self {
            uids: UidPool::new(config.task_uids),
            config,
            cgroups,
        }
    }

    /// The cgroup driver in use.
    pub fn cgroups(&self) -> &dyn CgroupDriver {
        self.cgroups.as_ref()
    }

    /// Runs one task to its end and cleans up: afterwards no process, mount,
    /// cgroup or temp dir of the run remains.
    pub fn run(
        &self,
        req: &RunRequest,
        cancel: Option<&CancelToken>,
    ) -> Result<RunOutcome, SandboxError> {
        let t0 = Instant::now();
        let t0_mono = mono_ns();
        let mut phases: Vec<(&'static str, Duration)> = Vec::new();
        let (lease, user) = self.user_for(req)?;
        let cgroup = self.new_cgroup(&req.limits)?;
        phases.push(("cgroupCreate", t0.elapsed()));
        let result = self.run_in(req, user, cancel, cgroup.as_ref(), &mut phases, t0, t0_mono);
        finish_run(cgroup.as_ref(), result, phases, t0, Duration::ZERO, lease)
    }

    /// A new task cgroup (named by [`cgroup_name`]) with the limits of
    /// `limits`.
    pub(crate) fn new_cgroup(
        &self,
        limits: &SandboxLimits,
    ) -> Result<Box<dyn TaskCgroup>, SandboxError> {
        Ok(self.cgroups.create(
            &cgroup_name(),
            &CgroupLimits {
                memory_bytes: limits.memory_bytes,
                pids: limits.pids,
                cpu_request_millis: limits.cpu_request_millis,
                cpu_limit_millis: limits.cpu_limit_millis,
            },
        )?)
    }

    /// The (uid, gid) `req` runs as: the one it names, else a uid of its
    /// own, leased until its cgroup is empty (see [`finish_run`]).
    pub(crate) fn user_for(
        &self,
        req: &RunRequest,
    ) -> Result<(Option<UidLease>, (u32, u32)), SandboxError> {
        if let Some(user) = req.user {
            return Ok((None, user));
        }
        let lease = self.uids.lease(1).ok_or_else(|| SandboxError::Setup {
            stage: "uids".into(),
            message: format!(
                "every task uid of {} is in use; widen the range (--task-uids)",
                self.config.task_uids
            ),
        })?;
        let uid = lease.first();
        Ok((Some(lease), (uid, uid)))
    }

    /// Spawns the launcher with `channel` (one end of a socket pair) as its
    /// stdin: it reads the spec and the go byte there and writes its reports
    /// back on it. Without `pre_exec` work, the standard library spawns with
    /// `posix_spawn` (vfork-like: no copy of the executor's page tables); the
    /// launcher sets its own parent-death signal.
    fn spawn(
        &self,
        channel: OwnedFd,
        out_w: OwnedFd,
        err_w: OwnedFd,
    ) -> Result<Launcher, SandboxError> {
        let mut cmd = Command::new(&self.config.launcher.program);
        cmd.arg(LAUNCHER_ARG)
            .arg(std::process::id().to_string())
            .env_clear()
            .stdin(Stdio::from(channel))
            .stdout(Stdio::from(out_w))
            .stderr(Stdio::from(err_w))
            .current_dir("/");
        let child = cmd.spawn().map_err(io("spawning the launcher"))?;
        let pidfd = pidfd_open(child.id()).map_err(io("pidfd_open"))?;
        Ok(Launcher {
            child,
            pidfd,
            exited: false,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn run_in(
        &self,
        req: &RunRequest,
        user: (u32, u32),
        cancel: Option<&CancelToken>,
        cgroup: &dyn TaskCgroup,
        phases: &mut Vec<(&'static str, Duration)>,
        t0: Instant,
        t0_mono: u64,
    ) -> Result<RunOutcome, SandboxError> {
        let limits = &req.limits;
        let (mut spec, etc) = self.launch_spec(req, user)?;
        spec.self_join = cgroup.self_join_files();
        spec.task_join = cgroup.task_join_file();
        let prepared = self.prepare(&spec, &req.support_files, &etc)?;
        phases.push(("spawn", prepared.spawn_time));
        let deadline = prepared.t_spawn + limits.timeout;
        // Hand over the task right behind the base spec. The launcher moves
        // itself into its cgroup first thing where the driver allows it;
        // otherwise we move it, while it builds namespaces and mounts and
        // writes the task's files (a move by pid waits for an RCU grace
        // period when it is the first in a while).
        let sent = prepared.send_task(&spec, &req.work_files);
        if spec.self_join.is_empty() {
            let t_attach = Instant::now();
            cgroup.attach_supervisor(prepared.pid() as i32)?;
            phases.push(("cgroupAttach", t_attach.elapsed()));
        }
        let attached_mono = mono_ns();
        let go = sent.and_then(|()| prepared.send_go());
        watch(
            Handed {
                prepared,
                go,
                deadline,
                attached_mono,
                cpu_base: Duration::ZERO,
                t0,
                t0_mono,
            },
            cgroup,
            limits,
            cancel,
            phases,
            &mut false,
        )
    }

    /// Spawns a launcher and sends it the base of `spec` (see
    /// [`LaunchSpec::base`]) with the contents of the support and /etc
    /// files: the launcher builds the sandbox from it, then waits for its
    /// task ([`Prepared::send_task`]).
    pub(crate) fn prepare(
        &self,
        spec: &LaunchSpec,
        support: &[SandboxFile],
        etc: &[SandboxFile],
    ) -> Result<Prepared, SandboxError> {
        let cloexec = OFlag::O_CLOEXEC;
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(io("socketpair"))?;
        let (out_r, out_w) = nix::unistd::pipe2(cloexec).map_err(nix_io("pipe"))?;
        let (err_r, err_w) = nix::unistd::pipe2(cloexec).map_err(nix_io("pipe"))?;
        let t_spawn = Instant::now();
        let launcher = self.spawn(OwnedFd::from(theirs), out_w, err_w)?;
        let spawn_time = t_spawn.elapsed();
        let spawned_mono = mono_ns();
        let blobs: Vec<&[u8]> = support
            .iter()
            .chain(etc)
            .map(|f| f.content.as_slice())
            .collect();
        // A launcher that died early closes the channel: its report says why.
        let sent = write_frame(&mut &ours, &spec.base(), &blobs);
        Ok(Prepared {
            launcher,
            channel: ours,
            out_r,
            err_r,
            t_spawn,
            spawn_time,
            spawned_mono,
            sent,
        })
    }

    /// The launcher's whole spec for `req`, and the synthetic /etc files it
    /// names (their contents travel with the base spec).
    pub(crate) fn launch_spec(
        &self,
        req: &RunRequest,
        (uid, gid): (u32, u32),
    ) -> Result<(LaunchSpec, Vec<SandboxFile>), SandboxError> {
        let limits = &req.limits;
        if uid == 0 || gid == 0 {
            return Err(SandboxError::Setup {
                stage: "spec".into(),
                message: "tasks never run as root".into(),
            });
        }
        let etc = etc_files(uid, gid, &self.config.hostname);
        let spec = LaunchSpec {
            hostname: self.config.hostname.clone(),
            uid,
            gid,
            argv: req.argv.clone(),
            env: req.env.clone(),
            ro_mounts: req.ro_mounts.clone(),
            work_files: metas(&req.work_files),
            support_files: metas(&req.support_files),
            etc_files: metas(&etc),
            work_dir: self.config.work_dir.clone(),
            support_dir: self.config.support_dir.clone(),
            disk_bytes: limits.disk_bytes,
            disk_inodes: (limits.disk_bytes / 4096).clamp(1024, 1 << 20),
            stdin_path: req.stdin_path.clone(),
            rlimits: RlimitSpec {
                nofile: limits.nofile,
                fsize: limits.disk_bytes,
                cpu_seconds: limits.cpu_time.map(|d| d.as_secs_f64().ceil() as u64 + 1),
                stack: 8 << 20,
            },
            read_back: req.read_back.clone(),
            read_back_cap: limits.output_bytes,
            collect_dir: req.collect_dir.clone(),
            collect_cap: 64 << 20,
            share_network: false,
            fork_server: false,
            userns: Vec::new(),
            self_join: Vec::new(),
            task_join: None,
        };
        Ok((spec, etc))
    }
}

/// A launcher whose task has been handed over, with what its watch needs.
pub(crate) struct Handed {
    /// The launcher.
    pub prepared: Prepared,
    /// Sending the spec frames and the go: an error counts only if the
    /// launcher's reports do not say why it stopped listening.
    pub go: std::io::Result<()>,
    /// The wall-clock deadline.
    pub deadline: Instant,
    /// When the launcher was known to sit in its cgroup (monotonic ns).
    pub attached_mono: u64,
    /// CPU time the cgroup had used before the task was handed over (a
    /// pre-built sandbox's set-up), not counted against the task.
    pub cpu_base: Duration,
    /// Start of the run.
    pub t0: Instant,
    /// Start of the run (monotonic ns).
    pub t0_mono: u64,
}

/// Watches a run to its end in one poll loop (launcher exit via pidfd,
/// stdout, stderr, reports, cancellation, the wall-clock deadline, cgroup CPU
/// time) and makes sense of the launcher's reports. `heard` is set when the
/// launcher sent anything at all during the watch.
pub(crate) fn watch(
    handed: Handed,
    cgroup: &dyn TaskCgroup,
    limits: &SandboxLimits,
    cancel: Option<&CancelToken>,
    phases: &mut Vec<(&'static str, Duration)>,
    heard: &mut bool,
) -> Result<RunOutcome, SandboxError> {
    let Handed {
        prepared:
            Prepared {
                mut launcher,
                channel,
                out_r,
                err_r,
                spawned_mono,
                ..
            },
        go,
        deadline,
        attached_mono,
        cpu_base,
        t0,
        t0_mono,
    } = handed;
    let report_r = OwnedFd::from(channel);
    // Watch the run.
    for fd in [&out_r, &err_r, &report_r] {
        nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK))
            .map_err(nix_io("fcntl"))?;
    }
    let mut stdout = Capped::new(limits.output_bytes);
    let mut stderr = Capped::new(limits.output_bytes);
    let mut report_bytes = Vec::new();
    let (mut out_open, mut err_open, mut rep_open) = (true, true, true);
    let mut killed: Option<Termination> = None;
    let cpu_poll = limits
        .cpu_time
        .map(|c| (c / 20).clamp(Duration::from_millis(5), Duration::from_millis(100)));
    let mut drain_deadline: Option<Instant> = None;
    loop {
        if launcher.exited && !(out_open || err_open || rep_open) {
            break;
        }
        let now = Instant::now();
        if killed.is_none() {
            let reason = if cancel.is_some_and(CancelToken::is_cancelled) {
                Some(Termination::Cancelled)
            } else if let Some(stream) = over_cap(&stdout, &stderr) {
                Some(Termination::OutputCapped(stream))
            } else if now >= deadline {
                Some(Termination::TimedOut)
            } else if let Some(limit) = limits.cpu_time {
                (cgroup.cpu_time()?.saturating_sub(cpu_base) > limit)
                    .then_some(Termination::CpuTimeExceeded)
            } else {
                None
            };
            if let Some(reason) = reason {
                killed = Some(reason);
                let _ = launcher.child.kill();
                cgroup.kill_all()?;
            }
        }
        if launcher.exited {
            // Every sandbox process is gone; give the pipes a moment to
            // report EOF, then stop regardless.
            let d = *drain_deadline.get_or_insert(now + Duration::from_millis(500));
            if now >= d {
                break;
            }
        }
        let mut wait = if killed.is_some() {
            Duration::from_millis(50)
        } else {
            deadline.saturating_duration_since(now)
        };
        if let Some(p) = cpu_poll {
            wait = wait.min(p);
        }
        let ready = poll_tags(
            &[
                (0, !launcher.exited, launcher.pidfd.as_fd()),
                (1, out_open, out_r.as_fd()),
                (2, err_open, err_r.as_fd()),
                (3, rep_open, report_r.as_fd()),
            ],
            cancel.filter(|_| killed.is_none()),
            wait,
        )?;
        for tag in ready {
            match tag {
                0 => {
                    launcher
                        .child
                        .wait()
                        .map_err(io("waiting for the launcher"))?;
                    launcher.exited = true;
                }
                1 => out_open = drain_capped(&out_r, &mut stdout),
                2 => err_open = drain_capped(&err_r, &mut stderr),
                3 => rep_open = drain(&report_r, |d| report_bytes.extend_from_slice(d)),
                _ => {}
            }
        }
    }
    let exited_mono = mono_ns();
    // A stream that went past its cap as the task ended: the same verdict
    // as when it is caught running (whatever is left is killed at cleanup).
    if killed.is_none() {
        killed = over_cap(&stdout, &stderr).map(Termination::OutputCapped);
    }

    // Make sense of the reports.
    *heard = !report_bytes.is_empty();
    let mut reports = Vec::new();
    let mut cursor = &report_bytes[..];
    loop {
        match crate::frame::read_frame::<_, Report>(&mut cursor) {
            Ok(Some(r)) => reports.push(r),
            Ok(None) => break,
            Err(e) => {
                if killed.is_none() {
                    return Err(SandboxError::Protocol(e.to_string()));
                }
                break;
            }
        }
    }
    let mut started = None;
    let mut finished = None;
    for (report, blobs) in reports {
        match report {
            Report::Ready {
                mono_ns: start,
                ns_done_ns,
                mounts_done_ns,
            } => {
                phases.push(("launcherStart", ns_delta(spawned_mono, start)));
                phases.push(("namespaces", ns_delta(start, ns_done_ns)));
                phases.push(("mounts", ns_delta(ns_done_ns, mounts_done_ns)));
            }
            Report::SetupFailed { stage, message } => {
                if killed.is_none() {
                    return Err(SandboxError::Setup { stage, message });
                }
            }
            Report::Started {
                mono_ns,
                init_ns,
                proc_ns,
                net_ns,
                fork_ns,
            } => {
                phases.push(("initStart", ns_delta(attached_mono, init_ns)));
                phases.push(("proc", ns_delta(init_ns, proc_ns)));
                phases.push(("network", ns_delta(proc_ns, net_ns)));
                phases.push(("exec", ns_delta(fork_ns, mono_ns)));
                started = Some(mono_ns);
            }
            Report::Finished {
                mono_ns,
                status,
                disk_full,
                read_back,
                collected,
                collect_error,
            } => {
                finished = Some((
                    mono_ns,
                    status,
                    disk_full,
                    read_back,
                    collected,
                    collect_error,
                    blobs,
                ));
            }
        }
    }
    if killed.is_none() {
        go.map_err(io("sending the spec to the launcher"))?;
    }
    let mut outcome = RunOutcome::captured(
        killed.unwrap_or(Termination::Cancelled),
        stdout,
        stderr,
        t0,
        started.map(|s| ns_delta(t0_mono, s)).unwrap_or_default(),
    );
    match (killed, finished) {
        (Some(_), _) => {
            if let Some(s) = started {
                outcome.run_time = ns_delta(s, exited_mono);
            }
        }
        (None, Some((end, status, disk_full, read_back, collected, collect_error, blobs))) => {
            let mut blobs = blobs.into_iter();
            outcome.termination = Termination::Exited(status);
            outcome.disk_full = disk_full;
            outcome.run_time = started.map(|s| ns_delta(s, end)).unwrap_or_default();
            phases.push(("run", outcome.run_time));
            phases.push(("teardown", ns_delta(end, exited_mono)));
            for rb in read_back {
                outcome.read_back.push(match rb {
                    ReadBack::Missing => ReadBackResult::Missing,
                    ReadBack::Read { truncated } => ReadBackResult::Read {
                        data: blobs.next().ok_or_else(|| {
                            SandboxError::Protocol("missing read-back blob".into())
                        })?,
                        truncated,
                    },
                    ReadBack::Refused { reason } => ReadBackResult::Refused { reason },
                });
            }
            for name in collected {
                let data = blobs
                    .next()
                    .ok_or_else(|| SandboxError::Protocol("missing collected blob".into()))?;
                outcome.collected.push((name, data));
            }
            outcome.collect_error = collect_error;
        }
        (None, None) => {
            let code = launcher
                .child
                .try_wait()
                .ok()
                .flatten()
                .and_then(|s| s.code());
            return Err(SandboxError::Protocol(format!(
                "the launcher ended (exit {code:?}) without a final report"
            )));
        }
    }
    Ok(outcome)
}

/// A launcher spawned and sent the base spec of its run: it builds the
/// sandbox (namespaces, mounts, an empty work dir), reports `Ready` and waits
/// for its task. Dropped unused, the launcher is killed.
pub(crate) struct Prepared {
    launcher: Launcher,
    /// Spec frames and the go out, reports in.
    channel: std::os::unix::net::UnixStream,
    out_r: OwnedFd,
    err_r: OwnedFd,
    /// Start of the spawn.
    t_spawn: Instant,
    /// How long the spawn took.
    spawn_time: Duration,
    spawned_mono: u64,
    /// Sending the base spec (see [`Handed::go`]).
    sent: std::io::Result<()>,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("pid", &self.pid())
            .finish_non_exhaustive()
    }
}

impl Prepared {
    /// The launcher's pid.
    pub(crate) fn pid(&self) -> u32 {
        self.launcher.child.id()
    }

    /// Sends the task's spec: the whole spec, with the contents of the work
    /// files as blobs. Fails at once if sending the base spec failed.
    pub(crate) fn send_task(
        &self,
        spec: &LaunchSpec,
        work_files: &[SandboxFile],
    ) -> std::io::Result<()> {
        if let Err(e) = &self.sent {
            return Err(std::io::Error::new(e.kind(), e.to_string()));
        }
        let blobs: Vec<&[u8]> = work_files.iter().map(|f| f.content.as_slice()).collect();
        (&self.channel).write_all(&[TASK_FOLLOWS])?;
        write_frame(&mut &self.channel, spec, &blobs)
    }

    /// Sends the go: the launcher sits in its cgroup.
    pub(crate) fn send_go(&self) -> std::io::Result<()> {
        (&self.channel).write_all(b"g")
    }

    /// Waits up to `timeout` for the launcher's `Ready` report: the sandbox
    /// is built and waits for its task. Any other answer (a setup failure,
    /// the launcher's end, silence) is an error.
    pub(crate) fn wait_ready(&mut self, timeout: Duration) -> Result<(), SandboxError> {
        if let Err(e) = &self.sent {
            return Err(SandboxError::Io {
                what: "sending the spec to the launcher",
                source: std::io::Error::new(e.kind(), e.to_string()),
            });
        }
        self.channel
            .set_read_timeout(Some(timeout))
            .map_err(io("socket timeout"))?;
        let report = crate::frame::read_frame::<_, Report>(&mut &self.channel);
        self.channel
            .set_read_timeout(None)
            .map_err(io("socket timeout"))?;
        match report {
            Ok(Some((Report::Ready { .. }, _))) => Ok(()),
            Ok(Some((Report::SetupFailed { stage, message }, _))) => {
                Err(SandboxError::Setup { stage, message })
            }
            Ok(Some((other, _))) => Err(SandboxError::Protocol(format!(
                "expected Ready from the launcher, got {other:?}"
            ))),
            Ok(None) => Err(SandboxError::Protocol(
                "the launcher ended before it was ready".into(),
            )),
            Err(e) => Err(SandboxError::Io {
                what: "waiting for the launcher to be ready",
                source: e,
            }),
        }
    }

    /// Whether the launcher still waits for its task: not exited, and silent
    /// (after `Ready` a waiting launcher says nothing until it has a task, so
    /// anything to read, or the end of the channel, means it is gone).
    pub(crate) fn is_waiting(&self) -> bool {
        let mut fds = [
            PollFd::new(self.launcher.pidfd.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.channel.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(0) => true,
            Ok(_) => false,
            Err(_) => false,
        }
    }
}

/// The end of every run: kills whatever is left in the cgroup, gives the
/// task's uid back (`lease`; lost if the cgroup could not be emptied),
/// reads its accounting (less `cpu_base`, the CPU time used before the task
/// was handed over) and removes it, then completes the outcome.
pub(crate) fn finish_run(
    cgroup: &dyn TaskCgroup,
    result: Result<RunOutcome, SandboxError>,
    mut phases: Vec<(&'static str, Duration)>,
    t0: Instant,
    cpu_base: Duration,
    lease: Option<UidLease>,
) -> Result<RunOutcome, SandboxError> {
    let t_clean = Instant::now();
    let kill = cgroup.kill_all();
    crate::uids::release(lease, &kill);
    let stats = cgroup.stats();
    let removed = cgroup.remove();
    phases.push(("cleanup", t_clean.elapsed()));
    let mut outcome = result?;
    kill?;
    removed?;
    outcome.stats = stats?;
    outcome.stats.cpu_time = outcome.stats.cpu_time.saturating_sub(cpu_base);
    outcome.wall_time = t0.elapsed();
    outcome.phases = phases;
    Ok(outcome)
}

pub(crate) fn metas(files: &[SandboxFile]) -> Vec<FileMeta> {
    files
        .iter()
        .map(|f| FileMeta {
            path: f.path.clone(),
            executable: f.executable,
        })
        .collect()
}

/// Waits up to `wait` until one of the open descriptors of `watched` (tag,
/// open, descriptor) is readable, or `cancel` fires (tag 4); returns the
/// tags that are ready. A zero `wait` only looks; an interrupted wait is
/// resumed.
pub(crate) fn poll_tags(
    watched: &[(i32, bool, BorrowedFd<'_>)],
    cancel: Option<&CancelToken>,
    wait: Duration,
) -> Result<Vec<i32>, SandboxError> {
    let mut fds = Vec::with_capacity(watched.len() + 1);
    let mut tags = Vec::with_capacity(watched.len() + 1);
    for &(tag, open, fd) in watched {
        if open {
            fds.push(PollFd::new(fd, PollFlags::POLLIN));
            tags.push(tag);
        }
    }
    if let Some(c) = cancel {
        fds.push(PollFd::new(c.fd(), PollFlags::POLLIN));
        tags.push(4);
    }
    let ms = if wait.is_zero() {
        0
    } else {
        u16::try_from(wait.as_millis().max(1)).unwrap_or(u16::MAX)
    };
    loop {
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(_) => break,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(nix_io("poll")(e)),
        }
    }
    Ok(fds
        .iter()
        .zip(&tags)
        .filter(|(f, _)| f.revents().is_some_and(|r| !r.is_empty()))
        .map(|(_, t)| *t)
        .collect())
}

pub(crate) fn ns_delta(from: u64, to: u64) -> Duration {
    Duration::from_nanos(to.saturating_sub(from))
}

/// A small request for unit tests: `argv0` alone, tight limits.
#[cfg(test)]
pub(crate) fn test_request(argv0: &str) -> RunRequest {
    RunRequest {
        argv: vec![argv0.into()],
        env: Vec::new(),
        ro_mounts: Vec::new(),
        work_files: Vec::new(),
        support_files: Vec::new(),
        stdin_path: None,
        read_back: Vec::new(),
        collect_dir: None,
        limits: SandboxLimits {
            memory_bytes: 64 << 20,
            disk_bytes: 1 << 20,
            pids: 16,
            cpu_request_millis: 100,
            cpu_limit_millis: None,
            timeout: Duration::from_secs(1),
            cpu_time: None,
            output_bytes: 1024,
            nofile: 64,
        },
        user: None,
        fork_server: None,
        preload: Vec::new(),
    }
}
