//! Runs the plans of the built-in runtimes for the repository's examples and
//! the handler wrappers' error paths with the real interpreters of this host,
//! outside any sandbox: `/task` and `/opt/taskexec` in the argv are rewritten
//! to temporary directories. A runtime that is not installed here is skipped.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use taskexec_model::{Mode, TaskDefinition, TaskInstance};
use taskexec_runtimes::{Catalogue, Plan, ResolvedRuntime, plan};

const WORK: &str = "/task";
const SUPPORT: &str = "/opt/taskexec";
const MEMORY: u64 = 256 << 20;

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

fn example(path: &str) -> String {
    fs::read_to_string(examples_dir().join(path)).expect("example file exists")
}

fn resolved(runtime: &str) -> Option<ResolvedRuntime> {
    match Catalogue::builtin().resolve(runtime) {
        Ok(rt) => Some(rt),
        Err(e) => {
            eprintln!("skipping {runtime}: {e}");
            None
        }
    }
}

fn definition(mode: Mode, code: &str) -> TaskDefinition {
    serde_json::from_value(serde_json::json!({ "mode": mode, "code": code }))
        .expect("a valid definition")
}

#[derive(Debug)]
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    output: Option<serde_json::Value>,
    error: Option<serde_json::Value>,
}

fn rewrite(arg: &str, work: &Path, support: &Path) -> String {
    if let Some(rest) = arg.strip_prefix(SUPPORT) {
        format!("{}{rest}", support.display())
    } else if let Some(rest) = arg.strip_prefix(WORK) {
        format!("{}{rest}", work.display())
    } else {
        arg.to_string()
    }
}

