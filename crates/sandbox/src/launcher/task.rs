//! The task process's steps, from the fork in the init to `execve`: its
//! `oom_score_adj` back, a user namespace of its own (a fork server), then
//! its cgroup, session, stdin, rlimits, capability bounding set, ids,
//! work dir, umask, `no_new_privs` and seccomp.
//!
//! This runs between `fork` and `execve`: nothing here allocates (every
//! string and filter was prepared in [`Exec`] before the fork, and the
//! calls go through a `&dyn Syscall`).

use std::os::fd::{AsFd, OwnedFd};

use nix::errno::Errno;
use nix::sched::CloneFlags;
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Uid};

use super::Exec;
use crate::spec::LaunchSpec;
use crate::syscall::Syscall;
use crate::{rlimits, seccomp};

/// The whole task process: returns only on failure, with the step that
/// failed and its errno. `userns` holds the task's ends of the `unshared`
/// and `mapped` pipes when the task gets a user namespace of its own.
pub(super) fn run(
    sys: &dyn Syscall,
    spec: &LaunchSpec,
    exec: &Exec,
    userns: Option<(OwnedFd, OwnedFd)>,
) -> (&'static str, Errno) {
    // The task gets its `oom_score_adj` back first, while this process is
    // still root of the host's user namespace: once in a namespace of its
    // own (a fork server), its /proc files belong to an id that namespace
    // does not map.
    if let Some(value) = &exec.oom_score_adj
        && let Err(e) = sys.set_oom_score_adj(value)
    {
        return (
            "oom_score_adj",
            Errno::from_raw(e.raw_os_error().unwrap_or(0)),
        );
    }
    if let Some((unshared, mapped)) = userns {
        let owner = spec
            .userns
            .iter()
            .find(|r| r.inside == 0)
            .map_or(u32::MAX, |r| r.outside);
        if let Err(errno) = enter_userns(sys, owner, unshared, mapped) {
            return ("user namespace", errno);
        }
    }
    task_exec(sys, spec, exec)
}

/// In the task process: unshares a user namespace, says so on
/// `unshared`, waits for the init to write its id maps (a byte on
/// `mapped`), then becomes root of that namespace, which is the host uid
/// the executor leased for it: no capability of the process reaches the
/// host's namespaces any more.
///
/// The namespace is created with the effective ids set to `owner` (the
/// host uid its root maps to), which makes `owner` its owner: what the
/// kernel counts per user for the processes inside (inotify instances,
/// message-queue bytes, pending signals) is then also charged to `owner`,
/// a task uid, never to host root. Effective capabilities are kept across
/// that change (`SECBIT_NO_SETUID_FIXUP`) so that the creation is a
/// privileged one; the new namespace starts with default securebits.
fn enter_userns(
    sys: &dyn Syscall,
    owner: u32,
    unshared: OwnedFd,
    mapped: OwnedFd,
) -> Result<(), Errno> {
    sys.set_securebits(SECBIT_NO_SETUID_FIXUP)?;
    let keep = (Uid::from_raw(u32::MAX), Gid::from_raw(u32::MAX));
    sys.setresgid(keep.1, Gid::from_raw(owner), keep.1)?;
    sys.setresuid(keep.0, Uid::from_raw(owner), keep.0)?;
    sys.unshare(CloneFlags::CLONE_NEWUSER)?;
    sys.write(unshared.as_fd(), b"u")?;
    drop(unshared);
    let mut b = [0u8; 1];
    if sys.read(mapped.as_fd(), &mut b)? != 1 {
        return Err(Errno::EPIPE);
    }
    let root = (Uid::from_raw(0), Gid::from_raw(0));
    sys.setgroups(&[])?;
    sys.setresgid(root.1, root.1, root.1)?;
    sys.setresuid(root.0, root.0, root.0)
}

/// `SECBIT_NO_SETUID_FIXUP`: effective capabilities survive a change of the
/// effective uid.
pub(super) const SECBIT_NO_SETUID_FIXUP: libc::c_ulong = 1 << 2;

/// The task process: drop everything, then exec. Returns only on failure,
/// with the stage and errno.
fn task_exec(sys: &dyn Syscall, spec: &LaunchSpec, exec: &Exec) -> (&'static str, Errno) {
    macro_rules! step {
        ($stage:literal, $e:expr) => {
            if let Err(errno) = $e {
                return ($stage, errno);
            }
        };
    }
    // Out of the supervisor's leaf into the task's, and a cgroup namespace
    // rooted there (the task sees its own cgroup as `/`).
    if let Some(join) = &exec.task_join {
        step!("cgroup", sys.write(join.as_fd(), b"0").map(drop));
        step!("cgroup namespace", sys.unshare(CloneFlags::CLONE_NEWCGROUP));
    }
    step!("setsid", sys.setsid());
    if let Some(path) = &exec.stdin {
        step!("stdin", sys.open_stdin(path.as_c_str()));
    }
    step!("rlimits", rlimits::apply(sys, &spec.rlimits));
    // Drop the capability bounding set while we still hold CAP_SETPCAP (a
    // fork server keeps the few it needs: root's capabilities after execve
    // are its bounding set).
    for cap in 0..=63 {
        if spec.fork_server && seccomp::FORK_SERVER_CAPS.contains(&cap) {
            continue;
        }
        // It fails with EINVAL past the last capability the kernel knows,
        // which ends the loop.
        if sys.capbset_drop(cap).is_err() {
            break;
        }
    }
    if !spec.fork_server {
        step!("setgroups", sys.setgroups(&[]));
        let (uid, gid) = (Uid::from_raw(spec.uid), Gid::from_raw(spec.gid));
        step!("setresgid", sys.setresgid(gid, gid, gid));
        // Changing all uids away from 0 clears the permitted, effective and
        // ambient capability sets.
        step!("setresuid", sys.setresuid(uid, uid, uid));
    }
    step!("chdir", sys.chdir_cstr(exec.work_dir.as_c_str()));
    sys.umask(Mode::from_bits_truncate(0o022));
    step!("no_new_privs", sys.set_no_new_privs());
    step!("seccomp", sys.seccomp(&exec.filters));
    ("execve", sys.execve(&exec.argv[0], &exec.argv, &exec.env))
}
