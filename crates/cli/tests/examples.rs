//! End to end: the shipped examples, handler errors, schemas, retries and the
//! task's environment, through the real `taskexec` binary.

mod util;

use serde_json::{Value, json};
use util::{example, run_code, run_task, run_task_json, taskexec};

fn run_example(file: &str, input: &str, extra: &[&str]) -> util::Run {
    let file = example(file);
    let input = format!("@{}", example(input));
    let mut args = vec!["run", file.as_str(), "--input", input.as_str(), "--json"];
    args.extend_from_slice(extra);
    taskexec(&args, &[])
}

#[test]
fn python_script_example_greets() {
    let r = run_example("python/hello.py", "input/name.json", &[]);
    r.expect(0, "COMPLETED", None);
    assert_eq!(*r.output(), json!({"greeting": "hello, ada"}));
    assert_eq!(r.result["stdout"], "greeting ada\n");
    assert_eq!(r.attempts().len(), 1);
}

#[test]
fn examples_without_an_input_greet_the_world_or_say_what_they_need() {
    for file in ["python/hello.py", "node/hello.js", "bash/hello.sh"] {
        let path = example(file);
        let r = taskexec(&["run", path.as_str(), "--json"], &[]);
        r.expect(0, "COMPLETED", None);
        assert_eq!(*r.output(), json!({"greeting": "hello, world"}), "{file}");
    }
    for file in ["python/handler.py", "node/handler.js"] {
        let path = example(file);
        let r = taskexec(&["run", path.as_str(), "--mode", "handler", "--json"], &[]);
        r.expect(1, "FAILED", Some("RUNTIME_ERROR"));
        assert!(
            r.message().contains("(pass --input)"),
            "{file}: {}",
            r.message()
        );
    }
}

#[test]
fn node_script_example_greets() {
    let r = run_example("node/hello.js", "input/name.json", &[]);
    r.expect(0, "COMPLETED", None);
    assert_eq!(*r.output(), json!({"greeting": "hello, ada"}));
    assert_eq!(r.result["stdout"], "greeting ada\n");
}

#[test]
fn bash_script_example_greets() {
    let r = run_example("bash/hello.sh", "input/name.json", &[]);
    r.expect(0, "COMPLETED", None);
    assert_eq!(*r.output(), json!({"greeting": "hello, ada"}));
    assert_eq!(r.result["stdout"], "greeting ada\n");
}

#[test]
fn java_script_example_compiles_and_greets() {
    let r = run_example("java/Main.java", "input/name.json", &["--timeout", "30s"]);
    r.expect(0, "COMPLETED", None);
    assert_eq!(*r.output(), json!({"greeting": "hello, ada"}));
    assert_eq!(r.result["stdout"], "greeting ada\n");
    assert!(
        r.result["executionMetadata"]["phases"]["compileMs"]
            .as_f64()
            .is_some_and(|ms| ms > 0.0),
        "a compile phase was timed: {}",
        r.stdout
    );
}

#[test]
fn python_handler_example_sums() {
    let r = run_example(
        "python/handler.py",
        "input/numbers.json",
        &["--mode", "handler"],
    );
    r.expect(0, "COMPLETED", None);
    assert_eq!(*r.output(), json!({"sum": 6}));
}

#[test]
fn node_handler_example_sums() {
    let r = run_example(
        "node/handler.js",
        "input/numbers.json",
        &["--mode", "handler"],
    );
    r.expect(0, "COMPLETED", None);
    assert_eq!(*r.output(), json!({"sum": 6}));
}

#[test]
fn example_task_json_completes() {
    let task = example("task.json");
    let r = taskexec(&["run", "--task", &task, "--json"], &[]);
    r.expect(0, "COMPLETED", None);
    assert_eq!(*r.output(), json!({"sum": 6}));
    assert_eq!(r.result["taskId"], "task-0001");
}

#[test]
fn java_compile_error_fails_with_the_javac_output() {
    let code = "public class Main {\n    public static void main(String[] a) {\n        int x = \"not an int\";\n    }\n}\n";
    let r = run_code(code, "java", &["--max-retries", "0"], &[]);
    r.expect(1, "FAILED", Some("COMPILATION_ERROR"));
    let out = r.details()["compilerOutput"].as_str().unwrap_or("");
    assert!(
        out.contains("Main.java:3: error: incompatible types"),
        "javac's own diagnostic in details: {}",
        r.stdout
    );
    assert!(
        r.message().contains("incompatible types"),
        "{}",
        r.message()
    );
    assert_eq!(r.attempts().len(), 1);
}

