//! The watch loop every run shares, cold, pre-built or forked: one poll
//! over the task's end, its stdout and stderr, a side channel and the
//! cancellation token, that enforces the wall-clock deadline, the CPU time
//! of the cgroup, cancellation and the output caps, and collects the output.
//!
//! What differs between the paths sits behind [`Supervised`]: how the end
//! of the task's main process shows (the launcher's pidfd; the fork-server
//! child's status pipe), what the side channel says (the launcher's
//! reports; the child's messages and last words), and how a stopped task is
//! killed.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::request::{CancelToken, SandboxError, SandboxLimits, Termination, nix_io};
use crate::capture::{Capped, drain_capped, over_cap};
use crate::cgroup::TaskCgroup;
use crate::launcher::mono_ns;

/// How long the pipes may take to report their end once the task's main
/// process has ended.
const DRAIN_AFTER_END: Duration = Duration::from_millis(500);

/// The poll period once the task is stopped or has ended.
const SETTLE_POLL: Duration = Duration::from_millis(50);

/// The side of a run the watch loop does not know.
pub(crate) trait Supervised {
    /// Readable once the task's main process has ended.
    fn end_fd(&self) -> BorrowedFd<'_>;
    /// The end descriptor is readable: whether the main process has ended.
    fn on_end_readable(&mut self) -> Result<bool, SandboxError>;
    /// The side channel, watched while open.
    fn channel_fd(&self) -> BorrowedFd<'_>;
    /// Whether the side channel is still open.
    fn channel_open(&self) -> bool;
    /// The side channel is readable.
    fn on_channel_readable(&mut self);
    /// The main process has ended (called once, when first seen).
    fn on_end(&mut self, cgroup: &dyn TaskCgroup) -> Result<(), SandboxError>;
    /// A limit was hit or cancellation came: stop the task.
    fn stop(&mut self, cgroup: &dyn TaskCgroup) -> Result<(), SandboxError>;
    /// The task told its exit status before its end (the fork-server
    /// child's last words): the loop takes what the pipes hold and ends
    /// without waiting for the exit.
    fn told_its_end(&self) -> bool {
        false
    }
    /// How often [`Supervised::probe`] wants to run while the task runs
    /// (`None`: never).
    fn probe_period(&self) -> Option<Duration> {
        None
    }
    /// A look at the running task's state that no descriptor signals (its
    /// work directory's file system filling up).
    fn probe(&mut self) {}
}

/// What the watch enforces, and on which descriptors.
#[derive(Debug)]
pub(crate) struct Watch<'a> {
    /// The task's cgroup: its CPU time, and where a stop kills.
    pub cgroup: &'a dyn TaskCgroup,
    /// The run's limits (output caps, CPU time).
    pub limits: &'a SandboxLimits,
    /// Cancellation.
    pub cancel: Option<&'a CancelToken>,
    /// The wall-clock deadline.
    pub deadline: Instant,
    /// CPU time the cgroup had used before the task was handed over, not
    /// counted against the task's limit.
    pub cpu_base: Duration,
    /// The task's stdout and stderr.
    pub out_r: &'a OwnedFd,
    pub err_r: &'a OwnedFd,
}

impl<'a> Watch<'a> {
    /// A watch of the run in `cgroup`, whose stdout and stderr are read
    /// from `streams`.
    pub(crate) fn new(
        cgroup: &'a dyn TaskCgroup,
        limits: &'a SandboxLimits,
        cancel: Option<&'a CancelToken>,
        deadline: Instant,
        cpu_base: Duration,
        (out_r, err_r): (&'a OwnedFd, &'a OwnedFd),
    ) -> Self {
        Self {
            cgroup,
            limits,
            cancel,
            deadline,
            cpu_base,
            out_r,
            err_r,
        }
    }
}

