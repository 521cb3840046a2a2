//! Privileged tests of the sandbox itself (run as root): a run's result and
//! read-back, cancellation, the wall-clock kill of a whole process tree, a
//! setup failure, and that nothing of a run is left behind.

use std::path::Path;
use std::time::{Duration, Instant};

use taskexec_sandbox::*;

mod common;
use common::*;

fn request(code: &str) -> RunRequest {
    RunRequest {
        argv: vec!["/usr/bin/python3".into(), "-c".into(), code.into()],
        env: vec![("PATH".into(), "/usr/bin".into())],
        ro_mounts: python_mounts(),
        work_files: vec![SandboxFile {
            path: "in.json".into(),
            content: b"{\"x\":2}".to_vec(),
            executable: false,
        }],
        support_files: vec![],
        stdin_path: Some("/task/in.json".into()),
        read_back: vec!["/task/out.json".into()],
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
        fork_server: None,
        preload: Vec::new(),
    }
}

#[test]
fn a_task_runs_unprivileged_in_its_own_root_and_its_output_is_read_back() {
    let _serial = serial();
    let out = sandbox()
        .run(
            &request(
                "import os, sys, json\n\
                 json.dump({'uid': os.getuid(), 'gid': os.getgid(), 'pid': os.getpid(), 'root': sorted(os.listdir('/')),\n\
                            'stdin': sys.stdin.read(), 'host': os.uname().nodename}, open('/task/out.json', 'w'))\n\
                 print('hello')",
            ),
            None,
        )
        .expect("run");
    assert_eq!(
        out.termination,
        Termination::Exited(ExitStatus::Code(0)),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"hello\n");
    let ReadBackResult::Read {
        data,
        truncated: false,
    } = &out.read_back[0]
    else {
        panic!("{:?}", out.read_back)
    };
    let v: serde_json::Value = serde_json::from_slice(data).expect("json");
    // A uid of its own from the task range, which no host account uses.
    let uid = u32::try_from(v["uid"].as_u64().expect("uid")).expect("a uid fits u32");
    assert!(TaskUids::DEFAULT.contains(uid), "{v}");
    assert_eq!(v["gid"], v["uid"]);
    assert_eq!(
        v["pid"], 2,
        "the task is the first child of the sandbox's init"
    );
    assert_eq!(v["stdin"], "{\"x\":2}");
    assert_eq!(v["host"], "sandbox");
    let root: Vec<&str> = v["root"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|x| x.as_str())
        .collect();
    assert_eq!(
        root,
        vec![
            "bin", "dev", "etc", "lib", "lib64", "opt", "proc", "task", "tmp", "usr"
        ]
    );
    assert!(out.stats.cpu_time > Duration::ZERO);
    assert!(out.stats.peak_memory_bytes.unwrap_or(0) > 0);
    assert!(leftover_cgroups().is_empty(), "{:?}", leftover_cgroups());
}

#[test]
fn cancel_kills_the_whole_tree_and_leaves_nothing() {
    let _serial = serial();
    let marker = format!("cancel-marker-{}", std::process::id());
    let sb = sandbox();
    let token = CancelToken::new().expect("token");
    let t2 = token.clone();
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(400));
        t2.cancel();
        Instant::now()
    });
    let code = format!(
        "import os, subprocess, time\n\
         subprocess.Popen(['/usr/bin/python3', '-c', 'import time; time.sleep(60)', '{marker}'], start_new_session=True)\n\
         time.sleep(60)"
    );
    let out = sb.run(&request(&code), Some(&token)).expect("run");
    let returned = Instant::now();
    let cancelled_at = canceller.join().expect("join");
    assert_eq!(out.termination, Termination::Cancelled);
    // Not a timing assertion on speed: the run must simply end on the cancel
    // rather than at its 20 s wall-clock limit.
    assert!(returned.duration_since(cancelled_at) < Duration::from_secs(5));
    assert!(
        processes_with(&marker).is_empty(),
        "{:?}",
        processes_with(&marker)
    );
    assert!(leftover_cgroups().is_empty(), "{:?}", leftover_cgroups());
}

#[test]
fn the_wall_clock_limit_kills_processes_that_ignore_sigterm_and_daemons() {
    let _serial = serial();
    let marker = format!("timeout-marker-{}", std::process::id());
    let mut req = request(&format!(
        "import os, signal, time\n\
         signal.signal(signal.SIGTERM, signal.SIG_IGN)\n\
         if os.fork() == 0:\n\
         \x20   os.setsid()\n\
         \x20   if os.fork() == 0:\n\
         \x20       os.execv('/usr/bin/python3', ['/usr/bin/python3', '-c', 'import time; time.sleep(60)', '{marker}'])\n\
         \x20   os._exit(0)\n\
         time.sleep(60)"
    ));
    req.limits.timeout = Duration::from_secs(1);
    let out = sandbox().run(&req, None).expect("run");
    assert_eq!(out.termination, Termination::TimedOut);
    assert!(
        processes_with(&marker).is_empty(),
        "{:?}",
        processes_with(&marker)
    );
    assert!(leftover_cgroups().is_empty(), "{:?}", leftover_cgroups());
}

