//! The contract between the executor and the code running inside the
//! sandbox: where things live in the sandbox's file system and which
//! environment variables the task sees. Shared by the sandbox, the runtimes
//! (handler wrappers) and the engine so that they agree on one layout.

/// The task's working directory (writable, size-limited). Task files are
/// written here and it is the process's current directory.
pub const WORK_DIR: &str = "/task";

/// Name of the executor's private directory inside [`WORK_DIR`]. Task file
/// names may not start with it.
pub const CONTROL_DIR_NAME: &str = ".taskexec";

/// The executor's private directory holding input and output files.
pub const CONTROL_DIR: &str = "/task/.taskexec";

/// The task input, as JSON, written by the executor before the task starts.
pub const INPUT_FILE: &str = "/task/.taskexec/input.json";

/// Where the task writes its output as JSON.
pub const OUTPUT_FILE: &str = "/task/.taskexec/output.json";

/// Where handler wrappers write `{type, message, stack}` on an exception.
pub const ERROR_FILE: &str = "/task/.taskexec/error.json";

/// Read-only directory holding the executor's support files (handler
/// wrappers).
pub const SUPPORT_DIR: &str = "/opt/taskexec";

/// `PATH` inside the sandbox.
pub const SANDBOX_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// `HOME` inside the sandbox.
pub const SANDBOX_HOME: &str = "/task";

/// `LANG` inside the sandbox.
pub const SANDBOX_LANG: &str = "C.UTF-8";

/// Environment variable holding the task id.
pub const ENV_TASK_ID: &str = "TASK_ID";

/// Environment variable holding the workflow instance id (empty if none).
pub const ENV_WORKFLOW_ID: &str = "WORKFLOW_ID";

/// Environment variable holding the path of the input file ([`INPUT_FILE`]).
pub const ENV_TASK_INPUT: &str = "TASK_INPUT";

/// Environment variable holding the path of the output file ([`OUTPUT_FILE`]).
pub const ENV_TASK_OUTPUT: &str = "TASK_OUTPUT";

/// Environment variable holding the path of the error file ([`ERROR_FILE`]);
/// handler wrappers write `{type, message, stack}` there on an exception.
pub const ENV_TASK_ERROR: &str = "TASK_ERROR";

/// Environment variable holding the attempt number (1, 2, ...).
pub const ENV_TASK_ATTEMPT: &str = "TASK_ATTEMPT";

/// Environment variable naming the modules a handler wrapper imports before
/// the task's file (`definition.preload`, comma-separated); set only when
/// the list is not empty.
pub const ENV_TASK_PRELOAD: &str = "TASK_PRELOAD";

/// Environment variable names the executor sets itself; tasks may not set
/// them through `executionConfig.environmentVariables`.
pub const RESERVED_ENV_VARS: [&str; 10] = [
    ENV_TASK_ID,
    ENV_WORKFLOW_ID,
    ENV_TASK_INPUT,
    ENV_TASK_OUTPUT,
    ENV_TASK_ERROR,
    ENV_TASK_ATTEMPT,
    ENV_TASK_PRELOAD,
    "PATH",
    "HOME",
    "LANG",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_files_live_in_the_control_dir_under_work() {
        assert_eq!(CONTROL_DIR, format!("{WORK_DIR}/{CONTROL_DIR_NAME}"));
        for f in [INPUT_FILE, OUTPUT_FILE, ERROR_FILE] {
            assert!(f.starts_with(&format!("{CONTROL_DIR}/")), "{f}");
        }
        assert_eq!(SANDBOX_HOME, WORK_DIR);
    }
}
