//! `taskexec run`: one task now, in a sandbox, no server.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use serde_json::Value;
use taskexec_engine::Cancellation;
use taskexec_model::{
    Mode, QuantityValue, TaskDefinition, TaskInstance, TaskResult, TaskStatus, parse_bytes,
    parse_cpu_millis, parse_duration,
};

/// Task mode flag.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ModeArg {
    /// The program reads $TASK_INPUT (or stdin) and writes $TASK_OUTPUT.
    Script,
    /// A function `main(input)` whose return value is the output.
    Handler,
}

/// Arguments of `taskexec run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub task: TaskArgs,
    /// Print the TaskResult as one JSON document on stdout, and nothing else there.
    #[arg(long)]
    pub json: bool,
    /// Run the way the service does: a handler-mode task of a runtime with a
    /// fork server runs in a child of a pre-started interpreter. For one
    /// task this is slower than cold (the server starts first); it shows
    /// that a task behaves the same both ways.
    #[arg(long)]
    pub warm: bool,
    /// Largest output kept as the result, in bytes of compact JSON, e.g.
    /// 16Mi (the default); a larger one fails the task.
    #[arg(long, value_name = "BYTES")]
    pub max_result_bytes: Option<String>,
}

/// The flags that describe a task (shared by `run` and `submit`).
#[derive(Debug, Args)]
pub struct TaskArgs {
    /// The task's source file (the runtime is inferred from its extension).
    #[arg(required_unless_present = "task", conflicts_with = "task")]
    pub file: Option<PathBuf>,
    /// A whole TaskInstance as JSON (a file path, or - for stdin).
    #[arg(long)]
    pub task: Option<PathBuf>,
    /// Runtime (python, node, java, bash, ...); default: from the file extension.
    #[arg(long)]
    pub runtime: Option<String>,
    /// script or handler.
    #[arg(long, value_enum)]
    pub mode: Option<ModeArg>,
    /// Input JSON, or @file.json.
    #[arg(long)]
    pub input: Option<String>,
    /// Memory limit, e.g. 128Mi.
    #[arg(long)]
    pub memory: Option<String>,
    /// Size of the work dir and /tmp together, e.g. 64Mi.
    #[arg(long)]
    pub disk: Option<String>,
    /// Wall-clock limit, e.g. 5s, 500ms, 2m.
    #[arg(long)]
    pub timeout: Option<String>,
    /// CPU-time limit of the whole process tree, e.g. 2s.
    #[arg(long)]
    pub cpu_time: Option<String>,
    /// CPU request (cgroup weight), e.g. 1, 0.5, 500m.
    #[arg(long)]
    pub cpu: Option<String>,
    /// Hard CPU quota, e.g. 1 (off unless given).
    #[arg(long)]
    pub cpu_limit: Option<String>,
    /// Maximum processes and threads.
    #[arg(long)]
    pub pids: Option<i64>,
    /// Cap of stdout, stderr and the output file, e.g. 1Mi.
    #[arg(long)]
    pub output_bytes: Option<String>,
    /// Environment variable for the task, K=V (repeatable).
    #[arg(long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// A module to import before the handler's file, e.g. numpy
    /// (repeatable; handler mode, python). A warm executor imports it once,
    /// in a fork server of its own.
    #[arg(long = "preload", value_name = "MODULE")]
    pub preload: Vec<String>,
    /// JSON Schema of the input: JSON or @file.
    #[arg(long)]
    pub input_schema: Option<String>,
    /// JSON Schema of the output: JSON or @file.
    #[arg(long)]
    pub output_schema: Option<String>,
    /// Retries after a retryable failure (default policy otherwise).
    #[arg(long)]
    pub max_retries: Option<i64>,
}

/// Reads `JSON` or `@file` into a JSON value; errors name the flag.
fn json_arg(flag: &str, raw: &str) -> anyhow::Result<Value> {
    let (text, from) = match raw.strip_prefix('@') {
        Some(path) => (
            std::fs::read_to_string(path).with_context(|| format!("{flag}: cannot read {path}"))?,
            format!(" in {path}"),
        ),
        None => (raw.to_string(), String::new()),
    };
    serde_json::from_str(&text).map_err(|e| {
        anyhow::anyhow!("{flag}: not valid JSON{from} ({e}); expected a JSON document, or @path to a file holding one")
    })
}

fn quantity(
    flag: &str,
    raw: &Option<String>,
    check: fn(&str) -> Result<u64, String>,
) -> anyhow::Result<Option<QuantityValue>> {
    match raw {
        None => Ok(None),
        Some(v) => {
            check(v).map_err(|e| anyhow::anyhow!("{flag} {v:?}: {e}"))?;
            Ok(Some(QuantityValue::Text(v.clone())))
        }
    }
}

