//! Resolving a runtime on this host: finding its interpreter (and compiler)
//! among the catalogue's candidate paths, following symlinks to the real
//! file, and computing the host paths the sandbox must bind.
//!
//! Resolution runs for every task, so it only looks at the file system
//! (`stat`, `readlink`, and `readdir` for `*` patterns) and never runs a
//! program. [`ResolvedRuntime::version`] does run the interpreter; it is for
//! `taskexec runtimes`, not for the hot path.

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use taskexec_model::protocol::{SANDBOX_LANG, SANDBOX_PATH};

use crate::catalogue::{Catalogue, MountSpec, RuntimeSpec, VersionStream};

/// How long [`ResolvedRuntime::version`] waits for the interpreter.
pub const VERSION_TIMEOUT: Duration = Duration::from_secs(20);

/// A host path bound read-only at the same path inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MountPath {
    /// The host path (and the sandbox path).
    pub path: PathBuf,
    /// Whether the engine should skip it, rather than fail, when it is missing.
    pub optional: bool,
}

/// A runtime found on this host, ready to plan tasks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedRuntime {
    /// The runtime's catalogue entry.
    pub spec: RuntimeSpec,
    /// The interpreter: canonical (symlink-free) absolute host path.
    pub interpreter: PathBuf,
    /// The compiler, canonical, if the runtime has a compile step.
    pub compiler: Option<PathBuf>,
    /// Every host path to bind read-only: the base set, the runtime's own
    /// mounts (patterns expanded), and the installation prefix of the
    /// interpreter and compiler when no other mount covers it.
    pub mounts: Vec<MountPath>,
    /// The catalogue's runtimes that have handler mode, sorted (for the
    /// message that refuses handler mode to a runtime without it).
    pub handler_runtimes: Vec<String>,
    /// The catalogue's runtimes whose handler wrapper preloads modules,
    /// sorted (for the message that refuses `definition.preload`).
    pub preload_runtimes: Vec<String>,
}

/// Why a runtime could not be resolved or asked for its version.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The catalogue has no runtime of that name.
    #[error("unknown runtime `{name}`; `executionConfig.runtime` must be one of: {known}")]
    Unknown {
        /// The name asked for.
        name: String,
        /// The runtimes the catalogue has.
        known: String,
    },
    /// No interpreter candidate is an executable file on this host.
    #[error(
        "runtime `{runtime}` is not installed on this host: no executable file at {}; install it, or list its absolute path in `runtimes.{runtime}.interpreter` of the catalogue (there is no PATH search)",
        show_paths(tried)
    )]
    NotFound {
        /// The runtime.
        runtime: String,
        /// Every path looked at, patterns expanded.
        tried: Vec<PathBuf>,
    },
    /// No compiler candidate is an executable file on this host.
    #[error(
        "the compiler of runtime `{runtime}` is not installed on this host: no executable file at {}; install it, or list its absolute path in `runtimes.{runtime}.compile.compiler` of the catalogue",
        show_paths(tried)
    )]
    CompilerNotFound {
        /// The runtime.
        runtime: String,
        /// Every path looked at, patterns expanded.
        tried: Vec<PathBuf>,
    },
    /// A required mount does not exist on this host.
    #[error(
        "runtime `{runtime}` needs `{path}` (in `{field}`), which does not exist on this host; mark it {{ path = \"{path}\", optional = true }} if the runtime works without it"
    )]
    MountMissing {
        /// The runtime.
        runtime: String,
        /// The catalogue field, e.g. `runtimes.java.mounts[0]`.
        field: String,
        /// The path or pattern.
        path: String,
    },
    /// The interpreter could not be started to ask its version.
    #[error("cannot run `{}` to read the version of runtime `{runtime}`: {source}", interpreter.display())]
    VersionSpawn {
        /// The runtime.
        runtime: String,
        /// The interpreter.
        interpreter: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The interpreter ran but gave no version.
    #[error(
        "`{} {}` gave no version for runtime `{runtime}`: {detail}; check `runtimes.{runtime}.version_args` and `version_stream` (\"stdout\" or \"stderr\")",
        interpreter.display(), args.join(" ")
    )]
    Version {
        /// The runtime.
        runtime: String,
        /// The interpreter.
        interpreter: PathBuf,
        /// The version arguments.
        args: Vec<String>,
        /// What went wrong.
        detail: String,
    },
}

