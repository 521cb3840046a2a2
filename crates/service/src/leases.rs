//! Leases: renewal of the running tasks' leases, cancel requests picked up
//! from the store, self-fencing when leases cannot be renewed in time, and
//! the take-over of tasks whose node stopped renewing.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use metrics::{counter, gauge};
use taskexec_model::{ErrorType, TaskError};
use tracing::{info, warn};

use crate::metric;
use crate::{Service, now};

impl Service {
    /// Stops the running tasks `ids` (killing their sandboxes) because this
    /// node does not hold their leases any more, or may not: their attempts
    /// record nothing here, the task's next holder takes them over.
    pub(crate) fn fence(&self, ids: &[&String], why: &str) {
        let running = self.lock_running();
        for id in ids {
            if let Some(r) = running.get(*id)
                && !r.ran
                && r.cancel.fence()
            {
                warn!(task_id = %id, reason = why, "self-fencing: stopping a task");
                counter!(metric::TASKS_SELF_FENCED_TOTAL.name).increment(1);
            }
        }
    }

    /// Renews the leases of running tasks, picks up cancel requests made
    /// through the store (from another node's API), and takes over tasks
    /// whose node stopped renewing its lease (it died, or lost the database):
    /// their interrupted attempt is recorded and they are retried or failed
    /// per their policy.
    pub(crate) async fn keep_leases(self: Arc<Self>) {
        let every =
            (self.config.lease / 3).clamp(Duration::from_millis(200), Duration::from_secs(10));
        let tick = Duration::from_millis(500).min(every);
        let mut last_renew = Instant::now();
        // When the last renewal that went through was sent: the leases it
        // extended last until then plus a lease.
        let mut renewed = Instant::now();
        let mut last_takeover = Instant::now();
        loop {
            tokio::time::sleep(tick).await;
            if self.stopping.load(Ordering::SeqCst) {
                break;
            }
            // Off the claim path: counting the queue scans the table.
            if let Ok(stats) = self.store.stats().await {
                gauge!(metric::QUEUE_DEPTH.name).set(stats.queued as f64);
                if self.fenced.swap(false, Ordering::SeqCst) {
                    info!("the store answers again: claiming resumes");
                    self.wake.notify_one();
                }
            }
            let ids: Vec<String> = self.lock_running().keys().cloned().collect();
            if !ids.is_empty() {
                if let Ok(cancelled) = self.store.cancel_requested(&ids).await {
                    let running = self.lock_running();
                    for id in cancelled {
                        if let Some(r) = running.get(&id) {
                            r.cancel.cancel();
                        }
                    }
                }
                if last_renew.elapsed() >= every {
                    let sent = Instant::now();
                    last_renew = sent;
                    let until = now() + self.config.lease;
                    match self.store.renew(&self.config.node, &ids, until).await {
                        Ok(held) => {
                            renewed = sent;
                            // Taken over (this node was paused or cut off
                            // past its lease), or ended meanwhile.
                            let held: HashSet<String> = held.into_iter().collect();
                            let lost: Vec<&String> =
                                ids.iter().filter(|id| !held.contains(*id)).collect();
                            self.fence(&lost, "its lease is another node's now");
                        }
                        Err(e) => {
                            warn!(error = %e, "renewing leases failed");
                            // The leases run out before the next renewal
                            // could extend them: stop the tasks now, so
                            // they never run beside their next holder's.
                            if renewed.elapsed() + every >= self.config.lease {
                                let all: Vec<&String> = ids.iter().collect();
                                self.fence(&all, "its lease could not be renewed in time");
                                if !self.fenced.swap(true, Ordering::SeqCst) {
                                    warn!(
                                        "leases expire unrenewed: running tasks stopped, claiming paused"
                                    );
                                }
                            }
                        }
                    }
                }
            }
            if self.config.workers > 0 && last_takeover.elapsed() >= every {
                last_takeover = Instant::now();
                match self
                    .store
                    .take_over_expired(&self.config.node, now(), self.config.lease)
                    .await
                {
                    Ok(lost) => {
                        for c in lost {
                            // Our own tasks are never taken over from ourselves
                            // while they run: we renew them.
                            if self.lock_running().contains_key(&c.record.task.id) {
                                continue;
                            }
                            let from = c.previous_node.clone().unwrap_or_else(|| "unknown".into());
                            warn!(task_id = %c.record.task.id, attempt = c.attempt, lost_node = %from, "taking over a task whose lease expired");
                            counter!(metric::TASKS_TAKEN_OVER_TOTAL.name).increment(1);
                            let error =
                                TaskError::new(ErrorType::Internal, format!("node {from} lost"));
                            self.end_attempt_without_run(c, error).await;
                        }
                    }
                    Err(e) => warn!(error = %e, "looking for expired leases failed"),
                }
            }
        }
    }
}
