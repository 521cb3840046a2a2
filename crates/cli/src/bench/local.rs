//! The trivial programs, the bare-interpreter baseline, and the contenders
//! that run a task in this process's engines (cold and warm) or in a whole
//! `taskexec run` process.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail};
use serde_json::{Value, json};
use taskexec_engine::{Cancellation, Engine};
use taskexec_model::{TaskInstance, TaskStatus};
use taskexec_runtimes::ResolvedRuntime;

use super::measure::{Contender, RunOnce, Sample};
use super::stats::Kind;

/// Script (the program is the task) or handler (a function `main(input)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `definition.mode = "script"`.
    Script,
    /// `definition.mode = "handler"`.
    Handler,
}

impl Mode {
    /// The name in task definitions and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Script => "script",
            Self::Handler => "handler",
        }
    }
}

/// A trivial program of one runtime and mode, written to its own directory
/// together with the bare equivalent.
#[derive(Debug)]
pub struct Program {
    /// Runtime name.
    pub runtime: String,
    /// Script or handler.
    pub mode: Mode,
    /// File name of the task's code.
    pub file_name: &'static str,
    /// The task's code.
    pub code: String,
    /// The task's input.
    pub input: Value,
    /// The task file (what `taskexec run` is given).
    pub task_file: PathBuf,
    /// The bare program's directory (for java, the compiled classes too).
    pub bare_dir: PathBuf,
    /// The bare program (for java, the class name `Main`).
    pub bare_file: PathBuf,
    _dir: tempfile::TempDir,
}

/// The modes a runtime is measured in.
pub fn modes(runtime: &str) -> &'static [Mode] {
    match runtime {
        "python" | "node" => &[Mode::Script, Mode::Handler],
        _ => &[Mode::Script],
    }
}

impl Program {
    /// Writes the trivial program of `runtime` in `mode` to a temp dir (and
    /// compiles the bare java class once, with the runtime's javac).
    pub fn new(rt: &ResolvedRuntime, runtime: &str, mode: Mode) -> anyhow::Result<Self> {
        let (file_name, code, bare_code) = source(runtime, mode)?;
        Self::with_source(rt, runtime, mode, file_name, code, bare_code)
    }

    /// A python handler whose file imports `module` at the top (the bare
    /// program imports it too, then calls `main`).
    pub fn python_handler_importing(rt: &ResolvedRuntime, module: &str) -> anyhow::Result<Self> {
        let code = format!("import {module}\n\n\ndef main(input):\n    return input\n");
        let bare = format!(
            "import json\nimport {module}\n\n\ndef main(input):\n    return input\n\n\nprint(json.dumps(main({{\"n\": 1}})))\n"
        );
        Self::with_source(rt, "python", Mode::Handler, "main.py", &code, &bare)
    }

