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

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};

use crate::launcher::SetupError;
use crate::spec::{LaunchSpec, RoMount, SandboxFile};
use crate::syscall::{HostKind, Syscall};

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

fn mount_tmpfs(
    sys: &dyn Syscall,
    target: &Path,
    data: &str,
    flags: MsFlags,
) -> Result<(), SetupError> {
    sys.mount(
        Some(Path::new("tmpfs")),
        target,
        Some("tmpfs"),
        flags,
        Some(data),
    )
    .map_err(|e| fail("mounts", format!("tmpfs on {}", target.display()), e))
}

fn bind(sys: &dyn Syscall, src: &Path, dst: &Path, flags: MsFlags) -> Result<(), SetupError> {
    sys.mount(Some(src), dst, None, MsFlags::MS_BIND, None)
        .map_err(|e| fail("mounts", format!("bind {}", src.display()), e))?;
    sys.mount(
        None,
        dst,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags,
        None,
    )
    .map_err(|e| fail("mounts", format!("remount {}", dst.display()), e))
}

fn mkdir_p(sys: &dyn Syscall, path: &Path, mode: u32) -> Result<(), SetupError> {
    sys.mkdir_p(path, mode)
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
    sys: &dyn Syscall,
    base: &Path,
    files: &[SandboxFile],
    owner: Option<(u32, u32)>,
) -> Result<(), SetupError> {
    for f in files {
        let rel = safe_relative(&f.path)?;
        let path = base.join(rel);
        if let Some(parent) = path.parent()
            && !sys.exists(parent)
        {
            mkdir_p(sys, parent, 0o755)?;
            if let Some((uid, gid)) = owner {
                // chown every directory between base and parent (all ours).
                let mut p = parent;
                while p != base {
                    sys.chown(p, uid, gid)
                        .map_err(|e| fail("files", p.display(), e))?;
                    p = p.parent().unwrap_or(base);
                }
            }
        }
        let mode = if f.executable { 0o755 } else { 0o644 };
        sys.create_file(&path, mode, &f.content)
            .map_err(|e| fail("files", path.display(), e))?;
        if let Some((uid, gid)) = owner {
            sys.chown(&path, uid, gid)
                .map_err(|e| fail("files", path.display(), e))?;
        }
    }
    Ok(())
}

/// Binds one host path read-only at the same place under `root`, or
/// replicates it when it is a symlink.
fn bind_ro(sys: &dyn Syscall, root: &Path, m: &RoMount) -> Result<(), SetupError> {
    let host = Path::new(&m.path);
    let kind = match sys.host_kind(host) {
        Ok(kind) => kind,
        Err(_) if m.optional => return Ok(()),
        Err(e) => return Err(fail("mounts", format!("read-only mount {}", m.path), e)),
    };
    let target = inside(root, &m.path);
    if let Some(parent) = target.parent() {
        mkdir_p(sys, parent, 0o755)?;
    }
    let ro = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    match kind {
        HostKind::Symlink(link) => sys
            .symlink(&link, &target)
            .map_err(|e| fail("mounts", target.display(), e)),
        HostKind::Dir => {
            mkdir_p(sys, &target, 0o755)?;
            bind(sys, host, &target, ro)
        }
        HostKind::File => {
            sys.touch(&target)
                .map_err(|e| fail("mounts", target.display(), e))?;
            bind(sys, host, &target, ro)
        }
    }
}

