//! Planning a task: from a resolved runtime and a task definition to the
//! files to lay out in the sandbox, the optional compile step and the argv
//! to run, with every template placeholder expanded.
//!
//! Planning is pure: it touches no file and runs nothing.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use taskexec_model::{Mode, TaskDefinition};

use crate::layout::{self, WORK_DIR};
use crate::resolve::ResolvedRuntime;
use crate::template::{self, ExpandFault, Placeholder, Values};

/// A file to write before the task runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanFile {
    /// Path relative to the directory it goes in (`/task` for task files,
    /// `/opt/taskexec` for support files), e.g. `main.py` or `lib/util.py`.
    pub path: String,
    /// The file's bytes.
    pub content: Vec<u8>,
    /// Whether to make it executable (task files that start with `#!`).
    pub executable: bool,
}

/// A compile step, run in its own sandbox with the same files before the task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompileStep {
    /// The compiler argv, placeholders expanded.
    pub argv: Vec<String>,
    /// The output directory relative to `/task` (e.g. `.classes`); the
    /// engine creates it before compiling.
    pub output_dir: String,
    /// Memory limit of the compile step, in bytes.
    pub memory_bytes: u64,
    /// Time limit of the compile step.
    pub timeout: Duration,
    /// Pids limit of the compile step.
    pub pids: u32,
}

/// Everything the engine needs to run one task with one runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The task's code, to write under `/task` before the run: `code` as the
    /// runtime's `default_file`, or every entry of `files` at its path.
    pub files: Vec<PlanFile>,
    /// Read-only files to place under `/opt/taskexec` (the handler wrapper),
    /// with paths relative to that directory.
    pub support_files: Vec<PlanFile>,
    /// The entry file, relative to `/task`.
    pub entry: String,
    /// The compile step, for runtimes that have one.
    pub compile: Option<CompileStep>,
    /// The run argv, placeholders expanded.
    pub argv: Vec<String>,
    /// The runtime's default environment (the engine adds `TASK_*` and the
    /// other reserved variables itself), sorted by name.
    pub env: Vec<(String, String)>,
    /// The least pids limit the runtime can work with.
    pub min_pids: u32,
    /// The fork server that may run this plan (handler mode only).
    pub fork_server: Option<String>,
    /// The modules to import before the task's file
    /// (`definition.preload`; handler mode of a runtime that supports it).
    pub preload: Vec<String>,
}

