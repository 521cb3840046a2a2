//! The launcher: a short-lived, single-threaded process (our own binary,
//! re-executed) that builds one sandbox and starts the task in it.
//!
//! Three processes, each with one job:
//! - **launcher** (host PID namespace, root): reads the base [`LaunchSpec`]
//!   (the sandbox's shape, without the task), moves itself into its task
//!   cgroup where the driver allows it (cgroup v1), unshares the namespaces, builds
//!   the file system ([`crate::mounts`]) with an empty work dir, compiles the
//!   seccomp filter and reports `Ready`; then reads the task's spec (a second
//!   frame: sent right behind the first for a cold run, whenever a task comes
//!   for a pre-built sandbox of [`crate::pool`]), writes the task's files into
//!   the work dir, waits for the executor's go (sent once the launcher sits
//!   in its task cgroup), unshares the cgroup namespace and forks the init.
//!   (A launcher whose first frame is already the whole spec, with its work
//!   files, gets the go straight after `Ready`.)
//! - **init** (PID 1 of the new PID namespace, root, dies with the launcher via
//!   PDEATHSIG): mounts /proc, names the host, brings up loopback, forks the
//!   task, reaps every process, and when the task's main process ends kills
//!   all that is left (`kill(-1)` from PID 1 reaches every process in the
//!   namespace, daemons included), reads the output back symlink-proof and
//!   reports `Finished`.
//! - **task**: moves into the task's cgroup leaf (cgroup v2) and a cgroup
//!   namespace rooted there, `oom_score_adj` back to 0, new session,
//!   rlimits, no capabilities (bounding set dropped),
//!   unprivileged uid/gid, no supplementary groups, `no_new_privs`, seccomp,
//!   then `execve` with exactly the environment in the spec.
//!
//! The launcher and the init are the sandbox's supervisor: `oom_score_adj`
//! -1000, and on cgroup v2 a cgroup leaf of their own beside the task's
//! (see [`crate::cgroup::TaskCgroup::attach_supervisor`]), so a memory
//! limit's OOM kill ends the task and never the process that reports it.
//!
//! The launcher is a fresh single-threaded process, so allocating between fork
//! and exec is safe here; the executor itself (possibly multi-threaded) only
//! ever spawns it with `std::process::Command`.
//!
//! Every step of the set-up goes through [`Syscall`] ([`LinuxSyscall`] here):
//! [`build_sandbox`] (the launcher's namespaces and root), [`init_setup`]
//! (the init's `/proc`, host name and loopback) and [`task::run`] (the task
//! process's steps up to `execve`) are unit-tested in `launcher/tests.rs`
//! against a recording fake: their order, the limits and capabilities
//! applied for a spec, and that a failing step stops the sequence.

mod task;
#[cfg(test)]
mod tests;

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork};

use crate::frame::{read_frame, write_frame};
use crate::mounts::{self, Files};
use crate::spec::{ExitStatus, FileMeta, LaunchSpec, ReadBack, Report, SandboxFile};
use crate::syscall::Syscall;
use crate::syscall::linux::LinuxSyscall;
use crate::{fsread, namespaces, seccomp};

/// The byte that announces the task's spec frame after `Ready` (any other
/// byte is the go, for a launcher whose first frame was the whole spec).
pub(crate) const TASK_FOLLOWS: u8 = b't';

/// The first argument that turns our binary into the launcher.
pub const LAUNCHER_ARG: &str = "__taskexec-launcher";

/// A failure to build the sandbox: an environment problem, never the task's.
#[derive(Debug)]
pub(crate) struct SetupError {
    stage: &'static str,
    message: String,
}

impl SetupError {
    pub(crate) fn new(stage: &'static str, message: impl Into<String>) -> Self {
        Self {
            stage,
            message: message.into(),
        }
    }
}

/// Runs the launcher and exits if this process was started as one; returns
/// otherwise. Call first thing in `main`, before any thread is started.
pub fn run_if_launcher() {
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == LAUNCHER_ARG)
    {
        launcher_main()
    }
}

