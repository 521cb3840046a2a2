//! Privileged tests of the fork server (run as root): a handler task runs in
//! a forked child with the same isolation as a cold sandbox, consecutive and
//! concurrent children share nothing, and a dead server is replaced.

use std::time::Duration;

use taskexec_sandbox::*;

mod common;
use common::*;

fn warm() -> WarmSandbox {
    WarmSandbox::new(
        sandbox(),
        WarmConfig {
            fork_servers: true,
            ..WarmConfig::default()
        },
    )
}

/// A warm runner whose fork servers are replaced every `max_runs` runs.
fn warm_recycling(max_runs: u64) -> WarmSandbox {
    WarmSandbox::new(
        sandbox(),
        WarmConfig {
            fork_servers: true,
            recycle: Recycle {
                max_runs,
                max_age: Duration::from_secs(3600),
            },
            ..WarmConfig::default()
        },
    )
}

const WRAPPER: &str = include_str!("../../runtimes/wrappers/python_handler.py");

fn handler(code: &str, input: &str) -> RunRequest {
    RunRequest {
        argv: [
            "/usr/bin/python3",
            "-E",
            "-s",
            "-B",
            "-u",
            "/opt/taskexec/python_handler.py",
            "/task/main.py",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        env: vec![
            ("PATH".into(), "/usr/bin:/bin".into()),
            ("TASK_INPUT".into(), "/task/.taskexec/input.json".into()),
            ("TASK_OUTPUT".into(), "/task/.taskexec/output.json".into()),
            ("TASK_ERROR".into(), "/task/.taskexec/error.json".into()),
        ],
        ro_mounts: python_mounts(),
        work_files: vec![
            SandboxFile {
                path: "main.py".into(),
                content: code.as_bytes().to_vec(),
                executable: false,
            },
            SandboxFile {
                path: ".taskexec/input.json".into(),
                content: input.as_bytes().to_vec(),
                executable: false,
            },
        ],
        support_files: vec![SandboxFile {
            path: "python_handler.py".into(),
            content: WRAPPER.as_bytes().to_vec(),
            executable: false,
        }],
        stdin_path: Some("/task/.taskexec/input.json".into()),
        read_back: vec![
            "/task/.taskexec/output.json".into(),
            "/task/.taskexec/error.json".into(),
        ],
        collect_dir: None,
        limits: SandboxLimits {
            memory_bytes: 128 << 20,
            disk_bytes: 16 << 20,
            pids: 64,
            cpu_request_millis: 1000,
            cpu_limit_millis: None,
            timeout: Duration::from_secs(20),
            cpu_time: None,
            output_bytes: 1 << 20,
            nofile: 256,
        },
        user: None,
        fork_server: Some("python".into()),
        preload: Vec::new(),
    }
}

fn output(out: &RunOutcome) -> String {
    match &out.read_back[0] {
        ReadBackResult::Read { data, .. } => String::from_utf8_lossy(data).into_owned(),
        other => panic!(
            "no output ({other:?}); stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

#[test]
fn a_handler_runs_in_a_forked_child_with_its_input_and_output() {
    let _s = serial();
    let w = warm();
    let out = w
        .run(
            &handler(
                "import os\ndef main(x):\n    print('hi')\n    return {'y': x['x'] * 2, 'uid': os.getuid(), 'cwd': os.getcwd()}\n",
                "{\"x\": 21}",
            ),
            None,
        )
        .expect("runs");
    assert_eq!(w.fork_server_count(), 1, "served by a fork server");
    assert_eq!(
        out.termination,
        Termination::Exited(ExitStatus::Code(0)),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&output(&out)).expect("json");
    assert_eq!(v["y"], 42);
    assert_eq!(v["cwd"], "/task");
    assert_ne!(v["uid"], 0);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
}

fn json_output(out: &RunOutcome) -> serde_json::Value {
    serde_json::from_str(&output(out)).expect("JSON output")
}

/// What a task can see of the state another task could have left.
const PROBE: &str = r#"
import json, os, random, socket, sys
def main(x):
    pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    fds = sorted(int(f) for f in os.listdir("/proc/self/fd"))
    return {
        "fds": fds[:4],
        "extra_fds": [os.readlink("/proc/self/fd/%d" % f).split(":")[0] for f in fds[4:]],
        "random": random.random(),
        "hostname": socket.gethostname(),
        "task_files": sorted(os.listdir("/task")),
        "tmp_files": sorted(os.listdir("/tmp")),
        "leak_env": os.environ.get("LEAK"),
        "leak_module": getattr(json, "LEAK", None),
        "leak_sys": getattr(sys, "LEAK", None),
        "pids": pids,
        "me": os.getpid(),
        "uid": os.getuid(),
    }
"#;

/// Leaves every kind of state behind: files, env, module state, a daemon.
const LEAVER: &str = r#"
import json, os, subprocess, sys
def main(x):
    open("/task/left.txt", "w").write("x")
    open("/tmp/left.txt", "w").write("x")
    os.environ["LEAK"] = "1"
    json.LEAK = 1
    sys.LEAK = 1
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.execv("/bin/sleep", ["sleep", "MARKER"])
        os._exit(0)
    return {"ok": True, "uid": os.getuid()}
"#;

#[test]
fn consecutive_children_of_one_server_share_nothing() {
    let _s = serial();
    let w = warm();
    // A daemon duration no other process on the host uses.
    let marker = format!("{}.{}", 100 + std::process::id() % 100, std::process::id());
    let leaver = LEAVER.replace("MARKER", &marker);
    let out = w.run(&handler(&leaver, "null"), None).expect("runs");
    let left = json_output(&out);
    assert_eq!(left["ok"], true);
    let seen = json_output(&w.run(&handler(PROBE, "null"), None).expect("runs"));
    let again = json_output(&w.run(&handler(PROBE, "null"), None).expect("runs"));
    assert_eq!(w.fork_server_count(), 1, "all ran in the same server");
    // Descriptors: stdin, stdout, stderr, the one listing /proc/self/fd, and
    // the socket for the child's last words.
    assert_eq!(seen["fds"], serde_json::json!([0, 1, 2, 3]), "{seen}");
    assert_eq!(seen["extra_fds"], serde_json::json!(["socket"]), "{seen}");
    assert_eq!(seen["hostname"], "sandbox");
    // The random module is reseeded in every child, not inherited.
    assert_ne!(seen["random"], again["random"]);
    assert_eq!(
        seen["task_files"],
        serde_json::json!([".taskexec", "main.py"]),
        "{seen}"
    );
    assert_eq!(seen["tmp_files"], serde_json::json!([]), "{seen}");
    assert_eq!(seen["leak_env"], serde_json::Value::Null);
    assert_eq!(seen["leak_module"], serde_json::Value::Null);
    assert_eq!(seen["leak_sys"], serde_json::Value::Null);
    assert_eq!(seen["pids"], serde_json::json!([seen["me"]]), "{seen}");
    assert_ne!(seen["uid"], 0);
    // Uids go round: the next tasks do not get the one just given back
    // (which is given back only once the task's processes are all gone).
    assert_ne!(seen["uid"], left["uid"], "{seen} after {left}");
    assert_ne!(again["uid"], seen["uid"], "{again} after {seen}");
    // The daemon of the first task died with it: killed when the task
    // ended, reaped off the task's path a few milliseconds later.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while !processes_with(&format!("sleep {marker}")).is_empty()
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(processes_with(&format!("sleep {marker}")).is_empty());
    drop(w);
    assert!(leftover_cgroups().is_empty(), "{:?}", leftover_cgroups());
}

/// Every "NAME=value" string on the task's stack, where the kernel put the
/// process's initial environment block (for a forked child: the server's).
const STACK_ENV: &str = r#"
import ctypes
def main(x):
    for line in open("/proc/self/maps"):
        fields = line.split()
        if fields[-1] == "[stack]":
            lo, hi = (int(v, 16) for v in fields[0].split("-"))
            mem = ctypes.string_at(lo, hi - lo)
            return [w.decode("latin-1") for w in mem.split(b"\0") if b"=" in w and w[:1].isalpha()]
"#;

#[test]
fn the_environment_of_the_task_that_started_a_server_does_not_reach_later_tasks() {
    let _s = serial();
    let w = warm();
    let secret = format!("hunter2-{}", std::process::id());
    let mut first = handler(STACK_ENV, "null");
    first.env.push(("FIRST_TASK_SECRET".into(), secret.clone()));
    let own = json_output(&w.run(&first, None).expect("runs"));
    assert!(
        own.to_string().contains("\"PATH="),
        "the scan finds the environment block: {own}"
    );
    let later = json_output(&w.run(&handler(STACK_ENV, "null"), None).expect("runs"));
    assert_eq!(w.fork_server_count(), 1, "both ran in the same server");
    assert!(!later.to_string().contains(&secret), "{later}");
    assert!(!later.to_string().contains("FIRST_TASK_SECRET"), "{later}");
}

/// Finds the child's last-words socket among its descriptors.
const FIND_SOCKET: &str = r#"
import os, socket
def last_words_socket():
    for f in sorted(int(f) for f in os.listdir("/proc/self/fd")):
        try:
            if f > 2 and os.readlink("/proc/self/fd/%d" % f).startswith("socket:"):
                return socket.socket(fileno=os.dup(f))
        except OSError:
            pass
"#;

#[test]
fn a_task_claiming_its_exit_early_is_stopped_there() {
    let _s = serial();
    let w = warm();
    let code = format!(
        "{FIND_SOCKET}\nimport time\ndef main(x):\n    last_words_socket().send(b\"x7\")\n    time.sleep(60)\n"
    );
    let out = w.run(&handler(&code, "null"), None).expect("runs");
    // What the task said is what it gets: exit 7, and nothing of it runs on.
    assert_eq!(out.termination, Termination::Exited(ExitStatus::Code(7)));
    assert!(
        out.wall_time < Duration::from_secs(50),
        "it did not wait for the sleep"
    );
    drop(w);
    assert!(leftover_cgroups().is_empty(), "{:?}", leftover_cgroups());
}

#[test]
fn junk_and_descriptors_on_the_last_words_socket_change_nothing() {
    let _s = serial();
    let w = warm();
    let code = format!(
        "{FIND_SOCKET}\nimport os\ndef main(x):\n    s = last_words_socket()\n    r, _w = os.pipe()\n    socket.send_fds(s, [b\"m\" + bytes(8)], [r])\n    s.send(b\"junk\" * 10000)\n    return {{\"ok\": 1}}\n"
    );
    let out = w.run(&handler(&code, "null"), None).expect("runs");
    assert_eq!(out.termination, Termination::Exited(ExitStatus::Code(0)));
    assert_eq!(json_output(&out)["ok"], 1);
    drop(w);
    assert!(leftover_cgroups().is_empty(), "{:?}", leftover_cgroups());
}

/// Hands the executor, through the last-words socket, a TCP socket whose
/// close blocks (`SO_LINGER` with unsent data to a peer that never reads),
/// then spins: its limits must still stop it on time.
const LINGERER: &str = r#"
import os, socket, struct
def main(x):
    s = last_words_socket()
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    c = socket.create_connection(ls.getsockname())
    peer, _ = ls.accept()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 60))
    c.setblocking(False)
    try:
        while True:
            c.send(b"z" * 65536)
    except BlockingIOError:
        pass
    fd = c.detach()
    socket.send_fds(s, [b"z"], [fd])
    os.close(fd)
    while True:
        pass
"#;

#[test]
fn a_descriptor_whose_close_blocks_does_not_stall_the_limits() {
    let _s = serial();
    let w = warm();
    let code = format!("{FIND_SOCKET}\n{LINGERER}");
    let mut timed = handler(&code, "null");
    timed.limits.timeout = Duration::from_secs(2);
    let mut cpu = handler(&code, "null");
    cpu.limits.cpu_time = Some(Duration::from_secs(1));
    // Correctness bounds (the stall was the linger time, 60 s), not speed
    // figures: the wall clock for the timeout, well under the linger time
    // (an emulated or busy machine needs seconds more than the 2 s), the
    // task's CPU time for the CPU limit (on a busy machine 1 s of CPU takes
    // longer than 1 s).
    let t = std::time::Instant::now();
    let out = w.run(&timed, None).expect("runs");
    let elapsed = t.elapsed();
    assert_eq!(
        out.termination,
        Termination::TimedOut,
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(elapsed < Duration::from_secs(20), "took {elapsed:?}");
    let out = w.run(&cpu, None).expect("runs");
    assert_eq!(
        out.termination,
        Termination::CpuTimeExceeded,
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stats.cpu_time < Duration::from_secs(2),
        "used {:?} of CPU",
        out.stats.cpu_time
    );
    let stats = w.stats();
    assert_eq!(stats.fork_server_runs, 2, "both ran warm: {stats:?}");
    let t = std::time::Instant::now();
    drop(w);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        t.elapsed()
    );
    assert!(leftover_cgroups().is_empty(), "{:?}", leftover_cgroups());
}

/// What the task inherits of ours is close-on-exec: no program it runs
/// gets the last-words socket.
#[test]
fn the_last_words_socket_is_close_on_exec_in_the_task() {
    let _s = serial();
    let w = warm();
    let code = r#"
import os, subprocess
def main(x):
    mine = {}
    for f in sorted(int(f) for f in os.listdir("/proc/self/fd")):
        try:
            target = os.readlink("/proc/self/fd/%d" % f)
        except OSError:
            continue
        if f > 2 and target.startswith("socket:"):
            mine[f] = os.get_inheritable(f)
    seen = subprocess.run(["/bin/ls", "-l", "/proc/self/fd"], capture_output=True, text=True, close_fds=False).stdout
    return {"sockets": mine, "child_sees_socket": "socket:" in seen}
"#;
    let out = w.run(&handler(code, "null"), None).expect("runs");
    let v = json_output(&out);
    let sockets = v["sockets"].as_object().expect("an object");
    assert!(
        !sockets.is_empty(),
        "the task has its last-words socket: {v}"
    );
    assert!(sockets.values().all(|i| i == false), "close-on-exec: {v}");
    assert_eq!(v["child_sees_socket"], false, "{v}");
    drop(w);
    assert!(leftover_cgroups().is_empty(), "{:?}", leftover_cgroups());
}

#[test]
fn a_cancelled_child_is_killed_with_everything_it_started() {
    let _s = serial();
    let w = warm();
    let marker = format!("{}.{}", 200 + std::process::id() % 100, std::process::id());
    let code = format!(
        "import os, time\ndef main(x):\n    if os.fork() == 0:\n        os.execv(\"/bin/sleep\", [\"sleep\", \"{marker}\"])\n    time.sleep(60)\n"
    );
    let cancel = CancelToken::new().expect("token");
    let out = std::thread::scope(|scope| {
        let run = scope.spawn(|| w.run(&handler(&code, "null"), Some(&cancel)));
        // Cancel once the task's own child runs.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while processes_with(&format!("sleep {marker}")).is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the task never started"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        cancel.cancel();
        run.join().expect("joins").expect("runs")
    });
    assert_eq!(out.termination, Termination::Cancelled);
    assert!(processes_with(&format!("sleep {marker}")).is_empty());
    drop(w);
    assert!(leftover_cgroups().is_empty(), "{:?}", leftover_cgroups());
}

#[test]
fn a_task_whose_server_dies_under_it_fails_and_never_runs_again() {
    let _s = serial();
    let w = warm();
    let marker = format!("{}.{}", 300 + std::process::id() % 100, std::process::id());
    let code = format!(
        "import os, time\ndef main(x):\n    if os.fork() == 0:\n        os.execv(\"/bin/sleep\", [\"sleep\", \"{marker}\"])\n    time.sleep(60)\n"
    );
    let result = std::thread::scope(|scope| {
        let run = scope.spawn(|| w.run(&handler(&code, "null"), None));
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while processes_with(&format!("sleep {marker}")).is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the task never started"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        for (pid, _) in processes_with("taskexec_zygote.py") {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        run.join().expect("joins")
    });
    // Its code had started: an error of ours, not a second run elsewhere.
    assert!(result.is_err(), "{result:?}");
    let stats = w.stats();
    assert_eq!(stats.fork_server_runs, 1, "{stats:?}");
    assert_eq!(stats.fork_server_fallbacks, 0, "{stats:?}");
    drop(w);
    assert!(leftover_cgroups().is_empty(), "{:?}", leftover_cgroups());
}

#[test]
fn concurrent_children_run_as_different_users_and_cannot_see_each_other() {
    let _s = serial();
    let w = warm();
    let slow = format!("import time\ntime.sleep(0.5)\n{PROBE}");
    let results: Vec<serde_json::Value> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..3)
            .map(|_| {
                scope.spawn(|| json_output(&w.run(&handler(&slow, "null"), None).expect("runs")))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("joins"))
            .collect()
    });
    let mut uids: Vec<i64> = results
        .iter()
        .map(|r| r["uid"].as_i64().expect("uid"))
        .collect();
    for r in &results {
        assert_eq!(r["pids"], serde_json::json!([r["me"]]), "{r}");
    }
    uids.sort();
    uids.dedup();
    assert_eq!(uids.len(), 3, "three users: {results:?}");
}

