//! The launcher's set-up against the recording fake, without root: the
//! order of the steps of the launcher, the init and the task process, the
//! rlimits and capabilities applied for a spec, and that a failing step
//! stops its sequence with the step named.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;
use nix::mount::MsFlags;
use nix::sched::CloneFlags;
use nix::sys::resource::Resource;

use super::task::{self, SECBIT_NO_SETUID_FIXUP};
use super::{Exec, build_sandbox, init_setup};
use crate::mounts::Files;
use crate::spec::{IdRange, LaunchSpec};
use crate::syscall::test::{Call, LAST_CAP, RecordingSyscall, launch_spec};
use crate::{namespaces, rlimits, seccomp};

/// Picks the call the fake fails.
type Pick = fn(&Call) -> bool;

const UID: u32 = 1000;
const GID: u32 = 1001;

fn spec() -> LaunchSpec {
    launch_spec(UID, GID)
}

/// A fork server's spec: root in a user namespace mapped to host ids.
fn fork_server_spec() -> LaunchSpec {
    LaunchSpec {
        fork_server: true,
        stdin_path: None,
        userns: vec![IdRange {
            inside: 0,
            outside: 200_000,
            count: 64,
        }],
        ..spec()
    }
}

/// What the launcher prepares for the task before the fork: one (empty)
/// seccomp program, the task's `oom_score_adj` to restore, and a cgroup
/// file to join (`/dev/null`: the fake writes nothing).
fn exec(spec: &LaunchSpec, join: bool) -> Exec {
    let task_join = join.then(|| {
        File::options()
            .write(true)
            .open("/dev/null")
            .expect("/dev/null")
    });
    Exec::new(spec, vec![Vec::new()], task_join, Some("0".into())).expect("exec")
}

fn no_files() -> Files {
    Files {
        work: Vec::new(),
        support: Vec::new(),
        etc: Vec::new(),
    }
}

fn cstring(s: &str) -> CString {
    CString::new(s).expect("no NUL")
}

fn limit(resource: Resource, soft: u64, hard: u64) -> Call {
    Call::Setrlimit {
        resource,
        soft,
        hard,
    }
}

fn dropped(calls: &[Call]) -> Vec<i32> {
    calls
        .iter()
        .filter_map(|c| match c {
            Call::CapbsetDrop(cap) => Some(*cap),
            _ => None,
        })
        .collect()
}

fn position(calls: &[Call], what: &str, pick: impl Fn(&Call) -> bool) -> usize {
    calls
        .iter()
        .position(pick)
        .unwrap_or_else(|| panic!("no {what} in {calls:#?}"))
}

#[test]
fn rlimits_are_set_soft_and_hard_from_the_spec() {
    let sys = RecordingSyscall::default();
    rlimits::apply(&sys, &spec().rlimits).expect("rlimits");
    assert_eq!(
        sys.calls(),
        [
            limit(Resource::RLIMIT_CORE, 0, 0),
            limit(Resource::RLIMIT_NOFILE, 64, 64),
            limit(Resource::RLIMIT_FSIZE, 1 << 20, 1 << 20),
            limit(Resource::RLIMIT_STACK, 8 << 20, 8 << 20),
            // SIGXCPU at the soft limit, SIGKILL a second later.
            limit(Resource::RLIMIT_CPU, 5, 6),
        ]
    );

    let sys = RecordingSyscall::default();
    let mut no_cpu = spec().rlimits;
    no_cpu.cpu_seconds = None;
    rlimits::apply(&sys, &no_cpu).expect("rlimits");
    assert!(
        !sys.calls().iter().any(|c| matches!(
            c,
            Call::Setrlimit {
                resource: Resource::RLIMIT_CPU,
                ..
            }
        )),
        "no CPU limit without cpu_seconds: {:?}",
        sys.calls()
    );
}

