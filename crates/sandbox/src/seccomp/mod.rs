//! The seccomp-bpf policy applied to every task process just before exec.
//!
//! Policy as data: [`DENIED`] lists each refused system call with the reason.
//! Refused calls fail with `EPERM` (a clear error inside the task rather than a
//! silent kill). `clone3` fails with `ENOSYS`, so C libraries fall back to
//! `clone`, whose flags a filter can inspect (namespace flags are refused).
//! The policy is compiled into a search tree over call numbers
//! ([`tree`]: a linear list of comparisons, what `seccompiler` builds, makes
//! the kernel's load of the filter ten times slower) once by the launcher
//! before the task process is forked, and loaded with `seccompiler`. The
//! tests check that the tree decides exactly like `seccompiler`'s list of
//! the same policy.
//!
//! Why one file of about 710 lines: the policy is a table, one entry per
//! refused call with its reason (about 250 lines of data), read as one
//! list; its tests (from line 448) check it entry by entry.

mod tree;

use std::collections::BTreeMap;

use seccompiler::BpfProgram;
#[cfg(test)]
use seccompiler::{
    SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch,
};

use tree::{ArgCheck, Verdict};

/// System calls a task may never make, each with the reason.
pub const DENIED: &[(&str, libc::c_long)] = &[
    ("mount: no filesystem changes", libc::SYS_mount),
    ("umount2: no filesystem changes", libc::SYS_umount2),
    ("pivot_root: no root changes", libc::SYS_pivot_root),
    ("chroot: no root changes", libc::SYS_chroot),
    ("unshare: no new namespaces", libc::SYS_unshare),
    ("setns: no joining namespaces", libc::SYS_setns),
    ("ptrace: no debugging other processes", libc::SYS_ptrace),
    (
        "process_vm_readv: no reading other processes",
        libc::SYS_process_vm_readv,
    ),
    (
        "process_vm_writev: no writing other processes",
        libc::SYS_process_vm_writev,
    ),
    ("kcmp: no comparing other processes", libc::SYS_kcmp),
    (
        "pidfd_getfd: no stealing descriptors",
        libc::SYS_pidfd_getfd,
    ),
    (
        "keyctl: kernel keyrings are not namespaced",
        libc::SYS_keyctl,
    ),
    (
        "add_key: kernel keyrings are not namespaced",
        libc::SYS_add_key,
    ),
    (
        "request_key: kernel keyrings are not namespaced",
        libc::SYS_request_key,
    ),
    ("bpf: no BPF programs", libc::SYS_bpf),
    (
        "perf_event_open: side channels and kernel attack surface",
        libc::SYS_perf_event_open,
    ),
    ("kexec_load: no kernel replacement", libc::SYS_kexec_load),
    (
        "kexec_file_load: no kernel replacement",
        libc::SYS_kexec_file_load,
    ),
    ("reboot", libc::SYS_reboot),
    ("init_module: no kernel modules", libc::SYS_init_module),
    ("finit_module: no kernel modules", libc::SYS_finit_module),
    ("delete_module: no kernel modules", libc::SYS_delete_module),
    (
        "userfaultfd: a classic exploit primitive",
        libc::SYS_userfaultfd,
    ),
    (
        "io_uring_setup: large kernel attack surface",
        libc::SYS_io_uring_setup,
    ),
    (
        "io_uring_enter: large kernel attack surface",
        libc::SYS_io_uring_enter,
    ),
    (
        "io_uring_register: large kernel attack surface",
        libc::SYS_io_uring_register,
    ),
    (
        "open_by_handle_at: escapes mount restrictions",
        libc::SYS_open_by_handle_at,
    ),
    (
        "name_to_handle_at: pairs with open_by_handle_at",
        libc::SYS_name_to_handle_at,
    ),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("acct: host process accounting", libc::SYS_acct),
    ("quotactl: host quotas", libc::SYS_quotactl),
    ("settimeofday: host clock", libc::SYS_settimeofday),
    ("clock_settime: host clock", libc::SYS_clock_settime),
    ("clock_adjtime: host clock", libc::SYS_clock_adjtime),
    ("adjtimex: host clock", libc::SYS_adjtimex),
    ("syslog: kernel log", libc::SYS_syslog),
    ("fsopen: new mount API", libc::SYS_fsopen),
    ("fsconfig: new mount API", libc::SYS_fsconfig),
    ("fsmount: new mount API", libc::SYS_fsmount),
    ("fspick: new mount API", libc::SYS_fspick),
    ("move_mount: new mount API", libc::SYS_move_mount),
    ("open_tree: new mount API", libc::SYS_open_tree),
    ("mount_setattr: new mount API", libc::SYS_mount_setattr),
    ("sethostname: UTS changes", libc::SYS_sethostname),
    ("setdomainname: UTS changes", libc::SYS_setdomainname),
    ("vhangup: terminal control", libc::SYS_vhangup),
    ("iopl: raw port I/O", libc::SYS_iopl),
    ("ioperm: raw port I/O", libc::SYS_ioperm),
    ("uselib: obsolete", libc::SYS_uselib),
    (
        "lookup_dcookie: obsolete kernel profiling",
        libc::SYS_lookup_dcookie,
    ),
    (
        "fanotify_init: filesystem-wide monitoring",
        libc::SYS_fanotify_init,
    ),
    (
        "fanotify_mark: filesystem-wide monitoring",
        libc::SYS_fanotify_mark,
    ),
];