pub(crate) fn mono_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    #[allow(clippy::cast_sign_loss, reason = "CLOCK_MONOTONIC is never negative")]
    let ns = t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64;
    ns
}

fn launcher_main() -> ! {
    // Die with the executor (its spawning thread): the executor passes its
    // pid so a death before this point is noticed too.
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    let expected_parent: Option<i32> = std::env::args().nth(2).and_then(|p| p.parse().ok());
    if expected_parent.is_some_and(|p| p != nix::unistd::getppid().as_raw()) {
        std::process::exit(124);
    }
    // Close every descriptor we did not ask for. Our channel to the executor
    // is a socket on stdin: move it to a close-on-exec descriptor and put
    // /dev/null in its place, so no process of the sandbox inherits it.
    // SAFETY: close_range, fcntl, open and dup2 on descriptor numbers; this
    // fresh single-threaded process owns descriptors 0 to 2 and nothing else.
    let channel = unsafe {
        libc::syscall(libc::SYS_close_range, 3, u32::MAX, 0);
        let channel = libc::fcntl(0, libc::F_DUPFD_CLOEXEC, 3);
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        if channel < 0 || null < 0 || libc::dup2(null, 0) < 0 {
            std::process::exit(123);
        }
        libc::close(null);
        channel
    };
    // SAFETY: `channel` was just created above and is owned only here.
    let mut spec_in = unsafe { File::from_raw_fd(channel) };
    let mut report = match spec_in.try_clone() {
        Ok(f) => f,
        Err(_) => std::process::exit(123),
    };
    let code = match launch(&mut spec_in, &mut report) {
        Ok(code) => code,
        Err(e) => {
            let _ = write_frame(
                &mut report,
                &Report::SetupFailed {
                    stage: e.stage.to_string(),
                    message: e.message,
                },
                &[],
            );
            125
        }
    };
    std::process::exit(code)
}

fn split_files(
    metas: &[FileMeta],
    blobs: &mut std::vec::IntoIter<Vec<u8>>,
) -> Result<Vec<SandboxFile>, SetupError> {
    metas
        .iter()
        .map(|m| {
            let content = blobs
                .next()
                .ok_or_else(|| SetupError::new("spec", "file contents missing from the spec"))?;
            Ok(SandboxFile {
                path: m.path.clone(),
                content,
                executable: m.executable,
            })
        })
        .collect()
}

/// Moves this (single-threaded) process into its task cgroup by writing `0`
/// into each hierarchy's `tasks` file: see
/// [`crate::cgroup::TaskCgroup::self_join_files`].
fn join_cgroup(files: &[std::path::PathBuf]) -> Result<(), SetupError> {
    for path in files {
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|mut f| f.write_all(b"0"))
            .map_err(|e| SetupError::new("cgroup", format!("joining {}: {e}", path.display())))?;
    }
    Ok(())
}

fn cstrings<I: IntoIterator<Item = String>>(items: I) -> Result<Vec<CString>, SetupError> {
    items
        .into_iter()
        .map(|s| CString::new(s).map_err(|_| SetupError::new("spec", "NUL byte in argv or env")))
        .collect()
}

/// Everything the task process needs, prepared before any fork.
struct Exec {
    argv: Vec<CString>,
    env: Vec<CString>,
    work_dir: CString,
    stdin: Option<CString>,
    filters: Vec<seccompiler::BpfProgram>,
    /// The task leaf's `cgroup.procs`, opened (close-on-exec) before the
    /// sandbox was built: see [`LaunchSpec::task_join`].
    task_join: Option<File>,
    /// The `oom_score_adj` the task gets back, when the supervisor's was
    /// lowered (see [`shield_from_oom`]).
    oom_score_adj: Option<String>,
}

