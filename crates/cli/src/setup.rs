//! Shared start-up: global flags, logging, and building the engine (cgroup
//! detection, runtime catalogue, sandbox). The global flags' variables are
//! read here; those of `serve` and `worker` in [`crate::config`].

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, ValueEnum};
use taskexec_engine::{AttemptRunner, Engine, EngineConfig, SystemClock};
use taskexec_runtimes::Catalogue;
use taskexec_sandbox::{
    LauncherCommand, Sandbox, SandboxConfig, TaskUids, WarmConfig, WarmSandbox, cgroup,
};

/// Log output format.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Flags shared by every command.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Log format on stderr.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "TASKEXEC_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    /// Log filter (tracing env-filter syntax), e.g. "info" or "taskexec_engine=debug".
    #[arg(long, global = true, default_value = "warn", env = "TASKEXEC_LOG")]
    pub log: String,
    /// Parent cgroup for task cgroups, relative to the hierarchy root
    /// (default: the executor's own cgroup).
    #[arg(long, global = true, env = "TASKEXEC_CGROUP_PARENT")]
    pub cgroup_parent: Option<String>,
    /// A runtime catalogue (TOML) laid over the built-in one.
    #[arg(long, global = true, env = "TASKEXEC_RUNTIMES")]
    pub runtimes_file: Option<PathBuf>,
    /// The sandbox launcher binary (default: `taskexec-launcher` beside this
    /// binary when installed, else this binary itself).
    #[arg(long, global = true, env = "TASKEXEC_LAUNCHER")]
    pub launcher: Option<PathBuf>,
    /// Override a runtime's interpreter: NAME=/abs/path (repeatable).
    #[arg(long = "interpreter", global = true, value_name = "NAME=PATH")]
    pub interpreters: Vec<String>,
    /// The host uids tasks run as, START-END (default
    /// 2130706432-2130771967): each running task gets one of its own, each
    /// fork server a block of 65. Use ids no host account or other executor
    /// on the host uses; they may not overlap the `runAs` ids (60000-65534).
    #[arg(
        long,
        global = true,
        env = "TASKEXEC_TASK_UIDS",
        value_name = "START-END"
    )]
    pub task_uids: Option<String>,
}

/// The task uid range of `--task-uids`, checked against the ids `runAs`
/// may name.
pub fn task_uids(
    flag: Option<&str>,
    run_as: &std::ops::RangeInclusive<u32>,
) -> anyhow::Result<TaskUids> {
    let uids = match flag {
        Some(text) => TaskUids::parse(text).context("--task-uids")?,
        None => TaskUids::DEFAULT,
    };
    uids.disjoint_from("runAs", run_as)
        .context("--task-uids: task uids must not be ids a task may ask for with runAs")
}

/// Arguments of `taskexec runtimes`.
#[derive(Debug, Args)]
pub struct RuntimesArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Sets up tracing on stderr.
pub fn init_logging(g: &GlobalArgs) {
    let filter = tracing_subscriber::EnvFilter::try_new(&g.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match g.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder
            .with_target(false)
            .with_ansi(use_colour(
                std::io::stderr().is_terminal(),
                std::env::var_os("NO_COLOR").as_deref(),
            ))
            .init(),
    }
}

/// Colour in log lines only on a terminal, and never when `NO_COLOR` is set
/// to anything but the empty string (<https://no-color.org>).
fn use_colour(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

/// The runtime catalogue with the operator's overrides.
pub fn catalogue(g: &GlobalArgs) -> anyhow::Result<Catalogue> {
    let mut cat = Catalogue::builtin();
    if let Some(path) = &g.runtimes_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--runtimes-file: cannot read {}", path.display()))?;
        cat = cat
            .overlay_toml_str(&text)
            .with_context(|| format!("--runtimes-file {}", path.display()))?;
    }
    for spec in &g.interpreters {
        let (name, path) = spec
            .split_once('=')
            .with_context(|| format!("--interpreter {spec:?}: expected NAME=/absolute/path"))?;
        cat.set_interpreter(name, PathBuf::from(path))
            .with_context(|| format!("--interpreter {spec:?}"))?;
    }
    Ok(cat)
}

/// How the engine starts sandboxes.
#[derive(Debug, Clone)]
pub enum Warmth {
    /// Every task in a sandbox built for it on the spot (`taskexec run`).
    Cold,
    /// Pre-built sandboxes and fork servers, sized as by default
    /// ([`default_warm_config`]).
    Warm,
    /// Pre-built sandboxes and fork servers as configured (`serve`,
    /// `worker`).
    Configured(WarmConfig),
}

/// The warm runner's default settings: the pool's default sizing, fork
/// servers on.
pub fn default_warm_config() -> WarmConfig {
    WarmConfig {
        fork_servers: true,
        ..WarmConfig::default()
    }
}

