//! The real calls behind [`Syscall`].

use std::ffi::{CStr, CString};
use std::fs;
use std::io::Write;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::resource::Resource;
use nix::sys::signal::Signal;
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Uid};
use seccompiler::BpfProgram;

use super::{HostKind, Syscall};

/// The system calls themselves.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct LinuxSyscall;

impl Syscall for LinuxSyscall {
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> nix::Result<()> {
        nix::mount::mount(source, target, fstype, flags, data)
    }

    fn umount2(&self, target: &Path, flags: MntFlags) -> nix::Result<()> {
        nix::mount::umount2(target, flags)
    }

    fn pivot_root(&self, new_root: &Path, put_old: &Path) -> nix::Result<()> {
        nix::unistd::pivot_root(new_root, put_old)
    }

    fn chdir(&self, path: &Path) -> nix::Result<()> {
        nix::unistd::chdir(path)
    }

    fn mkdir_p(&self, path: &Path, mode: u32) -> std::io::Result<()> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(path)
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn create_file(&self, path: &Path, mode: u32, content: &[u8]) -> std::io::Result<()> {
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .and_then(|mut file| std::io::Write::write_all(&mut file, content))
    }

    fn touch(&self, path: &Path) -> std::io::Result<()> {
        fs::File::create(path).map(drop)
    }

    fn symlink(&self, target: &Path, link: &Path) -> std::io::Result<()> {
        std::os::unix::fs::symlink(target, link)
    }

    fn chown(&self, path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
    }

    fn chmod(&self, path: &Path, mode: u32) -> std::io::Result<()> {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
    }

    fn remove_dir(&self, path: &Path) -> std::io::Result<()> {
        fs::remove_dir(path)
    }

    fn host_kind(&self, path: &Path) -> std::io::Result<HostKind> {
        let meta = fs::symlink_metadata(path)?;
        Ok(if meta.file_type().is_symlink() {
            HostKind::Symlink(fs::read_link(path)?)
        } else if meta.is_dir() {
            HostKind::Dir
        } else {
            HostKind::File
        })
    }

    fn unshare(&self, flags: CloneFlags) -> nix::Result<()> {
        nix::sched::unshare(flags)
    }

    fn sethostname(&self, name: &str) -> nix::Result<()> {
        nix::unistd::sethostname(name)
    }

    fn loopback_up(&self) -> std::io::Result<()> {
        let fail = |what: &str| {
            let e = std::io::Error::last_os_error();
            std::io::Error::new(e.kind(), format!("{what}: {e}"))
        };
        // SAFETY: plain socket(2) call with constant arguments; the result is
        // checked before use and closed below.
        let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if sock < 0 {
            return Err(fail("socket"));
        }
        // SAFETY: ifreq is a plain C struct for which all-zero bytes is valid.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            #[allow(clippy::cast_possible_wrap, reason = "ASCII bytes")]
            let byte = *src as libc::c_char;
            *dst = byte;
        }
        // SAFETY: `sock` is a valid socket and `req` a valid, NUL-terminated
        // ifreq that outlives the call; SIOCGIFFLAGS only writes ifr_flags.
        let rc = unsafe { libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req) };
        let result = if rc < 0 {
            Err(fail("SIOCGIFFLAGS"))
        } else {
            // SAFETY: the union member ifru_flags was just filled by the kernel.
            unsafe {
                #[allow(
                    clippy::cast_possible_truncation,
                    reason = "IFF_UP | IFF_RUNNING is 0x41"
                )]
                let up = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
                req.ifr_ifru.ifru_flags |= up;
            }
            // SAFETY: as above; SIOCSIFFLAGS reads the flags from `req`.
            let rc = unsafe { libc::ioctl(sock, libc::SIOCSIFFLAGS, &req) };
            if rc < 0 {
                Err(fail("SIOCSIFFLAGS"))
            } else {
                Ok(())
            }
        };
        // SAFETY: `sock` is owned here and closed exactly once.
        unsafe { libc::close(sock) };
        result
    }

    fn set_pdeathsig_kill(&self) -> nix::Result<()> {
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
    }

    fn set_oom_score_adj(&self, value: &str) -> std::io::Result<()> {
        fs::OpenOptions::new()
            .write(true)
            .open("/proc/self/oom_score_adj")
            .and_then(|mut f| f.write_all(value.as_bytes()))
    }

    fn write(&self, fd: BorrowedFd<'_>, buf: &[u8]) -> nix::Result<usize> {
        nix::unistd::write(fd, buf)
    }

    fn read(&self, fd: BorrowedFd<'_>, buf: &mut [u8]) -> nix::Result<usize> {
        nix::unistd::read(fd, buf)
    }

    fn setsid(&self) -> nix::Result<()> {
        nix::unistd::setsid().map(drop)
    }

    fn open_stdin(&self, path: &CStr) -> nix::Result<()> {
        let fd: OwnedFd = nix::fcntl::open(path, nix::fcntl::OFlag::O_RDONLY, Mode::empty())?;
        // SAFETY: dup2 onto descriptor 0, which this process owns; `fd` is
        // open until the end of this function.
        let rc = unsafe { libc::dup2(fd.as_raw_fd(), 0) };
        Errno::result(rc).map(drop)
    }

    fn setrlimit(&self, resource: Resource, soft: u64, hard: u64) -> nix::Result<()> {
        nix::sys::resource::setrlimit(resource, soft, hard)
    }

    fn capbset_drop(&self, cap: i32) -> nix::Result<()> {
        // SAFETY: prctl with integer arguments only.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        Errno::result(rc).map(drop)
    }

    fn set_securebits(&self, bits: libc::c_ulong) -> nix::Result<()> {
        // SAFETY: prctl with integer arguments only.
        let rc = unsafe { libc::prctl(libc::PR_SET_SECUREBITS, bits, 0, 0, 0) };
        Errno::result(rc).map(drop)
    }

    fn setgroups(&self, groups: &[Gid]) -> nix::Result<()> {
        nix::unistd::setgroups(groups)
    }

    fn setresuid(&self, ruid: Uid, euid: Uid, suid: Uid) -> nix::Result<()> {
        nix::unistd::setresuid(ruid, euid, suid)
    }

    fn setresgid(&self, rgid: Gid, egid: Gid, sgid: Gid) -> nix::Result<()> {
        nix::unistd::setresgid(rgid, egid, sgid)
    }

    fn chdir_cstr(&self, path: &CStr) -> nix::Result<()> {
        nix::unistd::chdir(path)
    }

    fn umask(&self, mode: Mode) {
        nix::sys::stat::umask(mode);
    }

    fn set_no_new_privs(&self) -> nix::Result<()> {
        nix::sys::prctl::set_no_new_privs()
    }

    fn seccomp(&self, filters: &[BpfProgram]) -> nix::Result<()> {
        crate::seccomp::apply(filters).map_err(|_| Errno::last())
    }

    fn execve(&self, path: &CStr, argv: &[CString], env: &[CString]) -> Errno {
        match nix::unistd::execve(path, argv, env) {
            Err(errno) => errno,
            Ok(never) => match never {},
        }
    }
}
