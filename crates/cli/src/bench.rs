//! `taskexec bench`: sandboxed task latency next to the bare interpreter,
//! measured in the same run and interleaved, so a noisy shared machine
//! skews both sides alike. Figures are medians and ratios.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use serde_json::json;
use taskexec_engine::Cancellation;
use taskexec_model::{TaskInstance, TaskStatus};

/// Arguments of `taskexec bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Tasks per measured series.
    #[arg(long, default_value_t = 100)]
    pub tasks: usize,
    /// Runtime of the trivial task.
    #[arg(long, default_value = "python")]
    pub runtime: String,
    /// Also time whole `taskexec run` processes (CLI start included).
    #[arg(long)]
    pub cli: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Benchmark a running server instead: submit → final result stored.
    #[arg(long)]
    pub server: Option<String>,
    /// Concurrent submitters (with --server).
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Bearer token (with --server).
    #[arg(long, env = "TASKEXEC_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// Percentile of a sorted series (nearest rank).
fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[derive(Debug, Default)]
struct Series {
    name: String,
    ms: Vec<f64>,
}

impl Series {
    fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ms: Vec::new(),
        }
    }

    fn summary(&self) -> serde_json::Value {
        let mut s = self.ms.clone();
        s.sort_by(f64::total_cmp);
        let mean = s.iter().sum::<f64>() / s.len().max(1) as f64;
        json!({"name": self.name, "n": s.len(), "p50": pct(&s, 50.0), "p99": pct(&s, 99.0), "mean": mean, "min": s.first()})
    }
}

fn time_command(cmd: &mut Command) -> anyhow::Result<f64> {
    let t = Instant::now();
    let status = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(ms)
}

/// The trivial program per runtime, and its file name.
fn trivial(runtime: &str) -> anyhow::Result<(&'static str, &'static str)> {
    Ok(match runtime {
        "python" => ("pass\n", "main.py"),
        "node" => ("\n", "main.js"),
        "bash" => ("true\n", "main.sh"),
        "java" => (
            "public class Main { public static void main(String[] a) {} }\n",
            "Main.java",
        ),
        other => bail!("--runtime {other:?}: bench knows python, node, bash and java"),
    })
}

