//! The error taxonomy of task execution: the [`ErrorType`] categories a
//! failed task reports, how each category is handled ([`Handling`], the
//! seed's handling table as code), the [`TaskError`] carried in results, and
//! [`FieldError`], the validation error that names the offending JSON field.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The category of a task failure. Serialized in SCREAMING_SNAKE_CASE
/// (`"INPUT_VALIDATION"`, `"ENVIRONMENT_SETUP"`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorType {
    /// The task definition, input or configuration is invalid.
    InputValidation,
    /// The sandbox or runtime could not be prepared.
    EnvironmentSetup,
    /// The task ran longer than its timeout.
    Timeout,
    /// The task's code failed (non-zero exit, uncaught exception, signal).
    RuntimeError,
    /// The task's code did not compile.
    CompilationError,
    /// The task's output did not match its output schema or was unreadable.
    OutputValidation,
    /// The task hit a memory, disk, pid, CPU time or output limit.
    ResourceExhaustion,
    /// The task was cancelled.
    Cancelled,
    /// The task failed and its retry budget is used up.
    MaxRetriesExceeded,
    /// A fault in the executor itself.
    Internal,
}

/// How the executor reacts to a category of failure (the seed's handling
/// table). Whether a retry actually happens is decided by
/// [`crate::ValidRetryPolicy::should_retry`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Handling {
    /// Reject the task up front; never retried.
    Reject,
    /// Retry with backoff; always retryable, listed or not.
    RetryWithBackoff,
    /// Fail the attempt; retried only if listed in `retryableErrors`.
    FailRetryIfListed,
    /// Capture stdout/stderr and fail; retried only if listed.
    CaptureAndFail,
    /// Fail with details of what did not validate; retried only if listed.
    FailWithDetails,
    /// Terminate the process; reschedule per retry policy (only if listed).
    TerminateReschedulePerPolicy,
    /// Final; never retried.
    Final,
}

impl ErrorType {
    /// Every error type, in declaration order.
    pub const ALL: [ErrorType; 10] = [
        ErrorType::InputValidation,
        ErrorType::EnvironmentSetup,
        ErrorType::Timeout,
        ErrorType::RuntimeError,
        ErrorType::CompilationError,
        ErrorType::OutputValidation,
        ErrorType::ResourceExhaustion,
        ErrorType::Cancelled,
        ErrorType::MaxRetriesExceeded,
        ErrorType::Internal,
    ];

    /// The wire name, e.g. `"INPUT_VALIDATION"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorType::InputValidation => "INPUT_VALIDATION",
            ErrorType::EnvironmentSetup => "ENVIRONMENT_SETUP",
            ErrorType::Timeout => "TIMEOUT",
            ErrorType::RuntimeError => "RUNTIME_ERROR",
            ErrorType::CompilationError => "COMPILATION_ERROR",
            ErrorType::OutputValidation => "OUTPUT_VALIDATION",
            ErrorType::ResourceExhaustion => "RESOURCE_EXHAUSTION",
            ErrorType::Cancelled => "CANCELLED",
            ErrorType::MaxRetriesExceeded => "MAX_RETRIES_EXCEEDED",
            ErrorType::Internal => "INTERNAL",
        }
    }

    /// How this category is handled (the seed's handling table).
    pub const fn handling(self) -> Handling {
        match self {
            ErrorType::InputValidation => Handling::Reject,
            ErrorType::EnvironmentSetup => Handling::RetryWithBackoff,
            ErrorType::Timeout | ErrorType::Internal => Handling::FailRetryIfListed,
            ErrorType::RuntimeError => Handling::CaptureAndFail,
            ErrorType::OutputValidation => Handling::FailWithDetails,
            ErrorType::ResourceExhaustion => Handling::TerminateReschedulePerPolicy,
            ErrorType::CompilationError | ErrorType::Cancelled | ErrorType::MaxRetriesExceeded => {
                Handling::Final
            }
        }
    }

    /// True for categories that are never retried, whatever the policy lists:
    /// `INPUT_VALIDATION`, `COMPILATION_ERROR`, `CANCELLED`,
    /// `MAX_RETRIES_EXCEEDED`.
    pub const fn never_retried(self) -> bool {
        matches!(self.handling(), Handling::Reject | Handling::Final)
    }

    /// True for categories retried even when not listed in
    /// `retryableErrors`: only `ENVIRONMENT_SETUP`.
    pub const fn always_retryable(self) -> bool {
        matches!(self.handling(), Handling::RetryWithBackoff)
    }
}

impl fmt::Display for ErrorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The accepted spellings of an [`ErrorType`], quoted in error messages.
pub const ERROR_TYPE_FORM: &str = "one of INPUT_VALIDATION, ENVIRONMENT_SETUP, TIMEOUT, RUNTIME_ERROR, COMPILATION_ERROR, OUTPUT_VALIDATION, RESOURCE_EXHAUSTION, CANCELLED, MAX_RETRIES_EXCEEDED, INTERNAL";

