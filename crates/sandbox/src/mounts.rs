//! The sandbox's file system: a read-only root built from bind mounts of only
//! what the runtime needs, a minimal /dev, a fresh /proc, and one size-limited
//! tmpfs shared by the work dir and /tmp.
//!
//! Order (all inside the launcher's private mount namespace, so nothing here
//! is visible on the host, and everything vanishes with the namespace):
//! 1. make every mount private (no propagation back to the host);
//! 2. mount a small tmpfs as the new root at [`STAGING`];
//! 3. bind the runtime's host paths read-only, replicate top-level symlinks
//!    (`/bin -> usr/bin`), write the synthetic /etc files and support files;
//! 4. /dev: a tmpfs with null, zero, full, random and urandom bound from the
//!    host, then made read-only;
//! 5. the scratch tmpfs (`disk` bytes) with `work/` and `tmp/` bound at the
//!    work dir and /tmp (the task's files are written there later, once the
//!    task is known: [`write_work_files`]);
//! 6. pivot_root into the new root, detach the old one, remount the root
//!    read-only.
//!
//! /proc is mounted later by the sandbox init, which is inside the new PID
//! namespace.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt, chown, symlink};
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

use crate::launcher::SetupError;
use crate::spec::{LaunchSpec, RoMount, SandboxFile};

/// Where the new root is assembled before pivot_root (in the private mount
/// namespace only: the host's directory of that name is never touched).
pub(crate) const STAGING: &str = "/tmp";

/// Device nodes bound from the host.
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom"];

fn fail(
    stage: &'static str,
    what: impl std::fmt::Display,
    e: impl std::fmt::Display,
) -> SetupError {
    SetupError::new(stage, format!("{what}: {e}"))
}

fn mount_tmpfs(target: &Path, data: &str, flags: MsFlags) -> Result<(), SetupError> {
    mount(Some("tmpfs"), target, Some("tmpfs"), flags, Some(data))
        .map_err(|e| fail("mounts", format!("tmpfs on {}", target.display()), e))
}

fn bind(src: &Path, dst: &Path, flags: MsFlags) -> Result<(), SetupError> {
    mount(Some(src), dst, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(|e| fail("mounts", format!("bind {}", src.display()), e))?;
    mount(
        None::<&str>,
        dst,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags,
        None::<&str>,
    )
    .map_err(|e| fail("mounts", format!("remount {}", dst.display()), e))
}

fn mkdir_p(path: &Path, mode: u32) -> Result<(), SetupError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(|e| fail("mounts", format!("mkdir {}", path.display()), e))
}

/// Checks that a relative path has only normal components (defense in depth:
/// callers validate too).
pub(crate) fn safe_relative(path: &str) -> Result<&Path, SetupError> {
    let ok = !path.is_empty()
        && !path.contains('\0')
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..");
    if ok {
        Ok(Path::new(path))
    } else {
        Err(SetupError::new(
            "files",
            format!("unsafe file path {path:?}"),
        ))
    }
}

fn inside(root: &Path, abs: &str) -> PathBuf {
    root.join(abs.trim_start_matches('/'))
}

/// Writes files beneath `base`, creating parent directories; files and
/// directories are owned by `owner` when given.
fn write_files(
    base: &Path,
    files: &[SandboxFile],
    owner: Option<(u32, u32)>,
) -> Result<(), SetupError> {
    for f in files {
        let rel = safe_relative(&f.path)?;
        let path = base.join(rel);
        if let Some(parent) = path.parent()
            && !parent.exists()
        {
            mkdir_p(parent, 0o755)?;
            if let Some((uid, gid)) = owner {
                // chown every directory between base and parent (all ours).
                let mut p = parent;
                while p != base {
                    chown(p, Some(uid), Some(gid)).map_err(|e| fail("files", p.display(), e))?;
                    p = p.parent().unwrap_or(base);
                }
            }
        }
        let mode = if f.executable { 0o755 } else { 0o644 };
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .and_then(|mut file| std::io::Write::write_all(&mut file, &f.content))
            .map_err(|e| fail("files", path.display(), e))?;
        if let Some((uid, gid)) = owner {
            chown(&path, Some(uid), Some(gid)).map_err(|e| fail("files", path.display(), e))?;
        }
    }
    Ok(())
}

/// Binds one host path read-only at the same place under `root`, or
/// replicates it when it is a symlink.
fn bind_ro(root: &Path, m: &RoMount) -> Result<(), SetupError> {
    let host = Path::new(&m.path);
    let meta = match fs::symlink_metadata(host) {
        Ok(meta) => meta,
        Err(_) if m.optional => return Ok(()),
        Err(e) => return Err(fail("mounts", format!("read-only mount {}", m.path), e)),
    };
    let target = inside(root, &m.path);
    if let Some(parent) = target.parent() {
        mkdir_p(parent, 0o755)?;
    }
    let ro = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if meta.file_type().is_symlink() {
        let link = fs::read_link(host).map_err(|e| fail("mounts", &m.path, e))?;
        symlink(&link, &target).map_err(|e| fail("mounts", target.display(), e))
    } else if meta.is_dir() {
        mkdir_p(&target, 0o755)?;
        bind(host, &target, ro)
    } else {
        fs::File::create(&target).map_err(|e| fail("mounts", target.display(), e))?;
        bind(host, &target, ro)
    }
}

