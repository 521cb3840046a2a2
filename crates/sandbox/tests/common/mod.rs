//! Helpers shared by the privileged sandbox tests.

#![allow(dead_code)] // each test file uses its own subset

use std::path::PathBuf;

use taskexec_sandbox::{LauncherCommand, RoMount, Sandbox, SandboxConfig, cgroup};

/// The leftover checks look at every task cgroup and process of the test
/// binary, so the tests of a file run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A cold sandbox with the small launcher built beside the tests.
pub fn sandbox() -> Sandbox {
    Sandbox::new(
        SandboxConfig::new(LauncherCommand {
            program: env!("CARGO_BIN_EXE_taskexec-launcher").into(),
        }),
        cgroup::detect(None).expect("a usable cgroup hierarchy"),
    )
}

/// What a Python task needs bound read-only.
pub fn python_mounts() -> Vec<RoMount> {
    [
        "/usr",
        "/lib",
        "/lib64",
        "/bin",
        "/etc/ld.so.cache",
        "/etc/python3",
        "/etc/python3.11",
    ]
    .iter()
    .map(|p| RoMount {
        path: p.to_string(),
        optional: true,
    })
    .collect()
}

/// Task cgroups of this test process that still exist, in any hierarchy.
pub fn leftover_cgroups() -> Vec<String> {
    let prefix = format!("taskexec-{}-", std::process::id());
    let mut found = Vec::new();
    let mut stack = vec![PathBuf::from("/sys/fs/cgroup")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    found.push(e.path().display().to_string());
                }
                stack.push(e.path());
            }
        }
    }
    found
}

/// Host processes whose command line contains `marker`: (pid, command line).
pub fn processes_with(marker: &str) -> Vec<(i32, String)> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").expect("proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(marker) && !cmd.contains("cargo") {
                found.push((pid, cmd));
            }
        }
    }
    found
}