/// `--preload` (`definition.preload`): the module is loaded before the
/// task's file, cold and warm alike; one that does not import fails the
/// task with the import error, cold and warm alike; script mode refuses it.
#[test]
fn preloaded_modules_are_loaded_before_the_handler_cold_and_warm() {
    let code = "import sys\nSEEN = 'colorsys' in sys.modules\n\n\ndef main(input):\n    return {'colorsys': SEEN}\n";
    for warmth in [&[][..], &["--warm"][..]] {
        let mut flags = vec!["--mode", "handler", "--max-retries", "0"];
        flags.extend_from_slice(warmth);
        let r = run_code(code, "python", &flags, &[]);
        r.expect(0, "COMPLETED", None);
        assert_eq!(r.result["output"]["colorsys"], false, "{warmth:?}");

        flags.extend_from_slice(&["--preload", "colorsys"]);
        let r = run_code(code, "python", &flags, &[]);
        r.expect(0, "COMPLETED", None);
        assert_eq!(r.result["output"]["colorsys"], true, "{warmth:?}");

        let mut bad = flags.clone();
        bad.extend_from_slice(&["--preload", "taskexec_no_such_module"]);
        let r = run_code(code, "python", &bad, &[]);
        r.expect(1, "FAILED", Some("RUNTIME_ERROR"));
        assert!(
            r.message().starts_with(
                "PreloadError: definition.preload: cannot import taskexec_no_such_module"
            ),
            "{warmth:?}: {}",
            r.message()
        );
    }
    let r = run_code(code, "python", &["--preload", "colorsys"], &[]);
    r.expect(2, "REJECTED", Some("INPUT_VALIDATION"));
    assert_eq!(
        r.result["error"]["details"]["field"], "definition.preload",
        "{}",
        r.stdout
    );
}

#[test]
fn python_handler_exception_carries_the_traceback() {
    let code = "def helper(x):\n    return 1 / x\n\n\ndef main(input):\n    return helper(0)\n";
    let r = run_code(
        code,
        "python",
        &["--mode", "handler", "--max-retries", "0"],
        &[],
    );
    r.expect(1, "FAILED", Some("RUNTIME_ERROR"));
    assert_eq!(r.message(), "ZeroDivisionError: division by zero");
    let stack = r.details()["stackTrace"].as_str().unwrap_or("");
    assert!(
        stack.starts_with("Traceback (most recent call last):"),
        "{stack}"
    );
    assert!(stack.contains("line 2, in helper"), "{stack}");
    assert!(stack.contains("line 6, in main"), "{stack}");
    assert!(
        !stack.contains("python_handler.py"),
        "no wrapper frames: {stack}"
    );
}

#[test]
fn node_handler_exception_carries_the_js_stack() {
    let code = "function helper() { throw new RangeError('bad range'); }\nmodule.exports = async (input) => helper();\n";
    let r = run_code(
        code,
        "node",
        &["--mode", "handler", "--max-retries", "0"],
        &[],
    );
    r.expect(1, "FAILED", Some("RUNTIME_ERROR"));
    assert_eq!(r.message(), "RangeError: bad range");
    let stack = r.details()["stackTrace"].as_str().unwrap_or("");
    assert!(stack.starts_with("RangeError: bad range"), "{stack}");
    assert!(stack.contains("at helper (/task/main.js:1:"), "{stack}");
    assert!(
        !stack.contains("node_handler.js"),
        "no wrapper frames: {stack}"
    );
}

#[test]
fn non_serializable_handler_result_is_a_runtime_error_saying_so() {
    let code = "def main(input):\n    return {\"s\": {1, 2}}\n";
    let r = run_code(
        code,
        "python",
        &["--mode", "handler", "--max-retries", "0"],
        &[],
    );
    r.expect(1, "FAILED", Some("RUNTIME_ERROR"));
    assert!(
        r.message().starts_with("NotSerializable:"),
        "{}",
        r.message()
    );
    assert!(
        r.message().contains("not JSON-serializable"),
        "{}",
        r.message()
    );

    let code = "module.exports = async () => ({ f: () => 1 });\n";
    let r = run_code(
        code,
        "node",
        &["--mode", "handler", "--max-retries", "0"],
        &[],
    );
    r.expect(1, "FAILED", Some("RUNTIME_ERROR"));
    assert!(
        r.message().starts_with("NotSerializable:"),
        "{}",
        r.message()
    );
    assert!(r.message().contains("is a function"), "{}", r.message());
}

