//! `taskexec bench`: the benchmark report. Every figure is printed beside
//! a baseline measured in the same run, interleaved with it, so a noisy
//! shared machine skews both sides alike; compare medians and ratios.
//!
//! - engine groups ([`local`]): for each runtime and mode (script; handler
//!   for python and node), at concurrency 1 and 2×cores, the bare
//!   interpreter running the same program next to the engine cold, the
//!   engine warm and (python script, or all with `--cli`) whole
//!   `taskexec run` processes;
//! - service groups ([`service`]): a `taskexec serve` child on SQLite,
//!   submit → result stored, at concurrency 1 and 4, next to the bare
//!   interpreter;
//! - the drain: many trivial tasks queued at once on a fresh server, its
//!   time and the server's own peak memory.
//!
//! `--server URL` instead measures a running server alone.

mod local;
mod machine;
mod measure;
mod progress;
mod report;
mod service;
mod stats;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use serde_json::{Value, json};
use taskexec_model::TaskInstance;
use taskexec_runtimes::ResolvedRuntime;

use local::{Mode, Program};
use measure::{Contender, Plan};
use progress::Progress;
use report::{Group, Report, Settings};
use stats::{Kind, Samples};

/// The runtimes measured by default.
const ALL_RUNTIMES: [&str; 4] = ["python", "node", "bash", "java"];
/// Concurrency of the service throughput figure.
const SERVICE_CONCURRENCY: usize = 4;
/// The module the preload group's handler imports: a standard one that
/// takes tens of milliseconds to import.
const PRELOAD_MODULE: &str = "asyncio";

/// Arguments of `taskexec bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Tasks per contender in each group (default 50, or 5 with --quick);
    /// java runs a fifth of it (at least 1). Above concurrency 1 it is
    /// rounded up to whole chunks of 4×concurrency.
    #[arg(long)]
    pub tasks: Option<usize>,
    /// Runtimes to measure, comma-separated (default: python, node, bash
    /// and java, those installed).
    #[arg(long, alias = "runtime", value_delimiter = ',')]
    pub runtimes: Vec<String>,
    /// A smoke run: few tasks, one warm-up round, a drain of 200 tasks.
    #[arg(long)]
    pub quick: bool,
    /// Also time whole `taskexec run` processes for every runtime and mode
    /// (always done for python script mode).
    #[arg(long)]
    pub cli: bool,
    /// Skip the service groups and the drain.
    #[arg(long)]
    pub no_service: bool,
    /// Tasks queued at once for the drain (default 10000, or 200 with
    /// --quick; 0 skips the drain).
    #[arg(long)]
    pub drain_tasks: Option<usize>,
    /// Runtime of the drain's trivial script task.
    #[arg(long, default_value = "bash")]
    pub drain_runtime: String,
    /// Print the report as one JSON document on stdout.
    #[arg(long)]
    pub json: bool,
    /// Also write the report into the generated section of this Markdown
    /// file (created or replaced; e.g. docs/benchmarks.md).
    #[arg(long, value_name = "FILE")]
    pub markdown: Option<PathBuf>,
    /// Measure a running server instead: submit → final result stored,
    /// from --concurrency submitters, --tasks tasks (default 1000).
    #[arg(long, value_name = "URL")]
    pub server: Option<String>,
    /// Concurrent submitters (with --server).
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// The trivial task's mode (with --server): script, or handler (warm
    /// through a fork server, for runtimes that have one).
    #[arg(long, value_enum, default_value = "script")]
    pub mode: crate::run::ModeArg,
    /// Bearer token (with --server).
    #[arg(long, env = "TASKEXEC_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// With --server: the same task also run this many times through the
    /// warm engine alone (2×cores at once) and with `taskexec run` one by
    /// one, on this machine, as the baselines (0 skips them). Run it where
    /// the server runs, for a fair comparison.
    #[arg(long, default_value_t = 100)]
    pub baseline_tasks: usize,
    /// The SQLite durability of the benchmark's own servers (the service
    /// groups and the drain): acknowledged (the default), full or normal,
    /// as `sqlite://PATH?synchronous=…`. Hidden: for measuring its cost.
    #[arg(
        long,
        hide = true,
        value_name = "MODE",
        value_parser = ["acknowledged", "full", "normal"]
    )]
    pub sqlite_synchronous: Option<String>,
}