fn build_dev(root: &Path) -> Result<(), SetupError> {
    let dev = root.join("dev");
    mkdir_p(&dev, 0o755)?;
    mount_tmpfs(
        &dev,
        "size=64k,nr_inodes=64,mode=0755",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
    )?;
    for name in DEVICES {
        let node = dev.join(name);
        fs::File::create(&node).map_err(|e| fail("mounts", node.display(), e))?;
        bind(
            &Path::new("/dev").join(name),
            &node,
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        )?;
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        symlink(target, dev.join(name)).map_err(|e| fail("mounts", name, e))?;
    }
    mount(
        None::<&str>,
        &dev,
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| fail("mounts", "remount /dev read-only", e))
}

/// The file contents that travel with the spec.
#[derive(Debug)]
pub(crate) struct Files {
    pub work: Vec<SandboxFile>,
    pub support: Vec<SandboxFile>,
    pub etc: Vec<SandboxFile>,
}

/// Builds the whole file system and pivots into it (steps 1 to 6 above).
pub(crate) fn build_root(spec: &LaunchSpec, files: &Files) -> Result<(), SetupError> {
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| fail("mounts", "make / private", e))?;

    let root = Path::new(STAGING);
    mount_tmpfs(
        root,
        "size=16m,nr_inodes=16384,mode=0755",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
    )?;
    for dir in ["proc", "etc", "tmp"] {
        mkdir_p(&root.join(dir), 0o755)?;
    }

    // Read-only host paths, shortest first; a path inside one already bound
    // is covered by it.
    let mut mounts: Vec<&RoMount> = spec.ro_mounts.iter().collect();
    mounts.sort_by_key(|m| m.path.len());
    let mut bound: Vec<&str> = Vec::new();
    for m in mounts {
        let covered = bound
            .iter()
            .any(|b| m.path.starts_with(b) && m.path.as_bytes().get(b.len()) == Some(&b'/'));
        if covered {
            continue;
        }
        bind_ro(root, m)?;
        bound.push(&m.path);
    }

    write_files(&root.join("etc"), &files.etc, None)?;
    let support = inside(root, &spec.support_dir);
    mkdir_p(&support, 0o755)?;
    write_files(&support, &files.support, None)?;
    build_dev(root)?;

    // Scratch: one tmpfs of `disk` bytes shared by the work dir and /tmp.
    let scratch = root.join(".scratch");
    mkdir_p(&scratch, 0o700)?;
    mount_tmpfs(
        &scratch,
        &format!(
            "size={},nr_inodes={},mode=0755",
            spec.disk_bytes, spec.disk_inodes
        ),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
    )?;
    let (uid, gid) = (spec.uid, spec.gid);
    let s_work = scratch.join("work");
    let s_tmp = scratch.join("tmp");
    mkdir_p(&s_work, 0o755)?;
    mkdir_p(&s_tmp, 0o755)?;
    fs::set_permissions(&s_tmp, fs::Permissions::from_mode(0o1777))
        .map_err(|e| fail("mounts", "chmod /tmp", e))?;
    chown(&s_work, Some(uid), Some(gid)).map_err(|e| fail("mounts", "chown work dir", e))?;
    write_files(&s_work, &files.work, Some((uid, gid)))?;
    let work = inside(root, &spec.work_dir);
    mkdir_p(&work, 0o755)?;
    let rw = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    bind(&s_work, &work, rw)?;
    bind(&s_tmp, &root.join("tmp"), rw)?;
    umount2(&scratch, MntFlags::MNT_DETACH).map_err(|e| fail("mounts", "detach scratch", e))?;
    fs::remove_dir(&scratch).map_err(|e| fail("mounts", "remove scratch dir", e))?;

    // pivot_root(".", ".") stacks the old root on top of the new one; detach
    // it so no host path remains reachable.
    nix::unistd::chdir(root).map_err(|e| fail("pivot", "chdir new root", e))?;
    nix::unistd::pivot_root(".", ".").map_err(|e| fail("pivot", "pivot_root", e))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| fail("pivot", "detach old root", e))?;
    nix::unistd::chdir("/").map_err(|e| fail("pivot", "chdir /", e))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(|e| fail("pivot", "remount root read-only", e))
}

/// Writes the task's files into the work dir of a built root (after
/// `pivot_root`: a plain sandbox path), owned by the task's user. The work
/// dir is a fresh, empty tmpfs that no process of the task has seen yet, so
/// nothing in it can be a planted symlink; each file is still created with
/// `O_CREAT|O_EXCL`, which never follows one.
pub(crate) fn write_work_files(spec: &LaunchSpec, files: &[SandboxFile]) -> Result<(), SetupError> {
    write_files(Path::new(&spec.work_dir), files, Some((spec.uid, spec.gid)))
}

/// Mounts a fresh /proc (called by the sandbox init, inside the PID namespace).
pub(crate) fn mount_proc() -> Result<(), SetupError> {
    mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("hidepid=invisible"),
    )
    .map_err(|e| fail("mounts", "mount /proc", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_relative_rejects_escapes() {
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "a/./b", "a\0b"] {
            assert!(safe_relative(bad).is_err(), "{bad:?} must be refused");
        }
        for good in ["main.py", "pkg/mod.py", ".taskexec/input.json"] {
            assert!(safe_relative(good).is_ok(), "{good:?} must be accepted");
        }
    }
}
