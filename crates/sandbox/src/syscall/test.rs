//! A recording fake of [`Syscall`]: it does nothing but write down each
//! call, answers host lookups from a table, and can fail one mount or any
//! call a predicate picks.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::resource::Resource;
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Uid};
use seccompiler::BpfProgram;

use super::{HostKind, Syscall};

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Call {
    Mount {
        source: Option<PathBuf>,
        target: PathBuf,
        fstype: Option<String>,
        flags: MsFlags,
        data: Option<String>,
    },
    Umount {
        target: PathBuf,
        flags: MntFlags,
    },
    PivotRoot {
        new_root: PathBuf,
        put_old: PathBuf,
    },
    Chdir(PathBuf),
    Mkdir {
        path: PathBuf,
        mode: u32,
    },
    CreateFile {
        path: PathBuf,
        mode: u32,
        content: Vec<u8>,
    },
    Touch(PathBuf),
    Symlink {
        target: PathBuf,
        link: PathBuf,
    },
    Chown {
        path: PathBuf,
        uid: u32,
        gid: u32,
    },
    Chmod {
        path: PathBuf,
        mode: u32,
    },
    RemoveDir(PathBuf),
    Unshare(CloneFlags),
    Sethostname(String),
    LoopbackUp,
    Pdeathsig,
    OomScoreAdj(String),
    Write {
        fd: RawFd,
        bytes: Vec<u8>,
    },
    Read(RawFd),
    Setsid,
    OpenStdin(CString),
    Setrlimit {
        resource: Resource,
        soft: u64,
        hard: u64,
    },
    /// A capability dropped from the bounding set (one the kernel knows).
    CapbsetDrop(i32),
    Securebits(libc::c_ulong),
    Setgroups(Vec<u32>),
    Setresuid(u32, u32, u32),
    Setresgid(u32, u32, u32),
    ChdirCstr(CString),
    Umask(u32),
    NoNewPrivs,
    /// Seccomp filters loaded: how many.
    Seccomp(usize),
    Execve {
        path: CString,
        argv: Vec<CString>,
        env: Vec<CString>,
    },
}

/// The last capability the fake's kernel knows (`CAP_CHECKPOINT_RESTORE`).
pub(crate) const LAST_CAP: i32 = 40;

/// Records every call; host paths are looked up in `host`.
#[derive(Debug, Default)]
pub(crate) struct RecordingSyscall {
    calls: RefCell<Vec<Call>>,
    /// What each host path is; any other is missing.
    host: HashMap<PathBuf, HostKind>,
    /// Directories made so far (for [`Syscall::exists`]).
    made: RefCell<HashSet<PathBuf>>,
    /// The mount (counted from 0) that fails with `EPERM`, if any.
    fail_mount: Option<usize>,
    mounts: RefCell<usize>,
    /// Calls that fail with `EPERM` (not recorded): mounts, `pivot_root`
    /// and those of the process set-up.
    fail_when: Option<fn(&Call) -> bool>,
}

impl RecordingSyscall {
    /// A fake whose host has these paths.
    pub(crate) fn with_host(host: HashMap<PathBuf, HostKind>) -> Self {
        Self {
            host,
            ..Self::default()
        }
    }

    /// Fails mount number `n` (from 0) with `EPERM`.
    pub(crate) fn failing_mount(mut self, n: usize) -> Self {
        self.fail_mount = Some(n);
        self
    }

    /// Fails, with `EPERM`, every process set-up call `pick` chooses.
    pub(crate) fn failing_when(mut self, pick: fn(&Call) -> bool) -> Self {
        self.fail_when = Some(pick);
        self
    }

    /// The calls so far.
    pub(crate) fn calls(&self) -> Vec<Call> {
        self.calls.borrow().clone()
    }

    fn record(&self, call: Call) {
        self.calls.borrow_mut().push(call);
    }

    /// Records `call`, or fails it when the predicate picks it.
    fn call(&self, call: Call) -> nix::Result<()> {
        if self.fail_when.is_some_and(|pick| pick(&call)) {
            return Err(Errno::EPERM);
        }
        self.record(call);
        Ok(())
    }
}