/// What a handler sees of its modules: whether `colorsys` was loaded
/// before its own file ran.
const MODULES: &str = "import sys\nPRELOADED = 'colorsys' in sys.modules\ndef main(x):\n    return {'colorsys': PRELOADED}\n";

fn preloading(modules: &[&str]) -> RunRequest {
    let mut req = handler(MODULES, "{}");
    req.preload = modules.iter().map(|m| m.to_string()).collect();
    if !modules.is_empty() {
        req.env.push(("TASK_PRELOAD".into(), modules.join(",")));
    }
    req
}

#[test]
fn preloaded_modules_are_loaded_before_the_task_by_a_server_of_their_own() {
    let _s = serial();
    let w = warm();
    let plain = w.run(&preloading(&[]), None).expect("runs");
    assert_eq!(
        json_output(&plain)["colorsys"],
        false,
        "not imported by default"
    );
    let out = w.run(&preloading(&["colorsys"]), None).expect("runs");
    assert_eq!(
        json_output(&out)["colorsys"],
        true,
        "imported before the task"
    );
    assert_eq!(w.fork_server_count(), 2, "another list, another server");
    // The server without the module is still plain.
    let again = w.run(&preloading(&[]), None).expect("runs");
    assert_eq!(json_output(&again)["colorsys"], false);
    let stats = w.stats();
    assert_eq!(stats.fork_server_runs, 3, "all three ran warm: {stats:?}");
    assert_eq!(stats.fork_server_fallbacks, 0, "{stats:?}");
    drop(w);
    assert!(leftover_cgroups().is_empty(), "{:?}", leftover_cgroups());
}