#[test]
fn a_missing_interpreter_is_a_setup_error_not_a_task_failure() {
    let _serial = serial();
    let mut req = request("");
    req.argv = vec!["/usr/bin/no-such-interpreter".into()];
    match sandbox().run(&req, None) {
        Err(SandboxError::Setup { stage, message }) => {
            assert_eq!(stage, "exec");
            assert!(message.contains("ENOENT"), "{message}");
        }
        other => panic!("expected a setup error, got {other:?}"),
    }
    assert!(leftover_cgroups().is_empty(), "{:?}", leftover_cgroups());
}

#[test]
fn work_files_are_not_visible_on_the_host_and_vanish_with_the_run() {
    let _serial = serial();
    // The work dir lives only in the sandbox's mount namespace: the task
    // writes a file, and no host path anywhere holds it afterwards.
    let marker = format!("host-invisible-{}", std::process::id());
    let code =
        format!("open('/task/{marker}', 'w').write('x'); open('/tmp/{marker}', 'w').write('x')");
    let out = sandbox().run(&request(&code), None).expect("run");
    assert_eq!(out.termination, Termination::Exited(ExitStatus::Code(0)));
    for dir in ["/tmp", "/task", "/var/tmp"] {
        assert!(
            !Path::new(dir).join(&marker).exists(),
            "{dir}/{marker} exists on the host"
        );
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        !mounts.contains("/.scratch"),
        "no sandbox mount is visible on the host"
    );
}

/// A single-threaded process that writes `0` into each of a task cgroup's
/// self-join files sits in that cgroup in every hierarchy, and so do its
/// children: the launcher moves itself this way (cgroup v1).
#[test]
fn writing_0_into_the_self_join_files_moves_a_process_into_its_cgroup() {
    let _serial = serial();
    let driver = cgroup::detect(None).expect("a usable cgroup hierarchy");
    let name = format!("taskexec-{}-selfjoin", std::process::id());
    let cg = driver
        .create(
            &name,
            &cgroup::CgroupLimits {
                memory_bytes: 64 << 20,
                pids: 16,
                cpu_request_millis: 100,
                cpu_limit_millis: None,
            },
        )
        .expect("create");
    let files = cg.self_join_files();
    if driver.version() == cgroup::CgroupVersion::V2 {
        assert!(files.is_empty(), "{files:?}");
    } else {
        assert!(!files.is_empty());
        let script: String = files
            .iter()
            .map(|f| format!("echo 0 > {} && ", f.display()))
            .collect::<String>()
            + "cat /proc/self/cgroup";
        let out = std::process::Command::new("/bin/sh")
            .args(["-c", &script])
            .output()
            .expect("sh");
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        // One line per v1 hierarchy the cgroup spans (one `tasks` file
        // each), each ending in its name.
        let joined = text
            .lines()
            .filter(|l| l.ends_with(&format!("/{name}")))
            .count();
        assert_eq!(joined, files.len(), "{text}");
        for f in &files {
            let tasks = std::fs::read_to_string(f).expect("tasks");
            assert!(tasks.trim().is_empty(), "the process has exited: {tasks}");
        }
    }
    cg.kill_all().expect("kill");
    cg.remove().expect("remove");
    assert!(leftover_cgroups().is_empty(), "{:?}", leftover_cgroups());
}

/// A task over its memory limit is OOM-killed and the run reports it (the
/// supervisor survives and says how the task ended), with the cgroup's
/// counters; on cgroup v2 the task runs in its own leaf with its own
/// cgroup namespace root and a reset `oom_score_adj`.
#[test]
fn a_task_over_its_memory_limit_is_oom_killed_and_reported() {
    let _serial = serial();
    let mut req = request(
        "import json\n\
         info = {'cgroup': open('/proc/self/cgroup').read(), 'adj': open('/proc/self/oom_score_adj').read()}\n\
         json.dump(info, open('/task/out.json', 'w'))\n\
         chunks = []\n\
         while True:\n    chunks.append(b'\\x01' * (4 << 20))\n",
    );
    req.limits.memory_bytes = 64 << 20;
    let out = sandbox().run(&req, None).expect("an outcome, not an error");
    assert_eq!(
        out.termination,
        Termination::Exited(ExitStatus::Signal(libc::SIGKILL)),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stats.oom_kills > 0, "{:?}", out.stats);
    let ReadBackResult::Read { data, .. } = &out.read_back[0] else {
        panic!("{:?}", out.read_back)
    };
    let v: serde_json::Value = serde_json::from_slice(data).expect("json");
    let ours = std::fs::read_to_string("/proc/self/oom_score_adj").expect("ours");
    assert_eq!(v["adj"], ours, "the task is an ordinary OOM candidate");
    // (Some v1 kernels leave `memory.failcnt` at 0.)
    if sandbox().cgroups().version() == cgroup::CgroupVersion::V2 {
        assert!(out.stats.memory_max_hits > 0, "{:?}", out.stats);
        assert_eq!(v["cgroup"], "0::/\n", "its own leaf is its cgroup root");
    }
    assert!(leftover_cgroups().is_empty(), "{:?}", leftover_cgroups());
}

