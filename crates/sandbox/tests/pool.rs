//! Privileged tests of the warm launcher pool (run as root): a pre-built
//! sandbox serves exactly one task and nothing of it reaches the next, a
//! dead pre-built sandbox is replaced without failing a task, the pool grows
//! under a burst and shrinks when idle, and nothing is left once it is
//! dropped. No test asserts on how long anything takes: waits poll the
//! pool's stats up to a generous deadline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use taskexec_sandbox::pool::{LauncherPool, PoolConfig, PoolStats};
use taskexec_sandbox::*;

mod common;
use common::*;

fn shared_sandbox() -> Arc<Sandbox> {
    Arc::new(sandbox())
}

fn pool(config: PoolConfig) -> LauncherPool {
    LauncherPool::new(shared_sandbox(), config)
}

/// A Python task with one work file, `/task/in.json`, as stdin, whose
/// `/task/out.json` is read back.
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
        support_files: vec![SandboxFile {
            path: "wrapper.py".into(),
            content: b"# the same for every task of the key\n".to_vec(),
            executable: false,
        }],
        stdin_path: Some("/task/in.json".into()),
        read_back: vec!["/task/out.json".into()],
        collect_dir: None,
        limits: SandboxLimits {
            memory_bytes: 128 << 20,
            disk_bytes: 16 << 20,
            pids: 64,
            cpu_request_millis: 1000,
            cpu_limit_millis: None,
            timeout: Duration::from_secs(30),
            cpu_time: None,
            output_bytes: 1 << 20,
            nofile: 256,
        },
        user: None,
        fork_server: None,
        preload: Vec::new(),
    }
}

/// Runs `req` and checks that it exited 0; returns its parsed output file.
fn run_ok(pool: &LauncherPool, req: &RunRequest) -> (RunOutcome, serde_json::Value) {
    let out = pool.run(req, None).expect("run");
    assert_eq!(
        out.termination,
        Termination::Exited(ExitStatus::Code(0)),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let value = match out.read_back.first() {
        Some(ReadBackResult::Read { data, .. }) => serde_json::from_slice(data).expect("json"),
        _ => serde_json::Value::Null,
    };
    (out, value)
}

/// Polls the pool's stats until `done` holds (a liveness wait, not a timing
/// assertion: the deadline only keeps a broken pool from hanging the test).
fn wait_for(pool: &LauncherPool, what: &str, mut done: impl FnMut(&PoolStats) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let stats = pool.stats();
        if done(&stats) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "gave up waiting for {what}: {stats:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Launchers spawned by this process (pooled or running), by pid.
fn our_launchers() -> Vec<i32> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").expect("proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": the comm may hold spaces.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1).map(str::to_string));
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        if ppid.as_deref() == Some(me.as_str())
            && String::from_utf8_lossy(&cmd).contains(LAUNCHER_ARG)
        {
            found.push(pid);
        }
    }
    found
}

fn assert_nothing_left() {
    assert!(leftover_cgroups().is_empty(), "{:?}", leftover_cgroups());
    assert!(our_launchers().is_empty(), "{:?}", our_launchers());
}

fn used_a_warm_sandbox(out: &RunOutcome) -> bool {
    out.phases.iter().any(|(name, _)| *name == "poolHandover")
}

#[test]
fn a_pooled_sandbox_serves_one_task_and_nothing_of_it_reaches_the_next() {
    let _serial = serial();
    let marker = format!("pool-leak-marker-{}", std::process::id());
    let pool = pool(PoolConfig {
        min_per_key: 1,
        max_per_key: 1,
        max_total: 2,
        idle_after: Duration::from_secs(600),
    });

    // The first task of a key runs cold and teaches the pool the key.
    let (first, _) = run_ok(&pool, &request("print('first')"));
    assert!(!used_a_warm_sandbox(&first));
    wait_for(&pool, "a warm sandbox", |s| s.warm == 1);

    // The second leaves all it can behind: files in /task and /tmp, an
    // environment variable, a daemon in its own session.
    let mut leaky = request(&format!(
        "import json, os, subprocess\n\
         open('/task/left-behind', 'w').write('secret')\n\
         open('/tmp/left-behind', 'w').write('secret')\n\
         os.makedirs('/tmp/dir-left-behind')\n\
         subprocess.Popen(['/usr/bin/python3', '-c', 'import time; time.sleep(100)', '{marker}'],\n\
         \x20                start_new_session=True)\n\
         json.dump({{'secret': os.environ.get('POOL_SECRET')}}, open('/task/out.json', 'w'))"
    ));
    leaky.env.push(("POOL_SECRET".into(), "s3cr3t".into()));
    let (second, value) = run_ok(&pool, &leaky);
    assert!(used_a_warm_sandbox(&second), "{:?}", second.phases);
    assert_eq!(value["secret"], "s3cr3t");
    assert_eq!(pool.stats().hits, 1);
    assert!(
        processes_with(&marker).is_empty(),
        "{:?}",
        processes_with(&marker)
    );

    // The third, in the next pre-built sandbox of the same key, sees none
    // of it.
    wait_for(&pool, "the pool to refill", |s| s.warm == 1);
    let (third, value) = run_ok(
        &pool,
        &request(
            "import json, os\n\
             procs = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n\
             json.dump({'task': sorted(os.listdir('/task')), 'tmp': sorted(os.listdir('/tmp')),\n\
                        'secret': os.environ.get('POOL_SECRET'), 'procs': procs, 'me': os.getpid(),\n\
                        'stdin': open('/task/in.json').read()},\n\
                       open('/task/out.json', 'w'))",
        ),
    );
    assert!(used_a_warm_sandbox(&third), "{:?}", third.phases);
    assert_eq!(pool.stats().hits, 2);
    assert_eq!(value["task"], serde_json::json!(["in.json"]), "{value}");
    assert_eq!(value["tmp"], serde_json::json!([]), "{value}");
    assert_eq!(value["secret"], serde_json::Value::Null);
    assert_eq!(value["procs"], serde_json::json!([value["me"]]), "{value}");
    assert_eq!(value["stdin"], "{\"x\":2}");

    drop(pool);
    assert_nothing_left();
}