impl Exec {
    /// The task's argv, environment and paths as C strings, with the rest.
    fn new(
        spec: &LaunchSpec,
        filters: Vec<seccompiler::BpfProgram>,
        task_join: Option<File>,
        oom_score_adj: Option<String>,
    ) -> Result<Self, SetupError> {
        Ok(Self {
            argv: cstrings(spec.argv.clone())?,
            env: cstrings(spec.env.iter().map(|(k, v)| format!("{k}={v}")))?,
            work_dir: cstrings([spec.work_dir.clone()])?.remove(0),
            stdin: spec
                .stdin_path
                .clone()
                .map(|p| cstrings([p]))
                .transpose()?
                .map(|mut v| v.remove(0)),
            filters,
            task_join,
            oom_score_adj,
        })
    }
}

/// Makes the supervisor (this process, and the init it forks) no OOM
/// killer's choice: `oom_score_adj` -1000. Returns the value to give the
/// task back, or `None` when it could not be lowered (an executor without
/// CAP_SYS_RESOURCE, as in some containers: then the cgroup leaves of v2
/// alone keep an OOM kill off the supervisor). The value is inherited by
/// the children; one set with CAP_SYS_RESOURCE is also the lowest the
/// process may set later.
fn shield_from_oom() -> Option<String> {
    let original = std::fs::read_to_string("/proc/self/oom_score_adj").ok()?;
    LinuxSyscall
        .set_oom_score_adj("-1000")
        .ok()
        .map(|()| original.trim().to_string())
}

/// The launcher's set-up before `Ready`: the namespaces, then the root file
/// system (ending with the pivot into it). Returns when each step ended
/// (monotonic ns): the start, the namespaces, the mounts.
fn build_sandbox(
    sys: &dyn Syscall,
    spec: &LaunchSpec,
    files: &Files,
) -> Result<(u64, u64, u64), SetupError> {
    let t_start = mono_ns();
    namespaces::unshare_all(sys, spec.share_network)?;
    let t_ns = mono_ns();
    mounts::build_root(sys, spec, files)?;
    Ok((t_start, t_ns, mono_ns()))
}

/// The init's set-up, first thing in PID 1: dies with the launcher, mounts
/// `/proc`, names the host, brings up loopback (in a network namespace of
/// its own). Returns when `/proc` and the host name were done, and when the
/// network was (monotonic ns).
fn init_setup(sys: &dyn Syscall, spec: &LaunchSpec) -> Result<(u64, u64), SetupError> {
    sys.set_pdeathsig_kill()
        .map_err(|e| SetupError::new("init", format!("pdeathsig: {e}")))?;
    mounts::mount_proc(sys)?;
    namespaces::set_hostname(sys, &spec.hostname)?;
    let t_proc = mono_ns();
    if !spec.share_network {
        namespaces::loopback_up(sys)?;
    }
    Ok((t_proc, mono_ns()))
}

