//! The task model: what a caller submits ([`TaskInstance`] and its parts) in
//! the seed's camelCase JSON shape, and static validation of it
//! ([`TaskInstance::validate_static`]) that needs no operator configuration.
//!
//! Raw user values (quantities, numbers that may be out of range) are kept
//! as given so that every problem surfaces as a [`FieldError`] naming the
//! JSON field, rather than as an anonymous deserialization failure.
//!
//! Why one file of about 740 lines before its tests: the submitted shape and
//! its validation are read together, field by field (each field's type, its
//! accepted form and the error naming it side by side).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde::de;
use serde::{Deserialize, Deserializer, Serialize};

use crate::error::FieldError;
use crate::limits::{Limits, LimitsConfig};
use crate::protocol::{CONTROL_DIR_NAME, RESERVED_ENV_VARS};
pub use crate::quantity::QuantityValue;
use crate::retry::{RetryLimits, RetryPolicy, ValidRetryPolicy};

/// Lowest accepted `priority`.
pub const MIN_PRIORITY: i32 = -1000;
/// Highest accepted `priority`.
pub const MAX_PRIORITY: i32 = 1000;
/// Most modules `definition.preload` may list.
pub const MAX_PRELOAD: usize = 16;

/// Longest accepted file path (`definition.files[].name`), in bytes.
pub const MAX_PATH_BYTES: usize = 1024;
/// Longest accepted path component, in bytes.
pub const MAX_COMPONENT_BYTES: usize = 255;
/// Longest accepted `id`, `workflowInstanceId`, `idempotencyKey` and
/// `definition.name`, in bytes.
pub const MAX_ID_BYTES: usize = 256;
/// Permissions a task may request in `executionConfig.securityContext.permissions`.
pub const KNOWN_PERMISSIONS: [&str; 1] = ["network"];

/// A task submitted for execution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TaskInstance {
    /// Task id; empty means the executor assigns one.
    #[serde(default)]
    pub id: String,
    /// Id of the workflow instance this task belongs to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_instance_id: Option<String>,
    /// Key under which repeated submissions are deduplicated, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Scheduling priority, `-1000..=1000`; higher runs first.
    #[serde(default)]
    pub priority: i32,
    /// What to run.
    pub definition: TaskDefinition,
    /// The task's input, handed to the code as JSON.
    #[serde(default)]
    pub input: serde_json::Value,
    /// How to run it.
    #[serde(default)]
    pub execution_config: ExecutionConfig,
    /// How to retry failures; `None` means [`RetryPolicy::default`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_policy: Option<RetryPolicy>,
}

fn default_task_name() -> String {
    "task".to_owned()
}

/// The code of a task and how to invoke it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TaskDefinition {
    /// Human-readable name; defaults to `"task"`.
    #[serde(default = "default_task_name")]
    pub name: String,
    /// Runtime name (e.g. `python`, `node`, `java`, `bash`); overridden by
    /// `executionConfig.runtime`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    /// Inline source code; exclusive with `files`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Source files; exclusive with `code`.
    #[serde(default)]
    pub files: Vec<TaskFile>,
    /// With `files`: the file to run. Ignored with `code`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<String>,
    /// Whether the code is a script or a handler function.
    #[serde(default)]
    pub mode: Mode,
    /// JSON Schema the input must satisfy, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_schema: Option<serde_json::Value>,
    /// JSON Schema the output must satisfy, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_schema: Option<serde_json::Value>,
    /// Modules to import before the handler's file is loaded (handler
    /// mode, runtimes whose wrapper supports it: python), by their dotted
    /// names (`json`, `numpy`, `xml.etree.ElementTree`). They resolve
    /// against the interpreter's own library paths, never the task's files.
    /// A warm executor imports them once in a fork server of their own, so
    /// each task starts with them loaded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preload: Vec<String>,
}

/// One source file of a task: a relative path under the work directory and
/// its text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TaskFile {
    /// Relative path, e.g. `src/main.py`.
    pub name: String,
    /// File content.
    pub content: String,
}

/// How the code is invoked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Run the program; it reads input and writes output itself.
    #[default]
    Script,
    /// Call a handler function through a runtime-provided wrapper.
    Handler,
}

/// How to run a task: runtime, execution method, resources, security and
/// environment.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExecutionConfig {
    /// Runtime name; takes precedence over `definition.runtime`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    /// Requested execution method.
    #[serde(default)]
    pub method: Method,
    /// Requested resources, raw as given.
    #[serde(default)]
    pub resource_requirements: ResourceRequirements,
    /// Security settings.
    #[serde(default)]
    pub security_context: SecurityContext,
    /// Extra environment variables for the task.
    #[serde(default)]
    pub environment_variables: BTreeMap<String, String>,
}

