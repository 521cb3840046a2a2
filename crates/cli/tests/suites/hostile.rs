// The security suite: hostile tasks run through the real `taskexec` binary.
// Each hostile program runs only inside the sandbox under test; every run
// is followed by the host checks of `util::taskexec` (no task cgroup, no
// sandbox mount left).
//
// Not a test target itself: `tests/hostile.rs` includes it with
// `WARM = false` (a cold sandbox per run, script mode) and
// `tests/hostile_warm.rs` with `WARM = true` (`--warm --mode handler`: the
// task runs in a child of a pre-started Python fork server). Both define
// `mod util;` before the `include!`. The same program and the same
// assertions run in both modes; where warm mode differs by design, the test
// asserts the warm behaviour explicitly and says why.

use std::io::ErrorKind;
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use util::{Run, processes_with, run_code, unique};

/// The uids warm children run as (`taskexec_sandbox::fork_server::FORK_UIDS`):
/// one per concurrent child of a fork server, so that children sharing the
/// server's PID namespace can neither see (hidepid) nor signal each other.
const FORK_UIDS: std::ops::RangeInclusive<u64> = 62000..=62063;

/// The uids cold tasks run as, one of its own per task running
/// (`taskexec_sandbox::TaskUids::DEFAULT`): no host account's.
const COLD_UIDS: std::ops::RangeInclusive<u64> = 2_130_706_432..=2_130_771_967;

/// The flags that select the mode under test.
fn mode_args() -> &'static [&'static str] {
    if WARM {
        &["--warm", "--mode", "handler"]
    } else {
        &[]
    }
}

/// The program as the mode runs it. Cold: the script as is. Warm: the
/// script becomes a handler module: its top-level code runs at import (in
/// the forked child, after its isolation), then `main` returns the
/// prelude's `seen` (`None` without the prelude), which the wrapper writes
/// to `TASK_OUTPUT`. `done()` has already written the same `seen` there,
/// so the output is the same in both modes.
fn program(code: &str) -> String {
    if WARM {
        format!("{code}\ndef main(_input):\n    return globals().get(\"seen\")\n")
    } else {
        code.to_string()
    }
}

/// Runs Python `code` with `--max-retries 0` and `extra` flags.
fn py(code: &str, extra: &[&str]) -> Run {
    py_env(code, extra, &[])
}

fn py_env(code: &str, extra: &[&str], envs: &[(&str, &str)]) -> Run {
    let mut args = vec!["--max-retries", "0"];
    args.extend_from_slice(mode_args());
    args.extend_from_slice(extra);
    let r = run_code(&program(code), "python", &args, envs);
    assert_eq!(
        is_warm(&r.result),
        WARM,
        "ran in the mode under test: {}",
        r.result["executionMetadata"]["executionEnvironment"]
    );
    r
}

/// Whether the run went through a fork server: only a fork-server run has
/// the sandbox phase `takeChild` (taking a forked child). The execution
/// environment says "warm" for the runner, also when a request falls back
/// to a cold sandbox, so it does not tell.
fn is_warm(result: &Value) -> bool {
    result["executionMetadata"]["attempts"]
        .as_array()
        .is_some_and(|a| {
            a.iter()
                .any(|a| !a["phases"]["sandbox"]["takeChild"].is_null())
        })
}

/// Python code that, when the task's process exits, replaces the output
/// file with what `make(path)` creates. At exit rather than at once: in
/// handler mode the wrapper writes main's return value to the output file
/// after the module is imported, and would otherwise write through (or
/// over) what the task planted there.
fn at_exit_replace_output(make: &str) -> String {
    format!(
        r#"
import atexit, os
def replace_output():
    path = os.environ["TASK_OUTPUT"]
    if os.path.lexists(path):
        os.remove(path)
    {make}
atexit.register(replace_output)
"#
    )
}

/// Python prelude: `attempt(name, fn)` records fn's result or its errno name
/// in `seen`; `sc(nr, *args)` is a raw syscall returning [ret, errno name];
/// `done()` writes `seen` as the output.
const PRELUDE: &str = r#"
import ctypes, errno, json, os, signal, socket, sys, time
seen = {}
def attempt(name, fn):
    try:
        seen[name] = {"ok": fn()}
    except OSError as e:
        code = errno.errorcode.get(e.errno, e.errno) if e.errno and e.errno > 0 else type(e).__name__
        seen[name] = {"errno": code}
libc = ctypes.CDLL(None, use_errno=True)
def sc(nr, *args):
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) if isinstance(a, int) else a for a in args])
    return [r, errno.errorcode.get(ctypes.get_errno(), ctypes.get_errno())]
def done():
    with open(os.environ["TASK_OUTPUT"], "w") as f:
        json.dump(seen, f)
"#;

fn script(body: &str) -> String {
    format!("{PRELUDE}\n{body}\ndone()\n")
}

fn errno_of<'a>(r: &'a Run, key: &str) -> &'a Value {
    &r.output()[key]["errno"]
}

#[test]
fn fork_bomb_hits_the_pids_limit() {
    let r = py(
        "import os\nwhile True:\n    os.fork()\n",
        &["--pids", "32", "--memory", "256Mi", "--timeout", "10s"],
    );
    r.expect_exhausted("pids");
    assert_eq!(r.details()["limit"], 32);
}

