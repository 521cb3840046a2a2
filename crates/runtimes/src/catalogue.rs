//! The runtime catalogue: which languages taskexec runs and how, as data.
//!
//! The built-in catalogue is `crates/runtimes/runtimes.toml`, embedded in the
//! binary. An operator catalogue in the same format can replace or add whole
//! runtimes ([`Catalogue::merge`]) or change single fields of them
//! ([`Catalogue::overlay_toml_str`]), and the interpreter (or compiler) path of
//! a runtime can be pinned ([`Catalogue::set_interpreter`]). Every catalogue is
//! checked when it is loaded, argv templates included, so a bad placeholder is
//! a start-up error and never a task failure.
//!
//! Why one file of about 800 lines before its tests: the catalogue's schema,
//! its loading and its checks are one unit (a field's type, default and
//! check sit together); splitting them would scatter each field over three
//! files.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::layout::{self, BASE_MOUNTS, RESERVED_ENV_VARS};
use crate::template::{self, Placeholder, TemplateFault, TemplateKind};
use crate::wrappers;

/// The built-in catalogue, as TOML.
pub const BUILTIN_CATALOGUE: &str = include_str!("../runtimes.toml");

/// The output stream on which an interpreter prints its version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VersionStream {
    /// Standard output (python, node, bash).
    #[default]
    Stdout,
    /// Standard error (`java -version`).
    Stderr,
}

/// A host path bound read-only at the same path inside the sandbox, as the
/// catalogue writes it. In TOML either a plain string (a required mount) or a
/// table `{ path = "...", optional = true }`. A `*` in a component matches
/// any run of characters (not `/`, not a leading `.`), e.g. `/etc/java-*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    /// Absolute host path, possibly with `*` wildcards.
    pub path: String,
    /// Whether the runtime works without it (a missing optional mount, or a
    /// pattern matching nothing, is skipped instead of failing).
    pub optional: bool,
}

#[derive(Deserialize, Serialize)]
#[serde(untagged)]
enum MountRepr {
    Path(String),
    Table {
        path: String,
        #[serde(default)]
        optional: bool,
    },
}

impl<'de> Deserialize<'de> for MountSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(match MountRepr::deserialize(deserializer)? {
            MountRepr::Path(path) => MountSpec {
                path,
                optional: false,
            },
            MountRepr::Table { path, optional } => MountSpec { path, optional },
        })
    }
}

impl Serialize for MountSpec {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        MountRepr::Table {
            path: self.path.clone(),
            optional: self.optional,
        }
        .serialize(serializer)
    }
}

/// A byte quantity in the catalogue: an integer number of bytes or a
/// Kubernetes-style string such as `"512Mi"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Bytes(u64),
            Text(String),
        }
        match Repr::deserialize(deserializer)? {
            Repr::Bytes(bytes) => Ok(ByteSize(bytes)),
            Repr::Text(text) => taskexec_model::parse_bytes(&text)
                .map(ByteSize)
                .map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(self.0)
    }
}

/// Handler mode of a runtime: a wrapper calls a function of the user's file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandlerSpec {
    /// File name of the wrapper under `/opt/taskexec`; one of the built-in
    /// wrappers unless `source` gives its code.
    pub wrapper: String,
    /// The argv of handler mode (may use `{wrapper}`).
    pub args: Vec<String>,
    /// The wrapper's code, for a wrapper that is not built in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The kind of pre-started interpreter (fork server) that can run this
    /// handler in a forked child instead of a fresh process, e.g. "python".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fork_server: Option<String>,
    /// Whether the wrapper imports the modules named in `$TASK_PRELOAD`
    /// before the task's file (`definition.preload`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub preload: bool,
}

impl HandlerSpec {
    /// The wrapper's code: `source` if given, else the built-in wrapper.
    pub fn wrapper_source(&self) -> Option<&str> {
        self.source
            .as_deref()
            .or_else(|| wrappers::builtin_wrapper(&self.wrapper))
    }
}

/// A compile step run in the sandbox before the task (Java's `javac`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompileSpec {
    /// Candidate absolute paths of the compiler; the first existing
    /// executable wins. A `*` may stand in any component.
    pub compiler: Vec<String>,
    /// Look for a compiler of the same file name next to the resolved
    /// interpreter first (so `javac` comes from the same JDK as `java`).
    #[serde(default)]
    pub prefer_interpreter_dir: bool,
    /// The compile argv (may use `{compiler}`, `{sources}`, `{classes}`).
    pub args: Vec<String>,
    /// Output directory relative to `/task`, e.g. `.classes`; `{classes}`.
    pub output_dir: String,
    /// Memory limit of the compile step.
    pub memory: ByteSize,
    /// Time limit of the compile step, in seconds.
    pub timeout_seconds: u64,
    /// Pids limit of the compile step.
    pub pids: u32,
}

fn default_version_args() -> Vec<String> {
    vec!["--version".to_string()]
}