/// Execution method. Serialized `"AUTO"`, `"CONTAINER"`, `"IN_PROCESS"`,
/// `"FAAS"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Method {
    /// Let the executor choose (see [`crate::select_method`]).
    #[default]
    Auto,
    /// Run in the Linux sandbox.
    Container,
    /// Run inside the executor process (sandboxed interpreter).
    InProcess,
    /// Run on a function-as-a-service backend.
    Faas,
}

impl Method {
    /// Every method, in declaration order.
    pub const ALL: [Method; 4] = [
        Method::Auto,
        Method::Container,
        Method::InProcess,
        Method::Faas,
    ];

    /// The wire name, e.g. `"IN_PROCESS"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Method::Auto => "AUTO",
            Method::Container => "CONTAINER",
            Method::InProcess => "IN_PROCESS",
            Method::Faas => "FAAS",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no [`Method`] or [`SecurityLevel`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {given:?}; expected {expected}")]
pub struct UnknownVariant {
    /// What was being parsed, e.g. `method`.
    pub what: &'static str,
    /// The rejected text.
    pub given: String,
    /// The accepted spellings.
    pub expected: &'static str,
}

impl FromStr for Method {
    type Err = UnknownVariant;

    /// Parses the wire name; case-insensitive, `-` accepted for `_`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let n = s.trim().to_ascii_uppercase().replace('-', "_");
        Method::ALL
            .into_iter()
            .find(|m| m.as_str() == n)
            .ok_or_else(|| UnknownVariant {
                what: "method",
                given: s.to_owned(),
                expected: "one of AUTO, CONTAINER, IN_PROCESS, FAAS",
            })
    }
}

/// Requested resources exactly as the user gave them; resolved and checked
/// against operator maxima by [`ResourceRequirements::resolve`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResourceRequirements {
    /// CPU request (`"500m"`, `0.5`, `"2"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<QuantityValue>,
    /// Hard CPU limit (same forms as `cpu`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_limit: Option<QuantityValue>,
    /// Memory limit (`"128Mi"`, `134217728`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<QuantityValue>,
    /// Work directory size limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<QuantityValue>,
    /// Wall-clock timeout in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<f64>,
    /// CPU time limit in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_time_seconds: Option<f64>,
    /// Maximum number of processes and threads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<i64>,
    /// Maximum captured bytes of stdout, stderr and output each.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_bytes: Option<QuantityValue>,
}

/// Security settings of a task.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecurityContext {
    /// User to run as inside the sandbox, if not the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as: Option<RunAs>,
    /// Extra permissions, from [`KNOWN_PERMISSIONS`].
    #[serde(default)]
    pub permissions: Vec<String>,
    /// Isolation level.
    #[serde(default)]
    pub security_level: SecurityLevel,
}

/// The user a task runs as: a numeric uid or a user name. Serialized as
/// given (a JSON number or string).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum RunAs {
    /// A numeric uid (kept as `i64` so that bad values reach validation).
    Uid(i64),
    /// A user name.
    Name(String),
}

impl<'de> Deserialize<'de> for RunAs {
    /// Accepts a JSON integer (uid) or string (user name). Goes through
    /// [`serde_json::Value`] so that it works whatever serde_json features
    /// are enabled. Uids beyond `i64` become `i64::MAX` and are rejected by
    /// validation.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        const EXPECTED: &str = "a numeric uid such as 1000 or a user name such as \"nobody\"";
        match serde_json::Value::deserialize(deserializer)? {
            serde_json::Value::String(s) => Ok(RunAs::Name(s)),
            serde_json::Value::Number(n) => match (n.as_i64(), n.is_u64()) {
                (Some(i), _) => Ok(RunAs::Uid(i)),
                (None, true) => Ok(RunAs::Uid(i64::MAX)),
                (None, false) => Err(de::Error::invalid_type(
                    de::Unexpected::Other("non-integer number"),
                    &EXPECTED,
                )),
            },
            other => Err(de::Error::invalid_type(
                crate::quantity::unexpected(&other),
                &EXPECTED,
            )),
        }
    }
}

/// Isolation level. Serialized `"LOW"`, `"MEDIUM"`, `"HIGH"`; default
/// `MEDIUM`. `HIGH` always runs in the container sandbox.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "UPPERCASE")]
pub enum SecurityLevel {
    /// Lowest isolation.
    Low,
    /// Default isolation.
    #[default]
    Medium,
    /// Highest isolation; forces the container method.
    High,
}

impl SecurityLevel {
    /// The wire name, e.g. `"MEDIUM"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            SecurityLevel::Low => "LOW",
            SecurityLevel::Medium => "MEDIUM",
            SecurityLevel::High => "HIGH",
        }
    }
}

impl fmt::Display for SecurityLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SecurityLevel {
    type Err = UnknownVariant;

    /// Parses the wire name, case-insensitively.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_uppercase().as_str() {
            "LOW" => Ok(SecurityLevel::Low),
            "MEDIUM" => Ok(SecurityLevel::Medium),
            "HIGH" => Ok(SecurityLevel::High),
            _ => Err(UnknownVariant {
                what: "security level",
                given: s.to_owned(),
                expected: "one of LOW, MEDIUM, HIGH",
            }),
        }
    }
}