/// A string that names no [`ErrorType`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown error type {0:?}; expected {ERROR_TYPE_FORM}")]
pub struct UnknownErrorType(pub String);

impl FromStr for ErrorType {
    type Err = UnknownErrorType;

    /// Parses the wire name; case-insensitive, `-` accepted for `_`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let normalized = s.trim().to_ascii_uppercase().replace('-', "_");
        ErrorType::ALL
            .into_iter()
            .find(|t| t.as_str() == normalized)
            .ok_or_else(|| UnknownErrorType(s.to_owned()))
    }
}

/// A task failure as reported in results: `{"type", "message", "details"?}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "camelCase")]
#[error("{error_type}: {message}")]
pub struct TaskError {
    /// The failure category.
    #[serde(rename = "type")]
    pub error_type: ErrorType,
    /// A human-readable description.
    pub message: String,
    /// Structured details (e.g. the failing field, the exception's stack).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub details: Option<serde_json::Value>,
}

impl TaskError {
    /// An error without details.
    pub fn new(error_type: ErrorType, message: impl Into<String>) -> Self {
        TaskError {
            error_type,
            message: message.into(),
            details: None,
        }
    }

    /// The same error with `details` set.
    #[must_use]
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }
}

/// A validation failure naming the offending JSON field path (for example
/// `executionConfig.resourceRequirements.memory`) and saying what is
/// accepted there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{field}`: {message}")]
pub struct FieldError {
    /// The JSON path of the offending field, e.g. `definition.files[3].name`.
    pub field: String,
    /// What is wrong and what is accepted.
    pub message: String,
}

impl FieldError {
    /// A field error.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl From<FieldError> for TaskError {
    /// An `INPUT_VALIDATION` error whose details are `{"field": ...}`.
    fn from(e: FieldError) -> Self {
        let details = serde_json::json!({ "field": e.field });
        TaskError::new(ErrorType::InputValidation, e.to_string()).with_details(details)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_round_trip() {
        for t in ErrorType::ALL {
            let json = serde_json::to_string(&t).expect("serialize");
            assert_eq!(json, format!("\"{}\"", t.as_str()));
            let back: ErrorType = serde_json::from_str(&json).expect("deserialize");
            assert_eq!(back, t);
            assert_eq!(t.as_str().parse::<ErrorType>(), Ok(t));
            assert_eq!(t.to_string(), t.as_str());
        }
        assert_eq!(
            serde_json::to_string(&ErrorType::InputValidation).expect("ser"),
            "\"INPUT_VALIDATION\""
        );
    }

    #[test]
    fn from_str_is_lenient_about_case_and_dashes() {
        assert_eq!("timeout".parse(), Ok(ErrorType::Timeout));
        assert_eq!("runtime-error".parse(), Ok(ErrorType::RuntimeError));
        let err = "BOGUS".parse::<ErrorType>().expect_err("unknown");
        assert!(err.to_string().contains("INPUT_VALIDATION"));
        assert!(serde_json::from_str::<ErrorType>("\"timeout\"").is_err());
    }

    #[test]
    fn handling_table() {
        use ErrorType as E;
        use Handling as H;
        let expected = [
            (E::InputValidation, H::Reject, true),
            (E::EnvironmentSetup, H::RetryWithBackoff, false),
            (E::Timeout, H::FailRetryIfListed, false),
            (E::RuntimeError, H::CaptureAndFail, false),
            (E::CompilationError, H::Final, true),
            (E::OutputValidation, H::FailWithDetails, false),
            (
                E::ResourceExhaustion,
                H::TerminateReschedulePerPolicy,
                false,
            ),
            (E::Cancelled, H::Final, true),
            (E::MaxRetriesExceeded, H::Final, true),
            (E::Internal, H::FailRetryIfListed, false),
        ];
        assert_eq!(expected.len(), ErrorType::ALL.len());
        for (t, h, never) in expected {
            assert_eq!(t.handling(), h, "{t}");
            assert_eq!(t.never_retried(), never, "{t}");
            assert_eq!(t.always_retryable(), t == E::EnvironmentSetup, "{t}");
        }
    }

    #[test]
    fn task_error_json() {
        let e = TaskError::new(ErrorType::Timeout, "took too long");
        assert_eq!(
            serde_json::to_value(&e).expect("ser"),
            serde_json::json!({"type": "TIMEOUT", "message": "took too long"})
        );
        let with = e.clone().with_details(serde_json::json!({"limit": 5}));
        let back: TaskError =
            serde_json::from_value(serde_json::to_value(&with).expect("ser")).expect("de");
        assert_eq!(back, with);
        assert_eq!(e.to_string(), "TIMEOUT: took too long");
    }

    #[test]
    fn field_error_display_and_conversion() {
        let fe = FieldError::new("priority", "must be between -1000 and 1000");
        assert_eq!(fe.to_string(), "`priority`: must be between -1000 and 1000");
        let te = TaskError::from(fe);
        assert_eq!(te.error_type, ErrorType::InputValidation);
        assert_eq!(te.details, Some(serde_json::json!({"field": "priority"})));
    }
}