/// `taskexec bench`.
pub fn main(g: &crate::setup::GlobalArgs, args: BenchArgs) -> anyhow::Result<ExitCode> {
    if let Some(url) = args.server.clone() {
        return external(g, &url, &args);
    }
    let report = run_report(g, &args)?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        out!("{}", report.text());
    }
    if let Some(path) = &args.markdown {
        report::write_markdown(path, &report)?;
        eprintln!("taskexec bench: wrote the report into {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// The runtimes to measure: the requested ones (each must resolve), or
/// every known one that resolves here.
fn select_runtimes(
    args: &BenchArgs,
    cat: &taskexec_runtimes::Catalogue,
) -> anyhow::Result<Vec<(String, taskexec_runtimes::ResolvedRuntime)>> {
    let mut out = Vec::new();
    if args.runtimes.is_empty() {
        for name in ALL_RUNTIMES {
            match cat.resolve(name) {
                Ok(rt) => out.push((name.to_string(), rt)),
                Err(e) => eprintln!("taskexec bench: skipping {name}: {e}"),
            }
        }
    } else {
        for name in &args.runtimes {
            if !ALL_RUNTIMES.contains(&name.as_str()) {
                bail!("--runtimes {name:?}: bench knows python, node, bash and java");
            }
            let rt = cat
                .resolve(name)
                .with_context(|| format!("--runtimes {name}"))?;
            if !out.iter().any(|(n, _)| n == name) {
                out.push((name.clone(), rt));
            }
        }
    }
    if out.is_empty() {
        bail!("no runtime to measure");
    }
    Ok(out)
}

/// The resources of a service task: CPU request 1, like the engine tasks
/// (with the default capacity of one CPU per core and one worker per core,
/// admission is not the limit).
fn service_resources(runtime: &str) -> serde_json::Value {
    let memory = if runtime == "java" { "512Mi" } else { "128Mi" };
    json!({"timeoutSeconds": 120, "disk": "16Mi", "cpu": "1", "memory": memory})
}

/// What every part of a report run shares.
struct Run<'a> {
    g: &'a crate::setup::GlobalArgs,
    args: &'a BenchArgs,
    exe: PathBuf,
    /// Global flags for child `taskexec` processes.
    globals: Vec<String>,
    tasks: usize,
    java_tasks: usize,
    warmup: usize,
    progress: Progress,
}

impl Run<'_> {
    /// The plan of a group of `runtime` at concurrency `c`.
    fn plan(&self, runtime: &str, c: usize) -> Plan {
        Plan {
            concurrency: c,
            tasks: if runtime == "java" {
                self.java_tasks
            } else {
                self.tasks
            },
            warmup: self.warmup,
        }
    }

    /// Whether a group also times whole `taskexec run` processes.
    fn with_cli(&self, p: &Program, c: usize) -> bool {
        c == 1 && (self.args.cli || (p.runtime == "python" && p.mode == Mode::Script))
    }

    /// The preload group: a python handler whose file imports
    /// [`PRELOAD_MODULE`], one at a time, through the warm engine with and
    /// without `definition.preload`, beside the bare interpreter running
    /// the same program.
    fn preload_group(
        &self,
        (p, rt): (&Program, &ResolvedRuntime),
        warm: &taskexec_engine::Engine,
        tokio: &tokio::runtime::Runtime,
    ) -> anyhow::Result<Group> {
        self.progress.label("engine: python handler with preload");
        let plain: TaskInstance =
            serde_json::from_value(p.task_json(local::engine_resources(&p.runtime)))
                .context("the preload task")?;
        let mut preloaded = plain.clone();
        preloaded.definition.preload = vec![PRELOAD_MODULE.to_string()];
        let ks = vec![
            p.bare(rt),
            local::engine_contender(
                format!("engine, warm, the handler imports {PRELOAD_MODULE}"),
                Kind::Warm,
                warm,
                tokio,
                plain,
            )?,
            local::engine_contender(
                format!("engine, warm, preload [{PRELOAD_MODULE}]"),
                Kind::Warm,
                warm,
                tokio,
                preloaded,
            )?,
        ];
        let samples = measure::measure(&ks, self.plan(&p.runtime, 1), &self.progress)
            .context("python handler with preload")?;
        let mut g = group("engine", p, 1, &samples);
        g.mode = format!("handler, imports {PRELOAD_MODULE}");
        Ok(g)
    }

    /// The engine groups: every program at every concurrency, bare, cold,
    /// warm (and CLI), interleaved; then the preload group, on the same
    /// warm engine.
    fn engine_groups(
        &self,
        programs: &[(Program, &ResolvedRuntime)],
        concurrency: &[usize],
        preload: Option<(&Program, &ResolvedRuntime)>,
    ) -> anyhow::Result<Vec<Group>> {
        self.progress.label("starting the engines");
        let cold = crate::setup::engine(
            self.g,
            crate::setup::Warmth::Cold,
            taskexec_engine::DEFAULT_MAX_RESULT_BYTES,
        )?;
        let warm = crate::setup::engine(
            self.g,
            crate::setup::Warmth::Warm,
            taskexec_engine::DEFAULT_MAX_RESULT_BYTES,
        )?;
        let tokio = local::async_runtime()?;
        let mut groups = Vec::new();
        for (p, rt) in programs {
            let task: TaskInstance =
                serde_json::from_value(p.task_json(local::engine_resources(&p.runtime)))
                    .context("the trivial task")?;
            for &c in concurrency {
                let mut ks: Vec<Contender<'_>> = vec![
                    p.bare(rt),
                    local::engine_contender(
                        "engine, cold (sandbox built per task)".into(),
                        Kind::Cold,
                        &cold,
                        &tokio,
                        task.clone(),
                    )?,
                    local::engine_contender(
                        "engine, warm (pools, fork servers)".into(),
                        Kind::Warm,
                        &warm,
                        &tokio,
                        task.clone(),
                    )?,
                ];
                if self.with_cli(p, c) {
                    ks.push(local::cli_contender(&self.exe, &self.globals, p));
                }
                let what = format!("{} {} at concurrency {c}", p.runtime, p.mode.as_str());
                self.progress.label(format!("engine: {what}"));
                let samples = measure::measure(&ks, self.plan(&p.runtime, c), &self.progress)
                    .with_context(|| what.clone())?;
                groups.push(group("engine", p, c, &samples));
            }
        }
        if let Some(preload) = preload {
            groups.push(self.preload_group(preload, &warm, &tokio)?);
        }
        Ok(groups)
    }

    /// The service groups: a `taskexec serve` child, end to end, beside
    /// the bare interpreter.
    fn service_groups(
        &self,
        p: &Program,
        rt: &ResolvedRuntime,
        plans: &[Plan],
    ) -> anyhow::Result<Vec<Group>> {
        self.progress.label("service: starting taskexec serve");
        let server = service::ServerChild::start(
            &self.exe,
            &self.globals,
            &[],
            self.args.sqlite_synchronous.as_deref(),
        )?;
        let agent = service::agent();
        let task = p.task_json(service_resources(&p.runtime));
        let mut groups = Vec::new();
        for &plan in plans {
            let c = plan.concurrency;
            let ks = [
                p.bare(rt),
                service::service_contender(
                    "service: POST ?wait → result stored".into(),
                    &agent,
                    &server.url,
                    None,
                    &task,
                ),
            ];
            self.progress.label(format!(
                "service: {} {} at concurrency {c}",
                p.runtime,
                p.mode.as_str()
            ));
            let samples = measure::measure(&ks, plan, &self.progress).map_err(|e| {
                anyhow::anyhow!(
                    "service at concurrency {c}: {e:#}\nserver log:\n{}",
                    server.log_tail()
                )
            })?;
            groups.push(group("service", p, c, &samples));
        }
        if let Err(e) = server.stop() {
            eprintln!("taskexec bench: {e:#}");
        }
        Ok(groups)
    }

    /// The drain of `n` queued trivial tasks on a fresh server.
    fn drain(&self, n: usize) -> anyhow::Result<service::Drain> {
        let runtime = &self.args.drain_runtime;
        self.progress
            .label(format!("drain: {n} queued {runtime} tasks"));
        let task = local::trivial_task(runtime, Mode::Script, service_resources(runtime))?;
        let flags = ["--max-queued".to_string(), (n + 1000).to_string()];
        let server = service::ServerChild::start(
            &self.exe,
            &self.globals,
            &flags,
            self.args.sqlite_synchronous.as_deref(),
        )?;
        let d = service::drain(
            &server,
            &task,
            format!("trivial {runtime} script tasks"),
            n,
            &self.progress,
        )?;
        if let Err(e) = server.stop() {
            eprintln!("taskexec bench: {e:#}");
        }
        Ok(d)
    }
}