const NUMBERS_SCHEMA: &str = r#"{"type":"object","required":["numbers"],"properties":{"numbers":{"type":"array","items":{"type":"number"}}}}"#;

#[test]
fn input_schema_violation_is_rejected_with_the_path() {
    let r = run_code(
        "raise SystemExit('must not run')\n",
        "python",
        &[
            "--input",
            r#"{"numbers":[1,"two",3]}"#,
            "--input-schema",
            NUMBERS_SCHEMA,
        ],
        &[],
    );
    r.expect(2, "REJECTED", Some("INPUT_VALIDATION"));
    let violations = r.details()["violations"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let paths: Vec<&str> = violations
        .iter()
        .filter_map(|v| v["path"].as_str())
        .collect();
    assert_eq!(paths, vec!["/numbers/1"], "{}", r.stdout);
    assert!(r.attempts().is_empty(), "nothing ran");
}

#[test]
fn output_schema_violation_fails_output_validation() {
    let r = run_code(
        "def main(input):\n    return {\"sum\": \"six\"}\n",
        "python",
        &[
            "--mode",
            "handler",
            "--max-retries",
            "0",
            "--output-schema",
            r#"{"type":"object","required":["sum"],"properties":{"sum":{"type":"number"}}}"#,
        ],
        &[],
    );
    r.expect(1, "FAILED", Some("OUTPUT_VALIDATION"));
    let violations = r.details()["violations"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(violations.len(), 1, "{}", r.stdout);
    assert_eq!(violations[0]["path"], "/sum");
    assert_eq!(r.attempts().len(), 1);
}

fn retry_policy(retryable: &[&str]) -> Value {
    json!({
        "maxRetries": 2,
        "retryInterval": 10,
        "backoffMultiplier": 2,
        "retryableErrors": retryable,
    })
}

fn python_task(code: &str, policy: Value) -> Value {
    json!({
        "definition": {"name": "retry-test", "code": code},
        "executionConfig": {
            "runtime": "python",
            "resourceRequirements": {"timeoutSeconds": 5},
        },
        "retryPolicy": policy,
    })
}

fn attempt_statuses(r: &util::Run) -> Vec<String> {
    r.attempts()
        .iter()
        .map(|a| a["status"].as_str().unwrap_or("").to_string())
        .collect()
}

#[test]
fn task_failing_twice_then_succeeding_completes_on_the_third_attempt() {
    let code = "import json, os, sys\n\
                n = int(os.environ['TASK_ATTEMPT'])\n\
                if n < 3:\n    sys.exit(1)\n\
                with open(os.environ['TASK_OUTPUT'], 'w') as f:\n    json.dump({'attempt': n}, f)\n";
    let r = run_task_json(&python_task(code, retry_policy(&["RUNTIME_ERROR"])), &[]);
    r.expect(0, "COMPLETED", None);
    assert_eq!(*r.output(), json!({"attempt": 3}));
    assert_eq!(attempt_statuses(&r), ["FAILED", "FAILED", "COMPLETED"]);
    for (i, a) in r.attempts().iter().enumerate() {
        assert_eq!(a["attempt"], i + 1);
    }
    assert_eq!(r.attempts()[0]["error"]["type"], "RUNTIME_ERROR");
}

#[test]
fn task_always_failing_exceeds_max_retries_after_three_attempts() {
    let code = "import sys\nsys.exit(3)\n";
    let r = run_task_json(&python_task(code, retry_policy(&["RUNTIME_ERROR"])), &[]);
    r.expect(1, "FAILED", Some("MAX_RETRIES_EXCEEDED"));
    assert_eq!(attempt_statuses(&r), ["FAILED", "FAILED", "FAILED"]);
    assert_eq!(r.details()["lastError"]["type"], "RUNTIME_ERROR");
    assert_eq!(
        r.details()["attemptErrors"].as_array().map(Vec::len),
        Some(3)
    );
}

#[test]
fn compilation_error_is_not_retried_even_when_listed() {
    let task = json!({
        "definition": {
            "name": "broken-java",
            "files": [{"name": "Main.java", "content": "public class Main { syntax error }\n"}],
            "entrypoint": "Main.java",
        },
        "executionConfig": {"runtime": "java", "resourceRequirements": {"timeoutSeconds": 30}},
        "retryPolicy": retry_policy(&["COMPILATION_ERROR", "RUNTIME_ERROR"]),
    });
    let r = run_task_json(&task, &[]);
    r.expect(1, "FAILED", Some("COMPILATION_ERROR"));
    assert_eq!(attempt_statuses(&r), ["FAILED"]);
}

#[test]
fn input_validation_is_not_retried_even_when_listed() {
    let mut task = python_task(
        "raise SystemExit('must not run')\n",
        retry_policy(&["INPUT_VALIDATION"]),
    );
    task["definition"]["inputSchema"] = serde_json::from_str(NUMBERS_SCHEMA).expect("schema");
    task["input"] = json!({"numbers": "not a list"});
    let r = run_task_json(&task, &[]);
    r.expect(2, "REJECTED", Some("INPUT_VALIDATION"));
    assert!(r.attempts().is_empty(), "nothing ran: {}", r.stdout);
}

/// Every variable the task may see, besides its own environmentVariables.
const PROTOCOL_VARS: [&str; 11] = [
    "TASK_ID",
    "WORKFLOW_ID",
    "TASK_INPUT",
    "TASK_OUTPUT",
    "TASK_ERROR",
    "TASK_ATTEMPT",
    "PATH",
    "HOME",
    "LANG",
    "PYTHONDONTWRITEBYTECODE",
    "PYTHONUNBUFFERED",
];

/// Reports the raw environment block (duplicates included) as a list of
/// [name, value] pairs.
const DUMP_ENV: &str = "import json, os\n\
    raw = open('/proc/self/environ', 'rb').read().split(b'\\0')\n\
    pairs = [e.decode().split('=', 1) for e in raw if e]\n\
    print(os.environ)\n\
    with open(os.environ['TASK_OUTPUT'], 'w') as f:\n    json.dump(pairs, f)\n";

fn env_pairs(r: &util::Run) -> Vec<(String, String)> {
    r.output()
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|p| {
            (
                p[0].as_str().unwrap_or("").to_string(),
                p[1].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[test]
fn task_sees_exactly_its_variables_and_the_protocol_ones() {
    let secret = util::unique("secret-value");
    let mut task = python_task(DUMP_ENV, retry_policy(&[]));
    task["id"] = json!("env-task-1");
    task["workflowInstanceId"] = json!("wf-env-7");
    task["executionConfig"]["environmentVariables"] = json!({"GREETING": "hi there", "EMPTY": ""});
    let mut file = tempfile::NamedTempFile::new().expect("temp");
    serde_json::to_writer(&mut file, &task).expect("write");
    let path = file.path().to_string_lossy().into_owned();
    let r = taskexec(
        &["run", "--task", &path, "--json"],
        &[("TASKEXEC_TEST_SECRET", &secret), ("HOSTONLY_VAR", "1")],
    );
    r.expect(0, "COMPLETED", None);
    let pairs = env_pairs(&r);
    let mut names: Vec<&str> = pairs.iter().map(|(k, _)| k.as_str()).collect();
    names.sort_unstable();
    let mut expected: Vec<&str> = PROTOCOL_VARS.to_vec();
    expected.extend(["GREETING", "EMPTY"]);
    expected.sort_unstable();
    assert_eq!(names, expected, "exactly these, each once");
    let get = |k: &str| {
        pairs
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
            .unwrap_or("<unset>")
    };
    assert_eq!(get("TASK_ID"), "env-task-1");
    assert_eq!(get("WORKFLOW_ID"), "wf-env-7");
    assert_eq!(get("TASK_ATTEMPT"), "1");
    assert_eq!(get("TASK_INPUT"), "/task/.taskexec/input.json");
    assert_eq!(get("TASK_OUTPUT"), "/task/.taskexec/output.json");
    assert_eq!(get("TASK_ERROR"), "/task/.taskexec/error.json");
    assert_eq!(get("HOME"), "/task");
    assert_eq!(get("PATH"), "/usr/local/bin:/usr/bin:/bin");
    assert_eq!(get("LANG"), "C.UTF-8");
    assert_eq!(get("GREETING"), "hi there");
    assert_eq!(get("EMPTY"), "");
    assert!(
        !r.stdout.contains(&secret),
        "the executor's environment leaked into the task"
    );
    assert!(
        r.result["stdout"]
            .as_str()
            .unwrap_or("")
            .contains("GREETING")
    );
}

#[test]
fn task_variable_overrides_a_runtime_default_without_duplicates() {
    let r = run_code(DUMP_ENV, "python", &["--env", "PYTHONUNBUFFERED=0"], &[]);
    r.expect(0, "COMPLETED", None);
    let pairs = env_pairs(&r);
    let values: Vec<&str> = pairs
        .iter()
        .filter(|(k, _)| k == "PYTHONUNBUFFERED")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(values, ["0"], "one entry, the task's own value");
}

#[test]
fn nonzero_exit_is_a_runtime_error_with_the_exit_code() {
    let (code, result) = run_task(
        "import sys\nsys.exit(4)\n",
        "python",
        &["--max-retries", "0"],
    );
    assert_eq!(code, 1);
    assert_eq!(result["status"], "FAILED");
    assert_eq!(result["error"]["type"], "RUNTIME_ERROR");
    assert_eq!(result["exitCode"], 4);
}

/// `taskexec run ... | head`: a reader that goes away early ends the output
/// quietly, with the task's own exit code, not a panic.
#[test]
fn a_reader_that_goes_away_ends_the_output_quietly() {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("big.py");
    // Far more than a pipe holds, so the write meets the closed pipe.
    std::fs::write(&file, "print('x' * 400000)\n").expect("write");
    let mut child = Command::new(env!("CARGO_BIN_EXE_taskexec"))
        .args(["run", &file.to_string_lossy(), "--json"])
        .env_remove("TASKEXEC_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn taskexec");
    let mut first = [0u8; 16];
    child
        .stdout
        .take()
        .expect("stdout")
        .read_exact(&mut first)
        .expect("the start of the output");
    // The read end is closed here, long before the output is written out.
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(String::from_utf8_lossy(&first).starts_with('{'));
}

/// Every command's output goes through the same quiet writer: `taskexec
/// runtimes` into a pipe whose reader is already gone ends with success
/// and no panic (a `println!` would panic on the broken pipe).
#[test]
fn a_closed_output_pipe_is_not_a_panic_for_listing_commands() {
    use std::process::{Command, Stdio};
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_taskexec"))
        .args(["runtimes"])
        .env_remove("TASKEXEC_LOG")
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("run taskexec runtimes");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
}

/// An output larger than `--max-result-bytes` fails the task, naming the
/// cap; a huge array of small values checked against a schema is refused
/// by its count; without a schema it completes as compact JSON.
#[test]
fn large_outputs_are_capped_counted_and_kept_compact() {
    let code = "def main(input):\n    return [0] * 100000\n";
    let handler = ["--mode", "handler", "--max-retries", "0"];
    let r = run_code(
        code,
        "python",
        &[&handler[..], &["--max-result-bytes", "64Ki"]].concat(),
        &[],
    );
    r.expect(1, "FAILED", Some("RESOURCE_EXHAUSTION"));
    assert!(
        r.message().contains("--max-result-bytes"),
        "{}",
        r.message()
    );
    assert_eq!(r.details()["limit"], 65536);
    assert_eq!(r.details()["bytes"], 200_001);
    assert_eq!(r.result["output"], Value::Null);

    let r = run_code(
        code,
        "python",
        &[&handler[..], &["--output-schema", r#"{"type":"array"}"#]].concat(),
        &[],
    );
    r.expect(1, "FAILED", Some("RESOURCE_EXHAUSTION"));
    assert_eq!(r.details()["resource"], "output");
    assert_eq!(r.details()["values"], 100_001);
    assert_eq!(r.details()["limit"], 65_536);

    // The handler writes "[0, 0, ...]"; the result holds "[0,0,...]".
    let r = run_code(code, "python", &handler, &[]);
    r.expect(0, "COMPLETED", None);
    assert_eq!(r.output().as_array().map(Vec::len), Some(100_000));
    // Printed as stored, compact, even inside the pretty-printed result.
    assert!(
        r.stdout.contains(r#""output": [0,0,0,"#),
        "{}",
        &r.stdout[..300]
    );
}