/// A task whose every configuration-dependent part checked out: the
/// resolved limits and retry policy (see [`TaskInstance::validate`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedTask {
    /// Resolved resource limits.
    pub limits: Limits,
    /// Validated retry policy (the default policy if none was given).
    pub retry: ValidRetryPolicy,
}

impl TaskInstance {
    /// The runtime name: `executionConfig.runtime`, else `definition.runtime`.
    pub fn runtime(&self) -> Option<&str> {
        self.execution_config
            .runtime
            .as_deref()
            .or(self.definition.runtime.as_deref())
    }

    /// The retry policy given, or [`RetryPolicy::default`].
    pub fn retry_policy_or_default(&self) -> RetryPolicy {
        self.retry_policy.clone().unwrap_or_default()
    }

    /// Checks everything that needs no operator configuration: identifiers,
    /// priority, code vs files, file names, entrypoint, environment
    /// variables, permissions and `runAs`. The first problem found is
    /// returned, naming its JSON field.
    pub fn validate_static(&self) -> Result<(), FieldError> {
        validate_id(&self.id)?;
        if let Some(w) = &self.workflow_instance_id {
            validate_text("workflowInstanceId", w, false)?;
        }
        if let Some(k) = &self.idempotency_key {
            validate_text("idempotencyKey", k, false)?;
        }
        if !(MIN_PRIORITY..=MAX_PRIORITY).contains(&self.priority) {
            return Err(FieldError::new(
                "priority",
                format!(
                    "{} is out of range; expected an integer from {MIN_PRIORITY} to {MAX_PRIORITY}",
                    self.priority
                ),
            ));
        }
        validate_text("definition.name", &self.definition.name, false)?;
        for (field, value) in [
            ("definition.runtime", &self.definition.runtime),
            ("executionConfig.runtime", &self.execution_config.runtime),
        ] {
            if let Some(r) = value {
                validate_text(field, r, false)?;
            }
        }
        self.definition.validate_code_and_files()?;
        self.definition.validate_preload()?;
        validate_env(&self.execution_config.environment_variables)?;
        self.execution_config.security_context.validate()?;
        Ok(())
    }

    /// Full validation: [`TaskInstance::validate_static`], then resources
    /// resolved against `limits` and the retry policy (given or default)
    /// checked against `retry_limits`.
    pub fn validate(
        &self,
        limits: &LimitsConfig,
        retry_limits: &RetryLimits,
    ) -> Result<ValidatedTask, FieldError> {
        self.validate_static()?;
        let limits = self
            .execution_config
            .resource_requirements
            .resolve(limits)?;
        let retry = self.retry_policy_or_default().validate(retry_limits)?;
        Ok(ValidatedTask { limits, retry })
    }
}

impl TaskDefinition {
    fn validate_preload(&self) -> Result<(), FieldError> {
        const FORM: &str = "a dotted module name of at most 128 characters (letters, digits and underscores, each part not starting with a digit), e.g. \"numpy\" or \"xml.etree.ElementTree\"";
        if self.preload.len() > MAX_PRELOAD {
            return Err(FieldError::new(
                "definition.preload",
                format!(
                    "lists {} modules; expected at most {MAX_PRELOAD}",
                    self.preload.len()
                ),
            ));
        }
        let mut seen = BTreeSet::new();
        for (i, name) in self.preload.iter().enumerate() {
            let field = format!("definition.preload[{i}]");
            let well_formed = name.len() <= 128
                && name.split('.').all(|part| {
                    part.chars()
                        .next()
                        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                        && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                });
            if !well_formed {
                return Err(FieldError::new(
                    field,
                    format!("{:?} is not a module name; expected {FORM}", shorten(name)),
                ));
            }
            if !seen.insert(name.as_str()) {
                return Err(FieldError::new(
                    field,
                    format!("{name:?} is listed twice; expected each module once"),
                ));
            }
        }
        Ok(())
    }

