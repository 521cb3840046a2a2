//! Resource limits set with setrlimit in the task process: a second layer
//! under the cgroup limits (descriptors, file size, core dumps, stack,
//! per-process CPU seconds).

use nix::sys::resource::{Resource, setrlimit};

use crate::spec::RlimitSpec;

/// Applies the limits to the calling process.
pub(crate) fn apply(spec: &RlimitSpec) -> nix::Result<()> {
    setrlimit(Resource::RLIMIT_CORE, 0, 0)?;
    setrlimit(Resource::RLIMIT_NOFILE, spec.nofile, spec.nofile)?;
    setrlimit(Resource::RLIMIT_FSIZE, spec.fsize, spec.fsize)?;
    setrlimit(Resource::RLIMIT_STACK, spec.stack, spec.stack)?;
    if let Some(cpu) = spec.cpu_seconds {
        // Soft limit sends SIGXCPU, hard limit one second later SIGKILL.
        setrlimit(Resource::RLIMIT_CPU, cpu, cpu + 1)?;
    }
    Ok(())
}