fn seconds(flag: &str, raw: &Option<String>) -> anyhow::Result<Option<f64>> {
    raw.as_ref()
        .map(|v| {
            parse_duration(v)
                .map(|d| d.as_secs_f64())
                .map_err(|e| anyhow::anyhow!("{flag} {v:?}: {e}"))
        })
        .transpose()
}

fn bytes(v: &str) -> Result<u64, String> {
    parse_bytes(v).map_err(|e| e.to_string())
}

fn cpu(v: &str) -> Result<u64, String> {
    parse_cpu_millis(v)
        .map(u64::from)
        .map_err(|e| e.to_string())
}

/// Builds the TaskInstance from the flags (bad flags are exit-2 errors).
pub fn build_task(
    args: &TaskArgs,
    catalogue: &taskexec_runtimes::Catalogue,
) -> anyhow::Result<TaskInstance> {
    let mut task: TaskInstance = match (&args.task, &args.file) {
        (Some(path), _) => {
            let text = if path == Path::new("-") {
                std::io::read_to_string(std::io::stdin()).context("--task: reading stdin")?
            } else {
                std::fs::read_to_string(path)
                    .with_context(|| format!("--task: cannot read {}", path.display()))?
            };
            serde_json::from_str(&text).map_err(|e| {
                anyhow::anyhow!("--task {}: not a valid TaskInstance: {e}", path.display())
            })?
        }
        (None, Some(file)) => {
            let code = std::fs::read_to_string(file)
                .with_context(|| format!("FILE: cannot read {}", file.display()))?;
            let runtime = match &args.runtime {
                Some(r) => r.clone(),
                None => catalogue
                    .infer_from_path(file)
                    .map(|r| r.name.clone())
                    .with_context(|| {
                        format!(
                            "FILE {}: cannot infer the runtime from the extension; pass --runtime (one of: {})",
                            file.display(),
                            catalogue.names().collect::<Vec<_>>().join(", ")
                        )
                    })?,
            };
            let name = file
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("main")
                .to_string();
            let mut t: TaskInstance = serde_json::from_value(serde_json::json!({
                "definition": {"name": name, "code": "placeholder"},
            }))
            .context("building the task")?;
            t.definition = TaskDefinition {
                code: Some(code),
                ..t.definition
            };
            // Keep the file's own name, so Java finds its class and stack traces name the file.
            if runtime == "java" {
                t.definition.code = None;
                t.definition.files = vec![taskexec_model::TaskFile {
                    name: name.clone(),
                    content: std::fs::read_to_string(file)?,
                }];
                t.definition.entrypoint = Some(name);
            }
            t.execution_config.runtime = Some(runtime);
            t
        }
        (None, None) => bail!("FILE or --task is required"),
    };
    if args.task.is_some()
        && let Some(r) = &args.runtime
    {
        task.execution_config.runtime = Some(r.clone());
    }
    if let Some(m) = args.mode {
        task.definition.mode = match m {
            ModeArg::Script => Mode::Script,
            ModeArg::Handler => Mode::Handler,
        };
    }
    if let Some(input) = &args.input {
        task.input = json_arg("--input", input)?;
    }
    if !args.preload.is_empty() {
        task.definition.preload = args.preload.clone();
    }
    if let Some(s) = &args.input_schema {
        task.definition.input_schema = Some(json_arg("--input-schema", s)?);
    }
    if let Some(s) = &args.output_schema {
        task.definition.output_schema = Some(json_arg("--output-schema", s)?);
    }
    let rr = &mut task.execution_config.resource_requirements;
    if let Some(q) = quantity("--memory", &args.memory, bytes)? {
        rr.memory = Some(q);
    }
    if let Some(q) = quantity("--disk", &args.disk, bytes)? {
        rr.disk = Some(q);
    }
    if let Some(q) = quantity("--output-bytes", &args.output_bytes, bytes)? {
        rr.output_bytes = Some(q);
    }
    if let Some(q) = quantity("--cpu", &args.cpu, cpu)? {
        rr.cpu = Some(q);
    }
    if let Some(q) = quantity("--cpu-limit", &args.cpu_limit, cpu)? {
        rr.cpu_limit = Some(q);
    }
    if let Some(s) = seconds("--timeout", &args.timeout)? {
        rr.timeout_seconds = Some(s);
    }
    if let Some(s) = seconds("--cpu-time", &args.cpu_time)? {
        rr.cpu_time_seconds = Some(s);
    }
    if let Some(p) = args.pids {
        rr.pids = Some(p);
    }
    let env: &mut BTreeMap<String, String> = &mut task.execution_config.environment_variables;
    for kv in &args.env {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--env {kv:?}: expected K=V"))?;
        env.insert(k.to_string(), v.to_string());
    }
    if let Some(n) = args.max_retries {
        let mut policy = task.retry_policy.clone().unwrap_or_default();
        policy.max_retries = n;
        task.retry_policy = Some(policy);
    }
    Ok(task)
}