/// What the watch saw.
#[derive(Debug)]
pub(crate) struct Watched {
    pub stdout: Capped,
    pub stderr: Capped,
    /// Why the task was stopped, if it was.
    pub killed: Option<Termination>,
    /// When the end of the main process (or its last words) was seen
    /// (monotonic ns).
    pub ended_mono: Option<u64>,
}

/// Sets `fd` nonblocking.
pub(crate) fn set_nonblocking(fd: &OwnedFd) -> Result<(), SandboxError> {
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK))
        .map(drop)
        .map_err(nix_io("fcntl"))
}

/// Watches a run to its end: until the main process has ended and the
/// pipes and side channel are closed (or [`DRAIN_AFTER_END`] after the
/// end), or until the task told its end. Stops the task at the first limit
/// it hits while running; a stream that went past its cap as the task ended
/// gets the same verdict.
pub(crate) fn watch_run(
    w: &Watch<'_>,
    side: &mut impl Supervised,
) -> Result<Watched, SandboxError> {
    let (cgroup, limits, cancel) = (w.cgroup, w.limits, w.cancel);
    let (deadline, cpu_base, out_r, err_r) = (w.deadline, w.cpu_base, w.out_r, w.err_r);
    set_nonblocking(out_r)?;
    set_nonblocking(err_r)?;
    let mut stdout = Capped::new(limits.output_bytes);
    let mut stderr = Capped::new(limits.output_bytes);
    let (mut out_open, mut err_open) = (true, true);
    let mut ended = false;
    let mut ended_mono: Option<u64> = None;
    let mut killed: Option<Termination> = None;
    let cpu_poll = limits
        .cpu_time
        .map(|c| (c / 20).clamp(Duration::from_millis(5), Duration::from_millis(100)));
    let mut drain_deadline: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if killed.is_none() && side.told_its_end() {
            // Its output is flushed; kill the rest of the task without
            // waiting for its exit (cleanup makes sure later), take what
            // the pipes hold, and stop.
            ended_mono = Some(mono_ns());
            cgroup.signal_all()?;
            drain(out_r, |d| stdout.push(d));
            drain(err_r, |d| stderr.push(d));
            break;
        }
        if ended {
            if ended_mono.is_none() {
                ended_mono = Some(mono_ns());
                side.on_end(cgroup)?;
            }
            if !(out_open || err_open || side.channel_open()) {
                break;
            }
            // Give the pipes a moment to report their end, then stop
            // regardless.
            if now >= *drain_deadline.get_or_insert(now + DRAIN_AFTER_END) {
                break;
            }
        } else if killed.is_none() {
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
                side.stop(cgroup)?;
            }
        }
        let mut wait = if killed.is_some() || ended {
            SETTLE_POLL
        } else {
            deadline.saturating_duration_since(now)
        };
        if let Some(p) = cpu_poll {
            wait = wait.min(p);
        }
        let probing = killed.is_none() && !ended;
        if let Some(p) = side.probe_period().filter(|_| probing) {
            wait = wait.min(p);
        }
        let channel_open = side.channel_open();
        let ready = poll_tags(
            &[
                (0, !ended, side.end_fd()),
                (1, out_open, out_r.as_fd()),
                (2, err_open, err_r.as_fd()),
                (3, channel_open, side.channel_fd()),
            ],
            cancel.filter(|_| killed.is_none() && !ended),
            wait,
        )?;
        for tag in ready {
            match tag {
                0 => ended = side.on_end_readable()?,
                1 => out_open = drain_capped(out_r, &mut stdout),
                2 => err_open = drain_capped(err_r, &mut stderr),
                3 => side.on_channel_readable(),
                _ => {}
            }
        }
        if probing {
            side.probe();
        }
    }
    if killed.is_none() {
        killed = over_cap(&stdout, &stderr).map(Termination::OutputCapped);
        if killed.is_some() {
            side.stop(cgroup)?;
        }
    }
    Ok(Watched {
        stdout,
        stderr,
        killed,
        ended_mono,
    })
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