/// A limit reached is reported even when the task survives it: here the
/// main process forks until the pids limit refuses, then exits 0.
#[test]
fn fork_bomb_whose_main_process_exits_0_still_reports_the_pids_limit() {
    let code = r#"
import os, time
refused = False
try:
    for _ in range(10000):
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
except OSError:
    refused = True
print("refused" if refused else "never refused")
"#;
    let r = py(code, &["--pids", "24", "--memory", "256Mi", "--timeout", "20s"]);
    r.expect(0, "COMPLETED", None);
    assert!(r.result["stdout"].as_str().is_some_and(|s| s.contains("refused")), "{}", r.stdout);
    assert_eq!(
        r.result["executionMetadata"]["limitsHit"],
        json!(["pids"]),
        "{}",
        r.stdout
    );
}

#[test]
fn memory_bomb_hits_the_memory_limit() {
    let r = py(
        "chunks = []\nwhile True:\n    chunks.append(b'\\x01' * (8 << 20))\n",
        &["--memory", "64Mi", "--timeout", "10s"],
    );
    r.expect_exhausted("memory");
    assert_eq!(r.details()["limit"], 64 << 20);
    assert_eq!(r.result["signal"], "SIGKILL", "killed by the OOM killer");
    assert_eq!(r.attempts().len(), 1, "not retried: {}", r.stdout);
    assert_eq!(
        r.result["executionMetadata"]["limitsHit"],
        json!(["memory"]),
        "{}",
        r.stdout
    );
}

#[test]
fn cpu_spin_hits_the_cpu_time_limit_before_the_wall_clock() {
    let r = py(
        "while True:\n    pass\n",
        &["--cpu-time", "1s", "--timeout", "60s"],
    );
    // The reason names the CPU limit: the wall clock did not end it.
    r.expect_timeout("cpuTimeSeconds");
    let cpu = r.result["executionMetadata"]["cpuTimeMs"]
        .as_u64()
        .unwrap_or(0);
    assert!(cpu >= 1000, "used its second of CPU: {cpu} ms");
}

#[test]
fn sleep_past_the_timeout_is_killed_at_the_wall_clock_limit() {
    let r = py("import time\ntime.sleep(1000)\n", &["--timeout", "1s"]);
    r.expect_timeout("timeoutSeconds");
    // A bound on correctness, far from the task's own end, not a speed
    // figure (an emulated kernel takes seconds to set up a sandbox).
    assert!(r.elapsed < Duration::from_secs(60), "{:?}", r.elapsed);
}

/// Python that prints a first line, then numbered lines of 1 KiB to
/// `stream` forever.
fn endless(stream: &str) -> String {
    format!(
        "import sys\nout = sys.{stream}\nout.write('first line\\n')\nn = 0\n\
         while True:\n    n += 1\n    out.write(('%09d' % n) + 'x' * 1014 + '\\n')\n"
    )
}

/// A task printing forever to `stream` under a long timeout is stopped when
/// the stream reaches its cap, not at the timeout: RESOURCE_EXHAUSTION
/// naming the stream, `output` in limitsHit, and the stream kept as its
/// first bytes, a marker of what was left out, and its last 64 KiB.
fn endless_stream_is_stopped_at_its_cap(stream: &str) {
    let r = py(
        &endless(stream),
        &["--output-bytes", "256Ki", "--timeout", "600s"],
    );
    r.expect_exhausted("output");
    assert_eq!(
        r.message(),
        format!("{stream} reached its 256Ki cap (limits.outputBytes)")
    );
    assert_eq!(r.details()["stream"], stream, "{}", r.stdout);
    assert_eq!(r.details()["limit"], 256 << 10);
    let hit = &r.result["executionMetadata"]["limitsHit"];
    assert!(
        hit.as_array().is_some_and(|a| a.contains(&json!("output"))),
        "{hit}"
    );
    assert_eq!(r.result[format!("{stream}Truncated")], true);
    let kept = r.result[stream].as_str().unwrap_or("");
    assert!(kept.len() <= 256 << 10, "within the cap: {}", kept.len());
    assert!(kept.starts_with("first line\n000000001x"), "the head");
    let (head, rest) = kept.split_once("\n[... ").expect("a marker");
    let (omitted, tail) = rest.split_once(" bytes omitted ...]\n").expect("a marker");
    let omitted: u64 = omitted.parse().expect("a count");
    assert!(omitted > 0, "{omitted}");
    assert_eq!(tail.len(), 64 << 10, "the last 64 KiB");
    assert!(tail.ends_with('\n') || tail.ends_with('x'), "{tail:.40}");
    // Numbered lines: the tail comes after the head, with the omitted
    // bytes between them.
    let number = |line: &str| line.get(..9).and_then(|n| n.parse::<u64>().ok());
    let last_in_head = head.lines().rev().find_map(number).expect("head lines");
    let first_in_tail = tail.lines().skip(1).find_map(number).expect("tail lines");
    assert!(first_in_tail > last_in_head, "{last_in_head} < {first_in_tail}");
}

#[test]
fn endless_stdout_is_stopped_at_its_cap() {
    endless_stream_is_stopped_at_its_cap("stdout");
}

#[test]
fn endless_stderr_is_stopped_at_its_cap() {
    endless_stream_is_stopped_at_its_cap("stderr");
}

