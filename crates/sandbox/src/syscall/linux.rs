//! The real calls behind [`Syscall`].

use std::fs;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use nix::mount::{MntFlags, MsFlags};

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
}