/// A preload list is a set: reordering or repeating its modules does not
/// start another server.
#[test]
fn reordered_preload_lists_share_one_server() {
    let _s = serial();
    let w = warm();
    for modules in [
        &["colorsys", "wave"][..],
        &["wave", "colorsys"],
        &["wave", "colorsys", "wave"],
    ] {
        let out = w.run(&preloading(modules), None).expect("runs");
        assert_eq!(json_output(&out)["colorsys"], true, "{modules:?}");
    }
    let stats = w.stats();
    assert_eq!(stats.fork_servers, 1, "one server: {stats:?}");
    assert_eq!(stats.fork_server_runs, 3, "all warm: {stats:?}");
    drop(w);
    assert!(leftover_cgroups().is_empty(), "{:?}", leftover_cgroups());
}

/// First requests racing for new keys: those of one key wait for the one
/// server that starts (without the servers' lock, so the other key's start
/// goes on at the same time), and every request runs warm.
#[test]
fn racing_first_requests_start_one_server_per_key() {
    let _s = serial();
    let w = warm();
    let barrier = std::sync::Barrier::new(6);
    std::thread::scope(|s| {
        let runs: Vec<_> = (0..6)
            .map(|i| {
                let (w, barrier) = (&w, &barrier);
                s.spawn(move || {
                    let req = if i % 2 == 0 {
                        preloading(&["colorsys"])
                    } else {
                        preloading(&["wave"])
                    };
                    barrier.wait();
                    let out = w.run(&req, None).expect("runs");
                    assert_eq!(json_output(&out)["colorsys"], i % 2 == 0, "run {i}");
                })
            })
            .collect();
        for r in runs {
            r.join().expect("a run");
        }
    });
    let stats = w.stats();
    assert_eq!(stats.fork_servers, 2, "one per key: {stats:?}");
    assert_eq!(stats.fork_server_runs, 6, "all warm: {stats:?}");
    assert_eq!(stats.fork_server_fallbacks, 0, "{stats:?}");
    drop(w);
    assert!(leftover_cgroups().is_empty(), "{:?}", leftover_cgroups());
}