fn default_min_pids() -> u32 {
    1
}

/// One runtime of the catalogue, as written in its `[runtimes.<name>]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeSpec {
    /// The runtime's name: the key of its table (a `name` field, if given,
    /// must equal it).
    #[serde(default)]
    pub name: String,
    /// A one-line description for `taskexec runtimes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// File extensions, without the dot, that infer this runtime.
    #[serde(default)]
    pub extensions: Vec<String>,
    /// Candidate absolute paths of the interpreter; the first existing
    /// executable wins and is canonicalized. A `*` may stand in any component.
    pub interpreter: Vec<String>,
    /// Arguments that make the interpreter print its version.
    #[serde(default = "default_version_args")]
    pub version_args: Vec<String>,
    /// The stream that carries the version.
    #[serde(default)]
    pub version_stream: VersionStream,
    /// The file, relative to `/task`, that a task's inline `code` goes to.
    pub default_file: String,
    /// The argv of script mode.
    pub script_args: Vec<String>,
    /// Handler mode, if the runtime has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handler: Option<HandlerSpec>,
    /// The compile step, if the runtime has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compile: Option<CompileSpec>,
    /// Host paths to bind read-only beyond the base set.
    #[serde(default)]
    pub mounts: Vec<MountSpec>,
    /// Default environment of the task process.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The least pids limit the runtime can work with.
    #[serde(default = "default_min_pids")]
    pub min_pids: u32,
}

/// The whole of a catalogue file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogueFile {
    /// Replaces the base mounts ([`BASE_MOUNTS`]) when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    base_mounts: Option<Vec<MountSpec>>,
    #[serde(default)]
    runtimes: BTreeMap<String, RuntimeSpec>,
}

/// Why a catalogue was refused. Every message names the offending field as a
/// TOML path (`runtimes.<name>.<field>`) and the form it accepts.
#[derive(Debug, thiserror::Error)]
pub enum CatalogueError {
    /// Not TOML, or a field of the wrong type, or an unknown field.
    #[error(
        "runtime catalogue does not parse (expected TOML with `[runtimes.<name>]` tables and an optional `base_mounts` array): {0}"
    )]
    Toml(#[from] toml::de::Error),
    /// An argv template names a placeholder that is unknown or not available
    /// in that argv.
    #[error(
        "`{field}` uses placeholder `{{{placeholder}}}`, which is not accepted there; accepted: {accepted}"
    )]
    UnknownPlaceholder {
        /// The template argument, e.g. `runtimes.python.script_args[2]`.
        field: String,
        /// The name between the braces.
        placeholder: String,
        /// The placeholders accepted there.
        accepted: String,
    },
    /// An argv template argument is malformed.
    #[error(
        "`{field}` is not a valid argv template: {problem}; write a placeholder as `{{name}}`, a literal brace as `{{{{` or `}}}}`, and `{{sources}}` as a whole argument"
    )]
    BadTemplate {
        /// The template argument.
        field: String,
        /// What is wrong.
        problem: String,
    },
    /// A field has a value outside its accepted form.
    #[error("`{field}` {problem}; expected {expected}")]
    Invalid {
        /// The field.
        field: String,
        /// What is wrong with it.
        problem: String,
        /// The accepted form.
        expected: String,
    },
    /// Two runtimes of one catalogue claim the same extension.
    #[error(
        "`{field}` claims extension `{extension}`, which runtime `{other}` already claims; an extension may infer only one runtime"
    )]
    DuplicateExtension {
        /// The field.
        field: String,
        /// The extension.
        extension: String,
        /// The runtime that claimed it first.
        other: String,
    },
    /// A handler names a wrapper that is neither built in nor given.
    #[error(
        "`{field}` names wrapper `{wrapper}`, which is not built in (built in: {known}); give its code in `{field_source}`"
    )]
    UnknownWrapper {
        /// The field (`runtimes.<name>.handler.wrapper`).
        field: String,
        /// The wrapper's file name.
        wrapper: String,
        /// The built-in wrappers.
        known: String,
        /// The field that can carry the code (`runtimes.<name>.handler.source`).
        field_source: String,
    },
    /// An operation named a runtime the catalogue does not have.
    #[error("unknown runtime `{name}`; the catalogue has: {known}")]
    UnknownRuntime {
        /// The name asked for.
        name: String,
        /// The runtimes the catalogue has.
        known: String,
    },
}

fn invalid(
    field: String,
    problem: impl Into<String>,
    expected: impl Into<String>,
) -> CatalogueError {
    CatalogueError::Invalid {
        field,
        problem: problem.into(),
        expected: expected.into(),
    }
}

/// The set of runtimes taskexec knows, plus the host-specific overrides.
#[derive(Debug, Clone)]
pub struct Catalogue {
    runtimes: BTreeMap<String, RuntimeSpec>,
    base_mounts: Option<Vec<MountSpec>>,
    interpreter_overrides: BTreeMap<String, PathBuf>,
    compiler_overrides: BTreeMap<String, PathBuf>,
    /// Extension → runtime name, for [`Catalogue::infer_from_path`].
    by_extension: BTreeMap<String, String>,
}

