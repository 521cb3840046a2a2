//! Telemetry fed by background loops: the host's memory pressure (for the
//! concurrency limiter) and the warm runner's counters and gauges.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use metrics::{counter, gauge};
use taskexec_sandbox::WarmStats;

use crate::Service;

impl Service {
    /// Reads the host's memory pressure every second for the limiter.
    pub(crate) async fn watch_memory(self: Arc<Self>) {
        loop {
            if self.stopping.load(Ordering::SeqCst) {
                break;
            }
            let reading = crate::pressure::read_host();
            if let Some(s) = reading.stall_percent {
                gauge!("taskexec_memory_stall_ratio").set(s / 100.0);
            }
            if let Some(a) = reading.available_ratio {
                gauge!("taskexec_memory_available_ratio").set(a);
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
    gauge!("taskexec_warm_pool_ready").set(p.warm as f64);
    gauge!("taskexec_warm_pool_target").set(p.target as f64);
    gauge!("taskexec_warm_pool_keys").set(p.keys as f64);
    counter!("taskexec_warm_pool_hits_total").absolute(p.hits);
    counter!("taskexec_warm_pool_misses_total").absolute(p.misses);
    counter!("taskexec_warm_pool_created_total").absolute(p.created);
    counter!("taskexec_warm_pool_discarded_total").absolute(p.discarded);
    counter!("taskexec_warm_pool_retired_total").absolute(p.retired);
    counter!("taskexec_warm_pool_build_failures_total").absolute(p.failed);
    gauge!("taskexec_fork_servers").set(s.fork_servers as f64);
    gauge!("taskexec_fork_server_spares").set(s.fork_server_spares as f64);
    counter!("taskexec_fork_server_runs_total").absolute(s.fork_server_runs);
    for (reason, n) in s.fallback_reasons.labelled() {
        counter!("taskexec_fork_server_fallbacks_total", "reason" => reason).absolute(n);
    }
    counter!("taskexec_fork_server_start_failures_total").absolute(s.fork_server_start_failures);
    for (outcome, n) in [
        ("started", s.fork_server_starts),
        ("refused", s.fork_server_starts_refused),
        ("failed", s.fork_server_start_failures),
    ] {
        counter!("taskexec_fork_server_starts_total", "outcome" => outcome).absolute(n);
    }
    // A gauge that only grows: the metrics library's counters are integers.
    gauge!("taskexec_fork_server_start_cpu_seconds_total")
        .set(s.fork_server_start_cpu.as_secs_f64());
    counter!("taskexec_fork_servers_recycled_total").absolute(s.fork_servers_recycled);
}
