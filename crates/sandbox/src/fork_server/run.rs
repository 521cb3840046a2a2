//! One run in a fork-server child: a spare gets the task's limits, uid and
//! spec; the run is watched to its end and its work dir read back.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::server::Server;
use super::spare::{ChildUid, Spare};
use super::wire::{
    ChildSpec, Peeked, parse_last_words, parse_started, parse_status, peek_last_words, recv_message,
};
use crate::cgroup::TaskCgroup;
use crate::closer::dispose;
use crate::frame::write_frame;
use crate::launcher::{DISK_PROBE, mono_ns};
use crate::spawn::{
    CancelToken, ReadBackResult, RunOutcome, RunRequest, Sandbox, SandboxError, Supervised,
    Termination, Watch, Watched, drain, io, metas, ns_delta, set_nonblocking, watch_run,
};
use crate::spec::ExitStatus;

/// Counts a run in flight while alive.
pub(super) struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Server {
    /// Runs one request in a child running as `uid`. The outer `Err` means
    /// the task was never handed over (run it cold); the inner result is the
    /// run's.
    pub(super) fn run(
        &self,
        sandbox: &Sandbox,
        req: &RunRequest,
        cancel: Option<&CancelToken>,
        lease: ChildUid,
        reaper: &std::sync::mpsc::Sender<Spare>,
    ) -> Result<Result<RunOutcome, SandboxError>, SandboxError> {
        let t0 = Instant::now();
        let t0_mono = mono_ns();
        let limits = &req.limits;
        let mut phases: Vec<(&'static str, Duration)> = Vec::new();
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let _in_flight = InFlight(&self.in_flight);
        let mut spare = self.take_spare(sandbox)?;
        let uid = lease.uid;
        spare.lease = Some(lease);
        phases.push(("takeChild", t0.elapsed()));
        let t_limits = Instant::now();
        let task_limits = limits.cgroup_limits();
        if spare.limits != task_limits {
            spare.cgroup.set_limits(&task_limits)?;
            *self.spare_limits.lock().unwrap_or_else(|p| p.into_inner()) = task_limits;
        }
        // The CPU the idle child used is not the task's.
        let cpu_base = spare.cgroup.cpu_time().unwrap_or_default();
        phases.push(("cgroupLimits", t_limits.elapsed()));

        // The spec; from here on the task is handed over.
        let spec = ChildSpec {
            uid,
            gid: uid,
            argv: &req.argv,
            env: &req.env,
            work_files: metas(&req.work_files),
            disk_bytes: limits.disk_bytes,
            disk_inodes: limits.disk_inodes(),
            stdin_path: req.stdin_path.as_deref(),
            rlimits: limits.rlimits(),
        };
        let blobs: Vec<&[u8]> = req
            .work_files
            .iter()
            .map(|f| f.content.as_slice())
            .collect();
        let t_spec = Instant::now();
        let sent = write_frame(&mut &*spare.task, &spec, &blobs);
        // Whether the task's code may have run: `m` received, or the run
        // was stopped (cancel, limits) and its verdict stands.
        let mut started = false;
        let result = self.watch(
            req,
            cancel,
            &spare,
            &mut phases,
            (t0, t0_mono, t_spec),
            sent,
            &mut started,
        );
        let t_clean = Instant::now();
        let stats = spare.cgroup.stats();
        // Waiting for the last process to be gone and removing the cgroup
        // happen off the task's path; a run whose task was never handed
        // over keeps it synchronous (the caller runs the task cold next).
        if started {
            if let Err(std::sync::mpsc::SendError(spare)) = reaper.send(spare) {
                drop(spare);
            }
        } else {
            drop(spare);
        }
        phases.push(("cleanup", t_clean.elapsed()));
        let finish = (|| {
            let mut outcome = result?;
            outcome.stats = stats?;
            outcome.stats.cpu_time = outcome.stats.cpu_time.saturating_sub(cpu_base);
            outcome.wall_time = t0.elapsed();
            outcome.phases = phases;
            Ok::<_, SandboxError>(outcome)
        })();
        match finish {
            // The child died before the task's code could start (its server
            // was killed, say): nothing of the task ran, so it may run cold.
            Err(e) if !started => Err(e),
            other => Ok(other),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn watch(
        &self,
        req: &RunRequest,
        cancel: Option<&CancelToken>,
        spare: &Spare,
        phases: &mut Vec<(&'static str, Duration)>,
        (t0, t0_mono, t_spec): (Instant, u64, Instant),
        sent: std::io::Result<()>,
        started: &mut bool,
    ) -> Result<RunOutcome, SandboxError> {
        let Spare {
            task,
            out_r,
            err_r,
            status_r,
            cgroup,
            ..
        } = spare;
        let cgroup = cgroup.as_ref();
        let limits = &req.limits;
        let deadline = t0 + limits.timeout;
        set_nonblocking(status_r)?;
        task.set_nonblocking(true).map_err(io("fcntl"))?;
        let mut side = ChildSide {
            task,
            status_r,
            status_bytes: Vec::new(),
            status_open: true,
            // The child is gone already if the spec could not be sent; its
            // status says why.
            task_open: sent.is_ok(),
            task_bytes: Vec::new(),
            work_dir: None,
            disk_hit: false,
            started_mono: None,
            t_spec,
            setup_time: None,
            last_words: Vec::new(),
            early: None,
            started,
        };
        let watch = Watch::new(
            cgroup,
            limits,
            cancel,
            deadline,
            Duration::ZERO,
            (out_r, err_r),
        );
        let watched = watch_run(&watch, &mut side);
        let ChildSide {
            status_bytes,
            task_bytes,
            work_dir,
            disk_hit,
            started_mono,
            setup_time,
            early,
            ..
        } = side;
        if let Some(setup) = setup_time {
            phases.push(("setup", setup));
        }
        let Watched {
            stdout,
            stderr,
            killed,
            ended_mono,
        } = watched?;
        let exited_mono = ended_mono.unwrap_or_else(mono_ns);
        if killed.is_none() && task_bytes.first() == Some(&b'E') {
            return Err(SandboxError::Setup {
                stage: "fork server child".into(),
                message: String::from_utf8_lossy(&task_bytes[1..]).into_owned(),
            });
        }
        let status = early.or_else(|| parse_status(&status_bytes));
        if killed.is_none() && (status.is_none() || started_mono.is_none()) {
            let log = self
                .log
                .lock()
                .map(|l| String::from_utf8_lossy(&l).trim().to_string())
                .unwrap_or_default();
            return Err(SandboxError::Protocol(format!(
                "the fork-server child ended (status {:?}) without starting the task; server log: {log}",
                String::from_utf8_lossy(&status_bytes)
            )));
        }
        let mut outcome = RunOutcome::captured(
            killed.unwrap_or(Termination::Cancelled),
            stdout,
            stderr,
            t0,
            started_mono
                .map(|s| ns_delta(t0_mono, s))
                .unwrap_or_default(),
        );
        outcome.run_time = started_mono
            .map(|s| ns_delta(s, exited_mono))
            .unwrap_or_default();
        phases.push(("run", outcome.run_time));
        if killed.is_some() {
            return Ok(outcome);
        }
        outcome.termination = Termination::Exited(status.unwrap_or(ExitStatus::Code(125)));
        let t_read = Instant::now();
        let work = work_dir.ok_or_else(|| {
            SandboxError::Protocol("no work dir from the fork-server child".into())
        })?;
        for path in &req.read_back {
            let rel = path
                .strip_prefix(self.work_dir.as_str())
                .map(|p| p.trim_start_matches('/'))
                .ok_or_else(|| SandboxError::Protocol(format!("{path} is outside the work dir")))?;
            outcome.read_back.push(
                match crate::fsread::read_capped(&work, rel, limits.output_bytes) {
                    Ok((data, truncated)) => ReadBackResult::Read { data, truncated },
                    Err(crate::fsread::ReadError::Missing) => ReadBackResult::Missing,
                    Err(e) => ReadBackResult::Refused {
                        reason: e.to_string(),
                    },
                },
            );
        }
        outcome.disk_full = disk_hit || crate::launcher::fs_full(&work);
        phases.push(("teardown", t_read.elapsed()));
        Ok(outcome)
    }
}

/// The fork-server child's side of a watch: the end of its status pipe
/// (written by its server when the child's main process exits) ends the
/// run; on the task channel come our own code's messages (`m` with the
/// work dir, `E` with a setup error), then the child's last words.
struct ChildSide<'a> {
    task: &'a UnixStream,
    status_r: &'a OwnedFd,
    status_bytes: Vec<u8>,
    status_open: bool,
    task_open: bool,
    /// What our own code said before `m` (an `E` and its message).
    task_bytes: Vec<u8>,
    work_dir: Option<OwnedFd>,
    /// The work directory's file system was seen full while the task ran.
    disk_hit: bool,
    started_mono: Option<u64>,
    /// When the spec went out, and how long after it `m` came.
    t_spec: Instant,
    setup_time: Option<Duration>,
    /// The bytes of the last words read with `m`.
    last_words: Vec<u8>,
    early: Option<ExitStatus>,
    /// Whether the task's code may have run: `m` received, or the run was
    /// stopped (cancel, limits) and its verdict stands.
    started: &'a mut bool,
}

impl Supervised for ChildSide<'_> {
    fn end_fd(&self) -> BorrowedFd<'_> {
        self.status_r.as_fd()
    }

    fn on_end_readable(&mut self) -> Result<bool, SandboxError> {
        self.status_open = drain(self.status_r, |d| self.status_bytes.extend_from_slice(d));
        Ok(!self.status_open)
    }

    fn channel_fd(&self) -> BorrowedFd<'_> {
        self.task.as_fd()
    }

    fn channel_open(&self) -> bool {
        self.task_open
    }

    fn probe_period(&self) -> Option<Duration> {
        self.work_dir.as_ref().map(|_| DISK_PROBE)
    }

    fn probe(&mut self) {
        self.disk_hit |= self.work_dir.as_ref().is_some_and(crate::launcher::fs_full);
    }

    fn on_channel_readable(&mut self) {
        if self.started_mono.is_some() {
            // Once the task runs, its code holds the other end: we only
            // peek there, and never receive.
            match peek_last_words(self.task, &self.last_words) {
                Peeked::Words(status) => self.early = Some(status),
                Peeked::Nothing => {}
                // Anything else (junk, the end): the exit status comes
                // from the server's report.
                Peeked::Other => self.task_open = false,
            }
            return;
        }
        loop {
            match recv_message(self.task) {
                Ok(Some((bytes, fd))) => {
                    // Our own code's messages: `m` with the work dir, or
                    // `E` with a setup error.
                    if self.work_dir.is_none() {
                        self.work_dir = fd;
                    } else {
                        dispose(fd);
                    }
                    if let Some((stamp, rest)) = parse_started(&bytes) {
                        self.started_mono = Some(stamp);
                        *self.started = true;
                        self.setup_time = Some(self.t_spec.elapsed());
                        // Bytes past `m` in the same read are the start of
                        // the last words.
                        self.last_words = rest.to_vec();
                        if !self.last_words.is_empty() {
                            self.early = parse_last_words(&self.last_words);
                            self.task_open = self.early.is_none() && self.last_words.len() <= 32;
                        }
                        return;
                    }
                    if self.task_bytes.len() < 64 << 10 {
                        self.task_bytes.extend_from_slice(&bytes);
                    }
                }
                Ok(None) => {
                    self.task_open = false;
                    return;
                }
                Err(nix::errno::Errno::EAGAIN) => return,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => {
                    self.task_open = false;
                    return;
                }
            }
        }
    }

    fn on_end(&mut self, cgroup: &dyn TaskCgroup) -> Result<(), SandboxError> {
        // The main process ended: nothing else of the task may outlive it
        // (daemons included).
        cgroup.kill_all()?;
        Ok(())
    }

    fn stop(&mut self, cgroup: &dyn TaskCgroup) -> Result<(), SandboxError> {
        *self.started = true;
        cgroup.kill_all()?;
        Ok(())
    }

    fn told_its_end(&self) -> bool {
        self.early.is_some()
    }
}
