//! The seam under the sandbox's file-system set-up: every mount, pivot and
//! file operation [`crate::mounts`] does goes through [`Syscall`], so the
//! sequence of mounts with their flags is unit-tested without root against
//! a recording fake (`test::RecordingSyscall`, in tests), while the launcher uses
//! the real calls ([`linux::LinuxSyscall`]).

pub(crate) mod linux;
#[cfg(test)]
pub(crate) mod test;

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};

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

/// The calls the file-system set-up makes.
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
}
