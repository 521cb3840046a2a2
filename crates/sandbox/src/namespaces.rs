//! Namespace creation and the per-namespace setup done from inside them
//! (host name, loopback interface).

use nix::sched::{CloneFlags, unshare};

use crate::launcher::SetupError;

/// Unshares every namespace but the cgroup one (which must wait until the
/// launcher sits in its task cgroup, so the task sees that cgroup as its root).
/// The PID namespace applies to the launcher's next child, the sandbox init.
pub(crate) fn unshare_all(share_network: bool) -> Result<(), SetupError> {
    let mut flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS;
    if !share_network {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    unshare(flags).map_err(|e| SetupError::new("namespaces", format!("unshare: {e}")))
}

/// Unshares the cgroup namespace (after the cgroup attach).
pub(crate) fn unshare_cgroup() -> Result<(), SetupError> {
    unshare(CloneFlags::CLONE_NEWCGROUP)
        .map_err(|e| SetupError::new("namespaces", format!("unshare cgroup: {e}")))
}

/// Sets the host name seen inside the UTS namespace.
pub(crate) fn set_hostname(name: &str) -> Result<(), SetupError> {
    nix::unistd::sethostname(name)
        .map_err(|e| SetupError::new("namespaces", format!("sethostname: {e}")))
}

/// Brings up `lo` in the (new) network namespace, so the task can talk to
/// itself over 127.0.0.1 and nowhere else.
pub(crate) fn loopback_up() -> Result<(), SetupError> {
    let fail = |what: &str| {
        SetupError::new(
            "network",
            format!("{what}: {}", std::io::Error::last_os_error()),
        )
    };
    // SAFETY: plain socket(2) call with constant arguments; the result is
    // checked before use and closed below.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(fail("socket"));
    }
    // SAFETY: ifreq is a plain C struct for which all-zero bytes is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        #[allow(clippy::cast_possible_wrap, reason = "ASCII bytes")]
        let byte = *src as libc::c_char;
        *dst = byte;
    }
    // SAFETY: `sock` is a valid socket and `req` a valid, NUL-terminated
    // ifreq that outlives the call; SIOCGIFFLAGS only writes ifr_flags.
    let rc = unsafe { libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req) };
    let result = if rc < 0 {
        Err(fail("SIOCGIFFLAGS"))
    } else {
        // SAFETY: the union member ifru_flags was just filled by the kernel.
        unsafe {
            #[allow(
                clippy::cast_possible_truncation,
                reason = "IFF_UP | IFF_RUNNING is 0x41"
            )]
            let up = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            req.ifr_ifru.ifru_flags |= up;
        }
        // SAFETY: as above; SIOCSIFFLAGS reads the flags from `req`.
        let rc = unsafe { libc::ioctl(sock, libc::SIOCSIFFLAGS, &req) };
        if rc < 0 {
            Err(fail("SIOCSIFFLAGS"))
        } else {
            Ok(())
        }
    };
    // SAFETY: `sock` is owned here and closed exactly once.
    unsafe { libc::close(sock) };
    result
}