impl Syscall for RecordingSyscall {
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> nix::Result<()> {
        let n = {
            let mut m = self.mounts.borrow_mut();
            *m += 1;
            *m - 1
        };
        if self.fail_mount == Some(n) {
            return Err(nix::errno::Errno::EPERM);
        }
        self.call(Call::Mount {
            source: source.map(Path::to_path_buf),
            target: target.to_path_buf(),
            fstype: fstype.map(str::to_string),
            flags,
            data: data.map(str::to_string),
        })
    }

    fn umount2(&self, target: &Path, flags: MntFlags) -> nix::Result<()> {
        self.record(Call::Umount {
            target: target.to_path_buf(),
            flags,
        });
        Ok(())
    }

    fn pivot_root(&self, new_root: &Path, put_old: &Path) -> nix::Result<()> {
        self.call(Call::PivotRoot {
            new_root: new_root.to_path_buf(),
            put_old: put_old.to_path_buf(),
        })
    }

    fn chdir(&self, path: &Path) -> nix::Result<()> {
        self.record(Call::Chdir(path.to_path_buf()));
        Ok(())
    }

    fn mkdir_p(&self, path: &Path, mode: u32) -> std::io::Result<()> {
        let mut made = self.made.borrow_mut();
        for p in path.ancestors() {
            made.insert(p.to_path_buf());
        }
        self.record(Call::Mkdir {
            path: path.to_path_buf(),
            mode,
        });
        Ok(())
    }

    fn exists(&self, path: &Path) -> bool {
        self.made.borrow().contains(path)
    }

    fn create_file(&self, path: &Path, mode: u32, content: &[u8]) -> std::io::Result<()> {
        self.record(Call::CreateFile {
            path: path.to_path_buf(),
            mode,
            content: content.to_vec(),
        });
        Ok(())
    }

    fn touch(&self, path: &Path) -> std::io::Result<()> {
        self.record(Call::Touch(path.to_path_buf()));
        Ok(())
    }

    fn symlink(&self, target: &Path, link: &Path) -> std::io::Result<()> {
        self.record(Call::Symlink {
            target: target.to_path_buf(),
            link: link.to_path_buf(),
        });
        Ok(())
    }

    fn chown(&self, path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
        self.record(Call::Chown {
            path: path.to_path_buf(),
            uid,
            gid,
        });
        Ok(())
    }

    fn chmod(&self, path: &Path, mode: u32) -> std::io::Result<()> {
        self.record(Call::Chmod {
            path: path.to_path_buf(),
            mode,
        });
        Ok(())
    }

    fn remove_dir(&self, path: &Path) -> std::io::Result<()> {
        self.record(Call::RemoveDir(path.to_path_buf()));
        Ok(())
    }

    fn host_kind(&self, path: &Path) -> std::io::Result<HostKind> {
        self.host
            .get(path)
            .cloned()
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
    }

    fn unshare(&self, flags: CloneFlags) -> nix::Result<()> {
        self.call(Call::Unshare(flags))
    }

    fn sethostname(&self, name: &str) -> nix::Result<()> {
        self.call(Call::Sethostname(name.to_string()))
    }

    fn loopback_up(&self) -> std::io::Result<()> {
        self.call(Call::LoopbackUp).map_err(std::io::Error::from)
    }

    fn set_pdeathsig_kill(&self) -> nix::Result<()> {
        self.call(Call::Pdeathsig)
    }

    fn set_oom_score_adj(&self, value: &str) -> std::io::Result<()> {
        self.call(Call::OomScoreAdj(value.to_string()))
            .map_err(std::io::Error::from)
    }

    fn write(&self, fd: BorrowedFd<'_>, buf: &[u8]) -> nix::Result<usize> {
        self.call(Call::Write {
            fd: fd.as_raw_fd(),
            bytes: buf.to_vec(),
        })
        .map(|()| buf.len())
    }

    /// Reads one byte, `m`, as the init's answer on the `mapped` pipe.
    fn read(&self, fd: BorrowedFd<'_>, buf: &mut [u8]) -> nix::Result<usize> {
        self.call(Call::Read(fd.as_raw_fd()))?;
        match buf.first_mut() {
            Some(b) => {
                *b = b'm';
                Ok(1)
            }
            None => Ok(0),
        }
    }