/// Past 8 servers (one per preload list here), the least recently used
/// idle one is stopped to make room: the count stays at 8 and every task
/// still runs warm.
#[test]
fn a_ninth_preload_list_stops_the_least_recently_used_server() {
    let _s = serial();
    let w = warm();
    let modules = [
        "colorsys",
        "wave",
        "base64",
        "string",
        "textwrap",
        "fractions",
        "shlex",
        "glob",
        "bisect",
    ];
    for (i, m) in modules.iter().enumerate() {
        let out = w.run(&preloading(&[m]), None).expect("runs");
        assert_eq!(json_output(&out)["colorsys"], i == 0, "{m}");
        assert_eq!(w.fork_server_count(), (i + 1).min(8), "after {m}");
    }
    // The first list's server was the least recently used: it is gone, and
    // its next task starts a server again (evicting the next oldest).
    let out = w.run(&preloading(&["colorsys"]), None).expect("runs");
    assert_eq!(json_output(&out)["colorsys"], true);
    assert_eq!(w.fork_server_count(), 8);
    let stats = w.stats();
    assert_eq!(stats.fork_server_runs, 10, "all ran warm: {stats:?}");
    assert_eq!(stats.fork_server_fallbacks, 0, "{stats:?}");
    // A server's argv ends with its modules (its spares are forks of it,
    // with the same command line): "wave", evicted last, is gone; the
    // others run.
    let server_of = |m: &str| processes_with(&format!("seccomp-child-final.bpf {m}"));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !server_of("wave").is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(server_of("wave").is_empty(), "{:?}", server_of("wave"));
    for m in modules.iter().filter(|m| **m != "wave") {
        assert!(!server_of(m).is_empty(), "the server of {m} runs");
    }
    drop(w);
    assert!(leftover_cgroups().is_empty(), "{:?}", leftover_cgroups());
}