fn launch(spec_in: &mut File, report: &mut File) -> Result<i32, SetupError> {
    let (spec, blobs): (LaunchSpec, Vec<Vec<u8>>) = read_frame(spec_in)
        .map_err(|e| SetupError::new("spec", e.to_string()))?
        .ok_or_else(|| SetupError::new("spec", "no spec received"))?;
    join_cgroup(&spec.self_join)?;
    // The supervisor (we and the init) is never the OOM killer's choice:
    // the task's first process sets its own back before its exec.
    let oom_score_adj = shield_from_oom();
    // Opened now, while the host's cgroup file system is in view and in
    // the host's cgroup namespace (a write is checked against the opener's).
    let task_join = spec
        .task_join
        .as_ref()
        .map(|p| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(p)
                .map_err(|e| SetupError::new("cgroup", format!("opening {}: {e}", p.display())))
        })
        .transpose()?;
    let mut blobs = blobs.into_iter();
    let files = Files {
        work: split_files(&spec.work_files, &mut blobs)?,
        support: split_files(&spec.support_files, &mut blobs)?,
        etc: split_files(&spec.etc_files, &mut blobs)?,
    };
    let (t_start, t_ns, t_mounts) = build_sandbox(&LinuxSyscall, &spec, &files)?;
    drop(files);

    // The seccomp profile belongs to the sandbox's shape: compiled before
    // the task arrives.
    let filters = seccomp::build_filters_for(if spec.fork_server {
        seccomp::Profile::ForkServer
    } else {
        seccomp::Profile::Task
    })
    .map_err(|e| SetupError::new("seccomp", e.to_string()))?;
    write_frame(
        report,
        &Report::Ready {
            mono_ns: t_start,
            ns_done_ns: t_ns,
            mounts_done_ns: t_mounts,
        },
        &[],
    )
    .map_err(|e| SetupError::new("report", e.to_string()))?;

    // Then one byte: [`TASK_FOLLOWS`] and the task's spec (at once for a
    // cold run, whenever the executor hands a task to a pre-built sandbox of
    // the pool), then the go; or the go itself, when the first frame was the
    // whole spec already. The go says we sit in the task cgroup (moved
    // there by the executor, or by ourselves at the start). From here on
    // `spec` is the task's.
    let mut next = [0u8; 1];
    let spec = match spec_in.read(&mut next) {
        Ok(1) if next[0] == TASK_FOLLOWS => {
            let Some((task, work)) = receive_task(spec_in, &spec)? else {
                return Ok(124); // executor gone, or a pooled sandbox it no longer wants
            };
            mounts::write_work_files(&LinuxSyscall, &task, &work)?;
            match spec_in.read(&mut next) {
                Ok(1) => task,
                _ => return Ok(124), // executor gone or cancelled before the start
            }
        }
        Ok(1) => spec,
        _ => return Ok(124), // executor gone or cancelled before the start
    };
    if spec.argv.is_empty() {
        return Err(SetupError::new("spec", "empty argv"));
    }
    let exec = Exec::new(&spec, filters, task_join, oom_score_adj)?;
    namespaces::unshare_cgroup(&LinuxSyscall)?;

    // SAFETY: this process is single-threaded (a fresh exec of our binary
    // that starts no thread), so the child may allocate freely.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            let code = match init(&spec, &exec, report) {
                Ok(()) => 0,
                Err(e) => {
                    let _ = write_frame(
                        report,
                        &Report::SetupFailed {
                            stage: e.stage.to_string(),
                            message: e.message,
                        },
                        &[],
                    );
                    125
                }
            };
            std::process::exit(code)
        }
        Ok(ForkResult::Parent { child }) => loop {
            match waitpid(child, None) {
                Ok(WaitStatus::Exited(_, code)) => return Ok(code),
                Ok(WaitStatus::Signaled(..)) => return Ok(126),
                Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(SetupError::new("init", format!("waitpid: {e}"))),
            }
        },
        Err(e) => Err(SetupError::new("init", format!("fork: {e}"))),
    }
}

/// Reads the task's spec (the second frame: the whole spec, with the work
/// files' contents as its blobs), checks that it fits the sandbox built from
/// `base`, and returns it with its work files. `None` when the executor
/// closed the channel instead.
fn receive_task(
    spec_in: &mut File,
    base: &LaunchSpec,
) -> Result<Option<(LaunchSpec, Vec<SandboxFile>)>, SetupError> {
    let Some((task, blobs)) = read_frame::<_, LaunchSpec>(spec_in)
        .map_err(|e| SetupError::new("spec", format!("task spec: {e}")))?
    else {
        return Ok(None);
    };
    if !base.same_sandbox(&task) {
        return Err(SetupError::new(
            "spec",
            "the task does not fit the sandbox built for it",
        ));
    }
    let mut blobs = blobs.into_iter();
    let work = split_files(&task.work_files, &mut blobs)?;
    if blobs.next().is_some() {
        return Err(SetupError::new("spec", "extra blobs in the task spec"));
    }
    Ok(Some((task, work)))
}