#[test]
fn output_of_exactly_the_cap_is_kept_whole() {
    let code = "import sys\n\
                sys.stdout.write('a' * 65535 + '\\n')\n\
                sys.stdout.flush()\n\
                sys.stderr.write('e' * 65535 + '\\n')\n\
                sys.stderr.flush()\n";
    let r = py(code, &["--output-bytes", "64Ki", "--timeout", "60s"]);
    r.expect(0, "COMPLETED", None);
    for (stream, c) in [("stdout", 'a'), ("stderr", 'e')] {
        let kept = r.result[stream].as_str().unwrap_or("");
        assert_eq!(kept.len(), 65536, "{stream}");
        assert_eq!(kept, format!("{}\n", c.to_string().repeat(65535)), "{stream}");
        assert_eq!(r.result[format!("{stream}Truncated")], false);
    }
    let hit = &r.result["executionMetadata"]["limitsHit"];
    assert!(
        hit.as_array().is_some_and(|a| !a.contains(&json!("output"))),
        "{hit}"
    );
}

#[test]
fn filling_the_work_dir_and_tmp_exhausts_disk() {
    let body = r#"
block = b"\xab" * (1 << 16)
for path in ("/task/fill.bin", "/tmp/fill.bin"):
    try:
        with open(path, "wb") as f:
            while True:
                f.write(block)
                f.flush()
    except OSError as e:
        print(path, errno.errorcode.get(e.errno), flush=True)
sys.exit(1)
"#;
    let r = py(
        &format!("{PRELUDE}\n{body}"),
        &["--disk", "8Mi", "--memory", "256Mi", "--timeout", "10s"],
    );
    r.expect_exhausted("disk");
    assert_eq!(r.details()["limit"], 8 << 20);
    assert_eq!(
        r.result["stdout"], "/task/fill.bin ENOSPC\n/tmp/fill.bin ENOSPC\n",
        "the work dir and /tmp share the limit"
    );
}

/// A disk limit reached is reported even when the task frees what it
/// wrote and exits 0: the work directory's file system is watched while
/// the task runs, not only looked at after its end.
#[test]
fn filling_the_disk_then_freeing_it_still_reports_the_disk_limit() {
    let body = r#"
import os, time
block = b"\xab" * (1 << 16)
try:
    with open("/task/fill.bin", "wb") as f:
        while True:
            f.write(block)
            f.flush()
except OSError as e:
    print(errno.errorcode.get(e.errno), flush=True)
time.sleep(0.5)
os.remove("/task/fill.bin")
print("freed", flush=True)
"#;
    let r = py(
        &format!("{PRELUDE}\n{body}"),
        &["--disk", "8Mi", "--memory", "256Mi", "--timeout", "20s"],
    );
    r.expect(0, "COMPLETED", None);
    assert_eq!(r.result["stdout"], "ENOSPC\nfreed\n", "{}", r.stdout);
    assert_eq!(
        r.result["executionMetadata"]["limitsHit"],
        json!(["disk"]),
        "{}",
        r.stdout
    );
}

#[test]
fn creating_files_until_no_inode_is_left_exhausts_disk() {
    let body = r#"
n = 0
try:
    while True:
        open("/tmp/f%d" % n, "w").close()
        n += 1
except OSError as e:
    print(errno.errorcode[e.errno], flush=True)
sys.exit(1)
"#;
    let r = py(
        &format!("{PRELUDE}\n{body}"),
        &["--disk", "8Mi", "--timeout", "10s"],
    );
    r.expect_exhausted("disk");
    assert_eq!(r.result["stdout"], "ENOSPC\n");
}

#[test]
fn self_sent_sigxcpu_without_a_cpu_limit_is_a_runtime_error() {
    let r = py(
        "import os, signal\nos.kill(os.getpid(), signal.SIGXCPU)\n",
        &["--timeout", "10s"],
    );
    r.expect(1, "FAILED", Some("RUNTIME_ERROR"));
    assert_eq!(r.details()["signal"], "SIGXCPU");
    assert_eq!(r.message(), "the task was killed by SIGXCPU");
}

#[test]
fn opening_files_until_emfile_stops_below_the_descriptor_limit() {
    let body = r#"
fds = []
try:
    while True:
        fds.append(os.open("/dev/null", os.O_RDONLY))
except OSError as e:
    seen["errno"] = errno.errorcode[e.errno]
seen["count"] = len(fds)
for fd in fds:
    os.close(fd)
"#;
    let r = py(&script(body), &["--timeout", "10s"]);
    r.expect(0, "COMPLETED", None);
    assert_eq!(r.output()["errno"], "EMFILE");
    let count = r.output()["count"].as_u64().unwrap_or(0);
    assert!((200..300).contains(&count), "opened {count}");
}

/// The top-level entries of the sandbox's root: the runtime's read-only
/// binds that exist on this host, plus the sandbox's own directories.
fn expected_root() -> Vec<String> {
    let mut names: Vec<String> = ["dev", "etc", "opt", "proc", "task", "tmp", "usr"]
        .map(String::from)
        .to_vec();
    for optional in ["bin", "lib", "lib64", "sbin"] {
        if std::fs::symlink_metadata(format!("/{optional}")).is_ok() {
            names.push(optional.to_string());
        }
    }
    names.sort();
    names
}