impl Catalogue {
    /// The built-in catalogue (python, node, java, bash), parsed once per
    /// process.
    pub fn builtin() -> Catalogue {
        static BUILTIN: OnceLock<Catalogue> = OnceLock::new();
        BUILTIN
            .get_or_init(|| {
                Catalogue::from_toml_str(BUILTIN_CATALOGUE)
                    .expect("the built-in catalogue is checked by the crate's tests")
            })
            .clone()
    }

    /// Parses and checks a catalogue in the format of `runtimes.toml`.
    pub fn from_toml_str(text: &str) -> Result<Catalogue, CatalogueError> {
        let file: CatalogueFile = toml::from_str(text)?;
        Catalogue::from_file(file)
    }

    fn from_file(file: CatalogueFile) -> Result<Catalogue, CatalogueError> {
        let CatalogueFile {
            base_mounts,
            mut runtimes,
        } = file;
        if let Some(mounts) = &base_mounts {
            for (i, mount) in mounts.iter().enumerate() {
                check_mount(format!("base_mounts[{i}]"), mount)?;
            }
        }
        let mut by_extension = BTreeMap::new();
        for (key, spec) in &mut runtimes {
            check_runtime(key, spec)?;
            spec.name = key.clone();
            for (i, ext) in spec.extensions.iter().enumerate() {
                if let Some(other) = by_extension.insert(ext.clone(), key.clone()) {
                    return Err(CatalogueError::DuplicateExtension {
                        field: format!("runtimes.{key}.extensions[{i}]"),
                        extension: ext.clone(),
                        other,
                    });
                }
            }
        }
        Ok(Catalogue {
            runtimes,
            base_mounts,
            interpreter_overrides: BTreeMap::new(),
            compiler_overrides: BTreeMap::new(),
            by_extension,
        })
    }

    /// This catalogue with `other` laid over it: each runtime of `other`
    /// replaces the one of the same name whole (or is added), `other`'s
    /// `base_mounts` replace these if it has them, and its path overrides win.
    /// An extension claimed by a runtime of `other` infers that runtime.
    pub fn merge(mut self, other: Catalogue) -> Catalogue {
        for (name, spec) in other.runtimes {
            self.by_extension.retain(|_, owner| *owner != name);
            for ext in &spec.extensions {
                self.by_extension.insert(ext.clone(), name.clone());
            }
            self.runtimes.insert(name, spec);
        }
        if other.base_mounts.is_some() {
            self.base_mounts = other.base_mounts;
        }
        self.interpreter_overrides
            .extend(other.interpreter_overrides);
        self.compiler_overrides.extend(other.compiler_overrides);
        self
    }

    /// This catalogue with the TOML `text` laid over it field by field: a
    /// `[runtimes.python]` table that sets only `interpreter` changes only
    /// that field of python (tables merge key by key, any other value
    /// replaces), and a table for a new name adds a runtime, which must then
    /// be complete. The result is checked like a loaded catalogue.
    pub fn overlay_toml_str(self, text: &str) -> Result<Catalogue, CatalogueError> {
        let overlay: toml::Table = toml::from_str(text)?;
        let current = CatalogueFile {
            base_mounts: self.base_mounts.clone(),
            runtimes: self.runtimes.clone(),
        };
        let mut table =
            toml::Table::try_from(&current).expect("a checked catalogue serializes to TOML");
        deep_merge(&mut table, overlay);
        let file: CatalogueFile = toml::Value::Table(table).try_into()?;
        let mut merged = Catalogue::from_file(file)?;
        merged.interpreter_overrides = self.interpreter_overrides;
        merged.compiler_overrides = self.compiler_overrides;
        Ok(merged)
    }

    /// The runtime called `name`.
    pub fn get(&self, name: &str) -> Option<&RuntimeSpec> {
        self.runtimes.get(name)
    }