/// On cgroup v2, an executor that shares its cgroup with other processes
/// (a systemd unit without `Delegate=yes`) cannot enable controllers there
/// ("no internal processes"): it moves itself and the others into a leaf
/// first, as systemd-managed services do. Needs cgroup v2 (skipped on v1).
#[test]
fn an_executor_sharing_its_v2_cgroup_moves_everyone_into_a_leaf() {
    let _serial = serial();
    let driver = cgroup::detect(None).expect("a usable cgroup hierarchy");
    if driver.version() != cgroup::CgroupVersion::V2 {
        eprintln!("skipped: the host's cgroups are v1");
        return;
    }
    let top = driver.parents()[0].clone();
    let name = format!("taskexec-{}-shared", std::process::id());
    let shared = top.join(&name);
    std::fs::create_dir(&shared).expect("mkdir");
    let spawn = || {
        std::process::Command::new("/bin/sleep")
            .arg("60")
            .spawn()
            .expect("sleep")
    };
    // The "executor" and a process sharing its cgroup.
    let (mut executor, mut other) = (spawn(), spawn());
    for p in [&executor, &other] {
        std::fs::write(shared.join("cgroup.procs"), p.id().to_string()).expect("move");
    }
    let made = cgroup::V2Driver::new(&top, &name, executor.id());
    let leaf = shared.join(cgroup::EXECUTOR_LEAF);
    let in_leaf = std::fs::read_to_string(leaf.join("cgroup.procs")).unwrap_or_default();
    let control =
        std::fs::read_to_string(shared.join("cgroup.subtree_control")).unwrap_or_default();
    for p in [&mut executor, &mut other] {
        let _ = p.kill();
        let _ = p.wait();
    }
    let _ = std::fs::remove_dir(&leaf);
    let _ = std::fs::remove_dir(&shared);
    let driver = made.expect("the driver moves the processes and enables the controllers");
    assert_eq!(driver.parent(), shared.as_path());
    for p in [&executor, &other] {
        assert!(
            in_leaf.lines().any(|l| l == p.id().to_string()),
            "{} in the leaf: {in_leaf:?}",
            p.id()
        );
    }
    for c in ["memory", "pids", "cpu"] {
        assert!(control.split_whitespace().any(|e| e == c), "{control:?}");
    }
    assert!(leftover_cgroups().is_empty(), "{:?}", leftover_cgroups());
}

/// Two tasks running at once never share a uid, so a per-uid kernel limit
/// one of them exhausts does not reach the other: here the process count
/// of a uid, which `RLIMIT_NPROC` bounds (the same holds for every count
/// the kernel keeps per user: inotify instances, message queue bytes,
/// pending signals...). Cold tasks once all ran as uid 65534, so a task
/// holding nine processes made a concurrent task's `fork` fail.
#[test]
fn concurrent_tasks_do_not_share_a_uid_or_its_kernel_limits() {
    let _serial = serial();
    let sb = sandbox();
    let marker = format!("nproc-holder-{}", std::process::id());
    let mut holder = request(
        "import os, time\n\
         for _ in range(8):\n\
         \x20   if os.fork() == 0:\n\
         \x20       time.sleep(60)\n\
         \x20       os._exit(0)\n\
         time.sleep(60)",
    );
    holder.argv.push(marker.clone());
    let token = CancelToken::new().expect("token");
    std::thread::scope(|scope| {
        let held = scope.spawn(|| sb.run(&holder, Some(&token)).expect("holder runs"));
        // The holder's nine processes are up before the other task starts.
        let until = Instant::now() + Duration::from_secs(20);
        while processes_with(&marker).len() < 9 {
            assert!(Instant::now() < until, "the holder never started");
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = sb
            .run(
                &request(
                    "import os, resource, sys\n\
                     resource.setrlimit(resource.RLIMIT_NPROC, (4, 4))\n\
                     try:\n\
                     \x20   pid = os.fork()\n\
                     except OSError as e:\n\
                     \x20   print('fork failed:', e.strerror, 'uid', os.getuid())\n\
                     \x20   sys.exit(3)\n\
                     if pid == 0:\n\
                     \x20   os._exit(0)\n\
                     os.waitpid(pid, 0)\n\
                     print('forked')",
                ),
                None,
            )
            .expect("runs");
        token.cancel();
        let held = held.join().expect("joins");
        assert_eq!(held.termination, Termination::Cancelled);
        assert_eq!(
            (out.termination, String::from_utf8_lossy(&out.stdout).trim()),
            (Termination::Exited(ExitStatus::Code(0)), "forked"),
            "stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    assert!(processes_with(&marker).is_empty());
    assert!(leftover_cgroups().is_empty(), "{:?}", leftover_cgroups());
}
