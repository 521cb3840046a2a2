//! A recording fake of [`Syscall`]: it does nothing but write down each
//! call, answers host lookups from a table, and can fail one mount.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};

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
}

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

    /// The calls so far.
    pub(crate) fn calls(&self) -> Vec<Call> {
        self.calls.borrow().clone()
    }

    fn record(&self, call: Call) {
        self.calls.borrow_mut().push(call);
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
        self.record(Call::Mount {
            source: source.map(Path::to_path_buf),
            target: target.to_path_buf(),
            fstype: fstype.map(str::to_string),
            flags,
            data: data.map(str::to_string),
        });
        Ok(())
    }

    fn umount2(&self, target: &Path, flags: MntFlags) -> nix::Result<()> {
        self.record(Call::Umount {
            target: target.to_path_buf(),
            flags,
        });
        Ok(())
    }

    fn pivot_root(&self, new_root: &Path, put_old: &Path) -> nix::Result<()> {
        self.record(Call::PivotRoot {
            new_root: new_root.to_path_buf(),
            put_old: put_old.to_path_buf(),
        });
        Ok(())
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
}