#[test]
fn the_task_takes_its_steps_in_this_order() {
    let sys = RecordingSyscall::default();
    let spec = spec();
    let exec = exec(&spec, true);
    let join = exec.task_join.as_ref().expect("join").as_raw_fd();
    let (stage, errno) = task::run(&sys, &spec, &exec, None);
    // The fake's execve "fails" with ENOEXEC: every step before it passed.
    assert_eq!((stage, errno), ("execve", Errno::ENOEXEC));

    let mut expected = vec![
        Call::OomScoreAdj("0".into()),
        Call::Write {
            fd: join,
            bytes: b"0".to_vec(),
        },
        Call::Unshare(CloneFlags::CLONE_NEWCGROUP),
        Call::Setsid,
        Call::OpenStdin(cstring("/task/input")),
        limit(Resource::RLIMIT_CORE, 0, 0),
        limit(Resource::RLIMIT_NOFILE, 64, 64),
        limit(Resource::RLIMIT_FSIZE, 1 << 20, 1 << 20),
        limit(Resource::RLIMIT_STACK, 8 << 20, 8 << 20),
        limit(Resource::RLIMIT_CPU, 5, 6),
    ];
    expected.extend((0..=LAST_CAP).map(Call::CapbsetDrop));
    expected.extend([
        Call::Setgroups(Vec::new()),
        Call::Setresgid(GID, GID, GID),
        Call::Setresuid(UID, UID, UID),
        Call::ChdirCstr(cstring("/task")),
        Call::Umask(0o022),
        Call::NoNewPrivs,
        Call::Seccomp(1),
        Call::Execve {
            path: cstring("/usr/bin/python3"),
            argv: vec![cstring("/usr/bin/python3"), cstring("main.py")],
            env: vec![cstring("PATH=/usr/bin")],
        },
    ]);
    assert_eq!(sys.calls(), expected);
}

#[test]
fn a_task_drops_every_capability_and_runs_as_its_user() {
    let sys = RecordingSyscall::default();
    let spec = spec();
    task::run(&sys, &spec, &exec(&spec, false), None);
    let calls = sys.calls();
    // Every capability the kernel knows leaves the bounding set; the loop
    // ends at the first one it does not know.
    assert_eq!(dropped(&calls), (0..=LAST_CAP).collect::<Vec<_>>());
    // The switch to the task's ids (which clears the other capability
    // sets) comes after the bounding set, and no_new_privs after it.
    let last_drop = position(&calls, "drop", |c| *c == Call::CapbsetDrop(LAST_CAP));
    let setresuid = position(&calls, "setresuid", |c| {
        *c == Call::Setresuid(UID, UID, UID)
    });
    let nnp = position(&calls, "no_new_privs", |c| *c == Call::NoNewPrivs);
    assert!(last_drop < setresuid && setresuid < nnp, "{calls:#?}");
}

#[test]
fn a_fork_server_keeps_only_its_capabilities_and_stays_root() {
    let sys = RecordingSyscall::default();
    let spec = LaunchSpec {
        userns: Vec::new(),
        ..fork_server_spec()
    };
    let (stage, _) = task::run(&sys, &spec, &exec(&spec, false), None);
    assert_eq!(stage, "execve");
    let calls = sys.calls();
    let kept: Vec<i32> = (0..=LAST_CAP)
        .filter(|cap| !dropped(&calls).contains(cap))
        .collect();
    assert_eq!(kept, seccomp::FORK_SERVER_CAPS);
    assert!(
        !calls.iter().any(|c| matches!(
            c,
            Call::Setgroups(_) | Call::Setresuid(..) | Call::Setresgid(..)
        )),
        "a fork server keeps its ids: {calls:#?}"
    );
    assert!(calls.contains(&Call::NoNewPrivs) && calls.contains(&Call::Seccomp(1)));
}

#[test]
fn a_fork_server_enters_its_user_namespace_before_anything_else() {
    let sys = RecordingSyscall::default();
    let spec = fork_server_spec();
    let (unshared_r, unshared_w) = nix::unistd::pipe().expect("pipe");
    let (mapped_r, mapped_w) = nix::unistd::pipe().expect("pipe");
    let (unshared, mapped) = (unshared_w.as_raw_fd(), mapped_r.as_raw_fd());
    let (stage, _) = task::run(
        &sys,
        &spec,
        &exec(&spec, false),
        Some((unshared_w, mapped_r)),
    );
    assert_eq!(stage, "execve");
    drop::<[OwnedFd; 2]>([unshared_r, mapped_w]);
    let calls = sys.calls();
    let keep = u32::MAX;
    assert_eq!(
        calls[..11],
        [
            Call::OomScoreAdj("0".into()),
            // Created by the host uid its root maps to, capabilities kept.
            Call::Securebits(SECBIT_NO_SETUID_FIXUP),
            Call::Setresgid(keep, 200_000, keep),
            Call::Setresuid(keep, 200_000, keep),
            Call::Unshare(CloneFlags::CLONE_NEWUSER),
            Call::Write {
                fd: unshared,
                bytes: b"u".to_vec(),
            },
            // The init's answer: the maps are written.
            Call::Read(mapped),
            Call::Setgroups(Vec::new()),
            Call::Setresgid(0, 0, 0),
            Call::Setresuid(0, 0, 0),
            Call::Setsid,
        ]
    );
}

