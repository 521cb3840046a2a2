//! The warm runner: a cold [`Sandbox`] behind warm launcher pools
//! ([`crate::pool`]) and fork servers ([`crate::zygote`]).

use std::sync::Arc;

use crate::pool::{LauncherPool, PoolConfig};
use crate::spawn::{CancelToken, RunOutcome, RunRequest, Sandbox, SandboxError};
use crate::zygote::{Fallback, ForkServers};

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
    fork_servers: Option<ForkServers>,
}

impl WarmSandbox {
    /// A warm runner in front of `sandbox`.
    pub fn new(sandbox: Sandbox, config: WarmConfig) -> Self {
        let sandbox = Arc::new(sandbox);
        Self {
            pool: LauncherPool::new(Arc::clone(&sandbox), config.pool),
            fork_servers: config
                .fork_servers
                .then(|| ForkServers::new(Arc::clone(&sandbox))),
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
        if let Some(servers) = &self.fork_servers {
            match servers.run(req, cancel) {
                Ok(result) => return result,
                Err(Fallback::NotEligible) => {}
                Err(Fallback::ServerFailed(e)) => {
                    // The task was not handed over: it runs cold, and the
                    // next request starts a fresh server.
                    tracing_free_warn(&e);
                }
            }
        }
        self.pool.run(req, cancel)
    }

    /// Number of fork servers running.
    pub fn fork_server_count(&self) -> usize {
        self.fork_servers.as_ref().map_or(0, ForkServers::count)
    }

    /// Stops every fork server and pooled sandbox.
    pub fn shutdown(&self) {
        if let Some(s) = &self.fork_servers {
            s.shutdown();
        }
        self.pool.shutdown();
    }
}

/// The sandbox crate does not log; a fork server that failed is reported on
/// stderr once per failure so an operator sees why tasks run cold.
fn tracing_free_warn(e: &SandboxError) {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    eprintln!("taskexec: fork server unavailable, running the task cold: {text}");
}
