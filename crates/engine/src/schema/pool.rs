//! The validation pool: a few dedicated threads that evaluate JSON Schemas,
//! so that no validation runs on the async runtime's threads, each with a
//! time budget.
//!
//! A waiter that runs out of budget stops waiting and reports the schema as
//! too expensive; a validation still queued then is skipped. One already
//! running cannot be interrupted (the validator has no cancellation point)
//! and finishes on its thread: what bounds it is the schema's static
//! complexity limits ([`super::complexity`]), checked before any schema is
//! compiled. Meanwhile the pool has a thread fewer; with every thread busy,
//! validations wait in a bounded queue, and past it they are refused at
//! once.

use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jsonschema::Validator;
use serde_json::Value;
use tokio::sync::oneshot;

use super::{Violations, violations};

/// Settings of the validation pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    /// Threads evaluating schemas.
    pub threads: usize,
    /// Validations waiting for a thread at most; past it they are refused.
    pub queue: usize,
    /// Time a validation may take, waiting included.
    pub budget: Duration,
}

impl Default for PoolConfig {
    /// Two threads, 256 queued, 2 s.
    fn default() -> Self {
        Self {
            threads: 2,
            queue: 256,
            budget: Duration::from_secs(2),
        }
    }
}

/// Why a validation gave no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// It did not finish within the budget.
    #[error(
        "the schema is too expensive to evaluate: validation did not finish within {} ms",
        .0.as_millis()
    )]
    OverBudget(Duration),
    /// The queue was full.
    #[error("the schema validator is busy ({0} validations waiting); try again later")]
    Busy(usize),
    /// The pool's threads are gone (it failed to start).
    #[error("the schema validator is not running")]
    Stopped,
}

/// What a validation hands back: the instance, and its violations.
pub type Checked = (Value, Violations);

type Job = Box<dyn FnOnce() + Send>;

/// The pool. Its threads end when it is dropped.
#[derive(Debug)]
pub struct ValidationPool {
    tx: SyncSender<Job>,
    config: PoolConfig,
}

fn worker(rx: &Mutex<Receiver<Job>>) {
    loop {
        let job = match rx.lock() {
            Ok(rx) => rx.recv(),
            Err(p) => p.into_inner().recv(),
        };
        match job {
            Ok(job) => job(),
            Err(_) => return,
        }
    }
}

impl ValidationPool {
    /// Starts `config.threads` threads (at least one). A thread that
    /// cannot be started is logged; with none, validations fail with
    /// [`PoolError::Stopped`].
    pub fn new(config: PoolConfig) -> Self {
        let (tx, rx) = sync_channel::<Job>(config.queue.max(1));
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..config.threads.max(1) {
            let rx = Arc::clone(&rx);
            if let Err(e) = std::thread::Builder::new()
                .name(format!("schema-{i}"))
                .spawn(move || worker(&rx))
            {
                tracing::error!(error = %e, "a schema validation thread could not be started");
            }
        }
        Self { tx, config }
    }

    /// The pool's settings.
    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// Validates `instance` against `validator` on a pool thread, within the
    /// budget; the instance comes back with its violations.
    pub async fn validate(
        &self,
        validator: Arc<Validator>,
        instance: Value,
    ) -> Result<Checked, PoolError> {
        let (tx, rx) = oneshot::channel::<Checked>();
        let job: Job = Box::new(move || {
            // Skipped when its waiter gave up while it was queued.
            if tx.is_closed() {
                return;
            }
            let found = violations(&validator, &instance);
            let _ = tx.send((instance, found));
        });
        match self.tx.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(PoolError::Busy(self.config.queue)),
            Err(TrySendError::Disconnected(_)) => return Err(PoolError::Stopped),
        }
        match tokio::time::timeout(self.config.budget, rx).await {
            Ok(Ok(checked)) => Ok(checked),
            Ok(Err(_)) => Err(PoolError::Stopped),
            Err(_) => Err(PoolError::OverBudget(self.config.budget)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::SchemaCache;
    use serde_json::json;

    #[tokio::test]
    async fn validates_off_the_caller_and_hands_the_instance_back() {
        let pool = ValidationPool::new(PoolConfig::default());
        let v = SchemaCache::default()
            .compile(&json!({"type": "integer"}))
            .expect("valid");
        let (back, errs) = pool.validate(v, json!("x")).await.expect("in budget");
        assert_eq!(back, json!("x"));
        assert_eq!(errs.len(), 1);
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once() {
        let pool = ValidationPool::new(PoolConfig {
            threads: 1,
            queue: 1,
            budget: Duration::from_millis(50),
        });
        // Block the only thread, then fill the queue.
        let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
        pool.tx
            .try_send(Box::new(move || {
                let _ = hold_rx.recv();
            }))
            .expect("first job");
        std::thread::sleep(Duration::from_millis(20));
        pool.tx.try_send(Box::new(|| {})).expect("queued job");
        let v = SchemaCache::default()
            .compile(&json!({"type": "integer"}))
            .expect("valid");
        let err = pool.validate(v, json!(1)).await.expect_err("queue is full");
        assert_eq!(err, PoolError::Busy(1));
        drop(hold_tx);
    }

    #[tokio::test]
    async fn a_schema_within_the_limits_but_slow_is_cut_by_the_budget() {
        // Recursion that doubles its work at every level of the value:
        // within every static limit, exponential in the value's depth.
        let schema = json!({"anyOf": [
            {"items": {"$ref": "#"}},
            {"items": {"$ref": "#"}, "minItems": 0}
        ], "not": {"type": "string"}});
        let v = SchemaCache::default()
            .compile(&schema)
            .expect("within the limits");
        // The innermost value fails, so every branch of every level runs.
        let mut instance = json!("x");
        for _ in 0..40 {
            instance = json!([instance]);
        }
        let pool = ValidationPool::new(PoolConfig {
            threads: 1,
            queue: 4,
            budget: Duration::from_millis(200),
        });
        let err = pool.validate(v, instance).await.expect_err("over budget");
        assert_eq!(err, PoolError::OverBudget(Duration::from_millis(200)));
        assert!(err.to_string().contains("too expensive"), "{err}");
    }
}