    fn with_source(
        rt: &ResolvedRuntime,
        runtime: &str,
        mode: Mode,
        file_name: &'static str,
        code: &str,
        bare_code: &str,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("taskexec-bench-")
            .tempdir()
            .context("temp dir")?;
        let task_dir = dir.path().join("task");
        let bare_dir = dir.path().join("bare");
        std::fs::create_dir_all(&task_dir)?;
        std::fs::create_dir_all(&bare_dir)?;
        let task_file = task_dir.join(file_name);
        std::fs::write(&task_file, code)?;
        let mut bare_file = bare_dir.join(file_name);
        std::fs::write(&bare_file, bare_code)?;
        if runtime == "java" {
            let javac = rt.compiler.clone().context("java has no compiler")?;
            let out = Command::new(javac)
                .arg("-d")
                .arg(&bare_dir)
                .arg(&bare_file)
                .stdin(Stdio::null())
                .output()
                .context("running javac")?;
            if !out.status.success() {
                bail!("javac failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            bare_file = PathBuf::from("Main");
        }
        Ok(Self {
            runtime: runtime.to_string(),
            mode,
            file_name,
            code: code.to_string(),
            input: input(mode),
            task_file,
            bare_dir,
            bare_file,
            _dir: dir,
        })
    }

    /// The task as JSON, with these resource requirements.
    pub fn task_json(&self, resources: Value) -> Value {
        task_json(
            &self.runtime,
            self.mode,
            self.file_name,
            &self.code,
            resources,
        )
    }

    /// How the bare contender is named.
    pub fn bare_name(&self, rt: &ResolvedRuntime) -> String {
        let interp = rt.interpreter.display();
        match self.runtime.as_str() {
            "java" => format!(
                "bare {} -cp DIR Main",
                rt.interpreter
                    .file_name()
                    .map_or(interp.to_string(), |n| n.to_string_lossy().into_owned())
            ),
            _ => format!("bare {interp} {}", self.file_name),
        }
    }

    /// The bare interpreter running the same program: no sandbox, a minimal
    /// environment (like the sandbox's), the program's directory as cwd.
    pub fn bare<'a>(&'a self, rt: &ResolvedRuntime) -> Contender<'a> {
        let interpreter = rt.interpreter.clone();
        let java = self.runtime == "java";
        Contender {
            name: self.bare_name(rt),
            kind: Kind::Bare,
            run: Box::new(move || {
                let mut c = Command::new(&interpreter);
                if java {
                    // The same JVM flags the runtime uses, on the class
                    // compiled once beforehand.
                    c.args([
                        "-XX:+UseSerialGC",
                        "-XX:TieredStopAtLevel=1",
                        "-XX:-UsePerfData",
                        "-cp",
                    ])
                    .arg(&self.bare_dir);
                }
                c.arg(&self.bare_file)
                    .current_dir(&self.bare_dir)
                    .env_clear()
                    .env("PATH", "/usr/local/bin:/usr/bin:/bin")
                    .env("HOME", &self.bare_dir)
                    .env("LANG", "C.UTF-8");
                time_command(&mut c)
            }),
        }
    }
}

/// The trivial program of `runtime` in `mode`: (file name, task code, bare
/// code). The bare handler program does what the wrapper does, minus the
/// protocol: call `main`, print its JSON.
pub fn source(
    runtime: &str,
    mode: Mode,
) -> anyhow::Result<(&'static str, &'static str, &'static str)> {
    Ok(match (runtime, mode) {
        ("python", Mode::Script) => ("main.py", "pass\n", "pass\n"),
        ("node", Mode::Script) => ("main.js", "'use strict';\n", "'use strict';\n"),
        ("bash", Mode::Script) => ("main.sh", "true\n", "true\n"),
        ("java", Mode::Script) => (
            "Main.java",
            "public class Main { public static void main(String[] a) {} }\n",
            "public class Main { public static void main(String[] a) {} }\n",
        ),
        ("python", Mode::Handler) => (
            "main.py",
            "def main(input):\n    return input\n",
            "import json\n\n\ndef main(input):\n    return input\n\n\nprint(json.dumps(main({\"n\": 1})))\n",
        ),
        ("node", Mode::Handler) => (
            "main.js",
            "module.exports = async (input) => input;\n",
            "const main = async (input) => input;\nmain({ n: 1 }).then((o) => console.log(JSON.stringify(o)));\n",
        ),
        (r, m) => bail!(
            "bench has no {} program for runtime {r:?} (it knows python, node, bash and java; handler mode for python and node)",
            m.as_str()
        ),
    })
}

/// The input of a trivial task.
fn input(mode: Mode) -> Value {
    match mode {
        Mode::Script => json!({}),
        Mode::Handler => json!({"n": 1}),
    }
}

/// The trivial task of `runtime` in `mode` as JSON (a `TaskInstance`
/// without id), with these resource requirements.
pub fn trivial_task(runtime: &str, mode: Mode, resources: Value) -> anyhow::Result<Value> {
    let (file_name, code, _) = source(runtime, mode)?;
    Ok(task_json(runtime, mode, file_name, code, resources))
}

