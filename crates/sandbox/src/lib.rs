//! The CONTAINER sandbox of taskexec, and the only crate of the workspace
//! with `unsafe` code and raw system calls (each block carries a `SAFETY:`
//! comment).
//!
//! A run goes: the executor ([`Sandbox::run`]) creates a task cgroup and
//! spawns the launcher (our own binary re-executed, see [`launcher`]), which
//! builds namespaces, a read-only root of bind mounts and a size-limited work
//! dir, then starts the task as an unprivileged user under seccomp. The
//! executor enforces the wall-clock and CPU-time limits, captures output with
//! caps, and removes every trace afterwards.

mod capture;
pub mod cgroup;
mod closer;
mod fork_server;
mod frame;
pub mod fsread;
pub mod launcher;
mod mounts;
mod namespaces;
pub mod pool;
mod rlimits;
pub mod seccomp;
mod spawn;
pub mod spec;
mod syscall;
pub mod uids;
pub mod warm;

pub use capture::OutputStream;
pub use launcher::{LAUNCHER_ARG, run_if_launcher};
pub use spawn::{
    CancelToken, LauncherCommand, ReadBackResult, RunOutcome, RunRequest, Sandbox, SandboxConfig,
    SandboxError, SandboxLimits, Termination,
};
pub use spec::{ExitStatus, RoMount, SandboxFile, signal_name};
pub use uids::{TaskUids, UidRangeError};
pub use warm::{FallbackReasons, Recycle, StartLimit, WarmConfig, WarmSandbox, WarmStats};
