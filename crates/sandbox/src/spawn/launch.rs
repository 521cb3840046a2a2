//! The launcher spawn every path shares (a cold run, a pre-built sandbox,
//! a fork server's own sandbox), the hand-over of a spec to a spawned
//! launcher, and the launcher's side of the watch: its exit ends the run,
//! its reports say how the task went.

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::ns_delta;
use super::request::{
    CancelToken, ReadBackResult, RunOutcome, SandboxError, SandboxLimits, Termination, io,
};
use super::watch::{Supervised, Watch, Watched, drain, set_nonblocking, watch_run};
use crate::cgroup::TaskCgroup;
use crate::frame::write_frame;
use crate::launcher::{LAUNCHER_ARG, TASK_FOLLOWS, mono_ns};
use crate::spec::{LaunchSpec, ReadBack, Report, SandboxFile};

/// Spawns the launcher (`program` with [`LAUNCHER_ARG`]) with `stdin`,
/// `stdout` and `stderr`, and opens a pidfd on it. Without `pre_exec` work,
/// the standard library spawns with `posix_spawn` (vfork-like: no copy of
/// the executor's page tables); the launcher sets its own parent-death
/// signal (it follows the spawning *thread*).
pub(crate) fn spawn_launcher(
    program: &std::path::Path,
    stdin: OwnedFd,
    stdout: OwnedFd,
    stderr: OwnedFd,
    what: &'static str,
) -> Result<(std::process::Child, OwnedFd), SandboxError> {
    let child = Command::new(program)
        .arg(LAUNCHER_ARG)
        .arg(std::process::id().to_string())
        .env_clear()
        .stdin(Stdio::from(stdin))
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(stderr))
        .current_dir("/")
        .spawn()
        .map_err(io(what))?;
    let pidfd = pidfd_open(child.id()).map_err(io("pidfd_open"))?;
    Ok((child, pidfd))
}

/// A spawned launcher process, killed if dropped while running.
pub(crate) struct Launcher {
    child: std::process::Child,
    pidfd: OwnedFd,
    exited: bool,
}

impl Launcher {
    /// Spawns a launcher for one run (see [`spawn_launcher`]): `channel`
    /// (one end of a socket pair) as its stdin, where it reads the spec and
    /// the go byte and writes its reports back.
    pub(super) fn spawn(
        program: &std::path::Path,
        channel: OwnedFd,
        out_w: OwnedFd,
        err_w: OwnedFd,
    ) -> Result<Self, SandboxError> {
        let (child, pidfd) =
            spawn_launcher(program, channel, out_w, err_w, "spawning the launcher")?;
        Ok(Self {
            child,
            pidfd,
            exited: false,
        })
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        if !self.exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A descriptor of process `pid` that polls readable once it has ended.
pub(crate) fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    #[allow(clippy::cast_possible_wrap, reason = "a pid is at most pid_max, 2^22")]
    let pid = pid as libc::pid_t;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor
    // or -1; the descriptor is owned by the OwnedFd below.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    #[allow(clippy::cast_possible_truncation, reason = "a descriptor is a C int")]
    let fd = fd as RawFd;
    // SAFETY: `fd` is a fresh descriptor returned by the kernel.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A launcher spawned and sent the base spec of its run: it builds the
/// sandbox (namespaces, mounts, an empty work dir), reports `Ready` and waits
/// for its task. Dropped unused, the launcher is killed.
pub(crate) struct Prepared {
    pub(super) launcher: Launcher,
    /// Spec frames and the go out, reports in.
    pub(super) channel: std::os::unix::net::UnixStream,
    pub(super) out_r: OwnedFd,
    pub(super) err_r: OwnedFd,
    /// Start of the spawn.
    pub(super) t_spawn: Instant,
    /// How long the spawn took.
    pub(super) spawn_time: Duration,
    pub(super) spawned_mono: u64,
    /// Sending the base spec (see [`Handed::go`]).
    pub(super) sent: std::io::Result<()>,
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
    set_nonblocking(&report_r)?;
    let mut side = LauncherSide {
        launcher: &mut launcher,
        report_r: &report_r,
        reports: Vec::new(),
        open: true,
    };
    let watch = Watch::new(cgroup, limits, cancel, deadline, cpu_base, (&out_r, &err_r));
    let watched = watch_run(&watch, &mut side);
    let report_bytes = std::mem::take(&mut side.reports);
    let Watched {
        stdout,
        stderr,
        killed,
        ..
    } = watched?;
    let exited_mono = mono_ns();

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

/// The launcher's side of a watch: its exit (every process of the sandbox
/// dies with it) ends the run, its reports come on the channel.
struct LauncherSide<'a> {
    launcher: &'a mut Launcher,
    report_r: &'a OwnedFd,
    reports: Vec<u8>,
    open: bool,
}

impl Supervised for LauncherSide<'_> {
    fn end_fd(&self) -> BorrowedFd<'_> {
        self.launcher.pidfd.as_fd()
    }

    fn on_end_readable(&mut self) -> Result<bool, SandboxError> {
        self.launcher
            .child
            .wait()
            .map_err(io("waiting for the launcher"))?;
        self.launcher.exited = true;
        Ok(true)
    }

    fn channel_fd(&self) -> BorrowedFd<'_> {
        self.report_r.as_fd()
    }

    fn channel_open(&self) -> bool {
        self.open
    }

    fn on_channel_readable(&mut self) {
        self.open = drain(self.report_r, |d| self.reports.extend_from_slice(d));
    }

    fn on_end(&mut self, _cgroup: &dyn TaskCgroup) -> Result<(), SandboxError> {
        // The sandbox's PID namespace ended with the launcher: nothing to
        // kill.
        Ok(())
    }

    fn stop(&mut self, cgroup: &dyn TaskCgroup) -> Result<(), SandboxError> {
        let _ = self.launcher.child.kill();
        cgroup.kill_all()?;
        Ok(())
    }
}