/// Why a task cannot be planned with a runtime. Each message names the task
/// field at fault and what it accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// Handler mode was asked of a runtime without it.
    #[error(
        "`definition.mode` is \"handler\" but runtime `{runtime}` has no handler mode; use mode \"script\" (the program reads $TASK_INPUT and writes $TASK_OUTPUT itself) or a runtime that supports handler mode: {}",
        list_or_none(supported)
    )]
    HandlerUnsupported {
        /// The runtime.
        runtime: String,
        /// The runtimes of the catalogue that have handler mode.
        supported: Vec<String>,
    },
    /// `definition.preload` was given for a runtime or mode without it.
    #[error(
        "`definition.preload` lists modules to import before the handler runs, which needs mode \"handler\" on a runtime whose wrapper preloads ({}); the task has mode \"{mode}\" on runtime `{runtime}`; leave `definition.preload` out, or import the modules in the code",
        list_or_none(supported)
    )]
    PreloadUnsupported {
        /// The runtime.
        runtime: String,
        /// The task's mode.
        mode: &'static str,
        /// The runtimes of the catalogue whose handler wrapper preloads.
        supported: Vec<String>,
    },
    /// The Java main class cannot be derived from the entry file.
    #[error(
        "cannot derive the main class of runtime `{runtime}` from entry file `{entry}` (`definition.entrypoint`, or the runtime's default file with `definition.code`); expected a path such as \"Main.java\" or \"com/acme/App.java\" whose parts are Java identifiers"
    )]
    MainClass {
        /// The runtime.
        runtime: String,
        /// The entry file.
        entry: String,
    },
    /// Several files could be the entry and none is named.
    #[error(
        "`definition.entrypoint` is needed: `definition.files` has no `{default_file}` and {} could be the entry; set `definition.entrypoint` to one of the file names",
        if candidates.is_empty() { "none of its files".to_string() } else { format!("any of {}", candidates.join(", ")) }
    )]
    MissingEntrypoint {
        /// The runtime's default file.
        default_file: String,
        /// The files with one of the runtime's extensions.
        candidates: Vec<String>,
    },
    /// `definition.entrypoint` names no file of the task.
    #[error("`definition.entrypoint` is `{entry}`, which is not the name of any of `definition.files` ({})", files.join(", "))]
    EntrypointNotInFiles {
        /// The entrypoint given.
        entry: String,
        /// The file names.
        files: Vec<String>,
    },
    /// Neither `code` nor `files` was given.
    #[error(
        "the task has no code: set `definition.code` (inline source) or `definition.files` (a list of {{name, content}})"
    )]
    NoCode,
    /// Both `code` and `files` were given.
    #[error("`definition.code` and `definition.files` are both set; use one of them")]
    CodeAndFiles,
    /// A file name is not a safe relative path.
    #[error(
        "`definition.files[{index}].name` `{name}` {problem}; expected a relative path such as \"main.py\" or \"lib/util.py\", not under `.taskexec`"
    )]
    BadFileName {
        /// Index in `definition.files`.
        index: usize,
        /// The name given.
        name: String,
        /// What is wrong.
        problem: String,
    },
    /// Two files have the same name.
    #[error(
        "`definition.files[{index}].name` `{name}` repeats an earlier file; file names must be unique"
    )]
    DuplicateFile {
        /// Index of the second occurrence in `definition.files`.
        index: usize,
        /// The name.
        name: String,
    },
    /// A template of the runtime cannot be expanded (a catalogue built
    /// without the load-time checks).
    #[error("runtime `{runtime}`: `{field}` cannot be expanded: {problem}")]
    Template {
        /// The runtime.
        runtime: String,
        /// The template argument, e.g. `runtimes.x.script_args[1]`.
        field: String,
        /// What is wrong.
        problem: String,
    },
}

impl PlanError {
    /// The task field at fault, as the API names it; a template error is
    /// the operator's runtime catalogue's, named by its own key.
    pub fn field(&self) -> String {
        match self {
            Self::HandlerUnsupported { .. } => "definition.mode".into(),
            Self::PreloadUnsupported { .. } => "definition.preload".into(),
            Self::MainClass { .. } | Self::MissingEntrypoint { .. } => {
                "definition.entrypoint".into()
            }
            Self::EntrypointNotInFiles { .. } => "definition.entrypoint".into(),
            Self::NoCode | Self::CodeAndFiles => "definition.code".into(),
            Self::BadFileName { index, .. } | Self::DuplicateFile { index, .. } => {
                format!("definition.files[{index}].name")
            }
            Self::Template { field, .. } => field.clone(),
        }
    }
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none in this catalogue".to_string()
    } else {
        items.join(", ")
    }
}

