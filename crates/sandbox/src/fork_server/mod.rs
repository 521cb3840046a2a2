//! Fork servers ("zygotes"): a pre-started interpreter that has already
//! imported the handler wrapper forks one child per task, and the child
//! enters the task's own isolation before it touches the task's input.
//!
//! A fork server lives in a sandbox of its own, built by the ordinary
//! launcher with [`crate::spec::LaunchSpec::fork_server`] set: new PID, mount, network,
//! IPC, UTS and cgroup namespaces, the read-only root of the runtime, its own
//! cgroup. It runs as root of a user namespace of its own
//! ([`crate::spec::LaunchSpec::userns`]), whose ids are a block of [`SERVER_UIDS`] host
//! uids it leases from the node's allocator ([`crate::uids`]) for its life:
//! its uid 0 is the block's first id, [`FORK_UIDS`] its next ones. The
//! sandbox's init writes the maps before the server runs anything, so the
//! code it imports (the wrapper, the modules of `definition.preload`, chosen
//! by tasks) holds capabilities only over the namespaces the server creates
//! for its children, none over the host's (it cannot mount, change the
//! host name or address anything of the namespaces the launcher built). It
//! keeps only [`crate::seccomp::FORK_SERVER_CAPS`] there and runs under the
//! fork-server seccomp profile. The server code itself is
//! `zygote/python_zygote.py` (its docstring has the protocol).
//!
//! Ahead of any task, a server's thread keeps *spare* children
//! ([`server::Server::make_spare`], in [`spare`]):
//! 1. make the task channel (a stream socket pair with `SO_PASSCRED` on our
//!    end), the stdout/stderr pipes and a status pipe, and send the far ends
//!    to the server with one request; it forks;
//! 2. the child says hello: the kernel stamps the message with the child's
//!    pid (translated into our PID namespace), and we move the child into a
//!    cgroup of its own (off the task's path: on cgroup v1 a move can wait
//!    out an RCU grace period);
//! 3. we say "prepare": the child unshares its namespaces, mounts a fresh
//!    tmpfs for /task and /tmp, brings up loopback and loads the task
//!    seccomp filter but for its `mount` rule.
//!
//! One run ([`ForkServers::run`]): take a spare, give it the task's limits
//! and a uid, send the spec (files, argv, env, limits); the child sizes its
//! tmpfs, writes the files, drops everything (uid, capabilities, the last
//! seccomp rule) and reports `m` with the work dir's descriptor, which keeps
//! that tmpfs readable after the child and its mount namespace are gone.
//! The run ends on the child's last words (`x<code>`, sent as it exits) or
//! on the server's report of its exit status; we kill whatever is left in
//! the cgroup, read the output back through the work dir descriptor
//! (symlink-proof, as for a cold run), and hand the cgroup to a reaper
//! thread that waits for its last process and removes it.
//!
//! Concurrent children of one server share its PID namespace, so each runs
//! under a uid of its own from [`FORK_UIDS`] (with /proc's `hidepid` and
//! distinct uids, a child can neither see nor signal another); a request
//! that asks for a specific uid runs cold instead. Those uids are host uids
//! of the server's block, so no two tasks running on the node share a uid
//! (nor a per-uid kernel limit), whichever server or cold sandbox runs them.
//!
//! Server starts are rationed ([`crate::fork_server::start_limit`]): a start that the
//! node's or the key's token bucket refuses runs its request cold and stops
//! no other server. The CPU time of every start (its server cgroup's, until
//! ready or failed) is summed for the metrics.

mod registry;
mod run;
mod server;
mod spare;
pub(crate) mod start_limit;
mod wire;

pub(crate) use registry::ForkServers;
pub use registry::Recycle;

use crate::spawn::SandboxError;

/// The uids children of one fork server run as, one per concurrent child,
/// inside the server's user namespace (the host sees the server's block).
pub const FORK_UIDS: std::ops::RangeInclusive<u32> = 62000..=62063;

/// Host uids a fork server leases for its life: its own root, then one per
/// uid of [`FORK_UIDS`].
pub(crate) const SERVER_UIDS: u32 = 1 + (*FORK_UIDS.end() - *FORK_UIDS.start() + 1);

/// Why a request could not be served warm; the caller runs it cold.
#[derive(Debug)]
pub(crate) enum Fallback {
    /// Not a request a fork server can take.
    NotEligible,
    /// A request a fork server can take, but every uid of its server is
    /// taken by a run in flight.
    Busy,
    /// The server failed before the task was handed over.
    ServerFailed(SandboxError),
    /// The server of this kind of request failed to start a short while
    /// ago ([`registry::START_BACKOFF`]); not tried again yet.
    StartBackoff,
    /// The request needs a server start and the start limiter
    /// ([`crate::fork_server::start_limit`]) refused it.
    StartRefused,
}