/// A task cycling through preload lists faster than servers may start:
/// past the node's burst its tasks run cold (and succeed), no server is
/// started or evicted for them, and the refusals are counted.
#[test]
fn preload_lists_cycled_past_the_start_burst_run_cold_without_evicting() {
    let _s = serial();
    let w = WarmSandbox::new(
        sandbox(),
        WarmConfig {
            fork_servers: true,
            start_limit: StartLimit {
                node_burst: 3,
                node_interval: Duration::from_secs(3600),
                ..StartLimit::default()
            },
            ..WarmConfig::default()
        },
    );
    let others = [
        "wave",
        "base64",
        "string",
        "textwrap",
        "fractions",
        "shlex",
        "glob",
    ];
    for (i, m) in others.iter().enumerate() {
        let out = w.run(&preloading(&["colorsys", m]), None).expect("runs");
        assert_eq!(
            out.termination,
            Termination::Exited(ExitStatus::Code(0)),
            "{m}"
        );
        assert_eq!(
            json_output(&out)["colorsys"],
            true,
            "preloaded, warm or cold: {m}"
        );
        let stats = w.stats();
        assert_eq!(
            stats.fork_server_starts,
            (i as u64 + 1).min(3),
            "after {m}: {stats:?}"
        );
    }
    let stats = w.stats();
    assert_eq!(
        (stats.fork_server_runs, stats.fork_server_fallbacks),
        (3, 4),
        "{stats:?}"
    );
    assert_eq!(stats.fork_server_starts_refused, 4, "{stats:?}");
    assert_eq!(stats.fallback_reasons.start_refused, 4, "{stats:?}");
    assert_eq!(w.fork_server_count(), 3, "nothing evicted: {stats:?}");
    assert!(
        stats.fork_server_start_cpu > Duration::ZERO,
        "the starts' CPU is counted: {stats:?}"
    );
    // The servers that did start keep serving their lists warm.
    let out = w
        .run(&preloading(&["colorsys", "wave"]), None)
        .expect("runs");
    assert_eq!(json_output(&out)["colorsys"], true);
    let after = w.stats();
    assert_eq!(after.fork_server_runs, 4, "{after:?}");
    assert_eq!(after.fork_server_starts, 3, "{after:?}");
    drop(w);
    assert!(leftover_cgroups().is_empty(), "{:?}", leftover_cgroups());
}