/// Plans task `def` for runtime `rt` with a memory limit of `memory_bytes`
/// (what `{memory_bytes}` expands to in the run argv).
pub fn plan(
    rt: &ResolvedRuntime,
    def: &TaskDefinition,
    memory_bytes: u64,
) -> Result<Plan, PlanError> {
    let spec = &rt.spec;
    let runtime = spec.name.as_str();

    let handler = match def.mode {
        Mode::Script => None,
        Mode::Handler => {
            Some(
                spec.handler
                    .as_ref()
                    .ok_or_else(|| PlanError::HandlerUnsupported {
                        runtime: runtime.to_string(),
                        supported: rt.handler_runtimes.clone(),
                    })?,
            )
        }
    };

    if !def.preload.is_empty() && !handler.is_some_and(|h| h.preload) {
        return Err(PlanError::PreloadUnsupported {
            runtime: runtime.to_string(),
            mode: match def.mode {
                Mode::Script => "script",
                Mode::Handler => "handler",
            },
            supported: rt.preload_runtimes.clone(),
        });
    }

    let (files, entry) = task_files(spec, def)?;
    let compile_dir = spec.compile.as_ref().map(|c| c.output_dir.as_str());
    if let Some(dir) = compile_dir
        && let Some(index) = files
            .iter()
            .position(|f| f.path == dir || f.path.starts_with(&format!("{dir}/")))
    {
        return Err(PlanError::BadFileName {
            index,
            name: files[index].path.clone(),
            problem: format!("is inside `{dir}`, the compile output directory"),
        });
    }

    let interpreter = rt.interpreter.to_string_lossy().into_owned();
    let compiler = rt
        .compiler
        .as_ref()
        .map(|c| c.to_string_lossy().into_owned());
    let entry_abs = layout::work_path(&entry);
    let main_class = main_class(&entry);
    let classes = compile_dir.map(layout::work_path);
    let wrapper = handler.map(|h| layout::support_path(&h.wrapper));
    let sources: Vec<String> = files
        .iter()
        .filter(|f| has_extension(&f.path, &spec.extensions))
        .map(|f| layout::work_path(&f.path))
        .collect();
    let values = Values {
        interpreter: Some(&interpreter),
        compiler: compiler.as_deref(),
        entry: Some(&entry_abs),
        wrapper: wrapper.as_deref(),
        work: Some(WORK_DIR),
        main_class: main_class.as_deref(),
        classes: classes.as_deref(),
        memory_bytes: Some(memory_bytes.to_string()),
        sources: Some(&sources),
    };
    let expand = |field: &str, args: &[String], values: &Values<'_>| {
        template::expand(args, values).map_err(|fault| expand_error(runtime, field, &entry, fault))
    };

    let compile = match &spec.compile {
        None => None,
        Some(compile) => {
            let compile_values = Values {
                memory_bytes: Some(compile.memory.0.to_string()),
                ..values.clone()
            };
            Some(CompileStep {
                argv: expand("compile.args", &compile.args, &compile_values)?,
                output_dir: compile.output_dir.clone(),
                memory_bytes: compile.memory.0,
                timeout: Duration::from_secs(compile.timeout_seconds),
                pids: compile.pids,
            })
        }
    };

    let (argv, support_files) = match handler {
        None => (
            expand("script_args", &spec.script_args, &values)?,
            Vec::new(),
        ),
        Some(handler) => {
            let source = handler
                .wrapper_source()
                .ok_or_else(|| PlanError::Template {
                    runtime: runtime.to_string(),
                    field: format!("runtimes.{runtime}.handler.wrapper"),
                    problem: format!("no code for wrapper `{}`", handler.wrapper),
                })?;
            let wrapper_file = PlanFile {
                path: handler.wrapper.clone(),
                content: source.as_bytes().to_vec(),
                executable: false,
            };
            (
                expand("handler.args", &handler.args, &values)?,
                vec![wrapper_file],
            )
        }
    };

    Ok(Plan {
        files,
        support_files,
        entry,
        compile,
        argv,
        env: spec
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        min_pids: spec.min_pids,
        fork_server: handler.and_then(|h| h.fork_server.clone()),
        preload: def.preload.clone(),
    })
}

fn expand_error(runtime: &str, field: &str, entry: &str, fault: ExpandFault) -> PlanError {
    let (index, problem) = match fault {
        ExpandFault::NoValue(_, Placeholder::MainClass) => {
            return PlanError::MainClass {
                runtime: runtime.to_string(),
                entry: entry.to_string(),
            };
        }
        ExpandFault::NoValue(index, p) => (index, format!("placeholder {p} has no value here")),
        ExpandFault::Parse(index, fault) => (index, format!("malformed template ({fault:?})")),
    };
    PlanError::Template {
        runtime: runtime.to_string(),
        field: format!("runtimes.{runtime}.{field}[{index}]"),
        problem,
    }
}

