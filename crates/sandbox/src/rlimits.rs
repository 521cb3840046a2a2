//! Resource limits set with setrlimit in the task process: a second layer
//! under the cgroup limits (descriptors, file size, core dumps, stack,
//! per-process CPU seconds).

use nix::sys::resource::Resource;

use crate::spec::RlimitSpec;
use crate::syscall::Syscall;

/// Applies the limits to the calling process.
pub(crate) fn apply(sys: &dyn Syscall, spec: &RlimitSpec) -> nix::Result<()> {
    sys.setrlimit(Resource::RLIMIT_CORE, 0, 0)?;
    sys.setrlimit(Resource::RLIMIT_NOFILE, spec.nofile, spec.nofile)?;
    sys.setrlimit(Resource::RLIMIT_FSIZE, spec.fsize, spec.fsize)?;
    sys.setrlimit(Resource::RLIMIT_STACK, spec.stack, spec.stack)?;
    if let Some(cpu) = spec.cpu_seconds {
        // Soft limit sends SIGXCPU, hard limit one second later SIGKILL.
        sys.setrlimit(Resource::RLIMIT_CPU, cpu, cpu + 1)?;
    }
    Ok(())
}
