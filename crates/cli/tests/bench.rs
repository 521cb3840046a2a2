//! `taskexec bench`: a smoke run of the report (bash only, a couple of
//! tasks per group, a tiny drain) that checks the JSON document's shape and
//! the Markdown section; no timing is asserted.

mod util;

use std::process::{Command, Stdio};

use serde_json::Value;

/// Runs `taskexec bench ARGS` with no `TASKEXEC_*` variables, requires
/// success and returns its stdout parsed as one JSON document.
fn bench_json(args: &[&str]) -> Value {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_taskexec"));
    cmd.arg("bench").args(args);
    util::server::clear_env(&mut cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .expect("run taskexec bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    serde_json::from_str(&stdout).expect("stdout is one JSON document")
}

#[test]
fn quick_report_has_every_section_in_its_json_and_markdown() {
    let dir = tempfile::tempdir().expect("tempdir");
    let md = dir.path().join("benchmarks.md");
    std::fs::write(&md, "# Benchmarks\n\nKept as is.\n").expect("write the markdown file");
    let md_arg = md.to_string_lossy().into_owned();
    let r = bench_json(&[
        "--quick",
        "--tasks",
        "1",
        "--runtimes",
        "bash",
        "--drain-tasks",
        "3",
        "--json",
        "--markdown",
        &md_arg,
    ]);

    assert_eq!(r["schemaVersion"], 1);
    assert!(r["command"].as_str().expect("command").contains("--quick"));
    for k in ["cpuModel", "kernel", "cgroup", "build"] {
        assert!(r["machine"][k].is_string(), "machine.{k}: {}", r["machine"]);
    }
    assert!(r["machine"]["cores"].as_u64().expect("cores") >= 1);
    assert!(r["machine"]["runtimes"]["bash"].is_string());
    assert_eq!(r["settings"]["runtimes"], serde_json::json!(["bash"]));
    assert_eq!(r["settings"]["quick"], true);

    let groups = r["groups"].as_array().expect("groups");
    let cores = r["machine"]["cores"].as_u64().expect("cores");
    let engine: Vec<&Value> = groups.iter().filter(|g| g["section"] == "engine").collect();
    let service: Vec<&Value> = groups
        .iter()
        .filter(|g| g["section"] == "service")
        .collect();
    let conc = |gs: &[&Value]| -> Vec<u64> {
        gs.iter()
            .map(|g| g["concurrency"].as_u64().expect("concurrency"))
            .collect()
    };
    assert_eq!(
        conc(&engine),
        [1, 2 * cores],
        "bash script only: {engine:?}"
    );
    assert_eq!(conc(&service), [1, 4]);
    for g in engine.iter().chain(&service) {
        assert_eq!(g["runtime"], "bash");
        assert_eq!(g["mode"], "script");
        let kinds: Vec<&str> = g["series"]
            .as_array()
            .expect("series")
            .iter()
            .map(|s| s["kind"].as_str().expect("kind"))
            .collect();
        let want: &[&str] = if g["section"] == "engine" {
            &["bare", "cold", "warm"]
        } else {
            &["bare", "service"]
        };
        assert_eq!(kinds, want, "{g}");
        for s in g["series"].as_array().expect("series") {
            assert!(s["n"].as_u64().expect("n") >= 1, "{s}");
            for k in ["p50Ms", "p99Ms", "meanMs", "throughputPerS", "p50Ratio"] {
                assert!(s[k].as_f64().is_some(), "{k} in {s}");
            }
        }
        assert_eq!(g["series"][0]["p50Ratio"], 1.0);
    }

    let d = &r["drain"];
    assert_eq!(d["tasks"], 3);
    assert_eq!(d["completed"], 3, "{d}");
    assert_eq!(d["notCompleted"], 0);
    assert!(d["peakRssMib"].as_f64().expect("peak RSS") > 0.0, "{d}");
    assert!(d["drainSeconds"].as_f64().is_some());

    let targets = r["targets"].as_array().expect("targets");
    assert!(
        targets
            .iter()
            .any(|t| t["unit"] == "MiB" && t["value"].is_number()),
        "{targets:?}"
    );
    for t in targets {
        for k in ["name", "unit", "baselineName"] {
            assert!(t[k].is_string(), "{k} in {t}");
        }
    }

    let text = std::fs::read_to_string(&md).expect("read the markdown file");
    assert!(text.starts_with("# Benchmarks\n\nKept as is.\n"), "{text}");
    assert!(text.contains("## The report (`taskexec bench`)"), "{text}");
    assert!(text.contains("| bash | script | 1 |"), "{text}");
    assert!(text.contains("### Drain of 3 queued tasks"), "{text}");
    assert_eq!(text.matches("taskexec bench report: begin").count(), 1);
}

/// With python measured, the report has the preload group: a handler that
/// imports a module, through the warm engine with and without
/// `definition.preload`, beside the bare interpreter.
#[test]
fn a_python_report_compares_a_handler_with_and_without_preload() {
    let r = bench_json(&[
        "--quick",
        "--tasks",
        "1",
        "--runtimes",
        "python",
        "--no-service",
        "--json",
    ]);
    let groups = r["groups"].as_array().expect("groups");
    let preload: Vec<&Value> = groups
        .iter()
        .filter(|g| {
            g["mode"]
                .as_str()
                .is_some_and(|m| m.starts_with("handler, imports"))
        })
        .collect();
    assert_eq!(preload.len(), 1, "{groups:?}");
    let g = preload[0];
    assert_eq!(g["runtime"], "python");
    assert_eq!(g["concurrency"], 1);
    let series = g["series"].as_array().expect("series");
    let kinds: Vec<&str> = series
        .iter()
        .map(|s| s["kind"].as_str().expect("kind"))
        .collect();
    assert_eq!(kinds, ["bare", "warm", "warm"], "{g}");
    assert!(
        series[2]["name"]
            .as_str()
            .expect("name")
            .contains("preload"),
        "{g}"
    );
    for s in series {
        assert!(s["p50Ms"].as_f64().expect("p50") > 0.0, "{s}");
    }
    // The plain handler groups keep their own mode, and the targets still
    // find the warm handler.
    assert!(groups.iter().any(|g| g["mode"] == "handler"));
    let targets = r["targets"].as_array().expect("targets");
    assert!(
        targets.iter().any(|t| t["name"]
            .as_str()
            .is_some_and(|n| n.starts_with("warm handler-mode python through the engine"))),
        "{targets:?}"
    );
}

/// `taskexec bench --server URL`: the server's figures beside the same task
/// run with `taskexec run` one by one, in the JSON document.
#[test]
fn server_bench_reports_the_server_beside_the_engine_alone_and_one_by_one_runs() {
    let setup = util::server::Setup::new();
    let server = setup.start();
    let r = bench_json(&[
        "--server",
        &server.url,
        "--tasks",
        "4",
        "--concurrency",
        "2",
        "--baseline-tasks",
        "2",
        "--runtimes",
        "bash",
        "--json",
    ]);
    assert_eq!(r["completed"], 4, "{r}");
    assert_eq!(r["failed"], 0, "{r}");
    assert!(r["throughputPerSecond"].as_f64().expect("throughput") > 0.0);
    assert!(r["latency"]["p50Ms"].as_f64().expect("p50") > 0.0);
    let b = r["baselines"].as_array().expect("baselines");
    assert_eq!(b.len(), 2, "the warm engine alone and one-by-one runs: {r}");
    assert!(
        b[0]["what"].as_str().unwrap_or("").contains("engine"),
        "{r}"
    );
    assert!(
        b[0]["concurrency"].as_u64().expect("concurrency") >= 2,
        "{r}"
    );
    // Measured in whole chunks of 4 x concurrency: at least the 2 asked.
    assert!(b[0]["tasks"].as_u64().expect("engine tasks") >= 2, "{r}");
    assert!(
        b[1]["what"].as_str().unwrap_or("").contains("taskexec run"),
        "{r}"
    );
    assert_eq!(b[1]["tasks"], 2, "{r}");
    for b in b {
        assert!(
            b["throughputPerSecond"]
                .as_f64()
                .expect("baseline throughput")
                > 0.0,
            "{r}"
        );
        assert!(
            b["serverThroughputRatio"].as_f64().expect("ratio") > 0.0,
            "{r}"
        );
        assert!(b["latency"]["p99Ms"].as_f64().expect("baseline p99") > 0.0);
    }
}