#[test]
fn host_secrets_are_not_visible_inside() {
    let body = r#"
attempt("shadow", lambda: open("/etc/shadow").read())
attempt("root", lambda: os.listdir("/root"))
attempt("environ1", lambda: open("/proc/1/environ", "rb").read().decode("latin-1"))
attempt("mountinfo1", lambda: open("/proc/1/mountinfo").read())
seen["slash"] = sorted(os.listdir("/"))
seen["procs"] = sorted(p for p in os.listdir("/proc") if p.isdigit())
seen["ids"] = [os.getuid(), os.geteuid(), os.getgid(), os.getegid(), os.getgroups()]
seen["pid"] = str(os.getpid())
seen["hostname"] = os.uname().nodename
"#;
    let r = py(&script(body), &["--timeout", "10s"]);
    r.expect(0, "COMPLETED", None);
    let out = r.output();
    assert_eq!(errno_of(&r, "shadow"), "ENOENT", "{out}");
    assert_eq!(errno_of(&r, "root"), "ENOENT", "{out}");
    // PID 1 inside is the sandbox's init (root); hidepid hides it.
    let environ = &out["environ1"];
    assert!(
        environ["errno"].is_string() || environ["ok"] == "",
        "init's environ must be unreadable or empty: {environ}"
    );
    assert!(out["mountinfo1"]["errno"].is_string(), "{out}");
    assert_eq!(out["slash"], json!(expected_root()));
    // Warm children run as a uid of their own from the fork server's
    // range, not as nobody: concurrent children share the server's PID
    // namespace and must not be able to signal each other. Either way a
    // non-root uid, the same for real and effective ids, no groups.
    let uid = out["ids"][0].as_u64().unwrap_or(0);
    if WARM {
        assert!(FORK_UIDS.contains(&uid), "{out}");
    } else {
        assert!(COLD_UIDS.contains(&uid), "{out}");
    }
    assert_eq!(out["ids"], json!([uid, uid, uid, uid, []]));
    assert_eq!(out["hostname"], "sandbox");
    // Only itself: cold, it shares a fresh PID namespace with the root init
    // alone; warm, also with the fork server, its init and spare children
    // (all root), and hidepid hides every process of another uid.
    assert_eq!(out["procs"], json!([out["pid"]]), "only itself: {out}");
}

#[test]
fn writes_to_usr_and_etc_fail_read_only() {
    let marker = unique("pwned");
    let body = format!(
        r#"
def w(p):
    with open(p, "a") as f:
        f.write("{marker}")
attempt("usr_new", lambda: w("/usr/{marker}"))
attempt("usr_bin", lambda: w("/usr/bin/env"))
attempt("etc_new", lambda: w("/etc/{marker}"))
attempt("etc_passwd", lambda: w("/etc/passwd"))
attempt("etc_ld_cache", lambda: w("/etc/ld.so.cache"))
attempt("mkdir_root", lambda: os.mkdir("/{marker}"))
attempt("chmod_usr", lambda: os.chmod("/usr/bin/env", 0o777))
"#
    );
    let env_before = std::fs::read("/usr/bin/env").expect("read /usr/bin/env");
    let passwd_before = std::fs::read("/etc/passwd").expect("read /etc/passwd");
    let r = py(&script(&body), &["--timeout", "10s"]);
    r.expect(0, "COMPLETED", None);
    for key in [
        "usr_new",
        "usr_bin",
        "etc_new",
        "etc_passwd",
        "etc_ld_cache",
        "mkdir_root",
        "chmod_usr",
    ] {
        let e = errno_of(&r, key);
        assert!(
            *e == "EROFS" || *e == "EACCES" || *e == "EPERM",
            "{key}: {}",
            r.output()
        );
    }
    // The read-only root refuses these before any permission check.
    assert_eq!(errno_of(&r, "etc_passwd"), "EROFS");
    assert_eq!(errno_of(&r, "mkdir_root"), "EROFS");
    for p in [
        format!("/usr/{marker}"),
        format!("/etc/{marker}"),
        format!("/{marker}"),
    ] {
        assert!(
            std::fs::symlink_metadata(&p).is_err(),
            "{p} created on the host"
        );
    }
    assert_eq!(std::fs::read("/usr/bin/env").expect("read"), env_before);
    assert_eq!(std::fs::read("/etc/passwd").expect("read"), passwd_before);
}

#[test]
fn symlink_to_etc_passwd_reads_only_the_synthetic_file() {
    let body = r#"
os.symlink("/etc/passwd", "/task/pw")
attempt("passwd", lambda: open("/task/pw").read())
os.symlink("/", "/task/rootlink")
attempt("rootlink", lambda: sorted(os.listdir("/task/rootlink")))
"#;
    let r = py(&script(body), &["--timeout", "10s"]);
    r.expect(0, "COMPLETED", None);
    let passwd = r.output()["passwd"]["ok"].as_str().unwrap_or("");
    let users: Vec<&str> = passwd.lines().filter_map(|l| l.split(':').next()).collect();
    // Warm: the fork server's /etc/passwd names each uid a child may get
    // (one "sandbox" line per uid), since it is built before any task.
    let sandbox_users = if WARM { FORK_UIDS.count() } else { 1 };
    assert_eq!(users[0], "root", "{passwd}");
    assert_eq!(users.len(), 1 + sandbox_users, "{passwd}");
    assert!(users[1..].iter().all(|u| *u == "sandbox"), "{passwd}");
    let host = std::fs::read_to_string("/etc/passwd").expect("host passwd");
    let host_users: Vec<&str> = host.lines().filter_map(|l| l.split(':').next()).collect();
    assert!(
        host_users.iter().any(|u| *u == "daemon" || *u == "bin"),
        "precondition: the host has system users: {host_users:?}"
    );
    assert!(!passwd.contains("daemon") && !passwd.contains("\nbin:"));
    assert_eq!(r.output()["rootlink"]["ok"], json!(expected_root()));
}

