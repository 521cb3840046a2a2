//! Spare children: forked ahead of any task, each in a cgroup of its own
//! and prepared (namespaces, mounts, seccomp), kept topped up by the
//! server's refill thread.

use std::io::{IoSlice, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg, setsockopt, sockopt};

use super::server::{STEP_TIMEOUT, Server};
use super::wire::{recv_with_creds, wait_readable};
use crate::cgroup::{CgroupLimits, TaskCgroup};
use crate::closer::Deferred;
use crate::spawn::{Sandbox, SandboxError, cgroup_name, io, nix_io};

/// Limits of a spare child's cgroup until a task sets its own (after the
/// first task, spares are made with the last task's limits, so a run of
/// alike tasks skips rewriting them).
pub(super) const SPARE_LIMITS: CgroupLimits = CgroupLimits {
    memory_bytes: 64 << 20,
    pids: 16,
    cpu_request_millis: 100,
    cpu_limit_millis: None,
};

/// Spare children kept per server at most.
pub(super) const MAX_SPARES: usize = 8;

/// A forked child, attached to its own cgroup, waiting for its spec.
#[derive(Debug)]
pub(super) struct Spare {
    /// The limits its cgroup was made with.
    pub(super) limits: CgroupLimits,
    /// Our end of the task channel. Once the task runs, its code can queue
    /// descriptors in it, and closing it closes them: it is closed on the
    /// closer thread ([`crate::closer`]).
    pub(super) task: Deferred<UnixStream>,
    pub(super) out_r: OwnedFd,
    pub(super) err_r: OwnedFd,
    pub(super) status_r: OwnedFd,
    pub(super) cgroup: Box<dyn TaskCgroup>,
    /// The uid of the task it was given: back to the server only once
    /// every process of the task is gone.
    pub(super) lease: Option<ChildUid>,
}

/// A uid of a server's pool, lent to one run. Given back when dropped:
/// by a run that never handed its task over, at once; by a run that did,
/// with its spare, after the spare's cgroup is empty, so no process of one
/// task can still be there when a later task gets the same uid. It keeps
/// the server's block of host uids leased meanwhile.
#[derive(Debug)]
pub(super) struct ChildUid {
    pub(super) server: Weak<Server>,
    pub(super) uid: u32,
    pub(super) _block: Arc<crate::uids::UidLease>,
}

impl Drop for ChildUid {
    fn drop(&mut self) {
        if let Some(server) = self.server.upgrade() {
            server.give_uid(self.uid);
        }
    }
}

impl Spare {
    /// Still alive and silent (a dead child's status pipe is readable).
    pub(super) fn waiting(&self) -> bool {
        !wait_readable(&[self.status_r.as_fd(), self.task.as_fd()], Duration::ZERO)
            .map(|r| r[0] || r[1])
            .unwrap_or(true)
    }
}

impl Drop for Spare {
    fn drop(&mut self) {
        // An unused spare, or a finished run handed to the reaper: kill
        // what is left, wait until it is gone, remove the cgroup. Then its
        // uid goes back (the lease drops after this), unless something of
        // the task may have survived: that uid is then never lent again.
        if self.cgroup.kill_all().is_err()
            && let Some(lease) = self.lease.take()
        {
            std::mem::forget(lease);
        }
        let _ = self.cgroup.remove();
    }
}

