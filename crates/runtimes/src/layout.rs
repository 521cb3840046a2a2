//! The sandbox layout that plans target: where the task's code and the
//! read-only support files live inside the sandbox, and which host paths every
//! sandbox binds. The paths themselves come from [`taskexec_model::protocol`],
//! so the argv of a plan names the same paths the engine lays out.

pub use taskexec_model::protocol::{CONTROL_DIR_NAME, RESERVED_ENV_VARS, SUPPORT_DIR, WORK_DIR};

/// Host paths bound read-only at the same place in every sandbox, before the
/// runtime's own mounts: `(path, optional)`. An optional path that does not
/// exist on the host is skipped by the engine.
pub const BASE_MOUNTS: &[(&str, bool)] = &[
    ("/usr", false),
    ("/lib", true),
    ("/lib64", true),
    ("/bin", true),
    ("/sbin", true),
    ("/etc/ld.so.cache", true),
    ("/etc/localtime", true),
    ("/etc/alternatives", true),
];

/// The absolute sandbox path of a file given relative to [`WORK_DIR`].
pub fn work_path(relative: &str) -> String {
    format!("{WORK_DIR}/{relative}")
}

/// The absolute sandbox path of a file given relative to [`SUPPORT_DIR`].
pub fn support_path(relative: &str) -> String {
    format!("{SUPPORT_DIR}/{relative}")
}

/// Checks that `path` is a safe path relative to a sandbox directory: not
/// empty, not absolute, only plain components (no `.`, `..` or empty ones), no
/// NUL byte, and not under the protocol directory [`CONTROL_DIR_NAME`].
/// Returns what is wrong, phrased to follow "the path ...".
pub(crate) fn check_relative(path: &str) -> Result<(), &'static str> {
    if path.is_empty() {
        return Err("is empty");
    }
    if path.starts_with('/') {
        return Err("is absolute");
    }
    if path.contains('\0') {
        return Err("contains a NUL byte");
    }
    let mut components = path.split('/');
    if components
        .clone()
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err("has an empty, `.` or `..` component");
    }
    if components.next() == Some(CONTROL_DIR_NAME) {
        return Err("is under the reserved control directory `.taskexec`");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_are_checked() {
        assert!(check_relative("main.py").is_ok());
        assert!(check_relative("pkg/mod.py").is_ok());
        assert!(check_relative(".classes").is_ok());
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a//b",
            "./a",
            "a/",
            ".taskexec/output.json",
            "a\0b",
        ] {
            assert!(check_relative(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sandbox_paths() {
        assert_eq!(work_path("main.py"), "/task/main.py");
        assert_eq!(support_path("w.py"), "/opt/taskexec/w.py");
    }
}