/// `taskexec bench --server`: end-to-end latency (submit → final result
/// stored, via `?wait=`) and throughput, from `concurrency` submitters.
fn bench_server(url: &str, args: &BenchArgs) -> anyhow::Result<ExitCode> {
    let (code, file_name) = trivial(&args.runtime)?;
    let task = json!({
        "definition": {"name": "bench", "files": [{"name": file_name, "content": code}], "entrypoint": file_name},
        "executionConfig": {"runtime": args.runtime, "resourceRequirements": {"timeoutSeconds": 60, "disk": "16Mi", "cpu": "0.1", "memory": "64Mi"}},
        "retryPolicy": {"maxRetries": 0, "retryInterval": 0, "backoffMultiplier": 1.0},
    });
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(600)))
        .build()
        .new_agent();
    let base = url.trim_end_matches('/').to_string();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failures = std::sync::atomic::AtomicUsize::new(0);
    let latencies = std::sync::Mutex::new(Vec::with_capacity(args.tasks));
    eprintln!(
        "submitting {} tasks to {base} from {} submitters",
        args.tasks, args.concurrency
    );
    let t0 = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..args.concurrency.max(1) {
            scope.spawn(|| {
                while next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < args.tasks {
                    let t = Instant::now();
                    let mut req = agent.post(format!("{base}/v1/tasks?wait=300s"));
                    if let Some(tok) = &args.token {
                        req = req.header("Authorization", format!("Bearer {tok}"));
                    }
                    let ok = match req.send_json(&task) {
                        Ok(mut r) => {
                            let v: serde_json::Value = r.body_mut().read_json().unwrap_or_default();
                            v["status"] == "COMPLETED"
                        }
                        Err(_) => false,
                    };
                    if ok {
                        latencies
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(t.elapsed().as_secs_f64() * 1000.0);
                    } else {
                        failures.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                }
            });
        }
    });
    let wall = t0.elapsed().as_secs_f64();
    let mut s = Series::new(format!(
        "service end to end, concurrency {}",
        args.concurrency
    ));
    s.ms = latencies.into_inner().unwrap_or_default();
    let done = s.ms.len();
    let report = json!({
        "server": base,
        "tasks": args.tasks,
        "completed": done,
        "failed": failures.into_inner(),
        "concurrency": args.concurrency,
        "wallSeconds": wall,
        "throughputPerSecond": done as f64 / wall,
        "latency": s.summary(),
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let l = &report["latency"];
        println!(
            "taskexec bench --server: {} trivial {} tasks, {} submitters",
            args.tasks, args.runtime, args.concurrency
        );
        println!(
            "completed {done}, failed {}, {:.1} tasks/s; latency p50 {:.2} ms, p99 {:.2} ms",
            report["failed"],
            report["throughputPerSecond"].as_f64().unwrap_or(0.0),
            l["p50"].as_f64().unwrap_or(f64::NAN),
            l["p99"].as_f64().unwrap_or(f64::NAN)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `taskexec bench`.
pub fn main(g: &crate::setup::GlobalArgs, args: BenchArgs) -> anyhow::Result<ExitCode> {
    if let Some(url) = args.server.clone() {
        return bench_server(&url, &args);
    }
    let (code, file_name) = trivial(&args.runtime)?;
    let engine = crate::setup::engine(g, crate::setup::Warmth::Cold)?;
    let rt = engine
        .catalogue()
        .resolve(&args.runtime)
        .context("resolving the runtime")?;
    let dir = tempfile::tempdir().context("temp dir")?;
    let file = dir.path().join(file_name);
    std::fs::write(&file, code)?;
    let bare_cmd = |f: &Path| {
        let mut c = Command::new(&rt.interpreter);
        if args.runtime == "java" {
            // Bare JVM start on the same class, compiled once outside the loop.
            c.arg("-XX:+UseSerialGC")
                .arg("-XX:TieredStopAtLevel=1")
                .arg("-XX:-UsePerfData")
                .arg("-cp")
                .arg(dir.path())
                .arg("Main");
        } else {
            c.arg(f);
        }
        c
    };
    if args.runtime == "java" {
        let javac = rt.compiler.clone().context("java has no compiler")?;
        let ok = Command::new(javac)
            .arg("-d")
            .arg(dir.path())
            .arg(&file)
            .status()?;
        if !ok.success() {
            bail!("javac failed");
        }
    }
    // CPU request 1: the cgroup weight of any host process, so the bare
    // interpreter and the task compete on equal terms on a busy machine.
    let task: TaskInstance = serde_json::from_value(json!({
        "id": "bench",
        "definition": {"name": "bench", "files": [{"name": file_name, "content": code}], "entrypoint": file_name},
        "executionConfig": {"runtime": args.runtime, "resourceRequirements": {"timeoutSeconds": 30, "disk": "16Mi", "cpu": "1"}},
        "retryPolicy": {"maxRetries": 0, "retryInterval": 0, "backoffMultiplier": 1.0},
    }))?;
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let cancel = Cancellation::new()?;

    let mut bare = Series::new(format!("bare {} {}", rt.interpreter.display(), file_name));
    let mut sandboxed = Series::new("engine: sandboxed task (script mode)");
    let mut cli = Series::new("taskexec run (whole CLI process)");
    let mut phases: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let exe = std::env::current_exe()?;
    // Warm up caches (page cache, compiled classes) before measuring.
    for _ in 0..3 {
        time_command(&mut bare_cmd(&file))?;
        let r = tokio.block_on(engine.execute(task.clone(), &cancel));
        if r.status != TaskStatus::Completed {
            bail!("the trivial task did not complete: {:?}", r.error);
        }
    }
    eprint!("measuring {} tasks ", args.tasks);
    for i in 0..args.tasks {
        bare.ms.push(time_command(&mut bare_cmd(&file))?);
        let t = Instant::now();
        let r = tokio.block_on(engine.execute(task.clone(), &cancel));
        sandboxed.ms.push(t.elapsed().as_secs_f64() * 1000.0);
        if r.status != TaskStatus::Completed {
            bail!("task {i} did not complete: {:?}", r.error);
        }
        for (k, v) in &r.execution_metadata.phases.sandbox {
            phases.entry(k.clone()).or_default().push(*v);
        }
        if args.cli {
            let mut c = Command::new(&exe);
            c.arg("run")
                .arg(&file)
                .arg("--runtime")
                .arg(&args.runtime)
                .arg("--cpu")
                .arg("1");
            cli.ms.push(time_command(&mut c)?);
        }
        if i % 10 == 9 {
            eprint!(".");
        }
    }
    eprintln!();
    let mut series = vec![bare.summary(), sandboxed.summary()];
    if args.cli {
        series.push(cli.summary());
    }
    let base = series[0]["p50"].as_f64().unwrap_or(f64::NAN);
    let phase_p50: BTreeMap<String, f64> = phases
        .into_iter()
        .map(|(k, mut v)| {
            v.sort_by(f64::total_cmp);
            (k, pct(&v, 50.0))
        })
        .collect();
    let report = json!({
        "runtime": args.runtime,
        "tasks": args.tasks,
        "cgroup": engine_cgroup(g),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "series": series,
        "sandboxPhasesP50Ms": phase_p50,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "taskexec bench: {} trivial {} tasks, one at a time ({}, {} cpus)",
        args.tasks,
        args.runtime,
        report["cgroup"].as_str().unwrap_or("?"),
        report["cpus"]
    );
    println!(
        "{:<48} {:>8} {:>8} {:>8} {:>10}",
        "series", "p50 ms", "p99 ms", "mean ms", "p50 ratio"
    );
    for s in &report["series"].as_array().cloned().unwrap_or_default() {
        let f = |k: &str| s[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:<48} {:>8.2} {:>8.2} {:>8.2} {:>9.2}x",
            s["name"].as_str().unwrap_or(""),
            f("p50"),
            f("p99"),
            f("mean"),
            f("p50") / base
        );
    }
    let sb = report["series"][1]["p50"].as_f64().unwrap_or(f64::NAN);
    println!(
        "sandbox overhead at p50: {:+.2} ms over the bare interpreter",
        sb - base
    );
    println!("sandbox phases, p50 ms:");
    for (k, v) in &phase_p50 {
        println!("  {k:<14} {v:>7.3}");
    }
    Ok(ExitCode::SUCCESS)
}

fn engine_cgroup(g: &crate::setup::GlobalArgs) -> String {
    taskexec_sandbox::cgroup::detect(g.cgroup_parent.as_deref())
        .map(|d| d.version().to_string())
        .unwrap_or_else(|e| e.to_string())
}
