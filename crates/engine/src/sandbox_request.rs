//! From a validated task to the sandbox requests: the runtime's plan, the
//! task's environment (only what the task declares plus the TASK_* protocol
//! variables), its files, and the Java compile step with its cache.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use taskexec_model::protocol::{
    CONTROL_DIR_NAME, ENV_TASK_ERROR, ENV_TASK_ID, ENV_TASK_INPUT, ENV_TASK_OUTPUT,
    ENV_TASK_PRELOAD, ENV_WORKFLOW_ID, ERROR_FILE, INPUT_FILE, OUTPUT_FILE, SANDBOX_HOME,
    SANDBOX_LANG, SANDBOX_PATH,
};
use taskexec_model::{Limits, TaskInstance};
use taskexec_runtimes::{CompileStep, Plan, PlanFile, ResolvedRuntime};
use taskexec_sandbox::{RoMount, RunRequest, SandboxFile, SandboxLimits};

/// Environment variable with the attempt number (1, 2, ...).
pub use taskexec_model::protocol::ENV_TASK_ATTEMPT;
/// Descriptors a task may hold open at once (RLIMIT_NOFILE).
pub const TASK_NOFILE: u64 = 256;

fn to_sandbox_files(files: &[PlanFile]) -> Vec<SandboxFile> {
    files
        .iter()
        .map(|f| SandboxFile {
            path: f.path.clone(),
            content: f.content.clone(),
            executable: f.executable,
        })
        .collect()
}

fn mounts(rt: &ResolvedRuntime) -> Vec<RoMount> {
    rt.mounts
        .iter()
        .map(|m| RoMount {
            path: m.path.to_string_lossy().into_owned(),
            optional: m.optional,
        })
        .collect()
}

/// The task process's whole environment, each name once: the runtime's
/// defaults, overridden by the task's own variables, overridden by the
/// protocol variables (an environment block with a name twice is read
/// differently by different programs: C's getenv takes the first, Python's
/// os.environ the last).
pub fn environment(task: &TaskInstance, plan: &Plan, attempt: u32) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    let layers = plan.env.iter().cloned().chain(
        task.execution_config
            .environment_variables
            .iter()
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    let protocol = [
        ("PATH".to_string(), SANDBOX_PATH.to_string()),
        ("HOME".to_string(), SANDBOX_HOME.to_string()),
        ("LANG".to_string(), SANDBOX_LANG.to_string()),
        (ENV_TASK_ID.to_string(), task.id.clone()),
        (
            ENV_WORKFLOW_ID.to_string(),
            task.workflow_instance_id.clone().unwrap_or_default(),
        ),
        (ENV_TASK_INPUT.to_string(), INPUT_FILE.to_string()),
        (ENV_TASK_OUTPUT.to_string(), OUTPUT_FILE.to_string()),
        (ENV_TASK_ERROR.to_string(), ERROR_FILE.to_string()),
        (ENV_TASK_ATTEMPT.to_string(), attempt.to_string()),
    ];
    let preload =
        (!plan.preload.is_empty()).then(|| (ENV_TASK_PRELOAD.to_string(), plan.preload.join(",")));
    for (name, value) in layers.chain(protocol).chain(preload) {
        match env.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => env.push((name, value)),
        }
    }
    env
}

fn relative_to_work(path: &str) -> String {
    path.trim_start_matches(taskexec_model::protocol::WORK_DIR)
        .trim_start_matches('/')
        .to_string()
}