/// System calls answered `ENOSYS`, as on a kernel built without them, so
/// that programs take their fallback (e.g. polling instead of watching),
/// each with the reason.
pub const UNSUPPORTED: &[(&str, libc::c_long)] = &[
    (
        "clone3: its flags are out of a filter's reach; C libraries fall back to clone",
        libc::SYS_clone3,
    ),
    #[cfg(target_arch = "x86_64")]
    (
        "inotify_init: a watch on a shared read-only mount (/usr, ...) sees the host's and \
         other tasks' file activity",
        libc::SYS_inotify_init,
    ),
    ("inotify_init1: as inotify_init", libc::SYS_inotify_init1),
    (
        "inotify_add_watch: as inotify_init",
        libc::SYS_inotify_add_watch,
    ),
];

/// Socket families and netlink protocols (socket(2)'s first and third
/// arguments).
const AF_NETLINK: u32 = libc::AF_NETLINK as u32;
const NETLINK_ROUTE: u32 = libc::NETLINK_ROUTE as u32;

/// Namespace flags refused in `clone` (CLONE_NEWTIME only exists for clone3).
const CLONE_NAMESPACE_FLAGS: &[u64] = &[
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWCGROUP as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
];

/// The x32 ABI marks its syscall numbers with this bit; a filter that only
/// lists native numbers would let an x32 `mount` through on kernels built with
/// x32 support, so every denied number is listed with the bit set too.
#[cfg(target_arch = "x86_64")]
const X32_BIT: u32 = 0x4000_0000;
/// [`X32_BIT`] as `seccompiler`'s rules number system calls.
#[cfg(all(target_arch = "x86_64", test))]
const X32_SYSCALL_BIT: i64 = X32_BIT as i64;

/// Errors building the filter (a bug of ours, never the task's).
#[derive(Debug, thiserror::Error)]
#[error("building the seccomp filter: {0}")]
pub struct SeccompError(String);

#[cfg(test)]
fn target_arch() -> Result<TargetArch, SeccompError> {
    std::env::consts::ARCH
        .try_into()
        .map_err(|e| SeccompError(format!("unsupported architecture: {e:?}")))
}

#[cfg(test)]
fn err(e: impl std::fmt::Debug) -> SeccompError {
    SeccompError(format!("{e:?}"))
}

/// Which process a filter is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// A task process: everything in [`DENIED`].
    Task,
    /// A fork server ([`crate::fork_server`]): it builds each child's namespaces,
    /// mounts and host name itself, so it may make the calls of
    /// [`FORK_SERVER_ALLOWED`]; every child loads the task filter on top
    /// before it runs task code (filters stack: the strictest answer wins).
    ForkServer,
    /// A fork-server child, loaded once its namespaces and mounts are built
    /// and before any task is known: the task filter without `mount`, which
    /// the child still needs to size its tmpfs for the task. On hand-over it
    /// sizes it, then loads [`build_mount_filter`]: the two together refuse
    /// exactly what [`Profile::Task`] refuses.
    ForkChild,
}

/// `nr` and, on x86-64, its x32 twin, with `verdict`.
fn both_abis(policy: &mut BTreeMap<u32, Verdict>, nr: libc::c_long, verdict: Verdict) {
    let nr = u32::try_from(nr).expect("system call numbers fit in 32 bits");
    #[cfg(target_arch = "x86_64")]
    policy.insert(nr | X32_BIT, verdict.clone());
    policy.insert(nr, verdict);
}