fn show_paths(paths: &[PathBuf]) -> String {
    if paths.is_empty() {
        return "no candidate path".to_string();
    }
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl Catalogue {
    /// Finds runtime `name` on this host: its interpreter (the override if
    /// one is set, else the first candidate that is an executable file),
    /// canonicalized; its compiler likewise; and its mounts.
    pub fn resolve(&self, name: &str) -> Result<ResolvedRuntime, RuntimeError> {
        let spec = self.get(name).ok_or_else(|| RuntimeError::Unknown {
            name: name.to_string(),
            known: self.known(),
        })?;
        let interpreter = match self.interpreter_override(name) {
            Some(path) => find_executable(std::iter::once(path.to_path_buf())),
            None => find_executable(expand_candidates(&spec.interpreter)),
        }
        .map_err(|tried| RuntimeError::NotFound {
            runtime: name.to_string(),
            tried,
        })?;

        let compiler = match &spec.compile {
            None => None,
            Some(compile) => {
                let found = if let Some(path) = self.compiler_override(name) {
                    find_executable(std::iter::once(path.to_path_buf()))
                } else {
                    let mut candidates = Vec::new();
                    if compile.prefer_interpreter_dir
                        && let Some(dir) = interpreter.parent()
                    {
                        for candidate in &compile.compiler {
                            if let Some(file) = Path::new(candidate).file_name() {
                                let sibling = dir.join(file);
                                if !candidates.contains(&sibling) {
                                    candidates.push(sibling);
                                }
                            }
                        }
                    }
                    candidates.extend(expand_candidates(&compile.compiler));
                    find_executable(candidates)
                };
                Some(found.map_err(|tried| RuntimeError::CompilerNotFound {
                    runtime: name.to_string(),
                    tried,
                })?)
            }
        };

        let mut mounts = Vec::new();
        for (i, mount) in self.base_mounts().iter().enumerate() {
            add_mount(&mut mounts, name, &format!("base_mounts[{i}]"), mount)?;
        }
        for (i, mount) in spec.mounts.iter().enumerate() {
            add_mount(
                &mut mounts,
                name,
                &format!("runtimes.{name}.mounts[{i}]"),
                mount,
            )?;
        }
        for program in std::iter::once(&interpreter).chain(compiler.as_ref()) {
            if !mounts.iter().any(|m| program.starts_with(&m.path)) {
                mounts.push(MountPath {
                    path: install_prefix(program),
                    optional: false,
                });
            }
        }

        Ok(ResolvedRuntime {
            spec: spec.clone(),
            interpreter,
            compiler,
            mounts,
            handler_runtimes: self.handler_runtimes(),
            preload_runtimes: self.preload_runtimes(),
        })
    }
}

/// The directory to bind for a program outside the base mounts: the parent
/// of its `bin` directory (`/opt/python/bin/python3` → `/opt/python`, so the
/// libraries come along), else its own directory.
fn install_prefix(program: &Path) -> PathBuf {
    let dir = program.parent().unwrap_or(Path::new("/"));
    match (dir.file_name(), dir.parent()) {
        (Some(name), Some(parent)) if name == OsStr::new("bin") && parent != Path::new("/") => {
            parent.to_path_buf()
        }
        _ => dir.to_path_buf(),
    }
}

fn add_mount(
    mounts: &mut Vec<MountPath>,
    runtime: &str,
    field: &str,
    spec: &MountSpec,
) -> Result<(), RuntimeError> {
    let mut push = |path: PathBuf, optional: bool| {
        if let Some(existing) = mounts.iter_mut().find(|m| m.path == path) {
            existing.optional &= optional;
        } else {
            mounts.push(MountPath { path, optional });
        }
    };
    if !spec.path.contains('*') {
        if !spec.optional && fs::symlink_metadata(&spec.path).is_err() {
            return Err(RuntimeError::MountMissing {
                runtime: runtime.to_string(),
                field: field.to_string(),
                path: spec.path.clone(),
            });
        }
        push(PathBuf::from(&spec.path), spec.optional);
        return Ok(());
    }
    let matches = expand_pattern(&spec.path);
    if matches.is_empty() && !spec.optional {
        return Err(RuntimeError::MountMissing {
            runtime: runtime.to_string(),
            field: field.to_string(),
            path: spec.path.clone(),
        });
    }
    for path in matches {
        push(path, spec.optional);
    }
    Ok(())
}

/// The candidates with their patterns expanded, in order; a pattern that
/// matches nothing stays as is (so it shows in the list of paths tried).
fn expand_candidates(candidates: &[String]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for candidate in candidates {
        if candidate.contains('*') {
            let matches = expand_pattern(candidate);
            if matches.is_empty() {
                out.push(PathBuf::from(candidate));
            }
            out.extend(matches);
        } else {
            out.push(PathBuf::from(candidate));
        }
    }
    out
}

/// The first candidate that is an executable regular file (symlinks
/// followed), canonicalized; or every candidate tried.
fn find_executable(candidates: impl IntoIterator<Item = PathBuf>) -> Result<PathBuf, Vec<PathBuf>> {
    let mut tried = Vec::new();
    for candidate in candidates {
        if !candidate.as_os_str().to_string_lossy().contains('*')
            && is_executable_file(&candidate)
            && let Ok(real) = fs::canonicalize(&candidate)
        {
            return Ok(real);
        }
        tried.push(candidate);
    }
    Err(tried)
}

fn is_executable_file(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Expands a path pattern whose components may contain `*` (any run of
/// characters except `/`; a leading `.` must be matched literally). The
/// matches are existing paths, sorted.
pub fn expand_pattern(pattern: &str) -> Vec<PathBuf> {
    let mut current = vec![PathBuf::from("/")];
    for component in Path::new(pattern).components() {
        let part = match component {
            Component::RootDir => continue,
            Component::Normal(part) => part,
            // `.`, `..` and prefixes are refused by the catalogue checks.
            _ => return Vec::new(),
        };
        let part = part.to_string_lossy();
        let mut next = Vec::new();
        for base in &current {
            if !part.contains('*') {
                let path = base.join(&*part);
                if fs::symlink_metadata(&path).is_ok() {
                    next.push(path);
                }
                continue;
            }
            let Ok(entries) = fs::read_dir(base) else {
                continue;
            };
            let mut found: Vec<PathBuf> = entries
                .filter_map(Result::ok)
                .filter(|entry| {
                    let name = entry.file_name();
                    let name = name.to_string_lossy();
                    (!name.starts_with('.') || part.starts_with('.'))
                        && wildcard_match(&part, &name)
                })
                .map(|entry| entry.path())
                .collect();
            found.sort();
            next.extend(found);
        }
        current = next;
        if current.is_empty() {
            break;
        }
    }
    current
}

/// Whether `name` matches `pattern`, where `*` matches any run of characters.
fn wildcard_match(pattern: &str, name: &str) -> bool {
    let mut pieces = pattern.split('*');
    let first = pieces.next().unwrap_or_default();
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    let pieces: Vec<&str> = pieces.collect();
    let Some((last, middle)) = pieces.split_last() else {
        // No `*` at all: the whole name must equal the pattern.
        return rest.is_empty();
    };
    for piece in middle {
        match rest.find(piece) {
            Some(at) => rest = &rest[at + piece.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

impl ResolvedRuntime {
    /// Runs the interpreter with the runtime's `version_args` and returns
    /// the first non-empty line of its `version_stream` (or, if that is
    /// empty, of the other stream), e.g. `Python 3.11.2`. Gives up after
    /// [`VERSION_TIMEOUT`].
    pub fn version(&self) -> Result<String, RuntimeError> {
        let runtime = &self.spec.name;
        let failure = |detail: String| RuntimeError::Version {
            runtime: runtime.clone(),
            interpreter: self.interpreter.clone(),
            args: self.spec.version_args.clone(),
            detail,
        };
        // The environment of a sandboxed task, so that variables such as
        // JAVA_TOOL_OPTIONS on the host cannot add lines to the output.
        let mut child = Command::new(&self.interpreter)
            .args(&self.spec.version_args)
            .env_clear()
            .env("PATH", SANDBOX_PATH)
            .env("LANG", SANDBOX_LANG)
            .envs(&self.spec.env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| RuntimeError::VersionSpawn {
                runtime: runtime.clone(),
                interpreter: self.interpreter.clone(),
                source,
            })?;
        let stdout = drain(child.stdout.take());
        let stderr = drain(child.stderr.take());
        let deadline = Instant::now() + VERSION_TIMEOUT;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
                Ok(None) => {
                    // Best effort: the process may have just exited.
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(failure(format!(
                        "it did not finish within {} s",
                        VERSION_TIMEOUT.as_secs()
                    )));
                }
                Err(e) => return Err(failure(format!("waiting for it failed: {e}"))),
            }
        };
        let stdout = stdout.join().unwrap_or_default();
        let stderr = stderr.join().unwrap_or_default();
        if !status.success() {
            return Err(failure(format!("it exited with {status}")));
        }
        let (preferred, other) = match self.spec.version_stream {
            VersionStream::Stdout => (stdout, stderr),
            VersionStream::Stderr => (stderr, stdout),
        };
        first_line(&preferred)
            .or_else(|| first_line(&other))
            .ok_or_else(|| failure("it printed nothing".to_string()))
    }
}

fn drain<R: Read + Send + 'static>(stream: Option<R>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut out = Vec::new();
        if let Some(mut stream) = stream {
            // A read error just ends the capture; what was read is kept.
            let _ = stream.read_to_end(&mut out);
        }
        out
    })
}

fn first_line(bytes: &[u8]) -> Option<String> {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn make_executable(path: &Path, body: &str) {
        fs::create_dir_all(path.parent().expect("has a parent")).expect("mkdir");
        fs::write(path, body).expect("write");
        fs::set_permissions(path, fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    #[test]
    fn wildcards_match_like_a_shell() {
        assert!(wildcard_match("java-*", "java-17-openjdk"));
        assert!(wildcard_match("*", "anything"));
        assert!(wildcard_match("a*b*c", "aXXbYYc"));
        assert!(wildcard_match("a*c", "ac"));
        assert!(!wildcard_match("a*c", "ab"));
        assert!(!wildcard_match("java-*", "jdk"));
        assert!(!wildcard_match("ab*ba", "aba"));
        assert!(wildcard_match("exact", "exact"));
        assert!(!wildcard_match("exact", "exactly"));
    }

    #[test]
    fn pattern_expansion_lists_matches_sorted() {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in [
            "java-17-openjdk",
            "java-21-openjdk",
            "javascript",
            ".java-hidden",
        ] {
            fs::create_dir(dir.path().join(name)).expect("mkdir");
        }
        fs::create_dir(dir.path().join("java-17-openjdk/bin")).expect("mkdir");
        let root = dir.path().display();
        assert_eq!(
            expand_pattern(&format!("{root}/java-*")),
            vec![
                dir.path().join("java-17-openjdk"),
                dir.path().join("java-21-openjdk")
            ]
        );
        assert_eq!(
            expand_pattern(&format!("{root}/java-*/bin")),
            vec![dir.path().join("java-17-openjdk/bin")]
        );
        assert!(expand_pattern(&format!("{root}/ruby-*")).is_empty());
        assert_eq!(expand_pattern(&format!("{root}/.java-*")).len(), 1);
    }

    fn catalogue_with_mounts(mounts: &str) -> Catalogue {
        Catalogue::from_toml_str(&format!(
            r#"
            base_mounts = []
            [runtimes.fake]
            interpreter = ["/nonexistent/bin/fake"]
            default_file = "main.fake"
            script_args = ["{{interpreter}}", "{{entry}}"]
            mounts = {mounts}
            "#
        ))
        .expect("parses")
    }

    #[test]
    fn interpreter_override_in_a_tempdir_resolves_and_is_mounted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let real = dir.path().join("prefix/bin/fake-1.0");
        make_executable(&real, "#!/bin/sh\necho fake 1.0\n");
        let link = dir.path().join("prefix/bin/fake");
        symlink(&real, &link).expect("symlink");

        let conf = dir.path().join("etc/fake-1");
        fs::create_dir_all(&conf).expect("mkdir");
        let pattern = format!("{}/etc/fake-*", dir.path().display());
        let mut catalogue = catalogue_with_mounts(&format!(
            "[{{ path = \"{pattern}\", optional = true }}, {{ path = \"/nonexistent/opt\", optional = true }}]"
        ));

        let err = catalogue.resolve("fake").expect_err("not installed");
        assert!(
            matches!(&err, RuntimeError::NotFound { tried, .. } if tried == &[PathBuf::from("/nonexistent/bin/fake")])
        );
        assert!(
            err.to_string().contains("runtimes.fake.interpreter"),
            "{err}"
        );

        catalogue.set_interpreter("fake", &link).expect("override");
        let resolved = catalogue.resolve("fake").expect("resolves");
        let canonical_real = fs::canonicalize(&real).expect("canonical");
        assert_eq!(resolved.interpreter, canonical_real);
        assert_eq!(resolved.compiler, None);
        let prefix = canonical_real
            .parent()
            .and_then(Path::parent)
            .expect("prefix")
            .to_path_buf();
        assert_eq!(
            resolved.mounts,
            vec![
                MountPath {
                    path: conf,
                    optional: true
                },
                MountPath {
                    path: PathBuf::from("/nonexistent/opt"),
                    optional: true
                },
                MountPath {
                    path: prefix,
                    optional: false
                },
            ]
        );
        assert_eq!(resolved.version().expect("runs"), "fake 1.0");
    }

    #[test]
    fn non_executable_candidates_are_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let plain = dir.path().join("plain");
        fs::write(&plain, "not a program").expect("write");
        let mut catalogue = catalogue_with_mounts("[]");
        catalogue.set_interpreter("fake", &plain).expect("override");
        let err = catalogue.resolve("fake").expect_err("not executable");
        assert!(matches!(err, RuntimeError::NotFound { tried, .. } if tried == vec![plain]));
        let mut catalogue = catalogue_with_mounts("[]");
        catalogue
            .set_interpreter("fake", dir.path())
            .expect("override");
        assert!(
            catalogue.resolve("fake").is_err(),
            "a directory is no interpreter"
        );
    }

    #[test]
    fn required_mounts_must_exist() {
        let dir = tempfile::tempdir().expect("tempdir");
        let program = dir.path().join("fake");
        make_executable(&program, "#!/bin/sh\n");
        for mounts in ["[\"/nonexistent/required\"]", "[\"/nonexistent/glob-*\"]"] {
            let mut catalogue = catalogue_with_mounts(mounts);
            catalogue
                .set_interpreter("fake", &program)
                .expect("override");
            let err = catalogue.resolve("fake").expect_err("missing mount");
            assert!(err.to_string().contains("runtimes.fake.mounts[0]"), "{err}");
            assert!(err.to_string().contains("optional = true"), "{err}");
        }
    }

    #[test]
    fn glob_candidates_and_compiler_next_to_interpreter() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().display().to_string();
        for jdk in ["jdk-17", "jdk-25"] {
            make_executable(&dir.path().join(jdk).join("bin/java"), "#!/bin/sh\n");
            make_executable(&dir.path().join(jdk).join("bin/javac"), "#!/bin/sh\n");
        }
        let text = crate::catalogue::BUILTIN_CATALOGUE
            .replace(
                "\"/usr/bin/java\", \"/usr/lib/jvm/*/bin/java\"",
                &format!("\"{root}/*/bin/java\""),
            )
            .replace(
                "\"/usr/bin/javac\", \"/usr/lib/jvm/*/bin/javac\"",
                &format!("\"{root}/*/bin/javac\""),
            )
            .replace(
                "{ path = \"/etc/java-*\", optional = true }",
                &format!("\"{root}/jdk-*\""),
            );
        let mut catalogue = Catalogue::from_toml_str(&text).expect("parses");
        let resolved = catalogue.resolve("java").expect("resolves");
        let canonical = fs::canonicalize(dir.path()).expect("canonical");
        assert_eq!(resolved.interpreter, canonical.join("jdk-17/bin/java"));
        assert_eq!(resolved.compiler, Some(canonical.join("jdk-17/bin/javac")));
        assert!(resolved.mounts.contains(&MountPath {
            path: dir.path().join("jdk-25"),
            optional: false
        }));

        // Pinning java to the other JDK brings its javac along.
        catalogue
            .set_interpreter("java", dir.path().join("jdk-25/bin/java"))
            .expect("override");
        let resolved = catalogue.resolve("java").expect("resolves");
        assert_eq!(resolved.compiler, Some(canonical.join("jdk-25/bin/javac")));

        catalogue
            .set_compiler("java", dir.path().join("missing/javac"))
            .expect("override");
        let err = catalogue.resolve("java").expect_err("no compiler");
        assert!(
            matches!(err, RuntimeError::CompilerNotFound { .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains("runtimes.java.compile.compiler"),
            "{err}"
        );
    }

    #[test]
    fn unknown_runtime_names_the_field() {
        let err = Catalogue::builtin().resolve("cobol").expect_err("unknown");
        let message = err.to_string();
        assert!(message.contains("executionConfig.runtime"), "{message}");
        assert!(message.contains("python"), "{message}");
    }

    #[test]
    fn builtin_base_mounts_come_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let program = dir.path().join("bin/python3");
        make_executable(&program, "#!/bin/sh\n");
        let mut catalogue = Catalogue::builtin();
        catalogue
            .set_interpreter("bash", &program)
            .expect("override");
        let resolved = catalogue.resolve("bash").expect("resolves");
        assert_eq!(
            resolved.mounts[0],
            MountPath {
                path: "/usr".into(),
                optional: false
            }
        );
        assert!(
            resolved
                .mounts
                .iter()
                .any(|m| m.path == Path::new("/etc/ld.so.cache"))
        );
    }

    #[test]
    fn version_reads_the_configured_stream() {
        let dir = tempfile::tempdir().expect("tempdir");
        let program = dir.path().join("v");
        make_executable(
            &program,
            "#!/bin/sh\necho \"\" >&2\necho 'v 2 (stderr)' >&2\necho 'ignored'\n",
        );
        let mut catalogue = Catalogue::from_toml_str(
            r#"
            base_mounts = []
            [runtimes.v]
            interpreter = ["/nonexistent"]
            version_args = ["-version"]
            version_stream = "stderr"
            default_file = "main.v"
            script_args = ["{interpreter}", "{entry}"]
            "#,
        )
        .expect("parses");
        catalogue.set_interpreter("v", &program).expect("override");
        let resolved = catalogue.resolve("v").expect("resolves");
        assert_eq!(resolved.version().expect("version"), "v 2 (stderr)");

        make_executable(&program, "#!/bin/sh\nexit 3\n");
        let err = resolved.version().expect_err("fails");
        assert!(err.to_string().contains("version_args"), "{err}");
    }

    #[test]
    fn installed_builtins_resolve_to_real_files() {
        // Whatever of the built-in runtimes this host has must resolve to an
        // executable, symlink-free path inside the mounts.
        let catalogue = Catalogue::builtin();
        for name in ["python", "node", "java", "bash"] {
            let Ok(resolved) = catalogue.resolve(name) else {
                continue;
            };
            assert_eq!(
                fs::canonicalize(&resolved.interpreter).expect("exists"),
                resolved.interpreter
            );
            assert!(
                resolved
                    .mounts
                    .iter()
                    .any(|m| resolved.interpreter.starts_with(&m.path)),
                "{name}: {resolved:?}"
            );
        }
    }
}