/// The run request of one attempt. `classes` are compiled artifacts placed
/// under the compile step's output dir.
pub fn run_request(
    task: &TaskInstance,
    user: Option<(u32, u32)>,
    rt: &ResolvedRuntime,
    plan: &Plan,
    limits: &Limits,
    attempt: u32,
    classes: Option<(&str, &Artifacts)>,
) -> RunRequest {
    let mut work_files = to_sandbox_files(&plan.files);
    let input = serde_json::to_vec(&task.input).unwrap_or_else(|_| b"null".to_vec());
    work_files.push(SandboxFile {
        path: format!("{CONTROL_DIR_NAME}/input.json"),
        content: input,
        executable: false,
    });
    if let Some((dir, files)) = classes {
        for (name, data) in files {
            work_files.push(SandboxFile {
                path: format!("{dir}/{name}"),
                content: data.clone(),
                executable: false,
            });
        }
    }
    RunRequest {
        argv: plan.argv.clone(),
        env: environment(task, plan, attempt),
        ro_mounts: mounts(rt),
        work_files,
        support_files: to_sandbox_files(&plan.support_files),
        stdin_path: Some(INPUT_FILE.to_string()),
        read_back: vec![OUTPUT_FILE.to_string(), ERROR_FILE.to_string()],
        collect_dir: None,
        limits: SandboxLimits {
            memory_bytes: limits.memory_bytes,
            disk_bytes: limits.disk_bytes,
            pids: limits.pids.max(plan.min_pids),
            cpu_request_millis: limits.cpu_request_millis,
            cpu_limit_millis: limits.cpu_limit_millis,
            timeout: limits.timeout,
            cpu_time: limits.cpu_time,
            output_bytes: limits.output_bytes,
            nofile: TASK_NOFILE,
        },
        user,
        fork_server: plan.fork_server.clone(),
        preload: plan.preload.clone(),
    }
}

/// The compile request: sources in, `output_dir` collected out.
pub fn compile_request(
    task: &TaskInstance,
    user: Option<(u32, u32)>,
    rt: &ResolvedRuntime,
    plan: &Plan,
    step: &CompileStep,
    limits: &Limits,
) -> RunRequest {
    RunRequest {
        argv: step.argv.clone(),
        env: environment(task, plan, 0),
        ro_mounts: mounts(rt),
        work_files: to_sandbox_files(&plan.files),
        support_files: Vec::new(),
        stdin_path: None,
        read_back: Vec::new(),
        collect_dir: Some(relative_to_work(&step.output_dir)),
        limits: SandboxLimits {
            memory_bytes: step.memory_bytes,
            disk_bytes: limits.disk_bytes.max(64 << 20),
            pids: step.pids,
            cpu_request_millis: limits.cpu_request_millis,
            cpu_limit_millis: None,
            timeout: step.timeout,
            cpu_time: None,
            output_bytes: limits.output_bytes,
            nofile: 1024,
        },
        user,
        fork_server: None,
        preload: Vec::new(),
    }
}

/// Compiled files: (path relative to the output dir, contents).
pub type Artifacts = Vec<(String, Vec<u8>)>;

/// Compiled artifacts, keyed by the SHA-256 of the compiler, its argv and
/// every source file.
#[derive(Debug, Default)]
pub struct CompileCache {
    map: Mutex<HashMap<[u8; 32], Arc<Artifacts>>>,
}

/// Entries kept at most; the cache is emptied when full.
const MAX_COMPILED: usize = 256;

impl CompileCache {
    /// The cache key of a compile step.
    pub fn key(step: &CompileStep, plan: &Plan, compiler: Option<&std::path::Path>) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(
            compiler
                .map(|c| c.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        for a in &step.argv {
            h.update([0]);
            h.update(a);
        }
        for f in &plan.files {
            h.update([1]);
            h.update(&f.path);
            h.update([0]);
            h.update((f.content.len() as u64).to_le_bytes());
            h.update(&f.content);
        }
        h.finalize().into()
    }

    /// Cached artifacts for `key`.
    pub fn get(&self, key: &[u8; 32]) -> Option<Arc<Artifacts>> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
    }

    /// Stores artifacts.
    pub fn put(&self, key: [u8; 32], files: Arc<Artifacts>) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_COMPILED {
            map.clear();
        }
        map.insert(key, files);
    }
}
