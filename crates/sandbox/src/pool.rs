//! Warm launcher pools: sandboxes whose namespaces, mounts and cgroup are
//! built ahead of time, per runtime and limit class, each used for exactly
//! one task and then destroyed.
//!
//! (Skeleton: `run` is still the cold path; the pool itself is being built.)

use std::sync::Arc;
use std::time::Duration;

use crate::spawn::{CancelToken, RunOutcome, RunRequest, Sandbox, SandboxError};

/// Sizing of the pools.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    /// Warm sandboxes kept per key even when idle.
    pub min_per_key: usize,
    /// Warm sandboxes at most per key.
    pub max_per_key: usize,
    /// Warm sandboxes at most in all.
    pub max_total: usize,
    /// A key that saw no task for this long shrinks to `min_per_key`.
    pub idle_after: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            min_per_key: 0,
            max_per_key: 4,
            max_total: 16,
            idle_after: Duration::from_secs(30),
        }
    }
}

/// Pools of pre-built sandboxes in front of a cold [`Sandbox`].
#[derive(Debug)]
pub struct LauncherPool {
    sandbox: Arc<Sandbox>,
    config: PoolConfig,
}

impl LauncherPool {
    /// Pools in front of `sandbox`.
    pub fn new(sandbox: Arc<Sandbox>, config: PoolConfig) -> Self {
        Self { sandbox, config }
    }

    /// The sizing in use.
    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// Runs `req` in a warm sandbox of its key when one is ready, else cold.
    pub fn run(
        &self,
        req: &RunRequest,
        cancel: Option<&CancelToken>,
    ) -> Result<RunOutcome, SandboxError> {
        self.sandbox.run(req, cancel)
    }
}
