//! Turns what the sandbox observed into the task's verdict: the seed's error
//! types, decided from facts (exit status, cgroup counters, files read back),
//! in a fixed order of precedence.

use serde_json::{Value, json};
use taskexec_model::{
    ErrorType, LimitHit, Limits, LimitsHit, TaskError, TaskOutput, compact, format_bytes,
};
use taskexec_sandbox::{ExitStatus, ReadBackResult, RunOutcome, Termination, signal_name};

/// Bytes of stderr kept in error details and attempt records.
pub const STDERR_TAIL: usize = 4096;

/// The verdict on one attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// The task ran and produced `output` (still to be schema-checked).
    Completed {
        /// The output as compact JSON text (null when the task wrote none).
        output: TaskOutput,
    },
    /// The attempt failed.
    Failed(TaskError),
}

/// The last `max` bytes of `bytes` as text, cut at a character boundary.
pub fn tail(bytes: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    if text.len() <= max {
        return text.into_owned();
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_string()
}

fn exhausted(resource: &str, message: String, limit: Value) -> TaskError {
    TaskError::new(ErrorType::ResourceExhaustion, message)
        .with_details(json!({"resource": resource, "limit": limit}))
}

/// RESOURCE_EXHAUSTION of `outputBytes` by `what` (a stream or the output
/// file), named in the details under `key`.
fn output_error(what: &str, key: &str, name: &str, limits: &Limits) -> TaskError {
    TaskError::new(
        ErrorType::ResourceExhaustion,
        format!(
            "{what} reached its {} cap (limits.outputBytes)",
            format_bytes(limits.output_bytes)
        ),
    )
    .with_details(json!({"resource": "output", "limit": limits.output_bytes, key: name}))
}

/// The largest handler error report parsed into `details.exception`: a
/// report is a type, a message and a stack; a larger one is not parsed
/// (its tree could cost many times its size) and the error says so.
pub const MAX_ERROR_REPORT_BYTES: usize = 64 * 1024;

/// The output file's bytes as an output: validated as one JSON document
/// without building a tree of it (`IgnoredAny` skips values, nesting
/// bounded as for any parse), then kept as compact text. CPU work
/// proportional to the size: call it off the async executor's threads.
pub fn parse_output(data: &[u8]) -> Result<TaskOutput, serde_json::Error> {
    if data.iter().all(u8::is_ascii_whitespace) {
        return Ok(TaskOutput::null());
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(data)?;
    let text = String::from_utf8(compact(data)).map_err(|_| {
        <serde_json::Error as serde::de::Error>::custom("the output is not valid UTF-8")
    })?;
    TaskOutput::from_json(text)
}

/// Captured bytes as text: moved as they are when they are UTF-8 (no copy:
/// they can be as large as the task's `outputBytes`), invalid sequences
/// replaced otherwise.
pub fn into_text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// Classifies one run. `read_back[0]` is the output file, `read_back[1]`
/// the handler's error report. Parses the output (see [`parse_output`]):
/// call it off the async executor's threads.
pub fn classify(outcome: &RunOutcome, limits: &Limits) -> Verdict {
    let status = match outcome.termination {
        Termination::Cancelled => {
            return Verdict::Failed(TaskError::new(
                ErrorType::Cancelled,
                "the task was cancelled",
            ));
        }
        Termination::TimedOut => {
            return Verdict::Failed(
                TaskError::new(
                    ErrorType::Timeout,
                    format!(
                        "the task exceeded its wall-clock limit of {:?}",
                        limits.timeout
                    ),
                )
                .with_details(
                    json!({"limit": "timeoutSeconds", "seconds": limits.timeout.as_secs_f64()}),
                ),
            );
        }
        Termination::CpuTimeExceeded => return Verdict::Failed(cpu_time_error(limits)),
        Termination::OutputCapped(stream) => {
            return Verdict::Failed(output_error(
                stream.as_str(),
                "stream",
                stream.as_str(),
                limits,
            ));
        }
        Termination::Exited(status) => status,
    };
    let stats = &outcome.stats;
    let failed = status != ExitStatus::Code(0);
    if failed {
        if stats.oom_kills > 0 {
            return Verdict::Failed(exhausted(
                "memory",
                format!(
                    "the task ran out of memory: killed at its limit of {} (work dir files count too)",
                    format_bytes(limits.memory_bytes)
                ),
                json!(limits.memory_bytes),
            ));
        }
        // RLIMIT_CPU is only set with a CPU-time limit: without one, a
        // SIGXCPU was sent by the task itself and is no limit of ours.
        if status == ExitStatus::Signal(SIGXCPU) && limits.cpu_time.is_some() {
            return Verdict::Failed(cpu_time_error(limits));
        }
        if stats.pids_max_hits > 0 {
            return Verdict::Failed(exhausted(
                "pids",
                format!(
                    "the task hit its limit of {} processes and threads",
                    limits.pids
                ),
                json!(limits.pids),
            ));
        }
        if outcome.disk_full || status == ExitStatus::Signal(SIGXFSZ) {
            return Verdict::Failed(exhausted(
                "disk",
                format!(
                    "the task filled its work dir and /tmp (limit {})",
                    format_bytes(limits.disk_bytes)
                ),
                json!(limits.disk_bytes),
            ));
        }
        return Verdict::Failed(runtime_error(outcome, status));
    }
    match outcome.read_back.first() {
        None | Some(ReadBackResult::Missing) => Verdict::Completed {
            output: TaskOutput::null(),
        },
        Some(ReadBackResult::Refused { reason }) => Verdict::Failed(
            TaskError::new(
                ErrorType::OutputValidation,
                format!("the output file was not read: {reason}"),
            )
            .with_details(json!({"file": "$TASK_OUTPUT"})),
        ),
        Some(ReadBackResult::Read {
            truncated: true, ..
        }) => Verdict::Failed(output_error(
            "the output file",
            "file",
            "$TASK_OUTPUT",
            limits,
        )),
        Some(ReadBackResult::Read {
            data,
            truncated: false,
        }) => match parse_output(data) {
                Ok(output) => Verdict::Completed { output },
                Err(e) => Verdict::Failed(
                    TaskError::new(
                        ErrorType::OutputValidation,
                        format!("the output file is not valid JSON: {e}"),
                    )
                    .with_details(json!({"file": "$TASK_OUTPUT", "head": tail(&data[..data.len().min(256)], 256)})),
                ),
            },
    }
}

/// The limits one run reached, whether or not they ended it: from the
/// cgroup's event counters (a refused fork, memory use at the limit), the
/// sandbox's own observations (a full work dir, a stream or the output file
/// cut at its cap) and what the executor enforced (wall clock, CPU time).
pub fn limits_hit(outcome: &RunOutcome, limits: &Limits) -> LimitsHit {
    let stats = &outcome.stats;
    let signal = match outcome.termination {
        Termination::Exited(ExitStatus::Signal(s)) => Some(s),
        _ => None,
    };
    let output_cut = outcome.stdout_truncated
        || outcome.stderr_truncated
        || outcome.read_back.iter().any(|r| {
            matches!(
                r,
                ReadBackResult::Read {
                    truncated: true,
                    ..
                }
            )
        });
    [
        (LimitHit::Pids, stats.pids_max_hits > 0),
        (
            LimitHit::Memory,
            stats.memory_max_hits > 0 || stats.oom_kills > 0,
        ),
        (LimitHit::Disk, outcome.disk_full || signal == Some(SIGXFSZ)),
        (
            LimitHit::Output,
            output_cut || matches!(outcome.termination, Termination::OutputCapped(_)),
        ),
        (
            LimitHit::Cpu,
            outcome.termination == Termination::CpuTimeExceeded
                || (signal == Some(SIGXCPU) && limits.cpu_time.is_some()),
        ),
        (LimitHit::Wall, outcome.termination == Termination::TimedOut),
    ]
    .into_iter()
    .filter_map(|(limit, hit)| hit.then_some(limit))
    .collect()
}

fn cpu_time_error(limits: &Limits) -> TaskError {
    let secs = limits.cpu_time.map(|d| d.as_secs_f64());
    TaskError::new(
        ErrorType::Timeout,
        format!(
            "the task exceeded its CPU-time limit of {:.3} s",
            secs.unwrap_or_default()
        ),
    )
    .with_details(json!({"limit": "cpuTimeSeconds", "seconds": secs}))
}

/// SIGXCPU (RLIMIT_CPU reached); the same number on x86_64 and aarch64.
const SIGXCPU: i32 = 24;
/// SIGXFSZ (RLIMIT_FSIZE reached); the same number on x86_64 and aarch64.
const SIGXFSZ: i32 = 25;

/// A non-zero exit or a signal: RUNTIME_ERROR with the exit code or signal,
/// the handler's own error report (type, message, stack) when there is one,
/// and the tail of stderr.
fn runtime_error(outcome: &RunOutcome, status: ExitStatus) -> TaskError {
    let mut report_omitted = false;
    let report: Option<Value> = match outcome.read_back.get(1) {
        Some(ReadBackResult::Read { data, .. }) if data.len() > MAX_ERROR_REPORT_BYTES => {
            report_omitted = true;
            None
        }
        Some(ReadBackResult::Read { data, .. }) => serde_json::from_slice(data).ok(),
        _ => None,
    };
    let (code, signal) = match status {
        ExitStatus::Code(c) => (Some(c), None),
        ExitStatus::Signal(s) => (None, Some(signal_name(s))),
    };
    let message = match (&report, code, &signal) {
        (Some(r), _, _) => {
            let kind = r.get("type").and_then(Value::as_str).unwrap_or("Error");
            let msg = r.get("message").and_then(Value::as_str).unwrap_or("");
            format!("{kind}: {msg}")
        }
        (None, Some(c), _) => format!("the task exited with code {c}"),
        (None, None, Some(s)) => format!("the task was killed by {s}"),
        (None, None, None) => "the task failed".to_string(),
    };
    let mut details = json!({
        "exitCode": code,
        "signal": signal,
        "stderrTail": tail(&outcome.stderr, STDERR_TAIL),
    });
    if report_omitted {
        details["exceptionOmitted"] = json!(format!(
            "the handler's error report is larger than {} and was not read",
            format_bytes(MAX_ERROR_REPORT_BYTES as u64)
        ));
    }
    if let Some(r) = report {
        details["exception"] = r.clone();
        if let Some(stack) = r.get("stack") {
            details["stackTrace"] = stack.clone();
        }
    }
    TaskError::new(ErrorType::RuntimeError, message).with_details(details)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use taskexec_sandbox::OutputStream;
    use taskexec_sandbox::cgroup::CgroupStats;

    fn limits() -> Limits {
        taskexec_model::LimitsConfig::default().defaults
    }

    fn outcome(termination: Termination) -> RunOutcome {
        RunOutcome {
            termination,
            stdout: Vec::new(),
            stdout_truncated: false,
            stderr: b"Traceback...\nValueError: bad".to_vec(),
            stderr_truncated: false,
            read_back: vec![ReadBackResult::Missing, ReadBackResult::Missing],
            collected: Vec::new(),
            collect_error: None,
            disk_full: false,
            stats: CgroupStats::default(),
            wall_time: Duration::ZERO,
            run_time: Duration::ZERO,
            setup_time: Duration::ZERO,
            phases: Vec::new(),
        }
    }

    fn error_type(v: Verdict) -> ErrorType {
        match v {
            Verdict::Failed(e) => e.error_type,
            Verdict::Completed { output } => panic!("completed with {output}"),
        }
    }

    #[test]
    fn exit_zero_with_json_output_completes() {
        let mut o = outcome(Termination::Exited(ExitStatus::Code(0)));
        o.read_back[0] = ReadBackResult::Read {
            data: br#"{"a":1}"#.to_vec(),
            truncated: false,
        };
        assert_eq!(
            classify(&o, &limits()),
            Verdict::Completed {
                output: json!({"a": 1}).into()
            }
        );
    }

    #[test]
    fn no_output_file_is_null_output() {
        let o = outcome(Termination::Exited(ExitStatus::Code(0)));
        assert_eq!(
            classify(&o, &limits()),
            Verdict::Completed {
                output: TaskOutput::null()
            }
        );
    }

    fn hits(o: &RunOutcome) -> Vec<LimitHit> {
        limits_hit(o, &limits()).iter().collect()
    }

    #[test]
    fn limits_hit_lists_every_limit_reached_even_on_success() {
        let ok = outcome(Termination::Exited(ExitStatus::Code(0)));
        assert!(hits(&ok).is_empty());
        // A fork bomb whose main process exits 0 still reached pids.
        let mut bomb = outcome(Termination::Exited(ExitStatus::Code(0)));
        bomb.stats.pids_max_hits = 12;
        bomb.stats.memory_max_hits = 1;
        bomb.stdout_truncated = true;
        assert_eq!(
            hits(&bomb),
            vec![LimitHit::Pids, LimitHit::Memory, LimitHit::Output]
        );
        let mut oom = outcome(Termination::Exited(ExitStatus::Signal(9)));
        oom.stats.oom_kills = 1;
        assert_eq!(hits(&oom), vec![LimitHit::Memory]);
        let mut disk = outcome(Termination::Exited(ExitStatus::Code(0)));
        disk.disk_full = true;
        disk.read_back[0] = ReadBackResult::Read {
            data: Vec::new(),
            truncated: true,
        };
        assert_eq!(hits(&disk), vec![LimitHit::Disk, LimitHit::Output]);
        assert_eq!(hits(&outcome(Termination::TimedOut)), vec![LimitHit::Wall]);
        assert_eq!(
            hits(&outcome(Termination::CpuTimeExceeded)),
            vec![LimitHit::Cpu]
        );
        assert!(hits(&outcome(Termination::Cancelled)).is_empty());
        assert_eq!(
            hits(&outcome(Termination::OutputCapped(OutputStream::Stderr))),
            vec![LimitHit::Output]
        );
    }

    #[test]
    fn a_stream_stopped_at_its_cap_is_output_exhaustion_naming_it() {
        let mut l = limits();
        l.output_bytes = 1 << 20;
        for stream in [OutputStream::Stdout, OutputStream::Stderr] {
            let Verdict::Failed(e) = classify(&outcome(Termination::OutputCapped(stream)), &l)
            else {
                panic!("must fail")
            };
            assert_eq!(e.error_type, ErrorType::ResourceExhaustion);
            let name = stream.as_str();
            assert_eq!(
                e.message,
                format!("{name} reached its 1Mi cap (limits.outputBytes)")
            );
            assert_eq!(
                e.details,
                Some(json!({"resource": "output", "limit": 1 << 20, "stream": name}))
            );
        }
    }

    #[test]
    fn each_fact_maps_to_its_error_type() {
        let l = limits();
        assert_eq!(
            error_type(classify(&outcome(Termination::TimedOut), &l)),
            ErrorType::Timeout
        );
        assert_eq!(
            error_type(classify(&outcome(Termination::CpuTimeExceeded), &l)),
            ErrorType::Timeout
        );
        assert_eq!(
            error_type(classify(&outcome(Termination::Cancelled), &l)),
            ErrorType::Cancelled
        );
        let mut oom = outcome(Termination::Exited(ExitStatus::Signal(9)));
        oom.stats.oom_kills = 1;
        assert_eq!(
            error_type(classify(&oom, &l)),
            ErrorType::ResourceExhaustion
        );
        let mut pids = outcome(Termination::Exited(ExitStatus::Code(1)));
        pids.stats.pids_max_hits = 3;
        assert_eq!(
            error_type(classify(&pids, &l)),
            ErrorType::ResourceExhaustion
        );
        let mut disk = outcome(Termination::Exited(ExitStatus::Code(1)));
        disk.disk_full = true;
        assert_eq!(
            error_type(classify(&disk, &l)),
            ErrorType::ResourceExhaustion
        );
        assert_eq!(
            error_type(classify(
                &outcome(Termination::Exited(ExitStatus::Code(3))),
                &l
            )),
            ErrorType::RuntimeError
        );
        let mut bad = outcome(Termination::Exited(ExitStatus::Code(0)));
        bad.read_back[0] = ReadBackResult::Read {
            data: b"not json".to_vec(),
            truncated: false,
        };
        assert_eq!(error_type(classify(&bad, &l)), ErrorType::OutputValidation);
        let mut link = outcome(Termination::Exited(ExitStatus::Code(0)));
        link.read_back[0] = ReadBackResult::Refused {
            reason: "symlink".into(),
        };
        assert_eq!(error_type(classify(&link, &l)), ErrorType::OutputValidation);
        let mut big = outcome(Termination::Exited(ExitStatus::Code(0)));
        big.read_back[0] = ReadBackResult::Read {
            data: Vec::new(),
            truncated: true,
        };
        assert_eq!(
            error_type(classify(&big, &l)),
            ErrorType::ResourceExhaustion
        );
    }

    #[test]
    fn handler_exceptions_carry_the_stack_trace() {
        let mut o = outcome(Termination::Exited(ExitStatus::Code(1)));
        o.read_back[1] = ReadBackResult::Read {
            data: br#"{"type":"ZeroDivisionError","message":"division by zero","stack":"Traceback (most recent call last): ..."}"#.to_vec(),
            truncated: false,
        };
        let Verdict::Failed(e) = classify(&o, &limits()) else {
            panic!("must fail")
        };
        assert_eq!(e.error_type, ErrorType::RuntimeError);
        assert_eq!(e.message, "ZeroDivisionError: division by zero");
        let d = e.details.expect("details");
        assert!(
            d["stackTrace"]
                .as_str()
                .expect("stack")
                .starts_with("Traceback")
        );
        assert_eq!(d["exitCode"], 1);
    }

    #[test]
    fn output_is_kept_as_compact_text() {
        let out = parse_output(b" [ 0 ,\n 0 , {\"a b\" : null} ]\n").expect("valid");
        assert_eq!(out.get(), r#"[0,0,{"a b":null}]"#);
        assert!(parse_output(b" \n").expect("blank").is_null());
        let e = parse_output(b"[0, 0").expect_err("not JSON");
        assert!(e.to_string().contains("EOF"), "{e}");
        assert!(parse_output(b"[0] [1]").is_err());
    }

    #[test]
    fn an_error_report_too_large_to_parse_is_omitted() {
        let mut o = outcome(Termination::Exited(ExitStatus::Code(1)));
        let mut report = br#"{"type":"E","message":"m","stack":"s","junk":["#.to_vec();
        report.extend(b"0,".repeat(MAX_ERROR_REPORT_BYTES));
        report.extend(b"0]}");
        o.read_back[1] = ReadBackResult::Read {
            data: report,
            truncated: false,
        };
        let Verdict::Failed(e) = classify(&o, &limits()) else {
            panic!("must fail")
        };
        assert_eq!(e.message, "the task exited with code 1");
        let d = e.details.expect("details");
        assert!(d.get("exception").is_none());
        assert!(
            d["exceptionOmitted"]
                .as_str()
                .expect("note")
                .contains("64Ki"),
            "{d}"
        );
    }

    #[test]
    fn tail_cuts_at_char_boundaries() {
        assert_eq!(tail("héllo".as_bytes(), 4), "llo");
        assert_eq!(tail(b"abc", 10), "abc");
    }
}