/// The task files and the entry file (relative to `/task`).
fn task_files(
    spec: &crate::catalogue::RuntimeSpec,
    def: &TaskDefinition,
) -> Result<(Vec<PlanFile>, String), PlanError> {
    match (&def.code, def.files.is_empty()) {
        (Some(_), false) => Err(PlanError::CodeAndFiles),
        (None, true) => Err(PlanError::NoCode),
        (Some(code), true) => Ok((
            vec![plan_file(&spec.default_file, code)],
            spec.default_file.clone(),
        )),
        (None, false) => {
            let mut seen = BTreeSet::new();
            let mut files = Vec::with_capacity(def.files.len());
            for (index, file) in def.files.iter().enumerate() {
                if let Err(problem) = layout::check_relative(&file.name) {
                    return Err(PlanError::BadFileName {
                        index,
                        name: file.name.clone(),
                        problem: problem.to_string(),
                    });
                }
                if !seen.insert(file.name.as_str()) {
                    return Err(PlanError::DuplicateFile {
                        index,
                        name: file.name.clone(),
                    });
                }
                files.push(plan_file(&file.name, &file.content));
            }
            let entry = match &def.entrypoint {
                Some(entry) => {
                    let entry = entry.strip_prefix("./").unwrap_or(entry);
                    if !seen.contains(entry) {
                        return Err(PlanError::EntrypointNotInFiles {
                            entry: entry.to_string(),
                            files: def.files.iter().map(|f| f.name.clone()).collect(),
                        });
                    }
                    entry.to_string()
                }
                None if seen.contains(spec.default_file.as_str()) => spec.default_file.clone(),
                None => {
                    let candidates: Vec<String> = def
                        .files
                        .iter()
                        .filter(|f| has_extension(&f.name, &spec.extensions))
                        .map(|f| f.name.clone())
                        .collect();
                    match candidates.as_slice() {
                        [only] => only.clone(),
                        _ => {
                            return Err(PlanError::MissingEntrypoint {
                                default_file: spec.default_file.clone(),
                                candidates,
                            });
                        }
                    }
                }
            };
            Ok((files, entry))
        }
    }
}

fn plan_file(path: &str, content: &str) -> PlanFile {
    PlanFile {
        path: path.to_string(),
        content: content.as_bytes().to_vec(),
        executable: content.starts_with("#!"),
    }
}