    /// The names of all runtimes, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> + '_ {
        self.runtimes.keys().map(String::as_str)
    }

    /// All runtimes, sorted by name.
    pub fn runtimes(&self) -> impl Iterator<Item = &RuntimeSpec> + '_ {
        self.runtimes.values()
    }

    /// The names of the runtimes that have handler mode, sorted.
    pub fn handler_runtimes(&self) -> Vec<String> {
        self.runtimes
            .values()
            .filter(|spec| spec.handler.is_some())
            .map(|spec| spec.name.clone())
            .collect()
    }

    /// The names of the runtimes whose handler wrapper preloads modules
    /// (`definition.preload`), sorted.
    pub fn preload_runtimes(&self) -> Vec<String> {
        self.runtimes
            .values()
            .filter(|spec| spec.handler.as_ref().is_some_and(|h| h.preload))
            .map(|spec| spec.name.clone())
            .collect()
    }

    /// The runtime whose `extensions` include the extension of `path`
    /// (compared as is, then in lower case).
    pub fn infer_from_path(&self, path: &Path) -> Option<&RuntimeSpec> {
        let ext = path.extension()?.to_str()?;
        let name = self
            .by_extension
            .get(ext)
            .or_else(|| self.by_extension.get(&ext.to_ascii_lowercase()))?;
        self.runtimes.get(name)
    }

    /// Pins the interpreter of `runtime` to `path` (an absolute host path):
    /// [`Catalogue::resolve`] then tries only that path.
    pub fn set_interpreter(
        &mut self,
        runtime: &str,
        path: impl Into<PathBuf>,
    ) -> Result<(), CatalogueError> {
        let path = self.checked_override(runtime, "interpreter", path.into())?;
        self.interpreter_overrides.insert(runtime.to_string(), path);
        Ok(())
    }

    /// Pins the compiler of `runtime` (which must have a compile step) to
    /// `path`, an absolute host path.
    pub fn set_compiler(
        &mut self,
        runtime: &str,
        path: impl Into<PathBuf>,
    ) -> Result<(), CatalogueError> {
        let path = self.checked_override(runtime, "compile.compiler", path.into())?;
        if self
            .runtimes
            .get(runtime)
            .is_some_and(|s| s.compile.is_none())
        {
            return Err(invalid(
                format!("runtimes.{runtime}.compile.compiler"),
                "cannot be overridden: the runtime has no compile step",
                "a runtime with a `compile` table",
            ));
        }
        self.compiler_overrides.insert(runtime.to_string(), path);
        Ok(())
    }

    fn checked_override(
        &self,
        runtime: &str,
        field: &str,
        path: PathBuf,
    ) -> Result<PathBuf, CatalogueError> {
        if !self.runtimes.contains_key(runtime) {
            return Err(self.unknown(runtime));
        }
        if !path.is_absolute() {
            return Err(invalid(
                format!("runtimes.{runtime}.{field}"),
                format!("override `{}` is not an absolute path", path.display()),
                "an absolute host path such as /usr/bin/python3 (there is no PATH search)",
            ));
        }
        Ok(path)
    }

    /// The interpreter override of `runtime`, if one was set.
    pub fn interpreter_override(&self, runtime: &str) -> Option<&Path> {
        self.interpreter_overrides
            .get(runtime)
            .map(PathBuf::as_path)
    }

    /// The compiler override of `runtime`, if one was set.
    pub fn compiler_override(&self, runtime: &str) -> Option<&Path> {
        self.compiler_overrides.get(runtime).map(PathBuf::as_path)
    }

    /// The mounts every sandbox gets: the catalogue's `base_mounts` if it
    /// has them, else [`BASE_MOUNTS`].
    pub fn base_mounts(&self) -> Vec<MountSpec> {
        match &self.base_mounts {
            Some(mounts) => mounts.clone(),
            None => BASE_MOUNTS
                .iter()
                .map(|(path, optional)| MountSpec {
                    path: (*path).to_string(),
                    optional: *optional,
                })
                .collect(),
        }
    }

    pub(crate) fn unknown(&self, name: &str) -> CatalogueError {
        CatalogueError::UnknownRuntime {
            name: name.to_string(),
            known: self.known(),
        }
    }

    /// The runtime names, comma-separated, for messages.
    pub(crate) fn known(&self) -> String {
        self.names().collect::<Vec<_>>().join(", ")
    }
}

impl Default for Catalogue {
    fn default() -> Self {
        Catalogue::builtin()
    }
}

impl fmt::Display for VersionStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VersionStream::Stdout => "stdout",
            VersionStream::Stderr => "stderr",
        })
    }
}

fn deep_merge(base: &mut toml::Table, overlay: toml::Table) {
    for (key, value) in overlay {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(existing)), toml::Value::Table(new)) => {
                deep_merge(existing, new);
            }
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

fn check_name(key: &str) -> bool {
    let mut chars = key.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'))
}

