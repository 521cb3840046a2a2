use std::time::Duration;
use taskexec_sandbox::*;

#[test]
fn smoke() {
    let sb = Sandbox::new(
        SandboxConfig::new(LauncherCommand {
            program: env!("CARGO_BIN_EXE_taskexec-launcher").into(),
        }),
        cgroup::detect(None).expect("cgroups"),
    );
    let req = RunRequest {
        argv: vec!["/usr/bin/python3".into(), "-c".into(), "import os,sys; print('hi', os.getuid(), os.listdir('/'), sys.stdin.read()); open('/work/out.json','w').write('{\"a\":1}')".into()],
        env: vec![("PATH".into(), "/usr/bin".into())],
        ro_mounts: ["/usr", "/lib", "/lib64", "/bin", "/etc/ld.so.cache"].iter().map(|p| RoMount { path: p.to_string(), optional: true }).collect(),
        work_files: vec![SandboxFile { path: "in.json".into(), content: b"{\"x\":2}".to_vec(), executable: false }],
        support_files: vec![],
        stdin_path: Some("/work/in.json".into()),
        read_back: vec!["/work/out.json".into()],
        collect_dir: None,
        limits: SandboxLimits { memory_bytes: 128 << 20, disk_bytes: 64 << 20, pids: 64, cpu_request_millis: 500, cpu_limit_millis: None, timeout: Duration::from_secs(10), cpu_time: None, output_bytes: 1 << 20, nofile: 256 },
    };
    for _ in 0..3 {
        let out = sb.run(&req, None).expect("run");
        eprintln!(
            "{:?}\nstdout={}\nstderr={}\n{:?}",
            out.termination,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            out.read_back
        );
        eprintln!("{:?} wall={:?}", out.phases, out.wall_time);
    }
}