/// Runs the task's steps with `pick` failing, and checks that the step is
/// named `stage` and that nothing after it ran: the calls made are exactly
/// those of a successful run up to the failing one.
fn check_task_stops(spec: &LaunchSpec, userns: bool, pick: Pick, stage: &str) {
    let run = |sys: &RecordingSyscall| {
        let fds = userns.then(|| {
            let (_, w) = nix::unistd::pipe().expect("pipe");
            let (r, _) = nix::unistd::pipe().expect("pipe");
            (w, r)
        });
        task::run(sys, spec, &exec(spec, true), fds)
    };
    let full = RecordingSyscall::default();
    run(&full);
    let full = full.calls();
    let sys = RecordingSyscall::default().failing_when(pick);
    let (named, errno) = run(&sys);
    assert_eq!((named, errno), (stage, Errno::EPERM), "failing {stage}");
    let calls = sys.calls();
    let strip = |calls: &[Call]| -> Vec<Call> {
        // Descriptor numbers differ between the two runs.
        calls
            .iter()
            .map(|c| match c {
                Call::Write { bytes, .. } => Call::Write {
                    fd: -1,
                    bytes: bytes.clone(),
                },
                Call::Read(_) => Call::Read(-1),
                c => c.clone(),
            })
            .collect()
    };
    assert_eq!(
        strip(&calls),
        strip(&full[..calls.len()]),
        "failing {stage}"
    );
    assert!(pick(&full[calls.len()]), "failing {stage}: {calls:#?}");
}

#[test]
fn a_failing_task_step_stops_the_sequence_and_is_named() {
    let spec = spec();
    let steps: [(Pick, &str); 13] = [
        (|c| matches!(c, Call::OomScoreAdj(_)), "oom_score_adj"),
        (|c| matches!(c, Call::Write { .. }), "cgroup"),
        (
            |c| *c == Call::Unshare(CloneFlags::CLONE_NEWCGROUP),
            "cgroup namespace",
        ),
        (|c| *c == Call::Setsid, "setsid"),
        (|c| matches!(c, Call::OpenStdin(_)), "stdin"),
        (
            |c| {
                matches!(
                    c,
                    Call::Setrlimit {
                        resource: Resource::RLIMIT_FSIZE,
                        ..
                    }
                )
            },
            "rlimits",
        ),
        (|c| matches!(c, Call::Setgroups(_)), "setgroups"),
        (|c| matches!(c, Call::Setresgid(..)), "setresgid"),
        (|c| matches!(c, Call::Setresuid(..)), "setresuid"),
        (|c| matches!(c, Call::ChdirCstr(_)), "chdir"),
        (|c| *c == Call::NoNewPrivs, "no_new_privs"),
        (|c| matches!(c, Call::Seccomp(_)), "seccomp"),
        (|c| matches!(c, Call::Execve { .. }), "execve"),
    ];
    for (pick, stage) in steps {
        check_task_stops(&spec, false, pick, stage);
    }

    let spec = fork_server_spec();
    let steps: [(Pick, &str); 3] = [
        (|c| matches!(c, Call::Securebits(_)), "user namespace"),
        (
            |c| *c == Call::Unshare(CloneFlags::CLONE_NEWUSER),
            "user namespace",
        ),
        (|c| matches!(c, Call::Read(_)), "user namespace"),
    ];
    for (pick, stage) in steps {
        check_task_stops(&spec, true, pick, stage);
    }
}

#[test]
fn the_launcher_unshares_its_namespaces_then_builds_and_pivots_into_the_root() {
    for share_network in [false, true] {
        let sys = RecordingSyscall::default();
        let spec = LaunchSpec {
            share_network,
            ..spec()
        };
        build_sandbox(&sys, &spec, &no_files()).expect("sandbox");
        let calls = sys.calls();
        let mut namespaces = CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS;
        if !share_network {
            namespaces |= CloneFlags::CLONE_NEWNET;
        }
        assert_eq!(calls[0], Call::Unshare(namespaces));
        assert!(
            matches!(&calls[1], Call::Mount { target, flags, .. }
                if target == Path::new("/") && *flags == MsFlags::MS_REC | MsFlags::MS_PRIVATE),
            "the first mount makes / private: {:?}",
            calls[1]
        );
        let pivot = position(&calls, "pivot_root", |c| {
            matches!(c, Call::PivotRoot { .. })
        });
        let last_bind = calls
            .iter()
            .rposition(
                |c| matches!(c, Call::Mount { flags, .. } if flags.contains(MsFlags::MS_BIND)),
            )
            .expect("binds");
        assert!(last_bind < pivot, "every bind before the pivot");
        assert!(
            matches!(calls.last(), Some(Call::Mount { target, flags, .. })
                if target == Path::new("/") && flags.contains(MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY)),
            "the root is remounted read-only last: {:?}",
            calls.last()
        );
    }
}