fn check_runtime(key: &str, spec: &RuntimeSpec) -> Result<(), CatalogueError> {
    let at = |field: &str| format!("runtimes.{key}.{field}");
    if !check_name(key) {
        return Err(invalid(
            format!("runtimes.{key}"),
            "is not a valid runtime name",
            "lower-case letters, digits, `-`, `_` or `.`, starting with a letter or digit (e.g. `python`)",
        ));
    }
    if !spec.name.is_empty() && spec.name != key {
        return Err(invalid(
            at("name"),
            format!("is `{}` but the table is `runtimes.{key}`", spec.name),
            format!("the table's own name `{key}`, or no `name` field"),
        ));
    }
    for (i, ext) in spec.extensions.iter().enumerate() {
        let ok = !ext.is_empty()
            && ext
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !ok {
            return Err(invalid(
                at(&format!("extensions[{i}]")),
                format!("is `{ext}`"),
                "a file extension without the dot, e.g. \"py\"",
            ));
        }
    }
    check_candidates(&at("interpreter"), &spec.interpreter)?;
    if let Err(problem) = layout::check_relative(&spec.default_file) {
        return Err(invalid(
            at("default_file"),
            format!("`{}` {problem}", spec.default_file),
            "a file name relative to /task, e.g. \"main.py\"",
        ));
    }
    let has_compile = spec.compile.is_some();
    check_template(
        &at("script_args"),
        &spec.script_args,
        TemplateKind::Script,
        has_compile,
    )?;
    if let Some(handler) = &spec.handler {
        let name_ok = !handler.wrapper.is_empty()
            && !handler.wrapper.contains('/')
            && handler.wrapper != "."
            && handler.wrapper != "..";
        if !name_ok {
            return Err(invalid(
                at("handler.wrapper"),
                format!("is `{}`", handler.wrapper),
                "a plain file name under /opt/taskexec, e.g. \"python_handler.py\"",
            ));
        }
        if handler.wrapper_source().is_none() {
            return Err(CatalogueError::UnknownWrapper {
                field: at("handler.wrapper"),
                wrapper: handler.wrapper.clone(),
                known: wrappers::builtin_names(),
                field_source: at("handler.source"),
            });
        }
        check_template(
            &at("handler.args"),
            &handler.args,
            TemplateKind::Handler,
            has_compile,
        )?;
    }
    if let Some(compile) = &spec.compile {
        check_candidates(&at("compile.compiler"), &compile.compiler)?;
        check_template(
            &at("compile.args"),
            &compile.args,
            TemplateKind::Compile,
            true,
        )?;
        if let Err(problem) = layout::check_relative(&compile.output_dir) {
            return Err(invalid(
                at("compile.output_dir"),
                format!("`{}` {problem}", compile.output_dir),
                "a directory relative to /task, e.g. \".classes\"",
            ));
        }
        if compile.memory.0 == 0 {
            return Err(invalid(
                at("compile.memory"),
                "is zero",
                "a byte quantity such as \"512Mi\"",
            ));
        }
        if compile.timeout_seconds == 0 {
            return Err(invalid(
                at("compile.timeout_seconds"),
                "is zero",
                "a positive number of seconds, e.g. 60",
            ));
        }
        if compile.pids == 0 {
            return Err(invalid(
                at("compile.pids"),
                "is zero",
                "a positive pids limit, e.g. 256",
            ));
        }
    }
    for (i, mount) in spec.mounts.iter().enumerate() {
        check_mount(at(&format!("mounts[{i}]")), mount)?;
    }
    for (name, value) in &spec.env {
        let name_ok = !name.is_empty()
            && !name.contains(['=', '\0'])
            && !name.starts_with(|c: char| c.is_ascii_digit());
        if !name_ok || value.contains('\0') {
            return Err(invalid(
                at(&format!("env.{name}")),
                "is not a valid environment variable",
                "a name without `=` or NUL that does not start with a digit, and a value without NUL",
            ));
        }
        if RESERVED_ENV_VARS.contains(&name.as_str()) {
            return Err(invalid(
                at(&format!("env.{name}")),
                "is set by the executor itself",
                format!("a variable other than {}", RESERVED_ENV_VARS.join(", ")),
            ));
        }
    }
    if spec.min_pids == 0 {
        return Err(invalid(
            at("min_pids"),
            "is zero",
            "a positive pids count, e.g. 16",
        ));
    }
    Ok(())
}

fn check_host_path(path: &str) -> bool {
    path.starts_with('/') && !path.contains('\0') && !path.split('/').any(|c| c == "." || c == "..")
}

fn check_candidates(field: &str, candidates: &[String]) -> Result<(), CatalogueError> {
    if candidates.is_empty() {
        return Err(invalid(
            field.to_string(),
            "is empty",
            "a list of candidate absolute paths, e.g. [\"/usr/bin/python3\"] (there is no PATH search)",
        ));
    }
    for (i, candidate) in candidates.iter().enumerate() {
        if !check_host_path(candidate) {
            return Err(invalid(
                format!("{field}[{i}]"),
                format!("`{candidate}` is not an absolute path without `.` or `..`"),
                "an absolute host path such as \"/usr/bin/python3\" (a `*` may stand in a component)",
            ));
        }
    }
    Ok(())
}

fn check_mount(field: String, mount: &MountSpec) -> Result<(), CatalogueError> {
    if !check_host_path(&mount.path) || mount.path == "/" {
        return Err(invalid(
            field,
            format!(
                "`{}` is not an absolute path below `/` without `.` or `..`",
                mount.path
            ),
            "a host path such as \"/etc/java-*\" or { path = \"/opt/x\", optional = true }",
        ));
    }
    Ok(())
}