fn run_report(g: &crate::setup::GlobalArgs, args: &BenchArgs) -> anyhow::Result<Report> {
    let t0 = Instant::now();
    let command = machine::command_line();
    let cat = crate::setup::catalogue(g)?;
    let selected = select_runtimes(args, &cat)?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let tasks = args.tasks.unwrap_or(if args.quick { 5 } else { 50 }).max(1);
    let concurrency = vec![1, 2 * cores];
    let drain_tasks = if args.no_service {
        0
    } else {
        args.drain_tasks
            .unwrap_or(if args.quick { 200 } else { 10_000 })
    };
    let mut run = Run {
        g,
        args,
        exe: std::env::current_exe().context("locating the taskexec binary")?,
        globals: local::global_flags(g),
        tasks,
        java_tasks: (tasks / 5).max(1),
        warmup: if args.quick { 1 } else { 2 },
        progress: Progress::new(0),
    };

    let mut programs: Vec<(Program, &ResolvedRuntime)> = Vec::new();
    for (name, rt) in &selected {
        for &mode in local::modes(name) {
            programs.push((Program::new(rt, name, mode)?, rt));
        }
    }
    // A handler that imports a module of some weight, with and without
    // preload, when python is measured.
    let preload_program = match selected.iter().find(|(n, _)| n == "python") {
        Some((_, rt)) => Some((Program::python_handler_importing(rt, PRELOAD_MODULE)?, rt)),
        None => None,
    };
    // The service's task: the warm python handler when python is measured.
    let service_program = if args.no_service {
        None
    } else {
        programs
            .iter()
            .find(|(p, _)| p.runtime == "python" && p.mode == Mode::Handler)
            .or(programs.first())
    };
    let service_plans: Vec<Plan> = service_program
        .map(|(p, _)| {
            [1, SERVICE_CONCURRENCY]
                .map(|c| run.plan(&p.runtime, c))
                .to_vec()
        })
        .unwrap_or_default();

    let mut total = drain_tasks as u64;
    for (p, _) in &programs {
        for &c in &concurrency {
            total += run
                .plan(&p.runtime, c)
                .units(3 + usize::from(run.with_cli(p, c)));
        }
    }
    total += service_plans.iter().map(|p| p.units(2)).sum::<u64>();
    if let Some((p, _)) = &preload_program {
        total += run.plan(&p.runtime, 1).units(3);
    }
    run.progress = Progress::new(total);

    let versions: BTreeMap<String, String> = selected
        .iter()
        .map(|(n, rt)| {
            (
                n.clone(),
                rt.version().unwrap_or_else(|e| format!("unknown ({e})")),
            )
        })
        .collect();
    let launcher = match &g.launcher {
        Some(p) => p.clone(),
        None => taskexec_sandbox::LauncherCommand::beside_current_exe()
            .map(|l| l.program)
            .unwrap_or_default(),
    };
    // Its file name only: the report goes into docs, which name no host path.
    let launcher = launcher
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| launcher.display().to_string());
    let machine = machine::Machine::detect(cgroup_version(g), versions, launcher);

    let mut groups = run.engine_groups(
        &programs,
        &concurrency,
        preload_program.as_ref().map(|(p, rt)| (p, *rt)),
    )?;
    if let Some((p, rt)) = service_program {
        groups.extend(run.service_groups(p, rt, &service_plans)?);
    }
    let drain = if drain_tasks > 0 {
        Some(run.drain(drain_tasks)?)
    } else {
        None
    };
    run.progress.finish();

    Ok(Report {
        schema_version: 1,
        command,
        machine,
        settings: Settings {
            tasks,
            java_tasks: run.java_tasks,
            warmup: run.warmup,
            concurrency,
            runtimes: selected.iter().map(|(n, _)| n.clone()).collect(),
            quick: args.quick,
        },
        targets: report::targets(&groups, drain.as_ref()),
        groups,
        drain,
        wall_seconds: (t0.elapsed().as_secs_f64() * 10.0).round() / 10.0,
    })
}