#[test]
fn a_failing_launcher_step_stops_the_sequence_and_is_named() {
    let sys = RecordingSyscall::default().failing_when(|c| matches!(c, Call::Unshare(_)));
    let e = build_sandbox(&sys, &spec(), &no_files()).expect_err("unshare fails");
    assert_eq!(e.stage, "namespaces");
    assert!(sys.calls().is_empty(), "no mount after a failed unshare");

    let sys = RecordingSyscall::default().failing_when(|c| matches!(c, Call::PivotRoot { .. }));
    let e = build_sandbox(&sys, &spec(), &no_files()).expect_err("pivot fails");
    assert_eq!(e.stage, "pivot");
    assert!(
        matches!(sys.calls().last(), Some(Call::Chdir(_))),
        "nothing after the chdir into the new root: {:?}",
        sys.calls().last()
    );

    let sys = RecordingSyscall::default().failing_when(|c| matches!(c, Call::Unshare(_)));
    let e = namespaces::unshare_cgroup(&sys).expect_err("unshare fails");
    assert_eq!(e.stage, "namespaces");
}

#[test]
fn the_init_mounts_proc_names_the_host_then_brings_up_loopback() {
    let sys = RecordingSyscall::default();
    init_setup(&sys, &spec()).expect("init");
    let calls = sys.calls();
    assert_eq!(calls[0], Call::Pdeathsig);
    assert!(
        matches!(&calls[1], Call::Mount { target, fstype: Some(t), .. }
            if target == Path::new("/proc") && t == "proc"),
        "{:?}",
        calls[1]
    );
    assert_eq!(
        calls[2..],
        [Call::Sethostname("sandbox".into()), Call::LoopbackUp]
    );

    let sys = RecordingSyscall::default();
    let shared = LaunchSpec {
        share_network: true,
        ..spec()
    };
    init_setup(&sys, &shared).expect("init");
    assert!(
        !sys.calls().contains(&Call::LoopbackUp),
        "the host's network is left alone"
    );
}

#[test]
fn a_failing_init_step_stops_the_sequence_and_is_named() {
    let steps: [(Pick, &str, usize); 4] = [
        (|c| *c == Call::Pdeathsig, "init", 0),
        (|c| matches!(c, Call::Mount { .. }), "mounts", 1),
        (|c| matches!(c, Call::Sethostname(_)), "namespaces", 2),
        (|c| *c == Call::LoopbackUp, "network", 3),
    ];
    for (pick, stage, done) in steps {
        let sys = RecordingSyscall::default().failing_when(pick);
        let e = init_setup(&sys, &spec()).expect_err(stage);
        assert_eq!(e.stage, stage);
        assert_eq!(
            sys.calls().len(),
            done,
            "failing {stage}: {:?}",
            sys.calls()
        );
    }
}

#[test]
fn the_sandbox_is_built_before_any_privilege_is_dropped() {
    // The launcher's, the init's and the task's steps on one fake, in the
    // order the processes run them (each forks the next): mounts, pivot,
    // cgroup namespace, /proc, then the drops, seccomp last before execve.
    let sys = RecordingSyscall::default();
    let spec = spec();
    build_sandbox(&sys, &spec, &no_files()).expect("sandbox");
    namespaces::unshare_cgroup(&sys).expect("cgroup namespace");
    init_setup(&sys, &spec).expect("init");
    let (stage, _) = task::run(&sys, &spec, &exec(&spec, false), None);
    assert_eq!(stage, "execve");
    let calls = sys.calls();
    let order = [
        position(
            &calls,
            "bind",
            |c| matches!(c, Call::Mount { flags, .. } if flags.contains(MsFlags::MS_BIND)),
        ),
        position(&calls, "pivot_root", |c| {
            matches!(c, Call::PivotRoot { .. })
        }),
        position(&calls, "cgroup namespace", |c| {
            *c == Call::Unshare(CloneFlags::CLONE_NEWCGROUP)
        }),
        position(
            &calls,
            "/proc",
            |c| matches!(c, Call::Mount { target, .. } if target == Path::new("/proc")),
        ),
        position(&calls, "rlimits", |c| matches!(c, Call::Setrlimit { .. })),
        position(&calls, "capability drop", |c| {
            matches!(c, Call::CapbsetDrop(_))
        }),
        position(&calls, "setresuid", |c| matches!(c, Call::Setresuid(..))),
        position(&calls, "no_new_privs", |c| *c == Call::NoNewPrivs),
        position(&calls, "seccomp", |c| matches!(c, Call::Seccomp(_))),
        position(&calls, "execve", |c| matches!(c, Call::Execve { .. })),
    ];
    assert!(order.is_sorted(), "{order:?} in {calls:#?}");
    assert_eq!(order.last(), Some(&(calls.len() - 1)));
}
