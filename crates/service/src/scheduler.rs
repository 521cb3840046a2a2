//! The scheduler: recovery at start, then the claim loop that takes what
//! this node can admit and starts a worker for each claimed task.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use taskexec_engine::Cancellation;
use taskexec_model::{ErrorType, TaskError};
use taskexec_store::{ClaimedTask, StoreError};
use tracing::{Instrument, error, warn};

use crate::{Running, Service, now};

impl Service {
    /// Recovery at start: attempts this node was running when it died are
    /// recorded as interrupted (INTERNAL, "executor restarted") and retried
    /// or failed per the task's policy. Each counts as an attempt lost with
    /// its node: a task that kills its executor on every attempt is
    /// quarantined after `quarantine_after` of them, as across nodes.
    pub(crate) async fn recover(&self) -> Result<(), StoreError> {
        let orphans = self.store.recover_claimed(&self.config.node).await?;
        for c in orphans {
            let id = c.record.task.id.clone();
            warn!(task_id = %id, attempt = c.attempt, "recovering a task interrupted by a restart");
            let error = TaskError::new(ErrorType::Internal, "executor restarted");
            self.end_attempt_without_run(c, error).await;
        }
        self.flush().await;
        Ok(())
    }

    /// The scheduler: claims what this node can admit, runs it.
    pub(crate) async fn schedule(self: Arc<Self>) {
        loop {
            if self.stopping.load(Ordering::SeqCst) {
                break;
            }
            let claiming = self.claiming.lock().await;
            let (free, slots) = self.free();
            let want = slots.min(64);
            let mut claimed = Vec::new();
            let fenced = self.fenced.load(Ordering::SeqCst);
            if !fenced && slots > 0 && free.cpu_millis > 0 && free.memory_bytes > 0 {
                match self
                    .store
                    .claim(&self.config.node, free, want, now(), self.config.lease)
                    .await
                {
                    Ok(c) => claimed = c,
                    Err(e) => {
                        error!(error = %e, "claiming tasks failed");
                        tokio::time::sleep(self.config.poll_interval).await;
                    }
                }
            }
            let got = claimed.len();
            self.start_claimed(claimed);
            drop(claiming);
            // Fewer than asked: nothing more fits now; a submission, a
            // requeue or a task's end wakes the loop (a wake during the
            // claim is kept). All slots taken: so is a task's end.
            if got < want || got >= slots {
                tokio::select! {
                    () = self.wake.notified() => {}
                    () = tokio::time::sleep(self.config.poll_interval) => {}
                }
            }
        }
        self.scheduler_alive.store(false, Ordering::SeqCst);
    }

    /// Records claimed tasks as running here and starts their attempts.
    pub(crate) fn start_claimed(self: &Arc<Self>, claimed: Vec<ClaimedTask>) {
        for c in claimed {
            let cancel = match Cancellation::new() {
                Ok(c) => c,
                Err(e) => {
                    error!(error = %e, "cannot create a cancellation handle");
                    continue;
                }
            };
            self.lock_running().insert(
                c.record.task.id.clone(),
                Running {
                    cancel: cancel.clone(),
                    cpu_millis: c.cpu_millis.into(),
                    memory_bytes: c.memory_bytes,
                    ran: false,
                },
            );
            let me = Arc::clone(self);
            let span = tracing::info_span!("task", task_id = %c.record.task.id);
            tokio::spawn(async move { me.work(c, cancel).await }.instrument(span));
        }
    }
}
