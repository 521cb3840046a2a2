//! The warm runner: a cold [`Sandbox`] behind warm launcher pools
//! ([`crate::pool`]) and fork servers ([`crate::fork_server`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use crate::fork_server::Recycle;
pub use crate::fork_server::start_limit::StartLimit;
use crate::fork_server::{Fallback, ForkServers};
use crate::pool::{LauncherPool, PoolConfig, PoolStats};
use crate::spawn::{CancelToken, RunOutcome, RunRequest, Sandbox, SandboxError};

/// Settings of the warm runner.
#[derive(Debug, Clone, Default)]
pub struct WarmConfig {
    /// Launcher pool sizing.
    pub pool: PoolConfig,
    /// Run handler tasks whose runtime has a fork server in forked children
    /// of a pre-started interpreter.
    pub fork_servers: bool,
    /// When a fork server is replaced by a fresh one.
    pub recycle: Recycle,
    /// How many fork servers may start, and how fast.
    pub start_limit: StartLimit,
}

/// Counters and gauges of a [`WarmSandbox`], for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WarmStats {
    /// The launcher pools'.
    pub pool: PoolStats,
    /// Fork servers running now.
    pub fork_servers: usize,
    /// Forked children waiting for a task now, all servers together.
    pub fork_server_spares: usize,
    /// Tasks handed to a fork-server child (whatever their outcome).
    pub fork_server_runs: u64,
    /// Tasks a fork server should have run that ran in a sandbox instead:
    /// the server failed (to start, or before the hand-over) or all its
    /// uids were busy. The sum of [`WarmStats::fallback_reasons`].
    pub fork_server_fallbacks: u64,
    /// [`WarmStats::fork_server_fallbacks`] by reason.
    pub fallback_reasons: FallbackReasons,
    /// Fork servers started (first starts and replacements).
    pub fork_server_starts: u64,
    /// Fork-server starts the start limiter refused ([`StartLimit`]).
    pub fork_server_starts_refused: u64,
    /// CPU time fork servers spent starting, until ready or failed.
    pub fork_server_start_cpu: Duration,
    /// Fork servers that failed to start (a module of
    /// `definition.preload` that does not import, an interpreter that
    /// cannot start): their kind of request then runs cold for a while.
    pub fork_server_start_failures: u64,
    /// Fork servers replaced by fresh ones for their age or runs
    /// ([`Recycle`]).
    pub fork_servers_recycled: u64,
}

/// Why handler tasks ran cold instead of in a fork server, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FallbackReasons {
    /// Every uid of the server was taken, or every server slot was busy.
    pub busy: u64,
    /// The server failed to start, or failed before the hand-over.
    pub server_failed: u64,
    /// The server of the task's kind failed to start a short while ago.
    pub start_backoff: u64,
    /// A server start was needed and the start limiter refused it.
    pub start_refused: u64,
}

impl FallbackReasons {
    /// Each reason with its metric label.
    pub fn labelled(&self) -> [(&'static str, u64); 4] {
        [
            ("busy", self.busy),
            ("server_failed", self.server_failed),
            ("start_backoff", self.start_backoff),
            ("start_refused", self.start_refused),
        ]
    }

    fn total(&self) -> u64 {
        self.labelled().iter().map(|(_, n)| n).sum()
    }
}

/// Runs each request the fastest safe way available: a fork-server child,
/// else a pre-built sandbox, else a cold one.
#[derive(Debug)]
pub struct WarmSandbox {
    sandbox: Arc<Sandbox>,
    pool: LauncherPool,
    fork_servers: Option<ForkServers>,
    /// See [`WarmStats::fork_server_runs`].
    fork_runs: AtomicU64,
    /// See [`WarmStats::fallback_reasons`], in its order.
    fork_fallbacks: [AtomicU64; 4],
}

impl WarmSandbox {
    /// A warm runner in front of `sandbox`.
    pub fn new(sandbox: Sandbox, config: WarmConfig) -> Self {
        let sandbox = Arc::new(sandbox);
        Self {
            pool: LauncherPool::new(Arc::clone(&sandbox), config.pool),
            fork_servers: config.fork_servers.then(|| {
                ForkServers::new(Arc::clone(&sandbox), config.recycle, config.start_limit)
            }),
            sandbox,
            fork_runs: AtomicU64::new(0),
            fork_fallbacks: Default::default(),
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
                Ok(result) => {
                    self.fork_runs.fetch_add(1, Ordering::Relaxed);
                    return result;
                }
                Err(Fallback::NotEligible) => {}
                Err(Fallback::Busy) => self.fell_back(0),
                Err(Fallback::ServerFailed(e)) => {
                    // The task was not handed over: it runs cold, and the
                    // next request starts a fresh server.
                    self.fell_back(1);
                    tracing_free_warn(&e);
                }
                Err(Fallback::StartBackoff) => self.fell_back(2),
                Err(Fallback::StartRefused) => self.fell_back(3),
            }
        }
        self.pool.run(req, cancel)
    }