/// PID 1 of the sandbox.
fn init(spec: &LaunchSpec, exec: &Exec, report: &mut File) -> Result<(), SetupError> {
    let t_init = mono_ns();
    let (t_proc, t_net) = init_setup(&LinuxSyscall, spec)?;
    let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| SetupError::new("init", format!("pipe: {e}")))?;

    // A task with a user namespace of its own (a fork server) unshares it
    // and says so on `unshared`; we write its id maps and answer on
    // `mapped`.
    let userns = if spec.userns.is_empty() {
        None
    } else {
        let pipe = || {
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|e| SetupError::new("init", format!("pipe: {e}")))
        };
        Some((pipe()?, pipe()?))
    };

    let t_fork = mono_ns();
    // SAFETY: single-threaded process (see `launch`).
    let task = match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            drop(err_r);
            let userns = userns.map(|((_, unshared_w), (mapped_r, _))| (unshared_w, mapped_r));
            let (stage, errno) = task::run(&LinuxSyscall, spec, exec, userns);
            let mut w = File::from(err_w);
            let _ = w.write_all(format!("{stage}: {errno}").as_bytes());
            // SAFETY: _exit ends the process without running destructors or
            // atexit handlers, which belong to the parent.
            unsafe { libc::_exit(127) }
        }
        Ok(ForkResult::Parent { child }) => child,
        Err(e) => return Err(SetupError::new("init", format!("fork task: {e}"))),
    };
    drop(err_w);
    if let Some(((unshared_r, unshared_w), (mapped_r, mapped_w))) = userns {
        drop((unshared_w, mapped_r));
        if let Err(e) = map_ids(task, &spec.userns, unshared_r, mapped_w) {
            kill_all_and_reap();
            return Err(e);
        }
    }
    let mut exec_error = String::new();
    let _ = File::from(err_r).read_to_string(&mut exec_error);
    if !exec_error.is_empty() {
        kill_all_and_reap();
        return Err(SetupError::new("exec", exec_error));
    }
    let _ = write_frame(
        report,
        &Report::Started {
            mono_ns: mono_ns(),
            init_ns: t_init,
            proc_ns: t_proc,
            net_ns: t_net,
            fork_ns: t_fork,
        },
        &[],
    );

    let (status, disk_hit) = wait_for_task(task, &spec.work_dir)?;
    let t_exit = mono_ns();
    kill_all_and_reap();
    finish(spec, status, disk_hit, t_exit, report)
}

/// How often the init looks at the work directory's file system while the
/// task runs, to see whether the task filled it (tmpfs has no event
/// counter to read afterwards, and a task can free what it wrote before it
/// exits).
pub(crate) const DISK_PROBE: std::time::Duration = std::time::Duration::from_millis(20);

/// In the init: reaps every process that ends until the task's main
/// process does, and returns its status and whether its work directory's
/// file system was seen full meanwhile. The task's end wakes the wait at
/// once (its pidfd); other ended processes (orphans reparented to the
/// init) are reaped at the next probe. Without pidfds (Linux < 5.3) the
/// wait blocks and only the end is probed.
fn wait_for_task(task: Pid, work_dir: &str) -> Result<(ExitStatus, bool), SetupError> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let task_end = u32::try_from(task.as_raw())
        .ok()
        .and_then(|pid| crate::spawn::pidfd_open(pid).ok());
    let work = fsread::open_dir(work_dir).ok();
    let mut disk_hit = false;
    let flags = task_end.as_ref().map(|_| WaitPidFlag::WNOHANG);
    loop {
        match waitpid(Pid::from_raw(-1), flags) {
            Ok(WaitStatus::Exited(pid, code)) if pid == task => {
                return Ok((ExitStatus::Code(code), disk_hit));
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == task => {
                return Ok((ExitStatus::Signal(sig as i32), disk_hit));
            }
            Ok(WaitStatus::StillAlive) => {}
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(SetupError::new("init", format!("waitpid: {e}"))),
        }
        // Nothing more to reap now: wait for the task's end or the probe.
        if let Some(end) = &task_end {
            let mut fds = [PollFd::new(end.as_fd(), PollFlags::POLLIN)];
            let ms = u16::try_from(DISK_PROBE.as_millis()).unwrap_or(u16::MAX);
            let _ = poll(&mut fds, PollTimeout::from(ms));
        }
        disk_hit |= work.as_ref().is_some_and(fs_full);
    }
}