/// A measured group, ratios against its bare series.
fn group(section: &str, p: &Program, c: usize, samples: &[Samples]) -> Group {
    let base = samples
        .iter()
        .find(|s| s.kind == Kind::Bare)
        .and_then(|s| s.summary(None).p50_ms);
    Group {
        section: section.into(),
        runtime: p.runtime.clone(),
        mode: p.mode.as_str().into(),
        concurrency: c,
        series: samples.iter().map(|s| s.summary(base)).collect(),
    }
}

fn cgroup_version(g: &crate::setup::GlobalArgs) -> String {
    taskexec_sandbox::cgroup::detect(g.cgroup_parent.as_deref())
        .map(|d| d.version().to_string())
        .unwrap_or_else(|e| e.to_string())
}

/// `taskexec bench --server URL`: a running server, beside the same task
/// run by the warm engine alone in this process (the sandboxes without API,
/// store or scheduling) and by `taskexec run` one by one
/// (`--baseline-tasks` each).
fn external(g: &crate::setup::GlobalArgs, url: &str, args: &BenchArgs) -> anyhow::Result<ExitCode> {
    let runtime = args.runtimes.first().map_or("python", String::as_str);
    let tasks = args.tasks.unwrap_or(1000);
    let resources = json!({"timeoutSeconds": 60, "disk": "16Mi", "cpu": "0.1", "memory": "64Mi"});
    let mode = match args.mode {
        crate::run::ModeArg::Script => Mode::Script,
        crate::run::ModeArg::Handler => Mode::Handler,
    };
    let task = local::trivial_task(runtime, mode, resources.clone())?;
    if !args.json {
        eprintln!(
            "submitting {tasks} tasks to {url} from {} submitters",
            args.concurrency
        );
    }
    let (s, failed) =
        service::external(url, &task, tasks, args.concurrency, args.token.as_deref())?;
    let baselines = if args.baseline_tasks > 0 {
        external_baselines(g, runtime, mode, resources, args)?
    } else {
        Vec::new()
    };
    let sum = s.summary(None);
    let st = sum.throughput_per_s.unwrap_or(0.0);
    if args.json {
        let report = json!({
            "server": url.trim_end_matches('/'),
            "runtime": runtime,
            "mode": mode.as_str(),
            "tasks": tasks,
            "completed": sum.n,
            "failed": failed,
            "concurrency": args.concurrency,
            "wallSeconds": s.wall_s,
            "throughputPerSecond": sum.throughput_per_s,
            "latency": sum,
            "baselines": baselines.iter().map(|(what, c, b)| json!({
                "what": what,
                "concurrency": c,
                "tasks": b.n,
                "throughputPerSecond": b.throughput_per_s,
                "serverThroughputRatio": b.throughput_per_s.filter(|t| *t > 0.0).map(|t| st / t),
                "latency": b,
            })).collect::<Vec<_>>(),
        });
        outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        outln!(
            "taskexec bench --server: {tasks} trivial {runtime} {} tasks, {} submitters",
            mode.as_str(),
            args.concurrency
        );
        outln!(
            "completed {}, failed {failed}, {st:.1} tasks/s; latency p50 {:.2} ms, p99 {:.2} ms",
            sum.n,
            sum.p50_ms.unwrap_or(f64::NAN),
            sum.p99_ms.unwrap_or(f64::NAN)
        );
        for (what, c, b) in &baselines {
            let bt = b.throughput_per_s.unwrap_or(0.0);
            outln!(
                "baseline {what} ({} tasks, {c} at once): {bt:.1} tasks/s; latency p50 {:.2} ms, p99 {:.2} ms",
                b.n,
                b.p50_ms.unwrap_or(f64::NAN),
                b.p99_ms.unwrap_or(f64::NAN)
            );
            if bt > 0.0 {
                outln!("  the server's throughput is {:.2}x that", st / bt);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The baselines of `bench --server`, measured in this process after the
/// server run: the warm engine alone at 2×cores tasks at once (what the
/// sandboxes allow without API, store and scheduling), and whole
/// `taskexec run` processes one by one.
fn external_baselines(
    g: &crate::setup::GlobalArgs,
    runtime: &str,
    mode: Mode,
    resources: Value,
    args: &BenchArgs,
) -> anyhow::Result<Vec<(&'static str, usize, stats::Summary)>> {
    let rt = crate::setup::catalogue(g)?
        .resolve(runtime)
        .with_context(|| format!("runtime {runtime}"))?;
    let program = Program::new(&rt, runtime, mode)?;
    let mut out = Vec::new();

    let c = 2 * std::thread::available_parallelism().map_or(1, |n| n.get());
    if !args.json {
        eprintln!(
            "running the same task {} times through the warm engine alone, {c} at once",
            args.baseline_tasks
        );
    }
    let warm = crate::setup::engine(
        g,
        crate::setup::Warmth::Warm,
        taskexec_engine::DEFAULT_MAX_RESULT_BYTES,
    )?;
    let tokio = local::async_runtime()?;
    let task: TaskInstance =
        serde_json::from_value(program.task_json(resources)).context("the trivial task")?;
    let contender = local::engine_contender(
        "the warm engine alone".into(),
        Kind::Warm,
        &warm,
        &tokio,
        task,
    )?;
    let plan = Plan {
        concurrency: c,
        tasks: args.baseline_tasks,
        warmup: 2,
    };
    let mut samples = measure::measure(&[contender], plan, &Progress::new(0))?;
    if let Some(b) = samples.pop() {
        out.push((
            "the warm engine alone (no API, store or scheduling)",
            c,
            b.summary(None),
        ));
    }
    drop(warm);
    tokio.shutdown_timeout(std::time::Duration::from_secs(5));

    if !args.json {
        eprintln!(
            "running the same task {} times with `taskexec run`, one by one",
            args.baseline_tasks
        );
    }
    let exe = std::env::current_exe().context("locating the taskexec binary")?;
    let globals = local::global_flags(g);
    let plan = Plan {
        concurrency: 1,
        tasks: args.baseline_tasks,
        warmup: 1,
    };
    let contender = local::cli_contender(&exe, &globals, &program);
    let mut samples = measure::measure(&[contender], plan, &Progress::new(0))?;
    if let Some(b) = samples.pop() {
        out.push(("`taskexec run` one by one", 1, b.summary(None)));
    }
    Ok(out)
}
