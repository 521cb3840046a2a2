//! Telemetry fed by background loops: the host's memory pressure (for the
//! concurrency limiter) and the warm runner's counters and gauges.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use metrics::{counter, gauge};
use taskexec_sandbox::WarmStats;

use crate::Service;
use crate::metric;

impl Service {
    /// Reads the host's memory pressure every second for the limiter.
    pub(crate) async fn watch_memory(self: Arc<Self>) {
        loop {
            if self.stopping.load(Ordering::SeqCst) {
                break;
            }
            let reading = crate::pressure::read_host();
            if let Some(s) = reading.stall_percent {
                gauge!(metric::MEMORY_STALL_RATIO.name).set(s / 100.0);
            }
            if let Some(a) = reading.available_ratio {
                gauge!(metric::MEMORY_AVAILABLE_RATIO.name).set(a);
            }
            self.adjust_limit(|l, now| l.on_memory(now, &reading));
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Publishes the warm runner's counters and gauges at start and every
    /// [`WARM_STATS_EVERY`] until the service stops; at once returns for a
    /// runner that keeps nothing warm. They are read on a blocking thread:
    /// reading waits while a fork server starts.
    pub(crate) async fn publish_warm_stats(self: Arc<Self>) {
        loop {
            let engine = Arc::clone(&self.engine);
            let Ok(Some(stats)) = tokio::task::spawn_blocking(move || engine.warm_stats()).await
            else {
                return;
            };
            record_warm_stats(&stats);
            tokio::time::sleep(WARM_STATS_EVERY).await;
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
        }
    }
}

/// How often the warm runner's metrics are refreshed.
pub(crate) const WARM_STATS_EVERY: Duration = Duration::from_secs(2);

/// Sets the warm runner's metrics (see docs/metrics.md). Its counters are
/// kept by the runner and exported as they stand.
pub(crate) fn record_warm_stats(s: &WarmStats) {
    let p = &s.pool;
    gauge!(metric::WARM_POOL_READY.name).set(p.warm as f64);
    gauge!(metric::WARM_POOL_TARGET.name).set(p.target as f64);
    gauge!(metric::WARM_POOL_KEYS.name).set(p.keys as f64);
    counter!(metric::WARM_POOL_HITS_TOTAL.name).absolute(p.hits);
    counter!(metric::WARM_POOL_MISSES_TOTAL.name).absolute(p.misses);
    counter!(metric::WARM_POOL_CREATED_TOTAL.name).absolute(p.created);
    counter!(metric::WARM_POOL_DISCARDED_TOTAL.name).absolute(p.discarded);
    counter!(metric::WARM_POOL_RETIRED_TOTAL.name).absolute(p.retired);
    counter!(metric::WARM_POOL_BUILD_FAILURES_TOTAL.name).absolute(p.failed);
    gauge!(metric::FORK_SERVERS.name).set(s.fork_servers as f64);
    gauge!(metric::FORK_SERVER_SPARES.name).set(s.fork_server_spares as f64);
    counter!(metric::FORK_SERVER_RUNS_TOTAL.name).absolute(s.fork_server_runs);
    for (reason, n) in s.fallback_reasons.labelled() {
        counter!(metric::FORK_SERVER_FALLBACKS_TOTAL.name, "reason" => reason).absolute(n);
    }
    counter!(metric::FORK_SERVER_START_FAILURES_TOTAL.name).absolute(s.fork_server_start_failures);
    for (outcome, n) in [
        ("started", s.fork_server_starts),
        ("refused", s.fork_server_starts_refused),
        ("failed", s.fork_server_start_failures),
    ] {
        counter!(metric::FORK_SERVER_STARTS_TOTAL.name, "outcome" => outcome).absolute(n);
    }
    // A gauge that only grows: the metrics library's counters are integers.
    gauge!(metric::FORK_SERVER_START_CPU_SECONDS_TOTAL.name)
        .set(s.fork_server_start_cpu.as_secs_f64());
    counter!(metric::FORK_SERVERS_RECYCLED_TOTAL.name).absolute(s.fork_servers_recycled);
}