/// `taskexec run`.
pub fn main(g: &crate::setup::GlobalArgs, args: RunArgs) -> anyhow::Result<ExitCode> {
    let max_result_bytes = crate::setup::max_result_bytes(args.max_result_bytes.as_deref())?;
    let task = build_task(&args.task, &crate::setup::catalogue(g)?)?;
    // The owner of /proc/self is this process's effective uid.
    let euid = std::os::unix::fs::MetadataExt::uid(
        &std::fs::metadata("/proc/self").context("reading /proc/self")?,
    );
    require_root(euid)?;
    let warmth = if args.warm {
        crate::setup::Warmth::Warm
    } else {
        crate::setup::Warmth::Cold
    };
    let engine = crate::setup::engine(g, warmth, max_result_bytes)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(4)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let result = rt.block_on(async {
        let cancel = Cancellation::new()?;
        let on_signal = cancel.clone();
        // Ctrl-C and SIGTERM cancel the task: its sandbox is killed and
        // cleaned up, and the result says CANCELLED.
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            on_signal.cancel();
        });
        anyhow::Ok(engine.execute(task, &cancel).await)
    })?;
    // Nothing runs on the runtime any more: let its idle threads go
    // without waiting for them.
    rt.shutdown_background();
    engine.shutdown();
    if args.json {
        print_out(&format!("{}\n", serde_json::to_string_pretty(&result)?));
    } else {
        print_summary(&result);
    }
    Ok(ExitCode::from(match result.status {
        TaskStatus::Completed => 0,
        TaskStatus::Rejected => 2,
        _ => 1,
    }))
}

/// A sandbox needs root: say so at once (exit 2), rather than failing the
/// task's attempts one by one on permission errors.
fn require_root(euid: u32) -> anyhow::Result<()> {
    if euid != 0 {
        bail!("taskexec run needs root (namespaces, cgroups): run it with sudo");
    }
    Ok(())
}

/// Prints a short human summary of a result (see [`print_out`]).
pub fn print_summary(r: &TaskResult) {
    let mut s = String::new();
    let m = &r.execution_metadata;
    let attempts = m.attempts.len();
    let _ = writeln!(
        s,
        "{} in {:.1} ms ({}, {} attempt{})",
        r.status,
        m.duration,
        m.execution_environment,
        attempts,
        if attempts == 1 { "" } else { "s" }
    );
    if let Some(e) = &r.error {
        let _ = writeln!(s, "error: {} {}", e.error_type, e.message);
        if let Some(field) = e
            .details
            .as_ref()
            .and_then(|d| d.get("field"))
            .and_then(Value::as_str)
        {
            let _ = writeln!(s, "field: {field}");
        }
        if let Some(v) = e
            .details
            .as_ref()
            .and_then(|d| d.get("violations"))
            .and_then(Value::as_array)
        {
            for v in v {
                let _ = writeln!(
                    s,
                    "  at {:?}: {}",
                    v["path"].as_str().unwrap_or(""),
                    v["message"].as_str().unwrap_or("")
                );
            }
        }
    }
    if r.status == TaskStatus::Completed {
        let _ = writeln!(s, "output: {}", r.output);
    }
    let p = &m.phases;
    if attempts > 0 {
        let _ = writeln!(
            s,
            "timings: prepare {:.1} ms, compile {:.1} ms, run {:.1} ms, output {:.1} ms, cleanup {:.1} ms",
            p.prepare_ms, p.compile_ms, p.run_ms, p.output_validation_ms, p.cleanup_ms
        );
    }
    if let (Some(cpu), Some(mem)) = (m.cpu_time_ms, m.peak_memory_bytes) {
        let _ = writeln!(
            s,
            "resources: cpu {cpu} ms, peak memory {}",
            taskexec_model::format_bytes(mem)
        );
    }
    for (name, text, cut) in [
        ("stdout", &r.stdout, r.stdout_truncated),
        ("stderr", &r.stderr, r.stderr_truncated),
    ] {
        if !text.is_empty() {
            let tail = taskexec_engine::classify::tail(text.as_bytes(), 2000);
            let _ = writeln!(
                s,
                "{name}{}:\n{}",
                if cut { " (truncated)" } else { "" },
                tail.trim_end()
            );
        }
    }
    print_out(&s);
}

/// Writes `text` to stdout. A reader that went away (`taskexec run ... |
/// head`) is not an error: the rest is dropped quietly.
pub fn print_out(text: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_as_a_user_says_to_use_sudo() {
        let e = require_root(1000).expect_err("not root").to_string();
        assert_eq!(
            e,
            "taskexec run needs root (namespaces, cgroups): run it with sudo"
        );
        require_root(0).expect("root");
    }
}
