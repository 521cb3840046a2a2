//! The result of a task as returned to the caller: final [`TaskStatus`],
//! output or error, captured stdout/stderr, and [`ExecutionMetadata`] with
//! per-attempt records and phase timings. Timestamps are RFC 3339 strings.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::error::TaskError;
use crate::lifecycle::TransitionRecord;
use crate::output::TaskOutput;
use crate::task::Method;

/// The state of a task. Serialized in SCREAMING_SNAKE_CASE (`"RECEIVED"`,
/// ...). See [`crate::lifecycle`] for the legal transitions.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TaskStatus {
    /// Accepted by the executor, not yet looked at.
    #[default]
    Received,
    /// Validating and preparing the environment of an attempt.
    Preparing,
    /// An attempt is running.
    Running,
    /// Finished successfully (final).
    Completed,
    /// Finished unsuccessfully (final).
    Failed,
    /// Refused before running, e.g. invalid input (final).
    Rejected,
    /// Cancelled by a caller (final).
    Cancelled,
}

impl TaskStatus {
    /// Every status, in declaration order.
    pub const ALL: [TaskStatus; 7] = [
        TaskStatus::Received,
        TaskStatus::Preparing,
        TaskStatus::Running,
        TaskStatus::Completed,
        TaskStatus::Failed,
        TaskStatus::Rejected,
        TaskStatus::Cancelled,
    ];

    /// True for `COMPLETED`, `FAILED`, `REJECTED` and `CANCELLED`: states
    /// with no outgoing transition.
    pub const fn is_final(self) -> bool {
        matches!(
            self,
            TaskStatus::Completed
                | TaskStatus::Failed
                | TaskStatus::Rejected
                | TaskStatus::Cancelled
        )
    }

    /// The wire name, e.g. `"PREPARING"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Received => "RECEIVED",
            TaskStatus::Preparing => "PREPARING",
            TaskStatus::Running => "RUNNING",
            TaskStatus::Completed => "COMPLETED",
            TaskStatus::Failed => "FAILED",
            TaskStatus::Rejected => "REJECTED",
            TaskStatus::Cancelled => "CANCELLED",
        }
    }
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no [`TaskStatus`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown task status {0:?}; expected one of RECEIVED, PREPARING, RUNNING, COMPLETED, FAILED, REJECTED, CANCELLED"
)]
pub struct UnknownTaskStatus(pub String);

impl FromStr for TaskStatus {
    type Err = UnknownTaskStatus;

    /// Parses the wire name, case-insensitively.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let n = s.trim().to_ascii_uppercase();
        TaskStatus::ALL
            .into_iter()
            .find(|t| t.as_str() == n)
            .ok_or_else(|| UnknownTaskStatus(s.to_owned()))
    }
}

/// Milliseconds rounded to the microsecond: what the clocks measure,
/// without float noise such as `0.30045700000000003` in the JSON.
fn round_ms(ms: f64) -> f64 {
    (ms * 1000.0).round() / 1000.0
}

/// Serializes milliseconds rounded to the microsecond ([`round_ms`]).
fn ms_to_micros<S: serde::Serializer>(ms: &f64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(round_ms(*ms))
}

/// [`ms_to_micros`] for each value of a map.
fn map_ms_to_micros<S: serde::Serializer>(
    map: &BTreeMap<String, f64>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(map.iter().map(|(k, v)| (k, round_ms(*v))))
}

/// Wall-clock time spent in each phase, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PhaseTimings {
    /// Waiting in the queue before preparation.
    #[serde(serialize_with = "ms_to_micros")]
    pub queue_wait_ms: f64,
    /// Preparing the environment (sandbox, files).
    #[serde(serialize_with = "ms_to_micros")]
    pub prepare_ms: f64,
    /// Compiling, for compiled runtimes.
    #[serde(serialize_with = "ms_to_micros")]
    pub compile_ms: f64,
    /// Running the code.
    #[serde(serialize_with = "ms_to_micros")]
    pub run_ms: f64,
    /// Reading and validating the output.
    #[serde(serialize_with = "ms_to_micros")]
    pub output_validation_ms: f64,
    /// Tearing the environment down.
    #[serde(serialize_with = "ms_to_micros")]
    pub cleanup_ms: f64,
    /// Fine-grained sandbox breakdown (e.g. `namespaces`, `mounts`,
    /// `cgroup`, `exec`, `capture`), in milliseconds.
    #[serde(serialize_with = "map_ms_to_micros")]
    pub sandbox: BTreeMap<String, f64>,
}

