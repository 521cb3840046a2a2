//! A scripted attempt runner shared by the engine's tests: each call pops
//! the next step (exit, setup failure, block until cancelled, time out).

#![allow(dead_code)]

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use taskexec_engine::AttemptRunner;
use taskexec_sandbox::cgroup::CgroupStats;
use taskexec_sandbox::{
    CancelToken, ExitStatus, ReadBackResult, RunOutcome, RunRequest, SandboxError, Termination,
};

/// What one scripted attempt does.
#[derive(Debug, Clone, Copy)]
pub enum Step {
    /// Exit with this code, writing this output.
    Exit(i32, &'static str),
    /// Fail to set up the sandbox.
    SetupFails,
    /// Run until cancelled.
    BlockUntilCancelled,
    /// Hit the wall-clock limit.
    TimesOut,
    /// Run for this many milliseconds (or until cancelled), then exit 0.
    Sleep(u64),
    /// Exit 0 at once, reporting a sandbox start (setup) of this many
    /// milliseconds.
    StartTook(u64),
}

#[derive(Debug, Default)]
pub struct Scripted {
    pub steps: Mutex<VecDeque<Step>>,
    pub calls: AtomicU32,
    pub started: tokio::sync::Notify,
    pub running: AtomicU32,
    pub max_running: AtomicU32,
}

impl Scripted {
    pub fn new(steps: impl IntoIterator<Item = Step>) -> Arc<Self> {
        Arc::new(Self {
            steps: Mutex::new(steps.into_iter().collect()),
            ..Self::default()
        })
    }
}

pub fn outcome(termination: Termination, output: &str) -> RunOutcome {
    RunOutcome {
        termination,
        stdout: Vec::new(),
        stdout_truncated: false,
        stderr: b"some stderr".to_vec(),
        stderr_truncated: false,
        read_back: vec![
            if output.is_empty() {
                ReadBackResult::Missing
            } else {
                ReadBackResult::Read {
                    data: output.as_bytes().to_vec(),
                    truncated: false,
                }
            },
            ReadBackResult::Missing,
        ],
        collected: Vec::new(),
        collect_error: None,
        disk_full: false,
        stats: CgroupStats::default(),
        wall_time: Duration::from_millis(1),
        run_time: Duration::from_millis(1),
        setup_time: Duration::from_millis(1),
        phases: vec![("namespaces", Duration::from_micros(500))],
    }
}

impl AttemptRunner for Scripted {
    fn run(&self, _req: &RunRequest, cancel: &CancelToken) -> Result<RunOutcome, SandboxError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.started.notify_one();
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(now, Ordering::SeqCst);
        let result = self.step(cancel);
        self.running.fetch_sub(1, Ordering::SeqCst);
        result
    }

    fn describe(&self) -> String {
        "scripted".into()
    }
}

impl Scripted {
    fn step(&self, cancel: &CancelToken) -> Result<RunOutcome, SandboxError> {
        let step = self
            .steps
            .lock()
            .expect("lock")
            .pop_front()
            .unwrap_or(Step::Exit(0, "null"));
        match step {
            Step::Exit(code, out) => Ok(outcome(Termination::Exited(ExitStatus::Code(code)), out)),
            Step::SetupFails => Err(SandboxError::Setup {
                stage: "mounts".into(),
                message: "simulated".into(),
            }),
            Step::TimesOut => Ok(outcome(Termination::TimedOut, "")),
            Step::StartTook(ms) => Ok(RunOutcome {
                setup_time: Duration::from_millis(ms),
                ..outcome(Termination::Exited(ExitStatus::Code(0)), "null")
            }),
            Step::BlockUntilCancelled => {
                // Bounded, so that a test failing before it cancels ends
                // (and says why) instead of waiting here forever when its
                // runtime shuts down.
                let give_up = std::time::Instant::now() + Duration::from_secs(60);
                while !cancel.is_cancelled() && std::time::Instant::now() < give_up {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Ok(outcome(Termination::Cancelled, ""))
            }
            Step::Sleep(ms) => {
                let end = std::time::Instant::now() + Duration::from_millis(ms);
                while std::time::Instant::now() < end {
                    if cancel.is_cancelled() {
                        return Ok(outcome(Termination::Cancelled, ""));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                Ok(outcome(Termination::Exited(ExitStatus::Code(0)), "null"))
            }
        }
    }
}
