//! End to end: bad flags and bad tasks exit 2 with one clear message naming
//! the field or flag and the accepted form, and nothing runs.

mod util;

use serde_json::json;
use util::{Run, example, run_task_json, taskexec};

/// A usage error found before any TaskResult exists: exit 2, nothing on
/// stdout, one line on stderr naming `flag` and holding every `needle`.
fn assert_usage_error(r: &Run, flag: &str, needles: &[&str]) {
    assert_eq!(r.code, 2, "exit code; stderr: {}", r.stderr);
    assert!(r.stdout.is_empty(), "no result printed: {}", r.stdout);
    let msg = r.stderr.trim_end();
    assert_eq!(msg.lines().count(), 1, "one message: {msg}");
    assert!(msg.starts_with("taskexec: "), "{msg}");
    assert!(msg.contains(flag), "names {flag}: {msg}");
    for n in needles {
        assert!(msg.contains(n), "mentions {n:?}: {msg}");
    }
}

/// A rejection: exit 2, REJECTED INPUT_VALIDATION on `field`, the message
/// holding every `needle`, no attempt, never RUNNING, nothing on stderr.
fn assert_rejected(r: &Run, field: &str, needles: &[&str]) {
    r.expect(2, "REJECTED", Some("INPUT_VALIDATION"));
    assert_eq!(r.details()["field"], field, "{}", r.stdout);
    let msg = r.message();
    assert!(msg.contains(&format!("`{field}`")), "names {field}: {msg}");
    for n in needles {
        assert!(msg.contains(n), "mentions {n:?}: {msg}");
    }
    assert!(r.attempts().is_empty(), "nothing ran: {}", r.stdout);
    let history = r.result["history"].as_array().cloned().unwrap_or_default();
    assert!(
        history.iter().all(|h| h["to"] != "RUNNING"),
        "never running: {history:?}"
    );
    assert_eq!(history.last().map(|h| &h["to"]), Some(&json!("REJECTED")));
    assert!(
        r.stderr.is_empty(),
        "the message is in the result: {}",
        r.stderr
    );
}

fn run_hello(extra: &[&str]) -> Run {
    let file = example("python/hello.py");
    let mut args = vec!["run", file.as_str(), "--json"];
    args.extend_from_slice(extra);
    taskexec(&args, &[])
}

#[test]
fn unknown_runtime_is_rejected_listing_the_known_ones() {
    let r = run_hello(&["--runtime", "cobol"]);
    assert_rejected(
        &r,
        "executionConfig.runtime",
        &[
            "\"cobol\"",
            "expected one of:",
            "python",
            "node",
            "java",
            "bash",
        ],
    );
}

#[test]
fn missing_file_is_a_usage_error_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nope.py");
    let missing = missing.to_string_lossy();
    let r = taskexec(&["run", &missing, "--json"], &[]);
    assert_usage_error(&r, "FILE", &[&missing, "No such file"]);
}

#[test]
fn input_that_is_not_json_is_a_usage_error() {
    let r = run_hello(&["--input", "{name: ada"]);
    assert_usage_error(
        &r,
        "--input",
        &["not valid JSON", "expected a JSON document"],
    );
}

#[test]
fn input_file_that_is_not_json_is_a_usage_error_naming_the_file() {
    let mut file = tempfile::NamedTempFile::new().expect("temp");
    std::io::Write::write_all(&mut file, b"not json").expect("write");
    let arg = format!("@{}", file.path().display());
    let r = run_hello(&["--input", &arg]);
    let path = file.path().to_string_lossy();
    assert_usage_error(&r, "--input", &["not valid JSON", &path]);
}

#[test]
fn malformed_memory_quantity_is_a_usage_error_with_the_accepted_suffixes() {
    let r = run_hello(&["--memory", "12Zi"]);
    assert_usage_error(&r, "--memory", &["\"12Zi\"", "Ki, Mi, Gi", "128Mi"]);
}

#[test]
fn zero_timeout_is_rejected_with_the_accepted_range() {
    let r = run_hello(&["--timeout", "0"]);
    assert_rejected(
        &r,
        "executionConfig.resourceRequirements.timeoutSeconds",
        &["greater than 0", "at most 86400"],
    );
}

#[test]
fn timeout_over_the_maximum_is_rejected_with_the_accepted_range() {
    let r = run_hello(&["--timeout", "100000h"]);
    assert_rejected(
        &r,
        "executionConfig.resourceRequirements.timeoutSeconds",
        &["360000000 is out of range", "at most 86400 (24h)"],
    );
}

#[test]
fn unparsable_timeout_is_a_usage_error() {
    let r = run_hello(&["--timeout", "soon"]);
    assert_usage_error(&r, "--timeout", &["\"soon\""]);
}