fn run_argv(
    argv: &[String],
    plan: &Plan,
    work: &Path,
    support: &Path,
) -> (Option<i32>, String, String) {
    let argv: Vec<String> = argv.iter().map(|a| rewrite(a, work, support)).collect();
    let control = work.join(".taskexec");
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .current_dir(work)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", work)
        .env("LANG", "C.UTF-8")
        .env("TASK_INPUT", control.join("input.json"))
        .env("TASK_OUTPUT", control.join("output.json"))
        .env("TASK_ERROR", control.join("error.json"))
        .envs(plan.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawns");
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().expect("waits").is_none() {
        assert!(Instant::now() < deadline, "{argv:?} timed out");
        thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("collects output");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn run(rt: &ResolvedRuntime, def: &TaskDefinition, input: &str) -> Outcome {
    let plan = plan(rt, def, MEMORY).expect("plans");
    let dir = tempfile::tempdir().expect("tempdir");
    let work = dir.path().join("work");
    let support = dir.path().join("support");
    let control = work.join(".taskexec");
    fs::create_dir_all(&control).expect("mkdir");
    fs::create_dir_all(&support).expect("mkdir");
    for (base, files) in [(&work, &plan.files), (&support, &plan.support_files)] {
        for file in files {
            let path = base.join(&file.path);
            fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            fs::write(&path, &file.content).expect("write");
        }
    }
    fs::write(control.join("input.json"), input).expect("write input");

    if let Some(compile) = &plan.compile {
        fs::create_dir_all(work.join(&compile.output_dir)).expect("mkdir");
        let (code, stdout, stderr) = run_argv(&compile.argv, &plan, &work, &support);
        assert_eq!(code, Some(0), "compile failed:\n{stdout}\n{stderr}");
    }
    let (code, stdout, stderr) = run_argv(&plan.argv, &plan, &work, &support);
    let read_json = |name: &str| {
        fs::read_to_string(control.join(name))
            .ok()
            .map(|text| serde_json::from_str(&text).expect("a JSON file"))
    };
    Outcome {
        code,
        stdout,
        stderr,
        output: read_json("output.json"),
        error: read_json("error.json"),
    }
}

fn assert_greets(outcome: &Outcome) {
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    assert_eq!(
        outcome.output,
        Some(serde_json::json!({"greeting": "hello, ada"})),
        "{outcome:?}"
    );
    assert!(outcome.stdout.contains("ada"), "{outcome:?}");
}

fn assert_sums(outcome: &Outcome) {
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    assert_eq!(
        outcome.output,
        Some(serde_json::json!({"sum": 6})),
        "{outcome:?}"
    );
    assert!(outcome.error.is_none(), "{outcome:?}");
}

fn assert_error(outcome: &Outcome, kind: &str, message_part: &str) {
    assert_eq!(outcome.code, Some(1), "{outcome:?}");
    assert!(outcome.output.is_none(), "{outcome:?}");
    let error = outcome.error.as_ref().expect("an error report");
    assert_eq!(error["type"], kind, "{outcome:?}");
    let message = error["message"].as_str().expect("a message");
    assert!(message.contains(message_part), "{outcome:?}");
    assert!(error["stack"].is_string(), "{outcome:?}");
}

#[test]
fn script_examples_greet() {
    let name = example("input/name.json");
    for (runtime, file) in [
        ("python", "python/hello.py"),
        ("node", "node/hello.js"),
        ("java", "java/Main.java"),
        ("bash", "bash/hello.sh"),
    ] {
        let Some(rt) = resolved(runtime) else {
            continue;
        };
        let outcome = run(&rt, &definition(Mode::Script, &example(file)), &name);
        assert_greets(&outcome);
    }
}

#[test]
fn handler_examples_sum() {
    let numbers = example("input/numbers.json");
    for (runtime, file) in [("python", "python/handler.py"), ("node", "node/handler.js")] {
        let Some(rt) = resolved(runtime) else {
            continue;
        };
        assert_sums(&run(
            &rt,
            &definition(Mode::Handler, &example(file)),
            &numbers,
        ));
    }
}

#[test]
fn python_wrapper_error_paths() {
    let Some(rt) = resolved("python") else { return };
    let handler = |code: &str| run(&rt, &definition(Mode::Handler, code), "{\"x\": 1}");

    let outcome = handler(
        "class Boom(Exception):\n    pass\n\ndef main(input):\n    raise Boom('no ' + str(input['x']))\n",
    );
    assert_error(&outcome, "Boom", "no 1");
    let stack = outcome.error.as_ref().expect("report")["stack"]
        .as_str()
        .expect("text")
        .to_string();
    assert!(stack.contains("line 5, in main"), "{stack}");
    assert!(
        !stack.contains("python_handler.py"),
        "wrapper frames are left out: {stack}"
    );
    assert!(outcome.stderr.contains("Traceback"), "{outcome:?}");

    assert_error(
        &handler("def main(input):\n    return {1, 2}\n"),
        "NotSerializable",
        "handler return value is not JSON-serializable",
    );
    assert_error(
        &handler("def main(input):\n    return float('nan')\n"),
        "NotSerializable",
        "not JSON-serializable",
    );
    assert_error(
        &handler("x = 1\n"),
        "HandlerNotFound",
        "handler mode needs a function main(input) in ",
    );
    assert_error(&handler("def main(input) oops\n"), "SyntaxError", "");

    let outcome = handler(
        "import asyncio\n\nasync def main(input):\n    await asyncio.sleep(0)\n    return [input['x'], 'ü']\n",
    );
    assert_eq!(
        outcome.output,
        Some(serde_json::json!([1, "ü"])),
        "{outcome:?}"
    );
}

#[test]
fn python_handler_imports_sibling_files() {
    let Some(rt) = resolved("python") else { return };
    let def: TaskDefinition = serde_json::from_value(serde_json::json!({
        "mode": "handler",
        "files": [
            {"name": "main.py", "content": "from lib.util import double\n\ndef main(input):\n    return double(input)\n"},
            {"name": "lib/__init__.py", "content": ""},
            {"name": "lib/util.py", "content": "def double(x):\n    return 2 * x\n"},
        ],
    }))
    .expect("a valid definition");
    let outcome = run(&rt, &def, "21");
    assert_eq!(outcome.output, Some(serde_json::json!(42)), "{outcome:?}");
}

#[test]
fn node_wrapper_error_paths() {
    let Some(rt) = resolved("node") else { return };
    let handler = |code: &str| run(&rt, &definition(Mode::Handler, code), "{\"x\": 1}");

    let outcome = handler(
        "class Boom extends Error {}\nexports.main = async (input) => { throw new Boom('no ' + input.x); };\n",
    );
    assert_error(&outcome, "Boom", "no 1");
    let stack = outcome.error.as_ref().expect("report")["stack"]
        .as_str()
        .expect("text")
        .to_string();
    assert!(
        stack.contains("/task/main.js:2") || stack.contains("main.js:2"),
        "{stack}"
    );
    assert!(
        !stack.contains("node_handler.js"),
        "wrapper frames are left out: {stack}"
    );

    assert_error(
        &handler("exports.main = () => ({ f() {} });\n"),
        "NotSerializable",
        "handler return value is not JSON-serializable",
    );
    assert_error(
        &handler("exports.main = () => 10n;\n"),
        "NotSerializable",
        "BigInt",
    );
    assert_error(
        &handler("exports.main = () => { const a = {}; a.a = a; return a; };\n"),
        "NotSerializable",
        "circular",
    );
    assert_error(
        &handler("exports.main = () => undefined;\n"),
        "NotSerializable",
        "undefined",
    );
    assert_error(
        &handler("exports.x = 1;\n"),
        "HandlerNotFound",
        "handler mode needs a function main(input) in ",
    );

    let outcome = handler(
        "exports.default = (input) => { setInterval(() => {}, 1000); return [input.x, 'ü']; };\n",
    );
    assert_eq!(
        outcome.output,
        Some(serde_json::json!([1, "ü"])),
        "{outcome:?}"
    );
}

#[test]
fn task_json_example_is_a_valid_task() {
    let task: TaskInstance =
        serde_json::from_str(&example("task.json")).expect("parses as a TaskInstance");
    task.validate_static().expect("valid");
    assert_eq!(task.definition.mode, Mode::Handler);
    assert_eq!(task.execution_config.runtime.as_deref(), Some("python"));
    let Some(rt) = resolved("python") else { return };
    let outcome = run(&rt, &task.definition, &task.input.to_string());
    assert_sums(&outcome);
}

#[test]
fn example_inputs_are_json() {
    for file in ["input/name.json", "input/numbers.json"] {
        serde_json::from_str::<serde_json::Value>(&example(file)).expect("JSON");
    }
}