fn has_extension(path: &str, extensions: &[String]) -> bool {
    Path::new(path)
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| extensions.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// The Java class named by an entry file: `Main.java` → `Main`,
/// `com/acme/App.java` → `com.acme.App`; `None` if a part is not a Java
/// identifier.
pub fn main_class(entry: &str) -> Option<String> {
    let without_ext = match entry.rsplit_once('.') {
        Some((stem, _)) if !stem.is_empty() && !stem.ends_with('/') => stem,
        _ => entry,
    };
    let parts: Vec<&str> = without_ext.split('/').collect();
    parts
        .iter()
        .all(|part| is_java_identifier(part))
        .then(|| parts.join("."))
}

fn is_java_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_alphabetic() || c == '_' || c == '$')
        && chars.all(|c| c.is_alphanumeric() || c == '_' || c == '$')
        && s != "_"
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalogue::Catalogue;
    use std::path::PathBuf;
    use taskexec_model::TaskFile;

    /// A runtime as `resolve` would give it, without needing it installed.
    fn resolved(name: &str) -> ResolvedRuntime {
        let catalogue = Catalogue::builtin();
        let spec = catalogue.get(name).expect("builtin").clone();
        let compiler = spec
            .compile
            .as_ref()
            .map(|_| PathBuf::from("/usr/lib/jvm/jdk/bin/javac"));
        ResolvedRuntime {
            interpreter: PathBuf::from(format!("/usr/bin/{name}-real")),
            compiler,
            mounts: Vec::new(),
            handler_runtimes: catalogue.handler_runtimes(),
            preload_runtimes: catalogue.preload_runtimes(),
            spec,
        }
    }

    fn definition(mode: Mode, code: Option<&str>, files: &[(&str, &str)]) -> TaskDefinition {
        let json = serde_json::json!({
            "name": "t",
            "mode": mode,
            "code": code,
            "files": files.iter().map(|(n, c)| serde_json::json!({"name": n, "content": c})).collect::<Vec<_>>(),
        });
        serde_json::from_value(json).expect("a valid definition")
    }

    fn code(mode: Mode, source: &str) -> TaskDefinition {
        definition(mode, Some(source), &[])
    }

    const MB128: u64 = 128 << 20;

    #[test]
    fn python_script() {
        let plan =
            plan(&resolved("python"), &code(Mode::Script, "print(1)"), MB128).expect("plans");
        assert_eq!(
            plan.argv,
            [
                "/usr/bin/python-real",
                "-E",
                "-s",
                "-B",
                "-u",
                "/task/main.py"
            ]
        );
        assert_eq!(
            plan.files,
            [PlanFile {
                path: "main.py".into(),
                content: b"print(1)".to_vec(),
                executable: false
            }]
        );
        assert_eq!(plan.entry, "main.py");
        assert!(plan.support_files.is_empty());
        assert!(plan.compile.is_none());
        assert!(
            plan.env
                .contains(&("PYTHONDONTWRITEBYTECODE".into(), "1".into()))
        );
        assert!(plan.env.contains(&("PYTHONUNBUFFERED".into(), "1".into())));
        assert_eq!(plan.min_pids, 16);
    }

    #[test]
    fn python_handler() {
        let def = code(Mode::Handler, "def main(input):\n    return input\n");
        let plan = plan(&resolved("python"), &def, MB128).expect("plans");
        assert_eq!(
            plan.argv,
            [
                "/usr/bin/python-real",
                "-E",
                "-s",
                "-B",
                "-u",
                "/opt/taskexec/python_handler.py",
                "/task/main.py"
            ]
        );
        assert_eq!(plan.support_files.len(), 1);
        assert_eq!(plan.support_files[0].path, "python_handler.py");
        assert_eq!(
            plan.support_files[0].content,
            crate::wrappers::PYTHON_HANDLER.as_bytes()
        );
    }

    #[test]
    fn node_script_and_handler() {
        let script = plan(&resolved("node"), &code(Mode::Script, "1"), MB128).expect("plans");
        assert_eq!(script.argv, ["/usr/bin/node-real", "/task/main.js"]);
        assert_eq!(script.min_pids, 32);
        let handler = plan(&resolved("node"), &code(Mode::Handler, "1"), MB128).expect("plans");
        assert_eq!(
            handler.argv,
            [
                "/usr/bin/node-real",
                "/opt/taskexec/node_handler.js",
                "/task/main.js"
            ]
        );
        assert_eq!(handler.support_files[0].path, "node_handler.js");
        assert_eq!(
            handler.support_files[0].content,
            crate::wrappers::NODE_HANDLER.as_bytes()
        );
    }

    #[test]
    fn java_compiles_then_runs() {
        let def = definition(
            Mode::Script,
            None,
            &[
                ("Main.java", "class Main {}"),
                ("util/Helper.java", "package util;"),
                ("data.txt", "x"),
            ],
        );
        let plan = plan(&resolved("java"), &def, MB128).expect("plans");
        let compile = plan.compile.expect("compile step");
        assert_eq!(
            compile.argv,
            [
                "/usr/lib/jvm/jdk/bin/javac",
                "-J-XX:+UseSerialGC",
                "-J-XX:TieredStopAtLevel=1",
                "-J-XX:MaxRAM=536870912",
                "-J-XX:-UsePerfData",
                "-d",
                "/task/.classes",
                "-encoding",
                "UTF-8",
                "/task/Main.java",
                "/task/util/Helper.java",
            ]
        );
        assert_eq!(compile.output_dir, ".classes");
        assert_eq!(compile.memory_bytes, 512 << 20);
        assert_eq!(compile.timeout, Duration::from_secs(60));
        assert_eq!(compile.pids, 256);
        assert_eq!(
            plan.argv,
            [
                "/usr/bin/java-real",
                "-XX:+UseSerialGC",
                "-XX:TieredStopAtLevel=1",
                "-Xss1m",
                "-XX:MaxRAM=134217728",
                "-XX:-UsePerfData",
                "-Dfile.encoding=UTF-8",
                "-cp",
                "/task/.classes",
                "Main",
            ]
        );
        assert_eq!(plan.files.len(), 3);
        assert_eq!(plan.min_pids, 64);
    }

    #[test]
    fn java_main_class_from_code_and_entrypoint() {
        let plan_code = plan(
            &resolved("java"),
            &code(Mode::Script, "class Main {}"),
            MB128,
        )
        .expect("plans");
        assert_eq!(plan_code.files[0].path, "Main.java");
        assert_eq!(plan_code.argv.last().map(String::as_str), Some("Main"));

        let mut def = definition(Mode::Script, None, &[("com/acme/App.java", "")]);
        def.entrypoint = Some("com/acme/App.java".into());
        let plan_pkg = plan(&resolved("java"), &def, MB128).expect("plans");
        assert_eq!(
            plan_pkg.argv.last().map(String::as_str),
            Some("com.acme.App")
        );

        let def = definition(Mode::Script, None, &[("my-app.java", "")]);
        let err = plan(&resolved("java"), &def, MB128).expect_err("not a class name");
        assert!(matches!(&err, PlanError::MainClass { entry, .. } if entry == "my-app.java"));
        assert!(err.to_string().contains("definition.entrypoint"), "{err}");
    }

    #[test]
    fn main_class_derivation() {
        assert_eq!(main_class("Main.java").as_deref(), Some("Main"));
        assert_eq!(main_class("a/b/C.java").as_deref(), Some("a.b.C"));
        assert_eq!(main_class("$X_1.java").as_deref(), Some("$X_1"));
        assert_eq!(main_class("Ünï.java").as_deref(), Some("Ünï"));
        assert_eq!(main_class("1Main.java"), None);
        assert_eq!(main_class("my-app.java"), None);
        assert_eq!(main_class("a.b.java"), None);
        assert_eq!(main_class("_.java"), None);
    }

    #[test]
    fn bash_script() {
        let plan = plan(
            &resolved("bash"),
            &code(Mode::Script, "#!/bin/bash\necho hi\n"),
            MB128,
        )
        .expect("plans");
        assert_eq!(plan.argv, ["/usr/bin/bash-real", "/task/main.sh"]);
        assert!(plan.files[0].executable, "a #! file is made executable");
    }

    #[test]
    fn handler_mode_refused_where_unsupported() {
        for runtime in ["java", "bash"] {
            let err =
                plan(&resolved(runtime), &code(Mode::Handler, "x"), MB128).expect_err("refused");
            assert_eq!(
                err,
                PlanError::HandlerUnsupported {
                    runtime: runtime.into(),
                    supported: vec!["node".into(), "python".into()],
                }
            );
            let message = err.to_string();
            assert!(message.contains("`definition.mode`"), "{message}");
            assert!(message.contains("node, python"), "{message}");
        }
    }

    #[test]
    fn preload_is_planned_for_python_handlers_only() {
        let preloading = |mode| TaskDefinition {
            preload: vec!["json".into(), "xml.dom".into()],
            ..code(mode, "def main(x):\n    return x\n")
        };
        let p = plan(&resolved("python"), &preloading(Mode::Handler), MB128).expect("plans");
        assert_eq!(p.preload, ["json", "xml.dom"]);
        assert_eq!(p.fork_server.as_deref(), Some("python"));

        for (runtime, mode, mode_name) in [
            ("python", Mode::Script, "script"),
            ("node", Mode::Handler, "handler"),
            ("bash", Mode::Script, "script"),
        ] {
            let err = plan(&resolved(runtime), &preloading(mode), MB128).expect_err("refused");
            assert_eq!(
                err,
                PlanError::PreloadUnsupported {
                    runtime: runtime.into(),
                    mode: mode_name,
                    supported: vec!["python".into()],
                }
            );
            let message = err.to_string();
            assert!(message.contains("`definition.preload`"), "{message}");
        }
        // Without preload nothing changes.
        let p = plan(&resolved("python"), &code(Mode::Handler, "x"), MB128).expect("plans");
        assert!(p.preload.is_empty());
    }

    #[test]
    fn multi_file_entry_selection() {
        let rt = resolved("python");
        let def = definition(Mode::Script, None, &[("util.py", ""), ("main.py", "")]);
        assert_eq!(plan(&rt, &def, MB128).expect("plans").entry, "main.py");

        let def = definition(Mode::Script, None, &[("app.py", ""), ("data.json", "{}")]);
        let p = plan(&rt, &def, MB128).expect("plans");
        assert_eq!(p.entry, "app.py");
        assert_eq!(p.argv.last().map(String::as_str), Some("/task/app.py"));
        assert_eq!(p.files.len(), 2);

        let def = definition(Mode::Script, None, &[("a.py", ""), ("b.py", "")]);
        let err = plan(&rt, &def, MB128).expect_err("ambiguous");
        assert!(matches!(err, PlanError::MissingEntrypoint { .. }));
        assert!(err.to_string().contains("`definition.entrypoint`"), "{err}");
        assert!(err.to_string().contains("a.py, b.py"), "{err}");

        let mut def = definition(Mode::Script, None, &[("a.py", ""), ("pkg/b.py", "")]);
        def.entrypoint = Some("pkg/b.py".into());
        assert_eq!(plan(&rt, &def, MB128).expect("plans").entry, "pkg/b.py");
        def.entrypoint = Some("c.py".into());
        let err = plan(&rt, &def, MB128).expect_err("not a file");
        assert!(
            matches!(err, PlanError::EntrypointNotInFiles { .. }),
            "{err}"
        );
    }

    #[test]
    fn bad_task_files_are_refused() {
        let rt = resolved("python");
        for (name, problem) in [
            ("../escape.py", "`.` or `..`"),
            ("/etc/passwd", "absolute"),
            (".taskexec/output.json", "control directory"),
        ] {
            let def = definition(Mode::Script, None, &[("main.py", ""), (name, "")]);
            let err = plan(&rt, &def, MB128).expect_err("refused");
            let message = err.to_string();
            assert!(message.contains("`definition.files[1].name`"), "{message}");
            assert!(message.contains(problem), "{message}");
        }
        let def = definition(Mode::Script, None, &[("main.py", ""), ("main.py", "")]);
        assert!(matches!(
            plan(&rt, &def, MB128),
            Err(PlanError::DuplicateFile { index: 1, .. })
        ));
        let def = definition(
            Mode::Script,
            None,
            &[("Main.java", ""), (".classes/Main.class", "")],
        );
        let err = plan(&resolved("java"), &def, MB128).expect_err("collides");
        assert!(
            err.to_string().contains("compile output directory"),
            "{err}"
        );
    }

    #[test]
    fn code_and_files_rules() {
        let rt = resolved("python");
        let err = plan(&rt, &definition(Mode::Script, None, &[]), MB128).expect_err("no code");
        assert_eq!(err, PlanError::NoCode);
        assert!(err.to_string().contains("definition.code"), "{err}");
        let both = definition(Mode::Script, Some("x"), &[("main.py", "")]);
        assert_eq!(
            plan(&rt, &both, MB128).expect_err("both"),
            PlanError::CodeAndFiles
        );
    }

    #[test]
    fn files_keep_their_content() {
        let def = TaskDefinition {
            files: vec![TaskFile {
                name: "main.py".into(),
                content: "ünï".into(),
            }],
            ..definition(Mode::Script, None, &[("x.py", "")])
        };
        let plan = plan(&resolved("python"), &def, MB128).expect("plans");
        assert_eq!(plan.files[0].content, "ünï".as_bytes());
    }
}
