//! The seam under the sandbox's set-up: every mount, pivot and file
//! operation [`crate::mounts`] does, and every step the launcher, the init
//! and the task process take to build the sandbox and drop privileges
//! (namespaces, rlimits, the capability bounding set, the uid/gid switch,
//! `no_new_privs`, seccomp, `execve`), goes through [`Syscall`]. Unit tests
//! run the same code against a recording fake (`test::RecordingSyscall`, in
//! tests), so the sequence of mounts with their flags, the limits and
//! capabilities applied for a spec, the order of the steps and where a
//! failing step stops are checked without root; the launcher uses the real
//! calls ([`linux::LinuxSyscall`]), the only implementation with `unsafe`.
//!
//! Between `fork` and `execve` the task process calls this trait through a
//! `&dyn Syscall`: a virtual call, no allocation.

pub(crate) mod linux;
#[cfg(test)]
pub(crate) mod test;

use std::ffi::{CStr, CString};
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::resource::Resource;
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Uid};
use seccompiler::BpfProgram;

/// What a host path is, for a read-only bind of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HostKind {
    /// A directory: bound on a directory.
    Dir,
    /// Anything else that is not a symlink: bound on an empty file.
    File,
    /// A symlink, replicated with this target.
    Symlink(PathBuf),
}

/// The calls the sandbox's set-up makes.
pub(crate) trait Syscall {
    /// `mount(2)`.
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> nix::Result<()>;
    /// `umount2(2)`.
    fn umount2(&self, target: &Path, flags: MntFlags) -> nix::Result<()>;
    /// `pivot_root(2)`.
    fn pivot_root(&self, new_root: &Path, put_old: &Path) -> nix::Result<()>;
    /// `chdir(2)`.
    fn chdir(&self, path: &Path) -> nix::Result<()>;
    /// Creates a directory and its missing parents with `mode`.
    fn mkdir_p(&self, path: &Path, mode: u32) -> std::io::Result<()>;
    /// Whether `path` exists.
    fn exists(&self, path: &Path) -> bool;
    /// Creates a new file (`O_CREAT|O_EXCL`, never through a symlink) with
    /// `mode` and `content`.
    fn create_file(&self, path: &Path, mode: u32, content: &[u8]) -> std::io::Result<()>;
    /// Creates an empty file (a bind target), or truncates one.
    fn touch(&self, path: &Path) -> std::io::Result<()>;
    /// `symlink(2)`: `link` pointing at `target`.
    fn symlink(&self, target: &Path, link: &Path) -> std::io::Result<()>;
    /// `chown(2)`.
    fn chown(&self, path: &Path, uid: u32, gid: u32) -> std::io::Result<()>;
    /// `chmod(2)`.
    fn chmod(&self, path: &Path, mode: u32) -> std::io::Result<()>;
    /// `rmdir(2)`.
    fn remove_dir(&self, path: &Path) -> std::io::Result<()>;
    /// What the host path is (`lstat`, and `readlink` for a symlink).
    fn host_kind(&self, path: &Path) -> std::io::Result<HostKind>;

    // The process set-up (namespaces, the init, the task's privileges).

    /// `unshare(2)`.
    fn unshare(&self, flags: CloneFlags) -> nix::Result<()>;
    /// `sethostname(2)`.
    fn sethostname(&self, name: &str) -> nix::Result<()>;
    /// Brings up `lo` in the current network namespace (`SIOCGIFFLAGS`,
    /// then `SIOCSIFFLAGS` with `IFF_UP | IFF_RUNNING`); the error names
    /// the call that failed.
    fn loopback_up(&self) -> std::io::Result<()>;
    /// `prctl(PR_SET_PDEATHSIG, SIGKILL)`.
    fn set_pdeathsig_kill(&self) -> nix::Result<()>;
    /// Writes `value` into `/proc/self/oom_score_adj`.
    fn set_oom_score_adj(&self, value: &str) -> std::io::Result<()>;
    /// `write(2)`.
    fn write(&self, fd: BorrowedFd<'_>, buf: &[u8]) -> nix::Result<usize>;
    /// `read(2)`.
    fn read(&self, fd: BorrowedFd<'_>, buf: &mut [u8]) -> nix::Result<usize>;
    /// `setsid(2)`.
    fn setsid(&self) -> nix::Result<()>;
    /// Opens `path` read-only onto descriptor 0.
    fn open_stdin(&self, path: &CStr) -> nix::Result<()>;
    /// `setrlimit(2)`.
    fn setrlimit(&self, resource: Resource, soft: u64, hard: u64) -> nix::Result<()>;
    /// `prctl(PR_CAPBSET_DROP, cap)`: `EINVAL` past the last capability
    /// the kernel knows.
    fn capbset_drop(&self, cap: i32) -> nix::Result<()>;
    /// `prctl(PR_SET_SECUREBITS, bits)`.
    fn set_securebits(&self, bits: libc::c_ulong) -> nix::Result<()>;
    /// `setgroups(2)`.
    fn setgroups(&self, groups: &[Gid]) -> nix::Result<()>;
    /// `setresuid(2)`.
    fn setresuid(&self, ruid: Uid, euid: Uid, suid: Uid) -> nix::Result<()>;
    /// `setresgid(2)`.
    fn setresgid(&self, rgid: Gid, egid: Gid, sgid: Gid) -> nix::Result<()>;
    /// `chdir(2)` to a path already held as a C string (no copy).
    fn chdir_cstr(&self, path: &CStr) -> nix::Result<()>;
    /// `umask(2)`.
    fn umask(&self, mode: Mode);
    /// `prctl(PR_SET_NO_NEW_PRIVS, 1)`.
    fn set_no_new_privs(&self) -> nix::Result<()>;
    /// Loads the seccomp filters into the calling thread (`no_new_privs`
    /// must be set); the error is the call's errno.
    fn seccomp(&self, filters: &[BpfProgram]) -> nix::Result<()>;
    /// `execve(2)`: returns only on failure, with its errno.
    fn execve(&self, path: &CStr, argv: &[CString], env: &[CString]) -> Errno;
}