fn task_json(runtime: &str, mode: Mode, file_name: &str, code: &str, resources: Value) -> Value {
    json!({
        "definition": {
            "name": "bench",
            "mode": mode.as_str(),
            "files": [{"name": file_name, "content": code}],
            "entrypoint": file_name,
        },
        "input": input(mode),
        "executionConfig": {"runtime": runtime, "resourceRequirements": resources},
        "retryPolicy": {"maxRetries": 0, "retryInterval": 0, "backoffMultiplier": 1.0},
    })
}

/// Runs a command to its end with no input and discarded output.
pub fn time_command(cmd: &mut Command) -> anyhow::Result<Sample> {
    let t = Instant::now();
    let status = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .with_context(|| format!("running {cmd:?}"))?;
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(Sample {
        ms,
        ..Sample::default()
    })
}

/// The resources of an engine task: CPU request 1 (the cgroup weight of
/// any host process, so the bare interpreter and the task compete on equal
/// terms on a busy machine).
pub fn engine_resources(runtime: &str) -> Value {
    let timeout = if runtime == "java" { 120 } else { 30 };
    json!({"timeoutSeconds": timeout, "disk": "16Mi", "cpu": "1"})
}

/// The async runtime the engine contenders block on.
pub fn async_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// One task through `engine`, end to end (`Engine::execute`).
pub fn engine_contender<'a>(
    name: String,
    kind: Kind,
    engine: &'a Engine,
    tokio: &'a tokio::runtime::Runtime,
    task: TaskInstance,
) -> anyhow::Result<Contender<'a>> {
    let cancel = Cancellation::new().context("cancellation handle")?;
    let run: RunOnce<'a> = Box::new(move || {
        let t = Instant::now();
        let r = tokio.block_on(engine.execute(task.clone(), &cancel));
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        if r.status != TaskStatus::Completed {
            bail!(
                "the trivial task ended {:?}: {}",
                r.status,
                r.error.map(|e| e.message).unwrap_or_default()
            );
        }
        Ok(Sample {
            ms,
            phases: r.execution_metadata.phases.sandbox,
        })
    });
    Ok(Contender { name, kind, run })
}

/// One whole `taskexec run FILE` process (cold: CLI start, engine set-up,
/// the sandbox, the task, the output).
pub fn cli_contender<'a>(
    exe: &'a Path,
    globals: &'a [String],
    program: &'a Program,
) -> Contender<'a> {
    Contender {
        name: "taskexec run (whole CLI process, cold)".into(),
        kind: Kind::Cli,
        run: Box::new(move || {
            let mut c = Command::new(exe);
            c.args(globals)
                .arg("run")
                .arg(&program.task_file)
                .arg("--runtime")
                .arg(&program.runtime)
                .arg("--mode")
                .arg(program.mode.as_str())
                .arg("--input")
                .arg(program.input.to_string())
                .arg("--cpu")
                .arg("1");
            clear_taskexec_env(&mut c);
            time_command(&mut c)
        }),
    }
}

/// The global flags of this invocation, for a child `taskexec` (whose
/// `TASKEXEC_*` environment is cleared: these flags carry it).
pub fn global_flags(g: &crate::setup::GlobalArgs) -> Vec<String> {
    let mut v = vec!["--log".to_string(), g.log.clone()];
    if let Some(p) = &g.cgroup_parent {
        v.extend(["--cgroup-parent".into(), p.clone()]);
    }
    if let Some(p) = &g.runtimes_file {
        v.extend(["--runtimes-file".into(), p.display().to_string()]);
    }
    if let Some(p) = &g.launcher {
        v.extend(["--launcher".into(), p.display().to_string()]);
    }
    for i in &g.interpreters {
        v.extend(["--interpreter".into(), i.clone()]);
    }
    v
}

/// Removes every `TASKEXEC_*` variable from a child's environment.
pub fn clear_taskexec_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("TASKEXEC_") {
            cmd.env_remove(k);
        }
    }
}