#[test]
fn invalid_json_schema_is_rejected() {
    let r = run_hello(&["--input-schema", r#"{"type":"strnig"}"#]);
    assert_rejected(
        &r,
        "definition.inputSchema",
        &["not a valid JSON Schema", "strnig"],
    );
    let r = run_hello(&["--output-schema", r#"{"minLength":-1}"#]);
    assert_rejected(&r, "definition.outputSchema", &["not a valid JSON Schema"]);
}

#[test]
fn reserved_environment_variables_are_rejected() {
    for name in ["TASK_ATTEMPT", "TASK_OUTPUT", "PATH"] {
        let kv = format!("{name}=/evil");
        let r = run_hello(&["--env", &kv]);
        assert_rejected(
            &r,
            &format!("executionConfig.environmentVariables.{name}"),
            &["is set by the executor", "expected a name other than"],
        );
    }
}

#[test]
fn env_flag_without_equals_is_a_usage_error() {
    let r = run_hello(&["--env", "JUSTANAME"]);
    assert_usage_error(&r, "--env", &["expected K=V"]);
}

fn task_with_file(name: &str) -> serde_json::Value {
    json!({
        "definition": {
            "name": "traversal",
            "files": [
                {"name": "main.py", "content": "print('must not run')\n"},
                {"name": name, "content": "x"},
            ],
            "entrypoint": "main.py",
        },
        "executionConfig": {"runtime": "python"},
    })
}

#[test]
fn parent_dir_file_name_is_rejected() {
    for name in ["../x", "a/../../x"] {
        let r = run_task_json(&task_with_file(name), &[]);
        assert_rejected(
            &r,
            "definition.files[1].name",
            &["has a .. component", "expected a relative path"],
        );
    }
}

#[test]
fn absolute_file_name_is_rejected() {
    let r = run_task_json(&task_with_file("/etc/x"), &[]);
    assert_rejected(
        &r,
        "definition.files[1].name",
        &["\"/etc/x\" is absolute", "expected a relative path"],
    );
}

#[test]
fn file_name_in_the_control_dir_is_rejected() {
    let r = run_task_json(&task_with_file(".taskexec/output.json"), &[]);
    assert_rejected(
        &r,
        "definition.files[1].name",
        &["reserved directory", "expected a relative path"],
    );
}

#[test]
fn task_file_that_is_not_a_task_instance_is_a_usage_error() {
    let mut file = tempfile::NamedTempFile::new().expect("temp");
    std::io::Write::write_all(&mut file, br#"{"definition": {"code": "x"}, "bogus": 1}"#)
        .expect("write");
    let path = file.path().to_string_lossy().into_owned();
    let r = taskexec(&["run", "--task", &path, "--json"], &[]);
    assert_usage_error(&r, "--task", &["not a valid TaskInstance", "bogus"]);
}

#[test]
fn a_task_uid_range_that_is_malformed_or_overlaps_run_as_is_a_usage_error() {
    let r = run_hello(&["--task-uids", "5"]);
    assert_usage_error(&r, "--task-uids", &["\"5\"", "START-END"]);
    let r = run_hello(&["--task-uids", "60000-70000"]);
    assert_usage_error(&r, "--task-uids", &["runAs", "60000-65534"]);
    let r = run_hello(&["--task-uids", "0-100000"]);
    assert_usage_error(&r, "--task-uids", &["no id 0"]);
}

#[test]
fn a_client_without_a_server_says_how_to_start_one() {
    // Port 9 on loopback: nothing listens there.
    let r = taskexec(&["list", "--server", "http://127.0.0.1:9"], &[]);
    assert_usage_error(
        &r,
        "no taskexec server at http://127.0.0.1:9",
        &["start one with `taskexec serve`", "--server URL"],
    );
}

#[test]
fn a_server_url_without_a_scheme_is_a_usage_error() {
    let r = taskexec(&["status", "some-id", "--server", "127.0.0.1:8080"], &[]);
    assert_usage_error(&r, "--server \"127.0.0.1:8080\"", &["http://"]);
}

#[test]
fn a_worker_shows_and_takes_no_http_flags() {
    let help = taskexec(&["worker", "--help"], &[]);
    assert_eq!(help.code, 0, "{}", help.stderr);
    let http_flags = [
        "--listen",
        "--auth-token",
        "--max-body",
        "--max-queued",
        "--header-timeout",
        "--body-timeout",
        "--idle-timeout",
        "--max-connections",
    ];
    for flag in http_flags {
        assert!(!help.stdout.contains(flag), "{flag} in: {}", help.stdout);
    }
    assert!(help.stdout.contains("--workers"), "{}", help.stdout);
    let serve = taskexec(&["serve", "--help"], &[]);
    assert!(serve.stdout.contains("--listen"), "{}", serve.stdout);

    let r = taskexec(&["worker", "--listen", "127.0.0.1:9"], &[]);
    assert_usage_error(&r, "--listen", &["serves no HTTP API", "taskexec serve"]);
    let r = taskexec(&["worker", "--max-connections", "10"], &[]);
    assert_usage_error(
        &r,
        "--max-connections",
        &["serves no HTTP API", "taskexec serve"],
    );
}

#[test]
fn bad_max_result_bytes_are_usage_errors_naming_the_flag() {
    for (value, needle) in [
        ("lots", "lots"),
        ("0", "out of range"),
        ("2Gi", "out of range"),
    ] {
        let r = run_hello(&["--max-result-bytes", value]);
        assert_usage_error(
            &r,
            "--max-result-bytes",
            &[needle, "expected a byte quantity from 1Ki to 512Mi"],
        );
    }
    let dir = tempfile::tempdir().expect("tmp");
    let db = format!("sqlite://{}", dir.path().join("t.db").display());
    for cmd in ["serve", "worker"] {
        let r = taskexec(&[cmd, "--database", &db, "--max-result-bytes", "1"], &[]);
        assert_usage_error(
            &r,
            "--max-result-bytes \"1\"",
            &["out of range", "expected a byte quantity from 1Ki to 512Mi"],
        );
    }
    let r = taskexec(
        &["serve", "--database", &db, "--listen", "127.0.0.1:9"],
        &[("TASKEXEC_MAX_RESULT_BYTES", "sixteen")],
    );
    assert_usage_error(&r, "--max-result-bytes", &["sixteen"]);
}