#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "errno values are below 4096"
)]
const EPERM: u16 = libc::EPERM as u16;
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "errno values are below 4096"
)]
const ENOSYS: u16 = libc::ENOSYS as u16;

/// The filter that completes [`Profile::ForkChild`]: `mount` refused.
pub fn build_mount_filter() -> Result<BpfProgram, SeccompError> {
    let mut policy = BTreeMap::new();
    both_abis(&mut policy, libc::SYS_mount, Verdict::Refuse(EPERM));
    Ok(tree::compile(&policy))
}

/// [`build_mount_filter`] as `seccompiler` builds it (the tests' reference).
#[cfg(test)]
fn reference_mount_filter() -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    rules.insert(libc::SYS_mount, Vec::new());
    #[cfg(target_arch = "x86_64")]
    rules.insert(libc::SYS_mount | X32_SYSCALL_BIT, Vec::new());
    SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        target_arch()?,
    )
    .map_err(err)?
    .try_into()
    .map_err(err)
}

/// Calls of [`DENIED`] a fork server still needs for its children's setup.
pub const FORK_SERVER_ALLOWED: &[libc::c_long] = &[
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_unshare,
    libc::SYS_sethostname,
];

/// The capabilities a fork server keeps (as root, in its own namespaces):
/// chown (task files), setgid and setuid (the task's ids), setpcap (the
/// child drops the bounding set), net_admin (loopback in the child's network
/// namespace), sys_admin (unshare, mount, host name).
pub const FORK_SERVER_CAPS: &[i32] = &[0, 6, 7, 8, 12, 21];

/// The task filters, in the order they are to be loaded.
pub fn build_filters() -> Result<Vec<BpfProgram>, SeccompError> {
    build_filters_for(Profile::Task)
}

/// The calls of [`DENIED`] that `profile` refuses whatever the arguments.
fn denied(profile: Profile) -> impl Iterator<Item = libc::c_long> {
    DENIED
        .iter()
        .map(|&(_, nr)| nr)
        .filter(move |nr| match profile {
            Profile::Task => true,
            Profile::ForkServer => !FORK_SERVER_ALLOWED.contains(nr),
            Profile::ForkChild => *nr != libc::SYS_mount,
        })
}

/// The filters of `profile`, in the order they are to be loaded: the
/// refusals, then the calls of [`UNSUPPORTED`] answered with `ENOSYS`.
pub fn build_filters_for(profile: Profile) -> Result<Vec<BpfProgram>, SeccompError> {
    let mut policy = BTreeMap::new();
    for nr in denied(profile) {
        both_abis(&mut policy, nr, Verdict::Refuse(EPERM));
    }
    // clone with any namespace flag (all single bits of the low half).
    let clone = CLONE_NAMESPACE_FLAGS
        .iter()
        .map(|&flag| {
            let bit = u32::try_from(flag).expect("clone's namespace flags are 32-bit");
            vec![ArgCheck::eq(0, bit, bit)]
        })
        .collect();
    both_abis(
        &mut policy,
        libc::SYS_clone,
        Verdict::RefuseIf(EPERM, clone),
    );
    // Packet sockets; raw sockets of any family but netlink; netlink
    // sockets of any protocol but NETLINK_ROUTE (route and link queries,
    // e.g. getifaddrs: in the task's loopback-only network namespace they
    // see only `lo`, and changes need CAP_NET_ADMIN, which the task lacks).
    let socket = vec![
        vec![ArgCheck::eq(0, u32::MAX, libc::AF_PACKET as u32)],
        vec![
            ArgCheck::eq(1, 0xf, libc::SOCK_RAW as u32),
            ArgCheck::ne(0, u32::MAX, AF_NETLINK),
        ],
        vec![
            ArgCheck::eq(0, u32::MAX, AF_NETLINK),
            ArgCheck::ne(2, u32::MAX, NETLINK_ROUTE),
        ],
    ];
    both_abis(
        &mut policy,
        libc::SYS_socket,
        Verdict::RefuseIf(EPERM, socket),
    );

    let mut unsupported = BTreeMap::new();
    for &(_, nr) in UNSUPPORTED {
        both_abis(&mut unsupported, nr, Verdict::Refuse(ENOSYS));
    }
    Ok(vec![tree::compile(&policy), tree::compile(&unsupported)])
}