#[test]
fn a_module_that_does_not_import_runs_its_tasks_cold_without_a_server_start_each() {
    let _s = serial();
    let w = warm();
    let req = preloading(&["taskexec_no_such_module"]);
    for _ in 0..3 {
        let out = w.run(&req, None).expect("runs cold");
        assert_eq!(
            out.termination,
            Termination::Exited(ExitStatus::Code(1)),
            "the wrapper fails the task"
        );
        let error = match &out.read_back[1] {
            ReadBackResult::Read { data, .. } => String::from_utf8_lossy(data).into_owned(),
            other => panic!("no error report: {other:?}"),
        };
        assert!(error.contains("PreloadError"), "{error}");
        assert!(error.contains("taskexec_no_such_module"), "{error}");
    }
    let stats = w.stats();
    assert_eq!(stats.fork_servers, 0, "{stats:?}");
    assert_eq!(stats.fork_server_runs, 0, "{stats:?}");
    assert_eq!(stats.fork_server_fallbacks, 3, "{stats:?}");
    assert_eq!(
        stats.fork_server_start_failures, 1,
        "one start was tried, the other two tasks were held back: {stats:?}"
    );
    assert!(
        processes_with("taskexec_no_such_module").is_empty(),
        "no server left"
    );
    drop(w);
    assert!(leftover_cgroups().is_empty(), "{:?}", leftover_cgroups());
}