    fn validate_code_and_files(&self) -> Result<(), FieldError> {
        const FORM: &str = "exactly one of `definition.code` (inline source) or `definition.files` (a non-empty list of {name, content})";
        match (&self.code, self.files.is_empty()) {
            (Some(_), false) => {
                return Err(FieldError::new(
                    "definition.code",
                    format!("both code and files are given; expected {FORM}"),
                ));
            }
            (None, true) => {
                return Err(FieldError::new(
                    "definition.code",
                    format!("neither code nor files are given; expected {FORM}"),
                ));
            }
            (Some(code), true) => {
                if code.trim().is_empty() {
                    return Err(FieldError::new(
                        "definition.code",
                        format!("the code is empty; expected {FORM}"),
                    ));
                }
                return Ok(());
            }
            (None, false) => {}
        }

        let mut files: BTreeSet<&str> = BTreeSet::new();
        let mut dirs: BTreeSet<&str> = BTreeSet::new();
        for (i, file) in self.files.iter().enumerate() {
            let field = format!("definition.files[{i}].name");
            let name = file.name.as_str();
            validate_file_name(name).map_err(|e| FieldError::new(field.clone(), e.to_string()))?;
            if files.contains(name) {
                return Err(FieldError::new(
                    field,
                    format!("duplicate file name {name:?}; expected each file name once"),
                ));
            }
            if dirs.contains(name) {
                return Err(FieldError::new(
                    field,
                    format!(
                        "{name:?} is also used as a directory by another file; expected a path that is not a parent of another file"
                    ),
                ));
            }
            for (pos, _) in name.match_indices('/') {
                let parent = &name[..pos];
                if files.contains(parent) {
                    return Err(FieldError::new(
                        field,
                        format!(
                            "parent directory {parent:?} is also a file; expected a path whose parents are not files"
                        ),
                    ));
                }
                dirs.insert(parent);
            }
            files.insert(name);
        }

        match &self.entrypoint {
            None => Err(FieldError::new(
                "definition.entrypoint",
                "required with `definition.files`; expected the name of one of the files",
            )),
            Some(e) if !files.contains(e.as_str()) => Err(FieldError::new(
                "definition.entrypoint",
                format!(
                    "{:?} is not one of the files; expected the name of one of `definition.files`",
                    shorten(e)
                ),
            )),
            Some(_) => Ok(()),
        }
    }
}

impl SecurityContext {
    fn validate(&self) -> Result<(), FieldError> {
        for (i, p) in self.permissions.iter().enumerate() {
            if !KNOWN_PERMISSIONS.contains(&p.as_str()) {
                return Err(FieldError::new(
                    format!("executionConfig.securityContext.permissions[{i}]"),
                    format!(
                        "unknown permission {:?}; expected one of: {}",
                        shorten(p),
                        KNOWN_PERMISSIONS.join(", ")
                    ),
                ));
            }
        }
        const FIELD: &str = "executionConfig.securityContext.runAs";
        match &self.run_as {
            None => Ok(()),
            Some(RunAs::Uid(uid)) if (0..=i64::from(u32::MAX - 1)).contains(uid) => Ok(()),
            Some(RunAs::Uid(uid)) => Err(FieldError::new(
                FIELD,
                format!(
                    "uid {uid} is out of range; expected a uid from 0 to {} or a user name",
                    u32::MAX - 1
                ),
            )),
            Some(RunAs::Name(name)) if is_user_name(name) => Ok(()),
            Some(RunAs::Name(name)) => Err(FieldError::new(
                FIELD,
                format!(
                    "{:?} is not a valid user name; expected a numeric uid or a name of 1 to 32 characters from [a-z0-9_-] starting with a letter or _",
                    shorten(name)
                ),
            )),
        }
    }
}

fn is_user_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && (b[0].is_ascii_lowercase() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-')
}

/// Shortens user text quoted in messages.
fn shorten(s: &str) -> String {
    const MAX: usize = 64;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// Checks an identifier-like text field: at most [`MAX_ID_BYTES`] bytes, no
/// control characters, and not empty unless `allow_empty`.
fn validate_text(field: &str, value: &str, allow_empty: bool) -> Result<(), FieldError> {
    let form =
        format!("a non-empty text of at most {MAX_ID_BYTES} bytes without control characters");
    if value.is_empty() && !allow_empty {
        return Err(FieldError::new(field, format!("is empty; expected {form}")));
    }
    if value.len() > MAX_ID_BYTES {
        return Err(FieldError::new(
            field,
            format!("is {} bytes long; expected {form}", value.len()),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(FieldError::new(
            field,
            format!(
                "{:?} contains a control character; expected {form}",
                shorten(value)
            ),
        ));
    }
    Ok(())
}

/// The task id, when given, is used in names (cgroups, directories, logs):
/// restrict it to a safe alphabet.
fn validate_id(id: &str) -> Result<(), FieldError> {
    if id.is_empty() {
        return Ok(());
    }
    let ok = id.len() <= MAX_ID_BYTES
        && id != "."
        && id != ".."
        && id != "batch"
        && id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            "id",
            format!(
                "{:?} is not a valid task id; expected empty (assigned by the executor) or 1 to {MAX_ID_BYTES} characters from [A-Za-z0-9._-], not \".\", \"..\" or \"batch\" (a route name)",
                shorten(id)
            ),
        ))
    }
}

/// The form of a task file's name, as [`FileNameError`] states it.
const FILE_NAME_FORM: &str = "a relative path such as main.py or src/util.py (components separated by /, no empty, . or .. component, no control characters, at most 255 bytes per component and 1024 in total)";

/// A task file's name that [`validate_file_name`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name:?} {problem}; expected {FILE_NAME_FORM}")]
pub struct FileNameError {
    /// The name (shortened when long).
    pub name: String,
    /// What is wrong with it, e.g. `has a .. component`.
    pub problem: String,
}

