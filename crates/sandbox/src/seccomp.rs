//! The seccomp-bpf policy applied to every task process just before exec.
//!
//! Policy as data: [`DENIED`] lists each refused system call with the reason.
//! Refused calls fail with `EPERM` (a clear error inside the task rather than a
//! silent kill). `clone3` fails with `ENOSYS`, so C libraries fall back to
//! `clone`, whose flags a filter can inspect (namespace flags are refused).
//! Filters are built with `seccompiler` (rust-vmm), compiled once by the
//! launcher before the task process is forked.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

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
];

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
const X32_SYSCALL_BIT: i64 = 0x4000_0000;

/// Errors building the filter (a bug of ours, never the task's).
#[derive(Debug, thiserror::Error)]
#[error("building the seccomp filter: {0}")]
pub struct SeccompError(String);

fn target_arch() -> Result<TargetArch, SeccompError> {
    std::env::consts::ARCH
        .try_into()
        .map_err(|e| SeccompError(format!("unsupported architecture: {e:?}")))
}

fn err(e: impl std::fmt::Debug) -> SeccompError {
    SeccompError(format!("{e:?}"))
}

/// Which process a filter is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// A task process: everything in [`DENIED`].
    Task,
    /// A fork server ([`crate::zygote`]): it builds each child's namespaces,
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

/// The filter that completes [`Profile::ForkChild`]: `mount` refused.
pub fn build_mount_filter() -> Result<BpfProgram, SeccompError> {
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

/// The filters of `profile`, in the order they are to be loaded.
pub fn build_filters_for(profile: Profile) -> Result<Vec<BpfProgram>, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for &(_, nr) in DENIED {
        if profile == Profile::ForkServer && FORK_SERVER_ALLOWED.contains(&nr) {
            continue;
        }
        if profile == Profile::ForkChild && nr == libc::SYS_mount {
            continue;
        }
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
    // Packet sockets and raw sockets of any family.
    let packet = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        libc::AF_PACKET as u64,
    )
    .and_then(|c| SeccompRule::new(vec![c]))
    .map_err(err)?;
    let raw = SeccompCondition::new(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(0xf),
        libc::SOCK_RAW as u64,
    )
    .and_then(|c| SeccompRule::new(vec![c]))
    .map_err(err)?;
    rules.insert(libc::SYS_socket, vec![packet, raw]);
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
    let mut clone3_rules = BTreeMap::from([(libc::SYS_clone3, Vec::new())]);
    #[cfg(target_arch = "x86_64")]
    clone3_rules.insert(libc::SYS_clone3 | X32_SYSCALL_BIT, Vec::new());
    let clone3 = SeccompFilter::new(
        clone3_rules,
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
mod tests {
    use super::*;

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