fn check_template(
    field: &str,
    args: &[String],
    kind: TemplateKind,
    has_compile: bool,
) -> Result<(), CatalogueError> {
    if args.is_empty() {
        return Err(invalid(
            field.to_string(),
            "is empty",
            "an argv template such as [\"{interpreter}\", \"{entry}\"]",
        ));
    }
    let accepted = kind.accepted(has_compile);
    for (i, arg) in args.iter().enumerate() {
        let at = format!("{field}[{i}]");
        let segments = template::parse_arg(arg).map_err(|fault| match fault {
            TemplateFault::Unknown(name) => CatalogueError::UnknownPlaceholder {
                field: at.clone(),
                placeholder: name,
                accepted: template::list(&accepted),
            },
            TemplateFault::Unbalanced => CatalogueError::BadTemplate {
                field: at.clone(),
                problem: format!("`{arg}` has an unmatched brace"),
            },
            TemplateFault::SourcesNotAlone => CatalogueError::BadTemplate {
                field: at.clone(),
                problem: format!("`{arg}` has `{{sources}}` next to other text"),
            },
        })?;
        for segment in segments {
            if let template::Segment::Var(p) = segment
                && !accepted.contains(&p)
            {
                return Err(CatalogueError::UnknownPlaceholder {
                    field: at,
                    placeholder: p.name().to_string(),
                    accepted: template::list(&accepted),
                });
            }
        }
    }
    if let Some(first) = args.first()
        && !(first == "{interpreter}" || first == "{compiler}" || first.starts_with('/'))
    {
        return Err(invalid(
            format!("{field}[0]"),
            format!("is `{first}`"),
            format!(
                "the program to run: {}, {} or an absolute path",
                Placeholder::Interpreter,
                Placeholder::Compiler
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_parses_with_the_four_runtimes() {
        let catalogue = Catalogue::builtin();
        assert_eq!(
            catalogue.names().collect::<Vec<_>>(),
            ["bash", "java", "node", "python"]
        );
        for name in ["bash", "java", "node", "python"] {
            assert_eq!(catalogue.get(name).expect("present").name, name);
        }
        let java = catalogue.get("java").expect("java");
        let compile = java.compile.as_ref().expect("java compiles");
        assert_eq!(compile.memory, ByteSize(512 * 1024 * 1024));
        assert_eq!(compile.timeout_seconds, 60);
        assert_eq!(compile.pids, 256);
        assert_eq!(java.min_pids, 64);
        assert_eq!(catalogue.get("node").expect("node").min_pids, 32);
        assert!(java.handler.is_none());
        assert!(catalogue.get("bash").expect("bash").handler.is_none());
        assert_eq!(java.version_stream, VersionStream::Stderr);
    }

    #[test]
    fn builtin_handlers_have_their_wrappers() {
        let catalogue = Catalogue::builtin();
        for name in ["python", "node"] {
            let handler = catalogue
                .get(name)
                .and_then(|s| s.handler.as_ref())
                .expect("handler mode");
            assert!(handler.wrapper_source().is_some(), "{name}");
        }
    }

    #[test]
    fn every_builtin_template_is_valid() {
        let catalogue = Catalogue::builtin();
        for spec in catalogue.runtimes() {
            let has_compile = spec.compile.is_some();
            check_template("t", &spec.script_args, TemplateKind::Script, has_compile)
                .expect("script args");
            if let Some(handler) = &spec.handler {
                check_template("t", &handler.args, TemplateKind::Handler, has_compile)
                    .expect("handler args");
            }
            if let Some(compile) = &spec.compile {
                check_template("t", &compile.args, TemplateKind::Compile, true)
                    .expect("compile args");
            }
        }
    }

    const MINIMAL: &str = r#"
        [runtimes.ruby]
        extensions = ["rb"]
        interpreter = ["/usr/bin/ruby"]
        default_file = "main.rb"
        script_args = ["{interpreter}", "{entry}"]
    "#;

    #[test]
    fn a_new_runtime_is_one_table() {
        let catalogue = Catalogue::from_toml_str(MINIMAL).expect("parses");
        let ruby = catalogue.get("ruby").expect("ruby");
        assert_eq!(ruby.name, "ruby");
        assert_eq!(ruby.version_args, ["--version"]);
        assert_eq!(ruby.version_stream, VersionStream::Stdout);
        assert_eq!(ruby.min_pids, 1);
        assert!(ruby.handler.is_none() && ruby.compile.is_none());
    }

    fn error_of(text: &str) -> String {
        Catalogue::from_toml_str(text)
            .expect_err("must be refused")
            .to_string()
    }

    #[test]
    fn unknown_placeholder_is_refused_at_load() {
        let message = error_of(&MINIMAL.replace("{entry}", "{entrypoint}"));
        assert!(
            message.contains("runtimes.ruby.script_args[1]"),
            "{message}"
        );
        assert!(message.contains("{entrypoint}"), "{message}");
        assert!(message.contains("{entry}"), "{message}");
    }

    #[test]
    fn placeholder_out_of_its_place_is_refused() {
        let message = error_of(&MINIMAL.replace("{entry}", "{wrapper}"));
        assert!(message.contains("`{wrapper}`"), "{message}");
        assert!(message.contains("not accepted there"), "{message}");
        let message = error_of(&MINIMAL.replace("{entry}", "{classes}"));
        assert!(message.contains("`{classes}`"), "{message}");
        let message = error_of(&MINIMAL.replace("{entry}", "{sources}"));
        assert!(message.contains("`{sources}`"), "{message}");
    }

    #[test]
    fn malformed_templates_are_refused() {
        let message = error_of(&MINIMAL.replace("{entry}", "{entry"));
        assert!(message.contains("unmatched brace"), "{message}");
        let message = error_of(&MINIMAL.replace("\"{interpreter}\"", "\"ruby\""));
        assert!(
            message.contains("runtimes.ruby.script_args[0]"),
            "{message}"
        );
    }

    #[test]
    fn fields_are_checked() {
        let cases = [
            (
                MINIMAL.replace("/usr/bin/ruby", "ruby"),
                "runtimes.ruby.interpreter[0]",
            ),
            (
                MINIMAL.replace("main.rb", "../main.rb"),
                "runtimes.ruby.default_file",
            ),
            (
                MINIMAL.replace("\"rb\"", "\".rb\""),
                "runtimes.ruby.extensions[0]",
            ),
            (
                MINIMAL.replace("[runtimes.ruby]", "[runtimes.Ruby]"),
                "runtimes.Ruby",
            ),
            (format!("{MINIMAL}\nname = \"rb\""), "runtimes.ruby.name"),
            (format!("{MINIMAL}\nmin_pids = 0"), "runtimes.ruby.min_pids"),
            (
                format!("{MINIMAL}\nmounts = [\"relative\"]"),
                "runtimes.ruby.mounts[0]",
            ),
            (
                format!("{MINIMAL}\n[runtimes.ruby.env]\nPATH = \"/x\""),
                "runtimes.ruby.env.PATH",
            ),
            (
                format!(
                    "{MINIMAL}\n[runtimes.ruby.handler]\nwrapper = \"ruby_handler.rb\"\nargs = [\"{{interpreter}}\"]"
                ),
                "runtimes.ruby.handler.wrapper",
            ),
        ];
        for (text, field) in cases {
            let message = error_of(&text);
            assert!(message.contains(&format!("`{field}")), "{field}: {message}");
        }
    }

    #[test]
    fn unknown_fields_and_bad_quantities_are_refused() {
        let message = error_of(&format!("{MINIMAL}\ninterpeter = []"));
        assert!(message.contains("interpeter"), "{message}");
        let java = BUILTIN_CATALOGUE.replace("memory = \"512Mi\"", "memory = \"512 parsecs\"");
        let message = error_of(&java);
        assert!(message.contains("memory"), "{message}");
    }

    #[test]
    fn an_inline_wrapper_source_is_accepted() {
        let text = format!(
            "{MINIMAL}\n[runtimes.ruby.handler]\nwrapper = \"ruby_handler.rb\"\nsource = \"puts 1\"\nargs = [\"{{interpreter}}\", \"{{wrapper}}\", \"{{entry}}\"]"
        );
        let catalogue = Catalogue::from_toml_str(&text).expect("parses");
        let handler = catalogue
            .get("ruby")
            .and_then(|s| s.handler.as_ref())
            .expect("handler");
        assert_eq!(handler.wrapper_source(), Some("puts 1"));
    }

    #[test]
    fn duplicate_extension_in_one_catalogue_is_refused() {
        let text = format!(
            "{MINIMAL}\n{}",
            MINIMAL.replace("runtimes.ruby", "runtimes.ruby2")
        );
        let message = error_of(&text);
        assert!(
            message.contains("runtimes.ruby2.extensions[0]"),
            "{message}"
        );
    }

    #[test]
    fn infer_from_path_uses_extensions() {
        let catalogue = Catalogue::builtin();
        let infer = |p: &str| {
            catalogue
                .infer_from_path(Path::new(p))
                .map(|s| s.name.as_str())
        };
        assert_eq!(infer("examples/python/hello.py"), Some("python"));
        assert_eq!(infer("x/handler.js"), Some("node"));
        assert_eq!(infer("x/esm.mjs"), Some("node"));
        assert_eq!(infer("Main.java"), Some("java"));
        assert_eq!(infer("MAIN.JAVA"), Some("java"));
        assert_eq!(infer("hello.sh"), Some("bash"));
        assert_eq!(infer("README"), None);
        assert_eq!(infer("a.rb"), None);
    }

    #[test]
    fn merge_replaces_and_adds_runtimes() {
        let operator = Catalogue::from_toml_str(
            r#"
            [runtimes.python]
            extensions = ["py", "pyw"]
            interpreter = ["/opt/python/bin/python3"]
            default_file = "task.py"
            script_args = ["{interpreter}", "{entry}"]

            [runtimes.ruby]
            extensions = ["rb"]
            interpreter = ["/usr/bin/ruby"]
            default_file = "main.rb"
            script_args = ["{interpreter}", "{entry}"]
            "#,
        )
        .expect("parses");
        let merged = Catalogue::builtin().merge(operator);
        let python = merged.get("python").expect("python");
        assert_eq!(python.interpreter, ["/opt/python/bin/python3"]);
        assert_eq!(python.default_file, "task.py");
        assert!(python.handler.is_none(), "the whole table was replaced");
        assert_eq!(
            merged.names().collect::<Vec<_>>(),
            ["bash", "java", "node", "python", "ruby"]
        );
        let infer = |p: &str| {
            merged
                .infer_from_path(Path::new(p))
                .map(|s| s.name.as_str())
        };
        assert_eq!(infer("a.pyw"), Some("python"));
        assert_eq!(infer("a.rb"), Some("ruby"));
        assert_eq!(infer("a.java"), Some("java"));
    }

    #[test]
    fn merge_moves_a_claimed_extension() {
        let operator =
            Catalogue::from_toml_str(&MINIMAL.replace("\"rb\"", "\"sh\"")).expect("parses");
        let merged = Catalogue::builtin().merge(operator);
        let spec = merged.infer_from_path(Path::new("x.sh")).expect("inferred");
        assert_eq!(spec.name, "ruby");
        let spec = merged
            .infer_from_path(Path::new("x.bash"))
            .expect("inferred");
        assert_eq!(spec.name, "bash");
    }

    #[test]
    fn overlay_changes_single_fields() {
        let overlaid = Catalogue::builtin()
            .overlay_toml_str(
                r#"
                base_mounts = ["/usr", { path = "/lib64", optional = true }]
                [runtimes.python]
                interpreter = ["/opt/python/bin/python3"]
                [runtimes.python.env]
                PYTHONHASHSEED = "0"
                [runtimes.java.compile]
                memory = "1Gi"
                "#,
            )
            .expect("overlays");
        let python = overlaid.get("python").expect("python");
        assert_eq!(python.interpreter, ["/opt/python/bin/python3"]);
        assert!(python.handler.is_some(), "other fields are kept");
        assert_eq!(
            python.env.get("PYTHONHASHSEED").map(String::as_str),
            Some("0")
        );
        assert_eq!(
            python.env.get("PYTHONUNBUFFERED").map(String::as_str),
            Some("1")
        );
        let compile = overlaid
            .get("java")
            .and_then(|s| s.compile.as_ref())
            .expect("compile");
        assert_eq!(compile.memory, ByteSize(1 << 30));
        assert_eq!(compile.pids, 256);
        assert_eq!(overlaid.base_mounts().len(), 2);
        assert_eq!(Catalogue::builtin().base_mounts().len(), BASE_MOUNTS.len());
    }

    #[test]
    fn overlay_is_checked() {
        let err = Catalogue::builtin()
            .overlay_toml_str("[runtimes.python]\nscript_args = [\"{interpreter}\", \"{nope}\"]")
            .expect_err("refused");
        assert!(
            err.to_string().contains("runtimes.python.script_args[1]"),
            "{err}"
        );
    }

    #[test]
    fn overrides_are_checked() {
        let mut catalogue = Catalogue::builtin();
        catalogue
            .set_interpreter("python", "/opt/py/bin/python3")
            .expect("absolute path");
        assert_eq!(
            catalogue.interpreter_override("python"),
            Some(Path::new("/opt/py/bin/python3"))
        );
        let err = catalogue
            .set_interpreter("cobol", "/usr/bin/cobc")
            .expect_err("unknown");
        assert!(err.to_string().contains("cobol"), "{err}");
        assert!(err.to_string().contains("python"), "{err}");
        let err = catalogue
            .set_interpreter("python", "python3")
            .expect_err("relative");
        assert!(
            err.to_string().contains("runtimes.python.interpreter"),
            "{err}"
        );
        let err = catalogue
            .set_compiler("python", "/usr/bin/cc")
            .expect_err("no compile");
        assert!(
            err.to_string().contains("runtimes.python.compile.compiler"),
            "{err}"
        );
        catalogue
            .set_compiler("java", "/opt/jdk/bin/javac")
            .expect("java compiles");
    }

    #[test]
    fn overrides_survive_merge_and_overlay() {
        let mut catalogue = Catalogue::builtin();
        catalogue
            .set_interpreter("node", "/opt/node/bin/node")
            .expect("ok");
        let catalogue = catalogue
            .merge(Catalogue::from_toml_str(MINIMAL).expect("parses"))
            .overlay_toml_str("[runtimes.node]\nmin_pids = 40")
            .expect("overlays");
        assert_eq!(
            catalogue.interpreter_override("node"),
            Some(Path::new("/opt/node/bin/node"))
        );
        assert_eq!(catalogue.get("node").expect("node").min_pids, 40);
    }
}