#[test]
fn hardlinks_from_the_read_only_root_into_the_work_dir_fail() {
    let body = r#"
attempt("etc_passwd", lambda: os.link("/etc/passwd", "/task/x"))
attempt("ld_cache", lambda: os.link("/etc/ld.so.cache", "/task/y"))
attempt("usr_env", lambda: os.link("/usr/bin/env", "/task/z"))
"#;
    let r = py(&script(body), &["--timeout", "10s"]);
    r.expect(0, "COMPLETED", None);
    for key in ["etc_passwd", "ld_cache", "usr_env"] {
        let e = errno_of(&r, key);
        assert!(*e == "EXDEV" || *e == "EPERM", "{key}: {}", r.output());
    }
}

#[test]
fn ptrace_is_refused_with_eperm() {
    let body = r#"
seen["traceme"] = sc(101, 0, 0, 0, 0)
seen["attach_init"] = sc(101, 16, 1, 0, 0)
seen["seize_init"] = sc(101, 0x4206, 1, 0, 0)
"#;
    let r = py(&script(body), &["--timeout", "10s"]);
    r.expect(0, "COMPLETED", None);
    for key in ["traceme", "attach_init", "seize_init"] {
        assert_eq!(r.output()[key], json!([-1, "EPERM"]), "{key}");
    }
}

#[test]
fn kill_minus_one_from_the_task_spares_host_processes() {
    let mut sleeper = Command::new("/bin/sleep")
        .arg("30")
        .stdin(Stdio::null())
        .spawn()
        .expect("start a host sleeper");
    let pid = sleeper.id().to_string();
    // `exist` lists the pids (inside) of processes the task cannot signal
    // but that exist (EPERM, not ESRCH), before and after its kill(-1).
    let body = r#"
def exist():
    found = []
    for p in range(1, 4096):
        try:
            os.kill(p, 0)
        except PermissionError:
            found.append(p)
        except ProcessLookupError:
            pass
    return found
seen["before"] = exist()
attempt("kill_all", lambda: os.kill(-1, signal.SIGKILL))
time.sleep(0.2)
seen["after"] = exist()
attempt("kill_host_pid", lambda: os.kill(int(os.environ["HOST_PID"]), signal.SIGKILL))
attempt("kill_init", lambda: os.kill(1, signal.SIGKILL))
"#;
    let r = py(
        &script(body),
        &["--timeout", "10s", "--env", &format!("HOST_PID={pid}")],
    );
    let alive = sleeper.try_wait().expect("try_wait").is_none();
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    r.expect(0, "COMPLETED", None);
    assert!(alive, "the host sleeper was killed");
    let out = r.output();
    if WARM {
        // The task shares its PID namespace with the fork server, its init
        // and spare children (root): kill(-1) finds them, is refused for
        // each, and the kernel then returns 0, not ESRCH (it reports EPERM
        // only through ESRCH when it found no process at all). Nothing was
        // killed: every one of them still exists afterwards.
        assert!(out["kill_all"]["ok"].is_null(), "{out}");
        assert!(out["kill_all"]["errno"].is_null(), "{out}");
        assert!(
            out["before"].as_array().is_some_and(|b| b.len() > 1),
            "{out}"
        );
    } else {
        // Alone with its init: no other process to signal at all.
        assert_eq!(errno_of(&r, "kill_all"), "ESRCH", "{out}");
        assert_eq!(out["before"], json!([1]), "{out}");
    }
    let after = out["after"].as_array().cloned().unwrap_or_default();
    for p in out["before"].as_array().into_iter().flatten() {
        assert!(after.contains(p), "pid {p} was killed by kill(-1): {out}");
    }
    // The host pid means nothing (or a process of its own) in the sandbox.
    assert!(errno_of(&r, "kill_host_pid").is_string(), "{}", r.output());
    assert!(errno_of(&r, "kill_init").is_string(), "{}", r.output());
}

#[test]
fn tcp_connect_to_a_host_listener_fails_and_is_never_accepted() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port().to_string();
    let body = r#"
def connect():
    s = socket.create_connection(("127.0.0.1", int(os.environ["PORT"])), timeout=2)
    s.sendall(b"hello from the sandbox")
    return "connected"
attempt("connect", connect)
"#;
    let r = py(
        &script(body),
        &["--timeout", "10s", "--env", &format!("PORT={port}")],
    );
    r.expect(0, "COMPLETED", None);
    assert_eq!(errno_of(&r, "connect"), "ECONNREFUSED", "{}", r.output());
    match listener.accept() {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        other => panic!("the host listener saw a connection: {other:?}"),
    }
}

#[test]
fn dns_lookup_fails() {
    let body = r#"
attempt("dns", lambda: socket.getaddrinfo("example.com", 80))
"#;
    let r = py(&script(body), &["--timeout", "10s"]);
    r.expect(0, "COMPLETED", None);
    assert!(
        r.output()["dns"]["ok"].is_null() && !r.output()["dns"]["errno"].is_null(),
        "{}",
        r.output()
    );
}