/// A server is replaced after `max_runs` runs: the tasks of the next server
/// see another string-hash secret (what the pre-fork image shares is shared
/// by that many tasks at most), and the old server's processes are gone.
#[test]
fn a_server_is_recycled_after_its_runs_and_its_secrets_change() {
    let _s = serial();
    let w = warm_recycling(3);
    let req = handler(
        "def main(x):\n    return {'hash': hash('taskexec')}\n",
        "{}",
    );
    let hashes: Vec<i64> = (0..7)
        .map(|_| {
            json_output(&w.run(&req, None).expect("runs"))["hash"]
                .as_i64()
                .expect("a hash")
        })
        .collect();
    assert!(hashes[..3].iter().all(|h| *h == hashes[0]), "{hashes:?}");
    assert!(hashes[3..6].iter().all(|h| *h == hashes[3]), "{hashes:?}");
    assert_ne!(hashes[0], hashes[3], "a fresh server, a fresh secret");
    assert_ne!(hashes[3], hashes[6], "and again after three more runs");
    let stats = w.stats();
    assert_eq!(stats.fork_servers, 1, "{stats:?}");
    assert_eq!(stats.fork_servers_recycled, 2, "{stats:?}");
    assert_eq!(stats.fork_server_runs, 7, "all ran warm: {stats:?}");
    drop(w);
    assert!(leftover_cgroups().is_empty(), "{:?}", leftover_cgroups());
}

/// Runs in flight when their server is replaced finish in it: a handler
/// that sleeps a little keeps runs overlapping while servers are recycled
/// every two runs, four at a time; every one ends with its output.
#[test]
fn runs_in_flight_when_their_server_is_recycled_finish_there() {
    let _s = serial();
    let w = warm_recycling(2);
    let req = handler(
        "import time\ndef main(x):\n    time.sleep(0.05)\n    return x\n",
        "{\"n\": 7}",
    );
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    for _ in 0..4 {
                        let out = w.run(&req, None).expect("runs");
                        assert_eq!(
                            out.termination,
                            Termination::Exited(ExitStatus::Code(0)),
                            "stderr: {}",
                            String::from_utf8_lossy(&out.stderr)
                        );
                        assert_eq!(json_output(&out)["n"], 7);
                    }
                })
            })
            .collect();
        for h in workers {
            h.join().expect("a worker");
        }
    });
    let stats = w.stats();
    assert!(stats.fork_servers_recycled >= 2, "{stats:?}");
    assert_eq!(
        stats.fork_server_runs + stats.fork_server_fallbacks,
        16,
        "{stats:?}"
    );
    drop(w);
    assert!(leftover_cgroups().is_empty(), "{:?}", leftover_cgroups());
}

#[test]
fn a_killed_fork_server_is_replaced_and_tasks_still_run() {
    let _s = serial();
    let w = warm();
    let req = handler("def main(x):\n    return x\n", "{\"n\": 1}");
    assert_eq!(json_output(&w.run(&req, None).expect("runs"))["n"], 1);
    let servers: Vec<i32> = processes_with("taskexec_zygote.py")
        .into_iter()
        .map(|(pid, _)| pid)
        .collect();
    assert!(!servers.is_empty(), "a server runs");
    for pid in servers {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    // The next tasks run (cold while the server is replaced, or warm).
    for n in 2..5 {
        let input = format!("{{\"n\": {n}}}");
        let out = w
            .run(&handler("def main(x):\n    return x\n", &input), None)
            .expect("runs");
        assert_eq!(json_output(&out)["n"], n);
    }
    assert_eq!(w.fork_server_count(), 1, "a new server took over");
    drop(w);
    assert!(leftover_cgroups().is_empty(), "{:?}", leftover_cgroups());
}

#[test]
fn a_memory_bomb_in_a_child_meets_the_task_limit_not_the_servers() {
    let _s = serial();
    let w = warm();
    let mut req = handler(
        "def main(x):\n    b = []\n    while True:\n        b.append(bytearray(1 << 20))\n",
        "null",
    );
    req.limits.memory_bytes = 64 << 20;
    let out = w.run(&req, None).expect("runs");
    assert_eq!(
        out.termination,
        Termination::Exited(ExitStatus::Signal(9)),
        "{out:?}"
    );
    assert!(out.stats.oom_kills > 0, "{:?}", out.stats);
    // The server survived and serves the next task.
    let ok = w
        .run(&handler("def main(x):\n    return 7\n", "null"), None)
        .expect("runs");
    assert_eq!(output(&ok), "7");
    assert_eq!(w.fork_server_count(), 1);
}

/// Not a test: prints the median wall time of warm handler runs beside cold
/// ones of the same task (`cargo test --release -p taskexec-sandbox --test
/// fork_server -- --ignored --nocapture`).
#[test]
#[ignore = "a measurement, run by hand"]
fn measure_warm_against_cold() {
    let _s = serial();
    let w = warm();
    let req = handler("def main(x):\n    return x\n", "{\"x\": 1}");
    let mut cold_req = req.clone();
    cold_req.fork_server = None;
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let _ = w.run(&req, None).expect("warm-up");
    let (mut warm_ms, mut cold_ms) = (Vec::new(), Vec::new());
    // Alternating blocks of ten, so both see the same machine.
    for _ in 0..10 {
        for _ in 0..10 {
            let t = std::time::Instant::now();
            let o = w.run(&req, None).expect("warm");
            assert_eq!(o.termination, Termination::Exited(ExitStatus::Code(0)));
            warm_ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        for _ in 0..10 {
            let t = std::time::Instant::now();
            w.run(&cold_req, None).expect("cold");
            cold_ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    for _ in 0..3 {
        let o = w.run(&req, None).expect("warm");
        println!(
            "warm phases: {:?} {}",
            o.phases,
            String::from_utf8_lossy(&o.stderr)
        );
    }
    println!(
        "handler task p50: warm {:.2} ms, cold {:.2} ms",
        median(warm_ms),
        median(cold_ms)
    );
}

/// Not a test: warm handler tasks from four threads at once, for a profiler
/// (`cargo test --release -p taskexec-sandbox --test fork_server load --
/// --ignored --nocapture`).
#[test]
#[ignore = "a load for profiling, run by hand"]
fn load_four_at_a_time() {
    let _s = serial();
    let w = warm();
    let req = handler("def main(x):\n    return x\n", "{\"x\": 1}");
    let _ = w.run(&req, None).expect("warm-up");
    let t = std::time::Instant::now();
    let per_thread = 250;
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                for _ in 0..per_thread {
                    let o = w.run(&req, None).expect("warm");
                    assert_eq!(o.termination, Termination::Exited(ExitStatus::Code(0)));
                }
            });
        }
    });
    let secs = t.elapsed().as_secs_f64();
    println!("{:.1} tasks/s", f64::from(4 * per_thread) / secs);
}

