//! The README as a script: every fenced `sh` block, in order, run with
//! `bash -euo pipefail` against the binary under test, the way a reader
//! pastes them on a fresh machine. A block right after an HTML comment
//! `<!-- readme-test: skip (why) -->` is left out (the build, a command
//! that runs until stopped, one that needs a second terminal). The tour's
//! server gets a free loopback port instead of the README's.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The README's `sh` blocks not marked to skip, in order.
fn runnable_blocks(readme: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut skip_next = false;
    let mut current: Option<String> = None;
    for line in readme.lines() {
        if let Some(block) = current.as_mut() {
            if line.trim_end() == "```" {
                let block = current.take().expect("inside a block");
                if !std::mem::take(&mut skip_next) {
                    blocks.push(block);
                }
            } else {
                block.push_str(line);
                block.push('\n');
            }
        } else if line.trim_end() == "```sh" {
            current = Some(String::new());
        } else if line.starts_with("<!-- readme-test: skip") {
            skip_next = true;
        } else if !line.trim().is_empty() {
            // A marker applies to the very next block only.
            skip_next = false;
        }
    }
    blocks
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn the_readme_blocks_are_marked_and_found() {
    let readme = "x\n<!-- readme-test: skip (a) -->\n```sh\nskipped\n```\n\n```sh\nrun\n```\n\
                  <!-- readme-test: skip (b) -->\ntext\n```sh\nalso run\n```\n";
    assert_eq!(runnable_blocks(readme), ["run\n", "also run\n"]);
}

#[test]
fn every_readme_command_works_when_pasted_in_order() {
    let root = repo_root();
    let readme = std::fs::read_to_string(root.join("README.md")).expect("read the README");
    let blocks = runnable_blocks(&readme);
    assert!(blocks.len() >= 3, "runnable blocks: {blocks:?}");
    let dir = tempfile::tempdir().expect("temp dir");
    std::os::unix::fs::symlink(root.join("examples"), dir.path().join("examples"))
        .expect("link the examples");
    let bin = Path::new(env!("CARGO_BIN_EXE_taskexec"))
        .parent()
        .expect("the binary's directory")
        .to_path_buf();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let port = free_port().to_string();
    for (i, block) in blocks.iter().enumerate() {
        let script = block.replace("127.0.0.1:8181", &format!("127.0.0.1:{port}"));
        let out = Command::new("bash")
            .args(["-euo", "pipefail", "-c", &script])
            .current_dir(dir.path())
            .env("PATH", &path)
            .env_remove("TASKEXEC_SERVER")
            .env_remove("TASKEXEC_TOKEN")
            .stdin(Stdio::null())
            .output()
            .expect("run bash");
        assert!(
            out.status.success(),
            "README block {} failed ({}):\n{script}\nstdout:\n{}\nstderr:\n{}",
            i + 1,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
