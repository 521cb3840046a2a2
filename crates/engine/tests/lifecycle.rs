//! The lifecycle pipeline against a scripted runner and a manual clock:
//! retries, backoff bounds, exhaustion, non-retryable errors, cancellation
//! while running, during backoff, and racing completion.

#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Scripted, Step};

use serde_json::json;
use taskexec_engine::{Cancellation, Engine, EngineConfig, ManualClock};
use taskexec_model::{ErrorType, RetryLimits, TaskInstance, TaskResult, TaskStatus};
use taskexec_runtimes::Catalogue;

fn engine(runner: Arc<Scripted>, clock: Arc<ManualClock>) -> Engine {
    Engine::new(EngineConfig::default(), Catalogue::builtin(), runner, clock)
}

fn task(retry: serde_json::Value) -> TaskInstance {
    serde_json::from_value(json!({
        "id": "t-1",
        "definition": {"name": "t", "code": "print(1)"},
        "executionConfig": {"runtime": "python"},
        "retryPolicy": retry,
    }))
    .expect("valid task")
}

fn policy(retryable: &[&str]) -> serde_json::Value {
    json!({"maxRetries": 2, "retryInterval": 100, "backoffMultiplier": 2.0, "maxInterval": 1000,
           "jitter": "FULL", "retryableErrors": retryable})
}

fn states(r: &TaskResult) -> Vec<(TaskStatus, u32)> {
    r.history.iter().map(|h| (h.to, h.attempt)).collect()
}

/// Exactly one final state, and it is the last record.
fn assert_one_final_state(r: &TaskResult) {
    let finals: Vec<_> = r.history.iter().filter(|h| h.to.is_final()).collect();
    assert_eq!(finals.len(), 1, "{:?}", states(r));
    assert_eq!(finals[0].to, r.status);
    assert_eq!(r.history.last().map(|h| h.to), Some(r.status));
}