/// [`build_filters_for`] as `seccompiler` builds it (the tests' reference).
#[cfg(test)]
fn reference_filters_for(profile: Profile) -> Result<Vec<BpfProgram>, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for nr in denied(profile) {
        rules.insert(nr, Vec::new());
        #[cfg(target_arch = "x86_64")]
        rules.insert(nr | X32_SYSCALL_BIT, Vec::new());
    }
    // clone with any namespace flag.
    let clone_rules = CLONE_NAMESPACE_FLAGS
        .iter()
        .map(|&flag| {
            SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(flag),
                flag,
            )
            .and_then(|c| SeccompRule::new(vec![c]))
            .map_err(err)
        })
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_clone, clone_rules);
    // Packet sockets, raw sockets of any family but netlink, netlink
    // sockets of any protocol but NETLINK_ROUTE.
    let cond = |arg: u8, op: SeccompCmpOp, value: u64| {
        SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).map_err(err)
    };
    let packet =
        SeccompRule::new(vec![cond(0, SeccompCmpOp::Eq, libc::AF_PACKET as u64)?]).map_err(err)?;
    let raw = SeccompRule::new(vec![
        cond(1, SeccompCmpOp::MaskedEq(0xf), libc::SOCK_RAW as u64)?,
        cond(0, SeccompCmpOp::Ne, u64::from(AF_NETLINK))?,
    ])
    .map_err(err)?;
    let netlink = SeccompRule::new(vec![
        cond(0, SeccompCmpOp::Eq, u64::from(AF_NETLINK))?,
        cond(2, SeccompCmpOp::Ne, u64::from(NETLINK_ROUTE))?,
    ])
    .map_err(err)?;
    rules.insert(libc::SYS_socket, vec![packet, raw, netlink]);
    // The x32 numbers of the conditional rules too.
    #[cfg(target_arch = "x86_64")]
    for nr in [libc::SYS_clone, libc::SYS_socket] {
        let same = rules.get(&nr).cloned().unwrap_or_default();
        rules.insert(nr | X32_SYSCALL_BIT, same);
    }

    let arch = target_arch()?;
    let deny = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(err)?;
    let mut unsupported_rules = BTreeMap::new();
    for &(_, nr) in UNSUPPORTED {
        unsupported_rules.insert(nr, Vec::new());
        #[cfg(target_arch = "x86_64")]
        unsupported_rules.insert(nr | X32_SYSCALL_BIT, Vec::new());
    }
    let clone3 = SeccompFilter::new(
        unsupported_rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(err)?;
    Ok(vec![
        deny.try_into().map_err(err)?,
        clone3.try_into().map_err(err)?,
    ])
}

/// The filters as raw `struct sock_filter` arrays, for a process that loads
/// them itself (the fork server's children): `u32 LE count`, then per
/// filter `u32 LE instruction count` and the instructions in the kernel's
/// native layout (`u16 code, u8 jt, u8 jf, u32 k`).
#[allow(
    clippy::cast_possible_truncation,
    reason = "a handful of filters of at most BPF_MAXINSNS (4096) instructions"
)]
pub fn to_bytes(filters: &[BpfProgram]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(filters.len() as u32).to_le_bytes());
    for f in filters {
        out.extend_from_slice(&(f.len() as u32).to_le_bytes());
        for ins in f {
            out.extend_from_slice(&ins.code.to_ne_bytes());
            out.push(ins.jt);
            out.push(ins.jf);
            out.extend_from_slice(&ins.k.to_ne_bytes());
        }
    }
    out
}