/// Whether the file system of `dir` has no block or no inode left.
pub(crate) fn fs_full(dir: &OwnedFd) -> bool {
    nix::sys::statvfs::fstatvfs(dir)
        .map(|s| s.blocks_available() == 0 || s.files_available() == 0)
        .unwrap_or(false)
}

/// In the init: waits for the task to unshare its user namespace, writes
/// its uid and gid maps, and lets it go on. A task that ended first has
/// said why on its error pipe, which the caller reads next.
fn map_ids(
    task: Pid,
    ranges: &[crate::spec::IdRange],
    unshared: OwnedFd,
    mapped: OwnedFd,
) -> Result<(), SetupError> {
    let mut b = [0u8; 1];
    loop {
        match nix::unistd::read(&unshared, &mut b) {
            Ok(1) => break,
            Err(nix::errno::Errno::EINTR) => continue,
            _ => return Ok(()),
        }
    }
    let map = crate::spec::id_map(ranges);
    for file in ["uid_map", "gid_map"] {
        let path = format!("/proc/{task}/{file}");
        std::fs::write(&path, &map)
            .map_err(|e| SetupError::new("user namespace", format!("writing {path}: {e}")))?;
    }
    nix::unistd::write(&mapped, b"m")
        .map_err(|e| SetupError::new("user namespace", format!("resuming the task: {e}")))?;
    Ok(())
}

/// Kills every other process of the PID namespace and reaps them all.
fn kill_all_and_reap() {
    loop {
        let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::__WALL)) {
            Err(nix::errno::Errno::ECHILD) => return,
            _ => continue,
        }
    }
}

/// Reads the output back and sends the final report.
fn finish(
    spec: &LaunchSpec,
    status: ExitStatus,
    disk_hit: bool,
    t_exit: u64,
    report: &mut File,
) -> Result<(), SetupError> {
    let work =
        fsread::open_dir(&spec.work_dir).map_err(|e| SetupError::new("readback", e.to_string()))?;
    let mut read_back = Vec::new();
    let mut blobs: Vec<Vec<u8>> = Vec::new();
    for path in &spec.read_back {
        let rel = path
            .strip_prefix(&spec.work_dir)
            .map(|p| p.trim_start_matches('/'))
            .ok_or_else(|| {
                SetupError::new("readback", format!("{path} is outside the work dir"))
            })?;
        match fsread::read_capped(&work, rel, spec.read_back_cap) {
            Ok((data, truncated)) => {
                read_back.push(ReadBack::Read { truncated });
                blobs.push(data);
            }
            Err(fsread::ReadError::Missing) => read_back.push(ReadBack::Missing),
            Err(e) => read_back.push(ReadBack::Refused {
                reason: e.to_string(),
            }),
        }
    }
    let mut collected = Vec::new();
    let mut collect_error = None;
    if let Some(dir) = &spec.collect_dir {
        match fsread::collect_dir(&work, dir, spec.collect_cap) {
            Ok(files) => {
                for (name, data) in files {
                    collected.push(name);
                    blobs.push(data);
                }
            }
            Err(e) => collect_error = Some(format!("{dir}: {e}")),
        }
    }
    let disk_full = disk_hit || fs_full(&work);
    let refs: Vec<&[u8]> = blobs.iter().map(Vec::as_slice).collect();
    write_frame(
        report,
        &Report::Finished {
            mono_ns: t_exit,
            status,
            disk_full,
            read_back,
            collected,
            collect_error,
        },
        &refs,
    )
    .map_err(|e| SetupError::new("report", e.to_string()))
}
