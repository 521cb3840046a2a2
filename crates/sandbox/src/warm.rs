//! The warm runner: a cold [`Sandbox`] behind warm launcher pools
//! ([`crate::pool`]) and fork servers ([`crate::zygote`]).

use std::sync::Arc;

use crate::pool::{LauncherPool, PoolConfig};
use crate::spawn::{CancelToken, RunOutcome, RunRequest, Sandbox, SandboxError};

/// Settings of the warm runner.
#[derive(Debug, Clone, Default)]
pub struct WarmConfig {
    /// Launcher pool sizing.
    pub pool: PoolConfig,
    /// Run handler tasks whose runtime has a fork server in forked children
    /// of a pre-started interpreter.
    pub fork_servers: bool,
}

/// Runs each request the fastest safe way available: a fork-server child,
/// else a pre-built sandbox, else a cold one.
#[derive(Debug)]
pub struct WarmSandbox {
    sandbox: Arc<Sandbox>,
    pool: LauncherPool,
}

impl WarmSandbox {
    /// A warm runner in front of `sandbox`.
    pub fn new(sandbox: Sandbox, config: WarmConfig) -> Self {
        let sandbox = Arc::new(sandbox);
        Self {
            pool: LauncherPool::new(Arc::clone(&sandbox), config.pool),
            sandbox,
        }
    }

    /// The cold sandbox underneath.
    pub fn sandbox(&self) -> &Sandbox {
        &self.sandbox
    }

    /// Runs one task to its end, like [`Sandbox::run`].
    pub fn run(
        &self,
        req: &RunRequest,
        cancel: Option<&CancelToken>,
    ) -> Result<RunOutcome, SandboxError> {
        self.pool.run(req, cancel)
    }
}