/// Checks that `name` is a safe relative path for a task file: not empty,
/// not absolute, no empty, `.` or `..` component, no NUL or other control
/// character, at most [`MAX_COMPONENT_BYTES`] bytes per component and
/// [`MAX_PATH_BYTES`] in total, and not inside the executor's private
/// directory ([`CONTROL_DIR_NAME`]). The error message says what is wrong
/// and what is accepted.
pub fn validate_file_name(name: &str) -> Result<(), FileNameError> {
    let problem = if name.is_empty() {
        Some("is empty".to_owned())
    } else if name.len() > MAX_PATH_BYTES {
        Some(format!("is {} bytes long", name.len()))
    } else if name.contains('\0') {
        Some("contains a NUL byte".to_owned())
    } else if name.chars().any(char::is_control) {
        Some("contains a control character".to_owned())
    } else if name.starts_with('/') {
        Some("is absolute".to_owned())
    } else {
        name.split('/').find_map(|c| match c {
            "" => Some("has an empty component (// or a trailing /)".to_owned()),
            "." => Some("has a . component".to_owned()),
            ".." => Some("has a .. component".to_owned()),
            c if c.len() > MAX_COMPONENT_BYTES => {
                Some(format!("has a component of {} bytes", c.len()))
            }
            _ => None,
        })
    };
    let problem = problem.or_else(|| {
        (name.split('/').next() == Some(CONTROL_DIR_NAME))
            .then(|| format!("is inside the executor's reserved directory {CONTROL_DIR_NAME}"))
    });
    match problem {
        None => Ok(()),
        Some(problem) => Err(FileNameError {
            name: shorten(name),
            problem,
        }),
    }
}