/// Loads the filters into the calling thread. `no_new_privs` must be set.
pub(crate) fn apply(filters: &[BpfProgram]) -> std::io::Result<()> {
    for f in filters {
        seccompiler::apply_filter(f).map_err(|e| std::io::Error::other(format!("{e:?}")))?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]
mod tests {
    use super::*;

    /// Argument patterns for the calls with conditions: no bits, each bit
    /// of the first two arguments alone, the values the rules name with
    /// and without other bits, and pseudo-random words.
    fn arg_patterns() -> Vec<[u64; 6]> {
        let mut v = vec![[0u64; 6]];
        for bit in 0..64 {
            v.push([1 << bit, 0, 0, 0, 0, 0]);
            v.push([0, 1 << bit, 0, 0, 0, 0]);
            v.push([libc::AF_NETLINK as u64, 0, 1 << bit, 0, 0, 0]);
        }
        let packet = libc::AF_PACKET as u64;
        let raw = libc::SOCK_RAW as u64;
        for hi in [0u64, 1 << 32, 0xffff_ffff << 32] {
            v.push([packet | hi, 1, 0, 0, 0, 0]);
            v.push([2, raw | hi, 0, 0, 0, 0]);
            v.push([
                2,
                raw | libc::SOCK_CLOEXEC as u64 | libc::SOCK_NONBLOCK as u64 | hi,
                0,
                0,
                0,
                0,
            ]);
            v.push([10, (raw + 16) | hi, 0, 0, 0, 0]);
            v.push([packet + 1, raw + 1, 0, 0, 0, 0]);
            let netlink = libc::AF_NETLINK as u64;
            for proto in [0u64, 9, 15, 16] {
                v.push([netlink | hi, raw, proto, 0, 0, 0]);
                v.push([
                    netlink,
                    raw | libc::SOCK_CLOEXEC as u64 | hi,
                    proto | hi,
                    0,
                    0,
                    0,
                ]);
                v.push([netlink, libc::SOCK_DGRAM as u64, proto | hi, 0, 0, 0]);
                v.push([2, raw, proto | hi, 0, 0, 0]);
            }
            for &flag in CLONE_NAMESPACE_FLAGS {
                v.push([flag | hi | libc::SIGCHLD as u64, 0, 0, 0, 0, 0]);
            }
            v.push([
                libc::CLONE_VM as u64 | libc::CLONE_THREAD as u64 | hi,
                0,
                0,
                0,
                0,
                0,
            ]);
        }
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..300 {
            let mut a = [0u64; 6];
            for slot in &mut a {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *slot = x;
            }
            v.push(a);
        }
        v
    }

    /// `ours` decides like `reference` for every call number of both ABIs
    /// (and some beyond), every architecture tried, and, for the calls
    /// with argument conditions, every argument pattern.
    fn assert_same_decisions(ours: &BpfProgram, reference: &BpfProgram, what: &str) {
        let arches = [tree::AUDIT_ARCH, 0x4000_0003, 0xc000_00b7, 0xc000_003e, 0];
        let mut numbers: Vec<u32> = (0..1100).collect();
        numbers.extend((0..1100).map(|n| 0x4000_0000 | n));
        numbers.extend([0x3fff_ffff, 0x8000_0000, 0xc000_0000, u32::MAX]);
        let conditional = [libc::SYS_clone as u32, libc::SYS_socket as u32];
        let patterns = arg_patterns();
        for arch in arches {
            for &nr in &numbers {
                let args: &[[u64; 6]] = if conditional.contains(&(nr & !0x4000_0000)) {
                    &patterns
                } else {
                    &patterns[..1]
                };
                for a in args {
                    assert_eq!(
                        tree::run(ours, nr, arch, *a),
                        tree::run(reference, nr, arch, *a),
                        "{what}: nr {nr:#x}, arch {arch:#x}, args {a:x?}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_tree_filters_decide_exactly_like_seccompilers_lists() {
        for profile in [Profile::Task, Profile::ForkServer, Profile::ForkChild] {
            let ours = build_filters_for(profile).expect("builds");
            let reference = reference_filters_for(profile).expect("builds");
            assert_eq!(ours.len(), reference.len());
            for (i, (o, r)) in ours.iter().zip(&reference).enumerate() {
                assert_same_decisions(o, r, &format!("{profile:?} filter {i}"));
            }
            // The point of the tree: far shorter than the list.
            assert!(
                ours[0].len() * 2 < reference[0].len(),
                "{} against {}",
                ours[0].len(),
                reference[0].len()
            );
        }
        assert_same_decisions(
            &build_mount_filter().expect("builds"),
            &reference_mount_filter().expect("builds"),
            "mount filter",
        );
    }

    #[test]
    fn the_task_filter_refuses_what_it_lists_and_allows_the_rest() {
        let f = &build_filters().expect("builds")[0];
        let run =
            |nr: libc::c_long, args: [u64; 6]| tree::run(f, nr as u32, tree::AUDIT_ARCH, args);
        let eperm = tree::RET_ERRNO | libc::EPERM as u32;
        for &(_, nr) in DENIED {
            assert_eq!(run(nr, [0; 6]), eperm, "{nr}");
            #[cfg(target_arch = "x86_64")]
            assert_eq!(run(nr | X32_SYSCALL_BIT, [0; 6]), eperm, "x32 {nr}");
        }
        for nr in [
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_openat,
            libc::SYS_execve,
        ] {
            assert_eq!(run(nr, [0; 6]), tree::RET_ALLOW, "{nr}");
        }
        let newnet = libc::CLONE_NEWNET as u64 | libc::SIGCHLD as u64;
        assert_eq!(run(libc::SYS_clone, [newnet, 0, 0, 0, 0, 0]), eperm);
        assert_eq!(
            run(libc::SYS_clone, [libc::SIGCHLD as u64, 0, 0, 0, 0, 0]),
            tree::RET_ALLOW
        );
        assert_eq!(
            run(libc::SYS_socket, [libc::AF_PACKET as u64, 3, 0, 0, 0, 0]),
            eperm
        );
        assert_eq!(
            run(
                libc::SYS_socket,
                [libc::AF_INET as u64, libc::SOCK_RAW as u64, 0, 0, 0, 0]
            ),
            eperm
        );
        assert_eq!(
            run(
                libc::SYS_socket,
                [libc::AF_INET as u64, libc::SOCK_STREAM as u64, 0, 0, 0, 0]
            ),
            tree::RET_ALLOW
        );
        assert_eq!(
            tree::run(f, libc::SYS_read as u32, 0x4000_0003, [0; 6]),
            tree::RET_KILL_PROCESS,
            "another architecture"
        );
        // Netlink: route queries only.
        let netlink = |ty: libc::c_int, proto: libc::c_int| {
            run(
                libc::SYS_socket,
                [libc::AF_NETLINK as u64, ty as u64, proto as u64, 0, 0, 0],
            )
        };
        let raw_cloexec = libc::SOCK_RAW | libc::SOCK_CLOEXEC;
        assert_eq!(netlink(raw_cloexec, libc::NETLINK_ROUTE), tree::RET_ALLOW);
        assert_eq!(
            netlink(libc::SOCK_DGRAM, libc::NETLINK_ROUTE),
            tree::RET_ALLOW
        );
        for proto in [
            libc::NETLINK_AUDIT,
            libc::NETLINK_KOBJECT_UEVENT,
            libc::NETLINK_SOCK_DIAG,
            libc::NETLINK_GENERIC,
        ] {
            assert_eq!(netlink(raw_cloexec, proto), eperm, "raw {proto}");
            assert_eq!(netlink(libc::SOCK_DGRAM, proto), eperm, "dgram {proto}");
        }
        // inotify and clone3: ENOSYS, from the second filter.
        let g = &build_filters().expect("builds")[1];
        let enosys = tree::RET_ERRNO | libc::ENOSYS as u32;
        for &(_, nr) in UNSUPPORTED {
            assert_eq!(tree::run(g, nr as u32, tree::AUDIT_ARCH, [0; 6]), enosys);
        }
        for nr in [libc::SYS_inotify_init1, libc::SYS_inotify_add_watch] {
            assert!(UNSUPPORTED.iter().any(|&(_, n)| n == nr), "{nr}");
        }
        assert!(DENIED.iter().any(|&(_, n)| n == libc::SYS_fanotify_mark));
        assert_eq!(
            tree::run(g, libc::SYS_read as u32, tree::AUDIT_ARCH, [0; 6]),
            tree::RET_ALLOW
        );
    }

    #[test]
    fn the_fork_child_profile_and_the_mount_filter_build() {
        let early = build_filters_for(Profile::ForkChild).expect("builds");
        assert_eq!(early.len(), 2);
        let full = build_filters().expect("builds");
        assert!(early[0].len() < full[0].len(), "mount is left out");
        let mount = build_mount_filter().expect("builds");
        assert!(!mount.is_empty());
        assert!(!to_bytes(&early).is_empty());
    }

    #[test]
    fn filters_build_and_cover_the_required_calls() {
        let filters = build_filters().expect("filters build");
        assert_eq!(filters.len(), 2);
        assert!(
            filters[0].len() > DENIED.len(),
            "every denied call has instructions"
        );
        for required in [
            libc::SYS_mount,
            libc::SYS_umount2,
            libc::SYS_pivot_root,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_ptrace,
            libc::SYS_process_vm_readv,
            libc::SYS_process_vm_writev,
            libc::SYS_keyctl,
            libc::SYS_add_key,
            libc::SYS_request_key,
            libc::SYS_bpf,
            libc::SYS_perf_event_open,
            libc::SYS_kexec_load,
            libc::SYS_reboot,
            libc::SYS_init_module,
            libc::SYS_finit_module,
            libc::SYS_userfaultfd,
            libc::SYS_io_uring_setup,
            libc::SYS_open_by_handle_at,
            libc::SYS_swapon,
            libc::SYS_swapoff,
        ] {
            assert!(
                DENIED.iter().any(|&(_, nr)| nr == required),
                "{required} denied"
            );
        }
    }
}