/// The smallest `--max-result-bytes`.
const MIN_RESULT_BYTES: u64 = 1 << 10;
/// The largest `--max-result-bytes` (SQLite stores at most 10^9 bytes in
/// one value, and a result holds more than its output).
const MAX_RESULT_BYTES: u64 = 512 << 20;

/// `--max-result-bytes` as given (flag, variable or file), or the default
/// ([`taskexec_engine::DEFAULT_MAX_RESULT_BYTES`]).
pub fn max_result_bytes(raw: Option<&str>) -> anyhow::Result<u64> {
    let Some(raw) = raw else {
        return Ok(taskexec_engine::DEFAULT_MAX_RESULT_BYTES);
    };
    let expected = "expected a byte quantity from 1Ki to 512Mi, e.g. 16Mi or 4194304";
    let bytes = taskexec_model::parse_bytes(raw)
        .map_err(|e| anyhow::anyhow!("--max-result-bytes {raw:?}: {e}; {expected}"))?;
    if !(MIN_RESULT_BYTES..=MAX_RESULT_BYTES).contains(&bytes) {
        anyhow::bail!("--max-result-bytes {raw:?}: out of range; {expected}");
    }
    Ok(bytes)
}

/// The engine over a real sandbox; an output over `max_result_bytes` fails
/// its attempt instead of being stored ([`EngineConfig::max_result_bytes`]).
pub fn engine(g: &GlobalArgs, warmth: Warmth, max_result_bytes: u64) -> anyhow::Result<Engine> {
    let engine_config = EngineConfig {
        max_result_bytes,
        ..EngineConfig::default()
    };
    let task_uids = task_uids(g.task_uids.as_deref(), &engine_config.run_as)?;
    let cgroups = cgroup::detect(g.cgroup_parent.as_deref()).context("cgroups")?;
    let stale = cgroups.remove_stale();
    if stale > 0 {
        tracing::info!(
            removed = stale,
            "removed task cgroups left by an executor that was killed"
        );
    }
    let launcher = match &g.launcher {
        Some(p) => LauncherCommand { program: p.clone() },
        None => LauncherCommand::beside_current_exe().context("locating the taskexec binary")?,
    };
    let sandbox = Sandbox::new(
        SandboxConfig {
            task_uids,
            ..SandboxConfig::new(launcher)
        },
        cgroups,
    );
    let runner: Arc<dyn AttemptRunner> = match warmth {
        Warmth::Cold => Arc::new(sandbox),
        Warmth::Warm => Arc::new(WarmSandbox::new(sandbox, default_warm_config())),
        Warmth::Configured(config) => Arc::new(WarmSandbox::new(sandbox, config)),
    };
    Ok(Engine::new(
        engine_config,
        catalogue(g)?,
        runner,
        Arc::new(SystemClock::default()),
    ))
}

/// `taskexec runtimes`.
pub fn runtimes(g: &GlobalArgs, args: RuntimesArgs) -> anyhow::Result<ExitCode> {
    let cat = catalogue(g)?;
    let mut rows = Vec::new();
    for name in cat.names() {
        let row = match cat.resolve(name) {
            Ok(rt) => {
                let version = rt.version().unwrap_or_else(|e| format!("unknown ({e})"));
                serde_json::json!({
                    "name": name,
                    "available": true,
                    "version": version,
                    "interpreter": rt.interpreter,
                    "compiler": rt.compiler,
                    "handlerMode": rt.spec.handler.is_some(),
                    "extensions": rt.spec.extensions,
                })
            }
            Err(e) => serde_json::json!({"name": name, "available": false, "error": e.to_string()}),
        };
        rows.push(row);
    }
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        let mut table = crate::table::Table::new(&[
            "RUNTIME",
            "AVAILABLE",
            "VERSION",
            "HANDLER",
            "INTERPRETER",
        ]);
        for r in &rows {
            let s = |k: &str| r[k].as_str().unwrap_or("-").to_string();
            if r["available"] == true {
                let handler = if r["handlerMode"] == true {
                    "yes"
                } else {
                    "no"
                };
                table.row(vec![
                    s("name"),
                    "yes".into(),
                    s("version"),
                    handler.into(),
                    s("interpreter"),
                ]);
            } else {
                table.row(vec![s("name"), "no".into(), s("error")]);
            }
        }
        out!("{}", table.render());
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_colour_only_on_a_terminal_without_no_color() {
        let set = std::ffi::OsStr::new("1");
        let empty = std::ffi::OsStr::new("");
        assert!(use_colour(true, None));
        assert!(use_colour(true, Some(empty)));
        assert!(!use_colour(true, Some(set)));
        assert!(!use_colour(false, None));
    }
}
