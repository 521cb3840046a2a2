//! Handler-mode wrappers embedded in the binary.
//!
//! A wrapper is a small program in the runtime's own language that reads the
//! input JSON from `$TASK_INPUT`, loads the user's file, calls its function and
//! writes the JSON of the result to `$TASK_OUTPUT` (or an error report
//! `{"type", "message", "stack"}` to `$TASK_ERROR`, exiting 1). The engine
//! places it read-only under `/opt/taskexec`. The sources live in
//! `crates/runtimes/wrappers/`.

/// The Python wrapper (`python_handler.py`): calls `main(input)`.
pub const PYTHON_HANDLER: &str = include_str!("../wrappers/python_handler.py");

/// The Node.js wrapper (`node_handler.js`): calls `module.exports`,
/// `exports.main` or `exports.default`.
pub const NODE_HANDLER: &str = include_str!("../wrappers/node_handler.js");

/// Every built-in wrapper as `(file name, source)`.
pub const BUILTIN_WRAPPERS: &[(&str, &str)] = &[
    ("python_handler.py", PYTHON_HANDLER),
    ("node_handler.js", NODE_HANDLER),
];

/// The source of the built-in wrapper called `name`, if there is one.
pub fn builtin_wrapper(name: &str) -> Option<&'static str> {
    BUILTIN_WRAPPERS
        .iter()
        .find(|(file, _)| *file == name)
        .map(|(_, source)| *source)
}

/// The names of the built-in wrappers, comma-separated, for error messages.
pub(crate) fn builtin_names() -> String {
    BUILTIN_WRAPPERS
        .iter()
        .map(|(name, _)| *name)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_wrappers_are_embedded() {
        assert!(
            builtin_wrapper("python_handler.py")
                .expect("python wrapper")
                .contains("spec_from_file_location")
        );
        assert!(
            builtin_wrapper("node_handler.js")
                .expect("node wrapper")
                .contains("JSON.stringify")
        );
        assert!(builtin_wrapper("nope.rb").is_none());
    }
}