fn build_dev(sys: &dyn Syscall, root: &Path) -> Result<(), SetupError> {
    let dev = root.join("dev");
    mkdir_p(sys, &dev, 0o755)?;
    mount_tmpfs(
        sys,
        &dev,
        "size=64k,nr_inodes=64,mode=0755",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
    )?;
    for name in DEVICES {
        let node = dev.join(name);
        sys.touch(&node)
            .map_err(|e| fail("mounts", node.display(), e))?;
        bind(
            sys,
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
        sys.symlink(Path::new(target), &dev.join(name))
            .map_err(|e| fail("mounts", name, e))?;
    }
    sys.mount(
        None,
        &dev,
        None,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        None,
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
pub(crate) fn build_root(
    sys: &dyn Syscall,
    spec: &LaunchSpec,
    files: &Files,
) -> Result<(), SetupError> {
    sys.mount(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )
    .map_err(|e| fail("mounts", "make / private", e))?;

    let root = Path::new(STAGING);
    mount_tmpfs(
        sys,
        root,
        "size=16m,nr_inodes=16384,mode=0755",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
    )?;
    for dir in ["proc", "etc", "tmp"] {
        mkdir_p(sys, &root.join(dir), 0o755)?;
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
        bind_ro(sys, root, m)?;
        bound.push(&m.path);
    }

    write_files(sys, &root.join("etc"), &files.etc, None)?;
    let support = inside(root, &spec.support_dir);
    mkdir_p(sys, &support, 0o755)?;
    write_files(sys, &support, &files.support, None)?;
    build_dev(sys, root)?;

    // Scratch: one tmpfs of `disk` bytes shared by the work dir and /tmp.
    let scratch = root.join(".scratch");
    mkdir_p(sys, &scratch, 0o700)?;
    mount_tmpfs(
        sys,
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
    mkdir_p(sys, &s_work, 0o755)?;
    mkdir_p(sys, &s_tmp, 0o755)?;
    sys.chmod(&s_tmp, 0o1777)
        .map_err(|e| fail("mounts", "chmod /tmp", e))?;
    sys.chown(&s_work, uid, gid)
        .map_err(|e| fail("mounts", "chown work dir", e))?;
    write_files(sys, &s_work, &files.work, Some((uid, gid)))?;
    let work = inside(root, &spec.work_dir);
    mkdir_p(sys, &work, 0o755)?;
    let rw = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    bind(sys, &s_work, &work, rw)?;
    bind(sys, &s_tmp, &root.join("tmp"), rw)?;
    sys.umount2(&scratch, MntFlags::MNT_DETACH)
        .map_err(|e| fail("mounts", "detach scratch", e))?;
    sys.remove_dir(&scratch)
        .map_err(|e| fail("mounts", "remove scratch dir", e))?;

    // pivot_root(".", ".") stacks the old root on top of the new one; detach
    // it so no host path remains reachable.
    let here = Path::new(".");
    sys.chdir(root)
        .map_err(|e| fail("pivot", "chdir new root", e))?;
    sys.pivot_root(here, here)
        .map_err(|e| fail("pivot", "pivot_root", e))?;
    sys.umount2(here, MntFlags::MNT_DETACH)
        .map_err(|e| fail("pivot", "detach old root", e))?;
    sys.chdir(Path::new("/"))
        .map_err(|e| fail("pivot", "chdir /", e))?;
    sys.mount(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None,
    )
    .map_err(|e| fail("pivot", "remount root read-only", e))
}

/// Writes the task's files into the work dir of a built root (after
/// `pivot_root`: a plain sandbox path), owned by the task's user. The work
/// dir is a fresh, empty tmpfs that no process of the task has seen yet, so
/// nothing in it can be a planted symlink; each file is still created with
/// `O_CREAT|O_EXCL`, which never follows one.
pub(crate) fn write_work_files(
    sys: &dyn Syscall,
    spec: &LaunchSpec,
    files: &[SandboxFile],
) -> Result<(), SetupError> {
    write_files(
        sys,
        Path::new(&spec.work_dir),
        files,
        Some((spec.uid, spec.gid)),
    )
}

/// Mounts a fresh /proc (called by the sandbox init, inside the PID namespace).
pub(crate) fn mount_proc(sys: &dyn Syscall) -> Result<(), SetupError> {
    sys.mount(
        Some(Path::new("proc")),
        Path::new("/proc"),
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("hidepid=invisible"),
    )
    .map_err(|e| fail("mounts", "mount /proc", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::collections::HashMap;

    use crate::syscall::test::{Call, RecordingSyscall, launch_spec};

    fn spec(ro_mounts: &[(&str, bool)]) -> LaunchSpec {
        LaunchSpec {
            ro_mounts: ro_mounts
                .iter()
                .map(|(path, optional)| RoMount {
                    path: (*path).into(),
                    optional: *optional,
                })
                .collect(),
            stdin_path: None,
            ..launch_spec(1000, 1001)
        }
    }

    fn no_files() -> Files {
        Files {
            work: Vec::new(),
            support: Vec::new(),
            etc: Vec::new(),
        }
    }

    fn host() -> RecordingSyscall {
        RecordingSyscall::with_host(HashMap::from([
            (PathBuf::from("/usr"), HostKind::Dir),
            (PathBuf::from("/usr/lib"), HostKind::Dir),
            (PathBuf::from("/bin"), HostKind::Symlink("usr/bin".into())),
            (PathBuf::from("/etc/ssl/cert.pem"), HostKind::File),
        ]))
    }

    fn mount(
        source: Option<&str>,
        target: &str,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Call {
        Call::Mount {
            source: source.map(PathBuf::from),
            target: target.into(),
            fstype: fstype.map(str::to_string),
            flags,
            data: data.map(str::to_string),
        }
    }

    fn bind(src: &str, dst: &str, flags: MsFlags) -> [Call; 2] {
        [
            mount(Some(src), dst, None, MsFlags::MS_BIND, None),
            mount(
                None,
                dst,
                None,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags,
                None,
            ),
        ]
    }

    /// The calls that change the mount table or the root.
    fn mount_calls(calls: &[Call]) -> Vec<Call> {
        calls
            .iter()
            .filter(|c| {
                matches!(
                    c,
                    Call::Mount { .. }
                        | Call::Umount { .. }
                        | Call::PivotRoot { .. }
                        | Call::Chdir(_)
                )
            })
            .cloned()
            .collect()
    }

    #[test]
    fn the_root_is_built_by_this_sequence_of_mounts() {
        let sys = host();
        let spec = spec(&[
            ("/usr", false),
            ("/bin", false),
            ("/usr/lib", false),
            ("/opt/missing", true),
            ("/etc/ssl/cert.pem", false),
        ]);
        build_root(&sys, &spec, &no_files()).expect("built");
        let ro = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        let dev = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
        let rw = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        let mut want = vec![
            mount(None, "/", None, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None),
            mount(
                Some("tmpfs"),
                "/tmp",
                Some("tmpfs"),
                rw,
                Some("size=16m,nr_inodes=16384,mode=0755"),
            ),
        ];
        // Shortest first: /usr (its /usr/lib is covered), the /bin symlink
        // (no mount), the missing optional path (none), the file.
        want.extend(bind("/usr", "/tmp/usr", ro));
        want.extend(bind("/etc/ssl/cert.pem", "/tmp/etc/ssl/cert.pem", ro));
        want.push(mount(
            Some("tmpfs"),
            "/tmp/dev",
            Some("tmpfs"),
            dev,
            Some("size=64k,nr_inodes=64,mode=0755"),
        ));
        for name in DEVICES {
            want.extend(bind(
                &format!("/dev/{name}"),
                &format!("/tmp/dev/{name}"),
                dev,
            ));
        }
        want.push(mount(
            None,
            "/tmp/dev",
            None,
            MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | dev,
            None,
        ));
        want.push(mount(
            Some("tmpfs"),
            "/tmp/.scratch",
            Some("tmpfs"),
            rw,
            Some("size=1048576,nr_inodes=1024,mode=0755"),
        ));
        want.extend(bind("/tmp/.scratch/work", "/tmp/task", rw));
        want.extend(bind("/tmp/.scratch/tmp", "/tmp/tmp", rw));
        want.extend([
            Call::Umount {
                target: "/tmp/.scratch".into(),
                flags: MntFlags::MNT_DETACH,
            },
            Call::Chdir("/tmp".into()),
            Call::PivotRoot {
                new_root: ".".into(),
                put_old: ".".into(),
            },
            Call::Umount {
                target: ".".into(),
                flags: MntFlags::MNT_DETACH,
            },
            Call::Chdir("/".into()),
            mount(
                None,
                "/",
                None,
                MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | rw,
                None,
            ),
        ]);
        assert_eq!(mount_calls(&sys.calls()), want);
    }

    #[test]
    fn symlinks_are_replicated_and_the_scratch_dirs_set_up() {
        let sys = host();
        build_root(&sys, &spec(&[("/bin", false)]), &no_files()).expect("built");
        let calls = sys.calls();
        for expected in [
            Call::Symlink {
                target: "usr/bin".into(),
                link: "/tmp/bin".into(),
            },
            Call::Chmod {
                path: "/tmp/.scratch/tmp".into(),
                mode: 0o1777,
            },
            Call::Chown {
                path: "/tmp/.scratch/work".into(),
                uid: 1000,
                gid: 1001,
            },
            Call::RemoveDir("/tmp/.scratch".into()),
        ] {
            assert!(
                calls.contains(&expected),
                "{expected:?} missing in {calls:?}"
            );
        }
    }

    #[test]
    fn no_bind_is_left_without_its_remount() {
        let sys = host();
        build_root(&sys, &spec(&[("/usr", false)]), &no_files()).expect("built");
        let mounts: Vec<(PathBuf, MsFlags)> = sys
            .calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Mount { target, flags, .. } => Some((target, flags)),
                _ => None,
            })
            .collect();
        let binds = mounts
            .iter()
            .filter(|(_, f)| *f == MsFlags::MS_BIND)
            .count();
        assert!(binds > 0);
        for (i, (target, flags)) in mounts.iter().enumerate() {
            if *flags == MsFlags::MS_BIND {
                let (next, next_flags) = &mounts[i + 1];
                assert_eq!(next, target);
                assert!(next_flags.contains(MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID));
            }
        }
    }

    #[test]
    fn a_missing_required_path_fails_before_any_bind() {
        let sys = host();
        let err = build_root(&sys, &spec(&[("/nowhere", false)]), &no_files())
            .expect_err("a required path is missing");
        assert!(format!("{err:?}").contains("/nowhere"), "{err:?}");
        assert!(!sys.calls().iter().any(|c| matches!(
            c,
            Call::Mount { flags, .. } if *flags == MsFlags::MS_BIND
        )));
    }

    #[test]
    fn a_failed_mount_stops_the_sequence() {
        let sys = host().failing_mount(2);
        let err =
            build_root(&sys, &spec(&[("/usr", false)]), &no_files()).expect_err("the bind fails");
        assert!(format!("{err:?}").contains("bind /usr"), "{err:?}");
        let calls = sys.calls();
        assert_eq!(
            calls
                .iter()
                .filter(|c| matches!(c, Call::Mount { .. }))
                .count(),
            2
        );
        assert!(!calls.iter().any(|c| matches!(c, Call::PivotRoot { .. })));
    }

    #[test]
    fn work_files_belong_to_the_task_user() {
        let sys = RecordingSyscall::default();
        let files = [SandboxFile {
            path: "pkg/run.sh".into(),
            content: b"echo".to_vec(),
            executable: true,
        }];
        write_work_files(&sys, &spec(&[]), &files).expect("written");
        assert_eq!(
            sys.calls(),
            vec![
                Call::Mkdir {
                    path: "/task/pkg".into(),
                    mode: 0o755,
                },
                Call::Chown {
                    path: "/task/pkg".into(),
                    uid: 1000,
                    gid: 1001,
                },
                Call::CreateFile {
                    path: "/task/pkg/run.sh".into(),
                    mode: 0o755,
                    content: b"echo".to_vec(),
                },
                Call::Chown {
                    path: "/task/pkg/run.sh".into(),
                    uid: 1000,
                    gid: 1001,
                },
            ]
        );
    }

    #[test]
    fn proc_hides_other_users_processes() {
        let sys = RecordingSyscall::default();
        mount_proc(&sys).expect("mounted");
        assert_eq!(
            sys.calls(),
            vec![mount(
                Some("proc"),
                "/proc",
                Some("proc"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some("hidepid=invisible"),
            )]
        );
    }

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