    fn setsid(&self) -> nix::Result<()> {
        self.call(Call::Setsid)
    }

    fn open_stdin(&self, path: &CStr) -> nix::Result<()> {
        self.call(Call::OpenStdin(path.to_owned()))
    }

    fn setrlimit(&self, resource: Resource, soft: u64, hard: u64) -> nix::Result<()> {
        self.call(Call::Setrlimit {
            resource,
            soft,
            hard,
        })
    }

    /// Past [`LAST_CAP`], `EINVAL` (not recorded), as the kernel answers.
    fn capbset_drop(&self, cap: i32) -> nix::Result<()> {
        if cap > LAST_CAP {
            return Err(Errno::EINVAL);
        }
        self.call(Call::CapbsetDrop(cap))
    }

    fn set_securebits(&self, bits: libc::c_ulong) -> nix::Result<()> {
        self.call(Call::Securebits(bits))
    }

    fn setgroups(&self, groups: &[Gid]) -> nix::Result<()> {
        self.call(Call::Setgroups(groups.iter().map(|g| g.as_raw()).collect()))
    }

    fn setresuid(&self, ruid: Uid, euid: Uid, suid: Uid) -> nix::Result<()> {
        self.call(Call::Setresuid(ruid.as_raw(), euid.as_raw(), suid.as_raw()))
    }

    fn setresgid(&self, rgid: Gid, egid: Gid, sgid: Gid) -> nix::Result<()> {
        self.call(Call::Setresgid(rgid.as_raw(), egid.as_raw(), sgid.as_raw()))
    }

    fn chdir_cstr(&self, path: &CStr) -> nix::Result<()> {
        self.call(Call::ChdirCstr(path.to_owned()))
    }

    fn umask(&self, mode: Mode) {
        self.record(Call::Umask(mode.bits()));
    }

    fn set_no_new_privs(&self) -> nix::Result<()> {
        self.call(Call::NoNewPrivs)
    }

    fn seccomp(&self, filters: &[BpfProgram]) -> nix::Result<()> {
        self.call(Call::Seccomp(filters.len()))
    }

    /// Records the call and returns `ENOEXEC` (or `EPERM` when picked to
    /// fail): the real call returns only on failure too.
    fn execve(&self, path: &CStr, argv: &[CString], env: &[CString]) -> Errno {
        match self.call(Call::Execve {
            path: path.to_owned(),
            argv: argv.to_vec(),
            env: env.to_vec(),
        }) {
            Ok(()) => Errno::ENOEXEC,
            Err(errno) => errno,
        }
    }
}

/// A task's launch spec for the unit tests of the set-up steps: ids `uid`
/// and `gid`, a Python script, stdin from the work dir, every rlimit set,
/// no mounts or files.
pub(crate) fn launch_spec(uid: u32, gid: u32) -> crate::spec::LaunchSpec {
    use crate::spec::{LaunchSpec, RlimitSpec};

    LaunchSpec {
        hostname: "sandbox".into(),
        uid,
        gid,
        argv: vec!["/usr/bin/python3".into(), "main.py".into()],
        env: vec![("PATH".into(), "/usr/bin".into())],
        ro_mounts: Vec::new(),
        work_files: Vec::new(),
        support_files: Vec::new(),
        etc_files: Vec::new(),
        work_dir: "/task".into(),
        support_dir: "/opt/taskexec".into(),
        disk_bytes: 1 << 20,
        disk_inodes: 1024,
        stdin_path: Some("/task/input".into()),
        rlimits: RlimitSpec {
            nofile: 64,
            fsize: 1 << 20,
            cpu_seconds: Some(5),
            stack: 8 << 20,
        },
        read_back: Vec::new(),
        read_back_cap: 0,
        collect_dir: None,
        collect_cap: 0,
        share_network: false,
        fork_server: false,
        userns: Vec::new(),
        self_join: Vec::new(),
        task_join: None,
    }
}