pub(super) fn refill(weak: &Weak<Server>, sandbox: &Sandbox) {
    loop {
        let Some(server) = weak.upgrade() else {
            return;
        };
        if server.stopping.load(Ordering::SeqCst) {
            // The server's launcher dies with this thread (its parent-death
            // signal follows the thread that spawned it), and with it every
            // child of the server: a stopped server (recycled, evicted)
            // may still have runs in flight. Wait until ours is the last
            // reference, then drop it here, so the server's `Drop` (kill,
            // wait, remove the cgroup) runs on this thread, off the path of
            // the last run's answer.
            while Arc::strong_count(&server) > 1 {
                std::thread::sleep(Duration::from_millis(20));
            }
            drop(server);
            return;
        }
        // Two ahead: a spare's cgroup attach can wait out an RCU grace
        // period (cgroup v1), longer than a task takes.
        let target = (server.in_flight.load(Ordering::SeqCst) + 2).min(MAX_SPARES);
        let have = server.spares.lock().map(|s| s.len()).unwrap_or(MAX_SPARES);
        if have < target {
            match server.make_spare(sandbox) {
                Ok(spare) => {
                    if let Ok(mut spares) = server.spares.lock() {
                        spares.push_back(spare);
                    }
                }
                Err(_) if !server.alive() => return,
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
            continue;
        }
        let guard = server.spares.lock().unwrap_or_else(|p| p.into_inner());
        let _ = server.refill.wait_timeout(guard, Duration::from_secs(1));
    }
}

impl Server {
    /// Forks a child in a cgroup of its own: a spare, ready for any task.
    /// Made ahead of time by the refill thread, so the fork and the cgroup
    /// are off the task's path. On cgroup v1 the child moves itself into
    /// the cgroup (`0` into the `tasks` files it gets with the request,
    /// see [`TaskCgroup::self_join_files`]) before it says hello; otherwise
    /// we move it by the pid its hello carries.
    pub(super) fn make_spare(&self, sandbox: &Sandbox) -> Result<Spare, SandboxError> {
        let cloexec = OFlag::O_CLOEXEC;
        let (task, task_theirs) = UnixStream::pair().map_err(io("socketpair"))?;
        setsockopt(&task, sockopt::PassCred, &true).map_err(nix_io("SO_PASSCRED"))?;
        let (out_r, out_w) = nix::unistd::pipe2(cloexec).map_err(nix_io("pipe"))?;
        let (err_r, err_w) = nix::unistd::pipe2(cloexec).map_err(nix_io("pipe"))?;
        let (status_r, status_w) = nix::unistd::pipe2(cloexec).map_err(nix_io("pipe"))?;
        // Spare limits until a task sets its own. From here on a failure
        // drops the spare, which removes its cgroup.
        let limits = *self.spare_limits.lock().unwrap_or_else(|p| p.into_inner());
        let spare = Spare {
            limits,
            task: Deferred::new(task),
            out_r,
            err_r,
            status_r,
            cgroup: sandbox.cgroups.create(&cgroup_name(), &limits)?,
            lease: None,
        };
        let join: Vec<std::fs::File> = spare
            .cgroup
            .self_join_files()
            .iter()
            .map(|p| std::fs::OpenOptions::new().write(true).open(p))
            .collect::<Result<_, _>>()
            .map_err(io("opening the cgroup's tasks files"))?;
        let moves_itself = !join.is_empty();
        {
            let control = self.control.lock().unwrap_or_else(|p| p.into_inner());
            let mut fds: Vec<RawFd> = vec![
                task_theirs.as_raw_fd(),
                out_w.as_raw_fd(),
                err_w.as_raw_fd(),
                status_w.as_raw_fd(),
            ];
            fds.extend(join.iter().map(|f| f.as_raw_fd()));
            let request = format!("{{\"join\":{}}}", join.len());
            sendmsg::<()>(
                control.as_raw_fd(),
                &[IoSlice::new(request.as_bytes())],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(nix_io("sending a request to the fork server"))?;
        }
        drop((task_theirs, out_w, err_w, status_w, join));
        // Hello: the child's pid (and, on v1, the child in its cgroup).
        let (msg, pid) = recv_with_creds(&spare.task, &spare.status_r, STEP_TIMEOUT)?;
        if msg.first() != Some(&b'h') {
            return Err(self.failed("child did not say hello"));
        }
        let pid = pid.ok_or_else(|| SandboxError::Protocol("hello without credentials".into()))?;
        if !moves_itself {
            spare.cgroup.attach(pid)?;
        }
        // In its cgroup: the child builds its namespaces and mounts now,
        // ahead of any task.
        (&*spare.task)
            .write_all(b"p")
            .map_err(io("preparing a fork-server child"))?;
        Ok(spare)
    }

    /// A spare child: a ready one if there is one, else a fresh one.
    pub(super) fn take_spare(&self, sandbox: &Sandbox) -> Result<Spare, SandboxError> {
        loop {
            let next = self
                .spares
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop_front();
            self.refill.notify_one();
            match next {
                Some(spare) if spare.waiting() => return Ok(spare),
                Some(_dead) => continue,
                None => return self.make_spare(sandbox),
            }
        }
    }
}