/// One attempt at running a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttemptRecord {
    /// Attempt number, starting at 1.
    pub attempt: u32,
    /// How the attempt ended (`COMPLETED`, `FAILED`, `REJECTED`, ...).
    pub status: TaskStatus,
    /// The attempt's error, if it failed.
    #[serde(default)]
    pub error: Option<TaskError>,
    /// When the attempt started.
    #[serde(with = "time::serde::rfc3339")]
    pub start_time: OffsetDateTime,
    /// When the attempt ended.
    #[serde(with = "time::serde::rfc3339")]
    pub end_time: OffsetDateTime,
    /// Wall-clock duration, in milliseconds.
    #[serde(default, serialize_with = "ms_to_micros")]
    pub duration_ms: f64,
    /// Exit code of the task process, if it exited.
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// Name of the signal that killed the process (e.g. `SIGKILL`), if any.
    #[serde(default)]
    pub signal: Option<String>,
    /// Last part of the attempt's stderr, for diagnosing retried failures.
    #[serde(default)]
    pub stderr_tail: String,
    /// Phase timings of the attempt.
    #[serde(default)]
    pub phases: PhaseTimings,
}

/// A limit an attempt reached. Serialized in lowercase (`"pids"`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitHit {
    /// A fork or thread creation was refused at the `pids` limit.
    Pids,
    /// Memory use reached the `memory` limit (reclaim made room, or the
    /// task was killed).
    Memory,
    /// The work dir and /tmp filled their `disk` size.
    Disk,
    /// Stdout, stderr or the output file reached `outputBytes`.
    Output,
    /// The task used its whole CPU time (`cpuTimeSeconds`).
    Cpu,
    /// The task ran into its wall-clock limit (`timeoutSeconds`).
    Wall,
}

impl LimitHit {
    /// Every limit, in declaration order (the order of a [`LimitsHit`]).
    pub const ALL: [LimitHit; 6] = [
        LimitHit::Pids,
        LimitHit::Memory,
        LimitHit::Disk,
        LimitHit::Output,
        LimitHit::Cpu,
        LimitHit::Wall,
    ];

    /// The wire name, e.g. `"pids"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            LimitHit::Pids => "pids",
            LimitHit::Memory => "memory",
            LimitHit::Disk => "disk",
            LimitHit::Output => "output",
            LimitHit::Cpu => "cpu",
            LimitHit::Wall => "wall",
        }
    }
}

/// A set of [`LimitHit`]s (one byte: it travels in every result).
/// Serialized as a list in the order of [`LimitHit::ALL`], each once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct LimitsHit(u8);

impl LimitsHit {
    fn bit(limit: LimitHit) -> u8 {
        1 << (limit as u8)
    }

    /// Adds `limit`.
    pub fn insert(&mut self, limit: LimitHit) {
        self.0 |= Self::bit(limit);
    }

    /// Whether `limit` is in the set.
    pub fn contains(self, limit: LimitHit) -> bool {
        self.0 & Self::bit(limit) != 0
    }

    /// Whether no limit was reached.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The limits in the set, in the order of [`LimitHit::ALL`].
    pub fn iter(self) -> impl Iterator<Item = LimitHit> {
        LimitHit::ALL.into_iter().filter(move |l| self.contains(*l))
    }
}

impl FromIterator<LimitHit> for LimitsHit {
    fn from_iter<I: IntoIterator<Item = LimitHit>>(iter: I) -> Self {
        let mut set = LimitsHit::default();
        for limit in iter {
            set.insert(limit);
        }
        set
    }
}

impl Serialize for LimitsHit {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for LimitsHit {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(Vec::<LimitHit>::deserialize(deserializer)?
            .into_iter()
            .collect())
    }
}