#[tokio::test]
async fn two_setup_failures_then_success_completes_on_attempt_three() {
    let runner = Scripted::new([
        Step::SetupFails,
        Step::SetupFails,
        Step::Exit(0, r#"{"ok":true}"#),
    ]);
    let clock = Arc::new(ManualClock::new(0.5));
    let e = engine(Arc::clone(&runner), Arc::clone(&clock));
    let r = e
        .execute(task(policy(&[])), &Cancellation::new().expect("cancel"))
        .await;
    assert_eq!(r.status, TaskStatus::Completed, "{:?}", r.error);
    assert_eq!(r.output, json!({"ok": true}));
    assert_eq!(r.execution_metadata.attempts.len(), 3);
    assert_eq!(runner.calls.load(Ordering::SeqCst), 3);
    let errors: Vec<_> = r
        .execution_metadata
        .attempts
        .iter()
        .map(|a| a.error.as_ref().map(|e| e.error_type))
        .collect();
    assert_eq!(
        errors,
        vec![
            Some(ErrorType::EnvironmentSetup),
            Some(ErrorType::EnvironmentSetup),
            None
        ]
    );
    use TaskStatus::*;
    assert_eq!(
        states(&r),
        vec![
            (Received, 0),
            (Preparing, 1),
            (Running, 1),
            (Preparing, 2),
            (Running, 2),
            (Preparing, 3),
            (Running, 3),
            (Completed, 3)
        ]
    );
    assert!(r.history.iter().all(|h| !h.reason.is_empty()));
    // Full jitter with r = 0.5: half of min(1000, 100 * 2^n).
    assert_eq!(
        clock.sleeps(),
        vec![Duration::from_millis(50), Duration::from_millis(100)]
    );
    assert_one_final_state(&r);
}

#[tokio::test]
async fn backoff_delays_stay_within_their_bounds() {
    for r in [0.0, 0.3, 0.999] {
        let runner = Scripted::new([Step::SetupFails; 5]);
        let clock = Arc::new(ManualClock::new(r));
        let e = engine(runner, Arc::clone(&clock));
        let t = task(
            json!({"maxRetries": 4, "retryInterval": 100, "backoffMultiplier": 3.0, "maxInterval": 1000}),
        );
        let result = e.execute(t, &Cancellation::new().expect("cancel")).await;
        assert_eq!(result.status, TaskStatus::Failed);
        let sleeps = clock.sleeps();
        assert_eq!(sleeps.len(), 4);
        for (n, d) in sleeps.iter().enumerate() {
            let base = Duration::from_millis((100.0 * 3f64.powi(n as i32)).min(1000.0) as u64);
            assert!(*d <= base, "retry {n}: {d:?} > {base:?}");
        }
    }
}

#[tokio::test]
async fn exhausted_retries_fail_with_max_retries_exceeded_and_every_attempt() {
    let runner = Scripted::new([Step::SetupFails; 3]);
    let e = engine(runner, Arc::new(ManualClock::new(0.5)));
    let r = e
        .execute(task(policy(&[])), &Cancellation::new().expect("cancel"))
        .await;
    assert_eq!(r.status, TaskStatus::Failed);
    let err = r.error.expect("error");
    assert_eq!(err.error_type, ErrorType::MaxRetriesExceeded);
    let details = err.details.expect("details");
    assert_eq!(details["lastError"]["type"], "ENVIRONMENT_SETUP");
    assert_eq!(details["attemptErrors"].as_array().map(Vec::len), Some(3));
    assert_eq!(r.execution_metadata.attempts.len(), 3);
}

#[tokio::test]
async fn a_runtime_error_not_listed_is_not_retried() {
    let runner = Scripted::new([Step::Exit(3, ""), Step::Exit(0, "1")]);
    let clock = Arc::new(ManualClock::new(0.5));
    let e = engine(Arc::clone(&runner), Arc::clone(&clock));
    let r = e
        .execute(
            task(policy(&["TIMEOUT"])),
            &Cancellation::new().expect("cancel"),
        )
        .await;
    assert_eq!(r.status, TaskStatus::Failed);
    let err = r.error.expect("error");
    assert_eq!(err.error_type, ErrorType::RuntimeError);
    assert_eq!(err.details.expect("details")["exitCode"], 3);
    assert_eq!(runner.calls.load(Ordering::SeqCst), 1);
    assert!(clock.sleeps().is_empty());
}

#[tokio::test]
async fn a_timeout_is_retried_only_when_the_policy_lists_it() {
    let runner = Scripted::new([Step::TimesOut, Step::Exit(0, "2")]);
    let e = engine(Arc::clone(&runner), Arc::new(ManualClock::new(0.5)));
    let r = e
        .execute(
            task(policy(&["TIMEOUT"])),
            &Cancellation::new().expect("cancel"),
        )
        .await;
    assert_eq!(
        (r.status, r.output.clone()),
        (TaskStatus::Completed, json!(2).into())
    );

    let runner = Scripted::new([Step::TimesOut, Step::Exit(0, "2")]);
    let e = engine(Arc::clone(&runner), Arc::new(ManualClock::new(0.5)));
    let r = e
        .execute(task(policy(&[])), &Cancellation::new().expect("cancel"))
        .await;
    assert_eq!(r.status, TaskStatus::Failed);
    assert_eq!(r.error.expect("error").error_type, ErrorType::Timeout);
}

#[tokio::test]
async fn input_validation_rejects_before_anything_runs() {
    let runner = Scripted::new([]);
    let e = engine(Arc::clone(&runner), Arc::new(ManualClock::new(0.5)));
    let mut t = task(policy(&["INPUT_VALIDATION"]));
    t.definition.input_schema = Some(
        json!({"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}}),
    );
    t.input = json!({"n": "x"});
    let r = e.execute(t, &Cancellation::new().expect("cancel")).await;
    assert_eq!(r.status, TaskStatus::Rejected);
    let err = r.error.clone().expect("error");
    assert_eq!(err.error_type, ErrorType::InputValidation);
    assert_eq!(err.details.expect("details")["violations"][0]["path"], "/n");
    assert_eq!(runner.calls.load(Ordering::SeqCst), 0);
    use TaskStatus::*;
    assert_eq!(
        states(&r),
        vec![(Received, 0), (Preparing, 1), (Rejected, 1)]
    );
}

#[tokio::test]
async fn absurd_retry_policies_are_rejected_naming_the_field() {
    let e = engine(Scripted::new([]), Arc::new(ManualClock::new(0.5)));
    for (policy, field) in [
        (
            json!({"maxRetries": 1_000_000_000, "retryInterval": 10, "backoffMultiplier": 2.0}),
            "retryPolicy.maxRetries",
        ),
        (
            json!({"maxRetries": 1, "retryInterval": 10, "backoffMultiplier": 0.0}),
            "retryPolicy.backoffMultiplier",
        ),
        (
            json!({"maxRetries": 1, "retryInterval": 10, "backoffMultiplier": 0.5}),
            "retryPolicy.backoffMultiplier",
        ),
        (
            json!({"maxRetries": 1, "retryInterval": -1, "backoffMultiplier": 2.0}),
            "retryPolicy.retryInterval",
        ),
    ] {
        let r = e
            .execute(task(policy), &Cancellation::new().expect("cancel"))
            .await;
        assert_eq!(r.status, TaskStatus::Rejected);
        let err = r.error.expect("error");
        assert_eq!(
            err.details.expect("details")["field"],
            field,
            "{}",
            err.message
        );
    }
    let max = RetryLimits::default().max_retries;
    assert!(max < 1_000_000_000, "the documented maximum is {max}");
}

#[tokio::test]
async fn cancel_while_running_kills_and_records_cancelled() {
    let runner = Scripted::new([Step::BlockUntilCancelled]);
    let e = Arc::new(engine(Arc::clone(&runner), Arc::new(ManualClock::new(0.5))));
    let cancel = Cancellation::new().expect("cancel");
    let handle = {
        let (e, c) = (Arc::clone(&e), cancel.clone());
        tokio::spawn(async move { e.execute(task(policy(&["RUNTIME_ERROR"])), &c).await })
    };
    runner.started.notified().await;
    cancel.cancel();
    let r = handle.await.expect("join");
    assert_eq!(r.status, TaskStatus::Cancelled);
    assert_eq!(
        r.error.as_ref().expect("error").error_type,
        ErrorType::Cancelled
    );
    assert_eq!(
        runner.calls.load(Ordering::SeqCst),
        1,
        "a cancelled task is not retried"
    );
    assert_one_final_state(&r);
}

#[tokio::test]
async fn cancel_during_the_backoff_wait_stops_retrying() {
    let runner = Scripted::new([Step::SetupFails, Step::Exit(0, "1")]);
    let clock = Arc::new(ManualClock::holding());
    let e = Arc::new(engine(Arc::clone(&runner), Arc::clone(&clock)));
    let cancel = Cancellation::new().expect("cancel");
    let handle = {
        let (e, c) = (Arc::clone(&e), cancel.clone());
        tokio::spawn(async move { e.execute(task(policy(&[])), &c).await })
    };
    while clock.sleeps().is_empty() {
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    cancel.cancel();
    let r = handle.await.expect("join");
    assert_eq!(r.status, TaskStatus::Cancelled);
    assert_eq!(runner.calls.load(Ordering::SeqCst), 1);
    let last = r.history.last().expect("history");
    assert!(last.reason.contains("backoff"), "{}", last.reason);
    assert_one_final_state(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_racing_completion_yields_exactly_one_final_state() {
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..60u64 {
        let runner = Scripted::new([Step::Exit(0, "1")]);
        let e = Arc::new(engine(runner, Arc::new(ManualClock::new(0.5))));
        let cancel = Cancellation::new().expect("cancel");
        let handle = {
            let (e, c) = (Arc::clone(&e), cancel.clone());
            tokio::spawn(async move { e.execute(task(policy(&[])), &c).await })
        };
        // Spread the cancel over the run: sometimes before, sometimes after.
        for _ in 0..(i % 6) {
            tokio::task::yield_now().await;
        }
        cancel.cancel();
        let r = handle.await.expect("join");
        assert!(
            matches!(r.status, TaskStatus::Completed | TaskStatus::Cancelled),
            "{:?}",
            r.status
        );
        assert_one_final_state(&r);
        seen.insert(r.status.as_str());
    }
    assert!(!seen.is_empty());
}

/// `[0,0,0,…]` of `n` values, as text that lives as long as the test.
fn zeros(n: usize) -> &'static str {
    let mut text = String::from("[");
    text.push_str(&"0, ".repeat(n - 1));
    text.push_str("0]");
    Box::leak(text.into_boxed_str())
}

fn with_limits(mut t: TaskInstance, extra: serde_json::Value) -> TaskInstance {
    let mut v = serde_json::to_value(&t).expect("ser");
    for (k, val) in extra.as_object().expect("object") {
        v["executionConfig"]["resourceRequirements"][k] = val.clone();
    }
    t = serde_json::from_value(v).expect("valid task");
    t
}

/// A huge array of small values checked against a schema is refused by
/// its count, before a tree of it is built: with a tree the schema
/// (`maxItems`) would have failed it as OUTPUT_VALIDATION instead.
#[tokio::test]
async fn a_huge_array_of_small_values_is_refused_before_a_tree_is_built() {
    let n = 200_000; // 1Mi of outputBytes allows 65,536 values in a tree
    let runner = Scripted::new([Step::Exit(0, zeros(n))]);
    let e = engine(Arc::clone(&runner), Arc::new(ManualClock::new(0.5)));
    let mut t = task(json!({"maxRetries": 0}));
    t.definition.output_schema = Some(json!({"type": "array", "maxItems": 1}));
    let r = e.execute(t, &Cancellation::new().expect("cancel")).await;
    assert_eq!(r.status, TaskStatus::Failed);
    let err = r.error.expect("error");
    assert_eq!(err.error_type, ErrorType::ResourceExhaustion, "{err:?}");
    let d = err.details.expect("details");
    assert_eq!(d["resource"], "output");
    assert_eq!(d["values"], n as u64 + 1);
    assert_eq!(d["limit"], 65_536);
    assert!(err.message.contains("outputBytes"), "{}", err.message);
    assert!(r.output.is_null());
}

/// Without a schema the same output needs no tree: it completes, kept as
/// compact text.
#[tokio::test]
async fn a_huge_array_without_a_schema_completes_as_compact_text() {
    let n = 200_000;
    let runner = Scripted::new([Step::Exit(0, zeros(n))]);
    let e = engine(Arc::clone(&runner), Arc::new(ManualClock::new(0.5)));
    let r = e
        .execute(task(json!({})), &Cancellation::new().expect("cancel"))
        .await;
    assert_eq!(r.status, TaskStatus::Completed, "{:?}", r.error);
    assert_eq!(r.output.len(), 2 * n + 1);
    assert!(r.output.get().starts_with("[0,0,0,"));
    let stored = serde_json::to_string(&r).expect("ser");
    assert!(stored.len() < 2 * n + 4096, "{}", stored.len());
}

/// An output over the engine's result cap fails the attempt, naming the
/// cap, instead of being kept.
#[tokio::test]
async fn an_output_over_max_result_bytes_fails_naming_the_cap() {
    let runner = Scripted::new([Step::Exit(0, zeros(1000))]);
    let e = Engine::new(
        EngineConfig {
            max_result_bytes: 1024,
            ..EngineConfig::default()
        },
        Catalogue::builtin(),
        runner,
        Arc::new(ManualClock::new(0.5)),
    );
    let r = e
        .execute(
            task(json!({"maxRetries": 0})),
            &Cancellation::new().expect("cancel"),
        )
        .await;
    assert_eq!(r.status, TaskStatus::Failed);
    let err = r.error.expect("error");
    assert_eq!(err.error_type, ErrorType::ResourceExhaustion);
    assert!(
        err.message.contains("--max-result-bytes"),
        "{}",
        err.message
    );
    assert!(err.message.contains("1Ki"), "{}", err.message);
    let d = err.details.expect("details");
    assert_eq!(d["resource"], "output");
    assert_eq!(d["limit"], 1024);
    assert_eq!(d["bytes"], 2001);
    assert!(r.output.is_null());
    // Within the cap, the same output completes.
    let runner = Scripted::new([Step::Exit(0, zeros(1000))]);
    let e = Engine::new(
        EngineConfig {
            max_result_bytes: 2001,
            ..EngineConfig::default()
        },
        Catalogue::builtin(),
        runner,
        Arc::new(ManualClock::new(0.5)),
    );
    let r = e
        .execute(
            with_limits(task(json!({})), json!({"outputBytes": "4Ki"})),
            &Cancellation::new().expect("cancel"),
        )
        .await;
    assert_eq!(r.status, TaskStatus::Completed, "{:?}", r.error);
}