#[test]
fn mount_unshare_keyctl_and_bpf_fail_with_eperm() {
    let body = r#"
seen["mount"] = sc(165, b"none", b"/task", b"tmpfs", 0, 0)
seen["unshare_user"] = sc(272, 0x10000000)
seen["unshare_ns"] = sc(272, 0x00020000)
seen["keyctl"] = sc(250, 0, 0, 0, 0, 0)
seen["bpf"] = sc(321, 0, 0, 0)
seen["getpid"] = sc(39)
"#;
    let r = py(&script(body), &["--timeout", "10s"]);
    r.expect(0, "COMPLETED", None);
    for key in ["mount", "unshare_user", "unshare_ns", "keyctl", "bpf"] {
        assert_eq!(
            r.output()[key],
            json!([-1, "EPERM"]),
            "{key}: {}",
            r.output()
        );
    }
    // The harness itself works: an allowed call succeeds.
    assert!(r.output()["getpid"][0].as_i64().is_some_and(|p| p > 0));
}

/// inotify (and fanotify) would show, live, which files of the shared
/// read-only mounts (/usr, ...) the host and other tasks open: refused
/// with ENOSYS, as on a kernel without inotify, so programs fall back.
#[test]
fn inotify_on_usr_is_refused() {
    let body = r#"
seen["inotify_init1"] = sc(294, 0)
seen["inotify_init"] = sc(253)
seen["inotify_add_watch"] = sc(254, 3, b"/usr", 0x20)
seen["fanotify_init"] = sc(300, 0, 0)
seen["fanotify_mark"] = sc(301, 3, 1, 0x20, -100, b"/usr")
"#;
    let r = py(&script(body), &["--timeout", "10s"]);
    r.expect(0, "COMPLETED", None);
    for key in ["inotify_init1", "inotify_init", "inotify_add_watch"] {
        assert_eq!(r.output()[key], json!([-1, "ENOSYS"]), "{key}: {}", r.output());
    }
    for key in ["fanotify_init", "fanotify_mark"] {
        assert_eq!(r.output()[key], json!([-1, "EPERM"]), "{key}: {}", r.output());
    }
}

/// NETLINK_ROUTE sockets work (the interface list: only `lo` in the task's
/// network namespace); every other netlink protocol is refused.
#[test]
fn netlink_route_queries_work_and_other_netlink_protocols_are_refused() {
    let body = r#"
def route():
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
    s.close()
    return "opened"
attempt("route", route)
attempt("interfaces", lambda: [name for _, name in socket.if_nameindex()])
attempt("audit", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 9) and "opened")
attempt("uevent", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 15) and "opened")
attempt("sock_diag", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 4) and "opened")
"#;
    let r = py(&script(body), &["--timeout", "10s"]);
    r.expect(0, "COMPLETED", None);
    assert_eq!(r.output()["route"], json!({"ok": "opened"}), "{}", r.output());
    assert_eq!(r.output()["interfaces"], json!({"ok": ["lo"]}), "{}", r.output());
    for key in ["audit", "uevent", "sock_diag"] {
        assert_eq!(r.output()[key], json!({"errno": "EPERM"}), "{key}: {}", r.output());
    }
}

#[test]
fn double_forked_daemon_does_not_outlive_the_task() {
    let marker = unique("MARKER");
    let body = r#"
marker = os.environ["MARKER"]
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    pid = os.fork()
    if pid == 0:
        os.execv("/usr/bin/python3", ["python3", "-c", "import time; time.sleep(1000)", marker])
    os.write(w, str(pid).encode())
    os._exit(0)
os.close(w)
os.wait()
daemon = int(os.read(r, 64))
for _ in range(100):
    try:
        if marker.encode() in open("/proc/%d/cmdline" % daemon, "rb").read():
            break
    except OSError:
        pass
    time.sleep(0.02)
seen["pid"] = daemon
seen["cmdline"] = open("/proc/%d/cmdline" % daemon, "rb").read().decode().split("\0")
"#;
    let r = py(
        &script(body),
        &["--timeout", "10s", "--env", &format!("MARKER={marker}")],
    );
    r.expect(0, "COMPLETED", None);
    assert!(r.output()["pid"].as_u64().is_some_and(|p| p > 1));
    assert!(
        r.output()["cmdline"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == marker.as_str())),
        "the daemon ran: {}",
        r.output()
    );
    assert_eq!(processes_with(&marker), Vec::<u32>::new());
}