/// How and where a task ran.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ExecutionMetadata {
    /// When the first attempt started.
    #[serde(with = "time::serde::rfc3339::option")]
    pub start_time: Option<OffsetDateTime>,
    /// When the last attempt ended.
    #[serde(with = "time::serde::rfc3339::option")]
    pub end_time: Option<OffsetDateTime>,
    /// Total wall-clock duration, in milliseconds.
    #[serde(serialize_with = "ms_to_micros")]
    pub duration: f64,
    /// Description of the environment (e.g. `container/python-3.12`).
    pub execution_environment: String,
    /// The method actually used.
    pub method: Method,
    /// Every attempt, in order.
    pub attempts: Vec<AttemptRecord>,
    /// CPU time used by the last attempt, in milliseconds, if measured.
    pub cpu_time_ms: Option<u64>,
    /// Peak memory of the last attempt, in bytes, if measured.
    pub peak_memory_bytes: Option<u64>,
    /// The limits the last attempt reached, whether or not they ended it
    /// (a fork bomb whose main process exits 0 still reached `pids`), in
    /// the order of [`LimitHit::ALL`], each once.
    pub limits_hit: LimitsHit,
    /// Phase timings summed over all attempts.
    pub phases: PhaseTimings,
}

/// The outcome of a task.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TaskResult {
    /// The task's id.
    pub task_id: String,
    /// Final (or current) status.
    pub status: TaskStatus,
    /// The task's output (`null` unless completed), as compact JSON text.
    pub output: TaskOutput,
    /// The error, unless completed.
    pub error: Option<TaskError>,
    /// Captured stdout of the last attempt.
    pub stdout: String,
    /// Captured stderr of the last attempt.
    pub stderr: String,
    /// Whether stdout was cut at the output limit.
    pub stdout_truncated: bool,
    /// Whether stderr was cut at the output limit.
    pub stderr_truncated: bool,
    /// Exit code of the last attempt's process, if it exited.
    pub exit_code: Option<i32>,
    /// Signal that killed the last attempt's process, if any.
    pub signal: Option<String>,
    /// How and where the task ran.
    pub execution_metadata: ExecutionMetadata,
    /// The lifecycle transitions, in order.
    pub history: Vec<TransitionRecord>,
}

