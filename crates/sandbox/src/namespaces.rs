//! Namespace creation and the per-namespace setup done from inside them
//! (host name, loopback interface).

use nix::sched::CloneFlags;

use crate::launcher::SetupError;
use crate::syscall::Syscall;

/// The namespaces [`unshare_all`] creates.
pub(crate) fn sandbox_flags(share_network: bool) -> CloneFlags {
    let mut flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS;
    if !share_network {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    flags
}

/// Unshares every namespace but the cgroup one (which must wait until the
/// launcher sits in its task cgroup, so the task sees that cgroup as its root).
/// The PID namespace applies to the launcher's next child, the sandbox init.
pub(crate) fn unshare_all(sys: &dyn Syscall, share_network: bool) -> Result<(), SetupError> {
    sys.unshare(sandbox_flags(share_network))
        .map_err(|e| SetupError::new("namespaces", format!("unshare: {e}")))
}

/// Unshares the cgroup namespace (after the cgroup attach).
pub(crate) fn unshare_cgroup(sys: &dyn Syscall) -> Result<(), SetupError> {
    sys.unshare(CloneFlags::CLONE_NEWCGROUP)
        .map_err(|e| SetupError::new("namespaces", format!("unshare cgroup: {e}")))
}

/// Sets the host name seen inside the UTS namespace.
pub(crate) fn set_hostname(sys: &dyn Syscall, name: &str) -> Result<(), SetupError> {
    sys.sethostname(name)
        .map_err(|e| SetupError::new("namespaces", format!("sethostname: {e}")))
}

/// Brings up `lo` in the (new) network namespace, so the task can talk to
/// itself over 127.0.0.1 and nowhere else.
pub(crate) fn loopback_up(sys: &dyn Syscall) -> Result<(), SetupError> {
    sys.loopback_up()
        .map_err(|e| SetupError::new("network", e.to_string()))
}
