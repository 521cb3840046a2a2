//! Lifecycle events and the waits for final results: a task that ends on
//! this node wakes its waiters once its result is committed; one running on
//! another node is polled for.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use taskexec_model::{TaskStatus, TransitionRecord};
use taskexec_store::{StoreError, TaskRecord};
use tokio::sync::{broadcast, watch};

use crate::{Service, lock};

/// A lifecycle event, broadcast to SSE streams and waiters.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskEvent {
    /// The task.
    pub id: String,
    /// Its status after the transition.
    pub status: TaskStatus,
    /// The transition.
    pub record: TransitionRecord,
    /// The status is final (and the result is stored).
    pub is_final: bool,
}

/// The waiters for final results on this node, by task id: the writer of
/// a final result wakes them once it is committed (and a notification
/// that the task changed on another node wakes them to re-read it),
/// without a store read or a broadcast to every other waiter.
/// Each entry is numbered, so that a watch only ever removes its own.
#[derive(Debug, Default)]
pub(crate) struct FinalWaiters(Mutex<(u64, HashMap<String, Waiting>)>);

/// The number of an entry of [`FinalWaiters`] and the channel of its wake.
pub(crate) type Waiting = (u64, watch::Sender<bool>);

impl FinalWaiters {
    pub(crate) fn watch(self: &Arc<Self>, id: &str) -> FinalWatch {
        let mut guard = lock(&self.0);
        let (next, map) = &mut *guard;
        let (generation, tx) = map.entry(id.to_string()).or_insert_with(|| {
            *next += 1;
            (*next, watch::channel(false).0)
        });
        FinalWatch {
            waiters: Arc::clone(self),
            id: id.to_string(),
            generation: *generation,
            rx: tx.subscribe(),
        }
    }

    pub(crate) fn wake(&self, id: &str) {
        if let Some((_, tx)) = lock(&self.0).1.remove(id) {
            tx.send_replace(true);
        }
    }
}

/// A registered wait for the final result of one task
/// ([`Service::watch_final`]); registering before the task is submitted
/// means its end cannot be missed.
#[derive(Debug)]
pub struct FinalWatch {
    waiters: Arc<FinalWaiters>,
    id: String,
    generation: u64,
    rx: watch::Receiver<bool>,
}

impl FinalWatch {
    /// The task watched.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Returns once this watch is woken (the task ended here, or changed on
    /// another node). A wake is used once: watch anew to wait again.
    pub async fn woken(&mut self) {
        if self.rx.wait_for(|done| *done).await.is_err() {
            // Closed without a wake (cannot happen): never.
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for FinalWatch {
    fn drop(&mut self) {
        let map = &mut lock(&self.waiters.0).1;
        // Ours is still counted: drop the entry if no one else waits.
        if map
            .get(&self.id)
            .is_some_and(|(g, tx)| *g == self.generation && tx.receiver_count() <= 1)
        {
            map.remove(&self.id);
        }
    }
}

impl Service {
    /// How often a follower re-reads a task that sent no wake
    /// ([`crate::ServiceConfig::follow_fallback`]).
    pub fn follow_fallback(&self) -> Duration {
        self.config.follow_fallback
    }

    /// Lifecycle events of every task, from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<TaskEvent> {
        self.events.subscribe()
    }

    /// Registers a wait for the final result of task `id`, to pass to
    /// [`Self::wait_watched`]: registered before the task is submitted, it
    /// cannot miss the task's end.
    pub fn watch_final(&self, id: &str) -> FinalWatch {
        self.finals.watch(id)
    }

    /// Waits until task `id` is final or `timeout` passes; the record then
    /// (None if there is no such task).
    pub async fn wait_final(
        &self,
        id: &str,
        timeout: Duration,
    ) -> Result<Option<TaskRecord>, StoreError> {
        self.wait_watched(self.watch_final(id), timeout, false)
            .await
    }

    /// Waits until the task of `watch` is final or `timeout` passes; the
    /// record then (None if there is no such task). `fresh`: the task was
    /// just submitted (and created) by the caller after the watch was
    /// registered, so the store is not read before something happens.
    ///
    /// A task that ends on this node wakes the wait when its result is
    /// committed; one running on another node (several nodes on one
    /// PostgreSQL database) wakes it through the database's notification
    /// of its change ([`Service::task_changed`]). The store is also read every
    /// [`Self::follow_fallback`], for a notification lost while the listener
    /// reconnects.
    pub async fn wait_watched(
        &self,
        mut watch: FinalWatch,
        timeout: Duration,
        fresh: bool,
    ) -> Result<Option<TaskRecord>, StoreError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut read = !fresh;
        loop {
            if read {
                // A wake is used once (its entry is gone): watch anew
                // before reading, so that nothing is missed in between.
                if *watch.rx.borrow() || watch.rx.has_changed().is_err() {
                    let id = watch.id.clone();
                    watch = self.finals.watch(&id);
                }
                // The progress while not final (cheap whatever the task's
                // size), the whole record once.
                let Some(progress) = self.store.progress(&watch.id).await? else {
                    return Ok(None);
                };
                if progress.status.is_final() {
                    return self.store.get(&watch.id).await;
                }
            }
            read = true;
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return self.store.get(&watch.id).await;
            }
            let step = (now + self.follow_fallback()).min(deadline);
            // Woken, or the poll is due: re-read. (A channel closed without
            // a wake cannot happen, but would wait for the poll.)
            if tokio::time::timeout_at(step, watch.rx.wait_for(|done| *done))
                .await
                .is_ok_and(|r| r.is_err())
            {
                tokio::time::sleep_until(step).await;
            }
        }
    }
}