impl TaskResult {
    /// An empty result for `task_id` in `status`; other fields default.
    pub fn new(task_id: impl Into<String>, status: TaskStatus) -> Self {
        TaskResult {
            task_id: task_id.into(),
            status,
            ..TaskResult::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorType;
    use serde_json::json;
    use time::macros::datetime;

    #[test]
    fn status_names_and_finality() {
        for s in TaskStatus::ALL {
            assert_eq!(serde_json::to_value(s).expect("ser"), json!(s.as_str()));
            assert_eq!(s.as_str().parse::<TaskStatus>(), Ok(s));
            assert_eq!(s.to_string(), s.as_str());
        }
        let finals: Vec<_> = TaskStatus::ALL
            .into_iter()
            .filter(|s| s.is_final())
            .collect();
        assert_eq!(
            finals,
            vec![
                TaskStatus::Completed,
                TaskStatus::Failed,
                TaskStatus::Rejected,
                TaskStatus::Cancelled
            ]
        );
        assert!("done".parse::<TaskStatus>().is_err());
    }

    #[test]
    fn result_json_round_trip() {
        let t0 = datetime!(2025-01-02 03:04:05.5 UTC);
        let t1 = datetime!(2025-01-02 03:04:07 UTC);
        let mut phases = PhaseTimings {
            prepare_ms: 12.5,
            run_ms: 1500.0,
            ..PhaseTimings::default()
        };
        phases.sandbox.insert("namespaces".into(), 1.25);
        let result = TaskResult {
            task_id: "t1".into(),
            status: TaskStatus::Failed,
            output: TaskOutput::null(),
            error: Some(TaskError::new(ErrorType::Timeout, "timed out after 1s")),
            stdout: "hi\n".into(),
            stderr: String::new(),
            stdout_truncated: false,
            stderr_truncated: true,
            exit_code: None,
            signal: Some("SIGKILL".into()),
            execution_metadata: ExecutionMetadata {
                start_time: Some(t0),
                end_time: Some(t1),
                duration: 1500.0,
                execution_environment: "container/python".into(),
                method: Method::Container,
                attempts: vec![AttemptRecord {
                    attempt: 1,
                    status: TaskStatus::Failed,
                    error: Some(TaskError::new(ErrorType::Timeout, "timed out after 1s")),
                    start_time: t0,
                    end_time: t1,
                    duration_ms: 1500.0,
                    exit_code: None,
                    signal: Some("SIGKILL".into()),
                    stderr_tail: "boom".into(),
                    phases: phases.clone(),
                }],
                cpu_time_ms: Some(900),
                peak_memory_bytes: Some(10 << 20),
                limits_hit: [LimitHit::Wall, LimitHit::Pids].into_iter().collect(),
                phases,
            },
            history: vec![TransitionRecord {
                from: None,
                to: TaskStatus::Received,
                at: t0,
                attempt: 0,
                reason: "received".into(),
            }],
        };
        let v = serde_json::to_value(&result).expect("ser");
        assert_eq!(v["taskId"], json!("t1"));
        assert_eq!(v["status"], json!("FAILED"));
        assert_eq!(v["error"]["type"], json!("TIMEOUT"));
        assert_eq!(v["stderrTruncated"], json!(true));
        assert_eq!(
            v["executionMetadata"]["startTime"],
            json!("2025-01-02T03:04:05.5Z")
        );
        assert_eq!(v["executionMetadata"]["method"], json!("CONTAINER"));
        assert_eq!(v["executionMetadata"]["peakMemoryBytes"], json!(10 << 20));
        assert_eq!(v["executionMetadata"]["limitsHit"], json!(["pids", "wall"]));
        assert_eq!(
            v["executionMetadata"]["attempts"][0]["stderrTail"],
            json!("boom")
        );
        assert_eq!(
            v["executionMetadata"]["phases"]["sandbox"]["namespaces"],
            json!(1.25)
        );
        assert_eq!(v["executionMetadata"]["phases"]["queueWaitMs"], json!(0.0));
        assert_eq!(v["history"][0]["from"], json!(null));
        assert_eq!(v["history"][0]["at"], json!("2025-01-02T03:04:05.5Z"));
        let back: TaskResult = serde_json::from_value(v).expect("de");
        assert_eq!(back, result);
    }

    #[test]
    fn limits_hit_is_a_list_in_a_fixed_order_each_once() {
        let set: LimitsHit = [LimitHit::Wall, LimitHit::Pids, LimitHit::Wall]
            .into_iter()
            .collect();
        assert_eq!(
            serde_json::to_value(set).expect("ser"),
            json!(["pids", "wall"])
        );
        assert!(set.contains(LimitHit::Pids) && !set.contains(LimitHit::Memory));
        let back: LimitsHit =
            serde_json::from_value(json!(["output", "memory", "output"])).expect("de");
        assert_eq!(
            back.iter().collect::<Vec<_>>(),
            vec![LimitHit::Memory, LimitHit::Output]
        );
        assert!(serde_json::from_value::<LimitsHit>(json!(["swap"])).is_err());
        assert_eq!(
            serde_json::to_value(LimitsHit::default()).expect("ser"),
            json!([])
        );
        for l in LimitHit::ALL {
            assert_eq!(serde_json::to_value(l).expect("ser"), json!(l.as_str()));
        }
    }

    #[test]
    fn sparse_result_json_uses_defaults() {
        let r: TaskResult =
            serde_json::from_value(json!({"taskId": "x", "status": "COMPLETED", "output": 3}))
                .expect("sparse");
        assert_eq!(r.output, json!(3));
        assert_eq!(r.execution_metadata.start_time, None);
        assert_eq!(r.execution_metadata.method, Method::Auto);
        assert_eq!(
            r,
            TaskResult {
                output: json!(3).into(),
                ..TaskResult::new("x", TaskStatus::Completed)
            }
        );
    }
}

#[cfg(test)]
mod timing_json_tests {
    use super::*;

    #[test]
    fn timings_serialize_rounded_to_the_microsecond() {
        let mut phases = PhaseTimings {
            run_ms: 0.300_457_000_000_000_03,
            cleanup_ms: 1.279_878_999_999_999_8,
            ..PhaseTimings::default()
        };
        phases
            .sandbox
            .insert("mounts".into(), 0.561_886_999_999_999_9);
        let json = serde_json::to_string(&phases).expect("serialize");
        assert!(json.contains(r#""runMs":0.3"#), "{json}");
        assert!(json.contains(r#""cleanupMs":1.28,"#), "{json}");
        assert!(json.contains(r#""mounts":0.562"#), "{json}");
    }
}
