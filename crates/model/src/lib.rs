//! Pure domain model of taskexec: the task a caller submits, the result it
//! gets back, the lifecycle state machine in between, the error taxonomy and
//! its retry rules, resource quantities and the limits they resolve to.
//!
//! This crate does no I/O and reads no clock and no random source: callers
//! pass timestamps and random numbers in, which keeps every function here
//! deterministic and easy to test.

#![warn(missing_docs)]

pub mod error;
pub mod lifecycle;
pub mod limits;
pub mod method;
pub mod output;
pub mod protocol;
pub mod quantity;
pub mod result;
pub mod retry;
pub mod task;

pub use error::{ErrorType, FieldError, Handling, TaskError, UnknownErrorType};
pub use lifecycle::{IllegalTransition, Lifecycle, TransitionRecord, can_transition};
pub use limits::{Limits, LimitsConfig};
pub use method::{MethodAvailability, select_method};
pub use output::{TaskOutput, compact, count_values, max_tree_values};
pub use quantity::{
    QuantityError, QuantityValue, format_bytes, format_cpu_millis, format_duration, parse_bytes,
    parse_cpu_millis, parse_duration,
};
pub use result::{
    AttemptRecord, ExecutionMetadata, LimitHit, LimitsHit, PhaseTimings, TaskResult, TaskStatus,
    UnknownTaskStatus,
};
pub use retry::{Jitter, RetryLimits, RetryPolicy, ValidRetryPolicy};
pub use task::{
    ExecutionConfig, FileNameError, Method, Mode, ResourceRequirements, RunAs, SecurityContext,
    SecurityLevel, TaskDefinition, TaskFile, TaskInstance, UnknownVariant, ValidatedTask,
    validate_file_name,
};