/// A module of `definition.preload` (here one the test ships beside the
/// wrapper) runs its import-time code in the fork server, before any fork:
/// what it finds there is kept and returned by a task of that server.
const PRIVILEGE_PROBE: &str = r#"
import ctypes

def _probe():
    found = {}
    with open("/proc/self/uid_map") as f:
        found["uidMap"] = [line.split() for line in f]
    # An action only a holder of host privileges can take: the server's
    # mount namespace belongs to the host's user namespace.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    MS_REC, MS_PRIVATE = 16384, 1 << 18
    rc = libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None)
    found["mountErrno"] = 0 if rc == 0 else ctypes.get_errno()
    # The owner of our user namespace, as we see it (NS_GET_OWNER_UID):
    # 0 when it is the host uid our root maps to, the overflow uid when it
    # is one we cannot see (host root).
    import fcntl, os, struct
    fd = os.open("/proc/self/ns/user", os.O_RDONLY)
    try:
        owner = fcntl.ioctl(fd, 0xB704, b"\0" * 4)
        found["nsOwner"] = struct.unpack("I", owner)[0]
    finally:
        os.close(fd)
    return found

FOUND = _probe()
"#;

#[test]
fn code_a_fork_server_imports_holds_no_host_privilege() {
    let _s = serial();
    let w = warm();
    let mut req = handler(
        "import privilege_probe\ndef main(x):\n    return privilege_probe.FOUND\n",
        "{}",
    );
    req.support_files.push(SandboxFile {
        path: "privilege_probe.py".into(),
        content: PRIVILEGE_PROBE.as_bytes().to_vec(),
        executable: false,
    });
    req.preload = vec!["privilege_probe".into()];
    let out = w.run(&req, None).expect("runs");
    let stats = w.stats();
    assert_eq!(stats.fork_server_runs, 1, "ran warm: {stats:?}");
    let found = json_output(&out);
    // Root of its own user namespace only: uid 0 there is an unprivileged
    // host uid, and nothing maps to host root.
    let map = found["uidMap"].as_array().expect("uid map");
    for line in map {
        let host_first = line[1]
            .as_str()
            .expect("host id")
            .parse::<u64>()
            .expect("number");
        assert_ne!(host_first, 0, "a host-root mapping: {found}");
    }
    assert_eq!(map[0][0], "0", "{found}");
    assert_eq!(found["mountErrno"], 1, "EPERM: {found}");
    // Owned by that host uid, not by host root: per-user counts of the
    // processes inside are charged to a task uid.
    assert_eq!(found["nsOwner"], 0, "{found}");
    drop(w);
    assert!(leftover_cgroups().is_empty(), "{:?}", leftover_cgroups());
}