    /// Counts a fallback of the reason at `index` of
    /// [`FallbackReasons::labelled`].
    fn fell_back(&self, index: usize) {
        self.fork_fallbacks[index].fetch_add(1, Ordering::Relaxed);
    }

    /// Number of fork servers running.
    pub fn fork_server_count(&self) -> usize {
        self.fork_servers.as_ref().map_or(0, ForkServers::count)
    }

    /// The pool sizing in use.
    pub fn pool_config(&self) -> &PoolConfig {
        self.pool.config()
    }

    /// The counters and gauges now. May wait while a fork server starts
    /// (tens of milliseconds, at most its start timeout): call it off an
    /// async executor's threads.
    pub fn stats(&self) -> WarmStats {
        let reason = |i: usize| self.fork_fallbacks[i].load(Ordering::Relaxed);
        let fallback_reasons = FallbackReasons {
            busy: reason(0),
            server_failed: reason(1),
            start_backoff: reason(2),
            start_refused: reason(3),
        };
        let servers = self.fork_servers.as_ref();
        WarmStats {
            pool: self.pool.stats(),
            fork_servers: self.fork_server_count(),
            fork_server_spares: self
                .fork_servers
                .as_ref()
                .map_or(0, ForkServers::spare_count),
            fork_server_runs: self.fork_runs.load(Ordering::Relaxed),
            fork_server_fallbacks: fallback_reasons.total(),
            fallback_reasons,
            fork_server_starts: servers.map_or(0, ForkServers::starts),
            fork_server_starts_refused: servers.map_or(0, ForkServers::starts_refused),
            fork_server_start_cpu: servers.map_or(Duration::ZERO, ForkServers::start_cpu),
            fork_server_start_failures: self
                .fork_servers
                .as_ref()
                .map_or(0, ForkServers::start_failures),
            fork_servers_recycled: self.fork_servers.as_ref().map_or(0, ForkServers::recycled),
        }
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
    eprintln!(
        "taskexec: fork server unavailable, running the task cold: {}",
        error_chain(e)
    );
}

/// `e` and its sources, one line.
pub(crate) fn error_chain(e: &SandboxError) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::cgroup::{CgroupDriver, CgroupError, CgroupLimits, CgroupVersion, TaskCgroup};

    /// Every cgroup creation fails: a cold run ends before it spawns anything.
    #[derive(Debug)]
    struct NoCgroups;

    impl CgroupDriver for NoCgroups {
        fn version(&self) -> CgroupVersion {
            CgroupVersion::V2
        }
        fn create(
            &self,
            _name: &str,
            _limits: &CgroupLimits,
        ) -> Result<Box<dyn TaskCgroup>, CgroupError> {
            Err(CgroupError::Unavailable {
                detail: "unit test".into(),
            })
        }
        fn parents(&self) -> Vec<std::path::PathBuf> {
            Vec::new()
        }
    }

    /// A handler request for the python fork server, without the wrapper
    /// the server needs: its start fails before it spawns anything.
    fn request() -> RunRequest {
        RunRequest {
            fork_server: Some("python".into()),
            preload: Vec::new(),
            ..crate::spawn::test_request("/usr/bin/python3")
        }
    }

    fn warm(fork_servers: bool) -> WarmSandbox {
        let sandbox = Sandbox::new(
            crate::SandboxConfig::new(crate::LauncherCommand {
                program: "/nonexistent".into(),
            }),
            Box::new(NoCgroups),
        );
        WarmSandbox::new(
            sandbox,
            WarmConfig {
                pool: PoolConfig {
                    max_per_key: 0,
                    ..PoolConfig::default()
                },
                fork_servers,
                ..WarmConfig::default()
            },
        )
    }

    #[test]
    fn a_failed_fork_server_counts_a_fallback_and_the_task_runs_cold() {
        let w = warm(true);
        assert_eq!(w.stats(), WarmStats::default());
        assert!(w.run(&request(), None).is_err(), "no cgroups: cold fails");
        let s = w.stats();
        assert_eq!(
            (
                s.fork_server_fallbacks,
                s.fork_server_runs,
                s.fork_servers,
                s.fork_server_spares
            ),
            (1, 0, 0, 0)
        );
        assert_eq!((s.pool.misses, s.pool.hits, s.pool.keys), (1, 0, 1));
        w.shutdown();
    }

    #[test]
    fn without_fork_servers_nothing_falls_back() {
        let w = warm(false);
        let mut req = request();
        assert!(w.run(&req, None).is_err());
        req.fork_server = None;
        assert!(w.run(&req, None).is_err());
        let s = w.stats();
        assert_eq!((s.fork_server_fallbacks, s.pool.misses), (0, 2));
    }
}