#[test]
fn task_output_symlinked_to_a_host_file_is_not_read() {
    let secret = unique("TOPSECRET");
    let host = tempfile::NamedTempFile::new().expect("temp");
    std::fs::write(host.path(), json!({"secret": secret}).to_string()).expect("write");
    let host_path = host.path().to_string_lossy().into_owned();
    for target in [host_path.as_str(), "/etc/hostname", "/etc/passwd"] {
        let r = py(
            &at_exit_replace_output(r#"os.symlink(os.environ["TARGET"], path)"#),
            &["--timeout", "10s", "--env", &format!("TARGET={target}")],
        );
        r.expect(1, "FAILED", Some("OUTPUT_VALIDATION"));
        assert!(
            r.message().contains("symbolic link"),
            "{target}: {}",
            r.message()
        );
        assert!(r.details().get("head").is_none(), "{target}: nothing read");
        assert!(!r.stdout.contains(&secret), "{target}: the secret leaked");
        assert!(!r.stdout.contains("root:x:0:0"), "{target}: passwd leaked");
        assert_eq!(r.attempts().len(), 1);
    }
}

#[test]
fn task_output_replaced_by_a_fifo_is_refused_without_blocking() {
    let r = py(
        &at_exit_replace_output("os.mkfifo(path)"),
        &["--timeout", "5s"],
    );
    r.expect(1, "FAILED", Some("OUTPUT_VALIDATION"));
    assert!(
        r.message().contains("not a regular file"),
        "{}",
        r.message()
    );
    // Blocking on the FIFO would hang the executor for good: any bound
    // proves it did not.
    assert!(r.elapsed < Duration::from_secs(60), "{:?}", r.elapsed);
}

#[test]
fn output_file_over_the_output_cap_exhausts_output() {
    let r = py(
        &at_exit_replace_output(r#"open(path, "w").write('"' + "x" * 100000 + '"')"#),
        &["--output-bytes", "64Ki", "--timeout", "5s"],
    );
    r.expect_exhausted("output");
    assert_eq!(r.details()["limit"], 64 << 10);
}

#[test]
fn symlink_to_a_host_dir_left_in_the_work_dir_survives_cleanup() {
    let dir = tempfile::tempdir().expect("tempdir");
    let canary = dir.path().join("canary.txt");
    std::fs::write(&canary, "still here").expect("write");
    let body = r#"
os.symlink(os.environ["HOSTDIR"], "/task/evil")
os.symlink(os.environ["HOSTDIR"] + "/canary.txt", "/task/evil-file")
os.symlink(os.environ["HOSTDIR"], "/tmp/evil")
attempt("through", lambda: os.listdir("/task/evil"))
"#;
    let r = py(
        &script(body),
        &[
            "--timeout",
            "10s",
            "--env",
            &format!("HOSTDIR={}", dir.path().display()),
        ],
    );
    r.expect(0, "COMPLETED", None);
    assert_eq!(
        errno_of(&r, "through"),
        "ENOENT",
        "the host dir is not inside"
    );
    assert!(dir.path().is_dir(), "host dir removed");
    assert_eq!(
        std::fs::read_to_string(&canary).expect("canary"),
        "still here"
    );
}

#[test]
fn process_ignoring_sigterm_is_killed_at_the_timeout() {
    let marker = unique("STUBBORN");
    let body = r#"
import os, signal, subprocess, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
subprocess.Popen(["/usr/bin/python3", "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(1000)", os.environ["MARKER"]])
time.sleep(1000)
"#;
    let start = Instant::now();
    let r = py(
        body,
        &["--timeout", "1s", "--env", &format!("MARKER={marker}")],
    );
    r.expect_timeout("timeoutSeconds");
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(processes_with(&marker), Vec::<u32>::new());
}

#[test]
fn executor_environment_is_invisible_to_the_task() {
    let secret = unique("s3cr3t");
    // Prints its environment, /proc/self/environ, and every environment
    // entry ("NAME=" up to a NUL) on its stack, where the kernel put the
    // initial environment block (warm: the one the fork server started
    // with, inherited by the fork).
    let body = r#"
print(os.environ)
attempt("proc_environ", lambda: open("/proc/self/environ", "rb").read().decode("latin-1"))
print(seen["proc_environ"])
def stack_environment():
    for line in open("/proc/self/maps"):
        fields = line.split()
        if fields[-1] == "[stack]":
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            mem = ctypes.string_at(lo, hi - lo)
            return [w.decode("latin-1") for w in mem.split(b"\0") if b"=" in w and w[:1].isalpha()]
seen["stack_environment"] = stack_environment()
print(seen["stack_environment"])
"#;
    let r = py_env(
        &script(body),
        &["--timeout", "10s"],
        &[("TASKEXEC_TEST_SECRET", &secret)],
    );
    r.expect(0, "COMPLETED", None);
    let stdout = r.result["stdout"].as_str().unwrap_or("");
    assert!(
        stdout.contains("TASK_OUTPUT"),
        "the task printed its environment"
    );
    assert!(!stdout.contains("TASKEXEC_TEST_SECRET"), "{stdout}");
    let out = r.output();
    let on_stack: Vec<&str> = out["stack_environment"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        on_stack.iter().any(|e| e.starts_with("PATH=")),
        "the stack scan finds the environment block: {out}"
    );
    assert!(
        !on_stack.iter().any(|e| e.contains("TASKEXEC_TEST_SECRET")),
        "{out}"
    );
    if WARM {
        // The child never calls execve: after it drops root for the task's
        // uid the kernel leaves it non-dumpable, so its /proc files belong
        // to root and it cannot read its own /proc/self/environ. Stricter
        // than cold, and nothing of the executor would be there anyway.
        assert_eq!(out["proc_environ"]["errno"], "EACCES", "{out}");
    } else {
        let environ = out["proc_environ"]["ok"].as_str().unwrap_or("");
        assert!(environ.contains("TASK_OUTPUT="), "{out}");
    }
    assert!(
        !r.stdout.contains(&secret),
        "the secret is nowhere in the result"
    );
}

/// Host process `pid`: its start time (in clock ticks since boot; with
/// the pid, it names one process even if the pid is reused) and whether it
/// is still running code, that is neither a zombie nor already in the
/// kernel's exit path (`PF_EXITING`, set once a killed process starts to
/// exit).
fn start_and_running(pid: u32) -> Option<(u64, bool)> {
    const PF_EXITING: u64 = 0x4;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command (which may contain spaces) in
    // parentheses: state is field 3, flags field 9, starttime field 22.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split(' ').collect();
    let flags: u64 = fields.get(6)?.parse().ok()?;
    let running = *fields.first()? != "Z" && flags & PF_EXITING == 0;
    Some((fields.get(19)?.parse().ok()?, running))
}

/// Every live host process descending from `root` (its launchers, inits,
/// fork servers, tasks), as (pid, start time, command line).
fn descendants(root: u32) -> Vec<(u32, u64, String)> {
    let mut parent = std::collections::HashMap::new();
    for e in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let status = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
        let ppid = status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .and_then(|v| v.trim().parse::<u32>().ok());
        if let Some(ppid) = ppid {
            parent.insert(pid, ppid);
        }
    }
    let mut found = Vec::new();
    for &pid in parent.keys() {
        let mut p = pid;
        let mut hops = 0;
        while let Some(&pp) = parent.get(&p) {
            if pp == root {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                if let Some((t, _)) = start_and_running(pid) {
                    found.push((pid, t, cmdline));
                }
                break;
            }
            p = pp;
            hops += 1;
            if pp <= 1 || hops > 64 {
                break;
            }
        }
    }
    found
}

#[test]
fn no_process_mount_or_cgroup_outlives_a_run() {
    let marker = unique("LEFTOVER");
    let code = r#"
import os, subprocess, time
subprocess.Popen(["/usr/bin/python3", "-c", "import time; time.sleep(1000)", os.environ["MARKER"]], start_new_session=True)
time.sleep(4)
"#;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("main.py");
    std::fs::write(&file, program(code)).expect("write");
    let mounts_before = util::sandbox_mounts();
    let child = Command::new(env!("CARGO_BIN_EXE_taskexec"))
        .args(["run", &file.to_string_lossy(), "--json", "--timeout", "60s"])
        .args(mode_args())
        .args(["--env", &format!("MARKER={marker}")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    // While the task runs, its cgroup and its marked process are visible
    // from the host: the checks below look in the right places.
    let deadline = Instant::now() + Duration::from_secs(40);
    let (mut cgroups, mut procs) = (Vec::new(), Vec::new());
    // Every process the executor started, directly or not: the launcher,
    // the init and the task (cold); the fork server's launcher and init,
    // the server and its children (warm).
    let mut spawned = std::collections::BTreeSet::new();
    while Instant::now() < deadline && (cgroups.is_empty() || procs.is_empty()) {
        cgroups = util::task_cgroups(pid);
        // The marker is in the executor's command line too (--env), and
        // in its children's between their fork and their exec: only the
        // task's sleeper counts.
        procs = processes_with(&marker);
        procs.retain(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| c.starts_with(b"/usr/bin/python3\0-c\0"))
        });
        spawned.extend(descendants(pid));
        std::thread::sleep(Duration::from_millis(20));
    }
    spawned.extend(descendants(pid));
    let out = child.wait_with_output().expect("wait");
    let result: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert_eq!(result["status"], "COMPLETED", "{result}");
    assert_eq!(
        is_warm(&result),
        WARM,
        "ran in the mode under test: {result}"
    );
    // The fork server (warm) is among the processes seen while running:
    // the check below looks at it too.
    assert_eq!(
        spawned
            .iter()
            .any(|(_, _, cmd)| cmd.contains("taskexec_zygote.py")),
        WARM,
        "{spawned:?}"
    );
    assert!(
        spawned.iter().any(|(_, _, cmd)| cmd.contains(&marker)),
        "the marked process descends from the executor: {spawned:?}; marked: {procs:?}"
    );
    assert!(
        !cgroups.is_empty(),
        "the task cgroup was seen while running"
    );
    let env = result["executionMetadata"]["executionEnvironment"]
        .as_str()
        .unwrap_or("");
    if env.contains("cgroup v1") {
        for controller in ["memory", "pids"] {
            let root = format!("/sys/fs/cgroup/{controller}/");
            assert!(
                cgroups.iter().any(|c| c.starts_with(&root)),
                "a {controller} cgroup: {cgroups:?}"
            );
        }
    }
    assert!(
        !procs.is_empty(),
        "the marked process was seen while running"
    );
    // And afterwards: nothing. Not a process the executor started (the
    // fork server, its init and its launcher included: `run` shuts its
    // runner down before it exits), not a cgroup, not a mount. Warm, the
    // fork server's init may still be finishing its exit here: killed with
    // its launcher at shutdown, it leaves its cgroup at once (so the cgroup
    // can be removed) but, as a PID namespace's init, exits only once the
    // kernel has reaped the namespace, and then waits as a zombie for the
    // host's init. Neither runs code any more.
    let alive: Vec<_> = spawned
        .iter()
        .filter(|(p, t, _)| start_and_running(*p) == Some((*t, true)))
        .collect();
    assert!(alive.is_empty(), "outlived the run: {alive:?}");
    assert_eq!(util::task_cgroups(pid), Vec::<std::path::PathBuf>::new());
    assert_eq!(processes_with(&marker), Vec::<u32>::new());
    util::assert_host_clean(pid, &mounts_before);
    for file in ["/proc/1/mountinfo", "/proc/self/mountinfo"] {
        let text = std::fs::read_to_string(file).expect("mountinfo");
        for line in text.lines() {
            let point = line.split(' ').nth(4).unwrap_or("");
            assert!(!point.contains("taskexec"), "{file}: {line}");
        }
    }
}