fn validate_env(vars: &BTreeMap<String, String>) -> Result<(), FieldError> {
    for (name, value) in vars {
        let field = format!("executionConfig.environmentVariables.{name}");
        let valid_name = name
            .bytes()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_')
            && name.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_');
        if !valid_name {
            return Err(FieldError::new(
                field,
                format!(
                    "{:?} is not a valid variable name; expected a name matching [A-Za-z_][A-Za-z0-9_]*",
                    shorten(name)
                ),
            ));
        }
        if RESERVED_ENV_VARS.contains(&name.as_str()) {
            return Err(FieldError::new(
                field,
                format!(
                    "{name} is set by the executor; expected a name other than {}",
                    RESERVED_ENV_VARS.join(", ")
                ),
            ));
        }
        if value.contains('\0') {
            return Err(FieldError::new(
                field,
                "the value contains a NUL byte; expected text without NUL",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn seed_json() -> serde_json::Value {
        json!({
            "id": "task-123",
            "workflowInstanceId": "wf-9",
            "idempotencyKey": "key-1",
            "priority": 5,
            "definition": {
                "name": "sum",
                "runtime": "python",
                "code": "import json, os\nprint(1)\n",
                "files": [],
                "mode": "handler",
                "inputSchema": {"type": "object", "required": ["a"]},
                "outputSchema": {"type": "object"}
            },
            "input": {"a": 1, "b": [1, 2, 3]},
            "executionConfig": {
                "runtime": "python3.12",
                "method": "CONTAINER",
                "resourceRequirements": {
                    "cpu": "500m",
                    "cpuLimit": 1,
                    "memory": "256Mi",
                    "disk": 524288000,
                    "timeoutSeconds": 30.5,
                    "cpuTimeSeconds": 10.0,
                    "pids": 64,
                    "outputBytes": "1Mi"
                },
                "securityContext": {
                    "runAs": 1000,
                    "permissions": ["network"],
                    "securityLevel": "HIGH"
                },
                "environmentVariables": {"FOO": "bar", "_X1": ""}
            },
            "retryPolicy": {
                "maxRetries": 3,
                "retryInterval": 500,
                "backoffMultiplier": 1.5,
                "maxInterval": 10000,
                "jitter": "EQUAL",
                "retryableErrors": ["TIMEOUT", "RUNTIME_ERROR"]
            }
        })
    }

    fn parse(v: serde_json::Value) -> TaskInstance {
        serde_json::from_value(v).expect("valid task JSON")
    }

    fn files_task(files: &[&str], entrypoint: Option<&str>) -> TaskInstance {
        let files: Vec<_> = files
            .iter()
            .map(|n| json!({"name": n, "content": "x"}))
            .collect();
        let mut def = json!({"runtime": "python", "files": files});
        if let Some(e) = entrypoint {
            def["entrypoint"] = json!(e);
        }
        parse(json!({"definition": def}))
    }

    fn code_task() -> TaskInstance {
        parse(json!({"definition": {"runtime": "python", "code": "print(1)"}}))
    }

    fn field_of(t: &TaskInstance) -> String {
        t.validate_static().expect_err("should be invalid").field
    }

    #[test]
    fn seed_shape_round_trips() {
        let original = seed_json();
        let task = parse(original.clone());
        assert_eq!(task.id, "task-123");
        assert_eq!(task.definition.mode, Mode::Handler);
        assert_eq!(task.execution_config.method, Method::Container);
        assert_eq!(
            task.execution_config.security_context.security_level,
            SecurityLevel::High
        );
        assert_eq!(
            task.execution_config.security_context.run_as,
            Some(RunAs::Uid(1000))
        );
        assert_eq!(
            task.execution_config.resource_requirements.memory,
            Some(QuantityValue::from("256Mi"))
        );
        assert_eq!(task.runtime(), Some("python3.12"));
        let policy = task.retry_policy.clone().expect("policy given");
        assert_eq!(policy.max_retries, 3);

        let serialized = serde_json::to_value(&task).expect("serialize");
        assert_eq!(serialized, original, "serializes back exactly as given");
        let again: TaskInstance = serde_json::from_value(serialized).expect("deserialize");
        assert_eq!(again, task);
        assert_eq!(task.validate_static(), Ok(()));
    }

    #[test]
    fn minimal_task_gets_defaults() {
        let t = code_task();
        assert_eq!(t.id, "");
        assert_eq!(t.priority, 0);
        assert_eq!(t.definition.name, "task");
        assert_eq!(t.definition.mode, Mode::Script);
        assert_eq!(t.input, serde_json::Value::Null);
        assert_eq!(t.execution_config, ExecutionConfig::default());
        assert_eq!(t.execution_config.method, Method::Auto);
        assert_eq!(
            t.execution_config.security_context.security_level,
            SecurityLevel::Medium
        );
        assert_eq!(t.runtime(), Some("python"));
        assert_eq!(t.retry_policy_or_default(), RetryPolicy::default());
        assert_eq!(t.validate_static(), Ok(()));
    }

    #[test]
    fn unknown_fields_are_rejected_by_name() {
        let cases = [
            json!({"definition": {"code": "x"}, "bogusTop": 1}),
            json!({"definition": {"code": "x", "bogusDef": 1}}),
            json!({"definition": {"files": [{"name": "a", "content": "", "bogusFile": 1}]}}),
            json!({"definition": {"code": "x"}, "executionConfig": {"bogusExec": 1}}),
            json!({"definition": {"code": "x"}, "executionConfig": {"resourceRequirements": {"memroy": "1Gi"}}}),
            json!({"definition": {"code": "x"}, "executionConfig": {"securityContext": {"bogusSec": 1}}}),
            json!({"definition": {"code": "x"}, "retryPolicy": {"maxRetry": 1}}),
        ];
        let names = [
            "bogusTop",
            "bogusDef",
            "bogusFile",
            "bogusExec",
            "memroy",
            "bogusSec",
            "maxRetry",
        ];
        for (case, name) in cases.into_iter().zip(names) {
            let err = serde_json::from_value::<TaskInstance>(case).expect_err("unknown field");
            let msg = err.to_string();
            assert!(msg.contains("unknown field"), "{msg}");
            assert!(msg.contains(name), "{msg}");
        }
    }

    #[test]
    fn enums_use_the_wire_spelling() {
        assert!(serde_json::from_value::<Method>(json!("IN_PROCESS")).is_ok());
        assert!(serde_json::from_value::<Method>(json!("in_process")).is_err());
        assert_eq!(
            serde_json::to_value(Method::Faas).expect("ser"),
            json!("FAAS")
        );
        assert_eq!(
            serde_json::to_value(Mode::Script).expect("ser"),
            json!("script")
        );
        assert_eq!(
            serde_json::to_value(SecurityLevel::Low).expect("ser"),
            json!("LOW")
        );
        for m in Method::ALL {
            assert_eq!(m.as_str().parse::<Method>(), Ok(m));
            assert_eq!(serde_json::to_value(m).expect("ser"), json!(m.as_str()));
        }
        assert_eq!("in-process".parse::<Method>(), Ok(Method::InProcess));
        assert!("sideways".parse::<Method>().is_err());
        assert_eq!("high".parse::<SecurityLevel>(), Ok(SecurityLevel::High));
        assert!("max".parse::<SecurityLevel>().is_err());
    }

    #[test]
    fn run_as_accepts_number_or_name() {
        let a: RunAs = serde_json::from_value(json!(1000)).expect("uid");
        assert_eq!(a, RunAs::Uid(1000));
        let b: RunAs = serde_json::from_value(json!("nobody")).expect("name");
        assert_eq!(b, RunAs::Name("nobody".into()));
        assert_eq!(serde_json::to_value(&b).expect("ser"), json!("nobody"));
        let err = serde_json::from_value::<RunAs>(json!(true)).expect_err("bool");
        assert!(err.to_string().contains("uid"), "{err}");
        let err = serde_json::from_value::<RunAs>(json!(1.5)).expect_err("float");
        assert!(err.to_string().contains("uid"), "{err}");
        let huge: RunAs = serde_json::from_value(json!(u64::MAX)).expect("huge uid parses");
        assert_eq!(huge, RunAs::Uid(i64::MAX));
    }

    #[test]
    fn run_as_validation() {
        let mut t = code_task();
        for ok in [
            RunAs::Uid(0),
            RunAs::Uid(65534),
            RunAs::Name("nobody".into()),
        ] {
            t.execution_config.security_context.run_as = Some(ok);
            assert_eq!(t.validate_static(), Ok(()));
        }
        for bad in [
            RunAs::Uid(-1),
            RunAs::Uid(i64::from(u32::MAX)),
            RunAs::Name(String::new()),
            RunAs::Name("Root".into()),
            RunAs::Name("a/b".into()),
        ] {
            t.execution_config.security_context.run_as = Some(bad);
            assert_eq!(field_of(&t), "executionConfig.securityContext.runAs");
        }
    }

    #[test]
    fn code_and_files_are_exclusive() {
        let both = parse(
            json!({"definition": {"code": "x", "files": [{"name": "a.py", "content": ""}], "entrypoint": "a.py"}}),
        );
        let err = both.validate_static().expect_err("both");
        assert_eq!(err.field, "definition.code");
        assert!(err.message.contains("exactly one of"), "{}", err.message);

        let neither = parse(json!({"definition": {"runtime": "python"}}));
        assert_eq!(field_of(&neither), "definition.code");

        let empty = parse(json!({"definition": {"code": "  \n"}}));
        assert_eq!(field_of(&empty), "definition.code");
    }

    #[test]
    fn preload_lists_module_names_once_each() {
        let with = |names: Vec<String>| {
            let mut t = code_task();
            t.definition.preload = names;
            t
        };
        for good in [
            vec![],
            vec![
                "json".to_string(),
                "xml.etree.ElementTree".into(),
                "_ssl".into(),
                "a1.b2".into(),
            ],
        ] {
            assert_eq!(with(good.clone()).validate_static(), Ok(()), "{good:?}");
        }
        for (i, bad) in [
            "", "os;x", "../x", "a..b", ".a", "a.", "1abc", "a.2b", "a b", "a-b", "/abs", "é",
        ]
        .into_iter()
        .enumerate()
        {
            let err = with(vec!["json".into(), bad.into()])
                .validate_static()
                .expect_err(bad);
            assert_eq!(err.field, "definition.preload[1]", "case {i}: {bad:?}");
            assert!(err.message.contains("module name"), "{}", err.message);
        }
        let long = "a".repeat(129);
        assert_eq!(field_of(&with(vec![long])), "definition.preload[0]");
        let twice = with(vec!["json".into(), "os".into(), "json".into()])
            .validate_static()
            .expect_err("twice");
        assert_eq!(twice.field, "definition.preload[2]");
        assert!(twice.message.contains("twice"), "{}", twice.message);
        let many = with((0..=MAX_PRELOAD).map(|i| format!("m{i}")).collect())
            .validate_static()
            .expect_err("too many");
        assert_eq!(many.field, "definition.preload");
        assert!(many.message.contains("at most 16"), "{}", many.message);
    }

    #[test]
    fn entrypoint_rules() {
        assert_eq!(
            files_task(&["main.py"], Some("main.py")).validate_static(),
            Ok(())
        );
        assert_eq!(
            files_task(&["main.py"], None)
                .validate_static()
                .expect_err("missing")
                .field,
            "definition.entrypoint"
        );
        assert_eq!(
            field_of(&files_task(&["main.py"], Some("other.py"))),
            "definition.entrypoint"
        );
        // Ignored with code.
        let mut t = code_task();
        t.definition.entrypoint = Some("whatever".into());
        assert_eq!(t.validate_static(), Ok(()));
    }

    #[test]
    fn file_names_are_safe_relative_paths() {
        let good = [
            "main.py",
            "src/util.py",
            "a/b/c/d.txt",
            ".hidden",
            "a..b",
            "x/.taskexec",
        ];
        for name in good {
            assert_eq!(validate_file_name(name), Ok(()), "{name}");
        }
        let long_component = "a".repeat(256);
        let long_path = ["a"; 600].join("/");
        let bad = [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a/..",
            "a//b",
            "a/",
            "./a",
            "a/./b",
            "a\0b",
            "a\nb",
            long_component.as_str(),
            long_path.as_str(),
            ".taskexec/output.json",
            ".taskexec",
        ];
        for name in bad {
            let err = validate_file_name(name).expect_err(name);
            assert!(
                err.to_string().contains("expected a relative path"),
                "{err}"
            );
        }
        assert_eq!(validate_file_name(&"a".repeat(255)), Ok(()));
    }

    #[test]
    fn bad_file_name_names_its_index() {
        let t = files_task(
            &["main.py", "ok.py", "lib/x.py", "../escape.py"],
            Some("main.py"),
        );
        let err = t.validate_static().expect_err("traversal");
        assert_eq!(err.field, "definition.files[3].name");
        assert!(err.message.contains(".."), "{}", err.message);
    }

    #[test]
    fn duplicate_and_conflicting_file_names() {
        let dup = files_task(&["a.py", "b.py", "a.py"], Some("a.py"));
        let err = dup.validate_static().expect_err("duplicate");
        assert_eq!(err.field, "definition.files[2].name");
        assert!(err.message.contains("duplicate"));

        let file_then_dir = files_task(&["a", "a/b.py"], Some("a"));
        assert_eq!(field_of(&file_then_dir), "definition.files[1].name");

        let dir_then_file = files_task(&["a/b/c.py", "a/b"], Some("a/b/c.py"));
        assert_eq!(field_of(&dir_then_file), "definition.files[1].name");

        let siblings = files_task(&["a/b.py", "a/c.py", "ab.py"], Some("ab.py"));
        assert_eq!(siblings.validate_static(), Ok(()));
    }

    #[test]
    fn environment_variables() {
        let mut t = code_task();
        t.execution_config
            .environment_variables
            .insert("GOOD_1".into(), "value with spaces = ok".into());
        assert_eq!(t.validate_static(), Ok(()));

        for (name, value) in [
            ("1BAD", "x"),
            ("BAD-NAME", "x"),
            ("", "x"),
            ("A B", "x"),
            ("É", "x"),
        ] {
            let mut t = code_task();
            t.execution_config
                .environment_variables
                .insert(name.into(), value.into());
            let err = t.validate_static().expect_err(name);
            assert_eq!(
                err.field,
                format!("executionConfig.environmentVariables.{name}")
            );
            assert!(
                err.message.contains("[A-Za-z_][A-Za-z0-9_]*"),
                "{}",
                err.message
            );
        }

        for name in RESERVED_ENV_VARS {
            let mut t = code_task();
            t.execution_config
                .environment_variables
                .insert(name.into(), "x".into());
            let err = t.validate_static().expect_err(name);
            assert_eq!(
                err.field,
                format!("executionConfig.environmentVariables.{name}")
            );
            assert!(err.message.contains("set by the executor"));
        }

        let mut t = code_task();
        t.execution_config
            .environment_variables
            .insert("NUL".into(), "a\0b".into());
        assert_eq!(field_of(&t), "executionConfig.environmentVariables.NUL");
    }

    #[test]
    fn permissions() {
        let mut t = code_task();
        t.execution_config.security_context.permissions = vec!["network".into()];
        assert_eq!(t.validate_static(), Ok(()));
        t.execution_config.security_context.permissions = vec!["network".into(), "root".into()];
        let err = t.validate_static().expect_err("unknown permission");
        assert_eq!(err.field, "executionConfig.securityContext.permissions[1]");
        assert!(err.message.contains("network"));
    }

    #[test]
    fn priority_range() {
        let mut t = code_task();
        for ok in [-1000, 0, 1000] {
            t.priority = ok;
            assert_eq!(t.validate_static(), Ok(()));
        }
        for bad in [-1001, 1001, i32::MIN, i32::MAX] {
            t.priority = bad;
            let err = t.validate_static().expect_err("out of range");
            assert_eq!(err.field, "priority");
            assert!(err.message.contains("-1000 to 1000"));
        }
    }

    #[test]
    fn identifiers() {
        let mut t = code_task();
        t.id = "abc-DEF_1.2".into();
        assert_eq!(t.validate_static(), Ok(()));
        for bad in ["../x", "a/b", "..", "a b", "x\0"] {
            t.id = bad.into();
            assert_eq!(field_of(&t), "id", "{bad}");
        }
        let mut t = code_task();
        t.workflow_instance_id = Some("wf\n1".into());
        assert_eq!(field_of(&t), "workflowInstanceId");
        let mut t = code_task();
        t.idempotency_key = Some("k".repeat(MAX_ID_BYTES + 1));
        assert_eq!(field_of(&t), "idempotencyKey");
        let mut t = code_task();
        t.definition.name = String::new();
        assert_eq!(field_of(&t), "definition.name");
        let mut t = code_task();
        t.execution_config.runtime = Some(String::new());
        assert_eq!(field_of(&t), "executionConfig.runtime");
    }

    #[test]
    fn full_validation_resolves_limits_and_retry() {
        let task = parse(seed_json());
        let v = task
            .validate(&LimitsConfig::default(), &RetryLimits::default())
            .expect("valid");
        assert_eq!(v.limits.memory_bytes, 256 << 20);
        assert_eq!(v.limits.cpu_request_millis, 500);
        assert_eq!(v.limits.cpu_limit_millis, Some(1000));
        assert_eq!(v.retry.max_retries, 3);

        let mut bad = task.clone();
        bad.execution_config.resource_requirements.memory = Some("12Zi".into());
        let err = bad
            .validate(&LimitsConfig::default(), &RetryLimits::default())
            .expect_err("bad memory");
        assert_eq!(err.field, "executionConfig.resourceRequirements.memory");
    }
}