#[test]
fn a_dead_pooled_sandbox_is_replaced_and_the_next_task_still_runs() {
    let _serial = serial();
    let pool = pool(PoolConfig {
        min_per_key: 1,
        max_per_key: 1,
        max_total: 1,
        idle_after: Duration::from_secs(600),
    });
    run_ok(&pool, &request("print('teach the key')"));
    wait_for(&pool, "a warm sandbox", |s| s.warm == 1);

    // Crash the pre-built sandbox: kill its launcher.
    let launchers = our_launchers();
    assert_eq!(launchers.len(), 1, "{launchers:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(launchers[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");

    // Whether the pool noticed first or the task found it dead, the task
    // runs (cold, or in a replacement).
    let (_, value) = run_ok(
        &pool,
        &request("import json; json.dump({'ok': True}, open('/task/out.json', 'w'))"),
    );
    assert_eq!(value["ok"], true);
    wait_for(&pool, "the dead sandbox to be replaced", |s| {
        s.discarded >= 1 && s.warm == 1
    });
    let hits = pool.stats().hits;
    let (out, value) = run_ok(
        &pool,
        &request("import json; json.dump({'ok': True}, open('/task/out.json', 'w'))"),
    );
    assert_eq!(value["ok"], true);
    assert!(used_a_warm_sandbox(&out));
    assert_eq!(pool.stats().hits, hits + 1);

    drop(pool);
    assert_nothing_left();
}

#[test]
fn the_pool_grows_under_a_burst_and_shrinks_when_idle() {
    let _serial = serial();
    let config = PoolConfig {
        min_per_key: 0,
        max_per_key: 4,
        max_total: 3,
        idle_after: Duration::from_secs(5),
    };
    let pool = pool(config.clone());
    assert_eq!(pool.stats(), PoolStats::default());

    // A burst of tasks of one key: none finds a warm sandbox, each runs
    // cold at once, and the arrivals make the pool build ahead.
    let req = request("print('burst')");
    std::thread::scope(|s| {
        let runs: Vec<_> = (0..6).map(|_| s.spawn(|| run_ok(&pool, &req))).collect();
        for r in runs {
            r.join().expect("burst task");
        }
    });
    let mut most = 0;
    wait_for(&pool, "the pool to grow", |s| {
        most = most.max(s.warm);
        s.created >= 2
    });
    assert_eq!(pool.stats().failed, 0);

    // Idle for `idle_after`: back to the floor (0), and the warm sandboxes
    // are destroyed, never used.
    wait_for(&pool, "the pool to shrink", |s| {
        most = most.max(s.warm);
        s.warm == 0 && s.retired >= 1
    });
    assert!(
        most <= config.max_total,
        "never more than max_total: {most}"
    );
    // The retired sandboxes are destroyed just after they leave the count.
    wait_for(&pool, "the retired sandboxes to be destroyed", |_| {
        leftover_cgroups().is_empty() && our_launchers().is_empty()
    });

    // And a task after the shrink still runs (cold).
    let (out, _) = run_ok(&pool, &req);
    assert!(!used_a_warm_sandbox(&out));
    drop(pool);
    assert_nothing_left();
}

#[test]
fn shutdown_destroys_warm_sandboxes_and_later_tasks_run_cold() {
    let _serial = serial();
    let pool = pool(PoolConfig {
        min_per_key: 2,
        max_per_key: 2,
        max_total: 2,
        idle_after: Duration::from_secs(600),
    });
    run_ok(&pool, &request("print('teach the key')"));
    wait_for(&pool, "two warm sandboxes", |s| s.warm == 2);
    pool.shutdown();
    assert_eq!(pool.stats().warm, 0);
    assert_nothing_left();
    let (out, _) = run_ok(&pool, &request("print('cold')"));
    assert!(!used_a_warm_sandbox(&out));
    assert_nothing_left();
}
